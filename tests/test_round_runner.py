"""The round runner: parity with the single-shot run, resume per round, re-plans under what is left, faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batchplan.app.pipeline import Execution, execute, execute_rounds
from batchplan.app.round_runner import RoundsOutcome, run_rounds
from batchplan.core.contracts import PLAN_SCHEMA, QUEUE_SCHEMA, conform
from batchplan.core.history import History, load_history
from batchplan.core.rounds import OBSERVATION_SCHEMA, RoundRequest, RoundState
from batchplan.core.storage import Storage
from batchplan.dispatchers import get_backend
from batchplan.plans.continuation import PlanContinuation


@pytest.fixture(scope="module")
def cascades(data_dir: Path) -> History:
    if not (data_dir / "cascades" / "queries.parquet").exists():
        pytest.skip("needs ../shared/data/cascades (logprobs on every cell)")
    return load_history([str(data_dir / "cascades")])


def mixed_plan(history: History, n: int = 240, seed: int = 3) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Queue and plan of ``n`` queries, a quarter each single / vote / cascade / agreement, random members."""
    rng = np.random.default_rng(seed)
    queue = conform(history.queries.head(n), QUEUE_SCHEMA, name="queue")
    models = sorted(history.outcomes["model"].unique().to_list())
    rows = []
    for i, query_id in enumerate(queue["query_id"].to_list()):
        kind = ("single", "vote", "cascade", "agreement")[i % 4]
        size = {"single": 1, "vote": 3, "cascade": int(rng.integers(2, 5)), "agreement": 3}[kind]
        members = [str(m) for m in rng.choice(models, size=size, replace=False)]
        thresholds = [float(t) for t in rng.uniform(0.5, 0.99, size - 1)] if kind == "cascade" else None
        rows.append(
            {
                "query_id": query_id,
                "kind": kind,
                "models": members,
                "thresholds": thresholds,
                "expected_cost_usd": 0.001,
                "expected_accuracy": 0.8,
                "fallback_models": [m for m in models if m not in members][:2] if kind == "single" else None,
            }
        )
    return queue, conform(pl.DataFrame(rows), PLAN_SCHEMA, name="plan")


def predictions_for(history: History, queue: pl.DataFrame) -> pl.DataFrame:
    """Recorded costs as the predicted ones (parity needs no predictor: the plan is given)."""
    return history.outcomes.join(queue.select("query_id"), on="query_id").select(
        "query_id", "model", pl.lit(0.7).alias("p_correct"), "cost_usd", pl.col("cost_usd").alias("cost_high_usd")
    )


def replay_rounds(
    history: History, queue: pl.DataFrame, plan: pl.DataFrame, *, rounds: int, out: Path
) -> RoundsOutcome:
    return execute_rounds(
        plan,
        queue,
        predictions_for(history, queue),
        get_backend("replay", history=history),
        PlanContinuation(plan),
        Execution(budget_usd=100.0, out_uri=str(out), storage=Storage()),
        rounds=rounds,
    )


def test_rounds_with_the_plan_planner_give_the_single_shot_run(cascades: History, tmp_path: Path) -> None:
    """The contract's pin: on replay, N rounds of the plan continuation answer, call and pay exactly what
    the single-shot executor does, for every plan kind (cascades up to 4 members need 4 rounds)."""
    queue, plan = mixed_plan(cascades)
    storage = Storage()
    single = execute(
        plan,
        queue,
        get_backend("replay", history=cascades),
        Execution(budget_usd=100.0, out_uri=str(tmp_path / "a"), storage=storage),
    )
    outcome = replay_rounds(cascades, queue, plan, rounds=4, out=tmp_path / "b")
    columns = ["query_id", "answer", "models_called", "cost_usd", "status"]
    # costs to the pico-dollar: the executor adds a query's charges in completion order
    left = single.select(columns).sort("query_id").with_columns(pl.col("cost_usd").round(12))
    right = outcome.results.select(columns).sort("query_id").with_columns(pl.col("cost_usd").round(12))
    assert left["status"].value_counts().sort("status").equals(right["status"].value_counts().sort("status"))
    assert left.equals(right), left.join(right, on="query_id").filter(
        (pl.col("answer") != pl.col("answer_right")) | (pl.col("models_called") != pl.col("models_called_right"))
    )
    # every kind took part, and later rounds did the escalations only
    assert set(plan["kind"].to_list()) == {"single", "vote", "cascade", "agreement"}
    per_round = outcome.observations.group_by("round").len().sort("round")["len"].to_list()
    assert per_round[0] == 60 + 180 + 60 + 120
    assert per_round == sorted(per_round, reverse=True)
    for k in range(1, 5):
        assert (tmp_path / "b" / "rounds" / str(k) / "observations.parquet").exists()


