"""The round runner: a run executed in rounds, each planned from what the earlier rounds observed.

For k = 1..N (``batchplan run --rounds N``)::

    <out>/rounds/<k>/calls.parquet         ROUND_PLAN_SCHEMA: what round k calls, written before anything
                                           is sent; a rerun reuses it (never re-plans a round in flight)
    <out>/rounds/<k>/plan.json             the planner's diagnostics and the round's hard budget
    <out>/rounds/<k>/dispatch/             the round's own ledger, result parts and manifest (resumable)
    <out>/rounds/<k>/refused.parquet       query_id, error: calls the budget refused (never sent)
    <out>/rounds/<k>/observations.parquet  OBSERVATION_SCHEMA, every call of round k: the round-complete
                                           marker (written last; a rerun skips a round that has it)

The hard budget of round k is the total (and each tenant's budget) minus what rounds 1..k-1 charged, so
the caps stay exactly as hard as a single-shot run's: every call still reserves its bound in the budget
guard first. A killed round resumes from its ledger (nothing paid twice); a round with observations is
never sent again.

*What* a round calls (the ``RoundPlanner``, ``batchplan.rounds``) is kept apart from *how* it is sent
(a ``RoundSender``): ``DispatchSender`` sends it through the dispatcher (concurrent calls, retries, budget
guard, ledger); a provider's batch API (one JSONL job per round and LLM) is another sender of the same
frames.

``PlanContinuation`` is the round planner that executes a single-shot plan (``plan_batch``) step by step,
by the plan kinds' rules (``batchplan.plan_simulation``); with enough rounds it calls, answers and pays
exactly what the single-shot run does, and it re-calls queries whose calls failed transiently (faults),
cheaper when the budget left is short.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl
import structlog

from batchplan.contracts import RESULT_SCHEMA, ContractError, conform
from batchplan.rounds import (
    OBSERVATION_SCHEMA,
    ROUND_ANSWER_SCHEMA,
    ROUND_PLAN_SCHEMA,
    RoundPlan,
    RoundPlanner,
    RoundState,
)
from batchplan.storage import Storage, join
from dispatchers import ROUND_CALLS, Backend, dispatch, ledger_events
from dispatchers.base import CONNECTION, RATE_LIMITED, SERVER_ERROR, TIMEOUT
from dispatchers.executor import LOST

log = structlog.get_logger("batchplan")

Progress = Callable[[int, int], None]

# Failures that say nothing about the query: another call (next round) may well answer.
TRANSIENT = frozenset({RATE_LIMITED, SERVER_ERROR, TIMEOUT, CONNECTION, LOST})
MAX_TOKENS = 16  # the dispatcher's defaults: they enter every call's cost bound
MAX_TOKENS_OPEN = 1024
REFUSED_SCHEMA = pl.Schema({"query_id": pl.String, "error": pl.String})


# --- how a round is sent ---------------------------------------------------------------------------------


class RoundSender(Protocol):
    def send(
        self,
        calls: pl.DataFrame,
        queue: pl.DataFrame,
        *,
        round: int,
        budget_usd: float,
        tenant_budgets_usd: Mapping[str, float],
        out_uri: str,
        storage: Storage,
        progress: Progress | None,
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Make every call of ``calls`` (ROUND_PLAN_SCHEMA) under the hard budgets, resumably in ``out_uri``;
        return (OBSERVATION_SCHEMA rows of every call made, REFUSED_SCHEMA rows of calls the budget refused)."""
        ...


