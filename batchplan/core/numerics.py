"""Logistic numerics shared by the predictor, its calibrators and the plan estimates: one clip, one solver.

Ground floor: imports numpy only, so predictors/ and the plan modules can both use it.
"""

from __future__ import annotations

import numpy as np

# Probabilities are kept in [P_CLIP, 1 - P_CLIP] before a logit or a log: a predictor's 0 or 1 is never
# certain, and logit(1e-4) = -9.2 keeps every design matrix well scaled.
P_CLIP = 1e-4
# sigmoid's argument is clipped to +-Z_CLIP so exp never overflows; sigmoid(+-50) is 0 or 1 to 2e-22.
Z_CLIP = 50.0


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, P_CLIP, 1 - P_CLIP)
    return np.log(p / (1 - p))


def logit32(p: np.ndarray) -> np.ndarray:
    """``logit`` in float32 (per-pair and per-query matrices: half the memory traffic)."""
    q = np.clip(np.asarray(p, dtype=np.float32), np.float32(P_CLIP), np.float32(1 - P_CLIP))
    return np.log(q / (np.float32(1) - q))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-clip(z, -Z_CLIP, Z_CLIP))), done in place on a copy (large per-pair arrays)."""
    if np.ndim(z) == 0:
        return 1.0 / (1.0 + np.exp(-np.clip(z, -Z_CLIP, Z_CLIP)))
    out = np.clip(z, -Z_CLIP, Z_CLIP)
    np.negative(out, out=out)
    np.exp(out, out=out)
    out += 1.0
    return np.divide(1.0, out, out=out)


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    *,
    l2: float | np.ndarray = 0.0,
    center: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    iters: int = 50,
    tol: float = 1e-10,
) -> np.ndarray:
    """argmin_w  sum_i r_i logloss(y_i, sigmoid(x_i w + offset_i)) + 1/2 sum_j l2_j (w_j - center_j)^2.

    Newton's method from ``center`` (default 0) with a backtracking line search, so it never moves uphill
    (a full Newton step can overshoot where the data nearly separate); stops when no coordinate moves by
    ``tol``. ``l2`` is one penalty for every coefficient or one per coefficient (0 leaves it free, e.g. an
    intercept); ``offset`` is a fixed term per row (slope held at 1); ``weights`` (r, default 1) weigh the rows.
    ``x`` carries its own intercept column."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k = x.shape[1]
    lam = np.broadcast_to(np.asarray(l2, dtype=np.float64), (k,))
    mid = np.zeros(k) if center is None else np.asarray(center, dtype=np.float64)
    base = np.zeros(len(x)) if offset is None else np.asarray(offset, dtype=np.float64)
    r = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)

    def objective(w: np.ndarray) -> float:
        eta = x @ w + base
        return float(np.sum(r * (np.logaddexp(0.0, eta) - y * eta)) + 0.5 * np.sum(lam * (w - mid) ** 2))

    w = mid.copy()
    current = objective(w)
    # A 1e-9 ridge keeps the Newton system solvable when a free coefficient's data are all 0 or 1.
    ridge = np.diag(lam + 1e-9)
    for _ in range(iters):
        q = sigmoid(x @ w + base)
        grad = x.T @ (r * (q - y)) + lam * (w - mid)
        hess = (x * (r * q * (1 - q))[:, None]).T @ x + ridge
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            candidate = w - t * step
            value = objective(candidate)
            if value <= current + 1e-12 or t < 1e-6:
                break
            t *= 0.5
        if value > current:
            break
        w, current = candidate, value
        if np.abs(t * step).max() < tol:
            break
    return w
