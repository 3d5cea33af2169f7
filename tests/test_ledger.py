"""The privacy ledger: append, serialise, and catch every kind of tampering with a chain."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json

import pytest

from common.crypto.keys import init_identity
from common.privacy.ledger import (
    GENESIS_HASH,
    SIGNATURE_LABEL,
    ClientLedger,
    LedgerEntry,
    LedgerError,
    parse_ledger,
    read_ledger,
    write_ledger,
)
from common.privacy.verification import verify_chain

CLIENTS, ROUNDS = 3, 4
TARGET_PID, TARGET_ROUND = 1, 3  # the line the tamper tests change


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    clients = {p: init_identity(base / f"c{p}", "client", f"client-{p}") for p in range(CLIENTS)}
    attacker = init_identity(base / "mallory", "client", "mallory")
    return clients, attacker


@pytest.fixture(scope="module")
def keys(identities):
    clients, _ = identities
    return {i.ids.ed25519: i.ed25519_private.public_key() for i in clients.values()}


def _append(
    ledger: ClientLedger, rnd: int, eps: float, signer, pid: int = 0, run_id: str = "run-1"
) -> LedgerEntry:
    return ledger.append(
        run_id=run_id, round=rnd, partition_id=pid, node_id=f"node-{pid}", num_examples=800,
        batch_size=40, epochs=2, sample_rate=0.05, steps=40, noise_multiplier=1.0,
        max_grad_norm=1.0, delta=1e-5, accountant="prv", epsilon_cumulative=eps,
        epsilon_budget=8.0, run_epsilon_budget=8.0, signer=signer,
    )  # fmt: skip


@pytest.fixture
def lines(identities) -> list[str]:
    """A run's ledger.jsonl lines: 3 signed clients × 4 rounds, interleaved by round."""
    clients, _ = identities
    ledgers = {p: ClientLedger(f"data-{p}") for p in range(CLIENTS)}
    entries = [
        _append(ledgers[p], r, 1.5 * r + 0.1 * p, clients[p], p)
        for r in range(1, ROUNDS + 1)
        for p in range(CLIENTS)
    ]
    return [e.to_json_line() for e in entries]


def _entries(lines: list[str]) -> list[LedgerEntry]:
    entries, problems = parse_ledger("\n".join(lines) + "\n")
    assert not problems
    return entries


def _index(lines: list[str], pid: int, rnd: int) -> int:
    for i, line in enumerate(lines):
        data = json.loads(line)
        if (data["partition_id"], data["round"]) == (pid, rnd):
            return i
    raise AssertionError(f"no line for client {pid}, round {rnd}")


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


def _names(finding, pid: int, rnd: int) -> bool:
    return (
        finding.partition_id == pid
        and finding.round == rnd
        and f"client {pid}" in finding.message
        and f"round {rnd}" in finding.message
    )


# --------------------------------------------------------------------------------------------
# an honest chain


def test_signed_chain_verifies_without_findings(lines, keys):
    entries = _entries(lines)
    assert len(entries) == CLIENTS * ROUNDS
    assert verify_chain(entries, keys) == []


