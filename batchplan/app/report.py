"""The run report: spend vs budget, accuracy where the truth is known, per-model shares, and the same
figures for simple baselines at the same budget (cheapest model, best single model at its own cost, random
assignment, the oracle). Written as JSON (machines), Markdown (logs, terminals) and HTML (the Airflow UI).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from batchplan.app import charts
from batchplan.core.contracts import RESULT_STATUSES, Status
from batchplan.core.history import History
from batchplan.core.storage import Storage, join
from batchplan.plans.audit import drift_lines


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


def _budgeted(costs: np.ndarray, correct: np.ndarray, budget: float | None) -> tuple[int, float, int]:
    """Send queries in the given order until the next would pass the budget; the rest are deferred.
    Returns (right answers, spend, answered)."""
    keep = np.ones(len(costs), dtype=bool) if budget is None else np.cumsum(costs) <= budget + 1e-12
    return int(correct[keep].sum()), float(costs[keep].sum()), int(keep.sum())


def _policy_row(policy: str, n: int, right: float, answered: float, deferred: float, spend: float) -> dict[str, Any]:
    """One baseline's figures. ``accuracy`` is over all ``n`` queries (deferred and unrecorded count as
    wrong), ``accuracy_answered`` over the queries it answered; ``unrecorded``: queries for which the
    history holds no answer of the model the policy picks (it cannot be replayed there)."""
    return {
        "policy": policy,
        "accuracy": right / max(n, 1),
        "accuracy_answered": right / answered if answered else None,
        "spent_usd": spend,
        "answered": round(answered),
        "deferred": round(deferred),
        "unrecorded": round(n - answered - deferred),
    }


BASELINE_NOTES = {
    "cheapest model": "each query to its task's cheapest model, in queue order until the budget runs out; the rest "
    "deferred",
    "best single model": "each query to its task's most accurate model, at that model's own cost (not held to the "
    "budget)",
    "random model": "each query to a model drawn at random, in random order until the budget runs out; mean of 5 draws",
    "oracle": "knows every outcome: each query to its cheapest right model, cheapest first until the budget runs "
    "out; queries no model gets right are deferred",
}


CHEAPEST, BEST_SINGLE, RANDOM, ORACLE = BASELINE_NOTES  # the policies' names, in the report's order


def baseline_policies(
    query_ids: pl.Series,
    truth: Truth,
    budget_usd: float | None,
    reference_models: dict[str, str],
    tasks: pl.DataFrame,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Accuracy and realized spend of simple policies on the same queries and budget, with how many queries
    each answered, deferred (the budget ran out) and could not replay (no recorded answer): per policy name
    (CHEAPEST, BEST_SINGLE, RANDOM, ORACLE) its row of report.json's ``baselines``."""
    outcomes = truth.outcomes.filter(pl.col("query_id").is_in(query_ids.implode())).join(tasks, on="query_id")
    n = query_ids.len()
    rows: dict[str, dict[str, Any]] = {}

    # rounded, so models at one price tie exactly (a parallel mean's last bits vary between runs) and the tie
    # goes to the first by name: the baseline must not move between runs
    mean_cost = outcomes.group_by("task", "model").agg(pl.col("cost_usd").mean().round(12).alias("mean_cost"))
    cheapest = mean_cost.group_by("task").agg(pl.col("model").sort_by("mean_cost", "model").first())
    picked = outcomes.join(cheapest, on=["task", "model"]).sort("query_id")
    right, spend, answered = _budgeted(picked["cost_usd"].to_numpy(), picked["correct"].to_numpy(), budget_usd)
    rows[CHEAPEST] = _policy_row("cheapest model", n, right, answered, picked.height - answered, spend)

    reference = pl.DataFrame(
        {"task": list(reference_models), "model": list(reference_models.values())},
        schema={"task": pl.String, "model": pl.String},
    )
    picked = outcomes.join(reference, on=["task", "model"])
    models = ", ".join(sorted(set(reference_models.values())))
    rows[BEST_SINGLE] = _policy_row(
        f"best single model, own cost ({models})",
        n,
        int(picked["correct"].sum()),
        picked.height,
        0,
        float(picked["cost_usd"].sum()),
    )

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(5):
        shuffled = outcomes.with_columns(pl.lit(rng.random(outcomes.height)).alias("_r"))
        picked = shuffled.sort("_r").group_by("query_id", maintain_order=True).first()
        picked = picked.sample(fraction=1.0, shuffle=True, seed=int(rng.integers(1 << 31)))
        right, spend, answered = _budgeted(picked["cost_usd"].to_numpy(), picked["correct"].to_numpy(), budget_usd)
        draws.append((right, answered, picked.height - answered, spend))
    right_, answered_, deferred_, spend_ = (float(np.mean(column)) for column in zip(*draws, strict=True))
    rows[RANDOM] = _policy_row("random model (mean of 5)", n, right_, answered_, deferred_, spend_)

    # Oracle: knows every outcome; the cheapest correct call per query, cheapest queries first (optimal for unit values).
    best = outcomes.filter(pl.col("correct")).group_by("query_id").agg(pl.col("cost_usd").min()).sort("cost_usd")
    right, spend, answered = _budgeted(best["cost_usd"].to_numpy(), np.ones(best.height, dtype=bool), budget_usd)
    recorded = outcomes["query_id"].n_unique()
    rows[ORACLE] = _policy_row("oracle", n, right, answered, recorded - answered, spend)
    return rows


