"""Rounds sent through a provider's batch API (dispatchers.batch, BatchSender) against the local Files +
Batches server: half the bill for the same answers, split at the limits, the hard budget held by
reservations made before submission, and every fault (per-line errors, expiry half done, failed upload,
slow status, the deadline) released and re-planned."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchplan.app.pipeline import Execution, execute_rounds, realtime_sender
from batchplan.app.round_runner import BatchSender, RoundsOutcome
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import PLAN_SCHEMA, QUEUE_SCHEMA, conform
from batchplan.core.errors import ContractError
from batchplan.core.history import History, synthetic_history
from batchplan.core.rounds import RoundPlan, RoundState
from batchplan.core.storage import Storage
from batchplan.dispatchers import get_backend, ledger_events
from batchplan.dispatchers.batch import RunCancelled, cancel_run
from batchplan.plans.continuation import PlanContinuation
from tests.support.batch_server import BatchFaults, BatchServer
from tests.support.replay_server import ReplayServer

N = 120
SEED = 11


@pytest.fixture(scope="module")
def history() -> History:
    return synthetic_history(N, 4, seed=SEED)


def plan_of(history: History) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Queue, plan (half singles on two LLMs, half two-step cascades: round 2 escalates) and predictions."""
    queue = conform(history.queries, QUEUE_SCHEMA, name="queue")
    m = history.models
    rows = [
        {"query_id": q, "kind": "single", "models": [m[i % 2]]}
        if i % 2
        else {"query_id": q, "kind": "cascade", "models": [m[0], m[3]], "thresholds": [0.8]}
        for i, q in enumerate(queue["query_id"].to_list())
    ]
    predictions = history.outcomes.select(
        "query_id", "model", pl.lit(0.7).alias("p_correct"), "cost_usd", pl.col("cost_usd").alias("cost_high_usd")
    )
    return queue, conform(pl.DataFrame(rows), PLAN_SCHEMA, name="plan"), predictions


def run(
    history: History,
    base_url: str,
    out: Path,
    *,
    rounds: int = 2,
    budget: float = 1.0,
    batch: bool = True,
    planner: Any = None,
    deadline: float | None = None,
    **options: Any,
) -> RoundsOutcome:
    queue, plan, predictions = plan_of(history)
    backend = get_backend("openai", base_url=base_url, catalog=PriceCatalog.from_history(history.prices, history.outcomes))
    options.setdefault("api_options", {"base_delay_s": 0.01})
    sender = (
        BatchSender(backend, realtime_sender(backend), poll_s=0.02, deadline=deadline, options=options)
        if batch
        else None
    )
    return execute_rounds(
        plan,
        queue,
        predictions,
        backend,
        planner or PlanContinuation(plan),
        Execution(budget_usd=budget, out_uri=str(out), storage=Storage()),
        rounds=rounds,
        sender=sender,
    )


def call_events(out: Path) -> list[dict[str, Any]]:
    events = []
    for ledger in sorted(out.glob("rounds/*/dispatch/**/ledger")):
        events += [e for e in ledger_events(Storage(), str(ledger.parent)) if e.get("e") == "c"]
    return events


@pytest.fixture
def server(history: History) -> Iterator[BatchServer]:
    with BatchServer(history, BatchFaults(validate_s=0.01, run_s=0.05, finalize_s=0.01)) as srv:
        yield srv


def test_batch_rounds_answer_as_real_time_at_half_the_bill(history: History, server: BatchServer, tmp_path: Path) -> None:
    with ReplayServer(history) as realtime:
        now = run(history, realtime.base_url, tmp_path / "realtime", batch=False)
        realtime_bill = realtime.stats()["billed_usd"]
    later = run(history, server.base_url, tmp_path / "batch")
    stats = server.stats()
    # the same calls answered the same way, billed half
    assert later.results.height == N
    assert later.results.sort("query_id")["answer"].to_list() == now.results.sort("query_id")["answer"].to_list()
    assert stats["billed_usd"] == pytest.approx(realtime_bill / 2, rel=1e-9)
    assert float(later.results["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    # one job per LLM and round, each line submitted once, nothing billed twice
    per_round = {(b["metadata"]["batchplan_job"].split("/")[-1].rsplit("-", 1)[0], b["lines"]) for b in stats["batches"]}
    assert len(stats["batches"]) == 3, per_round  # round 1: two LLMs; round 2: the cascades' escalations
    assert stats["submitted_twice"] == []
    assert stats["billed_twice"] == []
    assert all(b["status"] == "completed" for b in stats["batches"])
    # every call is in a ledger once, with its mode's bill
    events = call_events(tmp_path / "batch")
    assert len({(e["q"], e["c"]) for e in events}) == len(events) == later.observations.height


def test_jobs_split_at_the_line_and_byte_limits(history: History, tmp_path: Path) -> None:
    faults = BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0, max_lines=25, max_bytes=12_000)
    with BatchServer(history, faults) as srv:
        outcome = run(history, srv.base_url, tmp_path, rounds=1, max_lines=25, max_bytes=12_000)
        batches = srv.stats()["batches"]
    assert (outcome.results["status"] == "done").all()
    assert len(batches) >= 6
    assert all(b["lines"] <= 25 and b["status"] == "completed" for b in batches)
    assert sum(b["lines"] for b in batches) == N
    sizes = [p.stat().st_size for p in tmp_path.glob("rounds/1/dispatch/batch/jobs/*.jsonl")]
    assert max(sizes) <= 12_000
    # one model per file
    assert all(len({json.loads(line)["body"]["model"] for line in p.read_text().splitlines()}) == 1
               for p in tmp_path.glob("rounds/1/dispatch/batch/jobs/*.jsonl"))


def test_a_file_over_the_providers_limit_fails_validation_and_is_not_billed(history: History, tmp_path: Path) -> None:
    faults = BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0, max_lines=10)
    with BatchServer(history, faults) as srv:
        outcome = run(history, srv.base_url, tmp_path, rounds=1)  # the client's limit (50,000) is above it
        stats = srv.stats()
    assert {b["status"] for b in stats["batches"]} == {"failed"}
    assert stats["billed_usd"] == 0.0
    assert (outcome.results["status"] == "failed").all()
    assert all("failed validation" in e["why"] and "over 10" in e["why"] for e in call_events(tmp_path))
    assert float(outcome.results["cost_usd"].sum()) == 0.0


