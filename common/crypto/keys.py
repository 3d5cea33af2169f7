"""A party's identity: key pairs on disk, with key ids, passphrase protection and no overwrites.

Each party (the server, every client) owns one *key dir*::

    public.json            0644  role, name, key ids, public keys -- hand this to the other side
    x25519_private.pem     0600  X25519 key agreement key (receives sealed updates), PKCS8 PEM
    ed25519_private.pem    0600  Ed25519 signing key (signs what this party sends), PKCS8 PEM
    data_key.json          0600  clients only: the 32-byte key for the client's stored data sets
    passphrase.json        0600  only when protected: scrypt parameters + verifier (no secrets)

Why two key pairs: X25519 for key agreement and Ed25519 for signatures is the standard split
(one key, one purpose); using the same curve point for both is possible but invites
cross-protocol attacks. Why a separate symmetric data key: data at rest is encrypted by the
client for itself, so no key agreement is needed, and the key never leaves the client.

Without a passphrase the PEMs are unencrypted PKCS8 and the data key is stored base64 in
``data_key.json`` -- protected by the 0600 mode only. With a passphrase, the PEMs are PKCS8 with
``BestAvailableEncryption`` and the data key is wrapped with AES-256-GCM, both under keys derived
from one scrypt run (see :mod:`common.crypto.passphrase` for why the PEM password is pre-stretched).

``data_key.json``::

    {"format": "fedvault-data-key", "version": 1, "key_id": "<16 hex>",
     "protection": "none", "key": <base64 32 bytes>}
    {"format": "fedvault-data-key", "version": 1, "key_id": "<16 hex>",
     "protection": "passphrase", "nonce": <base64 12 bytes>,
     "wrapped_key": <base64 48 bytes: AES-256-GCM(wrap key, nonce, key,
                     aad=b"fedvault-data-key v1 " + key_id)>}

``public.json``::

    {"format": "fedvault-public-identity", "version": 1, "role": "client", "name": "c0",
     "x25519": {"key_id": "<16 hex>", "public_key": <base64 32 bytes>},
     "ed25519": {"key_id": "<16 hex>", "public_key": <base64 32 bytes>}}
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.files import PRIVATE_MODE, PUBLIC_MODE, read_json_object, write_file_atomic

from .errors import KeyExistsError, MalformedFileError, WrongKeyError, WrongPassphraseError
from .keyids import DATA_KEY_BYTES, data_key_id, public_key_id
from .passphrase import KdfParams, MasterKey, derive_master, new_params

__all__ = [
    "DATA_KEY_FILE",
    "ED25519_FILE",
    "PASSPHRASE_FILE",
    "PUBLIC_FILE",
    "X25519_FILE",
    "Identity",
    "KeyIds",
    "PublicIdentity",
    "Role",
    "fingerprints",
    "init_identity",
    "load_identity",
    "load_public",
    "signature_valid",
]

log = logging.getLogger(__name__)

Role = Literal["server", "client"]
ROLES: tuple[str, ...] = ("server", "client")

PUBLIC_FILE = "public.json"
X25519_FILE = "x25519_private.pem"
ED25519_FILE = "ed25519_private.pem"
DATA_KEY_FILE = "data_key.json"
PASSPHRASE_FILE = "passphrase.json"
_ALL_FILES = (PUBLIC_FILE, X25519_FILE, ED25519_FILE, DATA_KEY_FILE, PASSPHRASE_FILE)

PUBLIC_FORMAT = "fedvault-public-identity"
DATA_KEY_FORMAT = "fedvault-data-key"
FORMAT_VERSION = 1
_WRAP_AAD_PREFIX = b"fedvault-data-key v1 "
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, length: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != length:
        raise ValueError(f"{what} is {len(raw)} bytes, expected {length}")
    return raw


# --------------------------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True)
class KeyIds:
    """Key ids (16 hex chars, see :mod:`common.crypto.keyids`) of one party's keys."""

    x25519: str
    ed25519: str
    data: str | None = None


