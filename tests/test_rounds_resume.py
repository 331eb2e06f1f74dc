"""A run in rounds killed -9 within a round and between rounds, then rerun: nothing paid twice, no round
repeated or re-planned, and the budget never passed with faults on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from batchplan.core.history import synthetic_history
from tests.support.replay_server import Faults, ReplayServer

N_QUERIES = 300
SEED = 23
BUDGET = 0.07  # above what the plan costs (~$0.049): the kills charge lost calls their bounds, and deferrals must not be the budget's

# The command a nightly job runs: half singles, half 3-member cascades (round 2 and 3 escalate), in rounds;
# every third query an open task whose first cascade member runs under a learned max_tokens of 2 (the
# history's answers run 1-3 tokens): a third of those answers come back cut, and the cascade goes on.
SCRIPT = f"""
import sys
import polars as pl
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import PLAN_SCHEMA, QUEUE_SCHEMA, conform
from batchplan.core.history import synthetic_history
from batchplan.app.pipeline import Execution, execute_rounds
from batchplan.plans.continuation import PlanContinuation
from batchplan.core.storage import Storage
from batchplan.dispatchers import OutputCaps, RetryPolicy, get_backend

base_url, out = sys.argv[1], sys.argv[2]
h = synthetic_history({N_QUERIES}, 4, seed={SEED})
queue = conform(h.queries, QUEUE_SCHEMA, name="queue")
queue = queue.with_columns(pl.when(pl.int_range(pl.len()) % 3 == 0).then(None).otherwise("labels").alias("labels"))
m = h.models
caps = OutputCaps({{(t, m[0]): 2 for t in queue["task"].unique().to_list()}})
rows = [
    {{"query_id": q, "kind": "single", "models": [m[i % 4]]}} if i % 2 else
    {{"query_id": q, "kind": "cascade", "models": [m[0], m[1], m[3]], "thresholds": [0.8, 0.8]}}
    for i, q in enumerate(queue["query_id"].to_list())
]
plan = conform(pl.DataFrame(rows), PLAN_SCHEMA, name="plan")
predictions = h.outcomes.select("query_id", "model", pl.lit(0.7).alias("p_correct"), "cost_usd",
                                pl.col("cost_usd").alias("cost_high_usd"))
backend = get_backend("openai", base_url=base_url, catalog=PriceCatalog.from_history(h.prices, h.outcomes), idempotent=True)
run = Execution(budget_usd={BUDGET}, out_uri=out, storage=Storage(),
                retry=RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05), output_caps=caps)
outcome = execute_rounds(plan, queue, predictions, backend, PlanContinuation(plan), run, rounds=3)
outcome.results.write_parquet(out + "/results.parquet")
"""


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    faults = Faults(
        rate_slow=0.7,
        slow_s=0.03,
        rate_429=0.04,
        retry_after_s=0.01,
        rate_500=0.04,
        rate_malformed=0.03,
        rate_reset=0.03,
        seed=5,
    )
    with ReplayServer(synthetic_history(N_QUERIES, 4, seed=SEED), faults) as srv:
        yield srv


def _start(server: ReplayServer, out: Path, logs: Path) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parent.parent
    with open(logs / "stderr.txt", "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT, server.base_url, str(out)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=root,
            env=os.environ.copy(),
        )


def _events(out: Path) -> list[dict[str, object]]:
    events = []
    for path in sorted(out.glob("rounds/*/dispatch/ledger/*.jsonl")):
        round_ = int(path.parts[-4])
        for line in path.read_bytes().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if event.get("e") == "c":
                events.append(event | {"round": round_})
    return events


def _kill_when(process: subprocess.Popen[bytes], ready: object, logs: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"finished before the kill: {(logs / 'stderr.txt').read_text()[-3000:]}")
        if ready():  # type: ignore[operator]
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    raise AssertionError("the run never got there")


@pytest.mark.slow
def test_kill_within_and_between_rounds_pays_nothing_twice(server: ReplayServer, tmp_path: Path) -> None:
    out, logs = tmp_path / "run", tmp_path
    # 1. within round 1: a third of its calls made
    _kill_when(_start(server, out, logs), lambda: sum(e["round"] == 1 for e in _events(out)) >= N_QUERIES // 3, logs)
    assert not (out / "rounds" / "1" / "observations.parquet").exists()
    round_1_plan = (out / "rounds" / "1" / "calls.parquet").read_bytes()
    # 2. after round 1 is complete (between rounds, or just into round 2)
    _kill_when(_start(server, out, logs), lambda: (out / "rounds" / "1" / "observations.parquet").exists(), logs)
    observed_1 = (out / "rounds" / "1" / "observations.parquet").read_bytes()
    # 3. finish
    process = _start(server, out, logs)
    process.wait(timeout=120)
    assert process.returncode == 0, (logs / "stderr.txt").read_text()[-3000:]

    # no round re-planned or repeated: round 1's plan and observations are the ones first written
    assert (out / "rounds" / "1" / "calls.parquet").read_bytes() == round_1_plan
    assert (out / "rounds" / "1" / "observations.parquet").read_bytes() == observed_1
    events = _events(out)
    keys = [(e["round"], e["q"], e["c"]) for e in events]
    assert len(keys) == len(set(keys)), "a call is in a ledger twice"
    stats = server.stats()
    assert stats["billed_twice"] == [], "the provider billed one call twice"
    results = pl.read_parquet(out / "results.parquet")
    assert results.height == N_QUERIES
    # what the ledgers charged; the results count ambiguous failures at their tightened bound (input tokens
    # known from a later call of the same model), never below what the provider billed
    charged = sum(float(e["usd"]) for e in events)  # type: ignore[arg-type]
    counted = float(results["cost_usd"].sum())
    assert stats["billed_usd"] <= counted + 1e-12
    assert counted <= charged + 1e-12
    # the hard cap held with faults on
    assert counted <= BUDGET + 1e-12
    # the rounds did their work: escalations in later rounds, transient failures called again
    rounds_called = {int(e["round"]) for e in events}  # type: ignore[call-overload]
    assert rounds_called >= {1, 2}
    cut = [e for e in events if e["s"] == "truncated"]
    assert cut, "no open answer was cut at its max_tokens"
    assert {e["m"] for e in cut} == {synthetic_history(N_QUERIES, 4, seed=SEED).models[0]}
    assert (results["status"] == "done").mean() >= 0.99, results["status"].value_counts()

    # and a fourth run calls nothing at all
    requests = server.stats()["requests"]
    process = _start(server, out, logs)
    process.wait(timeout=60)
    assert process.returncode == 0
    assert server.stats()["requests"] == requests
