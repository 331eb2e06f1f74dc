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

*What* a round calls (the ``RoundPlanner``, ``batchplan.core.rounds``) is kept apart from *how* it is sent
(a ``RoundSender``): ``DispatchSender`` sends it through the dispatcher (concurrent calls, retries, budget
guard, ledger); a provider's batch API (one JSONL job per round and LLM) is another sender of the same
frames.

``PlanContinuation`` is the round planner that executes a single-shot plan (``plan_batch``) step by step,
by the plan kinds' rules (``batchplan.plans.simulation``); with enough rounds it calls, answers and pays
exactly what the single-shot run does, and it re-calls queries whose calls failed transiently (faults),
cheaper when the budget left is short.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import polars as pl
import structlog

from batchplan.core.contracts import RESULT_SCHEMA, ContractError, Status, conform, is_audit
from batchplan.core.rounds import (
    BATCH,
    CUT,
    OBSERVATION_MODE,
    OBSERVATION_SCHEMA,
    REALTIME,
    ROUND_ANSWER_SCHEMA,
    ROUND_PLAN_SCHEMA,
    TRANSIENT,
    RoundPlan,
    RoundPlanner,
    RoundRequest,
    RoundState,
    with_modes,
)
from batchplan.core.storage import Storage, join
from batchplan.dispatchers import ROUND_CALLS, Backend, DispatchOptions, RetryPolicy, dispatch, ledger_events
from batchplan.dispatchers.executor import LOST, Progress
from batchplan.dispatchers.limits import OutputCaps
from batchplan.plans.planning import check_rounds_request

log = structlog.get_logger("batchplan")

# the round contract names the transient failures in plain strings (it sits below the dispatchers)
assert frozenset({Status.RATE_LIMITED, Status.SERVER_ERROR, Status.TIMEOUT, Status.CONNECTION, LOST}) == TRANSIENT
assert Status.TRUNCATED == CUT
REFUSED_SCHEMA = pl.Schema({"query_id": pl.String, "error": pl.String})


@dataclass(frozen=True)
class Execution:
    """Where a plan is executed and under which hard limits: what ``execute``, ``execute_rounds``,
    ``run_rounds`` and ``plan_round`` share (in rounds ``budget_usd`` is the hard budget itself).

    ``budget_usd`` None: the plan's own high side (``hard_budget``). ``tenant_budgets_usd`` are hard caps at
    dispatch too: the plan meets them in expectation, escalations that run over are deferred rather than
    paid. ``retry``: the dispatcher's (default ``RetryPolicy()``); ``output_caps``: open tasks' max_tokens
    (``Trained``)."""

    budget_usd: float | None
    out_uri: str
    storage: Storage
    tenant_budgets_usd: dict[str, float] | None = None
    progress: Progress | None = None
    retry: RetryPolicy | None = None
    output_caps: OutputCaps | None = None


# --- how a round is sent ---------------------------------------------------------------------------------


class RoundSender(Protocol):
    def send(self, request: RoundRequest) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Make every call of ``request.calls`` under the hard budgets, resumably in ``request.out_uri``; return
        (OBSERVATION_SCHEMA rows of every call made, REFUSED_SCHEMA rows of calls the budget refused)."""
        ...


@dataclass
class DispatchSender:
    """A round through the dispatcher: every row's LLMs at once, with retries, budget guard and ledger."""

    backend: Backend
    options: DispatchOptions = field(default_factory=DispatchOptions)

    def send(self, request: RoundRequest) -> tuple[pl.DataFrame, pl.DataFrame]:
        calls = request.calls
        rows = calls.filter(pl.col("models").list.len() > 0).select(
            "query_id", pl.lit(ROUND_CALLS).alias("kind"), "models", "reserve_cost_usd"
        )
        if "mode" in calls.columns and (batch := int((calls["mode"] == BATCH).sum())):
            # this sender has no batch API: the calls still go (real time, under the same hard budget)
            log.warning("round.batch_as_realtime", round=request.round, queries=batch)
        results = dispatch(
            rows,
            request.queue,
            self.backend,
            budget_usd=max(request.budget_usd, 0.0),
            out_uri=request.out_uri,
            tenant_budgets_usd=dict(request.tenant_budgets_usd),
            storage=request.storage,
            progress=request.progress,
            options=self.options,
        )
        refused = results.filter(pl.col("status") == "deferred").select("query_id", "error")
        return observations_from_ledger(request.storage, request.out_uri, request.round), refused.cast(REFUSED_SCHEMA)


