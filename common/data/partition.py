"""Splitting a data set across clients: IID and Dirichlet(α) label skew.

Both are deterministic for a seed, disjoint, and cover every example exactly once, so a
record belongs to exactly one client and its guarantee is its owner's cumulative ε.

(flwr-datasets has equivalent partitioners, but they operate on Hugging Face ``datasets``
objects; ours are index arrays over tensors already in memory, which is all we need.)
"""

from __future__ import annotations

import numpy as np

MAX_DIRICHLET_DRAWS = 1000


def iid_partition(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle once and cut into ``num_partitions`` near-equal parts."""
    _check(num_examples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed partitions (Hsu et al. 2019): per class, shares ~ Dirichlet(α·1).

    Smaller α = more skew. Draws are repeated (deterministically) until every partition
    holds at least ``min_size`` examples, since a client with (almost) no data cannot train.
    """
    labels = np.asarray(labels)
    _check(len(labels), num_partitions)
    if num_partitions * min_size > len(labels):
        raise ValueError(
            f"{len(labels)} examples cannot give {num_partitions} partitions of ≥{min_size}: "
            "use fewer clients"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet(α={alpha}) draw gave every one of {num_partitions} clients ≥{min_size} "
        "examples: raise dirichlet-alpha or use fewer clients"
    )


def partition(
    labels: np.ndarray, num_partitions: int, method: str, seed: int, alpha: float = 0.5
) -> list[np.ndarray]:
    """Dispatch on the run config's ``partitioning`` key."""
    if method == "iid":
        return iid_partition(len(labels), num_partitions, seed)
    if method == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed)
    raise ValueError(f"unknown partitioning {method!r}: use 'iid' or 'dirichlet'")


def _check(num_examples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError("num-partitions must be ≥ 1")
    if num_partitions > num_examples:
        raise ValueError(
            f"{num_partitions} partitions of {num_examples} examples would leave clients "
            "empty: use fewer clients"
        )
