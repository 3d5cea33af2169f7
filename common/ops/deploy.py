"""Driving a deployed federation: real ``flower-superlink``/``flower-supernode`` processes.

:mod:`common.ops.provision` makes the credentials; this module runs them. It is what the
deployment tests and the latency measurements in docs/deploy.md use, and what a
``fedvault deploy`` command would call:

* :func:`flower_env` -- the environment every Flower process needs here (private
  ``FLWR_HOME``, no runtime ``uv sync``, unbuffered logs, optional fast polling);
* :class:`FlowerProcess` / :func:`start_process` -- a process in its own process group,
  its output timestamped into a log file, stopped (group-wide) by :meth:`FlowerProcess.stop`;
* :func:`register_supernodes`, :func:`list_supernodes` -- ``flwr supernode`` over TLS;
* :func:`prepare_client_partition` -- one client's partition, encrypted with that
  client's own data key (on a real edge client no other client's key is present);
* :func:`run_app` (:func:`start_run` + :func:`wait_run`) -- ``flwr run . fedvault
  --stream`` to completion;
* :func:`round_durations` -- each round's wall time, as the ServerApp recorded it.

Why a process group per process: ``flower-supernode`` starts ``flower-superexec``, which
starts one ``flwr-clientapp`` per message; ``flower-superlink`` starts ``flower-superexec``
and ``flwr-serverapp``. Killing the group ends all of them, also on test failures.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from common.crypto import load_identity
from common.data.encrypted import write_partition
from common.ops import flower
from common.ops.flower import ANSI, RUN_ID, TASK_POLL_ENV
from common.ops.provision import (
    CONNECTION_NAME,
    Federation,
    superlink_command,
    write_flwr_config,
)
from common.rundir import RunDir

log = logging.getLogger("fedvault.deploy")

TUNED_TASK_POLL_S = 0.1  # SuperExec's task polling (TASK_POLL_ENV) when ``tuned``


class DeployError(RuntimeError):
    """A deployed run or a Flower command failed; the message says where to look."""


def flower_env(flwr_home: Path | str, *, tuned: bool = False) -> dict[str, str]:
    """Environment for a Flower process of this deployment (:func:`common.ops.flower.flower_env`).

    ``PYTHONUNBUFFERED``: log lines reach the log file when they happen (the refusal checks
    wait for them). ``tuned`` lowers SuperExec's task polling from 1 s to 0.1 s -- the one
    polling interval Flower 1.41 exposes.
    """
    env = flower.flower_env(flwr_home, {"PYTHONUNBUFFERED": "1"})
    if tuned:
        env[TASK_POLL_ENV] = str(TUNED_TASK_POLL_S)
    else:
        env.pop(TASK_POLL_ENV, None)
    return env


# --------------------------------------------------------------------------------------------
# processes


@dataclass
class FlowerProcess:
    """A started Flower process; its output, each line prefixed ``[unix time]``, in ``log``."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[str]
    log: Path
    _pump: threading.Thread | None = field(default=None, repr=False)
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        """Everything logged so far (ANSI colours removed)."""
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float, *, start: int = 0) -> re.Match[str] | None:
        """First match of ``pattern`` in the log (from character ``start``) within
        ``timeout`` seconds; ``None`` if it never came."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if m := regex.search(self.text(), start):
                return m
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the whole process group (graceful: a SuperNode deactivates itself),
        SIGKILL what is left after ``timeout``. Returns the exit status."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group's other members may outlive the leader for a moment: make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(5.0)
        return self.popen.returncode


def start_process(
    name: str, argv: Sequence[str], log_file: Path, env: Mapping[str, str], cwd: Path | None = None
) -> FlowerProcess:
    """Start ``argv`` in a new session (its own process group), logging to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    sink = log_file.open("a", encoding="utf-8")
    assert popen.stdout is not None
    pump = threading.Thread(target=_pump, args=(popen.stdout, sink), daemon=True)
    pump.start()
    log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    return FlowerProcess(name, list(argv), popen, log_file, pump)


def start_superlink(
    fed: Federation, work: Path, *, tuned: bool, timeout: float, tag: str = ""
) -> FlowerProcess:
    """The federation's SuperLink (TLS, SuperNode auth) on 127.0.0.1, up and listening; its
    home is ``work/superlink-home<tag>`` and its log ``work/superlink<tag>.log``. The caller
    stops it (``stopping``). ``DeployError`` with the log's tail if it does not come up."""
    cmd = superlink_command(fed.superlink, host="127.0.0.1", port=fed.superlink_port)
    env = flower_env(work / f"superlink-home{tag}", tuned=tuned)
    proc = start_process("superlink", cmd, work / f"superlink{tag}.log", env)
    if not proc.wait_for(r"Uvicorn running on https://", timeout):
        proc.stop()
        raise DeployError(f"SuperLink did not start:\n{proc.text()[-3000:]}")
    return proc


def _pump(stream: TextIO, sink: io.TextIOBase) -> None:
    """Copy lines with a receive timestamp (Flower's own lines carry none)."""
    with sink:
        for line in stream:
            sink.write(f"[{time.time():.3f}] {ANSI.sub('', line)}")
            sink.flush()


# --------------------------------------------------------------------------------------------
# flwr CLI


