"""A run sent by batch, killed -9 during the upload, after the create (its answer lost), during polling and
during the download, then rerun: each job is found and continued, no batch created twice, nothing paid
twice, one result per query, the bill within the budget. And ``cancel_run`` (batchplan cancel) on a killed
run: its open batch is cancelled, a rerun submits nothing unless asked, and with --resume-cancelled the
cancelled lines are re-planned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from batchplan.core.history import synthetic_history
from batchplan.core.storage import Storage
from batchplan.dispatchers.batch import cancel_run, open_jobs
from tests.support.batch_server import BatchFaults, BatchServer

N_QUERIES = 200
SEED = 29
BUDGET = 0.05

SCRIPT = f"""
import sys
import polars as pl
from batchplan.app.pipeline import Execution, execute_rounds, realtime_sender
from batchplan.app.round_runner import BatchSender
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import PLAN_SCHEMA, QUEUE_SCHEMA, conform
from batchplan.core.history import synthetic_history
from batchplan.core.storage import Storage
from batchplan.dispatchers import get_backend
from batchplan.plans.continuation import PlanContinuation

base_url, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
if sys.argv[3] == "kill-before-intent":  # kill -9 itself once a job's input file is written, before its intent
    import os, signal
    from batchplan.dispatchers.batch import BatchRun

    async def _mark(self, job, state, **extra):
        if state == "intent":
            os.kill(os.getpid(), signal.SIGKILL)

    BatchRun._mark = _mark
h = synthetic_history({N_QUERIES}, 4, seed={SEED})
queue = conform(h.queries, QUEUE_SCHEMA, name="queue")
m = h.models
rows = [
    {{"query_id": q, "kind": "single", "models": [m[i % 2]]}} if i % 2 else
    {{"query_id": q, "kind": "cascade", "models": [m[0], m[3]], "thresholds": [0.8]}}
    for i, q in enumerate(queue["query_id"].to_list())
]
plan = conform(pl.DataFrame(rows), PLAN_SCHEMA, name="plan")
predictions = h.outcomes.select("query_id", "model", pl.lit(0.7).alias("p_correct"), "cost_usd",
                                pl.col("cost_usd").alias("cost_high_usd"))
backend = get_backend("openai", base_url=base_url, catalog=PriceCatalog.from_history(h.prices, h.outcomes))
options = {{"api_options": {{"base_delay_s": 0.01}}, "cancel_marker": out + "/cancelled.json", "resume_cancelled": resume}}
sender = BatchSender(backend, realtime_sender(backend), poll_s=0.05, options=options)
outcome = execute_rounds(plan, queue, predictions, backend, PlanContinuation(plan),
                         Execution(budget_usd={BUDGET}, out_uri=out, storage=Storage()), rounds=2, sender=sender)
outcome.results.write_parquet(out + "/results.parquet")
"""


@pytest.fixture
def server() -> Iterator[BatchServer]:
    faults = BatchFaults(validate_s=0.02, run_s=0.1, finalize_s=0.02, line_error_rate=0.05, seed=3)
    with BatchServer(synthetic_history(N_QUERIES, 4, seed=SEED), faults) as srv:
        yield srv


def _start(
    server: BatchServer, out: Path, logs: Path, resume: bool = False, mode: str | None = None
) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parent.parent
    with open(logs / "stderr.txt", "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT, server.base_url, str(out), mode or ("resume" if resume else "-")],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=root,
            env=os.environ.copy(),
        )


def _events(out: Path, kind: str) -> list[dict[str, object]]:
    """The batch ledgers' events of ``kind`` (j: job states, c: calls), each with its round."""
    events = []
    for path in sorted(out.glob("rounds/*/dispatch/batch/ledger/*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if event.get("e") == kind:
                events.append(event | {"round": int(path.parts[-5])})
    return events


def _job_states(out: Path) -> list[str]:
    return [str(e["st"]) for e in _events(out, "j")]


def _jobs(out: Path) -> set[tuple[object, object]]:
    """(round, job) of every job that got as far as a batch."""
    return {(e["round"], e["job"]) for e in _events(out, "j") if e["st"] == "created"}


def _kill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool], logs: Path) -> None:
    deadline = time.monotonic() + 300  # a shared 2-core machine can take a minute just to import
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"finished before the kill: {(logs / 'stderr.txt').read_text()[-3000:]}")
        if ready():
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert ready(), "the run never got there"


def _finish(server: BatchServer, out: Path, logs: Path, resume: bool = False) -> None:
    process = _start(server, out, logs, resume)
    process.wait(timeout=300)
    assert process.returncode == 0, (logs / "stderr.txt").read_text()[-3000:]


