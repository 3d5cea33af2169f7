"""audit_run: honest runs pass; lies about ε, budgets and the ledger itself are caught."""

from __future__ import annotations

import argparse
import json
import shutil
import time

import pytest

from benchmarks.synthetic import write_synthetic_run
from common.audit.audit import audit_run
from common.audit.recompute import Recomputer
from common.crypto.keys import init_identity
from common.ops.audit_cli import EXIT_AUDIT_FAILED, EXIT_OK, cmd_audit
from common.privacy.accounting import epsilon_of
from common.privacy.ledger import LEDGER_FILE, LedgerEntry
from common.rundir import RunDirError

CLIENTS, ROUNDS, SIGMA, Q, STEPS, DELTA = 3, 4, 1.0, 0.05, 40, 1e-5


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    base = tmp_path_factory.mktemp("client-keys")
    return {p: init_identity(base / f"client-{p}", "client", f"client-{p}") for p in range(CLIENTS)}


@pytest.fixture(scope="module")
def recomputer():
    """One cache for the module: every run here shares the mechanism."""
    return Recomputer()


def _run(tmp_path, identities, recomputer, accountant="prv", **kwargs):
    """A signed run: 3 clients × 4 rounds of σ=1.0, q=0.05, 40 steps; keys in run/keys."""
    params = {"clients": CLIENTS, "rounds": ROUNDS, "sigma": SIGMA, "num_examples": 800,
              "batch_size": 40, "epochs": 2, "delta": DELTA, "accountant": accountant,
              "budget": 8.0, **kwargs}  # fmt: skip
    run = write_synthetic_run(
        tmp_path / "run", signers=identities, recomputer=recomputer, **params
    )
    (run / "keys").mkdir()
    for pid, identity in identities.items():
        shutil.copy(identity.directory / "public.json", run / "keys" / f"client-{pid}.json")
    return run


def _ledger(run) -> list[LedgerEntry]:
    return [LedgerEntry.from_json_line(line) for line in (run / LEDGER_FILE).read_text().split("\n")
            if line]  # fmt: skip


def _errors(result, code=None):
    return [f for f in result.errors if code is None or f.code == code]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_honest_signed_run_passes(accountant, tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer, accountant)
    # the ledger's claims are exactly what the client's own accountant computes
    honest = [epsilon_of([(SIGMA, Q, STEPS)] * r, DELTA, accountant) for r in range(1, 5)]
    for entry in _ledger(run):
        assert entry.epsilon_cumulative == honest[entry.round - 1]
        assert entry.signature and entry.signer
    result = audit_run(run)
    assert result.verdict_ok, [f.message for f in result.findings]
    assert result.findings == []
    assert result.verdict == "pass"
    assert len(result.checks) == CLIENTS * ROUNDS
    assert result.keys_source.endswith("keys")
    for check in result.checks:
        assert not check.under_reported
        # both accountants were asked; RDP is the looser one
        assert check.recomputed["rdp"] >= check.claimed * (0.99 if accountant == "rdp" else 1.0)


def test_under_reported_epsilon_is_caught_by_recomputation(tmp_path, identities, recomputer):
    # client 1 claims 80 % of its true ε, in a validly signed, intact chain
    run = _run(tmp_path, identities, recomputer, under_report={1: 0.8})
    result = audit_run(run)
    assert not result.verdict_ok
    under = _errors(result, "under-reported")
    assert sorted(f.round for f in under) == list(range(1, ROUNDS + 1))
    assert {f.partition_id for f in under} == {1}
    assert all(f.message.startswith(f"client 1, round {f.round}: claims ε=") for f in under)
    assert "under-reported by 20.0%" in under[0].message
    # nothing else is wrong with the ledger: only the recomputation could tell
    assert {f.code for f in result.errors} == {"under-reported"}


def test_claim_within_tolerance_passes_and_over_reporting_warns(tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer, under_report={0: 0.995, 2: 1.2})
    result = audit_run(run, tolerance=0.01)
    assert result.verdict_ok, [f.message for f in result.errors]
    over = [f for f in result.warnings if f.code == "over-reported"]
    assert [f.partition_id for f in over] == [2]
    strict = audit_run(run, tolerance=0.001)
    assert {f.partition_id for f in _errors(strict, "under-reported")} == {0}


def test_budget_exceeded_is_reported(tmp_path, identities, recomputer):
    # clients ignore a budget of ε = 3 and keep training
    run = _run(tmp_path, identities, recomputer, budget=3.0, enforce_budget=False)
    result = audit_run(run)
    assert not result.verdict_ok
    exceeded = _errors(result, "budget-exceeded")
    assert {f.partition_id for f in exceeded} == set(range(CLIENTS))
    first_over = min(r for r in range(1, ROUNDS + 1)
                     if epsilon_of([(SIGMA, Q, STEPS * r)], DELTA, "prv") > 3.0)  # fmt: skip
    assert all(f.round == first_over for f in exceeded)
    assert "exceeded its lifetime privacy budget" in exceeded[0].message


