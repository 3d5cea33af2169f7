"""Client partitions encrypted at rest: written by ``fedvault data prepare``, read in memory.

Each client's share is serialised with ``torch.save`` (raw inputs: uint8 images or texts, and
labels) and encrypted into an FVD1 container (:mod:`common.crypto.container`) under that
client's data key. Loading decrypts straight into memory and ``torch.load``s with
``weights_only=True`` (no pickle code execution); no plaintext ever touches the disk.

Layout of an encrypted data dir::

    manifest.json          non-secret: data set, partitioning, seed, key id per partition
    partition-<i>.fvd      client i's share, encrypted for client i
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from common.crypto import Identity, decrypt_to_memory, encrypt_bytes, load_identity
from common.data import DataSpec, Partition, partition_from_raw, raw_partition
from common.data.sources import DataError
from common.federation_keys import client_dir
from common.files import write_file_atomic, write_json_atomic

log = logging.getLogger("fedvault.data")

MANIFEST = "manifest.json"


def partition_file(data_dir: Path, partition_id: int) -> Path:
    return data_dir / f"partition-{partition_id}.fvd"


def prepare(
    out_dir: Path,
    *,
    keys_dir: Path,
    dataset: str,
    num_partitions: int,
    data_dir: str = "",
    seed: int = 42,
    partitioning: str = "iid",
    alpha: float = 0.5,
    classes: tuple[str, ...] = (),
) -> Path:
    """Write every client's partition encrypted for that client (keys: ``keys_dir/client-<i>``).

    Every share is read (and so validated) before the first file is written: bad input in
    client 3's data leaves nothing behind. Each file is written atomically.
    """
    spec = DataSpec(dataset, data_dir, seed, partitioning=partitioning, dirichlet_alpha=alpha,
                    classes=classes)  # fmt: skip
    identities = [load_identity(client_dir(keys_dir, pid)) for pid in range(num_partitions)]
    shares = [raw_partition(spec, pid, num_partitions) for pid in range(num_partitions)]
    for identity, share in tqdm(list(zip(identities, shares, strict=True)),
                                desc="encrypting partitions", unit="client"):  # fmt: skip
        write_share(out_dir, identity, share)
    manifest = {
        "format": "fedvault-encrypted-partitions",
        "version": 1,
        "dataset": dataset,
        "num_partitions": num_partitions,
        "partitioning": partitioning,
        "dirichlet_alpha": alpha,
        "seed": seed,
        "data_key_ids": {str(pid): identity.ids.data for pid, identity in enumerate(identities)},
    }
    if classes:
        manifest["classes"] = list(classes)
    write_json_atomic(out_dir / MANIFEST, manifest)
    log.info("wrote %d encrypted partitions of %s to %s", num_partitions, dataset, out_dir)
    return out_dir


def write_partition(
    out_dir: Path,
    identity: Identity,
    partition_id: int,
    num_partitions: int,
    *,
    dataset: str,
    data_dir: str = "",
    seed: int = 42,
    partitioning: str = "iid",
    alpha: float = 0.5,
) -> Path:
    """Encrypt one client's share of a built-in data set under that client's data key (all
    a deployed client needs: its own key dir, not everyone's)."""
    spec = DataSpec(dataset, data_dir, seed, partitioning=partitioning, dirichlet_alpha=alpha)
    return write_share(out_dir, identity, raw_partition(spec, partition_id, num_partitions))


def write_share(out_dir: Path, identity: Identity, share: dict) -> Path:
    """Encrypt a share (:func:`common.data.raw_partition` / :func:`common.data.holder_share`)
    into ``partition-<i>.fvd`` under the holder's data key, atomically: a crash leaves the old
    file or the new one, never half of one."""
    buffer = io.BytesIO()
    torch.save(share, buffer)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = partition_file(out_dir, int(share["partition_id"]))
    write_file_atomic(
        target, encrypt_bytes(buffer.getvalue(), _data_key(identity), identity.ids.data)
    )
    return target


def load(data_dir: Path, partition_id: int, identity: Identity, num_features: int) -> Partition:
    """Decrypt client ``partition_id``'s share in memory and build its tensors."""
    path = partition_file(data_dir, partition_id)
    if not path.exists():
        raise DataError(
            f"encrypted partition {path} not found: run `fedvault data prepare` or fix "
            "encrypted-data-dir"
        )
    plaintext = decrypt_to_memory(
        path, _data_key(identity), identity.ids.data, key_label=f"key dir {identity.directory}"
    )
    share = torch.load(io.BytesIO(plaintext), weights_only=True)
    if int(share["partition_id"]) != partition_id:
        raise DataError(
            f"{path} holds partition {share['partition_id']}, not {partition_id}: "
            "the files were renamed; re-run `fedvault data prepare`"
        )
    return partition_from_raw(share, num_features)


def _data_key(identity: Identity) -> bytes:
    if identity.data_key is None or identity.ids.data is None:
        raise DataError(
            f"key dir {identity.directory} has no data key (a server identity?): use a client's"
        )
    return identity.data_key
