"""``write_report``: report.html, report.json and report.md into the run directory."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.audit.audit import DEFAULT_TOLERANCE, audit_run
from common.audit.rundata import load_run
from common.report.content import build_report
from common.report.render_html import render_html
from common.report.render_md import render_md
from common.rundir import RunDir

log = logging.getLogger("fedvault.report.build")


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    keys_dir: str | os.PathLike[str] | None = None,
    audit: bool = True,
    workers: int = 1,
) -> dict[str, Path]:
    """Write the three report files into ``run_dir``; returns ``{"html"|"json"|"md": path}``.

    The audit runs first (``audit=False`` skips it, the report then says "not run"), so the
    report carries a verdict rather than repeating numbers nobody checked. Needs the run's
    metrics.json (``RunDirError`` otherwise); works without a ledger and without DP.
    ``workers``: see :func:`audit_run`.
    """
    from common.files import PUBLIC_MODE, write_file_atomic

    root = Path(run_dir)
    data = load_run(root, need_metrics=True)
    result = (
        audit_run(root, tolerance, public_keys, keys_dir=keys_dir, workers=workers)
        if audit
        else None
    )
    report = build_report(data, result)
    texts = {
        "json": json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "md": render_md(report),
        "html": render_html(report),
    }
    paths: dict[str, Path] = {}
    for kind, text in texts.items():
        path = root / RunDir.REPORTS[kind]
        write_file_atomic(path, text.encode("utf-8"), mode=PUBLIC_MODE)
        paths[kind] = path
    log.info("privacy report for run %s: %s", data.run_id, ", ".join(map(str, paths.values())))
    return {k: paths[k] for k in ("html", "json", "md")}
