"""Atomic, permission-aware file writes shared by the key store and the data container.

Why atomic: a crash or a failed authentication half-way through must never leave a truncated key
or a partially decrypted data set where a later run would pick it up. Everything is written to a
temporary file in the *same* directory (so ``os.replace`` is a rename, never a copy) and only
renamed into place once it is complete and fsync'ed.

Why ``os.open`` with an explicit mode: ``open()`` creates files with ``0o666 & ~umask`` and only
then could we ``chmod`` them, leaving a window in which private key material is world-readable.
``os.open(..., 0o600)`` creates the file with the final mode from the start; ``fchmod`` then pins
the mode exactly even under an unusual umask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["PRIVATE_MODE", "PUBLIC_MODE", "atomic_writer", "write_file_atomic"]

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def _temp_path(path: Path) -> Path:
    # Dot-prefixed and random so it is hidden from directory listings and never collides.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = PRIVATE_MODE) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at ``path`` only if the ``with`` block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched (an existing
    file there keeps its old content).
    """
    target = Path(path)
    tmp = _temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def write_file_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE_MODE
) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode`` permissions."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)
    log.debug("wrote %s (%d bytes, mode %o)", path, len(data), mode)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform/filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
