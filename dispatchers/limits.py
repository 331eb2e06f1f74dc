"""Per-model limits: concurrency, requests/min, tokens/min, Retry-After pauses, and a circuit breaker.

One ``ModelGate`` per model, shared by every worker of a dispatch (one event loop, so no locks needed
beyond asyncio's own primitives).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl

MAX_TOKENS = 16  # classification: a label is a few tokens
MAX_TOKENS_OPEN = 1024  # open tasks (labels null) with no learned cap: code, free text


@dataclass(frozen=True)
class ModelLimits:
    """``None`` means unlimited. Token counts are estimated before the call (prompt bytes / 4 + max_tokens)."""

    concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


@dataclass(frozen=True)
class OutputCaps:
    """``max_tokens`` of an open task's calls (labels null) per (task, LLM), learned from the outcome history.

    ``max_tokens`` is sent with every call and enters its hard cost bound (the budget guard's reservation, and
    the charge of a call whose bill is unknown). A flat 1024 on answers whose p99.9 is ~100 tokens makes every
    ambiguous failure cost ~10x a bill; a cap a little above what the history's answers ran makes the bound
    honest. An answer that reaches its cap comes back ``truncated`` (not retried, not an answer): the round
    planner asks another LLM. Pairs without enough recorded answers keep ``default``; a classification call
    (labels known) is sent ``closed``."""

    caps: Mapping[tuple[str, str], int] = field(default_factory=dict)
    default: int = MAX_TOKENS_OPEN
    closed: int = MAX_TOKENS

    QUANTILE = 0.99  # of the recorded tokens_out per (task, LLM)
    MARGIN = 2.0  # x the quantile, + SLACK tokens: measured on cascades_open, 0.1% of test calls truncated
    SLACK = 16
    MIN_ANSWERS = 30  # fewer recorded answers: the quantile is noise, keep the default

    def get(self, task: str | None, model: str) -> int:
        return self.caps.get((task or "", model), self.default)

    @classmethod
    def learn(cls, outcomes: pl.DataFrame, default: int = MAX_TOKENS_OPEN) -> OutputCaps:
        """From outcome rows with ``task``, ``model``, ``tokens_out`` and ``labels`` (open tasks: null)."""
        frame = (
            outcomes.filter(pl.col("labels").is_null() & pl.col("tokens_out").is_not_null())
            .group_by("task", "model")
            .agg(pl.col("tokens_out").quantile(cls.QUANTILE, interpolation="higher").alias("q"), pl.len())
            .filter(pl.col("len") >= cls.MIN_ANSWERS)
        )
        caps = {
            (str(task), str(model)): min(default, math.ceil(cls.MARGIN * float(q)) + cls.SLACK)
            for task, model, q, _ in frame.iter_rows()
        }
        return cls(caps, default)

    def frame(self) -> pl.DataFrame:
        """task, model, max_tokens (for joins)."""
        rows = [(t, m, n) for (t, m), n in sorted(self.caps.items())]
        return pl.DataFrame(rows, schema={"task": pl.String, "model": pl.String, "max_tokens": pl.Int64}, orient="row")

    def to_json(self) -> str:
        return json.dumps({"default": self.default, "caps": [[t, m, n] for (t, m), n in sorted(self.caps.items())]})

    @classmethod
    def from_json(cls, text: str) -> OutputCaps:
        data = json.loads(text)
        return cls({(str(t), str(m)): int(n) for t, m, n in data["caps"]}, int(data["default"]))


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per (query, model) before falling back; exponential backoff with full jitter."""

    max_attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 30.0
    #: consecutive model-trouble failures (429, 5xx, timeouts, resets) that mark a model down
    down_after: int = 8
    #: how long a model stays down before one probe call is let through
    down_cooldown_s: float = 15.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        backoff = random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * (2**attempt)))
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_delay_s) + backoff * 0.1
        return backoff


class TokenBucket:
    """``rate`` units per second, bursts up to ``capacity`` (one second's worth by default, at least 1)."""

    def __init__(self, per_minute: float, capacity: float | None = None) -> None:
        self.rate = per_minute / 60.0
        self.capacity = capacity if capacity is not None else max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, n: float = 1.0) -> None:
        need = min(n, self.capacity)  # a single request larger than the burst waits for a full bucket
        while True:
            self._refill()
            if self.level >= need:
                self.level -= n  # may go negative: the debt is paid by later waits
                return
            await asyncio.sleep((need - self.level) / self.rate)


class ModelGate:
    def __init__(self, limits: ModelLimits, policy: RetryPolicy) -> None:
        self._sem = asyncio.Semaphore(limits.concurrency) if limits.concurrency else None
        self._requests = TokenBucket(limits.requests_per_minute) if limits.requests_per_minute else None
        self._tokens = TokenBucket(limits.tokens_per_minute) if limits.tokens_per_minute else None
        self._policy = policy
        self.paused_until = 0.0
        self.down_until = 0.0
        self.consecutive_trouble = 0
        self.calls = 0
        self.pauses = 0
        self.trips = 0

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    async def acquire(self, tokens: float) -> None:
        while True:
            wait = self.paused_until - time.monotonic()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        if self._requests is not None:
            await self._requests.take(1.0)
        if self._tokens is not None:
            await self._tokens.take(tokens)
        if self._sem is not None:
            await self._sem.acquire()
        self.calls += 1

    def release(self) -> None:
        if self._sem is not None:
            self._sem.release()

    def pause(self, seconds: float) -> None:
        """Honour a Retry-After: no call to this model starts before it has passed."""
        self.pauses += 1
        self.paused_until = max(self.paused_until, time.monotonic() + min(seconds, self._policy.max_delay_s))

    def record(self, trouble: bool) -> None:
        if not trouble:
            self.consecutive_trouble = 0
            return
        self.consecutive_trouble += 1
        if self.consecutive_trouble >= self._policy.down_after and not self.is_down():
            self.trips += 1
            self.down_until = time.monotonic() + self._policy.down_cooldown_s
            self.consecutive_trouble = self._policy.down_after - 1  # half-open: one more failure re-trips
