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
5. Fit, per kept template, a logistic combiner from the members' out-of-fold logit P(correct) to the
   template's success, and per escalation step to P(reaching that member): calibrated on the replayed
   outcomes, so the correlation between members' errors is in the numbers, not assumed away.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from batchplan.history import History
from batchplan.plan_simulation import PlanSpec, Recorded, error_by_label, recorded_by_task, simulate

CASCADE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
P_CLIP = 1e-4


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, P_CLIP, 1 - P_CLIP)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Newton's method on the L2-penalised log-loss; ``x`` carries its own intercept column."""
    w = np.zeros(x.shape[1])
    eye = np.eye(x.shape[1])
    eye[0, 0] = 0.0  # the intercept is not shrunk
    for _ in range(iters):
        p = sigmoid(x @ w)
        grad = x.T @ (p - y) + l2 * eye @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * eye + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def design(p_members: np.ndarray) -> np.ndarray:
    """[1, logit p_1, ..., logit p_k] per row."""
    return np.column_stack([np.ones(len(p_members)), logit(p_members)])


@dataclass
class Template:
    task: str
    kind: str
    models: list[str]
    thresholds: list[float]
    coef_correct: list[float]
    coef_reach: list[list[float]]  # per member after the first (cascade, agreement): P(that member is called)
    train_accuracy: float
    train_cost_usd: float
    train_queries: int
    error_by_label: dict[str, float]

    @property
    def standard_error(self) -> float:
        """Sampling error of the template's training accuracy: templates are chosen among hundreds by that
        accuracy, so their estimates are biased up by about this much (the optimizer's curse)."""
        return float(np.sqrt(self.train_accuracy * (1 - self.train_accuracy) / max(self.train_queries, 1)))

    @property
    def spec(self) -> PlanSpec:
        return PlanSpec(self.kind, tuple(self.models), tuple(self.thresholds))


@dataclass
class PlanTemplates:
    """Fitted templates per task, single models' per-label errors and label priors (for statewise bounds)."""

    templates: list[Template] = field(default_factory=list)
    single_errors: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # task -> model -> label -> err
    label_priors: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> label -> P(true = label)
    summary: list[dict[str, Any]] = field(default_factory=list)

    def for_task(self, task: str) -> list[Template]:
        return [t for t in self.templates if t.task == task]

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
        )


Trainer = Callable[[History], Any]  # returns an object with .predict(queries, pairs, catalog)


def cross_fit_predictions(history: History, train: Trainer, folds: int = 2, seed: int = 0) -> pl.DataFrame:
    """Out-of-fold P(correct) for every recorded (query, model): each fold scored by a predictor that never saw it."""
    ids = history.queries["query_id"].to_list()
    fold_of = {q: zlib.crc32(f"{seed}:cf:{q}".encode()) % folds for q in ids}
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
        frames.append(predictions.select("query_id", "model", "p_correct"))
    return pl.concat(frames)


def _p_matrix(rec: Recorded, oof: pl.DataFrame) -> np.ndarray:
    """Out-of-fold P(correct) as [n, M] aligned with ``rec`` (nan where missing)."""
    qi = {q: i for i, q in enumerate(rec.query_ids)}
    mi = {m: j for j, m in enumerate(rec.models)}
    sub = oof.filter(
        pl.col("query_id").is_in(pl.Series(rec.query_ids).implode())
        & pl.col("model").is_in(pl.Series(rec.models).implode())
    )
    out = np.full((len(rec.query_ids), len(rec.models)), np.nan)
    out[[qi[q] for q in sub["query_id"].to_list()], [mi[m] for m in sub["model"].to_list()]] = sub[
        "p_correct"
    ].to_numpy()
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


def fit_plan_templates(
    history: History,
    train: Trainer,
    *,
    folds: int = 2,
    seed: int = 0,
    max_per_task: int = 8,
    slack: float = 0.005,
    min_coverage: float = 0.95,
) -> PlanTemplates:
    """Fit templates on ``history`` (its train rows); ``train`` builds a predictor from a history."""
    oof = cross_fit_predictions(history, train, folds=folds, seed=seed)
    result = PlanTemplates()
    for task, rec in recorded_by_task(history).items():
        p = _p_matrix(rec, oof)
        known = rec.gold[rec.gold >= 0]
        if known.size:
            counts = np.bincount(known, minlength=len(rec.labels))
            result.label_priors[task] = {lab: float(counts[i] / counts.sum()) for i, lab in enumerate(rec.labels)}
        singles = [PlanSpec("single", (m,)) for m in rec.models]
        sims = {}
        for spec in singles + enumerate_specs(rec):
            sim = simulate(spec, rec)
            if sim.covered.mean() >= min_coverage:
                sims[spec] = sim
        result.single_errors[task] = {s.models[0]: error_by_label(sims[s], rec) for s in singles if s in sims}
        specs = list(sims)
        # Stability selection: a template must sit near the hull on every fold on its own, so one that only
        # looked good by chance on these rows (and would be over-estimated) is not offered.
        fold = np.array([zlib.crc32(f"{seed}:cf:{q}".encode()) % folds for q in rec.query_ids])
        gaps = np.zeros(len(specs))
        for f in range(folds):
            rows_f = fold == f
            costs_f = np.array([sims[s].cost[sims[s].covered & rows_f].mean() for s in specs])
            accs_f = np.array([sims[s].correct[sims[s].covered & rows_f].mean() for s in specs])
            hull_c, hull_a = upper_hull(costs_f, accs_f)
            gaps = np.maximum(gaps, hull_gap(costs_f, accs_f, hull_c, hull_a))
        costs = np.array([sims[s].cost[sims[s].covered].mean() for s in specs])
        accs = np.array([sims[s].correct[sims[s].covered].mean() for s in specs])
        ranked = sorted((g, i) for i, g in enumerate(gaps) if specs[i].kind != "single" and g <= slack)
        for gap, i in ranked[:max_per_task]:
            spec, sim = specs[i], sims[specs[i]]
            cols = [rec.column(m) for m in spec.models]
            rows = sim.covered & np.isfinite(p[:, cols]).all(axis=1)
            if rows.sum() < 30:
                continue
            x = design(p[rows][:, cols])
            coef_correct = fit_logistic(x, sim.correct[rows].astype(float))
            coef_reach = (
                [fit_logistic(x, sim.reached[rows, s].astype(float)).tolist() for s in range(1, len(cols))]
                if spec.kind in ("cascade", "agreement")
                else []
            )
            result.templates.append(
                Template(
                    task=task,
                    kind=spec.kind,
                    models=list(spec.models),
                    thresholds=list(spec.thresholds),
                    coef_correct=coef_correct.tolist(),
                    coef_reach=coef_reach,
                    train_accuracy=float(accs[i]),
                    train_cost_usd=float(costs[i]),
                    train_queries=int(rows.sum()),
                    error_by_label=error_by_label(sim, rec),
                )
            )
            result.summary.append(
                {
                    "task": task,
                    "plan": spec.label,
                    "accuracy": float(accs[i]),
                    "cost_usd": float(costs[i]),
                    "hull_gap": float(gap),
                }
            )
    return result
