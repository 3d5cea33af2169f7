"""End-to-end protection of model updates and global models inside Flower messages.

Flower moves ``RecordDict``s; TLS protects each hop, but the SuperLink in the middle sees
every message in the clear. Here a message's whole content is serialised with Flower's own
wire format (protobuf, deterministic), then

* client → server (updates, evaluation results): **sealed** for the ServerApp — encrypted to
  the server's X25519 key and signed by the client's Ed25519 key;
* server → client (global model + config): **signed** by the server.

and carried as one bytes value. The associated data binds run id, round, node id, partition id
and message kind, so an update replayed from another round, moved to another node or altered
fails to open. The cryptography itself is :mod:`common.crypto.sealing`.
"""

from __future__ import annotations

from typing import Literal

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

ENVELOPE = "fedvault-envelope"
BLOB = "blob"

Kind = Literal["global-train", "global-evaluate", "update-train", "update-evaluate"]

# Flower error code used when an update fails authentication (server side, logged).
UPDATE_REJECTED = 4002


def encode(content: RecordDict) -> bytes:
    """Flower's protobuf encoding of a RecordDict (deterministic, so signatures are stable)."""
    return recorddict_to_proto(content).SerializeToString(deterministic=True)


def decode(data: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def wrap(blob: bytes) -> RecordDict:
    """The RecordDict that carries a sealed or signed blob."""
    return RecordDict({ENVELOPE: ConfigRecord({BLOB: blob})})


def unwrap(content: RecordDict) -> bytes | None:
    """The blob inside an envelope, or None for a message that is not wrapped."""
    if ENVELOPE not in content:
        return None
    blob = content[ENVELOPE][BLOB]
    if not isinstance(blob, bytes):
        raise ValueError("malformed fedvault envelope: blob is not bytes")
    return blob


def context(
    *, run_id: int, server_round: int, node_id: int, partition_id: int, kind: Kind
) -> dict[str, str | int]:
    """The associated data every sealed/signed message is bound to."""
    return {
        "run": str(run_id),
        "round": int(server_round),
        "node": str(node_id),
        "partition": int(partition_id),
        "kind": kind,
    }
