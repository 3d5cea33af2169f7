"""The ``fedvault`` command: parses arguments and calls the modules that do the work.

User errors (bad config, missing data, wrong key, bad arguments, a file where a directory
belongs, ...) print one line naming the problem and the fix, and exit with status 2; no
traceback. A cancelled ``simulate`` (Ctrl-C, SIGTERM) exits 130.

Building the parser imports nothing heavy (no torch, no opacus): ``--help`` is instant; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.logs import configure_logging

log = logging.getLogger("fedvault.cli")

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as TOML (1, 0.5, true, "x") or else as a string."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE: write e.g. --set target-epsilon=3")
        try:
            result[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            result[key.strip()] = value
    return result


def cmd_simulate(args: argparse.Namespace) -> int:
    from common.ops import scenarios
    from common.ops.simulate import RunCancelled, run_scenario
    from common.rundir import RunDir

    scenario = scenarios.load(args.scenario)
    try:
        result = run_scenario(
            scenario,
            overrides=parse_set(args.set),
            num_clients=args.num_clients,
            output_dir=Path(args.output_dir) if args.output_dir else None,
            verbose=args.verbose,
            ray_address=args.ray_address,
        )
    except RunCancelled as cancelled:
        print(f"fedvault: {cancelled}", file=sys.stderr)
        return 130
    metrics = RunDir(result.run_dir).read_metrics()
    final = metrics["final"]
    eps = final["max_epsilon"]
    print(
        f"scenario {scenario.name}: run {result.run_id} finished in {result.seconds:.1f}s; "
        f"final test accuracy {final['test_accuracy']:.4f}, max ε "
        f"{'n/a (no DP)' if eps is None else f'{eps:.3f}'}"
    )
    print(f"results: {result.run_dir} ({RunDir.METRICS}, {RunDir.MODEL}, {RunDir.LOG})")
    print(f"holders: {result.holders} (--set keys-dir={result.holders} keeps them, and what "
          "they spent, for the next run)")  # fmt: skip
    return _nothing_trained(metrics)


def _nothing_trained(metrics: dict) -> int:
    """Exit status 1, with the first client failure, when no client trained in any round.

    Flower finishes such a run normally, but its model is the untrained initial one: a
    script chaining runs must not mistake it for a result.
    """
    rounds = metrics.get("rounds", [])
    if not rounds or any(r.get("clients") for r in rounds):
        return 0
    failures = [f for r in rounds for f in r.get("failures", [])]
    reason = failures[0]["reason"] if failures else "no client replied"
    print(
        f"error: no client trained in any of the {len(rounds)} rounds (first failure: "
        f"{reason}); fix the cause above and run again",
        file=sys.stderr,
    )
    return 1


def _passphrase(args: argparse.Namespace, confirm: bool = False) -> bytes | None:
    """From $FEDVAULT_PASSPHRASE, or a prompt with --passphrase; None = unprotected."""
    if os.environ.get("FEDVAULT_PASSPHRASE"):
        return os.environ["FEDVAULT_PASSPHRASE"].encode()
    if not getattr(args, "passphrase", False):
        return None
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("passphrase again: ") != first:
        raise ConfigError("the two passphrases differ: run the command again")
    return first.encode()


def cmd_keys_init(args: argparse.Namespace) -> int:
    from common.crypto import fingerprints, init_identity

    init_identity(args.out, args.role, args.name, _passphrase(args, confirm=True), args.force)
    _print_fingerprints(fingerprints(args.out))
    return 0


def cmd_keys_federation(args: argparse.Namespace) -> int:
    from common.federation_keys import provision

    out = Path(args.out).expanduser().resolve()
    provision(out, args.clients)
    print(f"keys for the server and {args.clients} clients in {out}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from common.crypto import fingerprints

    _print_fingerprints(fingerprints(args.dir))
    return 0


def _print_fingerprints(info: dict[str, Any]) -> None:
    for key in ("directory", "role", "name", "x25519_key_id", "ed25519_key_id", "data_key_id",
                "passphrase_protected"):  # fmt: skip
        print(f"{key:22s} {info[key]}")


def _data_identity(args: argparse.Namespace):
    from common.crypto import load_identity
    from common.crypto.errors import WrongKeyError

    identity = load_identity(args.key, _passphrase(args))
    if identity.data_key is None or identity.ids.data is None:
        raise WrongKeyError(f"key dir {args.key} has no data key: pass a client's key dir")
    return identity


def cmd_data_encrypt(args: argparse.Namespace) -> int:
    from common.crypto import encrypt_file

    identity = _data_identity(args)
    size = encrypt_file(args.input, args.output, identity.data_key, identity.ids.data)
    print(f"encrypted {args.input} → {args.output} ({size} bytes) for data key {identity.ids.data}")
    return 0


def cmd_data_decrypt(args: argparse.Namespace) -> int:
    from common.crypto import decrypt_file

    identity = _data_identity(args)
    size = decrypt_file(
        args.input, args.output, identity.data_key, identity.ids.data,
        key_label=f"key dir '{args.key}'",
    )  # fmt: skip
    print(f"decrypted {args.input} → {args.output} ({size} bytes; for inspection only)")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from common.config import OWN_DATA_SOURCES, RunConfig
    from common.data.encrypted import prepare, write_partition

    classes = RunConfig(classes=args.classes).declared_classes
    own = args.dataset in OWN_DATA_SOURCES
    if own and not classes:
        raise ConfigError(
            f"--dataset {args.dataset} needs --classes: the federation's class list, as the "
            "operator declared it (comma-separated)"
        )
    if classes and not own:
        raise ConfigError(f"--classes is for {list(OWN_DATA_SOURCES)}: {args.dataset} has its own")
    if args.partition is not None:  # a deployed client: only its own key dir
        if not 0 <= args.partition < args.clients:
            raise ConfigError(
                f"--partition {args.partition} is not one of the {args.clients} partitions "
                f"(0-{args.clients - 1})"
            )
        if not args.key:
            raise ConfigError("--partition needs --key (this client's identity dir)")
        if own:
            return _prepare_own_data(args, classes)
        target = write_partition(
            Path(args.out), _data_identity(args), args.partition, args.clients,
            dataset=args.dataset, data_dir=args.data_dir or "", seed=args.seed,
            partitioning=args.partitioning, alpha=args.dirichlet_alpha,
        )  # fmt: skip
        print(f"partition {args.partition} of {args.clients} encrypted to {target}")
        return 0
    if not args.keys:
        raise ConfigError("data prepare needs --keys DIR (all clients) or --partition I --key DIR")

    keys = Path(args.keys).expanduser().resolve()
    out = prepare(
        Path(args.out).expanduser().resolve(), keys_dir=keys, dataset=args.dataset,
        num_partitions=args.clients, data_dir=args.data_dir or "", seed=args.seed,
        partitioning=args.partitioning, alpha=args.dirichlet_alpha, classes=classes,
    )  # fmt: skip
    print(f"{args.clients} encrypted partitions in {out}; run with "
          f"--set encrypted-data-dir={out} --set keys-dir={keys}")  # fmt: skip
    return 0


def _prepare_own_data(args: argparse.Namespace, classes: tuple[str, ...]) -> int:
    """One holder's own folder or file: validated, counted on this terminal only, encrypted
    for the holder's own data key."""
    from common.data import holder_share
    from common.data.encrypted import write_share
    from common.data.own import class_counts

    if not args.data_dir:
        raise ConfigError(f"--dataset {args.dataset} needs --data-dir: your folder or file")
    source = Path(args.data_dir).expanduser()
    identity = _data_identity(args)  # a wrong key fails before the data is read
    share = holder_share(
        args.dataset, source, classes, args.partition, args.clients,
        label_column=args.label_column, text_column=args.text_column,
    )  # fmt: skip
    counts = class_counts(share["train_y"].tolist(), classes)
    print(f"{source}: {sum(counts.values())} records (these counts stay on this machine)")
    for name, count in counts.items():
        print(f"  {name:>16s} {count:7d}")
    target = write_share(Path(args.out).expanduser(), identity, share)
    print(f"encrypted for data key {identity.ids.data} to {target}; start your SuperNode "
          f"with FEDVAULT_DATA_DIR={target.parent.resolve()} start-supernode.sh (node config "
          "encrypted-data-dir)")  # fmt: skip
    return 0


