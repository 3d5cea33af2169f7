"""``audit_run``: verify a run's privacy ledger without trusting any ε it states.

What is checked, per client chain (``ledger.jsonl``):

1. integrity: every hash recomputes, ``prev_hash`` links each entry to the one before it,
   rounds strictly increase, every signature verifies against the client's public key
   (:func:`common.privacy.ledger.verify_chain`);
2. the ε claims: every ``epsilon_cumulative`` is recomputed from the raw mechanism parameters of
   the client's entries up to that round, with Opacus's RDP *and* PRV accountants. A claim
   below the recomputation by the accountant the entry names by more than ``tolerance``
   (relative) is an error. The *independent* accountant must agree too, within its own stated
   tolerance ``CROSS_TOLERANCE`` (25 %): RDP is a valid but looser bound (typically 10-20 %
   above PRV), so a PRV claim may sit below RDP by that much and no more; a claim further below
   means one of the two accountants is wrong, and the audit fails rather than guess which;
3. ``epsilon_round`` is the increase of the cumulative ε over the client's previous entry;
4. no client exceeded its budget (the entry's ``epsilon_budget`` and the run's
   ``target-epsilon``, whichever is lower), and no entry states ε at a δ above the run's;
5. against ``metrics.json``: every DP training the server recorded has a ledger entry (this is
   what catches a ledger whose *last* lines were dropped) and they agree on ε and mechanism.

How ε is recomputed (:mod:`common.report.recompute`): RDP exactly as ``epsilon_of`` does
(bit-identical, cheap once each mechanism's RDP curve is cached). PRV per prefix at Opacus's
own precision costs ~0.2 s, so each chain first gets rigorous PRV *upper bounds* (the same
method on one shared grid, with just enough slack to decide); a claim or a budget the bound
cannot clear is recomputed exactly before anything is reported. So every error is confirmed
by Opacus's exact number, and every pass rests on a valid upper bound. Results are cached by
merged history, so clients that share a mechanism (IID runs) cost one computation in all.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.accounting import ACCOUNTANTS, merge_history
from common.privacy.findings import Finding, finding
from common.privacy.ledger import KIND_CLIENT_DP_SGD, LEDGER_FILE, LedgerEntry
from common.privacy.verification import chains, verify_chain
from common.report.checks import mechanism_warnings
from common.report.keys import ClientKeys, load_client_keys
from common.report.recompute import BoundRequest, Recomputer, request_key
from common.report.rundata import RunData, load_run, metrics_clients

# How far a claim may sit below the *other* accountant (RDP is looser than PRV by ~10-20 %).
CROSS_TOLERANCE = 0.25
log = logging.getLogger("fedvault.report.audit")

DEFAULT_TOLERANCE = 0.01
_SAME = 1e-9  # relative: values copied between records must agree to float noise


@dataclass(frozen=True)
class EntryCheck:
    """One ledger entry's claim next to its recomputations (for the report's tables)."""

    partition_id: int
    round: int
    accountant: str
    delta: float
    claimed: float
    epsilon_round: float
    budget: float
    recomputed: dict[str, float]  # exact values computed (always "rdp"; "prv" when needed)
    prv_bound: float | None  # a rigorous upper bound on the PRV ε, when that decided
    under_reported: bool


@dataclass
class AuditResult:
    """The audit's verdict: ``verdict_ok`` is true iff no finding is an error."""

    findings: list[Finding]
    verdict_ok: bool
    run_id: str = ""
    tolerance: float = DEFAULT_TOLERANCE
    dp: bool = True
    ledger_present: bool = False
    entries: int = 0
    clients: int = 0
    checks: list[EntryCheck] = field(default_factory=list)
    keys_source: str = ""
    seconds: float = 0.0
    histories_computed: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.is_error]

    @property
    def verdict(self) -> str:
        """``pass`` / ``fail`` / ``not-applicable`` (a run without DP claims nothing)."""
        if not self.dp:
            return "not-applicable"
        return "pass" if self.verdict_ok else "fail"

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if not self.dp:
            return f"run {self.run_id}: no DP (dp = false): no privacy claim to verify"
        return (
            f"run {self.run_id}: audit {'PASSED' if self.verdict_ok else 'FAILED'}: "
            f"{self.entries} ledger entries of {self.clients} clients, {len(self.errors)} "
            f"errors, {len(self.warnings)} warnings ({self.seconds:.1f}s)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "verdict_ok": self.verdict_ok,
            "run_id": self.run_id,
            "tolerance": self.tolerance,
            "dp": self.dp,
            "ledger_present": self.ledger_present,
            "entries": self.entries,
            "clients": self.clients,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "keys_source": self.keys_source,
            "seconds": round(self.seconds, 3),
            "findings": [f.to_dict() for f in self.findings],
        }


