"""The one interface every backend speaks, the outcome of one call, and answer parsing.

A backend turns one ``CallRequest`` (a query sent to one model) into one ``CallResult`` (what came back,
what it cost, whether it is an answer). It knows nothing about plans, budgets, retries or the ledger:
those live in the executor, the same for every backend.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Final

import polars as pl

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import Status
from batchplan.dispatchers.limits import OutputCaps

# What one attempt of a call can be billed at most: ``bound_usd`` (what the budget guard reserves), and its
# parts where the backend prices tokens: USD per input token and the output's bound (max_tokens x price).
# An ambiguous failure is charged ``bound_usd``; once a later call of the same model on the same query
# reports its input tokens (the same prompt tokenizes the same), tokens_in x usd_per_token_in +
# output_bound_usd bounds that failure's bill too (batchplan.app.round_runner tightens its charge so).
BOUNDS_SCHEMA: Final = pl.Schema(
    {
        "query_id": pl.String(),
        "model": pl.String(),
        "bound_usd": pl.Float64(),
        "usd_per_token_in": pl.Float64(),
        "output_bound_usd": pl.Float64(),
    }
)

RETRYABLE: Final = frozenset(
    {Status.NOT_ANSWER, Status.RATE_LIMITED, Status.SERVER_ERROR, Status.TIMEOUT, Status.CONNECTION}
)
# Failures that say the model (not the query) is in trouble: they feed the per-model circuit breaker.
MODEL_TROUBLE: Final = frozenset({Status.RATE_LIMITED, Status.SERVER_ERROR, Status.TIMEOUT, Status.CONNECTION})


@dataclass(frozen=True, slots=True)
class CallRequest:
    query_id: str
    model: str
    prompt: str
    system_prompt: str | None
    labels: tuple[str, ...] | None
    key: str  # idempotency key, stable across reruns: "<run_id>/<query_id>/<call>"
    max_tokens: int = 16


@dataclass(slots=True)
class CallResult:
    model: str
    status: str
    answer: str | None = None
    raw: str | None = None  # the model's text (or the body) as received, kept for non-answers
    reason: str | None = None  # why this is not an answer / why it failed
    cost_usd: float = 0.0  # billed (usage x price, or the provider's own cost figure)
    billed_known: bool = True  # False when the call may have been billed but we cannot tell (timeout, reset)
    tokens_in: int | None = None
    tokens_out: int | None = None
    logprob: float | None = None  # log-probability of the answer, when the endpoint returns logprobs
    retry_after_s: float | None = None
    latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


class Backend(ABC):
    """A place that answers (query, model) calls and bills them."""

    name: str = "backend"
    #: the endpoint deduplicates on ``CallRequest.key``: resending a key after a crash is not billed twice
    idempotent: bool = False
    #: the same call always gives the same outcome: retrying a non-answer is pointless
    deterministic: bool = False
    #: why ``offered_pairs`` may leave a query without any model, in the user's words
    unoffered_reason: str = "the backend offers no model for it"

    @property
    @abstractmethod
    def catalog(self) -> PriceCatalog:
        """Prices this backend bills at."""

    @abstractmethod
    def offered_pairs(self, queue: pl.DataFrame) -> pl.DataFrame:
        """(query_id, model) pairs this backend can serve for ``queue`` (a QUEUE_SCHEMA frame)."""

    def cost_bound(self, request: CallRequest) -> float | None:
        """A hard upper bound on what this call can be billed, or None if the backend cannot give one."""
        return None

    def cost_bounds(self, queue: pl.DataFrame, pairs: pl.DataFrame, caps: OutputCaps | None = None) -> pl.DataFrame:
        """``cost_bound`` of one attempt for every (query_id, model) in ``pairs``, as BOUNDS_SCHEMA (nulls
        where unknown); ``caps``: the max_tokens the executor sends (default: no learned caps)."""
        caps = caps or OutputCaps()
        texts = queue.select("query_id", "prompt", "system_prompt", "labels", "task")
        rows = pairs.select("query_id", "model").join(texts, on="query_id", how="left", maintain_order="left")
        bounds = []
        for query_id, model, prompt, system_prompt, labels, task in rows.iter_rows():
            tokens = caps.closed if labels is not None else caps.get(task, model)
            request = CallRequest(query_id, model, prompt or "", system_prompt, labels, key="", max_tokens=tokens)
            bounds.append(self.cost_bound(request))
        frame = rows.select("query_id", "model").with_columns(pl.Series("bound_usd", bounds, dtype=pl.Float64))
        return frame.with_columns(
            pl.lit(None, dtype=pl.Float64).alias("usd_per_token_in"),
            pl.lit(None, dtype=pl.Float64).alias("output_bound_usd"),
        )

    @abstractmethod
    async def call(self, request: CallRequest) -> CallResult:
        """Send one call. Never raises for provider trouble: returns a CallResult with a failure status."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once when a dispatch ends."""


