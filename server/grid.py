"""A Grid that notices replies within a fraction of a second instead of up to 3 s later.

Flower 1.41's ``HttpGrid.send_and_receive`` (the grid a ServerApp gets from a SuperLink, in
simulation through ``flwr run`` and in deployment alike) pushes the messages, then pulls for
replies with a hard-coded ``time.sleep(3)`` between pulls. Every train, evaluate and query
phase therefore ends on average 1.5 s (up to 3 s) after its last reply arrived; over a run
that is several seconds per round of nobody doing anything. :class:`PollingGrid` wraps the
grid the ServerApp receives, delegates everything to it, and replaces only the waiting loop,
built from Flower's own ``push_messages`` and ``pull_messages``: the first pull right after
the push, then pulls ``first_interval`` apart, backing off ×1.5 up to ``max_interval``
(run-config ``reply-poll-interval``). Flower itself is not patched.

Timeout semantics are Flower's: ``timeout=None`` waits until every message has its reply;
otherwise the call returns whatever arrived by the deadline (a message stays valid for its
TTL, which the timeout does not change).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger("fedvault.server")

FIRST_POLL_INTERVAL_S = 0.05
BACKOFF = 1.5


class PollingGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` polls at most ``max_interval`` apart.

    The interval starts at ``min(first_interval, max_interval)`` and grows ×1.5 per empty
    pull up to ``max_interval``: short phases (partition discovery, an empty evaluate
    phase) cost a few tens of milliseconds, long training phases cost a few pulls per
    second, and the last reply is seen at most ``max_interval`` after it arrived. With
    ``max_interval = 3.0`` the tail of a long phase polls like Flower's stock grid (which
    sleeps a fixed 3 s); only the first few seconds of each phase are polled faster.
    """

    def __init__(
        self, grid: Grid, max_interval: float, first_interval: float = FIRST_POLL_INTERVAL_S
    ) -> None:
        if max_interval <= 0 or first_interval <= 0:
            raise ValueError("poll intervals must be > 0 seconds")
        self.inner = grid
        self.max_interval = max_interval
        self.first_interval = min(first_interval, max_interval)

    # -- delegated as is ------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # -- the one method that changes ------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull until each has its reply or ``timeout`` seconds passed.

        ``messages`` is materialised first because Flower's ``HttpGrid.push_messages``
        iterates it twice (a generator would be pushed empty). An id the SuperLink did not
        accept (empty or ``None``: Flower logs why) can never get a reply, so it is not
        waited for.
        """
        messages = list(messages)
        if not messages:
            return []
        pending = {mid for mid in self.push_messages(messages) if mid}
        del messages
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self.first_interval
        replies: list[Message] = []
        while pending:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not pending:
                break
            if deadline is None:
                time.sleep(interval)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(interval, left))  # the last pull happens at the deadline
            interval = min(interval * BACKOFF, self.max_interval)
        return replies
