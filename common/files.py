"""Files fedvault writes and reads: atomic writes with exact permissions, JSON objects, locks.

The one owner of how a file reaches disk, for everyone: key store, data container, the
holder's state and policy, the run directory (metrics, ledger, report), the federation bundle.

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
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "PRIVATE_MODE",
    "PUBLIC_MODE",
    "atomic_writer",
    "file_lock",
    "read_json_object",
    "write_file_atomic",
    "write_json_atomic",
]

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


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, *, mode: int = PUBLIC_MODE
) -> Path:
    """Write ``data`` as indented JSON (one trailing newline) atomically: readers see the old
    file or the new one, never half of one, also after a crash (fsync'ed)."""
    write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), mode=mode)
    return Path(path)


def read_json_object(
    path: str | os.PathLike[str], *, what: str, fix: str, error: type[Exception] = ValueError
) -> dict[str, Any]:
    """The JSON object in ``path``, or ``error`` with one line naming ``what`` and the file,
    why it is unusable (unreadable, not UTF-8, not JSON, not an object) and ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise error(f"{what} '{path}' cannot be read ({reason}): {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{what} '{path}' is not a JSON object: {fix}")
    return data


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder): one holder at a
    time across processes and threads; the kernel releases it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