@dataclass(frozen=True)
class PublicIdentity:
    """What one party knows about another: public keys only, safe to copy around."""

    role: str
    name: str
    x25519_public: X25519PublicKey
    ed25519_public: Ed25519PublicKey
    ids: KeyIds

    def to_dict(self) -> dict[str, Any]:
        """The ``public.json`` document."""
        return {
            "format": PUBLIC_FORMAT,
            "version": FORMAT_VERSION,
            "role": self.role,
            "name": self.name,
            "x25519": {
                "key_id": self.ids.x25519,
                "public_key": _b64(self.x25519_public.public_bytes(*_RAW)),
            },
            "ed25519": {
                "key_id": self.ids.ed25519,
                "public_key": _b64(self.ed25519_public.public_bytes(*_RAW)),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PublicIdentity:
        """Parse and cross-check a ``public.json`` document; ``ValueError`` says what is wrong."""
        if not isinstance(data, dict) or data.get("format") != PUBLIC_FORMAT:
            raise ValueError(f"not a {PUBLIC_FORMAT} document")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        role, name = data.get("role"), data.get("name")
        if role not in ROLES or not isinstance(name, str) or not name:
            raise ValueError("role or name missing or invalid")
        keys = {}
        for algo in ("x25519", "ed25519"):
            entry = data.get(algo)
            if not isinstance(entry, dict):
                raise ValueError(f"{algo} entry missing")
            raw = _unb64(entry.get("public_key"), 32, f"{algo} public key")
            if entry.get("key_id") != public_key_id(raw):
                raise ValueError(f"{algo} key id does not match its public key")
            keys[algo] = raw
        return cls(
            role=role,
            name=name,
            x25519_public=X25519PublicKey.from_public_bytes(keys["x25519"]),
            ed25519_public=Ed25519PublicKey.from_public_bytes(keys["ed25519"]),
            ids=KeyIds(public_key_id(keys["x25519"]), public_key_id(keys["ed25519"])),
        )


@dataclass(frozen=True, eq=False)
class Identity:
    """A party's own keys, loaded into memory. ``data_key`` is ``None`` for the server."""

    role: str
    name: str
    x25519_private: X25519PrivateKey
    ed25519_private: Ed25519PrivateKey
    data_key: bytes | None = field(repr=False)
    ids: KeyIds
    directory: Path | None = None

    @property
    def public(self) -> PublicIdentity:
        """The matching :class:`PublicIdentity` (what ``public.json`` holds)."""
        return PublicIdentity(
            role=self.role,
            name=self.name,
            x25519_public=self.x25519_private.public_key(),
            ed25519_public=self.ed25519_private.public_key(),
            ids=KeyIds(self.ids.x25519, self.ids.ed25519),
        )

    @property
    def label(self) -> str:
        """How error messages refer to this identity's keys, e.g. ``key dir 'keys/c0'``."""
        return f"key dir '{self.directory}'" if self.directory else f"{self.role} '{self.name}'"

    def sign(self, message: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature of ``message`` by this identity's signing key.

        A detached signature: the caller frames ``message`` (a label of its own first, so the
        signature is never valid in another protocol); :func:`signature_valid` checks it.
        """
        return self.ed25519_private.sign(message)


def signature_valid(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s raw Ed25519 signature over ``message``
    (what :meth:`Identity.sign` makes); anything but 64 bytes is simply not valid."""
    if len(signature) != 64:
        return False
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------------------------
# creating


def _check_args(role: str, name: str, passphrase: bytes | None) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > 128:
        raise ValueError(f"name must be 1-128 printable characters, got {name!r}")
    if passphrase is not None and (not isinstance(passphrase, bytes) or not passphrase):
        raise ValueError("passphrase must be non-empty bytes, or None for an unprotected key dir")


def _private_pem(key: X25519PrivateKey | Ed25519PrivateKey, master: MasterKey | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(master.pem_password())
        if master
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _data_key_doc(data_key: bytes, key_id: str, master: MasterKey | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": DATA_KEY_FORMAT, "version": FORMAT_VERSION, "key_id": key_id}
    if master is None:
        doc.update(protection="none", key=_b64(data_key))
    else:
        nonce = os.urandom(12)
        wrapped = AESGCM(master.wrap_key()).encrypt(
            nonce, data_key, _WRAP_AAD_PREFIX + key_id.encode()
        )
        doc.update(protection="passphrase", nonce=_b64(nonce), wrapped_key=_b64(wrapped))
    return doc


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8")


def init_identity(
    out_dir: str | os.PathLike[str],
    role: Role,
    name: str,
    passphrase: bytes | None = None,
    force: bool = False,
) -> Identity:
    """Create a new key dir for a ``"server"`` or ``"client"`` named ``name``.

    Refuses (``KeyExistsError``) if ``out_dir`` already holds any key file, unless ``force``:
    replacing keys makes everything sealed to or encrypted with the old ones unreadable.
    """
    _check_args(role, name, passphrase)
    directory = Path(out_dir)
    existing = [f for f in _ALL_FILES if (directory / f).exists()]
    if existing and not force:
        raise KeyExistsError(
            f"key dir '{directory}' already holds keys ({', '.join(existing)}): use another dir,"
            " or pass --force to replace them (data encrypted for the old keys becomes unreadable)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    kdf: KdfParams | None = None
    master: MasterKey | None = None
    if passphrase is not None:
        kdf, master = new_params(passphrase)
    x_priv = X25519PrivateKey.generate()
    e_priv = Ed25519PrivateKey.generate()
    data_key = os.urandom(DATA_KEY_BYTES) if role == "client" else None
    ids = KeyIds(
        x25519=public_key_id(x_priv.public_key().public_bytes(*_RAW)),
        ed25519=public_key_id(e_priv.public_key().public_bytes(*_RAW)),
        data=data_key_id(data_key) if data_key else None,
    )

    # Stale files from a forced re-init must not survive (e.g. an old data key next to new keys).
    for stale in existing:
        (directory / stale).unlink()
    if kdf is not None:
        kdf_doc = _json_bytes(kdf.to_dict())
        write_file_atomic(directory / PASSPHRASE_FILE, kdf_doc, mode=PRIVATE_MODE)
    write_file_atomic(directory / X25519_FILE, _private_pem(x_priv, master), mode=PRIVATE_MODE)
    write_file_atomic(directory / ED25519_FILE, _private_pem(e_priv, master), mode=PRIVATE_MODE)
    if data_key is not None and ids.data is not None:
        doc = _data_key_doc(data_key, ids.data, master)
        write_file_atomic(directory / DATA_KEY_FILE, _json_bytes(doc), mode=PRIVATE_MODE)
    identity = Identity(role, name, x_priv, e_priv, data_key, ids, directory)
    # public.json last: its presence marks a complete key dir.
    write_file_atomic(
        directory / PUBLIC_FILE, _json_bytes(identity.public.to_dict()), mode=PUBLIC_MODE
    )
    log.info(
        "created %s identity %r in %s (x25519 %s, ed25519 %s, data key %s, passphrase: %s)",
        role,
        name,
        directory,
        ids.x25519,
        ids.ed25519,
        ids.data,
        passphrase is not None,
    )
    return identity


# --------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    return read_json_object(path, what=what, fix=fix, error=MalformedFileError)


def _public_path(path_or_dir: str | os.PathLike[str]) -> Path:
    path = Path(path_or_dir)
    return path / PUBLIC_FILE if path.is_dir() else path


def load_public(path_or_dir: str | os.PathLike[str]) -> PublicIdentity:
    """Load another party's ``public.json`` (given directly or as the key dir holding it)."""
    path = _public_path(path_or_dir)
    if not path.is_file():
        raise WrongKeyError(
            f"no public key file at '{path}': pass the public.json (or key dir) that the other"
            " party exported with `keys init`"
        )
    fix = "ask its owner for a fresh copy of public.json (or re-create the key dir)"
    data = _read_json(path, "public key file", fix)
    try:
        return PublicIdentity.from_dict(data)
    except ValueError as exc:
        raise MalformedFileError(f"public key file '{path}' is invalid ({exc}): {fix}") from None


def _check_private_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "private key file %s has mode %o, readable by others: run chmod 600 on it", path, mode
        )


def _passphrase_master(directory: Path, passphrase: bytes | None) -> MasterKey | None:
    kdf_path = directory / PASSPHRASE_FILE
    protected = kdf_path.exists()
    if protected and passphrase is None:
        raise WrongPassphraseError(
            f"key dir '{directory}' is passphrase-protected and no passphrase was given:"
            " supply the passphrase it was created with"
        )
    if not protected:
        if passphrase is not None:
            raise WrongPassphraseError(
                f"key dir '{directory}' is not passphrase-protected but a passphrase was given:"
                " omit the passphrase (or re-create the key dir with one, using --force)"
            )
        return None
    assert passphrase is not None
    fix = "restore the key dir from a backup"
    try:
        params = KdfParams.from_dict(_read_json(kdf_path, "passphrase file", fix))
    except ValueError as exc:
        raise MalformedFileError(
            f"passphrase file '{kdf_path}' is invalid ({exc}): {fix}"
        ) from None
    master = derive_master(passphrase, params)
    if not master.matches(params):
        raise WrongPassphraseError(
            f"wrong passphrase for key dir '{directory}': retry with the passphrase it was"
            " created with"
        )
    return master


def _load_private_pem(path: Path, master: MasterKey | None) -> Any:
    fix = "restore the key dir from a backup (or re-create it with --force)"
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise WrongKeyError(
            f"key dir '{path.parent}' has no {path.name} (it holds public keys only?): pass the"
            " key dir that has the private keys"
        ) from None
    _check_private_mode(path)
    try:
        return serialization.load_pem_private_key(
            pem, password=master.pem_password() if master else None
        )
    except TypeError:
        # Encrypted PEM in an unprotected dir or vice versa: passphrase.json was lost or added.
        raise WrongPassphraseError(
            f"private key '{path}' does not match the key dir's passphrase setting"
            f" ({PASSPHRASE_FILE} missing or foreign): {fix}"
        ) from None
    except ValueError:
        raise MalformedFileError(f"private key '{path}' cannot be decoded: {fix}") from None


def _load_data_key(directory: Path, master: MasterKey | None) -> tuple[bytes, str]:
    path = directory / DATA_KEY_FILE
    fix = "restore the key dir from a backup (data encrypted under this key needs the original)"
    if not path.exists():
        raise WrongKeyError(
            f"client key dir '{directory}' has no {DATA_KEY_FILE}: pass the client key dir that"
            " holds its data key"
        )
    _check_private_mode(path)
    doc = _read_json(path, "data key file", fix)
    key_id = doc.get("key_id")
    protection = doc.get("protection")
    if doc.get("format") != DATA_KEY_FORMAT or doc.get("version") != FORMAT_VERSION:
        raise MalformedFileError(f"data key file '{path}' has an unknown format: {fix}")
    try:
        if protection == "none":
            if master is not None:
                raise ValueError("stored unprotected in a passphrase-protected key dir")
            key = _unb64(doc.get("key"), DATA_KEY_BYTES, "key")
        elif protection == "passphrase":
            if master is None:
                raise ValueError("passphrase-protected but the key dir has no passphrase.json")
            nonce = _unb64(doc.get("nonce"), 12, "nonce")
            wrapped = _unb64(doc.get("wrapped_key"), DATA_KEY_BYTES + 16, "wrapped_key")
            aad = _WRAP_AAD_PREFIX + str(key_id).encode()
            try:
                key = AESGCM(master.wrap_key()).decrypt(nonce, wrapped, aad)
            except InvalidTag:
                raise ValueError("wrapped key failed authentication (altered file)") from None
        else:
            raise ValueError(f"unknown protection {protection!r}")
    except ValueError as exc:
        raise MalformedFileError(f"data key file '{path}' is invalid: {exc}; {fix}") from None
    if data_key_id(key) != key_id:
        raise MalformedFileError(
            f"data key file '{path}' holds a key whose id is not the recorded {key_id}: {fix}"
        )
    return key, data_key_id(key)


def load_identity(directory: str | os.PathLike[str], passphrase: bytes | None = None) -> Identity:
    """Load a key dir created by :func:`init_identity`, checking that all parts belong together."""
    key_dir = Path(directory)
    if not (key_dir / PUBLIC_FILE).is_file():
        raise WrongKeyError(
            f"'{key_dir}' is not a fedvault key dir (no {PUBLIC_FILE}): pass the dir created by"
            " `keys init`"
        )
    public = load_public(key_dir / PUBLIC_FILE)
    master = _passphrase_master(key_dir, passphrase)
    x_priv = _load_private_pem(key_dir / X25519_FILE, master)
    e_priv = _load_private_pem(key_dir / ED25519_FILE, master)
    fix = "restore the key dir from a backup; do not mix files from different key dirs"
    if not isinstance(x_priv, X25519PrivateKey) or not isinstance(e_priv, Ed25519PrivateKey):
        raise MalformedFileError(f"key dir '{key_dir}' holds keys of the wrong type: {fix}")
    if (
        public_key_id(x_priv.public_key().public_bytes(*_RAW)) != public.ids.x25519
        or public_key_id(e_priv.public_key().public_bytes(*_RAW)) != public.ids.ed25519
    ):
        raise MalformedFileError(
            f"private keys in key dir '{key_dir}' do not match its {PUBLIC_FILE}: {fix}"
        )
    data_key, data_id = _load_data_key(key_dir, master) if public.role == "client" else (None, None)
    ids = KeyIds(public.ids.x25519, public.ids.ed25519, data_id)
    log.debug("loaded %s identity %r from %s", public.role, public.name, key_dir)
    return Identity(public.role, public.name, x_priv, e_priv, data_key, ids, key_dir)


def fingerprints(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Key ids and public keys of a key dir, for ``keys show``; needs no passphrase.

    The data key id is read from ``data_key.json``'s clear-text metadata (it is only verified
    against the key itself when the identity is loaded).
    """
    key_dir = Path(directory)
    public = load_public(key_dir)
    data_id: str | None = None
    data_path = key_dir / DATA_KEY_FILE
    if key_dir.is_dir() and data_path.exists():
        doc = _read_json(data_path, "data key file", "restore the key dir from a backup")
        data_id = str(doc.get("key_id")) if doc.get("key_id") else None
    return {
        "directory": str(key_dir),
        "role": public.role,
        "name": public.name,
        "x25519_key_id": public.ids.x25519,
        "ed25519_key_id": public.ids.ed25519,
        "data_key_id": data_id,
        "passphrase_protected": key_dir.is_dir() and (key_dir / PASSPHRASE_FILE).exists(),
        "x25519_public_key": public.to_dict()["x25519"]["public_key"],
        "ed25519_public_key": public.to_dict()["ed25519"]["public_key"],
    }
