"""Per-sample gradient clipping in one backward pass ("book-keeping", Bu et al. 2023).

DP-SGD needs Σᵢ clip(gᵢ): every example's gradient scaled to norm ≤ C, then summed.
Opacus offers two ways: ``hooks`` materialises every per-sample gradient (B × params), and
``ghost`` gets the per-sample norms cheaply, then runs a *second* full backward pass on the
loss reweighted by the clip factors. On LeNet-5 that second pass is most of what DP costs
over plain training (``python -m benchmarks dp``).

Book-keeping keeps what the first pass already produced instead: each layer's input
(captured in the forward) and the gradient of the loss with respect to its output (the
"backprop"). From those, per layer:

- the per-sample norms, computed by Opacus's own registered samplers: ghost norms for
  ``Linear`` (‖aᵢ‖·‖bᵢ‖, nothing materialised), materialised per-sample gradients for
  ``Conv2d`` (small: out × in × k × k per example);
- the clipped sum Σᵢ cᵢ·gᵢ, which is linear in the backprops: for a layer whose
  per-sample gradients were materialised it is a weighted sum of them; otherwise it is
  the layer's own weight-gradient backward (torch's kernel, reached through the graph the
  forward built) with each example's backprop scaled by cᵢ.

The clip factor is Opacus's, cᵢ = min(1, C / (‖gᵢ‖ + 1e-6)), and the result goes into
``p.grad`` exactly where Opacus's ghost clipping puts it, so Opacus's
``DPOptimizerFastGradientClipping`` adds the noise and its accountant records the step.
tests/test_clipping.py checks the sum against Opacus's per-sample clipping, layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from common.privacy.opacus_internals import GRAD_SAMPLERS, NORM_SAMPLERS

# The layers whose clipped sums tests/test_clipping.py checks against per-example gradients.
# Opacus has samplers for more (norms, embeddings, RNNs), but a layer the tests do not cover
# is refused rather than trusted: the privacy guarantee rests on these sums.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

Sampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]


class BookKeepingClipping:
    """Hooks on ``model`` that turn one backward pass into Σᵢ clip(gᵢ) in ``p.grad``.

    Use: ``clipping = BookKeepingClipping(model, C)``; per batch, ``losses =
    criterion_without_reduction(model(x), y)`` then ``clipping.backward(losses)`` instead
    of ``loss.backward()``; ``clipping.remove()`` when done (``with`` does it too).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self._records: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] = []
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(module) not in SUPPORTED_LAYERS:
                self.remove()
                raise ValueError(
                    f"book-keeping clipping does not support layer {name!r} "
                    f"({type(module).__name__}): set grad-sample-mode = hooks (Opacus's "
                    "per-sample gradients, which cover more layer types)"
                )
            self._handles.append(module.register_forward_hook(self._capture))

    def __enter__(self) -> BookKeepingClipping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Take the hooks off the model (it trains and evaluates as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            # .contiguous(): Opacus 1.6's conv sampler (unfold2d) reads its input through
            # strides that assume NCHW, and gets channels-last activations wrong
            # (tests/test_clipping.py). The NCHW copy is of one layer input: small next to
            # the step.
            self._records.append((module, [t.detach().contiguous() for t in inputs], output))

    def backward(self, per_sample_losses: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad`` = Σᵢ clip(∇ lossᵢ) for every trainable parameter.

        ``per_sample_losses`` holds one loss per example (``reduction="none"``) from the
        forward pass just run. Returns the per-sample gradient norms (before clipping).
        """
        records, self._records = self._records, []
        modules = [module for module, _, _ in records]
        if len(set(map(id, modules))) != len(modules):
            raise RuntimeError(
                "book-keeping clipping saw a layer run twice before backward (shared "
                "weights or two forwards): set grad-sample-mode = hooks"
            )
        n = per_sample_losses.shape[0]
        if n == 0:  # Poisson sampling drew no example: the step is noise only
            for p in self.parameters:
                p.grad = torch.zeros_like(p)
            return per_sample_losses.new_zeros(0)

        backprops = torch.autograd.grad(
            per_sample_losses.sum(), [output for _, _, output in records], retain_graph=True
        )
        squared_norms = per_sample_losses.new_zeros(n)
        materialised: list[dict[nn.Parameter, torch.Tensor] | None] = []
        seen: set[int] = set()
        for (module, activations, _), backprop in zip(records, backprops, strict=True):
            kind = type(module)
            if kind in NORM_SAMPLERS:
                norm_sampler: Sampler = NORM_SAMPLERS[kind]
                norms = norm_sampler(module, activations, backprop)
                materialised.append(None)
            else:
                grad_sampler: Sampler = GRAD_SAMPLERS[kind]
                grads = grad_sampler(module, activations, backprop)
                norms = {p: g.reshape(n, -1).norm(2, dim=1) for p, g in grads.items()}
                materialised.append(grads)
            for p, norm in norms.items():
                if p.requires_grad:
                    squared_norms += norm.pow(2)
                    seen.add(id(p))
        if seen != {id(p) for p in self.parameters}:
            raise RuntimeError(
                "book-keeping clipping did not see every trainable parameter in the forward "
                "pass, so it cannot bound the per-sample norm: set grad-sample-mode = hooks"
            )

        norms = squared_norms.sqrt()
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's formula
        layers = zip(records, backprops, materialised, strict=True)
        for (module, _, output), backprop, grads in layers:
            if grads is not None:
                for p, per_sample in grads.items():
                    if p.requires_grad:
                        p.grad = torch.einsum("n,n...->...", factors, per_sample)
                continue
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            scale = factors.view(-1, *([1] * (backprop.dim() - 1)))
            sums = torch.autograd.grad(
                output, own, grad_outputs=backprop * scale, retain_graph=True
            )
            for p, g in zip(own, sums, strict=True):
                p.grad = g
        return norms
