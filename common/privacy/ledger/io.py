"""Ledger files: parse ``ledger.jsonl`` text (unreadable lines become findings), read, write
atomically, append whole fsync'ed lines."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from common.privacy.findings import Finding, where
from common.rundir import RunDir

from .entry import LedgerEntry, LedgerError

LEDGER_FILE = RunDir.LEDGER  # a run directory's copy of every chain


def parse_ledger(text: str) -> tuple[list[LedgerEntry], list[Finding]]:
    """Entries from ``ledger.jsonl`` text; unreadable lines become error findings, not crashes.

    An auditor must see *every* problem in one pass, and a truncated last line (a crash
    mid-write) must not hide the entries before it.
    """
    entries: list[LedgerEntry] = []
    findings: list[Finding] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.from_json_line(line))
        except LedgerError as err:
            pid, rnd = _best_effort_ids(line)
            prefix = where(pid, rnd) if pid is not None else "ledger"
            findings.append(
                Finding(
                    "error", pid, rnd,
                    f"{prefix}: ledger line {number} is unreadable ({err})", "malformed-line",
                )
            )
    return entries, findings


def _best_effort_ids(line: str) -> tuple[int | None, int | None]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    pid, rnd = data.get("partition_id"), data.get("round")
    return (
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None,
    )


def read_ledger(path: str | os.PathLike[str]) -> tuple[list[LedgerEntry], list[Finding]]:
    """:func:`parse_ledger` of a file (``FileNotFoundError`` when it is not there)."""
    return parse_ledger(Path(path).read_text(encoding="utf-8"))


def _lines(entries: Iterable[LedgerEntry]) -> bytes:
    return "".join(e.to_json_line() + "\n" for e in entries).encode("utf-8")


def write_ledger(path: str | os.PathLike[str], entries: Iterable[LedgerEntry]) -> Path:
    """Write all ``entries`` to ``path`` atomically (temp file + ``os.replace``).

    Readers see the old ledger or the new one, never half a line.
    """
    from common.files import PUBLIC_MODE, write_file_atomic

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(target, _lines(entries), mode=PUBLIC_MODE)
    return target


def append_ledger(path: str | os.PathLike[str], entries: Iterable[LedgerEntry]) -> Path:
    """Append ``entries`` (whole lines, fsync'ed): cheap per round for a long run.

    A crash can at worst leave a partial last line, which :func:`parse_ledger` reports as
    one unreadable line without losing the entries before it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = _lines(entries)
    with open(target, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return target