def cmd_data_demo_folders(args: argparse.Namespace) -> int:
    from common.ops.demo_data import write_demo_folders

    out = Path(args.out).expanduser().resolve()
    folders = write_demo_folders(out, args.clients, seed=args.seed, alpha=args.dirichlet_alpha)
    for folder, counts in folders.items():
        mix = ", ".join(f"{c}:{n}" for c, n in counts.items() if n)
        print(f"{folder}: {sum(counts.values())} images ({mix})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from common.ops.inference import evaluate_run

    m = evaluate_run(Path(args.run_dir), args.dataset, args.data_dir)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
    print(f"{m['dataset']}: {m['num_examples']} test examples")
    print(f"accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  ROC AUC {auc}")
    print(f"macro precision {m['precision_macro']:.4f}  recall {m['recall_macro']:.4f}  "
          f"F1 {m['f1_macro']:.4f}")  # fmt: skip
    print(f"{'class':>12s} {'precision':>9s} {'recall':>7s} {'F1':>7s} {'support':>8s}")
    for c in m["per_class"]:
        print(f"{c['class']:>12s} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:7.4f} "
              f"{c['support']:8d}")  # fmt: skip
    print("confusion matrix (rows: true, columns: predicted):")
    for row in m["confusion_matrix"]:
        print("  " + " ".join(f"{v:5d}" for v in row))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from common.ops.inference import load_run, predict, read_text_inputs

    run = load_run(Path(args.run_dir))
    if run.kind == "text":
        inputs, unusable = read_text_inputs(args.inputs, args.text)
    elif args.text:
        raise ConfigError("--text is for text models; this run's model classifies images")
    else:
        inputs, unusable = args.inputs, []
    if not inputs and not unusable:
        raise ConfigError("nothing to classify: give files, or texts with --text")
    failed = 0
    for p in [*unusable, *(predict(run, inputs) if inputs else [])]:
        if args.json:
            print(json.dumps(p.to_json()))
        elif p.error:
            print(f"fedvault: error: {p.error}", file=sys.stderr)
        else:
            print(f"{p.label}\t{p.probability:.4f}\t{p.input}")
        failed += p.error is not None
    return 1 if failed else 0


def cmd_provision(args: argparse.Namespace) -> int:
    from common.ops.provision import describe, provision_federation

    fed = provision_federation(
        Path(args.out), args.superlink_host, args.clients, port=args.port,
        extra_hosts=tuple(args.extra_host), force=args.force,
    )  # fmt: skip
    print(describe(fed))
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    """``fedvault superlink status|stop``: this environment's local SuperLink."""
    from common.ops.simulate import stop_local_superlink, superlink_status

    status = superlink_status()
    if args.superlink_command == "status":
        print(f"environment  {status['environment']}")
        print(f"FLWR_HOME    {status['home']}")
        print(f"port         {status['port']}")
        pids = ", ".join(str(s.pid) for s in status["own"])
        print(f"SuperLink    {'running (pid ' + pids + ')' if pids else 'not running'}")
        for other in status["others"]:
            print(f"other        pid {other.pid}, port {other.port}, FLWR_HOME {other.home}, "
                  f"environment {other.bin_dir.parent if other.bin_dir else '?'}")  # fmt: skip
        return 0
    stopped = stop_local_superlink()
    if args.all:
        from common.ops.simulate import _terminate

        stopped += _terminate([s.pid for s in status["others"]], 10.0)
    print(f"stopped SuperLink pid(s) {', '.join(map(str, stopped))}" if stopped
          else "no SuperLink running for this environment")  # fmt: skip
    return 0


def cmd_scenarios(_args: argparse.Namespace) -> int:
    from common.ops import scenarios

    for name in sorted(scenarios.available()):
        print(f"{name:22s} {scenarios.load(name).description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other fedvault error (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    """An argparse type: a whole number ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum} (got {value})")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` after any sub-command too (``fedvault simulate ... -v``), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if "-v" not in child._option_string_actions:
                    child.add_argument("-v", "--verbose", action="store_true",
                                       default=argparse.SUPPRESS, help="debug logging")  # fmt: skip
                _verbose_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedvault", description="Privacy-preserving federated learning on Flower + Opacus."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a scenario in Flower's simulation engine")
    sim.add_argument("scenario", nargs="?", help="name in simulations/ or a .toml path")
    sim.add_argument("--num-clients", type=positive_int, help="simulated clients (SuperNodes)")
    sim.add_argument("--output-dir", help="where run directories go (default: ./runs)")
    sim.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key"
    )
    sim.add_argument(
        "--ray-address", metavar="HOST:PORT",
        help="run the clients on this existing Ray cluster (default: $RAY_ADDRESS, else a "
        "local Ray of the run's own); see docs/scale.md",
    )  # fmt: skip
    sim.set_defaults(func=cmd_simulate)

    lst = sub.add_parser("scenarios", help="list the scenarios in simulations/")
    lst.set_defaults(func=cmd_scenarios)

    link = sub.add_parser("superlink", help="this environment's local SuperLink (simulate's)")
    link_sub = link.add_subparsers(dest="superlink_command", required=True)
    link_sub.add_parser("status", help="its FLWR_HOME, port and process; fedvault's others")
    link_stop = link_sub.add_parser("stop", help="stop it (runs on it end too)")
    link_stop.add_argument("--all", action="store_true",
                           help="also every other environment's fedvault SuperLink")  # fmt: skip
    link.set_defaults(func=cmd_superlink)

    keys = sub.add_parser("keys", help="create and inspect identities (key dirs)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    k_init = keys_sub.add_parser("init", help="create a party's X25519/Ed25519 (+ data) keys")
    k_init.add_argument("--role", choices=["server", "client"], required=True)
    k_init.add_argument("--name", required=True)
    k_init.add_argument("--out", required=True, help="key dir to create")
    k_init.add_argument(
        "--passphrase",
        action="store_true",
        help="protect private keys (prompt, or $FEDVAULT_PASSPHRASE)",
    )
    k_init.add_argument("--force", action="store_true", help="replace existing keys")
    k_init.set_defaults(func=cmd_keys_init)
    k_show = keys_sub.add_parser("show", help="print a key dir's key ids")
    k_show.add_argument("dir")
    k_show.set_defaults(func=cmd_keys_show)
    k_fed = keys_sub.add_parser("federation", help="server + client-<i> key dirs for a simulation")
    k_fed.add_argument("--out", required=True)
    k_fed.add_argument("--clients", type=positive_int, required=True)
    k_fed.set_defaults(func=cmd_keys_federation)

    data = sub.add_parser("data", help="encrypt data sets at rest")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for name, func, helptext in (
        ("encrypt", cmd_data_encrypt, "encrypt a file with a client's data key"),
        ("decrypt", cmd_data_decrypt, "decrypt a file (for inspection only)"),
    ):
        d = data_sub.add_parser(name, help=helptext)
        d.add_argument("input")
        d.add_argument("output")
        d.add_argument("--key", required=True, help="the client's key dir")
        d.add_argument("--passphrase", action="store_true")
        d.set_defaults(func=func)
    prep = data_sub.add_parser("prepare", help="write each client's partition, encrypted")
    prep.add_argument("--dataset", default="digits",
                      help="a built-in data set, or image-folder / text-file (your own data)")
    prep.add_argument("--data-dir", default="",
                      help="image-folder/text-file: your folder or file (with --partition)")
    prep.add_argument("--clients", type=positive_int, required=True)
    prep.add_argument("--keys", help="keys dir with client-<i>/ (keys federation): all clients")
    prep.add_argument("--partition", type=non_negative_int,
                      help="only this client's partition (deployment)")  # fmt: skip
    prep.add_argument("--key", help="with --partition: this client's identity dir")
    prep.add_argument("--passphrase", action="store_true")
    prep.add_argument("--out", required=True)
    prep.add_argument("--seed", type=int, default=42)
    prep.add_argument("--partitioning", choices=["iid", "dirichlet"], default="iid")
    prep.add_argument("--dirichlet-alpha", type=float, default=0.5)
    prep.add_argument("--classes", default="",
                      help="image-folder/text-file: the federation's classes, comma-separated")
    prep.add_argument("--label-column", default="label", help="text-file .csv: label column")
    prep.add_argument("--text-column", default="text", help="text-file .csv: text column")
    prep.set_defaults(func=cmd_data_prepare)
    demo = data_sub.add_parser(
        "demo-folders", help="holders' image folders (and a test folder) from the bundled digits"
    )
    demo.add_argument("--out", required=True)
    demo.add_argument("--clients", type=positive_int, default=2)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--dirichlet-alpha", type=float, default=0.5,
                      help="how different the holders' label mixes are (smaller: more)")
    demo.set_defaults(func=cmd_data_demo_folders)

    ev = sub.add_parser("evaluate", help="metrics of a run's final model on a test split")
    ev.add_argument("run_dir")
    ev.add_argument("--dataset", help="default: the run's own")
    ev.add_argument("--data-dir",
                    help="image-folder/text-file: the held-out folder or file itself")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify images or texts with a run's final model")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="*", help="image files, or text files (one text a line)")
    pr.add_argument("--text", action="append", default=[], metavar="TEXT",
                    help="a text to classify (text models; repeat for more)")  # fmt: skip
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    prov = sub.add_parser("provision", help="CA, TLS and keys for a deployed federation")
    prov.add_argument("--out", required=True, help="federation dir to create")
    prov.add_argument("--superlink-host", required=True, help="name or IP SuperNodes dial")
    prov.add_argument("--clients", type=positive_int, required=True)
    prov.add_argument("--port", type=int, default=8000, help="SuperLink port (default 8000)")
    prov.add_argument("--extra-host", action="append", default=[], help="another SAN")
    prov.add_argument("--force", action="store_true", help="replace an existing federation")
    prov.set_defaults(func=cmd_provision)

    from common.ops.audit_cli import add_commands

    add_commands(sub)  # `fedvault report` and `fedvault audit` (no torch: ~0.3 s to import)

    from common.ops.approved_app import add_commands as add_approved_app_commands

    add_approved_app_commands(sub)  # `fedvault fab-hash` and `fedvault clientapp`
    _verbose_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("fedvault: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedvault evaluate RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        return 0
    except Exception as err:  # user errors: one line, no traceback
        if _is_user_error(err):
            print(f"fedvault: error: {_error_text(err)}", file=sys.stderr)
            return 2
        raise


def _error_text(err: Exception) -> str:
    from common.logs import one_line

    if isinstance(err, OSError) and err.filename and not isinstance(err, FileNotFoundError):
        # PermissionError, FileExistsError, NotADirectoryError, ...: which path, and why
        path = Path(str(err.filename))
        if isinstance(err, (FileExistsError, NotADirectoryError)) and not path.is_dir():
            what = "is a file (or under one), where a directory is needed"
        elif isinstance(err, PermissionError):
            what = "cannot be written (permission denied)"
        else:
            what = f"cannot be used ({err.strerror or type(err).__name__})"
        return f"{err.filename} {what}: choose another path"
    return one_line(err)


# Error classes of modules the commands import when they run: an error can only be one of
# them if its module is loaded, so checking needs no import (no torch on the error path).
USER_ERROR_CLASSES = (
    ("common.crypto.errors", "CryptoError"),
    ("common.data.sources", "DataError"),
    ("common.ops.deploy", "DeployError"),
    ("common.ops.inference", "InferenceError"),
    ("common.ops.simulate", "SimulationError"),
)


def _is_user_error(err: Exception) -> bool:
    if isinstance(err, OSError) and err.filename:  # a path the user gave: one line
        return True
    if isinstance(err, USER_ERRORS):
        return True
    for module, name in USER_ERROR_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