OPTIONAL = {"optional": True}  # a field's metadata: report.json has it only when set (a section some runs lack)


@dataclass
class Report:
    """The run report, one field per report.json key (in the file's order): what report.json, report.md and
    report.html are all rendered from. ``build_report`` fills it; ``from_json`` reads a written one back (a
    re-render after ``batchplan label``). To add a section: add a field here (``metadata=OPTIONAL`` if report.json
    should only have it when set), fill it in ``build_report`` and read it in the section's function below.
    Nested rows stay the JSON's own dicts (their keys are report.json's contract)."""

    run_id: str | None = None
    created: str = ""
    queries: int = 0
    quarantined: int = 0
    status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULT_STATUSES, 0))
    budget_usd: float | None = None
    spent_usd: float = 0.0
    planned_cost_usd: float = 0.0
    planned_accuracy: float = 0.0
    estimated_accuracy: float | None = None
    # which estimate it is: the rounds' posterior of the final answers ("posterior") or the audits' ("audit")
    estimated_accuracy_source: str | None = None
    plan_kinds: dict[str, int] = field(default_factory=dict)
    model_share: list[dict[str, Any]] = field(default_factory=list)
    calls_per_model: list[dict[str, Any]] = field(default_factory=list)
    spend_per_model: list[dict[str, Any]] = field(default_factory=list)
    not_answered: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] = field(default_factory=dict)
    # asked for but binding nothing (--allow-unused-constraints), and tasks the predictor only guesses at
    unused_constraints: list[str] = field(default_factory=list)
    unseen_tasks: list[str] = field(default_factory=list)
    frontier: list[dict[str, Any]] = field(default_factory=list)
    accuracy: float | None = None
    accuracy_answered: float | None = None
    baselines: list[dict[str, Any]] = field(default_factory=list)
    # a run in rounds: one line per round (budget left, calls, charges, refusals); empty for single shot
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # how a run in rounds went out by batch and real time (``dispatch_modes``); unset when nothing went by batch
    dispatch_modes: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    per_tenant: list[dict[str, Any]] | None = field(default=None, metadata=OPTIONAL)
    accuracy_known_for: int | None = field(default=None, metadata=OPTIONAL)
    per_task: list[dict[str, Any]] | None = field(default=None, metadata=OPTIONAL)
    audit: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    estimated_accuracy_ci95: list[float] | None = field(default=None, metadata=OPTIONAL)
    drift: list[dict[str, Any]] | None = field(default=None, metadata=OPTIONAL)
    # exploration's share and why it is on ("asked", or "drift": the labels put an LLM off; plans.planning.choose_exploration)
    exploration: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    savings: dict[str, float] | None = None
    labelled_accuracy: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # labels that arrived after the run (batchplan label)
    accuracy_source: str | None = field(default=None, metadata=OPTIONAL)  # "labels": ``accuracy`` was measured on them
    # keys this code does not know (a newer writer's): kept through a read and a write, never dropped
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """report.json's content."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and not (f.metadata.get("optional") and getattr(self, f.name) is None)
        }
        return out | self.extra

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )


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
    unseen_tasks: list[str] | None = None,
    frontier: list[dict[str, Any]] | None = None,
    spend_by_model: dict[str, float] | None = None,
    estimated_accuracy: float | None = None,
    audit: dict[str, Any] | None = None,
    rounds: list[dict[str, Any]] | None = None,
) -> Report:
    """The run's report. ``frontier``: ``batchplan.plans.frontier`` rows (planned accuracy per budget);
    ``spend_by_model``: what the ledger charged per model (without it, from the results: exact for queries
    that called one model, the rest under one 'several models' row); ``estimated_accuracy``: the mean
    posterior of the final answers (a run in rounds), without gold; ``audit``: ``batchplan.plans.audit.
    estimate_audit`` (then the estimate is the audited one, with its interval, and the audits' spend counts);
    ``rounds``: a run in rounds, one line per round (``RoundsOutcome.rounds``: budget, calls, charges, refusals)."""
    status_counts = {s: int((results["status"] == s).sum()) for s in RESULT_STATUSES}
    spend = float(results["cost_usd"].fill_null(0).sum())
    calls = results.select(pl.col("models_called").explode().drop_nulls().alias("model"))
    shares = (
        plan.filter(pl.col("models").list.len() > 0)  # not deferred, not unanswerable
        .select(pl.col("models").list.first().alias("model"))
        .group_by("model")
        .len()
        .with_columns((pl.col("len") / max(plan.height, 1)).alias("share"))
        .sort("len", descending=True)
    )
    call_counts = calls.group_by("model").len().sort("len", descending=True)
    best_single: dict[str, Any] | None = None  # the 'best single model' baseline's row, where there is one
    report: dict[str, Any] = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "queries": results.height,
        "quarantined": quarantined,
        "status": status_counts,
        "budget_usd": budget_usd,
        "spent_usd": spend,
        "planned_cost_usd": float(plan["expected_cost_usd"].sum()),
        "planned_accuracy": float(plan["expected_accuracy"].fill_null(0).sum() / max(plan.height, 1)),
        "estimated_accuracy": estimated_accuracy,
        # which estimate it is: the rounds' posterior of the final answers, or (``_add_audit``) the audits'
        "estimated_accuracy_source": "posterior" if estimated_accuracy is not None else None,
        "plan_kinds": {k: int(v) for k, v in plan.group_by("kind").len().sort("kind").iter_rows()},
        "model_share": [{"model": m, "queries": int(c), "share": float(s)} for m, c, s in shares.iter_rows()],
        "calls_per_model": [{"model": m, "calls": int(c)} for m, c in call_counts.iter_rows()],
        "spend_per_model": _spend_per_model(results, call_counts, spend_by_model),
        "not_answered": _reasons(results),
        "optimizer": optimizer or {},
        # asked for but binding nothing (--allow-unused-constraints), and tasks the predictor only guesses at
        "unused_constraints": list((optimizer or {}).get("unused_constraints") or []),
        "unseen_tasks": list(unseen_tasks or []),
        "frontier": list(frontier or []),
        "accuracy": None,
        "accuracy_answered": None,
        "baselines": [],
        "rounds": list(rounds or []),
    }
    if queue is not None and "tenant" in queue.columns:
        report["per_tenant"] = per_tenant(results, queue, truth, tenant_budgets_usd or {})
    if truth is not None:
        scored = score_results(results, truth)
        known = scored.filter(pl.col("correct").is_not_null())
        report["accuracy"] = float(known["correct"].sum() / max(known.height, 1)) if known.height else None
        report["accuracy_known_for"] = known.height
        answered = known.filter(pl.col("status") == "done")
        report["accuracy_answered"] = float(answered["correct"].sum() / answered.height) if answered.height else None
        if queue is not None and reference_models:
            policies = baseline_policies(
                results["query_id"], truth, budget_usd, reference_models, queue.select("query_id", "task")
            )
            report["baselines"] = list(policies.values())
            best_single = policies[BEST_SINGLE]
            planned = plan.select("query_id", pl.col("expected_accuracy").fill_null(0.0).alias("_planned"))
            report["per_task"] = [
                {
                    "task": t,
                    "queries": int(q),
                    "planned_accuracy": float(p),
                    "accuracy": float(a),
                    "spent_usd": float(s),
                }
                for t, q, p, a, s in scored.join(queue.select("query_id", "task"), on="query_id")
                .join(planned, on="query_id", how="left")
                .group_by("task")
                .agg(
                    pl.len(),
                    pl.col("_planned").fill_null(0.0).mean(),
                    pl.col("correct").fill_null(False).mean(),
                    pl.col("cost_usd").fill_null(0).sum(),
                )
                .sort("task")
                .iter_rows()
            ]
    if audit is not None:
        _add_audit(report, audit)
    report["savings"] = savings(report["spent_usd"], report["accuracy"], best_single)
    return Report.from_json(report)


def _add_audit(report: dict[str, Any], audit: dict[str, Any]) -> None:
    """The audits' estimate at the top of the report: it replaces a posterior estimate (the report names which
    one it is), keeps planned_accuracy as the predictor's promise, and the reference and exploration calls' spend
    counts."""
    report["audit"] = audit
    # the exploration's calls are billed beside the references' (``audit.spent_usd`` is the references' alone)
    report["spent_usd"] += audit["spent_usd"] + float((audit.get("exploration") or {}).get("spent_usd", 0.0))
    if audit.get("estimated_accuracy") is not None:
        report["estimated_accuracy"] = audit["estimated_accuracy"]
        report["estimated_accuracy_source"] = "audit"
        report["estimated_accuracy_ci95"] = audit["ci95"]
    report["drift"] = list(audit.get("drift") or [])


SEVERAL_MODELS = "several models (cascades, votes)"


def _spend_per_model(
    results: pl.DataFrame, call_counts: pl.DataFrame, spend_by_model: dict[str, float] | None
) -> list[dict[str, Any]]:
    calls = dict(call_counts.iter_rows())
    if spend_by_model is None:
        # a query's cost is one sum over its calls: only a one-call query's cost is known per model
        one = results.filter(pl.col("models_called").list.len() == 1)
        spend_by_model = dict(
            one.group_by(pl.col("models_called").list.first()).agg(pl.col("cost_usd").fill_null(0).sum()).iter_rows()
        )
        several = float(results.filter(pl.col("models_called").list.len() > 1)["cost_usd"].fill_null(0).sum())
        if several:
            spend_by_model[SEVERAL_MODELS] = several
    rows = [
        {"model": m, "calls": int(calls.get(m, 0)), "spent_usd": float(usd)}
        for m, usd in spend_by_model.items()
        if usd or calls.get(m)
    ]
    return sorted(rows, key=lambda r: (-r["spent_usd"], r["model"]))


def _reasons(results: pl.DataFrame, top: int = 8) -> list[dict[str, Any]]:
    """The most common reasons queries were deferred or failed; amounts in a reason ("needs up to 0.000268
    USD") are blanked, so reasons that differ only by them count as one."""
    return [
        {"status": s, "reason": r or "", "queries": int(c)}
        for s, r, c in results.filter(pl.col("status") != "done")
        .with_columns(pl.col("error").str.replace_all(r"(^|\s)[0-9][0-9.e+-]*", "${1}…"))
        .group_by("status", "error")
        .len()
        .sort(["len", "status", "error"], descending=[True, False, False])
        .head(top)
        .iter_rows()
    ]


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
            pl.col("cost_usd").fill_null(0).sum().alias("spent_usd"),
            pl.col("correct").cast(pl.Float64).mean().alias("accuracy"),
        )
        .sort("tenant")
    )
    return [row | {"budget_usd": budgets_usd.get(row["tenant"])} for row in rows.iter_rows(named=True)]


