"""The holder owns its budget: policy, lifetime account and ledger across runs.

Each attack from the review (issue 13) at the lowest level that shows it: the run config
(written by the server's operator) trying to reset, raise or switch off the guarantee.
"""

from __future__ import annotations

import math

import pytest

from client.privacy_session import PrivacySession, load_session, save_session, state_file
from common.config import RunConfig
from common.federation_keys import client_dir, load_own, provision
from common.privacy.accounting import PrivacyBudgetExceeded, epsilon_of
from common.privacy.policy import PolicyError, PolicyRefusal, PrivacyPolicy

N = 479  # one simulated holder's digits share


def _cfg(**overrides) -> RunConfig:
    base = {"num-server-rounds": 2, "target-epsilon": 4.0, "batch-size": 32}
    return RunConfig.from_mapping({**base, **overrides})


def _train_run(session: PrivacySession, run_id: str, rounds: int, cfg: RunConfig) -> list:
    """Plan and commit ``rounds`` rounds as the ClientApp does (the mechanism Opacus ran
    equals the plan: tests/test_training.py shows it does)."""
    entries = []
    for r in range(1, rounds + 1):
        plan = session.plan_round(cfg, run_id, N)
        entry = session.commit(plan, plan.mechanism, run_id=run_id, server_round=r,
                               partition_id=0, node_id="7", signer=None)  # fmt: skip
        entries.append(entry)
    return entries


@pytest.fixture
def holder(tmp_path):
    keys = provision(tmp_path / "keys", 1)
    return state_file(tmp_path / "state", PrivacyPolicy()), load_own(client_dir(keys, 0))


def test_the_budget_carries_over_to_the_next_run(holder):
    """Before: the state was keyed by the run id, so run 2 started at ε 0."""
    path, key = holder
    first = load_session(path, PrivacyPolicy(), key)
    _train_run(first, "run-1", 2, _cfg())
    save_session(path, first, key)
    spent_after_run_1 = first.spent
    assert 3.9 < spent_after_run_1 <= 4.0

    second = load_session(path, PrivacyPolicy(), key)  # a new run, a new process
    assert second.spent == spent_after_run_1
    entries = _train_run(second, "run-2", 2, _cfg())
    assert second.runs["run-2"].epsilon_at_start == spent_after_run_1
    assert spent_after_run_1 < entries[-1].epsilon_cumulative <= 8.0  # lifetime, not per run
    # one chain for the lifetime: run 2's entries continue run 1's
    assert [e.seq for e in second.ledger.entries] == [1, 2, 3, 4]
    assert entries[0].prev_hash == second.ledger.entries[1].hash
    save_session(path, second, key)
    # a third run that asks for more than is left is refused, naming what is left
    third = load_session(path, PrivacyPolicy(), key)
    left = 8.0 - second.spent
    with pytest.raises(PrivacyBudgetExceeded, match=r"is left \(set target-epsilon"):
        third.plan_round(_cfg(), "run-3", N)
    # asking for what is left: a far noisier plan that stays within 8, or, when even σ = 10
    # would spend more than is left, a refusal naming the smallest ε that makes sense
    q, steps = 1 / 15, 30
    floor = epsilon_of([*second.history, (10.0, q, steps)], 1e-5, "prv") - second.spent
    if left > floor:
        plan = third.plan_round(_cfg(**{"target-epsilon": left}), "run-3", N)
        assert plan.noise_multiplier > entries[0].noise_multiplier
        assert second.spent < plan.epsilon_after <= 8.0
    else:
        with pytest.raises(PrivacyBudgetExceeded, match="smallest that makes sense"):
            third.plan_round(_cfg(**{"target-epsilon": left}), "run-3", N)


def test_the_run_config_cannot_raise_the_budget_or_lower_the_noise():
    """Before: target-epsilon=1000 noise-multiplier=0.3 trained a round at ε 34.6."""
    session = PrivacySession.new(PrivacyPolicy(lifetime_epsilon=8.0))
    with pytest.raises(PrivacyBudgetExceeded, match="asks for up to ε 1000"):
        session.plan_round(_cfg(**{"target-epsilon": 1000.0, "noise-multiplier": 0.3}), "r", N)
    # within the asked budget, a hand-set σ that would cross the lifetime budget is refused
    with pytest.raises(PrivacyBudgetExceeded, match="over its lifetime budget 8"):
        session.plan_round(_cfg(**{"target-epsilon": 8.0, "noise-multiplier": 0.3}), "r", N)
    strict = PrivacySession.new(PrivacyPolicy(min_noise_multiplier=1.0))
    with pytest.raises(PolicyRefusal, match="below this holder's min-noise-multiplier 1"):
        strict.plan_round(_cfg(**{"noise-multiplier": 0.5}), "r", N)
    # asking for *less* is fine: a smaller run budget gives more noise
    plan = PrivacySession.new(PrivacyPolicy()).plan_round(_cfg(**{"target-epsilon": 1.0}), "r", N)
    assert plan.epsilon_after <= 1.0


