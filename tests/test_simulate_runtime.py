"""`fedvault simulate` as a user runs it: Ctrl-C cancels, runs are isolated, errors are one line.

The slow tests are real Flower runs on the test session's private SuperLink (`flower_home`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.ops import simulate
from common.ops.simulate import (
    SimulationError,
    _alive,
    _Stream,
    check_superlink,
    environment_key,
    flower_env,
    process_tree,
)
from common.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


def fedvault(*args, cwd=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "common.ops.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)  # fmt: skip


def _one_line_error(proc, message):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# -- bad input refused before launch (no Flower run is started) ----------------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "dataset=foo"], "unknown dataset 'foo'"),
        (["--set", 'model="resnet"'], "unknown model 'resnet'"),
        (["--set", "activation=gelu"], "unknown activation 'gelu'"),
        (["--set", "target-epsilon=inf"], "target-epsilon must be finite"),
        (["--set", "dataset=mnist", "--set", "data-dir=."], "MNIST not found"),
        (["--set", "dataset=sms_spam", "--set", 'model="text-linear"'], "sms_spam needs data-dir"),
        (["--set", 'model="text-linear"'], "does not take image data"),
        (["--num-clients", "0"], "--num-clients: must be ≥ 1 (got 0)"),
    ],
)
def test_bad_input_is_refused_before_launch(tmp_path, args, message):
    proc = fedvault("simulate", *args, "--output-dir", str(tmp_path / "runs"), cwd=tmp_path,
                    timeout=120)  # fmt: skip
    _one_line_error(proc, message)
    runs = tmp_path / "runs"
    assert not runs.exists() or not list(runs.glob("simulation-*.log"))  # nothing launched


def test_a_file_or_unwritable_output_dir_is_one_line(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    _one_line_error(fedvault("simulate", "--output-dir", str(a_file), timeout=120), "is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available here")
    try:
        proc = fedvault("simulate", "--output-dir", str(locked / "runs"), timeout=120)
        _one_line_error(proc, "cannot write into output dir")
        proc = fedvault("simulate", "--output-dir", str(locked), timeout=120)
        _one_line_error(proc, "cannot write into output dir")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_encrypted_data_made_for_another_federations_keys_is_refused(tmp_path):
    ours, theirs, enc = tmp_path / "ours", tmp_path / "theirs", tmp_path / "enc"
    for keys in (ours, theirs):
        assert fedvault("keys", "federation", "--out", str(keys), "--clients", "3").returncode == 0
    assert fedvault("data", "prepare", "--clients", "3", "--keys", str(theirs),
                    "--out", str(enc)).returncode == 0  # fmt: skip
    proc = fedvault("simulate", "--output-dir", str(tmp_path / "runs"), "--set", f"keys-dir={ours}",
                    "--set", f"encrypted-data-dir={enc}", timeout=120)  # fmt: skip
    _one_line_error(proc, "another federation's keys")


# -- the stream: app-side errors become one line -------------------------------------------------
FAKE_FLWR = r"""
import sys
print("Successfully started run 42", flush=True)
print("INFO 10:00:00 fedvault.server: run 42: results in /x", flush=True)
print("ERROR 10:00:01 fedvault.server: fedvault error: unknown thing 'x': set thing", flush=True)
print("\x1b[91mERROR \x1b[0m:     Simulation raised an exception", flush=True)
print("Traceback (most recent call last):", flush=True)
print('  File "a.py", line 1, in <module>', flush=True)
print("common.data.sources.DataError: unknown thing 'x': set thing", flush=True)
print("\x1b[91mERROR \x1b[0m:     Exit Code: 700", flush=True)
"""


def test_stream_picks_the_app_error_line_and_shows_no_traceback(tmp_path, capfd):
    log_file = tmp_path / "sim.log"
    stream = _Stream([sys.executable, "-c", FAKE_FLWR], dict(os.environ), log_file, False)
    assert stream.wait() == 0
    shown = capfd.readouterr().err
    assert stream.run_id == "42"
    assert stream.user_error == "unknown thing 'x': set thing"
    assert "Traceback" not in shown and "Exit Code" not in shown and "fedvault error" not in shown
    assert "results in /x" in shown
    assert "Traceback (most recent call last)" in log_file.read_text()  # all of it in the log


def test_stream_names_the_exception_of_an_unexplained_failure(tmp_path, capfd):
    script = FAKE_FLWR.replace("fedvault error: ", "")
    stream = _Stream([sys.executable, "-c", script], dict(os.environ), tmp_path / "l.log", False)
    stream.wait()
    assert stream.user_error is None
    assert "DataError: unknown thing 'x'" in stream.failure()
    assert "Traceback" not in capfd.readouterr().err


# -- one SuperLink per environment ------------------------------------------------------------
def test_each_environment_gets_its_own_superlink(monkeypatch):
    monkeypatch.delenv("FEDVAULT_FLWR_HOME", raising=False)
    monkeypatch.delenv("FEDVAULT_SUPERLINK_PORT", raising=False)
    first = flower_env()
    assert first["FLWR_HOME"].endswith(environment_key())
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    other = flower_env()
    assert other["FLWR_HOME"] != first["FLWR_HOME"]
    port = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
    assert other[port] != first[port]
    for env in (first, other):
        assert 29200 <= int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]) < 32768  # not ephemeral


def test_a_superlink_of_another_environment_is_not_reused(tmp_path, monkeypatch):
    """A process that looks like another venv's `flower-superlink` on our port: refused."""
    other_bin = tmp_path / "other-venv" / "bin"
    other_bin.mkdir(parents=True)
    script = other_bin / "flower-superlink"
    script.write_text("import time\ntime.sleep(60)\n")
    port = "29999"
    home = tmp_path / "home"
    fake = subprocess.Popen([sys.executable, str(script), "--port", port, "--log-file",
                             str(home / "local-superlink" / "superlink.log")])  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(s.pid == fake.pid for s in
                                                      simulate.superlinks()):  # fmt: skip
            time.sleep(0.05)
        monkeypatch.setenv("FEDVAULT_SUPERLINK_PORT", port)
        monkeypatch.setenv("FEDVAULT_FLWR_HOME", str(home))
        with pytest.raises(SimulationError, match="SuperLink of another environment"):
            check_superlink(flower_env())
        monkeypatch.setenv("FEDVAULT_SUPERLINK_PORT", "29995")
        check_superlink(flower_env())  # another port: nothing in the way
    finally:
        fake.kill()
        fake.wait()


