"""Issue 13, item 3: the audit holds against a dishonest server (and a modified client's plan).

Each test is an attack the audit used to PASS; it must now fail the audit, naming what it
found. The server controls ``ledger.jsonl``, ``metrics.json`` and ``keys/`` of a run
directory; what it cannot do is sign as a client whose real key the auditor holds, or make
two runs' copies of one holder's chain disagree without the audit of both seeing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from benchmarks.synthetic import write_synthetic_run
from common.audit.audit import audit_run, audit_runs
from common.audit.recompute import Recomputer
from common.crypto.keys import init_identity
from common.ops.audit_cli import EXIT_AUDIT_FAILED, EXIT_OK, cmd_audit
from common.privacy.ledger import GENESIS_HASH, LEDGER_FILE, ClientLedger, LedgerEntry

CLIENTS, ROUNDS = 3, 4


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    base = tmp_path_factory.mktemp("holders")
    return {p: init_identity(base / f"client-{p}", "client", f"client-{p}") for p in range(CLIENTS)}


@pytest.fixture(scope="module")
def auditor_keys(identities, tmp_path_factory):
    """The clients' public.json files as the auditor got them from the clients."""
    keys = tmp_path_factory.mktemp("auditor-keys")
    for pid, identity in identities.items():
        shutil.copy(identity.directory / "public.json", keys / f"client-{pid}.json")
    return keys


@pytest.fixture(scope="module")
def recomputer():
    return Recomputer()


def _run(path: Path, identities, recomputer, **kwargs) -> Path:
    params = {"clients": CLIENTS, "rounds": ROUNDS, "signers": identities,
              "recomputer": recomputer, **kwargs}  # fmt: skip
    run = write_synthetic_run(path, **params)
    (run / "keys").mkdir()
    for pid in sorted({int(p) for p in _metrics(run)["final"]["epsilon_by_partition"]}):
        shutil.copy(identities[pid].directory / "public.json", run / "keys" / f"client-{pid}.json")
    return run


def _entries(run: Path) -> list[LedgerEntry]:
    text = (run / LEDGER_FILE).read_text(encoding="utf-8")
    return [LedgerEntry.from_json_line(line) for line in text.splitlines() if line]


def _write_entries(run: Path, entries: list[LedgerEntry]) -> None:
    (run / LEDGER_FILE).write_text("".join(e.to_json_line() + "\n" for e in entries))


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def _write_metrics(run: Path, metrics: dict) -> None:
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _rewrite_chains(entries: list[LedgerEntry], change) -> list[LedgerEntry]:
    """What a server can do without any client key: edit entries, re-link, re-hash, unsigned."""
    out, last = [], {}
    for e in entries:
        edited = dataclasses.replace(change(e), signer="", signature="", hash="")
        prev = last.get(e.chain_id, GENESIS_HASH)
        sealed = dataclasses.replace(edited, prev_hash=prev).sealed(None)
        last[e.chain_id] = sealed.hash
        out.append(sealed)
    return out


def _codes(result) -> set[str]:
    return {f.code for f in result.errors}


# --------------------------------------------------------------------------------------------
# attack 1: strip every signature, double every σ, re-chain, patch metrics.json


def test_stripped_signatures_and_doubled_sigma_fail_against_real_keys(
    tmp_path, identities, auditor_keys, recomputer
):
    run = _run(tmp_path / "run", identities, recomputer)
    forged = _rewrite_chains(
        _entries(run), lambda e: dataclasses.replace(e, noise_multiplier=2 * e.noise_multiplier)
    )
    _write_entries(run, forged)
    metrics = _metrics(run)
    for rec in metrics["rounds"]:
        for c in rec["clients"]:
            c["noise_multiplier"] *= 2
    _write_metrics(run, metrics)
    shutil.rmtree(run / "keys")  # the server would not hand over keys that convict it
    result = audit_run(run, keys_dir=auditor_keys)
    assert result.verdict == "fail"
    unsigned = [f for f in result.errors if f.code == "unsigned"]
    assert {f.partition_id for f in unsigned} == set(range(CLIENTS))
    assert "key is known" in unsigned[0].message
    # the same rule holds with the keys the server copied, had it left them in place
    for pid, identity in identities.items():
        (run / "keys").mkdir(exist_ok=True)
        shutil.copy(identity.directory / "public.json", run / "keys" / f"client-{pid}.json")
    assert "unsigned" in _codes(audit_run(run))


