"""The real ClientApp, called with real Flower messages and a real Context, round by round."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app
from common import protocol as P
from common.config import ConfigError
from common.models import build_model
from common.privacy.accounting import epsilon_of
from common.privacy.policy import PrivacyPolicy

RUN_CONFIG = {"num-server-rounds": 2, "target-epsilon": 8.0, "batch-size": 32}


def _context(run_config=RUN_CONFIG, partition=0):
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _message(model, server_round, kind=MessageType.TRAIN):
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord(model.state_dict()),
            P.CONFIG: ConfigRecord({"server-round": server_round}),
        }
    )
    return Message(content, dst_node_id=7, message_type=kind)


def test_epsilon_composes_across_rounds_and_the_budget_is_refused_after():
    torch.manual_seed(0)
    model = build_model("lenet5", 10)
    context = _context()
    replies = [app(_message(model, r), context) for r in (1, 2)]
    metrics = [dict(r.content[P.METRICS]) for r in replies]
    sigma, q, steps = metrics[0][P.NOISE_MULTIPLIER], metrics[0][P.SAMPLE_RATE], metrics[0][P.STEPS]
    assert metrics[1][P.NOISE_MULTIPLIER] == sigma  # calibrated once, not per round
    # round 2's cumulative ε is one accountant over both rounds' steps
    assert metrics[1][P.EPSILON] == pytest.approx(epsilon_of([(sigma, q, 2 * steps)], 1e-5, "prv"))
    assert metrics[0][P.EPSILON] < metrics[1][P.EPSILON] <= 8.0
    spent_in_round_2 = metrics[1][P.EPSILON] - metrics[0][P.EPSILON]
    assert metrics[1][P.ROUND_EPSILON] == pytest.approx(spent_in_round_2)
    # the planned run used the budget; a third round would cross it and is refused
    refused = app(_message(model, 3), context)
    assert not refused.has_error() and set(refused.content) == {P.REFUSAL}
    assert refused.content[P.REFUSAL]["code"] == P.PRIVACY_BUDGET_EXHAUSTED
    assert "privacy budget exhausted" in refused.content[P.REFUSAL]["reason"]


def test_nothing_computed_from_private_data_leaves_unaccounted():
    """Before: train-loss (moved from 1.39 to 17-59 by one outlier record) and the exact
    size went to the server. Now: the declared size, the mechanism and its ε, the ledger."""
    model = build_model("lenet5", 10)
    reply = app(_message(model, 1), _context())
    assert set(reply.content) == {P.ARRAYS, P.METRICS, P.LEDGER}
    assert set(reply.content[P.METRICS]) == {
        P.NUM_EXAMPLES, P.PARTITION_ID, P.EPSILON, P.ROUND_EPSILON, P.NOISE_MULTIPLIER,
        P.SAMPLE_RATE, P.STEPS, P.MAX_GRAD_NORM, P.DELTA,
    }  # fmt: skip


def test_the_declared_size_is_what_the_server_sees(tmp_path):
    policy = tmp_path / "policy.toml"
    PrivacyPolicy(declared_examples=500).save(policy)
    context = _context()
    context.node_config["policy"] = str(policy)
    reply = app(_message(build_model("lenet5", 10), 1), context)
    metrics = reply.content[P.METRICS]
    assert metrics[P.NUM_EXAMPLES] == 500 and metrics[P.SAMPLE_RATE] == 1 / 16


def test_the_update_is_trained_weights_not_the_global_ones():
    model = build_model("lenet5", 10)
    reply = app(_message(model, 1), _context())
    update = reply.content[P.ARRAYS].to_torch_state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, update[k])]
    assert changed == list(model.state_dict())


def test_no_dp_is_refused_unless_the_holder_allows_it(tmp_path):
    """Before: dp = false in the run config was simply obeyed."""
    model = build_model("lenet5", 10)
    refused = app(_message(model, 1), _context({**RUN_CONFIG, "dp": False}))
    assert refused.content[P.REFUSAL]["code"] == P.POLICY_REFUSED
    assert "require-dp = true" in refused.content[P.REFUSAL]["reason"]
    policy = tmp_path / "policy.toml"
    PrivacyPolicy(require_dp=False).save(policy)
    context = _context({**RUN_CONFIG, "dp": False})
    context.node_config["policy"] = str(policy)
    metrics = dict(app(_message(model, 1), context).content[P.METRICS])
    assert P.EPSILON not in metrics and metrics[P.NUM_EXAMPLES] > 0


def test_evaluate_and_query_handlers(tmp_path):
    model = build_model("lenet5", 10)
    context = _context(partition=2)
    refused = app(_message(model, 1, MessageType.EVALUATE), context)
    assert "release-evaluation = false" in refused.content[P.REFUSAL]["reason"]
    policy = tmp_path / "policy.toml"
    PrivacyPolicy(release_evaluation=True).save(policy)
    context.node_config["policy"] = str(policy)
    evaluation = app(_message(model, 1, MessageType.EVALUATE), context)
    metrics = dict(evaluation.content[P.METRICS])
    assert 0.0 <= metrics[P.EVAL_ACCURACY] <= 1.0 and metrics[P.PARTITION_ID] == 2
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    info = app(query, context).content[P.NODE_INFO]
    assert info[P.PARTITION_ID] == 2 and info["num-partitions"] == 3


def test_malformed_config_fails_naming_the_key_and_the_fix():
    """Flower turns the exception into an error reply; its text names the key."""
    model = build_model("lenet5", 10)
    with pytest.raises(ConfigError, match=r"'batch-size' has value 'big'.*--set batch-size="):
        app(_message(model, 1), _context({"batch-size": "big"}))


def test_restarted_client_continues_its_epsilon_from_disk(tmp_path):
    """A new process (fresh Context, empty state) resumes the accountant history from
    state-dir: ε continues instead of restarting at zero."""
    from common.federation_keys import client_dir, provision

    keys = provision(tmp_path / "keys", 1)
    config = {**RUN_CONFIG, "num-server-rounds": 3}
    node_config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "st"),
                   "key-dir": str(client_dir(keys, 0))}  # fmt: skip
    model = build_model("lenet5", 10)

    def fresh_context():
        return Context(run_id=9, node_id=7, node_config=node_config, state=RecordDict(),
                       run_config=dict(config))  # fmt: skip

    first = dict(app(_message(model, 1), fresh_context()).content[P.METRICS])
    state_file = tmp_path / "st" / "default.privacy-state"  # keyed by data set, not run
    assert state_file.read_bytes()[:4] == b"FVD1"  # encrypted at rest
    after_restart = dict(app(_message(model, 2), fresh_context()).content[P.METRICS])
    sigma, q, steps = first[P.NOISE_MULTIPLIER], first[P.SAMPLE_RATE], first[P.STEPS]
    assert after_restart[P.EPSILON] == pytest.approx(
        epsilon_of([(sigma, q, 2 * steps)], 1e-5, "prv")
    )
    assert after_restart[P.EPSILON] > first[P.EPSILON]


def test_two_runs_at_once_on_one_holder_both_count(tmp_path):
    """A server that runs two runs in parallel on the same holder must not get two budgets:
    the holder's state is held for the whole round, so neither round's spend is lost."""
    import threading

    from common.federation_keys import client_dir, provision

    keys = provision(tmp_path / "keys", 1)
    node_config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "st"),
                   "key-dir": str(client_dir(keys, 0))}  # fmt: skip
    model = build_model("lenet5", 10)
    replies = {}

    def run(run_id: int) -> None:
        context = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(),
                          run_config={**RUN_CONFIG, "target-epsilon": 4.0})  # fmt: skip
        replies[run_id] = app(_message(model, 1), context)

    threads = [threading.Thread(target=run, args=(r,)) for r in (21, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = sorted((dict(replies[r].content[P.METRICS]) for r in (21, 22)),
                           key=lambda m: m[P.EPSILON])  # fmt: skip
    mechanisms = [(m[P.NOISE_MULTIPLIER], m[P.SAMPLE_RATE], m[P.STEPS]) for m in (first, second)]
    assert first[P.EPSILON] == pytest.approx(epsilon_of(mechanisms[:1], 1e-5, "prv"))
    # the later round composed with the earlier one although it ran in another run
    assert second[P.EPSILON] == pytest.approx(epsilon_of(mechanisms, 1e-5, "prv"))


def test_data_that_fails_authentication_is_reported_as_unusable(tmp_path):
    """A flipped byte in an encrypted partition fails every round the same way: the client
    says so in a (sealable) reply with its own code, and the server ends the run with it."""
    from common.data import encrypted
    from common.federation_keys import client_dir, load_own, provision
    from server.run_record import RunRecord
    from server.strategy import RecordingFedAvg, RunAborted

    keys = provision(tmp_path / "keys", 1)
    enc = tmp_path / "enc"
    encrypted.write_partition(enc, load_own(client_dir(keys, 0)), 0, 3, dataset="digits")
    (path,) = enc.glob("partition-0*.fvd")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    context = _context()
    context.node_config.update({"encrypted-data-dir": str(enc),
                                "key-dir": str(client_dir(keys, 0))})  # fmt: skip
    reply = app(_message(build_model("lenet5", 10), 1), context)
    refusal = reply.content[P.REFUSAL]
    assert refusal["code"] == P.DATA_UNUSABLE and "partition-0" in refusal["reason"]

    record = RunRecord(tmp_path / "run", config={}, summary={})
    strategy = RecordingFedAvg(seed=0, record=record, min_train_nodes=1)
    strategy.partition_of = {reply.metadata.src_node_id: 0}
    record.start_round(1, [0])
    with pytest.raises(RunAborted, match="partition 0 cannot use its data"):
        strategy.aggregate_train(1, [reply])
    assert (tmp_path / "run" / "metrics.json").exists()  # the record is kept
