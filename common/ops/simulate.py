"""Running a scenario through Flower's simulation engine, the way ``flwr run .`` does.

``fedvault simulate`` is a thin driver around ``flwr run``: it merges the scenario with the
user's overrides, checks before launch what can be checked (names, data, keys, output dir),
writes the run config as a TOML file, and runs the app in this checkout on a local SuperLink
in simulation mode (Ray underneath).

The SuperLink is this environment's own: its ``FLWR_HOME`` and port are derived from
``sys.prefix`` (the virtual environment), so two environments never share one, and a
SuperLink found on this environment's port is checked to run this environment's packages
before it is reused. It is started with runtime dependency installation switched off,
because offline the SuperLink would otherwise try to ``pip install`` the app and fail.
Flower keeps it running between runs so the next run starts fast; ``fedvault superlink
status`` shows it and ``fedvault superlink stop`` ends it (:func:`stop_local_superlink`).

Ctrl-C (SIGINT) or SIGTERM cancels a run: it is stopped in Flower (``flwr stop``), the
simulation process that ran it and everything under it (Ray, the ClientApps) is ended, and
what it finished is kept and marked cancelled (``CANCELLED`` in the run dir and
``summary.cancelled`` in ``metrics.json``); :class:`RunCancelled` says so.

``--ray-address HOST:PORT`` (or ``RAY_ADDRESS``) runs the ClientApp actors on an existing
Ray cluster instead of a Ray started for the run (docs/scale.md). The address reaches the
process that calls ``ray.init`` (Flower's ``flwr-simulation``, under the SuperLink) through
the SuperLink's environment; a SuperLink started with another address is restarted when idle
and refused while it runs something. Without an address the run starts its own local Ray
(``RAY_ADDRESS=local``: never a cluster that ``ray start`` left on this machine). Resources
per client come from the scenario's ``[federation]`` (``client-resources-num-cpus``, default
1, and ``client-resources-num-gpus``); no CPU or GPU count is passed to ``ray.init``. After a
cluster run its actors per node, and the nodes that died, are written to the run dir's
``ray-cluster.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import ConfigError, RunConfig
from common.files import file_lock, read_json_object, write_json_atomic
from common.logs import find_user_error, one_line
from common.ops import flower
from common.ops.flower import ANSI, RUN_ID, FlowerMissingError
from common.ops.scenarios import PROJECT_ROOT, Scenario
from common.paths import default_cache_dir
from common.rundir import RunDir

log = logging.getLogger("fedvault.simulate")

# Ports of this environment's SuperLink: BASE + STEP·(hash of sys.prefix mod SLOTS), below
# Linux's ephemeral range (32768-60999), so no outgoing connection takes it.
PORT_BASE, PORT_STEP, PORT_SLOTS = 29200, 4, 700
CANCEL_GRACE_S = 8.0  # SIGTERM → SIGKILL for the run's processes
RUN_ID_WAIT_S = 20.0  # a cancel before `flwr run` named the run waits this long for its id
PID_WAIT_S = 30.0  # ... and this long for the ServerApp's process to show itself
RAY_CONNECT_TIMEOUT_S = 5.0  # a Ray cluster's GCS must answer a TCP connect this fast
RAY_RECORD_TIMEOUT_S = 60.0  # reading a cluster's actors for ray-cluster.json, at most
RAY_CLUSTER_FILE = "ray-cluster.json"
DEATH_MESSAGE = re.compile(r'error_message: "((?:[^"\\]|\\.)*)"')  # in an actor's DeathCause
#: Resources per client taken from a scenario's [federation] (Flower's federation options).
CLIENT_RESOURCE_KEYS = ("client-resources-num-cpus", "client-resources-num-gpus")


class SimulationError(RuntimeError):
    """The simulation did not produce results; the message says where to look."""


class AppError(SimulationError):
    """An error the user can fix, raised inside the ServerApp or a ClientApp (its one line)."""


class RunCancelled(Exception):
    """The user cancelled the run (SIGINT/SIGTERM); what it finished is kept, marked cancelled."""

    def __init__(self, message: str, run_dir: Path | None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    run_dir: Path
    log_file: Path
    seconds: float
    holders: Path  # the simulated federation (keys-dir): reuse it to keep lifetime budgets


# -- this environment's SuperLink ------------------------------------------------------------
def environment_key() -> str:
    """A short hash of this interpreter's environment (``sys.prefix``)."""
    return hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:12]


def flower_home_root() -> Path:
    """Where every environment's fedvault ``FLWR_HOME`` lives (one sub-dir per environment)."""
    return default_cache_dir() / "flwr-home"


