"""The one definition of the best single model (batchplan.plans.best_single) and its callers."""

from __future__ import annotations

import polars as pl
import pytest

from batchplan.app.demo import best_single_cost
from batchplan.app.pipeline import reference_models
from batchplan.core.history import History
from batchplan.plans.best_single import best_single_llms, best_single_map


def _scores(rows: list[tuple[str, str, str, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["task", "query_id", "model", "correct", "cost_usd"], orient="row")


def test_highest_mean_accuracy_per_task_among_the_fully_covered() -> None:
    scores = _scores(
        [
            ("t", "q1", "a", 1.0, 1.0),
            ("t", "q2", "a", 0.0, 1.0),
            ("t", "q1", "b", 1.0, 5.0),
            ("t", "q2", "b", 1.0, 5.0),
            ("t", "q1", "partial", 1.0, 0.1),  # perfect, but on half the queries: it cannot be sent them all
            ("u", "q3", "a", 1.0, 2.0),
            ("u", "q3", "b", 0.0, 9.0),
        ]
    )
    best = best_single_llms(scores)
    assert best.select("task", "model", "accuracy", "cost_usd", "queries").rows() == [
        ("t", "b", 1.0, 10.0, 2),
        ("u", "a", 1.0, 2.0, 1),
    ]
    assert best_single_map(scores) == {"t": "b", "u": "a"}


def test_ties_go_to_the_cheaper_then_to_the_first_name() -> None:
    tie_on_accuracy = _scores([("t", "q1", "dear", 1.0, 3.0), ("t", "q1", "cheap", 1.0, 1.0)])
    assert best_single_map(tie_on_accuracy) == {"t": "cheap"}
    tie_on_both = _scores([("t", "q1", "zed", 1.0, 1.0), ("t", "q1", "abe", 1.0, 1.0)])
    assert best_single_map(tie_on_both) == {"t": "abe"}
    # the last bits of a float mean do not break a tie: 0.1 + 0.2 against 0.3
    sums = _scores([("t", "q1", "b", 0.1, 1.0), ("t", "q2", "b", 0.2, 1.0), ("t", "q1", "a", 0.3, 1.0), ("t", "q2", "a", 0.0, 1.0)])
    assert best_single_map(sums) == {"t": "a"}


def test_reference_models_ties_go_to_the_cheaper() -> None:
    predictions = pl.DataFrame(
        {"query_id": ["q1", "q1"], "model": ["dear", "cheap"], "p_correct": [0.9, 0.9], "cost_usd": [2.0, 1.0]}
    )
    queue = pl.DataFrame({"query_id": ["q1"], "task": ["t"]})
    assert reference_models(predictions, queue) == {"t": "cheap"}


def test_demo_scale_is_the_best_model_per_task_not_per_data_set() -> None:
    # one data set, two tasks: "a" is best on t1, "b" on t2 (and on the data set as a whole)
    queries = pl.DataFrame(
        {
            "query_id": ["r1", "r2", "r3", "s1", "s2", "s3"],
            "dataset": ["d"] * 6,
            "task": ["t1", "t1", "t2", "t2", "t2", "t1"],
            "split": ["train", "train", "train", "train", "test", "test"],
        }
    )
    correct = {("r1", "a"): True, ("r2", "a"): True, ("r1", "b"): False, ("r2", "b"): True}
    correct |= {(q, "a"): False for q in ("r3", "s1")} | {(q, "b"): True for q in ("r3", "s1")}
    rows = [(q, m, correct.get((q, m), True), 1.0 if m == "a" else 2.0) for q in queries["query_id"] for m in "ab"]
    outcomes = pl.DataFrame(rows, schema=["query_id", "model", "correct", "cost_usd"], orient="row")
    history = History(queries=queries, outcomes=outcomes, prices=pl.DataFrame({"model": ["a", "b"]}))
    cost, per_task = best_single_cost(history, pl.DataFrame({"query_id": ["s2", "s3"], "task": ["t2", "t1"]}))
    assert per_task == {"t1": "a", "t2": "b"}
    assert cost == pytest.approx(2.0 + 1.0)
