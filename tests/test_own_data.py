"""A holder's own data: image folders and text files written here, read by the real readers,
prepared into the holder's encrypted partition, refused with one line when they are wrong."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ConfigError, RunConfig
from common.data import DataSpec, holder_share, load_raw_cached, partition_from_raw
from common.data.own import class_counts, read_image_folder, read_text_file
from common.data.sources import DataError

CLASSES = ("cat", "dog", "bird")


def _stroke(size: tuple[int, int], mode: str, *, light: bool) -> Image.Image:
    """A bar of ink on a background, in any size and colour mode."""
    w, h = size
    ink, background = (20, 235) if light else (235, 20)
    pixels = np.full((h, w), background, dtype=np.uint8)
    pixels[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = ink
    return Image.fromarray(pixels, "L").convert(mode)


def _image_folder(root, layout: dict[str, int]):
    """``root/<class>/`` with ``n`` images each: PNG and JPEG, RGB, RGBA and grey, any size."""
    kinds = [((40, 60), "RGB", "png"), ((17, 17), "L", "jpg"), ((300, 120), "RGBA", "png")]
    for name, n in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            size, mode, ext = kinds[i % len(kinds)]
            _stroke(size, mode, light=i % 2 == 0).save(root / name / f"{i}.{ext}")
    return root


def _holder_key(tmp_path):
    """One holder's key dir (X25519/Ed25519 + data key), as `fedvault keys` makes it."""
    from common.federation_keys import client_dir, provision

    return client_dir(provision(tmp_path / "keys", 1), 0)


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "common.ops.cli", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)  # fmt: skip


# --- image folders ---------------------------------------------------------------------------
def test_image_folder_is_read_in_the_declared_class_order(tmp_path):
    root = _image_folder(tmp_path / "mine", {"dog": 3, "bird": 2})  # no cat: its own mix
    images, labels = read_image_folder(root, CLASSES)
    assert images.dtype == torch.uint8 and images.shape == (5, 28, 28)
    # labels index the operator's list (cat=0, dog=1, bird=2), not the sorted folder names
    assert sorted(labels.tolist()) == [1, 1, 1, 2, 2]
    assert class_counts(labels, CLASSES) == {"cat": 0, "dog": 3, "bird": 2}
    assert all(img.max() == 255 for img in images)  # every one converted to white ink on black


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("unreadable", r"dog/1\.png: cannot read as an image .*fix or remove the file"),
        ("empty-class", r"Found no valid file for the classes bird.*Put at least one image"),
        ("undeclared", r"mine/lion: label 'lion' is not one of the federation's classes"),
        ("no-classes", r"Couldn't find any class folder"),
        ("missing", r"not found or not a folder"),
    ],
)
def test_bad_image_folders_are_one_line_naming_the_file(tmp_path, damage, message):
    root = _image_folder(tmp_path / "mine", {"dog": 2, "cat": 1})
    if damage == "unreadable":
        (root / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    elif damage == "empty-class":
        (root / "bird").mkdir()
    elif damage == "undeclared":
        _image_folder(root, {"lion": 1})
    elif damage == "no-classes":
        root = tmp_path / "flat"
        root.mkdir()
        _stroke((28, 28), "L", light=False).save(root / "0.png")
    else:
        root = tmp_path / "nowhere"
    with pytest.raises(DataError, match=message) as err:
        read_image_folder(root, CLASSES)
    assert "\n" not in str(err.value)


# --- text files ------------------------------------------------------------------------------
def test_csv_by_column_name_and_tab_lines(tmp_path):
    csv_file = tmp_path / "notes.csv"
    csv_file.write_text('id,text,label\n1,"a cat, sleeping",cat\n2,loud bark,dog\n3,tweet,bird\n',
                        encoding="utf-8")  # fmt: skip
    texts, labels = read_text_file(csv_file, CLASSES)
    assert texts == ["a cat, sleeping", "loud bark", "tweet"] and labels.tolist() == [0, 1, 2]
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("kind;words\n", encoding="utf-8")
    renamed.write_text("kind,words\ndog,woof\n", encoding="utf-8")
    texts, labels = read_text_file(renamed, CLASSES, label_column="kind", text_column="words")
    assert texts == ["woof"] and labels.tolist() == [1]
    tsv = tmp_path / "notes.tsv"
    tsv.write_text("dog\twoof woof\n\nbird\tchirp\n", encoding="utf-8")
    texts, labels = read_text_file(tsv, CLASSES)
    assert texts == ["woof woof", "chirp"] and labels.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", b"label,body\ncat,meow\n", r"a\.csv: no column 'text' in the header"),
        ("b.csv", b"label,text\ncat,meow\nlion,roar\n", r"b\.csv:3: label 'lion' is not one"),
        ("c.tsv", b"cat\tmeow\nlion\troar\n", r"c\.tsv:2: label 'lion' is not one"),
        ("d.tsv", "cat\tmiaou é\n".encode("latin-1"), r"d\.tsv: not UTF-8 text .*re-save"),
        ("e.tsv", b"cat meow without a tab\n", r"e\.tsv:1: expected 'label<TAB>text'"),
        ("f.tsv", b"\n\n", r"f\.tsv holds no records"),
        ("g.csv", b"label,text\ncat,\n", r"g\.csv:2: empty text"),
    ],
)
def test_bad_text_files_are_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_text_file(path, CLASSES)
    assert "\n" not in str(err.value)


