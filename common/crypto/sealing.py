"""End-to-end sealed (encrypted + signed) and signed-only messages, bound to a context.

Why: model updates travel through Flower's SuperLink, which we do not want to trust with their
content or their integrity. A client *seals* its update for the server: only the holder of the
server's X25519 key can read it, only the client's Ed25519 key can have produced it, and it is
only accepted for the exact ``context`` (run id, round, node id, partition id, message kind...) it
was made for, so a recorded update cannot be replayed into another round, attributed to another
node, or passed off as another kind of message. The server's global model only needs
authenticity, so it is *signed* (not encrypted).

Not covered here: replay *within* the same context (e.g. the same update delivered twice in the
same round). The caller de-duplicates per (context, sender), e.g. keeps one update per node per
round.

Construction (sealed)
---------------------
1. ephemeral X25519 key pair ``(e, E)``; ``shared = X25519(e, recipient X25519 public key R)``
2. ``key = HKDF-SHA256(shared, salt=None, info=b"fedvault seal v1" || E || R, length=32)``
   -- binding both public keys into the key (as HPKE does) ties the key to this exchange.
3. ``ciphertext = AES-256-GCM(key, nonce, payload, aad=header)``; the header contains the
   canonical context, the sender's signing key id and the recipient's key id, so none of them can
   be swapped without the tag failing.
4. ``signature = Ed25519(sender, b"fedvault message v1\\0" || header || ciphertext)``.

Opening verifies, in order: sender key id, signature, context, recipient key id, decryption --
signature first, so nothing unauthenticated is interpreted beyond the fixed-size header fields.

Format, byte by byte (integers big-endian)::

    offset  size  field
         0     4  magic            b"FVM1"
         4     1  version          1
         5     1  kind             1 = sealed (encrypted + signed), 2 = signed only
         6     1  suite            1 = X25519 / HKDF-SHA256 / AES-256-GCM / Ed25519
         7     8  sender key id    raw 8 bytes of the sender's Ed25519 key id
        15     2  context length   L
        17     L  context          canonical JSON (sorted keys, no spaces, UTF-8)
    sealed only:
      17+L     8  recipient key id raw 8 bytes of the recipient's X25519 key id
      25+L    32  ephemeral X25519 public key
      57+L    12  nonce            random
      69+L     n  ciphertext       len(payload) + 16-byte GCM tag
    signed only:
      17+L     n  payload
    last 64 bytes: Ed25519 signature over b"fedvault message v1\\0" || every byte before it

"header" above is every byte before the ciphertext (sealed) or the payload (signed).
Payloads are opaque bytes (the caller serializes) and must stay below 2 GiB (AEAD limit).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError, MalformedFileError
from .keyids import KEY_ID_BYTES, key_id_from_bytes, key_id_to_bytes
from .keys import Identity, PublicIdentity

__all__ = [
    "KIND_SEALED",
    "KIND_SIGNED",
    "Context",
    "MessageInfo",
    "canonical_context",
    "message_info",
    "open_sealed",
    "seal",
    "sign",
    "verify",
]

Context = Mapping[str, str | int]
Buffer = bytes | bytearray | memoryview

MAGIC = b"FVM1"
VERSION = 1
KIND_SEALED = 1
KIND_SIGNED = 2
SUITE = 1
SIGNATURE_SIZE = 64
TAG_SIZE = 16
NONCE_SIZE = 12
MAX_CONTEXT_BYTES = 0xFFFF

_PREFIX = struct.Struct(">4sBBB8sH")  # magic, version, kind, suite, sender key id, context len
_SIG_LABEL = b"fedvault message v1\x00"
_HKDF_LABEL = b"fedvault seal v1"
_SEALED_FIXED = KEY_ID_BYTES + 32 + NONCE_SIZE  # recipient id, ephemeral key, nonce
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_KIND_NAMES = {KIND_SEALED: "sealed", KIND_SIGNED: "signed"}


def canonical_context(context: Context) -> bytes:
    """Canonical JSON of a flat ``{str: str | int}`` context: one context, one byte string.

    Booleans, floats and nesting are refused: they have several spellings, and a context that
    serializes differently on two machines would make honest messages fail to open.
    """
    if not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping of str to str|int, got {type(context)}")
    for key, value in context.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"context keys must be non-empty str, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"context[{key!r}] must be str or int, got {type(value).__name__}")
    encoded = json.dumps(
        dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise ValueError(f"context is {len(encoded)} bytes as JSON, at most {MAX_CONTEXT_BYTES}")
    return encoded


@dataclass(frozen=True)
class MessageInfo:
    """Unauthenticated header fields: for routing/logging *before* opening, never for trust."""

    kind: str
    sender_key_id: str
    recipient_key_id: str | None
    context: dict[str, Any]


@dataclass(frozen=True)
class _Parsed:
    kind: int
    sender_key_id: str
    context_bytes: bytes
    header: memoryview  # bytes authenticated as AAD (sealed) / start of signed region
    body: memoryview  # ciphertext (sealed) or payload (signed)
    signed: memoryview  # everything the signature covers (minus the label)
    signature: bytes
    recipient_key_id: str | None = None
    ephemeral: bytes = b""
    nonce: bytes = b""


def _malformed(detail: str) -> MalformedFileError:
    return MalformedFileError(
        f"message is malformed ({detail}): it is not a fedvault sealed/signed message or was"
        " truncated in transit; drop it and have the sender resend"
    )


def _parse(blob: Buffer) -> _Parsed:
    view = memoryview(blob).cast("B")
    if len(view) < _PREFIX.size + SIGNATURE_SIZE:
        raise _malformed(f"only {len(view)} bytes")
    magic, version, kind, suite, sender_id, ctx_len = _PREFIX.unpack(view[: _PREFIX.size])
    if magic != MAGIC:
        raise _malformed(f"magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION or suite != SUITE:
        raise MalformedFileError(
            f"message uses format version {version} / suite {suite}, this fedvault reads"
            f" {VERSION} / {SUITE}: run the same fedvault version on both sides"
        )
    if kind not in _KIND_NAMES:
        raise _malformed(f"unknown kind {kind}")
    pos = _PREFIX.size + ctx_len
    end = len(view) - SIGNATURE_SIZE
    fixed = _SEALED_FIXED if kind == KIND_SEALED else 0
    min_body = TAG_SIZE if kind == KIND_SEALED else 0
    if pos + fixed + min_body > end:
        raise _malformed("shorter than its header says")
    parsed: dict[str, Any] = {}
    if kind == KIND_SEALED:
        parsed["recipient_key_id"] = key_id_from_bytes(view[pos : pos + KEY_ID_BYTES])
        parsed["ephemeral"] = bytes(view[pos + KEY_ID_BYTES : pos + KEY_ID_BYTES + 32])
        parsed["nonce"] = bytes(view[pos + KEY_ID_BYTES + 32 : pos + fixed])
    return _Parsed(
        kind=kind,
        sender_key_id=key_id_from_bytes(sender_id),
        context_bytes=bytes(view[_PREFIX.size : _PREFIX.size + ctx_len]),
        header=view[: pos + fixed],
        body=view[pos + fixed : end],
        signed=view[:end],
        signature=bytes(view[end:]),
        **parsed,
    )


def _prefix(kind: int, sender: Identity, ctx: bytes) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, kind, SUITE, key_id_to_bytes(sender.ids.ed25519), len(ctx))


def _signature(sender: Identity, *parts: Buffer) -> bytes:
    return sender.ed25519_private.sign(b"".join((_SIG_LABEL, *parts)))


def _message_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    info = _HKDF_LABEL + ephemeral + recipient
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared))


def seal(payload: Buffer, sender: Identity, recipient: PublicIdentity, context: Context) -> bytes:
    """Encrypt ``payload`` for ``recipient`` and sign it as ``sender``, bound to ``context``."""
    ctx = canonical_context(context)
    ephemeral = X25519PrivateKey.generate()
    eph_pub = ephemeral.public_key().public_bytes(*_RAW)
    rcpt_pub = recipient.x25519_public.public_bytes(*_RAW)
    nonce = os.urandom(NONCE_SIZE)
    header = b"".join(
        (
            _prefix(KIND_SEALED, sender, ctx),
            ctx,
            key_id_to_bytes(recipient.ids.x25519),
            eph_pub,
            nonce,
        )
    )
    aead = _message_key(ephemeral.exchange(recipient.x25519_public), eph_pub, rcpt_pub)
    ciphertext = aead.encrypt(nonce, bytes(payload), header)
    return b"".join((header, ciphertext, _signature(sender, header, ciphertext)))


def sign(payload: Buffer, sender: Identity, context: Context) -> bytes:
    """Sign ``payload`` (left readable) as ``sender``, bound to ``context``."""
    ctx = canonical_context(context)
    header = _prefix(KIND_SIGNED, sender, ctx) + ctx
    return b"".join((header, payload, _signature(sender, header, payload)))


def _describe(context: bytes) -> str:
    return context.decode("utf-8", "replace")


def _check_signature(parsed: _Parsed, sender: PublicIdentity, context: bytes) -> None:
    """Sender key id, then signature, then context -- in that order, each with its own error."""
    if parsed.sender_key_id != sender.ids.ed25519:
        raise IntegrityError(
            f"message is signed by unknown sender key id {parsed.sender_key_id}, but"
            f" {sender.role} '{sender.name}' has key id {sender.ids.ed25519}: it comes from"
            " another party or the sender's keys changed; check which public.json is configured"
        )
    try:
        sender.ed25519_public.verify(parsed.signature, b"".join((_SIG_LABEL, parsed.signed)))
    except InvalidSignature:
        raise IntegrityError(
            f"signature check failed for a message from {sender.role} '{sender.name}' (key id"
            f" {sender.ids.ed25519}): it was altered in transit or forged; drop it and have"
            " the sender resend"
        ) from None
    if parsed.context_bytes != context:
        raise IntegrityError(
            f"message was made for context {_context_diff(parsed.context_bytes, context)}:"
            " it is replayed or misrouted (another run, round, node or kind); drop it"
        )


def _context_diff(actual: bytes, expected: bytes) -> str:
    """Name only the fields that differ, e.g. ``round=3 (expected 4)``."""
    try:
        got = json.loads(actual)
        want = json.loads(expected)
    except ValueError:
        return f"{_describe(actual)} (expected {_describe(expected)})"
    if not isinstance(got, dict):
        return f"{_describe(actual)} (expected {_describe(expected)})"
    parts = [
        f"{key}={got.get(key, '<missing>')!r} (expected {want.get(key, '<missing>')!r})"
        for key in sorted(set(got) | set(want))
        if got.get(key) != want.get(key)
    ]
    return ", ".join(parts) or _describe(actual)


def open_sealed(
    blob: Buffer, recipient: Identity, sender: PublicIdentity, context: Context
) -> bytes:
    """Verify and decrypt a :func:`seal` output; raises ``IntegrityError`` naming the failure."""
    expected = canonical_context(context)
    parsed = _parse(blob)
    if parsed.kind != KIND_SEALED:
        raise IntegrityError(
            "message is signed but not sealed (encrypted): the sender used sign() where seal()"
            " was expected; open it with verify() or fix the sender"
        )
    _check_signature(parsed, sender, expected)
    if parsed.recipient_key_id != recipient.ids.x25519:
        raise IntegrityError(
            f"message was sealed for recipient key id {parsed.recipient_key_id}, but"
            f" {recipient.label} has key id {recipient.ids.x25519}: the sender used a stale or"
            " wrong public.json; give it this party's current public.json"
        )
    rcpt_pub = recipient.x25519_private.public_key().public_bytes(*_RAW)
    try:
        shared = recipient.x25519_private.exchange(
            X25519PublicKey.from_public_bytes(parsed.ephemeral)
        )
        aead = _message_key(shared, parsed.ephemeral, rcpt_pub)
        return aead.decrypt(parsed.nonce, parsed.body, parsed.header)
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"decryption failed for a sealed message from {sender.role} '{sender.name}' although"
            " its signature is valid: the sender sealed it wrongly (bad ephemeral key or key"
            " mismatch); have the sender re-seal it"
        ) from None


def verify(blob: Buffer, sender_public: PublicIdentity, context: Context) -> bytes:
    """Check a :func:`sign` output and return its payload."""
    expected = canonical_context(context)
    parsed = _parse(blob)
    if parsed.kind != KIND_SIGNED:
        raise IntegrityError(
            "message is sealed (encrypted), not just signed: open it with open_sealed()"
        )
    _check_signature(parsed, sender_public, expected)
    return bytes(parsed.body)


def message_info(blob: Buffer) -> MessageInfo:
    """Read the routing fields (sender key id, context) without verifying anything.

    Lets a server pick the right sender's public key before calling :func:`open_sealed`; the
    values are untrusted until that call succeeds.
    """
    parsed = _parse(blob)
    try:
        context = json.loads(parsed.context_bytes)
    except ValueError:
        raise _malformed("context is not JSON") from None
    if not isinstance(context, dict):
        raise _malformed("context is not a JSON object")
    return MessageInfo(
        kind=_KIND_NAMES[parsed.kind],
        sender_key_id=parsed.sender_key_id,
        recipient_key_id=parsed.recipient_key_id,
        context=context,
    )
