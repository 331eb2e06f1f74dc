"""The round re-plan's fast paths give exactly what their polars / per-pattern formulations give."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from batchplan.core.history import synthetic_history
from batchplan.core.rounds import OBSERVATION_SCHEMA, RoundState
from batchplan.plans.candidates import P90_Z
from batchplan.plans.posterior import LAMBDA_GRID, OPAQUE, Posterior, fit_posterior, normalize
from batchplan.plans.round_planner import (
    PosteriorRoundPlanner,
    _answer_patterns,
    _locate,
    _LookAheadSpend,
    _normalized_rank,
    _options,
    _ranks_within,
    _strings,
    evaluate,
    observe,
)


def test_ranks_within_a_query_match_polars_windows() -> None:
    rng = np.random.default_rng(0)
    k = 5_000
    query = rng.integers(0, 700, k)
    answers = pl.Series("a", rng.choice(np.array(["x", "y", "z", "w"]), k)).scatter(rng.integers(0, k, 300), None)
    frame = pl.DataFrame({"q": query, "a": answers})
    want = frame.select(
        pl.col("a").rank("dense").over("q").fill_null(-1).cast(pl.Int32).alias("dense"),
        pl.int_range(pl.len()).over("q").cast(pl.Int32).alias("position"),
    )
    dense, position = _ranks_within(query, answers.rank("dense"))
    assert np.array_equal(dense, want["dense"].to_numpy())
    assert np.array_equal(position, want["position"].to_numpy())


def test_observe_keeps_the_last_answer_of_shuffled_repeated_calls() -> None:
    """Observations out of queue order, over two rounds, a call repeated within a round and across rounds,
    an unknown query and LLM: the last ok call per (query, LLM) by round then row, codes ranked per query."""
    rng = np.random.default_rng(1)
    n, models = 300, ["m0", "m1", "m2"]
    ids = [f"q{i:04d}" for i in range(n)]
    queue = pl.DataFrame({"query_id": ids, "task": "t", "tenant": "default", "priority": 1.0})
    predictions = pl.DataFrame(
        {
            "query_id": np.repeat(ids, len(models)),
            "model": np.tile(models, n),
            "p_correct": rng.uniform(0.3, 0.9, n * len(models)),
            "cost_usd": 1e-5,
            "cost_high_usd": 2e-5,
        }
    )
    k = 1_200
    rows = pl.DataFrame(
        {
            "query_id": rng.choice(np.array([*ids, "stranger"]), k),
            "round": rng.integers(1, 3, k),
            "model": rng.choice(np.array([*models, "unpredicted"]), k),
            "status": rng.choice(np.array(["ok", "ok", "ok", "error"]), k),
            "answer": pl.Series(rng.choice(np.array(["A", "b.", "B", "c"]), k)).scatter(rng.integers(0, k, 50), None),
            "logprob": np.log(rng.uniform(0.2, 1.0, k)),
            "cost_usd": 1e-5,
            "billed_known": True,
            "tokens_in": 10,
            "tokens_out": 1,
        },
        schema_overrides=dict(OBSERVATION_SCHEMA),
    ).select(OBSERVATION_SCHEMA.names())
    seen = observe(queue, predictions, rows)
    # the reference: polars windows over the calls in round, then row order
    ok = (
        rows.with_row_index("_seq")
        .filter(pl.col("status") == "ok", pl.col("query_id").is_in(ids), pl.col("model").is_in(models))
        .sort("round", "_seq")
        .unique(["query_id", "model"], keep="last", maintain_order=True)
        .with_columns(
            normalize(pl.col("answer")).rank("dense").over("query_id").cast(pl.Int32).alias("_code"),
            pl.int_range(pl.len()).over("query_id").cast(pl.Int32).alias("_order"),
        )
    )
    r = np.array([ids.index(q) for q in ok["query_id"].to_list()])
    c = np.array([models.index(m) for m in ok["model"].to_list()])
    assert np.array_equal(seen.states.code[r, c], ok["_code"].fill_null(OPAQUE).to_numpy())
    assert np.array_equal(seen.states.order[r, c], ok["_order"].to_numpy())
    assert int((seen.states.code != -2).sum()) == ok.height
    assert np.allclose(seen.states.conf[r, c], np.exp(ok["logprob"].to_numpy()))
    # every call counts toward its tries, failed ones included
    known = rows.filter(pl.col("query_id").is_in(ids), pl.col("model").is_in(models))
    assert int(seen.tries.sum()) == known.height


M_MIXED = 5


@pytest.fixture(scope="module")
def mixed_posterior() -> Posterior:
    """A posterior with escalation tables for two tasks (fitted once: the tables replay every pair)."""
    history = synthetic_history(300, M_MIXED, n_tasks=2, seed=5)
    skill = history.outcomes.group_by("model").agg(pl.col("correct").mean().alias("p_correct"))
    return fit_posterior(history, history.outcomes.select("query_id", "model").join(skill, on="model"))


def _two_tasks(
    listed: list[str], n: int, seed: int
) -> tuple[np.random.Generator, list[str], pl.DataFrame, np.ndarray, pl.DataFrame]:
    """A queue of two tasks and its predictions, every query for every LLM in the order ``listed``; the
    generator, ids and the [n, M] costs (in that order) for the observations."""
    m = len(listed)
    rng = np.random.default_rng(seed)
    ids = [f"q{i:05d}" for i in range(n)]
    queue = pl.DataFrame({"query_id": ids, "task": rng.choice(["task0", "task1"], n), "tenant": "default", "priority": 1.0})
    cost = np.geomspace(1e-6, 1e-4, m)[None] * rng.lognormal(0, 0.5, (n, 1))
    predictions = pl.DataFrame(
        {
            "query_id": np.repeat(ids, m),
            "model": np.tile(listed, n),
            "p_correct": rng.uniform(0.3, 0.95, n * m),
            "cost_usd": cost.ravel(),
            "cost_high_usd": 1.3 * cost.ravel(),
        }
    )
    return rng, ids, queue, cost, predictions


def _mixed_batch(
    posterior: Posterior, n: int = 3_000, seed: int = 5
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, float]:
    """A batch whose look-ahead search meets every case: two tasks, LLMs not predicted for some queries (a first
    LLM some queries cannot call), round-1 answers of two different LLMs and failed calls (several patterns), a
    budget that escalates part of the batch."""
    m = M_MIXED
    models = sorted(posterior.models)
    rng, ids, queue, cost, predictions = _two_tasks(models, n, seed)
    predictions = predictions.filter(pl.Series(rng.uniform(size=n * m) > 0.05))
    first = rng.choice(np.array([0, 0, 0, 1, -1]), n)  # -1: the call failed
    asked = np.where(first < 0, 0, first)
    observations = pl.DataFrame(
        {
            "query_id": ids,
            "round": 1,
            "model": np.array(models)[asked],
            "status": np.where(first < 0, "rate_limited", "ok"),
            "answer": pl.Series(rng.choice(["A", "B", "C"], n)).scatter(np.flatnonzero(first < 0), None),
            "logprob": np.log(rng.uniform(0.3, 1.0, n)),
            "cost_usd": cost[np.arange(n), asked],
            "billed_known": True,
            "tokens_in": 100,
            "tokens_out": 1,
        },
        schema_overrides=dict(OBSERVATION_SCHEMA),
    ).select(OBSERVATION_SCHEMA.names())
    return queue, predictions, observations, float(cost[:, m // 2].sum())


@pytest.mark.parametrize("sample", [20, 400])
@pytest.mark.parametrize("round_", [1, 2])
@pytest.mark.parametrize("confident", [True, False])
def test_the_sampled_price_search_plans_what_the_full_search_plans(
    mixed_posterior: Posterior, sample: int, round_: int, confident: bool
) -> None:
    """The look-ahead's price bracketed on a sample (20 queries: a poor guess the whole batch must widen) is the
    full bisection's to the last bit, and so is the plan: round 1 (one first LLM per task; a task without
    confidences planned per query) and a middle round (stop or call, several patterns)."""
    posterior = mixed_posterior
    queue, predictions, observations, budget = _mixed_batch(posterior)
    if not confident:  # task1's history without logprobs: round 1 plans it per query, without escalation tables
        posterior = dataclasses.replace(posterior, confident={"task0": True, "task1": False})
    seen = observations if round_ == 2 else observations.clear()
    state = RoundState(round_, 3, queue, predictions, seen, budget)
    full = PosteriorRoundPlanner(posterior, price_sample=0).plan_round(state)
    assert queue.height > 2 * sample  # the sampled path, not the full one
    fast = PosteriorRoundPlanner(posterior, price_sample=sample).plan_round(state)
    assert full.diagnostics["escalation_price"] > 1.0  # a price inside the span, found by bisection
    assert fast.diagnostics["escalation_price"] == full.diagnostics["escalation_price"]
    assert_frame_equal(fast.calls, full.calls)


@pytest.mark.parametrize("round_", [1, 2])
def test_the_look_ahead_spend_over_a_window_is_every_query_valued_again(mixed_posterior: Posterior, round_: int) -> None:
    """Within a window the queries certain there count by their option and a task's first LLM by its sums:
    the spend at every price of the window is the spend with every query valued at that price."""
    queue, predictions, observations, _ = _mixed_batch(mixed_posterior)
    posterior = dataclasses.replace(mixed_posterior, confident={"task0": True, "task1": round_ == 2})
    planner = PosteriorRoundPlanner(posterior)
    seen = observe(queue, predictions, observations if round_ == 2 else observations.clear())
    ev = evaluate(posterior, seen, planner.max_tries)
    call = np.isfinite(ev.after)
    group, keys = _answer_patterns(seen, posterior)
    blocks = np.where(seen.tasks == "task0", 0, -1) if round_ == 1 else None

    def fresh() -> _LookAheadSpend:
        return _LookAheadSpend.build(
            planner._call_value(ev, call), seen.cost, call, group, None if round_ == 1 else ev.now_p, blocks,
            lambda price: planner._escalation_tables(seen, keys, price), np.asarray(LAMBDA_GRID),
        )

    windowed, every = fresh(), fresh()
    for low, high in [(np.log(2e3), np.log(5e4)), (np.log(8e3), np.log(1.2e4))]:  # a window, then one inside it
        windowed.narrow(low, high)
        for x in np.linspace(low, high, 25):
            price = float(np.exp(x))
            assert windowed.spend(price) == pytest.approx(every.spend(price), rel=1e-12, abs=1e-15)
    # the window did spare queries: some count by their option, the first LLM of task0 by its sums
    assert windowed.uncertain is not None
    assert windowed.uncertain.size < windowed.general.size
    assert all(b.sums is not None for b in windowed.blocks)
    assert len(windowed.blocks) == (round_ == 1)


@pytest.mark.parametrize("round_", [1, 2])
def test_the_look_ahead_spend_of_a_batch_without_a_call_is_nothing(mixed_posterior: Posterior, round_: int) -> None:
    """A round where no open query has a call left (the nightly audits DAG's round 2 met it): the search has no
    rows, spends nothing at any price, and builds (it raised on zip(heads, ends) before)."""
    queue, predictions, observations, _ = _mixed_batch(mixed_posterior)
    planner = PosteriorRoundPlanner(mixed_posterior)
    seen = observe(queue, predictions, observations if round_ == 2 else observations.clear())
    ev = evaluate(mixed_posterior, seen, planner.max_tries)
    call = np.zeros_like(np.isfinite(ev.after))
    group, keys = _answer_patterns(seen, mixed_posterior)
    search = _LookAheadSpend.build(
        planner._call_value(ev, call), seen.cost, call, group, None if round_ == 1 else ev.now_p,
        np.where(seen.tasks == "task0", 0, -1) if round_ == 1 else None,
        lambda price: planner._escalation_tables(seen, keys, price), np.asarray(LAMBDA_GRID),
    )
    assert search.rows.size == 0
    assert search.blocks == []
    assert search.spend(1e4) == 0.0


def _regular_batch(posterior: Posterior, n: int = 2_000, seed: int = 7) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, float]:
    """A batch the re-plan's fast paths take: every query predicted for every LLM in one (unsorted) LLM order,
    round 1 answered query by query in queue order (answers that normalize alike, failed calls), round 2 on
    a part of it; no (query, LLM) called twice in a round."""
    m = M_MIXED
    models = sorted(posterior.models)
    listed = [models[j] for j in (2, 0, 4, 1, 3)]  # pipeline.predict's order need not be sorted
    rng, ids, queue, cost, predictions = _two_tasks(listed, n, seed)

    def answered(rows: np.ndarray, round_: int, model: str, fail: float) -> pl.DataFrame:
        failed = rng.uniform(size=len(rows)) < fail
        return pl.DataFrame(
            {
                "query_id": [ids[i] for i in rows],
                "round": round_,
                "model": model,
                "status": np.where(failed, "server_error", "ok"),
                "answer": pl.Series(rng.choice(["A", "a.", "B", "C "], len(rows))).scatter(np.flatnonzero(failed), None),
                "logprob": np.log(rng.uniform(0.3, 1.0, len(rows))),
                # billed as predicted: a drift of 1 exactly (its polars sums follow the frame's layout, as before)
                "cost_usd": cost[rows, listed.index(model)],
                "billed_known": True,
                "tokens_in": 100,
                "tokens_out": 1,
            },
            schema_overrides=dict(OBSERVATION_SCHEMA),
        ).select(OBSERVATION_SCHEMA.names())

    second = np.flatnonzero(rng.uniform(size=n) < 0.4)
    observations = pl.concat([answered(np.arange(n), 1, models[0], 0.05), answered(second, 2, models[3], 0.05)])
    return queue, predictions, observations, float(cost[:, m // 2].sum())


def _general(predictions: pl.DataFrame, observations: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The same inputs in a form no fast path takes: predictions shuffled (a join on the ids, a scatter), and a
    call of a query the queue lacks first (it drops out; no prefix in queue order: the join on the hashes). The
    calls keep their order: the cost drift sums them in it."""
    shuffled = predictions.sample(fraction=1.0, shuffle=True, seed=3)
    stranger = observations.head(1).with_columns(pl.lit("stranger").alias("query_id"))
    return shuffled, pl.concat([stranger, observations])


def test_observe_fast_paths_match_the_general_ones(mixed_posterior: Posterior) -> None:
    """The dense state from predictions in one LLM order per query (a reshape) and round 1 in queue order (a
    prefix) is, bit for bit, the state from the same rows shuffled (a join on the ids, a scatter)."""
    queue, predictions, observations, _ = _regular_batch(mixed_posterior)
    for seen_rows in (observations.filter(pl.col("round") == 1), observations):
        fast = observe(queue, predictions, seen_rows)
        slow = observe(queue, *_general(predictions, seen_rows))
        for name in ("prior", "code", "conf", "order"):
            a, b = getattr(fast.states, name), getattr(slow.states, name)
            assert a.dtype == b.dtype, name
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        for name in ("cost", "high", "tries", "tasks", "tenants", "priority"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert a.dtype == b.dtype, name
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        assert fast.models == slow.models
        assert fast.drift == slow.drift == dict.fromkeys(fast.drift, 1.0)
        assert_frame_equal(fast.answers.sort("_q", "_m"), slow.answers.sort("_q", "_m"))
    # the fast paths' own pieces against polars' formulation
    answers = pl.Series("answer", ["A", "a.", None, "B ", "b", "A"] * 50)
    want = answers.to_frame().select(normalize(pl.col("answer")).rank("dense"))["answer"]
    assert _normalized_rank(answers).equals(want)
    tasks = queue["task"]
    assert np.array_equal(_strings(tasks), tasks.to_numpy().astype(str))
    assert _strings(tasks).dtype == tasks.to_numpy().astype(str).dtype
    keys = pl.concat([queue["query_id"], pl.Series(["stranger", "q00003", "q00001"])])
    rows, where = _locate(keys, queue["query_id"])
    joined = keys.to_frame().with_row_index("row").join(
        queue.select("query_id").with_row_index("q"), on="query_id", how="inner", maintain_order="left"
    )
    assert np.array_equal(rows, joined["row"].to_numpy())
    assert np.array_equal(where, joined["q"].to_numpy())


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_the_round_plan_from_the_fast_paths_is_the_general_one(mixed_posterior: Posterior, round_: int) -> None:
    """Rounds 1-3 of 3 plan the same calls, to the last bit, from inputs the fast paths take and from the same
    rows in an order none takes."""
    queue, predictions, observations, budget = _regular_batch(mixed_posterior)
    seen = observations.filter(pl.col("round") < round_)
    fast = PosteriorRoundPlanner(mixed_posterior).plan_round(RoundState(round_, 3, queue, predictions, seen, budget))
    shuffled, within = _general(predictions, seen)
    slow = PosteriorRoundPlanner(mixed_posterior).plan_round(RoundState(round_, 3, queue, shuffled, within, budget))
    assert fast.calls.height > 0
    assert fast.diagnostics["escalation_price"] == slow.diagnostics["escalation_price"]
    assert_frame_equal(fast.calls, slow.calls)


@pytest.mark.parametrize("priority", [1.0, 2.5])
def test_the_options_are_their_2d_gathers(priority: float) -> None:
    """``_options``' flat gathers computed in place give the options table np.where over 2-d gathers gives."""
    rng = np.random.default_rng(11)
    n, m = 300, 4
    call = rng.uniform(size=(n, m)) < 0.6
    stop = rng.uniform(size=n) < 0.8
    stop |= ~call.any(axis=1)
    value, cost, extra, accuracy = (rng.uniform(size=(n, m)) for _ in range(4))
    high = cost * rng.uniform(1.0, 2.0, (n, m))
    prio = np.where(rng.uniform(size=n) < 0.5, priority, 1.0)
    now_p = rng.uniform(size=n)
    options, columns, spread = _options(prio, now_p, call, stop, value, cost, extra, high, accuracy)
    # the formulation before the fast path
    q, j = np.nonzero(np.column_stack([call, stop]))
    is_call, mj = j < m, np.minimum(j, m - 1)
    want = pl.DataFrame(
        {
            "query": q.astype(np.int64),
            "option": np.arange(len(q), dtype=np.int64),
            "value": prio[q] * np.where(is_call, value[q, mj], now_p[q]),
            "cost": np.where(is_call, cost[q, mj] + extra[q, mj], 0.0),
            "accuracy": np.where(is_call, accuracy[q, mj], now_p[q]),
            "_col": np.where(is_call, mj, -1).astype(np.int64),
        }
    )
    assert_frame_equal(options, want, check_exact=True)
    assert np.array_equal(columns, want["_col"].to_numpy())
    assert np.array_equal(spread, np.where(is_call, (((high - cost) / P90_Z) ** 2)[q, mj], 0.0))
