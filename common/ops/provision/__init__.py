"""Credentials for a deployed federation: one SuperLink, N SuperNodes, all over TLS.

:func:`provision_federation` creates, with nothing but ``cryptography`` (no ``openssl``):

* a private CA and the SuperLink's TLS certificate (:mod:`.x509`), and per client a
  SuperNode authentication key pair in the OpenSSH format Flower 1.41 reads;
* fedvault identities (``common.crypto``): the server's, and one per client, in the
  ``keys-dir`` layout of :mod:`common.federation_keys` on the SuperLink side (server key +
  every client's ``public.json``), so ``encrypt-updates = true`` works unchanged;
* ready-to-run shell scripts (:mod:`.scripts`: ``start-superlink.sh``,
  ``register-supernodes.sh``, ``flwr.sh``, ``client-<i>/start-supernode.sh``), rendered
  from the argument builders of :mod:`.commands`, which resolve paths from their own
  location so a bundle keeps working after it is copied;
* per client, ``approved-apps.txt``: the FAB hashes (``fedvault fab-hash``) its holder
  approved. ``start-supernode.sh`` runs the SuperNode with ``--isolation process`` and
  ``fedvault clientapp`` (:mod:`common.ops.approved_app`), which starts only ClientApps whose
  FAB hash is in that file -- the holder's list, not the operator's (see docs/deploy.md);
* ``federation.json`` (:mod:`.manifest`), from which :func:`load_federation` rebuilds it.

Where each file lies is declared once, in :mod:`.layout`; :mod:`.bundle` writes them.
"""

from __future__ import annotations

from .bundle import provision_federation, write_approved_apps
from .commands import (
    CONNECTION_NAME,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_RUNTIME_PORT,
    flwr_config_toml,
    register_command,
    superlink_command,
    supernode_command,
    supernode_node_config,
    write_flwr_config,
)
from .layout import APPROVED_APPS, MANIFEST, ClientBundle, Federation, SuperLinkBundle
from .manifest import describe, load_federation, manifest_dict

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
    "register_command",
    "superlink_command",
    "supernode_command",
    "supernode_node_config",
    "write_approved_apps",
    "write_flwr_config",
]
