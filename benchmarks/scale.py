"""Scale: 100, 1000 and 10,000 simulated clients, 10 sampled per round (``--quick``: 20 and
100 on digits, offline), IID and Dirichlet partitions. Per setting one ``fedvault simulate``
run: when round 1 starts after the ServerApp does (the server asks only the sampled nodes
their partition, see server/strategy.py), round 1, the steady rounds, the clients' own
training time, and the peak memory of the whole process tree (``fedvault simulate`` and every
descendant, plus the detached local SuperLink with its SuperExec, the simulation's Ray
driver, Ray's services and actors), sampled every 0.5 s.

What is compared: the per-client configuration is the same for every N (batch size 16, one
local epoch, DP at the scenario's ε), so a client of the N=1000 federation has a tenth of the
data of one of N=100 (MNIST: 600, 60 and 6 examples at N=100, 1000, 10,000: 38, 4 and 1
DP-SGD steps a round; at 10,000 a client's one Poisson batch is its whole partition, q=1). A round's
work grows with the *sampled* clients (10 for every N); what grows with the *total* clients
is overhead -- that is what the ratios show. The clients' median training seconds are
printed beside the round times so the per-client work is visible.

``FEDVAULT_SCALE=iid:1000,10000`` (partitionings, then client counts) runs only those
settings, e.g. to measure 10,000 without the Dirichlet runs; ratios compare each N with the
next smaller one run.

Each run gets its own ``FLWR_HOME`` and SuperLink port (so it never touches another
simulation on this machine), and its SuperLink is stopped after the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO,
    SHARED_DATA,
    TreeMemory,
    client_train_seconds,
    free_port,
    import_psutil,
    median,
    save,
    timestamped_lines,
)
from common.ops.simulate import local_superlink_pids
from common.rundir import RunDir

SAMPLED = 10
BATCH_SIZE = 16
ROUNDS, QUICK_ROUNDS = 4, 3
FULL = {"dataset": "mnist", "clients": (100, 1000, 10_000),
        "scenarios": {"iid": "mnist-iid-dp", "dirichlet": "mnist-dirichlet-dp"}}  # fmt: skip
QUICK = {"dataset": "digits", "clients": (20, 100),
         "scenarios": {"iid": "digits-dp", "dirichlet": "digits-dp"}}  # fmt: skip
ROUND_1 = re.compile(r"\[ROUND 1/")
DISCOVERED = re.compile(r"partitions by node: ")
SERVER_APP = re.compile(r"fedvault\.server: run \d+: results in")
ROUND_1_SAMPLED = re.compile(r"round 1: train sampled partitions")
EVENTS = {  # output lines whose arrival times are kept (seconds after the command started)
    "run started": r"Successfully started run",
    "ServerApp started": r"fedvault\.server: run \d+: results in",
    "initial evaluation done": r"Initial global evaluation results",
    "round 1 begins (discovery starts)": r"\[ROUND 1/",
    "partitions discovered": r"partitions by node: ",
    "round 1 starts (train sampled)": r"round 1: train sampled partitions",
    "round 1 done": r"fedvault\.server: round 1/",
    "last round done": r"Strategy execution finished",
}
DIRICHLET_ALPHA = 0.5  # the scenario's; the partition check below also tries smaller ones
RUN_TIMEOUT_S = 3600


def overrides(n: int, partitioning: str, rounds: int, data_dir: str) -> list[str]:
    """Run-config overrides: 10 of ``n`` sampled, same per-client work for every ``n``.

    Sampling (server/strategy.py) picks ``min(max(int(nodes × fraction-train),
    min-train-nodes), nodes)``: fraction 10/n with min-train-nodes 10 gives exactly 10
    (min-train-nodes also makes the server wait for 10 connected nodes). fraction-evaluate
    = 0 skips federated evaluation (the server still evaluates centrally every round).
    """
    sets = [
        f"num-server-rounds={rounds}",
        f"fraction-train={SAMPLED / n!r}",
        f"min-train-nodes={SAMPLED}",
        "fraction-evaluate=0.0",
        f"batch-size={BATCH_SIZE}",
        "learning-rate=0.5",
        f"partitioning='{partitioning}'",
        f"dirichlet-alpha={DIRICHLET_ALPHA}",
    ]
    if data_dir:
        sets.append(f"data-dir='{data_dir}'")
    return sets


def stop_superlink(home: str) -> None:
    """SIGTERM this run's SuperLink (only the one with our FLWR_HOME); wait for its tree."""
    ps = import_psutil()
    procs = []
    for pid in local_superlink_pids(home):
        try:
            proc = ps.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
            proc.terminate()
        except ps.Error:
            continue
    _, alive = ps.wait_procs(procs, timeout=20)
    for proc in alive:
        with contextlib.suppress(ps.Error):
            proc.kill()