def superlink_port() -> int:
    """``$FEDVAULT_SUPERLINK_PORT``, or this environment's own port."""
    if port := os.environ.get("FEDVAULT_SUPERLINK_PORT"):
        return int(port)
    return PORT_BASE + PORT_STEP * (int(environment_key(), 16) % PORT_SLOTS)


def flower_env() -> dict[str, str]:
    """Environment for ``flwr``: this environment's SuperLink home/port, no runtime installs."""
    home = os.environ.get("FEDVAULT_FLWR_HOME") or flower_home_root() / environment_key()
    port = superlink_port()
    return flower.flower_env(home, {
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(port + 2),
        "RAY_DEDUP_LOGS": "0",
    })  # fmt: skip


@dataclass(frozen=True)
class SuperLinkProcess:
    pid: int
    port: int | None
    home: Path | None  # FLWR_HOME, from its --log-file
    bin_dir: Path | None  # where its flower-superlink script is: its environment

    @property
    def ours(self) -> bool:
        return self.bin_dir is not None and _same(self.bin_dir, flower.bin_dir())


def _same(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve()
    return a == b


def _cmdline(pid: int | str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def superlinks() -> list[SuperLinkProcess]:
    """Every running ``flower-superlink`` (Linux: read from /proc)."""
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        args = _cmdline(proc_dir.name)
        script = next((a for a in args[:2] if Path(a).name == "flower-superlink"), None)
        if script is None:
            continue
        port = _option(args, "--port")
        log_file = _option(args, "--log-file")
        found.append(SuperLinkProcess(
            int(proc_dir.name),
            int(port) if port and port.isdigit() else None,
            Path(log_file).parent.parent if log_file else None,
            Path(script).parent if "/" in script else None,
        ))  # fmt: skip
    return found


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def local_superlink_pids(home: str) -> list[int]:
    """The ``flower-superlink`` processes ``flwr run`` started for FLWR_HOME ``home``."""
    return [s.pid for s in superlinks() if s.home is not None and _same(s.home, Path(home))]


def check_superlink(env: dict[str, str]) -> None:
    """Refuse to run on a SuperLink on this environment's port that is not this environment's
    (another venv's would run its own torch/opacus/flwr while the console names this one)."""
    port, home = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), Path(env["FLWR_HOME"])
    for link in superlinks():
        if link.port != port:
            continue
        if not link.ours or link.home is None or not _same(link.home, home):
            raise SimulationError(
                f"port {port} is held by a SuperLink of another environment or FLWR_HOME "
                f"(pid {link.pid}, "
                f"{link.bin_dir or '?'}, FLWR_HOME {link.home or '?'}): stop it with "
                "`fedvault superlink stop` in that environment, or set FEDVAULT_SUPERLINK_PORT"
            )


def superlink_status(env: dict[str, str] | None = None) -> dict[str, Any]:
    """This environment's SuperLink (home, port, pids) and fedvault's others on this machine."""
    env = env or flower_env()
    home, port = Path(env["FLWR_HOME"]), int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    links = superlinks()
    own = [s for s in links if s.home is not None and _same(s.home, home)]
    root = flower_home_root().resolve()
    others = [
        s for s in links
        if s not in own and s.home is not None and str(s.home.resolve()).startswith(str(root))
    ]  # fmt: skip
    return {"environment": sys.prefix, "home": home, "port": port, "own": own, "others": others}


def stop_local_superlink(env: dict[str, str] | None = None, timeout: float = 10.0) -> list[int]:
    """Stop the SuperLink that ``flwr run`` started for this environment's ``FLWR_HOME``
    (Linux); waits up to ``timeout`` s for it to exit."""
    pids = local_superlink_pids((env or flower_env())["FLWR_HOME"])
    return _terminate(pids, timeout)


def _terminate(pids: list[int], grace: float) -> list[int]:
    """SIGTERM ``pids``, SIGKILL what is left after ``grace`` s; the pids signalled."""
    signalled = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in signalled):
        time.sleep(0.1)
    for pid in signalled:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return signalled


def _alive(pid: int) -> bool:
    """Running (a zombie has finished: it only waits for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def process_tree(root: int) -> list[int]:
    """``root`` and every process under it, parents first (Linux: from /proc)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid in tree:
            continue
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return [p for p in tree if _alive(p)]


