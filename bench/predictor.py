"""Predictor benchmark: quality per data set and model on the test splits, and scoring throughput.

    uv run python bench/predictor.py [--name lightgbm] [--throughput-queries 100000] [--skip-quality]

Quality: trains on the train splits of all data sets in ../shared/data together (``cascades`` has only a
train split: a 30% hold-out is carved from it by a stable hash, ``with_holdout``), then prints, per data set
and model, AUC, Brier, expected calibration error (10 equal-width bins) and cost MAPE (expected cost vs
billed) on the test split, with p90 cover (share of calls whose billed cost <= the high-side estimate)
and ``ece_floor``: the mean ECE a perfectly calibrated predictor with the same probabilities would show on
that many rows (outcomes drawn as Bernoulli(p)); ~170 test queries per cascades model put it at 0.03-0.06.
``--holdout-seeds 0,1,2,3,4`` repeats it over several hold-outs of ``cascades`` and prints the means.

Throughput: a synthetic batch shaped like the real data: real prompts of all three data sets (all splits)
resampled with replacement to N queries, each given a fresh id and a random 1-3 word suffix drawn from
the data's own vocabulary (so no two texts are identical and the text features are really computed), task
and labels kept; every query is paired with every model of its data set (9, 11 or 12: ~11 per query).
Timed: ``predictor.predict(queries, pairs)`` end to end from raw text (features, boosters, calibration,
cost), 3 runs, each printed with its wall time, process CPU time and load average (the machine is shared),
then the best; per-query work is split over 2 threads and P(correct) runs beside the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchplan.history import History, load_history, with_holdout
from batchplan.settings import get_settings
from predictors import Predictor, train_predictor
from predictors.metrics import auc, brier, ece, mape

DATASETS = ("cascades", "routerbench", "overruling")


def load_real(holdout_seed: int = 0) -> History:
    root = Path(get_settings().data_dir)
    dirs = [str(root / d) for d in DATASETS if (root / d / "queries.parquet").exists()]
    if not dirs:
        raise SystemExit(f"no data under {root}")
    return with_holdout(load_history(dirs), seed=holdout_seed)


def quality(predictor: Predictor, history: History) -> pl.DataFrame:
    test = history.split("test")
    rows = test.outcomes.join(test.queries.select("query_id", "dataset"), on="query_id")
    preds = predictor.predict(test.queries, rows.select("query_id", "model"))
    rows = rows.with_columns(
        preds["p_correct"], preds["cost_usd"].alias("cost_pred"), preds["cost_high_usd"].alias("cost_high")
    )
    train = history.split("train")
    train_counts = (
        train.outcomes.join(train.queries.select("query_id", "dataset"), on="query_id")
        .group_by("dataset", "model")
        .agg(pl.col("query_id").n_unique().alias("n_train"))
    )
    out = []
    for (dataset, model), g in rows.group_by("dataset", "model"):
        y = g["correct"].cast(pl.Float64).to_numpy()
        p = g["p_correct"].to_numpy()
        out.append(
            {
                "dataset": dataset,
                "model": model,
                "n_test": len(y),
                "acc": float(y.mean()),
                "p_mean": float(p.mean()),
                "auc": auc(y, p),
                "brier": brier(y, p),
                "ece": ece(y, p),
                "ece_floor": ece_floor(p),
                "cost_mape": mape(g["cost_usd"].to_numpy(), g["cost_pred"].to_numpy()),
                "p90_cover": float(np.mean(g["cost_usd"].to_numpy() <= g["cost_high"].to_numpy())),
            }
        )
    return pl.DataFrame(out).join(train_counts, on=["dataset", "model"], how="left").sort("dataset", "model")


def ece_floor(p: np.ndarray, draws: int = 500, seed: int = 0) -> float:
    """Mean ECE of a perfectly calibrated predictor with these probabilities on this many rows (outcomes
    drawn as Bernoulli(p)): the sampling-noise floor a measured ECE should be read against."""
    rng = np.random.default_rng(seed)
    return float(np.mean([ece((rng.random(p.size) < p).astype(np.float64), p) for _ in range(draws)]))


def synthetic_batch(history: History, n_queries: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    q = history.queries
    pick = rng.integers(0, q.height, n_queries)
    vocab = np.array(
        q.head(2000)["prompt"].str.extract_all(r"[A-Za-z]+").explode().drop_nulls().unique().sort().to_list()
    )
    suffix = [" ".join(rng.choice(vocab, rng.integers(1, 4))) for _ in range(n_queries)]
    base = q[pick]
    queries = base.select(
        pl.format("bench-{}", pl.int_range(pl.len())).alias("query_id"),
        (pl.col("prompt") + " " + pl.Series(suffix)).alias("prompt"),
        "system_prompt",
        "labels",
        "task",
        pl.lit("bench").alias("tenant"),
        pl.lit(1.0).alias("priority"),
        "dataset",
    )
    models_by_dataset = (
        history.outcomes.join(q.select("query_id", "dataset"), on="query_id")
        .group_by("dataset")
        .agg(pl.col("model").unique().sort().alias("models"))
    )
    pairs = (
        queries.select("query_id", "dataset")
        .join(models_by_dataset, on="dataset")
        .explode("models")
        .select("query_id", pl.col("models").alias("model"))
    )
    return queries.drop("dataset"), pairs


def throughput(predictor: Predictor, history: History, n_queries: int, runs: int = 3) -> dict[str, Any]:
    """``runs`` end-to-end predict calls: each run's wall time, process CPU time (all threads) and 1-minute
    load average (the machine is shared: wall time moves with the other tenants' load), and the best."""
    queries, pairs = synthetic_batch(history, n_queries)
    per_run = []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        preds = predictor.predict(queries, pairs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        per_run.append({"seconds": wall, "cpu_seconds": cpu, "load_avg_1m": os.getloadavg()[0]})
        assert preds.height == pairs.height
    best = min(per_run, key=lambda r: r["seconds"])
    return {
        "queries": queries.height,
        "pairs": pairs.height,
        "seconds": best["seconds"],
        "cpu_seconds": min(r["cpu_seconds"] for r in per_run),
        "pairs_per_s": pairs.height / best["seconds"],
        "pairs_per_cpu_s": pairs.height / min(r["cpu_seconds"] for r in per_run),
        "load_avg_1m": os.getloadavg()[0],
        "cores": os.cpu_count() or 0,
        "runs": per_run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="lightgbm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput-queries", type=int, default=100_000)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--holdout-seeds",
        default="0",
        help="comma-separated with_holdout seeds: cascades' test split is a 30%% hash hold-out of ~170 queries, "
        "so its per-model ECE moves with the split; more seeds report the mean over splits too",
    )
    args = parser.parse_args()
    history = load_real()
    t0 = time.perf_counter()
    predictor = train_predictor(history.split("train"), name=args.name, seed=args.seed)
    train_s = time.perf_counter() - t0
    print(f"predictor {args.name!r} trained on the train splits in {train_s:.1f}s")
    results: dict[str, object] = {"name": args.name, "train_seconds": train_s}
    if not args.skip_quality:
        table = quality(predictor, history)
        with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=250, float_precision=4, fmt_str_lengths=34):
            print(
                table.select(
                    "dataset",
                    "model",
                    "n_train",
                    "n_test",
                    "acc",
                    "p_mean",
                    "auc",
                    "brier",
                    "ece",
                    "ece_floor",
                    "cost_mape",
                    "p90_cover",
                )
            )
        eligible = table.filter(pl.col("n_train") >= 300)
        print(
            f"ECE <= 0.05 for {int((eligible['ece'] <= 0.05).sum())}/{eligible.height} models with >= 300 training queries; "
            f"worst {eligible.select(pl.col('ece').max()).item():.4f}; "
            f"mean AUC {table.select(pl.col('auc').mean()).item():.4f}, "
            f"mean Brier {table.select(pl.col('brier').mean()).item():.4f}, "
            f"median cost MAPE {table.select(pl.col('cost_mape').median()).item():.4f}"
        )
        results["quality"] = table.to_dicts()
        seeds = [int(x) for x in args.holdout_seeds.split(",") if x.strip()]
        if len(seeds) > 1:
            tables = [table.with_columns(pl.lit(seeds[0]).alias("holdout_seed"))]
            for seed in seeds[1:]:
                other = load_real(seed)
                fitted = train_predictor(other.split("train"), name=args.name, seed=args.seed)
                tables.append(quality(fitted, other).with_columns(pl.lit(seed).alias("holdout_seed")))
            summary = (
                pl.concat(tables)
                .group_by("dataset", "model")
                .agg(
                    pl.col("n_train").first(),
                    pl.col("ece").mean().alias("ece_mean"),
                    pl.col("ece_floor").mean().alias("ece_floor_mean"),
                    pl.col("ece").max().alias("ece_max"),
                    pl.col("auc").mean().alias("auc_mean"),
                    pl.col("brier").mean().alias("brier_mean"),
                    (pl.col("acc") - pl.col("p_mean")).abs().mean().alias("abs_bias_mean"),
                )
                .sort("dataset", "model")
            )
            with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=250, float_precision=4, fmt_str_lengths=34):
                print(f"over holdout seeds {seeds} (changes cascades' split only):")
                print(summary)
            ok = summary.filter(pl.col("n_train") >= 300)
            print(
                f"mean-over-splits ECE <= 0.05 for {int((ok['ece_mean'] <= 0.05).sum())}/{ok.height} models with "
                f">= 300 training queries; worst {ok.select(pl.col('ece_mean').max()).item():.4f}"
            )
            results["quality_over_seeds"] = summary.to_dicts()
    if not args.skip_throughput:
        tp = throughput(predictor, history, args.throughput_queries)
        print(
            f"throughput: {tp['pairs']:,} pairs ({tp['queries']:,} queries) in {tp['seconds']:.2f}s wall = "
            f"{tp['pairs_per_s'] / 1e6:.2f}M pairs/s (features included, best of 3); CPU {tp['cpu_seconds']:.2f}s = "
            f"{tp['pairs_per_cpu_s'] / 1e6:.2f}M pairs per CPU-second; load average {tp['load_avg_1m']:.1f} "
            f"on {tp['cores']} cores"
        )
        for i, run in enumerate(tp["runs"], 1):
            print(
                f"  run {i}: {run['seconds']:.2f}s wall = {tp['pairs'] / run['seconds'] / 1e6:.2f}M pairs/s, "
                f"CPU {run['cpu_seconds']:.2f}s, load average {run['load_avg_1m']:.1f}"
            )
        results["throughput"] = tp
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
