"""Outcome histories: loading several, and what is said about what they disagree on."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import structlog

from batchplan.core.history import load_history, stable_fold, synthetic_history


def test_a_model_listed_at_two_prices_is_explained_in_one_line(tmp_path: Path) -> None:
    dirs = []
    for name, price_in, price_out in (("old", 5.0, 15.0), ("new", 2.5, 10.0), ("same", 2.5, 10.0)):
        history = synthetic_history(20, 2, seed=len(dirs))
        target = tmp_path / name
        target.mkdir()
        history.queries.with_columns(pl.col("query_id") + f"-{name}").write_parquet(target / "queries.parquet")
        history.outcomes.with_columns(pl.col("query_id") + f"-{name}").write_parquet(target / "outcomes.parquet")
        first = pl.col("model") == "synth-00"
        history.prices.with_columns(
            pl.when(first).then(price_in).otherwise(pl.col("usd_per_mtok_in")).alias("usd_per_mtok_in"),
            pl.when(first).then(price_out).otherwise(pl.col("usd_per_mtok_out")).alias("usd_per_mtok_out"),
        ).write_csv(target / "models.csv")
        dirs.append(str(target))
    with structlog.testing.capture_logs() as logs:
        loaded = load_history(dirs)
    warnings = [e for e in logs if e.get("code") == "history.price_conflict"]
    assert [e["event"] for e in warnings] == [
        "synth-00 is listed at 2 prices per Mtok in/out ($5/$15 in old; $2.5/$10 in new, same): cost estimates "
        "from token counts use $5/$15; replay bills each query's recorded cost"
    ]
    assert loaded.prices.filter(pl.col("model") == "synth-00")["usd_per_mtok_in"].to_list() == [5.0]
    with structlog.testing.capture_logs() as again:  # a job loads its histories more than once: said once
        load_history(dirs)
    assert not [e for e in again if e.get("code") == "history.price_conflict"]


def test_another_salt_renumbers_power_of_two_folds_and_reshuffles_the_others() -> None:
    """What stable_fold's docstring says: for keys of one length, another salt XORs every crc32 with one
    constant, so 4 folds (the predictor's and the templates' cross-fit) are the same partition renumbered, while
    5 folds are a different partition."""
    keys = [f"mmlu-train-{i:05d}" for i in range(400)]

    def pairs(folds: int) -> set[tuple[int, int]]:
        plain, salted = stable_fold(keys, folds, 0), stable_fold(keys, folds, 0, salt="cf:")
        return set(zip(plain.tolist(), salted.tolist(), strict=True))

    four = pairs(4)
    assert len(four) == 4  # a bijection of fold labels: every fold maps onto exactly one
    assert {a for a, _ in four} == {b for _, b in four} == set(range(4))
    assert len(pairs(5)) > 5  # a fold's keys land in several folds of the other split
