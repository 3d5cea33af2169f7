"""Which keys this client uses: node config first (deployment), else the run's keys-dir.

Deployment: the SuperNode's ``--node-config`` gives ``key-dir`` (this client's own identity)
and ``server-public`` (the server's public.json). Simulation: the run config's ``keys-dir``
holds ``client-<partition>/`` and ``server/`` (see :mod:`common.federation_keys`).
Loaded once per process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from common.config import ConfigError, RunConfig
from common.crypto import Identity, PublicIdentity, load_public
from common.federation_keys import client_dir, load_own, server_dir


def _keys_dir(cfg: RunConfig, needed_for: str) -> Path:
    if not cfg.keys_dir:
        raise ConfigError(
            f"{needed_for} needs keys: set run-config keys-dir, or node config key-dir and "
            "server-public"
        )
    return Path(cfg.keys_dir)


def own_identity(cfg: RunConfig, context: Context, partition_id: int, needed_for: str) -> Identity:
    path = context.node_config.get("key-dir") or client_dir(
        _keys_dir(cfg, needed_for), partition_id
    )
    return _identity(str(path))


def server_public(cfg: RunConfig, context: Context, needed_for: str) -> PublicIdentity:
    path = context.node_config.get("server-public") or (
        server_dir(_keys_dir(cfg, needed_for)) / "public.json"
    )
    return _public(str(path))


@lru_cache(maxsize=16)
def _identity(path: str) -> Identity:
    return load_own(path)


@lru_cache(maxsize=16)
def _public(path: str) -> PublicIdentity:
    return load_public(Path(path))
