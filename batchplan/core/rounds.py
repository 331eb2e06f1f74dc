"""Execution in rounds: the contract between the round planner and the round runner.

A run in rounds goes: plan round 1 -> dispatch it -> observe -> plan round 2 from what was observed -> ...
The **round planner** (``RoundPlanner``) decides, for every open query, what to call this round (nothing =
stop with the current answer) and, at the end, which answer each query keeps; it knows predictions,
observations and the posterior model, never the dispatcher. The **round runner** dispatches a round's calls
under the hard budget, records every call as an observation, and resumes a killed run without paying twice
or repeating a round; it knows the dispatcher, never the posterior.

Both sides speak only the two frames below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import polars as pl

from batchplan.core.contracts import _columns
from batchplan.core.errors import ContractError
from batchplan.core.storage import Storage

# Observation statuses that say nothing about the query (the dispatcher's rate_limited, server_error, timeout,
# connection and lost): another call, next round, may well answer. Round planners and the runner share it.
TRANSIENT: Final = frozenset({"rate_limited", "server_error", "timeout", "connection", "lost"})
# An open answer cut at its max_tokens (the dispatcher's truncated): billed, no answer, and the same LLM would
# cut it again, so a round planner asks another LLM; that it ran long is itself a sign it is a hard query.
CUT: Final = "truncated"

# How a round's calls go out: at once through the endpoint ("realtime"), or as a provider's batch job at its
# batch price, answered later ("batch"). A frame without a mode column, or a null mode: the sender's default
# (real time; the batch sender's own default is batch).
REALTIME: Final = "realtime"
BATCH: Final = "batch"
MODES: Final = (REALTIME, BATCH)

# One row per call a round made (failed calls included: a failure is an observation too).
OBSERVATION_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "round": pl.Int64,  # 1-based
            "model": pl.String,  # the LLM called
            "status": pl.String,  # "ok", or the dispatcher's failure status (rate_limited, server_error, ...)
            "answer": pl.String,  # null unless ok
            "logprob": pl.Float64,  # the LLM's log-probability of its own answer, where the endpoint gives it
            # what the budget guard charged: the bill, or the reservation when unknown (the runner counts an
            # ambiguous failure at its input tokens once a later call told them: round_runner.tighten)
            "cost_usd": pl.Float64,
            "billed_known": pl.Boolean,  # False: an ambiguous failure charged its reservation
            "tokens_in": pl.Int64,
            "tokens_out": pl.Int64,
        }
    )
)
# An optional column of observation frames (kept where present; missing or null = realtime): how the call went
# out, so that its cost is read against that mode's price (the planner's cost drift). Optional, not in the
# schema, so that every frame written before modes existed still conforms.
OBSERVATION_MODE: Final = "mode"

# One row per query the round calls; a query without a row (or with an empty list) stops this round.
ROUND_PLAN_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "models": pl.List(pl.String),  # the LLMs to call this round, all at once
            "expected_cost_usd": pl.Float64,
            "reserve_cost_usd": pl.Float64,  # high side of the round's calls: what the budget guard will hold
            "expected_accuracy": pl.Float64,  # P(the query's answer after this round is right), as planned
            # how the round's calls of this query are sent: "realtime" (the dispatcher) or "batch" (a
            # provider's batch API, at its batch price); optional, null = the sender's default (realtime)
            "mode": pl.String,
        }
    )
)


def with_modes(calls: pl.DataFrame, default: str = REALTIME) -> pl.DataFrame:
    """``calls`` (ROUND_PLAN_SCHEMA) with every row's ``mode`` set: a missing column or a null is
    ``default``; a value outside MODES is refused naming the row."""
    if default not in MODES:
        raise ContractError(f"mode must be one of {MODES}, not {default!r}", fields=("mode",))
    mode = pl.col("mode").fill_null(default) if "mode" in calls.columns else pl.lit(default, dtype=pl.String)
    calls = calls.with_columns(mode.alias("mode"))
    bad = calls.filter(~pl.col("mode").is_in(MODES))
    if bad.height:
        row = bad.row(0, named=True)
        raise ContractError(
            f"round plan row query_id={row['query_id']!r}: mode {row['mode']!r} is not one of {MODES}", fields=("mode",)
        )
    return calls

# One row per query of the batch, after the last round.
ROUND_ANSWER_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "answer": pl.String,  # null: no call answered
            "estimated_p_correct": pl.Float64,  # the posterior of that answer, computed without gold
            # the LLM whose answer is kept (null: none answered); needed where an answer has no text to
            # show (open tasks replayed from a history that kept the verdict only). Added by the runner.
            "model": pl.String,
        }
    )
)


@dataclass(frozen=True)
class RoundState:
    """What the planner sees before round ``round`` (1-based) of ``rounds``."""

    round: int
    rounds: int
    queue: pl.DataFrame  # the whole batch (QUEUE_SCHEMA)
    predictions: pl.DataFrame  # PREDICTION_SCHEMA, the prior per (query, model)
    observations: pl.DataFrame  # OBSERVATION_SCHEMA, every call of rounds 1..round-1
    budget_left_usd: float | None  # total budget minus what the guard has charged so far (None: no budget)
    tenant_budgets_left_usd: dict[str, float] = field(default_factory=dict)
    # query_id, model, bound_usd: what the budget guard will hold for one attempt of that call (the
    # backend's hard cost bound; an ambiguous failure is charged exactly this). None: not known.
    call_bounds: pl.DataFrame | None = None

    @property
    def last(self) -> bool:
        return self.round >= self.rounds


@dataclass(frozen=True)
class RoundRequest:
    """One round to send, as every round sender (``batchplan.app.round_runner.RoundSender``) takes it: make
    every call of ``calls`` under the hard budgets, resumably in ``out_uri``."""

    calls: pl.DataFrame  # ROUND_PLAN_SCHEMA (``mode`` may be missing: the sender's default)
    queue: pl.DataFrame  # QUEUE_SCHEMA rows of the calls' queries (at least)
    round: int  # 1-based
    budget_usd: float  # what the round may still charge
    tenant_budgets_usd: Mapping[str, float]
    out_uri: str  # the round's dispatch directory: ledger, batch state
    storage: Storage
    progress: Callable[[int, int], None] | None = None  # (done, total)


@dataclass(frozen=True)
class RoundPlan:
    calls: pl.DataFrame  # ROUND_PLAN_SCHEMA
    diagnostics: dict[str, Any] = field(default_factory=dict)  # optimizer status, bound, gap, duals


class RoundPlanner(Protocol):
    def plan_round(self, state: RoundState) -> RoundPlan:
        """Which LLMs each open query calls this round, chosen globally under what is left of the budget."""
        ...

    def answers(self, queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
        """ROUND_ANSWER_SCHEMA: each query's final answer from its observations, with its posterior."""
        ...
