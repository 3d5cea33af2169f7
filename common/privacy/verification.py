"""Checking ledger chains: what the entries prove about themselves.

A *chain* is one data holder's lifetime ledger (``chain_id``): every DP round it trained, in
every run, linked by ``prev_hash`` from the genesis hash, numbered by ``seq`` 1, 2, 3, ...
:func:`verify_chain` checks hashes, links, numbering, one signer and one data set per chain,
and signatures; :func:`plan_problem` checks that q and steps follow from the signed n, B and
epochs; :func:`compare_copies` checks several runs' copies of one chain against each other
(a rolled-back holder, or a server that rewrote history, makes them fork).
:mod:`common.audit.audit` checks what the entries claim (ε, budgets, completeness).

Signatures, against a dishonest server (which stores the ledger and can rewrite it, re-hash
it and re-chain it, but cannot sign as a client): an entry without a valid signature is an
**error** whenever the client's key is *known* -- a key is given for the chain's partition,
or some entry of the chain names a signer -- because then "unsigned" can only mean "signature
removed". Only a chain with no key anywhere in sight is a warning: nothing proves who wrote
it, and the audit's verdict says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.findings import Finding, Severity, finding
from common.privacy.ledger import GENESIS_HASH, UNIT_RECORD, LedgerEntry

PLAN_TOLERANCE = 1e-12  # relative: q == 1/⌈n/B⌉ as floats


def _entry_hash(entry: LedgerEntry) -> str:
    """``entry.compute_hash()`` without ``dataclasses.asdict``'s deep copy (which is most of
    an audit's time on 5,000 entries): the fields are flat strings and numbers, so the dict
    of the instance is the same mapping. :func:`verify_chain` checks the two agree on the
    first entry it sees and otherwise uses ``compute_hash``."""
    data = {k: v for k, v in vars(entry).items() if k not in ("hash", "signature")}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)  # fmt: skip
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chains(entries: Iterable[LedgerEntry]) -> dict[str, list[LedgerEntry]]:
    """Entries grouped per lifetime chain (``chain_id``), each in order of appearance."""
    grouped: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.chain_id, []).append(entry)
    return grouped


def holder_partition(chain: Sequence[LedgerEntry], run_id: str | None = None) -> int:
    """The partition a chain's holder has in run ``run_id`` (its last entry there), else the
    partition of the chain's last entry: findings name the holder as the run knows it."""
    if run_id is not None:
        for entry in reversed(chain):
            if entry.run_id == run_id:
                return entry.partition_id
    return chain[-1].partition_id


@dataclass(frozen=True)
class Label:
    """Where a finding about one entry points: this run's round, or (history) run and seq."""

    partition_id: int
    round: int | None
    prefix: str

    @classmethod
    def of(cls, entry: LedgerEntry, pid: int, run_id: str | None) -> Label:
        if run_id is None or entry.run_id == run_id:
            return cls(pid, entry.round, "")
        return cls(pid, None, f"entry seq {entry.seq} (run {entry.run_id}, round {entry.round}): ")

    def finding(self, severity: Severity, code: str, text: str) -> Finding:
        return finding(severity, code, self.partition_id, self.round, self.prefix + text)


def verify_chain(
    entries: Sequence[LedgerEntry],
    public_key_by_signer: Mapping[str, Ed25519PublicKey] | None = None,
    *,
    partition_of: Mapping[str, int] | None = None,
    run_id: str | None = None,
) -> list[Finding]:
    """Integrity of every chain in ``entries``: hashes, linkage, numbering, signatures.

    ``public_key_by_signer`` maps Ed25519 key ids to public keys; ``None`` means "no keys
    given": signatures are then not checked (a warning per chain). ``partition_of`` binds key
    ids to partitions (``client-<i>`` key files): a chain whose holder's partition has a bound
    key must be signed by that key. ``run_id`` names the run being audited: findings about
    its entries name their round, findings about earlier runs' entries name run and seq.
    """
    key_of: dict[int, str] = {}
    for key_id, pid in (partition_of or {}).items():
        key_of.setdefault(pid, key_id)
    findings: list[Finding] = []
    hash_of = _entry_hash
    if entries and _entry_hash(entries[0]) != entries[0].compute_hash():
        hash_of = LedgerEntry.compute_hash  # the entry format changed: the slow, sure way
    for chain in chains(entries).values():
        findings.extend(_verify_one_chain(chain, public_key_by_signer, partition_of or {},
                                          key_of, run_id, hash_of))  # fmt: skip
    return findings


