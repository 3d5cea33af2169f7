"""Where a simulated run's wall time goes: start-up, per-round phases, client compute, overhead.

Full: ``mnist-iid-dp`` and ``mnist-nodp``, 10 clients, 5 rounds (MNIST from
``benchmarks.common.SHARED_DATA``; skipped, saying why, when it is not there), plus
``mnist-iid-dp`` again at ``reply-poll-interval=3.0``, which polls for replies like Flower's
stock grid (a fixed 3 s sleep) once a phase is more than ~6 s old (the back-off from 0.05 s
reaches 3 s by then; shorter phases, such as partition discovery, still poll faster).
``--quick``: ``digits-dp`` (3 clients, 3 rounds, offline) at both poll intervals. A 1-round
warm-up run starts the local SuperLink first, so no measured run pays for it.

Definitions (seconds; everything from ``metrics.json`` except the total wall time):

- wall: the ``fedvault simulate`` subprocess, start to exit.
- start-up: wall − ServerApp wall (``summary.wall_seconds``) + ``summary.startup_s``, i.e.
  ``flwr run``, the SuperLink run, Ray and the ServerApp process starting, then the
  ServerApp loading data, building the model, the round-0 evaluation, partition discovery.
- per round: ``timing.train_phase_s`` (train messages built → aggregation done, so it holds
  the clients' training and the wait for the last reply), ``aggregate_s``,
  ``train_reply_lag_s`` (newest train reply created → aggregation starts: what the reply
  polling costs, plus relaying), ``evaluate_phase_s`` (federated), ``central_eval_s``.
- client train: Σ of each client's ``train_local`` seconds from the clients' log lines
  (``benchmarks.common.client_train_seconds``; not the data, model, privacy
  calibration and ledger work around it in the client's handler).
- parallel actors: how many ClientApps run at once. Flower's Ray backend builds
  ⌊CPUs Ray sees / client-resources-num-cpus⌋ actors per Ray node
  (``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``);
  ``common/ops/simulate.py`` sets ``client-resources-num-cpus=1``, and Ray counts the CPUs this
  process may use (``ray._private.utils.get_num_cpus``: affinity and cgroup quota). A phase
  never runs more ClientApps at once than it has clients, so actors = min(CPUs, clients).
- overhead: wall − Σ client train / actors − Σ central eval (round 0
  included): everything that is not model compute spread over the actors — start-up,
  polling, serialisation, sealing, the client handlers' work around training, report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import SHARED_DATA, save, simulate, table

ROUNDS_FULL, CLIENTS_FULL = 5, 10
ROUNDS_QUICK, CLIENTS_QUICK = 3, 3
STOCK_POLL = 3.0  # Flower 1.41's HttpGrid sleeps this long between pulls for replies


def ray_cpus() -> int:
    """The CPU count Ray's head node reports by default (what sizes Flower's actor pool)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:  # private Ray API: fall back to what it is derived from
        return len(os.sched_getaffinity(0))


def split(run: dict[str, Any], clients: int) -> dict[str, Any]:
    """The wall-time split of one ``benchmarks.common.ops.simulate`` result (see module doc)."""
    m = run["metrics"]
    summary, rounds = m["summary"], m["rounds"]
    wall = run["wall_seconds"]
    actors = min(ray_cpus(), clients)

    def total(key: str) -> float:
        return sum(r["timing"].get(key, 0.0) for r in rounds)

    client_train = run["client_train_seconds"]
    central = total("central_eval_s") + summary.get("initial_eval_s", 0.0)
    compute = sum(client_train) / actors + central
    n = len(rounds)
    return {
        "rounds": n,
        "clients": clients,
        "parallel_actors": actors,
        "wall_s": wall,
        "serverapp_wall_s": summary["wall_seconds"],
        "startup_s": wall - summary["wall_seconds"] + summary["startup_s"],
        "serverapp_startup_s": summary["startup_s"],
        "train_phase_s_per_round": total("train_phase_s") / n,
        "train_phase_s_by_round": [r["timing"].get("train_phase_s") for r in rounds],
        "aggregate_s_per_round": total("aggregate_s") / n,
        "train_reply_lag_s_per_round": total("train_reply_lag_s") / n,
        "federated_eval_s_per_round": total("evaluate_phase_s") / n,
        "central_eval_s_per_round": total("central_eval_s") / n,
        "central_eval_s_total": central,
        "client_train_s_sum": sum(client_train),
        "client_train_s_mean": sum(client_train) / max(len(client_train), 1),
        "overhead_s": wall - compute,
        "overhead_fraction": (wall - compute) / wall,
        "final_test_accuracy": m["final"]["test_accuracy"],
    }