def _check(server: BatchServer, out: Path) -> pl.DataFrame:
    stats = server.stats()
    assert stats["submitted_twice"] == [], "a line was submitted in two batches"
    assert stats["billed_twice"] == [], "the provider billed one call twice"
    tags = [b["metadata"]["batchplan_job"] for b in stats["batches"]]
    assert len(tags) == len(set(tags)), "a job was created twice"
    results = pl.read_parquet(out / "results.parquet")
    assert results.height == N_QUERIES
    assert results["query_id"].n_unique() == N_QUERIES
    events = _events(out, "c")
    keys = [(e["round"], e["q"], e["c"]) for e in events]
    assert len(keys) == len(set(keys)), "a call is in a ledger twice"
    charged = sum(float(e["usd"]) for e in events)  # type: ignore[arg-type]
    assert charged == pytest.approx(stats["billed_usd"], rel=1e-9, abs=1e-12)
    assert float(results["cost_usd"].sum()) == pytest.approx(charged, rel=1e-9, abs=1e-12)
    assert stats["billed_usd"] <= BUDGET
    return results


# each crash point: the fault that holds the client there, and when the client is there
POINTS: dict[str, tuple[dict[str, float], Callable[[BatchServer, Path], bool]]] = {
    "during upload": ({"upload_delay_s": 3.0}, lambda s, out: s.calls["upload"] >= 1),
    "after create, its answer lost": ({"create_delay_s": 3.0}, lambda s, out: len(s.batches) >= 1),
    "during polling": ({"run_s": 3.0}, lambda s, out: _job_states(out).count("created") >= 2),
    "during download": ({"content_delay_s": 3.0}, lambda s, out: s.calls["content"] >= 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_point_then_rerun_pays_nothing_twice(server: BatchServer, tmp_path: Path, point: str) -> None:
    out, logs = tmp_path / "run", tmp_path
    slow, ready = POINTS[point]
    normal = {name: getattr(server.batch_faults, name) for name in slow}
    for name, value in slow.items():
        setattr(server.batch_faults, name, value)
    _kill_when(_start(server, out, logs), lambda: ready(server, out), logs)
    assert not (out / "rounds" / "1" / "observations.parquet").exists()
    for name, value in normal.items():
        setattr(server.batch_faults, name, value)
    _finish(server, out, logs)
    results = _check(server, out)
    assert len(server.stats()["batches"]) == len(_jobs(out))  # one batch per job, whatever the kill
    if point == "during upload":  # the rerun found the uploaded file by its name: none uploaded twice
        assert server.calls["upload"] == len(_jobs(out))
    assert (results["status"] == "done").mean() >= 0.95, results["status"].value_counts()
    if point == "during polling":  # and a third run submits and downloads nothing
        routes = dict(server.calls)
        _finish(server, out, logs)
        assert dict(server.calls) == routes


@pytest.mark.slow
def test_kill_before_the_intent_is_recorded_then_rerun_submits_each_job_once(server: BatchServer, tmp_path: Path) -> None:
    """kill -9 after a job's input file is written and before its intent is in the ledger: nothing of it was
    reserved or submitted, so the rerun plans the job afresh (its file overwritten) and submits it once."""
    out, logs = tmp_path / "run", tmp_path
    killed = _start(server, out, logs, mode="kill-before-intent")
    killed.wait(timeout=300)
    assert killed.returncode == -signal.SIGKILL, (logs / "stderr.txt").read_text()[-3000:]
    assert list(out.glob("rounds/1/dispatch/batch/jobs/*.jsonl")), "killed before any job's input was written"
    assert _events(out, "j") == []  # no intent recorded
    assert server.stats()["files"] == 0
    assert server.stats()["batches"] == []
    _finish(server, out, logs)
    results = _check(server, out)
    assert len(server.stats()["batches"]) == len(_jobs(out)) == server.calls["upload"]  # each job once
    assert (results["status"] == "done").mean() >= 0.95, results["status"].value_counts()


@pytest.mark.slow
def test_cancel_a_killed_run_then_resume_only_when_asked(server: BatchServer, tmp_path: Path) -> None:
    out, logs = tmp_path / "run", tmp_path
    server.batch_faults.run_s = 30.0
    _kill_when(_start(server, out, logs), lambda: _job_states(out).count("created") >= 2, logs)
    assert len(open_jobs(Storage(), str(out))) == 2
    cancelled = cancel_run(Storage(), str(out))
    assert sorted(str(j["status"]) for j in cancelled) == ["cancelling", "cancelling"]
    assert (out / "cancelled.json").exists()
    time.sleep(0.1)  # the provider finishes cancelling
    # a rerun without asking: the cancelled batches are collected, nothing new is submitted
    process = _start(server, out, logs)
    process.wait(timeout=300)
    assert process.returncode != 0
    assert "--resume-cancelled" in (logs / "stderr.txt").read_text()
    assert len(server.stats()["batches"]) == 2
    # asked: round 1's cancelled lines come back transient, round 2 calls them again
    server.batch_faults.run_s = 0.1
    _finish(server, out, logs, resume=True)
    results = _check(server, out)
    assert {b["status"] for b in server.stats()["batches"][:2]} == {"cancelled"}
    first = pl.read_parquet(out / "rounds" / "1" / "observations.parquet")
    assert (first["status"] == "timeout").sum() > 0.9 * N_QUERIES
    assert (results["status"] == "done").mean() >= 0.9, results["status"].value_counts()
