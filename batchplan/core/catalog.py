"""Model prices: list prices per million tokens where known, billed means per model where not.

Shared by the predictor (expected cost of a call) and the live dispatchers (billed cost = usage x price).

A provider's batch API (OpenAI Batch, Bedrock batch inference) bills a call at a fraction of the on-demand
price (``batch_discount``: 0.5 on both) and answers it later (``BatchTerms``: typical and worst-case
turnaround, per-job record limits). A backend without a batch API has no discount (None).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Final

import polars as pl

from batchplan.core.contracts import MODELS_SCHEMA, conform
from batchplan.core.errors import ContractError
from batchplan.core.settings import get_settings


@dataclass(frozen=True)
class BatchTerms:
    """A backend's batch API as the planner and the batch senders see it (providers' docs, Dec 2026)."""

    discount: float = 0.5  # fraction of the on-demand price a batch call is billed
    typical_hours: float = 1.0  # median turnaround ("most finish within an hour")
    worst_hours: float = 24.0  # the completion window: what is not done by then expires (unbilled)
    min_records: int = 1  # per job (one LLM): a smaller job is refused by the provider, so goes real time
    max_records: int = 50_000  # per job: more are split into several jobs


# Backends with a batch API; the others (replay, any OpenAI-compatible server without /v1/batches) have none.
# Bedrock refuses a job under its per-model minimum record count (the service quota's default is 100).
BATCH_TERMS: Final = {"openai": BatchTerms(), "bedrock": BatchTerms(min_records=100)}


def batch_terms(backend: str) -> BatchTerms | None:
    """``BATCH_TERMS`` of ``backend`` (None: no batch API), Bedrock's per-job minimum the account's quota as the
    settings give it (``bedrock_batch_min_records``), for the planner and the sender alike."""
    terms = BATCH_TERMS.get(backend)
    if backend == "bedrock" and terms is not None:
        return replace(terms, min_records=get_settings().bedrock_batch_min_records)
    return terms


BATCH_DISCOUNT_COLUMN: Final = "batch_discount"  # optional per-LLM column of a price list (models.csv)


@dataclass(frozen=True)
class PriceCatalog:
    """``prices``: model, usd_per_mtok_in, usd_per_mtok_out; ``billed``: model, mean_cost_usd (fallback).
    ``default_batch_discount``: the backend's batch price as a fraction of on-demand (None: no batch API);
    ``batch_discounts``: per-LLM overrides (a price list's ``batch_discount`` column; None: that LLM has none)."""

    prices: pl.DataFrame
    billed: pl.DataFrame
    default_batch_discount: float | None = None
    batch_discounts: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_history(cls, prices: pl.DataFrame, outcomes: pl.DataFrame) -> PriceCatalog:
        billed = outcomes.group_by("model").agg(pl.col("cost_usd").mean().alias("mean_cost_usd")).sort("model")
        return cls(
            prices=conform(prices, MODELS_SCHEMA, name="prices", required=("model",)),
            billed=billed,
            batch_discounts=_discounts(prices),
        )

    @classmethod
    def from_prices(cls, prices: pl.DataFrame) -> PriceCatalog:
        return cls(
            prices=conform(
                prices, MODELS_SCHEMA, name="prices", required=("model", "usd_per_mtok_in", "usd_per_mtok_out")
            ),
            billed=pl.DataFrame(schema={"model": pl.String, "mean_cost_usd": pl.Float64}),
            batch_discounts=_discounts(prices),
        )

    def for_backend(self, backend: str) -> PriceCatalog:
        """This catalog with ``backend``'s batch discount as the default (None where it has no batch API)."""
        terms = BATCH_TERMS.get(backend)
        return replace(self, default_batch_discount=terms.discount if terms else None)

    def batch_discount(self, model: str) -> float | None:
        """Fraction of the on-demand price a batch call to ``model`` is billed; None: no batch API for it."""
        return self.batch_discounts.get(model, self.default_batch_discount)

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

    def call_cost(self, model: str, tokens_in: int, tokens_out: int) -> float | None:
        """Cost of one call from its usage at list price; the model's billed mean where no list price is
        known; None if neither (dict lookups: this runs once per dispatched call)."""
        prices = self.token_prices.get(model)
        if prices is not None:
            return (tokens_in * prices[0] + tokens_out * prices[1]) / 1e6
        return self.billed_means.get(model)


def _discounts(prices: pl.DataFrame) -> dict[str, float | None]:
    """Per-LLM batch discounts of a price list with a ``batch_discount`` column (a null: no batch API)."""
    if BATCH_DISCOUNT_COLUMN not in prices.columns:
        return {}
    rows = prices.select("model", pl.col(BATCH_DISCOUNT_COLUMN).cast(pl.Float64)).iter_rows()
    out = {str(m): (None if d is None else float(d)) for m, d in rows}
    for model, discount in out.items():
        if discount is not None and not 0 < discount <= 1:
            raise ContractError(
                f"prices: {BATCH_DISCOUNT_COLUMN} of {model} is {discount:g}: the fraction of the on-demand price a "
                "batch call pays must be in (0, 1] (empty: no batch API)"
            )
    return out
