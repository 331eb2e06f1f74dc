"""Stage 2: per-model logistic regression on a few per-pair signals, shrunk toward a global fit.

logit P(correct | q, m) = beta_m . z(q, m), where z holds the model's prior on the task, the query's
difficulty score from the per-query booster, the model's retrieval accuracy, etc. Each beta_m is pulled
toward the all-model beta (L2), so models with little history borrow from the rest; a model with none
uses its descriptor neighbours' betas. Scoring a pair is one dot product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _newton(
    z: np.ndarray, y: np.ndarray, center: np.ndarray, lam: float, offset: float = 0.0, iters: int = 30
) -> np.ndarray:
    """argmin_b  sum logloss(y, sigmoid(z b)) + lam/2 |b - center|^2."""
    beta = center.copy()
    eye = np.eye(z.shape[1])
    for _ in range(iters):
        eta = z @ beta + offset
        q = 1.0 / (1.0 + np.exp(-eta))
        w = q * (1 - q)
        grad = z.T @ (q - y) + lam * (beta - center)
        hess = (z * w[:, None]).T @ z + lam * eye
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-7:
            break
    return beta


@dataclass
class PairModel:
    names: list[str]
    global_beta: np.ndarray  # (J,)
    betas: np.ndarray  # (M, J), rows in the order of ``models``
    models: list[str]
    lam: float

    @classmethod
    def fit(
        cls, z: np.ndarray, y: np.ndarray, mi: np.ndarray, models: list[str], names: list[str], lam: float = 30.0
    ) -> PairModel:
        z = z.astype(np.float64)
        y = y.astype(np.float64)
        start = np.zeros(z.shape[1])
        global_beta = _newton(z, y, start, lam=1e-3)
        betas = np.tile(global_beta, (len(models), 1))
        for m in range(len(models)):
            rows = mi == m
            if rows.any():
                betas[m] = _newton(z[rows], y[rows], global_beta, lam=lam)
        return cls(names=names, global_beta=global_beta, betas=betas, models=models, lam=lam)

    def beta_for(self, models: list[str], neighbors: dict[str, list[tuple[str, float]]]) -> np.ndarray:
        """Coefficient rows for ``models``: own fit if known, else neighbour-weighted, else global."""
        index = {m: i for i, m in enumerate(self.models)}
        rows = []
        for model in models:
            if model in index:
                rows.append(self.betas[index[model]])
                continue
            nbs = [(index[o], w) for o, w in neighbors.get(model, []) if o in index]
            if nbs:
                total = sum(w for _, w in nbs)
                rows.append(sum(w * self.betas[i] for i, w in nbs) / total)
            else:
                rows.append(self.global_beta)
        return np.asarray(rows, dtype=np.float64).reshape(len(models), len(self.names))

    def to_state(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "global_beta": self.global_beta.tolist(),
            "betas": self.betas.tolist(),
            "models": self.models,
            "lam": self.lam,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PairModel:
        return cls(
            names=list(state["names"]),
            global_beta=np.asarray(state["global_beta"], dtype=np.float64),
            betas=np.asarray(state["betas"], dtype=np.float64).reshape(len(state["models"]), len(state["names"])),
            models=list(state["models"]),
            lam=float(state["lam"]),
        )
