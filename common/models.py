"""Models every party builds identically from the run config.

All models are DP-SGD friendly by construction: no BatchNorm (per-sample gradients need
per-sample independence), only layers Opacus computes per-sample gradients for exactly
(``Conv2d``, ``Linear``), and no embedding layers (Opacus 1.6 gets ``EmbeddingBag``
per-sample gradients wrong when a token repeats), which is why text goes through hashed
term-frequency features and a linear or MLP head instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from common.config import RunConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
MODEL_NAMES = ("lenet5", "text-linear", "text-mlp")


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}: set activation to one of {sorted(ACTIVATIONS)}"
        ) from None


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 1×28×28 input.

    conv 6@5×5 (padding 2, so 28×28 plays the role of the paper's padded 32×32) → pool →
    conv 16@5×5 → pool → 120 → 84 → classes. ``tanh`` is the paper's choice and also the
    better one under DP-SGD: bounded activations keep clipped gradients informative
    (Papernot et al. 2021, "Tempered Sigmoid Activations for Deep Learning with DP").
    """

    def __init__(self, num_classes: int = 10, activation: str = "tanh") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            _activation(activation),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            _activation(activation),
            nn.Linear(120, 84),
            _activation(activation),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TextLinear(nn.Module):
    """Multinomial logistic regression over hashed term-frequency features."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TextMLP(nn.Module):
    """One hidden layer over hashed term-frequency features."""

    def __init__(
        self, num_features: int, num_classes: int, hidden: int = 64, activation: str = "tanh"
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden), _activation(activation), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(
    name: str,
    num_classes: int,
    *,
    num_features: int = 0,
    activation: str = "tanh",
    hidden: int = 64,
) -> nn.Module:
    """Build a freshly initialised model by name (the run config's ``model`` key)."""
    if name == "lenet5":
        return LeNet5(num_classes, activation)
    if name == "text-linear":
        return TextLinear(num_features, num_classes)
    if name == "text-mlp":
        return TextMLP(num_features, num_classes, hidden, activation)
    raise ValueError(f"unknown model {name!r}: set model to one of {list(MODEL_NAMES)}")


def model_for(config: RunConfig, num_classes: int) -> nn.Module:
    """The run's model (``model``, ``activation``, ``text-*`` keys), freshly initialised."""
    return build_model(
        config.model,
        num_classes,
        num_features=config.text_features,
        activation=config.activation,
        hidden=config.text_hidden,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

