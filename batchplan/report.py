"""The run report: spend vs budget, accuracy where the truth is known, per-model shares, and the same
figures for simple baselines at the same budget (cheapest model, best single model at its own cost, random
assignment, the oracle). Written as JSON (machines), Markdown (logs, terminals) and HTML (the Airflow UI).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from batchplan.contracts import RESULT_STATUSES
from batchplan.history import History
from batchplan.storage import Storage, join


@dataclass(frozen=True)
class Truth:
    """What really happens when a model answers a query: from a recorded history (replay) or from feedback."""

    outcomes: pl.DataFrame  # query_id, model, answer, correct, cost_usd
    gold: pl.DataFrame  # query_id, gold

    @classmethod
    def from_history(cls, history: History) -> Truth:
        return cls(
            outcomes=history.outcomes.select("query_id", "model", "answer", "correct", "cost_usd"),
            gold=history.queries.select("query_id", "gold"),
        )


def score_results(results: pl.DataFrame, truth: Truth) -> pl.DataFrame:
    """Add ``correct`` to each result, as ``plan_simulation`` judges a plan: the answer against gold where
    gold is known; otherwise the recorded verdict of the model whose answer was kept (open tasks, such as
    code, where the history holds the verdict but not the text). Deferred and failed queries are not correct."""
    calls = results.select("query_id", "answer", pl.col("models_called").alias("model")).explode("model")
    verdicts = (
        calls.join(
            truth.outcomes.select("query_id", "model", pl.col("answer").alias("_given"), "correct"),
            on=["query_id", "model"],
            # the call order decides which verdict counts (the last): a join does not keep it by default
            maintain_order="left",
        )
        # the model whose answer was kept: the last one called that gave it (for open tasks, the last called)
        .filter(pl.col("answer").is_null() | (pl.col("_given") == pl.col("answer")))
        .group_by("query_id", maintain_order=True)
        .agg(pl.col("correct").last().alias("_recorded"))
    )
    scored = (
        results.join(verdicts, on="query_id", how="left")
        .join(truth.gold, on="query_id", how="left")
        .with_columns(
            pl.when(pl.col("status") != "done")
            .then(pl.lit(False))
            .when(pl.col("gold").is_not_null() & pl.col("answer").is_not_null())
            .then(pl.col("answer") == pl.col("gold"))
            .otherwise(pl.col("_recorded").fill_null(False))
            .alias("correct")
        )
    )
    return scored.drop("_recorded", "gold")


def _budgeted(costs: np.ndarray, correct: np.ndarray, budget: float | None) -> tuple[float, float, int]:
    """Send queries in the given order until the next would pass the budget; the rest are deferred."""
    keep = np.ones(len(costs), dtype=bool) if budget is None else np.cumsum(costs) <= budget + 1e-12
    n = max(len(costs), 1)
    return float(correct[keep].sum() / n), float(costs[keep].sum()), int((~keep).sum())


def baselines(
    query_ids: pl.Series,
    truth: Truth,
    budget_usd: float | None,
    reference_models: dict[str, str],
    tasks: pl.DataFrame,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy and realized spend of simple policies on the same queries and budget."""
    outcomes = truth.outcomes.filter(pl.col("query_id").is_in(query_ids.implode())).join(tasks, on="query_id")
    n = query_ids.len()
    rows: list[dict[str, Any]] = []

    # rounded, so models at one price tie exactly (a parallel mean's last bits vary between runs) and the tie
    # goes to the first by name: the baseline must not move between runs
    mean_cost = outcomes.group_by("task", "model").agg(pl.col("cost_usd").mean().round(12).alias("mean_cost"))
    cheapest = mean_cost.group_by("task").agg(pl.col("model").sort_by("mean_cost", "model").first())
    picked = outcomes.join(cheapest, on=["task", "model"]).sort("query_id")
    acc, spend, deferred = _budgeted(picked["cost_usd"].to_numpy(), picked["correct"].to_numpy(), budget_usd)
    rows.append(
        {
            "policy": "cheapest model",
            "accuracy": acc * picked.height / n,
            "spend_usd": spend,
            "deferred": deferred + n - picked.height,
        }
    )

    reference = pl.DataFrame(
        {"task": list(reference_models), "model": list(reference_models.values())},
        schema={"task": pl.String, "model": pl.String},
    )
    picked = outcomes.join(reference, on=["task", "model"])
    models = ", ".join(sorted(set(reference_models.values())))
    rows.append(
        {
            "policy": f"best single model, own cost ({models})",
            "accuracy": float(picked["correct"].sum() / max(n, 1)),
            "spend_usd": float(picked["cost_usd"].sum()),
            "deferred": 0,
        }
    )

    rng = np.random.default_rng(seed)
    accs, spends, defs = [], [], []
    for _ in range(5):
        shuffled = outcomes.with_columns(pl.lit(rng.random(outcomes.height)).alias("_r"))
        picked = shuffled.sort("_r").group_by("query_id", maintain_order=True).first()
        picked = picked.sample(fraction=1.0, shuffle=True, seed=int(rng.integers(1 << 31)))
        a, s, d = _budgeted(picked["cost_usd"].to_numpy(), picked["correct"].to_numpy(), budget_usd)
        accs.append(a * picked.height / n)
        spends.append(s)
        defs.append(d + n - picked.height)
    rows.append(
        {
            "policy": "random model (mean of 5)",
            "accuracy": float(np.mean(accs)),
            "spend_usd": float(np.mean(spends)),
            "deferred": int(np.mean(defs)),
        }
    )

    # Oracle: knows every outcome; the cheapest correct call per query, cheapest queries first (optimal for unit values).
    best = outcomes.filter(pl.col("correct")).group_by("query_id").agg(pl.col("cost_usd").min()).sort("cost_usd")
    acc, spend, _ = _budgeted(best["cost_usd"].to_numpy(), np.ones(best.height, dtype=bool), budget_usd)
    rows.append({"policy": "oracle", "accuracy": acc * best.height / n, "spend_usd": spend, "deferred": 0})
    return rows


