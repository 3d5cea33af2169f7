"""A holder's privacy state on its own disk, so no restart and no new run resets its ε.

Flower keeps ``context.state`` in the SuperNode's memory and per run: a killed process or a
new run would start again from ε = 0, understating what the holder's data has already paid.
The state (lifetime accountant history, ledger chain; see :mod:`client.privacy_session`) is
written after every round, encrypted in an FVD1 container under the holder's data key when
it has one, atomically (temp file + rename), and read before the next.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.crypto import Identity, decrypt_bytes, encrypt_bytes
from common.files import write_file_atomic

log = logging.getLogger("fedvault.client")


def save(path: Path, state: str, identity: Identity | None) -> None:
    """Write ``state`` atomically; encrypted when the client has a data key."""
    data = state.encode()
    if identity is not None and identity.data_key is not None and identity.ids.data:
        data = encrypt_bytes(data, identity.data_key, identity.ids.data)
    else:
        log.warning("no data key: privacy state in %s is not encrypted (mode 0600)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data)


def load(path: Path, identity: Identity | None) -> str | None:
    """The saved state, or None when there is none. Tampering or a wrong key raises."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if data[:4] == b"FVD1":
        if identity is None or identity.data_key is None or not identity.ids.data:
            raise ValueError(
                f"{path} is encrypted but this client has no data key: set node config key-dir"
            )
        data = decrypt_bytes(data, identity.data_key, identity.ids.data, source=str(path))
    return data.decode()
