"""bench/shift_estimate.py's decomposition of the estimate's miss: the subject effect it pools (against a known
variance), the subject-blind floor (against its formula), and second opinions (one more call on exactly the
sampled lone answers, paid outside the budget, the LLM chosen without gold)."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from batchplan.app import artifacts
from batchplan.app.pipeline import predict
from batchplan.app.round_replay import simulate_rounds
from batchplan.core.contracts import Status
from batchplan.core.history import synthetic_history
from batchplan.dispatchers import get_backend
from batchplan.plans.round_planner import round_planner
from bench import shift_estimate as bench


def _cells(tau: float, subjects: int, n: int, bias: float, seed: int = 0) -> list[list[dict]]:
    """Hold-outs of 10 subjects of ``n`` queries each: every query's estimate p = 0.55, a subject's accuracy
    shifted by N(0, tau) about p - bias (bias 0.1: the same binomial variance as p's, 0.45 x 0.55)."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(subjects // 10):
        cell = []
        for _ in range(10):
            accuracy = np.clip(0.55 - bias + rng.normal(0, tau), 0, 1)
            right = rng.random(n) < accuracy
            cell.append({"task": "t", "n": n, "r": float(np.sum(0.55 - right)), "v": n * 0.55 * 0.45})
        cells.append(cell)
    return cells


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.1])
def test_subject_effect_recovers_a_known_subject_variance_whatever_the_common_bias(tau: float) -> None:
    found = bench.subject_effect(_cells(tau, 4000, 30, bias=0.1))
    assert found["t"] == pytest.approx(tau**2, abs=1e-3)  # the estimate's SD at 4000 subjects: ~4e-4


def test_subject_blind_miss_adds_the_subjects_variance_to_the_binomial_floor() -> None:
    cell = [{"task": "a", "n": 20, "r": 0.0, "v": 3.2}, {"task": "b", "n": 10, "r": 0.0, "v": 0.9}]
    assert bench.subject_blind_miss(cell, {}) == pytest.approx(np.sqrt(4.1) / 30)
    assert bench.subject_blind_miss(cell, {"a": 0.01}) == pytest.approx(np.sqrt(4.1 + 400 * 0.01) / 30)


@pytest.fixture(scope="module")
def run() -> tuple:
    history = synthetic_history(600, 5, n_tasks=2, test_fraction=0.4, seed=3)
    rng = np.random.default_rng(0)
    right = history.outcomes["correct"].to_numpy()
    confidence = np.where(right, rng.uniform(0.6, 1.0, len(right)), rng.uniform(0.1, 0.7, len(right)))
    history = dataclasses.replace(history, outcomes=history.outcomes.with_columns(pl.Series("logprob", np.log(confidence))))
    trained = artifacts.train(history.split("train"), predictor="prior", seed=0, round_choice=False)
    queue = history.as_queue("test")
    predictions = predict(queue, trained.predictor, get_backend("replay", history=history))
    recorded = history.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
    cheapest = float(history.split("test").outcomes.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].min())
    rounds = simulate_rounds(round_planner(trained.posterior), queue, predictions, recorded, 1.2 * cheapest, 3)
    return history, trained, queue, predictions, recorded, rounds


def test_second_opinion_llms_leave_out_the_dearest_and_rank_by_the_historys_accuracy(run: tuple) -> None:
    history = run[0]
    train = history.split("train")
    llms = bench.second_opinion_llms(train)
    per = train.outcomes.join(train.queries.select("query_id", "task"), on="query_id")
    for task, chosen in llms.items():
        stats = per.filter(pl.col("task") == task).group_by("model").agg(pl.col("correct").mean(), pl.col("cost_usd").mean())
        dearest = stats.sort("cost_usd")["model"][-1]
        assert chosen
        assert dearest not in chosen
        accuracy = dict(zip(stats["model"], stats["correct"], strict=True))
        assert [accuracy[m] for m in chosen] == sorted((accuracy[m] for m in chosen), reverse=True)


def test_second_opinions_call_once_more_on_exactly_the_sampled_lone_answers(run: tuple) -> None:
    history, trained, queue, predictions, recorded, rounds = run
    llms = bench.second_opinion_llms(history.split("train"))
    lone = bench.answer_counts(rounds).filter(pl.col("answers") == 1)
    assert lone.height > 20
    none_answers, _, none_cost = bench.with_second_opinions(rounds, queue, predictions, recorded, trained.posterior, llms, 0.0, 0)
    assert none_cost == 0.0
    assert none_answers["estimated_p_correct"].to_list() == rounds.answers["estimated_p_correct"].to_list()
    answers, results, cost = bench.with_second_opinions(rounds, queue, predictions, recorded, trained.posterior, llms, 1.0, 0)
    assert answers.height == queue.height
    called = results.select("query_id", pl.col("models_called").list.len().alias("calls")).join(lone, on="query_id")
    assert (called["calls"] == 2).all()  # every lone answer got exactly one more (the synthetic history answers all)
    extra = results["cost_usd"].sum() - rounds.observations.filter(pl.col("status") == Status.OK)["cost_usd"].sum()
    assert cost > 0
    assert cost == pytest.approx(extra)