def test_a_rerun_repeats_no_round_and_pays_nothing(cascades: History, tmp_path: Path) -> None:
    queue, plan = mixed_plan(cascades, n=80)
    first = replay_rounds(cascades, queue, plan, rounds=3, out=tmp_path).results
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("rounds/*/*.parquet")}
    again = replay_rounds(cascades, queue, plan, rounds=3, out=tmp_path).results
    assert first.equals(again)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("rounds/*/*.parquet")} == stamps


def _observations(rows: list[tuple[str, str, str, str | None, float | None, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(q, 1, m, s, a, lp, c, True, 10, 1) for q, m, s, a, lp, c in rows], schema=OBSERVATION_SCHEMA, orient="row"
    )


def test_a_round_after_an_overspend_keeps_to_what_is_left() -> None:
    """Round 1 charged twice what it was expected to: round 2 sees the drift, answers the queries whose
    calls failed with their cheapest LLM first, and gives the escalations only what is left."""
    plan = conform(
        pl.DataFrame(
            {
                "query_id": ["a", "b", "c", "d"],
                "kind": ["cascade", "cascade", "single", "single"],
                "models": [["s", "l"], ["s", "l"], ["l"], ["l"]],
                "thresholds": [[0.9], [0.9], None, None],
            }
        ),
        PLAN_SCHEMA,
        name="plan",
    )
    predictions = pl.DataFrame(
        [(q, m, 0.6, c, c) for q in "abcd" for m, c in (("s", 1.0), ("l", 10.0))],
        schema=["query_id", "model", "p_correct", "cost_usd", "cost_high_usd"],
        orient="row",
    )
    # a, b: cheap answer, unsure (escalate); c: answered; d: the large model failed transiently (a 500)
    observed = _observations(
        [
            ("a", "s", "ok", "A", np.log(0.5), 2.0),
            ("b", "s", "ok", "B", np.log(0.5), 2.0),
            ("c", "l", "ok", "C", np.log(0.99), 20.0),
            ("d", "l", "server_error", None, None, 20.0),
        ]
    )
    queue = pl.DataFrame({"query_id": list("abcd")})

    def planned(left: float) -> dict[str, list[str]]:
        calls = PlanContinuation(plan).plan_round(RoundState(2, 2, queue, predictions, observed, left)).calls
        return dict(zip(calls["query_id"], calls["models"].to_list(), strict=True))

    # drift 44 / 22 = 2, so each large call is expected at 20: with money to spare, the plan's own
    # continuation (both escalations, d again on its model); with 45 left, d first, then one escalation
    assert planned(1e3) == {"a": ["l"], "b": ["l"], "d": ["l"]}
    assert planned(45.0) == {"d": ["l"], "a": ["l"]}
    # with 15 left, d moves to its cheapest LLM (2) and no escalation fits
    assert planned(15.0) == {"d": ["s"]}
    # without the drift (round 1 billed as expected), 45 would have bought all three (10 each)
    exact = observed.with_columns(pl.col("cost_usd") / 2)
    calls = PlanContinuation(plan).plan_round(RoundState(2, 2, queue, predictions, exact, 45.0)).calls
    assert calls.height == 3


def test_the_hard_budget_of_a_round_is_what_earlier_rounds_left(cascades: History, tmp_path: Path) -> None:
    """Total spend never passes the budget, and each round's dispatch gets the total minus what the
    rounds before it charged."""
    queue, plan = mixed_plan(cascades, n=120)
    single = plan.with_columns(pl.lit("single").alias("kind"), pl.col("models").list.slice(0, 1))
    budget = 0.02
    outcome = run_rounds(
        PlanContinuation(single),
        queue,
        predictions_for(cascades, queue),
        _Sender(cascades),
        rounds=2,
        run=Execution(budget_usd=budget, out_uri=str(tmp_path), storage=Storage()),
    )
    assert float(outcome.results["cost_usd"].sum()) <= budget
    first, second = outcome.rounds
    assert second["budget_usd"] == pytest.approx(budget - first["charged_usd"])
    # rounds take the same Execution as single shot, with the hard budget resolved: None is refused up front
    with pytest.raises(ValueError, match="hard budget"):
        run_rounds(
            PlanContinuation(single),
            queue,
            predictions_for(cascades, queue),
            _Sender(cascades),
            rounds=2,
            run=Execution(budget_usd=None, out_uri=str(tmp_path / "unbounded"), storage=Storage()),
        )
    assert not (tmp_path / "unbounded").exists()


class _Sender:
    """The real dispatch sender on replay, recording the budget each round was given."""

    def __init__(self, history: History) -> None:
        from batchplan.app.round_runner import DispatchSender

        self.inner = DispatchSender(get_backend("replay", history=history))

    def send(self, request: RoundRequest) -> tuple[pl.DataFrame, pl.DataFrame]:
        return self.inner.send(request)


def test_an_ambiguous_failure_is_charged_at_its_input_tokens_once_a_later_call_told_them() -> None:
    from batchplan.app.round_runner import tighten

    observed = pl.DataFrame(
        [
            ("a", 1, "m", "connection", None, None, 0.05, False, None, None),  # reset: charged its reservation
            ("a", 1, "m", "ok", "B", -0.1, 0.002, True, 100, 1),  # the retry: 100 input tokens
            ("b", 1, "m", "server_error", None, None, 0.05, False, None, None),  # no later call of m on b
            ("c", 1, "m", "rate_limited", None, None, 0.0, True, None, None),  # a 429 is billed nothing
            ("c", 2, "m", "ok", "C", -0.1, 0.002, True, 100, 1),
        ],
        schema=OBSERVATION_SCHEMA,
        orient="row",
    )
    bounds = pl.DataFrame(
        {
            "query_id": ["a", "b", "c"],
            "model": ["m"] * 3,
            "bound_usd": [0.05] * 3,
            "usd_per_token_in": [1e-5] * 3,
            "output_bound_usd": [1.6e-4] * 3,
        }
    )
    tightened = tighten(observed, bounds)
    assert tightened["cost_usd"].to_list() == pytest.approx([100 * 1e-5 + 1.6e-4, 0.002, 0.05, 0.0, 0.002])
    assert tighten(observed, None).equals(observed)


def test_the_budget_holds_in_rounds_against_a_faulty_endpoint(tmp_path: Path) -> None:
    """~18% faults (ambiguous ones charged their bound), a budget half of what the plan would cost:
    neither what the run counts nor what the provider billed passes the budget."""
    from batchplan.core.catalog import PriceCatalog
    from batchplan.core.history import synthetic_history
    from batchplan.dispatchers import RetryPolicy
    from tests.support.replay_server import Faults, ReplayServer

    history = synthetic_history(300, 4, seed=9)
    queue = conform(history.queries, QUEUE_SCHEMA, name="queue")
    plan = conform(
        queue.select("query_id", pl.lit("single").alias("kind"), pl.lit([history.models[3]]).alias("models")),
        PLAN_SCHEMA,
        name="plan",
    )
    full = float(history.outcomes.filter(pl.col("model") == history.models[3])["cost_usd"].sum())
    faults = Faults(rate_429=0.04, rate_500=0.04, rate_malformed=0.03, rate_reset=0.03, rate_slow=0.04, slow_s=0.005)
    with ReplayServer(history, faults) as server:
        backend = get_backend(
            "openai", base_url=server.base_url, catalog=PriceCatalog.from_history(history.prices, history.outcomes)
        )
        outcome = execute_rounds(
            plan,
            queue,
            predictions_for(history, queue),
            backend,
            PlanContinuation(plan),
            Execution(
                budget_usd=full / 2,
                out_uri=str(tmp_path),
                storage=Storage(),
                retry=RetryPolicy(base_delay_s=0.005, max_delay_s=0.02),
            ),
            rounds=3,
        )
        billed = server.stats()["billed_usd"]
    counted = float(outcome.results["cost_usd"].sum())
    assert billed <= counted + 1e-12
    assert counted <= full / 2 + 1e-12
    # the money ran out (the budget bound), and later rounds answered cheaper instead of deferring
    assert counted > 0.9 * full / 2
    assert outcome.rounds[1]["calls_made"] > 0
    assert (outcome.results["status"] == "done").sum() > queue.height / 2


def test_the_posterior_planner_runs_through_the_runner(tmp_path: Path) -> None:
    """h14a's planner (``--round-planner posterior``) behind the same runner: every round dispatched and
    observed, the budget held, every query answered, its estimate from the posterior."""
    from batchplan.app import artifacts
    from batchplan.app.pipeline import predict
    from batchplan.app.round_runner import make_round_planner
    from batchplan.core.history import synthetic_history

    history = synthetic_history(500, 4, n_tasks=1, test_fraction=0.4, seed=5)
    trained = artifacts.train(history.split("train"), predictor="prior", seed=0, round_choice=False)
    queue = history.as_queue("test")
    backend = get_backend("replay", history=history)
    predictions = predict(queue, trained.predictor, backend)
    plan = queue.select("query_id", pl.lit("defer").alias("kind"))  # the posterior planner needs no plan
    budget = 0.3 * float(history.outcomes.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].max())
    planner = make_round_planner("posterior", plan=plan, queue=queue, predictions=predictions, trained=trained)
    outcome = execute_rounds(
        conform(plan, PLAN_SCHEMA, name="plan"),
        queue,
        predictions,
        backend,
        planner,
        Execution(budget_usd=budget, out_uri=str(tmp_path), storage=Storage()),
        rounds=3,
    )
    assert float(outcome.results["cost_usd"].sum()) <= budget
    assert (outcome.results["status"] == "done").all()
    assert 0.3 < outcome.estimated_accuracy <= 1.0
    assert outcome.rounds[0]["calls_made"] >= queue.height