def one_run(scenario: str, n: int, partitioning: str, rounds: int, data_dir: str,
            work: Path) -> dict[str, Any]:  # fmt: skip
    """One ``fedvault -v simulate`` run, its output timestamped as it arrives."""
    home = str(work / f"flwr-home-{partitioning}-{n}")
    port = free_port(span=3)
    env = dict(os.environ, FEDVAULT_FLWR_HOME=home, FEDVAULT_SUPERLINK_PORT=str(port))
    out = work / f"runs-{partitioning}-{n}"
    cmd = [sys.executable, "-m", "common.ops.cli", "-v", "simulate", scenario, "--num-clients",
           str(n), "--output-dir", str(out)]  # fmt: skip
    for s in overrides(n, partitioning, rounds, data_dir):
        cmd += ["--set", s]
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
    reader = threading.Thread(target=timestamped_lines, args=(proc.stdout, lines), daemon=True)
    started = time.time()
    try:
        reader.start()
        link: list[int] = []

        def roots() -> list[int]:  # the SuperLink is detached from `flwr run`: find it once
            if not link:
                link.extend(local_superlink_pids(home))
            return [proc.pid, *link]

        with TreeMemory(roots) as memory:
            code = proc.wait(RUN_TIMEOUT_S)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_superlink(home)
    wall = time.time() - started
    if code != 0:
        tail = "".join(line for _, line in lines[-40:])
        raise RuntimeError(f"simulate {scenario} with {n} clients failed (exit {code}):\n{tail}")
    run_dir = max((p for p in out.iterdir() if RunDir(p).has_metrics()),
                  key=lambda p: p.stat().st_mtime)  # fmt: skip
    metrics = RunDir(run_dir).read_metrics()
    events = {}
    for name, pattern in EVENTS.items():
        t = _first(lines, re.compile(pattern))
        events[name] = None if t is None else t - started
    calibration = calibration_seconds(metrics)  # after the run: on an otherwise idle tree
    return summarise(metrics, lines, wall) | memory.result() | {
        "run_dir": str(run_dir), "events_s": events, "sigma_calibration": calibration,
        "sigma_calibration_median_seconds": calibration["median_s"],
        "privacy_plans": calibration["plans"]}  # fmt: skip


def _first(lines: list[tuple[float, str]], pattern: re.Pattern[str]) -> float | None:
    return next((t for t, line in lines if pattern.search(line)), None)


def round_seconds(r: dict[str, Any]) -> float:
    """A round's wall time as the ServerApp recorded it: from sending the round's train
    messages (after sampling, so round 1's partition discovery is not in it) to the end of
    its central evaluation."""
    return float(r["duration_s"])


