"""Privacy accounting that composes across every round a client trains in.

A client keeps ONE accountant history for the whole run: a list of
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

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")
Mechanism = tuple[float, float, int]


class PrivacyBudgetExceeded(RuntimeError):
    """A round would take a client past its (ε, δ) budget; the round is refused."""


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sample rate q that Opacus's DPDataLoader uses: 1 / len(data_loader)."""
    if num_examples <= 0:
        raise ValueError("a client with no training examples cannot train: check partitioning")
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of Opacus's Poisson loader (len of the batch loader)."""
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


@dataclass
class PrivacyAccount:
    """One client's privacy state for one run: the plan and the composed history.

    Serialises to JSON so it can live in Flower's ``context.state`` (and on disk) and a
    restarted client continues from exactly where it was.
    """

    accountant: str
    target_epsilon: float
    target_delta: float
    noise_multiplier: float
    sample_rate: float
    history: list[Mechanism] = field(default_factory=list)

    def spent(self) -> float:
        """Cumulative ε over every round trained so far."""
        return epsilon_of(self.history, self.target_delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Cumulative ε if ``steps`` more steps of this client's mechanism were taken."""
        return epsilon_of(
            [*self.history, (self.noise_multiplier, self.sample_rate, steps)],
            self.target_delta,
            self.accountant,
        )

    def check_round(self, steps: int) -> float:
        """Refuse (raise) when ``steps`` more steps would cross the budget; else the new ε."""
        after = self.epsilon_after(steps)
        if after > self.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: this round would raise ε from {self.spent():.4f} "
                f"to {after:.4f}, over the budget ε={self.target_epsilon} at "
                f"δ={self.target_delta:g}; the client refuses to train (start a new run or "
                "give it a larger target-epsilon)"
            )
        return after

    def record(self, steps: int) -> None:
        """Append ``steps`` taken with this client's mechanism."""
        self.history = merge_history(
            [*self.history, (self.noise_multiplier, self.sample_rate, steps)]
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "accountant": self.accountant,
                "target_epsilon": self.target_epsilon,
                "target_delta": self.target_delta,
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "history": [list(h) for h in self.history],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyAccount:
        data = json.loads(text)
        return cls(
            accountant=data["accountant"],
            target_epsilon=float(data["target_epsilon"]),
            target_delta=float(data["target_delta"]),
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            history=merge_history(data["history"]),
        )


def _checked(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {accountant!r}: set accountant to one of {list(ACCOUNTANTS)}"
        )
    return accountant
