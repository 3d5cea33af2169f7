"""Throughput of the data container against raw AES-GCM, for ``benchmarks/`` to report.

Three baselines, because on many machines (VMs especially) writing a large *fresh* output buffer
costs more than the cipher itself, and a single "raw" number would hide where time goes:

* ``raw_*``: ``AESGCM.encrypt``/``decrypt`` over 64 KiB chunks, output discarded right away
  (stays in cache): the cipher's own speed on one core.
* ``raw_retained_*``: the same, but every chunk's output is written into one preallocated
  contiguous buffer -- the least any API that returns the whole result in memory must pay.
* ``container_*``: :func:`encrypt_bytes` / :func:`decrypt_bytes` (return immutable ``bytes``,
  so one more copy than ``raw_retained``); ``container_stream_*``: :func:`encrypt_stream` /
  :func:`decrypt_stream` from an in-memory source into a discarding sink (bounded memory).

All single-threaded (one core). Best of ``repeat`` runs, in MB/s (10^6 bytes per second).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.crypto.container import (
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
)
from common.crypto.keyids import data_key_id

__all__ = ["measure"]

log = logging.getLogger(__name__)


class _NullSink(io.RawIOBase):
    """A writable stream that drops everything (so the sink's memory is not what we measure)."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(memoryview(data))


def _best_rate(func: Callable[[], object], nbytes: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
        del result
    return nbytes / best / 1e6


def measure(mb: int = 64, repeat: int = 3) -> dict[str, Any]:
    """Measure MB/s of raw AES-256-GCM and of the FVD1 container on ``mb`` MiB of random data."""
    if mb < 1:
        raise ValueError("mb must be >= 1")
    size = mb * 1024 * 1024
    chunk = DEFAULT_CHUNK_SIZE
    data = os.urandom(size)
    view = memoryview(data)
    aead = AESGCM(AESGCM.generate_key(256))
    nonce = os.urandom(12)  # benchmark only: the container never reuses a nonce under one key
    aad = os.urandom(57)
    offsets = range(0, size, chunk)
    sealed_chunks = [aead.encrypt(nonce, view[i : i + chunk], aad) for i in offsets]

    def raw_encrypt() -> None:
        for i in offsets:
            aead.encrypt(nonce, view[i : i + chunk], aad)

    def raw_decrypt() -> None:
        for ct in sealed_chunks:
            aead.decrypt(nonce, ct, aad)

    def raw_retained_encrypt() -> bytearray:
        out = bytearray(size + len(offsets) * TAG_SIZE)
        dst, pos = memoryview(out), 0
        for i in offsets:
            end = pos + min(chunk, size - i) + TAG_SIZE
            aead.encrypt_into(nonce, view[i : i + chunk], aad, dst[pos:end])
            pos = end
        dst.release()
        return out

    def raw_retained_decrypt() -> bytearray:
        out = bytearray(size)
        dst, pos = memoryview(out), 0
        for ct in sealed_chunks:
            end = pos + len(ct) - TAG_SIZE
            aead.decrypt_into(nonce, ct, aad, dst[pos:end])
            pos = end
        dst.release()
        return out

    key = AESGCM.generate_key(256)
    key_id = data_key_id(key)
    blob = encrypt_bytes(data, key, key_id, chunk)

    results: dict[str, Any] = {"mb": mb, "chunk_size": chunk, "repeat": repeat}
    results["raw_encrypt_mb_s"] = _best_rate(raw_encrypt, size, repeat)
    results["raw_decrypt_mb_s"] = _best_rate(raw_decrypt, size, repeat)
    results["raw_retained_encrypt_mb_s"] = _best_rate(raw_retained_encrypt, size, repeat)
    results["raw_retained_decrypt_mb_s"] = _best_rate(raw_retained_decrypt, size, repeat)
    results["container_encrypt_mb_s"] = _best_rate(
        lambda: encrypt_bytes(data, key, key_id, chunk), size, repeat
    )
    results["container_decrypt_mb_s"] = _best_rate(
        lambda: decrypt_bytes(blob, key, key_id), size, repeat
    )
    results["container_stream_encrypt_mb_s"] = _best_rate(
        lambda: encrypt_stream(io.BytesIO(data), _NullSink(), key, key_id, chunk), size, repeat
    )
    results["container_stream_decrypt_mb_s"] = _best_rate(
        lambda: decrypt_stream(io.BytesIO(blob), _NullSink(), key, key_id), size, repeat
    )
    for op in ("encrypt", "decrypt"):
        raw = results[f"raw_{op}_mb_s"]
        results[f"container_{op}_vs_raw"] = results[f"container_{op}_mb_s"] / raw
        results[f"container_{op}_vs_raw_retained"] = (
            results[f"container_{op}_mb_s"] / results[f"raw_retained_{op}_mb_s"]
        )
        results[f"container_stream_{op}_vs_raw"] = results[f"container_stream_{op}_mb_s"] / raw
    log.info("crypto throughput: %s", results)
    return results