@dataclass
class DispatchSender:
    """A round through the dispatcher: every row's LLMs at once, with retries, budget guard and ledger."""

    backend: Backend
    concurrency: int = 32
    max_tokens: int = MAX_TOKENS
    max_tokens_open: int = MAX_TOKENS_OPEN
    options: dict[str, Any] = field(default_factory=dict)  # limits, retry, part_rows ... (dispatch's keywords)

    def send(
        self,
        calls: pl.DataFrame,
        queue: pl.DataFrame,
        *,
        round: int,
        budget_usd: float,
        tenant_budgets_usd: Mapping[str, float],
        out_uri: str,
        storage: Storage,
        progress: Progress | None,
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        rows = calls.filter(pl.col("models").list.len() > 0).select(
            "query_id", pl.lit(ROUND_CALLS).alias("kind"), "models", "reserve_cost_usd"
        )
        results = dispatch(
            rows,
            queue,
            self.backend,
            budget_usd=max(budget_usd, 0.0),
            out_uri=out_uri,
            tenant_budgets_usd=dict(tenant_budgets_usd),
            storage=storage,
            concurrency=self.concurrency,
            progress=progress,
            max_tokens=self.max_tokens,
            max_tokens_open=self.max_tokens_open,
            **self.options,
        )
        refused = results.filter(pl.col("status") == "deferred").select("query_id", "error")
        return observations_from_ledger(storage, out_uri, round), refused.cast(REFUSED_SCHEMA)


def observations_from_ledger(storage: Storage, out_uri: str, round: int) -> pl.DataFrame:
    """OBSERVATION_SCHEMA rows of every call event in ``out_uri``'s ledger (first event per call), in
    (query, slot, attempt) order, with ``slot`` kept for the order of a query's calls within the round."""
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[Any, ...]] = []
    for event in ledger_events(storage, out_uri):
        if event.get("e") != "c" or not isinstance(event.get("q"), str):
            continue
        key = (event["q"], str(event.get("c")))
        if key in seen:
            continue
        seen.add(key)
        slot, _, attempt = key[1].partition(":")
        status = str(event.get("s"))
        rows.append(
            (
                event["q"],
                round,
                str(event.get("m")),
                status,
                event.get("a") if status == "ok" else None,
                _finite(event.get("lp")),
                float(event.get("usd") or 0.0),
                bool(event.get("bk", True)),
                event.get("ti"),
                event.get("to"),
                int(slot) if slot.isdigit() else 0,
                int(attempt.rpartition(":")[2]) if attempt.rpartition(":")[2].isdigit() else 0,
            )
        )
    schema = pl.Schema({**OBSERVATION_SCHEMA, "_slot": pl.Int64(), "_attempt": pl.Int64()})
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.sort("query_id", "_slot", "_attempt").drop("_slot", "_attempt")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


# --- the runner ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundsOutcome:
    results: pl.DataFrame  # RESULT_SCHEMA, one row per query of the queue
    answers: pl.DataFrame  # ROUND_ANSWER_SCHEMA, from the planner
    observations: pl.DataFrame  # OBSERVATION_SCHEMA, every round
    rounds: list[dict[str, Any]]  # per round: calls planned, calls made, spend, budget, refused

    @property
    def estimated_accuracy(self) -> float:
        """The mean posterior of the final answers over the whole batch (no answer counts 0), no gold."""
        p = self.answers.select(pl.col("estimated_p_correct").fill_null(0.0).fill_nan(0.0))
        return float(p.to_series().sum() / max(self.results.height, 1))