# -- an existing Ray cluster -----------------------------------------------------------------
def resolve_ray_address(given: str | None) -> str | None:
    """The Ray cluster a run uses: ``--ray-address``, else ``$RAY_ADDRESS``; None (or
    ``local``) for a Ray of the run's own. A ``HOST:PORT`` must accept a TCP connection within
    RAY_CONNECT_TIMEOUT_S, checked here so that a wrong address fails in one line, not in a
    hang inside the simulation."""
    source = "--ray-address" if given else "RAY_ADDRESS"
    address = (given or os.environ.get("RAY_ADDRESS") or "").strip()
    if address in ("", "local"):
        return None
    if address == "auto":
        return address  # Ray resolves it (the cluster `ray start` last started here)
    if address.startswith("ray://"):
        raise ConfigError(
            f"{source} {address} is a Ray Client address, which Flower's simulation does not "
            "use: pass the cluster's GCS address HOST:PORT (`ray start --head` prints it)"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{source} {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or one_line(err) or type(err).__name__
        raise ConfigError(
            f"no Ray cluster answers at {address} ({source}: {reason}): start one with "
            f"`ray start --head --port {port}` on {host}, or fix {source}"
        ) from None
    return address


def federation_config(scenario: Scenario, supernodes: int) -> str:
    """Flower's ``--federation-config``: the SuperNodes and the resources per client from the
    scenario's ``[federation]`` (the Ray cluster's size is the cluster's, not the run's)."""
    resources = {"client-resources-num-cpus": 1}
    for key in CLIENT_RESOURCE_KEYS:
        if key in scenario.federation:
            value = scenario.federation[key]
            if type(value) not in (int, float) or value < 0:
                raise ConfigError(
                    f"scenario {scenario.path}: [federation] {key} = {value!r} is not a "
                    "number ≥ 0"
                )
            resources[key] = value
    return " ".join(f"{k}={v}" for k, v in {"num-supernodes": supernodes, **resources}.items())


def _process_env(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def _ray_name(address: str | None) -> str:
    return f"RAY_ADDRESS={address}" if address and address != "local" else "a Ray of its own"


def check_superlink_ray(env: dict[str, str]) -> None:
    """This environment's running SuperLink must hand the run's Ray address to the simulation
    it starts (it passes on its own environment, not this run's): one started with another
    address is stopped when idle (``flwr run`` starts a new one), refused when busy."""
    want = env.get("RAY_ADDRESS")
    for pid in local_superlink_pids(env["FLWR_HOME"]):
        have = (_process_env(pid) or {}).get("RAY_ADDRESS")
        if have == want:
            continue
        busy = [p for p in process_tree(pid) if "flwr-simulation" in " ".join(_cmdline(p)[:2])]
        if busy:
            raise SimulationError(
                f"this environment's SuperLink (pid {pid}) is running a simulation on "
                f"{_ray_name(have)}, this run asks for {_ray_name(want)}: wait for that run, "
                "or give this one its own SuperLink (FEDVAULT_FLWR_HOME and "
                "FEDVAULT_SUPERLINK_PORT)"
            )
        log.info("restarting this environment's SuperLink (pid %d): it was started with %s, "
                 "this run uses %s", pid, _ray_name(have), _ray_name(want))  # fmt: skip
        _terminate([pid], CANCEL_GRACE_S)


def cluster_record(address: str, since: float, timeout: float = RAY_RECORD_TIMEOUT_S) -> dict:
    """The cluster's nodes and the ClientApp actors started since ``since`` (epoch s), per
    node, read from Ray's GCS (no dashboard needed) in a child process bounded by
    ``timeout`` (a cluster that stopped answering cannot hang the run's end)."""
    code = ("import json, sys; from common.ops.simulate import _read_cluster; "
            "print(json.dumps(_read_cluster(sys.argv[1], float(sys.argv[2]))))")  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, address, str(since)], capture_output=True, text=True,
            timeout=timeout, cwd=PROJECT_ROOT, env={**os.environ, "RAY_ADDRESS": address},
            check=False,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        error = one_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
    except subprocess.TimeoutExpired:
        error = f"no answer in {timeout:.0f}s"
    return {"address": address, "error": f"could not read the cluster: {error}"}


def _read_cluster(address: str, since: float) -> dict:
    """(In a child process) nodes and ClientAppActor actors from the cluster's GCS."""
    import ray
    from ray._private.state import state

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = {
            n["NodeID"]: {
                "node_id": n["NodeID"], "alive": bool(n["Alive"]),
                "head": "node:__internal_head__" in n.get("Resources", {}),
                "address": n.get("NodeManagerAddress"),
                # the GCS marks a killed node dead only after its health checks fail (~15 s
                # and more): a node whose raylet refuses connections is lost already
                "reachable": _answers(n.get("NodeManagerAddress"), n.get("NodeManagerPort")),
                "resources": {k: v for k, v in n.get("Resources", {}).items()
                              if not k.startswith("node:")},
                "actors": [],
            }
            for n in ray.nodes()
        }  # fmt: skip
        for actor in state.actor_table(None).values():
            if actor.get("ActorClassName") != "ClientAppActor":
                continue
            if float(actor.get("StartTime") or 0) / 1000 < since:
                continue
            node = (actor.get("Address") or {}).get("NodeID")
            entry = nodes.setdefault(node, {"node_id": node, "alive": None, "actors": []})
            cause = DEATH_MESSAGE.search(str(actor.get("DeathCause") or ""))
            death = cause.group(1).encode().decode("unicode_escape") if cause else ""
            entry["actors"].append({
                "actor_id": actor["ActorID"], "pid": actor.get("Pid"),
                "state": actor.get("State"), "restarts": int(actor.get("NumRestarts") or 0),
                **({"death": one_line(death)[:300]} if death else {}),
            })  # fmt: skip
    finally:
        ray.shutdown()
    lost = [
        n["node_id"] for n in nodes.values()
        if n["actors"] and (n["alive"] is False or n.get("reachable") is False)
    ]  # fmt: skip
    return {"address": address, "nodes": list(nodes.values()), "nodes_lost": lost}


def _answers(host: str | None, port: int | None, timeout: float = 2.0) -> bool | None:
    if not host or not port:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout):
            return True
    except OSError:
        return False


def cluster_summary(record: dict) -> str:
    """One line: ClientApp actors per node (head/worker, alive or lost)."""
    if "error" in record:
        return f"ray cluster {record['address']}: {record['error']}"
    parts = []
    for n in record["nodes"]:
        role = "head" if n.get("head") else "worker"
        status = ", LOST" if n["node_id"] in record["nodes_lost"] else ""
        parts.append(f"node {str(n['node_id'])[:12]} ({role}{status}): {len(n['actors'])}")
    return f"ray cluster {record['address']}: ClientApp actors per node: " + "; ".join(parts)


def _record_cluster(address: str, since: float, run_dir: Path | None) -> None:
    """Write ``ray-cluster.json`` into the run dir (when there is one) and log its line."""
    record = cluster_record(address, since)
    line = cluster_summary(record)
    log.info("%s", line)
    sys.stderr.write(f"fedvault: {line}\n")
    if record.get("nodes_lost"):
        lost = ", ".join(str(n)[:12] for n in record["nodes_lost"])
        log.warning("%s", warning := (
            f"Ray node(s) {lost} lost during the run: their clients' rounds are failures in "
            f"{RunDir.METRICS} (rounds[].failures); the nodes in {RAY_CLUSTER_FILE}"))  # fmt: skip
        sys.stderr.write(f"fedvault: {warning}\n")
    if run_dir is not None:
        with contextlib.suppress(OSError):
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / RAY_CLUSTER_FILE, record)


