"""The default round planner ``per_task``: per task the posterior or the single-shot plan, one global budget."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from batchplan.app import artifacts
from batchplan.app.pipeline import Job, build_candidates, optimize, predict
from batchplan.app.report import Truth, score_results
from batchplan.app.round_replay import simulate_rounds
from batchplan.app.round_runner import make_round_planner
from batchplan.core.history import History, synthetic_history
from batchplan.core.request import DEFAULT_ROUND_PLANNER, PlanRequest
from batchplan.dispatchers import get_backend
from batchplan.plans.estimates import Template
from batchplan.plans.per_task import PerTaskPlanner, replanned_tasks
from batchplan.plans.posterior import Posterior
from batchplan.plans.templates import PlanTemplates


def _cascade(task: str) -> Template:
    return Template(task, "cascade", ["a", "b"], [0.5], [], [], 0.9, 1.0, 100, {})


def test_the_posterior_re_plans_only_tasks_whose_logprobs_no_cascade_template_uses() -> None:
    posterior = Posterior(models=[], tasks={}, confident={"open": True, "cascaded": True, "blind": False})
    templates = PlanTemplates(templates=[_cascade("cascaded")])
    assert replanned_tasks(posterior, templates, ["open", "cascaded", "blind", "unseen"]) == {"open"}
    assert replanned_tasks(None, templates, ["open"]) == set()  # a version trained without a posterior


def _two_tasks() -> History:
    """task0's logprobs separate right from wrong (higher when right); task1's endpoint gives none."""
    history = synthetic_history(900, 4, n_tasks=2, test_fraction=0.4, seed=7)
    rng = np.random.default_rng(0)
    outcomes = history.outcomes.join(history.queries.select("query_id", "task"), on="query_id", how="left")
    right = outcomes["correct"].to_numpy()
    confidence = np.where(right, rng.uniform(0.6, 1.0, len(right)), rng.uniform(0.1, 0.7, len(right)))
    logprob = pl.when(pl.col("task") == "task0").then(pl.Series(np.log(confidence))).otherwise(None)
    return dataclasses.replace(history, outcomes=outcomes.with_columns(logprob.alias("logprob")).drop("task"))


@pytest.fixture(scope="module")
def setup() -> tuple[History, artifacts.Trained, pl.DataFrame, pl.DataFrame]:
    history = _two_tasks()
    trained = artifacts.train(history.split("train"), predictor="prior", seed=0)
    # no cascade templates: the single-shot plan cannot use task0's confidences (as on open tasks)
    trained = dataclasses.replace(
        trained, templates=dataclasses.replace(trained.templates, templates=[t for t in trained.templates.templates if t.kind != "cascade"])
    )
    queue = history.as_queue("test")
    predictions = predict(queue, trained.predictor, get_backend("replay", history=history))
    return history, trained, queue, predictions


def test_the_default_re_plans_the_confident_task_runs_the_plan_on_the_other_and_holds_the_budget(
    setup: tuple[History, artifacts.Trained, pl.DataFrame, pl.DataFrame],
) -> None:
    history, trained, queue, predictions = setup
    assert DEFAULT_ROUND_PLANNER == "per_task"
    assert Job.__dataclass_fields__["round_planner"].default == "per_task"
    assert trained.posterior is not None
    assert trained.posterior.confident == {"task0": True, "task1": False}
    reference = float(history.split("test").outcomes.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].max())
    budget = 0.3 * reference
    plan = optimize(build_candidates(queue, predictions, trained.templates), PlanRequest(budget_usd=budget)).plan
    planner = make_round_planner(DEFAULT_ROUND_PLANNER, plan=plan, queue=queue, predictions=predictions, trained=trained)
    assert isinstance(planner, PerTaskPlanner)
    assert planner.replanned == {"task0"}
    recorded = history.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
    run = simulate_rounds(planner, queue, predictions, recorded, budget, 3)
    assert run.spent_usd <= budget + 1e-12  # one budget over both parts
    assert (run.results["status"] == "done").all()
    task_of = queue.select("query_id", "task")
    called = run.results.join(task_of, on="query_id").join(plan.select("query_id", "models"), on="query_id")
    # task1 runs the single-shot plan exactly (a healthy endpoint: its calls are the plan's)
    blind = called.filter(pl.col("task") == "task1")
    assert (blind["models_called"] == blind["models"]).all()
    # task0 is the posterior's alone: one call per query and round (the plan's calls never ride along)
    per_round = run.observations.join(task_of, on="query_id").group_by("task", "query_id", "round").len()
    assert per_round.filter(pl.col("task") == "task0")["len"].max() == 1
    # and task1 is answered as by the plan's continuation alone, call for call
    alone = simulate_rounds(make_round_planner("plan", plan=plan), queue, predictions, recorded, budget, 3)
    by_plan = alone.results.join(task_of, on="query_id").filter(pl.col("task") == "task1")
    assert blind.select("query_id", "models_called").sort("query_id").equals(
        by_plan.select("query_id", "models_called").sort("query_id")
    )
    # task0 is re-planned by the posterior: it escalates some queries on what their first answers said
    confident = called.filter(pl.col("task") == "task0")
    assert (confident["models_called"].list.len() > 1).any()
    assert (confident["models_called"] != confident["models"]).any()
    # and, on the history's truth, it does at least as well as the single-shot plan on the same budget
    truth = Truth.from_history(history)
    accuracy = {
        name: float(score_results(r.results, truth)["correct"].fill_null(False).mean()) for name, r in (("per_task", run), ("plan", alone))
    }
    assert accuracy["per_task"] >= accuracy["plan"] - 0.01, accuracy


def test_the_plan_s_tasks_hold_their_expected_spend_not_their_calls_hard_bounds(
    setup: tuple[History, artifacts.Trained, pl.DataFrame, pl.DataFrame],
) -> None:
    """On an open endpoint a call's hard bound (what the guard holds while calling) is several bills: held for
    the plan's tasks it left the posterior's nothing to answer with before the last round."""
    from batchplan.core.rounds import OBSERVATION_SCHEMA, RoundState

    history, trained, queue, predictions = setup
    budget = 0.3 * float(history.split("test").outcomes.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].max())
    plan = optimize(build_candidates(queue, predictions, trained.templates), PlanRequest(budget_usd=budget)).plan
    planner = make_round_planner(DEFAULT_ROUND_PLANNER, plan=plan, queue=queue, predictions=predictions, trained=trained)
    assert isinstance(planner, PerTaskPlanner)
    bounds = predictions.select("query_id", "model", (pl.col("cost_usd") * 20).alias("bound_usd"))
    state = RoundState(1, 3, queue, predictions, pl.DataFrame(schema=OBSERVATION_SCHEMA), budget, call_bounds=bounds)
    planned = planner.plan_round(state)
    assert planned.diagnostics["held_for_plan_usd"] == pytest.approx(planner.planned_cost_usd)
    task0 = queue.filter(pl.col("task") == "task0")["query_id"]
    assert planned.calls.filter(pl.col("query_id").is_in(task0.implode())).height == task0.len()  # each answered
