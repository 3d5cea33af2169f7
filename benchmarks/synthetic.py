"""Synthetic run directories (metrics.json + v2 ledger.jsonl), honest ε; the audit benchmark.

Why: the audit and the report must be testable without a Flower run, on ledgers of any size,
in exactly the format a real run writes. Clients follow the real client's rules: ε is the
accountant's over the whole history (here: Opacus, via the exact cached recomputation), and a
round that would cross the budget is refused and recorded as a refusal in metrics.json.

Benchmark (prints nothing; logs the timing)::

    python -m benchmarks.synthetic --clients 100 --rounds 50 [--distinct] [--accountant prv]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

from common.audit.recompute import Recomputer
from common.privacy.ledger import LEDGER_FILE, ClientLedger, LedgerEntry, write_ledger
from common.rundir import RunDir

if TYPE_CHECKING:
    from common.crypto.keys import Identity

log = logging.getLogger("fedvault.report.synthetic")


def write_synthetic_run(
    run_dir: str | Path,
    *,
    clients: int = 3,
    rounds: int = 4,
    sigma: float = 1.0,
    num_examples: int = 800,
    batch_size: int = 40,
    epochs: int = 2,
    delta: float = 1e-5,
    accountant: str = "prv",
    budget: float = 8.0,
    run_budget: float | None = None,
    run_id: str = "4242",
    dp: bool = True,
    ledger: bool = True,
    distinct: bool = False,
    signers: Mapping[int, Identity] | None = None,
    recomputer: Recomputer | None = None,
    under_report: Mapping[int, float] | None = None,
    enforce_budget: bool = True,
    ledgers: MutableMapping[int, ClientLedger] | None = None,
    participants: Iterable[int] | None = None,
) -> Path:
    """Write a run directory in the v2 format (lifetime chains); returns it.

    Each client is a data holder with its own lifetime chain; every client follows the real
    client's plan: q = 1/⌈n/B⌉, steps = epochs·⌈n/B⌉ (n its declared size), ε composed by
    the accountant over its whole lifetime history, a round refused when it would take the
    lifetime ε over ``budget`` or what this run added over ``run_budget`` (default: the
    lifetime budget; it is also the run's ``target-epsilon``).

    ``ledgers`` (partition → :class:`ClientLedger`) carries holders across runs: pass the
    same dict to a second call (with another ``run_id``) and its holders extend their chains;
    every participating holder's ledger.jsonl then holds its whole chain from seq 1, the
    earlier entries written with its first entry of the run, as the server writes them.
    ``participants`` limits which of ``range(clients)`` take part in this run.

    ``distinct`` gives every client its own σ and its own n (so its own q): a non-IID
    federation where no two clients share a mechanism, the audit's worst case. Dishonest
    clients for tests: ``under_report = {pid: 0.8}`` makes client ``pid`` claim 0.8 × its
    true ε (in the ledger and in what the server records), ``enforce_budget=False`` lets
    clients train past their budgets.
    """
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    rec = recomputer or Recomputer()
    run_budget = budget if run_budget is None else run_budget
    holders = ledgers if ledgers is not None else {}
    taking_part = sorted(set(range(clients) if participants is None else participants))
    lines: list[LedgerEntry] = []
    round_records = []
    sent: set[int] = set()  # holders whose earlier entries are already in this run's ledger
    at_start: dict[int, float] = {}
    for pid in taking_part:
        if pid not in holders:
            holders[pid] = ClientLedger(f"data-set-{pid}")
        at_start[pid] = holders[pid].epsilon_spent
    spent = dict(at_start)
    for r in range(1, rounds + 1):
        record = {"round": r, "sampled": list(taking_part), "clients": [], "failures": []}
        for pid in taking_part:
            holder = holders[pid]
            n, s = _declared(pid, num_examples, batch_size, distinct), _sigma(pid, sigma, distinct)
            k = math.ceil(n / batch_size)
            q, steps = 1.0 / k, epochs * k
            client: dict[str, object] = {"partition_id": pid, "num_examples": n}
            if dp:
                history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in holder.entries]
                after = rec.epsilon([*history, (s, q, steps)], delta, accountant)
                after *= (under_report or {}).get(pid, 1.0)
                over = after > budget or after - at_start[pid] > run_budget
                if over and enforce_budget:
                    record["failures"].append(
                        {"partition_id": pid, "refused": True,
                         "reason": f"privacy budget exhausted: ε would reach {after:.4f}"}
                    )  # fmt: skip
                    continue
                before = spent[pid]
                spent[pid] = after
                entry = holder.append(
                    run_id=run_id, round=r, partition_id=pid, node_id=str(1000 + pid),
                    num_examples=n, batch_size=batch_size, epochs=epochs, sample_rate=q,
                    steps=steps, noise_multiplier=s, max_grad_norm=1.0, delta=delta,
                    accountant=accountant, epsilon_cumulative=after, epsilon_budget=budget,
                    run_epsilon_budget=run_budget, signer=(signers or {}).get(pid),
                )  # fmt: skip
                if pid not in sent:  # the first reply of the run carries the whole chain
                    lines.extend(holder.entries[:-1])
                    sent.add(pid)
                lines.append(entry)
                client |= {
                    "epsilon": after, "round_epsilon": after - before, "noise_multiplier": s,
                    "sample_rate": q, "steps": steps, "max_grad_norm": 1.0, "delta": delta,
                    "chain_id": holder.chain_id,
                }  # fmt: skip
            else:
                client |= dict.fromkeys(
                    ("epsilon", "round_epsilon", "noise_multiplier", "sample_rate", "steps",
                     "max_grad_norm", "delta", "chain_id"),
                )  # fmt: skip
            record["clients"].append(client)
        this_run = [v for p, v in spent.items() if dp and v > at_start[p]]
        record |= {
            "test_accuracy": min(0.95, 0.3 + 0.1 * r), "test_loss": 2.0 / r,
            "max_epsilon": max(this_run) if this_run else None,
            "federated_evaluation": None, "duration_s": 1.0,
        }  # fmt: skip
        round_records.append(record)
    trained = {p: v for p, v in spent.items() if dp and v > at_start[p]}
    metrics = {
        "config": {
            "dataset": "digits", "model": "lenet5", "partitioning": "iid",
            "num-server-rounds": rounds, "local-epochs": epochs, "batch-size": batch_size,
            "min-train-nodes": len(taking_part), "dp": dp, "target-epsilon": run_budget,
            "target-delta": delta, "max-grad-norm": 1.0, "noise-multiplier": 0.0,
            "accountant": accountant,
        },
        "summary": {
            "run_id": int(run_id) if run_id.isdigit() else run_id, "dataset": "digits",
            "train_examples": len(taking_part) * num_examples, "model": "lenet5",
            "wall_seconds": 12.5,
        },
        "initial": {"test_accuracy": 0.1, "test_loss": 2.3},
        "rounds": round_records,
        "final": {
            "test_accuracy": round_records[-1]["test_accuracy"] if round_records else None,
            "test_loss": round_records[-1]["test_loss"] if round_records else None,
            "max_epsilon": max(trained.values()) if trained else None,
            "epsilon_by_partition": {str(k): v for k, v in sorted(trained.items())},
        },
    }  # fmt: skip
    (root / RunDir.METRICS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if dp and ledger:
        write_ledger(root / LEDGER_FILE, lines)
    return root


def _declared(pid: int, num_examples: int, batch_size: int, distinct: bool) -> int:
    """The client's declared n: with ``distinct``, ten sizes (so ten q) among the clients."""
    return num_examples + (pid % 10) * batch_size if distinct else num_examples


def _sigma(pid: int, sigma: float, distinct: bool) -> float:
    return sigma * (1 + 0.002 * pid) if distinct else sigma


def main(argv: list[str] | None = None) -> int:
    """Build a synthetic ledger and time ``audit_run`` on it."""
    from common.audit.audit import audit_run
    from common.logs import configure_logging

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
