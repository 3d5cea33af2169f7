"""Book-keeping clipping gives exactly Opacus's Σᵢ clip(gᵢ), in one backward pass."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from client.clipping import BookKeepingClipping
from client.training import DPSettings, train_local
from common.models import build_model


def _batch(model_name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    if model_name == "lenet5":
        return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _opacus_clipping(model: nn.Module, x, y):
    """Opacus's per-sample gradients (``hooks``), with a bound at their median norm (half
    the examples clipped), clipped and summed as Opacus's DPOptimizer does."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params]).norm(dim=0)
    clip = float(norms.median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    sums = [torch.einsum("n,n...->...", factors, p.grad_sample) for p in params]
    return clip, norms, sums


@pytest.mark.parametrize(
    ("model_name", "channels_last"),
    [("lenet5", False), ("lenet5", True), ("text-linear", False), ("text-mlp", False)],
)
def test_clipped_sum_equals_opacus_per_sample_clipping(model_name, channels_last):
    torch.manual_seed(0)
    ours = build_model(model_name, 10, num_features=64)
    reference = build_model(model_name, 10, num_features=64)
    reference.load_state_dict(ours.state_dict())
    x, y = _batch(model_name, 24)
    clip, ref_norms, ref_sums = _opacus_clipping(reference, x, y)  # NCHW: see the last test
    if channels_last:
        ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    with BookKeepingClipping(ours, max_grad_norm=clip) as clipping:
        norms = clipping.backward(nn.functional.cross_entropy(ours(x), y, reduction="none"))
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    for p, expected in zip(ours.parameters(), ref_sums, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)


def test_examples_under_the_bound_are_not_scaled():
    """A bound above every norm: the clipped sum is the plain summed gradient."""
    torch.manual_seed(0)
    model = build_model("text-mlp", 10, num_features=64)
    plain = build_model("text-mlp", 10, num_features=64)
    plain.load_state_dict(model.state_dict())
    x, y = _batch("text-mlp", 16)
    nn.functional.cross_entropy(plain(x), y, reduction="sum").backward()
    with BookKeepingClipping(model, max_grad_norm=1e6) as clipping:
        clipping.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_empty_batch_gives_zero_gradients():
    model = build_model("lenet5", 10)
    x, y = _batch("lenet5", 0)
    with BookKeepingClipping(model, max_grad_norm=1.0) as clipping:
        norms = clipping.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert norms.shape == (0,)
    assert all(torch.count_nonzero(p.grad) == 0 and p.grad.shape == p.shape
               for p in model.parameters())  # fmt: skip


def test_a_layer_the_tests_do_not_cover_is_refused():
    # Opacus has a LayerNorm sampler, but book-keeping is only verified for Linear and Conv2d
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\).*grad-sample-mode = hooks"):
        BookKeepingClipping(model, 1.0)
    assert not model[0]._forward_hooks  # nothing left behind


def test_two_forwards_before_backward_are_refused():
    model = build_model("text-linear", 10, num_features=64)
    x, y = _batch("text-linear", 4)
    with BookKeepingClipping(model, 1.0) as clipping:
        model(x)
        with pytest.raises(RuntimeError, match="run twice"):
            clipping.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))


def test_remove_takes_the_hooks_off():
    model = build_model("text-mlp", 10, num_features=64)
    clipping = BookKeepingClipping(model, 1.0)
    assert model.net[0]._forward_hooks
    clipping.remove()
    assert not model.net[0]._forward_hooks and not model.net[2]._forward_hooks


def _clipped_mean_by_hand(model: nn.Module, x, y, clip: float) -> list[torch.Tensor]:
    """Σᵢ clip(gᵢ) / n from one ordinary backward pass per example: the definition."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for xi, yi in zip(x, y, strict=True):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(xi[None]), yi[None]), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (float(norm) + 1e-6))
    return [t / len(x) for t in total]


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_a_lenet_dp_step_is_the_mean_of_clipped_per_example_gradients(mode):
    """σ = 0, q = 1: one DP-SGD step of LeNet-5 moves the weights by −lr·Σ clip(gᵢ)/n in
    every mode (this caught Opacus's conv per-sample gradients going wrong in
    channels-last layout, which train_local switches on for speed)."""
    torch.manual_seed(0)
    x, y = _batch("lenet5", 16)
    model = build_model("lenet5", 10)
    before = [p.detach().clone() for p in model.parameters()]
    expected = _clipped_mean_by_hand(model, x, y, clip=0.1)
    result = train_local(model, TensorDataset(x, y), epochs=1, batch_size=16, learning_rate=1.0,
                         dp=DPSettings(0.0, 0.1, 1.0, 1, "rdp", mode))  # fmt: skip
    assert result.mechanism == (0.0, 1.0, 1)
    assert not model.features[0]._forward_hooks  # training took its hooks off again
    for p, b, e in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-4, atol=1e-7)