def savings(spent_usd: float, accuracy: float | None, best_single: dict[str, Any] | None) -> dict[str, float] | None:
    """Spend saved and accuracy given up (or gained) against the best single model at its own cost (its
    ``baseline_policies`` row)."""
    if best_single is None or accuracy is None or not best_single["spent_usd"]:
        return None
    return {
        "spend_saved_pct": 100 * (1 - spent_usd / best_single["spent_usd"]),
        "accuracy_delta_pts": 100 * (accuracy - best_single["accuracy"]),
    }


def _savings_text(report: Report) -> str:
    """Differences worded by their sign: "62% more spend", never "-62% less spend"."""
    s = report.savings
    if not s:
        return ""
    pct, pts = s["spend_saved_pct"], s["accuracy_delta_pts"]
    spend = "the same spend" if round(abs(pct)) == 0 else f"{abs(pct):.0f}% {'less' if pct > 0 else 'more'} spend"
    accuracy = (
        "the same accuracy"
        if round(abs(pts), 1) == 0
        else f"{abs(pts):.1f} accuracy points {'higher' if pts > 0 else 'lower'}"
    )
    return f"Against the best single model at its own cost: {spend}, {accuracy}."


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def summary_line(report: Report) -> str:
    acc = report.accuracy
    acc_text = f"{acc:.1%}" if acc is not None else "n/a"
    budget = report.budget_usd
    budget_text = f"${budget:.4f}" if budget is not None else "none"
    st = report.status
    return (
        f"queries={report.queries} done={st['done']} failed={st['failed']} deferred={st['deferred']} "
        f"quarantined={report.quarantined} accuracy={acc_text} spend=${report.spent_usd:.4f} budget={budget_text}"
    )