def test_chain_links_and_round_epsilon(lines):
    entries = [e for e in _entries(lines) if e.partition_id == 0]
    assert entries[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
        assert after.epsilon_round == pytest.approx(
            after.epsilon_cumulative - before.epsilon_cumulative
        )
    assert all(e.hash == e.compute_hash() and len(e.hash) == 64 for e in entries)
    assert all(e.kind == "client-dp-sgd" and e.time.endswith("Z") for e in entries)


def test_json_line_round_trip(lines):
    for line in lines:
        entry = LedgerEntry.from_json_line(line)
        assert entry.to_json_line() == line
        assert LedgerEntry.from_dict(json.loads(line)) == entry
        assert "\n" not in line


def test_client_ledger_state_round_trip(identities):
    clients, _ = identities
    ledger = ClientLedger("data-2")
    for r in (1, 2, 5):  # not sampled in rounds 3-4: rounds need not be consecutive
        _append(ledger, r, float(r), clients[2], 2)
    restored = ClientLedger.from_json(ledger.to_json())
    assert restored.entries == ledger.entries and restored.chain_id == ledger.chain_id
    assert restored.epsilon_spent == 5.0
    # a restored ledger keeps extending the same chain, in a later run too
    nxt = _append(restored, 1, 6.0, clients[2], 2, run_id="run-2")
    assert nxt.seq == 4
    assert nxt.prev_hash == ledger.entries[-1].hash
    assert not _errors(verify_chain([*ledger.entries, nxt], None))


def test_unsigned_entries_are_a_warning_not_an_error(keys):
    ledger = ClientLedger("data-0")
    for r in range(1, 4):
        _append(ledger, r, float(r), None)
    findings = verify_chain(list(ledger.entries), keys)
    assert findings and not _errors(findings)
    assert [f.code for f in findings] == ["unsigned"]
    assert "client 0, rounds 1-3" in findings[0].message


def test_without_keys_signatures_are_reported_unchecked(lines):
    findings = verify_chain(_entries(lines), None)
    assert not _errors(findings)
    assert {f.code for f in findings} == {"signature-unchecked"}


def test_append_refuses_what_would_make_a_bad_chain(identities):
    clients, _ = identities
    ledger = ClientLedger("data-0")
    _append(ledger, 2, 2.0, clients[0])
    with pytest.raises(LedgerError, match="strictly increase"):
        _append(ledger, 2, 3.0, clients[0])
    with pytest.raises(LedgerError, match="never decreases"):
        _append(ledger, 3, 1.0, clients[0])
    with pytest.raises(LedgerError, match="accountant"):
        ledger.append(
            run_id="run-1", round=3, partition_id=0, node_id="n", num_examples=10,
            batch_size=1, epochs=1, sample_rate=0.1, steps=1, noise_multiplier=1.0,
            max_grad_norm=1.0, delta=1e-5, accountant="gdp", epsilon_cumulative=3.0,
            epsilon_budget=8.0, run_epsilon_budget=8.0, signer=None,
        )  # fmt: skip
    with pytest.raises(LedgerError, match="sample_rate"):
        ledger.append(
            run_id="run-1", round=3, partition_id=0, node_id="n", num_examples=10,
            batch_size=1, epochs=1, sample_rate=1.5, steps=1, noise_multiplier=1.0,
            max_grad_norm=1.0, delta=1e-5, accountant="prv", epsilon_cumulative=3.0,
            epsilon_budget=8.0, run_epsilon_budget=8.0, signer=None,
        )  # fmt: skip


def test_restoring_a_broken_client_ledger_is_refused(identities):
    clients, _ = identities
    ledger = ClientLedger("data-0")
    for r in (1, 2):
        _append(ledger, r, float(r), clients[0])
    doc = json.loads(ledger.to_json())
    doc["entries"][0]["epsilon_cumulative"] = 0.5
    with pytest.raises(LedgerError, match="not intact"):
        ClientLedger.from_json(json.dumps(doc))


def test_unknown_and_missing_fields_are_refused(lines):
    data = json.loads(lines[0])
    with pytest.raises(LedgerError, match="unknown field"):
        LedgerEntry.from_dict({**data, "note": "trust me"})
    del data["delta"]
    with pytest.raises(LedgerError, match="'delta' is missing"):
        LedgerEntry.from_dict(data)


# --------------------------------------------------------------------------------------------
# tampering: every class yields an error naming the client and round


def _tampered_value(field: str, value, attacker_id: str):
    if field == "accountant":
        return "rdp" if value == "prv" else "prv"
    if field == "signer":
        return attacker_id
    if field == "signature":
        return value[:-4] + ("AAA=" if not value.endswith("AAA=") else "BBB=")
    if field in ("hash", "prev_hash"):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    if field == "time":
        return value.replace("T", "T0", 1)[:-1] + "Z"
    if isinstance(value, bool):
        raise AssertionError(field)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    return value + "-x"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LedgerEntry)])
def test_changing_any_field_is_an_error_naming_client_and_round(field, lines, keys, identities):
    _, attacker = identities
    i = _index(lines, TARGET_PID, TARGET_ROUND)
    data = json.loads(lines[i])
    data[field] = _tampered_value(field, data[field], attacker.ids.ed25519)
    lines[i] = json.dumps(data)
    findings = verify_chain(_entries(lines), keys)
    # named by the holder of the chain (not a tampered partition_id) and the round it shows
    pid, rnd = TARGET_PID, data["round"]
    assert any(_names(f, pid, rnd) for f in _errors(findings)), findings
    assert all("\n" not in f.message for f in findings)


@pytest.mark.parametrize("dropped_round", [1, 2, ROUNDS])
def test_dropped_line_is_an_error_naming_client_and_round(dropped_round, lines, keys):
    del lines[_index(lines, TARGET_PID, dropped_round)]
    findings = _errors(verify_chain(_entries(lines), keys))
    if dropped_round == ROUNDS:
        # the last entry of a chain leaves no gap: only metrics.json can show it (audit test)
        assert findings == []
        return
    nxt = dropped_round + 1
    assert any(_names(f, TARGET_PID, nxt) for f in findings), findings
    codes = {f.code for f in findings}
    assert ("chain-start" if dropped_round == 1 else "chain-broken") in codes


def test_reordered_lines_are_an_error_naming_client_and_round(lines, keys):
    a, b = _index(lines, TARGET_PID, 2), _index(lines, TARGET_PID, 3)
    lines[a], lines[b] = lines[b], lines[a]
    findings = _errors(verify_chain(_entries(lines), keys))
    assert any(_names(f, TARGET_PID, 3) and f.code == "chain-broken" for f in findings)
    assert any(_names(f, TARGET_PID, 2) and f.code == "round-order" for f in findings)


def test_only_the_order_within_a_chain_matters(lines, keys):
    by_client = sorted(lines, key=lambda line: json.loads(line)["partition_id"])  # stable
    assert verify_chain(_entries(by_client), keys) == []
    lines.reverse()  # every chain reversed too: caught
    assert _errors(verify_chain(_entries(lines), keys))


