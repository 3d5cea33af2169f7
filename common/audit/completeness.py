"""Completeness of one run's ledger: nothing the run did is missing from it.

A chain proves what is in it, not that nothing was cut off its end, and a client whose every
entry was removed leaves no trace in the ledger at all. Two records can show it:

* ``metrics.json`` (the server's record of each round): every client it records as trained
  must have this run's ledger entry for that round, with the ε the entry states, and every
  entry must be recorded there; every round must be recorded, and every sampled client must
  have trained or failed. Without metrics.json this cannot be checked, and the audit says
  NOT VERIFIED rather than PASSED;
* the keys given: each key must have entries in the run. A key the *auditor* supplied with no
  entries is an error (the server dropped that client, or the auditor was told of a run the
  client did not take part in); a key from ``RUN_DIR/keys`` (the server's copy of every
  provisioned client's key) with no entries is a warning.

What neither can show (the server writes metrics.json too): a client dropped from both the
ledger and metrics.json whose key the auditor does not hold. Its own later chain shows it
(:mod:`common.audit.multirun`), and the holder itself knows its head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from common.audit.keys import ClientKeys
from common.audit.rundata import RunData
from common.privacy.findings import Finding, finding
from common.privacy.ledger import KIND_CLIENT_DP_SGD, LedgerEntry
from common.privacy.verification import holder_partition

_SAME = 1e-9

_CROSS_FIELDS = (
    ("epsilon", "epsilon_cumulative"),
    ("round_epsilon", "epsilon_round"),
    ("noise_multiplier", "noise_multiplier"),
    ("sample_rate", "sample_rate"),
    ("steps", "steps"),
    ("max_grad_norm", "max_grad_norm"),
    ("delta", "delta"),
    ("num_examples", "num_examples"),
    ("chain_id", "chain_id"),
)


def refused(failure: Mapping[str, Any]) -> bool:
    """A refusal (the holder's budget or policy), not a failure: ``refused`` (v2 metrics)
    or ``refused_budget`` (older metrics.json)."""
    return bool(failure.get("refused") or failure.get("refused_budget"))


def key_presence(
    keys: ClientKeys, grouped: Mapping[str, list[LedgerEntry]], data: RunData
) -> list[tuple[str, Finding]]:
    """Keys with no entries in this run: ``(key id, finding)`` per such key."""
    run_id = data.run_id
    signers = {e.signer for chain in grouped.values() for e in chain if e.signer}
    partitions = {
        holder_partition(chain, run_id)
        for chain in grouped.values()
        if any(e.run_id == run_id for e in chain)
    }
    refusals: dict[int, int] = {}
    for rec in data.rounds:
        for f in rec.get("failures") or []:
            if refused(f) and isinstance(f.get("partition_id"), int):
                refusals[f["partition_id"]] = refusals.get(f["partition_id"], 0) + 1
    out = []
    for key_id in sorted(keys.by_id):
        pid = keys.partition_of.get(key_id)
        if key_id in signers or (pid is not None and pid in partitions):
            continue
        who = keys.describe(key_id)
        note = ""
        if pid is not None and refusals.get(pid):
            note = (
                f" (metrics.json records {refusals[pid]} refusal(s) from it, which is the "
                "server's word)"
            )
        if keys.origin == "auditor":
            text = (
                f"{who}'s key was given but the run has no entries from it{note}: the server "
                "dropped this client's chain, or the client did not take part in this run"
            )
            out.append((key_id, finding("error", "key-without-entries", pid, None, text)))
        else:
            text = (
                f"{who}'s key is in {keys.source} but the run has no entries from it{note}: "
                "did it take part?"
            )
            out.append((key_id, finding("warning", "key-without-entries", pid, None, text)))
    return out


def metrics_completeness(data: RunData, unverified: list[str]) -> list[Finding]:
    """metrics.json (the server's record) against the ledger (the clients' signed record)."""
    out: list[Finding] = []
    run_id = data.run_id
    ledger = {
        (e.partition_id, e.round): e
        for e in data.entries
        if e.run_id == run_id and e.kind == KIND_CLIENT_DP_SGD
    }
    rounds = data.rounds
    if not rounds:
        if ledger:
            unverified.append("metrics.json records no rounds, completeness unchecked")
        return out
    try:
        numbers = [int(rec["round"]) for rec in rounds]
        recorded = _clients(rounds)
    except (KeyError, TypeError, ValueError) as err:
        unverified.append(f"metrics.json rounds unreadable ({err!r}), completeness unchecked")
        return out
    missing_rounds = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    if missing_rounds:
        out.append(
            finding(
                "error", "round-missing", None, missing_rounds,
                "metrics.json has no record of these rounds: what was trained in them cannot "
                "be checked against the ledger",
            )
        )
    for (pid, rnd), client in sorted(recorded.items()):
        entry = ledger.get((pid, rnd))
        if data.dp and client.get("epsilon") is None:
            out.append(
                finding(
                    "error", "metrics-no-epsilon", pid, rnd,
                    "metrics.json records training in this DP run without the client's ε "
                    "(a trained DP round always has one: removed?)",
                )
            )
        if entry is None:
            if data.dp:
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
    for pid, rnds in unmatched.items():
        out.append(
            finding(
                "error", "not-in-metrics", pid, rnds,
                "signed ledger entries of this run with no client record in metrics.json: the "
                "server's record of the run is incomplete (or metrics.json is another run's)",
            )
        )
    for rec in rounds:
        answered = {int(c["partition_id"]) for c in rec.get("clients") or []}
        answered |= {
            int(f["partition_id"]) for f in rec.get("failures") or [] if "partition_id" in f
        }
        silent = sorted({int(p) for p in rec.get("sampled") or []} - answered)
        for pid in silent:
            out.append(
                finding(
                    "error", "sampled-unaccounted", pid, int(rec["round"]),
                    "sampled, but metrics.json records neither training nor a failure or "
                    "refusal for it",
                )
            )
    return out


def _clients(rounds: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for rec in rounds:
        for client in rec.get("clients") or []:
            pid = int(client["partition_id"])
            if pid >= 0:  # -1: a reply from a node whose partition was never learned
                out[(pid, int(rec["round"]))] = client
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=_SAME, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False