def audit_run(
    run_dir: str | os.PathLike[str],
    tolerance: float = DEFAULT_TOLERANCE,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    *,
    keys_dir: str | os.PathLike[str] | None = None,
    recomputer: Recomputer | None = None,
    workers: int = 1,
) -> AuditResult:
    """Audit ``run_dir`` (``ledger.jsonl`` + ``metrics.json``); see the module docstring.

    Clients' public keys, first match wins: ``public_keys`` (Ed25519 key id → key),
    ``keys_dir`` (clients' ``public.json`` files), ``<run_dir>/keys``. Without any, signatures
    are not checked (a warning per client). ``RunDirError`` when ``run_dir`` is not a run dir.
    ``workers > 1`` computes the ε bounds of clients with distinct mechanisms in that many
    forked processes (for the CLI; keep 1 inside a multi-threaded server process).
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    started = time.perf_counter()
    data = load_run(run_dir)
    result = AuditResult(
        findings=[], verdict_ok=False, run_id=data.run_id, tolerance=tolerance, dp=data.dp,
        ledger_present=data.ledger_present, entries=len(data.entries),
    )  # fmt: skip
    findings = result.findings
    if not data.dp:
        findings.append(
            finding(
                "error", "no-dp", None, None,
                "DP is disabled for this run (dp = false): it makes no privacy guarantee, "
                "there is nothing to verify",
            )
        )
    elif not data.ledger_present:
        findings.append(
            finding(
                "error", "ledger-missing", None, None,
                f"{LEDGER_FILE} is missing: the ε values in metrics.json are the server's word "
                "and cannot be verified",
            )
        )
    else:
        keys = _keys(data, public_keys, keys_dir)
        result.keys_source = keys.source if keys else ""
        rec = recomputer or Recomputer()
        findings.extend(_audit_ledger(data, keys, rec, tolerance, result.checks, workers))
        result.histories_computed = rec.computed
    result.clients = len({e.partition_id for e in data.entries})
    result.verdict_ok = not any(f.is_error for f in findings)
    result.seconds = time.perf_counter() - started
    log.info("%s", result.summary())
    return result


def _keys(
    data: RunData,
    public_keys: Mapping[str, Ed25519PublicKey] | None,
    keys_dir: str | os.PathLike[str] | None,
) -> ClientKeys | None:
    if public_keys is not None:
        return ClientKeys.from_mapping(public_keys, "public_keys argument")
    path = Path(keys_dir) if keys_dir is not None else data.run_dir / "keys"
    if keys_dir is None and not path.is_dir():
        return None
    return load_client_keys(path)


def _audit_ledger(
    data: RunData,
    keys: ClientKeys | None,
    rec: Recomputer,
    tolerance: float,
    checks: list[EntryCheck],
    workers: int,
) -> list[Finding]:
    out: list[Finding] = list(data.ledger_problems)
    if keys is not None:
        out.extend(finding("warning", "key-file", None, None, p) for p in keys.problems)
        if not keys.by_id:
            out.append(
                finding("warning", "no-keys", None, None, f"no client public keys in {keys.source}")
            )
            keys = None
    if not data.entries:
        out.append(
            finding("error", "ledger-empty", None, None, f"{LEDGER_FILE} has no readable entries")
        )
        return out
    out.extend(verify_chain(data.entries, keys.by_id if keys else None))
    config = data.config
    grouped = chains(data.entries)
    if workers > 1:  # the expensive part, for every chain at once, in parallel
        requests = []
        for chain in grouped.values():
            valid = _claim_chain(chain, [])
            request = bound_request(valid, tolerance, _budgets(valid, config)) if valid else None
            if request is not None:
                requests.append(request)
        rec.prefetch(requests, workers)
    for chain in grouped.values():
        pid = chain[-1].partition_id
        if keys is not None:
            out.extend(_key_binding(pid, chain, keys))
        out.extend(_audit_claims(pid, chain, config, rec, tolerance, checks))
    if data.metrics is not None:
        out.extend(_cross_check(data))
    return out


def _key_binding(pid: int, chain: list[LedgerEntry], keys: ClientKeys) -> list[Finding]:
    for entry in chain:
        bound = keys.partition_of.get(entry.signer)
        if bound is not None and bound != pid:
            return [
                finding(
                    "error", "wrong-key", pid, entry.round,
                    f"signed with client {bound}'s key ({entry.signer}), not client {pid}'s",
                )
            ]
    return []


def _audit_claims(
    pid: int,
    chain: list[LedgerEntry],
    config: Mapping[str, Any],
    rec: Recomputer,
    tolerance: float,
    checks: list[EntryCheck],
) -> list[Finding]:
    """Recompute every cumulative ε of one chain and check claims, increments and budget."""
    out: list[Finding] = []
    other_kinds = sorted({e.kind for e in chain if e.kind != KIND_CLIENT_DP_SGD})
    if other_kinds:
        out.append(
            finding(
                "warning", "kind-not-audited", pid, None,
                f"entries of kind {', '.join(other_kinds)} are not audited by this version",
            )
        )
    entries = sorted((e for e in chain if e.kind == KIND_CLIENT_DP_SGD), key=lambda e: e.seq)
    if not entries:
        return out
    out.extend(_config_consistency(pid, entries, config))
    by_mechanism: dict[tuple[int, float, float], list[int]] = {}
    for e in entries:
        by_mechanism.setdefault((e.num_examples, e.sample_rate, e.delta), []).append(e.round)
    for (n, q, delta), rounds in sorted(by_mechanism.items()):
        out.extend(mechanism_warnings(pid, n, q, delta, rounds))

    valid = _claim_chain(entries, out)
    if not valid:
        return out
    budgets = _budgets(valid, config)
    try:
        prefix = _Prefixes(valid, rec, tolerance, budgets)
    except (ValueError, RuntimeError, ArithmeticError) as err:
        out.append(
            finding(
                "error", "recompute-failed", pid, valid[0].round,
                f"ε cannot be recomputed from the recorded mechanism ({err})",
            )
        )
        return out

    over: list[int] = []
    over_by = 0.0
    exceeded: list[tuple[int, float, float]] = []
    previous = 0.0
    for k, e in enumerate(valid):
        claim, budget = e.epsilon_cumulative, budgets[k]
        # the claim: not below the declared accountant's ε by more than the tolerance
        floor = prefix.upper(k, e.accountant)
        under = claim < floor * (1 - tolerance)
        if under:
            floor = prefix.exact(k, e.accountant)  # a failure is always confirmed exactly
            under = claim < floor * (1 - tolerance)
        if under:
            other = next(a for a in ACCOUNTANTS if a != e.accountant)
            gap = 1 - claim / floor if floor > 0 else 1.0
            out.append(
                finding(
                    "error", "under-reported", pid, e.round,
                    f"claims ε={claim:.4f} but its mechanism history recomputes to "
                    f"ε={floor:.4f} with {e.accountant} ({other}: "
                    f"{prefix.exact(k, other):.4f}): under-reported by {gap:.1%} "
                    f"(tolerance {tolerance:.1%})",
                )
            )
        elif claim > floor * (1 + tolerance):
            over.append(e.round)
            over_by = max(over_by, claim / floor - 1 if floor > 0 else math.inf)
        # the independent accountant: not below it by more than its stated tolerance
        other = next(a for a in ACCOUNTANTS if a != e.accountant)
        if not under and claim < prefix.upper(k, other) * (1 - CROSS_TOLERANCE):
            independent = prefix.exact(k, other)
            if claim < independent * (1 - CROSS_TOLERANCE):
                out.append(
                    finding(
                        "error", "accountants-disagree", pid, e.round,
                        f"claims ε={claim:.4f} with {e.accountant}, but the independent "
                        f"{other} accountant recomputes ε={independent:.4f}: more than "
                        f"{CROSS_TOLERANCE:.0%} below it",
                    )
                )
        # the budget: the claim and the recomputation must both stay within it
        if claim > budget:
            exceeded.append((e.round, claim, budget))
        elif prefix.upper(k, e.accountant) > budget:
            spent = prefix.exact(k, e.accountant)
            if spent > budget:
                exceeded.append((e.round, spent, budget))
        # the increment: the difference of consecutive cumulative claims
        increase = claim - previous
        if not math.isclose(e.epsilon_round, increase, rel_tol=_SAME, abs_tol=1e-12):
            out.append(
                finding(
                    "error", "round-epsilon", pid, e.round,
                    f"epsilon_round={e.epsilon_round:.6g} is not the increase of cumulative ε "
                    f"({claim:.6g} - {previous:.6g} = {increase:.6g})",
                )
            )
        previous = claim
        checks.append(
            EntryCheck(
                pid, e.round, e.accountant, e.delta, claim, e.epsilon_round, e.epsilon_budget,
                prefix.known(k), prefix.bound(k), under,
            )
        )  # fmt: skip
    if over:
        out.append(
            finding(
                "warning", "over-reported", pid, over,
                f"claimed ε is above the recomputation by up to {over_by:.1%}: conservative, but "
                "the recorded mechanism may not be the one that ran",
            )
        )
    if exceeded:
        r, spent, budget = exceeded[0]
        more = f" (and in {len(exceeded) - 1} later rounds)" if len(exceeded) > 1 else ""
        out.append(
            finding(
                "error", "budget-exceeded", pid, r,
                f"exceeded its privacy budget: ε={spent:.4f} > budget ε={budget:g}{more}",
            )
        )
    return out


def bound_request(
    chain: list[LedgerEntry], tolerance: float, budgets: list[float]
) -> BoundRequest | None:
    """The PRV-bounds question for one chain (None: not a single mechanism, or no PRV claims)."""
    mechanisms = {(e.noise_multiplier, e.sample_rate) for e in chain}
    deltas = {e.delta for e in chain}
    if not any(e.accountant == "prv" for e in chain) or len(mechanisms) != 1 or len(deltas) != 1:
        return None
    if tolerance <= 0:
        return None
    (sigma, q), delta = mechanisms.pop(), deltas.pop()
    totals = list(itertools.accumulate(e.steps for e in chain))
    slacks = [
        min(0.5 * tolerance * e.epsilon_cumulative, 0.5 * (budget - e.epsilon_cumulative))
        if e.epsilon_cumulative < budget
        else 0.5 * tolerance * e.epsilon_cumulative
        for e, budget in zip(chain, budgets, strict=True)
    ]
    return request_key(sigma, q, delta, totals, slacks)


def _budgets(chain: list[LedgerEntry], config: Mapping[str, Any]) -> list[float]:
    """Per entry: its own budget, or the run's target-epsilon when that is lower."""
    target = _float(config.get("target-epsilon"))
    return [min(e.epsilon_budget, target) if target is not None else e.epsilon_budget
            for e in chain]  # fmt: skip


