"""A data holder's own records: an image folder or a text file, labelled with the
federation's declared classes.

Two sources, read with the readers that already exist for them:

* ``image-folder`` -- torchvision's ``ImageFolder`` layout, one sub-folder per class
  (``<root>/<class>/<any name>.png|jpg|…``), any size or colour; every image is converted
  once to LeNet-5's 28×28 input by :func:`common.data.images.load_image`, as ``predict`` does.
* ``text-file`` -- a ``.csv`` with a header naming a label and a text column (``label`` and
  ``text`` unless told otherwise; read by :mod:`csv`), or any other file as one
  ``label<TAB>text`` record a line (the SMS Spam Collection's format), UTF-8.

The class list is the operator's (run config ``classes``), never collected from the holders:
a holder's label outside it is refused with one line naming the label and the file, so no
holder's label set is ever revealed to the others or to the server. Labels are indices into
that list, so every holder's model output means the same class.

Where a source is found: a holder preparing its own data names its folder or file directly
(``fedvault data prepare --data-dir``); a simulation keeps one holder's data per client at
``<data-dir>/client-<i>`` (a folder, or ``client-<i>.csv`` / ``.tsv`` / ``.txt``); the server's
held-out set is run config ``test-data``, a folder or file of the same kind.

What is wrong with a holder's records is said in one line that names the file, raised as
:class:`HolderDataError`: its text is derived from private data, so it stays with the holder.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.config import OWN_DATA_SOURCES
from common.data.images import image_error, load_image
from common.data.sources import DataError

log = logging.getLogger("fedvault.data")


class HolderDataError(DataError):
    """A holder's own records cannot be used. The message quotes them (a label, a line, a
    file name inside the holder's folder): it is for the holder's eyes, and a ClientApp
    sends the server only :attr:`PUBLIC_REASON`."""

    PUBLIC_REASON = (
        "this holder's own data is unusable; the holder's log names the file and the fix "
        "(the details stay on the holder's machine)"
    )

TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
LABEL_COLUMN, TEXT_COLUMN = "label", "text"


def read_source(
    source: str,
    path: Path,
    classes: Sequence[str],
    *,
    label_column: str = LABEL_COLUMN,
    text_column: str = TEXT_COLUMN,
) -> tuple[torch.Tensor | list[str], np.ndarray]:
    """``(inputs, labels)`` of one holder's folder or file (labels index ``classes``)."""
    if source == "image-folder":
        return read_image_folder(path, classes)
    if source == "text-file":
        return read_text_file(path, classes, label_column=label_column, text_column=text_column)
    raise HolderDataError(f"unknown data source {source!r}: use one of {list(OWN_DATA_SOURCES)}")


def read_image_folder(root: Path, classes: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Every image under ``root/<class>/`` as uint8 ``N×28×28``, and its class index."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise HolderDataError(
            f"image folder {root} not found or not a folder: point data-dir at a folder "
            "with one sub-folder per class"
        )
    try:
        folder = ImageFolder(str(root), loader=load_image)
    except FileNotFoundError as err:  # no class folder, or an empty one
        raise HolderDataError(
            f"image folder {root}: {err} Put at least one image in every class folder "
            "(or remove the empty one)"
        ) from None
    index = {name: i for i, name in enumerate(classes)}
    for name in folder.classes:
        if name not in index:
            raise HolderDataError(
                f"{root / name}: label {name!r} is not one of the federation's classes "
                f"{list(classes)}: move these images out, or ask the operator to declare it"
            )
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for file, folder_index in tqdm(folder.samples, desc=f"reading {root.name}", unit="image",
                                   disable=len(folder.samples) < 500):  # fmt: skip
        try:
            images.append(load_image(file))
        except Exception as err:  # PIL raises OSError, ValueError, DecompressionBomb...
            raise HolderDataError(f"{image_error(file, err)}: fix or remove the file") from None
        labels.append(index[folder.classes[folder_index]])
    _log_counts(root, labels, classes)
    return torch.stack(images), np.asarray(labels, dtype=np.int64)


def read_text_file(
    path: Path,
    classes: Sequence[str],
    *,
    label_column: str = LABEL_COLUMN,
    text_column: str = TEXT_COLUMN,
) -> tuple[list[str], np.ndarray]:
    """A ``.csv`` with a header (by column name), else ``label<TAB>text`` lines."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise HolderDataError(f"text file {path} not found: fix data-dir (or test-data)") from None
    except IsADirectoryError:
        raise HolderDataError(
            f"{path} is a folder: a text-file source is one .csv or label<TAB>text file"
        ) from None
    except UnicodeDecodeError as err:
        raise HolderDataError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}): re-save it as UTF-8"
        ) from None
    if path.suffix.lower() == ".csv":
        records = _csv_records(path, content, label_column, text_column)
    else:
        records = _tab_records(path, content)
    index = {name: i for i, name in enumerate(classes)}
    texts: list[str] = []
    labels: list[int] = []
    for line_no, label, text in records:
        if label not in index:
            raise HolderDataError(
                f"{path}:{line_no}: label {label!r} is not one of the federation's classes "
                f"{list(classes)}: fix the record, or ask the operator to declare it"
            )
        if not text.strip():
            raise HolderDataError(f"{path}:{line_no}: empty text: fix or remove the record")
        texts.append(text)
        labels.append(index[label])
    if not texts:
        raise HolderDataError(f"text file {path} holds no records: add some, or fix the path")
    _log_counts(path, labels, classes)
    return texts, np.asarray(labels, dtype=np.int64)


def _csv_records(
    path: Path, content: str, label_column: str, text_column: str
) -> list[tuple[int, str, str]]:
    reader = csv.DictReader(content.splitlines())
    header = reader.fieldnames or []
    for column in (label_column, text_column):
        if column not in header:
            raise HolderDataError(
                f"{path}: no column {column!r} in the header {header}: name the columns "
                f"{label_column!r} and {text_column!r} (or pass --label-column/--text-column)"
            )
    return [
        (line_no, (row[label_column] or "").strip(), row[text_column] or "")
        for line_no, row in enumerate(reader, start=2)
    ]


def _tab_records(path: Path, content: str) -> list[tuple[int, str, str]]:
    records = []
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep:
            raise HolderDataError(
                f"{path}:{line_no}: expected 'label<TAB>text' (or name the file .csv with a header)"
            )
        records.append((line_no, label.strip(), text))
    return records


def class_counts(labels: Sequence[int] | np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """Records per class, every declared class included (for the holder's eyes only)."""
    counts = Counter(int(y) for y in labels)
    return {name: counts.get(i, 0) for i, name in enumerate(classes)}


def _log_counts(where: Path, labels: list[int], classes: Sequence[str]) -> None:
    # DEBUG: counts per class are private; `fedvault data prepare` prints them to the holder
    log.debug("%s: %d records, per class %s", where, len(labels), class_counts(labels, classes))


def holder_path(data_dir: Path, partition_id: int, source: str) -> Path:
    """Client ``partition_id``'s own data in a simulation: ``<data-dir>/client-<i>`` (a
    folder; for text, the first of ``client-<i>.csv``/``.tsv``/``.txt`` present)."""
    base = data_dir / f"client-{partition_id}"
    if OWN_DATA_SOURCES[source] == "image":
        return base
    for suffix in TEXT_SUFFIXES:
        if base.with_suffix(suffix).is_file():
            return base.with_suffix(suffix)
    raise HolderDataError(
        f"client {partition_id}'s text file not found (looked for {base}.csv, .tsv, .txt): "
        "put one file per client in data-dir"
    )