def test_cost_bounds_at_once_are_each_call_s_bound() -> None:
    """The vectorized bounds the planners see are what the executor reserves call by call (to the last bits:
    polars and Python round the same sum differently)."""
    from batchplan.core.catalog import PriceCatalog
    from batchplan.core.history import synthetic_history
    from batchplan.dispatchers import Backend, OutputCaps

    history = synthetic_history(120, 3, seed=4)
    queue = history.as_queue()
    open_queue = queue.with_columns(pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.col("labels")).alias("labels"))
    catalog = PriceCatalog.from_history(history.prices, history.outcomes)
    for backend in (
        get_backend("replay", history=history),
        get_backend("openai", base_url="http://127.0.0.1:9/v1", catalog=catalog),
    ):
        pairs = backend.offered_pairs(queue)
        caps = OutputCaps({(str(queue["task"][0]), history.models[0]): 40}, default=900, closed=16)  # learned caps too
        for learned in (None, caps):
            fast = backend.cost_bounds(open_queue, pairs, learned).sort("query_id", "model")
            slow = Backend.cost_bounds(backend, open_queue, pairs, learned).sort("query_id", "model")
            assert fast.select("query_id", "model").equals(slow.select("query_id", "model"))
            assert fast["bound_usd"].to_list() == pytest.approx(slow["bound_usd"].to_list(), rel=1e-12)


