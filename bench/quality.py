"""Quality benchmark: accuracy and realized spend at budgets relative to the best single model.

For each data set in the data dir (``BATCHPLAN_DATA_DIR``, default ../shared/data): train the predictor on
the train split (data sets without a test split get one held out from train by query_id hash), then plan
and replay the test split at budgets of 10, 20, 30, 50 and 100% of the best single model's cost (best =
highest train accuracy; its cost measured on the test queries). Prints batchplan's accuracy and realized
spend beside the baselines at the same budget (cheapest model, random assignment, the oracle) and the best
single model at its own cost. Realized spend must never pass the budget: the last column checks it.

    uv run python bench/quality.py [--datasets routerbench,cascades] [--fractions 0.1,0.2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from batchplan.demo import best_single_cost
from batchplan.history import load_history, with_holdout
from batchplan.pipeline import build_candidates, execute, history_queue, optimize, predict
from batchplan.planning import PlanRequest
from batchplan.report import Truth, baselines, score_results
from batchplan.settings import get_settings
from batchplan.storage import Storage
from dispatchers import get_backend
from predictors import train_predictor

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 1.0)


def bench_dataset(
    directory: Path, fractions: tuple[float, ...], predictor_name: str, storage: Storage, workdir: str
) -> list[dict]:
    settings = get_settings()
    history = with_holdout(load_history(str(directory), storage), settings.holdout_fraction, settings.seed)
    queue = history_queue(history, "test")
    started = time.perf_counter()
    predictor = train_predictor(history.split("train"), name=predictor_name, seed=settings.seed)
    train_seconds = time.perf_counter() - started
    backend = get_backend("replay", history=history)
    truth = Truth.from_history(history)
    predictions = predict(queue, predictor, backend)
    candidates = build_candidates(queue, predictions)
    reference_cost, reference = best_single_cost(history, queue)
    rows = []
    for fraction in fractions:
        budget = fraction * reference_cost
        outcome = optimize(candidates, PlanRequest(budget_usd=budget))
        results = execute(
            outcome.plan,
            queue,
            backend,
            budget_usd=budget,
            out_uri=f"{workdir}/{directory.name}-{fraction}",
            storage=storage,
        )
        scored = score_results(results, outcome.plan, truth)
        base = {
            b["policy"].split(" (")[0].split(",")[0]: b
            for b in baselines(queue["query_id"], truth, budget, reference, queue.select("query_id", "task"))
        }
        spend = float(results["cost_usd"].sum())
        rows.append(
            {
                "dataset": directory.name,
                "queries": queue.height,
                "budget_pct": round(100 * fraction),
                "budget_usd": budget,
                "accuracy": float(scored["correct"].fill_null(False).mean()),
                "spend_usd": spend,
                "expected_accuracy": float(outcome.plan["expected_accuracy"].mean()),
                "gap": outcome.solution.gap,
                "cheapest": base["cheapest model"]["accuracy"],
                "random": base["random model"]["accuracy"],
                "best_single": base["best single model"]["accuracy"],
                "best_single_cost_usd": base["best single model"]["spend_usd"],
                "best_single_model": next(iter(reference.values())),
                "oracle": base["oracle"]["accuracy"],
                "within_budget": spend <= budget + 1e-12,
                "train_seconds": train_seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=get_settings().data_dir)
    parser.add_argument("--datasets", default=None, help="comma-separated names (default: every data set found)")
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--predictor", default="lightgbm")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    root = Path(args.data_dir)
    found = sorted(p.parent for p in root.glob("*/queries.parquet"))
    if args.datasets:
        wanted = set(args.datasets.split(","))
        found = [d for d in found if d.name in wanted]
    if not found:
        print(f"no data sets under {root}: set BATCHPLAN_DATA_DIR", file=sys.stderr)
        return 1
    fractions = tuple(float(f) for f in args.fractions.split(","))
    storage = Storage()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        for directory in found:
            rows.extend(bench_dataset(directory, fractions, args.predictor, storage, workdir))
    table = pl.DataFrame(rows)
    with pl.Config(tbl_rows=100, tbl_cols=30, tbl_width_chars=250, float_precision=4, tbl_hide_dataframe_shape=True):
        print(
            table.select(
                "dataset",
                "queries",
                "budget_pct",
                "budget_usd",
                "spend_usd",
                "within_budget",
                (pl.col("accuracy") * 100).round(1).alias("batchplan_%"),
                (pl.col("cheapest") * 100).round(1).alias("cheapest_%"),
                (pl.col("random") * 100).round(1).alias("random_%"),
                (pl.col("best_single") * 100).round(1).alias("best_single_%"),
                "best_single_cost_usd",
                (pl.col("oracle") * 100).round(1).alias("oracle_%"),
                pl.col("gap").map_elements(lambda g: f"{g:.1e}", return_dtype=pl.String).alias("gap"),
            )
        )
        print(
            "best single model per data set (by train accuracy):",
            dict(table.group_by("dataset").agg(pl.col("best_single_model").first()).iter_rows()),
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if table["within_budget"].all() else 3


if __name__ == "__main__":
    raise SystemExit(main())
