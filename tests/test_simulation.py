"""Real federated runs: `fedvault simulate` → `flwr run` → local SuperLink → Ray simulation."""

import json
import subprocess
import sys

import pytest
import torch

from common.models import LeNet5

pytestmark = pytest.mark.slow


def fedvault(*args, check=True, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "common.ops.cli", *args], capture_output=True, text=True,
        timeout=900, cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fedvault {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _run_dir(out):
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name not in ("keys", "federations")]
    return run_dir


@pytest.fixture(scope="module")
def digits_run(flower_home, tmp_path_factory):
    """One real 3-client, 2-round run of the default scenario (sealed updates on), with
    federated evaluation on every client as well."""
    out = tmp_path_factory.mktemp("digits-run")
    proc = fedvault("simulate", "digits-dp", "--num-clients", "3", "--output-dir", str(out),
                    "--set", "num-server-rounds=2", "--set", "fraction-evaluate=1.0")  # fmt: skip
    assert "final test accuracy" in proc.stdout
    return _run_dir(out)


def test_digits_three_clients_two_rounds(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["test_accuracy"] > 0.3  # chance is 0.1
    assert rounds[-1]["test_accuracy"] > metrics["initial"]["test_accuracy"]
    assert 0 < rounds[0]["max_epsilon"] < rounds[1]["max_epsilon"] <= 8.0
    for r in rounds:
        assert sorted(c["partition_id"] for c in r["clients"]) == [0, 1, 2]
        assert all(c["num_examples"] > 400 and c["epsilon"] <= 8.0 for c in r["clients"])
        assert r["max_epsilon"] == max(c["epsilon"] for c in r["clients"])
        assert r["test_metrics"]["confusion_matrix"] and 0 <= r["test_f1_macro"] <= 1
    assert metrics["config"]["target-epsilon"] == 8.0
    assert metrics["config"]["encrypt-updates"] is True
    assert "updates sealed end to end" in (digits_run / "simulation.log").read_text()
    model = LeNet5()
    model.load_state_dict(torch.load(digits_run / "model.pt"))


def test_round_timing_splits_the_servers_wall_time(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    summary = metrics["summary"]
    assert 0 < summary["initial_eval_s"] < summary["startup_s"] < summary["wall_seconds"]
    in_rounds = 0.0
    for r in metrics["rounds"]:
        t = r["timing"]
        phases = ("train_phase_s", "aggregate_s", "evaluate_phase_s", "central_eval_s")
        assert set(t) == {*phases, "train_reply_lag_s"}
        assert all(t[k] >= 0 for k in phases)
        assert 0 <= t["train_reply_lag_s"] < 2.0  # relay + polling at most 0.2 s apart
        assert t["aggregate_s"] < t["train_phase_s"]
        assert t["evaluate_phase_s"] > 0
        assert 0 < t["central_eval_s"] < r["duration_s"]
        assert r["federated_evaluation"]["eval-accuracy"] > 0.1
        in_rounds += t["train_phase_s"] + t["evaluate_phase_s"] + t["central_eval_s"]
    assert summary["startup_s"] + in_rounds < summary["wall_seconds"]


def test_evaluate_matches_the_runs_last_round(digits_run):
    proc = fedvault("evaluate", str(digits_run), "--json")
    evaluation = json.loads(proc.stdout)
    last = json.loads((digits_run / "metrics.json").read_text())["rounds"][-1]
    assert evaluation["accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert evaluation["f1_macro"] == pytest.approx(last["test_f1_macro"], abs=1e-9)
    assert evaluation["confusion_matrix"] == last["test_metrics"]["confusion_matrix"]


def test_run_from_encrypted_partitions(flower_home, tmp_path):
    """With every path relative to the user's working directory (before: a relative keys-dir
    or encrypted-data-dir broke the run, because the SuperLink runs the apps elsewhere)."""
    fedvault("keys", "federation", "--out", "keys", "--clients", "3", cwd=tmp_path)
    fedvault("data", "prepare", "--dataset", "digits", "--clients", "3", "--keys", "keys",
             "--out", "enc", cwd=tmp_path)  # fmt: skip
    out = tmp_path / "runs"
    fedvault("simulate", "digits-dp", "--num-clients", "3", "--output-dir", "runs",
             "--set", "num-server-rounds=1", "--set", "keys-dir=keys",
             "--set", "encrypted-data-dir=enc", cwd=tmp_path)  # fmt: skip
    run_dir = _run_dir(out)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert len(rounds[0]["clients"]) == 3 and not rounds[0]["failures"]
    assert rounds[0]["test_accuracy"] > 0.2

    # One flipped byte in client 1's partition: the AEAD catches it, and since every round
    # would fail the same way the run ends with that reason (before: "finished", exit 0,
    # client 1 silently absent).
    partition = tmp_path / "enc" / "partition-1.fvd"
    data = bytearray(partition.read_bytes())
    data[len(data) // 2] ^= 0x01
    partition.write_bytes(bytes(data))
    proc = fedvault("simulate", "digits-dp", "--num-clients", "3", "--output-dir", "corrupt",
                    "--set", "num-server-rounds=3", "--set", "keys-dir=keys",
                    "--set", "encrypted-data-dir=enc", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "partition 1 cannot use its data" in last and "failed authentication" in last, last
    assert "Traceback" not in proc.stderr
    aborted = json.loads((_run_dir(tmp_path / "corrupt") / "metrics.json").read_text())
    (failure,) = [f for r in aborted["rounds"] for f in r["failures"]]
    assert failure["partition_id"] == 1 and failure["code"] == 4003
    assert len(aborted["rounds"]) == 1  # it ended in the round it was found


def test_budget_refusal_leaves_clients_out_and_the_run_goes_on(flower_home, tmp_path):
    # σ fixed by hand: round 1 costs ε≈6.5, round 2 would reach ≈8.0 > budget 7.
    fedvault("simulate", "digits-dp", "--num-clients", "3", "--output-dir", str(tmp_path),
             "--set", "num-server-rounds=3", "--set", "noise-multiplier=0.6366",
             "--set", "target-epsilon=7.0")  # fmt: skip
    run_dir = _run_dir(tmp_path)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert len(rounds[0]["clients"]) == 3 and not rounds[0]["failures"]
    for later in rounds[1:]:
        assert later["clients"] == []
        assert sorted(f["partition_id"] for f in later["failures"]) == [0, 1, 2]
        assert all(f["refused"] and f["code"] == 4001 for f in later["failures"])
        assert "privacy budget exhausted" in later["failures"][0]["reason"]
        assert later["max_epsilon"] == rounds[0]["max_epsilon"] <= 7.0
        assert later["test_accuracy"] == rounds[0]["test_accuracy"]  # nothing aggregated
    assert "refuses to train" in (run_dir / "simulation.log").read_text()


def test_a_kept_federation_spends_one_lifetime_budget_across_runs(flower_home, tmp_path):
    """Two runs on the same simulated holders compose (before: each run started at ε 0),
    and a run asking them to train without DP is refused by every holder."""
    from common.federation_keys import client_dir
    from common.privacy.policy import POLICY_FILE, PrivacyPolicy

    keys = tmp_path / "holders"
    fedvault("keys", "federation", "--out", str(keys), "--clients", "3")
    for pid in range(3):  # each holder's own policy: ε 8 for the lifetime of its data
        PrivacyPolicy(dataset_id=f"holder-{pid}", lifetime_epsilon=8.0).save(
            client_dir(keys, pid) / POLICY_FILE
        )
    common = ["--num-clients", "3", "--set", f"keys-dir={keys}", "--set", "num-server-rounds=2",
              "--set", "target-epsilon=4.0"]  # fmt: skip
    runs = []
    for name in ("first", "second"):
        fedvault("simulate", "digits-dp", *common, "--output-dir", str(tmp_path / name))
        runs.append(json.loads((_run_dir(tmp_path / name) / "metrics.json").read_text()))
    first_end = {c["partition_id"]: c["epsilon"] for c in runs[0]["rounds"][-1]["clients"]}
    second = runs[1]["rounds"]
    for c in second[0]["clients"]:  # run 2 continues where run 1 stopped
        assert c["epsilon"] > first_end[c["partition_id"]]
    assert 3.9 < max(first_end.values()) <= 4.0
    assert 7.9 < second[-1]["max_epsilon"] <= 8.0  # the lifetime budget, not 2 × 4 fresh ones
    downgraded = fedvault("simulate", "digits-dp", *common, "--set", "dp=false",
                          "--output-dir", str(tmp_path / "nodp"), check=False)  # fmt: skip
    assert downgraded.returncode == 1
    assert "require-dp = true" in downgraded.stderr
    failures = json.loads((_run_dir(tmp_path / "nodp") / "metrics.json").read_text())
    refusals = failures["rounds"][0]["failures"]
    assert sorted(f["partition_id"] for f in refusals) == [0, 1, 2]
    assert all(f["refused"] and f["code"] == 4002 for f in refusals)


@pytest.mark.parametrize(
    "args,message",
    [
        (["no-such-scenario"], "unknown scenario 'no-such-scenario'"),
        (["--set", "batch-size=big"], "'batch-size' has value 'big'"),
        (["--set", "bacth-size=3"], "unknown run-config key(s) ['bacth-size']"),
        (["--num-clients", "1"], "raise --num-clients"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = fedvault("simulate", *args, "--output-dir", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_every_run_has_a_report_whose_audit_passes(digits_run):
    for name in ("report.html", "report.json", "report.md", "ledger.jsonl"):
        assert (digits_run / name).is_file(), name
    report = json.loads((digits_run / "report.json").read_text())
    assert report["audit"]["verdict"] == "pass"
    ledger = [json.loads(line) for line in (digits_run / "ledger.jsonl").read_text().splitlines()]
    assert sorted((e["round"], e["partition_id"]) for e in ledger) == [
        (r, p) for r in (1, 2) for p in (0, 1, 2)
    ]
    assert all(e["signature"] for e in ledger)  # signed by each client's key
    audit = fedvault("audit", str(digits_run), check=False)
    assert audit.returncode == 0 and "PASSED" in audit.stdout
    # an under-reported ε in one line breaks the audit, naming the client and round
    entries = [json.loads(line) for line in (digits_run / "ledger.jsonl").read_text().splitlines()]
    entries[1]["epsilon_cumulative"] *= 0.5
    tampered = digits_run.parent / "tampered"
    tampered.mkdir()
    for name in ("metrics.json", "keys"):
        src = digits_run / name
        (tampered / name).symlink_to(src, target_is_directory=src.is_dir())
    (tampered / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    failed = fedvault("audit", str(tampered), check=False)
    assert failed.returncode == 1
    who = f"client {entries[1]['partition_id']}, round {entries[1]['round']}"
    assert who in failed.stdout, failed.stdout


def test_holders_bring_their_own_image_folders(flower_home, tmp_path):
    """digits-folders-dp: each simulated holder reads <data-dir>/client-<i>/ (its own size
    and label mix), the server its own held-out folder; evaluate works on the run."""
    fedvault("data", "demo-folders", "--out", "demo-holders", "--clients", "3", cwd=tmp_path)
    fedvault("simulate", "digits-folders-dp", "--num-clients", "3", "--output-dir", "runs",
             "--set", "num-server-rounds=2", cwd=tmp_path)  # fmt: skip
    run_dir = _run_dir(tmp_path / "runs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"]["train_examples"] is None  # the server never held them
    assert metrics["summary"]["test_examples"] == 360
    sizes = {c["partition_id"]: c["num_examples"] for c in metrics["rounds"][0]["clients"]}
    assert sorted(sizes) == [0, 1, 2] and len(set(sizes.values())) == 3  # sizes of their own
    assert metrics["rounds"][-1]["test_accuracy"] > 0.25  # chance is 0.1
    evaluation = json.loads(fedvault("evaluate", str(run_dir), "--json").stdout)
    assert evaluation["accuracy"] == pytest.approx(metrics["rounds"][-1]["test_accuracy"])

    # a holder's folder with a class the operator never declared: the run ends naming the
    # holder; the label and the path stay in the holder's own log line, not in the server's
    lion = tmp_path / "demo-holders" / "client-1" / "lion"
    lion.mkdir()
    a_digit = next((tmp_path / "demo-holders" / "test" / "0").iterdir())
    (lion / "x.png").write_bytes(a_digit.read_bytes())
    proc = fedvault("simulate", "digits-folders-dp", "--num-clients", "3", "--output-dir", "bad",
                    "--set", "num-server-rounds=2", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "partition 1 cannot use its data: this holder's own data is unusable" in last, last
    assert "lion" not in last
    assert "label 'lion' is not one of the federation's classes" in proc.stderr  # holder's log
