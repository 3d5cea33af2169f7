"""write_report: report.json/.md/.html from a run directory, self-contained, in a browser too."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from html import escape

import pytest

from benchmarks.synthetic import write_synthetic_run
from common.audit.recompute import Recomputer
from common.crypto.keys import init_identity
from common.ops.audit_cli import EXIT_OK, cmd_report
from common.report import write_report
from common.rundir import RunDirError

CLIENTS, ROUNDS, BUDGET = 3, 6, 5.0
URL_ATTR = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def recomputer():
    return Recomputer()


@pytest.fixture(scope="module")
def run(tmp_path_factory, recomputer):
    """A signed DP run whose clients hit their budget in the last round (one refusal each)."""
    base = tmp_path_factory.mktemp("report")
    signers = {p: init_identity(base / f"k{p}", "client", f"client-{p}") for p in range(CLIENTS)}
    run = write_synthetic_run(
        base / "run", clients=CLIENTS, rounds=ROUNDS, budget=BUDGET, signers=signers,
        recomputer=recomputer,
    )  # fmt: skip
    (run / "keys").mkdir()
    for p, identity in signers.items():
        shutil.copy(identity.directory / "public.json", run / "keys" / f"client-{p}.json")
    return run


@pytest.fixture(scope="module")
def paths(run):
    return write_report(run)


@pytest.fixture(scope="module")
def report(paths):
    return json.loads(paths["json"].read_text(encoding="utf-8"))


def test_writes_three_files(paths, run):
    assert set(paths) == {"html", "json", "md"}
    assert {p.name for p in paths.values()} == {"report.html", "report.json", "report.md"}
    assert all(p.parent == run and p.stat().st_size > 0 for p in paths.values())


UNIT = ("record-level (ε, δ) per data holder, over the holder's lifetime on its data set; "
        "δ = 1e-05")


def test_report_json_fields(report, paths):
    # the unit of every ε comes first
    assert next(iter(report)) == "unit" and report["unit"] == UNIT
    assert paths["json"].read_text(encoding="utf-8").splitlines()[1].startswith('  "unit": ')
    assert report["format"] == "fedvault-privacy-report" and report["run_id"] == "4242"
    summary = report["summary"]
    assert summary["dataset"] == "digits" and summary["model"] == "lenet5"
    assert summary["clients"] == CLIENTS and summary["rounds_planned"] == ROUNDS
    assert summary["dp"] is True and summary["target_epsilon"] == BUDGET
    assert summary["accountant"] == "prv" and summary["target_delta"] == 1e-5
    assert summary["final_test_accuracy"] is not None and summary["wall_seconds"] == 12.5
    assert summary["ledger"].startswith("present")
    clients = report["clients"]
    assert [c["partition_id"] for c in clients] == list(range(CLIENTS))
    for c in clients:
        assert 0 < c["epsilon_spent"] <= BUDGET
        assert c["epsilon_remaining"] == pytest.approx(BUDGET - c["epsilon_spent"])
        assert c["epsilon_budget"] == BUDGET and c["run_epsilon_budget"] == BUDGET
        assert c["epsilon_this_run"] == c["epsilon_spent"]  # a new holder: all of it this run
        assert len(c["chain_id"]) == 32
        assert c["rounds_trained"] == 5 and c["refusals"] == 1 and c["source"] == "ledger"
        assert c["audit_ok"] is True and "rdp" in c["recomputed_epsilon"]
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert rounds[-1]["refused"] == CLIENTS and rounds[-1]["trained"] == 0
    assert set(rounds[0]["epsilon_by_client"]) == {"0", "1", "2"}
    assert all(r["test_accuracy"] is not None for r in rounds)
    mech = report["mechanisms"][0]
    assert mech["noise_multiplier"] == 1.0 and mech["sample_rate"] == 0.05
    assert mech["steps"] == 40 and mech["max_grad_norm"] == 1.0 and mech["delta"] == 1e-5
    assert report["warnings"] == []
    assert report["audit"]["verdict"] == "pass" and report["audit"]["verdict_ok"] is True
    assert "consistent, NOT independent: these keys came from the server" in (
        report["audit"]["verdict_line"]
    )
    assert "train_loss" not in json.dumps(report) and "train_seconds" not in json.dumps(report)


def test_report_md_has_the_clients_table(paths):
    md = paths["md"].read_text(encoding="utf-8")
    assert md.splitlines()[0] == f"ε in this report: {UNIT}."
    assert "\n# fedvault privacy report — run 4242\n" in md
    assert ("| client | lifetime ε spent | lifetime budget ε | remaining ε | this run added ε "
            "| run budget ε | rounds trained | refusals |") in md  # fmt: skip
    for pid in range(CLIENTS):
        assert re.search(rf"^\| {pid} \| \d+\.\d{{3}} \| 5\.000 \|", md, re.M)
    assert "Mechanism parameters" in md and "Audit: PASSED" in md
    assert "NOT independent" in md


def test_report_html_is_self_contained(paths):
    html = paths["html"].read_text(encoding="utf-8")
    assert "<title>fedvault privacy report — run 4242</title>" in html
    body = html.split("<body>\n", 1)[1]
    assert body.startswith(f'<p id="unit"><strong>ε in this report: {escape(UNIT)}.')
    assert not URL_ATTR.search(html)
    assert "http://" not in html and "https://" not in html  # not even a namespace URL
    assert "@import" not in html and "url(http" not in html and "<script" not in html
    assert "<svg" in html or "data:image/png;base64" in html
    assert html.count("<svg") == 3  # ε per client, accuracy, accuracy against ε
    table = re.search(r'<table id="clients">.*?</table>', html, re.S)
    assert table and "lifetime ε spent" in table.group(0) and "this run added ε" in table.group(0)
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # several inline SVGs, no clashing ids


def test_report_is_written_atomically(paths, run):
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_run_without_dp(tmp_path, recomputer):
    run = write_synthetic_run(tmp_path / "nodp", dp=False, recomputer=recomputer)
    paths = write_report(run)
    report = json.loads(paths["json"].read_text())
    assert report["summary"]["dp"] is False
    assert report["summary"]["ledger"].startswith("not applicable")
    assert report["audit"]["verdict"] == "not-applicable"
    assert [w["code"] for w in report["warnings"]] == ["no-dp"]
    assert all(c["epsilon_spent"] is None for c in report["clients"])
    html = paths["html"].read_text()
    assert "disabled (dp = false)" in html and html.count("<svg") == 1
    assert "DP is disabled" in paths["md"].read_text()


def test_run_without_ledger_uses_metrics(tmp_path, recomputer):
    run = write_synthetic_run(tmp_path / "noledger", ledger=False, recomputer=recomputer)
    report = json.loads(write_report(run)["json"].read_text())
    assert report["summary"]["ledger"] == "missing"
    assert "ledger-missing" in [w["code"] for w in report["warnings"]]
    assert all(c["source"] == "metrics.json" and c["epsilon_spent"] > 0 for c in report["clients"])
    assert report["mechanisms"] and report["mechanisms"][0]["source"] == "metrics.json"
    assert report["audit"]["verdict"] == "fail"


def test_mechanism_warnings(tmp_path, recomputer):
    # 30 examples, δ = 0.05 ≥ 1/30, q = 1: the whole data set every step
    run = write_synthetic_run(
        tmp_path / "weak", clients=2, rounds=2, num_examples=30, batch_size=30, epochs=1,
        sigma=2.0, delta=0.05, budget=50.0, recomputer=recomputer,
    )  # fmt: skip
    report = json.loads(write_report(run)["json"].read_text())
    codes = [(w["code"], w["partition_id"]) for w in report["warnings"]]
    for pid in (0, 1):
        assert ("advice-delta", pid) in codes and ("advice-no-subsampling", pid) in codes
    assert all(w["message"].startswith("client ") for w in report["warnings"])


def test_budget_exceeded_warning_and_failed_audit(tmp_path, recomputer):
    run = write_synthetic_run(tmp_path / "over", budget=3.0, enforce_budget=False,
                              recomputer=recomputer)  # fmt: skip
    report = json.loads(write_report(run)["json"].read_text())
    assert all(c["budget_exceeded"] for c in report["clients"])
    assert "advice-budget-exceeded" in {w["code"] for w in report["warnings"]}
    assert report["audit"]["verdict"] == "fail"


def test_second_run_reports_lifetime_and_what_this_run_added(tmp_path, recomputer):
    holders: dict = {}
    write_synthetic_run(tmp_path / "a", clients=2, rounds=2, budget=8.0, run_budget=3.0,
                        run_id="71", ledgers=holders, recomputer=recomputer)  # fmt: skip
    before = {p: h.epsilon_spent for p, h in holders.items()}
    run = write_synthetic_run(tmp_path / "b", clients=2, rounds=2, budget=8.0, run_budget=3.0,
                              run_id="72", ledgers=holders, recomputer=recomputer)  # fmt: skip
    report = json.loads(write_report(run)["json"].read_text())
    assert report["audit"]["verdict"] == "pass", report["audit"]["findings"]
    for c in report["clients"]:
        pid = c["partition_id"]
        assert c["epsilon_spent"] == holders[pid].epsilon_spent  # lifetime, not this run's
        assert c["epsilon_this_run"] == pytest.approx(c["epsilon_spent"] - before[pid])
        assert 0 < c["epsilon_this_run"] <= 3.0 and c["run_epsilon_budget"] == 3.0
        assert c["epsilon_remaining"] == pytest.approx(8.0 - c["epsilon_spent"])
        assert c["rounds_trained"] == 2  # this run's rounds, not the chain's length
    entries = sum(len(h) for h in holders.values())  # whole chains, earlier runs included
    assert report["summary"]["ledger"] == f"present ({entries} entries)"


def test_not_a_run_dir(tmp_path):
    with pytest.raises(RunDirError, match=r"no metrics\.json"):
        write_report(tmp_path)


def test_cli_report(run, capsys):
    args = argparse.Namespace(run_dir=str(run), tolerance=0.01, keys=None, strict=True, workers=2)
    assert cmd_report(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "audit pass" in out and "report.html" in out


def test_html_renders_in_headless_chromium(paths, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    from PIL import Image

    url = paths["html"].resolve().as_uri()
    common = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    shot = tmp_path / "r.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,1600", url],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1
    assert any(colour != (255, 255, 255) for _, colour in colours)
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert "fedvault privacy report — run 4242" in dom
    assert 'id="clients"' in dom and "ε spent" in dom
