"""Clients' public signing keys for the audit: which key ids may sign which client's ledger.

Only ``role = "client"`` identities are accepted. The server stores the ledger; if its own key
counted as a known signer it could rewrite a whole chain and sign it itself. A key named
``client-<i>`` (as :mod:`common.federation_keys` names them) is also bound to partition ``i``,
so client 3's key cannot vouch for client 5's chain.

Keys found in ``<run_dir>/keys`` were put there by the server; an auditor who does not trust
the server passes the clients' ``public.json`` files obtained from the clients themselves.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger("fedvault.audit.keys")

_CLIENT_NAME = re.compile(r"client-(\d+)")


@dataclass
class ClientKeys:
    """Ed25519 public keys by key id, and the partition each is bound to (when known)."""

    by_id: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    source: str = ""
    names: dict[str, str] = field(default_factory=dict)  # key id → the identity's name
    # who supplied them: "auditor" (independent of the server) or "server" (RUN_DIR/keys)
    origin: str = "auditor"

    @classmethod
    def from_mapping(
        cls,
        keys: Mapping[str, Ed25519PublicKey],
        source: str,
        partition_of: Mapping[str, int] | None = None,
    ) -> ClientKeys:
        return cls(by_id=dict(keys), source=source, partition_of=dict(partition_of or {}))

    def describe(self, key_id: str) -> str:
        """``client 3`` for a key bound to partition 3, else its name or id."""
        if key_id in self.partition_of:
            return f"client {self.partition_of[key_id]}"
        return f"client {self.names.get(key_id) or key_id}"


def load_client_keys(path: str | os.PathLike[str], origin: str = "auditor") -> ClientKeys:
    """Client keys from a ``public.json``, a dir of ``*.json`` files, or a dir of key dirs.

    Unreadable files are recorded in ``problems`` (the audit reports them) rather than
    raised: one bad file must not hide the verdict on every other client.
    """
    from common.crypto import CryptoError, load_public

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no public keys at '{root}': pass a dir of clients' public.json")
    if root.is_file():
        files = [root]
    else:
        files = sorted({*root.glob("*.json"), *root.glob("*/public.json")})
    keys = ClientKeys(source=str(root), origin=origin)
    for file in files:
        try:
            public = load_public(file)
        except CryptoError as err:
            keys.problems.append(f"public key file {file} ignored: {err}")
            continue
        if public.role != "client":
            log.info("ignoring %s key %s (%s): only client keys sign ledgers", public.role,
                     public.ids.ed25519, file)  # fmt: skip
            continue
        key_id = public.ids.ed25519
        keys.by_id[key_id] = public.ed25519_public
        keys.names[key_id] = public.name
        partition = _partition(public.name, file)
        if partition is not None:
            keys.partition_of[key_id] = partition
    return keys


def _partition(name: str, file: Path) -> int | None:
    for candidate in (name, file.parent.name, file.stem):
        match = _CLIENT_NAME.fullmatch(candidate)
        if match:
            return int(match.group(1))
    return None
