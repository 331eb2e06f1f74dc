"""The default round planner ``per_task``: per task the posterior or the single-shot plan, one global budget."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from batchplan.app import artifacts
from batchplan.app.pipeline import Job, build_candidates, predict
from batchplan.app.report import Truth, score_results
from batchplan.app.round_choice import fit_round_choice
from batchplan.app.round_replay import simulate_rounds
from batchplan.app.round_runner import make_round_planner
from batchplan.core.history import History, synthetic_history
from batchplan.core.request import DEFAULT_ROUND_PLANNER, PlanRequest
from batchplan.dispatchers import get_backend
from batchplan.plans.estimates import Template
from batchplan.plans.per_task import PerTaskPlanner, RoundChoice, chosen_tasks, reference_cost, replanned_tasks
from batchplan.plans.planning import plan_batch
from batchplan.plans.posterior import Posterior
from batchplan.plans.templates import PlanTemplates, cross_fit_predictions
from batchplan.predictors import train_predictor


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
    # the fixed rule (a version trained without the replayed choice): tests of the replayed choice are below
    trained = artifacts.train(history.split("train"), predictor="prior", seed=0, round_choice=False)
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
    plan = plan_batch(build_candidates(queue, predictions, trained.templates), PlanRequest(budget_usd=budget)).plan
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
    plan = plan_batch(build_candidates(queue, predictions, trained.templates), PlanRequest(budget_usd=budget)).plan
    planner = make_round_planner(DEFAULT_ROUND_PLANNER, plan=plan, queue=queue, predictions=predictions, trained=trained)
    assert isinstance(planner, PerTaskPlanner)
    bounds = predictions.select("query_id", "model", (pl.col("cost_usd") * 20).alias("bound_usd"))
    state = RoundState(1, 3, queue, predictions, pl.DataFrame(schema=OBSERVATION_SCHEMA), budget, call_bounds=bounds)
    planned = planner.plan_round(state)
    assert planned.diagnostics["held_for_plan_usd"] == pytest.approx(planner.planned_cost_usd)
    task0 = queue.filter(pl.col("task") == "task0")["query_id"]
    assert planned.calls.filter(pl.col("query_id").is_in(task0.implode())).height == task0.len()  # each answered


def test_the_replayed_choice_picks_per_task_and_budget_level_and_falls_back_to_the_fixed_rule() -> None:
    posterior = Posterior(models=[], tasks={}, confident={"open": True, "cascaded": True, "blind": False})
    templates = PlanTemplates(templates=[_cascade("cascaded")])
    # the posterior wins on "cascaded" below 40% and loses above; never on "blind"; "open" was not replayed
    choice = RoundChoice(
        levels=[0.2, 0.3, 0.5],
        gains={"cascaded": [0.03, 0.01, -0.02], "blind": [-0.01] * 3, "noisy": [0.01, -0.01, -0.03]},
        errors={"cascaded": [0.005] * 3, "blind": [0.005] * 3, "noisy": [0.02] * 3},
    )
    tasks = ["open", "cascaded", "blind"]
    assert chosen_tasks(choice, posterior, templates, tasks, 0.2) == {"open", "cascaded"}
    assert chosen_tasks(choice, posterior, templates, tasks, 0.5) == {"open"}
    assert chosen_tasks(choice, posterior, templates, tasks, 5.0) == {"open"}  # past the grid: its last level
    # a gain inside the replay's noise keeps the fixed rule; past it, the replay overrules it either way
    noisy = Posterior(models=[], tasks={}, confident={"noisy": True})
    assert chosen_tasks(choice, noisy, PlanTemplates(), ["noisy"], 0.2) == {"noisy"}
    assert chosen_tasks(choice, noisy, PlanTemplates(), ["noisy"], 0.5) == set()
    # no budget level, or a version trained before the replay: the fixed rule
    assert chosen_tasks(choice, posterior, templates, tasks, None) == {"open"}
    assert chosen_tasks(None, posterior, templates, tasks, 0.2) == {"open"}
    assert chosen_tasks(choice, None, templates, tasks, 0.2) == set()  # no posterior, nothing to re-plan with
    assert RoundChoice.from_json(choice.to_json()) == choice


@pytest.fixture(scope="module")
def replayed() -> tuple[History, artifacts.Trained]:
    """The two tasks, with the choice replayed on the training history at one budget level (30%; ``train``
    replays every level of ``CHOICE_LEVELS`` alike)."""
    history = _two_tasks()
    train = history.split("train")
    trained = artifacts.train(train, predictor="prior", seed=0, round_choice=False)

    def trainer(part: History) -> object:
        return train_predictor(part, name="prior", seed=0)

    oof = cross_fit_predictions(train, trainer)
    choice = fit_round_choice(train, oof, trainer, folds=4, posterior=trained.posterior, levels=(0.3,))
    return history, dataclasses.replace(trained, round_choice=choice)


def _default_at(history: History, trained: artifacts.Trained, level: float) -> object:
    queue = history.as_queue("test")
    predictions = predict(queue, trained.predictor, get_backend("replay", history=history))
    budget = level * reference_cost(queue, predictions)
    plan = plan_batch(build_candidates(queue, predictions, trained.templates), PlanRequest(budget_usd=budget)).plan
    return make_round_planner(
        DEFAULT_ROUND_PLANNER, plan=plan, queue=queue, predictions=predictions, trained=trained,
        request=PlanRequest(budget_usd=budget),
    )  # fmt: skip


def test_the_replay_on_the_training_history_measures_each_task_and_the_default_follows_it(
    replayed: tuple[History, artifacts.Trained],
) -> None:
    history, trained = replayed
    choice = trained.round_choice
    assert choice is not None
    assert set(choice.gains) == {"task0", "task1"}
    assert choice.queries["task0"] + choice.queries["task1"] == history.split("train").queries.height
    # task0's cascade templates cash its confidences in: replayed, the single-shot plan clearly wins there
    assert choice.gains["task0"][0] < -2 * choice.errors["task0"][0] < 0
    measured = {t for t in choice.gains if choice.gains[t][0] > choice.errors[t][0]}  # neither is fixed-ruled in
    planner = _default_at(history, trained, 0.3)
    assert getattr(planner, "replanned", set()) == measured
    # the choice, not the fixed rule, decides: without cascade templates the fixed rule would re-plan task0
    no_cascades = dataclasses.replace(
        trained.templates, templates=[t for t in trained.templates.templates if t.kind != "cascade"]
    )
    assert "task0" in replanned_tasks(trained.posterior, no_cascades, ["task0"])
    overruled = _default_at(history, dataclasses.replace(trained, templates=no_cascades), 0.3)
    assert "task0" not in getattr(overruled, "replanned", set())


def test_the_choice_at_plan_time_reads_no_gold_of_the_batch(replayed: tuple[History, artifacts.Trained]) -> None:
    """Fitted on the train split (the fixture), chosen at plan time from the queue, predictions and budget:
    scrambling the batch's gold and recorded verdicts changes nothing."""
    history, trained = replayed
    test_ids = history.split("test").queries["query_id"].implode()
    scrambled = dataclasses.replace(
        history,
        queries=history.queries.with_columns(
            pl.when(pl.col("query_id").is_in(test_ids)).then(pl.lit("zzz")).otherwise(pl.col("gold")).alias("gold")
        ),
        outcomes=history.outcomes.with_columns(
            pl.when(pl.col("query_id").is_in(test_ids)).then(~pl.col("correct")).otherwise(pl.col("correct"))
        ),
    )
    chosen = [getattr(_default_at(h, trained, 0.3), "replanned", set()) for h in (history, scrambled)]
    assert chosen[0] == chosen[1]
