"""bench/quality.py's hindsight ceiling: the LP over per-task uniform plans against hand-computed optima and
against the best model per task when money is no object."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batchplan.core.history import synthetic_history
from bench import quality as bench


def _plans() -> pl.DataFrame:
    # task a: 5 right for $1 or 8 right for $3; task b: 4 right for $2 or 9 right for $4 (20 queries in all)
    return pl.DataFrame(
        {
            "task": ["a", "a", "b", "b"],
            "kind": ["single"] * 4,
            "cost_usd": [1.0, 3.0, 2.0, 4.0],
            "correct": [5.0, 8.0, 4.0, 9.0],
        }
    )


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (3.0, 9 / 20),  # the cheapest plan of each task
        (5.0, 14 / 20),  # b's upgrade first: 2.5 right per dollar against a's 1.5
        (6.0, 15.5 / 20),  # then half of a's queries upgraded
        (100.0, 17 / 20),  # the best plan of each task
    ],
)
def test_hindsight_ceiling_matches_hand_computed_optima(budget: float, expected: float) -> None:
    assert bench.hindsight_accuracy(_plans(), 20, budget) == pytest.approx(expected)


def test_hindsight_ceiling_is_nan_below_the_cheapest_mix() -> None:
    assert math.isnan(bench.hindsight_accuracy(_plans(), 20, 2.5))


def test_uniform_plans_replay_the_test_queries() -> None:
    test = synthetic_history(300, 4, n_tasks=2, test_fraction=0.5, seed=3).split("test")
    plans = bench.uniform_plans(test)
    assert set(plans["kind"]) >= {"single", "vote", "agreement"}
    # money no object: single models only reach each task's best model; votes and cascades can only add
    best_singles = (
        test.outcomes.join(test.queries.select("query_id", "task"), on="query_id")
        .group_by("task", "model")
        .agg(pl.col("correct").sum())
        .group_by("task")
        .agg(pl.col("correct").max())["correct"]
        .sum()
    )
    singles = bench.hindsight_accuracy(plans.filter(pl.col("kind") == "single"), test.queries.height, 1e9)
    assert singles == pytest.approx(best_singles / test.queries.height)
    assert bench.hindsight_accuracy(plans, test.queries.height, 1e9) >= singles


def test_gain_interval_brackets_the_paired_gain() -> None:
    assert bench.gain_interval(np.zeros(50)) == (0.0, 0.0)
    assert bench.gain_interval(np.ones(50)) == (1.0, 1.0)
    # 30 wins, 20 losses of 500: +2 points, which 500 queries cannot tell from zero
    gain = np.concatenate([np.ones(30), -np.ones(20), np.zeros(450)])
    low, high = bench.gain_interval(gain)
    assert low < 0 < 0.02 < high


def test_folds_pool_their_paired_gains() -> None:
    rows = [
        {"queries": 2, "_paired_gain": np.array([1.0, 0.0]), "_query_ids": np.array(["a", "b"])},
        {"queries": 1, "_paired_gain": np.array([-1.0]), "_query_ids": np.array(["a"])},
    ]
    pooled = bench.pool_folds(rows)
    assert pooled["_paired_gain"].tolist() == [1.0, 0.0, -1.0]
    assert pooled["_query_ids"].tolist() == ["a", "b", "a"]  # the shifted hold-outs share queries


def test_the_gain_interval_resamples_whole_queries() -> None:
    # 300 queries, +2 points: 30 wins, 24 losses; ids in sorted order, so np.unique keeps the rows' order
    gain = np.concatenate([np.ones(30), -np.ones(24), np.zeros(246)])
    ids = np.array([f"q{i:03d}" for i in range(len(gain))])
    alone = bench.gain_interval(gain)
    assert bench.gain_interval(gain, ids) == alone  # one row per query: the rows are the queries
    # every query in two hold-outs: the same evidence, so the same interval when whole queries are resampled ...
    assert bench.gain_interval(np.repeat(gain, 2), np.repeat(ids, 2)) == pytest.approx(alone)
    # ... where resampling the rows would count each query twice and narrow it
    low, high = bench.gain_interval(np.repeat(gain, 2))
    assert high - low < 0.8 * (alone[1] - alone[0])
    # a query's rows are drawn together: a draw of two queries means 1 (a, a), 2/3 (a, b) or 0 (b, b)
    assert bench.gain_interval(np.array([1.0, 1.0, 0.0]), np.array(["a", "a", "b"])) == (0.0, 1.0)


def test_cascade_ceilings_match_a_hand_computed_cascade() -> None:
    from bench import ceiling

    # 4 queries; "cheap" ($1 each) is right on q0, q1 and sure only there; "dear" ($3 each) is right on all but q3
    j = ceiling.Joint(
        models=["cheap", "dear"],
        task=np.array(["t"] * 4),
        correct=np.array([[1, 1], [1, 1], [0, 1], [0, 0]], dtype=float),
        logprob=np.array([[-0.1, -0.1], [-0.1, -0.1], [-2.0, -0.1], [-2.0, -0.1]]),
        cost=np.array([[1.0, 3.0]] * 4),
        answer=np.array([[1, 1], [1, 1], [1, 2], [1, 2]]),
    )
    cost, right, labels = ceiling.frontier(list(ceiling.plans(j, "2-stage")))
    # cheap for all ($4, 2 right), then dear where cheap is unsure ($10, 3 right): nothing better at any cost
    assert ceiling.at_budget(cost, right, 4.0)[0] == 2
    best, at = ceiling.at_budget(cost, right, 10.0)
    assert (best, labels[at]) == (3, "cheap > dear")
    assert math.isnan(ceiling.at_budget(cost, right, 3.9)[0])  # nothing fits


def test_cascade_ceilings_only_grow_with_stages_and_per_task_choice() -> None:
    from bench import ceiling

    history = synthetic_history(200, 3, n_tasks=2, test_fraction=0.5, seed=2)
    test = history.split("test")
    dearest = float(test.outcomes.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].max())
    rows = ceiling.ceilings(test, dearest, (0.3, 1.0))
    best_single = float(test.outcomes.group_by("model").agg(pl.col("correct").mean())["correct"].max())
    assert rows[-1]["uniform_single"] == pytest.approx(best_single)
    for row in rows:
        for kind in ceiling.KINDS:
            assert row[f"per_task_{kind}"] >= row[f"uniform_{kind}"] - 1e-9
        # a 2-stage plan may escalate nothing, a 3-stage or vote plan may stop after 2 stages
        assert row["uniform_3-stage"] >= row["uniform_2-stage"] >= row["uniform_single"] - 1e-9
        assert row["uniform_vote"] >= row["uniform_2-stage"] - 1e-9


@pytest.mark.parametrize(
    ("datasets", "no_shifted", "expected"),
    [
        (None, False, ["cascades", "cascades_shifted", "routerbench"]),
        (None, True, ["cascades", "routerbench"]),
        ("cascades", False, ["cascades", "cascades_shifted"]),  # the shifted split comes along, as --help says
        ("cascades", True, ["cascades"]),  # --no-shifted holds beside --datasets too
        ("cascades_shifted", False, ["cascades_shifted"]),  # the shifted split alone
        ("routerbench,cascades_shifted", False, ["cascades_shifted", "routerbench"]),
        ("routerbench", False, ["routerbench"]),
    ],
)
def test_the_dataset_flags_choose_as_the_help_says(
    tmp_path: Path, datasets: str | None, no_shifted: bool, expected: list[str]
) -> None:
    found = [tmp_path / "cascades", tmp_path / "routerbench"]
    jobs = bench.bench_jobs(found, datasets, no_shifted)
    assert [d.name + ("_shifted" if shifted else "") for d, shifted in jobs] == expected


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--datasets", "cascade"], "no data set cascade here; choose from cascades, routerbench, cascades_shifted"),
        (["--datasets", "cascades_shifted", "--no-shifted"], "--no-shifted skips the shifted splits"),
    ],
)
def test_a_dataset_flag_that_cannot_be_met_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    for name in ("cascades", "routerbench"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "queries.parquet").touch()
    with pytest.raises(SystemExit) as exited:
        bench.main(["--data-dir", str(tmp_path), *argv])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
