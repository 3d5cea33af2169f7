"""Several runs' copies of the holders' lifetime chains, compared (``fedvault audit RUN1 RUN2``).

Every run directory holds each participating holder's whole chain from seq 1 up to its last
entry of that run, so the same chain appears in several runs. Across runs:

* every copy must be a prefix of the longest (same hash at the same seq). A copy that
  differs is a **fork**: the holder's state was rolled back to an earlier copy and spent its
  budget again, or a server rewrote history. A single run cannot show this: each fork is a
  valid chain on its own;
* a run must hold every entry the longest copy shows the holder made *in that run*: a run
  whose copy stops earlier had its last rounds (or the whole client) **dropped**, which a
  single run's audit only sees when metrics.json records them or the auditor has the key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from common.privacy.findings import Finding, finding
from common.privacy.verification import compare_copies, holder_partition

if TYPE_CHECKING:
    from common.audit.audit import AuditResult


@dataclass
class MultiAuditResult:
    """Each run's audit, and what comparing the runs found."""

    results: list[AuditResult]
    findings: list[Finding]  # cross-run findings only

    @property
    def errors(self) -> list[Finding]:
        return [f for r in self.results for f in r.errors] + [
            f for f in self.findings if f.is_error
        ]

    @property
    def warnings(self) -> list[Finding]:
        return [f for r in self.results for f in r.warnings] + [
            f for f in self.findings if not f.is_error
        ]

    @property
    def verdict(self) -> str:
        if self.errors or any(not r.dp for r in self.results):
            return "fail"
        if any(r.unverified for r in self.results):
            return "not-verified"
        return "pass"

    @property
    def verdict_ok(self) -> bool:
        return self.verdict == "pass"

    @property
    def independent(self) -> bool:
        return all(r.independent for r in self.results)

    def summary(self) -> str:
        """The verdict line over all runs."""
        head = {"pass": "audit PASSED", "fail": "audit FAILED"}.get(self.verdict)
        if head is None:
            reasons = dict.fromkeys(
                f"run {r.run_id}: {u}" for r in self.results for u in r.unverified
            )
            head = "audit NOT VERIFIED: " + "; ".join(reasons)
        trusts = list(dict.fromkeys(r.trust() for r in self.results))
        trust = trusts[0] if len(trusts) == 1 else "; ".join(
            f"run {r.run_id}: {r.trust()}" for r in self.results
        )
        forks = sum(1 for f in self.findings if f.code == "fork")
        dropped = sum(1 for f in self.findings if f.code == "dropped-from-run")
        holders = len({cid for r in self.results for cid in r.chains})
        ids = ", ".join(r.run_id for r in self.results)
        return (
            f"{len(self.results)} runs ({ids}): {head}; {trust}; {holders} chains compared "
            f"across runs ({forks} forks, {dropped} with entries dropped from a run); "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "verdict_ok": self.verdict_ok,
            "verdict_line": self.summary(),
            "independent": self.independent,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "cross_run_findings": [f.to_dict() for f in self.findings],
            "runs": [r.to_dict() for r in self.results],
        }


def cross_run_findings(results: list[AuditResult]) -> list[Finding]:
    """Forks and dropped entries across ``results``; also turns a key-without-entries error
    in one run into a warning when that key has entries in another run given."""
    _absent_keys_elsewhere(results)
    copies: dict[str, dict[str, list]] = {}
    for r in results:
        for chain_id, chain in r.chains.items():
            copies.setdefault(chain_id, {})[r.run_id] = sorted(chain, key=lambda e: e.seq)
    out: list[Finding] = []
    for chain_id, per_run in copies.items():
        longest, forks = compare_copies(per_run)
        for fork in forks:
            pid = holder_partition(per_run[fork.short], fork.short)
            mine, theirs = fork.short_entry, fork.long_entry
            out.append(
                finding(
                    "error", "fork", pid, None,
                    f"chain {chain_id[:12]}… forks at seq {fork.seq}: run {fork.short}'s copy "
                    f"has {mine.hash[:12]}… (run {mine.run_id}, round {mine.round}), run "
                    f"{fork.long}'s has {theirs.hash[:12]}… (run {theirs.run_id}, round "
                    f"{theirs.round}): one is not a prefix of the other; the holder's state "
                    "was rolled back (and spent its budget again), or a server rewrote its "
                    "history",
                )
            )
        forked = {f.short for f in forks}
        reference = per_run[longest]
        for r in results:
            if r.run_id in forked or r.run_id == longest:
                continue
            have = len(per_run.get(r.run_id, []))
            lost = [e for e in reference if e.run_id == r.run_id and e.seq > have]
            if not lost:
                continue
            out.append(
                finding(
                    "error", "dropped-from-run", lost[0].partition_id, [e.round for e in lost],
                    f"run {r.run_id}'s ledger lacks {len(lost)} entr"
                    f"{'y' if len(lost) == 1 else 'ies'} of chain {chain_id[:12]}… (seq "
                    f"{lost[0].seq}{'' if len(lost) == 1 else f'-{lost[-1].seq}'}) that the "
                    f"holder's copy in run {longest} shows it made in run {r.run_id}: dropped "
                    f"from run {r.run_id}'s record",
                )
            )
    return out


def _absent_keys_elsewhere(results: list[AuditResult]) -> None:
    signed_in: dict[str, list[str]] = {}
    for r in results:
        for chain in r.chains.values():
            for key_id in {e.signer for e in chain if e.signer}:
                signed_in.setdefault(key_id, []).append(r.run_id)
    for r in results:
        changed = False
        for key_id, absent in r.absent_keys.items():
            runs = [run for run in signed_in.get(key_id, []) if run != r.run_id]
            if not absent.is_error or not runs:
                continue
            softer = replace(
                absent, severity="warning",
                message=f"{absent.message} (it has entries in run {', '.join(runs)})",
            )  # fmt: skip
            r.findings = [softer if f is absent else f for f in r.findings]
            r.absent_keys[key_id] = softer
            changed = True
        if changed:
            r.finish()
