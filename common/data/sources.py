"""Data sets as they come from their publishers, loaded into memory once.

Each loader returns a :class:`RawDataset`: images as a uint8 tensor ``N×28×28`` (features are
made per partition, see :mod:`common.data.features`), texts as a list of strings. Nothing is
ever fetched at training time except by torchvision's MNIST download into a cache, and a
missing file is a one-line error naming the path and the fix.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from common.paths import default_cache_dir

log = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "ag_news", "sms_spam")
TEST_FRACTION = 0.2  # for data sets published without a test split


class DataError(RuntimeError):
    """A data set cannot be loaded; the message says where it was looked for and what to do."""


@dataclass(frozen=True)
class RawDataset:
    """A data set in memory: train and test inputs with integer labels."""

    name: str
    kind: str  # "image" (uint8 N×28×28 tensor) or "text" (list of str)
    classes: tuple[str, ...]
    train_x: torch.Tensor | list[str]
    train_y: np.ndarray
    test_x: torch.Tensor | list[str]
    test_y: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __post_init__(self) -> None:
        for split, labels in (("train", self.train_y), ("test", self.test_y)):
            check_labels(labels, len(self.classes), f"{self.name} ({split} split)")


def check_labels(labels: np.ndarray | torch.Tensor, num_classes: int, where: str) -> None:
    """Every label must name one of the classes: an out-of-range label (a corrupt file) would
    otherwise fail every round deep inside the loss, or silently train a wrong model."""
    values = np.asarray(labels)
    if values.size == 0:
        return
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(
            f"{where}: label {int(bad[0])} is outside the {num_classes} classes "
            f"(0-{num_classes - 1}; {bad.size} such labels): the data files are corrupt or "
            "not this data set; replace them"
        )


def load_raw(name: str, data_dir: str = "", seed: int = 42) -> RawDataset:
    """Load data set ``name``; ``data_dir`` is where its files are ("" = default/cache)."""
    loaders = {"digits": _digits, "mnist": _mnist, "ag_news": _ag_news, "sms_spam": _sms_spam}
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}: set dataset to one of {list(DATASETS)}")
    return loaders[name](Path(data_dir).expanduser() if data_dir else None, seed)


def _digits(_data_dir: Path | None, seed: int) -> RawDataset:
    """scikit-learn's bundled UCI handwritten digits (1,797 real 8×8 scans), as 28×28.

    Like MNIST, each digit is scaled into a 20×20 box centred in a 28×28 frame, so LeNet-5
    sees the geometry it was designed for. Works offline: the data ships with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from torchvision.transforms.v2 import functional as tvf

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = tvf.resize(images, [20, 20], antialias=True)
    images = tvf.pad(images, [4, 4, 4, 4])
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, seed)
    return RawDataset(
        "digits",
        "image",
        tuple(str(d) for d in range(10)),
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
    )


def _mnist(data_dir: Path | None, _seed: int) -> RawDataset:
    """torchvision's MNIST: ``data_dir`` holding ``MNIST/raw``, or a download into the cache."""
    from torchvision.datasets import MNIST

    root = data_dir if data_dir is not None else default_cache_dir()
    download = data_dir is None
    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found..."
        raise DataError(
            f"MNIST not found in {root / 'MNIST' / 'raw'} ({err}): set data-dir to a folder "
            "holding MNIST/raw with the IDX files"
        ) from None
    except OSError as err:  # URLError and friends: offline
        raise DataError(
            f"could not download MNIST into {root} ({err}); offline? set data-dir to a folder "
            "holding MNIST/raw with the IDX files"
        ) from None
    return RawDataset(
        "mnist",
        "image",
        tuple(str(d) for d in range(10)),
        train.data,
        train.targets.numpy().astype(np.int64),
        test.data,
        test.targets.numpy().astype(np.int64),
    )


AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def _ag_news(data_dir: Path | None, seed: int) -> RawDataset:
    """AG's News (char-CNN release CSVs: class 1-4, title, description; no header).

    Looks for ``train.csv``/``test.csv`` in ``data_dir/ag_news_csv`` or ``data_dir``. When
    only ``test.csv`` is present it is split into train/test by ``seed`` (logged), so the
    scenario stays runnable with the test split alone.
    """
    if data_dir is None:
        raise DataError(
            "ag_news needs data-dir: set it to a folder holding ag_news_csv/train.csv and "
            "test.csv (the char-CNN release, ag_news_csv.tar.gz)"
        )
    folder = _first_existing([data_dir / "ag_news_csv", data_dir], "test.csv", "ag_news")
    test_x, test_y = _read_ag_news_csv(folder / "test.csv")
    if (folder / "train.csv").exists():
        train_x, train_y = _read_ag_news_csv(folder / "train.csv")
    else:
        log.warning("%s has no train.csv: splitting test.csv into train/test", folder)
        texts, labels = test_x, test_y
        train_idx, test_idx = _stratified_split(labels, seed)
        train_x, train_y = [texts[i] for i in train_idx], labels[train_idx]
        test_x, test_y = [texts[i] for i in test_idx], labels[test_idx]
    return RawDataset("ag_news", "text", AG_NEWS_CLASSES, train_x, train_y, test_x, test_y)


def _read_ag_news_csv(path: Path) -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    labels: list[int] = []
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            try:
                label = int(row[0]) - 1
                if not 0 <= label < len(AG_NEWS_CLASSES):
                    raise ValueError
            except (ValueError, IndexError):
                raise DataError(
                    f"{path}:{line_no}: expected 'class,title,description' with class 1-4; "
                    "is this the char-CNN AG News CSV (no header)?"
                ) from None
            texts.append(" ".join(row[1:]).replace("\\n", " "))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def _sms_spam(data_dir: Path | None, seed: int) -> RawDataset:
    """UCI SMS Spam Collection: one ``label<TAB>text`` a line; split into train/test by seed."""
    if data_dir is None:
        raise DataError(
            "sms_spam needs data-dir: set it to a folder holding SMSSpamCollection "
            "(or sms_spam/SMSSpamCollection) from the UCI repository"
        )
    folder = _first_existing([data_dir / "sms_spam", data_dir], "SMSSpamCollection", "sms_spam")
    path = folder / "SMSSpamCollection"
    classes = ("ham", "spam")
    texts: list[str] = []
    labels: list[int] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in classes:
            raise DataError(
                f"{path}:{line_no}: expected 'ham|spam<TAB>text'; is this the UCI "
                "SMSSpamCollection file?"
            )
        texts.append(text)
        labels.append(classes.index(label))
    y = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = _stratified_split(y, seed)
    return RawDataset(
        "sms_spam",
        "text",
        classes,
        [texts[i] for i in train_idx],
        y[train_idx],
        [texts[i] for i in test_idx],
        y[test_idx],
    )


def _stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(test_idx)


def _first_existing(folders: list[Path], filename: str, dataset: str) -> Path:
    for folder in folders:
        if (folder / filename).exists():
            return folder
    looked = ", ".join(str(f / filename) for f in folders)
    raise DataError(f"{dataset}: {filename} not found (looked at {looked}): fix data-dir")