def test_the_simulation_answers_calls_and_pays_what_the_executor_does(cascades: History, tmp_path: Path) -> None:
    """plan_simulation claims to mirror the executor: the same plans of every kind, replayed by both on the
    same history, give the same answer, the same LLMs called (in plan order) and the same cost per query."""
    from batchplan.plans.simulation import PlanSpec, recorded_by_task, simulate

    queue, plan = mixed_plan(cascades)
    plan = plan.with_columns(pl.lit(None, dtype=PLAN_SCHEMA["fallback_models"]).alias("fallback_models"))
    executed = execute(
        plan, queue, get_backend("replay", history=cascades), Execution(budget_usd=100.0, out_uri=str(tmp_path), storage=Storage())
    )
    by_id = {r["query_id"]: r for r in executed.iter_rows(named=True)}
    recorded = recorded_by_task(cascades)
    task_of = dict(cascades.queries.select("query_id", "task").iter_rows())
    for row in plan.iter_rows(named=True):
        rec = recorded[task_of[row["query_id"]]]
        spec = PlanSpec(row["kind"], tuple(row["models"]), tuple(row["thresholds"] or ()))
        i = rec.query_ids.index(row["query_id"])
        sim = simulate(spec, rec)
        got = by_id[row["query_id"]]
        want_answer = rec.labels[sim.answer[i]] if sim.answer[i] >= 0 else None
        assert got["answer"] == want_answer, (row, got)
        assert got["models_called"] == [m for m, r in zip(spec.models, sim.reached[i], strict=True) if r], (row, got)
        assert got["cost_usd"] == pytest.approx(float(sim.cost[i]), rel=1e-9, abs=1e-15), (row, got)


