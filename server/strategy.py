"""FedAvg with reproducible client sampling and a per-client record of every round.

Flower's FedAvg samples with the global ``random`` module over node ids, which are random
per run, so the same seed would not pick the same clients twice. Here nodes are first
mapped to the partition they hold (a QUERY message, answered by the ClientApp), then
sampled by partition id with an RNG seeded from ``(seed, round)``. Aggregation itself is
Flower's FedAvg, untouched; we only read the replies on the way in.

Each round's ``timing`` in metrics.json is measured here (train and evaluate phases,
aggregation) and in the ServerApp (central evaluation): a phase runs from the strategy
building its messages, through Flower's ``send_and_receive``, to its aggregation being done.
The train phase starts once the round's nodes are sampled, so waiting for the first nodes
and partition discovery count as the run's start-up, not as round 1.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import protocol as P
from common.privacy.ledger import LedgerEntry, LedgerError
from server.run_record import ClientRound, RunRecord
from server.sealing import ServerSealer

log = logging.getLogger("fedvault.server")

QUERY_TIMEOUT_S = 120.0
NODE_WAIT_POLL_S = 1.0


class RecordingFedAvg(FedAvg):
    """FedAvg that samples by partition id and records what each client reports."""

    def __init__(self, *, seed: int, record: RunRecord, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.seed = seed
        self.record = record
        self.partition_of: dict[int, int] = {}  # node id → partition id
        self.sealer: ServerSealer | None = None  # set when encrypt-updates = true
        self._phase_started: dict[tuple[str, int], float] = {}  # (phase, round) → perf_counter

    # -- sampling -----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, server_round, self.fraction_train, self.min_train_nodes, "train")
        self._phase_started["train", server_round] = time.perf_counter()
        self.record.start_round(server_round, [self.partition_of[n] for n in nodes])
        config["server-round"] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = self._construct_messages(content, nodes, MessageType.TRAIN)
        return self._protect(messages, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._phase_started["evaluate", server_round] = time.perf_counter()
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(
            grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate"
        )
        config["server-round"] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._protect(
            self._construct_messages(content, nodes, MessageType.EVALUATE), server_round
        )

    def _protect(self, messages: Iterable[Message], server_round: int) -> Iterable[Message]:
        return messages if self.sealer is None else self.sealer.protect(messages, server_round)

    def _open(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Open sealed updates; rejected ones are recorded and left out of the aggregate."""
        if self.sealer is None:
            return list(replies)
        accepted, rejected = self.sealer.open_replies(replies, server_round)
        for r in rejected:
            self.record.add_failure(server_round, r.partition_id, r.reason, refused=False)
        return accepted

    def _sample(
        self, grid: Grid, server_round: int, fraction: float, minimum: int, purpose: str
    ) -> list[int]:
        """Pick ``max(fraction × nodes, minimum)`` nodes, reproducibly for the seed."""
        nodes = self._wait_for_nodes(grid, max(minimum, self.min_available_nodes))
        self._discover(grid, nodes)
        size = min(max(int(len(nodes) * fraction), minimum), len(nodes))
        by_partition = {self.partition_of[n]: n for n in nodes}
        rng = random.Random(f"{self.seed}/{purpose}/{server_round}")
        chosen = sorted(rng.sample(sorted(by_partition), size))
        log.info("round %d: %s sampled partitions %s", server_round, purpose, chosen)
        return [by_partition[p] for p in chosen]

    @staticmethod
    def _wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
        while len(nodes := sorted(grid.get_node_ids())) < minimum:
            log.info("waiting for nodes: %d connected, %d required", len(nodes), minimum)
            time.sleep(NODE_WAIT_POLL_S)
        return nodes

    def _discover(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes we have not seen yet which partition they hold."""
        unknown = [n for n in nodes if n not in self.partition_of]
        if not unknown:
            return
        queries = [
            Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say its partition: %s", node, reply.error.reason)
                continue
            self.partition_of[node] = int(reply.content[P.NODE_INFO][P.PARTITION_ID])
        missing = [n for n in unknown if n not in self.partition_of]
        if missing:
            raise RuntimeError(f"nodes {missing} did not answer the partition query")
        log.info("partitions by node: %s", {n: self.partition_of[n] for n in unknown})

    # -- recording ----------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started, received_at = time.perf_counter(), time.time()
        replies = list(replies)
        # newest reply created (client's clock) → here: relaying + polling for replies
        created = [m.metadata.created_at for m in replies if m.metadata.created_at]
        self._record_dropped(server_round, replies)
        replies = self._open(server_round, replies)
        for msg in replies:
            partition = self.partition_of.get(msg.metadata.src_node_id, -1)
            if msg.has_error():
                refused = msg.error.code == P.PRIVACY_BUDGET_EXHAUSTED
                self.record.add_failure(server_round, partition, msg.error.reason or "", refused)
                log.warning(
                    "round %d: partition %d %s: %s",
                    server_round, partition, "refused" if refused else "failed", msg.error.reason,
                )
            else:
                metrics = dict(msg.content[P.METRICS])
                self.record.add_client(server_round, ClientRound.from_metrics(partition, metrics))
                if P.LEDGER in msg.content:
                    self._ledger_entry(server_round, partition, msg.content[P.LEDGER]["entry"])
        aggregated = super().aggregate_train(server_round, replies)
        done = time.perf_counter()
        timing = {"aggregate_s": done - started}
        if created:
            timing["train_reply_lag_s"] = received_at - max(created)
        if (phase_started := self._phase_started.pop(("train", server_round), None)) is not None:
            timing["train_phase_s"] = done - phase_started
        self.record.add_timing(server_round, **timing)
        return aggregated

    def _record_dropped(self, server_round: int, replies: list[Message]) -> None:
        """Sampled clients that sent nothing back before the round timed out (node died)."""
        answered = {self.partition_of.get(m.metadata.src_node_id, -1) for m in replies}
        record = self.record.rounds.get(server_round)
        for partition in sorted(set(record.sampled if record else []) - answered):
            reason = "no reply before round-timeout: the node dropped out of this round"
            log.warning("round %d: partition %d: %s", server_round, partition, reason)
            self.record.add_failure(server_round, partition, reason, refused=False)

    def _ledger_entry(self, server_round: int, partition: int, line: object) -> None:
        """Keep the client's signed ledger entry as sent; the audit judges it."""
        try:
            entry = LedgerEntry.from_json_line(str(line))
        except (ValueError, LedgerError) as err:
            log.warning("round %d: partition %d sent a malformed ledger entry: %s",
                        server_round, partition, err)  # fmt: skip
            return
        if (entry.round, entry.partition_id) != (server_round, partition):
            log.warning("round %d: partition %d sent a ledger entry for round %d, partition %d",
                        server_round, partition, entry.round, entry.partition_id)  # fmt: skip
        self.record.add_ledger_entry(entry)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = self._open(server_round, replies)
        client_eval_s: dict[int, float] = {}
        for msg in replies:
            if not msg.has_error() and P.METRICS in msg.content:
                seconds = msg.content[P.METRICS].get(P.EVAL_SECONDS)
                if seconds is not None:
                    client_eval_s[self.partition_of.get(msg.metadata.src_node_id, -1)] = seconds
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.record.set_federated_evaluation(server_round, dict(metrics))
        timing: dict[str, object] = {
            "client_eval_s": {str(p): float(client_eval_s[p]) for p in sorted(client_eval_s)}
        }
        if (phase_started := self._phase_started.pop(("evaluate", server_round), None)) is not None:
            timing["evaluate_phase_s"] = time.perf_counter() - phase_started
        self.record.add_timing(server_round, **timing)
        return metrics
