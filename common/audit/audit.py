"""``audit_run``: verify a run's privacy ledger without trusting the server that stores it.

The server writes ``ledger.jsonl``, ``metrics.json`` and ``keys/`` of a run directory, so it
can rewrite all three consistently. What it cannot do is sign as a client whose real public
key the auditor holds, or make its copies of one holder's chain in two runs disagree without
an audit of both seeing it. So, per run:

1. integrity (:func:`common.privacy.verification.verify_chain`): every hash recomputes,
   ``prev_hash`` links each entry to the one before it from the genesis hash, ``seq`` counts
   1, 2, 3, ..., every signature verifies; an entry without a valid signature is an *error*
   for every client whose key is known (a key given for its partition, or a signer its chain
   names). Keys come from the auditor (``public_keys`` / ``keys_dir``: a verdict against the
   server) or else from ``RUN_DIR/keys``, which the *server* wrote (consistent, not
   independent); without keys integrity is unverified, and the verdict line says so;
2. the plan: q = 1/⌈n/B⌉ and steps = epochs·⌈n/B⌉ from the signed n, B and epochs;
3. the ε claims, over each holder's whole lifetime chain from seq 1: every
   ``epsilon_cumulative`` is recomputed from the raw mechanisms with Opacus's RDP *and* PRV
   accountants. A claim below the recomputation by the accountant the entry names by more
   than ``tolerance`` (relative) is an error, and so is a claim more than ``CROSS_TOLERANCE``
   (25 %) below the independent accountant (RDP is a looser bound than PRV by 10-20 %);
   ``epsilon_round`` must be the increase of the cumulative ε;
4. budgets: the lifetime ε (claimed and recomputed) within ``epsilon_budget``; what each run
   added (cumulative at its last entry minus the cumulative before its first) within its
   ``run_epsilon_budget``; the run budget within the run's ``target-epsilon``; no ε stated at
   a δ above the run's;
5. completeness against ``metrics.json``: every round recorded, every client the server
   records as trained has this run's entry for that round (with its ε) and the other way
   round, every sampled client trained or failed, every key given has entries. Without
   ``metrics.json`` (or its rounds) completeness is unchecked: the verdict is NOT VERIFIED.

:func:`audit_runs` audits several runs and compares every holder's chain across them: each
run's copy must be a prefix of the longest (a fork = a rolled-back holder or a rewritten
history), and a run whose copy lacks entries a later copy shows were made in that run dropped
them.

How ε is recomputed (:mod:`common.audit.recompute`): RDP exactly as ``epsilon_of`` does
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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.audit.checks import mechanism_warnings
from common.audit.completeness import key_presence, metrics_completeness
from common.audit.keys import ClientKeys, load_client_keys
from common.audit.multirun import MultiAuditResult, cross_run_findings
from common.audit.recompute import BoundRequest, Recomputer, request_key
from common.audit.rundata import RunData, load_run
from common.privacy.accounting import ACCOUNTANTS, merge_history
from common.privacy.findings import Finding, finding
from common.privacy.ledger import KIND_CLIENT_DP_SGD, LEDGER_FILE, LedgerEntry
from common.privacy.verification import (
    Label,
    chains,
    holder_partition,
    plan_problem,
    verify_chain,
)
from common.rundir import RunDir

# How far a claim may sit below the *other* accountant (RDP is looser than PRV by ~10-20 %).
CROSS_TOLERANCE = 0.25
log = logging.getLogger("fedvault.audit.audit")

DEFAULT_TOLERANCE = 0.01
_SAME = 1e-9  # relative: values copied between records must agree to float noise

__all__ = ["AuditResult", "MultiAuditResult", "audit_run", "audit_runs"]


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
    run_id: str = ""
    seq: int = 0
    chain_id: str = ""


TRUST = {
    "auditor": "a verdict against the server: signatures checked with keys the auditor "
    "supplied ({source})",
    "server": "consistent, NOT independent: these keys came from the server ({source})",
    "none": "integrity unverified: no client keys, signatures not checked (NOT independent "
    "of the server)",
}


@dataclass
class AuditResult:
    """The audit's verdict: ``verdict_ok`` is true iff the verdict is ``pass``.

    ``pass`` = no error and nothing left unchecked; how much a pass is worth depends on whose
    keys it used (``keys_origin``: ``auditor``, ``server`` or ``none``), and the verdict line
    (:meth:`summary`) says it.
    """

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
    keys_origin: str = "none"
    chains_signed_by_given_keys: int = 0
    chain_count: int = 0
    unverified: list[str] = field(default_factory=list)
    seconds: float = 0.0
    histories_computed: int = 0
    run_dir: str = ""
    # for audit_runs: this run's chains, and the keys it found no entries for
    chains: dict[str, list[LedgerEntry]] = field(default_factory=dict, repr=False)
    absent_keys: dict[str, Finding] = field(default_factory=dict, repr=False)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.is_error]

    @property
    def independent(self) -> bool:
        """Whether the signatures were checked with keys the auditor supplied."""
        return self.keys_origin == "auditor"

    @property
    def verdict(self) -> str:
        """``pass`` / ``fail`` / ``not-verified`` / ``not-applicable`` (no DP: no claim)."""
        if not self.dp:
            return "not-applicable"
        if self.errors:
            return "fail"
        if self.unverified:
            return "not-verified"
        return "pass"

    def finish(self) -> None:
        self.verdict_ok = self.verdict == "pass"

    def trust(self) -> str:
        """Whose keys the verdict rests on, in words (part of the verdict line)."""
        text = TRUST.get(self.keys_origin, TRUST["none"]).format(source=self.keys_source)
        uncovered = self.chain_count - self.chains_signed_by_given_keys
        if self.keys_origin != "none" and uncovered > 0:
            text += f" ({uncovered} of {self.chain_count} chains not signed by a given key)"
        return text

    def summary(self) -> str:
        """The verdict line: verdict, whose keys, counts."""
        if not self.dp:
            return f"run {self.run_id}: no DP (dp = false): no privacy claim to verify"
        head = {
            "pass": "audit PASSED",
            "fail": "audit FAILED",
            "not-verified": "audit NOT VERIFIED: " + "; ".join(self.unverified),
        }[self.verdict]
        return (
            f"run {self.run_id}: {head}; {self.trust()}; {self.entries} ledger entries of "
            f"{self.clients} clients, {len(self.errors)} errors, {len(self.warnings)} warnings "
            f"({self.seconds:.1f}s)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "verdict_ok": self.verdict_ok,
            "verdict_line": self.summary(),
            "run_id": self.run_id,
            "tolerance": self.tolerance,
            "dp": self.dp,
            "ledger_present": self.ledger_present,
            "entries": self.entries,
            "clients": self.clients,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "keys_source": self.keys_source,
            "keys_origin": self.keys_origin,
            "independent": self.independent,
            "unverified": list(self.unverified),
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

    Clients' public keys, first match wins: ``public_keys`` (Ed25519 key id → key) or
    ``keys_dir`` (clients' ``public.json`` files), both supplied by the auditor; else
    ``<run_dir>/keys`` (supplied by the server). ``RunDirError`` when ``run_dir`` is not a
    run dir. ``workers > 1`` computes the ε bounds of clients with distinct mechanisms in
    that many forked processes (for the CLI; keep 1 inside a multi-threaded server process).
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    started = time.perf_counter()
    data = load_run(run_dir)
    result = AuditResult(
        findings=[], verdict_ok=False, run_id=data.run_id, tolerance=tolerance, dp=data.dp,
        ledger_present=data.ledger_present, entries=len(data.entries), run_dir=str(run_dir),
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
        rec = recomputer or Recomputer()
        findings.extend(_audit_ledger(data, keys, rec, tolerance, result, workers))
        result.histories_computed = rec.computed
    result.clients = len(
        {holder_partition(c, data.run_id) for c in result.chains.values()
         if any(e.run_id == data.run_id for e in c)}
    )  # fmt: skip
    result.finish()
    result.seconds = time.perf_counter() - started
    log.info("%s", result.summary())
    return result


def audit_runs(
    run_dirs: Iterable[str | os.PathLike[str]],
    tolerance: float = DEFAULT_TOLERANCE,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    *,
    keys_dir: str | os.PathLike[str] | None = None,
    recomputer: Recomputer | None = None,
    workers: int = 1,
) -> MultiAuditResult:
    """Audit every run in ``run_dirs`` and compare the holders' chains across them.

    Each run is audited as by :func:`audit_run` (same keys for all); then, per chain, every
    run's copy must be a prefix of the longest copy (else: a fork), and a run must hold every
    entry that the longest copy shows the holder made in that run (else: dropped). A key with
    no entries in one run but entries in another is a warning there, not an error (the holder
    did not take part in every run).
    """
    rec = recomputer or Recomputer()
    results = [
        audit_run(d, tolerance, public_keys, keys_dir=keys_dir, recomputer=rec, workers=workers)
        for d in run_dirs
    ]
    return MultiAuditResult(results, cross_run_findings(results))


def _keys(
    data: RunData,
    public_keys: Mapping[str, Ed25519PublicKey] | None,
    keys_dir: str | os.PathLike[str] | None,
) -> ClientKeys | None:
    if public_keys is not None:
        return ClientKeys.from_mapping(public_keys, "public_keys argument")
    if keys_dir is not None:
        return load_client_keys(keys_dir, origin="auditor")
    path = RunDir(data.run_dir).keys_dir
    return load_client_keys(path, origin="server") if path.is_dir() else None


def _audit_ledger(
    data: RunData,
    keys: ClientKeys | None,
    rec: Recomputer,
    tolerance: float,
    result: AuditResult,
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
    result.keys_origin = keys.origin if keys is not None else "none"
    result.keys_source = keys.source if keys is not None else ""
    if data.metrics is None:
        result.unverified.append("metrics.json missing, completeness unchecked")
    run_id = data.run_id
    grouped = chains(data.entries)
    result.chains = grouped
    result.chain_count = len(grouped)
    if not data.entries:
        out.append(
            finding("error", "ledger-empty", None, None, f"{LEDGER_FILE} has no readable entries")
        )
    out.extend(
        verify_chain(data.entries, keys.by_id if keys else None,
                     partition_of=keys.partition_of if keys else None, run_id=run_id)
    )  # fmt: skip
    if keys is not None:
        result.chains_signed_by_given_keys = sum(
            1 for c in grouped.values() if all(e.signer in keys.by_id for e in c)
        )
    if workers > 1:  # the expensive part, for every chain at once, in parallel
        requests = []
        for chain in grouped.values():
            valid = _claim_chain(chain, [])
            request = bound_request(valid, tolerance, _budgets(valid)) if valid else None
            if request is not None:
                requests.append(request)
        rec.prefetch(requests, workers)
    holders: dict[int, list[str]] = {}
    for chain_id, chain in grouped.items():
        pid = holder_partition(chain, run_id)
        if any(e.run_id == run_id for e in chain):
            holders.setdefault(pid, []).append(chain_id)
        else:
            out.append(
                finding(
                    "error", "history-only", pid, None,
                    f"chain {chain_id[:12]}… is in this run's ledger with entries of earlier "
                    "runs only: a holder sends its history with its first entry of a run, so "
                    "this run's entries were dropped",
                )
            )
        out.extend(_plan_checks(pid, chain, run_id))
        found, checks = _audit_claims(pid, chain, data, rec, tolerance)
        out.extend(found)
        result.checks.extend(checks)
    for pid, ids in sorted(holders.items()):
        if len(ids) > 1:
            out.append(
                finding(
                    "error", "two-chains", pid, None,
                    f"{len(ids)} chains ({', '.join(i[:12] + '…' for i in ids)}) have entries "
                    "of this run for the same client: one holder, one chain",
                )
            )
    if keys is not None:
        absent = key_presence(keys, grouped, data)
        result.absent_keys = dict(absent)
        out.extend(f for _, f in absent)
    if data.metrics is not None:
        out.extend(metrics_completeness(data, result.unverified))
    return out


def _plan_checks(pid: int, chain: list[LedgerEntry], run_id: str) -> list[Finding]:
    """q and steps against the signed n, B and epochs, for every entry of the chain."""
    out = []
    for entry in chain:
        problem = plan_problem(entry)
        if problem is not None:
            out.append(Label.of(entry, pid, run_id).finding("error", "plan-mismatch", problem))
    return out


def _audit_claims(
    pid: int,
    chain: list[LedgerEntry],
    data: RunData,
    rec: Recomputer,
    tolerance: float,
) -> tuple[list[Finding], list[EntryCheck]]:
    """Recompute every cumulative ε of one lifetime chain; check claims, increments, budgets.

    Per entry, in order: the claim against its declared accountant, against the independent
    one, against the lifetime budget, and its ``epsilon_round`` against the increase. Claims
    above the recomputation and budgets exceeded are reported once per chain, after the loop.
    """
    out = _chain_warnings(pid, chain, data)
    valid = _claim_chain(chain, out)
    if not valid:
        return out, []
    budgets = _budgets(valid)
    try:
        prefix = _Prefixes(valid, rec, tolerance, budgets)
    except (ValueError, RuntimeError, ArithmeticError) as err:
        out.append(
            finding(
                "error", "recompute-failed", pid, None,
                f"ε cannot be recomputed from the recorded mechanism ({err})",
            )
        )
        return out, []

    checks: list[EntryCheck] = []
    over: list[tuple[LedgerEntry, float]] = []  # (entry, how far above the recomputation)
    exceeded: list[tuple[LedgerEntry, float, float]] = []  # (entry, ε spent, budget)
    for c in _claims(valid, budgets, pid, data.run_id):
        floor = _declared_epsilon(c, prefix, tolerance)
        under = c.claim < floor * (1 - tolerance)
        if under:
            out.append(_under_reported(c, floor, prefix, tolerance))
        else:
            if c.claim > floor * (1 + tolerance):
                over.append((c.entry, c.claim / floor - 1 if floor > 0 else math.inf))
            out.extend(_independent_accountant(c, prefix))
        exceeded.extend(_lifetime_budget(c, prefix))
        out.extend(_round_increment(c))
        if c.entry.run_id == data.run_id:
            checks.append(_entry_check(c, prefix, under))
    out.extend(_over_reported(pid, data.run_id, over))
    out.extend(_budget_exceeded(pid, data.run_id, exceeded))
    out.extend(_run_budgets(pid, valid, prefix, data.run_id, bool(over)))
    return out, checks


@dataclass(frozen=True)
class _Claim:
    """One entry's cumulative claim, with what its checks need."""

    k: int  # its index in the valid chain (and in the chain's prefixes)
    entry: LedgerEntry
    at: Label
    budget: float
    previous: float  # the cumulative claim before it (0 for the chain's first entry)

    @property
    def claim(self) -> float:
        return self.entry.epsilon_cumulative

    @property
    def other(self) -> str:
        """The independent accountant: the one the entry did not declare."""
        return next(a for a in ACCOUNTANTS if a != self.entry.accountant)