def build_report(
    *,
    results: pl.DataFrame,
    plan: pl.DataFrame,
    budget_usd: float | None,
    quarantined: int = 0,
    truth: Truth | None = None,
    reference_models: dict[str, str] | None = None,
    queue: pl.DataFrame | None = None,
    optimizer: dict[str, Any] | None = None,
    run_id: str | None = None,
    tenant_budgets_usd: dict[str, float] | None = None,
) -> dict[str, Any]:
    status_counts = {s: int((results["status"] == s).sum()) for s in RESULT_STATUSES}
    spend = float(results["cost_usd"].fill_null(0).sum())
    calls = results.select(pl.col("models_called").explode().drop_nulls().alias("model"))
    shares = (
        plan.filter(pl.col("kind") != "defer")
        .select(pl.col("models").list.first().alias("model"))
        .group_by("model")
        .len()
        .with_columns((pl.col("len") / max(plan.height, 1)).alias("share"))
        .sort("len", descending=True)
    )
    call_counts = calls.group_by("model").len().sort("len", descending=True)
    report: dict[str, Any] = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "queries": results.height,
        "quarantined": quarantined,
        "status": status_counts,
        "budget_usd": budget_usd,
        "spend_usd": spend,
        "planned_cost_usd": float(plan["expected_cost_usd"].sum()),
        "planned_accuracy": float(plan["expected_accuracy"].fill_null(0).sum() / max(plan.height, 1)),
        "plan_kinds": {k: int(v) for k, v in plan.group_by("kind").len().iter_rows()},
        "model_share": [{"model": m, "queries": int(c), "share": float(s)} for m, c, s in shares.iter_rows()],
        "calls_per_model": [{"model": m, "calls": int(c)} for m, c in call_counts.iter_rows()],
        "optimizer": optimizer or {},
        "accuracy": None,
        "baselines": [],
    }
    if queue is not None and "tenant" in queue.columns:
        report["per_tenant"] = per_tenant(results, queue, truth, tenant_budgets_usd or {})
    if truth is not None:
        scored = score_results(results, truth)
        known = scored.filter(pl.col("correct").is_not_null())
        report["accuracy"] = float(known["correct"].sum() / max(known.height, 1)) if known.height else None
        report["accuracy_known_for"] = known.height
        if queue is not None and reference_models:
            report["baselines"] = baselines(
                results["query_id"], truth, budget_usd, reference_models, queue.select("query_id", "task")
            )
            report["per_task"] = [
                {"task": t, "queries": int(q), "accuracy": float(a), "spend_usd": float(s)}
                for t, q, a, s in scored.join(queue.select("query_id", "task"), on="query_id")
                .group_by("task")
                .agg(pl.len(), pl.col("correct").fill_null(False).mean(), pl.col("cost_usd").fill_null(0).sum())
                .sort("task")
                .iter_rows()
            ]
    report["savings"] = savings(report)
    return report


