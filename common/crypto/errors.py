"""Errors raised by :mod:`common.crypto`.

Every error here is a *user* error: the CLI prints ``str(err)`` and exits without a traceback, so
each message is a single line that names what went wrong **and** what to do about it. Anything
that is a programming mistake (wrong argument type, key of the wrong length) raises the usual
``TypeError``/``ValueError`` instead, so it is not swallowed by a ``except CryptoError``.

Hierarchy::

    CryptoError
    ├── WrongPassphraseError   passphrase wrong, missing, or given for an unprotected key dir
    ├── WrongKeyError          data encrypted/sealed for a different key (key id mismatch)
    ├── IntegrityError         tampered, truncated, reordered, replayed or mis-signed data
    │   └── MalformedFileError not a fedvault file / unsupported version / unparsable
    └── KeyExistsError         refusing to overwrite an existing key without force

``MalformedFileError`` is an ``IntegrityError`` on purpose: a caller that wants to know "can I
trust these bytes?" catches ``IntegrityError`` and does not have to care whether the damage hit a
length field (unparsable) or a ciphertext byte (authentication failure).
"""

from __future__ import annotations

__all__ = [
    "CryptoError",
    "IntegrityError",
    "KeyExistsError",
    "MalformedFileError",
    "WrongKeyError",
    "WrongPassphraseError",
]


class CryptoError(Exception):
    """Base class: user-supplied input was refused; the message says how to fix it."""

    def __init__(self, message: str) -> None:
        # One line only: the CLI prints str(err) as-is and log lines must stay greppable.
        super().__init__(" ".join(message.split()))


class WrongPassphraseError(CryptoError):
    """The passphrase does not open the key dir (wrong, missing, or given where none is needed)."""


class WrongKeyError(CryptoError):
    """Data was encrypted for another key than the one supplied (detected through the key id)."""


class IntegrityError(CryptoError):
    """Data failed authentication: altered, truncated, reordered, replayed, or signed by another."""


class MalformedFileError(IntegrityError):
    """A file is not in a format this version understands, or its structure is broken."""


class KeyExistsError(CryptoError):
    """A key would be overwritten; keys are never replaced unless the caller forces it."""