def test_a_text_share_trains_a_text_model(tmp_path):
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("".join(f"{c}\t{c} number {i}\n" for i in range(5) for c in CLASSES))
    share = holder_share("text-file", tsv, CLASSES, 0, 1)
    part = partition_from_raw(share, 64)
    assert part.classes == CLASSES and len(part.train) == 15 and len(part.test) == 0
    assert part.train.tensors[0].shape == (15, 64)


# --- the run config declares the classes and the server's held-out set -----------------------
def test_run_config_declares_classes_and_test_data(tmp_path):
    test_folder = _image_folder(tmp_path / "held-out", {"cat": 2, "dog": 1, "bird": 1})
    cfg = RunConfig.from_mapping({"dataset": "image-folder", "classes": "cat, dog,bird",
                                  "test-data": str(test_folder)})  # fmt: skip
    assert cfg.declared_classes == CLASSES
    raw = load_raw_cached(DataSpec.from_config(cfg))
    assert raw.classes == CLASSES and len(raw.test_y) == 4 and len(raw.train_y) == 0
    for bad, message in [
        ({"dataset": "image-folder", "test-data": "t"}, "needs classes"),
        ({"dataset": "text-file", "classes": "a,b"}, "needs test-data"),
        ({"dataset": "digits", "classes": "a,b"}, "digits brings its own classes"),
        ({"dataset": "text-file", "classes": "a,,b", "test-data": "t"}, "non-empty class names"),
        ({"dataset": "text-file", "classes": "a,b,a", "test-data": "t"}, r"names \['a'\] more"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_mapping(bad)


# --- `fedvault data prepare` for one holder ---------------------------------------------------
def test_data_prepare_encrypts_one_holders_folder_and_prints_counts(tmp_path):
    from common.data import encrypted
    from common.federation_keys import load_own

    key = _holder_key(tmp_path)
    root = _image_folder(tmp_path / "mine", {"dog": 3, "bird": 1})
    proc = _run_cli("data", "prepare", "--dataset", "image-folder", "--data-dir", str(root),
                    "--classes", "cat,dog,bird", "--partition", "1", "--clients", "2",
                    "--key", str(key), "--out", str(tmp_path / "enc"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 records (these counts stay on this machine)" in proc.stdout
    assert [line.split() for line in proc.stdout.splitlines()[1:4]] == [
        ["cat", "0"], ["dog", "3"], ["bird", "1"],
    ]  # fmt: skip
    part = encrypted.load(tmp_path / "enc", 1, load_own(key), 64)
    assert part.classes == CLASSES and sorted(part.train.tensors[1].tolist()) == [1, 1, 1, 2]
    # the plaintext images are nowhere in the container
    sealed = (tmp_path / "enc" / "partition-1.fvd").read_bytes()
    assert part.train.tensors[0].numel() > 0 and b"PNG" not in sealed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "cat,dog"], "label 'bird' is not one of the federation's classes"),
        ([], "needs --classes"),
    ],
)
def test_data_prepare_refuses_bad_data_in_one_line_and_writes_nothing(tmp_path, extra, message):
    key = _holder_key(tmp_path)
    root = _image_folder(tmp_path / "mine", {"dog": 1, "bird": 1})
    proc = _run_cli("data", "prepare", "--dataset", "image-folder", "--data-dir", str(root),
                    "--partition", "0", "--clients", "1", "--key", str(key),
                    "--out", str(tmp_path / "enc"), *extra)  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fedvault: error: ") and message in line
    assert not (tmp_path / "enc").exists()


def test_the_client_refuses_a_share_prepared_for_other_classes(tmp_path):
    """The run config (the server's) says the classes are cat,dog,bird in another order: the
    holder's labels would mean other classes, so its ClientApp refuses to train."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from client.app import app
    from common import protocol as P
    from common.data.encrypted import write_share
    from common.federation_keys import client_dir, load_own, provision
    from common.models import build_model

    keys = provision(tmp_path / "keys", 1)
    root = _image_folder(tmp_path / "mine", {"dog": 2, "bird": 2})
    share = holder_share("image-folder", root, CLASSES, 0, 1)
    write_share(tmp_path / "enc", load_own(client_dir(keys, 0)), share)
    run_config = {"dataset": "image-folder", "classes": "dog,cat,bird",
                  "test-data": str(root)}  # fmt: skip
    node_config = {"partition-id": 0, "num-partitions": 1, "key-dir": str(client_dir(keys, 0)),
                   "encrypted-data-dir": str(tmp_path / "enc")}  # fmt: skip
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=run_config)  # fmt: skip
    content = RecordDict({P.ARRAYS: ArrayRecord(build_model("lenet5", 3).state_dict()),
                          P.CONFIG: ConfigRecord({"server-round": 1})})  # fmt: skip
    reply = app(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)
    refusal = reply.content[P.REFUSAL]
    assert refusal["code"] == P.DATA_UNUSABLE
    assert "prepared for classes ['cat', 'dog', 'bird'], the run declares ['dog', 'cat'" in (
        refusal["reason"]
    )


def test_demo_folders_give_holders_their_own_label_mix(tmp_path):
    from common.ops.demo_data import write_demo_folders

    written = write_demo_folders(tmp_path, 2, seed=1, alpha=0.3)
    c0, c1 = (written[tmp_path / f"client-{i}"] for i in (0, 1))
    assert c0 != c1 and sum(c0.values()) + sum(c1.values()) > 1000
    digits = tuple(str(d) for d in range(10))
    images, labels = read_image_folder(tmp_path / "client-0", digits)
    assert class_counts(labels, digits) == c0 and len(images) == sum(c0.values())
    assert sum(written[tmp_path / "test"].values()) == 360
