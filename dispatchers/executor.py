"""The executor of plan rows: singles, votes, cascades and agreements, with retries, per-model limits,
fallbacks, the budget guard and the ledger, one query at a time (many at once on one event loop).

Each call goes: reuse its outcome from the ledger if there is one, else reserve its cost bound -> durable
intent -> send -> append the outcome -> settle the billed cost. ``dispatchers.run`` feeds it the plan.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchplan.core.contracts import PLAN_KINDS, Status
from batchplan.dispatchers.base import MODEL_TROUBLE, RETRYABLE, Backend, CallRequest, CallResult
from batchplan.dispatchers.budget import BudgetGuard, Reservation, hold
from batchplan.dispatchers.ledger import Ledger, PriorCalls
from batchplan.dispatchers.limits import ModelGate, ModelLimits, OutputCaps, RetryPolicy

LOST = "lost"  # a call sent before a crash whose outcome never reached the ledger (non-idempotent backend)
# optional plan column: list[str], models to try, in order, when the plan's model fails or is down
FALLBACK_COLUMN = "fallback_models"
# A round of a run in rounds (batchplan.app.round_runner): call every listed model once (with the retries), all at
# once, and combine nothing: the round planner reads each call from the ledger and decides what comes next.
ROUND_CALLS = "calls"

Progress = Callable[[int, int], None]


@dataclass
class QueryRun:
    query_id: str
    kind: str
    models: list[str]
    thresholds: list[float]
    fallbacks: list[str]
    reserve_usd: float | None
    prompt: str | None
    system_prompt: str | None
    labels: tuple[str, ...] | None
    prior: PriorCalls | None
    tenant: str | None = None
    task: str | None = None
    charged_usd: float = 0.0
    calls: list[tuple[int, str]] = field(default_factory=list)  # (slot, model), first call of each
    recovered: dict[str, CallResult] = field(default_factory=dict)  # orphan intents resent on resume
    _slots_called: set[tuple[int, str]] = field(default_factory=set)

    @property
    def models_called(self) -> list[str]:
        """In plan order (slot), whatever order concurrent members completed in; fallbacks after their slot's model."""
        return [model for _, model in sorted(self.calls, key=lambda call: call[0])]

    def called(self, slot: int, model: str) -> None:
        if (slot, model) not in self._slots_called:
            self._slots_called.add((slot, model))
            self.calls.append((slot, model))


@dataclass
class DispatchStats:
    calls: int = 0
    reused: int = 0
    retries: int = 0
    fallbacks: int = 0
    lost: int = 0
    recovered: int = 0
    statuses: Counter[str] = field(default_factory=Counter)


class _Deferred(Exception):
    """The budget refused a call: the query is deferred."""


