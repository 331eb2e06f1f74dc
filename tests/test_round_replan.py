"""The round re-plan's fast paths give exactly what their polars / per-pattern formulations give."""

from __future__ import annotations

import numpy as np
import polars as pl

from batchplan.core.rounds import OBSERVATION_SCHEMA
from batchplan.plans.posterior import OPAQUE, normalize
from batchplan.plans.round_planner import _ranks_within, observe


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
