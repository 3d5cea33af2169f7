"""Shared helpers for benchmark suites: timing, peak memory, results file, simulations."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children), MB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def save(suite: str, data: dict[str, Any]) -> None:
    """Merge one suite's numbers into benchmarks/results.json."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[suite] = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def simulate(scenario: str, out: Path, *sets: str, clients: int | None = None) -> dict[str, Any]:
    """Run ``fedvault simulate``; return wall seconds and the run's metrics.json."""
    args = [sys.executable, "-m", "common.cli", "simulate", scenario, "--output-dir", str(out)]
    if clients:
        args += ["--num-clients", str(clients)]
    for s in sets:
        args += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"simulate {scenario} failed:\n{proc.stderr[-3000:]}")
    run_dir = max((p for p in out.iterdir() if (p / "metrics.json").exists()),
                  key=lambda p: p.stat().st_mtime)  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_seconds": seconds, "metrics": metrics, "run_dir": str(run_dir)}