def test_superlink_status_and_stop_commands(flower_home):
    status = fedvault("superlink", "status", timeout=60)
    assert status.returncode == 0
    assert f"FLWR_HOME    {flower_home}" in status.stdout and "SuperLink" in status.stdout
    assert fedvault("superlink", "stop", timeout=60).returncode == 0


def test_mark_cancelled_keeps_the_rounds(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {}, "rounds": [{"round": 1}]}))
    assert RunDir(tmp_path).mark_cancelled("SIGINT") == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["summary"]["cancelled"] is True and metrics["rounds"] == [{"round": 1}]
    assert "SIGINT" in (tmp_path / "CANCELLED").read_text()


# -- real runs -------------------------------------------------------------------------------
def _rounds(run_dir):
    try:
        return len(json.loads((run_dir / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])
def test_ctrl_c_cancels_a_real_run(flower_home, tmp_path, sig):
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.ops.cli", "simulate", "--num-clients", "2", "--output-dir",
         str(out), "--set", "num-server-rounds=200", "--set", "min-train-nodes=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run_dir, pid = None, None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = [p for p in out.glob("[0-9]*") if p.is_dir()] if out.exists() else []
            if dirs:
                run_dir = dirs[0]
                if pid is None and (run_dir / RunDir.SERVERAPP_PID).exists():
                    pid = int((run_dir / RunDir.SERVERAPP_PID).read_text())
                if pid and _rounds(run_dir) >= 1:
                    break
            time.sleep(0.2)
        assert pid and run_dir and _rounds(run_dir) >= 1, "the run never finished round 1"
        tree = process_tree(pid)
        assert len(tree) > 3  # the simulation process, Ray, its actors
        at_signal = _rounds(run_dir)
        proc.send_signal(sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    still = [p for p in tree if _alive(p)]
    assert not still, f"processes of the run still alive: {still}"
    kept = _rounds(run_dir)
    assert at_signal <= kept <= at_signal + 1 < 200  # at most the round under way finished
    time.sleep(5)
    assert _rounds(run_dir) == kept  # nothing of it trains on in the background
    assert proc.returncode == 130, err[-3000:]
    assert took < 30, f"cancelling took {took:.1f}s"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fedvault: run {run_dir.name} cancelled"), last
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"]["cancelled"] is True
    assert (run_dir / "CANCELLED").is_file() and (run_dir / "simulation.log").is_file()
    assert len(metrics["rounds"]) == kept
    assert not (run_dir / "model.pt").exists()


@pytest.mark.slow
def test_two_concurrent_runs_into_one_output_dir(flower_home, tmp_path):
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "common.ops.cli", "simulate", "--num-clients", "2",
            "--output-dir", str(out), "--set", "num-server-rounds=1",
            "--set", "min-train-nodes=2"]  # fmt: skip
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    run_dirs = sorted(p for p in out.iterdir() if p.is_dir() and p.name != "federations")
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        log_text = (run_dir / "simulation.log").read_text()
        assert f"Successfully started run {run_dir.name}" in log_text
        other = next(d for d in run_dirs if d != run_dir)
        assert f"Successfully started run {other.name}" not in log_text
        assert (run_dir / "model.pt").is_file()
    assert not list(out.glob("simulation-*.log"))  # every log moved into its run
    assert len(list((out / "federations").iterdir())) == 2  # each run its own holders


@pytest.mark.slow
def test_an_error_inside_the_serverapp_is_one_line(flower_home, tmp_path):
    """The server's key dir is passphrase-protected and the apps have no passphrase: the
    ServerApp fails; the terminal shows its one line, not Flower's traceback."""
    keys = tmp_path / "keys"
    env = {**os.environ, "FEDVAULT_PASSPHRASE": "secret"}
    subprocess.run([sys.executable, "-m", "common.ops.cli", "keys", "init", "--role", "server",
                    "--name", "server", "--out", str(keys / "server"), "--passphrase"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    proc = fedvault("simulate", "--num-clients", "2", "--set", "min-train-nodes=2",
                    "--set", "num-server-rounds=1", "--set", f"keys-dir={keys}",
                    "--output-dir", str(tmp_path / "runs"), timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exit Code" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedvault: error: key dir") and "passphrase" in last, last
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "federations"]
    assert "Traceback" in (run_dir / "simulation.log").read_text()  # the details: in the log