def _verify_one_chain(
    chain: list[LedgerEntry],
    keys: Mapping[str, Ed25519PublicKey] | None,
    partition_of: Mapping[str, int],
    key_of: Mapping[int, str],
    run_id: str | None,
    hash_of: Callable[[LedgerEntry], str],
) -> list[Finding]:
    pid = holder_partition(chain, run_id)
    out: list[Finding] = []
    prev: LedgerEntry | None = None
    first = chain[0]
    for entry in chain:
        at = Label.of(entry, pid, run_id)
        expected = hash_of(entry)
        if expected != entry.hash:
            out.append(
                at.finding(
                    "error", "hash-mismatch",
                    f"hash mismatch (entry altered: its fields hash to {expected[:12]}…, "
                    f"the stored hash is {entry.hash[:12] or '<empty>'}…)",
                )
            )
        if prev is None:
            if entry.prev_hash != GENESIS_HASH or entry.seq != 1:
                out.append(
                    at.finding(
                        "error", "chain-start",
                        f"the chain starts at entry {entry.seq} (prev_hash "
                        f"{entry.prev_hash[:12]}…), not at entry 1 from the genesis hash: "
                        "earlier entries of this holder are missing",
                    )
                )
        else:
            if entry.seq != prev.seq + 1 or (
                entry.run_id == prev.run_id and entry.round <= prev.round
            ):
                out.append(
                    at.finding(
                        "error", "round-order",
                        f"entry {entry.seq} (run {entry.run_id}, round {entry.round}) follows "
                        f"entry {prev.seq} (run {prev.run_id}, round {prev.round}): entries "
                        "must be numbered 1, 2, 3, ... and rounds of a run strictly increase "
                        "(lines reordered, duplicated or dropped)",
                    )
                )
            if entry.prev_hash != prev.hash:
                out.append(
                    at.finding(
                        "error", "chain-broken",
                        f"prev_hash does not match the entry before it (entry {prev.seq}, run "
                        f"{prev.run_id}, round {prev.round}): an entry is missing in between, "
                        "or lines were reordered",
                    )
                )
        if entry.dataset_id != first.dataset_id:
            out.append(
                at.finding(
                    "error", "dataset-changed",
                    f"data set {entry.dataset_id!r} in a chain of data set "
                    f"{first.dataset_id!r}: a lifetime chain covers one data set",
                )
            )
        if entry.unit != UNIT_RECORD:
            out.append(
                at.finding(
                    "error", "unknown-unit",
                    f"unit {entry.unit!r}: this audit knows record-level ε only",
                )
            )
        prev = entry
    out.extend(_signatures(pid, chain, keys, partition_of, key_of, run_id))
    return out


