"""Evaluating a model on a data set in memory (used by the server and by clients)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
def score(model: nn.Module, data: TensorDataset) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and float64 softmax scores (N×C) of ``model`` on ``data``.

    The one loop every evaluation uses. Eval mode, no grad, batches of 1024; the model's
    train/eval mode is restored afterwards. Float64 softmax: rows sum to 1 to the precision
    roc_auc_score checks, and the arg-max equals the logits' arg-max.
    """
    features, labels = data.tensors
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total_loss = 0.0
    batches: list[np.ndarray] = []
    try:
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            x = features[start : start + EVAL_BATCH_SIZE].to(device)
            y = labels[start : start + EVAL_BATCH_SIZE].to(device)
            logits = model(x)
            total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            batches.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    scores = np.concatenate(batches) if batches else np.zeros((0, 0))
    return total_loss / max(len(labels), 1), scores


def evaluate(model: nn.Module, data: TensorDataset) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    loss, scores = score(model, data)
    labels = data.tensors[1].cpu().numpy()
    n = len(labels)
    correct = int((scores.argmax(axis=1) == labels).sum()) if n else 0
    return EvalResult(loss, correct / max(n, 1), n)