def _claim_chain(chain: list[LedgerEntry], out: list[Finding]) -> list[LedgerEntry]:
    """A chain's client-DP-SGD entries in round order, up to the first invalid mechanism."""
    entries = sorted((e for e in chain if e.kind == KIND_CLIENT_DP_SGD), key=lambda e: e.seq)
    if not entries:
        return []
    return _valid_prefix(entries[0].partition_id, entries, out)


class _Prefixes:
    """ε of every prefix of one chain: RDP exactly (cheap), PRV by bound, exactly on demand.

    PRV bounds are asked with a slack per prefix: half the tolerance (so an honest claim
    clears its bound) and half the distance to the budget (so a client that ends just under
    its budget is shown to be under it), whichever is smaller.
    """

    def __init__(
        self, chain: list[LedgerEntry], rec: Recomputer, tolerance: float, budgets: list[float]
    ) -> None:
        self.rec = rec
        self.mechanisms = [(e.noise_multiplier, e.sample_rate, e.steps) for e in chain]
        self.deltas = [e.delta for e in chain]
        self._exact: dict[str, list[float | None]] = {a: [None] * len(chain) for a in ACCOUNTANTS}
        self._exact["rdp"] = list(rec.prefixes(self.mechanisms, self.deltas, "rdp"))
        self._bounds: list[float | None] = [None] * len(chain)
        request = bound_request(chain, tolerance, budgets)
        if request is not None:
            self._bounds = rec.prv_bounds(*request)

    def exact(self, k: int, accountant: str) -> float:
        value = self._exact[accountant][k]
        if value is None:
            value = self.rec.epsilon(merge_history(self.mechanisms[: k + 1]), self.deltas[k],
                                     accountant)  # fmt: skip
            self._exact[accountant][k] = value
        return value

    def upper(self, k: int, accountant: str) -> float:
        """An upper bound on the accountant's ε (the exact value when known or no bound)."""
        known = self._exact[accountant][k]
        if known is not None:
            return known
        if accountant == "prv" and self._bounds[k] is not None:
            return float(self._bounds[k])  # type: ignore[arg-type]
        return self.exact(k, accountant)

    def known(self, k: int) -> dict[str, float]:
        return {a: v[k] for a, v in self._exact.items() if v[k] is not None}  # type: ignore[misc]

    def bound(self, k: int) -> float | None:
        return self._bounds[k]


