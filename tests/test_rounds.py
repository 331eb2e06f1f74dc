"""Runs in rounds: the posterior fitted by replay, the round planner, the simulated round loop."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from batchplan import artifacts
from batchplan.history import History, synthetic_history
from batchplan.plan_templates import cross_fit_predictions
from batchplan.posterior import Posterior, fit_posterior
from batchplan.report import Truth, score_results
from batchplan.round_planner import PosteriorRoundPlanner, round_planner
from batchplan.round_replay import simulate_rounds
from batchplan.rounds import OBSERVATION_SCHEMA, RoundState
from batchplan.storage import Storage
from predictors import train_predictor


def _trainer(part: History) -> object:
    return train_predictor(part, name="lightgbm", seed=0)


@pytest.fixture(scope="module")
def fitted() -> tuple[History, Posterior, pl.DataFrame]:
    """A synthetic history (one task, 4 LLMs, logprobs), its posterior and test predictions."""
    history = synthetic_history(900, 4, n_tasks=1, test_fraction=0.4, seed=3)
    train = history.split("train")
    oof = cross_fit_predictions(train, _trainer)
    posterior = fit_posterior(train, oof, validate=True)
    predictor = train_predictor(train, name="lightgbm", seed=0)
    test = history.split("test")
    predictions = predictor.predict(test.as_queue(), test.outcomes.select("query_id", "model"), None)
    return history, posterior, predictions


def _outcomes(history: History) -> pl.DataFrame:
    # what the replay backend knows about a call: never the verdict (``correct``) nor gold
    return history.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")


def _reference(history: History, predictions: pl.DataFrame) -> float:
    """Recorded cost of the dearest LLM on the test queries (the scale budgets are shares of)."""
    test = history.split("test").outcomes
    return float(test.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].max())


def test_posterior_is_calibrated_on_held_out_replay(fitted: tuple[History, Posterior, pl.DataFrame]) -> None:
    _, posterior, _ = fitted
    check = posterior.validation
    assert check["states"] > 1000
    assert check["current_ece"] < 0.04
    assert check["after_ece"] < 0.04
    assert abs(check["current_mean_p"] - check["current_accuracy"]) < 0.03


def test_rounds_stay_within_budget_answer_every_query_and_estimate_honestly(
    fitted: tuple[History, Posterior, pl.DataFrame],
) -> None:
    history, posterior, predictions = fitted
    queue = history.as_queue("test")
    assert "gold" not in queue.columns
    budget = 0.4 * _reference(history, predictions)
    run = simulate_rounds(PosteriorRoundPlanner(posterior), queue, predictions, _outcomes(history), budget, 3)
    assert run.spent_usd <= budget + 1e-12
    assert (run.results["status"] == "done").all()
    accuracy = float(score_results(run.results, Truth.from_history(history))["correct"].mean())
    assert abs(run.estimated_accuracy - accuracy) < 0.04
    # rounds beat the best single LLM the same money buys (its cost fits in 0.4x the dearest)
    single = history.split("test").outcomes.group_by("model").agg(pl.col("cost_usd").sum(), pl.col("correct").mean())
    affordable = single.filter(pl.col("cost_usd") <= budget)["correct"].max()
    assert accuracy >= float(affordable)  # type: ignore[arg-type]


def test_trained_models_save_and_load_the_posterior(tmp_path: object) -> None:
    history = synthetic_history(300, 3, n_tasks=1, seed=4)
    trained = artifacts.train(history.split("train"), predictor="prior")
    assert trained.posterior is not None
    storage = Storage()
    root = str(tmp_path)
    uri = artifacts.save(trained, storage, root)
    loaded = artifacts.load(storage, root)
    assert loaded.posterior is not None
    assert loaded.posterior.to_json() == trained.posterior.to_json()
    # a version trained before posteriors existed still loads, and says why it cannot run in rounds
    storage.delete(f"{uri}/{artifacts.POSTERIOR_FILE}")
    without = artifacts.load(storage, root)
    assert without.posterior is None
    assert without.templates.to_json() == trained.templates.to_json()
    with pytest.raises(ValueError, match="without a round posterior"):
        round_planner(without.posterior)


def test_first_round_answers_every_query_it_can_afford(fitted: tuple[History, Posterior, pl.DataFrame]) -> None:
    history, posterior, predictions = fitted
    queue = history.as_queue("test")
    cheapest = predictions.group_by("query_id").agg(pl.col("cost_usd").min())["cost_usd"].sum()
    state = RoundState(1, 1, queue, predictions, pl.DataFrame(schema=OBSERVATION_SCHEMA), 1.2 * cheapest)
    plan = PosteriorRoundPlanner(posterior).plan_round(state)
    assert plan.calls.height == queue.height
    assert plan.calls["expected_cost_usd"].sum() <= 1.2 * cheapest
    assert np.all(plan.calls["models"].list.len().to_numpy() == 1)
