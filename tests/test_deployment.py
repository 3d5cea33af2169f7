"""A real deployment on 127.0.0.1: flower-superlink (TLS + SuperNode auth), flower-supernodes
with provisioned credentials and encrypted partitions, `flwr run` over TLS. No mocks.

Every process is started in its own process group and stopped by the fixture that started it
(``common.ops.deploy.stopping``), also when a test fails. Ports are picked free at run time.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.ops import deploy
from common.ops.provision import (
    Federation,
    provision_federation,
    supernode_command,
    write_flwr_config,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NUM_NODES = 2  # clients 0 and 1 run; client 2 is provisioned but never registered
CONNECT_TIMEOUT_S = 60.0
REFUSAL_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def federation(work) -> Federation:
    return provision_federation(work / "federation", "127.0.0.1", NUM_NODES + 1, port=_free_port())


@pytest.fixture(scope="module")
def encrypted_data(work, federation) -> Path:
    """Each client encrypts its own partition with its own data key, as on the edge."""
    enc = work / "encrypted"
    for c in federation.clients[:NUM_NODES]:
        deploy.prepare_client_partition(c.identity_dir, c.partition_id, NUM_NODES, enc)
    return enc


@pytest.fixture(scope="module")
def superlink(work, federation):
    """The SuperLink, TLS on, SuperNode auth on, on a free port on 127.0.0.1."""
    procs: list[deploy.FlowerProcess] = []
    with deploy.stopping(procs):
        procs.append(deploy.start_superlink(federation, work, tuned=True,
                                            timeout=CONNECT_TIMEOUT_S))  # fmt: skip
        yield procs[0]


@pytest.fixture(scope="module")
def operator(work, federation, superlink) -> tuple[Path, dict[int, int]]:
    """The operator's private FLWR_HOME (TLS connection, CA root) with clients 0, 1 registered."""
    home = deploy.operator_home(federation, work / "operator-home")
    node_ids = deploy.register_supernodes(federation, home, range(NUM_NODES))
    assert set(deploy.list_supernodes(home).values()) == {"registered"}
    return home, node_ids


@contextlib.contextmanager
def _supernodes(federation, operator, tmp_path, encrypted_dirs=None):
    """Clients 0 and 1 as authenticated SuperNodes, each with a fresh state dir (and, given
    ``encrypted_dirs``, its own encrypted-data-dir in its node config), stopped on exit.
    Yields (processes, start-one function) so a test can restart a node."""
    home, node_ids = operator
    procs: list[deploy.FlowerProcess] = []

    def start(pid: int) -> deploy.FlowerProcess:
        client = federation.clients[pid]
        cmd = supernode_command(
            client, federation.superlink_address, NUM_NODES,
            runtime_port=_free_port(), state_dir=tmp_path / f"state-{pid}",
            encrypted_data_dir=encrypted_dirs[pid] if encrypted_dirs else None,
        )  # fmt: skip
        env = deploy.flower_env(tmp_path / f"supernode-{pid}-home", tuned=True)
        log_file = tmp_path / f"supernode-{pid}.{len(procs)}.log"
        proc = deploy.start_process(f"supernode-{pid}", cmd, log_file, env)
        procs.append(proc)
        return proc

    with deploy.stopping(procs):
        for pid in range(NUM_NODES):
            start(pid)
        status = deploy.wait_until_online(home, set(node_ids.values()), CONNECT_TIMEOUT_S)
        assert all(status[n] == "online" for n in node_ids.values()), (
            f"SuperNodes did not come online: {status}\n" + procs[0].text()[-3000:]
        )
        yield procs, start


@pytest.fixture
def supernodes(federation, operator, tmp_path):
    with _supernodes(federation, operator, tmp_path) as nodes:
        yield nodes


def _run_config(work: Path, federation: Federation, enc: Path, rounds: int) -> dict:
    return {
        "num-server-rounds": rounds,
        "batch-size": 32,
        "min-train-nodes": NUM_NODES,
        "encrypt-updates": True,
        "keys-dir": str(federation.superlink.keys_dir),
        "encrypted-data-dir": str(enc),
        "output-dir": str(work / "runs"),
        # a SuperNode stopped mid-round never answers: the round ends without it
        "round-timeout": 90.0,
    }


def test_two_rounds_over_tls_with_auth_and_encrypted_partitions(
    work, federation, encrypted_data, operator, supernodes
):
    home, _ = operator
    run = deploy.run_app(
        REPO, home, _run_config(work, federation, encrypted_data, 2), work / "run-2rounds.log"
    )
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    budget = metrics["config"]["target-epsilon"]
    for r in rounds:
        assert sorted(c["partition_id"] for c in r["clients"]) == [0, 1], r
        assert not r["failures"], r["failures"]
        assert r["max_epsilon"] == max(c["epsilon"] for c in r["clients"])
    assert rounds[-1]["test_accuracy"] > 0.3  # chance is 0.1
    assert 0 < rounds[0]["max_epsilon"] < rounds[1]["max_epsilon"] <= budget
    for pid in (0, 1):
        eps = [c["epsilon"] for r in rounds for c in r["clients"] if c["partition_id"] == pid]
        assert 0 < eps[0] < eps[1] <= budget
    assert metrics["config"]["encrypt-updates"] is True
    assert "updates sealed end to end" in run.log_file.read_text()