@dataclass
class BatchSender:
    """A round's ``mode == "batch"`` rows as provider batch jobs (``dispatchers.batch``: one JSONL job per
    LLM, reserved before submission, exactly once across crashes) and its ``realtime`` rows through
    ``realtime`` (a DispatchSender), first, under the same hard budgets; rows without a mode go by
    ``default_mode``. ``deadline`` (time.time()): when it passes, open batches are cancelled and their
    unfinished lines come back as transient failures for the next round."""

    backend: Backend  # an OpenAI-compatible backend (its endpoint, key, prices and request bodies)
    realtime: DispatchSender
    default_mode: str = BATCH
    deadline: float | None = None
    poll_s: float = 30.0
    options: dict[str, Any] = field(default_factory=dict)  # BatchRun's keywords: max_lines, cancel_marker ...

    def send(self, request: RoundRequest) -> tuple[pl.DataFrame, pl.DataFrame]:
        from batchplan.dispatchers.batch import BatchRun

        queue, budget_usd, tenant_budgets_usd = request.queue, request.budget_usd, request.tenant_budgets_usd
        out_uri, storage = request.out_uri, request.storage
        calls = with_modes(request.calls, self.default_mode).filter(pl.col("models").list.len() > 0)
        now = calls.filter(pl.col("mode") == REALTIME)
        got, refused = pl.DataFrame(schema=OBSERVATION_SCHEMA), pl.DataFrame(schema=REFUSED_SCHEMA)
        if now.height:
            got, refused = self.realtime.send(replace(request, calls=now))
        later = calls.filter(pl.col("mode") == BATCH)
        if later.height:
            tenants = queue.select("query_id", "tenant") if tenant_budgets_usd else None
            tenant_left = _tenant_left(dict(tenant_budgets_usd), tenants, got)
            here = join(out_uri, "batch")
            batch_refused = BatchRun(
                later,
                queue.filter(pl.col("query_id").is_in(later["query_id"].implode())),
                self.backend,  # type: ignore[arg-type]
                budget_usd=budget_usd - float(got["cost_usd"].sum()),
                tenant_budgets_usd=tenant_left,
                out_uri=here,
                storage=storage,
                deadline=self.deadline,
                poll_s=self.poll_s,
                max_tokens=self.realtime.options.max_tokens,
                max_tokens_open=self.realtime.options.max_tokens_open,
                **self.options,
            ).run()
            refused = pl.concat([refused, batch_refused.group_by("query_id", maintain_order=True).agg(
                pl.col("error").str.join("; ")
            )])
            batch_got = observations_from_ledger(storage, here, request.round).with_columns(pl.lit(BATCH).alias(OBSERVATION_MODE))
            got = pl.concat([got.with_columns(pl.lit(REALTIME).alias(OBSERVATION_MODE)), batch_got])
        elif now.height:  # how each call went out: the report's spend by mode, the planner's cost drift
            got = got.with_columns(pl.lit(REALTIME).alias(OBSERVATION_MODE))
        return got, refused.cast(REFUSED_SCHEMA)


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
                event.get("a") if status == Status.OK else None,
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
        """The mean posterior of the final answers over the whole batch (no answer counts 0), no gold; an
        audit's reference answers are not the batch's."""
        p = self.answers.filter(~is_audit()).select(pl.col("estimated_p_correct").fill_null(0.0).fill_nan(0.0))
        return float(p.to_series().sum() / max(self.results.filter(~is_audit()).height, 1))

    @property
    def spend_by_model(self) -> dict[str, float]:
        """What every round's calls charged, per LLM: the observations' costs (ambiguous failures tightened
        as in ``tighten``), so the per-LLM spend sums to the results' spend, which the budget counts."""
        spent = self.observations.group_by("model").agg(pl.col("cost_usd").sum()).sort("model")
        return {str(m): float(usd) for m, usd in spent.iter_rows()}


