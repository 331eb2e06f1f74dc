"""The report's charts as inline SVG (matplotlib, Agg-free SVG backend): no display, no scripts, no external
assets, so the page works from a file and inside the Airflow tab alike.

Each function takes the report dict and returns one ``<svg>`` element with a ``<title>``; text stays text
(``svg.fonttype: none``) so the page is small and its labels are searchable.
"""

from __future__ import annotations

import html
import io
from typing import Any

GREEN, ORANGE, GREY = "#2a8f5c", "#c8641e", "#777777"
BASELINE_MARKERS = ("s", "^", "v", "D", "P", "X")


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _svg(fig: Any, title: str) -> str:
    """The figure as an ``<svg>`` element for inline use: no XML prolog, a ``<title>``, and ids salted by the
    title so two charts on one page never share a clip-path id."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": title}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Title": title})
    text = buffer.getvalue()
    svg = text[text.index("<svg") :]
    head_end = svg.index(">") + 1
    return f"{svg[:head_end]}<title>{html.escape(title)}</title>{svg[head_end:]}"


def _percent_axis(ax: Any, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def frontier_chart(report: dict[str, Any], title: str) -> str:
    """Planned accuracy against planned cost over a range of budgets, with this run (planned and realized)
    and every baseline as points."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = _figure()
    curve = sorted(report.get("frontier") or [], key=lambda r: r["planned_cost_usd"])
    if curve:
        ax.plot(
            [r["planned_cost_usd"] for r in curve],
            [r["planned_accuracy"] for r in curve],
            "-o",
            color=GREEN,
            markersize=3,
            label="frontier: best planned accuracy at each budget",
        )
    budget = report.get("budget_usd")
    if budget:
        ax.axvline(budget, color=GREY, linestyle="--", linewidth=1, label=f"budget ${budget:.4g}")
    ax.plot(
        [report["planned_cost_usd"]],
        [report["planned_accuracy"]],
        "*",
        markersize=13,
        markerfacecolor="none",
        color=ORANGE,
        label="batchplan, planned",
    )
    if report.get("accuracy") is not None:
        ax.plot(
            [report["spent_usd"]], [report["accuracy"]], "*", markersize=15, color=ORANGE, label="batchplan, realized"
        )
    for marker, b in zip(BASELINE_MARKERS, report.get("baselines", []), strict=False):
        ax.plot([b["spent_usd"]], [b["accuracy"]], marker, markersize=7, color=GREY, label=b["policy"])
    positive = [x for line in ax.get_lines() for x in line.get_xdata() if x > 0]
    if positive and max(positive) > 10 * min(positive):
        # costs span orders of magnitude (the cheapest model against the best one at its own cost): a log axis;
        # a point at $0 (nothing spent) sits on its left edge
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"${x:g}"))
        ax.set_xlim(left=min(positive) / 1.5, right=max(positive) * 1.5)
        for line in ax.get_lines():
            line.set_xdata([x if x > 0 else min(positive) / 1.5 for x in line.get_xdata()])
    else:
        ax.set_xlim(left=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"${x:g}"))
    ax.set_xlabel("spend (frontier and planned: expected cost)")
    ax.set_ylabel("accuracy over all queries")
    ax.set_ylim(0, 1.02)
    _percent_axis(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _svg(fig, title)


def calibration_chart(report: dict[str, Any], title: str) -> str:
    """Per task, the accuracy planned (the predictor's expectation: hollow) against the accuracy realized
    (filled), joined by a line coloured by the sign of the miss; one row per task, so labels never collide."""
    tasks = sorted(report.get("per_task", []), key=lambda t: t["task"], reverse=True)
    fig, ax = _figure(7.0, 1.3 + 0.34 * max(len(tasks), 1))
    for i, t in enumerate(tasks):
        planned, realized = t["planned_accuracy"], t["accuracy"]
        ax.plot([planned, realized], [i, i], color=GREEN if realized >= planned else ORANGE, linewidth=2)
    rows = range(len(tasks))
    ax.scatter(
        [t["planned_accuracy"] for t in tasks],
        rows,
        s=36,
        facecolors="white",
        edgecolors=GREY,
        zorder=3,
        label="planned",
    )
    ax.scatter([t["accuracy"] for t in tasks], rows, s=36, color=GREY, zorder=3, label="realized")
    ax.set_yticks(list(rows), [f"{t['task']} ({t['queries']})" for t in tasks], fontsize=7)
    ax.set_xlabel("accuracy (planned: the predictor's expectation; realized: scored on the truth)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.6, len(tasks) - 0.4)
    _percent_axis(ax, "x")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _svg(fig, title)


def _usd(value: float) -> str:
    return f"${value:.4f}" if value >= 0.0001 or value == 0 else "<$0.0001"


def spend_chart(report: dict[str, Any], title: str) -> str:
    """Spend per model, largest at the top, each bar labelled with its dollars and calls."""
    rows = sorted(report.get("spend_per_model", []), key=lambda r: r["spent_usd"])
    fig, ax = _figure(7.0, 1.2 + 0.32 * max(len(rows), 1))
    names = [r["model"] for r in rows]
    spends = [r["spent_usd"] for r in rows]
    ax.barh(names, spends, color=ORANGE)
    for i, r in enumerate(rows):
        ax.annotate(
            f" {_usd(r['spent_usd'])} ({r['calls']} calls)",
            (r["spent_usd"], i),
            va="center",
            fontsize=7,
        )
    ax.set_xlabel("spend, USD")
    ax.set_xlim(0, max(spends, default=1.0) * 1.35 or 1.0)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig, title)
