"""Builders shared by the test files: the shipped example history, queues and single-model plans from a
history, a history whose LLMs answer wrong, the recorded answers to compare dispatch results with, the
predictor's inputs, run directories as `batchplan run` writes them, a drifted live correction, and small
optimizer option tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from batchplan.core.contracts import LIVE_OUTCOME_SCHEMA, PLAN_SCHEMA, QUEUE_SCHEMA, SILVER, conform
from batchplan.core.history import History
from batchplan.optimizer import Budget, Capacity
from batchplan.predictors.live import OFFSET_SCHEMA, LiveCorrection

EXAMPLE_HISTORY = Path(__file__).resolve().parents[2] / "examples" / "history"  # shipped with the project


# --------------------------------------------------------------------------- histories -> queues, plans
def write_history(history: History, target: Path) -> str:
    """``history`` as a history directory (queries.parquet, outcomes.parquet, models.csv) at ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    history.queries.write_parquet(target / "queries.parquet")
    history.outcomes.write_parquet(target / "outcomes.parquet")
    history.prices.write_csv(target / "models.csv")
    return str(target)


def queue_of(history: History, n: int | None = None) -> pl.DataFrame:
    """The history's queries (the first ``n``) as a conformed queue."""
    queries = history.queries if n is None else history.queries.head(n)
    return conform(queries, QUEUE_SCHEMA, name="queue", required=("query_id", "prompt"))


def write_queue(history: History, path: Path) -> str:
    """The history's test split as a queue file at ``path``."""
    history.as_queue(split="test").write_parquet(path)  # QUEUE_SCHEMA: no gold column
    return str(path)


def corrupted(history: History, llms: set[str]) -> History:
    """``history`` where ``llms`` answer every query wrong (a label other than gold): much worse than trained on."""
    gold = history.queries.select("query_id", "gold", "labels")
    outcomes = history.outcomes.join(gold, on="query_id", how="left").with_columns(
        pl.when(pl.col("model").is_in(pl.Series(sorted(llms)).implode()))
        .then(pl.col("labels").list.set_difference(pl.concat_list("gold")).list.first())
        .otherwise(pl.col("answer"))
        .alias("answer")
    )
    outcomes = outcomes.with_columns(
        pl.when(pl.col("model").is_in(pl.Series(sorted(llms)).implode()))
        .then(pl.lit(False))
        .otherwise(pl.col("correct"))
        .alias("correct")
    ).select(history.outcomes.columns)
    return History(history.queries, outcomes, history.prices)


def single_plan(history: History, queue: pl.DataFrame, pick: str = "cheapest") -> pl.DataFrame:
    """One model per query, chosen from the history's outcomes (the cheapest or the dearest recorded)."""
    outcomes = history.outcomes.join(queue.select("query_id"), on="query_id", how="semi")
    chosen = outcomes.sort("cost_usd", descending=pick != "cheapest").group_by("query_id", maintain_order=True).first()
    plan = queue.select("query_id").join(chosen, on="query_id", how="left", maintain_order="left")
    return conform(
        plan.select(
            "query_id",
            pl.lit("single").alias("kind"),
            pl.concat_list("model").alias("models"),
            pl.col("cost_usd").alias("expected_cost_usd"),
            pl.lit(0.5).alias("expected_accuracy"),
            pl.col("cost_usd").alias("reserve_cost_usd"),
        ),
        PLAN_SCHEMA,
        name="plan",
    )


def model_plan(queue: pl.DataFrame, model: str, fallbacks: list[str] | None = None) -> pl.DataFrame:
    """Every query to ``model`` (with ``fallbacks`` if given)."""
    plan = conform(
        queue.select("query_id", pl.lit("single").alias("kind"), pl.lit([model]).alias("models")),
        PLAN_SCHEMA,
        name="plan",
    )
    if fallbacks is not None:
        plan = plan.with_columns(pl.lit(fallbacks, pl.List(pl.String)).alias("fallback_models"))
    return plan


def recorded(history: History) -> dict[tuple[str, str], tuple[str | None, float]]:
    """(query_id, model) -> (recorded answer, recorded cost)."""
    return {
        (q, m): (a, c) for q, m, a, c in history.outcomes.select("query_id", "model", "answer", "cost_usd").iter_rows()
    }


def predictor_queue(history: History) -> pl.DataFrame:
    """The columns a predictor reads of a query."""
    return history.queries.select("query_id", "prompt", "system_prompt", "labels", "task")


def recorded_pairs(history: History) -> pl.DataFrame:
    """Every recorded (query_id, model) pair."""
    return history.outcomes.select("query_id", "model")


