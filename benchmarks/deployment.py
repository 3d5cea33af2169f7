"""Deployment round latency: a real ``flower-superlink`` (TLS, SuperNode authentication) and
2 ``flower-supernode``s on 127.0.0.1, provisioned with ``fedvault provision``'s code, each
client's partition encrypted under its own key, sealed updates, DP on, digits, LeNet-5.

Settings (the ServerApp's reply polling is the run-config key ``reply-poll-interval``):

* ``before`` -- ``reply-poll-interval=3.0``, Flower's environment defaults. server/grid.py
  still pulls fast at the start of each phase (0.05 s, ×1.5 per empty pull, up to 3 s: the
  first ~8 s of a phase), so this is close to Flower's stock grid, not identical;
* ``after`` -- ``reply-poll-interval`` at its default;
* ``stock-grid`` (full run only) -- the app as of the commit before server/grid.py existed
  (``git archive``), i.e. Flower's own ``send_and_receive`` (a fixed 3-s sleep between pulls);
* ``after+task-poll`` (full run only) -- ``after`` with ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``
  in the SuperLink's and SuperNodes' environment (SuperExec's task polling, Flower default 1 s),
  which needs its own SuperLink and SuperNodes.

If this checkout's run config has no ``reply-poll-interval`` yet, only ``before`` (stock) runs.
Round time = ``duration_s`` in metrics.json (the ServerApp's own clock: from sending a round's
messages to the end of its central evaluation); steady state = rounds 2..R. Reply lag =
``timing.train_reply_lag_s`` (the newest train reply's age when aggregation starts), median
over the steady rounds: what the ServerApp's reply polling adds to a round. Runs of
``before`` and ``after`` alternate on the same SuperLink and SuperNodes. The launching is
what tests/test_deployment.py's fixtures do, on :mod:`common.ops.deploy`'s helpers; every
process runs in its own process group and is stopped on the way out, also on errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, client_train_seconds, free_port, median, save, table
from common.config import RunConfig
from common.ops import deploy
from common.ops.provision import (
    Federation,
    provision_federation,
    supernode_command,
)
from common.rundir import RunDir

NUM_NODES = 2
ROUNDS, QUICK_ROUNDS = 6, 3
REPEATS, QUICK_REPEATS = 2, 1
CONNECT_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 900.0
POLL_KEY = "reply-poll-interval"
STOCK_POLL_S = 3.0


def poll_key_default() -> float | None:
    """``reply-poll-interval``'s default, or None when this checkout does not have the key."""
    for f in dataclasses.fields(RunConfig):
        if f.name == POLL_KEY.replace("-", "_"):
            return float(f.default)  # type: ignore[arg-type]
    return None


@contextlib.contextmanager
def federation_stack(fed: Federation, work: Path, *, tuned: bool) -> Iterator[Path]:
    """SuperLink + registered, online SuperNodes; yields the operator's FLWR_HOME.

    ``tuned`` sets FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 for every Flower process.
    The SuperLink keeps its registrations in memory, so each stack registers afresh.
    """
    tag = "tuned" if tuned else "stock"
    procs: list[deploy.FlowerProcess] = []
    with deploy.stopping(procs):
        procs.append(deploy.start_superlink(fed, work, tuned=tuned, timeout=CONNECT_TIMEOUT_S,
                                            tag=f"-{tag}"))  # fmt: skip
        home = deploy.operator_home(fed, work / f"operator-home-{tag}")
        node_ids = deploy.register_supernodes(fed, home, range(NUM_NODES))
        for pid in range(NUM_NODES):
            cmd = supernode_command(
                fed.clients[pid], fed.superlink_address, NUM_NODES,
                runtime_port=free_port(), state_dir=work / f"state-{tag}-{pid}",
            )  # fmt: skip
            env = deploy.flower_env(work / f"supernode-{tag}-{pid}-home", tuned=tuned)
            log_file = work / f"supernode-{tag}-{pid}.log"
            procs.append(deploy.start_process(f"supernode-{pid}", cmd, log_file, env))
        status = deploy.wait_until_online(home, set(node_ids.values()), CONNECT_TIMEOUT_S)
        if not all(status.get(n) == "online" for n in node_ids.values()):
            raise deploy.DeployError(f"SuperNodes did not come online: {status}")
        yield home


