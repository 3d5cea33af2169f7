"""Who this client is, from what the *holder* configured -- never from the run config alone.

Deployment: the SuperNode's node config (written by the holder) names ``key-dir`` (its
identity), ``server-public`` (the server key it pins), ``policy`` (its privacy policy file;
default ``<key-dir>/policy.toml``), ``state-dir`` (its privacy state; default
``<key-dir>/state``) and ``device`` (``auto``, ``cpu``, ``cuda[:i]``; default ``auto``).
Simulation: every simulated holder lives in ``<keys-dir>/client-<i>/`` (identity,
``policy.toml``, ``state/``), made by ``fedvault simulate``; there the run config's
``keys-dir`` is the one place the federation is named, because all parties are one user.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch
from flwr.app import Context

from common.config import ConfigError, RunConfig
from common.crypto import Identity, PublicIdentity
from common.devices import pick_device
from common.federation_keys import client_dir, server_dir
from common.privacy.policy import POLICY_FILE, PrivacyPolicy

log = logging.getLogger("fedvault.client")


def partition_ids(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config lacks {missing}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def identity_dir(cfg: RunConfig, context: Context) -> Path | None:
    """This holder's key dir, or None for a holder without keys (plain simulations)."""
    if key_dir := context.node_config.get("key-dir"):
        return Path(str(key_dir))
    if cfg.keys_dir:
        return client_dir(Path(cfg.keys_dir), partition_ids(context)[0])
    return None


def identity(cfg: RunConfig, context: Context) -> Identity | None:
    directory = identity_dir(cfg, context)
    if directory is None or not (directory / "public.json").exists():
        return None
    return _identity(str(directory))


def require_identity(cfg: RunConfig, context: Context, needed_for: str) -> Identity:
    own = identity(cfg, context)
    if own is None:
        raise ConfigError(
            f"{needed_for} needs this client's keys: set node config key-dir (deployment) or "
            "run-config keys-dir (simulation)"
        )
    return own


def pinned_server(cfg: RunConfig, context: Context) -> PublicIdentity | None:
    """The server key this holder pinned, when it has one: then every message must be
    signed by it and every reply sealed for it, whatever the run config says."""
    if path := context.node_config.get("server-public"):
        return _public(str(path))
    if cfg.keys_dir and (server_dir(Path(cfg.keys_dir)) / "public.json").exists():
        return _public(str(server_dir(Path(cfg.keys_dir)) / "public.json"))
    return None


def policy(cfg: RunConfig, context: Context) -> PrivacyPolicy:
    """The holder's policy: node config ``policy``, else ``policy.toml`` in its key dir,
    else the built-in default (lifetime ε 8 at δ 1e-5, DP and sealing required)."""
    if path := context.node_config.get("policy"):
        return _policy(str(path))
    directory = identity_dir(cfg, context)
    if directory is not None and (directory / POLICY_FILE).exists():
        return _policy(str(directory / POLICY_FILE))
    _warn_default_policy()
    return PrivacyPolicy()


def device(context: Context) -> torch.device:
    """Where this holder trains: node config ``device`` (``auto``: a GPU if this client was
    given one, else the CPU; see :mod:`common.devices`)."""
    return _device(str(context.node_config.get("device", "auto")))


@cache
def _device(preference: str) -> torch.device:
    chosen = pick_device(preference)
    log.info("training and evaluating on %s", chosen)
    return chosen


def state_dir(cfg: RunConfig, context: Context) -> Path | None:
    """Where the holder's lifetime state lives; None = only for this run, in memory."""
    if path := context.node_config.get("state-dir"):
        return Path(str(path))
    directory = identity_dir(cfg, context)
    return directory / "state" if directory is not None else None


@cache
def _warn_default_policy() -> None:
    log.warning(
        "no privacy policy (node config policy, or policy.toml in the key dir): using the "
        "built-in default %s",
        PrivacyPolicy().to_mapping(),
    )


def _policy(path: str) -> PrivacyPolicy:
    return PrivacyPolicy.load(path)


@cache
def _identity(path: str) -> Identity:
    from common.federation_keys import load_own

    return load_own(path)


@cache
def _public(path: str) -> PublicIdentity:
    from common.crypto import load_public

    return load_public(Path(path))
