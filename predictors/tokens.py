"""Output-token quantiles per (query, model): LightGBM with the quantile objective (p50, p90) and an L2
model for the mean, on features with few distinct values (model and its descriptors, task, number of
labels, prompt length bucket) so that scoring runs once per distinct feature row, not once per pair.
Trained where the history records tokens_out; absent that, the cost model's per-(model, task) table is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np

TOKEN_FEATURES = ("model", "family", "log_price_in", "log_price_out", "log_size_b", "task", "n_labels", "log2_chars")
TOKEN_CATEGORICAL = (0, 1, 5)
OBJECTIVES: dict[str, dict[str, Any]] = {
    "mean": {"objective": "regression"},
    "p50": {"objective": "quantile", "alpha": 0.5},
    "p90": {"objective": "quantile", "alpha": 0.9},
}
MIN_ROWS = 200


def length_bucket(chars: np.ndarray) -> np.ndarray:
    """log2 of prompt characters rounded to a quarter: ~4 buckets per doubling."""
    return np.round(np.log2(np.maximum(chars, 1.0)) * 4) / 4


@dataclass
class TokenModel:
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return bool(self.boosters)

    @classmethod
    def fit(
        cls, x: np.ndarray, tokens_out: np.ndarray, seed: int = 0, num_threads: int = 2, rounds: int = 60
    ) -> TokenModel:
        """``x``: rows of TOKEN_FEATURES (float32, categoricals as codes); ``tokens_out`` > 0."""
        keep = np.isfinite(tokens_out) & (tokens_out >= 0)
        if keep.sum() < MIN_ROWS:
            return cls()
        base = {
            "learning_rate": 0.1,
            "num_leaves": 15,
            "min_data_in_leaf": 20,
            "max_bin": 63,
            "num_threads": num_threads,
            "verbose": -1,
            "deterministic": True,
            "force_row_wise": True,
            "seed": seed,
        }
        boosters = {}
        for name, objective in OBJECTIVES.items():
            data = lgb.Dataset(
                x[keep],
                tokens_out[keep],
                feature_name=list(TOKEN_FEATURES),
                categorical_feature=list(TOKEN_CATEGORICAL),
            )
            boosters[name] = lgb.train({**base, **objective}, data, num_boost_round=rounds)
        return cls(boosters=boosters)

    def predict(self, x: np.ndarray, num_threads: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, p50, p90) per row; p90 >= p50 >= 0, mean >= 0. Rows are scored as given: callers pass one
        row per distinct feature combination (prediction) or small training sets."""
        uniq, inverse = x, np.arange(x.shape[0])
        out = {
            n: np.maximum(np.asarray(b.predict(uniq, num_threads=num_threads), dtype=np.float64), 0.0)
            for n, b in self.boosters.items()
        }
        p50 = out["p50"]
        p90 = np.maximum(out["p90"], p50)
        return out["mean"][inverse], p50[inverse], p90[inverse]

    @classmethod
    def from_boosters(cls, boosters: dict[str, lgb.Booster]) -> TokenModel:
        return cls(boosters={k.removeprefix("tokens_"): v for k, v in boosters.items() if k.startswith("tokens_")})