# ------------------------------------------------------------------------------- run directories, live
def run_dir_of(history: History, target: Path, *, silver: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """A run directory as `batchplan run` writes it, from a history's outcomes: gold, or silver for models
    in ``silver``."""
    target.mkdir(parents=True, exist_ok=True)
    outcomes = history.outcomes.with_columns(
        pl.lit(None, dtype=pl.String).alias("task"),
        pl.lit(1).alias("round"),
        pl.concat_str(pl.lit("0:"), "model", pl.lit(":0")).alias("call"),
        pl.lit("ok").alias("status"),
        pl.when(pl.col("model").is_in(list(silver))).then(pl.lit(SILVER)).otherwise(pl.lit("gold")).alias("label_source"),
    ).select(LIVE_OUTCOME_SCHEMA.names())
    history.queries.write_parquet(target / "queries.parquet")
    outcomes.write_parquet(target / "outcomes.parquet")
    history.prices.write_csv(target / "models.csv")
    return str(target)


def drifted_live(task: str, llm: str) -> LiveCorrection:
    """A live correction whose labels put ``llm`` on ``task`` far below the history (30 labels at 0.30 against
    0.90), with no offset of its own: the predictions stay the history's, only the drift is seen."""
    row = {"task": task, "model": llm, "offset": 0.0, "task_offset": 0.0, "rows": 30.0, "gold_rows": 30, "p_before": 0.9, "live_acc": 0.3}
    return LiveCorrection(pl.DataFrame([row], schema=OFFSET_SCHEMA))


# ------------------------------------------------------------------------------------ optimizer options
def tiny_options(n: int = 5, k: int = 3, seed: int = 0, *, tenants: int = 2, tasks: int = 2) -> pl.DataFrame:
    """n queries x k options; cost spans ~100x, accuracy rises with log cost plus noise."""
    rng = np.random.default_rng(seed)
    base = np.geomspace(0.01, 1.0, k)
    cost = base[None, :] * rng.uniform(0.7, 1.3, (n, k))
    acc = np.clip(0.45 + 0.08 * np.log(cost / 0.01) + rng.normal(0, 0.08, (n, k)), 0.0, 1.0)
    priority = rng.choice([1.0, 2.0], n)
    tenant = rng.integers(0, tenants, n)
    task = rng.integers(0, tasks, n)
    return pl.DataFrame(
        {
            "query": np.repeat(np.arange(n), k),
            "option": np.arange(n * k) + 100,
            "value": (acc * priority[:, None]).ravel(),
            "cost": cost.ravel(),
            "accuracy": acc.ravel(),
            "tenant": np.repeat([f"t{t}" for t in tenant], k),
            "task": np.repeat([f"task{t}" for t in task], k),
            "model": np.tile([f"m{j}" for j in range(k)], n),
            "calls": np.ones(n * k),
            "tokens": rng.integers(100, 1000, n * k).astype(np.float64),
            "allowed": rng.random(n * k) > 0.2,
        }
    )


def signed_options(n: int, k: int, seed: int, alpha: float = 0.2) -> pl.DataFrame:
    """Options with a signed resource column, like a per-label error bound: prior x (error - alpha) is
    negative for good options and positive for bad ones; the rows built on it have limit 0."""
    rng = np.random.default_rng(seed)
    opts = tiny_options(n, k, seed)
    error = np.clip(rng.uniform(0.0, 0.5, n * k) - 0.1 * opts["accuracy"].to_numpy(), 0.0, 1.0)
    prior = np.repeat(rng.uniform(0.2, 1.0, n), k)
    return opts.with_columns(
        err=pl.Series(prior * (error - alpha)), err2=pl.Series(prior * (rng.uniform(0, 0.4, n * k) - alpha))
    )


def signed_constraints(opts: pl.DataFrame, share: float) -> list[Budget | Capacity]:
    return [
        Budget(limit=budget_between(opts, share)),
        Capacity(column="err", group="tenant", limit={"t0": 0.0, "t1": 0.0}, name="label_error"),
        Capacity(column="err2", limit=0.0, name="label_error_all"),
    ]


def cheapest_total(opts: pl.DataFrame) -> float:
    return float(opts.group_by("query").agg(pl.col("cost").min())["cost"].sum())


def dearest_total(opts: pl.DataFrame) -> float:
    return float(opts.group_by("query").agg(pl.col("cost").max())["cost"].sum())


def budget_between(opts: pl.DataFrame, share: float) -> float:
    lo, hi = cheapest_total(opts), dearest_total(opts)
    return lo + share * (hi - lo)
