"""Partitions encrypted at rest: prepared per client, decrypted only in memory."""

import os

import pytest
import torch

from common.crypto import IntegrityError, WrongKeyError
from common.data import DataSpec, load_partition
from common.data.encrypted import load, partition_file, prepare
from common.federation_keys import client_dir, provision
from common.federation_keys import load_own as load_identity


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    keys = provision(tmp_path_factory.mktemp("keys"), 2)
    out = prepare(tmp_path_factory.mktemp("enc"), keys_dir=keys, dataset="digits",
                  num_partitions=2)  # fmt: skip
    return keys, out


def test_encrypted_partition_equals_the_plain_one(prepared):
    keys, out = prepared
    enc = load(out, 1, load_identity(client_dir(keys, 1)), 4096)
    plain = load_partition(DataSpec("digits", "", 42), 1, 2)
    for a, b in zip(enc.train.tensors + enc.test.tensors,
                    plain.train.tensors + plain.test.tensors, strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_nothing_readable_on_disk_and_no_plaintext_files_written(prepared, tmp_path):
    keys, out = prepared
    before = sorted(os.listdir(out))
    raw = partition_file(out, 0).read_bytes()
    assert raw[:4] == b"FVD1" and b"train_x" not in raw
    load(out, 0, load_identity(client_dir(keys, 0)), 4096)
    assert sorted(os.listdir(out)) == before


def test_another_clients_key_is_refused_naming_the_fix(prepared):
    keys, out = prepared
    with pytest.raises(WrongKeyError, match="pass the --key dir of the client that encrypted it"):
        load(out, 0, load_identity(client_dir(keys, 1)), 4096)


def test_tampered_partition_is_refused(prepared, tmp_path):
    keys, out = prepared
    blob = bytearray(partition_file(out, 0).read_bytes())
    blob[-100] ^= 0x80
    (tmp_path / "partition-0.fvd").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        load(tmp_path, 0, load_identity(client_dir(keys, 0)), 4096)
