"""FVD1 container: round trips at chunk edges, and every class of tampering is detected."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.crypto.container import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    decrypt_bytes,
    decrypt_file,
    decrypt_to_memory,
    encrypt_bytes,
    encrypt_file,
    encrypt_stream,
    iter_decrypt,
    read_header,
)
from common.crypto.errors import CryptoError, IntegrityError, MalformedFileError, WrongKeyError
from common.crypto.keyids import data_key_id

KEY = bytes(range(32))
KID = data_key_id(KEY)
OTHER_KEY = bytes(range(1, 33))
OTHER_KID = data_key_id(OTHER_KEY)
SMALL = 16  # tiny chunks make multi-chunk files out of a few bytes


def payload(n: int) -> bytes:
    return os.urandom(n)


def segments(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split a container into its header and its chunk segments (ciphertext + tag)."""
    seg = read_header(blob).chunk_size + TAG_SIZE
    body = blob[HEADER_SIZE:]
    return blob[:HEADER_SIZE], [body[i : i + seg] for i in range(0, len(body), seg)]


def flip(blob: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(blob)
    out[index] ^= mask
    return bytes(out)


# Every decryption entry point must reject the same things; the tamper tests run through all.
Decrypt = Callable[[bytes], bytes]


@pytest.fixture(params=["bytes", "memory", "file", "stream"])
def decrypt(request: pytest.FixtureRequest, tmp_path: Path) -> Decrypt:
    mode = request.param

    def run(blob: bytes, key: bytes = KEY, kid: str = KID) -> bytes:
        if mode == "bytes":
            return decrypt_bytes(blob, key, kid)
        src = tmp_path / "in.fvd"
        src.write_bytes(blob)
        if mode == "memory":
            before = sorted(os.listdir(tmp_path))
            try:
                return decrypt_to_memory(src, key, kid)
            finally:
                assert sorted(os.listdir(tmp_path)) == before  # nothing written to disk
        if mode == "file":
            out = tmp_path / "out.bin"
            out.unlink(missing_ok=True)
            try:
                decrypt_file(src, out, key, kid)
            except CryptoError:
                # No partial plaintext and no temp file left behind.
                assert sorted(os.listdir(tmp_path)) == ["in.fvd"]
                raise
            return out.read_bytes()
        return b"".join(iter_decrypt(io.BytesIO(blob), key, kid))

    return run


# --------------------------------------------------------------------------------------------
# round trips


def edge_sizes(chunk: int) -> list[int]:
    return [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 5]


@pytest.mark.parametrize("chunk", [SMALL, 1000])
@pytest.mark.parametrize("index", range(7))
def test_round_trip_at_chunk_edges(decrypt: Decrypt, chunk: int, index: int) -> None:
    size = edge_sizes(chunk)[index]
    data = payload(size)
    blob = encrypt_bytes(data, KEY, KID, chunk_size=chunk)
    chunks = max(1, -(-size // chunk))
    assert len(blob) == HEADER_SIZE + size + chunks * TAG_SIZE
    assert decrypt(blob) == data


@pytest.mark.parametrize("size", edge_sizes(DEFAULT_CHUNK_SIZE))
def test_round_trip_default_chunk(size: int) -> None:
    data = payload(size)
    blob = encrypt_bytes(data, KEY, KID)
    assert read_header(blob).chunk_size == DEFAULT_CHUNK_SIZE
    assert decrypt_bytes(blob, KEY, KID) == data


def test_empty_is_one_empty_final_chunk() -> None:
    blob = encrypt_bytes(b"", KEY, KID)
    assert len(blob) == HEADER_SIZE + TAG_SIZE
    assert decrypt_bytes(blob, KEY, KID) == b""


def test_stream_and_bytes_produce_the_same_layout() -> None:
    for size in edge_sizes(SMALL):
        data = payload(size)
        out = io.BytesIO()
        assert encrypt_stream(io.BytesIO(data), out, KEY, KID, chunk_size=SMALL) == size
        streamed = out.getvalue()
        assert len(streamed) == len(encrypt_bytes(data, KEY, KID, chunk_size=SMALL))
        assert decrypt_bytes(streamed, KEY, KID) == data


def test_encryption_is_randomized() -> None:
    data = b"same plaintext" * 10
    a, b = encrypt_bytes(data, KEY, KID), encrypt_bytes(data, KEY, KID)
    assert a != b
    assert data not in a


def test_file_round_trip_modes_and_header(tmp_path: Path) -> None:
    src, enc, dec = tmp_path / "plain.bin", tmp_path / "data.fvd", tmp_path / "back.bin"
    data = payload(3 * DEFAULT_CHUNK_SIZE + 17)
    src.write_bytes(data)
    assert encrypt_file(src, enc, KEY, KID) == len(data)
    assert read_header(enc).key_id == KID
    assert decrypt_to_memory(enc, KEY, KID) == data
    assert decrypt_file(enc, dec, KEY, KID) == len(data)
    assert dec.read_bytes() == data
    assert stat.S_IMODE(dec.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "data.fvd", "plain.bin"]


def test_failed_decrypt_file_keeps_existing_output(tmp_path: Path) -> None:
    enc, out = tmp_path / "data.fvd", tmp_path / "out.bin"
    blob = encrypt_bytes(payload(100), KEY, KID, chunk_size=SMALL)
    enc.write_bytes(flip(blob, len(blob) - 1))
    out.write_bytes(b"previous content")
    with pytest.raises(IntegrityError):
        decrypt_file(enc, out, KEY, KID)
    assert out.read_bytes() == b"previous content"


def test_key_id_must_belong_to_key() -> None:
    with pytest.raises(ValueError, match="not the id of the data key"):
        encrypt_bytes(b"x", KEY, OTHER_KID)
    with pytest.raises(ValueError):
        decrypt_bytes(encrypt_bytes(b"x", KEY, KID), KEY, "not-a-key-id")


# --------------------------------------------------------------------------------------------
# tampering


@pytest.fixture
def multi() -> tuple[bytes, bytes]:
    """A 4-chunk file (16, 16, 16, 5 plaintext bytes) and its plaintext."""
    data = payload(3 * SMALL + 5)
    return encrypt_bytes(data, KEY, KID, chunk_size=SMALL), data


HEADER_FIELDS = {
    "magic": (0, MalformedFileError),
    "version": (4, MalformedFileError),
    "algorithm": (5, MalformedFileError),
    "chunk_size_low": (9, IntegrityError),
    "chunk_size_high": (6, MalformedFileError),
    "key_id": (10, WrongKeyError),
    "salt": (30, IntegrityError),
    "nonce_prefix": (56, IntegrityError),
}


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_flipped_bit_in_header(decrypt: Decrypt, multi: tuple[bytes, bytes], field: str) -> None:
    offset, error = HEADER_FIELDS[field]
    with pytest.raises(error) as info:
        decrypt(flip(multi[0], offset))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_bit_in_chunk(decrypt: Decrypt, multi: tuple[bytes, bytes], where: str) -> None:
    blob, _ = multi
    index = {"first": HEADER_SIZE, "middle": HEADER_SIZE + 40, "last": len(blob) - TAG_SIZE - 2}
    with pytest.raises(IntegrityError, match="failed authentication at chunk"):
        decrypt(flip(blob, index[where], 0x80))


def test_flipped_bit_in_tag(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    blob, _ = multi
    first_tag = HEADER_SIZE + SMALL  # chunk 0: 16 ciphertext bytes, then its tag
    for index in (first_tag, first_tag + TAG_SIZE - 1, len(blob) - 1):
        with pytest.raises(IntegrityError):
            decrypt(flip(blob, index))


def test_no_plaintext_released_for_a_bad_chunk(multi: tuple[bytes, bytes]) -> None:
    blob, data = multi
    bad = flip(blob, HEADER_SIZE + 2 * (SMALL + TAG_SIZE) + 3)  # inside chunk 3 of 4
    released: list[bytes] = []
    with pytest.raises(IntegrityError, match="chunk 3"):
        released.extend(iter_decrypt(io.BytesIO(bad), KEY, KID))
    assert b"".join(released) == data[: 2 * SMALL]  # only the two verified chunks before it


def test_truncated_mid_chunk(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    blob, _ = multi
    for cut in (1, 5, TAG_SIZE + 3, SMALL + TAG_SIZE + 7):
        with pytest.raises(IntegrityError):
            decrypt(blob[:-cut])


def test_truncated_at_chunk_boundary(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    header, segs = segments(multi[0])
    assert len(segs) == 4
    for keep in range(len(segs)):  # drop the final chunk, the last two, ... down to header only
        with pytest.raises(IntegrityError):
            decrypt(header + b"".join(segs[:keep]))


def test_truncated_inside_header(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    for keep in (0, 3, 4, 20, HEADER_SIZE - 1):
        with pytest.raises(IntegrityError):
            decrypt(multi[0][:keep])


def test_exact_multiple_dropping_final_full_chunk_fails(decrypt: Decrypt) -> None:
    blob = encrypt_bytes(payload(2 * SMALL), KEY, KID, chunk_size=SMALL)
    header, segs = segments(blob)
    assert [len(s) for s in segs] == [SMALL + TAG_SIZE] * 2
    with pytest.raises(IntegrityError):
        decrypt(header + segs[0])


def test_reordered_chunks(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    header, segs = segments(multi[0])
    with pytest.raises(IntegrityError):
        decrypt(header + segs[1] + segs[0] + segs[2] + segs[3])
    with pytest.raises(IntegrityError):
        decrypt(header + segs[0] + segs[0] + segs[2] + segs[3])


def test_chunk_spliced_from_other_file_same_key(
    decrypt: Decrypt, multi: tuple[bytes, bytes]
) -> None:
    header, segs = segments(multi[0])
    other_header, other_segs = segments(encrypt_bytes(payload(3 * SMALL + 5), KEY, KID, SMALL))
    with pytest.raises(IntegrityError):
        decrypt(header + segs[0] + other_segs[1] + segs[2] + segs[3])
    with pytest.raises(IntegrityError):  # other file's header on this file's chunks
        decrypt(other_header + b"".join(segs))


@pytest.mark.parametrize("extra", [b"\x00", b"x" * TAG_SIZE, b"y" * (SMALL + TAG_SIZE)])
def test_trailing_garbage(decrypt: Decrypt, multi: tuple[bytes, bytes], extra: bytes) -> None:
    with pytest.raises(IntegrityError):
        decrypt(multi[0] + extra)


def test_appended_copy_of_final_chunk(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    _, segs = segments(multi[0])
    with pytest.raises(IntegrityError):
        decrypt(multi[0] + segs[-1])


def test_wrong_data_key_names_both_ids(decrypt: Decrypt, multi: tuple[bytes, bytes]) -> None:
    with pytest.raises(WrongKeyError) as info:
        decrypt(multi[0], OTHER_KEY, OTHER_KID)
    message = str(info.value)
    assert KID in message and OTHER_KID in message and "--key" in message
    assert "\n" not in message


def test_wrong_key_under_forged_key_id_fails_authentication(
    decrypt: Decrypt, multi: tuple[bytes, bytes]
) -> None:
    # Rewrite the header's key id so the id check passes: the AEAD itself must still refuse.
    forged = bytearray(multi[0])
    forged[10:18] = bytes.fromhex(OTHER_KID)
    with pytest.raises(IntegrityError):
        decrypt(bytes(forged), OTHER_KEY, OTHER_KID)


def test_file_from_another_key_id_reports_path(tmp_path: Path) -> None:
    enc = tmp_path / "x.fvd"
    enc.write_bytes(encrypt_bytes(b"hello", OTHER_KEY, OTHER_KID))
    with pytest.raises(WrongKeyError, match=r"x\.fvd"):
        decrypt_to_memory(enc, KEY, KID, key_label="key dir 'keys/c0'")
    with pytest.raises(WrongKeyError, match="key dir 'keys/c0' has key id"):
        decrypt_file(enc, tmp_path / "out", KEY, KID, key_label="key dir 'keys/c0'")


def test_not_a_container() -> None:
    with pytest.raises(MalformedFileError, match="not a fedvault encrypted data file"):
        decrypt_bytes(b"PK\x03\x04 a zip file, say" * 4, KEY, KID)


def test_every_single_bit_flip_is_detected(multi: tuple[bytes, bytes]) -> None:
    blob, _ = multi
    for index in range(len(blob)):
        for bit in range(8):
            with pytest.raises((IntegrityError, WrongKeyError)):
                decrypt_bytes(flip(blob, index, 1 << bit), KEY, KID)


def test_every_truncation_and_deletion_is_detected(multi: tuple[bytes, bytes]) -> None:
    blob, _ = multi
    for length in range(len(blob)):
        with pytest.raises(CryptoError):
            decrypt_bytes(blob[:length], KEY, KID)
    for index in range(len(blob)):
        with pytest.raises(CryptoError):
            decrypt_bytes(blob[:index] + blob[index + 1 :], KEY, KID)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(min_size=0, max_size=5 * SMALL),
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    delta=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_change_is_detected(data: bytes, position: float, delta: int) -> None:
    blob = encrypt_bytes(data, KEY, KID, chunk_size=SMALL)
    index = int(position * len(blob))
    tampered = bytearray(blob)
    tampered[index] = (tampered[index] + delta) % 256
    with pytest.raises((IntegrityError, WrongKeyError)):
        decrypt_bytes(bytes(tampered), KEY, KID)
    with pytest.raises((IntegrityError, WrongKeyError)):
        b"".join(iter_decrypt(io.BytesIO(bytes(tampered)), KEY, KID))
    assert decrypt_bytes(blob, KEY, KID) == data
