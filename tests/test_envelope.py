"""End-to-end protection in the real message path: the ClientApp with its sealing mod on one
side, the server's sealer on the other, real keys, real Flower messages."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

from client.app import app
from common import envelope
from common import protocol as P
from common.federation_keys import client_dir, client_publics, provision, server_dir
from common.federation_keys import load_own as load_identity
from common.models import build_model
from common.privacy.policy import POLICY_FILE, PrivacyPolicy
from server.run_record import RunRecord
from server.sealing import ServerSealer
from server.strategy import RecordingFedAvg

NODE, OTHER_NODE, RUN = 7, 8, 1


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    keys = provision(tmp_path_factory.mktemp("keys"), 2)
    for pid in (0, 1):  # these holders allow training without DP (the messages are the point)
        PrivacyPolicy(require_dp=False).save(client_dir(keys, pid) / POLICY_FILE)
    return keys


@pytest.fixture
def sealer(keys):
    partitions = {NODE: 0, OTHER_NODE: 1}
    return ServerSealer(RUN, load_identity(server_dir(keys)), client_publics(keys), partitions.get)


def _context(keys, partition=0, node=NODE, encrypt=True):
    return Context(
        run_id=RUN, node_id=node,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config={"encrypt-updates": encrypt, "keys-dir": str(keys), "dp": False},
    )  # fmt: skip


def _train_message(server_round, node=NODE):
    model = build_model("lenet5", 10)
    content = RecordDict(
        {P.ARRAYS: ArrayRecord(model.state_dict()),
         P.CONFIG: ConfigRecord({"server-round": server_round})}
    )  # fmt: skip
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def _round_trip(sealer, keys, server_round=1):
    (msg,) = sealer.protect([_train_message(server_round)], server_round)
    assert set(msg.content) == {envelope.ENVELOPE}  # nothing readable leaves the server
    reply = app(msg, _context(keys))
    assert set(reply.content) == {envelope.ENVELOPE}  # nor the client
    return reply


def test_sealed_update_opens_on_the_server(sealer, keys):
    reply = _round_trip(sealer, keys)
    accepted, rejected = sealer.open_replies([reply], 1)
    assert rejected == [] and len(accepted) == 1
    metrics = accepted[0].content[P.METRICS]
    assert metrics[P.PARTITION_ID] == 0 and metrics[P.NUM_EXAMPLES] > 0
    assert len(accepted[0].content[P.ARRAYS]) == 10


def test_update_replayed_into_another_round_is_rejected(sealer, keys):
    reply = _round_trip(sealer, keys, server_round=1)
    accepted, rejected = sealer.open_replies([reply], 2)
    assert accepted == [] and "round" in rejected[0].reason


def test_update_moved_to_another_node_is_rejected(sealer, keys):
    reply = _round_trip(sealer, keys)
    reply.metadata.__dict__["_src_node_id"] = OTHER_NODE  # node 8 hands in node 7's update
    accepted, rejected = sealer.open_replies([reply], 1)
    assert accepted == [] and rejected[0].partition_id == 1


def test_altered_update_is_rejected(sealer, keys):
    reply = _round_trip(sealer, keys)
    blob = bytearray(envelope.unwrap(reply.content))
    blob[len(blob) // 2] ^= 0x01
    reply.content = envelope.wrap(bytes(blob))
    accepted, rejected = sealer.open_replies([reply], 1)
    assert accepted == [] and rejected[0].reason.startswith("update rejected")


def test_update_sealed_by_another_client_is_rejected(keys):
    # the server believes node 7 holds partition 1: client-0's key is not that partition's
    wrong = ServerSealer(RUN, load_identity(server_dir(keys)), client_publics(keys), lambda n: 1)
    right = ServerSealer(RUN, load_identity(server_dir(keys)), client_publics(keys), lambda n: 0)
    reply = _round_trip(right, keys)
    accepted, rejected = wrong.open_replies([reply], 1)
    assert accepted == [] and len(rejected) == 1


def test_client_refuses_a_global_model_for_another_node(sealer, keys):
    (msg,) = sealer.protect([_train_message(1, node=OTHER_NODE)], 1)
    reply = app(msg, _context(keys, node=NODE))
    assert reply.has_error() and reply.error.code == envelope.UPDATE_REJECTED


def test_client_refuses_a_replayed_global_model(sealer, keys):
    context = _context(keys)
    (first,) = sealer.protect([_train_message(2)], 2)
    assert not app(first, context).has_error()
    (old,) = sealer.protect([_train_message(1)], 1)
    reply = app(old, context)
    assert reply.has_error() and "replay" in reply.error.reason


def test_client_refuses_an_unsigned_global_model(keys):
    reply = app(_train_message(1), _context(keys))
    assert reply.has_error() and "not signed" in reply.error.reason


def test_a_client_that_pinned_the_servers_key_refuses_a_run_without_sealing(keys):
    """The run config says encrypt-updates = false; the holder pinned the server's key, so
    it still demands a signed global model and never replies in plaintext."""
    reply = app(_train_message(1), _context(keys, encrypt=False))
    assert reply.has_error() and "pinned the server's key" in reply.error.reason
    assert "encrypt-updates = false" in reply.error.reason


def _strategy(tmp_path, sealer, sampled=(0, 1)):
    record = RunRecord(tmp_path, config={}, summary={})
    strategy = RecordingFedAvg(seed=0, record=record, min_train_nodes=1)
    strategy.partition_of = {NODE: 0, OTHER_NODE: 1}
    strategy.sealer = sealer
    record.start_round(1, list(sampled))
    return strategy, record


def test_a_duplicated_sealed_reply_is_aggregated_once(sealer, keys, tmp_path):
    """The same sealed reply delivered twice (a replay within the round) counts once."""
    reply = _round_trip(sealer, keys)
    duplicate = Message(RecordDict(dict(reply.content)), reply_to=_train_message(1))
    strategy, record = _strategy(tmp_path, sealer, sampled=[0])
    arrays, _ = strategy.aggregate_train(1, [reply, duplicate])
    assert arrays is not None
    assert [c.partition_id for c in record.rounds[1].clients] == [0]


def test_an_unsigned_error_reply_is_not_taken_as_a_refusal(sealer, keys, tmp_path):
    """Anyone on the path can forge a Flower error reply; only a sealed refusal is the
    holder's word. A forged "budget exhausted" is recorded as a failure, not a refusal."""
    forged = Message(
        Error(P.PRIVACY_BUDGET_EXHAUSTED, "privacy budget exhausted (forged)"),
        reply_to=_train_message(1, node=OTHER_NODE),
    )
    strategy, record = _strategy(tmp_path, sealer)
    strategy.aggregate_train(1, [_round_trip(sealer, keys), forged])
    (failure,) = record.rounds[1].failures
    assert failure["partition_id"] == 1 and failure["refused"] is False
    assert "unauthenticated" in failure["reason"]


def test_a_sealed_refusal_is_recorded_as_the_holders_refusal(sealer, keys, tmp_path):
    context = _context(keys)
    context.run_config = {**context.run_config, "dp": True, "target-delta": 1e-3}
    (msg,) = sealer.protect([_train_message(1)], 1)
    reply = app(msg, context)
    assert set(reply.content) == {envelope.ENVELOPE}  # the refusal is sealed too
    strategy, record = _strategy(tmp_path, sealer, sampled=[0])
    strategy.aggregate_train(1, [reply])
    (failure,) = record.rounds[1].failures
    assert failure["refused"] is True and failure["code"] == P.POLICY_REFUSED
    assert "δ=0.001" in failure["reason"]
