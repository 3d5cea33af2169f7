"""Warnings about a client's DP-SGD mechanism that no ε number shows.

An (ε, δ) figure can be honest and still mean little: δ ≥ 1/n allows a mechanism that
publishes a whole random record, and a client so small that it trains on its whole data set
every step (q = 1) gets no amplification by subsampling, so its ε is what σ alone buys.
These are warnings, not audit failures: the accounting is right, the protection is weak.
"""

from __future__ import annotations

from common.privacy.findings import Finding, finding


def mechanism_warnings(
    partition_id: int,
    num_examples: int | None,
    sample_rate: float | None,
    delta: float | None,
    rounds: list[int] | None = None,
) -> list[Finding]:
    """Warnings for one client's mechanism (any argument may be unknown: ``None``)."""
    out: list[Finding] = []
    where_rounds = rounds or None
    if num_examples and delta is not None and delta >= 1.0 / num_examples:
        out.append(
            finding(
                "warning", "advice-delta", partition_id, where_rounds,
                f"δ={delta:g} is not below 1/n = 1/{num_examples} ({1 / num_examples:.3g}): "
                "at this δ a mechanism may publish a random record in full; use δ ≪ 1/n",
            )
        )
    if num_examples and sample_rate is not None:
        expected = num_examples * sample_rate
        if sample_rate >= 1.0:
            out.append(
                finding(
                    "warning", "advice-no-subsampling", partition_id, where_rounds,
                    f"q = {sample_rate:g}: every step uses all {num_examples} examples (n is at "
                    "most the batch size), so there is no amplification by subsampling",
                )
            )
        elif expected < 1.0:
            out.append(
                finding(
                    "warning", "advice-tiny-batch", partition_id, where_rounds,
                    f"expected batch n·q = {num_examples}·{sample_rate:.4g} = {expected:.2f} < 1 "
                    "example: most steps see no data at all, the model learns mostly noise",
                )
            )
    return out


def budget_warning(
    partition_id: int, round_: int | None, spent: float, budget: float, source: str
) -> Finding:
    """A client past its ε budget (``source`` says which record shows it)."""
    return finding(
        "warning", "advice-budget-exceeded", partition_id, round_,
        f"ε={spent:.4f} exceeds the budget ε={budget:g} ({source})",
    )
