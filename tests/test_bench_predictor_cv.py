"""bench/predictor.py's cross-validation of data sets without a test split: folds partition the queries, and
the pooled out-of-fold table predicts every such query exactly once."""

from __future__ import annotations

import polars as pl
import pytest

from batchplan.core.history import History, stable_fold, synthetic_history
from bench import predictor as bench


def _two_datasets() -> History:
    """``with_test`` has a real 30% test split, ``no_test`` only a train split (like cascades)."""
    a = synthetic_history(400, 3, test_fraction=0.3, seed=1)
    b = synthetic_history(300, 3, test_fraction=0.0, seed=2)
    b_queries = b.queries.with_columns(
        pl.lit("no_test").alias("dataset"), ("b-" + pl.col("query_id")).alias("query_id")
    )
    b_outcomes = b.outcomes.with_columns(("b-" + pl.col("query_id")).alias("query_id"))
    return History(
        queries=pl.concat([a.queries.with_columns(pl.lit("with_test").alias("dataset")), b_queries]),
        outcomes=pl.concat([a.outcomes, b_outcomes]),
        prices=a.prices,
    )


@pytest.mark.parametrize("folds", [2, 3, 5, 7, 10])
def test_folds_partition_the_queries(folds: int) -> None:
    history = _two_datasets()
    no_test = history.queries.filter(pl.col("dataset") == "no_test")["query_id"]
    real_test = history.split("test").queries["query_id"].sort()
    seen: list[str] = []
    for fold in range(folds):
        split = bench.split_for(history, folds, fold, seed=3)
        test = split.split("test").queries
        seen += test.filter(pl.col("dataset") == "no_test")["query_id"].to_list()
        # the real test split is untouched by the fold
        assert test.filter(pl.col("dataset") == "with_test")["query_id"].sort().equals(real_test)
    assert sorted(seen) == sorted(no_test.to_list())


def test_fold_boundaries_are_exact() -> None:
    # start + fraction must be the next start exactly: 0.4 + 0.2 == 0.6000000000000001 with fraction 1/K
    for folds in range(2, 21):
        for fold in range(folds - 1):
            start, end = fold / folds, (fold + 1) / folds
            assert start + (end - start) == end


def test_cross_validated_table_pools_out_of_fold_rows() -> None:
    history = _two_datasets()
    table = bench.evaluate(history, name="prior", seed=0, holdout_seed=0, folds=3)
    n_no_test = history.queries.filter(pl.col("dataset") == "no_test").height
    n_real_test = history.split("test").queries.height
    by_dataset = table.group_by("dataset").agg(pl.col("n_test").min().alias("lo"), pl.col("n_test").max().alias("hi"))
    got = {r["dataset"]: (r["lo"], r["hi"]) for r in by_dataset.to_dicts()}
    assert got == {"no_test": (n_no_test, n_no_test), "with_test": (n_real_test, n_real_test)}
    # n_train of the cross-validated data set: fewest training queries of a fold, about (K-1)/K of its queries
    n_train = table.filter(pl.col("dataset") == "no_test")["n_train"]
    assert (n_train < n_no_test).all()
    assert (n_train > n_no_test // 2).all()
    assert table["ece"].is_between(0, 1).all()


def test_single_holdout_still_available() -> None:
    history = _two_datasets()
    table = bench.evaluate(history, name="prior", seed=0, holdout_seed=0, folds=0)
    n_no_test = history.queries.filter(pl.col("dataset") == "no_test").height
    assert table.filter(pl.col("dataset") == "no_test")["n_test"].max() < n_no_test / 2


def test_query_on_a_fold_boundary_lands_in_one_fold() -> None:
    # a query id whose hash bucket is exactly 0.6 = 3/5: with fraction 1/5, fold 2 ([0.4, 0.4 + 0.2)) would
    # take it as well as fold 3 ([0.6, 0.8))
    seed = 3
    qid = next(f"edge-{i}" for i in range(1_000_000) if stable_fold([f"edge-{i}"], 10_000, seed)[0] == 6_000)
    history = _two_datasets()
    first = history.queries.filter(pl.col("dataset") == "no_test").head(1)
    history = History(
        queries=pl.concat([history.queries, first.with_columns(pl.lit(qid).alias("query_id"))]),
        outcomes=history.outcomes,
        prices=history.prices,
    )
    folds_with_it = [
        fold
        for fold in range(5)
        if qid in bench.split_for(history, 5, fold, seed=seed).split("test").queries["query_id"].to_list()
    ]
    assert folds_with_it == [3]
