"""The code a deployed client runs is the code its holder approved (common.ops.approved_app).

Real processes on 127.0.0.1, as in tests/test_deployment.py: a TLS SuperLink with SuperNode
authentication, and client 0 started by its provisioned ``start-supernode.sh``
(``flower-supernode --isolation process`` + ``fedvault clientapp``) with the hash of the
approved app in its bundle's ``approved-apps.txt``. The approved app trains; a copy with one
line of ``client/app.py`` changed (it writes a marker file when imported) is refused: the
node logs the refusal, and the marker never appears. The control: a SuperNode set up the
default way (no launcher) runs that same modified app, and the marker does appear -- so the
refusal test can fail.

The apps are snapshots of the repository's HEAD (``git archive``), so concurrent edits of
the working tree cannot change their hashes mid-test.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from common.config import ConfigError
from common.ops import deploy
from common.ops.approved_app import approved_set, fab_hash, read_approved
from common.ops.flower import flwr_executable
from common.ops.provision import (
    Federation,
    provision_federation,
    supernode_command,
    write_approved_apps,
)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 90.0
MARKER_LINE = '__import__("pathlib").Path({path!r}).write_text("modified ClientApp ran\\n")\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(dest: Path) -> Path:
    """The app as committed (HEAD); the FAB `flwr run` would build from the working tree
    if git is not available."""
    dest.mkdir(parents=True)
    try:
        tar = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(dest, filter="data")
    except (OSError, subprocess.CalledProcessError):
        from flwr.cli.build import build_fab_from_disk

        with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))) as z:
            z.extractall(dest)
    return dest


# -- fast: the hash ----------------------------------------------------------------------------


def test_fab_hash_is_flowers_fab_hash_and_pins_every_byte(tmp_path):
    """`fedvault fab-hash DIR` = SHA-256 of the FAB `flwr build` writes from DIR (the bytes
    `flwr run` ships); a copy elsewhere (new mtimes) hashes the same; one changed line does
    not."""
    app = _snapshot(tmp_path / "app")
    h = fab_hash(app)
    out = tmp_path / "out"
    out.mkdir()
    flwr = flwr_executable()
    subprocess.run([flwr, "build", "--app", str(app)], cwd=out, check=True, capture_output=True)
    (built,) = out.glob("*.fab")
    assert hashlib.sha256(built.read_bytes()).hexdigest() == h == fab_hash(built)
    assert built.name.endswith(f".{h[:8]}.fab")  # Flower's own name for it
    copy = _snapshot(tmp_path / "copy")
    assert fab_hash(copy) == h
    with (copy / "client" / "app.py").open("a") as f:
        f.write("# one more line\n")
    assert fab_hash(copy) != h


def test_approved_list_is_hashes_only_and_never_empty(tmp_path):
    f = write_approved_apps(tmp_path / "approved-apps.txt", ("AB" * 32,))
    f.write_text(f.read_text() + "cd" * 32 + "  # v2, audited\n")
    assert read_approved(f) == ["ab" * 32, "cd" * 32]
    assert approved_set(["ef" * 32], [f]) == {"ab" * 32, "cd" * 32, "ef" * 32}
    with pytest.raises(ConfigError, match="no approved app hash"):
        approved_set([], [write_approved_apps(tmp_path / "empty.txt")])
    with pytest.raises(ConfigError, match="not a SHA-256"):
        approved_set(["sha256:abc"])


# -- slow: real SuperLink, SuperNode, launcher ---------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("approved")


@pytest.fixture(scope="module")
def apps(work) -> dict[str, object]:
    """The approved app, and a copy with one line of client/app.py changed: on import it
    writes ``marker``."""
    approved = _snapshot(work / "approved-app")
    modified = _snapshot(work / "modified-app")
    marker = work / "MODIFIED-CLIENTAPP-RAN"
    with (modified / "client" / "app.py").open("a") as f:
        f.write(MARKER_LINE.format(path=str(marker)))
    return {
        "approved": approved,
        "modified": modified,
        "approved_hash": fab_hash(approved),
        "modified_hash": fab_hash(modified),
        "marker": marker,
    }


@pytest.fixture(scope="module")
def federation(work) -> Federation:
    return provision_federation(work / "federation", "127.0.0.1", 1, port=_free_port())


@pytest.fixture(scope="module")
def encrypted_data(work, federation) -> Path:
    c = federation.clients[0]
    return deploy.prepare_client_partition(c.identity_dir, 0, 1, work / "encrypted").parent


@pytest.fixture(scope="module")
def operator(work, federation):
    """SuperLink (TLS, node auth) + the operator's FLWR_HOME with client 0 registered."""
    procs: list[deploy.FlowerProcess] = []
    with deploy.stopping(procs):
        procs.append(deploy.start_superlink(federation, work, tuned=True, timeout=TIMEOUT_S))
        home = deploy.operator_home(federation, work / "operator-home")
        node_ids = deploy.register_supernodes(federation, home)
        yield home, set(node_ids.values())


