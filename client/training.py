"""Local training: Opacus DP-SGD with Poisson sampling, or plain SGD for baselines.

Randomness: the DP noise and the Poisson sampling are drawn from generators seeded from
the OS CSPRNG every round. Seeding them from the run's public ``seed`` (or leaving torch at
its fixed start-up seed) would let anyone who knows the seed subtract the noise. torch's
Mersenne Twister is still not a cryptographic generator: Opacus's ``secure_mode`` needs
torchcsprng, which has no torch 2.x release (README, "Known limitations").
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD mechanism for one round; σ was calibrated once for the whole run."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class TrainResult:
    train_loss: float
    num_examples: int
    # What the accountant saw: (noise_multiplier, sample_rate, steps) for this round, or
    # None without DP. Taken from Opacus's own accountant so the ledger records what the
    # optimizer actually did, not what we planned.
    mechanism: tuple[float, float, int] | None


def train_local(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.0,
    dp: DPSettings | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``epochs`` epochs."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion: nn.Module = nn.CrossEntropyLoss()
    sampling_rng = torch.Generator().manual_seed(secrets.randbits(63))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=sampling_rng)
    engine = None
    if dp is not None:
        torch.manual_seed(secrets.randbits(63))  # Opacus's Poisson sampler uses the global RNG
        with warnings.catch_warnings():
            # Opacus warns about the non-secure RNG on every call; documented once in README.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=dp.accountant)
            wrapped = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=dp.grad_sample_mode,
                noise_generator=torch.Generator().manual_seed(secrets.randbits(63)),
            )
        if dp.grad_sample_mode == "ghost":
            model, optimizer, criterion, loader = wrapped
        else:
            model, optimizer, loader = wrapped

    total_loss, batches = 0.0, 0
    # Opacus's hooks fire on the first layer, whose input needs no gradient; torch warns.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            if len(y):  # Poisson sampling may draw an empty batch: a step with only noise
                total_loss += float(loss.detach())
                batches += 1
    mechanism = None
    if engine is not None:
        (sigma, q, steps), *rest = engine.accountant.history
        if rest:
            raise RuntimeError(f"unexpected accountant history {engine.accountant.history}")
        mechanism = (float(sigma), float(q), int(steps))
    return TrainResult(total_loss / max(batches, 1), len(data), mechanism)

