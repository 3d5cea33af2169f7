"""Reading a run directory: ``metrics.json`` (the server's record) and ``ledger.jsonl``.

Kept apart from the audit and the report so both read a run the same way, and so a run
directory missing one of the files still yields everything the other one can say.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.privacy.findings import Finding
from common.privacy.ledger import LedgerEntry, read_ledger
from common.rundir import RunDir, RunDirError

log = logging.getLogger("fedvault.audit.rundata")


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
    run = RunDir.existing(run_dir)
    root = run.path
    if not run.has_metrics() and (need_metrics or not run.ledger_path.exists()):
        raise RunDirError(
            f"'{root}' has no {RunDir.METRICS}"
            + ("" if need_metrics else f" and no {RunDir.LEDGER}")
            + ": pass a run directory written by a fedvault run (runs/<run-id>)"
        )
    data = RunData(root, run.read_metrics() if run.has_metrics() else None)
    if run.ledger_path.exists():
        data.entries, data.ledger_problems = read_ledger(run.ledger_path)
        data.ledger_present = True
    return data


def metrics_clients(data: RunData) -> dict[tuple[int, int], dict[str, Any]]:
    """``(partition_id, round) → client record`` from metrics.json's rounds."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for rec in data.rounds:
        for client in rec.get("clients") or []:
            out[(int(client["partition_id"]), int(rec["round"]))] = client
    return out