def _fmt_acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def estimates_line(report: Report) -> str:
    """Planned accuracy, the run's own estimate after it (no gold) and, where the truth is known, the
    realized accuracy with each one's miss."""
    planned, estimated, realized = report.planned_accuracy, report.estimated_accuracy, report.accuracy
    parts = [f"planned accuracy {_fmt_acc(planned)}"]
    if estimated is not None and (ci := report.estimated_accuracy_ci95):
        parts.append(f"audited estimate {_fmt_acc(estimated)} (95% CI {_fmt_acc(ci[0])}-{_fmt_acc(ci[1])}, no gold)")
    elif estimated is not None:
        parts.append(f"estimated after the run {_fmt_acc(estimated)}")
    if realized is not None:
        misses = [
            f"{name} {100 * (value - realized):+.1f} pts"
            for name, value in (("planned", planned), ("estimated", estimated))
            if value is not None
        ]
        parts.append(f"realized {_fmt_acc(realized)} ({', '.join(misses)})")
    return "; ".join(parts)



# --- sections: built once from the report, rendered by both formats, so Markdown and HTML cannot drift ---


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    collapsed: bool = False  # HTML: folded under "the numbers" (a chart above shows them)


@dataclass(frozen=True)
class Note:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class Gauge:
    """Spend against a limit: a bar in HTML, a sentence in Markdown."""

    value: float
    limit: float | None


