"""Number formatting shared by the HTML and Markdown renderers (one spelling per value)."""

from __future__ import annotations

from typing import Any

DASH = "—"


def num(value: Any, digits: int = 4) -> str:
    """A float with ``digits`` significant digits; lists (values that changed) joined by ' / '."""
    if isinstance(value, list):
        return " / ".join(num(v, digits) for v in value)
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def eps(value: Any) -> str:
    """ε with three decimals (what budgets are stated in)."""
    if isinstance(value, list):
        return " / ".join(eps(v) for v in value)
    if value is None:
        return DASH
    return f"{float(value):.3f}"


def pct(value: Any) -> str:
    return DASH if value is None else f"{100 * float(value):.2f} %"


def seconds(value: Any) -> str:
    if value is None:
        return DASH
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def recomputed(client: dict[str, Any]) -> str:
    """What the audit recomputed for a client's last entry: exact values, or the PRV bound."""
    values = client.get("recomputed_epsilon") or {}
    parts = [f"{acc} {eps(values[acc])}" for acc in ("prv", "rdp") if acc in values]
    bound = client.get("prv_upper_bound")
    if "prv" not in values and bound is not None:
        parts.insert(0, f"prv ≤ {eps(bound)}")
    return ", ".join(parts) or DASH


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The run summary as (label, value) rows, in reading order."""
    dp = summary.get("dp")
    rows = [
        ("run", num(summary.get("run_id"))),
        ("dataset", num(summary.get("dataset"))),
        ("model", num(summary.get("model"))),
        ("partitioning", num(summary.get("partitioning"))),
        ("clients", num(summary.get("clients"))),
        ("rounds", f"{num(summary.get('rounds_completed'))} of "
                   f"{num(summary.get('rounds_planned'))} planned"),
        ("initial test accuracy", pct(summary.get("initial_test_accuracy"))),
        ("final test accuracy", pct(summary.get("final_test_accuracy"))),
        ("final macro F1", num(_round4(summary.get("final_test_f1_macro")))),
        ("final ROC AUC", num(_round4(summary.get("final_test_roc_auc")))),
        ("trainable parameters", num(summary.get("trainable_parameters"))),
        ("update size", f"{num(summary.get('update_bytes'))} bytes"),
        ("differential privacy", "DP-SGD per client" if dp else "disabled (dp = false)"),
    ]  # fmt: skip
    if dp:
        lifetime = summary.get("lifetime_budgets") or []
        rows += [
            ("ε unit", str(summary.get("epsilon_unit") or DASH)),
            ("this run may add (target ε, δ)", f"ε = {num(summary.get('target_epsilon'))}, "
                                               f"δ = {num(summary.get('target_delta'))}"),
            ("holders' lifetime budgets ε", " / ".join(eps(b) for b in lifetime) or DASH),
            ("accountant", num(summary.get("accountant"))),
            ("clipping norm C", num(summary.get("max_grad_norm"))),
            ("largest lifetime ε spent", eps(summary.get("max_epsilon_spent"))),
            ("largest ε added by this run", eps(summary.get("max_epsilon_this_run"))),
        ]  # fmt: skip
    rows += [
        ("privacy ledger", num(summary.get("ledger"))),
        ("wall time", seconds(summary.get("wall_seconds"))),
    ]
    return rows


def client_cells(client: dict[str, Any]) -> list[str]:
    """One row of the clients table (same columns in HTML and Markdown)."""
    audit = client.get("audit_ok")
    return [
        str(client["partition_id"]),
        eps(client.get("epsilon_spent")),
        eps(client.get("epsilon_budget")),
        eps(client.get("epsilon_remaining")),
        eps(client.get("epsilon_this_run")),
        eps(client.get("run_epsilon_budget")),
        str(client.get("rounds_trained", 0)),
        str(client.get("refusals", 0)),
        str(client.get("failures", 0)),
        recomputed(client),
        DASH if audit is None else ("ok" if audit else "FAILED"),
        str(client.get("source", "")),
    ]


CLIENT_HEADERS = [
    "client", "lifetime ε spent", "lifetime budget ε", "remaining ε", "this run added ε",
    "run budget ε", "rounds trained", "refusals", "failures", "recomputed ε (last round)",
    "audit", "source",
]  # fmt: skip

MECHANISM_HEADERS = [
    "client", "σ (noise multiplier)", "q (sample rate)", "steps / round", "C (clip norm)", "δ",
    "n (examples)", "expected batch n·q", "accountant",
]  # fmt: skip


def mechanism_cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["partition_id"]),
        num(row.get("noise_multiplier")),
        num(row.get("sample_rate")),
        num(row.get("steps")),
        num(row.get("max_grad_norm")),
        num(row.get("delta")),
        num(row.get("num_examples")),
        num(row.get("expected_batch"), 3),
        num(row.get("accountant")),
    ]


def _round4(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
