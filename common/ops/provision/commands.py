"""The command lines of a deployed federation, built once as argument lists.

The Python harness (:mod:`common.ops.deploy`) runs these lists; the bundle's start scripts
(:mod:`.scripts`) are rendered from the very same builders, so a flag exists in one place.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from common.files import write_file_atomic

from .layout import ClientBundle, SuperLinkBundle

__all__ = [
    "CONNECTION_NAME",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_RUNTIME_PORT",
    "flwr_config",
    "flwr_config_toml",
    "register_command",
    "superlink_command",
    "supernode_command",
    "supernode_node_config",
    "write_flwr_config",
]

#: Flower 1.41 serves the Fleet, Control and Runtime HTTP APIs on this one port.
DEFAULT_SUPERLINK_PORT = 8000
#: Flower 1.41's default port of a SuperNode's local Runtime HTTP API (ClientApp ↔ SuperNode).
DEFAULT_SUPERNODE_RUNTIME_PORT = 9094
#: The name of the SuperLink connection written into ``$FLWR_HOME/config.toml``.
CONNECTION_NAME = "fedvault"


def superlink_command(
    bundle: SuperLinkBundle,
    *,
    host: str = "0.0.0.0",
    port: int = DEFAULT_SUPERLINK_PORT,
    database: Path | str | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication.

    ``--enable-supernode-auth`` makes the Fleet API accept only SuperNodes whose public
    key was registered (``flwr supernode register``) and refuses self-registration;
    Flower refuses it without TLS. ``--database`` keeps the registrations across restarts
    (in memory they are lost). Runtime dependency installation is off: the SuperLink would
    otherwise try to ``uv sync`` the app's dependencies, which fails offline.
    """
    cmd = [
        "flower-superlink",
        "--ssl-ca-certfile", str(bundle.ca_cert),
        "--ssl-certfile", str(bundle.cert),
        "--ssl-keyfile", str(bundle.key),
        "--enable-supernode-auth",
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_node_config(
    bundle: ClientBundle,
    num_partitions: int,
    state_dir: Path | str | None = None,
    encrypted_data_dir: Path | str | None = None,
) -> str:
    """The ``--node-config`` string the fedvault ClientApp reads (TOML values, quoted);
    ``encrypted_data_dir``: where this holder's own ``partition-<i>.fvd`` is."""
    items: dict[str, object] = {
        "partition-id": bundle.partition_id,
        "num-partitions": num_partitions,
        "key-dir": str(bundle.identity_dir),
        "server-public": str(bundle.server_public),
    }
    if state_dir is not None:
        items["state-dir"] = str(state_dir)
    if encrypted_data_dir is not None:
        items["encrypted-data-dir"] = str(encrypted_data_dir)
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def supernode_command(
    bundle: ClientBundle,
    superlink_address: str,
    num_partitions: int,
    *,
    runtime_port: int | str = DEFAULT_SUPERNODE_RUNTIME_PORT,
    state_dir: Path | str | None = None,
    isolation: str | None = None,
    encrypted_data_dir: Path | str | None = None,
) -> list[str]:
    """``flower-supernode`` over TLS (trusting only the federation's CA), authenticated.

    ``--port`` is the SuperNode's local Runtime API (ClientApp ↔ SuperNode, 127.0.0.1);
    two SuperNodes on one machine need different ports. ``isolation="process"``: the
    SuperNode starts no ClientApp itself; ``fedvault clientapp`` (approved apps only) does.
    """
    extra = [] if isolation is None else ["--isolation", isolation]
    return [
        "flower-supernode",
        "--superlink", superlink_address,
        "--root-certificates", str(bundle.ca_cert),
        "--auth-supernode-private-key", str(bundle.auth_private_key),
        "--node-config",
        supernode_node_config(bundle, num_partitions, state_dir, encrypted_data_dir),
        "--port", str(runtime_port),
        *extra,
    ]  # fmt: skip


def register_command(bundle: SuperLinkBundle, partition_id: int) -> list[str]:
    """``flwr`` arguments registering client ``partition_id``'s SuperNode public key."""
    key = bundle.supernode_public_keys[partition_id]
    name = f"client-{partition_id}"
    return ["supernode", "register", str(key), CONNECTION_NAME, "--name", name]


def flwr_config(address: str, ca_cert: str, name: str = CONNECTION_NAME) -> dict[str, object]:
    """``$FLWR_HOME/config.toml`` as a document: one TLS connection, made the default."""
    return {
        "superlink": {
            "default": name,
            name: {"address": address, "root-certificates": ca_cert},
        }
    }


def flwr_config_toml(address: str, ca_cert: Path | str, name: str = CONNECTION_NAME) -> str:
    """``$FLWR_HOME/config.toml`` with one TLS SuperLink connection, made the default.

    Flower requires ``root-certificates`` to be an absolute path; ``insecure`` is left
    unset (false), so ``flwr`` verifies the SuperLink against the federation's CA only.
    """
    ca = Path(ca_cert).expanduser().resolve()
    return tomli_w.dumps(flwr_config(address, str(ca), name))


def write_flwr_config(
    flwr_home: Path | str, address: str, ca_cert: Path | str, name: str = CONNECTION_NAME
) -> Path:
    """Write :func:`flwr_config_toml` to ``flwr_home/config.toml`` (a private FLWR_HOME)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    write_file_atomic(path, flwr_config_toml(address, ca_cert, name).encode(), mode=0o644)
    return path
