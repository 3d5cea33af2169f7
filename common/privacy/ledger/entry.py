"""One ledger entry: its fields, canonical bytes, hash and Ed25519 signature, and strict parsing.

The line format is specified in :mod:`common.privacy.ledger`. Signing and verifying go through
:mod:`common.crypto.keys` (``Identity.sign``, ``signature_valid``); this module only frames
the signed message (``SIGNATURE_LABEL`` + the hash bytes) and base64-encodes the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common.crypto.keys import signature_valid

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from common.crypto.keys import Identity

KIND_CLIENT_DP_SGD = "client-dp-sgd"
GENESIS_HASH = "0" * 64
SIGNATURE_LABEL = b"fedvault ledger v2\x00"
UNIT_RECORD = "record"  # neighbouring data sets differ by one record (add/remove)

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
            raw = signer.sign(SIGNATURE_LABEL + bytes.fromhex(digest))
            signature = base64.b64encode(raw).decode("ascii")
        return replace(entry, hash=digest, signature=signature)

    def signature_valid(self, public_key: Ed25519PublicKey) -> bool:
        """Whether ``signature`` is ``public_key``'s signature over the *stored* ``hash``."""
        try:
            raw = base64.b64decode(self.signature, validate=True)
            message = SIGNATURE_LABEL + bytes.fromhex(self.hash)
        except (binascii.Error, ValueError):
            return False
        return signature_valid(public_key, raw, message)

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