def _claims(
    valid: list[LedgerEntry], budgets: list[float], pid: int, run_id: str
) -> Iterable[_Claim]:
    previous = 0.0
    for k, e in enumerate(valid):
        yield _Claim(k, e, Label.of(e, pid, run_id), budgets[k], previous)
        previous = e.epsilon_cumulative


def _chain_warnings(pid: int, chain: list[LedgerEntry], data: RunData) -> list[Finding]:
    """Before any recomputation: kinds not audited, this run's entries against its config,
    mechanisms the accountants handle poorly, and a δ that changed along the chain."""
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
    this_run = [e for e in entries if e.run_id == data.run_id]
    out.extend(_config_consistency(pid, this_run, data.config))
    by_mechanism: dict[tuple[int, float, float], list[int]] = {}
    for e in this_run:
        by_mechanism.setdefault((e.num_examples, e.sample_rate, e.delta), []).append(e.round)
    for (n, q, delta), rounds in sorted(by_mechanism.items()):
        out.extend(mechanism_warnings(pid, n, q, delta, rounds))
    deltas = list(dict.fromkeys(e.delta for e in entries))
    if len(deltas) > 1:
        out.append(
            finding(
                "warning", "delta-changed", pid, None,
                f"the holder's δ changed within its lifetime chain "
                f"({', '.join(map(str, deltas))}): each cumulative ε is stated at its own "
                "entry's δ",
            )
        )
    return out


