"""Privacy accounting that composes across every round a client trains in.

A data holder keeps ONE accountant history for its lifetime on a data set (every round of
every run): a list of
``(noise_multiplier, sample_rate, steps)`` entries, exactly the state Opacus's accountants
keep. Each round appends its steps; ε is always computed by the accountant over the whole
history. Two things we never do, because both understate or misstate what was spent:
summing per-round ε (loose, and not what the accountant says) and starting a fresh
accountant per round (which forgets earlier rounds entirely).

Identical consecutive mechanisms are merged into one entry, as Opacus's own
``IAccountant.step`` does: ``s1`` then ``s2`` steps of the same subsampled Gaussian is, by
definition, ``s1 + s2`` self-compositions of it, so the merge is exact. It also keeps the PRV
accountant fast (one FFT composition instead of one per round).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

from common.privacy import ACCOUNTANTS

Mechanism = tuple[float, float, int]
# The most noise a plan may need: σ = 10 puts noise of 10× the largest possible contribution
# of one example on every step; beyond it nothing is learnt (a run at ε 0.01 had σ 1280 and
# chance accuracy), and RDP and PRV bounds drift apart there, so the audit cannot confirm ε.
MAX_NOISE_MULTIPLIER = 10.0


class PrivacyBudgetExceeded(RuntimeError):
    """A round would take a client past its (ε, δ) budget; the round is refused."""


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sample rate q that Opacus's DPDataLoader uses: 1 / len(data_loader)."""
    if num_examples <= 0:
        raise ValueError("a client with no training examples cannot train: check partitioning")
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: k = ⌈n/B⌉, and q = 1/k. The sampler is built with
    exactly k steps (``client.training.poisson_batches``); Opacus's own default,
    ``int(1/q)``, is k − 1 for ~6% of k because 1/(1/k) rounds below k in floating point."""
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError(f"n={num_examples}, B={batch_size}: both must be ≥ 1")
    return math.ceil(num_examples / batch_size)


def merge_history(history: Iterable[Sequence[float]]) -> list[Mechanism]:
    """Merge consecutive entries of the same mechanism (exact: same σ and q compose by steps)."""
    merged: list[Mechanism] = []
    for sigma, q, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


def epsilon_of(history: Iterable[Sequence[float]], delta: float, accountant: str) -> float:
    """ε spent by ``history`` at ``delta``, composed by one Opacus accountant.

    For PRV this is Opacus's *upper* bound on ε, never the estimate: privacy math is never
    approximate in the client's favour.
    """
    merged = tuple(merge_history(history))
    if not merged:
        return 0.0
    return _composed_epsilon(merged, float(delta), _checked(accountant))


@lru_cache(maxsize=1024)
def _composed_epsilon(merged: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """Cached per process: a pure function of the history, and a PRV evaluation takes
    ~0.1 s. Every client in a round of an IID run has the same history, so a simulation
    actor computes each round's ε once instead of once per client it serves."""
    from opacus.accountants import create_accountant  # here: importing Opacus loads torch

    acc = create_accountant(mechanism=accountant)
    acc.history = list(merged)
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
) -> float:
    """Noise multiplier σ so that ``total_steps`` steps at ``sample_rate`` cost ≤ target ε.

    Called once per client for its whole planned run (rounds × local epochs), never per
    round: ``make_private_with_epsilon`` per round would ignore the budget already spent.

    Cached per process: the answer is a pure function of the arguments, and a PRV search
    takes seconds (~25 accountant evaluations). A simulation actor serves many clients with
    the same plan (IID shares have the same n), so it searches once instead of once per
    client; at 1,000 clients that was most of a round's time.
    """
    if target_epsilon <= 0 or not 0 < target_delta < 1:
        raise ValueError(
            f"invalid privacy budget ε={target_epsilon}, δ={target_delta}: "
            "set target-epsilon > 0 and 0 < target-delta < 1"
        )
    from common.privacy.opacus_internals import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=_checked(accountant),
            )
        )
    except ValueError as err:
        raise ValueError(
            f"cannot reach ε={target_epsilon} at δ={target_delta} with sample rate "
            f"{sample_rate:.4g} over {total_steps} steps ({err}): raise target-epsilon, "
            "or lower num-server-rounds / local-epochs"
        ) from None


def calibrate_noise_after(
    history: Sequence[Mechanism],
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
    epsilon_tolerance: float = 0.01,
) -> float:
    """σ so that ``history`` followed by ``total_steps`` steps at ``sample_rate`` costs
    ≤ ``target_epsilon`` in all (the lifetime total, not what the new steps add).

    With no history this is Opacus's ``get_noise_multiplier``. With one, composition is not
    additive, so σ is found the way Opacus finds it -- doubling, then bisection on the
    composed ε -- but over the whole history; like Opacus it returns the upper end of the
    final bracket, whose ε is ≤ the target.

    A target so small that σ would exceed :data:`MAX_NOISE_MULTIPLIER` is refused, naming the
    smallest ε the plan can have: with more noise than that an update is noise alone (the
    run would train nothing and only look private).
    """
    floor = epsilon_of(
        [*history, (MAX_NOISE_MULTIPLIER, sample_rate, total_steps)], target_delta, accountant
    )
    if floor > target_epsilon:
        spent = epsilon_of(history, target_delta, accountant)
        raise ValueError(
            f"ε={target_epsilon - spent:.4g} is too small for this plan ({total_steps} steps "
            f"at q={sample_rate:.4g}): it would need σ > {MAX_NOISE_MULTIPLIER:g}, where an "
            f"update is noise alone; the smallest that makes sense is ε={floor - spent:.4g} "
            "(raise target-epsilon to at least that, or plan fewer rounds / local epochs)"
        )
    if not history:
        return calibrate_noise(
            target_epsilon=target_epsilon, target_delta=target_delta,
            sample_rate=sample_rate, total_steps=total_steps, accountant=accountant,
        )  # fmt: skip
    return _calibrate_after(
        tuple(merge_history(history)), float(target_epsilon), float(target_delta),
        float(sample_rate), int(total_steps), _checked(accountant), epsilon_tolerance,
    )  # fmt: skip


@lru_cache(maxsize=256)
def _calibrate_after(
    history: tuple[Mechanism, ...],
    target: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str,
    tolerance: float,
) -> float:
    def eps(sigma: float) -> float:
        return epsilon_of([*history, (sigma, q, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while eps(high) > target:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no σ ≤ 1e6 keeps ε ≤ {target} at δ={delta}")
    while eps(high) < target - tolerance:
        mid = (low + high) / 2
        if eps(mid) > target:
            low = mid
        else:
            high = mid
        if high - low < 1e-6:
            break
    return high


def _checked(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {accountant!r}: set accountant to one of {list(ACCOUNTANTS)}"
        )
    return accountant
