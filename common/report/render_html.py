"""``report.html``: one self-contained file (inline CSS and SVG, no script, no URL).

Self-contained because the report is evidence that gets archived and mailed around: it must
render the same offline in ten years, and opening it must not make a request anywhere.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from html import escape
from typing import Any

from common.report import formatting as fmt
from common.report import plots

log = logging.getLogger("fedvault.report.render_html")

MAX_FINDINGS = 200

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1d2330; background: #ffffff; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d8dde6; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d8dde6; padding: 0.25rem 0.6rem; text-align: right; }
td { white-space: nowrap; }
th { background: #eef1f6; } td:first-child, th:first-child { text-align: left; }
table.summary td { text-align: left; }
.verdict { display: inline-block; padding: 0.3rem 0.8rem; border-radius: 0.3rem;
           font-weight: 600; color: #ffffff; }
.pass { background: #2e7d32; } .fail { background: #c62828; } .na { background: #6b7280; }
.error { color: #c62828; } .warning { color: #9a6700; }
.bad td { background: #fdecea; }
figure { margin: 1rem 0; } svg { max-width: 100%; height: auto; }
.muted { color: #5b6475; font-size: 0.85rem; }
code { background: #eef1f6; padding: 0 0.2rem; }
"""


def render_html(report: dict[str, Any]) -> str:
    """The whole document."""
    run_id = str(report["run_id"])
    title = f"fedvault privacy report — run {run_id}"
    body = [
        f'<p id="unit"><strong>ε in this report: {escape(report["unit"])}.</strong></p>',
        f"<h1>{escape(title)}</h1>",
        _verdict(report["audit"], report["summary"]),
        "<h2>Run summary</h2>",
        _summary(report["summary"]),
        "<h2>Clients</h2>",
        _clients(report["clients"]),
        "<h2>Plots</h2>",
        _plots(report),
        "<h2>Mechanism parameters</h2>",
        _mechanisms(report["mechanisms"], report["summary"]),
        "<h2>Warnings</h2>",
        _findings(report["warnings"], "warnings", "No warnings."),
        "<h2>Audit findings</h2>",
        _audit(report["audit"]),
        "<h2>Rounds</h2>",
        _rounds(report["rounds"]),
        _footer(report),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _table(headers: list[str], rows: list[list[str]], table_id: str, classes=None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    return (
        f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(lines)
        + "\n</tbody>\n</table>"
    )


def _verdict(audit: dict[str, Any], summary: dict[str, Any]) -> str:
    verdict = audit.get("verdict")
    label, css = {
        "pass": ("audit PASSED", "pass"),
        "fail": ("audit FAILED", "fail"),
        "not-verified": ("audit NOT VERIFIED", "fail"),
        "not-applicable": ("no DP: nothing to audit", "na"),
    }.get(verdict, ("audit not run", "na"))
    detail = audit.get("summary", "")
    return (
        f'<p><span class="verdict {css}" id="verdict">{escape(label)}</span> '
        f'<span class="muted">{escape(detail)}</span></p>'
    )


def _summary(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in fmt.summary_rows(summary)
    )
    return f'<table class="summary" id="summary">{rows}</table>'


def _clients(clients: list[dict[str, Any]]) -> str:
    if not clients:
        return '<p id="clients">No client trained in this run.</p>'
    rows = [fmt.client_cells(c) for c in clients]
    classes = [
        "bad" if c.get("budget_exceeded") or c.get("audit_ok") is False else "" for c in clients
    ]
    note = (
        '<p class="muted">Lifetime ε spent: the holder\'s cumulative ε after its last round of '
        "this run, composed by its accountant over every round it ever trained on its data set "
        "(all runs). This run added: that minus the cumulative ε before its first round of this "
        "run. Remaining: lifetime budget minus lifetime ε spent. Refusals: rounds the client "
        "refused because training would have exceeded its lifetime or this run's budget.</p>"
    )
    return _table(fmt.CLIENT_HEADERS, rows, "clients", classes) + note


def _plots(report: dict[str, Any]) -> str:
    summary = report["summary"]
    rounds = report["rounds"]
    figures = []
    try:
        if summary.get("dp"):
            series: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for r in rounds:
                for pid, value in r["epsilon_by_client"].items():
                    series[int(pid)].append((r["round"], value))
            lifetime = summary.get("lifetime_budgets") or []
            budget = lifetime[0] if len(lifetime) == 1 else None
            figures.append(plots.epsilon_plot(series, float(budget) if budget else None))
        accuracy = [(r["round"], r["test_accuracy"]) for r in rounds
                    if r["test_accuracy"] is not None]  # fmt: skip
        if summary.get("initial_test_accuracy") is not None:
            accuracy.insert(0, (0, summary["initial_test_accuracy"]))
        f1 = [(r["round"], r["test_f1_macro"]) for r in rounds
              if r.get("test_f1_macro") is not None]  # fmt: skip
        figures.append(plots.accuracy_plot(accuracy, f1))
        final = report.get("final_metrics")
        if final and final.get("confusion_matrix"):
            figures.append(plots.confusion_matrix_plot(final["confusion_matrix"],
                                                       final.get("classes") or []))  # fmt: skip
        if summary.get("dp"):
            trade = [
                (r["max_epsilon"], r["test_accuracy"], r["round"])
                for r in rounds
                if r["test_accuracy"] is not None and r["max_epsilon"] is not None
            ]
            figures.append(plots.accuracy_vs_epsilon_plot(trade))
    except ImportError as err:
        log.warning("plots skipped: %s", err)
        return f'<p class="warning">Plots unavailable: {escape(str(err))} (install matplotlib).</p>'
    if not summary.get("dp"):
        figures.append('<p class="muted">No ε plots: DP is disabled for this run.</p>')
    return "\n".join(f"<figure>{f}</figure>" for f in figures)


def _mechanisms(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    if not rows:
        reason = "DP is disabled for this run" if not summary.get("dp") else "no DP round recorded"
        return f'<p id="mechanisms">No mechanism parameters: {escape(reason)}.</p>'
    note = (
        '<p class="muted">DP-SGD with Poisson sampling: each step samples each example with '
        "probability q, clips per-example gradients to norm C and adds Gaussian noise σ·C. "
        "Values that changed across rounds are listed with ' / '.</p>"
    )
    table = _table(fmt.MECHANISM_HEADERS, [fmt.mechanism_cells(r) for r in rows], "mechanisms")
    return table + note


def _findings(findings: list[dict[str, Any]], list_id: str, empty: str) -> str:
    if not findings:
        return f'<p id="{list_id}">{escape(empty)}</p>'
    ordered = sorted(findings, key=lambda f: f["severity"] != "error")
    items = [
        f'<li class="{escape(f["severity"])}">{escape(f["severity"])}: {escape(f["message"])}</li>'
        for f in ordered[:MAX_FINDINGS]
    ]
    more = len(ordered) - MAX_FINDINGS
    if more > 0:
        items.append(f"<li>… and {more} more (see report.json)</li>")
    return f'<ul id="{list_id}">\n' + "\n".join(items) + "\n</ul>"


def _audit(audit: dict[str, Any]) -> str:
    findings = [
        f for f in audit.get("findings", []) if not str(f.get("code", "")).startswith("advice-")
    ]
    how = (
        '<p class="muted">The audit recomputes every holder\'s lifetime cumulative ε from the '
        "mechanism parameters in its signed, hash-chained ledger entries (from its first entry, "
        "in any run) with Opacus's PRV and RDP accountants (tolerance "
        f"{fmt.pct(audit.get('tolerance'))}), checks each chain's hashes and signatures, that q "
        "and steps follow from the signed n, B and epochs, the per-round increments, the "
        "lifetime and per-run budgets, and that every DP round in metrics.json has a ledger "
        "entry and every key given has entries. Its verdict is only as independent as the keys "
        "it used: re-run it with <code>fedvault audit RUN_DIR --keys DIR</code> with keys you got "
        "from the clients; give it several runs to compare each holder's chain across them.</p>"
    )
    return _findings(findings, "audit", "No findings.") + how


def _rounds(rounds: list[dict[str, Any]]) -> str:
    headers = ["round", "test accuracy", "test loss", "max ε", "trained", "refused", "failed"]
    rows = [
        [
            str(r["round"]), fmt.pct(r["test_accuracy"]), fmt.num(r["test_loss"]),
            fmt.eps(r["max_epsilon"]), str(r["trained"]), str(r["refused"]), str(r["failed"]),
        ]
        for r in rounds
    ]  # fmt: skip
    return _table(headers, rows, "rounds") if rows else "<p>No rounds recorded.</p>"


def _footer(report: dict[str, Any]) -> str:
    return (
        f'<p class="muted">Generated {escape(report["generated_at"])} by fedvault from '
        "metrics.json and ledger.jsonl; machine-readable: report.json.</p>"
    )
