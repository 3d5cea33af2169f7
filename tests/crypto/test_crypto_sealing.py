"""Sealed (encrypted + signed) and signed messages: round trips, replay, tampering, wrong keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.crypto.errors import CryptoError, IntegrityError, MalformedFileError
from common.crypto.keyids import key_id_to_bytes
from common.crypto.keys import Identity, init_identity
from common.crypto.sealing import (
    canonical_context,
    message_info,
    open_sealed,
    seal,
    sign,
    verify,
)

CTX = {"run_id": "run-7", "round": 3, "node_id": 1234567890123, "partition_id": 0, "kind": "fit"}
UPDATE = b"model update bytes \x00\x01\x02" * 100


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    root: Path = tmp_path_factory.mktemp("keys")
    return {
        "server": init_identity(root / "server", "server", "server"),
        "server2": init_identity(root / "server2", "server", "server2"),
        "c0": init_identity(root / "c0", "client", "c0"),
        "c1": init_identity(root / "c1", "client", "c1"),
    }


def sealed(parties: dict[str, Identity], payload: bytes = UPDATE, ctx: dict | None = None) -> bytes:
    return seal(payload, parties["c0"], parties["server"].public, ctx or CTX)


def open_as_server(parties: dict[str, Identity], blob: bytes, ctx: dict | None = None) -> bytes:
    return open_sealed(blob, parties["server"], parties["c0"].public, ctx or CTX)


@pytest.mark.parametrize("payload", [b"", b"x", UPDATE, bytes(1 << 20)])
def test_seal_round_trip(parties: dict[str, Identity], payload: bytes) -> None:
    blob = sealed(parties, payload)
    assert open_as_server(parties, blob) == payload
    if len(payload) > 16:
        assert payload[:64] not in blob  # actually encrypted


def test_sealing_is_randomized(parties: dict[str, Identity]) -> None:
    assert sealed(parties) != sealed(parties)


def test_context_key_order_does_not_matter(parties: dict[str, Identity]) -> None:
    reordered = dict(reversed(list(CTX.items())))
    assert open_as_server(parties, sealed(parties), reordered) == UPDATE


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"round": 4}, "round"),
        ({"node_id": 42}, "node_id"),
        ({"kind": "evaluate"}, "kind"),
        ({"run_id": "run-8"}, "run_id"),
        ({"partition_id": 1}, "partition_id"),
        ({"extra": "x"}, "extra"),
    ],
)
def test_replay_into_another_context_is_rejected(
    parties: dict[str, Identity], change: dict, field: str
) -> None:
    blob = sealed(parties)
    with pytest.raises(IntegrityError, match="replayed or misrouted") as info:
        open_as_server(parties, blob, {**CTX, **change})
    assert field in str(info.value) and "\n" not in str(info.value)


def test_missing_context_field_is_rejected(parties: dict[str, Identity]) -> None:
    ctx = {k: v for k, v in CTX.items() if k != "partition_id"}
    with pytest.raises(IntegrityError, match="partition_id"):
        open_as_server(parties, sealed(parties), ctx)


def test_altered_ciphertext_is_rejected(parties: dict[str, Identity]) -> None:
    blob = bytearray(sealed(parties))
    blob[len(blob) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="signature check failed"):
        open_as_server(parties, bytes(blob))


def test_every_byte_of_a_sealed_message_is_protected(parties: dict[str, Identity]) -> None:
    blob = sealed(parties, b"tiny update")
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x40
        with pytest.raises(IntegrityError):
            open_as_server(parties, bytes(tampered))


def test_truncated_message_is_rejected(parties: dict[str, Identity]) -> None:
    blob = sealed(parties)
    for keep in (0, 10, 40, len(blob) - 64, len(blob) - 1):
        with pytest.raises(IntegrityError):
            open_as_server(parties, blob[:keep])
    with pytest.raises(MalformedFileError):
        open_as_server(parties, b"garbage" * 20)


def test_wrong_sender_is_rejected(parties: dict[str, Identity]) -> None:
    blob = sealed(parties)
    with pytest.raises(IntegrityError, match="unknown sender key id") as info:
        open_sealed(blob, parties["server"], parties["c1"].public, CTX)
    assert parties["c0"].ids.ed25519 in str(info.value)


def test_resigned_by_another_client_is_rejected(parties: dict[str, Identity]) -> None:
    """c1 takes c0's update, claims it as its own and re-signs it: the AEAD binds the sender."""
    c0_blob = sealed(parties)
    body = bytearray(c0_blob[:-64])
    body[7:15] = key_id_to_bytes(parties["c1"].ids.ed25519)
    signature = parties["c1"].ed25519_private.sign(b"fedvault message v1\x00" + bytes(body))
    with pytest.raises(IntegrityError, match="decryption failed"):
        open_sealed(bytes(body) + signature, parties["server"], parties["c1"].public, CTX)


def test_wrong_recipient_is_rejected(parties: dict[str, Identity]) -> None:
    blob = sealed(parties)
    with pytest.raises(IntegrityError, match="recipient key id"):
        open_sealed(blob, parties["server2"], parties["c0"].public, CTX)


def test_sign_and_verify(parties: dict[str, Identity]) -> None:
    server = parties["server"]
    blob = sign(b"global model", server, {**CTX, "kind": "global"})
    assert b"global model" in blob  # signed, not encrypted
    assert verify(blob, server.public, {**CTX, "kind": "global"}) == b"global model"
    with pytest.raises(IntegrityError, match="replayed or misrouted"):
        verify(blob, server.public, {**CTX, "kind": "global", "round": 9})
    with pytest.raises(IntegrityError, match="unknown sender"):
        verify(blob, parties["server2"].public, {**CTX, "kind": "global"})
    tampered = blob.replace(b"global model", b"global m0del")
    with pytest.raises(IntegrityError, match="signature check failed"):
        verify(tampered, server.public, {**CTX, "kind": "global"})


def test_sealed_and_signed_are_not_interchangeable(parties: dict[str, Identity]) -> None:
    with pytest.raises(IntegrityError, match="open_sealed"):
        verify(sealed(parties), parties["c0"].public, CTX)
    signed = sign(UPDATE, parties["c0"], CTX)
    with pytest.raises(IntegrityError, match="verify"):
        open_as_server(parties, signed)


def test_message_info_is_readable_before_opening(parties: dict[str, Identity]) -> None:
    info = message_info(sealed(parties))
    assert info.kind == "sealed"
    assert info.sender_key_id == parties["c0"].ids.ed25519
    assert info.recipient_key_id == parties["server"].ids.x25519
    assert info.context == CTX


@pytest.mark.parametrize("bad", [{"round": True}, {"lr": 0.1}, {"x": None}, {"x": [1]}, {1: "a"}])
def test_context_must_be_flat_str_or_int(bad: dict) -> None:
    with pytest.raises(TypeError):
        canonical_context(bad)


def test_errors_are_crypto_errors(parties: dict[str, Identity]) -> None:
    with pytest.raises(CryptoError):
        open_as_server(parties, sealed(parties), {**CTX, "round": 0})
