"""``report.md``: the report as Markdown, for pull requests, tickets and terminals."""

from __future__ import annotations

from typing import Any

from common.report import formatting as fmt

MAX_FINDINGS = 100


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _findings(findings: list[dict[str, Any]], empty: str) -> list[str]:
    if not findings:
        return [empty]
    ordered = sorted(findings, key=lambda f: f["severity"] != "error")
    lines = [f"- **{f['severity']}**: {f['message']}" for f in ordered[:MAX_FINDINGS]]
    if len(ordered) > MAX_FINDINGS:
        lines.append(f"- … and {len(ordered) - MAX_FINDINGS} more (see report.json)")
    return lines


def render_md(report: dict[str, Any]) -> str:
    audit = report["audit"]
    summary = report["summary"]
    verdict = {
        "pass": "PASSED",
        "fail": "FAILED",
        "not-verified": "NOT VERIFIED",
        "not-applicable": "not applicable (no DP)",
    }.get(audit.get("verdict"), "not run")
    lines = [
        f"ε in this report: {report['unit']}.",
        "",
        f"# fedvault privacy report — run {report['run_id']}",
        "",
        f"**Audit: {verdict}.** {audit.get('summary', '')}".rstrip(),
        "",
        "## Run summary",
        "",
        *_table(["", ""], [[k, v] for k, v in fmt.summary_rows(summary)]),
        "",
        "## Clients",
        "",
    ]
    if report["clients"]:
        lines += _table(fmt.CLIENT_HEADERS, [fmt.client_cells(c) for c in report["clients"]])
    else:
        lines.append("No client trained in this run.")
    lines += ["", "## Mechanism parameters", ""]
    if report["mechanisms"]:
        rows = [fmt.mechanism_cells(r) for r in report["mechanisms"]]
        lines += _table(fmt.MECHANISM_HEADERS, rows)
    else:
        lines.append("No mechanism parameters (DP disabled or no DP round recorded).")
    rounds = [
        [
            str(r["round"]), fmt.pct(r["test_accuracy"]), fmt.eps(r["max_epsilon"]),
            str(r["trained"]), str(r["refused"]), str(r["failed"]),
        ]
        for r in report["rounds"]
    ]  # fmt: skip
    audit_findings = [
        f for f in audit.get("findings", []) if not str(f.get("code", "")).startswith("advice-")
    ]
    lines += [
        "",
        "## Warnings",
        "",
        *_findings(report["warnings"], "No warnings."),
        "",
        "## Audit findings",
        "",
        *_findings(audit_findings, "No findings."),
        "",
        "## Rounds",
        "",
        *_table(["round", "test accuracy", "max ε", "trained", "refused", "failed"], rounds),
        "",
        "Plots are in report.html; every value is in report.json.",
        "",
    ]
    return "\n".join(lines)
