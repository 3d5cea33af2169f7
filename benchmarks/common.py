"""Shared helpers for benchmark suites: timing, peak memory, results file, simulations."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.rundir import RunDir

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
    args = [sys.executable, "-m", "common.ops.cli", "simulate", scenario, "--output-dir", str(out)]
    if clients:
        args += ["--num-clients", str(clients)]
    for s in sets:
        args += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"simulate {scenario} failed:\n{proc.stderr[-3000:]}")
    run_dir = max((p for p in out.iterdir() if RunDir(p).has_metrics()),
                  key=lambda p: p.stat().st_mtime)  # fmt: skip
    metrics = RunDir(run_dir).read_metrics()
    log_text = RunDir(run_dir).log_path.read_text(errors="replace")
    return {"wall_seconds": seconds, "metrics": metrics, "run_dir": str(run_dir),
            "client_train_seconds": client_train_seconds(log_text)}  # fmt: skip


CLIENT_TRAINED = re.compile(
    r"fedvault\.client: partition \d+, round (\d+): .*trained in ([0-9.]+) s"
)


def client_train_seconds(log_text: str, from_round: int = 1) -> list[float]:
    """Each client's ``train_local`` seconds in rounds ≥ ``from_round``, from the clients' own
    log lines: clients do not send their timings to the server (they reveal the data size),
    so a benchmark reads the log of the machine it runs on."""
    return [
        float(m.group(2))
        for m in CLIENT_TRAINED.finditer(log_text)
        if int(m.group(1)) >= from_round
    ]


# --------------------------------------------------------------------------------------------
# process trees, ports, timestamped output (scale and deployment suites)


def import_psutil() -> Any:
    """``psutil``; when it is not installed on its own, the copy Ray vendors."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.path.append(str(Path(next(iter(spec.submodule_search_locations))) / "thirdparty_files"))
        import psutil
    return psutil


def free_port(span: int = 1) -> int:
    """A TCP port on 127.0.0.1 that is free, with the ``span - 1`` ports after it free too."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for extra in range(1, span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port


def process_kind(cmdline: list[str]) -> str:
    """What a process of a Flower run is, from its command line (Ray renames its workers)."""
    text = " ".join(cmdline)
    first = cmdline[0] if cmdline else ""
    for marker, kind in (
        ("flower-superlink", "superlink"),
        ("flower-superexec", "superexec"),
        ("flower-supernode", "supernode"),
        ("flwr-serverapp", "serverapp"),
        ("flwr-simulation", "simulation (Ray driver)"),
        ("flwr-clientapp", "clientapp"),
        ("common.ops.cli", "fedvault simulate"),
    ):
        if marker in text:
            return kind
    if first.startswith("ray::ClientAppActor"):
        return "ray ClientApp actors"
    if first.startswith("ray::IDLE") or "default_worker.py" in text:
        return "ray workers (idle or starting)"
    if "ray" in text:
        return "ray services (raylet, gcs, dashboard...)"
    if "flwr" in first or (len(cmdline) > 1 and cmdline[1].endswith("flwr")):
        return "flwr run"
    return "other"


class TreeMemory:
    """Sample the summed RSS of process trees every ``interval`` s in a background thread.

    ``roots()`` returns the pids whose trees count (looked up again at every sample, so a
    detached process such as Flower's local SuperLink can join once it exists). Peak of
    the sum, and the peak per :func:`process_kind` (each kind's own peak over time).
    A sum of RSS counts shared pages (the same torch libraries mapped by every Python
    process) once per process; every ``pss_every``-th sample also sums PSS (shared pages
    split among their users), which costs tens of ms per large process, hence less often.
    """

    def __init__(self, roots: Any, interval: float = 0.5, pss_every: int = 10) -> None:
        import threading

        self.psutil = import_psutil()
        self.roots = roots
        self.interval = interval
        self.pss_every = pss_every
        self.peak_total = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.peak_by_kind: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        ps = self.psutil
        procs: dict[int, Any] = {}
        for pid in self.roots():
            try:
                root = ps.Process(pid)
                procs[pid] = root
                for child in root.children(recursive=True):
                    procs[child.pid] = child
            except ps.Error:
                continue
        total = pss = 0
        with_pss = self.samples % self.pss_every == 0
        by_kind: dict[str, int] = {}
        for p in procs.values():
            try:
                if with_pss:
                    full = p.memory_full_info()
                    rss, pss = full.rss, pss + full.pss
                else:
                    rss = p.memory_info().rss
                kind = process_kind(p.cmdline())  # again each time: Ray renames workers
            except ps.Error:
                continue
            total += rss
            by_kind[kind] = by_kind.get(kind, 0) + rss
        self.samples += 1
        self.peak_pss = max(self.peak_pss, pss)
        if total > self.peak_total:
            self.peak_total, self.peak_processes = total, len(procs)
        for kind, rss in by_kind.items():
            self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), rss)

    def result(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {
            "peak_tree_rss_mb": self.peak_total / mb,
            "peak_tree_pss_mb": self.peak_pss / mb,
            "pss_sampled_every_s": self.interval * self.pss_every,
            "processes_at_peak": self.peak_processes,
            "peak_rss_mb_by_kind": {k: v / mb for k, v in sorted(self.peak_by_kind.items())},
            "samples": self.samples,
            "interval_s": self.interval,
        }


def timestamped_lines(stream: Any, sink: list[tuple[float, str]]) -> None:
    """Read ``stream`` to its end, keeping ``(arrival time, line)``; for a reader thread."""
    for line in stream:
        sink.append((time.time(), line))


def median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None
