"""fedvault ClientApp: local DP-SGD on this node's partition, nothing but the update leaves.

Per node (``context``) for the whole run it keeps one privacy account: σ calibrated once for
the planned run, and the accountant history every round appends to. A round that would
cross the node's budget is refused with an error reply; the server leaves the node out.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import persistence
from client.keyring import own_identity
from client.sealing_mod import sealing_mod
from client.training import DPSettings, train_local
from common import protocol as P
from common.config import RunConfig
from common.crypto import Identity
from common.data import Partition, encrypted, load_partition
from common.evaluation import evaluate
from common.federation_keys import load_own
from common.logs import configure_logging
from common.models import model_for
from common.privacy.accounting import (
    PrivacyAccount,
    PrivacyBudgetExceeded,
    calibrate_noise,
    sample_rate_for,
    steps_per_epoch,
)
from common.privacy.ledger import ClientLedger

log = logging.getLogger("fedvault.client")
app = ClientApp(mods=[sealing_mod])

STATE_KEY = "fedvault-privacy"
LEDGER_KEY = "fedvault-ledger"


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    pid, num = _partition_ids(context)
    info = ConfigRecord({P.PARTITION_ID: pid, "num-partitions": num})
    return Message(RecordDict({P.NODE_INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the global weights in ``msg``."""
    configure_logging()
    cfg = RunConfig.from_mapping(context.run_config)
    torch.set_num_threads(cfg.torch_threads)
    pid, _ = _partition_ids(context)
    data = _partition(cfg, context)
    server_round = int(msg.content[P.CONFIG].get("server-round", 0))
    model = _model(cfg, data, msg)

    account = None
    dp = None
    if cfg.dp:
        account = _privacy_account(cfg, context, len(data.train))
        steps = cfg.local_epochs * steps_per_epoch(len(data.train), cfg.batch_size)
        try:
            epsilon_after = account.check_round(steps)
        except PrivacyBudgetExceeded as refusal:
            log.warning("partition %d, round %d: %s", pid, server_round, refusal)
            return Message(Error(P.PRIVACY_BUDGET_EXHAUSTED, str(refusal)), reply_to=msg)
        dp = DPSettings(
            account.noise_multiplier, cfg.max_grad_norm, cfg.accountant, cfg.grad_sample_mode
        )

    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    started = time.perf_counter()
    result = train_local(
        model,
        data.train,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        momentum=cfg.momentum,
        dp=dp,
    )
    metrics: dict[str, float | int] = {
        P.NUM_EXAMPLES: result.num_examples,
        P.PARTITION_ID: pid,
        P.TRAIN_LOSS: result.train_loss,
        P.TRAIN_SECONDS: time.perf_counter() - started,
    }
    if account is not None and result.mechanism is not None:
        sigma, q, steps_taken = result.mechanism
        planned = (account.noise_multiplier, account.sample_rate, steps)
        if result.mechanism != planned:  # the ledger must say what was actually spent
            raise RuntimeError(f"Opacus ran {result.mechanism}, but the plan was {planned}")
        account.record(steps_taken)
        ledger = _ledger(context, pid)
        entry = ledger.append(
            round=server_round, num_examples=result.num_examples, sample_rate=q,
            steps=steps_taken, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
            delta=cfg.target_delta, accountant=cfg.accountant, epsilon_cumulative=epsilon_after,
            epsilon_budget=cfg.target_epsilon, signer=_state_identity(cfg, context, pid),
        )  # fmt: skip
        _save_state(cfg, context, pid, account, ledger)
        records[P.LEDGER] = ConfigRecord({"entry": entry.to_json_line()})
        metrics |= {
            P.EPSILON: epsilon_after,
            P.ROUND_EPSILON: entry.epsilon_round,  # the ledger's increase of cumulative ε
            P.NOISE_MULTIPLIER: sigma,
            P.SAMPLE_RATE: q,
            P.STEPS: steps_taken,
            P.MAX_GRAD_NORM: cfg.max_grad_norm,
            P.DELTA: cfg.target_delta,
        }
        log.info(
            "partition %d, round %d: %d steps, σ=%.4f, q=%.4f, ε %.4f → %.4f (budget %g)",
            pid, server_round, steps_taken, sigma, q, epsilon_after - entry.epsilon_round,
            epsilon_after,
            cfg.target_epsilon,
        )
    records[P.ARRAYS] = ArrayRecord(model.state_dict())
    records[P.METRICS] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's slice of the test split.

    Reports the handler's wall seconds (partition, model, scoring) as ``eval-seconds``, so
    the server can tell client compute from waiting in its round timing."""
    started = time.perf_counter()
    cfg = RunConfig.from_mapping(context.run_config)
    torch.set_num_threads(cfg.torch_threads)
    pid, _ = _partition_ids(context)
    data = _partition(cfg, context)
    result = evaluate(_model(cfg, data, msg), data.test)
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: result.num_examples,
            P.PARTITION_ID: pid,
            P.EVAL_LOSS: result.loss,
            P.EVAL_ACCURACY: result.accuracy,
            P.EVAL_SECONDS: time.perf_counter() - started,
        }
    )
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


def _partition_ids(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config lacks {missing}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def _partition(cfg: RunConfig, context: Context) -> Partition:
    pid, num = _partition_ids(context)
    # node config wins: in deployment each client keeps its data at its own path
    encrypted_dir = context.node_config.get("encrypted-data-dir") or cfg.encrypted_data_dir
    if encrypted_dir:
        identity = own_identity(cfg, context, pid, "encrypted-data-dir")
        return _encrypted_partition(
            str(encrypted_dir), pid, str(identity.directory), cfg.text_features
        )
    return load_partition(
        cfg.dataset,
        cfg.data_dir,
        cfg.seed,
        pid,
        num,
        cfg.partitioning,
        cfg.dirichlet_alpha,
        cfg.text_features,
    )


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


def _state_identity(cfg: RunConfig, context: Context, pid: int) -> Identity | None:
    """The key that encrypts the on-disk state, when this client has one."""
    if not (context.node_config.get("key-dir") or cfg.keys_dir):
        return None
    return own_identity(cfg, context, pid, "state-dir")


def _ledger(context: Context, pid: int) -> ClientLedger:
    """This client's hash chain for the run (restored with the account, see below)."""
    if LEDGER_KEY in context.state:
        return ClientLedger.from_json(str(context.state[LEDGER_KEY]["ledger"]))
    return ClientLedger(str(context.run_id), pid, str(context.node_id))


