"""fedvault ClientApp: local DP-SGD on this node's data; only the update leaves.

The holder's privacy session (:mod:`client.privacy_session`) decides what a round may spend
-- from the holder's own policy and lifetime state, never from the run config alone -- and
records what it did. A round the policy does not allow is refused with a (sealed) refusal
reply; the server leaves the node out and the run goes on.

What leaves with an update: the weights (DP), the declared data set size (public by the
holder's choice), the mechanism and its ε (computed from public parameters) and the signed
ledger entries. Not the training loss, not the true size, not timings.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import holder
from client.privacy_session import (
    PrivacySession,
    exclusive,
    load_session,
    save_session,
    state_file,
)
from client.sealing_mod import sealing_mod
from client.training import DPSettings, train_local
from common import protocol as P
from common.config import RunConfig
from common.crypto import CryptoError, Identity
from common.data import DataError, DataSpec, Partition, encrypted, load_partition
from common.data.own import HolderDataError
from common.devices import to_device
from common.evaluation import evaluate
from common.federation_keys import load_own
from common.logs import configure_logging
from common.models import model_for
from common.privacy.accounting import PrivacyBudgetExceeded
from common.privacy.policy import PolicyRefusal, PrivacyPolicy

log = logging.getLogger("fedvault.client")
app = ClientApp(mods=[sealing_mod])

# Data that fails authentication (a tampered or foreign partition) or validation (labels out
# of range, missing files) fails the same way every round: the server ends the run with it.
UNUSABLE_DATA = (DataError, CryptoError, FileNotFoundError)
SESSION_KEY = "fedvault-privacy"  # context.state: the session, for a holder with no state dir
SENT_KEY = "fedvault-ledger-sent"  # context.state: the last ledger seq sent in this run


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    pid, num = holder.partition_ids(context)
    info = ConfigRecord({P.PARTITION_ID: pid, "num-partitions": num})
    return Message(RecordDict({P.NODE_INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the global weights in ``msg``, if the policy allows."""
    configure_logging()
    cfg = RunConfig.from_mapping(context.run_config)
    torch.set_num_threads(cfg.torch_threads)
    pid, _ = holder.partition_ids(context)
    server_round = int(msg.content[P.CONFIG].get("server-round", 0))
    try:
        data = _partition(cfg, context)
    except UNUSABLE_DATA as err:
        return _refuse(msg, pid, server_round, P.DATA_UNUSABLE, err)
    policy = holder.policy(cfg, context)
    if not cfg.dp:
        return _train_without_dp(msg, context, cfg, data, policy, pid, server_round)
    path = _state_path(cfg, context, policy)
    with exclusive(path):  # one round at a time per holder, whatever run asks
        return _train_dp(msg, context, cfg, data, policy, pid, server_round, path)


def _train_without_dp(msg: Message, context: Context, cfg: RunConfig, data: Partition,
                      policy: PrivacyPolicy, pid: int, server_round: int) -> Message:  # fmt: skip
    """Baselines, for holders whose policy allows them (``require-dp = false``)."""
    try:
        policy.check_no_dp()
    except PolicyRefusal as refusal:
        return _refuse(msg, pid, server_round, P.POLICY_REFUSED, refusal)
    model = _model(cfg, data, msg)
    started = time.perf_counter()
    result = train_local(model, data.train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, momentum=cfg.momentum,
                         device=holder.device(context))  # fmt: skip
    log.info("partition %d, round %d: no DP; not sent: train loss %.4f, trained in %.3f s",
             pid, server_round, result.train_loss, time.perf_counter() - started)  # fmt: skip
    weight = policy.declared_examples or len(data.train)
    metrics = MetricRecord({P.NUM_EXAMPLES: weight, P.PARTITION_ID: pid})
    return _reply(msg, {P.ARRAYS: ArrayRecord(model.state_dict()), P.METRICS: metrics})


