"""FedAvg with seeded client sampling and a per-client record of every round.

Sampling draws nodes, not partitions: each round orders the connected node ids (sorted) by
an RNG seeded from ``(seed, purpose, round)`` and takes the first ``max(fraction × nodes,
minimum)``. Only the nodes drawn are asked which partition they hold (a QUERY message,
answered by the ClientApp; a node is asked once per run, its answer kept), so round 1 costs
one query per *sampled* client, not one per node of the federation (asking every node took
~18 s at 1,000 nodes in Flower's simulation engine, and grows faster than the federation:
the engine's dispatcher scans every in-flight message for every node each 0.1 s). The first
message to a node pays its ClientApp's cold start (~10 s for a Ray actor on 2 CPU cores),
whatever the message, so this query is where round 1 pays it. A drawn node that does not
answer (offline, or refusing this app: see docs/deploy.md) is left out of the round and
replaced by the next node in the round's order, so the round keeps its size while nodes
remain; it is asked again the next time it is drawn. The round's record names partitions,
the sealer binds every envelope to the node's partition: both read ``partition_of``, which
holds every node the round sends to.

Reproducibility, honestly: the draw is a pure function of the seed and the set of node
ids. Flower 1.42's simulation engine registers its nodes with random 64-bit ids
(``LinkState.create_node``) and gives partition ``i`` to the ``i``-th node it registered
(``vce_api._register_nodes``); the ServerApp sees neither the order nor that mapping. So in
a simulation the same seed picks *different partitions* each run: the sampled partitions
are not reproducible across simulation runs (the model, accuracy and ε then differ
slightly between runs). They are in a deployment whose SuperLink keeps its node ids (the
same nodes, a persistent SuperLink database). Sampling partitions reproducibly would need
the node → partition map of every node, i.e. a query per node of the federation before
round 1 -- the cost this design removes. Every round's record names the partitions it
sampled, so what a run did is always known after the fact. Aggregation itself is Flower's
FedAvg, untouched; we only read the replies on the way in.

Each round's ``timing`` in metrics.json is measured here (train and evaluate phases,
aggregation) and in the ServerApp (central evaluation): a phase runs from the strategy
building its messages, through Flower's ``send_and_receive``, to its aggregation being done.
The train phase starts once the round's nodes are sampled (and asked their partition), so
waiting for the first nodes and the partition queries count as the run's start-up in round 1
and as the gap between rounds later.
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


class RunAborted(RuntimeError):
    """A client's failure that every later round would repeat (its data fails authentication
    or validation): the run ends with that reason instead of going on without the client."""


class RecordingFedAvg(FedAvg):
    """FedAvg that samples nodes by seed, asks only those their partition, and records
    what each client reports."""

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
        """``max(fraction × nodes, minimum)`` nodes in the seeded order of this round, each
        of which said which partition it holds; drawn nodes that do not answer are replaced
        by the next ones in the order (see the module docstring)."""
        nodes = self._wait_for_nodes(grid, max(minimum, self.min_available_nodes))
        size = min(max(int(len(nodes) * fraction), minimum), len(nodes))
        rng = random.Random(f"{self.seed}/{purpose}/{server_round}")
        order = rng.sample(nodes, len(nodes))
        chosen: list[int] = []
        taken: set[int] = set()
        drawn = 0
        while len(chosen) < size and drawn < len(order):
            batch = order[drawn : drawn + size - len(chosen)]
            drawn += len(batch)
            self._discover(grid, server_round, batch)
            for n in batch:  # two nodes claiming one partition: the first drawn counts
                if n in self.partition_of and self.partition_of[n] not in taken:
                    chosen.append(n)
                    taken.add(self.partition_of[n])
        if len(chosen) < size:
            log.warning("round %d: %s: only %d of %d nodes answered the partition query",
                        server_round, purpose, len(chosen), size)  # fmt: skip
        chosen.sort(key=self.partition_of.__getitem__)
        log.info("round %d: %s sampled partitions %s", server_round, purpose,
                 [self.partition_of[n] for n in chosen])  # fmt: skip
        return chosen

    @staticmethod
    def _wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
        while len(nodes := sorted(grid.get_node_ids())) < minimum:
            log.info("waiting for nodes: %d connected, %d required", len(nodes), minimum)
            time.sleep(NODE_WAIT_POLL_S)
        return nodes

    def _discover(self, grid: Grid, server_round: int, nodes: list[int]) -> None:
        """Ask the drawn nodes we have not heard from yet which partition they hold (one
        query each, all sent at once). A node that does not answer stays unknown: it is left
        out of this draw and asked again when it is next drawn."""
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
            log.warning("nodes %s did not answer the partition query: left out", missing)
        log.info("round %d: asked %d node(s); partitions by node: %s", server_round,
                 len(unknown), {n: self.partition_of[n] for n in unknown
                                if n in self.partition_of})  # fmt: skip

    # -- replies -------------------------------------------------------------------------
    def _accept(self, server_round: int, purpose: str, replies: Iterable[Message]) -> list[Message]:
        """One reply per sampled node per round, opened when sealing is on.

        A second reply from the same node (a replayed or duplicated message) is dropped and
        logged: aggregating it twice would give that client twice its weight. So is a reply
        from a node that was not asked this round."""
        record = self.record.rounds.get(server_round)
        asked = set(record.sampled) if record is not None and purpose == "train" else None
        first: dict[int, Message] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            partition = self.partition_of.get(node, -1)
            if node in first:
                log.warning("round %d: partition %d (node %d) replied again; the duplicate "
                            "is dropped", server_round, partition, node)  # fmt: skip
            elif asked is not None and partition not in asked:
                log.warning("round %d: a reply from node %d, which was not sampled, is "
                            "dropped", server_round, node)  # fmt: skip
            else:
                first[node] = msg
        return self._open(server_round, first.values())

    def _triage(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Record failures and refusals; return the replies that carry a result.

        A refusal counts as the holder's only when it arrives as its (sealed) ``refusal``
        record. A Flower error reply is never one: nothing authenticates it, so with sealing
        on anyone on the path could forge it; it is recorded as a failure."""
        results = []
        for msg in replies:
            partition = self.partition_of.get(msg.metadata.src_node_id, -1)
            if msg.has_error():
                sealed = " (unauthenticated error reply)" if self.sealer is not None else ""
                reason = f"{msg.error.reason or 'error'}{sealed}"
                self.record.add_failure(server_round, partition, reason, refused=False,
                                        code=int(msg.error.code))  # fmt: skip
                log.warning("round %d: partition %d failed: %s", server_round, partition, reason)
            elif P.REFUSAL in msg.content:
                refusal = msg.content[P.REFUSAL]
                reason, code = str(refusal.get("reason", "")), int(refusal.get("code", 0))
                self.record.add_failure(server_round, partition, reason, refused=True, code=code)
                log.warning("round %d: partition %d refused: %s", server_round, partition, reason)
                if code == P.DATA_UNUSABLE:
                    self.record.write()
                    raise RunAborted(
                        f"partition {partition} cannot use its data: {reason}"
                    )
            else:
                results.append(msg)
        return results

    # -- recording ----------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started, received_at = time.perf_counter(), time.time()
        replies = list(replies)
        # newest reply created (client's clock) → here: relaying + polling for replies
        created = [m.metadata.created_at for m in replies if m.metadata.created_at]
        self._record_dropped(server_round, replies)
        results = self._triage(server_round, self._accept(server_round, "train", replies))
        for msg in results:
            partition = self.partition_of.get(msg.metadata.src_node_id, -1)
            client = ClientRound.from_metrics(partition, dict(msg.content[P.METRICS]))
            if P.LEDGER in msg.content:
                client.chain_id = self._ledger_entries(
                    server_round, partition, msg.content[P.LEDGER].get(P.LEDGER_ENTRIES, [])
                )
            self.record.add_client(server_round, client)
        aggregated = super().aggregate_train(server_round, results)
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

    def _ledger_entries(self, server_round: int, partition: int, lines: list[str]) -> str | None:
        """Keep the holder's signed ledger entries as sent (the audit judges them); returns
        the chain id of the newest one."""
        chain_id = None
        for line in lines:
            try:
                entry = LedgerEntry.from_json_line(str(line))
            except (ValueError, LedgerError) as err:
                log.warning("round %d: partition %d sent a malformed ledger entry: %s",
                            server_round, partition, err)  # fmt: skip
                continue
            self.record.add_ledger_entry(entry)
            chain_id = entry.chain_id
        return chain_id

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        results = self._triage(server_round, self._accept(server_round, "evaluate", replies))
        metrics = super().aggregate_evaluate(server_round, results)
        if metrics is not None:
            self.record.set_federated_evaluation(server_round, dict(metrics))
        if (phase_started := self._phase_started.pop(("evaluate", server_round), None)) is not None:
            self.record.add_timing(
                server_round, evaluate_phase_s=time.perf_counter() - phase_started
            )
        return metrics