def _declared_epsilon(c: _Claim, prefix: _Prefixes, tolerance: float) -> float:
    """The declared accountant's ε for the claim's history: its upper bound, or the exact
    value where the bound would fail the claim (a failure is always confirmed exactly)."""
    floor = prefix.upper(c.k, c.entry.accountant)
    if c.claim < floor * (1 - tolerance):
        floor = prefix.exact(c.k, c.entry.accountant)
    return floor


def _under_reported(c: _Claim, floor: float, prefix: _Prefixes, tolerance: float) -> Finding:
    """Check 1: the claim is below the declared accountant's ε by more than the tolerance."""
    gap = 1 - c.claim / floor if floor > 0 else 1.0
    return c.at.finding(
        "error", "under-reported",
        f"claims ε={c.claim:.4f} but its mechanism history recomputes to "
        f"ε={floor:.4f} with {c.entry.accountant} ({c.other}: "
        f"{prefix.exact(c.k, c.other):.4f}): under-reported by {gap:.1%} "
        f"(tolerance {tolerance:.1%})",
    )  # fmt: skip


def _independent_accountant(c: _Claim, prefix: _Prefixes) -> list[Finding]:
    """Check 2: the claim is not below the independent accountant by more than its stated
    tolerance (``CROSS_TOLERANCE``)."""
    if c.claim >= prefix.upper(c.k, c.other) * (1 - CROSS_TOLERANCE):
        return []
    independent = prefix.exact(c.k, c.other)
    if c.claim >= independent * (1 - CROSS_TOLERANCE):
        return []
    return [
        c.at.finding(
            "error", "accountants-disagree",
            f"claims ε={c.claim:.4f} with {c.entry.accountant}, but the independent "
            f"{c.other} accountant recomputes ε={independent:.4f}: more than "
            f"{CROSS_TOLERANCE:.0%} below it",
        )
    ]  # fmt: skip