def test_run_defaults_to_three_rounds_unless_its_planner_cannot_hold_the_request() -> None:
    from batchplan.plans.planning import PlanRequest, default_rounds

    assert default_rounds(None, PlanRequest(budget_usd=1.0)) == 3
    assert default_rounds(1, PlanRequest(budget_usd=1.0)) == 1  # asked: kept
    # --max-calls is held by single shot and the posterior planner, not by the plan's continuation: the default
    # falls back to single shot rather than refusing what the user asked for
    capped = PlanRequest(budget_usd=1.0, model_max_calls={"gpt-4o": 3})
    assert default_rounds(None, capped) == 1
    assert default_rounds(None, capped, "posterior") == 3


def test_a_query_short_of_money_is_not_moved_again_to_the_cheap_llm_that_cut_its_answer() -> None:
    # q's planned LLM (dear) was reset in round 1, so round 2 moved q to its cheapest LLM (the money being
    # short) and that one cut its answer (truncated: a failure for good). Round 3 must not call it again:
    # the same call is billed again for the same cut (kill-9 rerun of test_rounds_resume: 10 such bills)

    queue = conform(pl.DataFrame({"query_id": ["q"], "prompt": ["?"]}), QUEUE_SCHEMA, name="queue")
    plan = conform(pl.DataFrame({"query_id": ["q"], "kind": ["single"], "models": [["dear"]]}), PLAN_SCHEMA, name="plan")
    predictions = pl.DataFrame({"query_id": ["q", "q"], "model": ["dear", "cheap"], "p_correct": [0.9, 0.6],
                                "cost_usd": [0.01, 0.0001], "cost_high_usd": [0.02, 0.0002]})  # fmt: skip
    rows = [("q", 1, "dear", "connection", None, None, 0.02, False, None, None),
            ("q", 2, "cheap", "truncated", None, None, 0.0001, True, 40, 2)]  # fmt: skip
    seen = pl.DataFrame(rows, schema=OBSERVATION_SCHEMA, orient="row")
    planner = PlanContinuation(plan)
    short = planner.plan_round(RoundState(3, 3, queue, predictions, seen, 0.005))  # dear (0.01) does not fit
    assert "cheap" not in [m for ms in short.calls["models"].to_list() for m in ms]
    # with the money, the transient failure is called again, on its planned LLM
    assert planner.plan_round(RoundState(3, 3, queue, predictions, seen, 1.0)).calls["models"].to_list() == [["dear"]]
    # and a cheap LLM that failed only transiently is still where a short query moves
    transient = seen.with_columns(pl.when(pl.col("model") == "cheap").then(pl.lit("rate_limited")).otherwise(pl.col("status")).alias("status"))
    assert planner.plan_round(RoundState(3, 3, queue, predictions, transient, 0.005)).calls["models"].to_list() == [["cheap"]]


def test_a_query_whose_llms_bound_is_above_what_is_left_moves_to_its_cheapest_llm() -> None:
    # the dear LLM's expected cost fits what is left, its hard bound (what the budget guard holds) does not:
    # planned there it is refused round after round; its cheapest LLM's bound fits
    queue = conform(pl.DataFrame({"query_id": ["q"], "prompt": ["?"]}), QUEUE_SCHEMA, name="queue")
    plan = conform(pl.DataFrame({"query_id": ["q"], "kind": ["single"], "models": [["dear"]]}), PLAN_SCHEMA, name="plan")
    predictions = pl.DataFrame({"query_id": ["q", "q"], "model": ["dear", "cheap"], "p_correct": [0.9, 0.6],
                                "cost_usd": [0.01, 0.0001], "cost_high_usd": [0.02, 0.0002]})  # fmt: skip
    none = pl.DataFrame(schema=OBSERVATION_SCHEMA)
    planner = PlanContinuation(plan)
    short = planner.plan_round(RoundState(2, 3, queue, predictions, none, 0.015))
    assert short.calls["models"].to_list() == [["cheap"]]
    assert short.diagnostics["moved_over_bound"] == 1
    assert planner.plan_round(RoundState(2, 3, queue, predictions, none, 0.03)).calls["models"].to_list() == [["dear"]]
