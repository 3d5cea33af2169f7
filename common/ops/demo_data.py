"""Holders' own image folders for demos and tests, made from scikit-learn's bundled digits.

``fedvault data demo-folders --out DIR`` writes what a federation of holders with their own
data looks like on disk, offline::

    DIR/client-<i>/<class>/<n>.png   holder i's images (torchvision ImageFolder layout); the
                                     training split is divided with a Dirichlet(alpha) prior
                                     over classes, so every holder has its own label mix and
                                     size, and a class it lacks has no folder at all
    DIR/test/<class>/<n>.png         the operator's held-out set (the digits test split)

The PNGs are the 28×28 digits as the ``digits`` data set serves them, so a run on these
folders is comparable with ``digits-dp``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.data import DataSpec, dirichlet_partition, load_raw_cached
from common.data.own import class_counts

log = logging.getLogger("fedvault.demo_data")

TEST_FOLDER = "test"


def write_demo_folders(
    out: Path, num_clients: int, *, seed: int = 42, alpha: float = 0.5
) -> dict[Path, dict[str, int]]:
    """Write every holder's folder and the test folder; returns each folder's class counts."""
    raw = load_raw_cached(DataSpec("digits", seed=seed))
    assert isinstance(raw.train_x, torch.Tensor) and isinstance(raw.test_x, torch.Tensor)
    shares = dirichlet_partition(raw.train_y, num_clients, alpha, seed)
    written: dict[Path, dict[str, int]] = {}
    for pid, idx in enumerate(shares):
        folder = out / f"client-{pid}"
        _write_images(folder, raw.train_x[torch.as_tensor(idx)], raw.train_y[idx], raw.classes)
        written[folder] = class_counts(raw.train_y[idx], raw.classes)
    test = out / TEST_FOLDER
    _write_images(test, raw.test_x, raw.test_y, raw.classes)
    written[test] = class_counts(raw.test_y, raw.classes)
    log.info("wrote %d holders' image folders and %s", num_clients, test)
    return written


def _write_images(
    folder: Path, images: torch.Tensor, labels: np.ndarray, classes: tuple[str, ...]
) -> None:
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        class_dir = folder / classes[int(label)]
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy(), mode="L").save(class_dir / f"{n:05d}.png")
