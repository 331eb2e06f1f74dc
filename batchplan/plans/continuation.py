"""``PlanContinuation``: the round planner that runs a single-shot plan (``plan_batch``) one step per round.

Round 1 sends the first call(s) of every plan row: single -> its model, vote -> every member, cascade ->
its first member, agreement -> its first two. Round k sends what the plan kind's rule calls next
(``batchplan.plans.simulation``, the executor's semantics): the cascade's next member while the last
answer's confidence is below its threshold (or the member failed), the agreement's third when the two
disagree or one failed, a single's next fallback when its model failed. Answers follow the same rules, so
with enough rounds (the deepest plan's length) a run gives exactly the single-shot run's answers, calls
and costs: the parity that pins the round runner's contract.

On top of the plan, what only rounds can do:

- a query whose calls all failed *transiently* (429, 5xx, timeouts, resets: nothing about the query) is
  called again in the next round;
- each round is fitted to the budget really left, with the cost drift observed so far (what earlier
  rounds charged over what their calls were expected to cost: fault charges, longer answers): queries
  with no answer yet come first, moved to their cheapest LLM when the money is short, and escalations
  of queries that have an answer take what remains;
- the last round spends what is left on queries the plan deferred, cheapest LLM first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from batchplan.core.contracts import Status
from batchplan.core.rounds import ROUND_ANSWER_SCHEMA, ROUND_PLAN_SCHEMA, TRANSIENT, RoundPlan, RoundState

MIN_DRIFT = 0.5  # a batch billed below its estimates still plans on at least half of them


@dataclass
class _Seen:
    """What the observations say about one query."""

    ok: dict[str, tuple[str | None, float | None]] = field(default_factory=dict)  # model -> first answer
    failures: dict[str, list[str]] = field(default_factory=dict)  # model -> statuses of failed calls

    @property
    def tried(self) -> set[str]:
        return set(self.ok) | set(self.failures)

    def transient_only(self, model: str) -> bool:
        return model not in self.ok and all(s in TRANSIENT for s in self.failures.get(model, ["-"]))


@dataclass(frozen=True)
class _Row:
    kind: str
    models: tuple[str, ...]
    thresholds: tuple[float, ...]
    fallbacks: tuple[str, ...]
    expected_accuracy: float | None


class PlanContinuation:
    """A ``RoundPlanner`` (``batchplan.core.rounds``) over a PLAN_SCHEMA frame (kind "defer" rows included)."""

    def __init__(self, plan: pl.DataFrame) -> None:
        self._rows: dict[str, _Row] = {}
        fallbacks = "fallback_models" in plan.columns
        for row in plan.iter_rows(named=True):
            self._rows[row["query_id"]] = _Row(
                kind=row["kind"],
                models=tuple(row["models"] or ()),
                thresholds=tuple(row.get("thresholds") or ()),
                fallbacks=tuple(row.get("fallback_models") or ()) if fallbacks else (),
                expected_accuracy=row.get("expected_accuracy"),
            )

    # -- what to call -----------------------------------------------------------------------------------
    def plan_round(self, state: RoundState) -> RoundPlan:
        seen = _seen(state.observations)
        wanted: list[tuple[str, list[str], bool]] = []  # (query, models, answering: no answer yet)
        for query_id, row in self._rows.items():
            got = seen.get(query_id, _Seen())
            models = self._next(row, got)
            if models:
                wanted.append((query_id, models, not got.ok))
        costs = _Costs(state)
        # where the money is short an answering query moves to its cheapest LLM, unless that LLM already
        # failed on it for good (a cut or refused answer): the same call again is billed again for the same
        # result (a kill-9 rerun's rounds 2 and 3 both moved a reset query to an LLM that cut its answer)
        cheapest = {
            q: cheap
            for q, _, _ in wanted
            if (cheap := costs.cheapest(q)) is not None
            and (cheap not in (got := seen.get(q, _Seen())).tried or got.transient_only(cheap))
        }
        planned, diagnostics = _fit(wanted, costs, state.budget_left_usd, cheapest)
        if state.last and state.budget_left_usd is not None:
            extra = [
                (q, [cheap])
                for q, row in self._rows.items()
                if row.kind == "defer" and not seen.get(q, _Seen()).ok and (cheap := costs.cheapest(q)) is not None
            ]
            left = state.budget_left_usd - sum(costs.estimate(q, m) for q, ms in planned for m in ms)
            added = _greedy(sorted(extra, key=lambda x: costs.estimate(x[0], x[1][0])), costs, left)
            planned += added
            diagnostics["deferred_by_plan_answered"] = len(added)
        p_row = {q: r.expected_accuracy for q, r in self._rows.items()}
        calls = pl.DataFrame(
            {
                "query_id": [q for q, _ in planned],
                "models": [ms for _, ms in planned],
                "expected_cost_usd": [sum(costs.expected(q, m) for m in ms) for q, ms in planned],
                "reserve_cost_usd": [sum(costs.bound(q, m) for m in ms) for q, ms in planned],
                "expected_accuracy": [p_row.get(q) for q, _ in planned],
                "mode": [None] * len(planned),  # the sender's default (real time, or batch with --batch-api)
            },
            schema=ROUND_PLAN_SCHEMA,
        )
        return RoundPlan(calls=calls, diagnostics={"planner": "plan", "cost_drift": costs.drift, **diagnostics})

    def _next(self, row: _Row, got: _Seen) -> list[str]:
        if row.kind == "defer" or not row.models:
            return []
        models = list(row.models)
        if row.kind == "vote" and len(models) > 1:
            missing = [m for m in models if m not in got.tried]
            return missing or [m for m in models if m in got.failures and got.transient_only(m)]
        if row.kind == "cascade" and len(models) > 1:
            for i, model in enumerate(models):
                if model not in got.tried:
                    return [model]
                if model in got.ok and (i == len(models) - 1 or _confident(got.ok[model][1], row.thresholds, i)):
                    return []
            return [] if got.ok else _retry(models, got)
        if row.kind == "agreement" and len(models) == 3:
            first = [m for m in models[:2] if m not in got.tried]
            if first:
                return first
            a, b = (got.ok.get(m) for m in models[:2])
            if a is not None and b is not None and a[0] == b[0]:
                return []
            if models[2] not in got.tried:
                return [models[2]]
            return [] if got.ok else _retry(models, got)
        chain = [models[0], *row.fallbacks]
        if any(m in got.ok for m in chain):
            return []
        untried = [m for m in chain if m not in got.tried]
        return untried[:1] or _retry(chain, got)

    # -- which answer each query keeps ------------------------------------------------------------------
    def answers(self, queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
        seen = _seen(observations)
        p_model = {(q, m): p for q, m, p in predictions.select("query_id", "model", "p_correct").iter_rows()}
        rows: list[tuple[str, str | None, float | None, str | None]] = []
        for query_id in queue["query_id"].to_list():
            row = self._rows.get(query_id, _Row("defer", (), (), (), None))
            got = seen.get(query_id, _Seen())
            model, combined = self._kept(row, got)
            if model is None:
                rows.append((query_id, None, None, None))
                continue
            p = row.expected_accuracy if combined else p_model.get((query_id, model))
            rows.append((query_id, got.ok[model][0], p, model))
        return pl.DataFrame(
            rows,
            schema={"query_id": pl.String, "answer": pl.String, "estimated_p_correct": pl.Float64, "model": pl.String},
            orient="row",
        ).select(ROUND_ANSWER_SCHEMA.names())

    def _kept(self, row: _Row, got: _Seen) -> tuple[str | None, bool]:
        """(the model whose answer is kept, whether it came from the plan's combination of several calls)."""
        models = list(row.models)
        if row.kind == "vote" and len(models) > 1:
            winner = _vote([(m, *got.ok[m]) for m in models if m in got.ok])
            if winner is not None:
                return winner, True
        elif row.kind == "cascade" and len(models) > 1:
            given = [m for m in models if m in got.ok]
            if given:
                return given[-1], len(got.tried & set(models)) > 1
        elif row.kind == "agreement" and len(models) == 3:
            a, b = (got.ok.get(m) for m in models[:2])
            if a is not None and b is not None and a[0] == b[0]:
                return models[0], True
            if models[2] in got.ok:
                return models[2], True
            given = [m for m in models[:2] if m in got.ok]
            if given:
                return given[0], True
        else:
            given = [m for m in [*models[:1], *row.fallbacks] if m in got.ok]
            if given:
                return given[0], False
        # answered off the plan (a call moved to a cheaper LLM, an answer for a deferred query)
        return (next(iter(got.ok)), False) if got.ok else (None, False)


def _seen(observations: pl.DataFrame) -> dict[str, _Seen]:
    out: dict[str, _Seen] = {}
    for query_id, model, status, answer, logprob in observations.select(
        "query_id", "model", "status", "answer", "logprob"
    ).iter_rows():
        entry = out.setdefault(query_id, _Seen())
        if status == Status.OK:
            entry.ok.setdefault(model, (answer, logprob))
        else:
            entry.failures.setdefault(model, []).append(status)
    return out


def _confident(logprob: float | None, thresholds: tuple[float, ...], step: int) -> bool:
    return step < len(thresholds) and logprob is not None and math.exp(logprob) >= thresholds[step]


def _retry(models: Iterable[str], got: _Seen) -> list[str]:
    """The first model whose calls failed only transiently: another round may well get its answer."""
    return next(([m] for m in models if m in got.failures and got.transient_only(m)), [])


def _vote(answers: list[tuple[str, str | None, float | None]]) -> str | None:
    """The executor's vote: most votes, then the larger sum of logprobs (0 where unknown), then the earlier
    member; returns the first member that gave the winning answer."""
    tally: dict[str | None, tuple[int, float, int, str]] = {}
    for order, (model, answer, logprob) in enumerate(answers):
        count, conf, first, by = tally.get(answer, (0, 0.0, order, model))
        tally[answer] = (count + 1, conf + (logprob if logprob is not None else 0.0), first, by)
    if not tally:
        return None
    best = max(tally.values(), key=lambda t: (t[0], t[1], -t[2]))
    return best[3]


class _Costs:
    """Per (query, model): expected cost (the prediction, corrected by the drift observed so far), the
    hard bound the guard will hold, and the cheapest offered model."""

    def __init__(self, state: RoundState) -> None:
        predictions = state.predictions.select("query_id", "model", "cost_usd", "cost_high_usd")
        self._expected = {(q, m): float(c or 0.0) for q, m, c, _ in predictions.iter_rows()}
        self._high = {(q, m): float(h if h is not None else c or 0.0) for q, m, c, h in predictions.iter_rows()}
        self._bound: dict[tuple[str, str], float] = {}
        if state.call_bounds is not None:
            self._bound = {
                (q, m): float(b)
                for q, m, b in state.call_bounds.select("query_id", "model", "bound_usd").iter_rows()
                if b is not None and math.isfinite(b)
            }
        cheapest = predictions.sort("cost_usd").group_by("query_id", maintain_order=True).agg(pl.col("model").first())
        self._cheapest = dict(zip(cheapest["query_id"].to_list(), cheapest["model"].to_list(), strict=True))
        self.drift = self._drift(state.observations)

    def _drift(self, observations: pl.DataFrame) -> float:
        if observations.height == 0:
            return 1.0
        calls = observations.select("query_id", "model", "round").unique()
        expected = sum(self._expected.get((q, m), 0.0) for q, m, _ in calls.iter_rows())
        charged = float(observations["cost_usd"].sum())
        return max(charged / expected, MIN_DRIFT) if expected > 0 else 1.0

    def expected(self, query_id: str, model: str) -> float:
        return self._expected.get((query_id, model), 0.0)

    def estimate(self, query_id: str, model: str) -> float:
        """What the call is expected to be charged, faults and retries included, from the drift so far."""
        return self.expected(query_id, model) * self.drift

    def bound(self, query_id: str, model: str) -> float:
        return self._bound.get((query_id, model), self._high.get((query_id, model), 0.0))

    def cheapest(self, query_id: str) -> str | None:
        return self._cheapest.get(query_id)


def _fit(
    wanted: list[tuple[str, list[str], bool]], costs: _Costs, left: float | None, cheapest: dict[str, str]
) -> tuple[list[tuple[str, list[str]]], dict[str, Any]]:
    """The round's calls within ``left`` (expected, drift included): queries with no answer first (moved
    to their ``cheapest`` LLM, most savings first, when short; one not there stays), then escalations in plan
    order."""
    moved_over_bound = 0
    if left is not None:
        # a call whose hard bound is above what is left never goes (the guard holds the bound, not the
        # expectation), round after round: an answering query moves to its cheapest LLM where that one fits
        # (a kill-9 rerun whose ambiguous failures were charged their bounds: 8 of 300 queries deferred with
        # $0.010 left, each planned on an LLM whose bound was $0.016 and whose cheapest's was $0.00001)
        placed: list[tuple[str, list[str], bool]] = []
        for q, ms, unanswered in wanted:
            cheap = cheapest.get(q)
            over = sum(costs.bound(q, m) for m in ms) > left
            if unanswered and over and cheap is not None and costs.bound(q, cheap) <= left:
                ms = [cheap]
                moved_over_bound += 1
            placed.append((q, ms, unanswered))
        wanted = placed  # a new list: the caller's stays as it asked
    total = sum(costs.estimate(q, m) for q, ms, _ in wanted for m in ms)
    if left is None or total <= left:
        return [(q, ms) for q, ms, _ in wanted], {"fitted": False, "moved_over_bound": moved_over_bound}
    answering = [(q, ms) for q, ms, a in wanted if a]
    improving = [(q, ms) for q, ms, a in wanted if not a]
    need = sum(costs.estimate(q, m) for q, ms in answering for m in ms)
    moved = 0
    if need > left:
        savings = []
        for i, (q, ms) in enumerate(answering):
            cheap = cheapest.get(q)
            if cheap is not None:
                saving = sum(costs.estimate(q, m) for m in ms) - costs.estimate(q, cheap)
                if saving > 0:
                    savings.append((saving, i, cheap))
        for saving, i, cheap in sorted(savings, reverse=True):
            if need <= left:
                break
            answering[i] = (answering[i][0], [cheap])
            need -= saving
            moved += 1
    # short even at the cheapest: answer as many as fit, cheapest first
    kept = (
        _greedy(sorted(answering, key=lambda x: sum(costs.estimate(x[0], m) for m in x[1])), costs, left)
        if need > left
        else answering
    )
    left_after = left - sum(costs.estimate(q, m) for q, ms in kept for m in ms)
    escalations = _greedy(improving, costs, left_after)
    diagnostics = {
        "fitted": True,
        "moved_over_bound": moved_over_bound,
        "moved_to_cheapest": moved,
        "answering_dropped": len(answering) - len(kept),
        "escalations_dropped": len(improving) - len(escalations),
    }
    return kept + escalations, diagnostics


def _greedy(items: list[tuple[str, list[str]]], costs: _Costs, left: float) -> list[tuple[str, list[str]]]:
    out = []
    for q, ms in items:
        cost = sum(costs.estimate(q, m) for m in ms)
        if cost <= left:
            out.append((q, ms))
            left -= cost
    return out