def test_run_budget_above_the_runs_target_is_an_error(tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["target-epsilon"] = 4.0  # the run asked for less than the holders took
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = audit_run(run)
    above = _errors(result, "run-budget-above-target")
    assert {f.partition_id for f in above} == set(range(CLIENTS))
    assert "run_epsilon_budget ε=8 is above the run's target-epsilon 4" in above[0].message


def test_what_a_run_added_is_checked_against_its_run_budget(tmp_path, identities, recomputer):
    # lifetime budget 8, this run may add 2; the clients ignore the run budget
    run = _run(tmp_path, identities, recomputer, run_budget=2.0, enforce_budget=False)
    result = audit_run(run)
    over = _errors(result, "run-budget-exceeded")
    assert {f.partition_id for f in over} == set(range(CLIENTS))
    assert all(f.round == ROUNDS for f in over)  # checked where the run ends
    assert "over what the run could add (run_epsilon_budget 2)" in over[0].message
    assert not _errors(result, "budget-exceeded")  # the lifetime budget held


def test_lifetime_epsilon_is_recomputed_over_the_whole_chain(tmp_path, identities, recomputer):
    holders: dict = {}
    first = _run(tmp_path / "a", identities, recomputer, rounds=2, run_id="11", ledgers=holders)
    second = _run(tmp_path / "b", identities, recomputer, rounds=2, run_id="12",
                  ledgers=holders)  # fmt: skip
    assert audit_run(first).verdict_ok
    result = audit_run(second)
    assert result.verdict_ok, [f.message for f in result.errors]
    # the ledger of run 12 holds every chain from seq 1: 4 entries per holder
    assert result.entries == CLIENTS * 4 and len(result.checks) == CLIENTS * 2
    for check in result.checks:
        assert check.run_id == "12" and check.seq == check.round + 2
        lifetime = [(SIGMA, Q, STEPS)] * check.seq
        assert check.recomputed["rdp"] == epsilon_of(lifetime, DELTA, "rdp")


def test_dropped_last_entry_is_caught_against_metrics(tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer)
    lines = (run / LEDGER_FILE).read_text().splitlines()
    kept = [line for line in lines
            if (json.loads(line)["partition_id"], json.loads(line)["round"]) != (2, ROUNDS)]
    (run / LEDGER_FILE).write_text("\n".join(kept) + "\n")  # fmt: skip
    result = audit_run(run)
    missing = _errors(result, "entry-missing")
    assert [(f.partition_id, f.round) for f in missing] == [(2, ROUNDS)]
    assert missing[0].message.startswith(f"client 2, round {ROUNDS}:")


@pytest.mark.parametrize("tamper", ["drop", "reorder", "forge", "edit"])
def test_ledger_tampering_fails_the_audit(tamper, tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer)
    lines = (run / LEDGER_FILE).read_text().splitlines()
    at = {(json.loads(x)["partition_id"], json.loads(x)["round"]): i for i, x in enumerate(lines)}
    if tamper == "drop":
        del lines[at[(1, 2)]]
    elif tamper == "reorder":
        a, b = at[(1, 2)], at[(1, 3)]
        lines[a], lines[b] = lines[b], lines[a]
    else:
        entry = LedgerEntry.from_json_line(lines[at[(1, 2)]])
        edited = json.loads(lines[at[(1, 2)]])
        edited["epsilon_cumulative"] = entry.epsilon_cumulative / 2
        if tamper == "forge":
            mallory = init_identity(tmp_path / "mallory", "client", "mallory")
            forged = LedgerEntry.from_dict({**edited, "hash": "", "signature": ""}).sealed(mallory)
            lines[at[(1, 2)]] = forged.to_json_line()
        else:
            lines[at[(1, 2)]] = json.dumps(edited)
    (run / LEDGER_FILE).write_text("\n".join(lines) + "\n")
    result = audit_run(run)
    assert not result.verdict_ok
    assert any(f.partition_id == 1 and f.round in (2, 3) and "client 1, round" in f.message
               for f in result.errors)  # fmt: skip


def test_key_of_another_client_is_an_error(tmp_path, identities, recomputer):
    swapped = {0: identities[1], 1: identities[0], 2: identities[2]}
    run = _run(tmp_path, swapped, recomputer)
    result = audit_run(run)
    wrong = _errors(result, "wrong-key")
    assert {f.partition_id for f in wrong} == {0, 1}


def test_explicit_public_keys_override_the_run_dirs(tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer)
    only_two = {identities[p].ids.ed25519: identities[p].ed25519_private.public_key()
                for p in (0, 1)}  # fmt: skip
    result = audit_run(run, public_keys=only_two)
    assert {f.partition_id for f in _errors(result, "unknown-signer")} == {2}


def test_no_keys_means_signatures_unchecked_warning(tmp_path, identities, recomputer):
    run = _run(tmp_path, identities, recomputer)
    shutil.rmtree(run / "keys")
    result = audit_run(run)
    assert result.verdict_ok
    assert {f.code for f in result.warnings} == {"signature-unchecked"}


def test_run_without_dp_or_without_ledger(tmp_path, recomputer):
    no_dp = write_synthetic_run(tmp_path / "nodp", dp=False, recomputer=recomputer)
    result = audit_run(no_dp)
    assert not result.verdict_ok and result.verdict == "not-applicable"
    assert [f.code for f in result.errors] == ["no-dp"]
    no_ledger = write_synthetic_run(tmp_path / "noledger", ledger=False, recomputer=recomputer)
    result = audit_run(no_ledger)
    assert result.verdict == "fail"
    assert [f.code for f in result.errors] == ["ledger-missing"]
    with pytest.raises(RunDirError):
        audit_run(tmp_path / "nowhere")


def test_cli_exit_codes(tmp_path, identities, recomputer, capsys):
    run = _run(tmp_path, identities, recomputer)
    args = argparse.Namespace(run_dir=str(run), tolerance=0.01, keys=None, json=False, workers=1)
    assert cmd_audit(args) == EXIT_OK
    assert "audit PASSED" in capsys.readouterr().out
    lines = (run / LEDGER_FILE).read_text().splitlines()
    (run / LEDGER_FILE).write_text("\n".join(lines[1:]) + "\n")
    assert cmd_audit(argparse.Namespace(**{**vars(args), "json": True})) == EXIT_AUDIT_FAILED
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "fail" and out["errors"] >= 1


def test_parallel_bounds_give_the_same_audit(tmp_path, recomputer):
    """Distinct mechanisms (non-IID): forked workers compute the bounds, nothing changes."""
    run = write_synthetic_run(tmp_path / "distinct", clients=4, rounds=3, distinct=True,
                              under_report={3: 0.8}, recomputer=recomputer)  # fmt: skip
    serial = audit_run(run, workers=1)
    parallel = audit_run(run, workers=2)
    assert parallel.findings == serial.findings
    assert parallel.checks == serial.checks
    assert {f.partition_id for f in parallel.errors} == {3}


# --------------------------------------------------------------------------------------------
# the recomputation itself


HISTORIES = [
    [(1.0, 0.05, 40)],
    [(1.0, 0.05, 400)],
    [(0.7366943359375, 0.06666666666666667, 75)],
    [(1.0, 0.05, 40), (1.1, 0.03, 80), (1.0, 0.05, 10)],
]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("history", HISTORIES)
def test_recomputation_is_bit_identical_to_epsilon_of(history, accountant, recomputer):
    assert recomputer.epsilon(history, DELTA, accountant) == epsilon_of(history, DELTA, accountant)


@pytest.mark.parametrize(
    "sigma,q,steps,rounds",
    [(1.0, 0.05, 40, 8), (0.7366943359375, 0.06666666666666667, 15, 5), (2.0, 0.01, 100, 6),
     (0.6, 0.2, 5, 6)],
)  # fmt: skip
def test_prv_bounds_are_upper_bounds_of_opacus(sigma, q, steps, rounds, recomputer):
    totals = [steps * k for k in range(1, rounds + 1)]
    exact = [epsilon_of([(sigma, q, n)], DELTA, "prv") for n in totals]
    slacks = [0.005 * e for e in exact]
    bounds = recomputer.prv_bounds(sigma, q, DELTA, totals, slacks)
    for b, e, s in zip(bounds, exact, slacks, strict=True):
        assert b is not None
        assert e <= b <= e + max(s, 0.001) * 1.1 + 1e-4


@pytest.mark.slow
def test_audit_of_100_clients_by_50_rounds(tmp_path):
    """Benchmark: 5,000 entries, one mechanism per client (shared, as in an IID run)."""
    started = time.perf_counter()
    run = write_synthetic_run(tmp_path / "big", clients=100, rounds=50, budget=1e6)
    built = time.perf_counter() - started
    result = audit_run(run)
    assert result.verdict_ok, [f.message for f in result.errors[:5]]
    assert result.entries == 5000 and len(result.checks) == 5000
    print(f"\naudit of 100 clients × 50 rounds: {result.seconds:.2f} s "
          f"(building the synthetic ledger: {built:.1f} s)")  # fmt: skip
