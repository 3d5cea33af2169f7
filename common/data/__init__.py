"""Data sets, partitioning and in-memory tensors for clients and the server."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.config import OWN_DATA_SOURCES

from .features import featurize
from .own import holder_path, read_source
from .partition import dirichlet_partition, iid_partition, partition
from .sources import DATASETS, DataError, RawDataset, check_labels, load_raw
from .spec import DataSpec

__all__ = [
    "DATASETS",
    "DataError",
    "DataSpec",
    "Partition",
    "RawDataset",
    "dirichlet_partition",
    "holder_share",
    "iid_partition",
    "load_partition",
    "load_raw_cached",
    "load_test_set",
    "partition",
    "partition_from_raw",
    "raw_partition",
    "to_tensors",
]


@dataclass(frozen=True)
class Partition:
    """One client's share: its training examples and its slice of the test split."""

    partition_id: int
    train: TensorDataset
    test: TensorDataset
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_raw_cached(spec: DataSpec) -> RawDataset:
    """Load once per process (a simulation actor serves many clients from one copy).

    A holder-owned source (``image-folder``, ``text-file``) has no training split here: the
    training data stays with the holders, and this is the server's held-out ``test-data``.
    """
    if spec.dataset in OWN_DATA_SOURCES:
        return _load_held_out(spec.dataset, spec.test_data, spec.classes)
    return _load_raw_cached(spec.dataset, spec.data_dir, spec.seed)


@lru_cache(maxsize=2)
def _load_held_out(source: str, test_data: str, classes: tuple[str, ...]) -> RawDataset:
    if not test_data:
        raise DataError(
            f"dataset {source} needs test-data: set it to the server's held-out folder or file"
        )
    inputs, labels = read_source(source, Path(test_data).expanduser(), classes)
    return RawDataset(source, OWN_DATA_SOURCES[source], classes,
                      inputs[:0], labels[:0], inputs, labels)  # fmt: skip


@lru_cache(maxsize=2)
def _load_raw_cached(name: str, data_dir: str, seed: int) -> RawDataset:
    # keyed on what load_raw reads only: specs differing in features or partitioning share it
    return load_raw(name, data_dir, seed)


def _pick(xs: torch.Tensor | list[str], idx: np.ndarray) -> torch.Tensor | list[str]:
    return xs[torch.as_tensor(idx)] if isinstance(xs, torch.Tensor) else [xs[i] for i in idx]


def _subset(raw: RawDataset, split: str, idx: np.ndarray, num_features: int) -> TensorDataset:
    xs = raw.train_x if split == "train" else raw.test_x
    ys = raw.train_y if split == "train" else raw.test_y
    return to_tensors(raw.kind, _pick(xs, idx), ys[idx], num_features)


def to_tensors(
    kind: str, inputs: torch.Tensor | list[str], labels: np.ndarray, num_features: int
) -> TensorDataset:
    """Raw inputs → (features, labels) tensors, once, so training never transforms per sample."""
    features = featurize(kind, inputs, num_features)
    return TensorDataset(features, torch.as_tensor(labels, dtype=torch.long))


def raw_partition(spec: DataSpec, partition_id: int, num_partitions: int) -> dict:
    """Client ``partition_id``'s raw share (inputs as published, before features).

    What ``fedvault data prepare`` encrypts: images as uint8, texts as strings. A
    holder-owned source is read from ``<data-dir>/client-<i>`` (simulation's layout).
    """
    if spec.dataset in OWN_DATA_SOURCES:
        path = holder_path(Path(spec.data_dir).expanduser(), partition_id, spec.dataset)
        return holder_share(spec.dataset, path, spec.classes, partition_id, num_partitions)
    raw = load_raw_cached(spec)
    train_idx = partition(
        raw.train_y, num_partitions, spec.partitioning, spec.seed, spec.dirichlet_alpha
    )[partition_id]
    test_idx = iid_partition(len(raw.test_y), num_partitions, spec.seed)[partition_id]
    return _share(
        spec.dataset, raw.kind, raw.classes, partition_id, num_partitions,
        _pick(raw.train_x, train_idx), raw.train_y[train_idx],
        _pick(raw.test_x, test_idx), raw.test_y[test_idx],
    )  # fmt: skip


def holder_share(
    source: str,
    path: Path,
    classes: tuple[str, ...],
    partition_id: int,
    num_partitions: int,
    **columns: str,
) -> dict:
    """A holder's own folder or file as its share: every record trains; the holder keeps no
    test slice (the server evaluates on its own held-out set)."""
    inputs, labels = read_source(source, path, classes, **columns)
    return _share(source, OWN_DATA_SOURCES[source], classes, partition_id, num_partitions,
                  inputs, labels, inputs[:0], labels[:0])  # fmt: skip


def _share(
    dataset: str,
    kind: str,
    classes: tuple[str, ...],
    partition_id: int,
    num_partitions: int,
    train_x: torch.Tensor | list[str],
    train_y: np.ndarray,
    test_x: torch.Tensor | list[str],
    test_y: np.ndarray,
) -> dict:
    return {
        "dataset": dataset,
        "kind": kind,
        "classes": list(classes),
        "partition_id": partition_id,
        "num_partitions": num_partitions,
        "train_x": train_x,
        "train_y": torch.as_tensor(train_y),
        "test_x": test_x,
        "test_y": torch.as_tensor(test_y),
    }


def partition_from_raw(share: dict, num_features: int) -> Partition:
    """A :class:`Partition` from a :func:`raw_partition` dict (e.g. decrypted in memory)."""
    kind = share["kind"]
    for split in ("train_y", "test_y"):
        check_labels(share[split], len(share["classes"]),
                     f"partition {share['partition_id']} ({split[:-2]} split)")  # fmt: skip
    return Partition(
        int(share["partition_id"]),
        to_tensors(kind, share["train_x"], np.asarray(share["train_y"]), num_features),
        to_tensors(kind, share["test_x"], np.asarray(share["test_y"]), num_features),
        tuple(str(c) for c in share["classes"]),
    )


@lru_cache(maxsize=8)
def load_partition(spec: DataSpec, partition_id: int, num_partitions: int) -> Partition:
    """Client ``partition_id``'s training data (partitioned by ``spec.partitioning``) and
    test slice."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    share = raw_partition(spec, partition_id, num_partitions)
    return partition_from_raw(share, spec.text_features)


def load_test_set(spec: DataSpec) -> TensorDataset:
    """The whole held-out test split, for the server's central evaluation."""
    raw = load_raw_cached(spec)
    return _subset(raw, "test", np.arange(len(raw.test_y)), spec.text_features)