def _lifetime_budget(c: _Claim, prefix: _Prefixes) -> list[tuple[LedgerEntry, float, float]]:
    """Check 3: the claim and the recomputation both stay within the lifetime budget;
    ``(entry, ε spent, budget)`` when not (reported once per chain by :func:`_budget_exceeded`)."""
    if c.claim > c.budget:
        return [(c.entry, c.claim, c.budget)]
    if prefix.upper(c.k, c.entry.accountant) > c.budget:
        spent = prefix.exact(c.k, c.entry.accountant)
        if spent > c.budget:
            return [(c.entry, spent, c.budget)]
    return []


def _round_increment(c: _Claim) -> list[Finding]:
    """Check 4: ``epsilon_round`` is the difference of consecutive cumulative claims."""
    increase = c.claim - c.previous
    if math.isclose(c.entry.epsilon_round, increase, rel_tol=_SAME, abs_tol=1e-12):
        return []
    return [
        c.at.finding(
            "error", "round-epsilon",
            f"epsilon_round={c.entry.epsilon_round:.6g} is not the increase of cumulative ε "
            f"({c.claim:.6g} - {c.previous:.6g} = {increase:.6g})",
        )
    ]  # fmt: skip


def _entry_check(c: _Claim, prefix: _Prefixes, under: bool) -> EntryCheck:
    """The report's row for one of this run's entries (after its checks: what they computed)."""
    e = c.entry
    return EntryCheck(
        c.at.partition_id, e.round, e.accountant, e.delta, c.claim, e.epsilon_round, c.budget,
        prefix.known(c.k), prefix.bound(c.k), under, run_id=e.run_id, seq=e.seq,
        chain_id=e.chain_id,
    )  # fmt: skip