@dataclass(frozen=True)
class Chart:
    title: str
    draw: Callable[[dict[str, Any], str], str]  # (report.json's content, title) -> <svg>


Block = Table | Note | Gauge | Chart


@dataclass(frozen=True)
class Section:
    title: str
    blocks: list[Block]


def _spend_section(report: Report) -> Section:
    return Section("Spend against budget", [Gauge(report.spent_usd, report.budget_usd)])


def _frontier_section(report: Report) -> Section | None:
    if not report.frontier and not report.baselines:
        return None
    blocks: list[Block] = [
        Chart("Cost against accuracy: the frontier, this run and the baselines", charts.frontier_chart),
        Note(
            "The frontier is this batch re-planned at each budget (same candidates and constraints, deferral "
            "allowed): the accuracy the predictor expects, at the expected cost. This run's realized point and "
            "the baselines are scored on the truth."
        ),
    ]
    if report.frontier:
        blocks.append(
            Table(
                ["budget USD", "planned cost USD", "planned accuracy", "deferred"],
                [
                    [
                        f"{r['budget_usd']:.4f}",
                        f"{r['planned_cost_usd']:.4f}",
                        _fmt_acc(r["planned_accuracy"]),
                        str(r["deferred"]),
                    ]
                    for r in report.frontier
                ],
                collapsed=True,
            )
        )
    return Section("Cost against accuracy", blocks)


def _baselines_section(report: Report) -> Section:
    st = report.status

    def count(value: int | None) -> str:
        return "-" if value is None else str(value)

    rows = [
        [
            "batchplan (this run)",
            _fmt_acc(report.accuracy),
            _fmt_acc(report.accuracy_answered),
            str(st["done"]),
            str(st["deferred"]),
            str(st["failed"]),
            "-",
            f"{report.spent_usd:.4f}",
        ]
    ]
    rows += [
        [
            b["policy"],
            _fmt_acc(b["accuracy"]),
            _fmt_acc(b.get("accuracy_answered")),
            count(b.get("answered")),
            count(b.get("deferred")),
            "-",
            count(b.get("unrecorded")),
            f"{b['spent_usd']:.4f}",
        ]
        for b in report.baselines
    ]
    headers = [
        "policy",
        "accuracy (all)",
        "accuracy (answered)",
        "answered",
        "deferred",
        "failed",
        "no recorded answer",
        "spend USD",
    ]
    blocks: list[Block] = [Table(headers, rows)]
    if report.baselines:
        blocks.append(
            Note(
                "accuracy (all) counts every query, deferred and unanswered ones as wrong; accuracy (answered) only "
                "the queries the policy answered. 'no recorded answer': queries for which the history holds no "
                "answer of the model a baseline picks, so it cannot be replayed there."
            )
        )
        blocks += [Note(f"{name}: {note}.") for name, note in BASELINE_NOTES.items()]
    return Section("Accuracy and spend at the same budget", blocks)


def _per_task_section(report: Report) -> Section | None:
    if not report.per_task:
        return None
    table = Table(
        ["task", "queries", "planned accuracy", "accuracy", "spend USD"],
        [
            [
                t["task"],
                str(t["queries"]),
                _fmt_acc(t.get("planned_accuracy")),
                _fmt_acc(t["accuracy"]),
                f"{t['spent_usd']:.4f}",
            ]
            for t in report.per_task
        ],
    )
    return Section("Per task", [Chart("Planned against realized accuracy per task", charts.calibration_chart), table])


def _spend_per_model_section(report: Report) -> Section | None:
    rows = report.spend_per_model or []
    if not rows:
        return None
    total = sum(r["spent_usd"] for r in rows) or 1.0
    return Section(
        "Spend per model",
        [
            Chart("Spend per model", charts.spend_chart),
            Table(
                ["model", "calls", "spend USD", "share of spend"],
                [[r["model"], str(r["calls"]), f"{r['spent_usd']:.4f}", f"{r['spent_usd'] / total:.1%}"] for r in rows],
            ),
        ],
    )


def _not_answered_section(report: Report) -> Section:
    st = report.status
    blocks: list[Block] = [
        Note(f"deferred: {st['deferred']}, failed: {st['failed']}, quarantined at ingest: {report.quarantined}")
    ]
    if report.not_answered:
        blocks.append(
            Table(
                ["status", "reason", "queries"],
                [[r["status"], r["reason"], str(r["queries"])] for r in report.not_answered],
            )
        )
    return Section("Deferred and failed", blocks)


