"""fedvault ServerApp: FedAvg rounds, central evaluation, and the run directory.

Writes into ``<output-dir>/<run-id>/`` (:class:`common.rundir.RunDir` names the files): the
metrics after every round, the ledger, the final model, the clients' public keys and the
report. While it runs, the pid file names the process it runs in (Flower's simulation
process), so ``fedvault simulate`` can end that process and everything under it when the user
cancels the run.

An error the user can fix (bad config, missing or corrupt data, wrong keys, a client whose
data is unusable) is logged as ONE line starting ``fedvault error: `` and re-raised, so Flower
still marks the run failed; ``fedvault simulate`` prints that line, not the traceback.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import federation_keys
from common.config import OWN_DATA_SOURCES, ConfigError, RunConfig
from common.crypto import CryptoError
from common.data import DataError, DataSpec, load_raw_cached, load_test_set
from common.devices import pick_device, to_device
from common.files import write_json_atomic
from common.logs import configure_logging, user_error_line
from common.metrics import evaluate_with_metrics
from common.models import count_parameters, model_for
from common.report import write_report
from common.rundir import RunDir
from server.grid import PollingGrid
from server.run_record import RunRecord
from server.sealing import ServerSealer
from server.strategy import RecordingFedAvg, RunAborted

log = logging.getLogger("fedvault.server")
app = ServerApp()

# Errors whose message tells the user what to fix (ConfigError is a ValueError).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, DataError, CryptoError, OSError, RunAborted,
)


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    run_dir = _write_pid_file(context)
    try:
        _run(grid, context)
    except USER_ERRORS as err:
        log.error(user_error_line(err))
        raise
    finally:
        if run_dir is not None:
            run_dir.clear_pid()


def _write_pid_file(context: Context) -> RunDir | None:
    """The run's pid file: this process, for ``fedvault simulate``'s cancellation.
    Best effort: a run config bad enough to break this fails in :func:`_run` with its reason."""
    try:
        out = Path(str(context.run_config.get("output-dir") or "runs")).expanduser().resolve()
        run_dir = RunDir(out / str(context.run_id))
        run_dir.write_pid(os.getpid())
        return run_dir
    except (OSError, ValueError):
        return None


def _run(grid: Grid, context: Context) -> None:
    started = time.time()
    cfg = RunConfig.from_mapping(context.run_config)
    # Flower's grid sleeps 3 s between pulls for replies; every phase would end that late.
    grid = PollingGrid(grid, max_interval=cfg.reply_poll_interval)
    run_dir = RunDir(Path(cfg.output_dir).expanduser().resolve() / str(context.run_id))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    log.info("run %s: results in %s", context.run_id, run_dir.path)

    spec = DataSpec.from_config(cfg)
    raw = load_raw_cached(spec)
    test_set = load_test_set(spec)
    torch.manual_seed(cfg.seed)  # the initial global model is reproducible (and public)
    model = model_for(cfg, raw.num_classes)
    initial = ArrayRecord(model.state_dict())
    record = RunRecord(
        run_dir,
        config=cfg.to_mapping(),
        summary={
            "run_id": context.run_id,
            "dataset": cfg.dataset,
            "classes": list(raw.classes),
            # a holder-owned source's training data never reaches the server
            "train_examples": None if cfg.dataset in OWN_DATA_SOURCES else len(raw.train_y),
            "test_examples": len(raw.test_y),
            "model": cfg.model,
            "trainable_parameters": count_parameters(model),
            "update_bytes": initial.count_bytes(),
        },
        started_at=started,
    )
    strategy = RecordingFedAvg(
        seed=cfg.seed,
        record=record,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_train_nodes,
    )

    # a GPU if the ServerApp's process sees one (common.devices): the test set goes once
    device = pick_device()
    model.to(device)
    test_set = to_device(test_set, device)
    log.info("central evaluation on %s", device)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_started = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        m = evaluate_with_metrics(model, test_set, raw.num_classes, list(raw.classes))
        seconds = time.perf_counter() - eval_started
        if server_round == 0:
            record.initial = {"test_accuracy": m["accuracy"], "test_loss": m["loss"]}
            record.summary["initial_eval_s"] = seconds  # part of startup_s
        else:
            record.add_timing(server_round, central_eval_s=seconds)
            rec = record.finish_round(server_round, m)
            if rec.max_epsilon is not None:
                eps = f"{rec.max_epsilon:.3f}"
            else:
                eps = "n/a (no client trained)" if cfg.dp else "n/a (dp = false)"
            log.info(
                "round %d/%d: test accuracy %.4f, macro F1 %.4f, test loss %.4f, max ε %s "
                "(budget %s), %d clients trained, %d refused/failed",
                server_round, cfg.num_server_rounds, m["accuracy"], m["f1_macro"], m["loss"], eps,
                cfg.target_epsilon if cfg.dp else "none", len(rec.clients), len(rec.failures),
            )
        return MetricRecord({"accuracy": m["accuracy"], "loss": m["loss"], "f1": m["f1_macro"]})

    if cfg.encrypt_updates:
        strategy.sealer = _sealer(cfg, context.run_id, strategy.partition_of)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({"dp": cfg.dp}),
        evaluate_fn=central_evaluation,
    )
    torch.save(result.arrays.to_torch_state_dict(), run_dir.model_path)
    record.summary["wall_seconds"] = time.time() - started
    record.write()
    _publish_client_keys(cfg, run_dir)
    paths = write_report(run_dir.path)
    log.info("privacy report: %s", paths["html"])
    log.info("run %s finished in %.1fs: %s", context.run_id, time.time() - started, run_dir.path)


def _sealer(cfg: RunConfig, run_id: int, partition_of: dict[int, int]) -> ServerSealer:
    """The server identity and every client's public key, from ``keys-dir``."""
    if not cfg.keys_dir:
        raise ConfigError(
            "encrypt-updates = true needs keys-dir (create one with `fedvault keys federation`)"
        )
    keys = Path(cfg.keys_dir)
    identity = federation_keys.load_own(federation_keys.server_dir(keys))
    clients = federation_keys.client_publics(keys)
    log.info(
        "updates sealed end to end: %s; %d client keys registered",
        federation_keys.describe(identity), len(clients),
    )
    return ServerSealer(run_id, identity, clients, lambda node: partition_of.get(node, -1))


def _publish_client_keys(cfg: RunConfig, run_dir: RunDir) -> None:
    """Copy clients' public keys next to the ledger so ``fedvault audit`` can check signatures.

    An auditor who does not trust the server passes keys obtained from the clients instead.
    """
    if not cfg.keys_dir:
        return
    run_dir.keys_dir.mkdir(exist_ok=True)
    for pid, public in federation_keys.client_publics(Path(cfg.keys_dir)).items():
        write_json_atomic(run_dir.client_key_path(pid), public.to_dict())
