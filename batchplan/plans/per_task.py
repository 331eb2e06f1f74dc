"""The round planner ``per_task`` (the default of ``batchplan run`` and the nightly and backfill DAGs): per task,
either the single-shot plan run step by step (``PlanContinuation``) or every open query re-planned by the
posterior (``PosteriorRoundPlanner``), under one global budget.

Which one a task gets is measured on the training history alone, per task and budget level (``RoundChoice``,
fitted by ``batchplan train`` and stored with the version: ``batchplan.app.round_choice``): both planners are
replayed on held-out cross-fit folds of the history at budgets of 10-100% of the fold's ``reference_cost``, and
the posterior re-plans a task at tonight's level (the budget over the batch's ``reference_cost``, from the
predictions) where it measured ahead there by more than the replay's standard error, and the plan runs it
where it measured behind (``chosen_tasks``). So one task can take the posterior at a tight
budget and the plan at a loose one (a request without a budget: at what the plan expects to spend). Where the
replay has nothing to say (a gain inside its noise, a version trained before it, a task it did not see) the
fixed rule decides (``replanned_tasks``): the posterior
re-plans a task whose history recorded confidences (logprobs) that no fitted cascade template already uses.
There the single-shot plan is blind to the one run-time signal that tells right answers from wrong
(cascades_open: open answers, no templates); without logprobs the posterior knows only agreement (routerbench,
overruling), and where validated logprob cascades exist the templates already cash the confidence in.

The budget stays global. The plan's tasks keep what the single-shot plan (optimized over the whole batch)
expects them to cost: each round their calls go first, and the posterior's tasks are re-planned, together,
under what is left after the plan's outstanding expected cost (drift included) or this round's expected cost
of its calls, whichever is more. In the last round the plan's spending on queries it had deferred leaves the
posterior's unanswered queries their cheapest call. The budget guard's hard caps hold either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl

from batchplan.core.contracts import DEFAULT_TASK, DEFAULT_TENANT, Status
from batchplan.core.rounds import ROUND_ANSWER_SCHEMA, ROUND_PLAN_SCHEMA, RoundPlan, RoundPlanner, RoundState
from batchplan.plans.best_single import best_single_llms
from batchplan.plans.posterior import Posterior
from batchplan.plans.templates import PlanTemplates

PER_TASK = "per_task"


def replanned_tasks(posterior: Posterior | None, templates: PlanTemplates, tasks: Iterable[str]) -> set[str]:
    """The tasks the posterior re-plans: the history recorded confidences for them and no cascade template
    (the single-shot plan's own use of confidences) was fitted. None without a posterior (an older version)."""
    if posterior is None:
        return set()
    return {
        task
        for task in tasks
        if posterior.confident.get(task, False) and not any(t.kind == "cascade" for t in templates.for_task(task))
    }


# budget levels the training replay measures both planners at: a share of the reference cost (``reference_cost``)
CHOICE_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass
class RoundChoice:
    """Which planner a task's queries get at a budget level, measured on the training history alone by
    replaying both planners on held-out folds (``batchplan.app.round_choice.fit_round_choice``).

    ``gains[task][i]``: the posterior's mean accuracy gain over the single-shot plan run step by step, per query
    of the task's held-out folds, at budget level ``levels[i]`` (the budget over ``reference_cost`` of the
    fold); ``errors[task][i]``: its standard error (paired, over those queries)."""

    levels: list[float] = field(default_factory=lambda: list(CHOICE_LEVELS))
    gains: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[float]] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)

    def gain(self, task: str, level: float) -> tuple[float, float] | None:
        """The replayed gain of the posterior at ``level`` and its standard error (linear between the measured
        levels, the nearest end outside them); None for a task the replay did not measure."""
        if task not in self.gains:
            return None
        error = self.errors.get(task) or [0.0] * len(self.levels)
        return float(np.interp(level, self.levels, self.gains[task])), float(np.interp(level, self.levels, error))

    def to_json(self) -> str:
        return json.dumps({"levels": self.levels, "gains": self.gains, "errors": self.errors, "queries": self.queries})

    @classmethod
    def from_json(cls, text: str) -> RoundChoice:
        raw = json.loads(text)
        return cls(list(raw["levels"]), raw["gains"], raw.get("errors", {}), raw.get("queries", {}))


def reference_cost(queue: pl.DataFrame, predictions: pl.DataFrame) -> float:
    """What sending every query of ``queue`` to its task's best single LLM (``best_single_llms`` on the
    predicted P(correct)) is predicted to cost. Predictions only, so the replay on the training history and a
    plan for tonight's batch measure a budget level alike."""
    task = _task(queue).alias("task")
    rows = predictions.join(queue.select("query_id", task), on="query_id")
    if rows.is_empty():
        return 0.0
    return float(best_single_llms(rows, accuracy="p_correct")["cost_usd"].sum())


