"""Evaluating a model on a data set in memory (used by the server and by clients)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    model.eval()
    features, labels = data.tensors
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), EVAL_BATCH_SIZE):
        x = features[start : start + EVAL_BATCH_SIZE]
        y = labels[start : start + EVAL_BATCH_SIZE]
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    n = len(labels)
    return EvalResult(total_loss / max(n, 1), correct / max(n, 1), n)
