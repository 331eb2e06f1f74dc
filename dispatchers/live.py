"""What the live backends (OpenAI-compatible, Bedrock) share: prices as dicts, a hard per-call cost bound,
the live offer (every catalog model for every query), the model name mapping, and secrets from env or an
Airflow connection (never logged, never in a repr)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from batchplan.core.catalog import PriceCatalog
from batchplan.dispatchers.base import Backend, CallRequest
from batchplan.dispatchers.limits import OutputCaps

PROMPT_OVERHEAD_TOKENS = 32  # chat template tokens around the messages


@dataclass(frozen=True)
class Secret:
    """A credential that never shows itself in logs, reprs or exceptions."""

    value: str

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def secret_from(env: str | None = None, airflow_conn_id: str | None = None) -> tuple[Secret | None, str | None]:
    """(key, host): from an Airflow connection (password, host) if given, else from the environment; a
    connection without a password (the endpoint only) takes the key from the environment."""
    if airflow_conn_id:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(airflow_conn_id)
        host = conn.host or conn.extra_dejson.get("base_url")
        if conn.password:
            return Secret(conn.password), host
        return secret_from(env)[0], host
    if env and os.environ.get(env):
        return Secret(os.environ[env]), None
    return None, None


class LiveBackend(Backend):
    """Base of backends that call a provider and bill usage x the catalog price."""

    def __init__(self, catalog: PriceCatalog | None, model_map: Mapping[str, str] | None = None) -> None:
        if catalog is None:
            from batchplan.dispatchers import missing_setting

            raise missing_setting(self.name, "catalog")
        self._catalog = catalog
        self.model_map = dict(model_map or {})

    @property
    def catalog(self) -> PriceCatalog:
        return self._catalog

    def provider_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def offered_pairs(self, queue: pl.DataFrame) -> pl.DataFrame:
        models = pl.DataFrame({"model": self._catalog.models}, schema={"model": pl.String})
        return (
            queue.select(pl.col("query_id").cast(pl.String))
            .unique(maintain_order=True)
            .join(models, how="cross")
            .sort("query_id", "model")
        )

    def price(self, model: str, tokens_in: int, tokens_out: int) -> float | None:
        """Usage x list price; the billed mean where no list price is known; None if neither."""
        return self._catalog.call_cost(model, tokens_in, tokens_out)

    def cost_bound(self, request: CallRequest) -> float | None:
        """Hard bound: a token is at least one byte, so prompt bytes + template overhead bound the input;
        ``max_tokens`` bounds the output. None without list prices (then the plan's reserve is used)."""
        prices = self._catalog.token_prices.get(request.model)
        if prices is None:
            return None
        size = len(request.prompt.encode()) + len((request.system_prompt or "").encode()) + PROMPT_OVERHEAD_TOKENS
        return (size * prices[0] + request.max_tokens * prices[1]) / 1e6

    def cost_bounds(self, queue: pl.DataFrame, pairs: pl.DataFrame, caps: OutputCaps | None = None) -> pl.DataFrame:
        """``cost_bound`` for many pairs at once, in polars (the same arithmetic)."""
        caps = caps or OutputCaps()
        prices = pl.DataFrame(
            [(m, p[0], p[1]) for m, p in self._catalog.token_prices.items()],
            schema={"model": pl.String, "_in": pl.Float64, "_out": pl.Float64},
            orient="row",
        )
        size = (
            pl.col("prompt").fill_null("").str.len_bytes()
            + pl.col("system_prompt").fill_null("").str.len_bytes()
            + PROMPT_OVERHEAD_TOKENS
        )
        open_tokens = pl.col("max_tokens").fill_null(caps.default)
        tokens = pl.when(pl.col("labels").is_null()).then(open_tokens).otherwise(caps.closed)
        return (
            pairs.select("query_id", "model")
            .join(queue.select("query_id", "prompt", "system_prompt", "labels", "task"), on="query_id", how="left")
            .join(prices, on="model", how="left")
            .join(caps.frame(), on=["task", "model"], how="left")
            .select(
                "query_id",
                "model",
                ((size * pl.col("_in") + tokens * pl.col("_out")) / 1e6).alias("bound_usd"),
                (pl.col("_in") / 1e6).alias("usd_per_token_in"),
                (tokens * pl.col("_out") / 1e6).alias("output_bound_usd"),
            )
        )
