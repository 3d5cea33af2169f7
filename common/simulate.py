"""Running a scenario through Flower's simulation engine, the way ``flwr run .`` does.

``fedvault simulate`` is a thin driver around ``flwr run``: it merges the scenario with the
user's overrides, writes them as a run-config TOML, and runs the app in this checkout on a
local SuperLink in simulation mode (Ray underneath). The SuperLink is fedvault's own (its
own ``FLWR_HOME`` and port), started with runtime dependency installation switched off,
because offline the SuperLink would otherwise try to ``pip install`` the app and fail.
Flower keeps that SuperLink running between runs so the next run starts fast;
:func:`stop_local_superlink` ends it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import ConfigError, RunConfig
from common.federation_keys import client_dir, provision
from common.paths import default_cache_dir
from common.privacy.policy import POLICY_FILE, PrivacyPolicy
from common.scenarios import PROJECT_ROOT, Scenario

log = logging.getLogger("fedvault.simulate")

DEFAULT_SUPERLINK_PORT = 39191  # Flower's own local SuperLink uses 39091; keep clear of it
RUN_ID = re.compile(r"Successfully started run (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SimulationError(RuntimeError):
    """The simulation did not produce results; the message says where to look."""


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    run_dir: Path
    log_file: Path
    seconds: float
    holders: Path  # the simulated federation (keys-dir): reuse it to keep lifetime budgets


def flower_env() -> dict[str, str]:
    """Environment for ``flwr``: fedvault's SuperLink home/port, no runtime pip installs."""
    env = dict(os.environ)
    home = Path(env.get("FEDVAULT_FLWR_HOME", default_cache_dir() / "flwr-home"))
    port = env.get("FEDVAULT_SUPERLINK_PORT", str(DEFAULT_SUPERLINK_PORT))
    env |= {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": port,
        "FLWR_LOCAL_CONTROL_API_PORT": str(int(port) + 2),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    # `flwr` starts `flower-superlink` by name: make this venv's scripts findable even when
    # fedvault was started by absolute path without activating the venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def build_run_config(
    scenario: Scenario, overrides: dict[str, Any], output_dir: Path | None
) -> dict[str, Any]:
    """Scenario ∪ overrides, validated, with paths made absolute for the SuperLink's cwd."""
    merged = {**scenario.run_config, **overrides}
    if output_dir is not None:
        merged["output-dir"] = str(output_dir)
    for key in ("output-dir", "data-dir", "keys-dir", "encrypted-data-dir"):
        value = merged.get(key, RunConfig().to_mapping()[key])
        if value:
            merged[key] = str(Path(str(value)).expanduser().resolve())
    RunConfig.from_mapping(merged)
    return merged


