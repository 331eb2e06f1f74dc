"""Which round planner each task gets, measured by replay on the training history (``RoundChoice``).

``fit_round_choice`` replays both candidates of the default round planner (``batchplan.plans.per_task``) on
held-out folds of the training history, never on a batch: the single-shot plan run step by step
(``PlanContinuation``) and every open query re-planned by the posterior (``PosteriorRoundPlanner``), each for
``DEFAULT_RUN_ROUNDS`` rounds at every budget level of ``CHOICE_LEVELS`` (a share of the fold's
``reference_cost``).

The folds are the cross-fit folds whose out-of-fold predictions ``train`` computes anyway (``oof``): a fold's
queries are planned on the predictions of a predictor that never saw them, with templates and a posterior
refitted on the other folds (both cheap next to the predictor), so no part of either planner saw the queries
it is scored on. The calls are answered from the fold's recorded outcomes (``round_replay.simulate_rounds``,
as the replay backend answers) and scored against the history's gold: the history is the one place a run
may learn from gold.

Per task and level the choice keeps the posterior's mean per-query gain over the plan (pooled over the folds)
and its paired standard error.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import structlog

from batchplan.app.report import Truth, score_results
from batchplan.app.round_replay import simulate_rounds
from batchplan.core.contracts import DEFAULT_TASK
from batchplan.core.history import History, stable_fold
from batchplan.core.request import DEFAULT_RUN_ROUNDS
from batchplan.plans.candidates import build_candidates
from batchplan.plans.continuation import PlanContinuation
from batchplan.plans.infeasible import RequestInfeasible
from batchplan.plans.per_task import CHOICE_LEVELS, RoundChoice, reference_cost
from batchplan.plans.planning import PlanRequest, plan_batch
from batchplan.plans.posterior import Posterior, fit_posterior
from batchplan.plans.round_planner import round_planner
from batchplan.plans.templates import Trainer, fit_plan_templates

log = structlog.get_logger("batchplan.train")
# the columns the replay backend answers from: never gold nor the recorded verdicts
RECORDED = ("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
# held-out queries replayed at most (a stable sample): the replay's cost grows with them, its standard error
# only with their square root, and a large history would add minutes to ``train``
MAX_REPLAYED = 600


def fit_round_choice(
    history: History,
    oof: pl.DataFrame,
    trainer: Trainer,
    *,
    folds: int,
    seed: int = 0,
    levels: tuple[float, ...] = CHOICE_LEVELS,
    rounds: int = DEFAULT_RUN_ROUNDS,
    posterior: Posterior | None = None,
    max_replayed: int = MAX_REPLAYED,
) -> RoundChoice:
    """``RoundChoice`` of ``history`` (module docstring); ``oof``: ``cross_fit_predictions`` of it with the
    same ``folds`` and ``seed`` (every prediction column, as ``predict`` gives them). ``posterior``: the one
    fitted on the whole history, replayed on every fold instead of a refit per fold (``train``'s proxy: the
    refit is most of the cost, and the two choices agree). ``max_replayed``: the held-out queries replayed, a
    stable sample across the folds (each fold's templates are still refitted on all its other queries)."""
    started = time.perf_counter()
    ids = history.queries["query_id"]
    fold_of = stable_fold(ids, folds, seed, salt="cf:")
    # 2**31 - 1 is odd: the sample's order is not a relabelling of the folds (crc32 is affine, see below)
    order = np.argsort(stable_fold(ids, 2**31 - 1, seed, salt="choice:"), kind="stable")
    replayed = np.zeros(len(ids), dtype=bool)
    replayed[order[:max_replayed]] = True
    gains: dict[str, list[list[np.ndarray]]] = {}
    for fold in range(folds):
        held = ids.filter(pl.Series((fold_of == fold) & replayed))
        kept = ids.filter(pl.Series(fold_of != fold))
        if held.is_empty() or kept.is_empty():
            continue
        train, test = history.subset(kept.to_list()), history.subset(held.to_list())
        train_oof = oof.filter(pl.col("query_id").is_in(kept.implode()))
        # validated on folds - 1 folds of its own: on the cross-fit folds one of them (this held-out one) is empty
        # here, and a template's hull gap over an empty fold is nan, which drops every template. Not another
        # seed: crc32 is affine, so ``stable_fold`` with another seed or salt only relabels the same folds
        templates = fit_plan_templates(train, trainer, folds=max(folds - 1, 2), seed=seed, oof=train_oof)
        replanner = posterior if posterior is not None else fit_posterior(train, train_oof, seed=seed)
        queue = test.as_queue()
        predictions = oof.filter(pl.col("query_id").is_in(held.implode()))
        candidates = build_candidates(queue, predictions, templates)
        recorded = test.outcomes.select(*(c for c in RECORDED if c in test.outcomes.columns))
        truth = Truth.from_history(test)
        tasks = queue.select(pl.col("task").fill_null(DEFAULT_TASK))["task"]
        reference = reference_cost(queue, predictions)
        for i, level in enumerate(levels):
            budget = level * reference
            try:
                plan = plan_batch(candidates, PlanRequest(budget_usd=budget), templates).plan
            except RequestInfeasible:  # the fold's cheapest answers cost more than the budget: defer some
                plan = plan_batch(candidates, PlanRequest(budget_usd=budget, allow_deferral=True), templates).plan
            right = []
            for planner in (PlanContinuation(plan), round_planner(replanner)):
                run = simulate_rounds(planner, queue, predictions, recorded, budget, rounds)
                scored = queue.select("query_id").join(score_results(run.results, truth), on="query_id", how="left")
                right.append(scored["correct"].fill_null(False).to_numpy().astype(float))
            for task in tasks.unique().to_list():
                mine = (tasks == task).to_numpy()
                gains.setdefault(task, [[] for _ in levels])[i].append(right[1][mine] - right[0][mine])
    choice = RoundChoice(levels=list(levels))
    for task, per_level in gains.items():
        pooled = [np.concatenate(g) for g in per_level]
        choice.gains[task] = [float(g.mean()) for g in pooled]
        choice.errors[task] = [float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else 0.0 for g in pooled]
        choice.queries[task] = len(pooled[0])
    log.info(
        "train.round_choice",
        folds=folds,
        tasks={t: [round(100 * g, 1) for g in gs] for t, gs in choice.gains.items()},
        levels=list(levels),
        seconds=round(time.perf_counter() - started, 1),
    )
    return choice
