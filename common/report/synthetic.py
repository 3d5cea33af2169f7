"""Synthetic run directories (metrics.json + ledger.jsonl) with honest ε, and the audit benchmark.

Why: the audit and the report must be testable without a Flower run, on ledgers of any size,
in exactly the format a real run writes. Clients follow the real client's rules: ε is the
accountant's over the whole history (here: Opacus, via the exact cached recomputation), and a
round that would cross the budget is refused and recorded as a refusal in metrics.json.

Benchmark (prints nothing; logs the timing)::

    python -m common.report.synthetic --clients 100 --rounds 50 [--distinct] [--accountant prv]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from common.privacy.ledger import LEDGER_FILE, ClientLedger, LedgerEntry, write_ledger
from common.report.recompute import Recomputer
from common.report.rundata import METRICS_FILE

if TYPE_CHECKING:
    from common.crypto.keys import Identity

log = logging.getLogger("fedvault.report.synthetic")


def write_synthetic_run(
    run_dir: str | Path,
    *,
    clients: int = 3,
    rounds: int = 4,
    sigma: float = 1.0,
    sample_rate: float = 0.05,
    steps: int = 40,
    num_examples: int = 800,
    batch_size: int = 40,
    delta: float = 1e-5,
    accountant: str = "prv",
    budget: float = 8.0,
    run_id: str = "4242",
    dp: bool = True,
    ledger: bool = True,
    distinct: bool = False,
    signers: Mapping[int, Identity] | None = None,
    recomputer: Recomputer | None = None,
    under_report: Mapping[int, float] | None = None,
    enforce_budget: bool = True,
) -> Path:
    """Write a run directory; returns it.

    ``distinct`` gives every client its own σ and q (a non-IID federation: no two clients
    share a mechanism, the audit's worst case). Dishonest clients for tests:
    ``under_report = {pid: 0.8}`` makes client ``pid`` claim 0.8 × its true ε (in the ledger
    and in what the server records), ``enforce_budget=False`` lets clients train past it.
    """
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    rec = recomputer or Recomputer()
    entries: list[LedgerEntry] = []
    round_records = []
    spent: dict[int, float] = {}
    ledgers = {pid: ClientLedger(run_id, pid, node_id=str(1000 + pid)) for pid in range(clients)}
    histories: dict[int, list[tuple[float, float, int]]] = {pid: [] for pid in range(clients)}
    for r in range(1, rounds + 1):
        record = {"round": r, "sampled": list(range(clients)), "clients": [], "failures": []}
        for pid in range(clients):
            s, q = _mechanism(pid, sigma, sample_rate, distinct)
            client = {
                "partition_id": pid, "num_examples": num_examples,
                "train_loss": 2.0 / (r + 1), "train_seconds": 0.1,
            }  # fmt: skip
            if dp:
                history = [*histories[pid], (s, q, steps)]
                after = rec.epsilon(history, delta, accountant)
                after *= (under_report or {}).get(pid, 1.0)
                if after > budget and enforce_budget:
                    record["failures"].append(
                        {"partition_id": pid, "refused_budget": True,
                         "reason": f"privacy budget exhausted: ε would reach {after:.4f}"}
                    )  # fmt: skip
                    continue
                before = spent.get(pid, 0.0)
                histories[pid] = history
                spent[pid] = after
                client |= {
                    "epsilon": after, "round_epsilon": after - before, "noise_multiplier": s,
                    "sample_rate": q, "steps": steps, "max_grad_norm": 1.0, "delta": delta,
                }  # fmt: skip
                if ledger:
                    entries.append(
                        ledgers[pid].append(
                            round=r, num_examples=num_examples, sample_rate=q, steps=steps,
                            noise_multiplier=s, max_grad_norm=1.0, delta=delta,
                            accountant=accountant, epsilon_cumulative=after,
                            epsilon_budget=budget, signer=(signers or {}).get(pid),
                        )
                    )  # fmt: skip
            else:
                client |= dict.fromkeys(
                    ("epsilon", "round_epsilon", "noise_multiplier", "sample_rate", "steps",
                     "max_grad_norm", "delta"),
                )  # fmt: skip
            record["clients"].append(client)
        record |= {
            "test_accuracy": min(0.95, 0.3 + 0.1 * r), "test_loss": 2.0 / r,
            "max_epsilon": max(spent.values()) if spent else None,
            "federated_evaluation": None, "duration_s": 1.0,
        }  # fmt: skip
        round_records.append(record)
    metrics = {
        "config": {
            "dataset": "digits", "model": "lenet5", "partitioning": "iid",
            "num-server-rounds": rounds, "local-epochs": 1, "batch-size": batch_size,
            "min-train-nodes": clients, "dp": dp, "target-epsilon": budget,
            "target-delta": delta, "max-grad-norm": 1.0, "noise-multiplier": 0.0,
            "accountant": accountant,
        },
        "summary": {
            "run_id": int(run_id) if run_id.isdigit() else run_id, "dataset": "digits",
            "train_examples": clients * num_examples, "model": "lenet5", "wall_seconds": 12.5,
        },
        "initial": {"test_accuracy": 0.1, "test_loss": 2.3},
        "rounds": round_records,
        "final": {
            "test_accuracy": round_records[-1]["test_accuracy"] if round_records else None,
            "test_loss": round_records[-1]["test_loss"] if round_records else None,
            "max_epsilon": max(spent.values()) if spent else None,
            "epsilon_by_partition": {str(k): v for k, v in sorted(spent.items())},
        },
    }  # fmt: skip
    (root / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if dp and ledger:
        # the server appends each round's entries as they arrive: rounds interleave clients
        write_ledger(root / LEDGER_FILE, sorted(entries, key=lambda e: (e.round, e.partition_id)))
    return root


def _mechanism(pid: int, sigma: float, q: float, distinct: bool) -> tuple[float, float]:
    if not distinct:
        return sigma, q
    return sigma * (1 + 0.002 * pid), q * (1 + 0.001 * pid)


def main(argv: list[str] | None = None) -> int:
    """Build a synthetic ledger and time ``audit_run`` on it."""
    from common.logs import configure_logging
    from common.report.audit import audit_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    parser.add_argument("--distinct", action="store_true", help="a mechanism per client")
    args = parser.parse_args(argv)
    logger = configure_logging()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = write_synthetic_run(
            Path(tmp) / "run", clients=args.clients, rounds=args.rounds, budget=1e6,
            accountant=args.accountant, distinct=args.distinct,
        )  # fmt: skip
        built = time.perf_counter() - started
        result = audit_run(run)
    logger.info(
        "audit of %d clients × %d rounds (%s, %s mechanisms): %.2f s (building the ledger: "
        "%.1f s); verdict %s", args.clients, args.rounds, args.accountant,
        "distinct" if args.distinct else "shared", result.seconds, built, result.verdict,
    )  # fmt: skip
    return 0 if result.verdict_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
