"""Checking ledger chains: the findings an audit reports, and chain integrity.

A *chain* is one data holder's lifetime ledger (``chain_id``): every DP round it trained, in
every run, linked by ``prev_hash`` from the genesis hash, numbered by ``seq`` 1, 2, 3, ...
:func:`verify_chain` checks what the entries prove about themselves (hashes, links, order,
one signer, signatures); :mod:`common.report.audit` checks what they claim (ε, budgets,
completeness against the run's record).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.findings import Finding, finding
from common.privacy.ledger import GENESIS_HASH, LedgerEntry


def chains(entries: Iterable[LedgerEntry]) -> dict[str, list[LedgerEntry]]:
    """Entries grouped per lifetime chain (``chain_id``), each in order of appearance."""
    grouped: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.chain_id, []).append(entry)
    return grouped


def verify_chain(
    entries: Sequence[LedgerEntry],
    public_key_by_signer: Mapping[str, Ed25519PublicKey] | None = None,
) -> list[Finding]:
    """Integrity of every chain in ``entries``: hashes, linkage, round order, signatures.

    ``public_key_by_signer`` maps Ed25519 key ids to public keys. ``None`` means "no keys
    given": signatures are then not checked (one warning per chain). With a mapping, a signer
    missing from it is an error (the entry claims a key nobody vouched for), and an unsigned
    entry is a warning: its integrity rests on the chain alone, not on the client.
    """
    findings: list[Finding] = []
    for chain in chains(entries).values():
        findings.extend(_verify_one_chain(chain[0].partition_id, chain, public_key_by_signer))
    return findings


def _verify_one_chain(
    pid: int, chain: list[LedgerEntry], keys: Mapping[str, Ed25519PublicKey] | None
) -> list[Finding]:
    out: list[Finding] = []
    unsigned: list[int] = []
    unchecked: list[int] = []
    prev: LedgerEntry | None = None
    first_signer: str | None = None
    for entry in chain:
        r = entry.round
        expected = entry.compute_hash()
        if expected != entry.hash:
            out.append(
                finding(
                    "error", "hash-mismatch", pid, r,
                    f"hash mismatch (entry altered: its fields hash to {expected[:12]}…, "
                    f"the stored hash is {entry.hash[:12] or '<empty>'}…)",
                )
            )
        if prev is None:
            if entry.prev_hash != GENESIS_HASH or entry.seq != 1:
                out.append(
                    finding(
                        "error", "chain-start", pid, r,
                        f"first entry of the chain has prev_hash {entry.prev_hash[:12]}…, "
                        "not all zeros: earlier entries of this client are missing",
                    )
                )
        else:
            if entry.seq != prev.seq + 1 or (entry.run_id == prev.run_id and r <= prev.round):
                out.append(
                    finding(
                        "error", "round-order", pid, r,
                        f"entry {entry.seq} (run {entry.run_id}, round {r}) follows entry "
                        f"{prev.seq} (run {prev.run_id}, round {prev.round}): entries must be "
                        "numbered 1, 2, 3, ... and rounds of a run strictly increase "
                        "(lines reordered, duplicated or dropped)",
                    )
                )
            if entry.prev_hash != prev.hash:
                out.append(
                    finding(
                        "error", "chain-broken", pid, r,
                        f"prev_hash does not match the entry before it (round {prev.round}): "
                        "an entry is missing in between, or lines were reordered",
                    )
                )
        out.extend(_check_signer(pid, entry, keys, first_signer, unsigned, unchecked))
        if first_signer is None:
            first_signer = entry.signer
        prev = entry
    if unsigned:
        out.append(
            finding(
                "warning", "unsigned", pid, unsigned,
                f"{len(unsigned)} unsigned entr{'y' if len(unsigned) == 1 else 'ies'}: "
                "the client has no key, so nothing proves the client (not the server) wrote them",
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


def _check_signer(
    pid: int,
    entry: LedgerEntry,
    keys: Mapping[str, Ed25519PublicKey] | None,
    first_signer: str | None,
    unsigned: list[int],
    unchecked: list[int],
) -> list[Finding]:
    r = entry.round
    out: list[Finding] = []
    if first_signer is not None and entry.signer != first_signer:
        out.append(
            finding(
                "error", "signer-changed", pid, r,
                f"signer changed from {first_signer or '<none>'} to {entry.signer or '<none>'} "
                "within the chain: another key wrote this entry",
            )
        )
    if not entry.signer and not entry.signature:
        unsigned.append(r)
        return out
    if not entry.signer or not entry.signature:
        out.append(
            finding(
                "error", "signature-incomplete", pid, r,
                "entry has a signer without a signature or a signature without a signer",
            )
        )
        return out
    if keys is None:
        unchecked.append(r)
        return out
    key = keys.get(entry.signer)
    if key is None:
        out.append(
            finding(
                "error", "unknown-signer", pid, r,
                f"signed by unknown key id {entry.signer}: no public key given for it",
            )
        )
    elif not entry.signature_valid(key):
        out.append(
            finding(
                "error", "bad-signature", pid, r,
                f"signature by key {entry.signer} is invalid: forged, or the entry was altered "
                "and re-hashed",
            )
        )
    return out

