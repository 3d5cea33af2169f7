"""ε composes across rounds through one accountant history, and budgets are enforced."""

import itertools

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.accounting import (
    calibrate_noise,
    calibrate_noise_after,
    epsilon_of,
    merge_history,
    sample_rate_for,
    steps_per_epoch,
)

SIGMA, Q, STEPS, DELTA = 1.1, 0.02, 50, 1e-5


@pytest.mark.parametrize("accountant,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_cumulative_epsilon_equals_one_accountant_over_all_rounds(accountant, cls):
    k = 4
    history: list = []
    per_round = []
    for _ in range(k):
        before = epsilon_of(history, DELTA, accountant)
        history = merge_history([*history, (SIGMA, Q, STEPS)])
        per_round.append(epsilon_of(history, DELTA, accountant) - before)
    spent = epsilon_of(history, DELTA, accountant)
    # one long-lived Opacus accountant stepping through all k rounds' steps
    reference = cls()
    for _ in range(k * STEPS):
        reference.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert spent == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    single_round = epsilon_of([(SIGMA, Q, STEPS)], DELTA, accountant)
    assert spent > single_round * 1.2  # not the per-round ε
    assert spent < k * single_round  # not k times it: composition is sublinear
    assert per_round[0] == pytest.approx(single_round)
    assert all(a > b for a, b in itertools.pairwise(per_round))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_after_a_history_fits_the_lifetime_total(accountant):
    """A second run's σ is fitted so that the *lifetime* total stays within the target:
    what the first run spent is composed with, not ignored."""
    history = [(0.9, 0.05, 100)]
    spent = epsilon_of(history, DELTA, accountant)
    target = spent + 2.0
    sigma = calibrate_noise_after(
        history, target_epsilon=target, target_delta=DELTA, sample_rate=0.05,
        total_steps=100, accountant=accountant,
    )  # fmt: skip
    total = epsilon_of([*history, (sigma, 0.05, 100)], DELTA, accountant)
    assert target - 0.02 <= total <= target
    fresh = calibrate_noise(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.05, total_steps=100,
        accountant=accountant,
    )  # fmt: skip
    assert sigma != pytest.approx(fresh, rel=1e-3)  # composition is not additive
    with pytest.raises(ValueError, match="too small for this plan"):
        calibrate_noise_after(
            history, target_epsilon=spent, target_delta=DELTA, sample_rate=0.05,
            total_steps=100, accountant=accountant,
        )  # fmt: skip


def test_merge_keeps_different_mechanisms_apart():
    merged = merge_history([(1.0, 0.1, 5), (1.0, 0.1, 5), (2.0, 0.1, 3), (1.0, 0.1, 1)])
    assert merged == [(1.0, 0.1, 10), (2.0, 0.1, 3), (1.0, 0.1, 1)]


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


def test_plan_has_exactly_k_steps_for_every_k_up_to_500():
    """q = 1/k and k steps per epoch for every k = ⌈n/B⌉ (Opacus's own int(1/q) is k − 1
    for ~6% of k); the loader built from the plan takes exactly k steps."""
    import torch
    from torch.utils.data import TensorDataset

    from client.training import poisson_batches

    batch = 32
    data = TensorDataset(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    opacus_short = []
    for k in range(1, 501):
        for n in (k * batch, (k - 1) * batch + 1):
            assert steps_per_epoch(n, batch) == k
            q = sample_rate_for(n, batch)
            assert q == 1.0 / k
            loader = poisson_batches(data, q, k, torch.Generator().manual_seed(0))
            assert len(loader) == k and sum(1 for _ in loader) == k
        if int(1 / (1.0 / k)) != k:
            opacus_short.append(k)
    assert {93, 99, 105, 117, 123, 186, 198} <= set(opacus_short)  # the cases that broke


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


def test_a_budget_too_small_for_the_plan_is_refused_naming_the_smallest_epsilon():
    """Before: target-epsilon=0.01 calibrated σ=1280 (chance accuracy, an audit that failed)."""
    from common.privacy.accounting import MAX_NOISE_MULTIPLIER

    q, steps = 1 / 15, 75
    smallest = epsilon_of([(MAX_NOISE_MULTIPLIER, q, steps)], DELTA, "prv")
    with pytest.raises(ValueError, match=rf"smallest that makes sense is ε={smallest:.4g}"):
        calibrate_noise_after([], target_epsilon=0.01, target_delta=DELTA, sample_rate=q,
                              total_steps=steps, accountant="prv")  # fmt: skip
    sigma = calibrate_noise_after([], target_epsilon=smallest * 1.05, target_delta=DELTA,
                                  sample_rate=q, total_steps=steps, accountant="prv")  # fmt: skip
    assert sigma <= MAX_NOISE_MULTIPLIER