class Executor:
    def __init__(
        self,
        backend: Backend,
        budget: BudgetGuard,
        ledger: Ledger,
        run_id: str,
        *,
        limits: ModelLimits | Mapping[str, ModelLimits] | None,
        policy: RetryPolicy,
        max_tokens: int,
        max_tokens_open: int = 1024,
        tenant_budgets: Mapping[str, BudgetGuard] | None = None,
        output_caps: OutputCaps | None = None,
    ) -> None:
        self.backend = backend
        self.budget = budget
        self.tenant_budgets = dict(tenant_budgets or {})
        self.ledger = ledger
        self.run_id = run_id
        self.policy = policy
        self.max_tokens = max_tokens  # classification: a label is a few tokens
        self.max_tokens_open = max_tokens_open  # open tasks (labels null): code, free text
        self.output_caps = output_caps or OutputCaps(default=max_tokens_open)  # per (task, LLM), learned
        self.limits = limits
        self.gates: dict[str, ModelGate] = {}
        self.stats = DispatchStats()

    def gate(self, model: str) -> ModelGate:
        gate = self.gates.get(model)
        if gate is None:
            if isinstance(self.limits, ModelLimits):
                limits = self.limits
            elif self.limits is not None:
                limits = self.limits.get(model) or self.limits.get("*") or ModelLimits()
            else:
                limits = ModelLimits()
            gate = self.gates[model] = ModelGate(limits, self.policy)
        return gate

    # -- one attempt: reuse from the ledger, or reserve -> intent -> call -> ledger -> settle ---------
    async def attempt(self, q: QueryRun, slot: int, model: str, attempt: int, role: str) -> tuple[CallResult, bool]:
        """Returns (result, fresh); raises _Deferred when the budget refuses the call."""
        call = f"{slot}:{model}:{attempt}"
        if q.prior is not None and call in q.prior.calls:
            self.stats.reused += 1
            q.called(slot, model)
            return _from_event(q.prior.calls[call]), False
        if call in q.recovered:
            return q.recovered[call], False
        if q.prompt is None:
            return CallResult(model, Status.UNAVAILABLE, reason="query not in the queue"), False
        return await self.send(q, slot, model, call, role)

    async def send(self, q: QueryRun, slot: int, model: str, call: str, role: str) -> tuple[CallResult, bool]:
        """Reserve -> durable intent -> call -> ledger -> settle. Raises _Deferred when the budget refuses."""
        assert q.prompt is not None
        request = CallRequest(
            q.query_id,
            model,
            q.prompt,
            q.system_prompt,
            q.labels,
            key=f"{self.run_id}/{q.query_id}/{call}",
            max_tokens=self.max_tokens if q.labels is not None else self.output_caps.get(q.task, model),
        )
        bound = self.backend.cost_bound(request)
        reserve = bound if bound is not None else q.reserve_usd
        if reserve is None:
            why = "no cost bound: the backend gives none and the plan has no reserve_cost_usd"
            return CallResult(model, Status.UNAVAILABLE, reason=why), False
        held = await self.reserve(q, model, reserve)
        await self.ledger.append_durable({"e": "i", "q": q.query_id, "c": call, "m": model, "r": reserve})
        gate = self.gate(model)
        try:
            await gate.acquire(len(q.prompt) / 4 + request.max_tokens)
            try:
                result = await self.backend.call(request)
            finally:
                gate.release()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a backend bug must not leak the reservation; the bill is unknown
            result = CallResult(
                model, Status.CONNECTION, reason=f"backend raised {type(error).__name__}: {error}", billed_known=False
            )
        charged = result.cost_usd if result.billed_known else max(reserve, result.cost_usd)
        self.ledger.append(_to_event(q.query_id, call, result, charged, role))
        for guard, reservation in held:
            await guard.settle(reservation, charged)
        gate.record(result.status in MODEL_TROUBLE)
        if result.status == Status.RATE_LIMITED and result.retry_after_s:
            gate.pause(result.retry_after_s)
        self.stats.calls += 1
        self.stats.statuses[result.status] += 1
        q.charged_usd += charged
        q.called(slot, model)
        return result, True

    async def reserve(self, q: QueryRun, model: str, usd: float) -> list[tuple[BudgetGuard, Reservation]]:
        """Hold ``usd`` in the tenant's budget (if it has one) and the total, or in neither: raises _Deferred
        naming the budget that refused."""
        guards = [("total budget", self.budget)]
        if q.tenant in self.tenant_budgets:
            guards.insert(0, (f"tenant {q.tenant!r} budget", self.tenant_budgets[q.tenant]))
        held, refused = await hold(guards, usd)
        if refused is not None:
            name, guard = refused
            raise _Deferred(f"{name}: {model} needs up to {usd:.6g} USD, {guard.budget_usd - guard.spent_usd:.6g} USD left")
        return held

    async def ask_model(self, q: QueryRun, slot: int, model: str, role: str, *, can_fall_back: bool) -> CallResult:
        """Attempts on one model with retries; raises _Deferred."""
        result = CallResult(model, Status.UNAVAILABLE, reason="no attempt")
        for attempt in range(max(1, self.policy.max_attempts)):
            if attempt:
                self.stats.retries += 1
            result, fresh = await self.attempt(q, slot, model, attempt, role)
            if result.ok or result.status not in RETRYABLE | {LOST}:
                return result
            if result.status == Status.NOT_ANSWER and self.backend.deterministic:
                return result
            if can_fall_back and self.gate(model).is_down():
                return result
            if fresh and attempt + 1 < self.policy.max_attempts:
                await asyncio.sleep(self.policy.delay(attempt, result.retry_after_s))
        return result

    async def ask_slot(self, q: QueryRun, slot: int, chain: list[str], notes: list[str]) -> CallResult:
        """The plan's model for this step, then its fallbacks in order; raises _Deferred."""
        result = CallResult(chain[0], Status.UNAVAILABLE, reason="no model")
        for i, model in enumerate(chain):
            last = i == len(chain) - 1
            reused = q.prior is not None and f"{slot}:{model}:0" in q.prior.calls
            if not last and not reused and self.gate(model).is_down():
                notes.append(f"{model}: down (circuit open), skipped")
                continue
            result = await self.ask_model(q, slot, model, "fallback" if i else "plan", can_fall_back=not last)
            if result.ok:
                if i:
                    self.stats.fallbacks += 1
                    notes.insert(0, f"fallback to {model}")
                return result
            notes.append(_describe(result))
        return result

    # -- plan kinds -----------------------------------------------------------------------------------
    async def recover(self, q: QueryRun) -> None:
        """Calls sent before a crash whose outcome never reached the ledger, on an endpoint that honours
        idempotency keys: resend each under its own key (billed at most once, wherever the crash hit) and
        keep its outcome, so that no billed call stays out of the ledger. Raises _Deferred."""
        if q.prior is None or not q.prior.intents or q.prompt is None:
            return
        for call, intent in sorted(q.prior.intents.items()):
            slot, _, _ = call.partition(":")
            result, _ = await self.send(q, int(slot), str(intent.get("m")), call, "recovered")
            q.recovered[call] = result
            self.stats.recovered += 1
        q.prior.intents.clear()

    async def run(self, q: QueryRun) -> tuple[Any, ...]:
        notes: list[str] = []
        try:
            await self.recover(q)
            if q.kind == "defer":
                return _row(q, None, "deferred", "deferred by the plan")
            if q.kind == ROUND_CALLS:
                return await self._calls(q, notes)
            if q.kind not in PLAN_KINDS:
                return _row(q, None, "failed", f"unknown plan kind {q.kind!r}: one of {PLAN_KINDS}")
            if not q.models:
                return _row(q, None, "failed", "plan row has no models")
            if q.kind == "vote" and len(q.models) > 1:
                return await self._vote(q, notes)
            if q.kind == "cascade" and len(q.models) > 1:
                return await self._cascade(q, notes)
            if q.kind == "agreement" and len(q.models) == 3:
                return await self._agreement(q, notes)
            result = await self.ask_slot(q, 0, [q.models[0], *q.fallbacks], notes)
            if result.ok:
                return _row(q, result.answer, "done", "; ".join(notes) or None)
            return _row(q, None, "failed", "; ".join(notes))
        except _Deferred as deferred:
            return _row(q, None, "deferred", "; ".join([*notes, str(deferred)]))

    async def _vote(self, q: QueryRun, notes: list[str]) -> tuple[Any, ...]:
        outcomes = await asyncio.gather(*(self._vote_member(q, i, m) for i, m in enumerate(q.models)))
        answers = [r for r, _ in outcomes if r is not None and r.ok]
        for r, note in outcomes:
            if note:
                notes.append(note)
            elif r is not None and not r.ok:
                notes.append(_describe(r))
        if not answers:
            deferred = any(r is None for r, _ in outcomes)
            return _row(q, None, "deferred" if deferred else "failed", "; ".join(notes))
        tally: dict[str, tuple[int, float, int]] = {}
        for order, r in enumerate(answers):
            count, conf, first = tally.get(r.answer or "", (0, 0.0, order))
            tally[r.answer or ""] = (count + 1, conf + (r.logprob if r.logprob is not None else 0.0), first)
        winner = max(tally, key=lambda a: (tally[a][0], tally[a][1], -tally[a][2]))
        if len(answers) < len(q.models):
            notes.insert(0, f"vote of {len(answers)}/{len(q.models)}")
        return _row(q, winner, "done", "; ".join(notes) or None)

    async def _calls(self, q: QueryRun, notes: list[str]) -> tuple[Any, ...]:
        """Every listed model once, concurrently; ``done`` when each call was sent (whatever it answered),
        ``deferred`` naming the budget when one was refused (that call was never sent)."""
        outcomes = await asyncio.gather(*(self._vote_member(q, i, m) for i, m in enumerate(q.models)))
        refused = [note for r, note in outcomes if r is None and note]
        for r, _ in outcomes:
            if r is not None and not r.ok:
                notes.append(_describe(r))
        if refused:
            return _row(q, None, "deferred", "; ".join([*refused, *notes]))
        return _row(q, None, "done", "; ".join(notes) or None)

    async def _vote_member(self, q: QueryRun, slot: int, model: str) -> tuple[CallResult | None, str | None]:
        try:
            return await self.ask_slot(q, slot, [model], []), None
        except _Deferred as deferred:
            return None, f"{model}: {deferred}"

    async def _cascade(self, q: QueryRun, notes: list[str]) -> tuple[Any, ...]:
        answer: str | None = None
        for step, model in enumerate(q.models):
            try:
                result = await self.ask_slot(q, step, [model], notes)
            except _Deferred as deferred:
                if answer is None:
                    return _row(q, None, "deferred", "; ".join([*notes, str(deferred)]))
                notes.append(f"cascade stopped at step {step}: {deferred}")
                break
            if not result.ok:
                continue  # the next, stronger model stands in
            answer = result.answer
            confidence = math.exp(result.logprob) if result.logprob is not None else None
            if step < len(q.thresholds) and confidence is not None and confidence >= q.thresholds[step]:
                break
        if answer is None:
            return _row(q, None, "failed", "; ".join(notes))
        return _row(q, answer, "done", "; ".join(notes) or None)

    async def _agreement(self, q: QueryRun, notes: list[str]) -> tuple[Any, ...]:
        """Ask the two cheap members together; if they agree, done; else the third decides (plan_simulation)."""
        first, second = await asyncio.gather(self._vote_member(q, 0, q.models[0]), self._vote_member(q, 1, q.models[1]))
        given = [r for r, _ in (first, second) if r is not None and r.ok]
        for r, note in (first, second):
            if note:
                notes.append(note)
            elif r is not None and not r.ok:
                notes.append(_describe(r))
        if len(given) == 2 and given[0].answer == given[1].answer:
            return _row(q, given[0].answer, "done", "; ".join(notes) or None)
        try:
            third = await self.ask_slot(q, 2, [q.models[2]], notes)
        except _Deferred as deferred:
            if not given:
                return _row(q, None, "deferred", "; ".join([*notes, str(deferred)]))
            notes.append(f"escalation deferred: {deferred}")
            return _row(q, given[0].answer, "done", "; ".join(notes))
        if third.ok:
            return _row(q, third.answer, "done", "; ".join(notes) or None)
        notes.append(_describe(third))
        if given:
            return _row(q, given[0].answer, "done", "; ".join(notes))
        return _row(q, None, "failed", "; ".join(notes))