def _rows(label: str, s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (label, f"{s['wall_s']:.1f} s wall ({s['serverapp_wall_s']:.1f} s in the ServerApp), "
                f"{s['rounds']} rounds, {s['clients']} clients, {s['parallel_actors']} actors"),
        ("  start-up", f"{s['startup_s']:.1f} s "
                       f"(ServerApp's own {s['serverapp_startup_s']:.1f} s)"),
        ("  per round: train phase", f"{s['train_phase_s_per_round']:.2f} s "
                                     f"(aggregation {s['aggregate_s_per_round']:.3f} s; by round "
                                     + " ".join(f"{t:.1f}" for t in s["train_phase_s_by_round"])
                                     + ")"),
        ("  per round: reply lag", f"{s['train_reply_lag_s_per_round']:.2f} s from the newest "
                                   "train reply's creation to aggregation (relay + polling)"),
        ("  per round: evaluation", f"federated {s['federated_eval_s_per_round']:.2f} s, "
                                    f"central {s['central_eval_s_per_round']:.2f} s"),
        ("  client train", f"Σ {s['client_train_s_sum']:.1f} s, "
                           f"{s['client_train_s_mean']:.2f} s per client per round"),
        ("  overhead", f"{s['overhead_s']:.1f} s = {100 * s['overhead_fraction']:.0f}% of wall"),
    ]  # fmt: skip


def run(quick: bool = False) -> dict[str, Any]:
    stock = [f"reply-poll-interval={STOCK_POLL}"]
    if quick:
        scenario, rounds, clients, sets = "digits-dp", ROUNDS_QUICK, CLIENTS_QUICK, []
        plan = [("digits-dp", []), (f"digits-dp, poll {STOCK_POLL:g} s", stock)]
    else:
        if not (SHARED_DATA / "MNIST" / "raw").is_dir():
            reason = f"{SHARED_DATA / 'MNIST' / 'raw'} is missing (MNIST, torchvision layout)"
            print(f"simulation: skipped: {reason}; `python -m benchmarks simulation --quick` "
                  "runs offline on digits")  # fmt: skip
            save("simulation", {"skipped": reason})
            return {"skipped": reason}
        scenario, rounds, clients = "mnist-iid-dp", ROUNDS_FULL, CLIENTS_FULL
        sets = [f"data-dir={SHARED_DATA}"]
        plan = [
            ("mnist-iid-dp", []),
            (f"mnist-iid-dp, poll {STOCK_POLL:g} s", stock),
            ("mnist-nodp", []),
        ]
    result: dict[str, Any] = {"rounds": rounds, "clients": clients, "ray_cpus": ray_cpus()}
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        simulate("digits-dp", out / "warmup", "num-server-rounds=1")  # start the SuperLink
        for i, (label, extra) in enumerate(plan):
            name = label.split(",")[0]
            r = simulate(name, out / str(i), f"num-server-rounds={rounds}", *sets, *extra,
                         clients=clients)  # fmt: skip
            result[label] = split(r, clients)
            rows += _rows(label, result[label])
    print(f"simulation: where the wall time goes ({scenario} family; see benchmarks/simulation.py)")
    table(rows)
    save("simulation", result)
    return result
