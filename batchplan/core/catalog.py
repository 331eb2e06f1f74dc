"""Model prices: list prices per million tokens where known, billed means per model where not.

Shared by the predictor (expected cost of a call) and the live dispatchers (billed cost = usage x price).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import polars as pl

from batchplan.core.contracts import MODELS_SCHEMA, conform

DEFAULT_BATCH_DISCOUNT = 0.5  # OpenAI-compatible batch APIs and Bedrock batch inference: half the on-demand price


@dataclass(frozen=True)
class PriceCatalog:
    """``prices``: model, usd_per_mtok_in, usd_per_mtok_out; ``billed``: model, mean_cost_usd (fallback)."""

    prices: pl.DataFrame
    billed: pl.DataFrame
    # model -> the batch API's price as a share of the on-demand one (OpenAI's Batch API, Bedrock batch
    # inference: 50% of on-demand); models not named here get DEFAULT_BATCH_DISCOUNT
    batch_discounts: dict[str, float] = field(default_factory=dict)

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

    @cached_property
    def token_prices(self) -> dict[str, tuple[float, float]]:
        """model -> (USD per Mtok in, USD per Mtok out), for models with both list prices."""
        rows = self.prices.select("model", "usd_per_mtok_in", "usd_per_mtok_out").iter_rows()
        return {m: (pin, pout) for m, pin, pout in rows if pin is not None and pout is not None}

    @cached_property
    def billed_means(self) -> dict[str, float]:
        return {m: float(c) for m, c in self.billed.select("model", "mean_cost_usd").iter_rows() if c is not None}

    def batch_discount(self, model: str) -> float:
        """What a call of ``model`` by batch costs per dollar of the same call on demand."""
        return self.batch_discounts.get(model, DEFAULT_BATCH_DISCOUNT)

    def call_cost(self, model: str, tokens_in: int, tokens_out: int) -> float | None:
        """Cost of one call from its usage at list price; the model's billed mean where no list price is
        known; None if neither (dict lookups: this runs once per dispatched call)."""
        prices = self.token_prices.get(model)
        if prices is not None:
            return (tokens_in * prices[0] + tokens_out * prices[1]) / 1e6
        return self.billed_means.get(model)
