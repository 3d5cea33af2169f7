"""Credentials for a deployed federation: one SuperLink, N SuperNodes, all over TLS.

``provision_federation`` creates, with nothing but ``cryptography`` (no ``openssl``):

* a private certificate authority (CA), which is the only root the SuperNodes and the
  ``flwr`` CLI trust: a SuperNode without ``ca.pem`` cannot reach the SuperLink, and a
  man in the middle cannot present a certificate for the SuperLink's name;
* the SuperLink's TLS certificate, signed by that CA, with SANs for the public host name
  (DNS or IP) plus ``localhost``/``127.0.0.1``/``::1`` -- Flower 1.41 serves the Fleet,
  Control and Runtime APIs on one port with one certificate, and the SuperLink's own
  ServerApp process connects back over ``127.0.0.1``;
* fedvault identities (``common.crypto``): the server's, and one per client, in the
  ``keys-dir`` layout of :mod:`common.federation_keys` on the SuperLink side (server key +
  every client's ``public.json``), so ``encrypt-updates = true`` works unchanged;
* per client, a SuperNode authentication key pair in the format Flower 1.41 reads:
  an ECDSA P-384 private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key``) and its OpenSSH public key (``flwr supernode register``);
* ready-to-run shell scripts with the exact flags (``start-superlink.sh``,
  ``register-supernodes.sh``, ``flwr.sh``, ``client-<i>/start-supernode.sh``), which
  resolve paths from their own location so a bundle keeps working after it is copied;
* per client, ``approved-apps.txt``: the FAB hashes (``fedvault fab-hash``) its holder
  approved. ``start-supernode.sh`` runs the SuperNode with ``--isolation process`` and
  ``fedvault clientapp`` (:mod:`common.ops.approved_app`), which starts only ClientApps whose
  FAB hash is in that file -- the holder's list, not the operator's (see docs/deploy.md).

Layout of ``out_dir``::

    federation.json                 what was made (non-secret manifest)
    ca/ca.pem  ca/ca.key            the CA; keep ca.key offline, it signs SuperLink certs
    superlink/                      copy to the SuperLink host
        tls/ca.pem tls/superlink.pem tls/superlink.key
        keys/server/                the ServerApp's fedvault identity (private)
        keys/client-<i>/public.json every client's public identity  -> run-config keys-dir
        supernode-keys/client-<i>.pub  SuperNode auth public keys to register
        start-superlink.sh  register-supernodes.sh  flwr.sh
    client-<i>/                     copy to client i's machine, and nowhere else
        ca.pem                      the root the SuperNode trusts (--root-certificates)
        supernode-auth.key          OpenSSH EC P-384 private key (0600)
        supernode-auth.pub          its public key (already copied into superlink/)
        identity/                   client i's fedvault identity (key-dir)
        server-public.json          the server's public identity (server-public)
        approved-apps.txt           FAB hashes the holder approved (fedvault fab-hash)
        start-supernode.sh          flower-supernode --isolation process + fedvault clientapp

Private keys are written 0600 (atomically, see :mod:`common.crypto.files`); nothing is
overwritten unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError
from common.crypto import init_identity
from common.crypto.errors import KeyExistsError
from common.federation_keys import SERVER, client_dir, server_dir
from common.files import PRIVATE_MODE, PUBLIC_MODE, write_file_atomic
from common.ops.approved_app import check_hash

log = logging.getLogger("fedvault.provision")

__all__ = [
    "APPROVED_APPS",
    "CONNECTION_NAME",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_RUNTIME_PORT",
    "MANIFEST",
    "ClientBundle",
    "Federation",
    "SuperLinkBundle",
    "describe",
    "flwr_config_toml",
    "load_federation",
    "manifest_dict",
    "provision_federation",
    "superlink_command",
    "supernode_command",
    "supernode_node_config",
    "write_approved_apps",
    "write_flwr_config",
]

MANIFEST = "federation.json"
#: Per client: the FAB hashes its holder approved (``fedvault clientapp --approved-fab-hashes``).
APPROVED_APPS = "approved-apps.txt"
MANIFEST_FORMAT = "fedvault-federation"
#: Flower 1.41 serves the Fleet, Control and Runtime HTTP APIs on this one port.
DEFAULT_SUPERLINK_PORT = 8000
#: Flower 1.41's default port of a SuperNode's local Runtime HTTP API (ClientApp ↔ SuperNode).
DEFAULT_SUPERNODE_RUNTIME_PORT = 9094
#: The name of the SuperLink connection written into ``$FLWR_HOME/config.toml``.
CONNECTION_NAME = "fedvault"
CA_DAYS = 3650
LEAF_DAYS = 825  # the usual cap on server certificate lifetimes; re-provision to rotate
_CURVE = ec.SECP384R1  # what Flower generates itself for node auth; fine for TLS too
_LOCAL_NAMES = ("localhost",)
_LOCAL_IPS = ("127.0.0.1", "::1")


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
        return _address(self.superlink_host, self.superlink_port)


# --------------------------------------------------------------------------------------------
# provisioning


def provision_federation(
    out_dir: Path | str,
    superlink_host: str,
    num_clients: int,
    *,
    port: int = DEFAULT_SUPERLINK_PORT,
    extra_hosts: tuple[str, ...] = (),
    force: bool = False,
    approved_apps: tuple[str, ...] = (),
) -> Federation:
    """Create the CA, the SuperLink's TLS and fedvault keys, and one bundle per client.

    ``superlink_host`` is the name or IP address SuperNodes dial; it goes into the
    certificate's SANs (``extra_hosts`` adds more, e.g. a second DNS name). Refuses with
    :class:`KeyExistsError` if ``out_dir`` already holds a federation, unless ``force``:
    replacing the CA locks out every SuperNode holding the old ``ca.pem``.
    ``approved_apps``: FAB hashes written into every client's ``approved-apps.txt`` (a
    proposal: each holder audits the app and keeps or replaces them; empty by default).
    """
    if num_clients < 1:
        raise ConfigError("--clients must be ≥ 1")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    host = _normalise_host(superlink_host)
    approved = tuple(check_hash(h) for h in approved_apps)
    out = Path(out_dir).expanduser().resolve()
    _refuse_overwrite(out, num_clients, force)
    _warn_if_inside_flower_app(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)

    ca_dir, sl_dir = out / "ca", out / "superlink"
    for d in (ca_dir, sl_dir, sl_dir / "tls", sl_dir / "supernode-keys"):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)

    # CA and the SuperLink's certificate.
    ca_key, ca_cert = _make_ca(f"fedvault federation CA ({host})")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_file_atomic(ca_dir / "ca.key", _pem_private(ca_key), mode=PRIVATE_MODE)
    write_file_atomic(ca_dir / "ca.pem", ca_pem, mode=PUBLIC_MODE)
    sans = _dedupe([host, *(_normalise_host(h) for h in extra_hosts), *_LOCAL_NAMES, *_LOCAL_IPS])
    sl_key, sl_cert = _make_server_cert(ca_key, ca_cert, host, sans)
    write_file_atomic(sl_dir / "tls" / "ca.pem", ca_pem, mode=PUBLIC_MODE)
    write_file_atomic(
        sl_dir / "tls" / "superlink.pem",
        sl_cert.public_bytes(serialization.Encoding.PEM),
        mode=PUBLIC_MODE,
    )
    write_file_atomic(sl_dir / "tls" / "superlink.key", _pem_private(sl_key), mode=PRIVATE_MODE)

    # fedvault identities: the server's in the SuperLink's keys-dir.
    keys_dir = sl_dir / "keys"
    keys_dir.mkdir(mode=0o700, exist_ok=True)
    init_identity(server_dir(keys_dir), "server", SERVER, force=force)
    server_public = (server_dir(keys_dir) / "public.json").read_bytes()

    clients = []
    for pid in range(num_clients):
        clients.append(_provision_client(out, pid, ca_pem, server_public, keys_dir, force))
        write_approved_apps(clients[-1].approved_apps, approved)

    pubs = tuple(sl_dir / "supernode-keys" / f"client-{c.partition_id}.pub" for c in clients)
    federation = Federation(
        directory=out,
        superlink_host=host,
        superlink_port=port,
        num_clients=num_clients,
        ca_cert=ca_dir / "ca.pem",
        ca_key=ca_dir / "ca.key",
        superlink=SuperLinkBundle(
            directory=sl_dir,
            ca_cert=sl_dir / "tls" / "ca.pem",
            cert=sl_dir / "tls" / "superlink.pem",
            key=sl_dir / "tls" / "superlink.key",
            keys_dir=keys_dir,
            supernode_public_keys=pubs,
            start_script=sl_dir / "start-superlink.sh",
            register_script=sl_dir / "register-supernodes.sh",
            flwr_script=sl_dir / "flwr.sh",
        ),
        clients=tuple(clients),
    )
    _write_scripts(federation)
    _write_manifest(federation, sans)
    log.info(
        "federation of %d clients in %s: SuperLink %s (SANs %s)",
        num_clients, out, federation.superlink_address, ", ".join(sans),
    )  # fmt: skip
    return federation


def _provision_client(
    out: Path, pid: int, ca_pem: bytes, server_public: bytes, keys_dir: Path, force: bool
) -> ClientBundle:
    """Client ``pid``'s bundle, and its public keys on the SuperLink side."""
    d = out / f"client-{pid}"
    d.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(d / "ca.pem", ca_pem, mode=PUBLIC_MODE)
    write_file_atomic(d / "server-public.json", server_public, mode=PUBLIC_MODE)

    # SuperNode authentication: Flower 1.41 loads the private key with load_ssh_private_key
    # and accepts only EC keys; `flwr supernode register` reads an OpenSSH public key on a
    # NIST curve. P-384 is what Flower's own key generation uses.
    auth_key = ec.generate_private_key(_CURVE())
    private_ssh = auth_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # the SuperNode reads it unattended, with no password
    )
    public_ssh = (
        auth_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" fedvault-client-{pid}\n".encode()
    )
    write_file_atomic(d / "supernode-auth.key", private_ssh, mode=PRIVATE_MODE)
    write_file_atomic(d / "supernode-auth.pub", public_ssh, mode=PUBLIC_MODE)
    sl_pub = out / "superlink" / "supernode-keys" / f"client-{pid}.pub"
    write_file_atomic(sl_pub, public_ssh, mode=PUBLIC_MODE)

    identity = init_identity(d / "identity", "client", f"client-{pid}", force=force)
    server_side = client_dir(keys_dir, pid)
    server_side.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(
        server_side / "public.json",
        (identity.directory / "public.json").read_bytes(),
        mode=PUBLIC_MODE,
    )
    return ClientBundle(
        partition_id=pid,
        directory=d,
        ca_cert=d / "ca.pem",
        auth_private_key=d / "supernode-auth.key",
        auth_public_key=d / "supernode-auth.pub",
        identity_dir=d / "identity",
        server_public=d / "server-public.json",
        start_script=d / "start-supernode.sh",
        approved_apps=d / APPROVED_APPS,
    )


