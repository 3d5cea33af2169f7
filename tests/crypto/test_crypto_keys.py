"""Key dirs: file modes, passphrases, no silent overwrite, stable and checked key ids."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from common.crypto.errors import (
    KeyExistsError,
    MalformedFileError,
    WrongKeyError,
    WrongPassphraseError,
)
from common.crypto.keyids import data_key_id, public_key_id
from common.crypto.keys import (
    DATA_KEY_FILE,
    ED25519_FILE,
    PASSPHRASE_FILE,
    PUBLIC_FILE,
    X25519_FILE,
    fingerprints,
    init_identity,
    load_identity,
    load_public,
)

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
PASS = b"correct horse battery staple"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_client_files_and_modes(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys" / "c0"
    old_umask = os.umask(0)  # even a permissive umask must not loosen private files
    try:
        ident = init_identity(key_dir, "client", "c0")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(
        [PUBLIC_FILE, X25519_FILE, ED25519_FILE, DATA_KEY_FILE]
    )
    for name in (X25519_FILE, ED25519_FILE, DATA_KEY_FILE):
        assert mode(key_dir / name) == 0o600, name
    assert mode(key_dir / PUBLIC_FILE) == 0o644
    assert b"BEGIN PRIVATE KEY" in (key_dir / X25519_FILE).read_bytes()
    assert ident.data_key is not None and len(ident.data_key) == 32
    assert ident.data_key.hex() not in repr(ident)


def test_server_has_no_data_key(tmp_path: Path) -> None:
    ident = init_identity(tmp_path, "server", "server")
    assert ident.data_key is None and ident.ids.data is None
    assert not (tmp_path / DATA_KEY_FILE).exists()
    loaded = load_identity(tmp_path)
    assert loaded.role == "server" and loaded.data_key is None


def test_public_json_holds_only_public_material(tmp_path: Path) -> None:
    ident = init_identity(tmp_path, "client", "c1")
    doc = json.loads((tmp_path / PUBLIC_FILE).read_text())
    assert doc["role"] == "client" and doc["name"] == "c1"
    x_raw = base64.b64decode(doc["x25519"]["public_key"])
    assert x_raw == ident.x25519_private.public_key().public_bytes(*RAW)
    assert doc["x25519"]["key_id"] == public_key_id(x_raw) == ident.ids.x25519
    text = json.dumps(doc)
    assert ident.data_key is not None
    assert base64.b64encode(ident.data_key).decode() not in text
    assert ident.ids.data not in text


def test_key_ids_are_stable_and_derived_from_keys(tmp_path: Path) -> None:
    created = init_identity(tmp_path, "client", "c0")
    first, second = load_identity(tmp_path), load_identity(tmp_path)
    assert created.ids == first.ids == second.ids
    assert first.data_key == created.data_key
    assert created.data_key is not None
    assert first.ids.data == data_key_id(created.data_key)
    assert first.ids.ed25519 == public_key_id(
        created.ed25519_private.public_key().public_bytes(*RAW)
    )
    assert all(len(i) == 16 for i in (first.ids.x25519, first.ids.ed25519, first.ids.data))
    public = load_public(tmp_path)
    assert public == created.public
    assert load_public(tmp_path / PUBLIC_FILE).ids == public.ids
    shown = fingerprints(tmp_path)
    assert shown["x25519_key_id"] == first.ids.x25519
    assert shown["data_key_id"] == first.ids.data
    assert shown["passphrase_protected"] is False


def test_data_key_id_hides_the_key() -> None:
    key = bytes(32)
    assert data_key_id(key) != public_key_id(key)  # labelled hash, not a plain hash of the key


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    first = init_identity(tmp_path, "client", "c0")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyExistsError, match="--force") as info:
        init_identity(tmp_path, "client", "c0")
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(KeyExistsError):
        init_identity(tmp_path, "server", "other")
    replaced = init_identity(tmp_path, "client", "c0", force=True)
    assert replaced.ids.x25519 != first.ids.x25519
    assert load_identity(tmp_path).ids == replaced.ids


def test_partial_key_dir_also_blocks(tmp_path: Path) -> None:
    (tmp_path / X25519_FILE).write_bytes(b"precious")
    with pytest.raises(KeyExistsError, match=X25519_FILE):
        init_identity(tmp_path, "client", "c0")
    assert (tmp_path / X25519_FILE).read_bytes() == b"precious"


def test_force_reinit_as_server_removes_old_data_key(tmp_path: Path) -> None:
    init_identity(tmp_path, "client", "c0", passphrase=PASS)
    init_identity(tmp_path, "server", "s", force=True)
    assert not (tmp_path / DATA_KEY_FILE).exists()
    assert not (tmp_path / PASSPHRASE_FILE).exists()
    assert load_identity(tmp_path).role == "server"


def test_passphrase_round_trip_and_errors(tmp_path: Path) -> None:
    created = init_identity(tmp_path, "client", "c0", passphrase=PASS)
    for name in (X25519_FILE, ED25519_FILE):
        assert b"BEGIN ENCRYPTED PRIVATE KEY" in (tmp_path / name).read_bytes()
    assert mode(tmp_path / PASSPHRASE_FILE) == 0o600
    stored = json.loads((tmp_path / DATA_KEY_FILE).read_text())
    assert "key" not in stored and stored["protection"] == "passphrase"
    assert created.data_key is not None
    assert base64.b64encode(created.data_key).decode() not in (tmp_path / DATA_KEY_FILE).read_text()

    loaded = load_identity(tmp_path, PASS)
    assert loaded.data_key == created.data_key and loaded.ids == created.ids
    assert fingerprints(tmp_path)["passphrase_protected"] is True

    with pytest.raises(WrongPassphraseError, match="wrong passphrase") as info:
        load_identity(tmp_path, b"incorrect horse")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WrongPassphraseError, match="passphrase-protected"):
        load_identity(tmp_path)


def test_passphrase_for_unprotected_dir_is_refused(tmp_path: Path) -> None:
    init_identity(tmp_path, "client", "c0")
    with pytest.raises(WrongPassphraseError, match="not passphrase-protected"):
        load_identity(tmp_path, PASS)


def test_pem_cannot_be_opened_with_the_bare_passphrase(tmp_path: Path) -> None:
    # The PEM password is scrypt-stretched (see passphrase.py), so the weak PKCS8 KDF is not a
    # shortcut to guessing the passphrase.
    init_identity(tmp_path, "server", "s", passphrase=PASS)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key((tmp_path / X25519_FILE).read_bytes(), PASS)


def test_mixed_key_dirs_are_detected(tmp_path: Path) -> None:
    init_identity(tmp_path / "a", "client", "a")
    init_identity(tmp_path / "b", "client", "b")
    shutil.copy(tmp_path / "b" / ED25519_FILE, tmp_path / "a" / ED25519_FILE)
    with pytest.raises(MalformedFileError, match="do not match"):
        load_identity(tmp_path / "a")


def test_tampered_public_json_is_rejected(tmp_path: Path) -> None:
    init_identity(tmp_path, "client", "c0")
    doc = json.loads((tmp_path / PUBLIC_FILE).read_text())
    doc["ed25519"]["key_id"] = "0" * 16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(MalformedFileError, match="key id does not match"):
        load_public(bad)
    bad.write_text("{not json")
    with pytest.raises(MalformedFileError):
        load_public(bad)


def test_tampered_data_key_file_is_rejected(tmp_path: Path) -> None:
    init_identity(tmp_path, "client", "c0")
    path = tmp_path / DATA_KEY_FILE
    doc = json.loads(path.read_text())
    doc["key"] = base64.b64encode(bytes(32)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(MalformedFileError, match="not the recorded"):
        load_identity(tmp_path)


def test_missing_or_public_only_dirs(tmp_path: Path) -> None:
    with pytest.raises(WrongKeyError, match="not a fedvault key dir"):
        load_identity(tmp_path / "nowhere")
    with pytest.raises(WrongKeyError, match=r"public\.json"):
        load_public(tmp_path / "nowhere")
    init_identity(tmp_path / "full", "server", "s")
    (tmp_path / "pub").mkdir()
    shutil.copy(tmp_path / "full" / PUBLIC_FILE, tmp_path / "pub" / PUBLIC_FILE)
    with pytest.raises(WrongKeyError, match="private keys"):
        load_identity(tmp_path / "pub")
    assert load_public(tmp_path / "pub").name == "s"


def test_loose_private_key_mode_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    init_identity(tmp_path, "server", "s")
    os.chmod(tmp_path / X25519_FILE, 0o644)
    load_identity(tmp_path)
    assert "chmod 600" in caplog.text


@pytest.mark.parametrize(
    ("role", "name", "passphrase"),
    [("admin", "x", None), ("client", "", None), ("client", "a\nb", None), ("client", "x", b"")],
)
def test_invalid_arguments(tmp_path: Path, role: str, name: str, passphrase: bytes | None) -> None:
    with pytest.raises(ValueError):
        init_identity(tmp_path, role, name, passphrase)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())
