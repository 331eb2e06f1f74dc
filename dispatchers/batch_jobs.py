"""What every provider's batch sender shares: a round's batch calls as job lines, their reservations, settlement.

A round's calls (ROUND_PLAN_SCHEMA rows whose ``mode`` is batch) become **lines**, one per (query, LLM).
``group_jobs`` makes one job per LLM, split at the provider's record limit (``BatchTerms.max_records``); an
LLM with fewer lines than the provider's minimum (``min_records``: Bedrock refuses smaller jobs) goes in real
time instead, and says so (``fallbacks``, logged and written beside the jobs).

``JobBudget`` keeps the hard caps across asynchronous jobs: every line reserves its high side (the backend's
hard cost bound of the call x the batch discount) in the total's and its tenant's budget guard *before* its
job is submitted; a line that does not fit is refused (never sent). The job's output settles each line at
what its usage bills at the batch price; a line that failed or never came back (job stopped at the
deadline, expired, failed) is released, charged nothing, and goes back to the planner as a failed
observation. So the cap never depends on the provider finishing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from batchplan.core.catalog import BatchTerms
from batchplan.core.contracts import DEFAULT_TENANT
from batchplan.core.rounds import BATCH, OBSERVATION_MODE, OBSERVATION_SCHEMA, REALTIME
from batchplan.dispatchers.base import Backend, CallRequest, CallResult
from batchplan.dispatchers.budget import BudgetGuard, Reservation

REFUSED_BY_BUDGET = "budget: the batch line's high side does not fit what is left of the budget"


@dataclass(frozen=True)
class Line:
    """One call of a batch job."""

    record_id: str  # the provider's per-line id (Bedrock recordId, OpenAI custom_id)
    query_id: str
    model: str
    tenant: str
    request: CallRequest
    reserve_usd: float  # high side at the batch price
    call: str = "0"  # the executor's call key in the ledger: <slot>:<model>:0 (slot: the LLM's place in the row)


@dataclass
class Jobs:
    jobs: list[list[Line]] = field(default_factory=list)  # one LLM each, at most max_records lines
    realtime: list[Line] = field(default_factory=list)  # lines of LLMs below the minimum: sent in real time
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # model, records, min_records


def batch_lines(
    calls: pl.DataFrame,
    queue: pl.DataFrame,
    backend: Backend,
    discount: Mapping[str, float],
    *,
    run_key: str,
    max_tokens: int,
    max_tokens_open: int,
) -> list[Line]:
    """The lines of ``calls``' batch rows, in row order; record ids ``r<10 digits>`` (Bedrock's 11 characters)."""
    rows = (
        calls.filter(pl.col("mode").fill_null(REALTIME) == BATCH)
        .with_columns(pl.int_ranges(pl.col("models").list.len()).alias("_slot"))
        .explode("models", "_slot")
        .drop_nulls("models")
    )
    info = queue.select(
        "query_id", "prompt", "system_prompt", "labels", pl.col("tenant").fill_null(DEFAULT_TENANT)
    ).rows_by_key("query_id", unique=True)
    out = []
    for i, (query_id, model, reserve, slot) in enumerate(
        rows.select("query_id", "models", "reserve_cost_usd", "_slot").iter_rows()
    ):
        prompt, system_prompt, labels, tenant = info[query_id]
        request = CallRequest(
            query_id, model, prompt, system_prompt, tuple(labels) if labels is not None else None,
            key=f"{run_key}/{query_id}/{model}", max_tokens=max_tokens if labels is not None else max_tokens_open,
        )  # fmt: skip
        bound = backend.cost_bound(request)
        # the hard bound at the batch price; the plan's reserve where the backend has no list price
        high = bound * discount.get(model, 1.0) if bound is not None else float(reserve or 0.0)
        out.append(Line(f"r{i:010d}", query_id, model, tenant, request, high, f"{slot}:{model}:0"))
    return out


def group_jobs(lines: Iterable[Line], terms: BatchTerms) -> Jobs:
    """One job per LLM (``terms.max_records`` lines at most); an LLM under ``terms.min_records`` lines goes
    in real time (``Jobs.realtime``, named in ``Jobs.fallbacks``)."""
    by_model: dict[str, list[Line]] = {}
    for line in lines:
        by_model.setdefault(line.model, []).append(line)
    jobs = Jobs()
    for model, group in sorted(by_model.items()):
        if len(group) < terms.min_records:
            jobs.realtime.extend(group)
            jobs.fallbacks.append({"model": model, "records": len(group), "min_records": terms.min_records})
            continue
        jobs.jobs.extend(group[i : i + terms.max_records] for i in range(0, len(group), terms.max_records))
    return jobs


class JobBudget:
    """The total's and each tenant's budget guard over a round's batch lines (module docstring)."""

    def __init__(self, budget_usd: float, tenant_budgets_usd: Mapping[str, float]) -> None:
        self.total = BudgetGuard(max(budget_usd, 0.0))
        self.tenants = {t: BudgetGuard(max(b, 0.0)) for t, b in tenant_budgets_usd.items()}
        self._held: dict[str, list[tuple[BudgetGuard, Reservation]]] = {}

    def reserve(self, line: Line) -> bool:
        """Hold the line's high side in the total and its tenant's budget; False (nothing held): refused."""
        guards = [self.total, *([self.tenants[line.tenant]] if line.tenant in self.tenants else [])]
        held: list[tuple[BudgetGuard, Reservation]] = []
        for guard in guards:
            reservation = guard.try_reserve(line.reserve_usd)
            if reservation is None:
                for g, r in held:
                    g.settle_now(r, 0.0)
                return False
            held.append((guard, reservation))
        self._held[line.record_id] = held
        return True

    def settle(self, line: Line, charged_usd: float) -> None:
        """The line's bill (0: released). Each reserved line is settled exactly once."""
        for guard, reservation in self._held.pop(line.record_id):
            guard.settle_now(reservation, charged_usd)

    def left_usd(self) -> tuple[float, dict[str, float]]:
        """What the budgets leave beside every line held or settled (the real-time part of the round gets it)."""
        def left(g: BudgetGuard) -> float:
            return max(g.budget_usd - g.spent_usd - g.reserved_usd, 0.0)

        return left(self.total), {t: left(g) for t, g in self.tenants.items()}


def observation(line: Line, round: int, result: CallResult, discount: float) -> dict[str, Any]:
    """An OBSERVATION_SCHEMA row (with its mode) for one line of a job, billed at the batch price."""
    return {
        "query_id": line.query_id,
        "round": round,
        "model": line.model,
        "status": result.status,
        "answer": result.answer if result.ok else None,
        "logprob": result.logprob,
        "cost_usd": result.cost_usd * discount,
        "billed_known": result.billed_known,
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        OBSERVATION_MODE: BATCH,
    }


def observations_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=pl.Schema({**OBSERVATION_SCHEMA, OBSERVATION_MODE: pl.String()}))