def _train_dp(msg: Message, context: Context, cfg: RunConfig, data: Partition,
              policy: PrivacyPolicy, pid: int, server_round: int,
              path: Path | None) -> Message:  # fmt: skip
    """Plan (or refuse), train, commit: the holder's state is held for all of it."""
    signer = holder.identity(cfg, context)
    session = _load(context, path, policy, signer)
    first_round_of_run = str(context.run_id) not in session.runs
    try:
        plan = session.plan_round(cfg, str(context.run_id), len(data.train))
    except PolicyRefusal as refusal:
        return _refuse(msg, pid, server_round, P.POLICY_REFUSED, refusal)
    except PrivacyBudgetExceeded as refusal:
        return _refuse(msg, pid, server_round, P.PRIVACY_BUDGET_EXHAUSTED, refusal)
    if first_round_of_run and not policy.declared_examples:
        log.info("partition %d publishes its true size n=%d (policy declares none)",
                 pid, plan.declared_examples)  # fmt: skip

    model = _model(cfg, data, msg)
    started = time.perf_counter()
    result = train_local(
        model, data.train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, momentum=cfg.momentum,
        dp=DPSettings(plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate,
                      plan.steps_per_epoch, policy.accountant, cfg.grad_sample_mode),
        device=holder.device(context),
    )  # fmt: skip
    assert result.mechanism is not None
    seconds = time.perf_counter() - started
    before = session.spent
    entry = session.commit(
        plan, result.mechanism, run_id=str(context.run_id), server_round=server_round,
        partition_id=pid, node_id=str(context.node_id), signer=signer,
    )  # fmt: skip
    _store(context, path, session, signer)
    log.info(
        "partition %d, round %d: %d steps, σ=%.4f, q=%.4f, lifetime ε %.4f → %.4f (budget %g); "
        "not sent: train loss %.4f, trained in %.3f s",
        pid, server_round, plan.steps, plan.noise_multiplier, plan.sample_rate, before,
        entry.epsilon_cumulative, policy.lifetime_epsilon, result.train_loss, seconds,
    )  # fmt: skip
    metrics = {
        P.NUM_EXAMPLES: plan.declared_examples,  # FedAvg's weight: the declared, public size
        P.PARTITION_ID: pid,
        P.EPSILON: entry.epsilon_cumulative,
        P.ROUND_EPSILON: entry.epsilon_round,
        P.NOISE_MULTIPLIER: plan.noise_multiplier,
        P.SAMPLE_RATE: plan.sample_rate,
        P.STEPS: plan.steps,
        P.MAX_GRAD_NORM: plan.max_grad_norm,
        P.DELTA: policy.delta,
    }
    return _reply(msg, {
        P.ARRAYS: ArrayRecord(model.state_dict()),
        P.METRICS: MetricRecord(metrics),
        P.LEDGER: ConfigRecord({P.LEDGER_ENTRIES: _unsent_entries(context, session)}),
    })  # fmt: skip


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's slice of the test split -- only if the
    holder's policy releases evaluation (``release-evaluation``): loss, accuracy and count on
    private data are not covered by any accountant, so releasing them is the holder's call."""
    cfg = RunConfig.from_mapping(context.run_config)
    pid, _ = holder.partition_ids(context)
    server_round = int(msg.content[P.CONFIG].get("server-round", 0))
    if not holder.policy(cfg, context).release_evaluation:
        return _refuse(msg, pid, server_round, P.POLICY_REFUSED, PolicyRefusal(
            "federated evaluation on private data is not released by this holder's policy "
            "(release-evaluation = false)"
        ))  # fmt: skip
    torch.set_num_threads(cfg.torch_threads)
    try:
        data = _partition(cfg, context)
    except UNUSABLE_DATA as err:
        return _refuse(msg, pid, server_round, P.DATA_UNUSABLE, err)
    if len(data.test) == 0:
        return _refuse(msg, pid, server_round, P.DATA_UNUSABLE, DataError(
            "this holder keeps no test records (its own data all trains): the server "
            "evaluates on its test-data; set fraction-evaluate = 0"
        ))  # fmt: skip
    device = holder.device(context)
    result = evaluate(_model(cfg, data, msg).to(device), to_device(data.test, device))
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: result.num_examples,
            P.PARTITION_ID: pid,
            P.EVAL_LOSS: result.loss,
            P.EVAL_ACCURACY: result.accuracy,
        }
    )
    return _reply(msg, {P.METRICS: metrics})


