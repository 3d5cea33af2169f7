"""Using a finished run: load its model, evaluate it on a test split, classify new inputs.

A run directory (``<output-dir>/<run-id>/``, written by the ServerApp) holds ``metrics.json``
(its ``config`` is the kebab-case run config, ``summary.classes`` the class names) and
``model.pt`` (the final global model's state dict). Image models classify image files
(PNG/JPEG, any size or mode, turned MNIST-like by :func:`prepare_image`); text models
classify strings (:func:`read_text_inputs` expands files into lines).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import OWN_DATA_SOURCES, ConfigError, RunConfig
from common.data import DataSpec, load_raw_cached, load_test_set
from common.data.features import image_features, text_features
from common.data.images import image_error, load_image, prepare_image
from common.logs import one_line
from common.metrics import EVAL_BATCH_SIZE, evaluate_with_metrics
from common.models import model_for
from common.rundir import RunDir, RunDirError

log = logging.getLogger("fedvault.inference")

IMAGE_MODELS = ("lenet5",)

__all__ = [
    "InferenceError",
    "LoadedRun",
    "Prediction",
    "RunDirError",
    "evaluate_run",
    "load_run",
    "predict",
    "prepare_image",
    "read_text_inputs",
]


class InferenceError(RuntimeError):
    """Evaluation or prediction cannot proceed; the message names the problem and the fix."""


@dataclass(frozen=True)
class LoadedRun:
    """A finished run: its config, its final model (eval mode, CPU) and its classes."""

    run_dir: Path
    config: RunConfig
    model: nn.Module
    classes: tuple[str, ...]
    kind: str  # "image" or "text"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Prediction:
    """One input's predicted class; ``error`` (one line) is set instead when it failed."""

    input: str
    label: str | None
    probability: float | None
    error: str | None = None
    probabilities: dict[str, float] | None = None  # every class's softmax probability

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "label": self.label,
            "probability": self.probability,
            "error": self.error,
            "probabilities": self.probabilities,
        }


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a run directory's config, class names and final model (eval mode, on CPU)."""
    run = RunDir.existing(run_dir)
    metrics = run.read_metrics()
    path, metrics_path, model_path = run.path, run.metrics_path, run.model_path
    try:
        config = RunConfig.from_mapping(metrics["config"])
        classes = tuple(str(c) for c in metrics["summary"]["classes"])
    except (KeyError, TypeError) as err:
        raise RunDirError(
            f"{metrics_path} has no config/summary.classes ({one_line(err)}): is it a "
            "fedvault metrics.json?"
        ) from None
    except ConfigError as err:
        raise RunDirError(f"{metrics_path}: {err}") from None
    if not model_path.is_file():
        raise RunDirError(
            f"{model_path} not found: the run did not finish (model.pt is written after the "
            "last round); re-run it or pass a finished run's directory"
        )
    model = model_for(config, len(classes))
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # unpickling / shape mismatch: many exception types
        raise RunDirError(
            f"{model_path} cannot be loaded as a {config.model} with {len(classes)} classes "
            f"({one_line(err)}): is the file from this run?"
        ) from None
    model.eval()
    kind = "image" if config.model in IMAGE_MODELS else "text"
    log.info(
        "loaded run %s: %s model on %s, %d classes",
        path,
        config.model,
        config.dataset,
        len(classes),
    )
    return LoadedRun(path, config, model, classes, kind)


