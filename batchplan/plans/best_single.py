"""The best single LLM per task: the one definition behind every "best single model" in the project (the
report's baseline, the demo's and the benches' budget scale ``--budget-fraction``, the budgets at which
templates were validated, ``PlanTemplates.offered``, and ``planning.budget_share`` and
``per_task.reference_cost``, the same scale read off a batch's candidates or predictions)."""

from __future__ import annotations

import polars as pl

# Means and sums are rounded before they are compared: a parallel sum's last bits vary between runs, and an
# exact tie must stay a tie (and go the same way) every time.
_DIGITS = 12


def best_single_llms(
    frame: pl.DataFrame,
    *,
    accuracy: str = "correct",
    cost: str = "cost_usd",
    task: str = "task",
    llm: str = "model",
) -> pl.DataFrame:
    """Per task, the LLM the task's queries would best all be sent to, at that LLM's own cost.

    ``frame`` holds one row per (query, LLM) the caller knows, with the query's ``task``, the ``llm``, an
    ``accuracy`` and a ``cost``: realized outcomes (``correct``, ``cost_usd``) where a history has them (the
    train split: the demo and the benches, the templates' validation), or the predictor's expectations
    (``p_correct`` / ``expected_accuracy``) for a batch that has no outcomes yet (a production run's report
    baseline, ``budget_share``). Best means, per task:

    1. only the LLMs with a row for as many of the task's queries as any LLM has compete: all are scored on
       the same queries, and each could be sent all of them;
    2. among them, the highest mean ``accuracy``;
    3. ties go to the lower total ``cost``, then to the first ``llm`` in sort order, so that the choice does
       not move between runs.

    Cost never buys accuracy here: it is the most accurate LLM, not the best value. Returns one row per task
    (sorted by task): ``task``, ``llm`` (the caller's column names), ``accuracy`` (mean), ``cost_usd`` (total
    over the task's rows) and ``queries`` (its rows)."""
    # plain aggregations, rounded after: an expression on top of one inside ``agg`` leaves polars' fast path
    # (seconds instead of a fraction of one on 11M candidates)
    per_llm = frame.group_by(task, llm).agg(
        pl.col(accuracy).mean().alias("accuracy"), pl.col(cost).sum().alias("cost_usd"), pl.len().alias("queries")
    )
    per_llm = per_llm.with_columns(pl.col("accuracy", "cost_usd").cast(pl.Float64).round(_DIGITS))
    return (
        per_llm.filter(pl.col("queries") == pl.col("queries").max().over(task))
        .sort([task, "accuracy", "cost_usd", llm], descending=[False, True, False, False])
        .group_by(task, maintain_order=True)
        .first()
    )


def best_single_map(frame: pl.DataFrame, **columns: str) -> dict[str, str]:
    """``best_single_llms`` as task -> LLM (the report's baseline and ``Job.reference_models`` take this)."""
    best = best_single_llms(frame, **columns)
    task, llm = columns.get("task", "task"), columns.get("llm", "model")
    return dict(zip(best[task].to_list(), best[llm].to_list(), strict=True))
