"""Encrypted-at-rest data container (``.fvd`` files): chunked streaming AEAD, format ``FVD1``.

Why this design
---------------
A client's data set must stay encrypted on disk, be decryptable straight into memory for training,
and be rejected as a whole if *anything* about it was changed. One big AES-GCM message would need
the whole file in memory and can only authenticate at the very end; so, like Tink's
``AesGcmHkdfStreaming`` and age's STREAM, the plaintext is cut into chunks that are each sealed
with AES-256-GCM under a per-file key, and each chunk's nonce encodes its position and whether it
is the last one. That makes every attack on the *structure* an authentication failure:

* flipped bit anywhere in a chunk or tag             -> that chunk's tag fails
* flipped bit in the header                          -> the header is the associated data of every
                                                        chunk (or the file key derivation input)
* chunks reordered / duplicated                      -> the counter in the nonce differs
* chunk spliced in from another file (same data key) -> other file key (salt) and other header
* file truncated at a chunk boundary                 -> the new last chunk was sealed as non-last
* file truncated mid-chunk / bytes appended          -> chunk boundaries shift, a tag fails
* wrong data key                                     -> key id check, then every tag fails

Each chunk is authenticated *before* its plaintext is released: ``decrypt_bytes`` and
``decrypt_to_memory`` return nothing unless every chunk verified; ``iter_decrypt`` yields a chunk
only after its own tag verified (so earlier, verified chunks may have been consumed when a later
chunk fails -- callers who need all-or-nothing use the other functions); ``decrypt_file`` writes to
a temporary file that is deleted on failure and renamed into place only on success.

File key: derived, not wrapped
------------------------------
``file_key = HKDF-SHA256(ikm=data_key, salt=salt, info=b"fedvault fvd1 file key", length=32)``
with a fresh random 32-byte ``salt`` per file (Tink does the same). Deriving instead of wrapping
a random key under the data key means no wrapped-key blob or wrapping nonce to store and check,
and no birthday bound on random 96-bit GCM nonces under the long-lived data key: every file gets
its own AES key (collision chance ~2^-128 per pair of files), and within a file the nonces are
unique by construction (counter). The data key itself never encrypts anything directly.

Format, byte by byte (all integers big-endian)
----------------------------------------------
Header, 57 bytes::

    offset size  field
         0    4  magic          b"FVD1"
         4    1  version        1
         5    1  algorithm      1 = AES-256-GCM, HKDF-SHA256 file key, STREAM nonces, 16-byte tags
         6    4  chunk_size     plaintext bytes per non-final chunk (16 .. 16 MiB; default 65536)
        10    8  key_id         raw 8 bytes of the data key id (hex: see keyids.data_key_id)
        18   32  salt           random; HKDF salt for the per-file key
        50    7  nonce_prefix   random
        57

Then ``n >= 1`` chunks, each ``AES-256-GCM(file_key, nonce_i, plaintext_i, aad=header)``, i.e.
``len(plaintext_i)`` ciphertext bytes followed by a 16-byte tag, with::

    nonce_i = nonce_prefix (7) || uint32 i (4) || last (1: 0x01 for the final chunk, else 0x00)

Chunks ``0 .. n-2`` carry exactly ``chunk_size`` plaintext bytes; the final chunk carries
``1 .. chunk_size`` bytes, or 0 bytes only when the whole plaintext is empty (an empty plaintext
is exactly one empty final chunk: header + 16-byte tag). So a plaintext of exactly
``k * chunk_size`` bytes is ``k`` full chunks, the ``k``-th flagged final. A reader finds the final
chunk by position: it is the one that ends the file. At most 2^32 chunks per file.
Nothing may follow the final chunk; trailing bytes shift the chunk boundaries and fail a tag.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.files import PRIVATE_MODE, atomic_writer

from .errors import IntegrityError, MalformedFileError, WrongKeyError
from .keyids import DATA_KEY_BYTES, check_key_id, data_key_id, key_id_from_bytes

__all__ = [
    "ALGORITHM_AES256GCM_HKDF_STREAM",
    "DEFAULT_CHUNK_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "TAG_SIZE",
    "VERSION",
    "ContainerHeader",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_stream",
    "decrypt_to_memory",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_stream",
    "iter_decrypt",
    "read_header",
]

log = logging.getLogger(__name__)

MAGIC = b"FVD1"
VERSION = 1
ALGORITHM_AES256GCM_HKDF_STREAM = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_CHUNKS = 2**32
TAG_SIZE = 16
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7

_HEADER = struct.Struct(">4sBBI8s32s7s")
HEADER_SIZE = _HEADER.size  # 57
_NONCE = struct.Struct(">7sIB")
_HKDF_INFO = b"fedvault fvd1 file key"

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ContainerHeader:
    """The parsed (not yet authenticated) header; authenticity comes from the chunks' tags."""

    version: int
    algorithm: int
    chunk_size: int
    key_id: str
    salt: bytes
    nonce_prefix: bytes
    raw: bytes


