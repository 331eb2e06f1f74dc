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

from batchplan.core.numerics import fit_logistic


@dataclass
class PairModel:
    names: list[str]
    global_beta: np.ndarray  # (J,)
    betas: np.ndarray  # (M, J), rows in the order of ``models``
    models: list[str]
    lam: float
    text_penalty: float | None = None

    @classmethod
    def fit(
        cls,
        z: np.ndarray,
        y: np.ndarray,
        mi: np.ndarray,
        models: list[str],
        names: list[str],
        lam: float = 30.0,
        lam_global: float = 5.0,
        text_penalty: float | None = None,
        weights: np.ndarray | None = None,
    ) -> PairModel:
        """Global beta shrunk toward "prior + difficulty" (coefficient 1 on prior_logit and difficulty,
        0 elsewhere), then each model's beta shrunk toward the global one: with little data the prior
        stays in charge. The intercept is almost unpenalized (1e-2) so that each model keeps its own base
        rate: shrinking it would bias a model whose accuracy is far from the others' (a calibration error
        no global calibrator can undo). ``weights`` weigh the rows (a run's silver outcomes below gold)."""
        z = z.astype(np.float64)
        y = y.astype(np.float64)
        start = np.zeros(z.shape[1])
        for name in ("prior_logit", "difficulty"):
            if name in names:
                start[names.index(name)] = 1.0
        free = np.array([n == "intercept" for n in names])
        text = np.array([n.startswith("text_") for n in names])
        lam_g = np.where(free, 1e-2, lam_global)
        per_model = np.where(free, 1e-2, lam)
        if text_penalty is not None:  # e.g. 1e6: text columns off (their betas stay at 0)
            lam_g = np.where(text, text_penalty, lam_g)
            per_model = np.where(text, text_penalty, per_model)
        r = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        global_beta = fit_logistic(z, y, l2=lam_g, center=start, weights=r)
        betas = np.tile(global_beta, (len(models), 1))
        for m in range(len(models)):
            rows = mi == m
            if rows.any():
                betas[m] = fit_logistic(z[rows], y[rows], l2=per_model, center=global_beta, weights=r[rows])
        return cls(names=names, global_beta=global_beta, betas=betas, models=models, lam=lam, text_penalty=text_penalty)

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
            "text_penalty": self.text_penalty,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PairModel:
        return cls(
            names=list(state["names"]),
            global_beta=np.asarray(state["global_beta"], dtype=np.float64),
            betas=np.asarray(state["betas"], dtype=np.float64).reshape(len(state["models"]), len(state["names"])),
            models=list(state["models"]),
            lam=float(state["lam"]),
            text_penalty=state.get("text_penalty"),
        )
