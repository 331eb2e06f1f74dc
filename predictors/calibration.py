"""Calibration maps from raw scores to probabilities: Platt (logistic on the logit) and isotonic (PAV),
fitted on held-out (out-of-fold) predictions and chosen by cross-validated log loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from predictors.metrics import log_loss

EPS = 1e-4


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def logit32(p: np.ndarray) -> np.ndarray:
    """``logit`` in float32 (per-pair and per-query matrices: half the memory traffic)."""
    q = np.clip(np.asarray(p, dtype=np.float32), np.float32(EPS), np.float32(1 - EPS))
    return np.log(q / (np.float32(1) - q))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-clip(z, -50, 50))), the same operations done in place."""
    if np.ndim(z) == 0:
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))
    out = np.clip(z, -50.0, 50.0)
    np.negative(out, out=out)
    np.exp(out, out=out)
    out += 1.0
    return np.divide(1.0, out, out=out)


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
        return np.clip(out, EPS, 1 - EPS)

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Calibrator:
        return cls(kind=state["kind"], params=state["params"])


def fit_platt(p: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> Calibrator:
    """Logistic regression of y on logit(p) by Newton's method (2 parameters)."""
    z = logit(np.asarray(p, dtype=np.float64))
    yv = np.asarray(y, dtype=np.float64)
    a, b = 1.0, 0.0
    for _ in range(iters):
        q = sigmoid(a * z + b)
        w = q * (1 - q)
        g = np.array([np.dot(q - yv, z) + l2 * (a - 1), np.sum(q - yv) + l2 * b])
        h = np.array([[np.dot(w, z * z) + l2, np.dot(w, z)], [np.dot(w, z), np.sum(w) + l2]])
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-9:
            break
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
    return Calibrator("isotonic", {"x": bx.tolist(), "y": np.clip(by, EPS, 1 - EPS).tolist()})


def choose_calibrator(
    p: np.ndarray, y: np.ndarray, seed: int = 0, folds: int = 5
) -> tuple[Calibrator, dict[str, float]]:
    """Pick identity / Platt / isotonic by k-fold log loss on (p, y), then refit the winner on all of it."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(p) < 50 or y.min() == y.max():
        return Calibrator("identity", {}), {}
    fold = np.random.default_rng(seed).integers(0, folds, len(p))
    scores: dict[str, float] = {"identity": log_loss(y, np.clip(p, EPS, 1 - EPS))}
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
