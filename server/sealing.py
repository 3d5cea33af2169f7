"""The server's end of end-to-end update protection (see :mod:`common.envelope`).

Signs every outgoing global model and opens every incoming update; an update that fails
(altered, replayed from another round, moved to another node, signed by a key that is not
the one registered for that partition) is rejected with a log line and left out of the
aggregate. Called from one place: the strategy's configure/aggregate hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, MessageType

from common import envelope
from common.crypto import CryptoError, Identity, PublicIdentity, open_sealed, sign

log = logging.getLogger("fedvault.server")

OUT_KIND: dict[str, envelope.Kind] = {
    MessageType.TRAIN: "global-train",
    MessageType.EVALUATE: "global-evaluate",
}
IN_KIND: dict[str, envelope.Kind] = {
    MessageType.TRAIN: "update-train",
    MessageType.EVALUATE: "update-evaluate",
}


@dataclass(frozen=True)
class Rejection:
    node_id: int
    partition_id: int
    reason: str


class ServerSealer:
    """Signs what the server sends and opens what clients send back."""

    def __init__(
        self,
        run_id: int,
        identity: Identity,
        client_keys: dict[int, PublicIdentity],
        partition_of: Callable[[int], int],
    ) -> None:
        self.run_id = run_id
        self.identity = identity
        self.client_keys = client_keys
        self.partition_of = partition_of

    def _context(self, server_round: int, node_id: int, kind: envelope.Kind) -> dict:
        return envelope.context(
            run_id=self.run_id,
            server_round=server_round,
            node_id=node_id,
            partition_id=self.partition_of(node_id),
            kind=kind,
        )

    def protect(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        """Replace each message's content by the server-signed envelope of it."""
        out = []
        for msg in messages:
            kind = OUT_KIND[msg.metadata.message_type]
            ctx = self._context(server_round, msg.metadata.dst_node_id, kind)
            msg.content = envelope.wrap(sign(envelope.encode(msg.content), self.identity, ctx))
            out.append(msg)
        return out

    def open_replies(
        self, replies: Iterable[Message], server_round: int
    ) -> tuple[list[Message], list[Rejection]]:
        """Open sealed replies in place; return (usable replies, rejections)."""
        accepted: list[Message] = []
        rejected: list[Rejection] = []
        for reply in replies:
            if reply.has_error():  # refusals and client errors carry no update
                accepted.append(reply)
                continue
            node = reply.metadata.src_node_id
            partition = self.partition_of(node)
            try:
                reply.content = self._open(reply, server_round, node, partition)
                accepted.append(reply)
            except (CryptoError, ValueError, KeyError) as err:
                reason = f"update rejected: {err}"
                log.warning("round %d: partition %d (node %d): %s", server_round, partition,
                            node, reason)  # fmt: skip
                rejected.append(Rejection(node, partition, reason))
        return accepted, rejected

    def _open(self, reply: Message, server_round: int, node: int, partition: int):
        blob = envelope.unwrap(reply.content)
        if blob is None:
            raise ValueError("the client sent its update unsealed while encrypt-updates = true")
        sender = self.client_keys.get(partition)
        if sender is None:
            raise KeyError(f"no public key registered for partition {partition}")
        ctx = self._context(server_round, node, IN_KIND[reply.metadata.message_type])
        return envelope.decode(open_sealed(blob, self.identity, sender, ctx))
