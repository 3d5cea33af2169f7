import numpy as np
import pytest

from common.data import dirichlet_partition, iid_partition


def _check_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert len(np.unique(joined)) == n


@pytest.mark.parametrize("n,k", [(10, 3), (1000, 10), (7, 7)])
def test_iid_is_disjoint_covering_balanced_and_deterministic(n, k):
    parts = iid_partition(n, k, seed=1)
    _check_disjoint_cover(parts, n)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = iid_partition(n, k, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = iid_partition(n, k, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_is_disjoint_covering_deterministic_and_skewed():
    labels = np.repeat(np.arange(10), 300)
    parts = dirichlet_partition(labels, 10, alpha=0.3, seed=7)
    _check_disjoint_cover(parts, len(labels))
    again = dirichlet_partition(labels, 10, alpha=0.3, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # label skew: the dominant class of a client holds far more than the IID share of 10%
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.3
    iid = iid_partition(len(labels), 10, seed=7)
    iid_dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in iid]
    assert np.mean(iid_dominant) < 0.2


def test_dirichlet_large_alpha_is_close_to_iid():
    labels = np.repeat(np.arange(4), 500)
    parts = dirichlet_partition(labels, 4, alpha=1000.0, seed=0)
    shares = [np.bincount(labels[p], minlength=4) / len(p) for p in parts]
    assert np.allclose(shares, 0.25, atol=0.05)


def test_too_many_partitions_is_a_clear_error():
    with pytest.raises(ValueError, match="use fewer clients"):
        iid_partition(3, 5, seed=0)
    with pytest.raises(ValueError, match="use fewer clients"):
        dirichlet_partition(np.zeros(5, dtype=int), 5, alpha=0.5, seed=0)