def test_holders_train_on_their_own_image_folders(work, federation, operator, tmp_path):
    """Two holders with their own image folders (own sizes and label mixes): each runs
    `fedvault data prepare` with only its own key and names its encrypted dir in its own
    node config; the server evaluates on its own held-out folder."""
    from common.ops.demo_data import write_demo_folders

    home, _ = operator
    folders = tmp_path / "holders"
    write_demo_folders(folders, NUM_NODES, seed=7)
    digits = ",".join(str(d) for d in range(10))
    encrypted_dirs = []
    for c in federation.clients[:NUM_NODES]:
        enc = tmp_path / f"holder-{c.partition_id}-encrypted"
        proc = subprocess.run(
            [sys.executable, "-m", "common.ops.cli", "data", "prepare",
             "--dataset", "image-folder", "--classes", digits,
             "--data-dir", str(folders / f"client-{c.partition_id}"),
             "--partition", str(c.partition_id), "--clients", str(NUM_NODES),
             "--key", str(c.identity_dir), "--out", str(enc)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        encrypted_dirs.append(enc)
    run_config = {
        "dataset": "image-folder", "classes": digits, "test-data": str(folders / "test"),
        "num-server-rounds": 3, "batch-size": 32, "min-train-nodes": NUM_NODES,
        "encrypt-updates": True, "keys-dir": str(federation.superlink.keys_dir),
        "output-dir": str(work / "runs-own-data"), "round-timeout": 90.0,
    }  # fmt: skip
    with _supernodes(federation, operator, tmp_path, encrypted_dirs):
        run = deploy.run_app(REPO, home, run_config, work / "run-own-data.log")
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(not r["failures"] for r in rounds), [r["failures"] for r in rounds]
    sizes = {c["partition_id"]: c["num_examples"] for c in rounds[0]["clients"]}
    assert sorted(sizes) == [0, 1] and sizes[0] != sizes[1]
    summary = metrics["summary"]
    assert summary["train_examples"] is None and summary["test_examples"] == 360
    assert rounds[-1]["test_accuracy"] > 0.3  # chance is 0.1
    assert "updates sealed end to end" in run.log_file.read_text()
    report = json.loads((run.run_dir / "report.json").read_text())
    assert report["audit"]["verdict"] == "pass", report["audit"]


def test_refused_connections(work, federation, superlink, operator):
    """Plaintext, an unregistered key, and no CA certificate: each SuperNode gives up with a
    TLS/auth error, and none of them ever shows up as a node of the federation."""
    home, node_ids = operator
    c0 = federation.clients[0]
    base = ["flower-supernode", "--superlink", federation.superlink_address,
            "--max-retries", "1", "--node-config", "partition-id=0 num-partitions=2"]  # fmt: skip
    cases = {
        # No TLS: the SuperLink only speaks HTTPS and drops the plaintext request.
        "plaintext": (["--insecure"], "Server disconnected without sending a response"),
        # Valid CA and key format, but the key was never registered.
        "unregistered": (
            [
                "--root-certificates",
                str(federation.clients[2].ca_cert),
                "--auth-supernode-private-key",
                str(federation.clients[2].auth_private_key),
            ],
            r"Failed to activate SuperNode",
        ),
        # A registered key, but no CA certificate: the system roots do not know our CA.
        "no-ca": (
            ["--auth-supernode-private-key", str(c0.auth_private_key)],
            r"CERTIFICATE_VERIFY_FAILED",
        ),
    }
    procs: list[deploy.FlowerProcess] = []
    with deploy.stopping(procs):
        for name, (extra, _) in cases.items():
            env = deploy.flower_env(work / f"refused-{name}-home", tuned=True)
            cmd = [*base, *extra, "--port", str(_free_port())]
            procs.append(deploy.start_process(name, cmd, work / f"refused-{name}.log", env))
        deadline = time.monotonic() + REFUSAL_TIMEOUT_S
        for proc, (name, (_, pattern)) in zip(procs, cases.items(), strict=True):
            assert proc.wait_for(pattern, max(1.0, deadline - time.monotonic())), (
                f"{name}: no refusal logged:\n{proc.text()[-3000:]}"
            )
            try:
                code = proc.popen.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as err:
                raise AssertionError(f"{name}: still running:\n{proc.text()[-3000:]}") from err
            assert code != 0, f"{name}: exited 0"
            assert "Exit Code: 305" in proc.text(), name  # could not connect to the SuperLink
    # The federation still knows exactly the two registered nodes, none of them via these.
    assert set(deploy.list_supernodes(home)) == set(node_ids.values())
    assert "No SuperNode found with the given public key" in superlink.text()


def test_operator_without_tls_is_refused(work, federation, superlink):
    """`flwr` configured for plaintext cannot talk to the SuperLink's Control API either."""
    home = work / "plaintext-operator-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedvault"\n\n[superlink.fedvault]\n'
        f'address = "{federation.superlink_address}"\ninsecure = true\n'
    )
    proc = deploy.flwr_cli(["supernode", "list", "fedvault", "--format", "json"], home)
    reply = json.loads(proc.stdout)
    assert reply["success"] is False
    # And with the CA it works: the refusal is about TLS, not the address.
    write_flwr_config(home, federation.superlink_address, federation.ca_cert)
    assert len(deploy.list_supernodes(home)) == NUM_NODES


def test_restarted_supernode_continues_its_privacy_account(
    work, federation, encrypted_data, operator, supernodes
):
    """Client 1's SuperNode is stopped after round 1 and started again: its cumulative ε goes
    on from its stored account (node config state-dir), it does not start again from zero.

    When to stop it: once it has *received* its round-2 message. That message exists only
    after the server collected and aggregated round 1, so round 1 is on record; the round-2
    ClientApp has not started yet, so round 2 costs client 1 nothing and is recorded as a
    failure (node unavailable). (Stopping it right after it sent its round-1 reply would lose
    that reply: Flower 1.41 answers "node unavailable" for an offline node even when its reply
    is already stored.) In round 3 the restarted node trains with two rounds on its account.
    """
    home, _ = operator
    procs, start = supernodes
    config = _run_config(work, federation, encrypted_data, 3)
    config["output-dir"] = str(work / "runs-restart")
    runner: list[deploy.FlowerProcess] = []
    with deploy.stopping(runner):
        runner.append(deploy.start_run(REPO, home, config, work / "run-restart.log"))
        node1 = procs[1]
        trained = node1.wait_for(r"fedvault\.client: partition 1, round 1:", 240)
        assert trained, f"client 1 did not train round 1:\n{node1.text()[-3000:]}"
        nxt = node1.wait_for(r"Receiving: train message", 120, start=trained.end())
        assert nxt, f"client 1 got no round-2 message:\n{node1.text()[-3000:]}"
        node1.stop()  # SIGTERM: the SuperNode deactivates itself (its ClientApp never starts)
        restarted = start(1)
        assert restarted.wait_for(r"SuperNode ID: ", CONNECT_TIMEOUT_S), restarted.text()[-3000:]
        run = deploy.wait_run(runner[0], work / "runs-restart", timeout=300)
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert sorted(rounds) == [1, 2, 3]

    def eps(pid: int, rnd: int) -> float | None:
        return next(
            (c["epsilon"] for c in rounds[rnd]["clients"] if c["partition_id"] == pid), None
        )

    budget = metrics["config"]["target-epsilon"]
    assert eps(1, 1) is not None and eps(1, 2) is None, rounds[2]
    assert rounds[2]["failures"], "round 2 should record client 1 as unavailable"
    assert eps(1, 3) is not None, f"the restarted SuperNode did not train: {rounds[3]}"
    assert eps(1, 3) > eps(1, 1), (
        f"client 1's ε went {eps(1, 1)} → {eps(1, 3)}: the restarted SuperNode started a new "
        "privacy account (client-side state-dir persistence missing?)"
    )
    # Two rounds on client 1's account = exactly what client 0 had after its two rounds.
    assert eps(1, 3) == pytest.approx(eps(0, 2), rel=1e-9)
    assert 0 < eps(0, 1) < eps(0, 2) < eps(0, 3) <= budget
    assert max(r["max_epsilon"] for r in rounds.values()) <= budget


@pytest.mark.parametrize(
    "downgrade,expected",
    [
        # the review's attack: a huge budget and little noise (a round at ε 34.6 before)
        ({"target-epsilon": 1000.0, "noise-multiplier": 0.3}, "lifetime budget 8"),
        # sealing switched off by the run config while the holders pinned the server's key
        ({"encrypt-updates": False}, "pinned the server's key"),
    ],
    ids=["budget-and-noise", "no-sealing"],
)
def test_real_supernodes_refuse_a_downgraded_run(
    work, federation, encrypted_data, operator, supernodes, downgrade, expected
):
    """The run config is the operator's request; each SuperNode's holder policy (here the
    built-in default: lifetime ε 8, DP and sealing required) decides. Nothing trains, each
    node logs its refusal, and the run still ends with its record."""
    home, _ = operator
    procs, _ = supernodes
    name = "-".join(sorted(downgrade))
    config = {**_run_config(work, federation, encrypted_data, 1), **downgrade,
              "output-dir": str(work / f"runs-{name}"), "round-timeout": 60.0}  # fmt: skip
    run = deploy.run_app(REPO, home, config, work / f"run-{name}.log")
    (only,) = json.loads((run.run_dir / "metrics.json").read_text())["rounds"]
    assert only["clients"] == [], "a client trained on a downgraded run"
    assert sorted(f["partition_id"] for f in only["failures"]) == [0, 1]
    assert all(expected in f["reason"] for f in only["failures"]), only["failures"]
    for proc in procs:
        assert expected in proc.text(), f"no refusal logged on the node:\n{proc.text()[-3000:]}"
