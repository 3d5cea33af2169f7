"""``fedvault report RUN_DIR`` and ``fedvault audit RUN_DIR [RUN_DIR ...]`` for common/ops/cli.py.

Exit codes of ``audit``: 0 every claim verified (PASSED: the verdict line says whose keys
that rests on -- the auditor's, the server's copy in RUN_DIR/keys, or none), 1 the audit
found errors, or could not check completeness (NOT VERIFIED: no metrics.json), or the run
has no DP (nothing to verify), 2 a user error (not a run directory: the CLI's usual one-line
error, since ``RunDirError`` is a ``FileNotFoundError``). Several run directories are
audited each, and every holder's chain is compared across them (forks, dropped entries).
``report`` exits 0 once the files are written, whatever the verdict (the verdict is in them);
``--strict`` makes it exit 1 on a failed (or not verified) audit as well.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common.audit.audit import DEFAULT_TOLERANCE

EXIT_OK = 0
EXIT_AUDIT_FAILED = 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register both sub-commands on the ``fedvault`` parser's sub-parsers."""
    for name, func, text in (
        ("report", cmd_report, "write report.html/.json/.md (privacy report) into a run dir"),
        ("audit", cmd_audit, "verify a run's privacy ledger: hashes, signatures, every ε claim"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "audit":
            p.add_argument(
                "run_dirs", metavar="RUN_DIR", nargs="+",
                help="run directories (runs/<run-id>); several: also compare every holder's "
                "chain across them (a rolled-back holder forks it)",
            )  # fmt: skip
        else:
            p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<run-id>)")
        p.add_argument(
            "--keys", metavar="DIR",
            help="clients' public.json files, as you got them from the clients: a verdict "
            "against the server (default: RUN_DIR/keys, which the server wrote)",
        )  # fmt: skip
        p.add_argument(
            "--tolerance", type=float, default=DEFAULT_TOLERANCE,
            help="relative slack for ε claims below the recomputation "
            f"(default {DEFAULT_TOLERANCE})",
        )  # fmt: skip
        p.add_argument(
            "--workers", type=int, default=os.cpu_count() or 1,
            help="processes for recomputing ε when clients have distinct mechanisms "
            "(default: CPU count)",
        )  # fmt: skip
        if name == "audit":
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        else:
            p.add_argument("--strict", action="store_true", help="exit 1 if the audit fails")
        p.set_defaults(func=func)


def cmd_audit(args: argparse.Namespace) -> int:
    from common.audit.audit import audit_run, audit_runs

    run_dirs = list(getattr(args, "run_dirs", None) or [args.run_dir])
    if len(run_dirs) == 1:
        result = audit_run(run_dirs[0], args.tolerance, keys_dir=args.keys,
                           workers=args.workers)  # fmt: skip
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        else:
            for f in sorted(result.findings, key=lambda f: not f.is_error):
                print(f"{f.severity}: {f.message}")
            print(result.summary())
        return EXIT_OK if result.verdict_ok else EXIT_AUDIT_FAILED
    multi = audit_runs(run_dirs, args.tolerance, keys_dir=args.keys, workers=args.workers)
    if args.json:
        print(json.dumps(multi.to_dict(), indent=2, ensure_ascii=False))
    else:
        for r in multi.results:
            for f in sorted(r.findings, key=lambda f: not f.is_error):
                print(f"{f.severity}: run {r.run_id}: {f.message}")
        for f in sorted(multi.findings, key=lambda f: not f.is_error):
            print(f"{f.severity}: {f.message}")
        for r in multi.results:
            print(r.summary())
        print(multi.summary())
    return EXIT_OK if multi.verdict_ok else EXIT_AUDIT_FAILED


def cmd_report(args: argparse.Namespace) -> int:
    from common.report.build import write_report

    paths = write_report(
        args.run_dir, tolerance=args.tolerance, keys_dir=args.keys, workers=args.workers
    )
    report = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    audit = report["audit"]
    print(f"privacy report for run {report['run_id']}: audit {audit['verdict']}")
    for path in paths.values():
        print(f"  {path}")
    print(f"  {audit.get('verdict_line', '')}")
    failed = audit["verdict"] in ("fail", "not-verified")
    return EXIT_AUDIT_FAILED if failed and args.strict else EXIT_OK
