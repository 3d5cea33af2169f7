"""The report's plots as inline SVG: no files beside report.html, no external URLs.

Matplotlib's object API (``Figure`` + the Agg/SVG canvases) is used instead of ``pyplot`` so
making a report never touches global backend state (a report written from inside a running
app, or from tests in parallel, must not switch anyone's backend). Text is drawn as paths
(``svg.fonttype = "path"``), so the SVG needs no font at all.

Matplotlib's SVG carries an XML prologue, a DOCTYPE and namespace URLs; inline in HTML5 none
of them are needed, and the report must contain no URL at all, so they are removed. Element
ids get a per-plot prefix: several SVGs in one document must not share ids.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Mapping, Sequence

log = logging.getLogger("fedvault.report.plots")

_SVG_START = re.compile(r"^.*?(?=<svg\b)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')
_IDS = re.compile(r'\bid="([^"]+)"')
_REFS = re.compile(r'(href="#|url\(#)([^")]+)')

RC = {
    "svg.fonttype": "path",
    "svg.hashsalt": "fedvault-report",  # deterministic ids: the same run gives the same file
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _figure(width: float = 6.4, height: float = 3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_html(fig, prefix: str) -> str:
    """One figure as an inline ``<svg>`` (or, should a URL survive cleaning, a PNG data URI)."""
    import matplotlib

    with matplotlib.rc_context(RC):
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = _clean_svg(buffer.getvalue(), prefix)
    if "http:" in svg or "https:" in svg:  # never expected; never ship a URL anyway
        log.warning("plot %s: SVG still names a URL after cleaning, embedding a PNG", prefix)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        data = base64.b64encode(png.getvalue()).decode("ascii")
        return f'<img alt="{prefix}" src="data:image/png;base64,{data}">'
    return svg


def _clean_svg(svg: str, prefix: str) -> str:
    svg = _SVG_START.sub("", svg, count=1)
    svg = _METADATA.sub("", svg)
    svg = _XMLNS.sub("", svg)
    svg = _IDS.sub(lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = _REFS.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", svg)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{prefix}" ', 1)


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def epsilon_plot(
    series: Mapping[int, Sequence[tuple[int, float]]], budget: float | None
) -> str:
    """Lifetime cumulative ε of each client across this run's rounds, the lifetime budget as a
    horizontal line (when the holders share one)."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = _figure()
        ax = fig.add_subplot()
        many = len(series) > 12
        for pid, points in sorted(series.items()):
            if not points:
                continue
            rounds, eps = zip(*points, strict=True)
            ax.plot(
                rounds, eps, marker="" if many else "o", markersize=3,
                linewidth=0.8 if many else 1.4, alpha=0.6 if many else 1.0,
                label=None if many else f"client {pid}",
            )  # fmt: skip
        if budget is not None:
            ax.axhline(budget, color="#c0392b", linestyle="--", linewidth=1.2,
                       label=f"lifetime budget ε = {budget:g}")  # fmt: skip
        ax.set_xlabel("round")
        _integer_rounds(ax)
        ax.set_ylabel("lifetime cumulative ε")
        ax.set_ylim(bottom=0)
        ax.set_title("lifetime ε spent per client" + (f" ({len(series)} clients)" if many else ""))
        ax.legend(fontsize=7, ncols=2, loc="lower right")
        return figure_html(fig, "epsilon-per-client")


def accuracy_plot(
    points: Sequence[tuple[int, float]], f1_points: Sequence[tuple[int, float]] = ()
) -> str:
    """Central test accuracy (and macro F1, which imbalanced data needs) across rounds."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = _figure()
        ax = fig.add_subplot()
        if points:
            rounds, acc = zip(*points, strict=True)
            ax.plot(rounds, acc, marker="o", markersize=3, color="#2c7fb8", label="accuracy")
        if f1_points:
            rounds, f1 = zip(*f1_points, strict=True)
            ax.plot(rounds, f1, marker="s", markersize=3, color="#d95f02", label="macro F1")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("round")
        _integer_rounds(ax)
        ax.set_ylabel("test accuracy / macro F1")
        ax.set_ylim(0, 1)
        ax.set_title("test accuracy and macro F1 across rounds")
        return figure_html(fig, "accuracy")


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """The final model's confusion matrix on the test split (rows: true class)."""
    import matplotlib

    with matplotlib.rc_context(RC):
        n = len(matrix)
        fig = _figure(width=min(2.0 + 0.45 * n, 7.0), height=min(1.6 + 0.45 * n, 6.5))
        ax = fig.add_subplot()
        ax.imshow(matrix, cmap="Blues")
        top = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                color = "white" if value > top / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=6, color=color)
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix, final model")
        return figure_html(fig, "confusion-matrix")


def accuracy_vs_epsilon_plot(points: Sequence[tuple[float, float, int]]) -> str:
    """Test accuracy against the largest ε any client had spent by that round."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = _figure()
        ax = fig.add_subplot()
        if points:
            eps, acc, _ = zip(*points, strict=True)
            ax.plot(eps, acc, marker="o", markersize=3, color="#5e3c99")
            for e, a, r in points:
                if len(points) <= 20:
                    ax.annotate(str(r), (e, a), textcoords="offset points", xytext=(3, 3),
                                fontsize=6)  # fmt: skip
        ax.set_xlabel("max ε over clients")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.set_xlim(left=0)
        ax.set_title("privacy-utility trade-off (labels: round)")
        return figure_html(fig, "accuracy-vs-epsilon")
