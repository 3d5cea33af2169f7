"""Passphrase stretching for a key dir: one scrypt run, several independent sub-keys.

Why not just ``serialization.BestAvailableEncryption(passphrase)``: for PKCS8 PEM, cryptography
(50.x) uses PBES2 with PBKDF2-HMAC-SHA256 at only 2048 iterations -- a few microseconds per guess,
so an offline attacker would attack the PEM files rather than anything slower. Instead the
passphrase is stretched once with scrypt (memory-hard; ~0.1 s, 32 MiB at the defaults) and HKDF
turns the result into:

* the *password* handed to ``BestAvailableEncryption`` for both private-key PEMs (so every guess
  against a PEM costs a full scrypt first);
* the AES-256-GCM key that wraps the client's data key;
* a 16-byte verifier stored next to the scrypt parameters, so a wrong passphrase is reported as
  such instead of as a corrupt PEM. It gives an attacker nothing the PEM would not: each check
  still costs one scrypt.

The PEMs stay standard PKCS8; to open one with another tool, derive its password with
:meth:`MasterKey.pem_password` first.

``passphrase.json`` (present only in protected key dirs)::

    {"format": "fedvault-passphrase-kdf", "version": 1, "kdf": "scrypt",
     "salt": <base64, 16 bytes>, "n": 32768, "r": 8, "p": 1, "verifier": <base64, 16 bytes>}
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "KdfParams",
    "MasterKey",
    "derive_master",
    "new_params",
]

FORMAT = "fedvault-passphrase-kdf"
VERSION = 1
DEFAULT_N = 2**15
DEFAULT_R = 8
DEFAULT_P = 1
# Refuse parameters that would make loading a tampered file take minutes or gigabytes.
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
SALT_BYTES = 16
VERIFIER_BYTES = 16

_INFO_PEM = b"fedvault key dir v1: pkcs8 password"
_INFO_WRAP = b"fedvault key dir v1: data key wrap"
_INFO_VERIFY = b"fedvault key dir v1: passphrase verifier"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hkdf(master: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


@dataclass(frozen=True)
class KdfParams:
    """Scrypt parameters plus the verifier of the passphrase they were created with."""

    salt: bytes
    n: int = DEFAULT_N
    r: int = DEFAULT_R
    p: int = DEFAULT_P
    verifier: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, written to ``passphrase.json``."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "kdf": "scrypt",
            "salt": _b64(self.salt),
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "verifier": _b64(self.verifier),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KdfParams:
        """Parse ``passphrase.json``; raises ``ValueError`` describing what is wrong."""
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file")
        if data.get("kdf") != "scrypt":
            raise ValueError(f"unknown kdf {data.get('kdf')!r}")
        n, r, p = data.get("n"), data.get("r"), data.get("p")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
            raise ValueError("scrypt parameters n, r, p must be integers")
        assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
        if not (2 <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
            raise ValueError(f"scrypt parameters out of range (n={n}, r={r}, p={p})")
        salt = base64.b64decode(str(data.get("salt", "")), validate=True)
        verifier = base64.b64decode(str(data.get("verifier", "")), validate=True)
        if len(salt) < SALT_BYTES or len(verifier) != VERIFIER_BYTES:
            raise ValueError("salt or verifier has the wrong length")
        return cls(salt=salt, n=n, r=r, p=p, verifier=verifier)


@dataclass(frozen=True)
class MasterKey:
    """The scrypt output for one key dir; the sub-keys are derived from it on demand."""

    secret: bytes

    def pem_password(self) -> bytes:
        """Password for ``BestAvailableEncryption`` / ``load_pem_private_key`` (ASCII)."""
        return base64.b64encode(_hkdf(self.secret, _INFO_PEM))

    def wrap_key(self) -> bytes:
        """AES-256-GCM key that wraps the client's data key."""
        return _hkdf(self.secret, _INFO_WRAP)

    def verifier(self) -> bytes:
        """Value stored in ``passphrase.json`` to recognise the right passphrase."""
        return _hkdf(self.secret, _INFO_VERIFY, VERIFIER_BYTES)

    def matches(self, params: KdfParams) -> bool:
        """Constant-time check of this key against the stored verifier."""
        return hmac.compare_digest(self.verifier(), params.verifier)


def derive_master(passphrase: bytes, params: KdfParams) -> MasterKey:
    """Run scrypt once (the slow, deliberate part)."""
    kdf = Scrypt(salt=params.salt, length=32, n=params.n, r=params.r, p=params.p)
    return MasterKey(kdf.derive(passphrase))


def new_params(passphrase: bytes) -> tuple[KdfParams, MasterKey]:
    """Fresh salt + default cost for a new key dir; returns the params and the derived key."""
    params = KdfParams(salt=os.urandom(SALT_BYTES))
    master = derive_master(passphrase, params)
    return KdfParams(params.salt, params.n, params.r, params.p, master.verifier()), master
