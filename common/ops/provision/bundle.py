"""Provisioning: make the CA, the SuperLink's TLS and fedvault keys, and one bundle per client.

Every file goes to the path :func:`.layout.federation_layout` names; private keys are written
0600 (atomically, see :mod:`common.files`); nothing is overwritten unless ``force``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from common.config import ConfigError
from common.crypto import init_identity
from common.crypto.errors import KeyExistsError
from common.federation_keys import SERVER, client_dir, server_dir
from common.files import PRIVATE_MODE, PUBLIC_MODE, write_file_atomic
from common.ops.approved_app import check_hash

from . import x509
from .commands import DEFAULT_SUPERLINK_PORT
from .layout import MANIFEST, ClientBundle, Federation, federation_layout, made_paths
from .manifest import recorded_num_clients, write_manifest
from .scripts import write_scripts

log = logging.getLogger("fedvault.provision")

__all__ = ["provision_federation", "write_approved_apps"]


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
    host = x509.normalise_host(superlink_host)
    approved = tuple(check_hash(h) for h in approved_apps)
    out = Path(out_dir).expanduser().resolve()
    _refuse_overwrite(out, num_clients, force)
    _warn_if_inside_flower_app(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    fed = federation_layout(out, host, port, num_clients)
    sl = fed.superlink
    for d in (fed.ca_cert.parent, sl.directory, sl.tls_dir, sl.supernode_keys_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)

    # CA and the SuperLink's certificate.
    ca_key, ca_cert = x509.make_ca(f"fedvault federation CA ({host})")
    ca_pem = x509.pem(ca_cert)
    write_file_atomic(fed.ca_key, x509.pem_private(ca_key), mode=PRIVATE_MODE)
    write_file_atomic(fed.ca_cert, ca_pem, mode=PUBLIC_MODE)
    sans = x509.sans_for(host, extra_hosts)
    sl_key, sl_cert = x509.make_server_cert(ca_key, ca_cert, host, sans)
    write_file_atomic(sl.ca_cert, ca_pem, mode=PUBLIC_MODE)
    write_file_atomic(sl.cert, x509.pem(sl_cert), mode=PUBLIC_MODE)
    write_file_atomic(sl.key, x509.pem_private(sl_key), mode=PRIVATE_MODE)

    # fedvault identities: the server's in the SuperLink's keys-dir.
    sl.keys_dir.mkdir(mode=0o700, exist_ok=True)
    init_identity(server_dir(sl.keys_dir), "server", SERVER, force=force)
    server_public = (server_dir(sl.keys_dir) / "public.json").read_bytes()

    for client in fed.clients:
        _provision_client(fed, client, ca_pem, server_public, force)
        write_approved_apps(client.approved_apps, approved)

    write_scripts(fed)
    write_manifest(fed, sans)
    log.info(
        "federation of %d clients in %s: SuperLink %s (SANs %s)",
        num_clients, out, fed.superlink_address, ", ".join(sans),
    )  # fmt: skip
    return fed


def _provision_client(
    fed: Federation, c: ClientBundle, ca_pem: bytes, server_public: bytes, force: bool
) -> None:
    """Client ``c``'s bundle, and its public keys on the SuperLink side."""
    c.directory.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(c.ca_cert, ca_pem, mode=PUBLIC_MODE)
    write_file_atomic(c.server_public, server_public, mode=PUBLIC_MODE)

    private_ssh, public_ssh = x509.supernode_auth_keys(f"fedvault-client-{c.partition_id}")
    write_file_atomic(c.auth_private_key, private_ssh, mode=PRIVATE_MODE)
    write_file_atomic(c.auth_public_key, public_ssh, mode=PUBLIC_MODE)
    sl_pub = fed.superlink.supernode_public_keys[c.partition_id]
    write_file_atomic(sl_pub, public_ssh, mode=PUBLIC_MODE)

    identity = init_identity(c.identity_dir, "client", f"client-{c.partition_id}", force=force)
    server_side = client_dir(fed.superlink.keys_dir, c.partition_id)
    server_side.mkdir(mode=0o700, exist_ok=True)
    write_file_atomic(
        server_side / "public.json",
        (identity.directory / "public.json").read_bytes(),
        mode=PUBLIC_MODE,
    )


def _refuse_overwrite(out: Path, num_clients: int, force: bool) -> None:
    """Keys are never replaced by accident. With ``force`` what the previous provisioning
    made (per its manifest) is deleted first -- and nothing else, ever."""
    made: list[Path] = []
    if (out / MANIFEST).exists():
        made = made_paths(out, recorded_num_clients(out) or 0)
    wanted = made_paths(out, num_clients)
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