def test_unsigned_chain_of_a_client_without_a_key_is_only_a_warning(tmp_path, recomputer):
    run = write_synthetic_run(tmp_path / "run", clients=2, rounds=2, recomputer=recomputer)
    result = audit_run(run)
    assert result.verdict == "pass", [f.message for f in result.errors]
    assert {f.code for f in result.warnings} == {"unsigned"}
    assert "integrity unverified" in result.summary()


# --------------------------------------------------------------------------------------------
# attack 2: the verdict says whose keys it used


def test_verdict_line_says_whose_keys(tmp_path, identities, auditor_keys, recomputer, capsys):
    run = _run(tmp_path / "run", identities, recomputer)
    independent = audit_run(run, keys_dir=auditor_keys)
    assert independent.verdict == "pass" and independent.independent
    assert "a verdict against the server" in independent.summary()
    server = audit_run(run)
    assert server.verdict == "pass" and not server.independent
    assert "consistent, NOT independent: these keys came from the server" in server.summary()
    shutil.rmtree(run / "keys")
    none = audit_run(run)
    assert none.verdict == "pass" and not none.independent
    assert "integrity unverified" in none.summary() and "NOT independent" in none.summary()
    # no independent keys still exits 0 when everything else checks; the line says why not more
    args = argparse.Namespace(run_dirs=[str(run)], tolerance=0.01, keys=None, json=False,
                              workers=1)  # fmt: skip
    assert cmd_audit(args) == EXIT_OK
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "PASSED" in last and "integrity unverified" in last and "NOT independent" in last


# --------------------------------------------------------------------------------------------
# attack 3: drop a client's last rounds, a whole client, or roll a holder back


def test_dropped_last_rounds_with_epsilon_removed_from_metrics(tmp_path, identities, recomputer):
    run = _run(tmp_path / "run", identities, recomputer)
    _write_entries(run, [e for e in _entries(run) if not (e.partition_id == 2 and e.round >= 3)])
    metrics = _metrics(run)
    for rec in metrics["rounds"]:
        for c in rec["clients"]:
            if c["partition_id"] == 2 and rec["round"] >= 3:
                c["epsilon"] = c["round_epsilon"] = None
    _write_metrics(run, metrics)
    result = audit_run(run)
    assert result.verdict == "fail"
    missing = [f for f in result.errors if f.code == "entry-missing"]
    assert [(f.partition_id, f.round) for f in missing] == [(2, 3), (2, 4)]


def test_dropped_client_is_found_with_its_key(tmp_path, identities, auditor_keys, recomputer):
    run = _run(tmp_path / "run", identities, recomputer)
    _write_entries(run, [e for e in _entries(run) if e.partition_id != 2])
    metrics = _metrics(run)
    for rec in metrics["rounds"]:
        rec["clients"] = [c for c in rec["clients"] if c["partition_id"] != 2]
        rec["sampled"] = [p for p in rec["sampled"] if p != 2]
    metrics["final"]["epsilon_by_partition"].pop("2")
    _write_metrics(run, metrics)
    (run / "keys" / "client-2.json").unlink()
    assert audit_run(run).verdict == "pass"  # invisible without the holder's key
    result = audit_run(run, keys_dir=auditor_keys)
    assert result.verdict == "fail"
    [absent] = [f for f in result.errors if f.code == "key-without-entries"]
    assert absent.message.startswith(
        "client 2: client 2's key was given but the run has no entries from it"
    )


def test_rolled_back_holder_is_a_fork_across_runs(
    tmp_path, identities, auditor_keys, recomputer, capsys
):
    holders: dict[int, ClientLedger] = {}
    first = _run(tmp_path / "a", identities, recomputer, rounds=2, run_id="1001",
                 ledgers=holders)  # fmt: skip
    # holder 1's state is restored to a copy taken after its first entry: it forgets round 2
    h1 = holders[1]
    holders[1] = ClientLedger(h1.dataset_id, h1.chain_id, h1.entries[:1])
    second = _run(tmp_path / "b", identities, recomputer, rounds=2, run_id="1002",
                  ledgers=holders)  # fmt: skip
    for run in (first, second):  # each run on its own is consistent
        assert audit_run(run, keys_dir=auditor_keys).verdict == "pass"
    result = audit_runs([first, second], keys_dir=auditor_keys)
    assert not result.verdict_ok
    [fork] = [f for f in result.errors if f.code == "fork"]
    assert fork.partition_id == 1 and "seq 2" in fork.message
    args = argparse.Namespace(run_dirs=[str(first), str(second)], tolerance=0.01,
                              keys=str(auditor_keys), json=False, workers=1)  # fmt: skip
    assert cmd_audit(args) == EXIT_AUDIT_FAILED
    assert "fork" in capsys.readouterr().out
    # honest continuation: the same holders' chains extend across runs, and pass together
    honest: dict[int, ClientLedger] = {}
    runs = [_run(tmp_path / f"h{i}", identities, recomputer, rounds=2, run_id=f"200{i}",
                 ledgers=honest) for i in range(2)]  # fmt: skip
    together = audit_runs(runs, keys_dir=auditor_keys)
    assert together.verdict_ok, [f.message for f in together.errors]


