"""Per-query estimates of a plan template's accuracy and escalation from its members' P(correct).

- votes and agreement cascades: a structural estimate with members independent *given the query*
  (``structural_estimates``), then a logistic calibration of its logit on replayed outcomes, which absorbs
  the correlation conditional independence misses;
- logprob cascades: a logistic on the members' logits, for success and for reaching each later member.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from batchplan.core.numerics import P_CLIP, fit_logistic, logit, sigmoid
from batchplan.plans.simulation import PlanSpec, Recorded, Simulated, error_by_label

SLOPE_L2 = 1e-2  # the slopes' shrinkage; the intercept (column 0 of every design here) is not shrunk


def fit_design(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logistic coefficients on a design ``[1, features...]``: free intercept, slopes shrunk by ``SLOPE_L2``."""
    return fit_logistic(x, y, l2=np.r_[0.0, np.full(x.shape[1] - 1, SLOPE_L2)])


def design(p_members: np.ndarray) -> np.ndarray:
    """[1, logit p_1, ..., logit p_k] per row."""
    return np.column_stack([np.ones(len(p_members)), logit(p_members)])


def structural_estimates(kind: str, p: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(P(plan correct), P(the last member is called) or None) from members' P(correct) ``p`` [n, k],
    members independent given the query; two wrong answers coincide with chance s = 1/(L-1) (L labels)."""
    s = 1.0 / max(n_labels - 1, 1)
    if kind == "agreement":
        p1, p2, p3 = p[:, 0], p[:, 1], p[:, 2]
        agree_right = p1 * p2
        agree_wrong = (1 - p1) * (1 - p2) * s
        escalate = 1 - agree_right - agree_wrong
        return agree_right + escalate * p3, escalate
    if kind == "vote":
        k = p.shape[1]
        correct = np.zeros(len(p))
        for pattern in itertools.product((False, True), repeat=k):
            right = np.array(pattern)
            prob = np.prod(np.where(right, p, 1 - p), axis=1)
            hits = int(right.sum())
            if 2 * hits > k:
                correct += prob
            elif k == 3 and hits == 1:
                # the two wrong answers differ (1 - s): a three-way tie, won by one member in three
                correct += prob * (1 - s) / 3
        return correct, None
    raise ValueError(f"no structural estimate for {kind!r}")


def structural_feature(kind: str, p: np.ndarray, n_labels: int) -> np.ndarray:
    """logit of a plan's accuracy as its structure suggests from members' P(correct) ``p`` [n, k]: votes and
    agreement cascades as if members erred independently given the query; a logprob cascade as its most
    accurate member (it answers mostly with that member, and its early exits are confident ones)."""
    if kind in ("vote", "agreement"):
        return logit(structural_estimates(kind, p, n_labels)[0])
    return logit(p.max(axis=1))


def reach_design(kind: str, p: np.ndarray, n_labels: int) -> np.ndarray | None:
    """Design matrix for P(reaching a later member): the escalation chance for an agreement cascade, the
    members' logits for a logprob cascade; None for a vote (every member is called)."""
    if kind == "vote":
        return None
    if kind == "agreement":
        escalate = structural_estimates(kind, p, n_labels)[1]
        assert escalate is not None
        return np.column_stack([np.ones(len(p)), logit(escalate)])
    return design(p)


# How a template's P(correct) follows from its members' P(correct) (``correct_design``):
# - "offset": [1, structural_feature] with the slope held at 1 and only the intercept fitted, so per-query
#   estimates keep the spread of the members' calibrated predictions and cannot overfit a few hundred
#   replayed queries (free slopes did, on ``cascades``: 1-2 points of realized accuracy lost);
# - "logistic": a logistic regression on the members' logits (a cascade) or on the structural logit (a vote,
#   an agreement cascade), which learns how members' errors correlate where there is data enough.
# ``choose_calibration`` picks one per template by cross-validated log-loss.
CALIBRATIONS = ("offset", "logistic")


def correct_design(calibration: str, kind: str, p: np.ndarray, n_labels: int) -> np.ndarray:
    if calibration == "logistic" and kind == "cascade":
        return design(p)
    return np.column_stack([np.ones(len(p)), structural_feature(kind, p, n_labels)])


def fit_correct(calibration: str, kind: str, p: np.ndarray, n_labels: int, y: np.ndarray) -> list[float]:
    """Coefficients on ``correct_design``."""
    x = correct_design(calibration, kind, p, n_labels)
    if calibration == "offset":
        # only the intercept b of P(y) = sigmoid(structural + b) is fitted
        return [float(fit_logistic(x[:, :1], y, offset=x[:, 1])[0]), 1.0]
    return [float(w) for w in fit_design(x, y)]


def choose_calibration(kind: str, p: np.ndarray, n_labels: int, y: np.ndarray, fold: np.ndarray) -> str:
    """The calibration with the lower out-of-fold log-loss; "offset" on ties or with too little data."""
    losses = dict.fromkeys(CALIBRATIONS, 0.0)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        if train.sum() < 30 or not test.any():
            return "offset"
        for calibration in CALIBRATIONS:
            coef = fit_correct(calibration, kind, p[train], n_labels, y[train])
            q = sigmoid(correct_design(calibration, kind, p[test], n_labels) @ np.asarray(coef))
            q = np.clip(q, P_CLIP, 1 - P_CLIP)
            losses[calibration] -= float((y[test] * np.log(q) + (1 - y[test]) * np.log(1 - q)).sum())
    return min(CALIBRATIONS, key=lambda c: (losses[c], c != "offset"))


@dataclass
class Template:
    task: str
    kind: str
    models: list[str]
    thresholds: list[float]
    coef_correct: list[float]  # on correct_design(calibration, ...)
    coef_reach: list[list[float]]  # per member after the first: P(that member is called), on the reach design
    train_accuracy: float
    train_cost_usd: float
    train_queries: int
    error_by_label: dict[str, float]
    n_labels: int = 2
    calibration: str = "logistic"  # see CALIBRATIONS; templates stored before the choice existed are "logistic"

    @property
    def standard_error(self) -> float:
        """Sampling error of the template's training accuracy: templates are chosen among hundreds by that
        accuracy, so their estimates are biased up by about this much (the optimizer's curse)."""
        return float(np.sqrt(self.train_accuracy * (1 - self.train_accuracy) / max(self.train_queries, 1)))

    @property
    def spec(self) -> PlanSpec:
        return PlanSpec(self.kind, tuple(self.models), tuple(self.thresholds))


def fit_template(
    spec: PlanSpec, sim: Simulated, rec: Recorded, p: np.ndarray, rows: np.ndarray, calibration: str
) -> Template:
    """Calibrate one template's estimates on the given training rows (members' out-of-fold P(correct))."""
    cols = [rec.column(m) for m in spec.models]
    members = p[rows][:, cols]
    coef_correct = fit_correct(calibration, spec.kind, members, len(rec.labels), sim.correct[rows].astype(float))
    x_reach = reach_design(spec.kind, members, len(rec.labels))
    coef_reach: list[list[float]] = []
    if spec.kind == "agreement" and x_reach is not None:
        coef_reach = [[1.0, 0.0], fit_design(x_reach, sim.reached[rows, 2].astype(float)).tolist()]
    elif spec.kind == "cascade" and x_reach is not None:
        coef_reach = [fit_design(x_reach, sim.reached[rows, s].astype(float)).tolist() for s in range(1, len(cols))]
    return Template(
        task=rec.task,
        kind=spec.kind,
        models=list(spec.models),
        thresholds=list(spec.thresholds),
        coef_correct=coef_correct,
        coef_reach=coef_reach,
        train_accuracy=float(sim.correct[rows].mean()),
        train_cost_usd=float(sim.cost[rows].mean()),
        train_queries=int(rows.sum()),
        error_by_label=error_by_label(sim, rec),
        n_labels=len(rec.labels),
        calibration=calibration,
    )


def estimate(template: Template, p_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: (expected accuracy, P(each member is called) [n, k]) from the members' P(correct).

    Accuracy is scored one standard error (of the template's training accuracy) low: choosing the best of
    many noisy estimates picks their errors too (the optimizer's curse)."""
    x = correct_design(template.calibration, template.kind, p_members, template.n_labels)
    accuracy = sigmoid(x @ np.asarray(template.coef_correct)) - template.standard_error
    x_reach = reach_design(template.kind, p_members, template.n_labels)
    called = np.ones_like(p_members)
    if x_reach is not None:
        for step, coef in enumerate(template.coef_reach, start=1):
            called[:, step] = sigmoid(x_reach @ np.asarray(coef))
    if template.kind == "agreement":
        called[:, 1] = 1.0  # both cheap members are always asked
    return accuracy, called
