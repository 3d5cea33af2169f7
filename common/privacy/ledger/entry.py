"""A data holder's signed, hash-chained privacy ledger: one entry per DP round it trains.

Why a ledger when ``metrics.json`` already has ε: ``metrics.json`` is written by the server,
and nothing in it lets a third party tell an honest record from an edited one. The ledger is
written *by each client* about its own privacy spend, and every entry

* names the raw mechanism (σ, q, steps, C, δ, accountant) and what q and steps derive from
  (the declared data set size n, the batch size B, the local epochs), so anyone can recompute
  ε with an independent accountant instead of trusting the claimed number;
* is chained to the holder's previous entry by ``prev_hash`` and numbered by ``seq``, so a
  dropped, duplicated or reordered entry breaks the chain;
* is signed by the client's Ed25519 key, so the server (which stores the ledger) cannot alter
  an entry, or write one, without the signature check failing.

A chain is the holder's **lifetime** on one data set (its policy's ``dataset-id``), not one
run: ``chain_id`` is random (made when the holder's state is created, so it reveals nothing
about the data) and every run the holder trains in extends the same chain, so
``epsilon_cumulative`` is the lifetime spend and ``run_id`` / ``round`` say where each entry
was spent. The holder sends the server its whole chain once per run (the entries before the
run with its first reply), so every run directory holds complete chains from genesis.

Line format (``ledger.jsonl``, one JSON object per line, UTF-8)::

    {"chain_id": "<32 hex>", "seq": 7, "dataset_id": "hospital-a-2026", "unit": "record",
     "run_id": "1713...", "round": 3, "partition_id": 2, "node_id": "8731...",
     "num_examples": 480, "batch_size": 32, "epochs": 1, "sample_rate": 0.0667, "steps": 15,
     "noise_multiplier": 0.7367, "max_grad_norm": 1.0, "delta": 1e-05, "accountant": "prv",
     "epsilon_round": 0.86, "epsilon_cumulative": 6.58, "epsilon_budget": 8.0,
     "run_epsilon_budget": 8.0, "time": "2025-01-01T12:00:00.000Z", "prev_hash": "<64 hex>",
     "kind": "client-dp-sgd", "hash": "<64 hex>", "signer": "<16 hex key id or empty>",
     "signature": "<base64 64 bytes or empty>"}

* ``unit`` names the neighbouring relation the ε is in: ``record`` = add or remove one record
  of this holder's data set.
* ``num_examples`` is the size the holder *declares* (public by the holder's choice; see the
  README's "Privacy accounting, precisely"): q = 1/⌈n/B⌉ and steps = epochs·⌈n/B⌉ derive from
  it, so the audit can check them.
* ``epsilon_budget`` is the holder's lifetime budget (its policy); ``run_epsilon_budget`` the
  most this run could add, as the run asked and the policy allowed.
* ``hash`` = SHA-256 (hex) of the *canonical JSON* of every field except ``hash`` and
  ``signature``: ``json.dumps(fields, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False, allow_nan=False)`` encoded as UTF-8, ints as ints and the float fields as
  Python floats (so ``8`` and ``8.0`` hash alike; a reader coerces before hashing).
* ``prev_hash`` = the ``hash`` of the chain's previous entry, ``"0" * 64`` for ``seq`` 1.
* ``signature`` = base64 Ed25519 signature over ``b"fedvault ledger v2\\0" || bytes.fromhex(hash)``
  (the label keeps a ledger signature from ever being valid as any other fedvault signature,
  or as a signature of the v1 format). ``signer`` is the client's Ed25519 key id; both are
  ``""`` when the client has no key.

What the ledger cannot show on its own: that the *last* entries of a chain were not dropped
(a truncated chain is still a valid chain). The audit cross-checks the rounds in
``metrics.json`` and, given several runs, that every run's copy of a chain extends the
others; the holder itself knows its head.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.privacy import ACCOUNTANTS
from common.privacy.findings import Finding, where

if TYPE_CHECKING:
    from common.crypto.keys import Identity

__all__ = [
    "GENESIS_HASH",
    "KIND_CLIENT_DP_SGD",
    "LEDGER_FILE",
    "UNIT_RECORD",
    "ClientLedger",
    "LedgerEntry",
    "LedgerError",
    "append_ledger",
    "parse_ledger",
    "read_ledger",
    "utc_now",
    "write_ledger",
]

log = logging.getLogger("fedvault.ledger")

LEDGER_FILE = "ledger.jsonl"
KIND_CLIENT_DP_SGD = "client-dp-sgd"
GENESIS_HASH = "0" * 64
SIGNATURE_LABEL = b"fedvault ledger v2\x00"
UNIT_RECORD = "record"  # neighbouring data sets differ by one record (add/remove)
CLIENT_LEDGER_FORMAT = "fedvault-client-ledger"
FORMAT_VERSION = 2

_INT_FIELDS = frozenset(
    {"seq", "round", "partition_id", "num_examples", "batch_size", "epochs", "steps"}
)
_FLOAT_FIELDS = frozenset(
    {
        "sample_rate",
        "noise_multiplier",
        "max_grad_norm",
        "delta",
        "epsilon_round",
        "epsilon_cumulative",
        "epsilon_budget",
        "run_epsilon_budget",
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
    """One holder's privacy spend for one round, with the mechanism that produced it.

    Frozen: an entry is evidence; "changing" one (``dataclasses.replace``) makes a new entry
    whose stored ``hash`` no longer matches, which is exactly what the audit must notice.
    """

    chain_id: str
    seq: int
    dataset_id: str
    unit: str
    run_id: str
    round: int
    partition_id: int
    node_id: str
    num_examples: int
    batch_size: int
    epochs: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_round: float
    epsilon_cumulative: float
    epsilon_budget: float
    run_epsilon_budget: float
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
    from common.files import PUBLIC_MODE, write_file_atomic

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
    """One holder's lifetime chain on one data set: it appends an entry per DP round trained.

    The holder keeps it (``to_json``, saved with its account in its own state), so it can
    always extend its own chain, in any later run, and hand the new entries to the server.
    """

    def __init__(
        self,
        dataset_id: str,
        chain_id: str | None = None,
        entries: Iterable[LedgerEntry] = (),
    ) -> None:
        self.dataset_id = str(dataset_id)
        # random, so the id that travels with every entry says nothing about the data
        self.chain_id = chain_id or secrets.token_hex(16)
        self._entries: list[LedgerEntry] = list(entries)
        for entry in self._entries:
            if entry.chain_id != self.chain_id:
                raise LedgerError(
                    f"entry of chain {entry.chain_id} does not belong to chain {self.chain_id}"
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
        run_id: str,
        round: int,
        partition_id: int,
        node_id: str,
        num_examples: int,
        batch_size: int,
        epochs: int,
        sample_rate: float,
        steps: int,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        epsilon_cumulative: float,
        epsilon_budget: float,
        run_epsilon_budget: float,
        signer: Identity | None,
        kind: str = KIND_CLIENT_DP_SGD,
        time: str | None = None,
    ) -> LedgerEntry:
        """Record one trained round; returns the sealed entry (send it to the server).

        ``epsilon_round`` is derived here as the difference of cumulative values, so the
        ledger is consistent by construction (it is not a per-round ε from a fresh
        accountant, which would understate what composition costs).
        """
        last = self.last
        if last is not None and last.run_id == str(run_id) and round <= last.round:
            raise LedgerError(
                f"run {run_id}: round {round} cannot follow round {last.round} in the ledger "
                "(rounds of a run strictly increase)"
            )
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
        _check_mechanism(num_examples, sample_rate, steps, noise_multiplier, max_grad_norm, delta)
        previous = last.epsilon_cumulative if last is not None else 0.0
        if not math.isfinite(epsilon_cumulative) or epsilon_cumulative < previous:
            raise LedgerError(
                f"run {run_id}, round {round}: cumulative ε {epsilon_cumulative} is below the "
                f"previous {previous} (ε never decreases)"
            )
        entry = LedgerEntry(
            chain_id=self.chain_id,
            seq=len(self._entries) + 1,
            dataset_id=self.dataset_id,
            unit=UNIT_RECORD,
            run_id=str(run_id),
            round=int(round),
            partition_id=int(partition_id),
            node_id=str(node_id),
            num_examples=int(num_examples),
            batch_size=int(batch_size),
            epochs=int(epochs),
            sample_rate=float(sample_rate),
            steps=int(steps),
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            delta=float(delta),
            accountant=accountant,
            epsilon_round=float(epsilon_cumulative) - previous,
            epsilon_cumulative=float(epsilon_cumulative),
            epsilon_budget=float(epsilon_budget),
            run_epsilon_budget=float(run_epsilon_budget),
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
                "dataset_id": self.dataset_id,
                "chain_id": self.chain_id,
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
        ledger = cls(data["dataset_id"], data["chain_id"], entries)
        ledger._check_intact()
        return ledger

    def _check_intact(self) -> None:
        from common.privacy.verification import verify_chain

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
