"""Plan candidates: the one place that knows how a plan's cost and accuracy follow from per-model predictions.

A candidate is something the optimizer may choose for a query: one model, a vote, a cascade or an agreement
cascade (see ``plan_simulation`` for their semantics and ``plan_templates`` for how templates are chosen
and fitted). The optimizer sees only the generic options table built here (query index, value, cost,
accuracy, groups).

For a template with members m_1..m_k on query q, with the predictor's P(correct) p_i and cost c_i:
- expected accuracy = the template's calibrated estimate (``plan_estimates.estimate``, on the members'
  P(correct)), less one standard error of its training accuracy (a lower
  confidence bound: see ``Template.standard_error``);
- expected cost = sum_i P(m_i is called) c_i, with P(called) = 1 for a vote's members and for the first
  member(s) of a cascade, and the fitted escalation model for the later ones;
- reserve (what the dispatcher holds before calling) = sum_i of the members' high-side costs: the whole
  escalation path is reserved up front;
- spend variance = sum_i P(called) sd_i^2 + P(called)(1 - P(called)) c_i^2 (sd_i from the call's p90).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from batchplan.contracts import PLAN_SCHEMA
from batchplan.plan_estimates import estimate
from batchplan.plan_templates import PlanTemplates

P90_Z = 1.2816  # a call's high-side cost is its p90: sd ~ (p90 - mean) / z_0.9


@dataclass(frozen=True)
class Candidates:
    """``plans``: one row per candidate, PLAN_SCHEMA columns + ``query``/``option`` indices + ``cost_var``
    (variance of the plan's spend, for the chance-constrained budget).
    ``queries``: query_id, query (dense index), tenant, task, priority."""

    plans: pl.DataFrame
    queries: pl.DataFrame

    def options(self, extra_columns: tuple[str, ...] = ()) -> pl.DataFrame:
        """The optimizer's options table: query, option, value (priority x accuracy), cost, accuracy, groups."""
        return self.plans.join(self.queries.select("query", "tenant", "task", "priority"), on="query").select(
            "query",
            "option",
            (pl.col("priority") * pl.col("expected_accuracy")).alias("value"),
            pl.col("expected_cost_usd").alias("cost"),
            pl.col("expected_accuracy").alias("accuracy"),
            "tenant",
            "task",
            *extra_columns,
        )


def single_model_candidates(queue: pl.DataFrame, predictions: pl.DataFrame) -> Candidates:
    """One candidate per (query, offered model): call that model once."""
    queries = queue.select("query_id", "tenant", "task", "priority").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("query")
    )
    plans = (
        predictions.join(queries.select("query_id", "query"), on="query_id", how="inner")
        .sort("query", "model")
        .select(
            "query",
            "query_id",
            pl.lit("single").alias("kind"),
            pl.concat_list(pl.col("model")).alias("models"),
            pl.col("cost_usd").alias("expected_cost_usd"),
            pl.col("p_correct").alias("expected_accuracy"),
            pl.max_horizontal("cost_high_usd", "cost_usd").alias("reserve_cost_usd"),
            ((pl.max_horizontal("cost_high_usd", "cost_usd") - pl.col("cost_usd")) / P90_Z).pow(2).alias("cost_var"),
            pl.lit(None, dtype=PLAN_SCHEMA["thresholds"]).alias("thresholds"),
        )
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("option"))
    )
    return Candidates(plans=plans, queries=queries)


def template_candidates(base: Candidates, predictions: pl.DataFrame, templates: PlanTemplates) -> Candidates:
    """Add every fitted vote/cascade template whose members the backend offers for the query."""
    if not templates.templates or predictions.height == 0:  # nothing offered: no template can be formed
        return base
    queries = base.queries
    models = sorted(predictions["model"].unique().to_list())
    column = {m: j for j, m in enumerate(models)}
    wide = predictions.join(queries.select("query_id", "query"), on="query_id").with_columns(
        pl.col("model").replace_strict(column, return_dtype=pl.Int64).alias("m")
    )
    shape = (queries.height, len(models))
    p = np.full(shape, np.nan)
    cost = np.full(shape, np.nan)
    high = np.full(shape, np.nan)
    rows, cols = wide["query"].to_numpy(), wide["m"].to_numpy()
    p[rows, cols] = wide["p_correct"].to_numpy()
    cost[rows, cols] = wide["cost_usd"].to_numpy()
    high[rows, cols] = np.maximum(wide["cost_high_usd"].fill_null(0.0).to_numpy(), cost[rows, cols])
    sd = (high - cost) / P90_Z
    task_of = queries["task"].to_numpy()
    frames = []
    for template in templates.templates:
        if any(m not in column for m in template.models):
            continue
        idx = np.array([column[m] for m in template.models])
        members = p[:, idx]
        eligible = np.flatnonzero((task_of == template.task) & np.isfinite(members).all(axis=1))
        if eligible.size == 0:
            continue
        accuracy, called = estimate(template, members[eligible])
        member_cost = cost[np.ix_(eligible, idx)]
        member_sd = sd[np.ix_(eligible, idx)]
        # spend of a plan: each call's own uncertainty, plus whether the later members are called at all
        variance = (called * member_sd**2 + called * (1 - called) * member_cost**2).sum(axis=1)
        frames.append(
            pl.DataFrame(
                {
                    "query": eligible.astype(np.int64),
                    "kind": template.kind,
                    "models": [template.models] * eligible.size,
                    "expected_cost_usd": (member_cost * called).sum(axis=1),
                    "expected_accuracy": accuracy,
                    "reserve_cost_usd": high[np.ix_(eligible, idx)].sum(axis=1),
                    "cost_var": variance,
                    "thresholds": [template.thresholds or None] * eligible.size,
                },
                schema_overrides={"models": pl.List(pl.String), "thresholds": PLAN_SCHEMA["thresholds"]},
            )
        )
    if not frames:
        return base
    extra = pl.concat(frames).join(queries.select("query", "query_id"), on="query")
    plans = pl.concat([base.plans.drop("option"), extra.select(base.plans.drop("option").columns)]).sort(
        "query", "kind", "models"
    )
    return Candidates(plans=plans.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("option")), queries=queries)
