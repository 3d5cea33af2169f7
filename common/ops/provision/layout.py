"""The federation bundle's layout, declared once: every file name and where it lies.

:func:`federation_layout` is the one place that spells a path of the bundle; provisioning
writes to the paths it returns, :func:`common.ops.provision.load_federation` reads them back,
and the start scripts are rendered from bundles rooted at ``$HERE`` (the script's own dir).

Layout of ``out_dir``::

    federation.json                 what was made (non-secret manifest)
    ca/ca.pem  ca/ca.key            the CA; keep ca.key offline, it signs SuperLink certs
    superlink/                      copy to the SuperLink host
        tls/ca.pem tls/superlink.pem tls/superlink.key
        keys/server/                the ServerApp's fedvault identity (private)
        keys/client-<i>/public.json every client's public identity  -> run-config keys-dir
        supernode-keys/client-<i>.pub  SuperNode auth public keys to register
        start-superlink.sh  register-supernodes.sh  flwr.sh
        state/superlink.db  flwr-home/   made by the scripts when they run
    client-<i>/                     copy to client i's machine, and nowhere else
        ca.pem                      the root the SuperNode trusts (--root-certificates)
        supernode-auth.key          OpenSSH EC P-384 private key (0600)
        supernode-auth.pub          its public key (already copied into superlink/)
        identity/                   client i's fedvault identity (key-dir)
        server-public.json          the server's public identity (server-public)
        approved-apps.txt           FAB hashes the holder approved (fedvault fab-hash)
        start-supernode.sh          flower-supernode --isolation process + fedvault clientapp
        state/                      made by start-supernode.sh (node config state-dir)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "APPROVED_APPS",
    "MANIFEST",
    "ClientBundle",
    "Federation",
    "SuperLinkBundle",
    "address",
    "client_bundle",
    "federation_layout",
    "made_paths",
    "superlink_bundle",
]

MANIFEST = "federation.json"
#: Per client: the FAB hashes its holder approved (``fedvault clientapp --approved-fab-hashes``).
APPROVED_APPS = "approved-apps.txt"
CA_DIR = "ca"
SUPERLINK_DIR = "superlink"
#: Made by the start scripts at run time, inside the bundle they start from.
STATE_DIR = "state"
SUPERLINK_DATABASE = "superlink.db"
FLWR_HOME = "flwr-home"


def client_dir_name(partition_id: int) -> str:
    return f"client-{partition_id}"


@dataclass(frozen=True)
class SuperLinkBundle:
    """What the SuperLink host needs (``superlink/``)."""

    directory: Path
    ca_cert: Path
    cert: Path
    key: Path
    keys_dir: Path  # run-config keys-dir: keys/server/ + keys/client-<i>/public.json
    supernode_public_keys: tuple[Path, ...]
    start_script: Path
    register_script: Path
    flwr_script: Path

    @property
    def tls_dir(self) -> Path:
        return self.cert.parent

    @property
    def supernode_keys_dir(self) -> Path:
        return self.directory / "supernode-keys"

    @property
    def database(self) -> Path:
        return self.directory / STATE_DIR / SUPERLINK_DATABASE

    @property
    def flwr_home(self) -> Path:
        return self.directory / FLWR_HOME


@dataclass(frozen=True)
class ClientBundle:
    """What client ``partition_id``'s machine needs (``client-<i>/``)."""

    partition_id: int
    directory: Path
    ca_cert: Path
    auth_private_key: Path
    auth_public_key: Path
    identity_dir: Path  # node config key-dir
    server_public: Path  # node config server-public
    start_script: Path
    approved_apps: Path  # fedvault clientapp --approved-fab-hashes

    @property
    def state_dir(self) -> Path:
        return self.directory / STATE_DIR


@dataclass(frozen=True)
class Federation:
    """Every path :func:`provision_federation` wrote, and where the SuperLink listens."""

    directory: Path
    superlink_host: str
    superlink_port: int
    num_clients: int
    ca_cert: Path
    ca_key: Path
    superlink: SuperLinkBundle
    clients: tuple[ClientBundle, ...] = field(default_factory=tuple)

    @property
    def superlink_address(self) -> str:
        """``host:port`` as SuperNodes and ``flwr`` dial it (IPv6 in brackets)."""
        return address(self.superlink_host, self.superlink_port)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def superlink_bundle(directory: Path, num_clients: int) -> SuperLinkBundle:
    """The SuperLink's bundle rooted at ``directory`` (``out/superlink``, or ``$HERE``)."""
    tls = directory / "tls"
    return SuperLinkBundle(
        directory=directory,
        ca_cert=tls / "ca.pem",
        cert=tls / "superlink.pem",
        key=tls / "superlink.key",
        keys_dir=directory / "keys",
        supernode_public_keys=tuple(
            directory / "supernode-keys" / f"{client_dir_name(i)}.pub" for i in range(num_clients)
        ),
        start_script=directory / "start-superlink.sh",
        register_script=directory / "register-supernodes.sh",
        flwr_script=directory / "flwr.sh",
    )


def client_bundle(directory: Path, partition_id: int) -> ClientBundle:
    """Client ``partition_id``'s bundle rooted at ``directory`` (``out/client-<i>``, or
    ``$HERE``)."""
    return ClientBundle(
        partition_id=partition_id,
        directory=directory,
        ca_cert=directory / "ca.pem",
        auth_private_key=directory / "supernode-auth.key",
        auth_public_key=directory / "supernode-auth.pub",
        identity_dir=directory / "identity",
        server_public=directory / "server-public.json",
        start_script=directory / "start-supernode.sh",
        approved_apps=directory / APPROVED_APPS,
    )


def federation_layout(
    out: Path, superlink_host: str, superlink_port: int, num_clients: int
) -> Federation:
    """Every path of a federation of ``num_clients`` in ``out`` (nothing is read or written)."""
    ca = out / CA_DIR
    return Federation(
        directory=out,
        superlink_host=superlink_host,
        superlink_port=superlink_port,
        num_clients=num_clients,
        ca_cert=ca / "ca.pem",
        ca_key=ca / "ca.key",
        superlink=superlink_bundle(out / SUPERLINK_DIR, num_clients),
        clients=tuple(client_bundle(out / client_dir_name(i), i) for i in range(num_clients)),
    )


def made_paths(out: Path, num_clients: int) -> list[Path]:
    """The top-level entries of ``out`` a federation of ``num_clients`` consists of."""
    return [
        out / MANIFEST,
        out / CA_DIR,
        out / SUPERLINK_DIR,
        *(out / client_dir_name(i) for i in range(num_clients)),
    ]