def _valid_prefix(pid: int, entries: list[LedgerEntry], out: list[Finding]) -> list[LedgerEntry]:
    """Entries up to the first one whose mechanism cannot be composed (reported as an error)."""
    valid: list[LedgerEntry] = []
    for e in entries:
        problems = []
        if e.accountant not in ACCOUNTANTS:
            problems.append(f"unknown accountant {e.accountant!r}")
        if not 0 < e.sample_rate <= 1:
            problems.append(f"sample_rate={e.sample_rate}")
        if e.noise_multiplier <= 0:
            problems.append(f"noise_multiplier={e.noise_multiplier}")
        if e.steps < 1:
            problems.append(f"steps={e.steps}")
        if not 0 < e.delta < 1:
            problems.append(f"delta={e.delta}")
        if problems:
            out.append(
                finding(
                    "error", "invalid-mechanism", pid, e.round,
                    f"invalid mechanism ({', '.join(problems)}): ε of this and later rounds "
                    "cannot be recomputed",
                )
            )
            break
        valid.append(e)
    return valid


def _config_consistency(
    pid: int, entries: list[LedgerEntry], config: Mapping[str, Any]
) -> list[Finding]:
    out: list[Finding] = []
    target_eps = _float(config.get("target-epsilon"))
    target_delta = _float(config.get("target-delta"))
    accountant = config.get("accountant")
    for e in entries:
        if target_eps is not None and e.epsilon_budget > target_eps * (1 + _SAME):
            out.append(
                finding(
                    "error", "budget-above-target", pid, e.round,
                    f"ledger budget ε={e.epsilon_budget:g} is above the run's target-epsilon "
                    f"{target_eps:g}",
                )
            )
            break
    for e in entries:
        if target_delta is not None and e.delta > target_delta * (1 + _SAME):
            out.append(
                finding(
                    "error", "delta-above-target", pid, e.round,
                    f"ε is stated at δ={e.delta:g}, above the run's target-delta {target_delta:g} "
                    "(a weaker guarantee than the run promises)",
                )
            )
            break
    if accountant in ACCOUNTANTS:
        odd = [e.round for e in entries if e.accountant != accountant]
        if odd:
            out.append(
                finding(
                    "warning", "accountant-mismatch", pid, odd,
                    f"entries use another accountant than the run's ({accountant})",
                )
            )
    return out


