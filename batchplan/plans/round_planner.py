"""The round planner: before every round, re-plan every open query globally under what is left of the budget.

Per query the options are **stop** (keep the current answer; value P(current right), cost 0) or **one more
call** to an LLM not yet answered (value P(right after it), cost the predicted cost corrected by the drift
observed so far), both from ``batchplan.plans.posterior``. The optimizer (``optimizer.solve``: the options table
and Budget / GroupBudget rows, the fast certified path) picks one option per query for the whole batch.

- **Round 1** must account for what later rounds can learn: a first call to LLM f is valued at its prior
  plus the replayed mean gain of the best escalation after it at the budget's shadow price (the
  ``Posterior.escalation_value`` tables), and costed with that escalation's mean cost, so a cheap first call
  whose answers tell right from wrong is worth more than its accuracy alone. The price is found by fixed
  point: solve, read the budget's dual, re-value, solve again.
- **A middle round** (neither the first nor the last) looks ahead the same way: a call is valued with the
  replayed best call after it, from the tables of the two answers the query will then have, and costed with
  it, the price found by the same bisection (stopping worth the current posterior at no cost). Without it a
  round 2 of 3 spends as if it were the last and round 3 has nothing left to act on what round 2 found.
- **A third opinion (vote)**: a query calls only LLMs stronger than the one whose answer it keeps, unless its
  answers disagree (no other answer agrees with the kept one): then any LLM it has not asked may be called,
  and the posterior, whose features include agreement between the query's answers (fitted on the history's
  joint answers, never assuming independence), picks the answer.
- **Answers are mandatory** when they fit: a query without an answer yet has no stop option whenever the
  cheapest calls of all such queries fit in what is left (else stop is worth 0 and the optimizer chooses
  which to answer). So the last round never leaves a query unanswered that the budget can still answer.
- **Cost drift**: per LLM, realized / predicted cost of the calls observed so far (a call's retries, fault
  charges and reservations of ambiguous failures included), shrunk to 1 by ``DRIFT_PRIOR_CALLS``
  pseudo-calls, scales the predicted cost of its next calls.
- **Spend under the budget with high probability**: like ``planning.plan_batch``, a second pass leaves
  z x the sd of the round's spend unplanned (``spend_confidence``); the round's reserve is the calls'
  high-side cost, what the budget guard holds before calling.
- A failed call (rate limit, server error, no usable answer) carries no answer: the LLM may be asked again,
  at most ``max_tries`` times per query.
- **Dispatch modes** (``modes``: a provider's batch API, ``batchplan.plans.modes``): a round the deadline
  leaves time for goes by batch at the batch price (its calls' cost and reserve x the LLM's discount; round 1
  costs its escalations at the next round's mode); in the last round before a deadline its worst case does
  not fit, each call is offered both ways, batch valued at P(answered in time), and the optimizer picks per
  query. The plan's ``mode`` column says which; the cost drift reads each call against its mode's price.

Nothing here reads gold: only the queue, the predictions and the observations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.core.contracts import DEFAULT_TENANT, ContractError, Status
from batchplan.core.rounds import (
    BATCH,
    CUT,
    OBSERVATION_MODE,
    REALTIME,
    ROUND_ANSWER_SCHEMA,
    ROUND_PLAN_SCHEMA,
    RoundPlan,
    RoundState,
)
from batchplan.optimizer import AccuracyFloor, Budget, Capacity, GroupBudget, InfeasibleError, Problem, solve
from batchplan.optimizer.api import Method
from batchplan.plans.candidates import P90_Z, _with_query
from batchplan.plans.modes import BatchModes
from batchplan.plans.posterior import (
    LAMBDA_GRID,
    NONE,
    OPAQUE,
    Posterior,
    States,
    called_key,
    normalize,
    open_agreement,
)

log = structlog.get_logger("batchplan.core.rounds")

DRIFT_PRIOR_CALLS = 20.0
MIN_CALL_GAIN = 0.02
PRICE_SAMPLE = 50_000


@dataclass
class Observed:
    """The batch as dense arrays: queries in queue order, LLMs sorted; what every query has seen so far."""

    query_ids: pl.Series  # String [n]: a Series, as the plan's query_id column takes it (1M str objects cost)
    tasks: np.ndarray  # str [n]
    tenants: np.ndarray  # str [n]
    priority: np.ndarray  # float [n]
    models: list[str]
    states: States
    cost: np.ndarray  # predicted cost [n, M] (nan: not offered)
    high: np.ndarray  # predicted high-side cost [n, M]
    tries: np.ndarray  # int [n, M]: calls made (failed ones included)
    answers: pl.DataFrame  # _q, _m, answer: the answer text of each (query, LLM)'s last ok call
    drift: dict[str, float] = field(default_factory=dict)
    patterns: tuple[np.ndarray, list[tuple[str, list[str], np.ndarray]]] | None = None  # ``_answer_patterns``


def observe(
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    observations: pl.DataFrame,
    discounts: dict[str, float] | None = None,
) -> Observed:
    """Dense per-query state from the queue, the predictions and every observation so far (``discounts``:
    per-LLM batch price factors, to read batch calls' costs against the batch price)."""
    ids = queue["query_id"]
    n = len(ids)
    models = sorted(predictions["model"].unique().to_list())
    qi = pl.DataFrame({"query_id": ids, "_q": np.arange(n, dtype=np.int64)})
    m = len(models)
    # predictions arrive grouped by query in queue order: the query index from their runs, not a string join
    pred = _with_query(qi.rename({"_q": "query"}), predictions).rename({"query": "_q"})
    r, c = pred["_q"].to_numpy(), _llm_index(pred["model"], models)
    prior, cost, high = (
        _dense(r, c, column, (n, m))
        for column in (pred["p_correct"], pred["cost_usd"], pred["cost_high_usd"].fill_null(pred["cost_usd"]))
    )
    code = np.full((n, m), NONE, dtype=np.int32)
    conf = np.full((n, m), np.nan)
    order = np.full((n, m), -1, dtype=np.int32)
    tries = np.zeros((n, m), dtype=np.int64)
    answers = pl.DataFrame(schema={"_q": pl.Int64, "_m": pl.Int64, "answer": pl.String})
    drift: dict[str, float] = {}
    # the query index as an inner join on the id gives it (observations of a query the queue lacks drop out),
    # the LLM's as queue and predictions number it (an LLM nobody predicted drops out); rows keep their order
    rows, where = _locate(observations["query_id"], ids)
    located = observations if len(rows) == observations.height and (rows == np.arange(len(rows))).all() else observations[rows]
    located = located.with_columns(pl.Series("_q", where, dtype=pl.Int64))
    obs = (
        located.with_columns(pl.col("model").cast(pl.Enum(models), strict=False).to_physical().cast(pl.Int64).alias("_m"))
        .filter(pl.col("_m").is_not_null())
        .with_row_index("_seq")
    )
    if obs.height:
        np.add.at(tries, (obs["_q"].to_numpy(), obs["_m"].to_numpy()), 1)
        cut = obs.filter(pl.col("status") == CUT)
        tries[cut["_q"].to_numpy(), cut["_m"].to_numpy()] = np.iinfo(np.int32).max  # cut again if asked again
        # the last ok call per (query, LLM) is its answer; the order of calls is by round, then row
        ok = obs.filter(pl.col("status") == Status.OK)
        if not ok["round"].is_sorted():
            ok = ok.sort("round", "_seq")
        # the last row per (query, LLM), in row order (polars' unique(keep="last") on two keys, in numpy)
        pair = ok["_q"].to_numpy() * m + ok["_m"].to_numpy()
        _, from_end = np.unique(pair[::-1], return_index=True)
        if len(from_end) < ok.height:
            ok = ok[np.sort(ok.height - 1 - from_end)]
        r, c = ok["_q"].to_numpy(), ok["_m"].to_numpy()
        dense, order_in = _ranks_within(r, _normalized_rank(ok["answer"]))
        dense = open_agreement(r, dense, ok["answer"], _open_rows(queue, r))
        code[r, c] = np.where(dense < 0, OPAQUE, dense)
        conf[r, c] = np.exp(ok["logprob"].fill_null(np.nan).to_numpy())
        order[r, c] = order_in
        answers = ok.select("_q", "_m", "answer")
        drift = cost_drift(obs, cost, discounts)
    return Observed(
        query_ids=ids,
        tasks=_strings(queue["task"].fill_null("default")),
        tenants=_strings(queue["tenant"].fill_null(DEFAULT_TENANT)),
        priority=queue["priority"].fill_null(1.0).to_numpy().astype(float),
        models=models,
        states=States(prior, code, conf, order),
        cost=cost,
        high=high,
        tries=tries,
        answers=answers,
        drift=drift,
    )


def _open_rows(queue: pl.DataFrame, query: np.ndarray) -> np.ndarray:
    """Per row of query index ``query``: its query is open (no label set)."""
    if "labels" not in queue.columns:
        return np.zeros(len(query), dtype=bool)
    return queue["labels"].is_null().to_numpy()[query]


def _llm_index(column: pl.Series, models: list[str]) -> np.ndarray:
    """Per row the index of its LLM in ``models`` (its distinct values, sorted), as the Enum cast's physical
    gives it, from the rows' 64-bit hashes: with the names' hashes distinct, equal hashes are equal names (10M
    rows cast to an Enum cost a second). Predictions that list the same LLMs in the same order for every query
    (``pipeline.predict``'s) repeat their first query's indices."""
    names = pl.Series(models, dtype=pl.String)
    keys = names.hash().to_numpy()
    if column.dtype != pl.String or column.null_count() or len(np.unique(keys)) < len(keys):
        return column.cast(pl.Enum(models)).to_physical().cast(pl.Int64).to_numpy()
    rank = np.argsort(keys)
    hashes = column.hash().to_numpy()
    m = len(models)
    if m and len(hashes) % m == 0 and (hashes.reshape(-1, m) == hashes[:m]).all():
        return np.tile(rank[np.searchsorted(keys[rank], hashes[:m])], len(hashes) // m)
    return rank[np.searchsorted(keys[rank], hashes)]


def _dense(r: np.ndarray, c: np.ndarray, column: pl.Series, shape: tuple[int, int]) -> np.ndarray:
    """[n, M] float: ``column`` at (r, c), nan elsewhere. Every query with every LLM, query by query in the same
    LLM order, is a reshape (no [n, M] fill and scatter)."""
    n, m = shape
    values = column.to_numpy()
    every = m and len(r) == n * m and np.array_equal(np.sort(c[:m]), np.arange(m))
    if every and (c[:m] == c.reshape(-1, m)).all() and (r.reshape(-1, m) == np.arange(n)[:, None]).all():
        # the column itself where it is in LLM order (read-only: fresh [n, M] pages cost more than the copy)
        wide = values.reshape(n, m)
        return np.asarray(wide if (c[:m] == np.arange(m)).all() else wide[:, np.argsort(c[:m])], dtype=float)
    out = np.full(shape, np.nan)
    out[r, c] = values
    return out


def _locate(keys: pl.Series, ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``keys`` found in ``ids`` and their index there, in the rows' order: an inner join on the id
    (``maintain_order="left"``). A prefix equal to ``ids`` (round 1: every query once, in queue order) is
    found by one comparison; the rest by a join on the ids' 64-bit hashes, each match checked on the text (a
    join on 1M+ strings costs a second). Ids that share a hash (a duplicate id, or a collision) take the join
    on the text."""
    n, k = len(ids), len(keys)
    queue = pl.DataFrame({"_h": ids.hash(), "_q": np.arange(n, dtype=np.int64)})
    if keys.dtype != ids.dtype or queue["_h"].n_unique() < n:
        found = pl.DataFrame({"query_id": keys}).with_row_index("_row").join(
            pl.DataFrame({"query_id": ids, "_q": np.arange(n, dtype=np.int64)}), on="query_id", how="inner", maintain_order="left"
        )
        return found["_row"].cast(pl.Int64).to_numpy(), found["_q"].to_numpy()
    head = n if n <= k and keys.slice(0, n).equals(ids) else 0
    if head == k:
        return np.arange(k, dtype=np.int64), np.arange(k, dtype=np.int64)
    rest = keys.slice(head)
    found = pl.DataFrame({"_h": rest.hash()}).with_row_index("_row").join(queue, on="_h", how="inner", maintain_order="left")
    rows, where = found["_row"].cast(pl.Int64).to_numpy(), found["_q"].to_numpy()
    same = (rest.gather(rows) == ids.gather(where)).fill_null(False).to_numpy()
    rows, where = rows[same], where[same]
    if head:
        rows = np.concatenate([np.arange(head, dtype=np.int64), rows + head])
        where = np.concatenate([np.arange(head, dtype=np.int64), where])
    return rows, where


def _normalized_rank(answers: pl.Series) -> pl.Series:
    """``normalize(answers).rank("dense")`` (null where null), normalizing each distinct answer once: a few
    labels over 1M calls are a few strings to normalize, not 1M."""
    distinct = answers.drop_nulls().unique()
    if answers.dtype != pl.String or 2 * len(distinct) > len(answers):
        return answers.to_frame("answer").select(normalize(pl.col("answer")).rank("dense"))["answer"]
    names = distinct.sort()
    rank = names.to_frame("answer").select(normalize(pl.col("answer")).rank("dense"))["answer"]
    return rank.gather(answers.cast(pl.Enum(names.to_list())).to_physical())


def _strings(column: pl.Series) -> np.ndarray:
    """``column.to_numpy().astype(str)``, each distinct string converted once (a few tasks or tenants over 1M
    queries: 1M Python strings cost half a second)."""
    distinct = column.drop_nulls().unique()
    if column.dtype != pl.String or column.null_count() or not len(column) or 2 * len(distinct) > len(column):
        return column.to_numpy().astype(str)
    names = distinct.sort()
    return np.array(names.to_list(), dtype=str)[column.cast(pl.Enum(names.to_list())).to_physical().to_numpy()]


def _ranks_within(query: np.ndarray, value: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the dense rank (1, 2, ...) of ``value`` among its query's rows (-1 where null), and the row's
    position (0, 1, ...) among its query's rows in row order. Polars' ``rank().over(query)`` and
    ``int_range().over(query)`` give the same numbers, but a window over 1M groups costs seconds."""
    k = len(query)
    position = np.zeros(k, dtype=np.int32)
    dense = np.full(k, -1, dtype=np.int32)
    if k == 0:
        return dense, position
    by_query = np.argsort(query, kind="stable")
    sorted_q = query[by_query]
    head = np.r_[True, sorted_q[1:] != sorted_q[:-1]]
    starts = np.flatnonzero(head)
    position[by_query] = np.arange(k) - np.repeat(starts, np.diff(np.r_[starts, k]))
    known = ~value.is_null().to_numpy()
    rows = np.flatnonzero(known)
    if len(rows):
        v = value.fill_null(0).to_numpy()[rows]
        q = query[rows]
        by = np.lexsort((v, q))
        sq, sv = q[by], v[by]
        new_query = np.r_[True, sq[1:] != sq[:-1]]
        step = new_query | np.r_[True, sv[1:] != sv[:-1]]
        count = np.cumsum(step)
        first = np.flatnonzero(new_query)
        base = np.repeat(count[first], np.diff(np.r_[first, len(sq)]))
        dense[rows[by]] = (count - base + 1).astype(np.int32)
    return dense, position


def cost_drift(obs: pl.DataFrame, predicted: np.ndarray, discounts: dict[str, float] | None = None) -> dict[str, float]:
    """Per LLM: (charged + k x mean predicted x batch drift) / (predicted + k x mean predicted) over its
    observed calls (a call's retries in its round charged with it), k = DRIFT_PRIOR_CALLS; "*": the batch
    drift (all calls), for LLMs not called yet. Prompts and answers that run long tonight run long for every
    LLM, so an LLM's own drift shrinks to the batch's."""
    pred = predicted[obs["_q"].to_numpy(), obs["_m"].to_numpy()]
    if OBSERVATION_MODE in obs.columns and discounts:  # a batch call was predicted at the batch price
        by_batch = (obs[OBSERVATION_MODE] == BATCH).fill_null(False).to_numpy()
        factor = obs["model"].replace_strict(discounts, default=1.0, return_dtype=pl.Float64).to_numpy()
        pred = np.where(by_batch, pred * factor, pred)
    # one row per call (a query's LLM in a round), all its attempts together: the plan pays for a call, and a
    # call that failed and was retried in its round charged every attempt (an ambiguous one its bound)
    frame = (
        obs.select("_q", "_m", "round", "model", pl.col("cost_usd").fill_null(0.0))
        .with_columns(pl.Series("_pred", np.nan_to_num(pred, nan=0.0)))
        .group_by("_q", "_m", "round")
        .agg(pl.col("model").first(), pl.col("cost_usd").sum(), pl.col("_pred").first())
    )
    total_pred = float(frame["_pred"].sum())
    batch = float(frame["cost_usd"].sum()) / total_pred if total_pred > 0 else 1.0
    out = {"*": batch}
    for model, real, expected, calls in (
        frame.group_by("model").agg(pl.col("cost_usd").sum(), pl.col("_pred").sum(), pl.len()).iter_rows()
    ):
        k = DRIFT_PRIOR_CALLS * expected / max(calls, 1)
        out[str(model)] = float((real + k * batch) / (expected + k)) if expected > 0 else batch
    return out


@dataclass
class Evaluated:
    """Per query, what the posterior says now and after each possible next call."""

    now_answer: np.ndarray  # int [n]: column of the kept answer, -1 none
    now_p: np.ndarray  # float [n]
    after: np.ndarray  # float [n, M]: P(right after calling that LLM next); nan where it may not be called


def evaluate(
    posterior: Posterior,
    seen: Observed,
    max_tries: int,
    upward: bool = True,
    chunk: int = 100_000,
    vote: bool = True,
) -> Evaluated:
    """The posterior per task, in chunks of queries (the features are [rows, LLMs, LLMs] arrays). With
    ``upward``, a query calls only LLMs stronger than the one whose answer it keeps, unless (``vote``) its
    answers disagree: then any LLM it has not asked may give the third opinion, and the posterior (agreement
    included) picks the answer."""
    n, m = seen.states.code.shape
    now_answer = np.full(n, -1, dtype=np.int64)
    now_p = np.zeros(n)
    agree = np.zeros(n)
    after = np.full((n, m), np.nan)
    for task, part, s in _task_chunks(seen, chunk):
        now = posterior.current(task, s, seen.models)
        now_answer[part], now_p[part], agree[part] = now.chosen, now.p, now.agree
        after[part] = posterior.after(task, s, seen.models, now)
    callable_ = np.isfinite(seen.states.prior) & ~seen.states.answered & (seen.tries < max_tries)
    means = _task_means(seen, posterior)
    callable_ &= np.isfinite(seen.cost) & offered(seen, posterior, means)
    if upward:
        disputed = vote & ((seen.states.code >= 0).sum(axis=1) >= 2) & (agree == 0)
        callable_ &= stronger(seen, posterior, now_answer, means) | disputed[:, None]
    after = np.where(callable_, after, np.nan)
    return Evaluated(now_answer, now_p, after)


def _task_means(seen: Observed, posterior: Posterior) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, per LLM [M]: the history's replayed accuracy and mean cost where the posterior has them
    (``Posterior.singles``), else the batch's mean predicted P(correct) and cost."""
    out = {}
    for task in np.unique(seen.tasks):
        rows = seen.tasks == task
        recorded = posterior.singles.get(str(task), {})
        acc, cost = np.full(len(seen.models), np.nan), np.full(len(seen.models), np.nan)
        # the batch's means only for the LLMs the history did not record (at 1M queries each mean is a pass)
        if unrecorded := [j for j, model in enumerate(seen.models) if model not in recorded]:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an LLM not offered for the task: nan, not a mean
                acc[unrecorded] = np.nanmean(seen.states.prior[rows][:, unrecorded], axis=0)
                cost[unrecorded] = np.nanmean(seen.cost[rows][:, unrecorded], axis=0)
        for j, model in enumerate(seen.models):
            if model in recorded:
                acc[j], cost[j] = recorded[model]
        out[str(task)] = (acc, cost)
    return out


def offered(
    seen: Observed, posterior: Posterior, means: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> np.ndarray:
    """[n, M]: the LLM is on its task's (mean cost, accuracy) frontier (``_task_means``). An LLM that a cheaper
    one beats on average is never worth calling: its estimated gains on a few queries are mostly the
    estimate's errors, which the optimizer, picking the largest, would select."""
    keep = np.zeros(seen.cost.shape, dtype=bool)
    for task, (acc, cost) in (means if means is not None else _task_means(seen, posterior)).items():
        a, c = np.nan_to_num(acc, nan=-1.0), np.nan_to_num(cost, nan=np.inf)
        better = (
            (a[None, :] >= a[:, None])
            & (c[None, :] <= c[:, None])
            & ((a[None, :] > a[:, None]) | (c[None, :] < c[:, None]))
        )
        keep[seen.tasks == task] = (np.isfinite(acc) & np.isfinite(cost) & ~better.any(axis=1))[None]
    return keep


def stronger(
    seen: Observed,
    posterior: Posterior,
    now_answer: np.ndarray,
    means: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """[n, M]: the LLM is more accurate on the query's task (``_task_means``) than the one whose answer it keeps
    now (any LLM for a query without an answer)."""
    out = np.zeros(seen.cost.shape, dtype=bool)
    for task, (acc, _) in (means if means is not None else _task_means(seen, posterior)).items():
        rows = np.flatnonzero(seen.tasks == task)
        a = np.nan_to_num(acc, nan=-np.inf)
        kept = np.where(now_answer[rows] >= 0, a[np.maximum(now_answer[rows], 0)], -np.inf)
        out[rows] = a[None, :] > kept[:, None]
    return out


@dataclass(frozen=True)
class Held:
    """The request's constraints as one round's re-plan holds them: calls left per LLM, task floors."""

    capacity_left: dict[str, int]
    floors: dict[str, float]
    accuracy: np.ndarray  # [n, M] the accuracy a call option counts toward its task's floor

    def constraints(self, seen: Observed) -> list[Any]:
        rows: list[Any] = [
            Capacity(column=f"calls:{m}", limit=float(left), name=f"capacity[{m}]")
            for m, left in sorted(self.capacity_left.items())
        ]
        if floors := {t: f for t, f in self.floors.items() if t in set(seen.tasks.tolist())}:
            rows.append(AccuracyFloor(min_mean=floors, group="task", name="task_floor"))
        return rows


@dataclass
class PosteriorRoundPlanner:
    """``RoundPlanner`` over a fitted ``Posterior`` (module docstring)."""

    posterior: Posterior
    spend_confidence: float = 0.95
    max_tries: int = 2
    method: Method = "auto"
    escalate_first_round: bool = True
    # A call must promise this much accuracy over stopping: the optimizer picks the calls whose estimated
    # gain is largest, so among many small estimated gains it picks their errors (the optimizer's curse).
    min_gain: float = MIN_CALL_GAIN
    # escalate only to an LLM more accurate on the task than the one whose answer the query keeps
    upward: bool = True
    uniform_first: bool = True  # round 1: one first LLM per task (``_first_calls``)
    # a disputed query (answers that disagree) may call any LLM it has not asked: a third opinion
    vote: bool = True
    # a round before the last (round 1 included) values a call with the replayed best call after it
    # (``Posterior.escalation_value``), so it leaves later rounds the money their calls are worth
    look_ahead: bool = True
    # the look-ahead's price search brackets the price on a uniform sample of this many queries, then checks
    # it on the whole batch (``_LookAheadSpend``); 0: every step of the search a pass over the whole batch
    price_sample: int = PRICE_SAMPLE
    # the request's constraints a re-plan holds (``--max-calls``, ``--task-floor``): calls per LLM over the whole
    # run (a call with its retries is one, as the single-shot plan counts them), and per task the mean expected
    # accuracy of its final answers (the posterior's, after this round's calls)
    max_calls: dict[str, int] = field(default_factory=dict)
    task_floors: dict[str, float] = field(default_factory=dict)

    modes: BatchModes | None = None  # a batch API the rounds may use (None: every call in real time)

    def plan_round(self, state: RoundState) -> RoundPlan:
        """``_plan_round``, re-planned while an LLM's batch calls fall short of the provider's per-job minimum
        (Bedrock: 100): such a job is refused and its calls go in real time, so they are priced so. Each pass
        takes LLMs out of the batch mode, so it ends within as many passes as there are LLMs."""
        planned = self._plan_round(state)
        offered = modes = self.modes
        while offered is not None and modes is not None and "mode" in planned.calls.columns:
            by_batch = planned.calls.filter(pl.col("mode") == BATCH).explode("models")["models"].value_counts()
            short = modes.short_of_minimum(dict(by_batch.iter_rows()))
            if not short:
                break
            log.info("round.batch_below_minimum", round=state.round, llms=short, min_records=modes.terms.min_records)
            modes = modes.without(short)
            planned = dataclasses.replace(self, modes=modes)._plan_round(state)
            planned.diagnostics["realtime_below_minimum"] = sorted(set(offered.discounts) - set(modes.discounts))
        return planned

    def _plan_round(self, state: RoundState) -> RoundPlan:
        discounts = dict(self.modes.discounts) if self.modes else None
        seen = observe(state.queue, state.predictions, state.observations, discounts)
        ev = evaluate(self.posterior, seen, self.max_tries, self.upward, vote=self.vote)
        n, m = ev.after.shape
        drift = np.array([seen.drift.get(model, seen.drift.get("*", 1.0)) for model in seen.models])
        cost = _times(seen.cost, drift)
        high = _times(np.maximum(seen.high, seen.cost), drift)
        # the round's mode: all batch (share 1: at batch prices), both offered (0 < share < 1) or real time
        share, later, discount = 0.0, 1.0, np.full(m, np.nan)
        if self.modes is not None:
            share, discount = self.modes.batch_share(state.round, state.rounds), self.modes.discount_of(seen.models)
            if self.modes.next_share(state.round, state.rounds) >= 1:  # round 1's escalations: next round's price
                later = float(np.median(list(self.modes.discounts.values())))
        factor = np.nan_to_num(discount, nan=1.0)
        by_batch = np.isfinite(discount) & (share >= 1)
        cost, high = _times(cost, np.where(by_batch, factor, 1.0)), _times(high, np.where(by_batch, factor, 1.0))
        mixed = (share, discount) if 0 < share < 1 else None
        call = np.isfinite(ev.after)
        budget = state.budget_left_usd
        # a query with no answer yet must get one if the cheapest calls of all such queries fit
        unanswered = ev.now_answer < 0
        cheapest = np.where(call, cost, np.inf).min(axis=1)
        need = unanswered & np.isfinite(cheapest)
        mandatory = need if budget is None or cheapest[need].sum() <= budget * (1 - 1e-9) else np.zeros(n, bool)
        first_round = bool(unanswered.all()) and not state.last and self.escalate_first_round
        middle = not first_round and not state.last and self.look_ahead and not unanswered.all()
        value = self._call_value(ev, call)
        extra = np.zeros((n, m))
        price = 0.0
        if middle and budget is not None:
            price = self._escalation_price(seen, ev, cost, call, budget, first=False, later=later, value=value)
            value, extra = self._with_escalation(seen, ev, cost, call, price, later, value=value)
        accuracy = ev.after
        if first_round and budget is not None:
            price = self._escalation_price(seen, ev, cost, call, budget, later=later, value=value)
            value, extra = self._with_escalation(seen, ev, cost, call, price, later, value=value)
            accuracy = np.where(call, value, np.nan)  # a first call's accuracy with its escalation, as its value
            if self.uniform_first and not self.task_floors:  # floors: every query keeps its own options
                first = self._first_calls(seen, call, value, cost + extra, price)
                ev = Evaluated(ev.now_answer, ev.now_p, np.where(first, ev.after, np.nan))
        held = self._held(seen, state.observations, accuracy)
        try:
            outcome = self._solve(
                seen, ev, value, cost, extra, high, mandatory, budget, state.tenant_budgets_left_usd, held, mixed,
                state.last,
            )  # fmt: skip
            unmet: str | None = None
        except InfeasibleError as error:
            if not self.task_floors:
                raise
            # tonight's answers say the floor cannot be reached with what is left: the round still answers what
            # it can (a hard stop mid-run would lose what was paid for), and says so in its diagnostics and log
            unmet = f"task floors {self.task_floors} out of reach with what is left: {error}"
            log.warning("round.task_floor_unmet", round=state.round, reason=unmet)
            held = self._held(seen, state.observations, accuracy, floors=False)
            outcome = self._solve(
                seen, ev, value, cost, extra, high, mandatory, budget, state.tenant_budgets_left_usd, held, mixed,
                state.last,
            )  # fmt: skip
        if outcome is None:
            return RoundPlan(calls=pl.DataFrame(schema=ROUND_PLAN_SCHEMA), diagnostics={"status": "nothing to call"})
        picked, solution = outcome
        rows = np.flatnonzero(picked >= 0)
        # a mixed round's batch options are numbered m + column (``_solve``)
        cols, batch_pick = picked[rows] % m, picked[rows] >= m
        scale = np.where(batch_pick, factor[cols], 1.0)
        hit = np.where(batch_pick, share, 1.0)
        calls = pl.DataFrame(
            {
                "query_id": seen.query_ids.gather(rows),
                "models": pl.Series(seen.models).gather(cols),
                "expected_cost_usd": cost[rows, cols] * scale,
                "reserve_cost_usd": high[rows, cols] * scale,
                "expected_accuracy": hit * ev.after[rows, cols] + (1 - hit) * ev.now_p[rows],
                # a gather from the two names, not a numpy string array converted (1M strings cost 0.3 s)
                "mode": pl.Series([REALTIME, BATCH]).gather((batch_pick | by_batch[cols]).astype(np.int64)),
            }
        ).with_columns(pl.concat_list("models").alias("models"))
        calls = calls.select(ROUND_PLAN_SCHEMA.names()).cast(dict(ROUND_PLAN_SCHEMA))  # type: ignore[arg-type]
        diagnostics: dict[str, Any] = {
            "round": state.round,
            "rounds": state.rounds,
            "method": solution.method,
            "status": solution.status,
            "objective": solution.objective,
            "bound": solution.bound,
            "gap": solution.gap,
            "shadow_prices": solution.shadow_prices,
            "escalation_price": price,
            "cost_drift": seen.drift,
            "calls": len(rows),
            "max_calls_left": held.capacity_left,
            "task_floor_unmet": unmet,
            "mandatory": int(mandatory.sum()),
            "expected_cost_usd": float((cost[rows, cols] * scale).sum()),
            "planned_accuracy": float(calls["expected_accuracy"].sum() + ev.now_p[picked < 0].sum()) / n if n else 0.0,
            "batch_share": share,
            "batch_calls": int((calls["mode"] == BATCH).sum()),
        }
        log.info("round.plan", **{k: v for k, v in diagnostics.items() if k != "shadow_prices"})
        return RoundPlan(calls=calls, diagnostics=diagnostics)

    def _call_value(self, ev: Evaluated, call: np.ndarray) -> np.ndarray:
        """P(right after the call), less ``min_gain`` where the query has an answer to stop with."""
        answered = (ev.now_answer >= 0)[:, None]
        return np.where(call, ev.after - np.where(answered, self.min_gain, 0.0), 0.0)

    def _escalation_price(
        self,
        seen: Observed,
        ev: Evaluated,
        cost: np.ndarray,
        call: np.ndarray,
        budget: float,
        first: bool = True,
        later: float = 1.0,
        value: np.ndarray | None = None,
    ) -> float:
        """The budget's price in round 1, escalation included: the lowest price (accuracy per USD) at which every
        query taking its best first call at that price (value less price x cost, both with the replayed
        escalation after it) fits the budget; by bisection on log(price). A fixed point of the solver's dual
        instead oscillates: at a low price escalation after a weak first call looks cheap, which raises the
        price, at which it is not worth it, which lowers it. A middle round (``first`` False) has the option to
        stop, worth the current posterior at no cost.

        The bisection's 41 spends are ``_LookAheadSpend``'s, bracketed on a sample of ``price_sample`` queries
        (0: every spend a pass over the whole batch, ``spend`` below, the definition the fast path must match).
        ``value``: ``_call_value(ev, call)``, where the caller has it."""
        value = self._call_value(ev, call) if value is None else value
        if self.price_sample > 0:
            group, keys = _answer_patterns(seen, self.posterior)
            blocks = None
            if first and self.uniform_first:  # ``_first_calls``' tasks: one first LLM each
                names, task_of = np.unique(seen.tasks, return_inverse=True)
                confident = np.array([self.posterior.confident.get(str(t), False) for t in names], dtype=bool)
                blocks = np.where(confident[task_of.ravel()], task_of.ravel(), -1)
            search = _LookAheadSpend.build(
                value=value,
                cost=cost,
                call=call,
                group=group,
                now=None if first else ev.now_p,
                blocks=blocks,
                tables=lambda price: self._escalation_tables(seen, keys, price, later),
                knots=np.asarray(LAMBDA_GRID) / later,
            )
            return search.price(budget, self.price_sample)

        def spend(price: float) -> float:
            value, extra = self._with_escalation(seen, ev, cost, call, price, later)
            uniform = first and self.uniform_first
            allowed = self._first_calls(seen, call, value, cost + extra, price) if uniform else call
            total = np.where(allowed, cost + extra, np.inf)
            net = np.where(allowed, value - price * total, -np.inf)
            best = net.argmax(axis=1)
            rows = np.flatnonzero(allowed.any(axis=1))
            if not first:
                rows = rows[net[rows, best[rows]] > ev.now_p[rows]]
            return float(total[rows, best[rows]].sum())

        return float(np.exp(_bisect_log_price(lambda x: spend(float(np.exp(x))) <= budget)))

    def _first_calls(
        self, seen: Observed, call: np.ndarray, value: np.ndarray, cost: np.ndarray, price: float
    ) -> np.ndarray:
        """[n, M]: round 1 calls one LLM per task whose history recorded confidences, the one with the best total
        value less price x cost over the task's queries (a query that cannot call it keeps its own options).
        Per query, the prior alone is the weakest signal a run has where answers come with confidences: a first
        call chosen per task lets the later rounds choose per query, on what the calls said. Without
        confidences (agreement only), later rounds learn little, and the prior's per-query choice stays."""
        allowed = call.copy()
        for task in np.unique(seen.tasks):
            if not self.posterior.confident.get(str(task), False):
                continue
            rows = seen.tasks == task
            allowed[rows] = False
            net = np.where(call[rows], value[rows] - price * cost[rows], 0.0).sum(axis=0)
            net = np.where(call[rows].any(axis=0), net, -np.inf)
            j = int(net.argmax())
            allowed[rows, j] = call[rows, j]
            lacking = rows & ~call[:, j]
            allowed[lacking] = call[lacking]
        return allowed

    def _with_escalation(
        self,
        seen: Observed,
        ev: Evaluated,
        cost: np.ndarray,
        call: np.ndarray,
        price: float,
        later: float = 1.0,
        value: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A call's value and cost with the replayed best escalation after it at ``price`` (tasks whose history
        recorded confidences), by the LLMs that will have answered: the call's alone in round 1, the query's
        answer and the call's in a middle round (no table for three: worth what the call gives). ``later``: the
        escalation's price factor (its round's mode: an escalation at half price is worth it at twice the
        budget's price). ``value``: ``_call_value(ev, call)``, where the caller has it."""
        value = self._call_value(ev, call) if value is None else value
        group, keys = _answer_patterns(seen, self.posterior)
        if not keys:
            return np.where(call, np.minimum(value, 1.0), 0.0), np.zeros_like(value)
        gains, costs = self._escalation_tables(seen, keys, price, later)
        if len(keys) == 1 and (group == 0).all():  # one pattern for the whole batch: broadcast, no gather
            value, extra = value + gains[0][None], np.broadcast_to(costs[0][None], value.shape)
        else:
            value, extra = value + gains[group], costs[group]
        return np.where(call, np.minimum(value, 1.0), 0.0), np.where(call, extra, 0.0)

    def _escalation_tables(
        self, seen: Observed, keys: list[tuple[str, list[str], np.ndarray]], price: float, later: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """[K + 1, M] per pattern (task, LLMs answered: ``_answer_patterns``' keys) and LLM called next: the
        table's gain and cost at this price; a query outside every pattern (a task without confidences, two
        answers or more) reads the last, zero row."""
        gains, costs = np.zeros((len(keys) + 1, len(seen.models))), np.zeros((len(keys) + 1, len(seen.models)))
        for k, (task, before, pattern) in enumerate(keys):
            for j, model in enumerate(seen.models):
                if pattern[j]:
                    continue
                gain, more = self.posterior.escalation_value(task, called_key([*before, model]), price * later)
                gains[k, j], costs[k, j] = gain, more * later
        return gains, costs

    def _held(self, seen: Observed, observations: pl.DataFrame, accuracy: np.ndarray, floors: bool = True) -> Held:
        """The call capacities left after the rounds so far and the task floors, for ``_solve``."""
        made = observations.filter(pl.col("model").is_in(list(self.max_calls))).unique(["query_id", "model", "round"])
        counts = dict(made.group_by("model").len().iter_rows()) if made.height else {}
        left = {m: max(int(limit) - int(counts.get(m, 0)), 0) for m, limit in self.max_calls.items()}
        return Held(left, dict(self.task_floors) if floors else {}, accuracy)

    def _solve(
        self,
        seen: Observed,
        ev: Evaluated,
        value: np.ndarray,
        cost: np.ndarray,
        extra: np.ndarray,
        high: np.ndarray,
        mandatory: np.ndarray,
        budget: float | None,
        tenant_left: dict[str, float],
        held: Held | None = None,
        mixed: tuple[float, np.ndarray] | None = None,
        last: bool = False,
    ) -> tuple[np.ndarray, Any] | None:
        """One option per query (stop or one call) under the budget; returns (column called or -1, solution).
        ``mixed``: (share, per-LLM discount, nan = none): each call is also offered by batch, numbered
        M + column, worth ``share`` of its value (else the query keeps what it has) at the discounted cost.
        ``last``: the run's last round, whose spend margin is money left unspent (see the margin below)."""
        n, m = value.shape
        call = np.isfinite(ev.after)
        stop = ~mandatory | ~call.any(axis=1)
        if not call.any():
            return None
        accuracy = ev.after if held is None else held.accuracy
        options, columns, spread = _options(seen.priority, ev.now_p, call, stop, value, cost, extra, high, accuracy)
        base = options.height  # the real-time options; a mixed round's batch twins follow them
        if mixed is not None:
            sd2 = ((high - cost) / P90_Z) ** 2
            options = pl.concat([options.with_columns(_var=spread), _batch_options(seen, ev, value, cost + extra, sd2, mixed, base)])
            columns = options["_col"].to_numpy()
        rows_query = options["query"].to_numpy()
        rows_llm = columns % m  # a twin is numbered m + column; a stop's -1 is masked below
        rows_call = columns >= 0
        constraints: list[Any] = []
        if budget is not None:
            constraints.append(Budget(limit=max(budget, 0.0)))
        tenants = {t: max(v, 0.0) for t, v in tenant_left.items() if t in set(seen.tenants.tolist())}
        if tenants:  # the tenant column only where a row counts by it: 10M+ strings cost seconds to build
            options = options.with_columns(tenant=seen.tenants[rows_query])
            constraints.append(GroupBudget(group="tenant", limits=tenants, name="tenant_budget"))
        if held is not None:
            constraints += held.constraints(seen)
            if held.floors:  # the task column only where a floor counts by it (as the tenant column above)
                options = options.with_columns(task=seen.tasks[rows_query])
            for model in held.capacity_left:
                j = seen.models.index(model) if model in seen.models else -1
                calls = (rows_call & (rows_llm == j)).astype(np.float64)
                options = options.with_columns(pl.Series(f"calls:{model}", calls))
        z = NormalDist().inv_cdf(self.spend_confidence) if self.spend_confidence > 0.5 else 0.0
        problem = Problem(options.drop("_col", "_var", strict=False), constraints=constraints, n_queries=n)
        if budget is not None and z > 0:
            # Leave z x the sd of the round's spend unplanned, the sd bounded above by every query taking its
            # most variable option: one solve (a second pass on the chosen plan's variance doubles the time)
            counts = call.sum(axis=1) + stop  # options come query by query: each query's first option
            heads = (np.cumsum(counts) - counts)[counts > 0]
            # (a batch twin varies less than its real-time option: the real-time ones bound the query)
            worst = np.fmax.reduceat(spread, heads).sum()  # fmax: NaN-skipping, as polars' max
            margin = z * float(np.sqrt(max(float(worst), 0.0)))
            if last and margin > 0.1 * budget:
                # nor can a plan vary more than the options the budget can buy. In the last round the margin is
                # money left unspent: where what is left buys a few calls of many queries' options (after
                # faults), the sum over every query was a margin above the budget and the round answered 2 of 20
                # queries it could afford. A middle round keeps the wider margin: what it leaves, the next round
                # plans with what it observed (faults included). Sorting the options costs ~1 s at 1M queries:
                # only where the margin is a real share of the budget.
                bought = _most_variance_within(options["cost"].to_numpy()[:base], spread, budget)
                margin = min(margin, z * float(np.sqrt(max(bought, 0.0))))
            tight = [Budget(limit=max(budget - margin, 0.0)) if isinstance(c, Budget) else c for c in constraints]
            attempts = [problem.with_constraints(tight), problem]
        else:
            attempts = [problem]
        solution = None
        for attempt in attempts:  # the margin may not leave room for the mandatory answers: then none
            try:
                solution = solve(attempt, method=self.method)
                break
            except InfeasibleError:
                continue
        if solution is None:
            # the mandatory answers do not fit after all (tenant budgets): let the optimizer choose
            if not mandatory.any():
                raise InfeasibleError(constraint="budget", message="no round plan fits what is left of the budget")
            return self._solve(
                seen, ev, value, cost, extra, high, np.zeros(n, bool), budget, tenant_left, held, mixed, last
            )
        picked = np.full(n, -1, dtype=np.int64)  # option ids are row positions in ``options``: a gather, no join
        picked[solution.chosen["query"].to_numpy()] = columns[solution.chosen["option"].to_numpy()]
        return picked, solution

    def answers(self, queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
        seen = observe(queue, predictions, observations, dict(self.modes.discounts) if self.modes else None)
        chosen, estimate = kept_answers(self.posterior, seen)
        kept = pl.DataFrame({"_q": np.arange(len(seen.query_ids), dtype=np.int64), "_m": chosen})
        texts = kept.join(seen.answers, on=["_q", "_m"], how="left", maintain_order="left")["answer"]
        return pl.DataFrame(
            {
                "query_id": seen.query_ids,
                "answer": texts,
                "estimated_p_correct": estimate,
                # the LLM whose answer is kept: open tasks replayed from a history keep no text
                "model": [seen.models[j] if j >= 0 else None for j in chosen.tolist()],
            },
            schema=ROUND_ANSWER_SCHEMA,
        )


def _task_chunks(seen: Observed, chunk: int) -> Iterator[tuple[str, np.ndarray, States]]:
    """(task, row positions, their States) per task, in chunks of queries (the posterior's features are
    [rows, LLMs, LLMs] arrays)."""
    for task in np.unique(seen.tasks):
        rows = np.flatnonzero(seen.tasks == task)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            s = States(seen.states.prior[part], seen.states.code[part], seen.states.conf[part], seen.states.order[part])
            yield str(task), part, s


def kept_answers(posterior: Posterior, seen: Observed, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Per query the column of the answer it keeps (``evaluate``'s ``now_answer``, -1 none) and that answer's
    estimate (``Posterior.estimate``: the calibration for the report's ``estimated_accuracy``, which nothing
    the planner decides reads)."""
    chosen = np.full(len(seen.query_ids), -1, dtype=np.int64)
    estimate = np.zeros(len(seen.query_ids))
    for task, part, s in _task_chunks(seen, chunk):
        now = posterior.current(task, s, seen.models)
        chosen[part], estimate[part] = now.chosen, posterior.estimate(task, s, seen.models, now)
    return chosen, estimate


def _times(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``x * factor[None]``; ``x`` itself where every factor is 1 (x 1.0 changes no number, and a fresh [n, M]
    array costs its page faults)."""
    return x if (factor == 1.0).all() else x * factor[None]


def _answer_patterns(seen: Observed, posterior: Posterior) -> tuple[np.ndarray, list[tuple[str, list[str], np.ndarray]]]:
    """Per query the index of its (task, LLMs answered) pattern in the returned keys (task, those LLMs, the
    [M] mask), for the tasks whose history recorded confidences and patterns of at most one answer; other
    queries get len(keys). Computed once per ``Observed`` (the look-ahead's bisection re-values every price)."""
    if seen.patterns is not None:
        return seen.patterns
    n, m = seen.states.code.shape
    answered = seen.states.answered
    group = np.full(n, -1, dtype=np.int64)
    keys: list[tuple[str, list[str], np.ndarray]] = []
    # a row's answered LLMs as one integer (bits), so finding the patterns is a sort of n integers
    packed = answered @ (1 << np.arange(m, dtype=np.int64)) if m < 63 else None
    for task in np.unique(seen.tasks):
        if not posterior.confident.get(str(task), False):
            # agreement alone tells little about which answers to escalate (measured on routerbench and
            # overruling): round 1 plans such a task as a single shot, later rounds spend what is left
            continue
        in_task = np.flatnonzero(seen.tasks == task)
        if packed is not None:
            codes, which = np.unique(packed[in_task], return_inverse=True)
            patterns = ((codes[:, None] >> np.arange(m)) & 1).astype(bool)
        else:
            patterns, which = np.unique(answered[in_task], axis=0, return_inverse=True)
        which = which.ravel()
        for k, pattern in enumerate(patterns):
            if pattern.sum() > 1:
                continue
            group[in_task[which == k]] = len(keys)
            keys.append((str(task), [seen.models[j] for j in np.flatnonzero(pattern)], pattern))
    group[group < 0] = len(keys)
    seen.patterns = (group, keys)
    return seen.patterns


def _bisect_log_price(fits: Callable[[float], bool], on_step: Callable[[float, float], None] | None = None) -> float:
    """The look-ahead's price search (``PosteriorRoundPlanner._escalation_price``): the log of the lowest price
    on ``LAMBDA_GRID``'s span at which the plan ``fits`` the budget, by 40 halvings of log(price). ``on_step``
    sees the bracket after each halving."""
    low, high = np.log(LAMBDA_GRID[0]), np.log(LAMBDA_GRID[-1])
    if fits(low):
        return float(low)
    for _ in range(40):
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
        if on_step is not None:
            on_step(float(low), float(high))
    return float(high)


# Over a window of prices [pa, pb], a query whose best option there is certain (its lowest net beats every
# other option's highest, by this much relative) counts by that option without being valued again.
CERTAIN_BY = 1e-9
# The first window: a bracket this wide in log(price) around the sampled search's price (widened when the
# whole batch disagrees); without a sample, the bisection's own bracket once it is this narrow.
PRICE_WINDOW = 0.02
FIRST_WINDOW = 0.6
BLOCK_ROWS = 32_768  # rows valued at once: [rows, M] temporaries that stay in cache


@dataclass
class _Rows:
    """Queries of the look-ahead's search as dense arrays, sorted by pattern (``_answer_patterns``), so that each
    pattern's rows read one row of the escalation tables."""

    value: np.ndarray  # [r, M] a call's value before its escalation (``_call_value``); -inf: not callable
    cost: np.ndarray  # [r, M] a call's cost before its escalation; 0: not callable
    group: np.ndarray  # [r] pattern, ascending
    now: np.ndarray | None  # [r] the value of stopping (None: round 1 has no stop)
    nonnegative: bool = False  # every cost >= 0 (the bounds of ``certain`` take a shortcut)

    @property
    def size(self) -> int:
        return len(self.group)

    @cached_property
    def segments(self) -> list[tuple[int, int, int]]:
        """(start, end, pattern): runs of one pattern, cut to BLOCK_ROWS."""
        heads = [*np.flatnonzero(np.diff(self.group, prepend=-1)).tolist(), self.size]
        out = []
        for start, end in itertools.pairwise(heads):
            out += [(s, min(s + BLOCK_ROWS, end), int(self.group[start])) for s in range(start, end, BLOCK_ROWS)]
        return out

    def take(self, rows: np.ndarray) -> _Rows:
        now = None if self.now is None else self.now[rows]
        return _Rows(self.value[rows], self.cost[rows], self.group[rows], now, self.nonnegative)

    def spend(self, price: float, gains: np.ndarray, costs: np.ndarray) -> float:
        """What the rows spend taking each its best option at ``price`` (``_escalation_price``'s ``spend``):
        the same arithmetic per (query, LLM), so the same choices."""
        out = 0.0
        for s, e, g in self.segments:
            total = self.cost[s:e] + costs[g]
            net = np.minimum(self.value[s:e] + gains[g], 1.0) - price * total
            best = net.argmax(axis=1)
            r = np.arange(e - s)
            chosen = total[r, best]
            if self.now is not None:
                chosen = chosen[net[r, best] > self.now[s:e]]
            out += float(chosen.sum())
        return out

    def certain(
        self, pa: float, pb: float, ranges: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over prices [pa, pb] with the tables in ``ranges`` (gain low, high, cost low, high): per row whether it
        surely calls, its option then, and whether it surely stops. Bounds: the net of an option lies within
        [min(v + gain low, 1) - max(p x (c + cost high)), min(v + gain high, 1) - min(p x (c + cost low))]."""
        glo, ghi, elo, ehi = ranges
        calls = np.zeros(self.size, dtype=bool)
        stops = np.zeros(self.size, dtype=bool)
        best = np.zeros(self.size, dtype=np.int64)
        for s, e, g in self.segments:
            v, c = self.value[s:e], self.cost[s:e]
            if self.nonnegative and elo[g].min() >= 0:  # p x (c + e) rises with p and e
                upper = np.minimum(v + ghi[g], 1.0) - pa * (c + elo[g])
                lower = np.minimum(v + glo[g], 1.0) - pb * (c + ehi[g])
            else:
                low_cost, high_cost = c + elo[g], c + ehi[g]
                upper = np.minimum(v + ghi[g], 1.0) - np.minimum(pa * low_cost, pb * low_cost)
                lower = np.minimum(v + glo[g], 1.0) - np.maximum(pa * high_cost, pb * high_cost)
            b = lower.argmax(axis=1)
            r = np.arange(e - s)
            least, top = lower[r, b], upper.max(axis=1)
            upper[r, b] = -np.inf
            sure = least > upper.max(axis=1) + CERTAIN_BY * (1.0 + np.abs(least))
            if self.now is not None:
                now = self.now[s:e]
                stops[s:e] = top < now - CERTAIN_BY * (1.0 + np.abs(top))
                sure &= least > now + CERTAIN_BY * (1.0 + np.abs(least))
            calls[s:e], best[s:e] = sure, b
        return calls, best, stops


@dataclass
class _Block:
    """The rows of one task that round 1 plans with one first LLM (``_first_calls``): the LLM of the best total
    net over the task's queries, a query that cannot call it keeping its own options. Over a window of prices
    each LLM's total is a sum over the queries whose value the cap at 1 may cut there, plus terms in the
    tables alone (``narrow``)."""

    rows: _Rows
    callable_: np.ndarray  # [r, M]
    # over the window, per pattern [K + 1, M]: the sum and count of the values the cap never cuts, the count it
    # always cuts, the calls' count and cost; and the values it may cut (pattern, LLM, value)
    sums: tuple[np.ndarray, ...] | None = None
    cut: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    lacking: dict[int, _Rows] = field(default_factory=dict)  # per first LLM, the queries that cannot call it

    def spend(self, price: float, gains: np.ndarray, costs: np.ndarray, in_window: bool) -> float:
        if in_window and self.sums is not None and self.cut is not None:
            plain, plain_count, capped, count, cost = self.sums
            k = len(plain)
            g, e = gains[:k], costs[:k]
            total = (plain + plain_count * g + capped).sum(axis=0) - price * (cost + count * e).sum(axis=0)
            group, llm, value = self.cut
            total += np.bincount(llm, np.minimum(value + g[group, llm], 1.0), minlength=total.size)
            j = int(np.where(count.sum(axis=0) > 0, total, -np.inf).argmax())
            out = float(cost[:, j].sum() + count[:, j] @ e[:, j])
        else:
            net_sum = np.zeros(self.callable_.shape[1])
            for s, end, g_ in self.rows.segments:
                total_ = self.rows.cost[s:end] + costs[g_]
                net = np.minimum(self.rows.value[s:end] + gains[g_], 1.0) - price * total_
                net_sum += np.where(self.callable_[s:end], net, 0.0).sum(axis=0)
            j = int(np.where(self.callable_.any(axis=0), net_sum, -np.inf).argmax())
            has = self.callable_[:, j]
            out = float((self.rows.cost[has, j] + costs[self.rows.group[has], j]).sum())
        if j not in self.lacking:
            self.lacking[j] = self.rows.take(np.flatnonzero(~self.callable_[:, j]))
        return out + self.lacking[j].spend(price, gains, costs)

    def narrow(self, ranges: tuple[np.ndarray, ...]) -> None:
        """The sums for a window whose tables' gains lie within ``ranges``' (low, high)."""
        glo, ghi = ranges[0], ranges[1]
        k, m = len(glo), self.callable_.shape[1]
        plain, plain_count, capped, count, cost = (np.zeros((k, m)) for _ in range(5))
        cut: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for s, e, g in self.rows.segments:
            v, ok = self.rows.value[s:e], self.callable_[s:e]
            never = ok & (v + ghi[g] <= 1.0)  # below the cap at every gain of the window
            always = ok & (v + glo[g] >= 1.0)
            plain[g] += np.where(never, v, 0.0).sum(axis=0)
            plain_count[g] += never.sum(axis=0)
            capped[g] += always.sum(axis=0)
            count[g] += ok.sum(axis=0)
            cost[g] += self.rows.cost[s:e].sum(axis=0)  # 0 where not callable
            r, c = np.nonzero(ok & ~never & ~always)
            cut.append((np.full(len(r), g, dtype=np.int64), c, v[r, c]))
        self.sums = (plain, plain_count, capped, count, cost)
        self.cut = (
            np.concatenate([c[0] for c in cut]),
            np.concatenate([c[1] for c in cut]),
            np.concatenate([c[2] for c in cut]),
        )


@dataclass
class _LookAheadSpend:
    """``_escalation_price``'s ``spend(price)`` on a whole batch, the same sums at a fraction of the cost: the
    tables are read once per price (not per query), each query's value before its escalation is computed once,
    and over a window of prices every query whose choice is certain there (``_Rows.certain``) counts by its
    option, the search valuing only the uncertain ones. ``price`` finds the window on a uniform sample and
    checks its ends on the whole batch; inside it the bisection steps are the full search's."""

    rows: _Rows  # every query with a call, general rows first, then each block's; sorted by (block, pattern)
    block: np.ndarray  # [r] the row's block (-1: general)
    tables: Callable[[float], tuple[np.ndarray, np.ndarray]]  # price -> the tables' gains, costs [K + 1, M]
    knots: np.ndarray  # the prices at which the tables bend
    general: _Rows = field(init=False)
    blocks: list[_Block] = field(init=False)
    window: tuple[float, float] | None = None  # log(price) bounds where ``uncertain`` and the fixed sums hold
    uncertain: _Rows | None = None
    fixed_cost: float = 0.0
    fixed_count: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def __post_init__(self) -> None:
        heads = np.searchsorted(self.block, np.unique(self.block))
        ends = [*heads[1:].tolist(), self.rows.size][: len(heads)]  # no rows (no query has a call): no parts
        part = {int(self.block[h]): slice(int(h), int(e)) for h, e in zip(heads, ends, strict=True)}
        view = lambda s: _Rows(  # noqa: E731
            self.rows.value[s],
            self.rows.cost[s],
            self.rows.group[s],
            None if self.rows.now is None else self.rows.now[s],
            self.rows.nonnegative,
        )
        self.general = view(part.get(-1, slice(0, 0)))
        self.blocks = [_Block(view(s), np.isfinite(self.rows.value[s])) for b, s in sorted(part.items()) if b >= 0]

    @classmethod
    def build(
        cls,
        value: np.ndarray,
        cost: np.ndarray,
        call: np.ndarray,
        group: np.ndarray,
        now: np.ndarray | None,
        blocks: np.ndarray | None,
        tables: Callable[[float], tuple[np.ndarray, np.ndarray]],
        knots: np.ndarray,
    ) -> _LookAheadSpend:
        """From the planner's [n, M] arrays (``blocks``: per query its round-1 task block, -1 none; None: no
        blocks); a query with no call spends nothing at any price and drops out."""
        n = len(group)
        block = np.full(n, -1, dtype=np.int64) if blocks is None else blocks.astype(np.int64)
        key = block * (int(group.max(initial=0)) + 1) + group
        rows = np.flatnonzero(call.any(axis=1))
        if not (np.diff(key[rows]) >= 0).all():
            rows = rows[np.argsort(key[rows], kind="stable")]
        if len(rows) == n and (rows == np.arange(n)).all():  # every query, in order: no gathers
            v, c, ok = value, cost, call
        else:
            v, c, ok = value[rows], cost[rows], call[rows]
        c = np.where(ok, c, 0.0)
        return cls(
            _Rows(np.where(ok, v, -np.inf), c, group[rows], None if now is None else now[rows], bool(c.min(initial=0.0) >= 0)),
            block[rows],
            tables,
            knots,
        )

    def sample(self, size: int, seed: int = 0) -> _LookAheadSpend:
        """The same search on ``size`` queries drawn uniformly (without replacement)."""
        rows = np.sort(np.random.default_rng(seed).choice(self.rows.size, size, replace=False))
        return _LookAheadSpend(self.rows.take(rows), self.block[rows], self.tables, self.knots)

    def spend(self, price: float) -> float:
        """``_escalation_price``'s ``spend(price)``."""
        gains, costs = self.tables(price)
        in_window = self.window is not None and self.uncertain is not None
        in_window = in_window and bool(np.exp(self.window[0]) <= price <= np.exp(self.window[1]))  # type: ignore[index]
        out = 0.0
        if in_window:
            assert self.uncertain is not None
            out += self.fixed_cost + float((self.fixed_count * costs[: len(self.fixed_count)]).sum())
            out += self.uncertain.spend(price, gains, costs)
        else:
            out += self.general.spend(price, gains, costs)
        return out + sum(b.spend(price, gains, costs, in_window) for b in self.blocks)

    def narrow(self, low: float, high: float) -> None:
        """Make [low, high] (log price, inside the current window) the window: the queries certain there count by
        their option from now on (``_Rows.certain``), each block's first LLM is fixed if certain there."""
        pa, pb = float(np.exp(low)), float(np.exp(high))
        prices = [pa, pb, *self.knots[(self.knots > pa) & (self.knots < pb)].tolist()]
        tabs = [self.tables(p) for p in prices]
        gains, costs = np.stack([t[0] for t in tabs]), np.stack([t[1] for t in tabs])
        ranges = (gains.min(axis=0), gains.max(axis=0), costs.min(axis=0), costs.max(axis=0))
        rows = self.uncertain if self.uncertain is not None else self.general
        if not len(self.fixed_count):
            self.fixed_count = np.zeros(costs.shape[1:])
        calls, best, stops = rows.certain(pa, pb, ranges)
        picked = np.flatnonzero(calls)
        self.fixed_cost += float(rows.cost[picked, best[picked]].sum())
        np.add.at(self.fixed_count, (rows.group[picked], best[picked]), 1.0)
        self.uncertain = rows.take(np.flatnonzero(~(calls | stops)))
        for b in self.blocks:
            if b.sums is None:  # the sums of a window hold in every window inside it
                b.narrow(ranges)
        self.window = (low, high)

    def price(self, budget: float, sample: int) -> float:
        """``_escalation_price``'s bisection, each step's answer the full search's. With more than twice
        ``sample`` queries, the search on a sample (its budget scaled) says where the price lies; the whole
        batch checks a bracket around it (widened until it holds), the steps outside that bracket are answered by
        it (spend falls as the price rises: the plan's cost is what its price trades off), and inside it only
        the queries uncertain over the bracket are valued again."""
        known: dict[float, bool] = {}

        def exact(x: float) -> bool:
            if x not in known:
                known[x] = self.spend(float(np.exp(x))) <= budget
            return known[x]

        first, last = float(np.log(LAMBDA_GRID[0])), float(np.log(LAMBDA_GRID[-1]))
        if sample > 0 and self.rows.size > 2 * sample:
            part = self.sample(sample)
            guess = float(np.log(part.price(budget * part.rows.size / self.rows.size, 0)))
            below, above = guess, guess
            for side in (-1, 1):
                width = PRICE_WINDOW
                while True:  # below: a price that does not fit; above: one that fits (or the span's end)
                    x = min(max(guess + side * width, first), last)
                    holds = exact(x) == (side > 0)
                    if side < 0:
                        below = x
                    else:
                        above = x
                    if holds or x in (first, last):
                        break
                    width *= 4
            self.narrow(below, above)

        def fits(x: float) -> bool:
            no = max((y for y, ok in known.items() if not ok), default=-np.inf)
            yes = min((y for y, ok in known.items() if ok), default=np.inf)
            if no < yes:  # the spends seen fall with the price: the steps outside them are answered
                if x <= no:
                    return False
                if x >= yes:
                    return True
            return exact(x)

        def step(low: float, high: float) -> None:
            if self.window is None:
                if high - low <= FIRST_WINDOW:
                    self.narrow(low, high)
            elif self.window[0] <= low and high <= self.window[1] and high - low <= (self.window[1] - self.window[0]) / 8:
                self.narrow(low, high)

        return float(np.exp(_bisect_log_price(fits, step)))


def _options(
    priority: np.ndarray,
    now_p: np.ndarray,
    call: np.ndarray,
    stop: np.ndarray,
    value: np.ndarray,
    cost: np.ndarray,
    extra: np.ndarray,
    high: np.ndarray,
    accuracy: np.ndarray,
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """``_solve``'s real-time options (query, option, value, cost, accuracy, _col): one per callable (query,
    LLM), worth priority x value at cost + extra, and one stop per query where ``stop`` (worth priority x now_p,
    free); with each option's LLM column (-1: stop) and its spend variance ((high - cost) / P90_Z)^2 (0: stop)."""
    m = value.shape[1]
    # options in (query, LLM) order with each query's stop last, option ids ascending: the compiled
    # program's own order (the same columns per query as calls-then-stops sorted), so nothing is sorted
    q_idx, j_idx = np.nonzero(np.column_stack([call, stop]))
    is_call = j_idx < m
    is_stop = ~is_call
    m_idx = np.minimum(j_idx, m - 1, out=j_idx)
    # each [n, M] input read once at the options' (query, LLM) entries by one flat index, each column
    # computed in place: the same numbers as 2-d gathers and np.where, without the [options]-sized
    # temporaries (at 1M queries each costs its page faults)
    flat = q_idx * m
    flat += m_idx
    now_q = now_p[q_idx]
    cost_q = cost.take(flat)
    option_value = value.take(flat)
    np.copyto(option_value, now_q, where=is_stop)
    if not (priority == 1.0).all():  # x 1.0 changes no number
        option_value = priority[q_idx] * option_value
    option_cost = extra.take(flat)
    np.add(cost_q, option_cost, out=option_cost)
    np.copyto(option_cost, 0.0, where=is_stop)
    option_accuracy = accuracy.take(flat)
    np.copyto(option_accuracy, now_q, where=is_stop)
    spread = high.take(flat)  # the option's spend variance: ((high - cost) / P90_Z)^2, 0 for a stop
    np.subtract(spread, cost_q, out=spread)
    np.divide(spread, P90_Z, out=spread)
    np.square(spread, out=spread)
    np.copyto(spread, 0.0, where=is_stop)
    del flat, now_q, cost_q
    columns = m_idx  # the LLM's column, -1 for a stop
    np.copyto(columns, -1, where=is_stop)
    options = pl.DataFrame(
        {
            "query": q_idx,
            "option": np.arange(len(q_idx), dtype=np.int64),
            "value": option_value,
            "cost": option_cost,
            "accuracy": option_accuracy,
            "_col": columns,
        }
    )
    return options, columns, spread


def _most_variance_within(cost: np.ndarray, spread: np.ndarray, budget: float) -> float:
    """An upper bound on the spend variance of any set of options costing at most ``budget`` in all: the
    fractional knapsack of the options' variances (most variance per dollar first), a relaxation of one
    option per query. inf where an option that varies costs nothing."""
    fits = (spread > 0) & (cost <= budget)
    if not fits.any():
        return 0.0
    paid, var = cost[fits], spread[fits]
    if (paid <= 0).any():
        return math.inf
    order = np.argsort(-var / paid, kind="stable")
    paid, var = paid[order], var[order]
    before = np.cumsum(paid) - paid  # what the options ahead of each one cost
    whole = before + paid <= budget
    part = (~whole) & (before < budget)  # the one taken in part
    return float(var[whole].sum() + (var[part] * (budget - before[part]) / paid[part]).sum())


def _batch_options(
    seen: Observed,
    ev: Evaluated,
    value: np.ndarray,
    cost: np.ndarray,
    sd2: np.ndarray,
    mixed: tuple[float, np.ndarray],
    first: int,
) -> pl.DataFrame:
    """The batch twin of every call option of an LLM with a batch API (``_solve``'s ``mixed``)."""
    share, discount = mixed
    m = value.shape[1]
    q_idx, m_idx = np.nonzero(np.isfinite(ev.after) & np.isfinite(discount)[None])
    d = discount[m_idx]
    return pl.DataFrame(
        {
            "query": q_idx.astype(np.int64),
            "option": np.arange(first, first + len(q_idx), dtype=np.int64),
            "value": seen.priority[q_idx] * (share * value[q_idx, m_idx] + (1 - share) * ev.now_p[q_idx]),
            "cost": cost[q_idx, m_idx] * d,
            "accuracy": share * ev.after[q_idx, m_idx] + (1 - share) * ev.now_p[q_idx],
            "_col": (m_idx + m).astype(np.int64),
            "_var": sd2[q_idx, m_idx] * d**2,
        }
    )


def round_planner(posterior: Posterior | None, **options: Any) -> PosteriorRoundPlanner:
    """The planner for a run in rounds from a trained model's posterior (``artifacts.Trained.posterior``)."""
    if posterior is None:
        raise ContractError(
            "this predictor version was trained without a round posterior: run `batchplan train` again to run in rounds"
        )
    return PosteriorRoundPlanner(posterior, **options)