# --------------------------------------------------------------------------------------------
# header and key handling


def _file_aead(data_key: bytes, salt: bytes) -> AESGCM:
    """The per-file AES-256-GCM instance; one per file, reused for every chunk (it is costly)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(bytes(data_key)))


def _check_key(data_key: Buffer, key_id: str) -> bytes:
    """Catch caller bugs early: the key id must be the id *of this key*, not of some other one."""
    key = bytes(data_key)
    if len(key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes, got {len(key)}")
    check_key_id(key_id)
    actual = data_key_id(key)
    if actual != key_id:
        raise ValueError(f"key_id {key_id} is not the id of the data key given ({actual})")
    return key


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return _NONCE.pack(prefix, index, 1 if last else 0)


def _new_header(key_id: str, chunk_size: int) -> ContainerHeader:
    if not isinstance(chunk_size, int) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size must be an int in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size!r}"
        )
    salt = secrets.token_bytes(SALT_SIZE)
    prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
    raw = _HEADER.pack(
        MAGIC,
        VERSION,
        ALGORITHM_AES256GCM_HKDF_STREAM,
        chunk_size,
        bytes.fromhex(key_id),
        salt,
        prefix,
    )
    return ContainerHeader(
        VERSION, ALGORITHM_AES256GCM_HKDF_STREAM, chunk_size, key_id, salt, prefix, raw
    )


def _parse_header(raw: Buffer, what: str) -> ContainerHeader:
    """Parse and sanity-check a header; raises MalformedFileError/IntegrityError with a fix."""
    raw = bytes(raw[:HEADER_SIZE])
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise MalformedFileError(
            f"{what} is not a fedvault encrypted data file (it does not start with {MAGIC!r}):"
            " pass a .fvd file written by fedvault's data encryption"
        )
    if len(raw) < HEADER_SIZE:
        raise IntegrityError(
            f"{what} is truncated inside its {HEADER_SIZE}-byte header ({len(raw)} bytes):"
            " restore it from a good copy or re-encrypt the source data"
        )
    _, version, algorithm, chunk_size, key_id, salt, prefix = _HEADER.unpack(raw)
    if version != VERSION:
        raise MalformedFileError(
            f"{what} uses container format version {version}, this fedvault reads version"
            f" {VERSION}: upgrade fedvault, or re-encrypt the data with this version"
        )
    if algorithm != ALGORITHM_AES256GCM_HKDF_STREAM:
        raise MalformedFileError(
            f"{what} names unknown algorithm id {algorithm} (this fedvault knows"
            f" {ALGORITHM_AES256GCM_HKDF_STREAM}): the header is corrupted or the file is from a"
            " newer fedvault; re-encrypt the source data"
        )
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise MalformedFileError(
            f"{what} declares chunk size {chunk_size}, outside [{MIN_CHUNK_SIZE},"
            f" {MAX_CHUNK_SIZE}]: the header is corrupted; restore the file from a good copy"
        )
    return ContainerHeader(
        version, algorithm, chunk_size, key_id_from_bytes(key_id), salt, prefix, raw
    )


def _open_header(
    raw: Buffer, data_key: bytes, key_id: str, what: str, key_label: str | None
) -> tuple[ContainerHeader, AESGCM]:
    header = _parse_header(raw, what)
    if header.key_id != key_id:
        holder = key_label or "the data key supplied"
        raise WrongKeyError(
            f"{what} was encrypted for data key id {header.key_id}, but {holder} has key id"
            f" {key_id}: pass the --key dir of the client that encrypted it"
        )
    return header, _file_aead(data_key, header.salt)


def _chunk_failure(what: str, index: int, count: int | None) -> IntegrityError:
    of = f" of {count}" if count is not None else ""
    return IntegrityError(
        f"{what} failed authentication at chunk {index + 1}{of}: it was altered, truncated,"
        " reordered or has bytes appended (or was made with another key under the same key id);"
        " restore it from a good copy or re-encrypt the source data"
    )


def _no_chunks(what: str) -> IntegrityError:
    return IntegrityError(
        f"{what} ends right after its header (no final chunk): it was truncated;"
        " restore it from a good copy or re-encrypt the source data"
    )


def _short_chunk(what: str, index: int) -> IntegrityError:
    return IntegrityError(
        f"{what} ends inside chunk {index + 1}, before its {TAG_SIZE}-byte tag: it was truncated;"
        " restore it from a good copy or re-encrypt the source data"
    )


def _as_bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _check_chunk_count(count: int) -> None:
    if count > MAX_CHUNKS:
        raise ValueError(
            f"plaintext needs {count} chunks, more than the format's {MAX_CHUNKS}:"
            " use a larger chunk_size"
        )


# --------------------------------------------------------------------------------------------
# in-memory API


def encrypt_bytes(
    data: Buffer, data_key: Buffer, key_id: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> bytes:
    """Encrypt ``data`` into one FVD1 container (see the module docstring for the format)."""
    key = _check_key(data_key, key_id)
    header = _new_header(key_id, chunk_size)
    aead = _file_aead(key, header.salt)
    src = _as_bytes_view(data)
    size = len(src)
    count = max(1, -(-size // chunk_size))
    _check_chunk_count(count)

    # One output buffer, each chunk sealed straight into its slot: no per-chunk allocations.
    out = bytearray(HEADER_SIZE + size + count * TAG_SIZE)
    dst = memoryview(out)
    dst[:HEADER_SIZE] = header.raw
    aad, prefix = header.raw, header.nonce_prefix
    pos_in, pos_out = 0, HEADER_SIZE
    for index in range(count):
        end_in = min(pos_in + chunk_size, size)
        end_out = pos_out + (end_in - pos_in) + TAG_SIZE
        aead.encrypt_into(
            _nonce(prefix, index, index == count - 1), src[pos_in:end_in], aad, dst[pos_out:end_out]
        )
        pos_in, pos_out = end_in, end_out
    dst.release()
    return bytes(out)


def decrypt_bytes(
    blob: Buffer,
    data_key: Buffer,
    key_id: str,
    *,
    source: str | None = None,
    key_label: str | None = None,
) -> bytes:
    """Decrypt a whole FVD1 container; returns the plaintext only if every chunk authenticates.

    ``source`` (e.g. a file name) and ``key_label`` (e.g. ``"key dir 'keys/c0'"``) only make
    error messages more useful.
    """
    what = source or "encrypted data"
    key = _check_key(data_key, key_id)
    view = _as_bytes_view(blob)
    header, aead = _open_header(view[:HEADER_SIZE], key, key_id, what, key_label)
    segment = header.chunk_size + TAG_SIZE
    body = len(view) - HEADER_SIZE
    if body == 0:
        raise _no_chunks(what)
    count = -(-body // segment)
    if body - (count - 1) * segment < TAG_SIZE:
        raise _short_chunk(what, count - 1)
    if count > MAX_CHUNKS:
        raise _chunk_failure(what, MAX_CHUNKS, count)

    out = bytearray(body - count * TAG_SIZE)
    dst = memoryview(out)
    aad, prefix = header.raw, header.nonce_prefix
    pos_in, pos_out = HEADER_SIZE, 0
    for index in range(count):
        end_in = min(pos_in + segment, len(view))
        end_out = pos_out + (end_in - pos_in) - TAG_SIZE
        try:
            aead.decrypt_into(
                _nonce(prefix, index, index == count - 1),
                view[pos_in:end_in],
                aad,
                dst[pos_out:end_out],
            )
        except InvalidTag:
            # decrypt_into may have written unauthenticated plaintext: wipe it before dropping.
            dst[:] = bytes(len(dst))
            raise _chunk_failure(what, index, count) from None
        pos_in, pos_out = end_in, end_out
    dst.release()
    return bytes(out)


def read_header(source: Buffer | str | os.PathLike[str]) -> ContainerHeader:
    """Parse the (unauthenticated) header of a container given as bytes or a path.

    Useful to tell *which* data key a file needs (``header.key_id``) before asking for it.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:
            return _parse_header(handle.read(HEADER_SIZE), f"data file '{source}'")
    return _parse_header(_as_bytes_view(source)[:HEADER_SIZE], "encrypted data")


