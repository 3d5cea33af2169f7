"""``python -m benchmarks [--quick] [SUITE ...]``: print tables, write benchmarks/results.json."""

from __future__ import annotations

import argparse
import importlib

SUITES = ["crypto", "dp", "simulation", "scale", "deployment", "gpu"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("suites", nargs="*", default=SUITES, choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="skip the slow end-to-end parts")
    args = parser.parse_args()
    for suite in args.suites:
        importlib.import_module(f"benchmarks.{suite}").run(quick=args.quick)
    print("results: benchmarks/results.json")


if __name__ == "__main__":
    main()
