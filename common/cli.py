"""The ``fedvault`` command: parses arguments and calls the modules that do the work.

User errors (bad config, missing data, wrong key, ...) print one line naming the problem
and the fix, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    from common import scenarios
    from common.simulate import run_scenario

    scenario = scenarios.load(args.scenario)
    result = run_scenario(
        scenario,
        overrides=parse_set(args.set),
        num_clients=args.num_clients,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        verbose=args.verbose,
    )
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    final = metrics["final"]
    eps = final["max_epsilon"]
    print(
        f"scenario {scenario.name}: run {result.run_id} finished in {result.seconds:.1f}s; "
        f"final test accuracy {final['test_accuracy']:.4f}, max ε "
        f"{'n/a (no DP)' if eps is None else f'{eps:.3f}'}"
    )
    print(f"results: {result.run_dir} (metrics.json, model.pt, simulation.log)")
    return 0


def cmd_scenarios(_args: argparse.Namespace) -> int:
    from common import scenarios

    for name in sorted(scenarios.available()):
        print(f"{name:22s} {scenarios.load(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvault", description="Privacy-preserving federated learning on Flower + Opacus."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a scenario in Flower's simulation engine")
    sim.add_argument("scenario", nargs="?", help="name in simulations/ or a .toml path")
    sim.add_argument("--num-clients", type=int, help="simulated clients (SuperNodes)")
    sim.add_argument("--output-dir", help="where run directories go (default: ./runs)")
    sim.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key"
    )
    sim.set_defaults(func=cmd_simulate)

    lst = sub.add_parser("scenarios", help="list the scenarios in simulations/")
    lst.set_defaults(func=cmd_scenarios)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("fedvault: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user errors: one line, no traceback
        if _is_user_error(err):
            print(f"fedvault: error: {err}", file=sys.stderr)
            return 2
        raise


def _is_user_error(err: Exception) -> bool:
    from common.data.sources import DataError
    from common.simulate import SimulationError

    return isinstance(err, (*USER_ERRORS, DataError, SimulationError))


if __name__ == "__main__":
    sys.exit(main())
