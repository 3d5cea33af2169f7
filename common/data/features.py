"""Turning raw inputs into the float tensors models train on, once per partition.

Images: uint8 → float, normalised with MNIST's mean/std, shape ``N×1×28×28``.
Text: hashed term frequencies. ``HashingVectorizer`` is stateless, so there is no
vocabulary to fit and nothing about a client's words ever leaves it. We use sublinear TF
with L2 normalisation and deliberately *no* IDF: an IDF fitted on private data makes every
record's features depend on every other record, which breaks the one-record sensitivity
that DP-SGD's guarantee rests on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
from sklearn.pipeline import Pipeline, make_pipeline

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def image_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``N×28×28`` → normalised float ``N×1×28×28``."""
    x = images.to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x.unsqueeze(1).contiguous()


@lru_cache(maxsize=4)
def _text_pipeline(num_features: int) -> Pipeline:
    return make_pipeline(
        HashingVectorizer(
            n_features=num_features, alternate_sign=False, norm=None, ngram_range=(1, 2)
        ),
        TfidfTransformer(use_idf=False, sublinear_tf=True, norm="l2"),
    )


def text_features(texts: Sequence[str], num_features: int) -> torch.Tensor:
    """Texts → dense float32 ``N×num_features`` hashed sublinear-TF vectors."""
    if not texts:  # a holder's share has no test slice; scikit-learn rejects empty input
        return torch.zeros((0, num_features), dtype=torch.float32)
    # use_idf=False: fit_transform learns nothing from the data (see module docstring).
    matrix = _text_pipeline(num_features).fit_transform(list(texts))
    return torch.from_numpy(matrix.astype(np.float32).toarray())


def featurize(kind: str, inputs: torch.Tensor | Sequence[str], num_features: int) -> torch.Tensor:
    """Dispatch on the data set's kind."""
    if kind == "image":
        assert isinstance(inputs, torch.Tensor)
        return image_features(inputs)
    return text_features(list(inputs), num_features)