def _over_reported(
    pid: int, run_id: str, over: list[tuple[LedgerEntry, float]]
) -> list[Finding]:
    """One warning for all the chain's claims above the recomputation by more than the
    tolerance (conservative, but a sign the recorded mechanism is not the one that ran)."""
    if not over:
        return []
    rounds = [e.round for e, _ in over if e.run_id == run_id]
    earlier = len(over) - len(rounds)
    return [
        finding(
            "warning", "over-reported", pid, rounds or None,
            f"claimed ε is above the recomputation by up to {max(by for _, by in over):.1%}"
            + (f" (in {earlier} entries of earlier runs)" if earlier else "")
            + ": conservative, but the recorded mechanism may not be the one that ran",
        )
    ]  # fmt: skip


def _budget_exceeded(
    pid: int, run_id: str, exceeded: list[tuple[LedgerEntry, float, float]]
) -> list[Finding]:
    """One error at the first entry over the lifetime budget, counting the later ones."""
    if not exceeded:
        return []
    e, spent, budget = exceeded[0]
    more = f" (and in {len(exceeded) - 1} later entries)" if len(exceeded) > 1 else ""
    return [
        Label.of(e, pid, run_id).finding(
            "error", "budget-exceeded",
            f"exceeded its lifetime privacy budget: ε={spent:.4f} > budget ε={budget:g}{more}",
        )
    ]  # fmt: skip