def summarise(metrics: dict[str, Any], lines: list[tuple[float, str]],
              wall: float) -> dict[str, Any]:  # fmt: skip
    rounds = metrics["rounds"]
    seconds = [round_seconds(r) for r in rounds]
    steady = rounds[1:]
    round_1, found = _first(lines, ROUND_1), _first(lines, DISCOVERED)
    # The partition query goes to every node between "[ROUND 1/R]" and the line that lists
    # what they answered; both lines come through the same log stream (about 0.5 s jitter).
    discovery = None if round_1 is None or found is None else found - round_1
    server_app, sampled_1 = _first(lines, SERVER_APP), _first(lines, ROUND_1_SAMPLED)
    round_1_start = None if server_app is None or sampled_1 is None else sampled_1 - server_app
    train = client_train_seconds("".join(line for _, line in lines), from_round=2)
    examples = [c["num_examples"] for r in rounds for c in r["clients"]]
    seen: set[int] = set()
    first_timers = []  # sampled clients taking part for the first time (σ calibrated then)
    for r in rounds:
        first_timers.append(len(set(r["sampled"]) - seen))
        seen |= set(r["sampled"])
    timing = [r.get("timing") or {} for r in rounds]
    return {
        "wall_seconds": wall,
        "server_seconds": metrics["summary"].get("wall_seconds"),
        "startup_seconds": metrics["summary"].get("startup_s"),
        "discovery_seconds": discovery,
        # ServerApp's first line → round 1's train messages built (nodes sampled and asked)
        "round_1_start_after_serverapp_seconds": round_1_start,
        "round_1_done_after_serverapp_seconds": (
            None if round_1_start is None else round_1_start + seconds[0]
        ),
        "round_seconds": seconds,
        "round_1_seconds": seconds[0],
        "steady_round_median_seconds": median(seconds[1:]),
        "steady_train_phase_median_seconds": median(
            [t["train_phase_s"] for t in timing[1:] if "train_phase_s" in t]
        ),
        "central_eval_median_seconds": median(
            [t["central_eval_s"] for t in timing if "central_eval_s" in t]
        ),
        "first_time_clients_per_round": first_timers,
        "client_train_median_seconds": median(train),
        "client_examples_median": median(examples),
        "client_examples_min": min(examples, default=None),
        "sampled_per_round": [len(r["sampled"]) for r in rounds],
        "clients_trained_per_round": [len(r["clients"]) for r in rounds],
        "failures": [f for r in rounds for f in r["failures"]],
        "round_timing": timing,
        "final_test_accuracy": metrics["final"]["test_accuracy"],
        "max_epsilon": metrics["final"]["max_epsilon"],
        "steady_rounds": [r["round"] for r in steady],
    }