# -- checks before launch ----------------------------------------------------------------------
def build_run_config(
    scenario: Scenario, overrides: dict[str, Any], output_dir: Path | None
) -> dict[str, Any]:
    """Scenario ∪ overrides, validated, with every path made absolute against the user's
    working directory (the SuperLink runs the apps from its own directory)."""
    merged = {**scenario.run_config, **overrides}
    if output_dir is not None:
        merged["output-dir"] = str(output_dir)
    for key in ("output-dir", "data-dir", "keys-dir", "encrypted-data-dir", "test-data"):
        value = merged.get(key, RunConfig().to_mapping()[key])
        if value:
            merged[key] = absolute(str(value))
    RunConfig.from_mapping(merged)
    return merged


def absolute(path: str | Path) -> str:
    """``path`` with ``~`` expanded, resolved against the working directory."""
    return str(Path(path).expanduser().resolve())


def prepare_output_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and check it takes files: one line, not an OSError traceback."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".fedvault-write-check-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ConfigError(
            f"output dir {out_dir} is a file, not a directory: pass another --output-dir"
        ) from None
    except OSError as err:
        reason = err.strerror or one_line(err)
        raise ConfigError(
            f"cannot write into output dir {out_dir} ({reason}): pass a writable --output-dir"
        ) from None
    return out_dir