def test_line_errors_are_released_and_re_planned(history: History, tmp_path: Path) -> None:
    faults = BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0, line_error_rate=0.3, seed=4)
    with BatchServer(history, faults) as srv:
        outcome = run(history, srv.base_url, tmp_path, rounds=3)
        stats = srv.stats()
    first = outcome.observations.filter(pl.col("round") == 1)
    failed = first.filter(pl.col("status") == "server_error")
    assert 0.15 * N < failed.height < 0.45 * N
    assert float(failed["cost_usd"].sum()) == 0.0
    assert failed["billed_known"].all()
    # the next rounds called them again (by batch); the bill is exactly the lines that answered
    # (a cascade's failed step may go on to its next LLM instead: by the plan kinds' rules)
    again = outcome.observations.filter(pl.col("round") == 2).join(failed.select("query_id"), on="query_id")
    assert again["query_id"].n_unique() == failed.height
    assert float(outcome.results["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert (outcome.results["status"] == "done").mean() >= 0.95
    assert stats["submitted_twice"] == []


def test_a_batch_that_expires_half_done_bills_the_half_and_returns_the_rest(history: History, tmp_path: Path) -> None:
    faults = BatchFaults(validate_s=0.0, run_s=0.05, finalize_s=0.0, expire_after=0.5)
    with BatchServer(history, faults) as srv:
        outcome = run(history, srv.base_url, tmp_path, rounds=1)
        stats = srv.stats()
    assert {b["status"] for b in stats["batches"]} == {"expired"}
    got = outcome.observations
    ok, expired = got.filter(pl.col("status") == "ok"), got.filter(pl.col("status") == "timeout")
    assert ok.height + expired.height == N
    assert abs(ok.height - N / 2) <= 2
    assert float(expired["cost_usd"].sum()) == 0.0
    assert float(ok["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert stats["billed_calls"] == ok.height
    # with a second round the expired half is called again
    with BatchServer(history, BatchFaults(validate_s=0.0, run_s=0.05, finalize_s=0.0, expire_after=0.5)) as srv:
        two = run(history, srv.base_url, tmp_path / "two", rounds=3)
    assert (two.results["status"] == "done").mean() > 0.8


def test_a_failed_upload_is_retried_then_released(history: History, tmp_path: Path) -> None:
    faults = BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0, fail_uploads=2)
    with BatchServer(history, faults) as srv:
        outcome = run(history, srv.base_url, tmp_path / "retried", rounds=1)
    assert (outcome.results["status"] == "done").all()  # two 500s, retried within the attempts
    faults = BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0, fail_uploads=8)
    with BatchServer(history, faults) as srv:
        outcome = run(history, srv.base_url, tmp_path / "released", rounds=2, api_options={"attempts": 4, "base_delay_s": 0.01})
        stats = srv.stats()
    first = outcome.observations.filter(pl.col("round") == 1)
    assert (first["status"] == "server_error").all()
    assert float(first["cost_usd"].sum()) == 0.0
    assert first.height == N
    # round 2 uploaded again and answered them; no batch was made for the failed uploads
    assert (outcome.results["status"] == "done").mean() >= 0.95
    assert len(stats["batches"]) == 2
    assert stats["submitted_twice"] == []


def test_slow_status_still_completes_and_a_deadline_cancels(history: History, tmp_path: Path) -> None:
    slow = BatchFaults(validate_s=0.0, run_s=0.2, finalize_s=0.0, status_delay_s=0.3)
    with BatchServer(history, slow) as srv:
        outcome = run(history, srv.base_url, tmp_path / "slow", rounds=1)
    assert (outcome.results["status"] == "done").all()
    long = BatchFaults(validate_s=0.0, run_s=4.0, finalize_s=0.0, cancel_s=0.05)
    with BatchServer(history, long) as srv:
        started = time.monotonic()
        outcome = run(history, srv.base_url, tmp_path / "deadline", rounds=1, deadline=time.time() + 1.0)
        took = time.monotonic() - started
        stats = srv.stats()
    assert took < 4.0
    assert {b["status"] for b in stats["batches"]} == {"cancelled"}
    got = outcome.observations
    assert 0 < (got["status"] == "ok").sum() < N  # what finished before the cancel is kept and billed
    assert set(got["status"].unique()) == {"ok", "timeout"}
    assert float(got["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)


def test_the_budget_holds_with_every_line_reserved_before_submission(history: History, tmp_path: Path) -> None:
    budget = 0.0002  # short of even what round 1 is billed (0.00047 USD by batch)
    with BatchServer(history, BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0)) as srv:
        outcome = run(history, srv.base_url, tmp_path, rounds=2, budget=budget)
        stats = srv.stats()
    refused = pl.concat([pl.read_parquet(p) for p in tmp_path.glob("rounds/*/refused.parquet")])
    assert refused.height > 0  # the last calls could not be held, even after the waves settled
    assert refused["error"].str.contains("by batch").all()
    assert stats["billed_usd"] <= budget
    assert float(outcome.results["cost_usd"].sum()) <= budget + 1e-12
    assert stats["billed_calls"] == sum(b["lines"] for b in stats["batches"])  # refused lines never went


class Mixed:
    """Round plans with every other query in real time (what h16b's planner does when the night is short)."""

    def __init__(self, inner: PlanContinuation, mode: str = "realtime") -> None:
        self.inner, self.mode = inner, mode

    def plan_round(self, state: RoundState) -> RoundPlan:
        planned = self.inner.plan_round(state)
        calls = planned.calls.with_row_index("_i").with_columns(
            pl.when(pl.col("_i") % 2 == 0).then(pl.lit(self.mode)).otherwise(pl.lit(None)).alias("mode")
        )
        return RoundPlan(calls.drop("_i"), planned.diagnostics)

    def answers(self, *args: Any) -> pl.DataFrame:
        return self.inner.answers(*args)


def test_rows_marked_realtime_go_through_the_dispatcher_at_full_price(history: History, server: BatchServer, tmp_path: Path) -> None:
    _queue, plan, _ = plan_of(history)
    outcome = run(history, server.base_url, tmp_path, rounds=1, planner=Mixed(PlanContinuation(plan)))
    stats = server.stats()
    assert (outcome.results["status"] == "done").all()
    batched = sum(b["lines"] for b in stats["batches"])
    assert batched == N // 2
    assert stats["billed_calls"] == N  # N/2 lines by batch + N/2 chat completions
    realtime_ledger = list(ledger_events(Storage(), str(tmp_path / "rounds" / "1" / "dispatch")))
    assert sum(e.get("e") == "c" for e in realtime_ledger) == N // 2
    with pytest.raises(ContractError, match="mode 'later' is not one of"):
        run(history, server.base_url, tmp_path / "bad", rounds=1, planner=Mixed(PlanContinuation(plan), "later"))


def test_cancel_marks_the_run_and_a_rerun_submits_nothing_unless_asked(history: History, tmp_path: Path) -> None:
    with BatchServer(history, BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0)) as srv:
        assert cancel_run(Storage(), str(tmp_path)) == []  # nothing open: only the mark
        with pytest.raises(RunCancelled, match="--resume-cancelled"):
            run(history, srv.base_url, tmp_path, rounds=1, cancel_marker=str(tmp_path / "cancelled.json"))
        assert srv.stats()["batches"] == []
        outcome = run(
            history,
            srv.base_url,
            tmp_path,
            rounds=1,
            cancel_marker=str(tmp_path / "cancelled.json"),
            resume_cancelled=True,
        )
    assert (outcome.results["status"] == "done").all()


def test_lines_the_bounds_crowd_out_go_in_a_later_wave_of_the_same_round(history: History, tmp_path: Path) -> None:
    # half the bounds of round 1's lines: 0.00132 USD; half their bills: 0.00047: not all fit reserved at once
    budget = 0.0008
    with BatchServer(history, BatchFaults(validate_s=0.0, run_s=0.02, finalize_s=0.0)) as srv:
        outcome = run(history, srv.base_url, tmp_path, rounds=1, budget=budget)
        stats = srv.stats()
    assert (outcome.results["status"] == "done").all()  # every line sent, in two waves or more
    per_model: dict[str, int] = {}
    for b in stats["batches"]:
        per_model[b["model"]] = per_model.get(b["model"], 0) + 1
    assert max(per_model.values()) >= 2
    assert stats["submitted_twice"] == []
    assert stats["billed_usd"] <= budget