def test_forged_signature_with_another_key(lines, keys, identities):
    _, attacker = identities
    i = _index(lines, TARGET_PID, TARGET_ROUND)
    entry = LedgerEntry.from_json_line(lines[i])
    lowered = dataclasses.replace(entry, epsilon_cumulative=entry.epsilon_cumulative * 0.5)
    # 1. re-hashed and signed with the attacker's key, still naming the client's key id
    rehashed = dataclasses.replace(lowered, hash=lowered.compute_hash())
    signature = attacker.ed25519_private.sign(SIGNATURE_LABEL + bytes.fromhex(rehashed.hash))
    bad_sig = dataclasses.replace(rehashed, signature=base64.b64encode(signature).decode())
    # 2. sealed properly, but by the attacker (its key id is nobody's client key)
    resealed = lowered.sealed(attacker)
    for tampered, code in ((bad_sig, "bad-signature"), (resealed, "unknown-signer")):
        copy = list(lines)
        copy[i] = tampered.to_json_line()
        findings = _errors(verify_chain(_entries(copy), keys))
        assert any(_names(f, TARGET_PID, TARGET_ROUND) and f.code == code for f in findings)
        if tampered is resealed:  # its hash changed, so the next entry no longer links to it
            assert any(_names(f, TARGET_PID, TARGET_ROUND + 1) for f in findings)


def test_unreadable_line_is_an_error_and_keeps_the_rest(lines, tmp_path):
    lines[4] = lines[4][: len(lines[4]) // 2]  # a crash mid-write
    path = tmp_path / "ledger.jsonl"
    path.write_text("\n".join(lines) + "\n")
    entries, problems = read_ledger(path)
    assert len(entries) == CLIENTS * ROUNDS - 1
    assert len(problems) == 1 and problems[0].severity == "error"
    assert "ledger line 5 is unreadable" in problems[0].message


def test_write_ledger_is_atomic_and_readable(lines, tmp_path):
    entries = _entries(lines)
    path = write_ledger(tmp_path / "ledger.jsonl", entries)
    assert read_ledger(path) == (entries, [])
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]


# --------------------------------------------------------------------------------------------
# signatures against a dishonest server, plans, and copies of a chain across runs


def test_unsigned_entry_is_an_error_when_the_clients_key_is_known(lines, keys, identities):
    clients, _ = identities
    partition_of = {clients[p].ids.ed25519: p for p in range(CLIENTS)}
    i = _index(lines, TARGET_PID, TARGET_ROUND)
    stripped = dataclasses.replace(LedgerEntry.from_json_line(lines[i]), signature="", signer="")
    lines[i] = dataclasses.replace(stripped, hash=stripped.compute_hash()).to_json_line()
    # known because the rest of the chain names its signer, with or without a key binding
    for bound in (None, partition_of):
        findings = _errors(verify_chain(_entries(lines), keys, partition_of=bound))
        assert any(f.code == "unsigned" and _names(f, TARGET_PID, TARGET_ROUND) for f in findings)
    # a whole chain stripped: known only through the key given for its partition
    ledger = ClientLedger("data-9")
    for r in (1, 2):
        _append(ledger, r, float(r), None, TARGET_PID)
    assert not _errors(verify_chain(list(ledger.entries), keys))
    [err] = _errors(verify_chain(list(ledger.entries), keys, partition_of=partition_of))
    assert err.code == "unsigned" and "client 1, rounds 1-2" in err.message


def test_plan_problem_names_both_values():
    from common.privacy.verification import plan_problem

    ledger = ClientLedger("data-0")
    good = _append(ledger, 1, 1.0, None)  # n=800, B=40, epochs=2: q=1/20, steps=40
    assert plan_problem(good) is None
    assert plan_problem(dataclasses.replace(good, num_examples=801)) is not None  # k = 21
    bad = plan_problem(dataclasses.replace(good, sample_rate=0.04, steps=30))
    assert "sample_rate 0.04 is not 1/⌈n/B⌉ = 1/⌈800/40⌉ = 0.05" in bad
    assert "steps 30 is not epochs·⌈n/B⌉ = 2·20 = 40" in bad
    # 1/k as floats: q computed as 1.0 / k passes for every k (no rounding trap)
    for k in range(1, 200):
        entry = dataclasses.replace(good, num_examples=40 * k, sample_rate=1.0 / k, steps=2 * k)
        assert plan_problem(entry) is None


def test_copies_of_a_chain_must_be_prefixes_of_the_longest(identities):
    from common.privacy.verification import compare_copies

    clients, _ = identities
    ledger = ClientLedger("data-0")
    for r in (1, 2, 3):
        _append(ledger, r, float(r), clients[0])
    full = list(ledger.entries)
    longest, forks = compare_copies({"a": full[:1], "b": full, "c": full[:2]})
    assert longest == "b" and forks == []
    rolled = ClientLedger("data-0", ledger.chain_id, full[:1])
    _append(rolled, 1, 2.5, clients[0], run_id="run-2")
    _, forks = compare_copies({"a": full, "b": list(rolled.entries)})
    assert [(f.short, f.long, f.seq) for f in forks] == [("b", "a", 2)]
