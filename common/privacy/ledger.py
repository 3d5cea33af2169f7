"""A signed, hash-chained privacy ledger: one line per client per round it trained.

Why a ledger when ``metrics.json`` already has ε: ``metrics.json`` is written by the server,
and nothing in it lets a third party tell an honest record from an edited one. The ledger is
written *by each client* about its own privacy spend, and every entry

* names the raw mechanism (σ, q, steps, C, δ, accountant), so anyone can recompute ε from it
  with an independent accountant instead of trusting the claimed number;
* is chained to the client's previous entry by ``prev_hash``, so a dropped, duplicated or
  reordered entry breaks the chain;
* is signed by the client's Ed25519 key, so the server (which stores the ledger) cannot alter
  an entry, or write one, without the signature check failing.

Line format (``ledger.jsonl``, one JSON object per line, UTF-8)::

    {"run_id": "1713...", "round": 3, "partition_id": 2, "node_id": "8731...",
     "num_examples": 479, "sample_rate": 0.0667, "steps": 15, "noise_multiplier": 0.7367,
     "max_grad_norm": 1.0, "delta": 1e-05, "accountant": "prv",
     "epsilon_round": 0.86, "epsilon_cumulative": 6.58, "epsilon_budget": 8.0,
     "time": "2025-01-01T12:00:00.000Z", "prev_hash": "<64 hex>", "kind": "client-dp-sgd",
     "hash": "<64 hex>", "signer": "<16 hex Ed25519 key id or empty>",
     "signature": "<base64 64 bytes or empty>"}

* ``hash`` = SHA-256 (hex) of the *canonical JSON* of every field except ``hash`` and
  ``signature``: ``json.dumps(fields, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False, allow_nan=False)`` encoded as UTF-8, ints as ints and the float fields as
  Python floats (so ``8`` and ``8.0`` hash alike; a reader coerces before hashing).
* ``prev_hash`` = the ``hash`` of the same client's previous entry in this run, ``"0" * 64``
  for its first one. A chain is identified by ``(run_id, partition_id)``.
* ``signature`` = base64 Ed25519 signature over ``b"fedvault ledger v1\\0" || bytes.fromhex(hash)``
  (the label keeps a ledger signature from ever being valid as any other fedvault signature).
  ``signer`` is the client's Ed25519 key id; both are ``""`` when the client has no key.

What the ledger cannot show on its own: that the *last* entries of a chain were not dropped
(a truncated chain is still a valid chain). The audit cross-checks the rounds in
``metrics.json``; a client (or anyone holding its latest entry hash) can check the tail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy.accounting import ACCOUNTANTS

if TYPE_CHECKING:
    from common.crypto.keys import Identity

__all__ = [
    "GENESIS_HASH",
    "KIND_CLIENT_DP_SGD",
    "LEDGER_FILE",
    "ClientLedger",
    "Finding",
    "LedgerEntry",
    "LedgerError",
    "append_ledger",
    "chains",
    "finding",
    "parse_ledger",
    "read_ledger",
    "utc_now",
    "verify_chain",
    "where",
    "write_ledger",
]

log = logging.getLogger("fedvault.ledger")

LEDGER_FILE = "ledger.jsonl"
KIND_CLIENT_DP_SGD = "client-dp-sgd"
GENESIS_HASH = "0" * 64
SIGNATURE_LABEL = b"fedvault ledger v1\x00"
CLIENT_LEDGER_FORMAT = "fedvault-client-ledger"
FORMAT_VERSION = 1

Severity = Literal["error", "warning"]

_INT_FIELDS = frozenset({"round", "partition_id", "num_examples", "steps"})
_FLOAT_FIELDS = frozenset(
    {
        "sample_rate",
        "noise_multiplier",
        "max_grad_norm",
        "delta",
        "epsilon_round",
        "epsilon_cumulative",
        "epsilon_budget",
    }
)
_UNHASHED = ("hash", "signature")


class LedgerError(ValueError):
    """A ledger line or document that cannot be read, or an append that would be wrong."""


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``, e.g. ``2025-01-01T12:00:00.000Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# entries


@dataclass(frozen=True)
class LedgerEntry:
    """One client's privacy spend for one round, with the mechanism that produced it.

    Frozen: an entry is evidence; "changing" one (``dataclasses.replace``) makes a new entry
    whose stored ``hash`` no longer matches, which is exactly what the audit must notice.
    """

    run_id: str
    round: int
    partition_id: int
    node_id: str
    num_examples: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_round: float
    epsilon_cumulative: float
    epsilon_budget: float
    time: str
    prev_hash: str
    kind: str = KIND_CLIENT_DP_SGD
    hash: str = ""
    signer: str = ""
    signature: str = ""

    # -- hashing and signing ------------------------------------------------------------------
    def canonical_bytes(self) -> bytes:
        """The bytes ``hash`` covers: every field but ``hash`` and ``signature``."""
        data = {k: v for k, v in asdict(self).items() if k not in _UNHASHED}
        return json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")

    def compute_hash(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_bytes`, recomputed from the field values."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def sealed(self, signer: Identity | None) -> LedgerEntry:
        """This entry with ``signer`` (key id), ``hash`` and, with a key, ``signature`` set.

        The key id goes into the hashed fields first, so the hash (and the signature over
        it) also binds *who* signed: swapping the signer field breaks the hash.
        """
        key_id = signer.ids.ed25519 if signer is not None else ""
        entry = replace(self, signer=key_id, hash="", signature="")
        digest = entry.compute_hash()
        signature = ""
        if signer is not None:
            raw = signer.ed25519_private.sign(SIGNATURE_LABEL + bytes.fromhex(digest))
            signature = base64.b64encode(raw).decode("ascii")
        return replace(entry, hash=digest, signature=signature)

    def signature_valid(self, public_key: Ed25519PublicKey) -> bool:
        """Whether ``signature`` is ``public_key``'s signature over the *stored* ``hash``."""
        try:
            raw = base64.b64decode(self.signature, validate=True)
            message = SIGNATURE_LABEL + bytes.fromhex(self.hash)
        except (binascii.Error, ValueError):
            return False
        if len(raw) != 64:
            return False
        try:
            public_key.verify(raw, message)
        except InvalidSignature:
            return False
        return True

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Fields in declaration order (a stable, readable line)."""
        return asdict(self)

    def to_json_line(self) -> str:
        """One ``ledger.jsonl`` line, without the trailing newline."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """Parse one entry strictly; ``LedgerError`` names the first problem.

        Unknown fields are refused rather than dropped: they would not be covered by the hash,
        so accepting them would let anyone attach unverifiable claims to a signed entry.
        """
        if not isinstance(data, Mapping):
            raise LedgerError("a ledger entry must be a JSON object")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise LedgerError(f"unknown field(s) {', '.join(unknown)} (not covered by the hash)")
        values: dict[str, Any] = {}
        for name in names:
            if name not in data:
                raise LedgerError(f"field {name!r} is missing")
            values[name] = _coerce(name, data[name])
        return cls(**values)

    @classmethod
    def from_json_line(cls, line: str) -> LedgerEntry:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise LedgerError(f"not valid JSON ({err.msg} at column {err.colno})") from None
        return cls.from_dict(data)


def _coerce(name: str, value: Any) -> Any:
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LedgerError(f"field {name!r} must be an integer, got {value!r}")
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LedgerError(f"field {name!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise LedgerError(f"field {name!r} must be finite, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise LedgerError(f"field {name!r} must be a string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# findings and chain verification


@dataclass(frozen=True)
class Finding:
    """One problem found in a ledger. ``message`` is one line naming client and round."""

    severity: Severity
    partition_id: int | None
    round: int | None
    message: str
    code: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def where(partition_id: int | None, rounds: int | Sequence[int] | None = None) -> str:
    """``client 2, round 3`` / ``client 2, rounds 1-4, 7`` / ``client 2`` -- message prefixes."""
    parts = []
    if partition_id is not None:
        parts.append(f"client {partition_id}")
    if isinstance(rounds, int):
        parts.append(f"round {rounds}")
    elif rounds:
        parts.append(f"rounds {_ranges(rounds)}")
    return ", ".join(parts) or "run"


def finding(
    severity: Severity,
    code: str,
    partition_id: int | None,
    rounds: int | Sequence[int] | None,
    text: str,
) -> Finding:
    """A :class:`Finding` whose message starts with :func:`where` (kept on one line)."""
    first = rounds if isinstance(rounds, int) else (min(rounds) if rounds else None)
    message = f"{where(partition_id, rounds)}: {' '.join(text.split())}"
    return Finding(severity, partition_id, first, message, code)


def _ranges(values: Sequence[int]) -> str:
    ordered = sorted(set(values))
    spans: list[str] = []
    start = prev = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(spans)


def chains(entries: Iterable[LedgerEntry]) -> dict[tuple[str, int], list[LedgerEntry]]:
    """Entries grouped per ``(run_id, partition_id)`` chain, each in order of appearance."""
    grouped: dict[tuple[str, int], list[LedgerEntry]] = {}
    for entry in entries:
        grouped.setdefault((entry.run_id, entry.partition_id), []).append(entry)
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
    for (_run_id, pid), chain in chains(entries).items():
        findings.extend(_verify_one_chain(pid, chain, public_key_by_signer))
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
            if entry.prev_hash != GENESIS_HASH:
                out.append(
                    finding(
                        "error", "chain-start", pid, r,
                        f"first entry of the chain has prev_hash {entry.prev_hash[:12]}…, "
                        "not all zeros: earlier entries of this client are missing",
                    )
                )
        else:
            if r <= prev.round:
                out.append(
                    finding(
                        "error", "round-order", pid, r,
                        f"round {r} follows round {prev.round}: rounds must strictly increase "
                        "(lines reordered or duplicated)",
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


# --------------------------------------------------------------------------------------------
# files


def parse_ledger(text: str) -> tuple[list[LedgerEntry], list[Finding]]:
    """Entries from ``ledger.jsonl`` text; unreadable lines become error findings, not crashes.

    An auditor must see *every* problem in one pass, and a truncated last line (a crash
    mid-write) must not hide the entries before it.
    """
    entries: list[LedgerEntry] = []
    findings: list[Finding] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.from_json_line(line))
        except LedgerError as err:
            pid, rnd = _best_effort_ids(line)
            prefix = where(pid, rnd) if pid is not None else "ledger"
            findings.append(
                Finding(
                    "error", pid, rnd,
                    f"{prefix}: ledger line {number} is unreadable ({err})", "malformed-line",
                )
            )
    return entries, findings


def _best_effort_ids(line: str) -> tuple[int | None, int | None]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    pid, rnd = data.get("partition_id"), data.get("round")
    return (
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None,
    )


def read_ledger(path: str | os.PathLike[str]) -> tuple[list[LedgerEntry], list[Finding]]:
    """:func:`parse_ledger` of a file (``FileNotFoundError`` when it is not there)."""
    return parse_ledger(Path(path).read_text(encoding="utf-8"))


def _lines(entries: Iterable[LedgerEntry]) -> bytes:
    return "".join(e.to_json_line() + "\n" for e in entries).encode("utf-8")


def write_ledger(path: str | os.PathLike[str], entries: Iterable[LedgerEntry]) -> Path:
    """Write all ``entries`` to ``path`` atomically (temp file + ``os.replace``).

    Readers see the old ledger or the new one, never half a line.
    """
    from common.crypto.files import PUBLIC_MODE, write_file_atomic

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(target, _lines(entries), mode=PUBLIC_MODE)
    return target


def append_ledger(path: str | os.PathLike[str], entries: Iterable[LedgerEntry]) -> Path:
    """Append ``entries`` (whole lines, fsync'ed): cheap per round for a long run.

    A crash can at worst leave a partial last line, which :func:`parse_ledger` reports as
    one unreadable line without losing the entries before it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = _lines(entries)
    with open(target, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return target


# --------------------------------------------------------------------------------------------
# a client's own chain


class ClientLedger:
    """One client's chain for one run: it appends an entry per round it trains.

    The client keeps it (``to_json`` into Flower's ``context.state``, or ``save`` to disk),
    so it can always extend its own chain and hand the newest entry to the server.
    """

    def __init__(
        self,
        run_id: str,
        partition_id: int,
        node_id: str = "",
        entries: Iterable[LedgerEntry] = (),
    ) -> None:
        self.run_id = str(run_id)
        self.partition_id = int(partition_id)
        self.node_id = str(node_id)
        self._entries: list[LedgerEntry] = list(entries)
        for entry in self._entries:
            if (entry.run_id, entry.partition_id) != (self.run_id, self.partition_id):
                raise LedgerError(
                    f"entry for run {entry.run_id}, client {entry.partition_id} does not belong "
                    f"to the ledger of run {self.run_id}, client {self.partition_id}"
                )

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def last(self) -> LedgerEntry | None:
        return self._entries[-1] if self._entries else None

    @property
    def epsilon_spent(self) -> float:
        return self._entries[-1].epsilon_cumulative if self._entries else 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def append(
        self,
        *,
        round: int,
        num_examples: int,
        sample_rate: float,
        steps: int,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        epsilon_cumulative: float,
        epsilon_budget: float,
        signer: Identity | None,
        node_id: str | None = None,
        kind: str = KIND_CLIENT_DP_SGD,
        time: str | None = None,
    ) -> LedgerEntry:
        """Record one trained round; returns the sealed entry (send it to the server).

        ``epsilon_round`` is derived here as the difference of cumulative values, so the
        ledger is consistent by construction (it is not a per-round ε from a fresh
        accountant, which would understate what composition costs).
        """
        last = self.last
        if last is not None and round <= last.round:
            raise LedgerError(
                f"client {self.partition_id}: round {round} cannot follow round {last.round} "
                "in the ledger (rounds strictly increase)"
            )
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
        _check_mechanism(num_examples, sample_rate, steps, noise_multiplier, max_grad_norm, delta)
        previous = last.epsilon_cumulative if last is not None else 0.0
        if not math.isfinite(epsilon_cumulative) or epsilon_cumulative < previous:
            raise LedgerError(
                f"client {self.partition_id}, round {round}: cumulative ε {epsilon_cumulative} "
                f"is below the previous {previous} (ε never decreases)"
            )
        if node_id is not None:
            self.node_id = str(node_id)
        entry = LedgerEntry(
            run_id=self.run_id,
            round=int(round),
            partition_id=self.partition_id,
            node_id=self.node_id,
            num_examples=int(num_examples),
            sample_rate=float(sample_rate),
            steps=int(steps),
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            delta=float(delta),
            accountant=accountant,
            epsilon_round=float(epsilon_cumulative) - previous,
            epsilon_cumulative=float(epsilon_cumulative),
            epsilon_budget=float(epsilon_budget),
            time=time or utc_now(),
            prev_hash=last.hash if last is not None else GENESIS_HASH,
            kind=kind,
        ).sealed(signer)
        self._entries.append(entry)
        return entry

    # -- persistence --------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CLIENT_LEDGER_FORMAT,
                "version": FORMAT_VERSION,
                "run_id": self.run_id,
                "partition_id": self.partition_id,
                "node_id": self.node_id,
                "entries": [e.to_dict() for e in self._entries],
            },
            ensure_ascii=False,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> ClientLedger:
        """Restore a ledger; refuses one whose chain is not intact (do not extend a broken one)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(f"client ledger is not valid JSON ({err.msg})") from None
        if not isinstance(data, dict) or data.get("format") != CLIENT_LEDGER_FORMAT:
            raise LedgerError(f"not a {CLIENT_LEDGER_FORMAT} document")
        if data.get("version") != FORMAT_VERSION:
            raise LedgerError(f"unsupported client ledger version {data.get('version')!r}")
        entries = [LedgerEntry.from_dict(e) for e in data.get("entries", [])]
        ledger = cls(data["run_id"], data["partition_id"], data.get("node_id", ""), entries)
        ledger._check_intact()
        return ledger

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the chain as ``ledger.jsonl`` lines, atomically (temp file + ``os.replace``)."""
        return write_ledger(path, self._entries)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClientLedger:
        """Read a file written by :meth:`save` (one chain, intact)."""
        entries, problems = read_ledger(path)
        if problems:
            raise LedgerError(f"{path}: {problems[0].message}")
        if not entries:
            raise LedgerError(f"{path}: the ledger file has no entries")
        first = entries[0]
        ledger = cls(first.run_id, first.partition_id, entries[-1].node_id, entries)
        ledger._check_intact()
        return ledger

    def _check_intact(self) -> None:
        errors = [f for f in verify_chain(self._entries, None) if f.is_error]
        if errors:
            raise LedgerError(f"client ledger is not intact: {errors[0].message}")


def _check_mechanism(
    num_examples: int,
    sample_rate: float,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
) -> None:
    problems = []
    if num_examples < 1:
        problems.append(f"num_examples={num_examples} (needs ≥ 1)")
    if not 0 < sample_rate <= 1:
        problems.append(f"sample_rate={sample_rate} (needs 0 < q ≤ 1)")
    if steps < 1:
        problems.append(f"steps={steps} (needs ≥ 1)")
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        problems.append(f"noise_multiplier={noise_multiplier} (needs σ > 0)")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        problems.append(f"max_grad_norm={max_grad_norm} (needs C > 0)")
    if not 0 < delta < 1:
        problems.append(f"delta={delta} (needs 0 < δ < 1)")
    if problems:
        raise LedgerError("invalid DP-SGD mechanism: " + ", ".join(problems))