def _refuse_overwrite(out: Path, num_clients: int, force: bool) -> None:
    """Keys are never replaced by accident. With ``force`` what the previous provisioning
    made (per its manifest) is deleted first -- and nothing else, ever."""
    manifest = out / MANIFEST
    made: list[Path] = []
    if manifest.exists():
        made = [manifest, out / "ca", out / "superlink"]
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
            made += [out / f"client-{i}" for i in range(int(old.get("num_clients", 0)))]
        except (ValueError, TypeError):
            pass
    wanted = [manifest, out / "ca", out / "superlink"]
    wanted += [out / f"client-{i}" for i in range(num_clients)]
    existing = [p for p in dict.fromkeys([*made, *wanted]) if p.exists()]
    if not existing:
        return
    if not force:
        names = ", ".join(sorted(p.name for p in existing))
        raise KeyExistsError(
            f"'{out}' already holds a federation ({names}): use another dir, or pass --force "
            "to replace it (every SuperNode then needs its new bundle)"
        )
    foreign = [p for p in existing if p not in made]
    if foreign:
        raise KeyExistsError(
            f"'{out}' holds {', '.join(p.name for p in foreign)}, which no {MANIFEST} says "
            "fedvault made: not replacing it; choose an empty dir"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    log.warning("replaced the federation in %s (old CA and keys deleted)", out)


def _warn_if_inside_flower_app(out: Path) -> None:
    """``flwr run .`` packs every *.json/*.toml under the app dir into the FAB it ships to
    all SuperNodes -- ``data_key.json`` included -- unless .gitignore excludes it."""
    for parent in out.parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.exists() and "[tool.flwr" in pyproject.read_text(encoding="utf-8"):
            rel = out.relative_to(parent).as_posix()
            ignore = parent / ".gitignore"
            lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.exists() else []
            first = rel.split("/", 1)[0]
            if not {f"{first}/", first, f"/{first}/", f"/{first}"} & {s.strip() for s in lines}:
                log.warning(
                    "%s is inside the Flower app %s and not in its .gitignore: `flwr run .` "
                    "would pack its *.json files (client data keys!) into the app it ships; "
                    "add '%s/' to .gitignore or provision elsewhere",
                    out, parent, first,
                )  # fmt: skip
            return


# --------------------------------------------------------------------------------------------
# X.509


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvault"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        # path_length=0: this CA signs server certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str, sans: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvault"),
                    x509.NameAttribute(NameOID.COMMON_NAME, host[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _normalise_host(host: str) -> str:
    """A bare host name or IP (no port, no brackets, no scheme); IPs in canonical form."""
    h = host.strip()
    if not h or "://" in h or "/" in h or " " in h:
        raise ConfigError(f"{host!r} is not a host name or IP address (no scheme, no path)")
    h = h.removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if ":" in h:
        raise ConfigError(f"{host!r}: give the host without a port (pass the port separately)")
    return h.lower().rstrip(".")


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS8: flower-superlink hands the key file to uvicorn, which has no
    # password prompt; the 0600 mode is the protection (as for the SuperNode key).
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------
# commands


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
    bundle: ClientBundle, num_partitions: int, state_dir: Path | str | None = None
) -> str:
    """The ``--node-config`` string the fedvault ClientApp reads (TOML values, quoted)."""
    items = {
        "partition-id": bundle.partition_id,
        "num-partitions": num_partitions,
        "key-dir": str(bundle.identity_dir),
        "server-public": str(bundle.server_public),
    }
    if state_dir is not None:
        items["state-dir"] = str(state_dir)
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def supernode_command(
    bundle: ClientBundle,
    superlink_address: str,
    num_partitions: int,
    *,
    runtime_port: int = DEFAULT_SUPERNODE_RUNTIME_PORT,
    state_dir: Path | str | None = None,
    isolation: str | None = None,
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
        "--node-config", supernode_node_config(bundle, num_partitions, state_dir),
        "--port", str(runtime_port),
        *extra,
    ]  # fmt: skip


def write_approved_apps(path: Path | str, hashes: tuple[str, ...] = ()) -> Path:
    """A client's ``approved-apps.txt``: what it is, how to fill it, and ``hashes``."""
    header = (
        "# FAB hashes (SHA-256) of the ClientApps this node's holder approved, one a line.\n"
        "# start-supernode.sh runs `fedvault clientapp`, which starts only these apps and\n"
        "# refuses every other run. Audit the app's source, then add the output of\n"
        "#   fedvault fab-hash <app dir>\n"
        "# (the same source tree the operator runs `flwr run <app dir>` from).\n"
    )
    target = Path(path)
    body = header + "".join(f"{check_hash(h)}\n" for h in hashes)
    write_file_atomic(target, body.encode(), mode=PUBLIC_MODE)
    return target


def flwr_config_toml(address: str, ca_cert: Path | str, name: str = CONNECTION_NAME) -> str:
    """``$FLWR_HOME/config.toml`` with one TLS SuperLink connection, made the default.

    Flower requires ``root-certificates`` to be an absolute path; ``insecure`` is left
    unset (false), so ``flwr`` verifies the SuperLink against the federation's CA only.
    """
    ca = Path(ca_cert).expanduser().resolve()
    return (
        f"[superlink]\ndefault = {json.dumps(name)}\n\n"
        f"[superlink.{name}]\naddress = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(ca))}\n"
    )


def write_flwr_config(
    flwr_home: Path | str, address: str, ca_cert: Path | str, name: str = CONNECTION_NAME
) -> Path:
    """Write :func:`flwr_config_toml` to ``flwr_home/config.toml`` (a private FLWR_HOME)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    write_file_atomic(path, flwr_config_toml(address, ca_cert, name).encode(), mode=0o644)
    return path


# --------------------------------------------------------------------------------------------
# scripts and manifest

_HERE = 'HERE="$(cd "$(dirname "$0")" && pwd)"'


def _script(path: Path, body: str) -> None:
    write_file_atomic(path, ("#!/bin/sh\nset -eu\n" + body).encode(), mode=0o755)


def _write_scripts(fed: Federation) -> None:
    """Shell scripts holding the exact flags; paths resolve from the script's own dir."""
    sl = fed.superlink
    addr = fed.superlink_address
    _script(
        sl.start_script,
        "# The SuperLink: TLS on Fleet/Control/Runtime APIs (one port), SuperNode auth on.\n"
        "# Only SuperNodes registered with register-supernodes.sh can connect.\n"
        f"{_HERE}\n"
        'mkdir -p "$HERE/state"\n'
        "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\n"
        'exec flower-superlink --ssl-ca-certfile "$HERE/tls/ca.pem" '
        '--ssl-certfile "$HERE/tls/superlink.pem" --ssl-keyfile "$HERE/tls/superlink.key" '
        f"--enable-supernode-auth --host 0.0.0.0 --port {fed.superlink_port} "
        '--database "$HERE/state/superlink.db" --disable-runtime-dependency-installation "$@"\n',
    )
    _script(
        sl.flwr_script,
        "# `flwr` with a private FLWR_HOME whose default connection is this SuperLink over\n"
        "# TLS, trusting only the federation's CA: ./flwr.sh supernode list, ./flwr.sh run ...\n"
        f"{_HERE}\n"
        'export FLWR_HOME="$HERE/flwr-home"\n'
        'mkdir -p "$FLWR_HOME"\n'
        'cat > "$FLWR_HOME/config.toml" <<EOF\n'
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f'[superlink.{CONNECTION_NAME}]\naddress = "${{FEDVAULT_SUPERLINK:-{addr}}}"\n'
        'root-certificates = "$HERE/tls/ca.pem"\nEOF\n'
        'exec flwr "$@"\n',
    )
    lines = "".join(
        f'"$HERE/flwr.sh" supernode register "$HERE/supernode-keys/client-{c.partition_id}.pub" '
        f"{CONNECTION_NAME} --name client-{c.partition_id}\n"
        for c in fed.clients
    )
    _script(
        sl.register_script,
        "# Register every SuperNode's public key with the running SuperLink (Control API).\n"
        f"{_HERE}\n" + lines,
    )
    for c in fed.clients:
        node_config = (
            f"partition-id={c.partition_id} num-partitions={fed.num_clients} "
            'key-dir=\\"$HERE/identity\\" server-public=\\"$HERE/server-public.json\\" '
            'state-dir=\\"$HERE/state\\"'
        )
        _script(
            c.start_script,
            f"# SuperNode for partition {c.partition_id} of {fed.num_clients}: TLS to the "
            "SuperLink\n# (trusting only ca.pem), authenticated with supernode-auth.key.\n"
            "# --isolation process: the SuperNode runs no app itself; `fedvault clientapp`\n"
            "# starts the ClientApps whose FAB hash is in approved-apps.txt and refuses the\n"
            "# rest. The two stop together: the launcher exits when the SuperNode (this\n"
            "# script's pid, after exec) does, and stops it if it fails itself.\n"
            "# Usage: start-supernode.sh [--port RUNTIME_PORT] [flower-supernode flags]\n"
            f"{_HERE}\n"
            'mkdir -p "$HERE/state"\n'
            f"PORT={DEFAULT_SUPERNODE_RUNTIME_PORT}\n"
            'if [ "${1:-}" = "--port" ]; then PORT="$2"; shift 2; fi\n'
            'fedvault clientapp --runtime-api-address "127.0.0.1:$PORT" --insecure '
            f'--approved-fab-hashes "$HERE/{APPROVED_APPS}" --parent-pid $$ &\n'
            f'exec flower-supernode --superlink "${{FEDVAULT_SUPERLINK:-{addr}}}" '
            '--root-certificates "$HERE/ca.pem" '
            '--auth-supernode-private-key "$HERE/supernode-auth.key" '
            f'--node-config "{node_config}" --isolation process --port "$PORT" "$@"\n',
        )


def _write_manifest(fed: Federation, sans: list[str]) -> None:
    doc = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "superlink_host": fed.superlink_host,
        "superlink_port": fed.superlink_port,
        "superlink_sans": sans,
        "num_clients": fed.num_clients,
        "ca_sha256": _fingerprint(fed.ca_cert),
        "superlink_cert_sha256": _fingerprint(fed.superlink.cert),
        "supernode_public_keys": {
            str(c.partition_id): c.auth_public_key.read_text(encoding="ascii").strip()
            for c in fed.clients
        },
    }
    write_file_atomic(
        fed.directory / MANIFEST, (json.dumps(doc, indent=2) + "\n").encode(), mode=PUBLIC_MODE
    )