_CROSS_FIELDS = (
    ("epsilon", "epsilon_cumulative"),
    ("noise_multiplier", "noise_multiplier"),
    ("sample_rate", "sample_rate"),
    ("steps", "steps"),
    ("max_grad_norm", "max_grad_norm"),
    ("delta", "delta"),
    ("num_examples", "num_examples"),
)


def _cross_check(data: RunData) -> list[Finding]:
    """metrics.json (the server's record) against the ledger (the clients' signed record)."""
    out: list[Finding] = []
    ledger = {
        (e.partition_id, e.round): e
        for e in data.entries
        if e.run_id == data.run_id and e.kind == KIND_CLIENT_DP_SGD
    }
    recorded = metrics_clients(data)
    for (pid, rnd), client in sorted(recorded.items()):
        if client.get("epsilon") is None:
            continue
        entry = ledger.get((pid, rnd))
        if entry is None:
            out.append(
                finding(
                    "error", "entry-missing", pid, rnd,
                    "metrics.json records DP training in this round but the ledger has no "
                    "entry for it (an entry was dropped, or the ledger was truncated)",
                )
            )
            continue
        diffs = [
            f"{m_key} {client.get(m_key)!r} vs {getattr(entry, l_key)!r}"
            for m_key, l_key in _CROSS_FIELDS
            if client.get(m_key) is not None and not _same(client[m_key], getattr(entry, l_key))
        ]
        if diffs:
            out.append(
                finding(
                    "error", "metrics-disagree", pid, rnd,
                    f"metrics.json and the ledger disagree: {'; '.join(diffs)}",
                )
            )
    unmatched: dict[int, list[int]] = {}
    for pid, rnd in sorted(set(ledger) - set(recorded)):
        unmatched.setdefault(pid, []).append(rnd)
    for pid, rounds in unmatched.items():
        out.append(
            finding(
                "warning", "not-in-metrics", pid, rounds,
                "ledger entries with no matching client record in metrics.json "
                "(metrics.json from another or an interrupted run?)",
            )
        )
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=_SAME, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def entry_checks_by_client(result: AuditResult) -> dict[int, list[EntryCheck]]:
    """The audit's per-entry checks grouped by client, in round order (for the report)."""
    grouped: dict[int, list[EntryCheck]] = {}
    for check in result.checks:
        grouped.setdefault(check.partition_id, []).append(check)
    return grouped


def check_to_dict(check: EntryCheck) -> dict[str, Any]:
    return asdict(check)