def per_tenant(
    results: pl.DataFrame, queue: pl.DataFrame, truth: Truth | None, budgets_usd: dict[str, float]
) -> list[dict[str, Any]]:
    """Queries, deferrals, spend against the tenant's budget (None: no budget of its own) and accuracy."""
    scored = score_results(results, truth) if truth is not None else results.with_columns(pl.lit(None).alias("correct"))
    rows = (
        scored.join(queue.select("query_id", "tenant"), on="query_id")
        .group_by("tenant")
        .agg(
            pl.len().alias("queries"),
            (pl.col("status") == "deferred").sum().alias("deferred"),
            pl.col("cost_usd").fill_null(0).sum().alias("spend_usd"),
            pl.col("correct").cast(pl.Float64).mean().alias("accuracy"),
        )
        .sort("tenant")
    )
    return [row | {"budget_usd": budgets_usd.get(row["tenant"])} for row in rows.iter_rows(named=True)]


def _per_task_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ["task", "queries", "accuracy", "spend USD"], [
        [t["task"], str(t["queries"]), _fmt_acc(t["accuracy"]), f"{t['spend_usd']:.4f}"]
        for t in report.get("per_task", [])
    ]


def _per_tenant_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ["tenant", "queries", "deferred", "accuracy", "spend USD", "budget USD"], [
        [
            t["tenant"],
            str(t["queries"]),
            str(t["deferred"]),
            _fmt_acc(t["accuracy"]),
            f"{t['spend_usd']:.4f}",
            f"{t['budget_usd']:.4f}" if t["budget_usd"] is not None else "-",
        ]
        for t in report.get("per_tenant", [])
    ]


def savings(report: dict[str, Any]) -> dict[str, float] | None:
    """Spend saved and accuracy given up (or gained) against the best single model at its own cost."""
    best = next((b for b in report["baselines"] if b["policy"].startswith("best single model")), None)
    if best is None or report["accuracy"] is None or not best["spend_usd"]:
        return None
    return {
        "spend_saved_pct": 100 * (1 - report["spend_usd"] / best["spend_usd"]),
        "accuracy_delta_pts": 100 * (report["accuracy"] - best["accuracy"]),
    }


