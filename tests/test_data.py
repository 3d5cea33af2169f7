"""Data loaders on real data: the bundled digits, files the tests write in the publishers'
formats, and ../shared/data's real MNIST / AG News / SMS spam when present."""

import gzip
import struct

import numpy as np
import pytest
import torch

from common.data import DataError, DataSpec, load_partition, load_raw_cached, load_test_set
from common.data.features import text_features
from common.data.sources import load_raw
from tests.conftest import shared_data


def test_digits_is_real_offline_28x28():
    raw = load_raw("digits", "", seed=0)
    assert raw.kind == "image" and raw.num_classes == 10
    assert raw.train_x.shape[1:] == (28, 28) and raw.train_x.dtype == torch.uint8
    assert len(raw.train_y) + len(raw.test_y) == 1797
    # MNIST-like framing: a 4-pixel empty border around a 20x20 digit
    assert raw.train_x[:, :4, :].max() == 0 and raw.train_x[:, :, -4:].max() == 0
    assert raw.train_x.float().mean() > 10
    assert set(np.unique(raw.test_y)) == set(range(10))  # stratified split


def test_partitions_are_tensors_and_cover_the_training_split():
    parts = [load_partition(DataSpec("digits", "", 3), i, 3) for i in range(3)]
    raw = load_raw_cached(DataSpec("digits", "", 3))
    assert sum(len(p.train) for p in parts) == len(raw.train_y)
    x, y = parts[0].train.tensors
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.long
    assert len(load_test_set(DataSpec("digits", "", 3))) == len(raw.test_y)


def _write_idx(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.tobytes()
    )


def test_mnist_loader_reads_idx_files_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    raw_dir = tmp_path / "MNIST" / "raw"
    train_labels = rng.integers(0, 10, 50).astype(np.uint8)
    _write_idx(raw_dir, "train", rng.integers(0, 256, (50, 28, 28)).astype(np.uint8), train_labels)
    _write_idx(raw_dir, "t10k", rng.integers(0, 256, (20, 28, 28)).astype(np.uint8),
               rng.integers(0, 10, 20).astype(np.uint8))  # fmt: skip
    raw = load_raw("mnist", str(tmp_path))
    assert raw.train_x.shape == (50, 28, 28)
    assert np.array_equal(raw.train_y, train_labels)


def test_mnist_missing_is_a_one_line_error_naming_the_fix(tmp_path):
    with pytest.raises(DataError, match="set data-dir to a folder holding MNIST/raw") as err:
        load_raw("mnist", str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)


def test_real_mnist_from_shared_data():
    root = shared_data("MNIST", "raw")
    raw = load_raw("mnist", str(root))
    assert raw.train_x.shape == (60000, 28, 28) and raw.test_x.shape == (10000, 28, 28)
    assert raw.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_sms_spam_reads_tab_separated_and_splits_by_seed(tmp_path):
    lines = [f"{'spam' if i % 5 == 0 else 'ham'}\tmessage number {i}, call now" for i in range(100)]
    (tmp_path / "SMSSpamCollection").write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = load_raw("sms_spam", str(tmp_path), seed=1)
    assert raw.classes == ("ham", "spam")
    assert len(raw.train_x) == 80 and len(raw.test_x) == 20
    assert raw.test_y.sum() == 4  # stratified: 20% spam kept in the test split
    assert load_raw("sms_spam", str(tmp_path), seed=1).test_x == raw.test_x
    assert load_raw("sms_spam", str(tmp_path), seed=2).test_x != raw.test_x


def test_sms_spam_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "SMSSpamCollection").write_text("ham\tok\nnot a valid line\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"SMSSpamCollection:2: expected 'ham\|spam<TAB>text'"):
        load_raw("sms_spam", str(tmp_path))


def test_ag_news_reads_char_cnn_csv(tmp_path):
    folder = tmp_path / "ag_news_csv"
    folder.mkdir()
    rows = [f'"{1 + i % 4}","Title {i}","Body of story {i}\\nmore"' for i in range(40)]
    (folder / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "test.csv").write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    raw = load_raw("ag_news", str(tmp_path))
    assert raw.num_classes == 4 and len(raw.train_x) == 40 and len(raw.test_x) == 8
    assert raw.train_y[:4].tolist() == [0, 1, 2, 3]
    assert "\\n" not in raw.train_x[0]


def test_ag_news_without_data_dir_says_what_to_do():
    with pytest.raises(DataError, match="ag_news needs data-dir"):
        load_raw("ag_news", "")


def test_real_sms_and_ag_news_from_shared_data():
    root = shared_data("sms_spam", "SMSSpamCollection")
    sms = load_raw("sms_spam", str(root))
    assert len(sms.train_y) + len(sms.test_y) == 5574
    assert sms.train_y.sum() + sms.test_y.sum() == 747
    news = load_raw("ag_news", str(shared_data("ag_news_csv", "test.csv")))
    assert len(news.train_y) + len(news.test_y) == 7600


def test_text_features_are_stateless_and_normalised():
    """A text's features never depend on the other texts (no fitted IDF or vocabulary)."""
    alone = text_features(["free prize call now"], 256)
    with_others = text_features(["free prize call now", "see you at lunch", "prize prize"], 256)
    assert torch.equal(alone[0], with_others[0])
    assert torch.allclose(with_others.norm(dim=1), torch.ones(3))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_raw("cifar")


def test_gzip_only_mnist_is_reported(tmp_path):
    """torchvision with download=False reads only the uncompressed IDX files."""
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(DataError, match="MNIST not found"):
        load_raw("mnist", str(tmp_path))