def _rounds_section(report: Report) -> Section | None:
    if not report.rounds:
        return None
    headers = ["round", "budget left USD", "queries called", "calls made", "failed", "charged USD", "unknown bills USD"]
    rows = [
        [
            str(r["round"]),
            "-" if r.get("budget_usd") is None else f"{r['budget_usd']:.4f}",
            str(r["queries_called"]),
            str(r["calls_made"]),
            str(r["failed_calls"]),
            f"{r['charged_usd']:.4f}",
            f"{r['unknown_bill_usd']:.4f}",
            str(r.get("refused") or 0),
        ]
        for r in report.rounds
    ]
    note = Note(
        "Each round is re-planned over the whole batch under what the earlier rounds left; a failed call's unknown "
        "bill is charged its bound (refused: calls the budget guard did not send)."
    )
    return Section("Rounds", [Table([*headers, "refused"], rows), note])


def _plan_section(report: Report) -> Section:
    return Section(
        "Plan",
        [
            Table(["plan kind", "queries"], [[k, str(v)] for k, v in sorted(report.plan_kinds.items())]),
            Table(
                ["model (first call)", "queries", "share"],
                [[m["model"], str(m["queries"]), f"{m['share']:.1%}"] for m in report.model_share],
            ),
        ],
    )


def _per_tenant_section(report: Report) -> Section | None:
    if not report.per_tenant:
        return None
    return Section(
        "Per tenant",
        [
            Table(
                ["tenant", "queries", "deferred", "accuracy", "spend USD", "budget USD"],
                [
                    [
                        t["tenant"],
                        str(t["queries"]),
                        str(t["deferred"]),
                        _fmt_acc(t["accuracy"]),
                        f"{t['spent_usd']:.4f}",
                        f"{t['budget_usd']:.4f}" if t["budget_usd"] is not None else "-",
                    ]
                    for t in report.per_tenant
                ],
            )
        ],
    )


OPTIMIZER_GLOSSARY = [
    "objective: what the plan maximizes, the expected number of right answers (each weighted by its query's "
    "priority); with an accuracy target and no budget, the expected cost it minimizes.",
    "bound: a proven limit on the objective (from the LP relaxation): no plan over these candidates does better.",
    "gap: (bound - objective) / bound, how far this plan can at most be from the best possible one; 0.001 = 0.1%.",
    "shadow price: how much the objective would gain per unit a constraint is loosened (for the budget: expected "
    "right answers per extra dollar); 0 means the constraint does not hold the plan back.",
    "binding: the constraints at their limit.",
    "spend margin: the part of the budget held back so that realized spend stays within it with 95% probability.",
    "templates withheld: tasks whose votes and cascades were not offered at this budget, because on held-out "
    "history they did not beat single models at this share of the best single model's cost.",
]


def _optimizer_section(report: Report) -> Section | None:
    if not report.optimizer:
        return None
    rows = [[k, _fmt(v)] for k, v in report.optimizer.items()]
    return Section("Optimizer", [Table(["field", "value"], rows), *(Note(line) for line in OPTIMIZER_GLOSSARY)])


def _audited_cells(entry: dict[str, Any], count: str, promised: str) -> list[str]:
    """A task's or an LLM's audited row: how many, agreement, audited accuracy, its interval, the promise."""
    low, high = entry["ci95"]
    return [
        entry["name" if "name" in entry else "task"],
        str(entry[count]),
        _fmt_acc(entry["agreement"]),
        _fmt_acc(entry["estimated_accuracy"]),
        f"{_fmt_acc(low)}-{_fmt_acc(high)}",
        _fmt_acc(entry[promised]),
    ]


def _audit_section(report: Report) -> Section | None:
    audit = report.audit
    if not audit:
        return None
    blocks: list[Block] = [
        Note(
            f"{audit['audited']} of {audit['queries']} audited queries got a reference answer, for "
            f"${audit['spent_usd']:.4f} of the spend. Method: {audit['method']}."
            + (
                f" {n} audited queries were delivered their reference answer (the plan's was missing, or disagreed "
                "and the reference is the more accurate plan); the estimate counts what that adds, "
                f"{100 * float(audit.get('delivered_gain') or 0.0):+.2f} points by the history's agreement rates."
                if (n := audit.get("delivered_references"))
                else ""
            )
        ),
        Table(
            ["task", "audited", "agreement", "estimated accuracy", "95% CI", "planned accuracy"],
            [_audited_cells(t, "audited", "planned_accuracy") for t in audit["per_task"]],
        ),
    ]
    if llms := [*audit.get("llms_worse", []), *audit.get("llms_better", [])]:
        blocks.append(
            Table(
                ["LLM", "audited calls", "agreement", "audited accuracy", "95% CI", "predictor says", "the batch finds it"],
                [
                    [*_audited_cells(e, "calls", "predicted_accuracy"), e["direction"] + " than the history says"]
                    for e in llms
                ],
            )
        )
    else:
        blocks.append(Note("No LLM's audited accuracy is outside the predictor's."))
    return Section("Audits (accuracy without gold)", blocks)