def test_a_policy_floor_on_noise_raises_a_calibrated_sigma():
    plan = PrivacySession.new(PrivacyPolicy(min_noise_multiplier=5.0)).plan_round(_cfg(), "r", N)
    assert plan.noise_multiplier == 5.0


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"dp": False}, "without DP"),
        ({"target-delta": 1e-3}, "δ=0.001"),
    ],
)
def test_requests_the_policy_forbids_are_refused(overrides, match):
    with pytest.raises(PolicyRefusal, match=match):
        PrivacySession.new(PrivacyPolicy()).plan_round(_cfg(**overrides), "r", N)


def test_a_round_over_the_per_round_cap_is_refused():
    session = PrivacySession.new(PrivacyPolicy(max_round_epsilon=0.5))
    with pytest.raises(PrivacyBudgetExceeded, match=r"max-round-epsilon 0\.5"):
        session.plan_round(_cfg(), "r", N)


def test_the_declared_size_hides_the_true_one():
    """Before: num_examples 479 vs 480 revealed the added record every time. With a
    declared size the plan (q, steps, weight) is the same for neighbouring data sets."""
    policy = PrivacyPolicy(declared_examples=480)
    plans = [PrivacySession.new(policy).plan_round(_cfg(), "r", n) for n in (479, 480)]
    assert plans[0] == plans[1]
    assert plans[0].declared_examples == 480 and plans[0].sample_rate == 1 / 15


def test_sigma_is_fixed_for_the_run_and_survives_a_restart(holder):
    path, key = holder
    session = load_session(path, PrivacyPolicy(), key)
    first = _train_run(session, "run-1", 1, _cfg())
    save_session(path, session, key)
    restarted = load_session(path, PrivacyPolicy(), key)
    plan = restarted.plan_round(_cfg(), "run-1", N)
    assert plan.noise_multiplier == first[0].noise_multiplier
    history = [(plan.noise_multiplier, plan.sample_rate, 2 * plan.steps)]
    assert plan.epsilon_after == pytest.approx(epsilon_of(history, 1e-5, "prv"))


def test_state_is_encrypted_and_tampering_is_refused(holder):
    path, key = holder
    session = load_session(path, PrivacyPolicy(), key)
    _train_run(session, "run-1", 1, _cfg())
    save_session(path, session, key)
    assert path.read_bytes()[:4] == b"FVD1"
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"(?i)authentic|tamper|integrity|decrypt"):
        load_session(path, PrivacyPolicy(), key)


def test_a_state_is_only_read_for_its_own_data_set(holder):
    path, key = holder
    session = load_session(path, PrivacyPolicy(), key)
    _train_run(session, "run-1", 1, _cfg())
    save_session(path, session, key)
    with pytest.raises(ValueError, match="restore it from a backup"):
        load_session(path, PrivacyPolicy(dataset_id="other"), key)


def test_policy_files_are_strict(tmp_path):
    path = tmp_path / "policy.toml"
    PrivacyPolicy(lifetime_epsilon=3.0, declared_examples=480).save(path)
    assert PrivacyPolicy.load(path) == PrivacyPolicy(lifetime_epsilon=3.0, declared_examples=480)
    assert math.isinf(PrivacyPolicy.load(path).max_round_epsilon)
    path.write_text('lifetime-epsilon = 3.0\nlifetime-epsilion = 9.0\n')
    with pytest.raises(PolicyError, match="unknown key"):
        PrivacyPolicy.load(path)
    path.write_text('lifetime-epsilon = "lots"\n')
    with pytest.raises(PolicyError, match="not a float"):
        PrivacyPolicy.load(path)
    path.write_text("lifetime-epsilon = inf\n")
    with pytest.raises(PolicyError, match="must be finite"):
        PrivacyPolicy.load(path)
    with pytest.raises(PolicyError, match="does not exist"):
        PrivacyPolicy.load(tmp_path / "missing.toml")