def _run_budgets(
    pid: int, valid: list[LedgerEntry], prefix: _Prefixes, run_id: str, over_reported: bool
) -> list[Finding]:
    """What each run added (cumulative at its last entry minus before its first) ≤ its
    ``run_epsilon_budget``: by the claims for every run of the chain, and by the
    recomputation for this run (exactly, when the bound cannot decide or claims run high)."""
    out: list[Finding] = []
    spans: dict[str, list[int]] = {}
    for k, e in enumerate(valid):
        spans.setdefault(e.run_id, []).append(k)
    for run, ks in spans.items():
        first, last = ks[0], ks[-1]
        e = valid[last]
        limit = e.run_epsilon_budget
        slack = limit * _SAME + 1e-12
        before = valid[first - 1].epsilon_cumulative if first > 0 else 0.0
        added = e.epsilon_cumulative - before
        at = Label.of(e, pid, run_id)
        if added > limit + slack:
            out.append(
                at.finding(
                    "error", "run-budget-exceeded",
                    f"run {run} added ε={added:.4f} (lifetime {before:.4f} → "
                    f"{e.epsilon_cumulative:.4f}), over what the run could add "
                    f"(run_epsilon_budget {limit:g})",
                )
            )
            continue
        if run != run_id:
            continue
        if over_reported or prefix.upper(last, e.accountant) - before > limit + slack:
            start = prefix.exact(first - 1, e.accountant) if first > 0 else 0.0
            spent = prefix.exact(last, e.accountant) - start
            if spent > limit + slack:
                out.append(
                    at.finding(
                        "error", "run-budget-exceeded",
                        f"this run added ε={spent:.4f} by recomputation ({e.accountant}), over "
                        f"what the run could add (run_epsilon_budget {limit:g})",
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


def _budgets(chain: list[LedgerEntry]) -> list[float]:
    """Per entry: the holder's lifetime budget as that entry states it."""
    return [e.epsilon_budget for e in chain]


def _claim_chain(chain: list[LedgerEntry], out: list[Finding]) -> list[LedgerEntry]:
    """A chain's client-DP-SGD entries from seq 1, up to the first invalid mechanism."""
    entries = sorted((e for e in chain if e.kind == KIND_CLIENT_DP_SGD), key=lambda e: e.seq)
    if not entries:
        return []
    return _valid_prefix(holder_partition(entries), entries, out)


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
    """This run's entries against what the run asked (its config in metrics.json)."""
    out: list[Finding] = []
    target_eps = _float(config.get("target-epsilon"))
    target_delta = _float(config.get("target-delta"))
    accountant = config.get("accountant")
    for e in entries:
        if target_eps is not None and e.run_epsilon_budget > target_eps * (1 + _SAME):
            out.append(
                finding(
                    "error", "run-budget-above-target", pid, e.round,
                    f"run_epsilon_budget ε={e.run_epsilon_budget:g} is above the run's "
                    f"target-epsilon {target_eps:g} (a run may ask a holder for less, never more)",
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