def dispatch_modes(storage: Storage, out_uri: str, rounds: int) -> dict[str, Any] | None:
    """How a run in rounds went out, from its rounds' calls and observations (``<out>/rounds/<k>/``): spend
    and calls per mode, and per LLM and mode the fallbacks, i.e. calls planned by batch that went in real time
    (a job below the provider's minimum record count) and batch lines that failed, expired or were cancelled
    (released unbilled and re-planned). None when nothing was planned or sent by batch."""
    from batchplan.core.rounds import BATCH, OBSERVATION_MODE, REALTIME

    frames = []
    for k in range(1, rounds + 1):
        here = join(out_uri, "rounds", str(k))
        if not storage.exists(join(here, "observations.parquet")):
            continue
        seen = storage.read_frame(join(here, "observations.parquet"))
        calls = storage.read_frame(join(here, "calls.parquet")) if storage.exists(join(here, "calls.parquet")) else None
        sent = pl.col(OBSERVATION_MODE).fill_null(REALTIME) if OBSERVATION_MODE in seen.columns else pl.lit(REALTIME)
        seen = seen.select("query_id", "model", "status", "cost_usd", sent.alias("mode"))
        if calls is not None and "mode" in calls.columns:
            planned = (
                calls.select("query_id", pl.col("models").alias("model"), pl.col("mode").fill_null(REALTIME).alias("planned"))
                .explode("model")
                .unique(["query_id", "model"], keep="first")
            )
            seen = seen.join(planned, on=["query_id", "model"], how="left")
        else:
            seen = seen.with_columns(pl.lit(REALTIME).alias("planned"))
        frames.append(seen)
    if not frames:
        return None
    seen = pl.concat(frames, how="diagonal_relaxed").with_columns(pl.col("planned").fill_null(pl.col("mode")))
    if not ((seen["mode"] == BATCH) | (seen["planned"] == BATCH)).any():
        return None
    by_mode = seen.group_by("mode").agg(pl.len().alias("calls"), pl.col("cost_usd").sum().alias("spent_usd")).sort("mode")
    per_llm = (
        seen.group_by("model", "mode")
        .agg(
            pl.len().alias("calls"),
            pl.col("cost_usd").sum().alias("spent_usd"),
            ((pl.col("planned") == BATCH) & (pl.col("mode") == REALTIME)).sum().alias("planned_batch_sent_realtime"),
            ((pl.col("mode") == BATCH) & (pl.col("status") != Status.OK)).sum().alias("released_replanned"),
        )
        .sort("model", "mode")
    )
    return {
        "spend_by_mode": by_mode.to_dicts(),
        "per_llm": per_llm.to_dicts(),
        "planned_batch_sent_realtime": int(per_llm["planned_batch_sent_realtime"].sum()),
        "released_replanned": int(per_llm["released_replanned"].sum()),
    }


def _dispatch_modes_section(report: Report) -> Section | None:
    modes = report.dispatch_modes
    if not modes:
        return None
    return Section(
        "Batch API and real time",
        [
            Note(
                f"{modes['planned_batch_sent_realtime']} calls planned by batch went in real time (an LLM below the "
                f"provider's minimum job size); {modes['released_replanned']} batch lines failed, expired or were "
                "cancelled: released unbilled and re-planned"
            ),
            Table(
                ["mode", "calls", "spend USD"],
                [[r["mode"], str(r["calls"]), f"{r['spent_usd']:.4f}"] for r in modes["spend_by_mode"]],
            ),
            Table(
                ["model", "mode", "calls", "spend USD", "planned batch, sent real time", "released, re-planned"],
                [
                    [
                        r["model"],
                        r["mode"],
                        str(r["calls"]),
                        f"{r['spent_usd']:.4f}",
                        str(r["planned_batch_sent_realtime"]),
                        str(r["released_replanned"]),
                    ]
                    for r in modes["per_llm"]
                ],
            ),
        ],
    )


def sections(report: Report) -> list[Section]:
    """Every section of the report, in reading order; both renderings draw exactly these."""
    built = [
        _spend_section(report),
        _frontier_section(report),
        _baselines_section(report),
        _per_task_section(report),
        _audit_section(report),
        _spend_per_model_section(report),
        _dispatch_modes_section(report),
        _not_answered_section(report),
        _rounds_section(report),
        _plan_section(report),
        _per_tenant_section(report),
        _optimizer_section(report),
    ]
    return [s for s in built if s is not None]


