"""Cryptography for fedvault: identities, encrypted data at rest, sealed and signed messages.

Only primitives from the ``cryptography`` package are used. Modules, one job each:

* :mod:`.errors`     -- ``CryptoError`` and its user-facing subclasses (one-line messages)
* :mod:`.keyids`     -- 16-hex-char key ids
* :mod:`.passphrase` -- scrypt stretching of a key dir passphrase
* :mod:`.keys`       -- key dirs: ``init_identity``, ``load_identity``, ``load_public``;
                        detached Ed25519 signatures: ``Identity.sign``, ``signature_valid``
* :mod:`.container`  -- FVD1 encrypted data files (chunked streaming AES-256-GCM)
* :mod:`.sealing`    -- ``seal``/``open_sealed`` (encrypted + signed) and ``sign``/``verify``
"""

from .container import (
    decrypt_bytes,
    decrypt_file,
    decrypt_to_memory,
    encrypt_bytes,
    encrypt_file,
    read_header,
)
from .errors import (
    CryptoError,
    IntegrityError,
    KeyExistsError,
    MalformedFileError,
    WrongKeyError,
    WrongPassphraseError,
)
from .keyids import data_key_id, public_key_id
from .keys import (
    Identity,
    KeyIds,
    PublicIdentity,
    fingerprints,
    init_identity,
    load_identity,
    load_public,
    signature_valid,
)
from .sealing import message_info, open_sealed, seal, sign, verify

__all__ = [
    "CryptoError",
    "Identity",
    "IntegrityError",
    "KeyExistsError",
    "KeyIds",
    "MalformedFileError",
    "PublicIdentity",
    "WrongKeyError",
    "WrongPassphraseError",
    "data_key_id",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_to_memory",
    "encrypt_bytes",
    "encrypt_file",
    "fingerprints",
    "init_identity",
    "load_identity",
    "load_public",
    "message_info",
    "open_sealed",
    "public_key_id",
    "read_header",
    "seal",
    "sign",
    "signature_valid",
    "verify",
]
