"""Plan templates: which votes and cascades are worth offering per task, and how their per-query accuracy
and cost follow from the members' predicted P(correct).

Fitting, per task with a label set, on a training history:
1. Cross-fit the predictor (k folds by query) so every training query has out-of-fold P(correct) per model.
2. Enumerate templates: votes of 3, agreement cascades (two cheaper models, escalate to a dearer one on
   disagreement) and, where logprobs were recorded, logprob cascades of 2-3 models over a threshold grid.
3. Replay each exactly on the recorded outcomes (``plan_simulation``): accuracy, cost, escalation, and the
   per-label error P(wrong | true label = y).
4. Keep the templates on or near the upper hull of (mean cost, mean accuracy) together with the single
   models, on every cross-fitting fold separately (so a template that won by chance is not kept and then
   over-estimated): the others are never worth their cost on average.
5. Per kept template, a per-query estimate from the members' P(correct), calibrated on the replayed
   outcomes with out-of-fold member predictions (``plan_estimates``), so the correlation between members'
   errors is in the numbers, not assumed away.
6. Offer a task's templates only at the budgets (shares of its best single model's cost) where they improve
   budgeted planning on held-out folds by a clear margin: cheap cascades can win at tight budgets and lose
   to the best single model at loose ones.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from batchplan.core.history import History, stable_fold
from batchplan.plans.best_single import best_single_llms
from batchplan.plans.estimates import Template, choose_calibration, estimate, fit_template
from batchplan.plans.simulation import PlanSpec, Recorded, Simulated, error_by_label, recorded_by_task, simulate

CASCADE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
MIN_GAIN = 0.0025  # held-out accuracy gain (0.25 points) templates must show before a task offers them
VALIDATION_BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # shares of the best single model's cost
# Out-of-fold predictors see (k-1)/k of the history: with 2 they were blunter than the predictor that plans,
# so escalation fitted on them ran 4-6% over the estimate when planning (deferrals at the budget's end).
CROSS_FIT_FOLDS = 4


@dataclass
class PlanTemplates:
    """Fitted templates per task, single models' per-label errors and label priors (for statewise bounds)."""

    templates: list[Template] = field(default_factory=list)
    single_errors: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # task -> model -> label -> err
    label_priors: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> label -> P(true = label)
    summary: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> held-out check of templates

    def for_task(self, task: str) -> list[Template]:
        return [t for t in self.templates if t.task == task]

    def offered(self, task: str, budget_share: float | None) -> bool:
        """Whether a task's templates are offered at a budget of ``budget_share`` x its best single model's
        cost: where held-out validation showed a clear gain at the validated shares on both sides of it
        (beyond the grid, the nearest). Any budget (``None``), or templates fitted without validation: yes."""
        check = self.validation.get(task)
        if budget_share is None or not check or "offered_budgets" not in check:
            return True
        grid = sorted(float(f) for f in check["gain_by_budget"])
        below = [f for f in grid if f <= budget_share]
        above = [f for f in grid if f >= budget_share]
        sides = {below[-1] if below else grid[0], above[0] if above else grid[-1]}
        return all(f in check["offered_budgets"] for f in sides)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PlanTemplates:
        raw = json.loads(text)
        return cls(
            templates=[Template(**t) for t in raw["templates"]],
            single_errors=raw["single_errors"],
            label_priors=raw["label_priors"],
            summary=raw.get("summary", []),
            validation=raw.get("validation", {}),
        )


Trainer = Callable[[History], Any]  # returns an object with .predict(queries, pairs, catalog)


def cross_fit_predictions(
    history: History, train: Trainer, folds: int = CROSS_FIT_FOLDS, seed: int = 0
) -> pl.DataFrame:
    """Out-of-fold predictions (P(correct), costs, as ``predict`` gives them) for every recorded (query, model):
    each fold scored by a predictor that never saw it."""
    ids = history.queries["query_id"].to_list()
    fold_of = dict(zip(ids, stable_fold(ids, folds, seed, salt="cf:").tolist(), strict=True))
    frames = []
    for fold in range(folds):
        held = [q for q in ids if fold_of[q] == fold]
        kept = [q for q in ids if fold_of[q] != fold]
        if not held or not kept:
            continue
        predictor = train(history.subset(kept))
        held_history = history.subset(held)
        pairs = held_history.outcomes.select("query_id", "model")
        predictions = predictor.predict(held_history.as_queue(), pairs, None)
        frames.append(predictions)  # every column: the round choice's replay plans on them (app.round_choice)
    return pl.concat(frames)


