"""Batch prices against real-time prices at the same budgets: what a provider's batch API buys a night.

For each data set (``BATCHPLAN_DATA_DIR``, default ../shared/data), split as ``bench/quality.py`` splits it
(the test split, or hash folds of a train-only set): train the predictor, then run the posterior round
planner for ``--rounds`` rounds on the recorded outcomes (``round_replay.simulate_rounds``, the replay
machinery of quality.py's rounds column) at budgets of 10-100% of the best single model's cost:

- ``realtime``: every call in real time, at the recorded cost;
- ``batch``: no deadline, every round by batch, each call charged its recorded cost x the discount (0.5,
  OpenAI's and Bedrock's batch price) and planned at that price;
- ``short``: a deadline ``--short-hours`` away (default 2 h; typical turnaround 1 h, worst 24 h, a real-time
  round 15 min, ``plans.modes``): only round 1 fits by batch; the last round has 1 h left, where a batch
  job returns with probability 1/2, so the planner sends each escalation in real time or by batch, by its
  value (``short_batch_calls`` / ``short_realtime_calls`` count them).

``gain_pts``: batch minus real-time accuracy (points); every cell checks realized spend <= budget.

    uv run python bench/batch_modes.py [--datasets cascades,overruling] [--fractions 0.1,0.3] [--cv-folds 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import structlog

from batchplan.app import artifacts
from batchplan.app.demo import best_single_cost
from batchplan.app.pipeline import predict
from batchplan.app.report import Truth, score_results
from batchplan.app.round_replay import RoundsRun, simulate_rounds
from batchplan.core.catalog import BATCH_TERMS
from batchplan.core.history import History, cross_validation_fold, load_history, with_holdout
from batchplan.core.request import DEFAULT_RUN_ROUNDS
from batchplan.core.rounds import BATCH, REALTIME
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.dispatchers import get_backend
from batchplan.plans.modes import BatchModes, SimulatedClock
from batchplan.plans.round_planner import round_planner
from bench.quality import CV_FOLDS, FRACTIONS, aiq

DISCOUNT = 0.5
SHORT_HOURS = 2.0


def bench_split(
    history: History, name: str, fractions: tuple[float, ...], rounds: int, short_hours: float
) -> list[dict]:
    settings = get_settings()
    queue = history.as_queue("test")
    trained = artifacts.train(history.split("train"), predictor="lightgbm", seed=settings.seed)
    backend = get_backend("replay", history=history)
    truth = Truth.from_history(history)
    predictions = predict(queue, trained.predictor, backend)
    reference_cost, _ = best_single_cost(history, queue)
    recorded = history.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
    discounts = dict.fromkeys(sorted(predictions["model"].unique().to_list()), DISCOUNT)
    terms = BATCH_TERMS["openai"]

    def night(budget: float, deadline_hours: float | None, batch: bool) -> tuple[RoundsRun, np.ndarray]:
        clock = SimulatedClock(terms)
        deadline = None if deadline_hours is None else deadline_hours * 3600.0
        modes = BatchModes(discounts, terms, deadline=deadline, clock=clock) if batch else None
        run = simulate_rounds(
            round_planner(trained.posterior, modes=modes), queue, predictions, recorded, budget, rounds,
            discounts=discounts, after_round=clock.after_round,
        )  # fmt: skip
        right = score_results(run.results, truth)["correct"].fill_null(False).to_numpy()
        return run, right

    rows = []
    for fraction in fractions:
        budget = fraction * reference_cost
        row: dict = {"dataset": name, "queries": queue.height, "budget_pct": round(100 * fraction), "budget_usd": budget}
        for label, hours, batch in (("realtime", None, False), ("batch", None, True), ("short", short_hours, True)):
            started = time.perf_counter()
            run, right = night(budget, hours, batch)
            modes = run.observations["mode"] if "mode" in run.observations.columns else pl.Series([], dtype=pl.String)
            last = run.observations.filter(pl.col("round") == rounds) if run.observations.height else run.observations
            row |= {
                f"{label}_accuracy": float(right.mean()),
                f"{label}_correct": int(right.sum()),
                f"{label}_spent_usd": run.spent_usd,
                f"{label}_within_budget": run.spent_usd <= budget + 1e-12,
                f"{label}_batch_calls": int((modes == BATCH).sum()),
                f"{label}_realtime_calls": int((modes == REALTIME).sum()),
                f"{label}_last_round_realtime": int((last["mode"] == REALTIME).sum()) if last.height else 0,
                f"{label}_seconds": time.perf_counter() - started,
            }
        rows.append(row)
    return rows


def bench_dataset(directory: Path, fractions: tuple[float, ...], cv_folds: int, rounds: int, short: float) -> list[dict]:
    settings = get_settings()
    history = load_history(str(directory), Storage())
    if cv_folds < 2 or (history.queries["split"] == "test").any():
        splits = [with_holdout(history, settings.holdout_fraction, settings.seed)]
    else:
        splits = [cross_validation_fold(history, cv_folds, k, settings.seed) for k in range(cv_folds)]
    per_split = [bench_split(split, directory.name, fractions, rounds, short) for split in splits]
    pooled = []
    for i in range(len(fractions)):
        parts = [rows[i] for rows in per_split]
        row = dict(parts[0])
        n = sum(p["queries"] for p in parts)
        for key in row:
            if key.endswith(("_usd", "_calls", "_correct", "_seconds", "_realtime")) or key == "queries":
                row[key] = sum(p[key] for p in parts)
            elif key.endswith("_within_budget"):
                row[key] = all(p[key] for p in parts)
        for label in ("realtime", "batch", "short"):
            row[f"{label}_accuracy"] = row[f"{label}_correct"] / n
        row["folds"] = len(parts)
        pooled.append(row)
    return pooled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=get_settings().data_dir)
    parser.add_argument("--datasets", default=None, help="comma-separated names (default: every data set found)")
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--cv-folds", type=int, default=CV_FOLDS, help="folds for train-only data sets (cascades)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_RUN_ROUNDS)
    parser.add_argument("--short-hours", type=float, default=SHORT_HOURS, help="the short night's deadline")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if args.verbose else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    found = sorted(p.parent for p in Path(args.data_dir).glob("*/queries.parquet"))
    if args.datasets:
        found = [d for d in found if d.name in set(args.datasets.split(","))]
    if not found:
        print(f"no data sets under {args.data_dir}: set BATCHPLAN_DATA_DIR", file=sys.stderr)
        return 1
    fractions = tuple(float(f) for f in args.fractions.split(","))
    rows = [r for d in found for r in bench_dataset(d, fractions, args.cv_folds, args.rounds, args.short_hours)]
    table = pl.DataFrame(rows)
    within = pl.col("realtime_within_budget") & pl.col("batch_within_budget") & pl.col("short_within_budget")
    with pl.Config(tbl_rows=100, tbl_cols=30, tbl_width_chars=320, float_precision=4, tbl_hide_dataframe_shape=True):
        print(
            table.select(
                "dataset", "queries", "budget_pct", "budget_usd",
                (pl.col("realtime_accuracy") * 100).round(1).alias("realtime_%"),
                (pl.col("batch_accuracy") * 100).round(1).alias("batch_%"),
                ((pl.col("batch_accuracy") - pl.col("realtime_accuracy")) * 100).round(1).alias("gain_pts"),
                (pl.col("short_accuracy") * 100).round(1).alias(f"short{args.short_hours:g}h_%"),
                "short_batch_calls", "short_realtime_calls",
                "realtime_spent_usd", "batch_spent_usd", "short_spent_usd", within.alias("within_budget"),
            )
        )  # fmt: skip
    print("AIQ over the budget grid (real time -> batch prices -> short night):")
    names = ("realtime_accuracy", "batch_accuracy", "short_accuracy")
    by_dataset: dict[str, list[dict]] = {}
    for r in rows:
        by_dataset.setdefault(r["dataset"], []).append(r)
    print("\n".join(f"  {d}: " + " -> ".join(f"{aiq(g, c):.4f}" for c in names) for d, g in by_dataset.items()))
    return 0 if table.select(within.all()).item() else 3


if __name__ == "__main__":
    raise SystemExit(main())
