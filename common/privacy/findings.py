"""Findings: one problem an audit reports, as one line naming the client and round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in a ledger. ``message`` is one line naming client and round."""

    severity: Severity
    partition_id: int | None
    round: int | None
    message: str
    code: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def where(partition_id: int | None, rounds: int | Sequence[int] | None = None) -> str:
    """``client 2, round 3`` / ``client 2, rounds 1-4, 7`` / ``client 2`` -- message prefixes."""
    parts = []
    if partition_id is not None:
        parts.append(f"client {partition_id}")
    if isinstance(rounds, int):
        parts.append(f"round {rounds}")
    elif rounds and len(set(rounds)) == 1:
        parts.append(f"round {next(iter(rounds))}")
    elif rounds:
        parts.append(f"rounds {_ranges(rounds)}")
    return ", ".join(parts) or "run"


def finding(
    severity: Severity,
    code: str,
    partition_id: int | None,
    rounds: int | Sequence[int] | None,
    text: str,
) -> Finding:
    """A :class:`Finding` whose message starts with :func:`where` (kept on one line)."""
    first = rounds if isinstance(rounds, int) else (min(rounds) if rounds else None)
    message = f"{where(partition_id, rounds)}: {' '.join(text.split())}"
    return Finding(severity, partition_id, first, message, code)


def _ranges(values: Sequence[int]) -> str:
    ordered = sorted(set(values))
    spans: list[str] = []
    start = prev = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(spans)
