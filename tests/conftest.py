"""Shared fixtures: real data when ../shared/data is there, Flower's task identity, and an
isolated local SuperLink for simulation tests (stopped at the end of the session)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; the test is skipped when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Messages built outside a Flower process need the process's task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def flower_home(tmp_path_factory):
    """A private FLWR_HOME and SuperLink port for this test session; the SuperLink that
    `flwr run` starts there is stopped when the session ends."""
    from common.ops.simulate import flower_env, stop_local_superlink

    home = tmp_path_factory.mktemp("flwr-home")
    old = {k: os.environ.get(k) for k in ("FEDVAULT_FLWR_HOME", "FEDVAULT_SUPERLINK_PORT")}
    os.environ["FEDVAULT_FLWR_HOME"] = str(home)
    os.environ["FEDVAULT_SUPERLINK_PORT"] = str(_free_port())
    try:
        yield home
    finally:
        stop_local_superlink(flower_env())
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
