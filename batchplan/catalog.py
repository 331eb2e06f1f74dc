"""Model prices: list prices per million tokens where known, billed means per model where not.

Shared by the predictor (expected cost of a call) and the live dispatchers (billed cost = usage x price).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from batchplan.contracts import MODELS_SCHEMA, ContractError, conform


@dataclass(frozen=True)
class PriceCatalog:
    """``prices``: model, usd_per_mtok_in, usd_per_mtok_out; ``billed``: model, mean_cost_usd (fallback)."""

    prices: pl.DataFrame
    billed: pl.DataFrame

    @classmethod
    def from_history(cls, prices: pl.DataFrame, outcomes: pl.DataFrame) -> PriceCatalog:
        billed = outcomes.group_by("model").agg(pl.col("cost_usd").mean().alias("mean_cost_usd")).sort("model")
        return cls(prices=conform(prices, MODELS_SCHEMA, name="prices", required=("model",)), billed=billed)

    @classmethod
    def from_prices(cls, prices: pl.DataFrame) -> PriceCatalog:
        return cls(
            prices=conform(
                prices, MODELS_SCHEMA, name="prices", required=("model", "usd_per_mtok_in", "usd_per_mtok_out")
            ),
            billed=pl.DataFrame(schema={"model": pl.String, "mean_cost_usd": pl.Float64}),
        )

    @property
    def models(self) -> list[str]:
        return sorted(set(self.prices["model"].to_list()) | set(self.billed["model"].to_list()))

    def has_token_prices(self, model: str) -> bool:
        row = self.prices.filter(pl.col("model") == model)
        return (
            row.height > 0
            and row["usd_per_mtok_in"].is_not_null().all()
            and row["usd_per_mtok_out"].is_not_null().all()
        )

    def call_cost(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """Billed cost of one call from its usage; falls back to the model's billed mean."""
        row = self.prices.filter(pl.col("model") == model)
        if row.height and row["usd_per_mtok_in"][0] is not None and row["usd_per_mtok_out"][0] is not None:
            return (tokens_in * row["usd_per_mtok_in"][0] + tokens_out * row["usd_per_mtok_out"][0]) / 1e6
        billed = self.billed.filter(pl.col("model") == model)
        if billed.height:
            return float(billed["mean_cost_usd"][0])
        raise ContractError(f"model {model!r} has neither list prices nor billed history: add it to models.csv")

    def to_frame(self) -> pl.DataFrame:
        """One row per model: list prices (may be null) and billed mean (may be null)."""
        return self.prices.join(self.billed, on="model", how="full", coalesce=True).sort("model")