def _matrix(rec: Recorded, oof: pl.DataFrame, column: str) -> np.ndarray:
    """An out-of-fold prediction column as [n, M] aligned with ``rec`` (nan where missing)."""
    qi = {q: i for i, q in enumerate(rec.query_ids)}
    mi = {m: j for j, m in enumerate(rec.models)}
    sub = oof.filter(
        pl.col("query_id").is_in(pl.Series(rec.query_ids).implode())
        & pl.col("model").is_in(pl.Series(rec.models).implode())
    )
    out = np.full((len(rec.query_ids), len(rec.models)), np.nan)
    rows = [qi[q] for q in sub["query_id"].to_list()]
    out[rows, [mi[m] for m in sub["model"].to_list()]] = sub[column].to_numpy()
    return out


def enumerate_specs(rec: Recorded) -> list[PlanSpec]:
    """Every vote, agreement and (with logprobs) cascade template worth replaying for this task."""
    mean_cost = {
        m: float(rec.cost[rec.present[:, j], j].mean()) if rec.present[:, j].any() else np.inf
        for j, m in enumerate(rec.models)
    }
    models = sorted(rec.models, key=lambda m: (mean_cost[m], m))
    specs = [PlanSpec("vote", trio) for trio in itertools.combinations(models, 3)]
    for cheap_a, cheap_b in itertools.combinations(models, 2):
        for dear in models:
            if dear not in (cheap_a, cheap_b) and mean_cost[dear] >= max(mean_cost[cheap_a], mean_cost[cheap_b]):
                specs.append(PlanSpec("agreement", (cheap_a, cheap_b, dear)))
    if rec.has_logprobs:
        for first, second in itertools.combinations(models, 2):  # cheaper first
            specs.extend(PlanSpec("cascade", (first, second), (t,)) for t in CASCADE_THRESHOLDS)
        for trio in itertools.combinations(models, 3):
            specs.extend(PlanSpec("cascade", trio, (t1, t2)) for t1 in (0.7, 0.9) for t2 in (0.7, 0.9))
    return specs


