"""Calibration maps from raw scores to probabilities: Platt (logistic on the logit) and isotonic (PAV),
fitted on held-out (out-of-fold) predictions and chosen by cross-validated log loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchplan.core.numerics import P_CLIP, fit_logistic, logit, sigmoid
from batchplan.predictors.metrics import log_loss


@dataclass
class Calibrator:
    kind: str  # "identity" | "platt" | "isotonic"
    params: dict[str, Any]

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self.kind == "platt":
            out = sigmoid(self.params["a"] * logit(p) + self.params["b"])
        elif self.kind == "isotonic":
            out = np.interp(p, np.asarray(self.params["x"]), np.asarray(self.params["y"]))
        else:
            out = p
        return np.clip(out, P_CLIP, 1 - P_CLIP)

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Calibrator:
        return cls(kind=state["kind"], params=state["params"])


def fit_platt(p: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> Calibrator:
    """Logistic regression of y on logit(p), the slope a shrunk toward 1 and the intercept b toward 0."""
    z = logit(np.asarray(p, dtype=np.float64))
    a, b = fit_logistic(np.column_stack([z, np.ones_like(z)]), y, l2=l2, center=np.array([1.0, 0.0]))
    return Calibrator("platt", {"a": float(a), "b": float(b)})


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> Calibrator:
    """Pool-adjacent-violators on (p, y); the map interpolates linearly between block means."""
    order = np.argsort(p, kind="mergesort")
    xs = np.asarray(p, dtype=np.float64)[order]
    ys = np.asarray(y, dtype=np.float64)[order]
    # blocks: value sum, weight, x sum
    vals: list[float] = []
    wts: list[float] = []
    xsum: list[float] = []
    for xi, yi in zip(xs, ys, strict=True):
        vals.append(yi)
        wts.append(1.0)
        xsum.append(xi)
        while len(vals) > 1 and vals[-2] / wts[-2] >= vals[-1] / wts[-1]:
            v, w, s = vals.pop(), wts.pop(), xsum.pop()
            vals[-1] += v
            wts[-1] += w
            xsum[-1] += s
    bx = np.array(xsum) / np.array(wts)
    by = np.array(vals) / np.array(wts)
    return Calibrator("isotonic", {"x": bx.tolist(), "y": np.clip(by, P_CLIP, 1 - P_CLIP).tolist()})


def choose_calibrator(
    p: np.ndarray, y: np.ndarray, seed: int = 0, folds: int = 5
) -> tuple[Calibrator, dict[str, float]]:
    """Pick identity / Platt / isotonic by k-fold log loss on (p, y), then refit the winner on all of it."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(p) < 50 or y.min() == y.max():
        return Calibrator("identity", {}), {}
    fold = np.random.default_rng(seed).integers(0, folds, len(p))
    scores: dict[str, float] = {"identity": log_loss(y, np.clip(p, P_CLIP, 1 - P_CLIP))}
    for name, fit in (("platt", fit_platt), ("isotonic", fit_isotonic)):
        pred = np.empty_like(p)
        for k in range(folds):
            test = fold == k
            pred[test] = fit(p[~test], y[~test])(p[test])
        scores[name] = log_loss(y, pred)
    best = min(scores, key=lambda k: scores[k])
    if best == "platt":
        return fit_platt(p, y), scores
    if best == "isotonic":
        return fit_isotonic(p, y), scores
    return Calibrator("identity", {}), scores