def round_uri(out_uri: str, k: int) -> str:
    return join(out_uri, "rounds", str(k))


def round_complete(storage: Storage, out_uri: str, k: int) -> bool:
    return storage.exists(join(round_uri(out_uri, k), "observations.parquet"))


def observed(
    storage: Storage, out_uri: str, rounds: range, call_bounds: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Observations and refusals (with their round) of ``rounds``, each of them complete; ambiguous
    failures' charges tightened with what later calls told (``tighten``)."""
    observations, refusals = [], []
    for k in rounds:
        here = round_uri(out_uri, k)
        marker = join(here, "observations.parquet")
        raw = storage.read_frame(marker)
        # the optional mode column (batch or realtime) is kept: the planner reads each call's cost at its price
        mode = raw[OBSERVATION_MODE].cast(pl.String) if OBSERVATION_MODE in raw.columns else pl.lit(None, pl.String)
        observations.append(conform(raw, OBSERVATION_SCHEMA, name=marker).with_columns(mode.alias(OBSERVATION_MODE)))
        refused = conform(storage.read_frame(join(here, "refused.parquet")), REFUSED_SCHEMA, name=here)
        refusals.append(refused.with_columns(pl.lit(k, dtype=pl.Int64).alias("round")))
    refused_schema = pl.Schema({**REFUSED_SCHEMA, "round": pl.Int64()})
    return tighten(_concat(observations, OBSERVATION_SCHEMA), call_bounds), _concat(refusals, refused_schema)


def tighten(observations: pl.DataFrame, call_bounds: pl.DataFrame | None) -> pl.DataFrame:
    """Charge each ambiguous failure (bill unknown, charged its reservation: prompt bytes as input tokens)
    at most input tokens x price + the output's bound, once another call of the same model on the same
    query has reported its input tokens: the same prompt tokenizes the same, and the output never passes
    max_tokens, so this still bounds what the failed attempt can have been billed; the hard cap stays hard
    and the money the reservation held comes back to the next round."""
    if call_bounds is None or observations.height == 0 or call_bounds["usd_per_token_in"].is_null().all():
        return observations
    known = (
        observations.filter((pl.col("status") == Status.OK) & pl.col("tokens_in").is_not_null())
        .group_by("query_id", "model")
        .agg(pl.col("tokens_in").first().alias("_tokens_in"))
    )
    parts = call_bounds.select("query_id", "model", "usd_per_token_in", "output_bound_usd")
    tight = pl.col("_tokens_in") * pl.col("usd_per_token_in") + pl.col("output_bound_usd")
    ambiguous = ~pl.col("billed_known") & (pl.col("status") != Status.OK) & tight.is_not_null()
    return (
        observations.join(known, on=["query_id", "model"], how="left", maintain_order="left")
        .join(parts, on=["query_id", "model"], how="left", maintain_order="left")
        .with_columns(
            pl.when(ambiguous).then(pl.min_horizontal("cost_usd", tight)).otherwise("cost_usd").alias("cost_usd")
        )
        .select(observations.columns)
    )


def plan_round(
    planner: RoundPlanner,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    *,
    k: int,
    rounds: int,
    run: Execution,
    call_bounds: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, float, dict[str, float]]:
    """Round ``k``'s calls (planned once, then reused from ``calls.parquet``) and its hard budgets: the
    total and each tenant's budget minus what rounds 1..k-1 charged. Rounds before ``k`` must be complete."""
    storage, out_uri = run.storage, run.out_uri
    before, _ = observed(storage, out_uri, range(1, k), call_bounds)
    left = _hard_budget(run) - float(before["cost_usd"].sum())
    tenant_budgets = dict(run.tenant_budgets_usd or {})
    tenant_left = _tenant_left(tenant_budgets, queue.select("query_id", "tenant") if tenant_budgets else None, before)
    state = RoundState(
        round=k,
        rounds=rounds,
        queue=queue,
        predictions=predictions,
        observations=before,
        budget_left_usd=left,
        tenant_budgets_left_usd=tenant_left,
        call_bounds=call_bounds,
    )
    return _resume_or_plan_round(storage, round_uri(out_uri, k), planner, state), left, tenant_left


def _hard_budget(run: Execution) -> float:
    """In rounds the budget is a hard number: the caller resolves the plan's own high side (``execute_rounds``)."""
    if run.budget_usd is None:
        raise ValueError("rounds run under a hard budget: resolve Execution.budget_usd first (pipeline.hard_budget)")
    return run.budget_usd


def complete_round(storage: Storage, out_uri: str, k: int, observations: pl.DataFrame, refused: pl.DataFrame) -> None:
    """Write round ``k``'s observations: the marker that it is complete (refusals first)."""
    here = round_uri(out_uri, k)
    storage.write_frame(refused.select(REFUSED_SCHEMA.names()).cast(REFUSED_SCHEMA), join(here, "refused.parquet"))
    columns = [*OBSERVATION_SCHEMA.names(), *([OBSERVATION_MODE] if OBSERVATION_MODE in observations.columns else [])]
    storage.write_frame(observations.select(columns), join(here, "observations.parquet"))


def run_rounds(
    planner: RoundPlanner,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    sender: RoundSender,
    *,
    rounds: int,
    run: Execution,
    call_bounds: pl.DataFrame | None = None,
) -> RoundsOutcome:
    """Plan, send and observe ``rounds`` rounds under one hard budget (``run.budget_usd``, and per-tenant
    budgets); resumable at any point (module doc). Returns the results of the whole batch."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    _hard_budget(run)  # before anything is sent
    out_uri, storage = run.out_uri, run.storage
    for k in range(1, rounds + 1):
        if round_complete(storage, out_uri, k):
            continue  # never sent again
        calls, left, tenant_left = plan_round(planner, queue, predictions, k=k, rounds=rounds, run=run, call_bounds=call_bounds)
        if calls.filter(pl.col("models").list.len() > 0).height:
            got, refused = sender.send(
                RoundRequest(calls, queue, k, left, tenant_left, join(round_uri(out_uri, k), "dispatch"), storage, run.progress)
            )
        else:
            got, refused = pl.DataFrame(schema=OBSERVATION_SCHEMA), pl.DataFrame(schema=REFUSED_SCHEMA)
        complete_round(storage, out_uri, k, got, refused)
    return finish_rounds(
        planner, queue, predictions, rounds=rounds, out_uri=out_uri, storage=storage, call_bounds=call_bounds
    )


def finish_rounds(
    planner: RoundPlanner,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    *,
    rounds: int,
    out_uri: str,
    storage: Storage,
    call_bounds: pl.DataFrame | None = None,
) -> RoundsOutcome:
    """The planner's final answers over every round's observations, as one result row per query (its
    cost: what the run counts against the budget, ambiguous failures tightened as in ``tighten``)."""
    observations, refusals = observed(storage, out_uri, range(1, rounds + 1), call_bounds)
    answers = conform(
        planner.answers(queue, predictions, observations),
        ROUND_ANSWER_SCHEMA,
        name="round answers",
        required=("query_id",),
    )
    results = _results(queue, answers, observations, refusals)
    summary = []
    for k in range(1, rounds + 1):
        calls = storage.read_frame(join(round_uri(out_uri, k), "calls.parquet"))
        planned = json.loads(storage.read_text(join(round_uri(out_uri, k), "plan.json")))
        got = observations.filter(pl.col("round") == k)
        info = {
            "round": k,
            "budget_usd": planned.get("budget_left_usd"),
            "queries_called": int((calls["models"].list.len() > 0).sum()),
            "calls_planned": int(calls["models"].list.len().sum()),
            "calls_made": got.height,
            "failed_calls": int((got["status"] != Status.OK).sum()),
            "charged_usd": float(got["cost_usd"].sum()),
            "unknown_bill_usd": float(got.filter(~pl.col("billed_known"))["cost_usd"].sum()),
            "refused": int((refusals["round"] == k).sum()),
        }
        summary.append(info)
        log.info("round", **info)
    return RoundsOutcome(results=results, answers=answers, observations=observations, rounds=summary)


def _resume_or_plan_round(storage: Storage, here: str, planner: RoundPlanner, state: RoundState) -> pl.DataFrame:
    """The round's calls as first planned: a rerun must send the very calls whose intents its ledger holds."""
    uri = join(here, "calls.parquet")
    if storage.exists(uri):
        return conform(storage.read_frame(uri), ROUND_PLAN_SCHEMA, name=uri)
    started = time.perf_counter()
    planned: RoundPlan = planner.plan_round(state)
    calls = conform(planned.calls, ROUND_PLAN_SCHEMA, name=f"round {state.round} plan", required=("query_id", "models"))
    with_modes(calls.filter(pl.col("mode").is_not_null()))  # a mode outside MODES is refused, naming the row
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
    queue: pl.DataFrame, answers: pl.DataFrame, observations: pl.DataFrame, refused: pl.DataFrame
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
            .filter(pl.col("status") != Status.OK)
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
        if refused.height
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


# --- audits in rounds ---------------------------------------------------------------------------------------


@dataclass
class AuditedPlanner:
    """A run's round planner with an audit beside it (``--audit-share``): the audited queries' reference
    plan rows (``plans.audit.audit_plan``, ids ``<query_id>#audit``) are executed by their kinds' rules
    (``PlanContinuation``) and are mandatory: a round's reference calls (round 1: a vote's members all at
    once) are planned first and reserved at their high side, and ``batch`` plans the delivered answers
    under what they leave, so the total (and each tenant's budget) still holds. The batch's planner never
    sees an audit row: its answers are the run's, the references only what the report compares them with."""

    batch: RoundPlanner
    audit: RoundPlanner

    def plan_round(self, state: RoundState) -> RoundPlan:
        audit_state, batch_state = (_part(state, audits) for audits in (True, False))
        audit = self.audit.plan_round(audit_state).calls.filter(pl.col("models").list.len() > 0)
        reserve = audit.join(state.queue.select("query_id", "tenant"), on="query_id", how="left")
        tenants = dict(reserve.group_by("tenant").agg(pl.col("reserve_cost_usd").sum()).iter_rows())
        batch_state = dataclasses.replace(
            batch_state,
            budget_left_usd=None
            if state.budget_left_usd is None
            else state.budget_left_usd - float(audit["reserve_cost_usd"].sum()),
            tenant_budgets_left_usd={
                t: left - float(tenants.get(t) or 0.0) for t, left in state.tenant_budgets_left_usd.items()
            },
        )
        planned = self.batch.plan_round(batch_state)
        # the reference calls first: the budget guard sends a round's rows in order, so they are never the ones refused
        calls = pl.concat([audit.select(ROUND_PLAN_SCHEMA.names()), planned.calls.select(ROUND_PLAN_SCHEMA.names())])
        return RoundPlan(calls=calls, diagnostics={**planned.diagnostics, "audit_queries": audit.height})

    def answers(self, queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
        parts = []
        for planner, audits in ((self.batch, False), (self.audit, True)):
            mine = ~is_audit() if not audits else is_audit()
            got = planner.answers(queue.filter(mine), predictions.filter(mine), observations.filter(mine))
            parts.append(conform(got, ROUND_ANSWER_SCHEMA, name="round answers", required=("query_id",)))
        return pl.concat(parts)


def _part(state: RoundState, audits: bool) -> RoundState:
    mine = is_audit() if audits else ~is_audit()
    return dataclasses.replace(
        state,
        queue=state.queue.filter(mine),
        predictions=state.predictions.filter(mine),
        observations=state.observations.filter(mine),
        call_bounds=None if state.call_bounds is None else state.call_bounds.filter(mine),
    )


def with_audits(
    batch: RoundPlanner, plan: pl.DataFrame, queue: pl.DataFrame, predictions: pl.DataFrame
) -> tuple[RoundPlanner, pl.DataFrame, pl.DataFrame]:
    """The planner, queue and predictions of a run in rounds whose single-shot ``plan`` holds audit rows
    (``batch`` built from the plan without them): the ``AuditedPlanner``, the audited queries' copies under
    their audit ids, and their predictions; unchanged without audits (CLI and DAGs alike)."""
    from batchplan.plans.audit import audit_queue
    from batchplan.plans.continuation import PlanContinuation

    references = plan.filter(is_audit())
    if references.height == 0:
        return batch, queue, predictions
    return (
        AuditedPlanner(batch, PlanContinuation(references)),
        pl.concat([queue, audit_queue(queue, plan)]),
        pl.concat([predictions, audit_predictions(predictions, references)]),
    )


def audit_predictions(predictions: pl.DataFrame, audit_rows: pl.DataFrame) -> pl.DataFrame:
    """The audited queries' predictions under their audit ids: the reference calls' costs and bounds."""
    from batchplan.plans.audit import under_audit_ids

    return under_audit_ids(predictions, audit_rows["query_id"].to_list())


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
    if (request := inputs.get("request")) is not None:
        check_rounds_request(request, name)
    return ROUND_PLANNERS[name](**inputs)


def _plan_continuation(*, plan: pl.DataFrame, **_: Any) -> RoundPlanner:
    from batchplan.plans.continuation import PlanContinuation

    return PlanContinuation(plan)


def _posterior(*, trained: Any = None, request: Any = None, modes: Any = None, **_: Any) -> RoundPlanner:
    from batchplan.plans.round_planner import round_planner

    held = {}
    if request is not None:  # the constraints it re-plans under (planning.ROUND_PLANNERS_HOLD)
        held = {"max_calls": dict(request.model_max_calls), "task_floors": dict(request.task_accuracy_floors)}
    return round_planner(getattr(trained, "posterior", None), modes=modes, **held)  # modes: a batch API's prices


def _per_task(*, plan: pl.DataFrame, queue: pl.DataFrame, trained: Any = None, **inputs: Any) -> RoundPlanner:
    """``batchplan.plans.per_task``: the tasks whose history says re-planning pays, by the posterior; the rest by
    the single-shot plan (all of them for a version trained without a posterior)."""
    from batchplan.core.contracts import DEFAULT_TASK
    from batchplan.plans.per_task import PerTaskPlanner, chosen_tasks, reference_cost
    from batchplan.plans.templates import PlanTemplates

    tasks = queue["task"].fill_null(DEFAULT_TASK).unique().to_list() if "task" in queue.columns else [DEFAULT_TASK]
    posterior = getattr(trained, "posterior", None)
    # the budget level the training replay measured the planners at: the budget (else what the plan expects
    # to spend) over the batch's predicted cost of each task's best single LLM
    request, predictions = inputs.get("request"), inputs.get("predictions")
    budget = getattr(request, "budget_usd", None)
    if budget is None and "expected_cost_usd" in plan.columns:
        budget = float(plan["expected_cost_usd"].fill_null(0.0).sum())
    reference = reference_cost(queue, predictions) if predictions is not None else 0.0
    level = budget / reference if budget is not None and reference > 0 else None
    templates = getattr(trained, "templates", None) or PlanTemplates()
    replanned = chosen_tasks(getattr(trained, "round_choice", None), posterior, templates, tasks, level)
    if not replanned:
        return _plan_continuation(plan=plan)
    task = pl.col("task").fill_null(DEFAULT_TASK) if "task" in queue.columns else pl.lit(DEFAULT_TASK).alias("task")
    replanned_ids = queue.filter(task.is_in(sorted(replanned)))["query_id"]
    # the continuation runs every row it is given: only the plan's own tasks' rows
    kept = plan.filter(~pl.col("query_id").is_in(replanned_ids.implode()))
    cost = float(kept["expected_cost_usd"].fill_null(0.0).sum()) if "expected_cost_usd" in kept.columns else 0.0
    return PerTaskPlanner(_plan_continuation(plan=kept), _posterior(trained=trained, **inputs), frozenset(replanned), cost)


register_round_planner("plan", _plan_continuation)
register_round_planner("posterior", _posterior)
register_round_planner("per_task", _per_task)