def _save_state(
    cfg: RunConfig, context: Context, pid: int, account: PrivacyAccount, ledger: ClientLedger
) -> None:
    """Keep account and ledger in ``context.state`` and, with ``state-dir``, on disk."""
    context.state[STATE_KEY] = ConfigRecord({"account": account.to_json()})
    context.state[LEDGER_KEY] = ConfigRecord({"ledger": ledger.to_json()})
    if state_dir := context.node_config.get("state-dir"):
        path = persistence.state_path(str(state_dir), context.run_id)
        state = {"account": account.to_json(), "ledger": ledger.to_json()}
        persistence.save(path, state, _state_identity(cfg, context, pid))


def _privacy_account(cfg: RunConfig, context: Context, num_examples: int) -> PrivacyAccount:
    """This node's account: from ``context.state``, from ``state-dir`` after a restart, or
    new (σ calibrated once)."""
    if STATE_KEY in context.state:
        return PrivacyAccount.from_json(str(context.state[STATE_KEY]["account"]))
    if state_dir := context.node_config.get("state-dir"):
        pid = int(context.node_config["partition-id"])
        path = persistence.state_path(str(state_dir), context.run_id)
        saved = persistence.load(path, _state_identity(cfg, context, pid))
        if saved is not None:
            account = PrivacyAccount.from_json(saved["account"])
            if "ledger" in saved:
                context.state[LEDGER_KEY] = ConfigRecord({"ledger": saved["ledger"]})
            log.info("restored privacy state from %s: ε spent %.4f", path, account.spent())
            return account
    q = sample_rate_for(num_examples, cfg.batch_size)
    planned_steps = (
        cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch(num_examples, cfg.batch_size)
    )
    sigma = cfg.noise_multiplier or calibrate_noise(
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        sample_rate=q,
        total_steps=planned_steps,
        accountant=cfg.accountant,
    )
    log.info(
        "privacy plan: σ=%.4f for %d steps at q=%.4f → ε ≤ %g at δ=%g (%s)",
        sigma, planned_steps, q, cfg.target_epsilon, cfg.target_delta, cfg.accountant,
    )
    return PrivacyAccount(cfg.accountant, cfg.target_epsilon, cfg.target_delta, sigma, q)
