"""Plan candidates: the one place that knows how a plan's cost and accuracy follow from per-model predictions.

A candidate is something the optimizer may choose for a query: one model now; votes and cascades later.
The optimizer sees only the generic options table built here (query index, value, cost, accuracy, groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from batchplan.contracts import PLAN_SCHEMA


@dataclass(frozen=True)
class Candidates:
    """``plans``: one row per candidate, PLAN_SCHEMA columns + ``query``/``option`` indices.
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
            pl.lit(None, dtype=PLAN_SCHEMA["thresholds"]).alias("thresholds"),
        )
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("option"))
    )
    return Candidates(plans=plans, queries=queries)