def _signatures(
    pid: int,
    chain: list[LedgerEntry],
    keys: Mapping[str, Ed25519PublicKey] | None,
    partition_of: Mapping[str, int],
    key_of: Mapping[int, str],
    run_id: str | None,
) -> list[Finding]:
    out: list[Finding] = []
    signers = list(dict.fromkeys(e.signer for e in chain if e.signer))
    if len(signers) > 1 or (signers and any(not e.signer for e in chain)):
        first = chain[0].signer or "<none>"
        odd = next(e for e in chain if e.signer != chain[0].signer)
        out.append(
            Label.of(odd, pid, run_id).finding(
                "error", "signer-changed",
                f"signer changed from {first} to {odd.signer or '<none>'} within the chain: "
                "another key (or none) wrote this entry",
            )
        )
    bound = key_of.get(pid) if keys is not None else None
    known = bound is not None or bool(signers)
    unsigned = [e for e in chain if not e.signer and not e.signature]
    if unsigned:
        rounds = [e.round for e in unsigned if run_id is None or e.run_id == run_id]
        earlier = len(unsigned) - len(rounds)
        count = f"{len(unsigned)} unsigned entr{'y' if len(unsigned) == 1 else 'ies'}" + (
            f" ({earlier} of earlier runs)" if earlier else ""
        )
        if known:
            whose = (
                f"a key is given for client {pid} ({bound})" if bound is not None
                else f"the chain names its signer ({signers[0]})"
            )  # fmt: skip
            out.append(
                finding(
                    "error", "unsigned", pid, rounds or None,
                    f"{count}, but the client's key is known ({whose}): a signature was "
                    "removed, and nothing shows the client (not the server) wrote these",
                )
            )
        else:
            out.append(
                finding(
                    "warning", "unsigned", pid, rounds or None,
                    f"{count} and no key for this client: nothing proves the client (not the "
                    "server) wrote them",
                )
            )
    unchecked: list[int] = []
    wrong_key_reported = False
    for entry in chain:
        if not entry.signer and not entry.signature:
            continue
        at = Label.of(entry, pid, run_id)
        if not entry.signer or not entry.signature:
            out.append(
                at.finding(
                    "error", "signature-incomplete",
                    "entry has a signer without a signature or a signature without a signer",
                )
            )
            continue
        if keys is None:
            unchecked.append(entry.round)
            continue
        key = keys.get(entry.signer)
        if key is None:
            out.append(
                at.finding(
                    "error", "unknown-signer",
                    f"signed by unknown key id {entry.signer}: no public key given for it",
                )
            )
        elif not entry.signature_valid(key):
            out.append(
                at.finding(
                    "error", "bad-signature",
                    f"signature by key {entry.signer} is invalid: forged, or the entry was "
                    "altered and re-hashed",
                )
            )
        owner = partition_of.get(entry.signer)
        this_run = run_id is None or entry.run_id == run_id
        if owner is not None and owner != entry.partition_id and this_run:
            if not wrong_key_reported:
                out.append(
                    at.finding(
                        "error", "wrong-key",
                        f"signed with client {owner}'s key ({entry.signer}), not client "
                        f"{entry.partition_id}'s",
                    )
                )
            wrong_key_reported = True
        if bound is not None and entry.signer != bound and this_run and owner is None:
            out.append(
                at.finding(
                    "error", "wrong-key",
                    f"signed with key {entry.signer}, but the key given for client {pid} is "
                    f"{bound}",
                )
            )
    if unchecked:
        out.append(
            finding(
                "warning", "signature-unchecked", pid, unchecked,
                "signatures not verified: no client public keys given "
                "(pass the clients' public.json files)",
            )
        )
    return out


def plan_problem(entry: LedgerEntry) -> str | None:
    """Why q and steps do not follow from the signed n, B and epochs (None: they do).

    The plan a client signs is exactly k = ⌈n/B⌉, q = 1/k, steps = epochs·k; any other q or
    steps is not the mechanism the declared n and B describe.
    """
    n, b, epochs = entry.num_examples, entry.batch_size, entry.epochs
    if n < 1 or b < 1 or epochs < 1:
        return f"n={n}, B={b}, epochs={epochs}: each must be ≥ 1"
    k = math.ceil(n / b)
    problems = []
    if not math.isclose(entry.sample_rate, 1.0 / k, rel_tol=PLAN_TOLERANCE, abs_tol=0.0):
        problems.append(
            f"sample_rate {entry.sample_rate:.12g} is not 1/⌈n/B⌉ = 1/⌈{n}/{b}⌉ = "
            f"{1.0 / k:.12g}"
        )
    if entry.steps != epochs * k:
        problems.append(
            f"steps {entry.steps} is not epochs·⌈n/B⌉ = {epochs}·{k} = {epochs * k}"
        )
    if not problems:
        return None
    return "; ".join(problems) + f" (n={n}, B={b}, epochs={epochs} as signed)"


@dataclass(frozen=True)
class Fork:
    """Two runs' copies of one chain disagree at ``seq``."""

    chain_id: str
    seq: int
    short: str  # run whose copy diverges from the longest copy
    long: str  # run holding the longest copy
    short_entry: LedgerEntry
    long_entry: LedgerEntry


def compare_copies(copies: Mapping[str, Sequence[LedgerEntry]]) -> tuple[str, list[Fork]]:
    """Several runs' copies of one chain (run → entries in seq order): every copy must be a
    prefix of the longest (same hash at the same seq). Returns the longest copy's run and
    the forks found (one per diverging copy, at its first differing entry)."""
    longest = max(copies, key=lambda run: len(copies[run]))
    reference = {e.seq: e for e in copies[longest]}
    forks = []
    for run, copy in copies.items():
        if run == longest:
            continue
        for entry in copy:
            other = reference.get(entry.seq)
            if other is None or other.hash != entry.hash:
                if other is not None:
                    forks.append(Fork(entry.chain_id, entry.seq, run, longest, entry, other))
                break
    return longest, forks
