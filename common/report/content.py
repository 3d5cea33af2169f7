"""What the report says, as plain data: this dict *is* ``report.json``.

The HTML and Markdown renderers only format it, so the three files can never disagree, and a
script reading ``report.json`` sees exactly what a person reads in ``report.html``.

Sources, per value: the ledger when there is one (what each client signed), metrics.json
otherwise (what the server recorded); ``source`` fields say which.

Every ε here is record-level (ε, δ) per data holder over the holder's *lifetime* on its data
set (all runs it trained in), as the v2 ledger states it; ``unit`` (the first key, and the
first line of report.md and report.html) says so. Per client the report shows the lifetime
spend, the lifetime budget and what remains, and what *this* run added: the cumulative ε at
the holder's last entry of this run minus the cumulative ε before its first entry of this run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from common.audit.audit import AuditResult
from common.audit.checks import budget_warning, mechanism_warnings
from common.audit.completeness import refused as _refused
from common.audit.rundata import RunData
from common.privacy.findings import Finding
from common.privacy.ledger import KIND_CLIENT_DP_SGD, LEDGER_FILE, LedgerEntry

log = logging.getLogger("fedvault.report.content")

REPORT_FORMAT = "fedvault-privacy-report"
REPORT_VERSION = 2
UNIT = "record-level (ε, δ) per data holder, over the holder's lifetime on its data set"


def unit_line(data: RunData) -> str:
    """What every ε in the report means (the report's first line)."""
    if not data.dp:
        return "no DP (dp = false): this run makes no privacy claim, and the report states no ε"
    deltas = sorted({e.delta for e in data.entries if e.run_id == data.run_id})
    if not deltas and data.config.get("target-delta") is not None:
        deltas = [float(data.config["target-delta"])]
    delta = ", ".join(f"{d:g}" for d in deltas) if deltas else "unknown"
    return f"{UNIT}; δ = {delta}"


def build_report(data: RunData, audit: AuditResult | None) -> dict[str, Any]:
    """The report of one run (``audit`` may be None when it was not run)."""
    ledger_by_client = _ledger_by_client(data.entries, data.run_id)
    use_ledger = data.dp and bool(ledger_by_client)
    clients = _clients(data, ledger_by_client if use_ledger else {},
                       _before_run(data) if use_ledger else {})  # fmt: skip
    rounds = _rounds(data, ledger_by_client if use_ledger else {})
    mechanisms = _mechanisms(data, ledger_by_client if use_ledger else {})
    summary = _summary(data, clients, rounds)
    warnings = _warnings(data, clients, mechanisms)
    _attach_audit(clients, audit)
    return {
        "unit": unit_line(data),
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "run_id": data.run_id,
        "summary": summary,
        "clients": clients,
        "rounds": rounds,
        "mechanisms": mechanisms,
        "warnings": [f.to_dict() for f in warnings],
        "audit": _audit_section(data, audit),
        "final_metrics": _final_metrics(data),
    }


def _final_metrics(data: RunData) -> dict[str, Any] | None:
    """The final model's detailed test metrics (per class, confusion matrix), if recorded."""
    evaluated = [r for r in data.rounds if r.get("test_metrics")]
    return evaluated[-1]["test_metrics"] if evaluated else None


# --------------------------------------------------------------------------------------------


def _ledger_by_client(entries: list[LedgerEntry], run_id: str) -> dict[int, list[LedgerEntry]]:
    grouped: dict[int, list[LedgerEntry]] = defaultdict(list)
    for e in entries:
        if e.kind == KIND_CLIENT_DP_SGD and e.run_id == run_id:
            grouped[e.partition_id].append(e)
    return {pid: sorted(es, key=lambda e: e.round) for pid, es in sorted(grouped.items())}


def _run_budget(data: RunData) -> float | None:
    value = data.config.get("target-epsilon")
    return float(value) if data.dp and isinstance(value, int | float) else None


def _before_run(data: RunData) -> dict[int, float]:
    """Per client of this run: its lifetime cumulative ε before its first entry of this run
    (0 for a new holder), from the chain's entry just before it."""
    out: dict[int, float] = {}
    by_chain: dict[str, list[LedgerEntry]] = defaultdict(list)
    for e in data.entries:
        if e.kind == KIND_CLIENT_DP_SGD:
            by_chain[e.chain_id].append(e)
    for chain in by_chain.values():
        chain.sort(key=lambda e: e.seq)
        for k, e in enumerate(chain):
            if e.run_id == data.run_id:
                if e.partition_id not in out:
                    out[e.partition_id] = chain[k - 1].epsilon_cumulative if k else 0.0
                break
    return out


def _clients(
    data: RunData, ledger: dict[int, list[LedgerEntry]], before: dict[int, float]
) -> list[dict[str, Any]]:
    trained: dict[int, list[dict[str, Any]]] = defaultdict(list)
    refusals: dict[int, int] = defaultdict(int)
    failures: dict[int, int] = defaultdict(int)
    seen: set[int] = set(ledger)
    for rec in data.rounds:
        seen.update(int(p) for p in rec.get("sampled") or [])
        for c in rec.get("clients") or []:
            trained[int(c["partition_id"])].append({**c, "round": rec["round"]})
        for f in rec.get("failures") or []:
            pid = int(f["partition_id"])
            if _refused(f):
                refusals[pid] += 1
            else:
                failures[pid] += 1
    seen.update(trained, refusals, failures)
    seen.discard(-1)  # a reply from a node whose partition was never learned
    rows = []
    for pid in sorted(seen):
        entries = ledger.get(pid, [])
        records = trained.get(pid, [])
        chain_id = None
        if entries:
            last = entries[-1]
            spent: float | None = last.epsilon_cumulative
            budget: float | None = last.epsilon_budget
            run_budget: float | None = last.run_epsilon_budget
            added: float | None = spent - before.get(pid, 0.0)
            source = "ledger"
            rounds_trained = len(entries)
            chain_id = last.chain_id
        else:
            eps = [c for c in records if c.get("epsilon") is not None]
            spent = eps[-1]["epsilon"] if eps else None
            budget = None  # the holder's lifetime budget is in its ledger only
            run_budget = _run_budget(data)
            added = None
            if eps and eps[0].get("round_epsilon") is not None:
                added = float(eps[-1]["epsilon"]) - (
                    float(eps[0]["epsilon"]) - float(eps[0]["round_epsilon"])
                )
            source = "metrics.json" if eps else ("none (no DP)" if not data.dp else "none")
            rounds_trained = len(records)
            chain_id = next((c.get("chain_id") for c in records if c.get("chain_id")), None)
        remaining = None if spent is None or budget is None else budget - spent
        over_run = added is not None and run_budget is not None and added > run_budget
        rows.append(
            {
                "partition_id": pid,
                "chain_id": chain_id,
                "epsilon_spent": spent,
                "epsilon_budget": budget,
                "epsilon_remaining": remaining,
                "epsilon_this_run": added,
                "run_epsilon_budget": run_budget,
                "budget_exceeded": (remaining is not None and remaining < 0) or over_run,
                "rounds_trained": rounds_trained,
                "refusals": refusals.get(pid, 0),
                "failures": failures.get(pid, 0),
                "num_examples": _num_examples(entries, records),
                "source": source,
            }
        )
    return rows


def _num_examples(entries: list[LedgerEntry], records: list[dict[str, Any]]) -> int | None:
    if entries:
        return entries[-1].num_examples
    return records[-1].get("num_examples") if records else None


def _rounds(data: RunData, ledger: dict[int, list[LedgerEntry]]) -> list[dict[str, Any]]:
    eps_at: dict[int, dict[int, float]] = defaultdict(dict)  # round → client → cumulative ε
    if ledger:
        for pid, entries in ledger.items():
            for e in entries:
                eps_at[e.round][pid] = e.epsilon_cumulative
    else:
        for rec in data.rounds:
            for c in rec.get("clients") or []:
                if c.get("epsilon") is not None:
                    eps_at[int(rec["round"])][int(c["partition_id"])] = float(c["epsilon"])
    out = []
    latest: dict[int, float] = {}
    recorded = {int(rec["round"]): rec for rec in data.rounds}
    for r in sorted(set(recorded) | set(eps_at)):
        rec = recorded.get(r, {})
        latest.update(eps_at.get(r, {}))
        failures = rec.get("failures") or []
        out.append(
            {
                "round": r,
                "test_accuracy": rec.get("test_accuracy"),
                "test_loss": rec.get("test_loss"),
                "test_f1_macro": rec.get("test_f1_macro"),
                "max_epsilon": max(latest.values()) if latest else rec.get("max_epsilon"),
                "sampled": len(rec.get("sampled") or []),
                "trained": len(rec.get("clients") or []),
                "refused": sum(1 for f in failures if _refused(f)),
                "failed": sum(1 for f in failures if not _refused(f)),
                "epsilon_by_client": {str(p): v for p, v in sorted(eps_at.get(r, {}).items())},
            }
        )
    return out


_MECH_FIELDS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")


def _mechanisms(data: RunData, ledger: dict[int, list[LedgerEntry]]) -> list[dict[str, Any]]:
    """Per client: σ, q, steps per round, C, δ (a list where a value changed across rounds)."""
    values: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    sources: dict[int, str] = {}
    if ledger:
        for pid, entries in ledger.items():
            sources[pid] = "ledger"
            for e in entries:
                for name in (*_MECH_FIELDS, "num_examples", "accountant"):
                    values[pid][name].append(getattr(e, name))
    else:
        for rec in data.rounds:
            for c in rec.get("clients") or []:
                if c.get("noise_multiplier") is None:
                    continue
                pid = int(c["partition_id"])
                sources[pid] = "metrics.json"
                for name in (*_MECH_FIELDS, "num_examples"):
                    values[pid][name].append(c.get(name))
                values[pid]["accountant"].append(data.config.get("accountant"))
    rows = []
    for pid in sorted(values):
        row: dict[str, Any] = {"partition_id": pid, "source": sources[pid]}
        for name, seen in values[pid].items():
            distinct = list(dict.fromkeys(seen))
            row[name] = distinct[0] if len(distinct) == 1 else distinct
        n, q = row.get("num_examples"), row.get("sample_rate")
        if isinstance(n, int | float) and isinstance(q, int | float):
            row["expected_batch"] = n * q
        rows.append(row)
    return rows


def _summary(
    data: RunData, clients: list[dict[str, Any]], rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    cfg, summary, final = data.config, data.summary, data.final
    spent = [c["epsilon_spent"] for c in clients if c["epsilon_spent"] is not None]
    added = [c["epsilon_this_run"] for c in clients if c["epsilon_this_run"] is not None]
    lifetime = sorted({c["epsilon_budget"] for c in clients if c["epsilon_budget"] is not None})
    if not data.dp:
        ledger = "not applicable (DP disabled)"
    elif data.ledger_present:
        ledger = f"present ({len(data.entries)} entries)"
    else:
        ledger = "missing"
    accuracy = [r["test_accuracy"] for r in rounds if r["test_accuracy"] is not None]
    initial = (data.metrics or {}).get("initial") or {}
    dp_value = (lambda key: cfg.get(key)) if data.dp else (lambda key: None)
    return {
        "run_id": data.run_id,
        "dataset": summary.get("dataset", cfg.get("dataset")),
        "model": summary.get("model", cfg.get("model")),
        "partitioning": cfg.get("partitioning"),
        "clients": len(clients),
        "rounds_planned": cfg.get("num-server-rounds"),
        "rounds_completed": sum(1 for r in data.rounds if r.get("test_accuracy") is not None),
        "initial_test_accuracy": initial.get("test_accuracy"),
        "final_test_accuracy": final.get("test_accuracy", accuracy[-1] if accuracy else None),
        "final_test_loss": final.get("test_loss"),
        "final_test_f1_macro": final.get("test_f1_macro"),
        "final_test_roc_auc": final.get("test_roc_auc"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "update_bytes": summary.get("update_bytes"),
        "dp": data.dp,
        "target_epsilon": dp_value("target-epsilon"),
        "target_delta": dp_value("target-delta"),
        "accountant": dp_value("accountant"),
        "max_grad_norm": dp_value("max-grad-norm"),
        "max_epsilon_spent": max(spent) if spent else None,
        "max_epsilon_this_run": max(added) if added else None,
        "lifetime_budgets": lifetime if data.dp else [],
        "epsilon_unit": unit_line(data),
        "wall_seconds": summary.get("wall_seconds"),
        "train_examples": summary.get("train_examples"),
        "ledger": ledger,
        "ledger_file": LEDGER_FILE,
    }


def _warnings(
    data: RunData, clients: list[dict[str, Any]], mechanisms: list[dict[str, Any]]
) -> list[Finding]:
    out: list[Finding] = []
    if not data.dp:
        out.append(
            Finding(
                "warning", None, None,
                "DP is disabled for this run (dp = false): no privacy guarantee at all, "
                "and no privacy ledger", "no-dp",
            )
        )
        return out
    if not data.ledger_present:
        out.append(
            Finding(
                "warning", None, None,
                f"{LEDGER_FILE} is missing: ε values below come from metrics.json (the "
                "server's record) and cannot be verified", "ledger-missing",
            )
        )
    for row in mechanisms:
        n, q, delta = row.get("num_examples"), row.get("sample_rate"), row.get("delta")
        for nn in n if isinstance(n, list) else [n]:
            for qq in q if isinstance(q, list) else [q]:
                for dd in delta if isinstance(delta, list) else [delta]:
                    out.extend(mechanism_warnings(row["partition_id"], nn, qq, dd))
    for c in clients:
        remaining, added, run_budget = (
            c["epsilon_remaining"], c["epsilon_this_run"], c["run_epsilon_budget"]
        )
        if remaining is not None and remaining < 0:
            out.append(
                budget_warning(
                    c["partition_id"], None, c["epsilon_spent"], c["epsilon_budget"],
                    f"lifetime ε, from the {c['source']}",
                )
            )
        if added is not None and run_budget is not None and added > run_budget:
            out.append(
                budget_warning(
                    c["partition_id"], None, added, run_budget,
                    f"what this run added, over the run's budget, from the {c['source']}",
                )
            )
    return out


def _attach_audit(clients: list[dict[str, Any]], audit: AuditResult | None) -> None:
    if audit is None or not audit.checks:
        return
    last: dict[int, Any] = {}
    for check in audit.checks:
        last[check.partition_id] = check
    bad = {f.partition_id for f in audit.errors}
    for c in clients:
        check = last.get(c["partition_id"])
        c["audit_ok"] = c["partition_id"] not in bad
        if check is not None:
            c["recomputed_epsilon"] = dict(check.recomputed)
            c["prv_upper_bound"] = check.prv_bound


def _audit_section(data: RunData, audit: AuditResult | None) -> dict[str, Any]:
    if audit is None:
        return {"verdict": "not-run", "verdict_ok": None, "findings": []}
    section = audit.to_dict()
    section["summary"] = audit.summary()
    return section