def preflight(run_config: dict[str, Any], num_clients: int) -> None:
    """What the apps would fail on, checked here first: data set, model and activation names,
    the data present and parseable, encrypted partitions made for these keys."""
    from common.config import OWN_DATA_SOURCES
    from common.data import DATASETS, DataSpec, load_raw_cached
    from common.data.own import holder_path
    from common.data.sources import DataError
    from common.models import ACTIVATIONS, MODEL_NAMES

    cfg = RunConfig.from_mapping(run_config)
    if cfg.dataset not in (*DATASETS, *OWN_DATA_SOURCES):
        raise ConfigError(
            f"unknown dataset {cfg.dataset!r}: --set dataset=<one of "
            f"{[*DATASETS, *OWN_DATA_SOURCES]}>"
        )
    if cfg.model not in MODEL_NAMES:
        raise ConfigError(f"unknown model {cfg.model!r}: --set model=<one of {list(MODEL_NAMES)}>")
    if cfg.activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {cfg.activation!r}: "
            f"--set activation=<one of {sorted(ACTIVATIONS)}>"
        )
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data-dir {cfg.data_dir} is not a directory: fix --set data-dir")
    raw = load_raw_cached(DataSpec.from_config(cfg))  # DataError says what is missing
    if cfg.dataset in OWN_DATA_SOURCES and not cfg.encrypted_data_dir:
        if not cfg.data_dir:
            raise ConfigError(
                f"dataset {cfg.dataset} in a simulation reads client i's data from "
                "<data-dir>/client-<i>: --set data-dir=DIR"
            )
        for pid in range(num_clients):
            path = holder_path(Path(cfg.data_dir), pid, cfg.dataset)
            if not path.exists():
                raise DataError(f"client {pid}'s data {path} not found: fix --set data-dir")
    if (raw.kind == "image") != (cfg.model == "lenet5"):
        fits = "lenet5" if raw.kind == "image" else "text-linear or text-mlp"
        raise ConfigError(
            f"model {cfg.model!r} does not take {raw.kind} data ({cfg.dataset}): --set model={fits}"
        )
    if cfg.encrypted_data_dir:
        _check_encrypted_data(cfg, num_clients, DataError)


def _check_encrypted_data(cfg: RunConfig, num_clients: int, data_error: type) -> None:
    """The encrypted partitions exist for every client and were made for these keys."""
    from common.crypto import load_identity
    from common.data.encrypted import MANIFEST, partition_file
    from common.federation_keys import client_dir

    folder = Path(cfg.encrypted_data_dir)
    fix = "run `fedvault data prepare` into it, or fix --set encrypted-data-dir"
    manifest = read_json_object(
        folder / MANIFEST, what=f"encrypted-data-dir {folder}'s manifest", fix=fix, error=data_error
    )
    try:
        key_ids = dict(manifest["data_key_ids"])
        dataset, num = manifest["dataset"], int(manifest["num_partitions"])
    except (ValueError, KeyError, TypeError) as err:
        raise data_error(
            f"encrypted-data-dir {folder} has no readable {MANIFEST} ({one_line(err)}): {fix}"
        ) from None
    if dataset != cfg.dataset:
        raise ConfigError(
            f"encrypted-data-dir {folder} holds {dataset}, the run asks for {cfg.dataset}: "
            f"--set dataset={dataset}, or prepare {cfg.dataset}"
        )
    if num < num_clients:
        raise ConfigError(
            f"encrypted-data-dir {folder} holds {num} partitions for {num_clients} clients: "
            f"--num-clients {num}, or prepare {num_clients} partitions"
        )
    if not cfg.keys_dir:
        raise ConfigError(
            "encrypted-data-dir needs keys-dir (the keys it was prepared with): --set keys-dir=DIR"
        )
    for pid in range(num_clients):
        if not partition_file(folder, pid).is_file():
            raise data_error(
                f"{partition_file(folder, pid)} is missing: re-run `fedvault data prepare`"
            )
        key_dir = client_dir(Path(cfg.keys_dir), pid)
        passphrase = os.environ.get("FEDVAULT_PASSPHRASE")
        own = load_identity(key_dir, passphrase.encode() if passphrase else None).ids.data
        if own != key_ids.get(str(pid)):
            raise ConfigError(
                f"encrypted partition {pid} in {folder} was made for data key "
                f"{key_ids.get(str(pid))}, but keys-dir {cfg.keys_dir} holds {own} (another "
                "federation's keys): use the keys-dir it was prepared with, or prepare it again "
                f"with --keys {cfg.keys_dir}"
            )


