"""The run directory's metrics: what every round did, per client, as it happens.

Written atomically after every round (:meth:`common.rundir.RunDir.write_metrics`), so an
interrupted run still leaves a readable record of the rounds it completed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as P
from common.privacy.ledger import LedgerEntry, append_ledger
from common.rundir import RunDir

DETAILED_METRICS = (
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "roc_auc",
    "per_class",
    "confusion_matrix",
    "classes",
)


@dataclass
class ClientRound:
    """One client's report for one round (DP fields are None without DP). ``num_examples``
    is the holder's declared size; ``epsilon`` its lifetime cumulative ε."""

    partition_id: int
    num_examples: int
    epsilon: float | None = None
    round_epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    delta: float | None = None
    chain_id: str | None = None  # the holder's lifetime ledger chain (from its ledger entry)

    @classmethod
    def from_metrics(cls, partition_id: int, metrics: dict[str, Any]) -> ClientRound:
        def opt(key: str) -> Any:
            return metrics.get(key)

        steps = opt(P.STEPS)
        return cls(
            partition_id=partition_id,
            num_examples=int(metrics[P.NUM_EXAMPLES]),
            epsilon=opt(P.EPSILON),
            round_epsilon=opt(P.ROUND_EPSILON),
            noise_multiplier=opt(P.NOISE_MULTIPLIER),
            sample_rate=opt(P.SAMPLE_RATE),
            steps=None if steps is None else int(steps),
            max_grad_norm=opt(P.MAX_GRAD_NORM),
            delta=opt(P.DELTA),
        )


@dataclass
class RoundRecord:
    round: int
    sampled: list[int]
    started_at: float
    clients: list[ClientRound] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    max_epsilon: float | None = None
    test_f1_macro: float | None = None
    test_metrics: dict[str, Any] | None = None  # precision/recall/F1 (macro, per class), AUC, CM
    federated_evaluation: dict[str, float] | None = None
    duration_s: float | None = None
    # Where the round's wall time went, seconds (see RunRecord.add_timing).
    timing: dict[str, Any] = field(default_factory=dict)


class RunRecord:
    """Accumulates rounds and writes ``metrics.json`` into the run directory.

    ``started_at`` (``time.time()`` when the ServerApp started) makes the first
    :meth:`start_round` record ``summary.startup_s``: data loading, model, the round-0
    evaluation, waiting for nodes and partition discovery.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: dict[str, Any],
        summary: dict[str, Any],
        started_at: float | None = None,
    ) -> None:
        self.run_dir = RunDir(run_dir)
        self.config = config
        self.summary = summary
        self.started_at = started_at
        self.rounds: dict[int, RoundRecord] = {}
        self.initial: dict[str, float] | None = None
        self.epsilon_by_partition: dict[int, float] = {}
        self.pending_ledger: list[LedgerEntry] = []
        self._ledger_seen: set[tuple[str, int, str]] = set()

    def start_round(self, server_round: int, sampled: list[int]) -> None:
        now = time.time()
        if self.started_at is not None and "startup_s" not in self.summary:
            self.summary["startup_s"] = now - self.started_at
        self.rounds[server_round] = RoundRecord(server_round, sampled, now)

    def _round(self, server_round: int) -> RoundRecord:
        if server_round not in self.rounds:  # no training this round (fraction-train = 0)
            self.start_round(server_round, [])
        return self.rounds[server_round]

    def add_client(self, server_round: int, client: ClientRound) -> None:
        self._round(server_round).clients.append(client)
        if client.epsilon is not None:
            self.epsilon_by_partition[client.partition_id] = client.epsilon

    def add_ledger_entry(self, entry: LedgerEntry) -> None:
        """Keep ``entry`` unless this run already holds it (same chain, seq and hash): a
        holder resends its chain once per run, and a replayed reply must not double it."""
        key = (entry.chain_id, entry.seq, entry.hash)
        if key not in self._ledger_seen:
            self._ledger_seen.add(key)
            self.pending_ledger.append(entry)

    def add_failure(
        self, server_round: int, partition: int, reason: str, refused: bool, code: int = 0
    ) -> None:
        """``refused``: the holder itself declined the round (a policy or budget refusal,
        sealed when sealing is on); otherwise the round failed or was rejected."""
        self._round(server_round).failures.append(
            {"partition_id": partition, "refused": refused, "code": code, "reason": reason}
        )

    def set_federated_evaluation(self, server_round: int, metrics: dict[str, float]) -> None:
        self._round(server_round).federated_evaluation = metrics

    def add_timing(self, server_round: int, **seconds: Any) -> None:
        """Merge into the round's ``timing``: ``train_phase_s`` (train messages built →
        ``aggregate_train`` done), ``aggregate_s`` (inside ``aggregate_train``: opening
        sealed replies, ledger, FedAvg), ``evaluate_phase_s`` (``configure_evaluate`` →
        ``aggregate_evaluate`` done), ``central_eval_s`` (scoring the global model on the
        server's test set), ``train_reply_lag_s`` (the newest train reply's creation, on the
        client's clock, to ``aggregate_train`` starting: relaying and polling for replies;
        meaningful where server and clients share a clock, as in simulation). Clients do not
        report how long they trained: it reveals their data size."""
        self._round(server_round).timing.update(seconds)

    def finish_round(self, server_round: int, metrics: dict[str, Any]) -> RoundRecord:
        """Close a round with the central evaluation; max ε covers every client so far."""
        rec = self._round(server_round)
        rec.test_accuracy, rec.test_loss = metrics["accuracy"], metrics["loss"]
        rec.test_f1_macro = metrics["f1_macro"]
        rec.test_metrics = {
            k: metrics[k]
            for k in DETAILED_METRICS
        }
        rec.max_epsilon = max(self.epsilon_by_partition.values(), default=None)
        rec.duration_s = time.time() - rec.started_at
        rec.clients.sort(key=lambda c: c.partition_id)
        if self.pending_ledger:  # appended (and fsynced) once per round, as received
            entries = sorted(self.pending_ledger, key=lambda e: e.partition_id)
            append_ledger(self.run_dir.ledger_path, entries)
            self.pending_ledger = []
        self.write()
        return rec

    def to_json(self) -> dict[str, Any]:
        rounds = [asdict(self.rounds[r]) for r in sorted(self.rounds)]
        for r in rounds:
            r.pop("started_at")
        # ``final`` is the last *evaluated* round: a run that ends mid-round (aborted,
        # cancelled) still leaves a readable record
        done = [r for r in rounds if r["test_metrics"] is not None]
        last = done[-1] if done else None
        return _finite(
            {
                "config": self.config,
                "summary": self.summary,
                "initial": self.initial,
                "rounds": rounds,
                "final": {
                    "test_accuracy": last["test_accuracy"] if last else None,
                    "test_loss": last["test_loss"] if last else None,
                    "test_f1_macro": last["test_f1_macro"] if last else None,
                    "test_roc_auc": last["test_metrics"]["roc_auc"] if last else None,
                    "max_epsilon": last["max_epsilon"] if last else None,
                    "epsilon_by_partition": {
                        str(k): v for k, v in sorted(self.epsilon_by_partition.items())
                    },
                },
            }
        )

    def write(self) -> Path:
        return self.run_dir.write_metrics(self.to_json())


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null (and say so rather than emit invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
