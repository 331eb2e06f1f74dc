"""``dispatch``: run a whole plan into ``out_uri``, resumably (the entry point the pipeline calls).

It returns one RESULT_SCHEMA row per plan row and leaves the same rows under ``out_uri`` (layout in
``dispatchers.ledger``). Running it again with the same ``out_uri`` resumes: finished queries are kept,
calls already in the ledger are reused (never sent or paid again), and only the rest is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import polars as pl
import structlog

from batchplan.core.contracts import RESULT_SCHEMA
from batchplan.core.storage import Storage
from batchplan.dispatchers.base import Backend
from batchplan.dispatchers.budget import BudgetGuard
from batchplan.dispatchers.executor import FALLBACK_COLUMN, LOST, Executor, Progress, QueryRun
from batchplan.dispatchers.ledger import (
    FINAL_STATUSES,
    Lease,
    Ledger,
    PriorCalls,
    ResultWriter,
    new_writer_id,
    read_results,
    run_identity,
)
from batchplan.dispatchers.limits import MAX_TOKENS, MAX_TOKENS_OPEN, ModelLimits, OutputCaps, RetryPolicy

log = structlog.get_logger("dispatchers")
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class DispatchOptions:
    """How a dispatch sends its calls, apart from what it calls and under which budgets.

    ``concurrency``: queries in flight at once; ``limits``: per-model ``ModelLimits`` (a mapping may hold a
    ``"*"`` default); ``retry``: attempts, backoff and circuit breaker (default ``RetryPolicy()``);
    ``max_tokens`` caps the output of classification calls, ``max_tokens_open`` that of open tasks (labels
    null), ``output_caps`` that of open tasks per (task, LLM) where learned (``OutputCaps``): they enter the
    hard cost bound reserved before each call. ``part_rows``/``part_seconds``: how often results are committed."""

    concurrency: int = 32
    limits: ModelLimits | Mapping[str, ModelLimits] | None = None
    retry: RetryPolicy | None = None
    max_tokens: int = MAX_TOKENS
    max_tokens_open: int = MAX_TOKENS_OPEN
    output_caps: OutputCaps | None = None
    part_rows: int = 5_000
    part_seconds: float = 5.0


def _queries(
    plan: pl.DataFrame, queue: pl.DataFrame, final: set[str], prior: dict[str, PriorCalls], chunk: int = 2_048
) -> Iterator[QueryRun]:
    """Plan rows joined to their queue rows, ``chunk`` at a time: working memory does not grow with the batch."""
    wanted = ["query_id", "kind", "models", "reserve_cost_usd", "thresholds"]
    has_fallback = FALLBACK_COLUMN in plan.columns
    columns = [c for c in wanted if c in plan.columns] + ([FALLBACK_COLUMN] if has_fallback else [])
    texts = queue.select(
        "query_id", "prompt", "system_prompt", "labels", *(c for c in ("tenant", "task") if c in queue.columns)
    )
    finished = pl.Series(list(final), dtype=pl.String).implode() if final else None
    for start in range(0, plan.height, chunk):
        part = plan.slice(start, chunk).select(columns)
        if finished is not None:
            part = part.filter(~pl.col("query_id").is_in(finished))
        # filter the queue to this chunk first: a join would hash the whole queue for every chunk
        rows = texts.filter(pl.col("query_id").is_in(part["query_id"].implode()))
        frame = part.join(rows, on="query_id", how="left", maintain_order="left")
        for row in frame.iter_rows(named=True):
            labels = row.get("labels")
            yield QueryRun(
                query_id=row["query_id"],
                kind=row.get("kind") or "single",
                models=list(row.get("models") or []),
                thresholds=list(row.get("thresholds") or []),
                fallbacks=list(row.get(FALLBACK_COLUMN) or []) if has_fallback else [],
                reserve_usd=row.get("reserve_cost_usd"),
                prompt=row.get("prompt"),
                system_prompt=row.get("system_prompt"),
                labels=tuple(labels) if labels is not None else None,
                prior=prior.get(row["query_id"]),
                tenant=row.get("tenant"),
                task=row.get("task"),
            )


def tenant_guards(
    budgets_usd: Mapping[str, float], queue: pl.DataFrame, charged_by_query: Mapping[str, float]
) -> dict[str, BudgetGuard]:
    """A hard budget per tenant that has one, starting from what the ledger already charged its queries."""
    if not budgets_usd:
        return {}
    if "tenant" not in queue.columns:
        raise ValueError("tenant budgets need the queue's tenant column")
    spent: dict[str, float] = {}
    for query_id, tenant in queue.select("query_id", "tenant").iter_rows():
        spent[tenant] = spent.get(tenant, 0.0) + charged_by_query.get(query_id, 0.0)
    return {tenant: BudgetGuard(limit, spent_usd=spent.get(tenant, 0.0)) for tenant, limit in budgets_usd.items()}


async def adispatch(
    plan: pl.DataFrame,
    queue: pl.DataFrame,
    backend: Backend,
    *,
    budget_usd: float,
    out_uri: str,
    tenant_budgets_usd: Mapping[str, float] | None = None,
    storage: Storage | None = None,
    progress: Progress | None = None,
    options: DispatchOptions | None = None,
) -> pl.DataFrame:
    """Run ``plan`` (PLAN_SCHEMA, plus optional ``fallback_models``) for ``queue`` (QUEUE_SCHEMA) on
    ``backend`` without ever spending more than ``budget_usd`` in total for ``out_uri``.

    Returns RESULT_SCHEMA rows in plan order: ``done`` (answered), ``failed`` (every attempt and
    fallback failed; ``error`` says why, with the raw text of non-answers) or ``deferred`` (the budget
    could not cover the call; rerun with a larger budget to do them). Resumable: see the module doc.

    ``tenant_budgets_usd``: a hard budget per tenant (the queue's ``tenant`` column) on top of the total:
    a call is sent only if it fits both, else its query is deferred with the tenant named.
    ``options``: how the calls are sent (``DispatchOptions``: concurrency, limits, retry, max tokens, commit
    cadence). ``progress(done, total)`` is called after every query. ``dispatch`` is the blocking form.
    """
    storage = storage or Storage()
    if plan["query_id"].is_duplicated().any():
        raise ValueError("plan has duplicate query_id rows: one plan row per query")
    identity = run_identity(storage, out_uri)
    writer_id = new_writer_id()
    lease = Lease(storage, out_uri, writer_id)
    lease.acquire()
    try:
        return await _dispatch_leased(
            plan,
            queue,
            backend,
            storage,
            out_uri,
            identity,
            writer_id,
            lease,
            budget_usd=budget_usd,
            tenant_budgets_usd=tenant_budgets_usd or {},
            progress=progress,
            options=options or DispatchOptions(),
        )
    finally:
        lease.release()


def _charge_lost_calls(ledger: Ledger, prior: dict[str, PriorCalls], charged_by_query: dict[str, float]) -> int:
    """Calls sent just before a crash whose outcome never reached the ledger may have been billed (a backend
    that is not idempotent): each is recorded lost and charged its reservation. Returns how many."""
    lost = 0
    for query_id, entry in prior.items():
        for call, intent in list(entry.intents.items()):
            charge = float(intent.get("r") or 0.0)
            event = {
                "e": "c",
                "q": query_id,
                "c": call,
                "m": intent.get("m"),
                "s": LOST,
                "usd": charge,
                "bk": False,
            }
            event["why"] = "sent before a crash, outcome unknown: charged its reservation"
            ledger.append(event)
            entry.calls[call] = event
            charged_by_query[query_id] = charged_by_query.get(query_id, 0.0) + charge
            lost += 1
        entry.intents.clear()
    ledger.flush()
    return lost


# the dispatch's counters (DispatchStats fields) by their manifest names; the summary log line says the field's
STAT_NAMES = {
    "calls": "calls",
    "reused": "reused_from_ledger",
    "recovered": "recovered_in_flight",
    "lost": "lost_in_flight",
    "retries": "retries",
    "fallbacks": "fallbacks",
}


def _manifest_stats(executor: Executor, seconds: float) -> dict[str, Any]:
    """The manifest's ``stats``: what the dispatch did so far."""
    stats = executor.stats
    return {
        **{name: getattr(stats, counter) for counter, name in STAT_NAMES.items()},
        "call_statuses": dict(stats.statuses),
        "budget_overruns": executor.budget.overruns,
        "rate_limit_pauses": sum(g.pauses for g in executor.gates.values()),
        "circuit_trips": sum(g.trips for g in executor.gates.values()),
        "seconds": seconds,
    }


def _log_summary(
    executor: Executor,
    out_uri: str,
    budget_usd: float,
    queries: int,
    already_final: int,
    counts: dict[str, int],
    seconds: float,
) -> None:
    """The dispatch's one summary log line."""
    log.info(
        "dispatch",
        out_uri=out_uri,
        backend=executor.backend.name,
        queries=queries,
        already_final=already_final,
        **{counter: getattr(executor.stats, counter) for counter in STAT_NAMES},
        spent_usd=round(executor.budget.spent_usd, 9),
        budget_usd=budget_usd,
        counts=counts,
        seconds=seconds,
    )


def _in_plan_order(plan: pl.DataFrame, results: pl.DataFrame) -> pl.DataFrame:
    """One result row per plan row, in plan order."""
    return plan.select("query_id").join(results, on="query_id", how="left", maintain_order="left")


async def _heartbeat(lease: Lease) -> None:
    """Renew the run's lease while the dispatch holds it (cancelled when it ends)."""
    while True:
        await asyncio.sleep(lease.ttl_s / 4)
        lease.renew()


async def _dispatch_leased(
    plan: pl.DataFrame,
    queue: pl.DataFrame,
    backend: Backend,
    storage: Storage,
    out_uri: str,
    identity: dict[str, Any],
    writer_id: str,
    lease: Lease,
    *,
    budget_usd: float,
    tenant_budgets_usd: Mapping[str, float],
    progress: Progress | None,
    options: DispatchOptions,
) -> pl.DataFrame:
    committed = read_results(out_uri, storage)
    final = set(committed.filter(pl.col("status").is_in(list(FINAL_STATUSES)))["query_id"].to_list())
    ledger = Ledger(storage, out_uri, writer_id)
    prior, charged_by_query = ledger.load(skip=final)
    lost = 0 if backend.idempotent else _charge_lost_calls(ledger, prior, charged_by_query)
    executor = Executor(
        backend,
        BudgetGuard(budget_usd, spent_usd=sum(charged_by_query.values())),
        ledger,
        identity["run_id"],
        tenant_budgets=tenant_guards(tenant_budgets_usd, queue, charged_by_query),
        limits=options.limits,
        policy=options.retry or RetryPolicy(),
        max_tokens=options.max_tokens,
        max_tokens_open=options.max_tokens_open,
        output_caps=options.output_caps,
    )
    budget, tenant_budgets = executor.budget, executor.tenant_budgets
    executor.stats.lost = lost
    results = ResultWriter(storage, out_uri, writer_id, part_rows=options.part_rows, part_seconds=options.part_seconds)
    total = plan.height
    done = int(plan["query_id"].is_in(pl.Series(list(final), dtype=pl.String).implode()).sum()) if final else 0
    started = time.monotonic()

    def manifest_extra(complete: bool) -> dict[str, Any]:
        return {
            "run_id": identity["run_id"],
            "backend": backend.name,
            "budget_usd": budget_usd,
            "spent_usd": budget.spent_usd,
            "tenant_budgets_usd": dict(tenant_budgets_usd),
            "tenant_spent_usd": {tenant: guard.spent_usd for tenant, guard in tenant_budgets.items()},
            "complete": complete,
            "queries": total,
            "stats": _manifest_stats(executor, round(time.monotonic() - started, 3)),
        }

    pending = _queries(plan, queue, final, prior)

    async def worker() -> None:
        nonlocal done
        for query in pending:
            row = await executor.run(query)
            if results.add(row):
                results.commit(ledger, manifest_extra(False))
            done += 1
            if progress is not None:
                progress(done, total)

    beat = asyncio.create_task(_heartbeat(lease))
    try:
        if progress is not None:
            progress(done, total)
        await asyncio.gather(*(worker() for _ in range(max(1, options.concurrency))))
        results.commit(ledger, manifest_extra(False))
        ordered = _in_plan_order(plan, read_results(out_uri, storage))
        counts = ordered["status"].value_counts()
        results.manifest["counts"] = dict(zip(counts["status"].to_list(), counts["count"].to_list(), strict=True))
        results.commit(ledger, manifest_extra(True))
        seconds = round(time.monotonic() - started, 2)
        _log_summary(executor, out_uri, budget_usd, total, len(final), results.manifest["counts"], seconds)
        return ordered.select(RESULT_SCHEMA.names()).cast(RESULT_SCHEMA)
    finally:
        beat.cancel()
        ledger.close()
        await backend.aclose()


def _blocking(run: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]:
    """``run`` as a blocking call with the same parameters: ``dispatch`` is ``adispatch`` run to completion, so
    the signature is written once."""

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop running: this call may run one
        else:
            raise RuntimeError(f"a blocking call inside a running event loop: await {run.__name__}(...) instead")
        return asyncio.run(run(*args, **kwargs))

    return call


dispatch = _blocking(adispatch)
dispatch.__doc__ = "``adispatch`` as a blocking call (outside an event loop): the entry point the pipeline calls."