def flwr_cli(
    args: Sequence[str], flwr_home: Path, *, timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` against the connection in ``flwr_home/config.toml``."""
    return subprocess.run(
        [flower.flwr_executable(), *args],
        env=flower_env(flwr_home),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def operator_home(fed: Federation, flwr_home: Path, address: str | None = None) -> Path:
    """A private FLWR_HOME whose default connection is ``fed``'s SuperLink over TLS."""
    write_flwr_config(flwr_home, address or fed.superlink_address, fed.superlink.ca_cert)
    return flwr_home


def register_supernodes(
    fed: Federation, flwr_home: Path, partitions: Sequence[int] | None = None
) -> dict[int, int]:
    """``flwr supernode register`` each client's public key; partition id → node id."""
    node_ids = {}
    for pid in range(fed.num_clients) if partitions is None else partitions:
        key = fed.superlink.supernode_public_keys[pid]
        proc = flwr_cli(
            ["supernode", "register", str(key), CONNECTION_NAME, "--name", f"client-{pid}",
             "--format", "json"],
            flwr_home,
        )  # fmt: skip
        reply = _json_reply(proc, "flwr supernode register")
        node_ids[pid] = int(reply["node-id"])
    log.info("registered SuperNodes: %s", node_ids)
    return node_ids


def list_supernodes(flwr_home: Path) -> dict[int, str]:
    """Node id → status (``registered``, ``online``, ``offline``...)."""
    reply = _json_reply(
        flwr_cli(["supernode", "list", CONNECTION_NAME, "--format", "json"], flwr_home),
        "flwr supernode list",
    )
    return {int(n["node-id"]): str(n["status"]) for n in reply["nodes"]}


def wait_until_online(flwr_home: Path, node_ids: set[int], timeout: float) -> dict[int, str]:
    """Poll the SuperLink until every node in ``node_ids`` is online or ``timeout`` passes.

    Returns the last status seen, so a caller can name the nodes that never came online.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = list_supernodes(flwr_home)
        if all(status.get(n) == "online" for n in node_ids) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _json_reply(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = {}
    if not reply.get("success"):
        detail = reply.get("error-message") or (proc.stdout + proc.stderr)[-2000:]
        raise DeployError(f"{what} failed: {ANSI.sub('', str(detail)).strip()}")
    return reply


# --------------------------------------------------------------------------------------------
# data at the edge


def prepare_client_partition(
    identity_dir: Path,
    partition_id: int,
    num_partitions: int,
    out_dir: Path,
    *,
    dataset: str = "digits",
    data_dir: str = "",
    seed: int = 42,
    partitioning: str = "iid",
    alpha: float = 0.5,
) -> Path:
    """Write ``partition-<i>.fvd``: this client's share, encrypted under its own data key.

    ``fedvault data prepare`` encrypts every client's partition at once and so needs every
    client's key dir; a deployed client holds only its own. The container format and file
    name are :mod:`common.data.encrypted`'s, so the ClientApp loads it unchanged.
    """
    target = write_partition(
        out_dir, load_identity(identity_dir), partition_id, num_partitions, dataset=dataset,
        data_dir=data_dir, seed=seed, partitioning=partitioning, alpha=alpha,
    )  # fmt: skip
    log.info("partition %d/%d of %s encrypted to %s", partition_id, num_partitions, dataset, target)
    return target


# --------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class DeployedRun:
    run_id: str
    run_dir: Path
    log_file: Path
    seconds: float


def start_run(
    app_dir: Path, flwr_home: Path, run_config: Mapping[str, Any], log_file: Path
) -> FlowerProcess:
    """Start ``flwr run APP fedvault --stream --run-config FILE`` (returns at once).

    ``output-dir`` (and any other path) must be absolute: the ServerApp runs in the
    SuperLink's process tree, not in this directory.
    """
    if not Path(str(run_config["output-dir"])).is_absolute():
        raise ValueError("run_config['output-dir'] must be an absolute path")
    config_file = log_file.with_suffix(".run-config.toml")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_bytes(tomli_w.dumps(dict(run_config)).encode())
    flwr = flower.flwr_executable()
    cmd = [flwr, "run", str(app_dir), CONNECTION_NAME, "--stream", "--run-config", str(config_file)]
    return start_process("flwr run", cmd, log_file, flower_env(flwr_home), cwd=app_dir)


def wait_run(proc: FlowerProcess, output_dir: Path, *, timeout: float = 600.0) -> DeployedRun:
    """Wait for a :func:`start_run` to end; its run directory must hold the final model."""
    try:
        code = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise DeployError(f"`flwr run` did not finish in {timeout:.0f}s: see {proc.log}") from None
    finally:
        if proc._pump is not None:
            proc._pump.join(5.0)
    m = RUN_ID.search(proc.text())
    if code != 0 or m is None:
        raise DeployError(f"`flwr run` failed (exit {code}): see {proc.log}")
    run_dir = output_dir / m.group(1)
    if not RunDir(run_dir).model_path.exists():
        raise DeployError(
            f"run {m.group(1)} did not finish (no {RunDir.MODEL} in {run_dir}): {proc.log}"
        )
    return DeployedRun(m.group(1), run_dir, proc.log, time.time() - proc.started)


def run_app(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, Any],
    log_file: Path,
    *,
    timeout: float = 600.0,
) -> DeployedRun:
    """:func:`start_run` and :func:`wait_run`: one deployed run to completion."""
    proc = start_run(app_dir, flwr_home, run_config, log_file)
    try:
        return wait_run(proc, Path(str(run_config["output-dir"])), timeout=timeout)
    finally:
        proc.stop()


def round_durations(run_dir: Path) -> list[float]:
    """Each round's wall time as the ServerApp measured it (``duration_s`` in metrics.json:
    from sending the round's messages to the end of its central evaluation)."""
    return [float(r["duration_s"]) for r in RunDir(run_dir).read_metrics()["rounds"]]


@contextlib.contextmanager
def stopping(processes: list[FlowerProcess]) -> Iterator[list[FlowerProcess]]:
    """Stop every process in ``processes`` (also ones appended later) on the way out."""
    try:
        yield processes
    finally:
        for p in reversed(processes):
            p.stop()
