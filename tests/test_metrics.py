"""classification_metrics against hand-computed values; no warnings ever reach the user."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from common.evaluation import evaluate
from common.metrics import classification_metrics, evaluate_with_metrics

# 3 classes; class 2 is never predicted.
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 0, 1, 0]
# Softmax-like rows whose arg-max is Y_PRED, with varied values so that AUC is informative.
SCORES = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.50, 0.30, 0.20],
        [0.30, 0.45, 0.25],
        [0.10, 0.80, 0.10],
        [0.25, 0.60, 0.15],
        [0.40, 0.25, 0.35],
        [0.20, 0.50, 0.30],
        [0.45, 0.15, 0.40],
    ]
)


def _strict(fn, *args, **kwargs):
    """Call ``fn`` turning every warning into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _assert_plain_json(value) -> None:
    """Only builtin types (no numpy scalars), and json.dumps accepts it."""
    json.dumps(value)

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                assert type(k) is str
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or type(v) in (int, float, str, bool), (v, type(v))

    walk(value)


def test_fixture_scores_predict_what_the_hand_computation_assumes():
    assert SCORES.argmax(axis=1).tolist() == Y_PRED
    np.testing.assert_allclose(SCORES.sum(axis=1), 1.0)


def test_hand_computed_metrics_with_a_class_never_predicted():
    m = _strict(classification_metrics, Y_TRUE, SCORES, 3, ["a", "b", "c"])
    # class 0: predicted at 0,1,5,7 (2 right) of 3 true → P 1/2, R 2/3, F1 4/7
    # class 1: predicted at 2,3,4,6 (2 right) of 2 true → P 1/2, R 1,   F1 2/3
    # class 2: never predicted, 3 true                 → P 0 (zero_division), R 0, F1 0
    assert m["accuracy"] == pytest.approx(4 / 8)
    expected = [
        ("a", 1 / 2, 2 / 3, 4 / 7, 3),
        ("b", 1 / 2, 1.0, 2 / 3, 2),
        ("c", 0.0, 0.0, 0.0, 3),
    ]
    assert [row["class"] for row in m["per_class"]] == ["a", "b", "c"]
    for row, (name, p, r, f1, support) in zip(m["per_class"], expected, strict=True):
        assert row["class"] == name
        assert row["precision"] == pytest.approx(p)
        assert row["recall"] == pytest.approx(r)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
    assert m["precision_macro"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["f1_macro"] == pytest.approx(26 / 63)  # (4/7 + 2/3 + 0) / 3
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [2, 1, 0]]
    assert m["classes"] == ["a", "b", "c"]
    _assert_plain_json(m)


def test_multiclass_auc_is_sklearns_one_vs_rest_macro():
    m = _strict(classification_metrics, Y_TRUE, SCORES, 3)
    expected = roc_auc_score(Y_TRUE, SCORES, multi_class="ovr", average="macro")
    assert 0.0 <= m["roc_auc"] <= 1.0
    assert m["roc_auc"] == pytest.approx(expected, abs=1e-12)
    assert m["classes"] == ["0", "1", "2"]  # default names


def test_binary_auc_against_a_hand_computed_value():
    y_true = [0, 0, 1, 1, 0, 1]
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    scores = np.stack([1 - p1, p1], axis=1)
    m = _strict(classification_metrics, y_true, scores, 2, ["ham", "spam"])
    # positives {0.35, 0.8, 0.9} vs negatives {0.1, 0.4, 0.7}: 1 + 3 + 3 = 7 of 9 pairs
    assert m["roc_auc"] == pytest.approx(7 / 9)
    assert m["accuracy"] == pytest.approx(4 / 6)  # threshold 0.5: 0.35 and 0.7 wrong


@pytest.mark.parametrize(
    ("y_true", "num_classes"),
    [
        ([0, 0, 1, 1, 0, 1, 0, 1], 3),  # multi-class, class 2 absent from y_true
        ([1, 1, 1, 1], 2),  # binary, only one class present
    ],
)
def test_undefined_auc_is_none_without_warnings(y_true, num_classes):
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(num_classes), size=len(y_true))
    m = _strict(classification_metrics, y_true, scores, num_classes)
    assert m["roc_auc"] is None
    assert len(m["confusion_matrix"]) == num_classes
    _assert_plain_json(m)


def test_nonfinite_scores_and_empty_input_do_not_crash():
    scores = SCORES.copy()
    scores[0, 0] = np.nan
    assert _strict(classification_metrics, Y_TRUE, scores, 3)["roc_auc"] is None
    empty = _strict(classification_metrics, [], np.zeros((0, 3)), 3)
    assert empty["accuracy"] == 0.0 and empty["roc_auc"] is None
    assert empty["confusion_matrix"] == [[0] * 3] * 3
    _assert_plain_json(empty)


@pytest.mark.parametrize(
    ("y_true", "scores", "num_classes", "names"),
    [
        (Y_TRUE, SCORES[:, :2], 3, None),  # wrong number of columns
        (Y_TRUE[:-1], SCORES, 3, None),  # wrong number of rows
        ([0, 1, 2, 3, 0, 1, 2, 0], SCORES, 3, None),  # label outside the classes
        (Y_TRUE, SCORES, 3, ["a", "b"]),  # wrong number of names
    ],
)
def test_malformed_input_is_a_value_error(y_true, scores, num_classes, names):
    with pytest.raises(ValueError):
        classification_metrics(y_true, scores, num_classes, names)


def test_evaluate_with_metrics_agrees_with_evaluate_and_restores_train_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(2500, 5)  # > 1024: several batches
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    data = TensorDataset(x, y)
    model.train()
    m = _strict(evaluate_with_metrics, model, data, 3, ["x", "y", "z"])
    assert model.training
    reference = evaluate(model, data)
    assert m["num_examples"] == 2500
    assert m["accuracy"] == pytest.approx(reference.accuracy, abs=1e-12)
    assert m["loss"] == pytest.approx(reference.loss, rel=1e-9)
    assert sum(map(sum, m["confusion_matrix"])) == 2500
    assert [r["support"] for r in m["per_class"]] == torch.bincount(y, minlength=3).tolist()
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), dim=1).numpy()
    assert m["roc_auc"] == pytest.approx(
        roc_auc_score(y.numpy(), probs, multi_class="ovr", average="macro"), abs=1e-12
    )
    _assert_plain_json(m)
