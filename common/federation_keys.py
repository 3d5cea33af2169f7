"""Where a federation's key dirs live, and creating them for a simulation.

Layout of a ``keys-dir``::

    server/            the ServerApp's identity (its public.json goes to every client)
    client-<i>/        client i's identity (holds partition i); its public.json goes to the server

In deployment each party keeps only its own private dir plus the others' ``public.json``
(node config ``key-dir`` and ``server-public`` point at them; see docs/deploy.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.crypto import Identity, PublicIdentity, init_identity, load_identity, load_public

log = logging.getLogger("fedvault.keys")

SERVER = "server"


def client_dir(keys_dir: Path, partition_id: int) -> Path:
    return keys_dir / f"client-{partition_id}"


def server_dir(keys_dir: Path) -> Path:
    return keys_dir / SERVER


def provision(keys_dir: Path, num_clients: int) -> Path:
    """Create the server's and clients 0..n-1's identities; existing ones are kept."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    parties = [(server_dir(keys_dir), "server", SERVER)] + [
        (client_dir(keys_dir, i), "client", f"client-{i}") for i in range(num_clients)
    ]
    created = 0
    for directory, role, name in parties:
        if not (directory / "public.json").exists():
            init_identity(directory, role, name)
            created += 1
    if created:
        log.info("created %d identities in %s", created, keys_dir)
    return keys_dir


def client_publics(keys_dir: Path) -> dict[int, PublicIdentity]:
    """Partition id → that client's public identity, for every ``client-<i>`` dir."""
    publics: dict[int, PublicIdentity] = {}
    for path in sorted(keys_dir.glob("client-*/public.json")):
        suffix = path.parent.name.removeprefix("client-")
        if suffix.isdigit():
            publics[int(suffix)] = load_public(path)
    return publics


def load_own(directory: Path | str) -> Identity:
    """Load this party's identity; a protected key dir takes $FEDVAULT_PASSPHRASE."""
    passphrase = os.environ.get("FEDVAULT_PASSPHRASE")
    return load_identity(Path(directory), passphrase.encode() if passphrase else None)


def describe(identity: Identity) -> str:
    return f"{identity.role} {identity.name!r} (signing key {identity.ids.ed25519})"