def _run_config(work: Path, federation: Federation, enc: Path, out: str) -> dict:
    return {
        "num-server-rounds": 1,
        "batch-size": 32,
        "min-train-nodes": 1,
        "encrypt-updates": True,
        "keys-dir": str(federation.superlink.keys_dir),
        "encrypted-data-dir": str(enc),
        "output-dir": str(work / out),
        "round-timeout": 60.0,
    }


def _online(node: deploy.FlowerProcess, home: Path, node_ids: set[int]) -> None:
    status = deploy.wait_until_online(home, node_ids, TIMEOUT_S)
    assert all(status[n] == "online" for n in node_ids), f"{status}\n{node.text()[-3000:]}"


def _metrics(run: deploy.DeployedRun) -> dict:
    return json.loads((run.run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_holder_runs_the_approved_app_and_refuses_a_modified_one(
    work, federation, encrypted_data, operator, apps
):
    home, node_ids = operator
    client = federation.clients[0]
    # The holder approves the app they audited: its hash into the bundle's list.
    write_approved_apps(client.approved_apps, (apps["approved_hash"],))
    apps["marker"].unlink(missing_ok=True)
    procs: list[deploy.FlowerProcess] = []
    with deploy.stopping(procs):
        env = deploy.flower_env(work / "holder-node-home", tuned=True)
        cmd = ["sh", str(client.start_script), "--port", str(_free_port())]
        node = deploy.start_process("holder-node", cmd, work / "holder-node.log", env)
        procs.append(node)
        _online(node, home, node_ids)

        # 1. The approved app: trains as usual.
        cfg = _run_config(work, federation, encrypted_data, "runs-approved")
        run = deploy.run_app(apps["approved"], home, cfg, work / "run-approved.log", timeout=300)
        (rnd,) = _metrics(run)["rounds"]
        assert [c["partition_id"] for c in rnd["clients"]] == [0], rnd
        assert not rnd["failures"], rnd["failures"]
        assert f"FAB sha256 {apps['approved_hash']} is approved" in node.text()

        # 2. The operator ships a modified ClientApp: refused, never run.
        start = len(node.text())
        cfg = _run_config(work, federation, encrypted_data, "runs-modified")
        runner = deploy.start_run(apps["modified"], home, cfg, work / "run-modified.log")
        procs.append(runner)
        refusal = node.wait_for(r"REFUSED ClientApp of run \d+: .*", 240, start=start)
        assert refusal, f"no refusal logged:\n{node.text()[-3000:]}"
        line = refusal.group(0)
        assert f"FAB sha256 {apps['modified_hash']} is not approved" in line
        assert apps["approved_hash"] in line and "fedvault fab-hash" in line
        # The ServerApp gives up: its only node answered with an error (the refusal).
        try:
            runner.popen.wait(240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` of the refused app did not end: {runner.log}")
        assert "ClientApp refused by the node's holder" in runner.text() or (
            "did not answer" in runner.text()
        ), runner.text()[-3000:]
        assert "fedvault.client: partition 0" not in node.text()[start:]  # nothing trained
        assert not apps["marker"].exists(), "the modified ClientApp ran on the holder's node"
        assert "starting flwr-clientapp" not in node.text()[start:]


@pytest.mark.slow
def test_without_the_launcher_the_modified_app_runs(
    work, federation, encrypted_data, operator, apps
):
    """Control: Flower's default SuperNode (it starts its own executor) runs whatever the
    SuperLink ships -- the modified app's marker appears. This is what the test above would
    see without the launcher."""
    home, node_ids = operator
    apps["marker"].unlink(missing_ok=True)
    procs: list[deploy.FlowerProcess] = []
    with deploy.stopping(procs):
        cmd = supernode_command(
            federation.clients[0], federation.superlink_address, 1,
            runtime_port=_free_port(), state_dir=work / "default-node-state",
        )  # fmt: skip
        env = deploy.flower_env(work / "default-node-home", tuned=True)
        node = deploy.start_process("default-node", cmd, work / "default-node.log", env)
        procs.append(node)
        _online(node, home, node_ids)
        cfg = _run_config(work, federation, encrypted_data, "runs-control")
        run = deploy.run_app(apps["modified"], home, cfg, work / "run-control.log", timeout=300)
    assert apps["marker"].exists(), "the marker line did not run: the refusal test proves nothing"
    (rnd,) = _metrics(run)["rounds"]
    assert [c["partition_id"] for c in rnd["clients"]] == [0], rnd
