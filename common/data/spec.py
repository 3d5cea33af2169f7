"""Which data a run trains and evaluates on, as one value.

The data set, its folder, the seed (which fixes the split of data sets published without one
and every partition), the text feature width and the partitioning travel together from the
run config to every loader; :class:`DataSpec` carries them as one frozen (hashable) value, so
the ``lru_cache``-d loaders key on it directly. For a holder-owned source (``image-folder``,
``text-file``) it also carries the operator's class list and the server's held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import RunConfig


@dataclass(frozen=True)
class DataSpec:
    """The run-config keys that choose the data; defaults are :class:`RunConfig`'s."""

    dataset: str
    data_dir: str = RunConfig.data_dir
    seed: int = RunConfig.seed
    text_features: int = RunConfig.text_features
    partitioning: str = RunConfig.partitioning
    dirichlet_alpha: float = RunConfig.dirichlet_alpha
    classes: tuple[str, ...] = ()
    test_data: str = RunConfig.test_data

    @classmethod
    def from_config(cls, cfg: RunConfig) -> DataSpec:
        return cls(
            cfg.dataset, cfg.data_dir, cfg.seed, cfg.text_features, cfg.partitioning,
            cfg.dirichlet_alpha, cfg.declared_classes, cfg.test_data,
        )  # fmt: skip
