"""The retrain's promotion judged on live traffic: recent live gold first, else audited silver (flagged), else
the bundled holdout; both predictors scored on the same rows; the live rows scored are not trained on."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batchplan.app.outcomes import write_run_outcomes
from batchplan.app.promotion import HOLDOUT, evaluation_set, judge, score_predictor
from batchplan.core.contracts import GOLD, LIVE_OUTCOME_SCHEMA, SILVER, conform
from batchplan.core.history import History, synthetic_history
from batchplan.core.storage import Storage
from batchplan.predictors import train_predictor


@pytest.fixture(scope="module")
def history() -> History:
    return synthetic_history(300, 4, seed=5)


def _run(storage: Storage, root: Path, name: str, history: History, ids: list[str], source: str) -> str:
    """A run directory whose outcomes for ``ids`` carry ``source`` verdicts (as after labels or an audit)."""
    part = history.subset(ids)
    outcomes = conform(
        part.outcomes.with_columns(
            pl.lit(source).alias("label_source"), pl.lit("ok").alias("status"), pl.lit(1).alias("round"), pl.lit("0").alias("call")
        ),
        LIVE_OUTCOME_SCHEMA,
        name="outcomes",
    )
    uri = str(root / name)
    write_run_outcomes(storage, uri, outcomes, part.queries)
    return uri


def test_recent_live_gold_is_preferred_newest_runs_first(history: History, tmp_path: Path) -> None:
    storage, test = Storage(), history.split("test")
    ids = history.split("train").queries["query_id"].to_list()
    older = _run(storage, tmp_path, "nightly-2026-01-01", history, ids[:40], GOLD)
    newer = _run(storage, tmp_path, "nightly-2026-01-02", history, ids[40:80], GOLD)
    chosen = evaluation_set(storage, [newer, older], test, min_rows=50, max_rows=10_000)
    assert chosen.source == GOLD
    assert chosen.runs == (newer, older)
    assert chosen.rows == chosen.gold_rows == history.subset(ids[:80]).outcomes.height
    # capped: the newest run's rows are enough, the older one is not scored (nor kept out of training)
    capped = evaluation_set(storage, [older, newer], test, min_rows=50, max_rows=1)
    assert capped.runs == (newer,)
    assert set(capped.live_query_ids.to_list()) == set(ids[40:80])


def test_silver_when_gold_is_short_and_holdout_when_both_are(history: History, tmp_path: Path) -> None:
    storage, test = Storage(), history.split("test")
    ids = history.split("train").queries["query_id"].to_list()
    runs = [
        _run(storage, tmp_path, "nightly-2026-01-01", history, ids[:5], GOLD),
        _run(storage, tmp_path, "nightly-2026-01-02", history, ids[5:60], SILVER),
    ]
    gold_rows = history.subset(ids[:5]).outcomes.height
    silver = evaluation_set(storage, runs, test, min_rows=gold_rows + 1)
    assert silver.source == SILVER
    assert silver.gold_rows == gold_rows
    assert set(silver.history.outcomes["label_source"].to_list()) == {SILVER}  # never gold rows mixed in
    held = evaluation_set(storage, runs, test, min_rows=10_000)
    assert held.source == HOLDOUT
    assert held.history is test
    assert held.live_query_ids.len() == 0
    assert evaluation_set(storage, [], test).source == HOLDOUT


def test_judge_scores_both_on_the_same_rows_and_says_which_source(history: History, tmp_path: Path) -> None:
    storage = Storage()
    ids = history.split("test").queries["query_id"].to_list()
    run = _run(storage, tmp_path, "nightly-2026-01-03", history, ids, SILVER)
    evaluation = evaluation_set(storage, [run], history.split("test"), min_rows=1)
    learned = train_predictor(history.split("train"), "prior")
    blind = train_predictor(history.split("train").subset(history.queries["query_id"].head(10)), "prior")
    better = judge(learned, blind, evaluation)
    assert better.source == SILVER
    assert better.silver
    assert better.eval_pairs == evaluation.rows
    assert better.candidate_score == pytest.approx(score_predictor(learned, evaluation.history)[0])
    assert better.current_score == pytest.approx(score_predictor(blind, evaluation.history)[0])
    assert better.promoted == (better.candidate_score < better.current_score)  # type: ignore[operator]
    assert "silver" in better.reason
    worse = judge(blind, learned, evaluation)
    assert worse.promoted is not better.promoted
    first = judge(learned, None, evaluation)
    assert first.promoted
    assert first.current_score is None