def _gauge_text(gauge: Gauge) -> str:
    if not gauge.limit:
        return f"spent ${gauge.value:.4f} (no budget)"
    return f"spent ${gauge.value:.4f} of ${gauge.limit:.4f} ({gauge.value / gauge.limit:.1%})"


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown_block(block: Block) -> str:
    if isinstance(block, Table):
        return _markdown_table(block.headers, block.rows)
    if isinstance(block, Note):
        return f"**{block.text}**" if block.strong else block.text
    if isinstance(block, Gauge):
        return _gauge_text(block)
    return f"_Chart: {block.title} (drawn in report.html)._"


def notes(report: Report) -> list[str]:
    """What the user asked for or sent that this run could not use: one line each, in every format."""
    lines = [f"Constraint that bound nothing: {c}" for c in report.unused_constraints or []]
    if explored := report.exploration:  # why this run spent part of its budget on LLMs its plan does not call
        lines.append(
            f"Exploration on: up to {explored['share']:.0%} of "
            + (f"{', '.join(explored['tasks'])}'s part of the budget" if explored.get("tasks") else "the budget")
            + f" on calls of the LLMs the audits' reference does not call ({explored['reason']}"
            + ("; explore_share 0 turns it off)" if explored.get("source") == "drift" else ")")
        )
    if labelled := report.labelled_accuracy:  # labels that arrived after the run (batchplan label)
        line = f"Measured on labels: accuracy {_fmt_acc(labelled['accuracy'])} over {labelled['n']} labelled queries"
        if labelled.get("answered"):
            line += f" ({_fmt_acc(labelled['accuracy_answered'])} over the {labelled['answered']} answered)"
        if labelled.get("unscorable"):
            line += f"; {labelled['unscorable']} labelled queries of open tasks unscorable (no judge)"
        lines.append(line)
    if unseen := report.unseen_tasks:
        lines.append(
            f"Tasks the predictor never saw: {', '.join(unseen)} (their accuracy is each model's average over "
            "the tasks it knows: check the task names, or train on a history that has them)"
        )
    return lines


def render_markdown(report: Report) -> str:
    parts = [f"# batchplan report {report.run_id or ''}".rstrip(), ""]
    if drift := drift_lines(report.as_json()):  # the first thing a reader sees
        parts += [*(f"**{line}**" for line in drift), ""]
    parts += [summary_line(report), ""]
    parts += [estimates_line(report), ""]
    if lines := notes(report):
        parts += [*(f"- {line}" for line in lines), ""]
    if report.savings:
        parts += [_savings_text(report), ""]
    for section in sections(report):
        parts += [f"## {section.title}", ""]
        for block in section.blocks:
            parts += [_markdown_block(block), ""]
    return "\n".join(parts)


def _html_table(block: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in block.rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f"<details><summary>the numbers</summary>{table}</details>" if block.collapsed else table


def _html_block(block: Block, report: Report) -> str:
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Note):
        text = html.escape(block.text)
        return f"<p><b>{text}</b></p>" if block.strong else f"<p class='note'>{text}</p>"
    if isinstance(block, Gauge):
        fill = min(block.value / block.limit, 1.0) * 100 if block.limit else 0.0
        return (
            f"<div class='budget'><div style='width:{fill:.1f}%'></div></div><p>{html.escape(_gauge_text(block))}</p>"
        )
    return f"<figure>{block.draw(report.as_json(), block.title)}<figcaption>{html.escape(block.title)}</figcaption></figure>"


def render_html(report: Report) -> str:
    """A self-contained page (no scripts, no external assets): tables, a CSS gauge and inline SVG charts."""
    body = "".join(
        f"<section><h2>{html.escape(s.title)}</h2>{''.join(_html_block(b, report) for b in s.blocks)}</section>"
        for s in sections(report)
    )
    savings_line = f"<p><b>{html.escape(_savings_text(report))}</b></p>" if report.savings else ""
    notes_lines = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes(report))
    drift_html = "".join(f"<p class='drift'><b>{html.escape(line)}</b></p>" for line in drift_lines(report.as_json()))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>batchplan report {html.escape(str(report.run_id or ""))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.note{{color:#444;margin:.3em 0;font-size:.92em}}
figure{{margin:1em 0}}figure svg{{max-width:100%;height:auto}}figcaption{{color:#555;font-size:.9em}}
.budget{{width:400px;height:1.2em;border:1px solid #333}}.budget div{{height:100%;background:#c8641e}}.drift{{color:#a00}}</style></head><body>
<h1>batchplan report</h1>{drift_html}<p>{html.escape(summary_line(report))}</p><p>{html.escape(estimates_line(report))}</p>{notes_lines}{savings_line}
{body}
</body></html>"""


def write_report(report: Report, out_uri: str, storage: Storage) -> dict[str, str]:
    paths = {name: join(out_uri, f"report.{name}") for name in ("json", "md", "html")}
    storage.write_text(paths["json"], json.dumps(report.as_json(), indent=2, default=str))
    storage.write_text(paths["md"], render_markdown(report))
    storage.write_text(paths["html"], render_html(report))
    return paths