def answer_result(
    request: CallRequest, answer: str | None, why: str | None, *, cut: bool, logprob: float | None = None, **billed: Any
) -> CallResult:
    """What a live endpoint's 200 comes to, ``billed`` as it reports (raw, cost_usd, billed_known, tokens,
    latency_ms). ``cut``: the endpoint cut the text at ``max_tokens`` (finish_reason "length", stopReason
    "max_tokens"): an open answer so cut is TRUNCATED (a cut free-text answer is not the answer the LLM would
    give). Else NOT_ANSWER where ``parse_answer`` found none (``why``), or the answer."""
    if request.labels is None and cut:
        return CallResult(request.model, Status.TRUNCATED, reason=f"cut at max_tokens={request.max_tokens}", **billed)
    if answer is None:
        return CallResult(request.model, Status.NOT_ANSWER, reason=why, **billed)
    return CallResult(request.model, Status.OK, answer=answer, logprob=logprob, **billed)


# --- answer parsing -------------------------------------------------------------------------------------

_REFUSAL = re.compile(
    r"\b(i\s+(?:can(?:no|')t|cannot|won't|am unable|'m unable|am not able)|as an ai\b|i'm sorry|i apologi[sz]e|unable to (?:help|assist|answer))",
    re.IGNORECASE,
)
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:correct\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)
_TRIM = " \t\r\n.,;:!\"'`*()[]{}"


def parse_answer(text: str | None, labels: tuple[str, ...] | None) -> tuple[str | None, str | None]:
    """Map a model's text to one of ``labels``; returns (answer, None) or (None, reason).

    Accepts the bare label ("B"), decorated forms ("(B)", "B.", "Answer: B", "**B**"), a JSON object
    ``{"answer": "B"}`` and a label followed by its explanation ("B) because ..."). Reasons: ``empty``,
    ``malformed_json``, ``refusal``, ``outside_labels``. Open tasks (labels None) take any non-empty text.
    """
    if text is None or not text.strip():
        return None, "empty"
    stripped = text.strip()
    if stripped.startswith("{") or stripped.startswith("```json"):
        body = stripped.removeprefix("```json").removesuffix("```").strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None, "malformed_json"
        value = obj.get("answer", obj.get("label")) if isinstance(obj, dict) else None
        if not isinstance(value, str | int):
            return None, "malformed_json"
        stripped = str(value)
    if labels is None:
        return stripped, None
    by_fold = {label.casefold(): label for label in labels}
    candidate = _ANSWER_PREFIX.sub("", stripped).strip(_TRIM)
    if candidate.casefold() in by_fold:
        return by_fold[candidate.casefold()], None
    # "B) because ...", "B. Paris": a label as the first token
    first = re.split(r"[\s.):,;]+", candidate, maxsplit=1)[0].strip(_TRIM) if candidate else ""
    if first and first.casefold() in by_fold:
        return by_fold[first.casefold()], None
    if _REFUSAL.search(stripped):
        return None, "refusal"
    return None, "outside_labels"
