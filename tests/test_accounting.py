"""ε composes across rounds through one accountant history, and budgets are enforced."""

import itertools

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.accounting import (
    PrivacyAccount,
    PrivacyBudgetExceeded,
    calibrate_noise,
    epsilon_of,
    merge_history,
    sample_rate_for,
    steps_per_epoch,
)

SIGMA, Q, STEPS, DELTA = 1.1, 0.02, 50, 1e-5


def _account(accountant="rdp", target=100.0):
    return PrivacyAccount(accountant, target, DELTA, SIGMA, Q)


@pytest.mark.parametrize("accountant,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_cumulative_epsilon_equals_one_accountant_over_all_rounds(accountant, cls):
    k = 4
    account = _account(accountant)
    per_round = []
    for _ in range(k):
        before = account.spent()
        account.record(STEPS)
        per_round.append(account.spent() - before)
    # one long-lived Opacus accountant stepping through all k rounds' steps
    reference = cls()
    for _ in range(k * STEPS):
        reference.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert account.spent() == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    single_round = epsilon_of([(SIGMA, Q, STEPS)], DELTA, accountant)
    assert account.spent() > single_round * 1.2  # not the per-round ε
    assert account.spent() < k * single_round  # not k times it: composition is sublinear
    assert per_round[0] == pytest.approx(single_round)
    assert all(a > b for a, b in itertools.pairwise(per_round))


def test_history_round_trips_through_json_and_continues_exactly():
    account = _account()
    account.record(STEPS)
    restored = PrivacyAccount.from_json(account.to_json())
    restored.record(STEPS)
    account.record(STEPS)
    assert restored.spent() == account.spent()
    assert restored.history == [(SIGMA, Q, 2 * STEPS)]


def test_merge_keeps_different_mechanisms_apart():
    merged = merge_history([(1.0, 0.1, 5), (1.0, 0.1, 5), (2.0, 0.1, 3), (1.0, 0.1, 1)])
    assert merged == [(1.0, 0.1, 10), (2.0, 0.1, 3), (1.0, 0.1, 1)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_fits_the_whole_planned_run(accountant):
    n, batch, rounds, epochs = 600, 32, 5, 2
    q = sample_rate_for(n, batch)
    steps_round = epochs * steps_per_epoch(n, batch)
    sigma = calibrate_noise(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=q,
        total_steps=rounds * steps_round, accountant=accountant,
    )  # fmt: skip
    account = PrivacyAccount(accountant, 3.0, DELTA, sigma, q)
    for _ in range(rounds):
        account.check_round(steps_round)
        account.record(steps_round)
    assert 2.9 < account.spent() <= 3.0  # uses the budget, never crosses it
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exhausted"):
        account.check_round(steps_round)
    assert account.spent() <= 3.0  # the refused round spent nothing


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="raise target-epsilon"):
        calibrate_noise(
            target_epsilon=1e-6, target_delta=DELTA, sample_rate=1.0, total_steps=10_000,
            accountant="rdp",
        )  # fmt: skip


def test_prv_reports_the_upper_bound():
    prv = PRVAccountant()
    prv.history = [(SIGMA, Q, STEPS)]
    assert epsilon_of([(SIGMA, Q, STEPS)], DELTA, "prv") == prv.get_epsilon(DELTA)
    _, estimate, upper = prv._get_dprv(eps_error=0.01, delta_error=DELTA / 1000).compute_epsilon(
        DELTA, DELTA / 1000, 0.01
    )
    assert upper >= estimate
    assert epsilon_of([(SIGMA, Q, STEPS)], DELTA, "prv") == upper


def test_sample_rate_matches_opacus_poisson_loader():
    assert sample_rate_for(100, 32) == 1 / 4 and steps_per_epoch(100, 32) == 4
    assert sample_rate_for(10, 32) == 1.0
    with pytest.raises(ValueError, match="no training examples"):
        sample_rate_for(0, 32)


def test_calibration_is_searched_once_per_plan_in_a_process():
    plan = dict(target_epsilon=2.5, target_delta=1e-5, sample_rate=0.03, total_steps=77)
    first = calibrate_noise(**plan, accountant="rdp")
    hits = calibrate_noise.cache_info().hits
    assert calibrate_noise(**plan, accountant="rdp") == first
    assert calibrate_noise.cache_info().hits == hits + 1
    # another plan is searched, not served from the cache
    other = calibrate_noise(**{**plan, "total_steps": 154}, accountant="rdp")
    assert other > first
    assert epsilon_of([(first, 0.03, 77)], 1e-5, "rdp") <= 2.5


def test_epsilon_is_computed_once_per_history_in_a_process():
    from common.privacy.accounting import _composed_epsilon

    history = [(1.1, 0.05, 40), (1.1, 0.05, 40)]  # two rounds: merged into one mechanism
    first = epsilon_of(history, 1e-5, "rdp")
    hits = _composed_epsilon.cache_info().hits
    assert epsilon_of([(1.1, 0.05, 80)], 1e-5, "rdp") == first  # same merged history: a hit
    assert _composed_epsilon.cache_info().hits == hits + 1
    # a third round composes: computed, not served from the cache, and larger
    assert epsilon_of([*history, (1.1, 0.05, 40)], 1e-5, "rdp") > first
    assert _composed_epsilon.cache_info().hits == hits + 1
