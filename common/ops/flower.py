"""What every Flower process fedvault starts shares: its environment, its executables, and
the patterns read from its output.

``fedvault simulate`` (:mod:`common.ops.simulate`: a local SuperLink in simulation mode) and
the deployment driver (:mod:`common.ops.deploy`: real SuperLink/SuperNode processes) each
add what is theirs (ports, task polling) to :func:`flower_env`; the approved-app SuperExec
(:mod:`common.ops.approved_app`) reads :data:`TASK_POLL_ENV`. Light on purpose (no Flower
import): ``--help`` imports it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

#: ``flwr run`` names the run it started: ``Successfully started run <id>``.
RUN_ID = re.compile(r"Successfully started run (\d+)")
#: Terminal colour codes in Flower's output (removed before logs are written or read).
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: SuperExec polls its Runtime API for new tasks this often (Flower default: 1 s).
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class FlowerMissingError(RuntimeError):
    """This environment has no ``flwr`` command (fedvault is not installed in it)."""


def bin_dir() -> Path:
    """This environment's scripts (``flwr``, ``flower-superlink``, ``flwr-clientapp``…)."""
    return Path(sys.executable).parent


def flwr_executable() -> str:
    """This environment's ``flwr`` (never another one found first on PATH)."""
    own = bin_dir() / "flwr"
    if own.exists():
        return str(own)
    raise FlowerMissingError(f"the `flwr` command is missing in {bin_dir()}: pip install -e .")


def flower_env(flwr_home: Path | str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: this process's environment with ``FLWR_HOME``,
    runtime dependency installation and update checks off, ``extra`` on top, and this
    environment's scripts first on ``PATH``.

    ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: offline, a SuperLink would otherwise
    install the app's dependencies and fail. ``PATH``: Flower starts ``flower-superlink``,
    ``flower-superexec`` and ``flwr-clientapp`` by name; they must be this environment's, also
    when fedvault was started by absolute path without activating the venv.
    """
    env = dict(os.environ)
    env |= {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        **(extra or {}),
    }
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    return env