def evaluate_run(
    run_dir: str | Path | LoadedRun, dataset: str | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Metrics of a run's final model on the test split of ``dataset``.

    Defaults: the run's own dataset; ``data_dir`` and the seed (which fixes the test split
    of data sets published without one) come from the run's config. For ``image-folder`` /
    ``text-file``, ``data_dir`` is the held-out folder or file itself (default: the run's
    ``test-data``), labelled with the run's classes. Returns
    :func:`common.metrics.evaluate_with_metrics`'s dict plus ``dataset``.
    """
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir)
    cfg = run.config
    name = dataset if dataset is not None else cfg.dataset
    folder = data_dir if data_dir is not None else cfg.data_dir
    spec = replace(DataSpec.from_config(cfg), dataset=name, data_dir=folder)
    if name in OWN_DATA_SOURCES:  # a folder or file of the run's classes: data_dir names it
        held_out = data_dir if data_dir is not None else cfg.test_data
        spec = replace(spec, classes=run.classes, test_data=held_out)
    raw = load_raw_cached(spec)
    if raw.kind != run.kind or tuple(raw.classes) != run.classes:
        raise InferenceError(
            f"dataset {name!r} ({raw.kind}, classes {list(raw.classes)}) does not match run "
            f"{run.run_dir} ({run.kind}, classes {list(run.classes)}): evaluate on a data set "
            f"with the same classes, e.g. {cfg.dataset!r}"
        )
    test_set = load_test_set(spec)
    result = evaluate_with_metrics(run.model, test_set, run.num_classes, run.classes)
    result["dataset"] = name
    log.info(
        "run %s on %s test split: accuracy %.4f, macro F1 %.4f, %d examples",
        run.run_dir,
        name,
        result["accuracy"],
        result["f1_macro"],
        result["num_examples"],
    )
    return result


def predict(run_dir: str | Path | LoadedRun, inputs: Sequence[str]) -> list[Prediction]:
    """Classify ``inputs`` with a run's model, one :class:`Prediction` each, in order.

    Image models: each input is an image file path. Text models: each input is a text. An
    input that cannot be used (unreadable or undecodable file, empty text) gets a
    Prediction with ``error`` set; the others are still classified.
    """
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir)
    results: list[Prediction | None] = [None] * len(inputs)
    good: list[int] = []
    if run.kind == "image":
        images: list[torch.Tensor] = []
        for i, item in enumerate(inputs):
            try:
                images.append(load_image(item))
                good.append(i)
            except Exception as err:  # PIL raises OSError, ValueError, DecompressionBomb...
                results[i] = _failed(item, image_error(item, err))
        features = image_features(torch.stack(images)) if images else None
    else:
        texts: list[str] = []
        for i, item in enumerate(inputs):
            if item.strip():
                texts.append(item)
                good.append(i)
            else:
                results[i] = _failed(item, "empty text: nothing to classify")
        features = text_features(texts, run.config.text_features) if texts else None
    if features is not None:
        probs = _probabilities(run.model, features)
        for row, i in zip(probs, good, strict=True):
            best = int(row.argmax())
            results[i] = Prediction(
                input=inputs[i],
                label=run.classes[best],
                probability=float(row[best]),
                error=None,
                probabilities={c: float(p) for c, p in zip(run.classes, row, strict=True)},
            )
    failed = sum(1 for r in results if r is not None and r.error is not None)
    log.info("classified %d input(s) with run %s, %d failed", len(inputs), run.run_dir, failed)
    return [r for r in results if r is not None]


@torch.no_grad()
def _probabilities(model: nn.Module, features: torch.Tensor) -> np.ndarray:
    model.eval()
    chunks = [
        torch.softmax(model(features[s : s + EVAL_BATCH_SIZE]).double(), dim=1).numpy()
        for s in range(0, len(features), EVAL_BATCH_SIZE)
    ]
    return np.concatenate(chunks)


def _failed(item: str, message: str) -> Prediction:
    log.warning("%s", message)
    return Prediction(input=item, label=None, probability=None, error=message)


def read_text_inputs(
    files: Sequence[str], texts: Sequence[str] = ()
) -> tuple[list[str], list[Prediction]]:
    """Texts to classify: every non-empty line of each file in ``files``, then ``texts``
    themselves (given with ``--text``: only then is an argument a text, so a mistyped path
    is never classified as one). A file that is missing, unreadable, not UTF-8 or holds no
    text is a failure of its own; the other inputs are still classified."""
    found: list[str] = []
    failures: list[Prediction] = []
    for arg in files:
        path = Path(arg).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            why = f"{arg}: no such file (to classify the words themselves, pass --text)"
            failures.append(_failed(arg, why))
            continue
        except UnicodeDecodeError:
            failures.append(_failed(arg, f"{arg}: not a UTF-8 text file (one text a line)"))
            continue
        except OSError as err:
            failures.append(_failed(arg, f"{arg}: cannot be read ({one_line(err)})"))
            continue
        kept = [line.strip() for line in lines if line.strip()]
        if not kept:
            failures.append(_failed(arg, f"{arg}: no text in the file (one text a line)"))
        log.debug("%s: %d text(s)", path, len(kept))
        found.extend(kept)
    found.extend(texts)
    return found, failures
