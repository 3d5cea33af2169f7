"""Classification metrics beyond accuracy, computed with scikit-learn.

:func:`classification_metrics` turns true labels and softmax scores into a JSON-ready dict:
accuracy, macro precision/recall/F1, per-class precision/recall/F1/support, ROC AUC and the
confusion matrix. It never warns and never raises on degenerate but valid input (a class
never predicted scores 0; an undefined ROC AUC is ``None``), so it is safe to call every
round. :func:`evaluate_with_metrics` runs a model over a data set in memory and adds the
mean cross-entropy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from torch import nn
from torch.utils.data import TensorDataset

from common.evaluation import EVAL_BATCH_SIZE, score

__all__ = ["EVAL_BATCH_SIZE", "classification_metrics", "evaluate_with_metrics"]


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_score: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of a classifier from true labels and its ``N×num_classes`` softmax scores.

    The prediction is the arg-max of ``y_score``. Returned keys (plain Python types only):

    - ``accuracy``;
    - ``precision_macro``, ``recall_macro``, ``f1_macro``: unweighted means over the classes
      that occur in the labels or the predictions (scikit-learn's ``average="macro"``);
    - ``per_class``: one ``{"class", "precision", "recall", "f1", "support"}`` per class, in
      class order; a class never predicted has precision 0 (``zero_division=0``);
    - ``roc_auc``: binary: AUC of the class-1 score; multi-class: one-vs-rest macro AUC of
      the scores. ``None`` when undefined (a class absent from ``y_true``, non-finite scores);
    - ``confusion_matrix``: rows = true class, columns = predicted class, all classes;
    - ``classes``: the class names.

    Raises ``ValueError`` only for malformed input (shapes, labels outside the classes).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    names = [str(c) for c in (class_names if class_names is not None else range(num_classes))]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for {num_classes} classes")
    labels = np.asarray(y_true, dtype=np.int64).reshape(-1)
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (len(labels), num_classes):
        raise ValueError(
            f"y_score must be N×num_classes = {len(labels)}×{num_classes}, got shape {scores.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {sorted(set(labels))}")
    all_classes = list(range(num_classes))

    if len(labels) == 0:  # nothing to score: zeros, no AUC
        return {
            "accuracy": 0.0,
            "precision_macro": 0.0,
            "recall_macro": 0.0,
            "f1_macro": 0.0,
            "per_class": [
                {"class": n, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
                for n in names
            ],
            "roc_auc": None,
            "confusion_matrix": [[0] * num_classes for _ in all_classes],
            "classes": names,
        }

    predicted = scores.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # belt and braces: zero_division=0 already is silent
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predicted, labels=all_classes, average=None, zero_division=0
        )
        macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
            labels, predicted, average="macro", zero_division=0
        )
        matrix = confusion_matrix(labels, predicted, labels=all_classes)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision_macro": float(macro_p),
        "recall_macro": float(macro_r),
        "f1_macro": float(macro_f1),
        "per_class": [
            {
                "class": names[c],
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in all_classes
        ],
        "roc_auc": _roc_auc(labels, scores, num_classes),
        "confusion_matrix": [[int(v) for v in row] for row in matrix],
        "classes": names,
    }


def _roc_auc(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> float | None:
    """ROC AUC, or ``None`` where it is not defined."""
    if num_classes < 2 or len(np.unique(labels)) < num_classes:
        return None  # some class has no positives: its one-vs-rest curve does not exist
    if not np.isfinite(scores).all():
        return None  # a diverged model; sklearn would raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if num_classes == 2:
                auc = roc_auc_score(labels, scores[:, 1])
            else:
                auc = roc_auc_score(
                    labels, scores, multi_class="ovr", average="macro", labels=range(num_classes)
                )
    except ValueError:  # e.g. scores that are not probabilities (rows not summing to 1)
        return None
    auc = float(auc)
    return auc if np.isfinite(auc) else None


@torch.no_grad()
def evaluate_with_metrics(
    model: nn.Module,
    dataset: TensorDataset,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``model`` (eval mode, no grad, batches of 1024) over ``dataset``.

    Returns :func:`classification_metrics` plus ``loss`` (mean cross-entropy, as in
    :func:`common.evaluation.evaluate`) and ``num_examples``. The model's train/eval mode
    is restored afterwards.
    """
    loss, scores = score(model, dataset)
    targets = dataset.tensors[1]
    n = len(targets)
    if not n:
        scores = np.zeros((0, num_classes))
    result = classification_metrics(targets.cpu().numpy(), scores, num_classes, class_names)
    result["loss"] = loss
    result["num_examples"] = n
    return result