# --------------------------------------------------------------------------------------------
# streaming API (bounded memory: about two chunks)


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Read up to ``size`` bytes, looping over short reads; fewer only at end of stream."""
    data = stream.read(size)
    if not data or len(data) == size:
        return data or b""
    parts, got = [data], len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    data_key: Buffer,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Encrypt everything readable from ``src`` into ``dst``; returns the plaintext size.

    Reads one chunk ahead, because a chunk can only be sealed once we know whether it is last.
    """
    key = _check_key(data_key, key_id)
    header = _new_header(key_id, chunk_size)
    aead = _file_aead(key, header.salt)
    aad, prefix = header.raw, header.nonce_prefix
    dst.write(header.raw)
    current = _read_full(src, chunk_size)
    index, total = 0, 0
    while True:
        following = _read_full(src, chunk_size) if len(current) == chunk_size else b""
        last = not following
        if index >= MAX_CHUNKS:
            _check_chunk_count(index + 1)
        dst.write(aead.encrypt(_nonce(prefix, index, last), current, aad))
        total += len(current)
        if last:
            return total
        current, index = following, index + 1


def iter_decrypt(
    src: BinaryIO,
    data_key: Buffer,
    key_id: str,
    *,
    source: str | None = None,
    key_label: str | None = None,
) -> Iterator[bytes]:
    """Yield the plaintext chunk by chunk, each only after its own tag verified.

    A failure raises at the affected chunk; chunks yielded before it were authentic but the
    stream as a whole is not, so callers must discard what they consumed when this raises.
    """
    what = source or "encrypted data"
    key = _check_key(data_key, key_id)
    header, aead = _open_header(_read_full(src, HEADER_SIZE), key, key_id, what, key_label)
    segment_size = header.chunk_size + TAG_SIZE
    aad, prefix = header.raw, header.nonce_prefix
    current = _read_full(src, segment_size)
    if not current:
        raise _no_chunks(what)
    index = 0
    while True:
        following = _read_full(src, segment_size) if len(current) == segment_size else b""
        last = not following
        if len(current) < TAG_SIZE:
            raise _short_chunk(what, index)
        if index >= MAX_CHUNKS:
            raise _chunk_failure(what, index, None)
        try:
            plain = aead.decrypt(_nonce(prefix, index, last), current, aad)
        except InvalidTag:
            raise _chunk_failure(what, index, None) from None
        yield plain
        if last:
            return
        current, index = following, index + 1


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    data_key: Buffer,
    key_id: str,
    *,
    source: str | None = None,
    key_label: str | None = None,
) -> int:
    """Decrypt ``src`` into ``dst`` chunk by chunk; returns the plaintext size.

    ``dst`` receives only authenticated chunks, but on failure it holds a *prefix* of the
    plaintext: give it a temporary destination (as :func:`decrypt_file` does).
    """
    total = 0
    for plain in iter_decrypt(src, data_key, key_id, source=source, key_label=key_label):
        dst.write(plain)
        total += len(plain)
    return total


