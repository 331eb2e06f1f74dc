"""Scores of probabilistic predictions: AUC, Brier, expected calibration error, log loss, MAPE."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _arrays(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()


def auc(y: ArrayLike, p: ArrayLike) -> float:
    """Area under the ROC curve (rank statistic, ties shared); NaN when only one class is present."""
    yv, pv = _arrays(y, p)
    n_pos = float(yv.sum())
    n_neg = float(len(yv) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(pv, kind="mergesort")
    ranks = np.empty(len(pv), dtype=np.float64)
    sorted_p = pv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[yv == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(y: ArrayLike, p: ArrayLike) -> float:
    yv, pv = _arrays(y, p)
    return float(np.mean((pv - yv) ** 2)) if len(yv) else float("nan")


def log_loss(y: ArrayLike, p: ArrayLike, eps: float = 1e-6) -> float:
    yv, pv = _arrays(y, p)
    pv = np.clip(pv, eps, 1 - eps)
    return float(-np.mean(yv * np.log(pv) + (1 - yv) * np.log(1 - pv))) if len(yv) else float("nan")


def ece(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: 10 equal-width bins of p, |mean p - mean y| weighted by bin share."""
    yv, pv = _arrays(y, p)
    if not len(yv):
        return float("nan")
    bins = np.minimum((pv * n_bins).astype(np.int64), n_bins - 1)
    sum_p = np.bincount(bins, weights=pv, minlength=n_bins)
    sum_y = np.bincount(bins, weights=yv, minlength=n_bins)
    return float(np.abs(sum_p - sum_y).sum() / len(yv))


def mape(actual: ArrayLike, predicted: ArrayLike) -> float:
    """Mean absolute percentage error over rows with a positive actual value."""
    a, f = _arrays(actual, predicted)
    keep = a > 0
    return float(np.mean(np.abs(f[keep] - a[keep]) / a[keep])) if keep.any() else float("nan")
