"""Key identifiers: short, stable names for keys that can be printed, logged and compared.

A key id is the first 16 hex characters (64 bits) of a SHA-256 digest. That is plenty to tell the
handful of keys in one federation apart and to catch "wrong key" mistakes before any decryption;
it is *not* a security boundary (authentication is always done by the AEAD tag or signature).

* Public keys: ``sha256(raw public key bytes)``. Anyone holding the public key can recompute it,
  which is exactly what lets both sides check they are talking about the same key.
* The symmetric data key: ``sha256(DATA_KEY_ID_LABEL || key)``. The fixed label separates this
  use of the hash from any other hash of the key, and 64 bits of a hash of a 256-bit random secret
  reveal nothing usable about it, so the id may be stored in clear in every encrypted file header.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "DATA_KEY_BYTES",
    "DATA_KEY_ID_LABEL",
    "KEY_ID_BYTES",
    "check_key_id",
    "data_key_id",
    "key_id_from_bytes",
    "key_id_to_bytes",
    "public_key_id",
]

KEY_ID_BYTES = 8  # 16 hex characters
DATA_KEY_ID_LABEL = b"fedvault data key id v1\x00"
DATA_KEY_BYTES = 32

_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def public_key_id(raw_public_key: bytes) -> str:
    """Key id of a raw (32-byte X25519 or Ed25519) public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[: 2 * KEY_ID_BYTES]


def data_key_id(data_key: bytes) -> str:
    """Key id of a symmetric data key; safe to publish (see the module docstring)."""
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes, got {len(data_key)}")
    return hashlib.sha256(DATA_KEY_ID_LABEL + bytes(data_key)).hexdigest()[: 2 * KEY_ID_BYTES]


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is 16 lowercase hex characters, else raise ``ValueError``."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError(f"a key id is 16 lowercase hex characters, got {key_id!r}")
    return key_id


def key_id_to_bytes(key_id: str) -> bytes:
    """The 8 raw bytes stored in binary headers."""
    return bytes.fromhex(check_key_id(key_id))


def key_id_from_bytes(raw: bytes) -> str:
    """Inverse of :func:`key_id_to_bytes`."""
    if len(raw) != KEY_ID_BYTES:
        raise ValueError(f"a raw key id is {KEY_ID_BYTES} bytes, got {len(raw)}")
    return bytes(raw).hex()