def _savings_text(report: dict[str, Any]) -> str:
    s = report.get("savings")
    if not s:
        return ""
    return (
        f"Against the best single model at its own cost: {s['spend_saved_pct']:.0f}% less spend, "
        f"{s['accuracy_delta_pts']:+.1f} accuracy points."
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def summary_line(report: dict[str, Any]) -> str:
    acc = report.get("accuracy")
    acc_text = f"{acc:.1%}" if acc is not None else "n/a"
    budget = report.get("budget_usd")
    budget_text = f"${budget:.4f}" if budget is not None else "none"
    st = report["status"]
    return (
        f"queries={report['queries']} done={st['done']} failed={st['failed']} deferred={st['deferred']} "
        f"quarantined={report['quarantined']} accuracy={acc_text} spend=${report['spend_usd']:.4f} budget={budget_text}"
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt_acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# batchplan report {report.get('run_id') or ''}".rstrip(), "", summary_line(report), ""]
    if report.get("savings"):
        parts += [_savings_text(report), ""]
    rows = [
        [
            "batchplan (this run)",
            _fmt_acc(report["accuracy"]),
            f"{report['spend_usd']:.4f}",
            str(report["status"]["deferred"]),
        ]
    ]
    rows += [
        [b["policy"], _fmt_acc(b["accuracy"]), f"{b['spend_usd']:.4f}", str(b["deferred"])] for b in report["baselines"]
    ]
    parts += [
        "## Accuracy and spend at the same budget",
        "",
        _table(["policy", "accuracy", "spend USD", "deferred"], rows),
        "",
    ]
    parts += [
        "## Plan",
        "",
        _table(
            ["model (first call)", "queries", "share"],
            [[m["model"], str(m["queries"]), f"{m['share']:.1%}"] for m in report["model_share"]],
        ),
        "",
    ]
    if report.get("per_task"):
        parts += ["## Per task", "", _table(*_per_task_table(report)), ""]
    if report.get("per_tenant"):
        parts += ["## Per tenant", "", _table(*_per_tenant_table(report)), ""]
    if report["optimizer"]:
        parts += [
            "## Optimizer",
            "",
            _table(["field", "value"], [[k, _fmt(v)] for k, v in report["optimizer"].items()]),
            "",
        ]
    return "\n".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page (no scripts, no external assets): tables and CSS bars."""
    budget = report.get("budget_usd") or 0.0
    spend = report["spend_usd"]
    fill = min(spend / budget, 1.0) * 100 if budget else 0.0

    def table(headers: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    policies = [("batchplan (this run)", report["accuracy"], spend)] + [
        (b["policy"], b["accuracy"], b["spend_usd"]) for b in report["baselines"]
    ]
    max_spend = max([p[2] for p in policies] + [budget, 1e-12])
    bars = "".join(
        f"<div class='row'><span class='name'>{html.escape(name)}</span>"
        f"<span class='bar' style='width:{(acc or 0) * 300:.0f}px'></span><span>{_fmt_acc(acc)}</span>"
        f"<span class='bar cost' style='width:{cost / max_spend * 300:.0f}px'></span><span>${cost:.4f}</span></div>"
        for name, acc, cost in policies
    )
    kinds = table(["plan kind", "queries"], [[k, str(v)] for k, v in sorted(report["plan_kinds"].items())])
    per_task = table(*_per_task_table(report))
    per_tenant = table(*_per_tenant_table(report))
    shares = table(
        ["model (first call)", "queries", "share"],
        [[m["model"], str(m["queries"]), f"{m['share']:.1%}"] for m in report["model_share"]],
    )
    optimizer = (
        table(["field", "value"], [[k, _fmt(v)] for k, v in report["optimizer"].items()]) if report["optimizer"] else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>batchplan report {html.escape(str(report.get("run_id") or ""))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.row{{display:flex;gap:.5em;align-items:center;margin:.2em 0}}
.name{{width:22em}}.bar{{display:inline-block;height:1em;background:#3a7}}.bar.cost{{background:#c84}}
.budget{{width:400px;height:1.2em;border:1px solid #333}}.budget div{{height:100%;background:#c84}}</style></head><body>
<h1>batchplan report</h1><p>{html.escape(summary_line(report))}</p><p><b>{html.escape(_savings_text(report))}</b></p>
<h2>Spend vs budget</h2><div class="budget"><div style="width:{fill:.1f}%"></div></div><p>${spend:.4f} of ${budget:.4f}</p>
<h2>Accuracy (green) and spend (orange) at the same budget</h2>{bars}
<h2>Deferred and failed</h2><p>deferred: {report["status"]["deferred"]}, failed: {report["status"]["failed"]}, quarantined: {report["quarantined"]}</p>
<h2>Plan kinds</h2>{kinds}
<h2>Per task</h2>{per_task}
<h2>Per tenant</h2>{per_tenant}
<h2>Per-model share</h2>{shares}
<h2>Optimizer</h2>{optimizer}
</body></html>"""


def write_report(report: dict[str, Any], out_uri: str, storage: Storage) -> dict[str, str]:
    paths = {name: join(out_uri, f"report.{name}") for name in ("json", "md", "html")}
    storage.write_text(paths["json"], json.dumps(report, indent=2, default=str))
    storage.write_text(paths["md"], render_markdown(report))
    storage.write_text(paths["html"], render_html(report))
    return paths
