"""Reading a run directory: ``metrics.json`` (the server's record) and ``ledger.jsonl``.

Kept apart from the audit and the report so both read a run the same way, and so a run
directory missing one of the files still yields everything the other one can say.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.logs import one_line
from common.privacy.findings import Finding
from common.privacy.ledger import LEDGER_FILE, LedgerEntry, read_ledger

log = logging.getLogger("fedvault.report.rundata")

METRICS_FILE = "metrics.json"


class RunDirError(FileNotFoundError):
    """Not a run directory, or its metrics.json is unreadable (a user error: exit 2).

    The one error for a bad run directory, whoever reads it: the audit, the report, and
    ``fedvault evaluate`` / ``predict`` (common/ops/inference.py)."""


@dataclass
class RunData:
    """Everything the audit and the report read from one run directory."""

    run_dir: Path
    metrics: dict[str, Any] | None
    entries: list[LedgerEntry] = field(default_factory=list)
    ledger_problems: list[Finding] = field(default_factory=list)
    ledger_present: bool = False

    @property
    def config(self) -> dict[str, Any]:
        return dict((self.metrics or {}).get("config") or {})

    @property
    def summary(self) -> dict[str, Any]:
        return dict((self.metrics or {}).get("summary") or {})

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list((self.metrics or {}).get("rounds") or [])

    @property
    def final(self) -> dict[str, Any]:
        return dict((self.metrics or {}).get("final") or {})

    @property
    def dp(self) -> bool:
        """DP on unless the config says ``dp = false`` (a ledger alone implies DP)."""
        return bool(self.config.get("dp", True))

    @property
    def run_id(self) -> str:
        """From metrics.json, else the ledger, else the directory name (runs/<run-id>)."""
        if self.summary.get("run_id") is not None:
            return str(self.summary["run_id"])
        if self.entries:
            return self.entries[0].run_id
        return self.run_dir.name


def load_run(run_dir: str | os.PathLike[str], *, need_metrics: bool = False) -> RunData:
    """Read ``run_dir``; ``RunDirError`` if it holds neither file (or metrics when needed)."""
    root = _run_dir(run_dir)
    metrics_path = root / METRICS_FILE
    ledger_path = root / LEDGER_FILE
    if not metrics_path.exists() and (need_metrics or not ledger_path.exists()):
        raise RunDirError(
            f"'{root}' has no {METRICS_FILE}"
            + ("" if need_metrics else f" and no {LEDGER_FILE}")
            + ": pass a run directory written by a fedvault run (runs/<run-id>)"
        )
    data = RunData(root, read_metrics(root) if metrics_path.exists() else None)
    if ledger_path.exists():
        data.entries, data.ledger_problems = read_ledger(ledger_path)
        data.ledger_present = True
    return data


def read_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``run_dir``'s metrics.json as a dict; ``RunDirError`` (one line, naming the path)
    when the directory or the file is missing or the file is not a JSON object."""
    metrics_path = _run_dir(run_dir) / METRICS_FILE
    if not metrics_path.is_file():
        raise RunDirError(
            f"{metrics_path} not found: '{metrics_path.parent}' is not a fedvault run "
            "directory; pass <output-dir>/<run-id> (e.g. runs/<run-id>)"
        )
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{metrics_path} cannot be read ({one_line(err)}): re-run") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"{metrics_path} is not a JSON object: is it a fedvault metrics.json?")
    return metrics


def _run_dir(run_dir: str | os.PathLike[str]) -> Path:
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise RunDirError(
            f"run directory '{root}' does not exist: pass a folder a run wrote "
            "(<output-dir>/<run-id>, e.g. runs/<run-id>)"
        )
    return root


def metrics_clients(data: RunData) -> dict[tuple[int, int], dict[str, Any]]:
    """``(partition_id, round) → client record`` from metrics.json's rounds."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for rec in data.rounds:
        for client in rec.get("clients") or []:
            out[(int(client["partition_id"]), int(rec["round"]))] = client
    return out