def upper_hull(costs: np.ndarray, accs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper concave hull of (cost, accuracy), cost ascending, accuracy increasing."""
    order = np.lexsort((-accs, costs))
    hull: list[int] = []
    for i in order:
        if hull and accs[i] <= accs[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or below the segment a -> i
            if (accs[b] - accs[a]) * (costs[i] - costs[a]) <= (accs[i] - accs[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return costs[hull], accs[hull]


def hull_gap(costs: np.ndarray, accs: np.ndarray, hull_c: np.ndarray, hull_a: np.ndarray) -> np.ndarray:
    """How far below the hull each point lies (0 on the hull)."""
    return np.interp(costs, hull_c, hull_a, left=hull_a[0], right=hull_a[-1]) - accs


def _select(
    specs: list[PlanSpec], sims: dict[PlanSpec, Simulated], fold: np.ndarray, folds: int, slack: float
) -> list[PlanSpec]:
    """Templates near the (cost, accuracy) hull, closest first by their mean distance below it over the
    cross-fitting folds (each fold's hull drawn on its own rows, so one lucky fold does not carry a
    template); of templates that replay identically (a threshold no answer falls between), the first."""
    gaps = np.zeros(len(specs))
    for f in range(folds):
        rows = fold == f
        costs = np.array([sims[s].cost[sims[s].covered & rows].mean() for s in specs])
        accs = np.array([sims[s].correct[sims[s].covered & rows].mean() for s in specs])
        hull_c, hull_a = upper_hull(costs, accs)
        gaps += hull_gap(costs, accs, hull_c, hull_a) / folds
    chosen, seen = [], set()
    for i in sorted((i for i, g in enumerate(gaps) if specs[i].kind != "single" and g <= slack), key=gaps.__getitem__):
        behaviour = (sims[specs[i]].answer.tobytes(), sims[specs[i]].reached.tobytes())
        if behaviour not in seen:
            seen.add(behaviour)
            chosen.append(specs[i])
    return chosen


def _planned_accuracy(
    rows: np.ndarray,
    singles: list[PlanSpec],
    templates: list[Template],
    sims: dict[PlanSpec, Simulated],
    rec: Recorded,
    p: np.ndarray,
    c: np.ndarray,
    budget: float,
) -> float | None:
    """Realized accuracy on ``rows`` of the budgeted plan chosen from estimates (singles and ``templates``);
    None where the solver could not plan that cell."""
    from batchplan.optimizer import Budget, InfeasibleError, Problem, SolverError, solve

    n = int(rows.sum())
    value, cost, real = [], [], []
    for spec in singles:
        j = rec.column(spec.models[0])
        value.append(p[rows, j])
        cost.append(c[rows, j])
        real.append(sims[spec].correct[rows])
    for template in templates:
        cols = [rec.column(m) for m in template.models]
        acc, called = estimate(template, p[rows][:, cols])
        value.append(acc)
        cost.append((c[rows][:, cols] * called).sum(axis=1))
        real.append(sims[template.spec].correct[rows])
    k = len(value)
    options = pl.DataFrame(
        {
            "query": np.tile(np.arange(n), k),
            "option": np.arange(n * k),
            "value": np.concatenate(value),
            "cost": np.concatenate(cost),
            "accuracy": np.concatenate(value),
        }
    )
    cheapest = float(np.min(np.stack(cost), axis=0).sum())  # estimated costs may exceed the realized reference
    limit = max(budget, cheapest * (1 + 1e-9))
    try:
        chosen = solve(Problem(options, constraints=[Budget(limit=limit)])).chosen["option"].to_numpy()
    except (InfeasibleError, SolverError):
        return None  # this cell cannot be judged; validation never breaks training
    return float(np.concatenate(real)[chosen].sum() / n)


def _best_single(task: str, singles: list[PlanSpec], sims: dict[PlanSpec, Simulated], rows: np.ndarray) -> PlanSpec:
    """The task's best single model on the history's ``rows`` (``best_single_llms``): the scale of the
    validation budgets."""
    n = int(rows.sum())
    if n == 0:  # no usable row: no fold is validated, so no scale is needed
        return singles[0]
    scores = pl.DataFrame(
        {
            "task": [task] * (n * len(singles)),
            "model": np.repeat([s.models[0] for s in singles], n),
            "correct": np.concatenate([sims[s].correct[rows] for s in singles]),
            "cost_usd": np.concatenate([sims[s].cost[rows] for s in singles]),
        }
    )
    llm = best_single_llms(scores)["model"].item()
    return next(s for s in singles if s.models[0] == llm)


def _templates_help(
    rec: Recorded,
    singles: list[PlanSpec],
    kept: dict[PlanSpec, str],
    sims: dict[PlanSpec, Simulated],
    p: np.ndarray,
    c: np.ndarray,
    fold: np.ndarray,
    folds: int,
    fractions: tuple[float, ...],
) -> dict[float, list[float]]:
    """Held-out check that offering templates improves budgeted planning for this task: per fold, templates
    calibrated on the other folds, plans at several budgets (shares of the best single model's cost) with
    and without them, outcomes replayed. Returns the accuracy gains per budget share, one per fold."""
    usable = (
        np.isfinite(p).all(axis=1)
        & np.isfinite(c).all(axis=1)
        & np.all([sims[s].covered for s in [*singles, *kept]], axis=0)
    )
    best = _best_single(rec.task, singles, sims, usable)
    gains: dict[float, list[float]] = {fraction: [] for fraction in fractions}
    for f in range(folds):
        train_rows, test_rows = usable & (fold != f), usable & (fold == f)
        if test_rows.sum() < 20 or train_rows.sum() < 30:
            continue
        templates = [fit_template(spec, sims[spec], rec, p, train_rows, kept[spec]) for spec in kept]
        reference = float(sims[best].cost[test_rows].sum())
        for fraction in fractions:
            budget = fraction * reference
            with_templates = _planned_accuracy(test_rows, singles, templates, sims, rec, p, c, budget)
            without = _planned_accuracy(test_rows, singles, [], sims, rec, p, c, budget)
            if with_templates is not None and without is not None:
                gains[fraction].append(with_templates - without)
    return gains


def clear_gain(gains: list[float]) -> bool:
    """A win, not noise: a mean held-out gain of at least MIN_GAIN, and a gain on most folds."""
    return bool(gains) and float(np.mean(gains)) >= MIN_GAIN and float(np.mean(np.array(gains) > 0)) > 0.5


def fit_plan_templates(
    history: History,
    train: Trainer,
    *,
    folds: int = CROSS_FIT_FOLDS,
    seed: int = 0,
    max_per_task: int = 12,
    slack: float = 0.02,
    min_coverage: float = 0.95,
    validate: bool = True,
    validation_budgets: tuple[float, ...] = VALIDATION_BUDGETS,
    oof: pl.DataFrame | None = None,
) -> PlanTemplates:
    """Fit templates on ``history`` (its train rows); ``train`` builds a predictor from a history.

    With ``validate``, a task keeps its templates only if they improve held-out budgeted planning at some
    budget, and records at which budgets they do (``PlanTemplates.offered``)."""
    if oof is None:  # ``oof``: cross_fit_predictions computed already (the posterior is fitted on it too)
        oof = cross_fit_predictions(history, train, folds=folds, seed=seed)
    result = PlanTemplates()
    for task, rec in recorded_by_task(history).items():
        p = _matrix(rec, oof, "p_correct")
        c = _matrix(rec, oof, "cost_usd")
        known = rec.gold[rec.gold >= 0]
        if known.size:
            counts = np.bincount(known, minlength=len(rec.labels))
            result.label_priors[task] = {lab: float(counts[i] / counts.sum()) for i, lab in enumerate(rec.labels)}
        singles = [PlanSpec("single", (m,)) for m in rec.models]
        sims = {
            spec: sim
            for spec in singles + enumerate_specs(rec)
            if (sim := simulate(spec, rec)).covered.mean() >= min_coverage
        }
        singles = [s for s in singles if s in sims]
        result.single_errors[task] = {s.models[0]: error_by_label(sims[s], rec) for s in singles}
        fold = stable_fold(rec.query_ids, folds, seed, salt="cf:")
        kept: dict[PlanSpec, str] = {}  # template -> its calibration
        for spec in _select(list(sims), sims, fold, folds, slack):
            cols = [rec.column(m) for m in spec.models]
            rows = sims[spec].covered & np.isfinite(p[:, cols]).all(axis=1)
            if rows.sum() >= 30:
                y = sims[spec].correct[rows].astype(float)
                kept[spec] = choose_calibration(spec.kind, p[rows][:, cols], len(rec.labels), y, fold[rows])
            if len(kept) == max_per_task:
                break
        if validate and kept:
            gains = _templates_help(rec, singles, kept, sims, p, c, fold, folds, validation_budgets)
            offered = [fraction for fraction, g in gains.items() if clear_gain(g)]
            result.validation[task] = {
                "candidates": len(kept),
                "gain_by_budget": {str(f): float(np.mean(g)) if g else None for f, g in gains.items()},
                "offered_budgets": offered,
            }
            if not offered:
                continue
        if not kept:
            continue
        for spec, calibration in kept.items():
            rows = sims[spec].covered & np.isfinite(p[:, [rec.column(m) for m in spec.models]]).all(axis=1)
            template = fit_template(spec, sims[spec], rec, p, rows, calibration)
            result.templates.append(template)
            result.summary.append(
                {
                    "task": task,
                    "plan": spec.label,
                    "accuracy": template.train_accuracy,
                    "cost_usd": template.train_cost_usd,
                    "calibration": calibration,
                }
            )
    return result