def run_rounds(
    planner: RoundPlanner,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    sender: RoundSender,
    *,
    rounds: int,
    budget_usd: float,
    out_uri: str,
    storage: Storage,
    tenant_budgets_usd: Mapping[str, float] | None = None,
    call_bounds: pl.DataFrame | None = None,
    progress: Progress | None = None,
) -> RoundsOutcome:
    """Plan, send and observe ``rounds`` rounds under one hard ``budget_usd`` (and per-tenant budgets);
    resumable at any point (module doc). Returns the results of the whole batch."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    tenant_budgets = dict(tenant_budgets_usd or {})
    tenants = queue.select("query_id", "tenant") if tenant_budgets else None
    observed: list[pl.DataFrame] = []
    refusals: list[pl.DataFrame] = []
    summary: list[dict[str, Any]] = []
    for k in range(1, rounds + 1):
        started = time.perf_counter()
        here = join(out_uri, "rounds", str(k))
        marker = join(here, "observations.parquet")
        before = _concat(observed, OBSERVATION_SCHEMA)
        spent = float(before["cost_usd"].sum())
        left = budget_usd - spent
        tenant_left = _tenant_left(tenant_budgets, tenants, before)
        calls = _resume_or_plan_round(
            storage,
            here,
            planner,
            RoundState(
                round=k,
                rounds=rounds,
                queue=queue,
                predictions=predictions,
                observations=before,
                budget_left_usd=left,
                tenant_budgets_left_usd=tenant_left,
                call_bounds=call_bounds,
            ),
        )
        if storage.exists(marker):
            got = conform(storage.read_frame(marker), OBSERVATION_SCHEMA, name=marker)
            refused = storage.read_frame(join(here, "refused.parquet"))
            resumed = True
        else:
            if calls.filter(pl.col("models").list.len() > 0).height:
                got, refused = sender.send(
                    calls,
                    queue,
                    round=k,
                    budget_usd=left,
                    tenant_budgets_usd=tenant_left,
                    out_uri=join(here, "dispatch"),
                    storage=storage,
                    progress=progress,
                )
            else:
                got, refused = pl.DataFrame(schema=OBSERVATION_SCHEMA), pl.DataFrame(schema=REFUSED_SCHEMA)
            storage.write_frame(refused, join(here, "refused.parquet"))
            storage.write_frame(got, marker)  # last: the round is complete
            resumed = False
        observed.append(got)
        refusals.append(refused.with_columns(pl.lit(k).alias("round")))
        info = {
            "round": k,
            "queries_called": int((calls["models"].list.len() > 0).sum()),
            "calls_planned": int(calls["models"].list.len().sum()),
            "calls_made": got.height,
            "failed_calls": int((got["status"] != "ok").sum()),
            "charged_usd": float(got["cost_usd"].sum()),
            "unknown_bill_usd": float(got.filter(~pl.col("billed_known"))["cost_usd"].sum()),
            "budget_usd": left,
            "refused": refused.height,
            "resumed": resumed,
            "seconds": round(time.perf_counter() - started, 2),
        }
        summary.append(info)
        log.info("round", **info)
    observations = _concat(observed, OBSERVATION_SCHEMA)
    answers = conform(
        planner.answers(queue, predictions, observations),
        ROUND_ANSWER_SCHEMA,
        name="round answers",
        required=("query_id",),
    )
    results = _results(queue, answers, observations, pl.concat(refusals) if refusals else None)
    return RoundsOutcome(results=results, answers=answers, observations=observations, rounds=summary)


def _resume_or_plan_round(storage: Storage, here: str, planner: RoundPlanner, state: RoundState) -> pl.DataFrame:
    """The round's calls as first planned: a rerun must send the very calls whose intents its ledger holds."""
    uri = join(here, "calls.parquet")
    if storage.exists(uri):
        return conform(storage.read_frame(uri), ROUND_PLAN_SCHEMA, name=uri)
    started = time.perf_counter()
    planned: RoundPlan = planner.plan_round(state)
    calls = conform(planned.calls, ROUND_PLAN_SCHEMA, name=f"round {state.round} plan", required=("query_id", "models"))
    if calls["query_id"].is_duplicated().any():
        raise ValueError(f"round {state.round} plan has duplicate query_id rows: one row per query")
    diagnostics = {
        **planned.diagnostics,
        "round": state.round,
        "budget_left_usd": state.budget_left_usd,
        "tenant_budgets_left_usd": state.tenant_budgets_left_usd,
        "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_text(join(here, "plan.json"), json.dumps(diagnostics, default=str))
    storage.write_frame(calls, uri)
    return calls


def _tenant_left(budgets: dict[str, float], tenants: pl.DataFrame | None, before: pl.DataFrame) -> dict[str, float]:
    if not budgets or tenants is None:
        return {}
    spent = before.join(tenants, on="query_id").group_by("tenant").agg(pl.col("cost_usd").sum())
    by_tenant = dict(zip(spent["tenant"].to_list(), spent["cost_usd"].to_list(), strict=True))
    return {tenant: limit - float(by_tenant.get(tenant, 0.0)) for tenant, limit in budgets.items()}


def _concat(frames: list[pl.DataFrame], schema: pl.Schema) -> pl.DataFrame:
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def _results(
    queue: pl.DataFrame, answers: pl.DataFrame, observations: pl.DataFrame, refused: pl.DataFrame | None
) -> pl.DataFrame:
    """RESULT_SCHEMA per query: done with the planner's answer; else deferred naming the budget that
    refused its last call; else failed with its calls' failures; else deferred by the plan."""
    ordered = observations.with_row_index("_order")
    calls = (
        ordered.group_by("query_id").agg(
            # one entry per (round, slot) as the executor lists models_called: a retry is not a new model
            pl.col("model").unique(maintain_order=True).alias("models_called"),
            pl.col("cost_usd").sum(),
            pl.format("{}: {}", pl.col("model"), pl.col("status"))
            .filter(pl.col("status") != "ok")
            .unique(maintain_order=True)
            .str.join("; ")
            .alias("_failures"),
        )
        if ordered.height
        else pl.DataFrame(
            schema={
                "query_id": pl.String,
                "models_called": pl.List(pl.String),
                "cost_usd": pl.Float64,
                "_failures": pl.String,
            }
        )
    )
    last_refusal = (
        refused.sort("round")
        .group_by("query_id")
        .agg(pl.col("error").last(), pl.col("round").last().alias("_refused_in"))
        if refused is not None and refused.height
        else pl.DataFrame(schema={"query_id": pl.String, "error": pl.String, "_refused_in": pl.Int64})
    )
    last_call = observations.group_by("query_id").agg(pl.col("round").max().alias("_called_in"))
    frame = (
        queue.select("query_id")
        .join(answers.select("query_id", "answer", pl.col("model").alias("_kept")), on="query_id", how="left")
        .join(calls, on="query_id", how="left")
        .join(last_refusal, on="query_id", how="left")
        .join(last_call, on="query_id", how="left")
    )
    answered = pl.col("_kept").is_not_null() | pl.col("answer").is_not_null()
    refused_last = pl.col("_refused_in").is_not_null() & (pl.col("_refused_in") >= pl.col("_called_in").fill_null(0))
    status = (
        pl.when(answered)
        .then(pl.lit("done"))
        .when(refused_last)
        .then(pl.lit("deferred"))
        .when(pl.col("_called_in").is_not_null())
        .then(pl.lit("failed"))
        .otherwise(pl.lit("deferred"))
    )
    error = (
        pl.when(answered)
        .then(pl.lit(None, dtype=pl.String))
        .when(refused_last)
        .then(pl.col("error"))
        .when(pl.col("_called_in").is_not_null())
        .then(pl.col("_failures"))
        .otherwise(pl.lit("deferred by the plan: not worth its cost under the budget"))
    )
    return frame.select(
        "query_id",
        pl.when(answered).then(pl.col("answer")).alias("answer"),
        pl.col("models_called").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("cost_usd").fill_null(0.0),
        status.alias("status"),
        error.alias("error"),
        pl.lit(None, dtype=pl.String).alias("note"),
    ).cast(RESULT_SCHEMA)


# --- round planners by name (``batchplan run --round-planner``) ---------------------------------------------

PlannerFactory = Callable[..., RoundPlanner]
ROUND_PLANNERS: dict[str, PlannerFactory] = {}


def register_round_planner(name: str, factory: PlannerFactory) -> None:
    """``factory(plan=, queue=, predictions=, trained=, request=)`` -> a RoundPlanner; ``plan`` is the
    single-shot plan (PLAN_SCHEMA with defer rows), ``trained`` the loaded artifacts (predictor, templates)."""
    ROUND_PLANNERS[name] = factory


def check_round_planner(name: str) -> None:
    if name not in ROUND_PLANNERS:
        raise ContractError(f"--round-planner {name!r} is not one of {sorted(ROUND_PLANNERS)}")


def make_round_planner(name: str, **inputs: Any) -> RoundPlanner:
    check_round_planner(name)
    return ROUND_PLANNERS[name](**inputs)


def _plan_continuation(*, plan: pl.DataFrame, **_: Any) -> RoundPlanner:
    from batchplan.plan_continuation import PlanContinuation

    return PlanContinuation(plan)


register_round_planner("plan", _plan_continuation)
