"""``fedvault simulate --ray-address``: a real two-node Ray cluster on this machine (a head and a
worker, each `ray start` in its own process group, 1 CPU each, loopback), a real run against
it with ClientApp actors on both nodes (read from Ray's GCS: ``ray-cluster.json``), and the
worker killed mid-run ending in a recorded outcome within a bound, never a hang. Every Ray
process of the cluster is stopped afterwards (its process groups, checked).

The fast tests check the address handling (one line for an unreachable or malformed address,
no hang) and the resources per client taken from the scenario.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.config import ConfigError
from common.ops.scenarios import Scenario

RAY = Path(sys.executable).parent / "ray"
FEDVAULT = Path(sys.executable).parent / "fedvault"
RUN_TIMEOUT_S = 420  # a 1-3 round digits run on 2 cores takes ~30-60 s; a hang ends here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pgid_alive(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                pids.append(int(stat.parent.name))
    return pids


def _kill_group(pgid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pgid_alive(pgid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pgid_alive(pgid):
        time.sleep(0.2)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


class Cluster:
    """A head and a worker node started with `ray start`, each in its own process group."""

    def __init__(self) -> None:
        # short: Ray's Unix sockets live under it (a socket path has ~107 characters)
        self.root = Path(tempfile.mkdtemp(prefix="fvray-", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.groups: dict[str, int] = {}
        self.env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, name: str, args: list[str]) -> None:
        proc = subprocess.Popen(
            [str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--disable-usage-stats"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.groups[name] = proc.pid  # its daemons keep this process group
        out, _ = proc.communicate(timeout=120)
        (self.root / f"{name}.log").write_text(out)
        assert proc.returncode == 0, f"ray start ({name}) failed:\n{out[-3000:]}"

    def start(self) -> None:
        self._start("head", [
            "--head", "--port", str(self.port), "--temp-dir", str(self.root / "h"),
            "--include-dashboard=false", "--ray-client-server-port", str(_free_port()),
        ])  # fmt: skip
        self._start("worker", [
            "--address", self.address, "--resources", '{"fedvault-worker": 1}',
        ])  # fmt: skip

    def stop(self) -> None:
        for name in ("worker", "head"):
            if name in self.groups:
                _kill_group(self.groups[name])
        left = {name: _pgid_alive(pgid) for name, pgid in self.groups.items()}
        left["by path"] = [
            int(c.parent.name) for c in Path("/proc").glob("[0-9]*/cmdline")
            if str(self.root).encode() in _read(c)
        ]  # fmt: skip
        assert not any(left.values()), f"Ray processes left: {left}"
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_superlink(tmp_path):
    """Environment for a `fedvault` child process with its own FLWR_HOME and SuperLink port;
    that SuperLink is stopped at the end."""
    env = {**os.environ, "FEDVAULT_FLWR_HOME": str(tmp_path / "flwr-home"),
           "FEDVAULT_SUPERLINK_PORT": str(_free_port()),
           "RAY_DISABLE_USAGE_STATS": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    try:
        yield env
    finally:
        subprocess.run([str(FEDVAULT), "superlink", "stop"], env=env, timeout=60,
                       capture_output=True, check=False)  # fmt: skip


def _simulate(env: dict, out: Path, address: str, rounds: int) -> list[str]:
    return [
        str(FEDVAULT), "simulate", "digits-dp", "--num-clients", "2", "--output-dir", str(out),
        "--ray-address", address, "--set", f"num-server-rounds={rounds}",
        "--set", "min-train-nodes=2", "--set", "local-epochs=1",
    ]  # fmt: skip


def _listing(record: dict) -> str:
    lines = [f"Ray cluster {record['address']}: ClientAppActor actors per node"]
    for node in record["nodes"]:
        role = "head" if node.get("head") else "worker"
        lines.append(f"  node {node['node_id'][:16]} ({role}, alive={node['alive']}, "
                     f"reachable={node.get('reachable')}): "
                     f"{len(node['actors'])} actor(s)")  # fmt: skip
        for actor in node["actors"]:
            death = f" - {actor['death'][:90]}" if actor.get("death") else ""
            lines.append(f"    {actor['actor_id'][:16]} pid {actor['pid']} {actor['state']}"
                         f" restarts={actor['restarts']}{death}")  # fmt: skip
    return "\n".join(lines)


def _run_dir(out: Path) -> Path | None:
    dirs = [p for p in out.iterdir() if p.is_dir() and p.name.isdigit()] if out.exists() else []
    return dirs[0] if dirs else None


@pytest.mark.slow
def test_simulate_runs_clients_on_both_nodes(ray_cluster, own_superlink, tmp_path):
    out = tmp_path / "runs"
    started = time.monotonic()
    done = subprocess.run(_simulate(own_superlink, out, ray_cluster.address, rounds=1),
                          env=own_superlink, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = _run_dir(out)
    assert run_dir is not None
    record = json.loads((run_dir / "ray-cluster.json").read_text())
    print(f"\n{_listing(record)}\nfedvault simulate took {seconds:.1f}s")
    with_actors = [n for n in record["nodes"] if n["actors"]]
    assert len(with_actors) == 2, _listing(record)
    assert {bool(n.get("head")) for n in with_actors} == {True, False}
    assert any("fedvault-worker" in n["resources"] for n in with_actors)
    assert record["nodes_lost"] == []
    assert "ClientApp actors per node" in done.stderr  # the line fedvault prints
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["rounds"][0]["clients"]) == 2


def _worker_actor_running(cluster: Cluster) -> bool:
    for pid in _pgid_alive(cluster.groups["worker"]):
        with contextlib.suppress(OSError):
            if b"ClientAppActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


@pytest.mark.slow
def test_worker_node_killed_mid_run_ends_recorded(ray_cluster, own_superlink, tmp_path):
    out = tmp_path / "runs"
    log = (tmp_path / "simulate.log").open("w")
    proc = subprocess.Popen(_simulate(own_superlink, out, ray_cluster.address, rounds=3),
                            env=own_superlink, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        # mid-run: the first round recorded, the worker's actor alive
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            run_dir = _run_dir(out)
            metrics = run_dir / "metrics.json" if run_dir else None
            if metrics and metrics.exists() and _worker_actor_running(ray_cluster):
                with contextlib.suppress(ValueError):
                    if json.loads(metrics.read_text()).get("rounds"):
                        break
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before the worker could be killed"
        killed_at = time.monotonic()
        os.killpg(ray_cluster.groups["worker"], signal.SIGKILL)  # the node dies, no goodbye
        code = proc.wait(timeout=RUN_TIMEOUT_S)  # a hang fails here
        ended_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "simulate.log").read_text()
    run_dir = _run_dir(out)
    assert run_dir is not None, text[-3000:]
    record = json.loads((run_dir / "ray-cluster.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    failures = [f for r in metrics["rounds"] for f in r.get("failures", [])]
    lost_rounds = [
        (r.get("round"), f.get("partition_id"), f["reason"].splitlines()[0][:100])
        for r in metrics["rounds"] for f in r.get("failures", [])
    ]  # fmt: skip
    print(f"\n{_listing(record)}\nexit {code}, ended {ended_after:.1f}s after the kill; "
          f"{len(metrics['rounds'])} round(s) recorded, failures: "
          f"{lost_rounds}\n"
          f"last lines: {text.strip().splitlines()[-3:]}")  # fmt: skip
    assert record["nodes_lost"], _listing(record)  # the record names the lost node
    lost = [n for n in record["nodes"] if n["node_id"] in record["nodes_lost"]]
    assert all(not n.get("head") for n in lost)
    if code == 0:  # recovered on the head node: what was lost is in the rounds' failures
        assert failures, metrics["rounds"]
        assert all("ray.exceptions" in f["reason"] for f in failures), failures
        assert len(metrics["rounds"]) == 3
        assert "lost during the run" in text
    else:  # a recorded failure: fedvault's one line
        assert "fedvault: error:" in text or "failed" in text, text[-3000:]


# -- fast: the address and the resources -------------------------------------------------------
def test_unreachable_address_is_one_line_not_a_hang():
    from common.ops.simulate import resolve_ray_address

    port = _free_port()  # nothing listens on it
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        resolve_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10


def test_address_from_environment_and_bad_forms(monkeypatch):
    from common.ops.simulate import resolve_ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_ray_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve_ray_address(None) is None
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert resolve_ray_address(None) == address
        assert resolve_ray_address(address) == address
    with pytest.raises(ConfigError, match="RAY_ADDRESS 'nonsense' is not HOST:PORT"):
        monkeypatch.setenv("RAY_ADDRESS", "nonsense")
        resolve_ray_address(None)
    with pytest.raises(ConfigError, match="Ray Client address"):
        resolve_ray_address("ray://127.0.0.1:10001")


def test_client_resources_come_from_the_scenario(tmp_path):
    from common.ops.simulate import federation_config

    def scenario(federation: dict) -> Scenario:
        return Scenario("s", tmp_path / "s.toml", "", {}, 2, federation)

    assert federation_config(scenario({}), 3) == "num-supernodes=3 client-resources-num-cpus=1"
    assert federation_config(
        scenario({"client-resources-num-cpus": 2, "client-resources-num-gpus": 0.5}), 4
    ) == "num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.5"
    with pytest.raises(ConfigError, match="client-resources-num-cpus"):
        federation_config(scenario({"client-resources-num-cpus": "two"}), 2)
