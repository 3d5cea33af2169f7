"""``federation.json``: the non-secret record of what :func:`provision_federation` made.

It holds the SuperLink's address, the number of clients and fingerprints; every path is
derived from :mod:`.layout`, so :func:`load_federation` returns what provisioning returned.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

from common.config import ConfigError
from common.files import read_json_object, write_json_atomic

from .layout import MANIFEST, Federation, federation_layout
from .x509 import fingerprint

__all__ = ["MANIFEST_FORMAT", "describe", "load_federation", "manifest_dict", "write_manifest"]

MANIFEST_FORMAT = "fedvault-federation"


def write_manifest(fed: Federation, sans: list[str]) -> None:
    doc = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "superlink_host": fed.superlink_host,
        "superlink_port": fed.superlink_port,
        "superlink_sans": sans,
        "num_clients": fed.num_clients,
        "ca_sha256": fingerprint(fed.ca_cert),
        "superlink_cert_sha256": fingerprint(fed.superlink.cert),
        "supernode_public_keys": {
            str(c.partition_id): c.auth_public_key.read_text(encoding="ascii").strip()
            for c in fed.clients
        },
    }
    write_json_atomic(fed.directory / MANIFEST, doc)


def _read(out: Path) -> dict[str, object]:
    return read_json_object(
        out / MANIFEST,
        what="federation manifest",
        fix=f"re-run `fedvault provision --out {out} ...`",
        error=ConfigError,
    )


def recorded_num_clients(out: Path) -> int | None:
    """How many client bundles the manifest in ``out`` says were made (None: unreadable)."""
    try:
        return int(_read(out).get("num_clients", 0))
    except (ValueError, TypeError):
        return None


def load_federation(out_dir: Path | str) -> Federation:
    """The :class:`Federation` a previous :func:`provision_federation` wrote to ``out_dir``."""
    out = Path(out_dir).expanduser().resolve()
    manifest = out / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(
            f"{manifest} not found: run `fedvault provision --out {out} ...` first"
        )
    doc = _read(out)
    if doc.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{manifest} is not a fedvault federation manifest")
    return federation_layout(
        out,
        str(doc["superlink_host"]),
        int(doc["superlink_port"]),
        int(doc["num_clients"]),
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