def run_scenario(
    scenario: Scenario,
    *,
    overrides: dict[str, Any] | None = None,
    num_clients: int | None = None,
    output_dir: Path | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """Run ``scenario`` to completion; raise :class:`SimulationError` if it left no results."""
    if shutil.which("flwr") is None and not (Path(sys.executable).parent / "flwr").exists():
        raise SimulationError("the `flwr` command is missing: pip install -e . in this venv")
    run_config = build_run_config(scenario, overrides or {}, output_dir)
    out_dir = Path(run_config["output-dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    supernodes = num_clients or scenario.num_supernodes
    if supernodes < 1:
        raise ConfigError("--num-clients must be ≥ 1")
    min_nodes = int(run_config.get("min-train-nodes", RunConfig.min_train_nodes))
    if supernodes < min_nodes:
        raise ConfigError(
            f"{supernodes} clients but min-train-nodes={min_nodes}: raise --num-clients or "
            f"--set min-train-nodes={supernodes}"
        )
    run_config["keys-dir"] = str(simulated_holders(run_config, out_dir, supernodes))
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        tomli_w.dump(run_config, f)
        config_file = f.name
    federation = f"num-supernodes={supernodes} client-resources-num-cpus=1"
    cmd = [flwr, "run", str(PROJECT_ROOT), "--stream", "--run-config", config_file,
           "--federation-config", federation]  # fmt: skip
    log.info("scenario %s: %d clients; %s", scenario.name, supernodes, " ".join(cmd))
    log_file = out_dir / f"simulation-{time.strftime('%Y%m%d-%H%M%S')}.log"
    started = time.time()
    run_id = None
    try:
        with log_file.open("w", encoding="utf-8") as sink:
            proc = subprocess.Popen(
                cmd,
                env=flower_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(ANSI.sub("", line))
                if run_id is None and (m := RUN_ID.search(ANSI.sub("", line))):
                    run_id = m.group(1)
                if verbose or _worth_showing(line):
                    sys.stderr.write(line)
            code = proc.wait()
    finally:
        Path(config_file).unlink(missing_ok=True)
    seconds = time.time() - started
    if code != 0 or run_id is None:
        raise SimulationError(f"`flwr run` failed (exit {code}): see {log_file}")
    run_dir = out_dir / run_id
    if not (run_dir / "model.pt").exists():
        raise SimulationError(
            f"run {run_id} did not finish (no model.pt in {run_dir}): see {log_file}"
        )
    final_log = run_dir / "simulation.log"
    log_file.replace(final_log)
    return SimulationResult(run_id, run_dir, final_log, seconds, Path(run_config["keys-dir"]))


def simulated_holders(run_config: dict[str, Any], out_dir: Path, num_clients: int) -> Path:
    """The simulated data holders: ``client-<i>/`` with identity, ``policy.toml`` and (once
    they train) ``state/``, plus ``server/``.

    With run-config ``keys-dir`` that federation is kept: its holders' lifetime budgets carry
    over from run to run, as real holders' would, and a policy already there is the holder's
    own and is never rewritten. Without it every run gets a fresh federation in
    ``<output-dir>/federations/`` -- fresh holders whose lifetime starts with this run.
    """
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
    provision(keys_dir, num_clients)
    cfg = RunConfig.from_mapping(run_config)
    for i in range(num_clients):
        path = client_dir(keys_dir, i) / POLICY_FILE
        if not path.exists():
            simulated_policy(cfg, i).save(path)
    return keys_dir


def simulated_policy(cfg: RunConfig, partition_id: int) -> PrivacyPolicy:
    """What a simulated holder agrees to: the scenario's budget as its lifetime budget, DP and
    sealing as the scenario has them. It releases federated evaluation, because a simulated
    holder's data is a slice of a public data set; a real holder decides that itself."""
    return PrivacyPolicy(
        dataset_id=f"{cfg.dataset}-partition-{partition_id}",
        lifetime_epsilon=cfg.target_epsilon,
        delta=cfg.target_delta,
        accountant=cfg.accountant,
        require_dp=cfg.dp,
        require_sealing=cfg.encrypt_updates,
        release_evaluation=True,
    )


def _worth_showing(line: str) -> bool:
    plain = ANSI.sub("", line)
    return (
        "fedvault.server" in plain
        or "ERROR" in plain
        or "Traceback" in plain
        or "refuses" in plain
        or "Successfully started run" in plain
    )


def local_superlink_pids(home: str) -> list[int]:
    """The detached ``flower-superlink`` processes ``flwr run`` started for FLWR_HOME ``home``
    (Linux: read from /proc, so no process library is needed)."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if any("flower-superlink" in a for a in args[:2]) and any(home in a for a in args):
            pids.append(int(proc_dir.name))
    return pids


def stop_local_superlink(env: dict[str, str] | None = None) -> list[int]:
    """Stop the SuperLink that ``flwr run`` started for fedvault's ``FLWR_HOME`` (Linux)."""
    stopped = []
    for pid in local_superlink_pids((env or flower_env())["FLWR_HOME"]):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    return stopped
