"""Data sets, partitioning and in-memory tensors for clients and the server."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .features import featurize
from .partition import dirichlet_partition, iid_partition, partition
from .sources import DATASETS, DataError, RawDataset, load_raw

__all__ = [
    "DATASETS",
    "DataError",
    "Partition",
    "RawDataset",
    "dirichlet_partition",
    "iid_partition",
    "load_partition",
    "load_raw_cached",
    "load_test_set",
    "partition",
]


@dataclass(frozen=True)
class Partition:
    """One client's share: its training examples and its slice of the test split."""

    partition_id: int
    train: TensorDataset
    test: TensorDataset
    num_classes: int


@lru_cache(maxsize=2)
def load_raw_cached(name: str, data_dir: str, seed: int) -> RawDataset:
    """Load once per process (a simulation actor serves many clients from one copy)."""
    return load_raw(name, data_dir, seed)


def _subset(raw: RawDataset, split: str, idx: np.ndarray, num_features: int) -> TensorDataset:
    xs = raw.train_x if split == "train" else raw.test_x
    ys = raw.train_y if split == "train" else raw.test_y
    picked = xs[torch.as_tensor(idx)] if isinstance(xs, torch.Tensor) else [xs[i] for i in idx]
    features = featurize(raw.kind, picked, num_features)
    return TensorDataset(features, torch.as_tensor(ys[idx], dtype=torch.long))


@lru_cache(maxsize=8)
def load_partition(
    name: str,
    data_dir: str,
    seed: int,
    partition_id: int,
    num_partitions: int,
    method: str = "iid",
    alpha: float = 0.5,
    num_features: int = 4096,
) -> Partition:
    """Client ``partition_id``'s training data (partitioned by ``method``) and test slice."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    raw = load_raw_cached(name, data_dir, seed)
    train_parts = partition(raw.train_y, num_partitions, method, seed, alpha)
    test_parts = iid_partition(len(raw.test_y), num_partitions, seed)
    return Partition(
        partition_id,
        _subset(raw, "train", train_parts[partition_id], num_features),
        _subset(raw, "test", test_parts[partition_id], num_features),
        raw.num_classes,
    )


def load_test_set(name: str, data_dir: str, seed: int, num_features: int = 4096) -> TensorDataset:
    """The whole held-out test split, for the server's central evaluation."""
    raw = load_raw_cached(name, data_dir, seed)
    return _subset(raw, "test", np.arange(len(raw.test_y)), num_features)