def _fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def load_federation(out_dir: Path | str) -> Federation:
    """The :class:`Federation` a previous :func:`provision_federation` wrote to ``out_dir``."""
    out = Path(out_dir).expanduser().resolve()
    manifest = out / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(
            f"{manifest} not found: run `fedvault provision --out {out} ...` first"
        )
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    if doc.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{manifest} is not a fedvault federation manifest")
    n = int(doc["num_clients"])
    sl = out / "superlink"
    return Federation(
        directory=out,
        superlink_host=str(doc["superlink_host"]),
        superlink_port=int(doc["superlink_port"]),
        num_clients=n,
        ca_cert=out / "ca" / "ca.pem",
        ca_key=out / "ca" / "ca.key",
        superlink=SuperLinkBundle(
            directory=sl,
            ca_cert=sl / "tls" / "ca.pem",
            cert=sl / "tls" / "superlink.pem",
            key=sl / "tls" / "superlink.key",
            keys_dir=sl / "keys",
            supernode_public_keys=tuple(
                sl / "supernode-keys" / f"client-{i}.pub" for i in range(n)
            ),
            start_script=sl / "start-superlink.sh",
            register_script=sl / "register-supernodes.sh",
            flwr_script=sl / "flwr.sh",
        ),
        clients=tuple(
            ClientBundle(
                partition_id=i,
                directory=out / f"client-{i}",
                ca_cert=out / f"client-{i}" / "ca.pem",
                auth_private_key=out / f"client-{i}" / "supernode-auth.key",
                auth_public_key=out / f"client-{i}" / "supernode-auth.pub",
                identity_dir=out / f"client-{i}" / "identity",
                server_public=out / f"client-{i}" / "server-public.json",
                start_script=out / f"client-{i}" / "start-supernode.sh",
                approved_apps=out / f"client-{i}" / APPROVED_APPS,
            )
            for i in range(n)
        ),
    )


def describe(fed: Federation) -> str:
    """A few lines for the CLI: where each bundle goes and what to run first."""
    sl = fed.superlink
    lines = [
        f"federation: {fed.num_clients} clients, SuperLink {fed.superlink_address}",
        f"  CA: {fed.ca_cert} (keep {fed.ca_key} offline)",
        f"  SuperLink host: copy {sl.directory}/, run {shlex.quote(str(sl.start_script))}, "
        f"then {shlex.quote(str(sl.register_script))}",
    ]
    lines += [
        f"  client {c.partition_id}: copy {c.directory}/ to its machine, run "
        f"{shlex.quote(str(c.start_script))}"
        for c in fed.clients
    ]
    return "\n".join(lines)


def manifest_dict(fed: Federation) -> dict[str, object]:
    """The dataclass as plain JSON types (for ``fedvault provision --json``)."""
    return json.loads(json.dumps(asdict(fed), default=str))
