"""The main job on the bundled real data, with no arguments: train on the train splits, then plan and
replay the test splits under one budget, as one mixed nightly batch (tenant = data set).

Where ``../shared/data`` is absent, it says so and runs on a synthetic history the project generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import structlog

from batchplan.app import artifacts
from batchplan.app.pipeline import Job, JobOutcome, Progress, run_job
from batchplan.app.report import Truth
from batchplan.core.history import History, history_dirs, load_history, synthetic_history, with_holdout
from batchplan.core.settings import Settings
from batchplan.core.storage import Storage, join
from batchplan.plans.best_single import best_single_map
from batchplan.plans.planning import PlanRequest

log = structlog.get_logger("batchplan.app.demo")


def demo_history(settings: Settings, storage: Storage) -> tuple[History, list[str], bool]:
    """The real histories under ``settings.data_dir`` (with a held-out split where a data set has none),
    or a synthetic one written under the work dir. Returns (history, its dirs, is_real)."""
    dirs = history_dirs(settings.data_dir)
    if dirs:
        return with_holdout(load_history(dirs, storage), settings.holdout_fraction, settings.seed), dirs, True
    synthetic = synthetic_history(3_000, 10, seed=settings.seed)
    target = join(settings.work_dir, "synthetic-history")
    storage.write_frame(synthetic.queries, join(target, "queries.parquet"))
    storage.write_frame(synthetic.outcomes, join(target, "outcomes.parquet"))
    storage.write_frame(synthetic.prices, join(target, "models.csv"))
    return synthetic, [target], False


def best_single_models(history: History) -> dict[str, str]:
    """Per task, the best single model (``best_single_llms``) on the history's train split."""
    train = history.split("train")
    return best_single_map(train.outcomes.join(train.queries.select("query_id", "task"), on="query_id"))


def best_single_cost(history: History, queries: pl.DataFrame) -> tuple[float, dict[str, str]]:
    """Recorded cost of sending each of ``queries`` to its task's best single model, and the per-task map of
    those models (what the report's 'best single model' baseline uses)."""
    best = best_single_models(history)
    chosen = queries.select("query_id", pl.col("task").replace_strict(best, default=None).alias("model"))
    cost = history.outcomes.join(chosen, on=["query_id", "model"])["cost_usd"].sum()
    return float(cost), {task: best[task] for task in sorted(set(queries["task"].to_list())) if task in best}


def run_demo(
    settings: Settings,
    storage: Storage,
    *,
    budget_fraction: float = 0.3,
    out_uri: str | None = None,
    predictor_name: str = "lightgbm",
    progress: Progress | None = None,
    rounds: int = 1,
    round_planner: str = "plan",
) -> tuple[JobOutcome, dict[str, Any]]:
    history, dirs, is_real = demo_history(settings, storage)
    if not is_real:
        log.warning(
            "demo.synthetic",
            reason=f"no outcome histories under {settings.data_dir}; using a generated synthetic history",
        )
    root = out_uri or join(settings.work_dir, "demo")
    queue = history.as_queue("test")
    queue_uri = join(root, "queue", "queue.parquet")
    storage.write_frame(queue, queue_uri)

    # the per_task planner's replayed choice only where the demo runs it (it adds a replay of every fold)
    trained = artifacts.train(
        history.split("train"), predictor=predictor_name, seed=settings.seed, round_choice=round_planner == "per_task"
    )
    model_root = join(root, "models")
    artifacts.save(trained, storage, model_root)

    reference_cost, reference = best_single_cost(history, queue)
    budget = budget_fraction * reference_cost
    run_dir = join(root, "run")
    # Each demo trains anew and may ask another budget: its run starts afresh rather than resume (and be
    # refused for) a plan made for an earlier demo's request.
    for uri in storage.list(run_dir):
        storage.delete(uri)
    job = Job(
        queue_uri=queue_uri,
        predictors_uri=model_root,
        out_uri=run_dir,
        request=PlanRequest(budget_usd=budget),
        backend="replay",
        replay_history=dirs,
        run_id="demo",
        reference_models=reference,
        rounds=rounds,
        round_planner=round_planner,
    )
    outcome = run_job(job, storage, progress=progress, truth=Truth.from_history(history))
    context = {
        "data": "real (" + ", ".join(Path(d).name for d in dirs) + ")" if is_real else "synthetic (no real data found)",
        "queries": queue.height,
        "best_single_models": best_single_models(history),
        "best_single_cost_usd": reference_cost,
        "budget_fraction": budget_fraction,
        "budget_usd": budget,
    }
    return outcome, context
