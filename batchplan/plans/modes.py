"""Dispatch modes as the planners price them: real time, or a provider's batch API at its batch price.

A batch call is billed ``discount`` x its on-demand price (0.5 at OpenAI and Bedrock, ``core.catalog``) and
answered later: typically within ``typical_hours``, at worst within ``worst_hours`` (the completion window;
what is not done by then expires, unbilled). Without a deadline every round may go by batch (the run waits
for each). With one (``--deadline``), the rule, per round k of N with ``left`` hours to the deadline:

- the rounds after this one each keep ``realtime_round_hours`` (they may have to go in real time), so this
  round has ``window = left - (N - k) x realtime_round_hours``;
- a round **before the last** goes by batch when ``window >= typical_hours``: it is planned with the
  typical turnaround; a job that has not returned by the end of its window is stopped and its open lines go
  back to the planner, with the later rounds' real time still ahead of the deadline;
- the **last** round has nothing after it to pick up a batch that overruns: a batch call there is worth
  P(turnaround <= window) of its value (``turnaround_cdf``: 1 once the worst case fits), and the optimizer
  weighs it against real time query by query (real time for the queries whose gain is worth the full price).

So on a short night a cascade's cheap first stage goes by batch (round 1) and its few escalations by real
time (the last round), and on a night too short for one typical turnaround every round goes in real time.
The share returned is the probability a batch call of the round is answered in time; 1 prices the round at
batch prices with no real-time option (same value, dearer), 0 offers real time only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from batchplan.core.catalog import BatchTerms, PriceCatalog
from batchplan.core.rounds import BATCH

REALTIME_ROUND_HOURS = 0.25  # a real-time round of a nightly batch: calls at once, retries, backoff


def turnaround_cdf(hours: float, terms: BatchTerms) -> float:
    """P(a batch job returns within ``hours``): piecewise linear through 0 at 0, 1/2 at the typical
    turnaround (a median) and 1 at the worst case (the provider's completion window)."""
    if hours >= terms.worst_hours:
        return 1.0
    if hours <= 0:
        return 0.0
    if hours <= terms.typical_hours:
        return 0.5 * hours / terms.typical_hours
    return 0.5 + 0.5 * (hours - terms.typical_hours) / max(terms.worst_hours - terms.typical_hours, 1e-9)


@dataclass(frozen=True)
class BatchModes:
    """The batch mode a run may use: per-LLM discounts (LLMs without a batch API absent), the backend's
    turnaround, the deadline (POSIX seconds; None: no bound) and the clock it is read against."""

    discounts: Mapping[str, float]
    terms: BatchTerms = field(default_factory=BatchTerms)
    deadline: float | None = None
    realtime_round_hours: float = REALTIME_ROUND_HOURS
    clock: Callable[[], float] = time.time

    @classmethod
    def from_catalog(
        cls, catalog: PriceCatalog, models: list[str], terms: BatchTerms, *, queries: int | None = None, **options: object
    ) -> BatchModes:
        """``queries``: the batch's size; a round calls an LLM at most once per query, so below the provider's
        per-job minimum record count no LLM can go by batch: none is offered a batch price."""
        discounts = {m: d for m in models if (d := catalog.batch_discount(m)) is not None}
        if queries is not None and queries < terms.min_records:
            discounts = {}
        return cls(discounts=discounts, terms=terms, **options)  # type: ignore[arg-type]

    def hours_left(self) -> float | None:
        return None if self.deadline is None else (self.deadline - self.clock()) / 3600.0

    def batch_share(self, round: int, rounds: int, hours_left: float | None = None) -> float:
        """P(a batch call of round ``round`` (1-based) of ``rounds`` is answered in time), by the module's rule;
        ``hours_left``: to the deadline (default: from the clock)."""
        if not self.discounts:
            return 0.0
        left = self.hours_left() if hours_left is None else hours_left
        if left is None:
            return 1.0
        window = left - (rounds - round) * self.realtime_round_hours
        if round < rounds:
            return 1.0 if window >= self.terms.typical_hours else 0.0
        return turnaround_cdf(window, self.terms)

    def next_share(self, round: int, rounds: int) -> float:
        """``batch_share`` of the round after ``round``, were this one to take its mode's typical time."""
        if round >= rounds:
            return 0.0
        left = self.hours_left()
        if left is None:
            return self.batch_share(round + 1, rounds, None)
        took = self.terms.typical_hours if self.batch_share(round, rounds, left) >= 1 else self.realtime_round_hours
        return self.batch_share(round + 1, rounds, left - took)

    def short_of_minimum(self, batch_calls: Mapping[str, int]) -> list[str]:
        """The LLMs whose batch calls in a round (``batch_calls``: LLM -> count) are fewer than the provider's
        per-job minimum (``BatchTerms.min_records``: Bedrock's 100): such a job is refused, so its calls go in
        real time and must be priced so."""
        return sorted(m for m, n in batch_calls.items() if 0 < n < self.terms.min_records and m in self.discounts)

    def without(self, models: Sequence[str]) -> BatchModes:
        """These modes with ``models`` in real time only (no batch price for them)."""
        return replace(self, discounts={m: d for m, d in self.discounts.items() if m not in set(models)})

    def discount_of(self, models: list[str]) -> np.ndarray:
        """[M]: each LLM's batch discount, nan where it has no batch API."""
        return np.array([self.discounts.get(m, np.nan) for m in models], dtype=float)


@dataclass
class SimulatedClock:
    """A night's clock for replays (benches, tests): a round with a batch call takes the typical turnaround,
    one in real time ``realtime_round_hours``. Pass it as ``BatchModes.clock`` and ``after_round`` to
    ``round_replay.simulate_rounds``."""

    terms: BatchTerms = field(default_factory=BatchTerms)
    realtime_round_hours: float = REALTIME_ROUND_HOURS
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def after_round(self, calls: pl.DataFrame) -> None:
        batch = "mode" in calls.columns and bool((calls["mode"] == BATCH).any())
        self.now += 3600.0 * (self.terms.typical_hours if batch else self.realtime_round_hours)


def batch_priced(predictions: pl.DataFrame, discounts: Mapping[str, float]) -> pl.DataFrame:
    """Predictions at batch prices (single shot with the batch API: every call goes by batch): expected and
    high-side cost x the LLM's discount; LLMs without a batch API keep their on-demand price."""
    factor = pl.col("model").replace_strict(dict(discounts), default=1.0, return_dtype=pl.Float64)
    return predictions.with_columns(pl.col("cost_usd") * factor, pl.col("cost_high_usd") * factor)
