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
from opacus.grad_sample import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.clipping import BookKeepingClipping
from common.devices import to_device
from common.privacy.opacus_internals import (
    DPOptimizerFastGradientClipping,
    UniformWithReplacementSampler,
)

log = logging.getLogger(__name__)


class TensorBatches(TensorDataset):
    """A ``TensorDataset`` the DataLoader reads a whole batch at a time.

    torch's DataLoader otherwise indexes the dataset once per example and stacks the
    pieces (thousands of tiny tensor ops per epoch: 40% of a text model's epoch). Every
    data set here is already one tensor in memory, so a batch is one gather per tensor.
    Opacus's Poisson loader keeps working unchanged: it only chooses the indices, and an
    empty draw gives empty tensors of the right shape.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)


def _as_gathered(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate for ``TensorBatches``: the batch is already gathered."""
    return batch


def _batches_of(data: TensorDataset, channels_last: bool) -> TensorBatches:
    """``channels_last`` stores images in the layout the model was put in (see train_local)."""
    return TensorBatches(
        *[
            t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t
            for t in data.tensors
        ]
    )


def batch_loader(
    data: TensorDataset, batch_size: int, generator: torch.Generator, *, channels_last: bool = False
) -> DataLoader:
    """Shuffled batches of ``data`` (training without DP)."""
    return DataLoader(
        _batches_of(data, channels_last),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=_as_gathered,
    )


def poisson_batches(
    data: TensorDataset,
    sample_rate: float,
    steps: int,
    generator: torch.Generator,
    *,
    channels_last: bool = False,
) -> DataLoader:
    """Exactly ``steps`` Poisson-sampled batches: each example joins each batch with
    probability ``sample_rate``, independently -- the sampling the accountant assumes.

    Opacus's sampler, given ``steps`` explicitly: left to itself it takes ``int(1/q)`` steps,
    which for q = 1/k is k − 1 for about 6% of k (1/(1/93) = 92.99…), so the plan, the ledger
    and the optimizer would disagree. An empty draw gives empty tensors of the right shape.
    """
    sampler = UniformWithReplacementSampler(
        num_samples=len(data), sample_rate=sample_rate, generator=generator, steps=steps
    )
    return DataLoader(  # the generator also as DPDataLoader passes it: the same draws
        _batches_of(data, channels_last),
        batch_sampler=sampler,
        collate_fn=_as_gathered,
        generator=generator,
    )


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD mechanism for one round, as the holder's privacy session planned it: σ
    (calibrated once per run), q = 1/k and k steps per epoch (from the declared size)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    accountant: str = "prv"
    grad_sample_mode: str = "bookkeeping"  # or Opacus's "hooks" / "ghost"


@dataclass(frozen=True)
class TrainResult:
    # Mean training loss over the round's batches: for the holder's own logs only. It is a
    # function of the private data that no accountant covers, so it never leaves the client.
    train_loss: float
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
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``epochs`` epochs, on ``device`` (default: the
    CPU). On a GPU the data is copied there once, before the first batch, every batch is a
    gather on the GPU, and the model comes back to the CPU after (its update is sent from
    there), also when training fails."""
    device = torch.device("cpu") if device is None else device
    model.to(device)
    try:
        return _train(model, to_device(data, device), epochs, batch_size, learning_rate, momentum,
                      dp, device)  # fmt: skip
    finally:
        model.to("cpu")


def _train(
    model: nn.Module,
    data: TensorDataset,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    dp: DPSettings | None,
    device: torch.device,
) -> TrainResult:
    model.train()
    # Convolutions and pooling run ~14% faster on CPU in channels-last layout (measured with
    # and without DP: benchmarks/dp.py); the weights go back to the default layout after.
    # Not under Opacus's own hooks: its conv per-sample gradients assume NCHW activations
    # and come out wrong in channels-last, so the clipping bound would not hold.
    channels_last = any(p.dim() == 4 for p in model.parameters()) and (
        dp is None or dp.grad_sample_mode == "bookkeeping"
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    criterion: nn.Module = nn.CrossEntropyLoss()
    sampling_rng = torch.Generator().manual_seed(secrets.randbits(63))
    if dp is None:
        loader = batch_loader(data, batch_size, sampling_rng, channels_last=channels_last)
    else:
        loader = poisson_batches(
            data, dp.sample_rate, dp.steps_per_epoch, sampling_rng, channels_last=channels_last
        )
    engine = None
    clipping: BookKeepingClipping | None = None  # our hooks (bookkeeping) ...
    opacus_hooks: AbstractGradSampleModule | None = None  # ... or Opacus's (hooks, ghost)
    if dp is not None:
        # the noise is drawn where the gradients are: a generator on the same device
        noise_rng = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():
            # Opacus warns about the non-secure RNG on every call; documented once in README.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=dp.accountant)
            if dp.grad_sample_mode == "bookkeeping":
                clipping = BookKeepingClipping(model, dp.max_grad_norm)
                optimizer, loader = _bookkeeping_dp(engine, optimizer, loader, dp, noise_rng)
                criterion = nn.CrossEntropyLoss(reduction="none")
            else:
                wrapped = engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    criterion=criterion,
                    data_loader=loader,
                    noise_multiplier=dp.noise_multiplier,
                    max_grad_norm=dp.max_grad_norm,
                    poisson_sampling=False,  # the loader already is: poisson_batches
                    grad_sample_mode=dp.grad_sample_mode,
                    noise_generator=noise_rng,
                )
                if dp.grad_sample_mode == "ghost":
                    model, optimizer, criterion, loader = wrapped
                else:
                    model, optimizer, loader = wrapped
                opacus_hooks = model

    total_loss, batches = 0.0, 0
    # Opacus's hooks fire on the first layer, whose input needs no gradient; torch warns.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(x), y)
                if clipping is not None:
                    clipping.backward(loss)  # per-sample losses: reduction="none"
                    loss = loss.detach().mean()
                else:
                    loss.backward()
                optimizer.step()
                if len(y):  # Poisson sampling may draw an empty batch: a step with only noise
                    total_loss += float(loss.detach())
                    batches += 1
    finally:  # the caller's model leaves without hooks, whatever happened
        if clipping is not None:
            clipping.remove()
        if opacus_hooks is not None:
            opacus_hooks.cleanup()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    mechanism = None
    if engine is not None:
        (sigma, q, steps), *rest = engine.accountant.history
        if rest:
            raise RuntimeError(f"unexpected accountant history {engine.accountant.history}")
        mechanism = (float(sigma), float(q), int(steps))
    return TrainResult(total_loss / max(batches, 1), mechanism)


def _bookkeeping_dp(
    engine: PrivacyEngine,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    dp: DPSettings,
    noise_rng: torch.Generator,
) -> tuple[DPOptimizerFastGradientClipping, DataLoader]:
    """Opacus's DP-SGD pieces around book-keeping clipping, as ``make_private`` builds them.

    ``make_private`` would also wrap the model in its own per-sample-gradient hooks, which
    book-keeping replaces; everything else is Opacus's: the optimizer that adds N(0, σ²C²)
    to the clipped sum and divides by the expected batch size, and the accountant hook that
    records every step (with the planned q). ``loader`` is already Poisson-sampled.
    """
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=max(1, int(len(loader.dataset) * dp.sample_rate)),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=noise_rng,
    )
    hook = engine.accountant.get_optimizer_hook_fn(sample_rate=dp.sample_rate)
    dp_optimizer.attach_step_hook(hook)
    return dp_optimizer, loader
