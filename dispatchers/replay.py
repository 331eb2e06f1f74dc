"""The replay backend: answers exactly as the recorded model did and bills its recorded cost.

It drives evaluation (bench/quality.py, ``batchplan run --backend replay``) and the tests: no network, a
deterministic outcome per (query, model).
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import Status, audited_query_id
from batchplan.core.history import History
from batchplan.dispatchers.base import Backend, CallRequest, CallResult
from batchplan.dispatchers.limits import OutputCaps


class ReplayBackend(Backend):
    name = "replay"
    idempotent = True  # nothing is sent anywhere: resending costs what the ledger already holds
    deterministic = True
    unoffered_reason = "the replay history has no outcome for it"

    def __init__(self, history: History) -> None:
        self._catalog = PriceCatalog.from_history(history.prices, history.outcomes)
        self._pairs = history.outcomes.select("query_id", "model")
        self._costs = history.outcomes.select("query_id", "model", "cost_usd").unique(["query_id", "model"])
        rows = history.outcomes.select("query_id", "model", "answer", "cost_usd", "tokens_in", "tokens_out", "logprob")
        # one dict lookup per call: (query_id, model) -> (answer, cost, tokens_in, tokens_out, logprob)
        self._table: dict[tuple[str, str], tuple[str | None, float, int | None, int | None, float | None]] = {
            (q, m): (a, float(c) if c is not None else 0.0, ti, to, lp) for q, m, a, c, ti, to, lp in rows.iter_rows()
        }

    @property
    def catalog(self) -> PriceCatalog:
        return self._catalog

    def offered_pairs(self, queue: pl.DataFrame) -> pl.DataFrame:
        ids = queue.select(pl.col("query_id").cast(pl.String)).unique()
        return self._pairs.join(ids, on="query_id", how="semi").sort("query_id", "model")

    def cost_bound(self, request: CallRequest) -> float | None:
        row = self._table.get((audited_query_id(request.query_id), request.model))
        return None if row is None else row[1]

    def cost_bounds(self, queue: pl.DataFrame, pairs: pl.DataFrame, caps: OutputCaps | None = None) -> pl.DataFrame:
        """``cost_bound`` for many pairs at once: the recorded cost (exact), null where none is recorded.
        Replay answers as recorded, whatever ``caps`` says: it is the evaluation's oracle."""
        costs = self._costs.select("query_id", "model", pl.col("cost_usd").fill_null(0.0).alias("bound_usd"))
        return (
            pairs.select("query_id", "model")
            .join(costs, on=["query_id", "model"], how="left")
            .with_columns(
                pl.lit(None, dtype=pl.Float64).alias("usd_per_token_in"),
                pl.lit(None, dtype=pl.Float64).alias("output_bound_usd"),
            )
        )

    async def call(self, request: CallRequest) -> CallResult:
        row = self._table.get((audited_query_id(request.query_id), request.model))
        if row is None:
            why = f"no recorded outcome for ({request.query_id}, {request.model})"
            return CallResult(request.model, Status.UNAVAILABLE, reason=why)
        answer, cost, tokens_in, tokens_out, logprob = row
        billed: dict[str, Any] = {"cost_usd": cost, "tokens_in": tokens_in, "tokens_out": tokens_out}
        if answer is None and request.labels is None:
            # An open task (code, free text): the history kept the verdict, not the text.
            return CallResult(request.model, Status.OK, logprob=logprob, **billed)
        if answer is None:
            return CallResult(request.model, Status.NOT_ANSWER, reason="unparseable", **billed)
        if request.labels is not None and answer not in request.labels:
            return CallResult(request.model, Status.NOT_ANSWER, raw=answer, reason="outside_labels", **billed)
        if logprob is not None and math.isnan(logprob):
            logprob = None
        return CallResult(request.model, Status.OK, answer=answer, raw=answer, logprob=logprob, **billed)