# -- a run -----------------------------------------------------------------------------------
def run_scenario(
    scenario: Scenario,
    *,
    overrides: dict[str, Any] | None = None,
    num_clients: int | None = None,
    output_dir: Path | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run ``scenario`` to completion; raise :class:`SimulationError` if it left no results,
    :class:`RunCancelled` on SIGINT/SIGTERM. ``ray_address`` (else ``$RAY_ADDRESS``): run the
    ClientApps on that Ray cluster (:func:`resolve_ray_address`)."""
    try:
        flwr = flower.flwr_executable()
    except FlowerMissingError as err:
        raise SimulationError(str(err)) from None
    run_config = build_run_config(scenario, overrides or {}, output_dir)
    supernodes = scenario.num_supernodes if num_clients is None else num_clients
    if supernodes < 1:
        raise ConfigError(f"--num-clients must be ≥ 1 (got {supernodes})")
    min_nodes = int(run_config.get("min-train-nodes", RunConfig.min_train_nodes))
    if supernodes < min_nodes:
        raise ConfigError(
            f"{supernodes} clients but min-train-nodes={min_nodes}: raise --num-clients or "
            f"--set min-train-nodes={supernodes}"
        )
    cluster = resolve_ray_address(ray_address)
    federation = federation_config(scenario, supernodes)
    out_dir = prepare_output_dir(Path(run_config["output-dir"]))
    preflight(run_config, supernodes)
    env = flower_env()
    env["RAY_ADDRESS"] = cluster or "local"
    check_superlink(env)
    check_superlink_ray(env)
    holders = simulated_holders(run_config, scenario, out_dir, supernodes)
    run_config["keys-dir"] = str(holders)

    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    with tempfile.NamedTemporaryFile("wb", prefix="fedvault-run-", suffix=".toml",
                                     delete=False) as f:  # fmt: skip
        tomli_w.dump(run_config, f)
        config_file = Path(f.name)
    cmd = [flwr, "run", str(PROJECT_ROOT), "--stream", "--run-config", str(config_file),
           "--federation-config", federation]  # fmt: skip
    log.info("scenario %s: %d clients on %s; %s", scenario.name, supernodes,
             _ray_name(cluster), " ".join(cmd))  # fmt: skip
    log_file = out_dir / f"simulation-{stamp}.log"
    started = time.time()
    stream: _Stream | None = None
    try:
        try:
            with _cancel_signals():
                stream = _Stream(cmd, env, log_file, verbose)
                code = stream.wait()
        except (KeyboardInterrupt, _Terminated) as sig:
            if stream is None:
                raise KeyboardInterrupt from None  # nothing was started
            name = "SIGTERM" if isinstance(sig, _Terminated) else "SIGINT"
            with _signals_ignored():
                raise _cancel(stream, out_dir, env, flwr, log_file, name) from None
    finally:
        config_file.unlink(missing_ok=True)
    seconds = time.time() - started
    run_id = stream.run_id
    if cluster is not None:
        _record_cluster(cluster, started, out_dir / run_id if run_id else None)
    if stream.user_error:
        _keep_log(log_file, out_dir, run_id)
        raise AppError(stream.user_error)
    if code != 0 or run_id is None:
        raise SimulationError(f"`flwr run` failed (exit {code}){stream.failure()}: see {log_file}")
    run_dir = out_dir / run_id
    if not RunDir(run_dir).model_path.exists():
        final_log = _keep_log(log_file, out_dir, run_id)
        raise SimulationError(
            f"run {run_id} did not finish (no {RunDir.MODEL} in {run_dir}){stream.failure()}: "
            f"see {final_log}"
        )
    final_log = _keep_log(log_file, out_dir, run_id)
    return SimulationResult(run_id, run_dir, final_log, seconds, Path(run_config["keys-dir"]))


def _keep_log(log_file: Path, out_dir: Path, run_id: str | None) -> Path:
    """Move the run's log to ``<run-dir>/simulation.log`` when the run has a directory."""
    if run_id is None or not log_file.exists():
        return log_file
    run_dir = RunDir(out_dir / run_id)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    final = run_dir.log_path
    log_file.replace(final)
    return final


class _Stream:
    """``flwr run --stream`` in its own session (a terminal's Ctrl-C reaches fedvault, which
    cancels the run, not ``flwr run`` alone), its output read by a thread: every line into
    the log file, the run id and any app-side user error picked out, the lines worth showing
    shown."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_file: Path, verbose: bool):
        self.run_id: str | None = None
        self.user_error: str | None = None
        self.verbose = verbose
        self.last_exception: str | None = None
        self.last_line = ""
        self._in_traceback = False
        self._events: queue.Queue[str] = queue.Queue()
        self._sink = log_file.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                plain = ANSI.sub("", line)
                self._sink.write(plain)
                self._sink.flush()
                self._note(plain)
                if self.verbose or (self.user_error is None and _worth_showing(line)):
                    sys.stderr.write(line)
                    sys.stderr.flush()
        finally:
            self._sink.close()
            self._events.put("eof")

    def _note(self, plain: str) -> None:
        if self.run_id is None and (m := RUN_ID.search(plain)):
            self.run_id = m.group(1)
            self._events.put("run-id")
        if self.user_error is None and (message := find_user_error(plain)):
            self.user_error = message
        if plain.strip():
            self.last_line = " ".join(plain.split())
        if plain.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
        elif self._in_traceback and plain.strip() and not plain[0].isspace():
            self.last_exception = " ".join(plain.split())
            self._in_traceback = False

    def wait(self) -> int:
        """Until ``flwr run`` exits and its output is read (signals interrupt this)."""
        while self._reader.is_alive():
            self._reader.join(0.2)
        return self.proc.wait()

    def wait_for_run_id(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while self.run_id is None and self._reader.is_alive() and time.monotonic() < deadline:
            self._reader.join(0.2)
        return self.run_id

    def failure(self) -> str:
        """What the output says went wrong: the last exception, else its last line."""
        last = self.last_exception or self.last_line
        return f": {last}" if last else ""

    def stop(self, grace: float) -> None:
        """End ``flwr run`` (its session: nothing of it is left) and finish reading."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(grace)


@contextlib.contextmanager
def _cancel_signals() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt (Python's default); SIGTERM raises :class:`_Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(_signum: int, _frame: Any) -> None:
        raise _Terminated()

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While a cancellation cleans up (bounded): a second Ctrl-C must not leave it half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _cancel(
    stream: _Stream, out_dir: Path, env: dict[str, str], flwr: str, log_file: Path, why: str
) -> RunCancelled:
    """Stop the run in Flower, end every process of it, keep and mark what it finished.

    The simulation process that runs the ServerApp, and everything under it (Ray, the
    ClientApps), is frozen first (SIGSTOP: nothing trains or records from here on), then the
    run is stopped in Flower (``flwr stop``: the SuperLink marks it stopped and starts nothing
    more of it), then the frozen processes are killed. ``flwr stop`` alone would end the
    process only at its next heartbeat, up to ~30 s later."""
    sys.stderr.write(f"fedvault: {why}: cancelling the run (this takes a few seconds)\n")
    sys.stderr.flush()
    run_id = stream.wait_for_run_id(RUN_ID_WAIT_S)
    if run_id is None:  # the run never started: ending `flwr run` ends everything
        stream.stop(CANCEL_GRACE_S)
        return RunCancelled(f"{why}: cancelled before the run started (log: {log_file})", None)
    run_dir = out_dir / run_id
    pid = _serverapp_pid(run_dir)
    frozen = _freeze(pid) if pid else []
    stopped = subprocess.run(
        [flwr, "stop", run_id], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if pid is None:  # cancelled while the simulation process was still starting
        pid = _wait_for_serverapp(run_dir, env, stream)
        frozen = _freeze(pid) if pid else []
    _kill(frozen)
    stream.stop(CANCEL_GRACE_S)
    RunDir(run_dir).clear_pid()
    with contextlib.suppress(OSError), log_file.open("a", encoding="utf-8") as sink:
        sink.write(f"\n[fedvault] {why}: `flwr stop {run_id}` → exit {stopped.returncode}: "
                   f"{' '.join((stopped.stdout + stopped.stderr).split())}\n")  # fmt: skip
    done = RunDir(run_dir).mark_cancelled(why)
    final_log = _keep_log(log_file, out_dir, run_id)
    return RunCancelled(
        f"run {run_id} cancelled ({why}) after {done} completed round(s); what it finished is "
        f"in {run_dir} ({RunDir.METRICS}, {RunDir.LOG}; marked cancelled)"
        if done
        else f"run {run_id} cancelled ({why}) before its first round ended; log: {final_log}",
        run_dir,
    )


def _serverapp_pid(run_dir: Path) -> int | None:
    """The simulation process running this run's ServerApp, from its pid file."""
    pid = RunDir(run_dir).read_pid()
    if pid is None:
        return None
    return pid if _alive(pid) and "flwr-simulation" in " ".join(_cmdline(pid)[:2]) else None


def _start_ticks(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _wait_for_serverapp(run_dir: Path, env: dict[str, str], stream: _Stream) -> int | None:
    """Wait for the ServerApp's pid file while a simulation process that may be this run's
    (started under this SuperLink after this `flwr run`) is alive; at most PID_WAIT_S."""
    since = _start_ticks(stream.proc.pid)
    deadline = time.monotonic() + PID_WAIT_S
    while time.monotonic() < deadline:
        if (pid := _serverapp_pid(run_dir)) is not None:
            return pid
        candidates = [
            p for link in local_superlink_pids(env["FLWR_HOME"]) for p in process_tree(link)
            if "flwr-simulation" in " ".join(_cmdline(p)[:2]) and _start_ticks(p) >= since
        ]  # fmt: skip
        if not candidates:
            return None
        time.sleep(0.2)
    return None


def _freeze(pid: int) -> list[int]:
    """SIGSTOP ``pid`` and everything under it (collected again until no new process shows)."""
    frozen: list[int] = []
    for _ in range(5):
        fresh = [p for p in process_tree(pid) if p not in frozen]
        if not fresh:
            break
        for p in fresh:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGSTOP)
        frozen += fresh
    return frozen


def _kill(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + CANCEL_GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)


# -- simulated holders -----------------------------------------------------------------------
def simulated_holders(
    run_config: dict[str, Any], scenario: Scenario, out_dir: Path, num_clients: int
) -> Path:
    """The simulated data holders: ``client-<i>/`` with identity, ``policy.toml`` and (once
    they train) ``state/``, plus ``server/``.

    A new holder's policy comes from the *scenario file* (:func:`simulated_policy`), never
    from ``--set``: the overrides are the operator's request, which the holders judge.

    With run-config ``keys-dir`` that federation is kept: its holders' lifetime budgets carry
    over from run to run, as real holders' would, and a policy already there is the holder's
    own and is never rewritten. Without it every run gets a fresh federation in
    ``<output-dir>/federations/`` -- fresh holders whose lifetime starts with that run.
    Provisioning holds a lock on the federation, so concurrent runs can share one.
    """
    from common.federation_keys import client_dir, provision
    from common.privacy.policy import POLICY_FILE

    if run_config.get("keys-dir"):
        keys_dir = Path(run_config["keys-dir"])
        log.info("simulated holders: %s (kept: lifetime budgets continue)", keys_dir)
    else:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        keys_dir = out_dir / "federations" / stamp
        log.info(
            "simulated holders: %s (new; pass --set keys-dir=%s to keep them, and their "
            "spent budgets, for the next run)", keys_dir, keys_dir,
        )  # fmt: skip
    agreed = RunConfig.from_mapping(scenario.run_config)
    dataset = RunConfig.from_mapping(run_config).dataset
    try:
        # one provisioning at a time per federation (concurrent runs on one kept keys-dir)
        with file_lock(keys_dir / ".provision.lock"):
            provision(keys_dir, num_clients)
            for i in range(num_clients):
                path = client_dir(keys_dir, i) / POLICY_FILE
                if not path.exists():
                    simulated_policy(agreed, dataset, i).save(path)
    except (FileExistsError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(
            f"cannot use keys-dir {keys_dir} ({err.strerror or one_line(err)}"
            f"{': ' + str(err.filename) if err.filename else ''}): fix --set keys-dir"
        ) from None
    return keys_dir


def simulated_policy(cfg: RunConfig, dataset: str, partition_id: int):
    """What a simulated holder agrees to, from the scenario file: its ``target-epsilon`` as the
    lifetime budget, its δ, accountant, DP and sealing. It releases federated evaluation,
    because a simulated holder's data is a slice of a public data set; a real holder
    decides that itself."""
    from common.privacy.policy import PrivacyPolicy

    return PrivacyPolicy(
        dataset_id=f"{dataset}-partition-{partition_id}",
        lifetime_epsilon=cfg.target_epsilon,
        delta=cfg.target_delta,
        accountant=cfg.accountant,
        require_dp=cfg.dp,
        require_sealing=cfg.encrypt_updates,
        release_evaluation=True,
    )


def _worth_showing(line: str) -> bool:
    """Lines shown without ``-v``: fedvault's own, the run id, refusals and Flower's errors
    (once, in Flower's console format; tracebacks stay in the log)."""
    plain = ANSI.sub("", line)
    if find_user_error(plain):
        return False  # printed once, as fedvault's own error line, at the end
    return (
        "fedvault.server" in plain
        or plain.startswith("ERROR ")
        or "refuses" in plain
        or "Successfully started run" in plain
    ) and "Exit Code:" not in plain
