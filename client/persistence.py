"""A client's privacy state on its own disk, so a restarted SuperNode continues its ε.

Flower keeps ``context.state`` in the SuperNode's memory: kill the process and a client's
accountant history would be gone, and its next round would start again from ε = 0 —
understating what the client's data has already paid. With node config ``state-dir`` the
state (accountant history, ledger chain) is written after every round to
``<state-dir>/run-<run-id>.state``: encrypted in an FVD1 container under the client's data key
when it has one, written atomically (temp file + rename), and read back when the client
process starts without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from common.crypto import Identity, decrypt_bytes, encrypt_bytes
from common.crypto.files import write_file_atomic

log = logging.getLogger("fedvault.client")


def state_path(state_dir: str | Path, run_id: int) -> Path:
    return Path(state_dir) / f"run-{run_id}.state"


def save(path: Path, state: dict[str, Any], identity: Identity | None) -> None:
    """Write ``state`` atomically; encrypted when the client has a data key."""
    data = json.dumps(state, sort_keys=True).encode()
    if identity is not None and identity.data_key is not None and identity.ids.data:
        data = encrypt_bytes(data, identity.data_key, identity.ids.data)
    else:
        log.warning("no data key: privacy state in %s is not encrypted (mode 0600)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data)


def load(path: Path, identity: Identity | None) -> dict[str, Any] | None:
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
    return json.loads(data)
