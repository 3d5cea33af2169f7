"""A run directory, ``<output-dir>/<run-id>/``: the one owner of its file names and formats.

The ServerApp writes it (metrics after every round, the ledger, the final model, the clients'
public keys, the report); ``fedvault simulate`` adds the log and, on Ctrl-C, the cancellation
mark; the audit, the report and ``fedvault evaluate`` / ``predict`` read it. Every one of them
names the files through :class:`RunDir`, so a file is spelled once.

Light on purpose (no torch, no Opacus): ``fedvault simulate`` and ``--help`` import it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from common.files import PUBLIC_MODE, read_json_object, write_file_atomic, write_json_atomic


class RunDirError(FileNotFoundError):
    """Not a run directory, or its metrics.json is unreadable (a user error: exit 2).

    The one error for a bad run directory, whoever reads it: the audit, the report, and
    ``fedvault evaluate`` / ``predict``."""


class RunDir:
    """``<output-dir>/<run-id>/`` and what lies in it.

    ``RunDir(path)`` names the files of a directory that may not exist yet (the writer's
    view); :meth:`existing` is the reader's, refusing a path that is not a folder.
    """

    METRICS = "metrics.json"  # the server's record of every round (common/ops, audit, report)
    LEDGER = "ledger.jsonl"  # the holders' signed, hash-chained ledgers
    MODEL = "model.pt"  # the final global model's state_dict
    KEYS = "keys"  # keys/client-<i>.json: the public keys the ledger's signatures verify against
    LOG = "simulation.log"  # Flower's log of a `fedvault simulate` run
    CANCELLED = "CANCELLED"  # present when the run was cancelled (Ctrl-C, SIGTERM)
    SERVERAPP_PID = ".serverapp.pid"  # while the ServerApp runs: its process id
    REPORTS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"html": "report.html", "json": "report.json", "md": "report.md"}
    )

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def existing(cls, path: str | os.PathLike[str]) -> RunDir:
        """The run directory at ``path``; ``RunDirError`` (one line) if there is no folder."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise RunDirError(
                f"run directory '{root}' does not exist: pass a folder a run wrote "
                "(<output-dir>/<run-id>, e.g. runs/<run-id>)"
            )
        return cls(root)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths -------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def ledger_path(self) -> Path:
        return self.path / self.LEDGER

    @property
    def model_path(self) -> Path:
        return self.path / self.MODEL

    @property
    def keys_dir(self) -> Path:
        return self.path / self.KEYS

    def client_key_path(self, partition_id: int) -> Path:
        return self.keys_dir / f"client-{partition_id}.json"

    @property
    def log_path(self) -> Path:
        return self.path / self.LOG

    @property
    def cancelled_path(self) -> Path:
        return self.path / self.CANCELLED

    @property
    def pid_path(self) -> Path:
        return self.path / self.SERVERAPP_PID

    def report_paths(self) -> dict[str, Path]:
        """``{"html": …, "json": …, "md": …}``."""
        return {kind: self.path / name for kind, name in self.REPORTS.items()}

    # -- metrics.json ------------------------------------------------------------------------
    def has_metrics(self) -> bool:
        return self.metrics_path.is_file()

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json as a dict; ``RunDirError`` (one line, naming the path) when the file
        is missing or is not a JSON object."""
        if not self.has_metrics():
            raise RunDirError(
                f"{self.metrics_path} not found: '{self.path}' is not a fedvault run "
                "directory; pass <output-dir>/<run-id> (e.g. runs/<run-id>)"
            )
        return read_json_object(
            self.metrics_path, what="metrics file", error=RunDirError,
            fix="is it a fedvault metrics.json? re-run to write it again",
        )  # fmt: skip

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Atomically, so an interrupted run still leaves the rounds it completed."""
        self.path.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(self.metrics_path, metrics)

    def mark_cancelled(self, why: str) -> int:
        """Write ``CANCELLED`` and set ``summary.cancelled`` in metrics.json (when the run got
        that far); returns the number of completed rounds kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        rounds = 0
        try:
            metrics: dict[str, Any] | None = self.read_metrics()
        except RunDirError:
            metrics = None
        if metrics is not None:
            rounds = len(metrics.get("rounds", []))
            summary = metrics.setdefault("summary", {})
            summary |= {"cancelled": True, "cancelled_by": why, "cancelled_after_rounds": rounds}
            self.write_metrics(metrics)
        note = (
            f"cancelled by {why} at {time.strftime('%Y-%m-%d %H:%M:%S')} after {rounds} "
            "completed round(s)\n"
        )
        write_file_atomic(self.cancelled_path, note.encode("utf-8"), mode=PUBLIC_MODE)
        return rounds

    # -- the ServerApp's pid file --------------------------------------------------------------
    def write_pid(self, pid: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.pid_path.write_text(str(pid), encoding="utf-8")

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def clear_pid(self) -> None:
        self.pid_path.unlink(missing_ok=True)