# --------------------------------------------------------------------------------------------
# file API


def encrypt_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    data_key: Buffer,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Encrypt ``in_path`` to ``out_path`` (atomically, mode 0600); returns the plaintext size."""
    with open(in_path, "rb") as src, atomic_writer(out_path, PRIVATE_MODE) as dst:
        total = encrypt_stream(src, dst, data_key, key_id, chunk_size)
    log.info("encrypted %s -> %s (%d bytes, data key id %s)", in_path, out_path, total, key_id)
    return total


def decrypt_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    data_key: Buffer,
    key_id: str,
    *,
    key_label: str | None = None,
) -> int:
    """Decrypt ``in_path`` to ``out_path`` with bounded memory; returns the plaintext size.

    The plaintext goes to a 0600 temporary file next to ``out_path`` that is renamed into place
    only after the final chunk authenticated, and deleted otherwise, so ``out_path`` never holds
    unauthenticated or partial plaintext.
    """
    what = f"data file '{in_path}'"
    with open(in_path, "rb") as src, atomic_writer(out_path, PRIVATE_MODE) as dst:
        total = decrypt_stream(src, dst, data_key, key_id, source=what, key_label=key_label)
    log.info("decrypted %s -> %s (%d bytes)", in_path, out_path, total)
    return total


def decrypt_to_memory(
    path: str | os.PathLike[str],
    data_key: Buffer,
    key_id: str,
    *,
    key_label: str | None = None,
) -> bytes:
    """Decrypt a container file into memory, never writing plaintext to disk.

    Returns only after every chunk authenticated; peak memory is about twice the plaintext.
    """
    what = f"data file '{path}'"
    with open(Path(path), "rb") as src:
        chunks = list(iter_decrypt(src, data_key, key_id, source=what, key_label=key_label))
    data = b"".join(chunks)
    log.debug("decrypted %s in memory (%d bytes)", path, len(data))
    return data
