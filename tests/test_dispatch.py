"""Dispatch on the replay backend: answers as recorded, the hard budget, the ledger, resume, plan kinds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchplan.core.contracts import RESULT_SCHEMA
from batchplan.core.history import History
from batchplan.core.storage import Storage
from batchplan.dispatchers import (
    DispatchOptions,
    adispatch,
    available_backends,
    dispatch,
    get_backend,
    parse_answer,
    read_manifest,
    read_results,
)
from batchplan.dispatchers.budget import BudgetGuard
from tests.support.factories import queue_of, recorded, single_plan


def test_registry_names_replay(small_history: History) -> None:
    assert "replay" in available_backends()
    backend = get_backend("replay", history=small_history)
    assert backend.catalog.models == small_history.models
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("nope")


def test_offered_pairs_are_the_recorded_pairs(small_history: History) -> None:
    queue = queue_of(small_history, 20)
    pairs = get_backend("replay", history=small_history).offered_pairs(queue)
    assert pairs.columns == ["query_id", "model"]
    assert pairs.height == 20 * len(small_history.models)


def test_replay_answers_as_recorded_within_ample_budget(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 100)
    plan = single_plan(small_history, queue)
    results = dispatch(
        plan, queue, get_backend("replay", history=small_history), budget_usd=1e6, out_uri=str(tmp_path / "run")
    )
    assert results.schema == RESULT_SCHEMA
    assert results["query_id"].to_list() == plan["query_id"].to_list()
    truth = recorded(small_history)
    for qid, answer, models, cost, status, _error, _note in results.iter_rows():
        want_answer, want_cost = truth[(qid, models[0])]
        assert status == "done"
        assert answer == want_answer
        assert cost == pytest.approx(want_cost)
    manifest = read_manifest(Storage(), str(tmp_path / "run"))
    assert manifest["complete"] is True
    assert manifest["counts"] == {"done": 100}


def test_budget_refusal_defers_and_never_overspends(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 200)
    plan = single_plan(small_history, queue, pick="dearest")
    full = float(plan["expected_cost_usd"].sum())
    budget = full * 0.4
    results = dispatch(
        plan,
        queue,
        get_backend("replay", history=small_history),
        budget_usd=budget,
        out_uri=str(tmp_path / "run"),
        options=DispatchOptions(concurrency=16),
    )
    assert results.height == 200  # nothing dropped
    spent = float(results["cost_usd"].sum())
    assert spent <= budget
    deferred = results.filter(pl.col("status") == "deferred")
    assert deferred.height > 0
    assert (deferred["cost_usd"] == 0).all()
    assert deferred["error"].str.contains("budget").all()
    assert set(results["status"].unique()) <= {"done", "deferred"}
    # every deferred call really would have passed the budget: greedy check on what was left
    cheapest_deferred = float(plan.join(deferred.select("query_id"), on="query_id")["expected_cost_usd"].min())
    assert spent + cheapest_deferred > budget


def test_zero_budget_defers_everything(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 30)
    plan = single_plan(small_history, queue)
    results = dispatch(
        plan, queue, get_backend("replay", history=small_history), budget_usd=0.0, out_uri=str(tmp_path / "run")
    )
    assert results["status"].to_list() == ["deferred"] * 30
    assert float(results["cost_usd"].sum()) == 0.0


def test_rerun_pays_nothing_and_bigger_budget_finishes_deferred(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 150)
    plan = single_plan(small_history, queue, pick="dearest")
    full = float(plan["expected_cost_usd"].sum())
    out = str(tmp_path / "run")
    backend = get_backend("replay", history=small_history)
    first = dispatch(plan, queue, backend, budget_usd=full / 2, out_uri=out)
    again = dispatch(plan, queue, backend, budget_usd=full / 2, out_uri=out)
    assert again.filter(pl.col("status") == "done").equals(first.filter(pl.col("status") == "done"))
    assert float(again["cost_usd"].sum()) == pytest.approx(float(first["cost_usd"].sum()))
    finished = dispatch(plan, queue, backend, budget_usd=full * 1.01, out_uri=out)
    assert (finished["status"] == "done").all()
    assert float(finished["cost_usd"].sum()) == pytest.approx(full)
    # the ledger holds each call once
    calls = [
        json.loads(line) for f in (tmp_path / "run" / "ledger").glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    keys = [(e["q"], e["c"]) for e in calls if e["e"] == "c"]
    assert len(keys) == len(set(keys)) == 150
    assert sum(e["usd"] for e in calls if e["e"] == "c") == pytest.approx(full)


def test_fallback_when_the_plan_model_cannot_answer(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 5)
    models = small_history.models
    plan = single_plan(small_history, queue).with_columns(
        pl.lit(["no-such-model"]).alias("models"), pl.lit([models[0]]).alias("fallback_models")
    )
    results = dispatch(
        plan, queue, get_backend("replay", history=small_history), budget_usd=10.0, out_uri=str(tmp_path / "run")
    )
    assert (results["status"] == "done").all()
    assert results["models_called"].to_list() == [["no-such-model", models[0]]] * 5
    assert results["error"].is_null().all()
    assert results["note"].str.contains(f"fallback to {models[0]}").fill_null(False).all()


def test_vote_and_cascade(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 40)
    models = small_history.models[:3]
    base = single_plan(small_history, queue)
    vote = base.with_columns(
        pl.lit("vote").alias("kind"), pl.lit(models).alias("models"), pl.lit(None, pl.Float64).alias("reserve_cost_usd")
    )
    results = dispatch(
        vote, queue, get_backend("replay", history=small_history), budget_usd=10.0, out_uri=str(tmp_path / "vote")
    )
    truth = recorded(small_history)
    for qid, answer, called, _cost, status, _error, _note in results.iter_rows():
        assert status == "done"
        assert sorted(called) == sorted(models)
        votes = [truth[(qid, m)][0] for m in models]
        assert votes.count(answer) == max(votes.count(v) for v in votes)
    cascade = vote.with_columns(pl.lit("cascade").alias("kind"), pl.lit([0.0, 2.0]).alias("thresholds"))
    results = dispatch(
        cascade, queue, get_backend("replay", history=small_history), budget_usd=10.0, out_uri=str(tmp_path / "cascade")
    )
    # threshold 0 at step 0: every cascade stops at its first model
    assert results["models_called"].to_list() == [[models[0]]] * 40
    assert results["answer"].to_list() == [truth[(q, models[0])][0] for q in results["query_id"]]


def test_results_readable_from_parts(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 60)
    plan = single_plan(small_history, queue)
    out = str(tmp_path / "run")
    results = dispatch(
        plan,
        queue,
        get_backend("replay", history=small_history),
        budget_usd=1.0,
        out_uri=out,
        options=DispatchOptions(part_rows=7),
    )
    parts = list((tmp_path / "run" / "results").glob("part-*.parquet"))
    assert len(parts) >= 60 // 7
    assert read_results(out).sort("query_id").equals(results.sort("query_id"))


def test_results_on_s3(small_history: History, s3_storage: Storage, s3_bucket: str) -> None:
    queue = queue_of(small_history, 25)
    plan = single_plan(small_history, queue)
    out = f"{s3_bucket}/runs/one"
    backend = get_backend("replay", history=small_history)
    results = dispatch(
        plan, queue, backend, budget_usd=1.0, out_uri=out, storage=s3_storage, options=DispatchOptions(part_rows=10)
    )
    assert (results["status"] == "done").all()
    again = dispatch(plan, queue, backend, budget_usd=1.0, out_uri=out, storage=s3_storage)
    assert again.equals(results)
    assert any(u.endswith(".jsonl") for u in s3_storage.list(f"{out}/ledger"))


@pytest.mark.parametrize(
    ("text", "labels", "want"),
    [
        ("B", ("A", "B"), ("B", None)),
        (" (b). ", ("A", "B"), ("B", None)),
        ("Answer: C", ("A", "B", "C"), ("C", None)),
        ("**D** because", ("A", "D"), ("D", None)),
        ('{"answer": "yes"}', ("yes", "no"), ("yes", None)),
        ('{"answer": ', ("yes", "no"), (None, "malformed_json")),
        ("", ("A",), (None, "empty")),
        ("I'm sorry, I cannot help with that.", ("A", "B"), (None, "refusal")),
        ("E", ("A", "B"), (None, "outside_labels")),
        ("free text", None, ("free text", None)),
    ],
)
def test_parse_answer(text: str, labels: tuple[str, ...] | None, want: tuple[str | None, str | None]) -> None:
    assert parse_answer(text, labels) == want


def test_budget_guard_waits_for_in_flight_then_refuses() -> None:
    async def scenario() -> None:
        guard = BudgetGuard(1.0)
        first = await guard.reserve(0.6)
        assert first is not None
        assert guard.try_reserve(0.6) is None
        waiter = asyncio.create_task(guard.reserve(0.45))  # fits once the in-flight call settles
        await asyncio.sleep(0)
        assert not waiter.done()
        await guard.settle(first, 0.5)
        assert await waiter is not None
        assert await guard.reserve(0.6) is None  # 0.5 spent: 0.6 can never fit
        assert guard.spent_usd == pytest.approx(0.5)
        assert guard.reserved_usd == pytest.approx(0.45)

    asyncio.run(scenario())


def test_agreement_and_planned_deferral(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 60)
    models = small_history.models[:3]
    base = single_plan(small_history, queue)
    plan = base.with_columns(pl.lit("agreement").alias("kind"), pl.lit(models).alias("models"))
    plan = plan.with_columns(pl.when(pl.int_range(pl.len()) < 5).then(pl.lit("defer")).otherwise("kind").alias("kind"))
    results = dispatch(
        plan, queue, get_backend("replay", history=small_history), budget_usd=10.0, out_uri=str(tmp_path / "run")
    )
    truth = recorded(small_history)
    assert results["status"].head(5).to_list() == ["deferred"] * 5
    assert results["cost_usd"].head(5).sum() == 0
    for qid, answer, called, cost, status, _error, _note in results.tail(55).iter_rows():
        a, b, c = (truth[(qid, m)][0] for m in models)
        assert status == "done"
        if a is not None and a == b:
            assert called == models[:2]
            assert answer == a
        else:
            assert called == models
            assert answer == (c if c is not None else a if a is not None else b)
        assert cost == pytest.approx(sum(truth[(qid, m)][1] for m in called))
    odd = plan.head(1).with_columns(pl.lit("lottery").alias("kind"))
    failed = dispatch(
        odd, queue, get_backend("replay", history=small_history), budget_usd=1.0, out_uri=str(tmp_path / "odd")
    )
    assert failed["status"].to_list() == ["failed"]
    assert "unknown plan kind" in failed["error"][0]


def test_one_writer_per_out_uri(small_history: History, tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import time

    from batchplan.dispatchers.ledger import RunLocked

    queue = queue_of(small_history, 10)
    plan = single_plan(small_history, queue)
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "lock.json"
    lock.write_text(
        json.dumps({"writer": "other", "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
    )
    backend = get_backend("replay", history=small_history)
    with pytest.raises(RunLocked, match="being dispatched"):
        dispatch(plan, queue, backend, budget_usd=1.0, out_uri=str(out))
    assert not (out / "ledger").exists()  # nothing was sent
    dead_pid = subprocess.Popen(["true"])  # once reaped, its pid names no process: a killed holder
    dead_pid.wait()
    lock.write_text(
        json.dumps({"writer": "killed", "host": socket.gethostname(), "pid": dead_pid.pid, "at": time.time()})
    )
    results = dispatch(plan, queue, backend, budget_usd=1.0, out_uri=str(out))
    assert (results["status"] == "done").all()
    assert not lock.exists()


def test_a_zombie_holder_is_a_dead_holder(small_history: History, tmp_path: Path) -> None:
    """A killed process nobody reaps (a container without an init) stays a zombie, and kill(pid, 0) succeeds
    on it: the lease must read its state, or the rerun waits out the TTL."""
    import os
    import socket
    import time

    queue = queue_of(small_history, 10)
    plan = single_plan(small_history, queue)
    out = tmp_path / "run"
    out.mkdir()
    child = os.fork()
    if child == 0:  # the child exits at once; the parent does not reap it until the end
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        os.kill(child, 0)  # still 'exists'
        (out / "lock.json").write_text(
            json.dumps({"writer": "killed", "host": socket.gethostname(), "pid": child, "at": time.time()})
        )
        results = dispatch(plan, queue, get_backend("replay", history=small_history), budget_usd=1.0, out_uri=str(out))
        assert (results["status"] == "done").all()
    finally:
        os.waitpid(child, 0)


def test_votes_under_concurrency_never_pass_the_budget(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 200)
    models = small_history.models[-3:]
    plan = single_plan(small_history, queue).with_columns(pl.lit("vote").alias("kind"), pl.lit(models).alias("models"))
    truth = recorded(small_history)
    full = sum(truth[(q, m)][1] for q in queue["query_id"] for m in models)
    for i, share in enumerate((0.05, 0.33, 0.8)):
        budget = full * share
        results = dispatch(
            plan,
            queue,
            get_backend("replay", history=small_history),
            budget_usd=budget,
            out_uri=str(tmp_path / f"r{i}"),
            options=DispatchOptions(concurrency=64),
        )
        assert float(results["cost_usd"].sum()) <= budget
        assert results.height == 200


@given(
    budget=st.floats(0.0, 10.0),
    calls=st.lists(st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 1.0)), max_size=40),
)
@settings(max_examples=60, deadline=None)
def test_budget_guard_property(budget: float, calls: list[tuple[float, float]]) -> None:
    """Whatever the reservations and their settlements (billed <= reserved), spend never passes the budget."""

    async def scenario() -> None:
        guard = BudgetGuard(budget)
        held = []
        for bound, billed_share in calls:
            reservation = guard.try_reserve(bound)
            if reservation is not None:
                held.append((reservation, bound * billed_share))
            if len(held) > 3:
                r, billed = held.pop(0)
                await guard.settle(r, billed)
            assert guard.spent_usd + guard.reserved_usd <= budget + 1e-12
        for r, billed in held:
            await guard.settle(r, billed)
        assert guard.spent_usd <= budget
        assert guard.reserved_usd == 0

    asyncio.run(scenario())


def test_a_registered_backend_gets_open_task_budgets(small_history: History, tmp_path: Path) -> None:
    from batchplan.core.catalog import PriceCatalog
    from batchplan.dispatchers import Backend, CallRequest, CallResult, register_backend

    seen: list[CallRequest] = []

    class Recording(Backend):
        name = "recording"

        @property
        def catalog(self) -> PriceCatalog:
            return PriceCatalog.from_history(small_history.prices, small_history.outcomes)

        def offered_pairs(self, queue: pl.DataFrame) -> pl.DataFrame:
            return queue.select("query_id").join(pl.DataFrame({"model": ["m"]}), how="cross")

        def cost_bound(self, request: CallRequest) -> float | None:
            return request.max_tokens * 1e-6

        async def call(self, request: CallRequest) -> CallResult:
            seen.append(request)
            return CallResult(request.model, "ok", answer="x", cost_usd=request.max_tokens * 1e-7)

    register_backend("recording", lambda: Recording())
    queue = queue_of(small_history, 4).with_columns(
        pl.when(pl.int_range(pl.len()) < 2).then(pl.col("labels")).otherwise(None).alias("labels")
    )
    plan = single_plan(small_history, queue).with_columns(pl.lit(["m"]).alias("models"))
    results = dispatch(
        plan,
        queue,
        get_backend("recording"),
        budget_usd=1.0,
        out_uri=str(tmp_path / "run"),
        options=DispatchOptions(max_tokens_open=900),
    )
    assert sorted(r.max_tokens for r in seen) == [16, 16, 900, 900]
    assert len({r.key for r in seen}) == 4
    assert all(r.key.endswith(f"/{r.query_id}/0:m:0") for r in seen)
    assert results["cost_usd"].sum() == pytest.approx((16 + 16 + 900 + 900) * 1e-7)


def test_tenant_budgets_are_hard_caps_and_resume_from_the_ledger(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 160).with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("acme")).otherwise(pl.lit("globex")).alias("tenant")
    )
    plan = single_plan(small_history, queue, pick="dearest")
    planned = plan.join(queue.select("query_id", "tenant"), on="query_id")
    acme_full = float(planned.filter(pl.col("tenant") == "acme")["expected_cost_usd"].sum())
    backend = get_backend("replay", history=small_history)
    out = str(tmp_path / "run")

    def spent_by_tenant(results: pl.DataFrame) -> dict[str, float]:
        joined = results.join(queue.select("query_id", "tenant"), on="query_id")
        return dict(joined.group_by("tenant").agg(pl.col("cost_usd").sum()).iter_rows())

    first = dispatch(
        plan,
        queue,
        backend,
        budget_usd=1e6,
        out_uri=out,
        tenant_budgets_usd={"acme": acme_full / 3},
        options=DispatchOptions(concurrency=8),
    )
    tenant_of = dict(queue.select("query_id", "tenant").iter_rows())
    deferred = first.filter(pl.col("status") == "deferred")
    assert deferred.height > 0
    assert {tenant_of[q] for q in deferred["query_id"]} == {"acme"}  # globex has no cap: all done
    assert deferred["error"].str.contains("tenant 'acme' budget").all()
    assert spent_by_tenant(first)["acme"] <= acme_full / 3
    assert read_manifest(Storage(), out)["tenant_spent_usd"]["acme"] == pytest.approx(spent_by_tenant(first)["acme"])

    # a rerun starts from what the ledger charged acme: nothing new fits, nothing is paid twice
    again = dispatch(plan, queue, backend, budget_usd=1e6, out_uri=out, tenant_budgets_usd={"acme": acme_full / 3})
    assert spent_by_tenant(again) == pytest.approx(spent_by_tenant(first))
    finished = dispatch(
        plan, queue, backend, budget_usd=1e6, out_uri=out, tenant_budgets_usd={"acme": acme_full * 1.01}
    )
    assert (finished["status"] == "done").all()
    assert spent_by_tenant(finished)["acme"] == pytest.approx(acme_full)


def test_tenant_budgets_need_a_tenant_column(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 10).drop("tenant")
    plan = single_plan(small_history, queue)
    backend = get_backend("replay", history=small_history)
    with pytest.raises(ValueError, match="tenant column"):
        dispatch(plan, queue, backend, budget_usd=1.0, out_uri=str(tmp_path / "run"), tenant_budgets_usd={"a": 1.0})


def test_results_written_before_a_column_existed_still_read(small_history: History, tmp_path: Path) -> None:
    queue = queue_of(small_history, 10)
    out = str(tmp_path / "run")
    dispatch(
        single_plan(small_history, queue),
        queue,
        get_backend("replay", history=small_history),
        budget_usd=1e6,
        out_uri=out,
    )
    for part in (tmp_path / "run" / "results").glob("*.parquet"):
        pl.read_parquet(part).drop("note").write_parquet(part)  # as an older version wrote them
    results = read_results(out)
    assert results.schema == RESULT_SCHEMA
    assert results.height == 10
    assert results["note"].null_count() == 10


def test_dispatch_inside_an_event_loop_says_to_await_adispatch(small_history: History, tmp_path: Path) -> None:
    """``dispatch`` is ``adispatch`` run to completion (one signature): inside a running loop it refuses and
    names the async form, before it starts anything."""
    queue = queue_of(small_history, 5)
    plan = single_plan(small_history, queue)
    backend = get_backend("replay", history=small_history)

    async def inside() -> None:
        dispatch(plan, queue, backend, budget_usd=1.0, out_uri=str(tmp_path / "run"))

    with pytest.raises(RuntimeError, match=r"await adispatch\(\.\.\.\) instead"):
        asyncio.run(inside())
    assert not (tmp_path / "run").exists()
    results = asyncio.run(adispatch(plan, queue, backend, budget_usd=1.0, out_uri=str(tmp_path / "run")))
    assert (results["status"] == "done").all()
