"""Local training: batched tensor loading and the DP-SGD step it feeds."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.training import DPSettings, batch_loader, poisson_batches, train_local


def _data(n: int = 40, features: int = 5, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=g)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def test_batched_loader_gives_the_same_batches_as_per_example_loading():
    data = _data()
    ours = batch_loader(data, 8, torch.Generator().manual_seed(7))
    stock = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
    pairs = list(zip(ours, stock, strict=True))
    assert len(pairs) == 5
    for (x, y), (sx, sy) in pairs:
        assert torch.equal(x, sx) and torch.equal(y, sy)


def test_poisson_loader_over_batched_data_matches_and_keeps_empty_draws_shaped():
    data = _data(n=30)
    ours = poisson_batches(data, 1 / 30, 30, torch.Generator().manual_seed(3))
    stock = DPDataLoader(data, sample_rate=1 / 30, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = list(zip(ours, stock, strict=True))
    assert len(pairs) == 30  # q = 1/30: one Poisson draw per step, many of them empty
    empty = 0
    for (x, y), (sx, sy) in pairs:
        assert x.shape[1:] == (5,) and len(x) == len(y)
        if len(sx):
            assert torch.equal(x, sx) and torch.equal(y, sy)
        else:
            assert len(x) == 0
            empty += 1
    assert empty > 0


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_dp_step_is_the_mean_of_clipped_per_example_gradients(mode):
    """σ = 0 and q = 1: one step moves the weights by exactly −lr · Σ clip(g_i) / n."""
    torch.manual_seed(0)
    data = _data(n=12)
    model = nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    clip = 0.05  # far below the per-example norms, so clipping is active for every example
    expected = [torch.zeros_like(p) for p in before]
    for x, y in zip(*data.tensors, strict=True):
        reference = nn.Linear(5, 3)
        reference.load_state_dict(model.state_dict())
        nn.functional.cross_entropy(reference(x[None]), y[None]).backward()
        grads = [p.grad for p in reference.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert norm > clip
        for e, g in zip(expected, grads, strict=True):
            e += g * (clip / norm)

    result = train_local(model, data, epochs=1, batch_size=12, learning_rate=1.0,
                         dp=DPSettings(0.0, clip, 1.0, 1, "rdp", mode))  # fmt: skip
    assert result.mechanism == (0.0, 1.0, 1)
    for p, b, e in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e / 12, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost"])
def test_dp_training_records_the_mechanism_and_adds_noise(mode):
    data = _data(n=64)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    dp = DPSettings(1.0, 1.0, 0.25, 4, "rdp", mode)
    ra = train_local(a, data, epochs=2, batch_size=16, learning_rate=0.1, dp=dp)
    train_local(b, data, epochs=2, batch_size=16, learning_rate=0.1, dp=dp)
    assert ra.mechanism == (1.0, 0.25, 8)
    # noise and sampling come from fresh CSPRNG seeds: two runs from one start differ
    assert not torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost"])
def test_lenet_returns_default_layout_weights(mode):
    """bookkeeping trains channels-last, Opacus's modes NCHW: either way the weights come
    back in the default layout."""
    from common.models import LeNet5

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    model = LeNet5(10)
    before = model.features[3].weight.detach().clone()
    result = train_local(model, data, epochs=1, batch_size=32, learning_rate=0.1,
                         dp=DPSettings(1.0, 1.0, 0.5, 2, "rdp", mode))  # fmt: skip
    assert result.mechanism == (1.0, 0.5, 2)
    assert all(p.is_contiguous() for p in model.parameters())
    assert not torch.equal(model.features[3].weight, before)


def test_the_optimizer_takes_the_planned_steps_where_opacus_would_take_one_fewer():
    """k = 93 (n = 2,976, B = 32): Opacus's own loader takes int(1/(1/93)) = 92 steps, so a
    client with this size could never train ("Opacus ran 92 steps, but the plan was 93")."""
    data = _data(n=93 * 32)
    assert len(DPDataLoader(data, sample_rate=1 / 93)) == 92  # the bug, in Opacus
    result = train_local(nn.Linear(5, 3), data, epochs=1, batch_size=32, learning_rate=0.1,
                         dp=DPSettings(1.0, 1.0, 1 / 93, 93, "rdp"))  # fmt: skip
    assert result.mechanism == (1.0, 1 / 93, 93)
