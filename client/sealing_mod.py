"""The client's end of end-to-end update protection, as a Flower mod (see common.envelope).

Verifies the server's signature on every incoming global model and seals every outgoing
reply (updates, evaluation results and refusals) for the ServerApp. The training code never
sees any of it: this is the only place on the client where messages are protected.

Whether messages must be protected is the *holder's* decision, not the run config's: a
holder that pinned the server's public key (node config ``server-public``; in simulation,
the federation's ``server/public.json``) and whose policy says ``require-sealing`` (the
default) accepts only server-signed messages and only replies sealed, whatever
``encrypt-updates`` says. A run with ``encrypt-updates = false`` is then refused.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client import holder
from common import envelope
from common.config import ConfigError, RunConfig
from common.crypto import CryptoError, message_info, seal, verify

log = logging.getLogger("fedvault.client")

PROTECTED = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}
ROUNDS_KEY = "fedvault-last-round"


def sealing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Verify the global model, run the handler, seal its reply."""
    purpose = PROTECTED.get(msg.metadata.message_type)
    if purpose is None:  # partition queries carry no model
        return call_next(msg, context)
    cfg = RunConfig.from_mapping(context.run_config)
    blob = envelope.unwrap(msg.content)
    try:
        server = holder.pinned_server(cfg, context)
        required = server is not None and holder.policy(cfg, context).require_sealing
    except (CryptoError, ConfigError, ValueError) as err:
        return _refuse(msg, f"cannot read this holder's keys or policy: {err}")
    if server is None:
        if cfg.encrypt_updates or blob is not None:
            return _refuse(
                msg,
                "the run protects messages (encrypt-updates = true), but this client pinned no "
                "server key: set node config server-public (deployment) or run-config keys-dir "
                "(simulation)",
            )
        return call_next(msg, context)
    if not required and blob is None:
        return call_next(msg, context)
    partition_id = int(context.node_config["partition-id"])
    try:
        own = holder.require_identity(cfg, context, "sealed updates")
        if blob is None:
            raise ValueError(
                "the server's message is not signed, but this holder pinned the server's key "
                "and its policy requires sealing (require-sealing = true); the run has "
                f"encrypt-updates = {str(cfg.encrypt_updates).lower()}"
            )
        server_round = _claimed_round(blob)
        _check_fresh(context, purpose, server_round)
        expected = envelope.context(
            run_id=context.run_id, server_round=server_round, node_id=context.node_id,
            partition_id=partition_id, kind=f"global-{purpose}",  # type: ignore[arg-type]
        )  # fmt: skip
        msg.content = envelope.decode(verify(blob, server, expected))
    except (CryptoError, ConfigError, ValueError) as err:
        return _refuse(msg, f"global model rejected: {err}")
    context.state[ROUNDS_KEY + purpose] = ConfigRecord({"round": server_round})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    sealed_ctx = envelope.context(
        run_id=context.run_id, server_round=server_round, node_id=context.node_id,
        partition_id=partition_id, kind=f"update-{purpose}",  # type: ignore[arg-type]
    )  # fmt: skip
    reply.content = envelope.wrap(seal(envelope.encode(reply.content), own, server, sealed_ctx))
    return reply


def _claimed_round(blob: bytes) -> int:
    """The round the (not yet verified) message claims; verification then binds it."""
    claimed = message_info(blob).context.get("round")
    if not isinstance(claimed, int):
        raise ValueError("protected message without a round")
    return claimed


def _check_fresh(context: Context, purpose: str, server_round: int) -> None:
    """A global model for a round at or before the last one handled is a replay."""
    key = ROUNDS_KEY + purpose
    if key in context.state and server_round <= int(context.state[key]["round"]):
        raise ValueError(
            f"round {server_round} is not after round {context.state[key]['round']} (replay)"
        )


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("%s", reason)
    return Message(Error(envelope.UPDATE_REJECTED, reason), reply_to=msg)