def _reply(msg: Message, records: dict) -> Message:
    return Message(RecordDict(records), reply_to=msg)


def _refuse(
    msg: Message, pid: int, server_round: int, code: int, refusal: Exception
) -> Message:
    """A refusal is an ordinary reply (so the sealing mod seals it: a server can tell a
    holder's refusal from a forged one), logged on the holder's side too."""
    log.warning("partition %d, round %d refuses: %s", pid, server_round, refusal)
    # what is wrong with the holder's records quotes them: the server learns only that
    reason = HolderDataError.PUBLIC_REASON if isinstance(refusal, HolderDataError) else refusal
    return _reply(msg, {P.REFUSAL: ConfigRecord({"code": code, "reason": str(reason)})})


def _partition(cfg: RunConfig, context: Context) -> Partition:
    data = _load_partition(cfg, context)
    declared = cfg.declared_classes
    if declared and data.classes != declared:
        raise DataError(
            f"this holder's data was prepared for classes {list(data.classes)}, the run "
            f"declares {list(declared)}: re-run `fedvault data prepare --classes` with the "
            "federation's list, or ask the operator which list is right"
        )
    return data


def _load_partition(cfg: RunConfig, context: Context) -> Partition:
    pid, num = holder.partition_ids(context)
    # node config wins: in deployment each client keeps its data at its own path
    encrypted_dir = context.node_config.get("encrypted-data-dir") or cfg.encrypted_data_dir
    if encrypted_dir:
        identity = holder.require_identity(cfg, context, "encrypted-data-dir")
        return _encrypted_partition(
            str(encrypted_dir), pid, str(identity.directory), cfg.text_features
        )
    return load_partition(DataSpec.from_config(cfg), pid, num)


@lru_cache(maxsize=4)
def _encrypted_partition(
    data_dir: str, partition_id: int, key_dir: str, num_features: int
) -> Partition:
    """Decrypted in memory once per process (a simulation actor serves many rounds)."""
    identity = load_own(key_dir)
    return encrypted.load(Path(data_dir), partition_id, identity, num_features)


def _model(cfg: RunConfig, data: Partition, msg: Message) -> torch.nn.Module:
    """A fresh model per round (Opacus cannot wrap a model twice) holding the global weights."""
    model = model_for(cfg, data.num_classes)
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    return model


# -- the session's home -------------------------------------------------------------------------
def _state_path(cfg: RunConfig, context: Context, policy: PrivacyPolicy) -> Path | None:
    directory = holder.state_dir(cfg, context)
    return None if directory is None else state_file(directory, policy)


def _load(
    context: Context, path: Path | None, policy: PrivacyPolicy, key: Identity | None
) -> PrivacySession:
    """From the holder's disk when it has a home (the lifetime), else from this run's
    ``context.state`` (a simulated holder without keys: one run is its whole life)."""
    if path is not None:
        return load_session(path, policy, key)
    if SESSION_KEY in context.state:
        return PrivacySession.from_json(str(context.state[SESSION_KEY]["session"]), policy)
    return PrivacySession.new(policy)


def _store(
    context: Context, path: Path | None, session: PrivacySession, key: Identity | None
) -> None:
    if path is not None:
        save_session(path, session, key)
    else:
        context.state[SESSION_KEY] = ConfigRecord({"session": session.to_json()})


def _unsent_entries(context: Context, session: PrivacySession) -> list[str]:
    """The chain's entries this run's server has not been sent yet: the whole chain with the
    first reply of a run, so every run directory holds complete chains from genesis."""
    sent = int(context.state[SENT_KEY]["seq"]) if SENT_KEY in context.state else 0
    entries = [e.to_json_line() for e in session.ledger.entries if e.seq > sent]
    context.state[SENT_KEY] = ConfigRecord({"seq": len(session.ledger)})
    return entries