def chosen_tasks(
    choice: RoundChoice | None,
    posterior: Posterior | None,
    templates: PlanTemplates,
    tasks: Iterable[str],
    level: float | None,
) -> set[str]:
    """The tasks the posterior re-plans at budget ``level``: the training replay decides where it measured one
    planner ahead of the other there by more than its standard error (``RoundChoice.gain``); where it did not
    (a gain inside the noise of a few hundred queries), or did not measure the task, or for an unknown level
    or a version trained before the replay, the fixed rule does (``replanned_tasks``)."""
    tasks = list(tasks)
    fixed = replanned_tasks(posterior, templates, tasks)
    if posterior is None or choice is None or level is None:
        return fixed
    out = set()
    for task in tasks:
        measured = choice.gain(task, level)
        gain, error = measured if measured is not None else (0.0, 0.0)
        if gain > error or (task in fixed and gain >= -error):
            out.add(task)
    return out


def _task(frame: pl.DataFrame) -> pl.Expr:
    return pl.col("task").fill_null(DEFAULT_TASK) if "task" in frame.columns else pl.lit(DEFAULT_TASK)


@dataclass
class PerTaskPlanner:
    """``RoundPlanner`` (module docstring): ``plan`` runs the queries of the tasks not in ``replanned``,
    ``posterior`` the others; ``planned_cost_usd``: the single-shot plan's expected cost of the former."""

    plan: RoundPlanner
    posterior: RoundPlanner
    replanned: frozenset[str]
    planned_cost_usd: float

    def _ids(self, queue: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
        mine = _task(queue).is_in(sorted(self.replanned))
        return queue.filter(~mine)["query_id"], queue.filter(mine)["query_id"]

    def _part(self, state: RoundState, ids: pl.Series) -> RoundState:
        return replace(
            state,
            queue=_of(state.queue, ids),
            predictions=_of(state.predictions, ids),
            observations=_of(state.observations, ids),
            call_bounds=None if state.call_bounds is None else _of(state.call_bounds, ids),
        )

    def plan_round(self, state: RoundState) -> RoundPlan:
        planned_ids, replanned_ids = self._ids(state.queue)
        if replanned_ids.is_empty():
            return self.plan.plan_round(state)
        if planned_ids.is_empty():
            return self.posterior.plan_round(state)
        mine, theirs = self._part(state, planned_ids), self._part(state, replanned_ids)
        left = state.budget_left_usd
        if left is not None and state.last:  # the posterior's unanswered queries keep their cheapest call
            left -= _cheapest_unanswered(theirs)
        planned = self.plan.plan_round(replace(mine, budget_left_usd=left))
        calls = planned.calls.filter(pl.col("models").list.len() > 0)
        reserve = calls.join(state.queue.select("query_id", "tenant"), on="query_id", how="left")
        tenants = dict(
            reserve.with_columns(pl.col("tenant").fill_null(DEFAULT_TENANT))
            .group_by("tenant")
            .agg(pl.col("reserve_cost_usd").sum())
            .iter_rows()
        )
        # what the plan's tasks are expected to spend (drift included): this round's calls, and in a round
        # before the last what is left of their plan. Expected, not the calls' reserves: a reserve is the hard
        # bound of one attempt (several bills on an open endpoint), which the guard holds only while calling,
        # and the plan's calls go first, so the posterior's overcommitting is refused, never the plan's.
        drift = float(planned.diagnostics.get("cost_drift") or 1.0)
        held = drift * float(calls["expected_cost_usd"].fill_null(0.0).sum())
        if not state.last:
            spent = float(mine.observations["cost_usd"].fill_null(0.0).sum())
            held = max(held, drift * self.planned_cost_usd - spent)
        replanned = self.posterior.plan_round(
            replace(
                theirs,
                budget_left_usd=None if state.budget_left_usd is None else max(state.budget_left_usd - held, 0.0),
                tenant_budgets_left_usd={
                    t: v - float(tenants.get(t) or 0.0) for t, v in state.tenant_budgets_left_usd.items()
                },
            )
        )
        names = ROUND_PLAN_SCHEMA.names()
        diagnostics: dict[str, Any] = {
            **replanned.diagnostics,
            "planner": PER_TASK,
            "replanned_tasks": sorted(self.replanned),
            "plan": planned.diagnostics,
            "held_for_plan_usd": held,
        }
        return RoundPlan(calls=pl.concat([calls.select(names), replanned.calls.select(names)]), diagnostics=diagnostics)

    def answers(self, queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
        parts = []
        for ids, planner in zip(self._ids(queue), (self.plan, self.posterior), strict=True):
            if ids.is_empty():
                continue
            got = planner.answers(*(_of(f, ids) for f in (queue, predictions, observations)))
            parts.append(got.select(ROUND_ANSWER_SCHEMA.names()).cast(dict(ROUND_ANSWER_SCHEMA)))  # type: ignore[arg-type]
        order = queue.select("query_id")
        return order.join(pl.concat(parts), on="query_id", how="left", maintain_order="left")


def _of(frame: pl.DataFrame, ids: pl.Series) -> pl.DataFrame:
    """``frame``'s rows of the queries ``ids`` (one half of the batch)."""
    return frame.filter(pl.col("query_id").is_in(ids.implode()))


def _cheapest_unanswered(state: RoundState) -> float:
    """The cheapest predicted call of every query of ``state`` that no call has answered yet."""
    answered = state.observations.filter(pl.col("status") == Status.OK)["query_id"].unique()
    open_ = state.predictions.filter(~pl.col("query_id").is_in(answered.implode()))
    return float(open_.group_by("query_id").agg(pl.col("cost_usd").min())["cost_usd"].sum())