def test_truncated_run_is_found_from_the_holders_later_chain(
    tmp_path, identities, auditor_keys, recomputer
):
    """Item 6: a later run's copy of a chain shows what an earlier run's ledger dropped."""
    holders: dict[int, ClientLedger] = {}
    first = _run(tmp_path / "a", identities, recomputer, rounds=2, run_id="1001",
                 ledgers=holders)  # fmt: skip
    second = _run(tmp_path / "b", identities, recomputer, rounds=2, run_id="1002",
                  ledgers=holders)  # fmt: skip
    # run 1001 loses client 0's round 2 everywhere: ledger, metrics, sampled
    _write_entries(first, [e for e in _entries(first) if (e.partition_id, e.round) != (0, 2)])
    metrics = _metrics(first)
    rec = metrics["rounds"][1]
    rec["clients"] = [c for c in rec["clients"] if c["partition_id"] != 0]
    rec["sampled"] = [p for p in rec["sampled"] if p != 0]
    _write_metrics(first, metrics)
    assert audit_run(first, keys_dir=auditor_keys).verdict == "pass"  # alone: a valid prefix
    result = audit_runs([first, second], keys_dir=auditor_keys)
    dropped = [f for f in result.errors if f.code == "dropped-from-run"]
    assert [(f.partition_id, f.round) for f in dropped] == [(0, 2)]
    assert "1001" in dropped[0].message


# --------------------------------------------------------------------------------------------
# attack 4: no metrics.json, no completeness


def test_without_metrics_the_audit_cannot_pass(tmp_path, identities, auditor_keys, recomputer,
                                               capsys):  # fmt: skip
    run = _run(tmp_path / "run", identities, recomputer)
    (run / "metrics.json").unlink()
    result = audit_run(run, keys_dir=auditor_keys)
    assert result.verdict == "not-verified" and not result.verdict_ok
    assert "NOT VERIFIED: metrics.json missing, completeness unchecked" in result.summary()
    args = argparse.Namespace(run_dirs=[str(run)], tolerance=0.01, keys=str(auditor_keys),
                              json=False, workers=1)  # fmt: skip
    assert cmd_audit(args) == EXIT_AUDIT_FAILED
    assert "NOT VERIFIED" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# attack 5: q and steps that the signed n, B and epochs do not give


@pytest.mark.parametrize("field,value", [("sample_rate", 0.04), ("steps", 30)])
def test_plan_must_follow_from_signed_n_batch_and_epochs(
    field, value, tmp_path, identities, recomputer
):
    # a modified client signs a plan with less sampling (or fewer steps) than n, B, epochs give,
    # and claims the ε of that plan: every claim recomputes, the chain and signatures are valid
    holder = ClientLedger("data-set-x")
    history: list[tuple[float, float, int]] = []
    run = _run(tmp_path / "run", identities, recomputer, clients=1, rounds=2)
    entries = []
    for rnd in (1, 2):
        plan = {"sample_rate": 0.05, "steps": 40, field: value}
        history.append((1.0, plan["sample_rate"], plan["steps"]))
        eps = recomputer.epsilon(history, 1e-5, "prv")
        entries.append(holder.append(
            run_id="4242", round=rnd, partition_id=0, node_id="1000", num_examples=800,
            batch_size=40, epochs=2, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
            accountant="prv", epsilon_cumulative=eps, epsilon_budget=8.0,
            run_epsilon_budget=8.0, signer=identities[0], **plan,
        ))  # fmt: skip
    _write_entries(run, entries)
    metrics = _metrics(run)
    for rec, e in zip(metrics["rounds"], entries, strict=True):
        rec["clients"][0].update(epsilon=e.epsilon_cumulative, round_epsilon=e.epsilon_round,
                                 chain_id=e.chain_id, **{field: value})  # fmt: skip
    _write_metrics(run, metrics)
    result = audit_run(run)
    plan_errors = [f for f in result.errors if f.code == "plan-mismatch"]
    assert [(f.partition_id, f.round) for f in plan_errors] == [(0, 1), (0, 2)]
    expected = "0.05" if field == "sample_rate" else "40"
    assert f"{value}" in plan_errors[0].message and expected in plan_errors[0].message