def run_config(fed: Federation, work: Path, enc: Path, rounds: int,
               poll: float | None) -> dict[str, Any]:  # fmt: skip
    config: dict[str, Any] = {
        "num-server-rounds": rounds,
        "batch-size": 32,
        "min-train-nodes": NUM_NODES,
        "encrypt-updates": True,
        "keys-dir": str(fed.superlink.keys_dir),
        "encrypted-data-dir": str(enc),
        "output-dir": str(work / "runs"),
    }
    if poll is not None:
        config[POLL_KEY] = poll
    return config


def export_stock_app(out: Path) -> tuple[Path, str] | None:
    """This repository as of the commit before server/grid.py was added (Flower's own reply
    polling), unpacked into ``out``; None when git or that history is not available."""

    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=False)

    added = git("rev-list", "--reverse", "HEAD", "--", "server/grid.py").stdout.split()
    if not added:
        return None
    parent = git("rev-parse", added[0].decode() + "^").stdout.decode().strip()
    archive = git("archive", "--format=tar", parent).stdout if parent else b""
    if not archive:
        return None
    out.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out, parent


def one_run(home: Path, config: dict[str, Any], log_file: Path, node_logs: list[Path],
            app: Path = REPO) -> dict[str, Any]:  # fmt: skip
    """One run; the clients' training seconds come from what the SuperNodes logged during
    it (clients never send timings: they reveal the data size)."""
    offsets = [p.stat().st_size if p.exists() else 0 for p in node_logs]
    run = deploy.run_app(app, home, config, log_file, timeout=RUN_TIMEOUT_S)
    trained: list[float] = []
    for path, offset in zip(node_logs, offsets, strict=True):
        with path.open("rb") as f:
            f.seek(offset)
            trained += client_train_seconds(f.read().decode(errors="replace"))
    metrics = RunDir(run.run_dir).read_metrics()
    rounds = metrics["rounds"]
    return {
        "run_id": run.run_id,
        "wall_seconds": run.seconds,
        "round_seconds": [float(r["duration_s"]) for r in rounds],
        "client_train_seconds": trained,
        "failures": [f for r in rounds for f in r["failures"]],
        "round_timing": [r.get("timing") for r in rounds] if "timing" in rounds[0] else None,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steady = [s for r in runs for s in r["round_seconds"][1:]]
    timing = [t for r in runs for t in (r["round_timing"] or [])[1:] if t]
    return {
        # newest train reply's age when aggregation starts (what the ServerApp's polling adds)
        "steady_train_reply_lag_median_s": median(
            [t["train_reply_lag_s"] for t in timing if "train_reply_lag_s" in t]
        ),
        "runs": runs,
        "steady_median_s": median(steady),
        "steady_mean_s": statistics.fmean(steady) if steady else None,
        "steady_min_s": min(steady, default=None),
        "steady_max_s": max(steady, default=None),
        "steady_rounds": len(steady),
        "round_1_s": [r["round_seconds"][0] for r in runs],
        "client_train_median_s": median([s for r in runs for s in r["client_train_seconds"]]),
    }


def run(quick: bool = False) -> dict[str, Any]:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    repeats = QUICK_REPEATS if quick else REPEATS
    default_poll = poll_key_default()
    # (name, reply-poll-interval to pass (None: the app's default), tuned env, stock app)
    settings: list[tuple[str, float | None, bool, bool]] = []
    if default_poll is None:
        settings.append(("before", None, False, False))
    else:
        settings += [("before", STOCK_POLL_S, False, False), ("after", None, False, False)]
        if not quick:
            settings += [("stock-grid", None, False, True), ("after+task-poll", None, True, False)]
    print(f"deployment: SuperLink + {NUM_NODES} SuperNodes on 127.0.0.1 (TLS, node auth, "
          f"encrypted partitions, sealed updates), digits, "
          f"{rounds} rounds × {repeats} runs")  # fmt: skip
    if default_poll is None:
        print(f"  ({POLL_KEY} is not a run-config key here: only the stock setting runs)")
    results: dict[str, list[dict[str, Any]]] = {}
    stock_commit = None
    with tempfile.TemporaryDirectory(prefix="fedvault-deploy-") as tmp:
        work = Path(tmp)
        stock = export_stock_app(work / "stock-app") if any(s[3] for s in settings) else None
        if stock is None:
            settings = [s for s in settings if not s[3]]
        else:
            stock_commit = stock[1]
        fed = provision_federation(work / "federation", "127.0.0.1", NUM_NODES, port=free_port())
        enc = work / "encrypted"
        for c in fed.clients:
            deploy.prepare_client_partition(c.identity_dir, c.partition_id, NUM_NODES, enc)
        for tuned in (False, True):
            group = [s for s in settings if s[2] == tuned]
            if not group:
                continue
            with federation_stack(fed, work, tuned=tuned) as home:
                for i in range(repeats):
                    for name, poll, _, old in group:
                        config = run_config(fed, work, enc, rounds, poll)
                        app = stock[0] if old and stock is not None else REPO
                        tag = "tuned" if tuned else "stock"
                        node_logs = [work / f"supernode-{tag}-{p}.log" for p in range(NUM_NODES)]
                        r = one_run(home, config, work / f"run-{name}-{i}.log", node_logs, app)
                        results.setdefault(name, []).append(r)
                        print(f"  {name} run {i + 1}: rounds "
                              f"{', '.join(f'{s:.1f}' for s in r['round_seconds'])} s")  # fmt: skip
    summary = {name: summarise(results[name]) for name, *_ in settings}
    rows = []
    for name, poll, tuned, old in settings:
        s = summary[name]
        what = (
            "Flower's grid, commit " + str(stock_commit)[:10]
            if old
            else "Flower stock"
            if default_poll is None
            else f"{POLL_KEY}={poll if poll is not None else default_poll}"
        )
        what += ", FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1" if tuned else ""
        rows.append((f"{name} ({what})",
                     f"steady median {s['steady_median_s']:.1f} s, "
                     f"mean {s['steady_mean_s']:.1f} s, "
                     f"range {s['steady_min_s']:.1f}-{s['steady_max_s']:.1f} s "
                     f"(n={s['steady_rounds']}); round 1 "
                     f"{', '.join(f'{x:.1f}' for x in s['round_1_s'])} s; "
                     "client training "
                     + ("-" if s["client_train_median_s"] is None
                        else f"{s['client_train_median_s']:.2f} s")
                     + "; reply lag "
                     + ("-" if s["steady_train_reply_lag_median_s"] is None
                        else f"{s['steady_train_reply_lag_median_s']:.2f} s")))  # fmt: skip
    table(rows)
    result: dict[str, Any] = {
        "rounds": rounds,
        "repeats": repeats,
        "reply_poll_interval_default": default_poll,
        "stock_commit": stock_commit,
        "settings": {name: {"reply_poll_interval": None if old else
                            (poll if poll is not None else default_poll),
                            "superexec_task_poll_interval": 0.1 if tuned else None,
                            "stock_app": old}
                     for name, poll, tuned, old in settings},
        **summary,
    }  # fmt: skip
    if "stock-grid" in results:  # that commit predates rounds[].timing: its code really ran
        result["stock_app_ran"] = all(r["round_timing"] is None for r in results["stock-grid"])
    if "before" in summary and "after" in summary:
        before, after = summary["before"]["steady_median_s"], summary["after"]["steady_median_s"]
        result["after_minus_before_median_s"] = after - before
        print(f"  after - before (steady median): {after - before:+.1f} s")
    save("deployment", result)
    return result