def _row(q: QueryRun, answer: str | None, status: str, text: str | None) -> tuple[Any, ...]:
    """A RESULT_SCHEMA row; ``text`` is the error of a query not done, or the note of one done."""
    cost = q.charged_usd + (q.prior.charged_usd if q.prior is not None else 0.0)
    error, note = (None, text or None) if status == "done" else (text, None)
    return (q.query_id, answer, q.models_called, cost, status, error, note)


def _describe(result: CallResult) -> str:
    text = f"{result.model}: {result.status}"
    if result.reason:
        text += f" ({result.reason})"
    if result.raw and result.status == Status.NOT_ANSWER:
        text += f" raw={result.raw[:80]!r}"
    return text


def _to_event(query_id: str, call: str, r: CallResult, charged: float, role: str) -> dict[str, Any]:
    event: dict[str, Any] = {
        "e": "c",
        "q": query_id,
        "c": call,
        "m": r.model,
        "s": r.status,
        "usd": charged,
        "role": role,
    }
    for key, value in (
        ("a", r.answer),
        ("raw", r.raw[:2000] if r.raw else None),
        ("why", r.reason),
        ("lp", r.logprob),
        ("ti", r.tokens_in),
        ("to", r.tokens_out),
        ("ms", r.latency_ms),
    ):
        if value is not None:
            event[key] = value
    if not r.billed_known:
        event["bk"] = False
    return event


def _from_event(event: dict[str, Any]) -> CallResult:
    return CallResult(
        model=str(event.get("m")),
        status=str(event.get("s")),
        answer=event.get("a"),
        raw=event.get("raw"),
        reason=event.get("why"),
        cost_usd=float(event.get("usd") or 0.0),
        billed_known=bool(event.get("bk", True)),
        tokens_in=event.get("ti"),
        tokens_out=event.get("to"),
        logprob=event.get("lp"),
    )