def calibration_seconds(metrics: dict[str, Any], most: int = 3) -> dict[str, Any]:
    """Seconds of one σ calibration (a PRV search), redone here for up to ``most`` distinct
    plans (q, planned steps) of the run's clients: the call client/app.py makes when a client
    first takes part. The ClientApp caches it per process and plan, so a simulation pays it
    once per actor and distinct plan (IID: one plan; Dirichlet: one per distinct q)."""
    from common.privacy.accounting import calibrate_noise

    calibrate_noise = getattr(calibrate_noise, "__wrapped__", calibrate_noise)  # no cache

    cfg = metrics["config"]
    if not cfg.get("dp", True):
        return {"median_s": None, "cases": [], "plans": 0}
    rounds = cfg["num-server-rounds"]
    clients = [c for r in metrics["rounds"] for c in r["clients"] if c["sample_rate"]]
    plans = sorted({(c["sample_rate"], c["steps"] * rounds) for c in clients})
    k = min(most, len(plans))  # smallest q, largest q and between
    picks = [plans[i * (len(plans) - 1) // max(1, k - 1)] for i in range(k)]
    cases = []
    for q, steps in dict.fromkeys(picks):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's RDP/PRV numerics warnings
            calibrate_noise(
                target_epsilon=cfg["target-epsilon"], target_delta=cfg["target-delta"],
                sample_rate=q, total_steps=steps, accountant=cfg["accountant"],
            )  # fmt: skip
        cases.append({"sample_rate": q, "planned_steps": steps,
                      "seconds": time.perf_counter() - started})  # fmt: skip
    return {"median_s": median([c["seconds"] for c in cases]), "cases": cases,
            "plans": len(plans)}  # fmt: skip


def dirichlet_check(dataset: str, data_dir: str, n: int, alphas: tuple[float, ...],
                    seed: int = 42) -> dict[str, Any]:  # fmt: skip
    """What common.data.partition gives ``n`` clients for each α: sizes, or its refusal.

    The partitioner redraws (up to 1000 times, deterministically) until every client holds
    ≥ 2 examples, and raises ValueError if no draw does; a client with 0 examples can thus
    never reach training (sample_rate_for would refuse it).
    """
    from common.data import DataSpec, load_raw_cached
    from common.data.partition import dirichlet_partition

    labels = load_raw_cached(DataSpec(dataset, data_dir, seed)).train_y
    result: dict[str, Any] = {}
    for alpha in alphas:
        started = time.perf_counter()
        try:
            sizes = np.array([len(p) for p in dirichlet_partition(labels, n, alpha, seed)])
        except ValueError as err:
            result[str(alpha)] = {"error": str(err), "seconds": time.perf_counter() - started}
            continue
        result[str(alpha)] = {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
            f"clients_below_batch_{BATCH_SIZE}": int((sizes < BATCH_SIZE).sum()),
            "clients_below_5": int((sizes < 5).sum()),
            "seconds": time.perf_counter() - started,
        }
    return result


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def selection(setting: dict[str, Any]) -> tuple[dict[str, str], tuple[int, ...]]:
    """The settings to run: all of ``setting``, or those ``FEDVAULT_SCALE`` names
    (``iid,dirichlet:1000,10000``; either side may be left empty for all)."""
    scenarios, clients = dict(setting["scenarios"]), tuple(setting["clients"])
    chosen = os.environ.get("FEDVAULT_SCALE", "").strip()
    if not chosen:
        return scenarios, clients
    kinds, _, counts = chosen.partition(":")
    if kinds.strip():
        scenarios = {k: scenarios[k] for k in (x.strip() for x in kinds.split(",")) if k}
    if counts.strip():
        clients = tuple(int(x.replace("_", "")) for x in counts.split(",") if x.strip())
    return scenarios, clients


def run(quick: bool = False) -> dict[str, Any]:
    setting = QUICK if quick else FULL
    rounds = QUICK_ROUNDS if quick else ROUNDS
    data_dir = ""
    if setting["dataset"] == "mnist":
        if not (SHARED_DATA / "MNIST" / "raw").is_dir():
            print(f"scale: no MNIST in {SHARED_DATA}; skipped (use --quick for digits)")
            return {}
        data_dir = str(SHARED_DATA)
    scenarios, clients = selection(setting)
    result: dict[str, Any] = {
        "dataset": setting["dataset"],
        "rounds": rounds,
        "sampled_per_round": SAMPLED,
        "batch_size": BATCH_SIZE,
        "dirichlet_alpha": DIRICHLET_ALPHA,
        "clients": list(clients),
        "runs": {},
    }
    print(f"scale: {setting['dataset']}, {SAMPLED} clients sampled per round, {rounds} rounds, "
          f"batch {BATCH_SIZE}, DP on, sealed updates; N = {', '.join(map(str, clients))}")  # fmt: skip  # noqa: E501
    with tempfile.TemporaryDirectory(prefix="fedvault-scale-") as tmp:
        for partitioning, scenario in scenarios.items():
            for n in clients:
                r = one_run(scenario, n, partitioning, rounds, data_dir, Path(tmp))
                result["runs"][f"{partitioning}/{n}"] = r
                print(f"  {partitioning} {n}: round 1 starts "
                      f"{_fmt(r['round_1_start_after_serverapp_seconds'])} s after the ServerApp, "
                      f"rounds {', '.join(f'{s:.1f}' for s in r['round_seconds'])} s, "
                      f"peak tree RSS {r['peak_tree_rss_mb']:.0f} MB, wall {r['wall_seconds']:.0f} s",  # noqa: E501
                      flush=True)  # fmt: skip
    if "dirichlet" in scenarios:
        alphas = (0.5, 0.3, 0.1) if not quick else (0.5,)
        result["dirichlet_partition_check"] = {
            str(n): dirichlet_check(setting["dataset"], data_dir, n, alphas) for n in clients
        }
    _print_table(result, clients)
    save("scale", result)
    return result


def _print_table(result: dict[str, Any], clients: tuple[int, ...]) -> None:
    runs = result["runs"]
    cols = [  # (header, key, format)
        ("r1 start", "round_1_start_after_serverapp_seconds", ".1f"),
        ("discov.", "discovery_seconds", ".1f"),
        ("start-up", "startup_seconds", ".1f"),
        ("round 1", "round_1_seconds", ".1f"),
        ("steady", "steady_round_median_seconds", ".1f"),
        ("train", "client_train_median_seconds", ".2f"),
        ("σ calib.", "sigma_calibration_median_seconds", ".1f"),
        ("plans", "privacy_plans", "d"),
        ("ex/cl", "client_examples_median", ".0f"),
        ("RSS MB", "peak_tree_rss_mb", ".0f"),
        ("PSS MB", "peak_tree_pss_mb", ".0f"),
        ("wall", "wall_seconds", ".0f"),
    ]
    print("  seconds except where named; r1 start = from the ServerApp's first line to round 1's "
          "train messages (sampling and the partition query of the sampled nodes);\n  discov. = "
          "round 1's partition query (sampled nodes only); round 1 / steady (median of rounds "
          "2..R) exclude it;\n  train = a client's DP-SGD "
          "seconds (median); σ calib. = one σ calibration (PRV search), paid once per actor "
          "and plan;\n  plans = distinct (q, steps) among the clients that trained; "
          "new = first-time clients in rounds 2..R")  # fmt: skip
    print(f"  {'N':>10} {'partition':<9} " + " ".join(f"{h:>8}" for h, _, _ in cols) + "  new")
    for key, r in runs.items():
        partitioning, n = key.split("/")
        cells = " ".join(f"{_fmt(r[k], f):>8}" for _, k, f in cols)
        print(f"  {n:>10} {partitioning:<9} {cells}  {r['first_time_clients_per_round'][1:]}")
    ratios: dict[str, dict[str, float | None]] = {}
    for partitioning in ("iid", "dirichlet"):
        ran = [n for n in clients if f"{partitioning}/{n}" in runs]
        for small, large in itertools.pairwise(ran):
            a, b = runs[f"{partitioning}/{small}"], runs[f"{partitioning}/{large}"]
            q = {k: (b[k] / a[k] if a[k] and b[k] is not None else None) for _, k, _ in cols}
            ratios[f"{partitioning}/{large}/{small}"] = q
            cells = " ".join(f"{_fmt(q[k], '.2f') + 'x':>8}" for _, k, _ in cols)
            print(f"  {f'{large}/{small}':>10} {partitioning:<9} {cells}")
    result["ratios"] = ratios
    print("  peak RSS by process kind (MB):")
    for key, r in runs.items():
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb_by_kind"].items())
        print(f"    {key}: {kinds}")
    if "dirichlet_partition_check" in result:
        print("  Dirichlet(α) partition sizes (examples per client):")
    for n, checks in result.get("dirichlet_partition_check", {}).items():
        for alpha, c in checks.items():
            what = (c["error"] if "error" in c else
                    f"min {c['min']}, median {c['median']:.0f}, max {c['max']}, "
                    f"{c[f'clients_below_batch_{BATCH_SIZE}']} below one batch")  # fmt: skip
            print(f"    N={n} α={alpha}: {what} ({c['seconds']:.1f} s)")
