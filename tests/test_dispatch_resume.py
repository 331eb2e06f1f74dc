"""Kill -9 mid-batch, rerun the same command: every query done exactly once, nothing paid twice."""

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

from batchplan.history import synthetic_history
from batchplan.storage import Storage
from dispatchers import read_manifest, read_results
from dispatchers.replay_server import Faults, ReplayServer

N_QUERIES = 600
SEED = 21

# The command a nightly job would run: plan rows spread over four models, results under OUT.
SCRIPT = f"""
import sys
import polars as pl
from batchplan.catalog import PriceCatalog
from batchplan.contracts import PLAN_SCHEMA, QUEUE_SCHEMA, conform
from batchplan.history import synthetic_history
from dispatchers import RetryPolicy, dispatch, get_backend

base_url, out, idempotent = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
h = synthetic_history({N_QUERIES}, 4, seed={SEED})
queue = conform(h.queries, QUEUE_SCHEMA, name="queue")
models = [[h.models[i % 4]] for i in range(queue.height)]
plan = conform(queue.select("query_id").with_columns(pl.Series("models", models), kind=pl.lit("single")), PLAN_SCHEMA, name="plan")
backend = get_backend("openai", base_url=base_url, catalog=PriceCatalog.from_history(h.prices, h.outcomes), idempotent=idempotent)
retry = RetryPolicy(max_attempts=8, base_delay_s=0.01, max_delay_s=0.1)
results = dispatch(plan, queue, backend, budget_usd=100.0, out_uri=out, concurrency=8, retry=retry, part_rows=40)
print(results["status"].value_counts().to_dicts())
"""


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    faults = Faults(
        rate_slow=0.8, slow_s=0.04, rate_429=0.05, retry_after_s=0.02, rate_500=0.05, rate_refusal=0.03, seed=4
    )
    with ReplayServer(synthetic_history(N_QUERIES, 4, seed=SEED), faults) as srv:
        yield srv


def run(server: ReplayServer, out: Path, idempotent: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", SCRIPT, server.base_url, str(out), "1" if idempotent else "0"]
    root = Path(__file__).resolve().parent.parent
    with open(out.parent / "stderr.txt", "ab") as stderr:  # the child keeps its own copy of the handle
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=root)


def stderr_of(out: Path) -> str:
    path = out.parent / "stderr.txt"
    return path.read_text()[-3000:] if path.exists() else ""


def call_events(out: Path) -> list[dict[str, object]]:
    lines = [line for f in (out / "ledger").glob("*.jsonl") for line in f.read_text().splitlines() if line.strip()]
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [e for e in events if e["e"] == "c"]


def kill_mid_batch(process: subprocess.Popen[bytes], out: Path, after_calls: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"finished before the kill: {stderr_of(out)}")
        if (out / "ledger").exists() and len(call_events(out)) >= after_calls:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return len(call_events(out))
        time.sleep(0.02)
    raise AssertionError("the batch never got going")


@pytest.mark.slow
@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent-endpoint", "plain-endpoint"])
def test_kill_and_resume_exactly_once(server: ReplayServer, tmp_path: Path, idempotent: bool) -> None:
    out = tmp_path / "run"
    seen_at_kill = kill_mid_batch(run(server, out, idempotent), out, after_calls=N_QUERIES // 3)
    assert seen_at_kill < N_QUERIES
    assert not read_manifest(Storage(), str(out)).get("complete")
    billed_at_kill = server.stats()["billed_calls"]

    rerun = run(server, out, idempotent)
    rerun.wait(timeout=90)
    assert rerun.returncode == 0, stderr_of(out)

    results = read_results(str(out))
    assert results.height == N_QUERIES
    assert results["query_id"].n_unique() == N_QUERIES
    assert (results["status"] == "done").all(), results.filter(pl.col("status") != "done")
    events = call_events(out)
    keys = [(e["q"], e["c"]) for e in events]
    assert len(keys) == len(set(keys)), "a call is in the ledger twice"
    answered = [e for e in events if e["s"] == "ok"]
    assert sorted(str(e["q"]) for e in answered) == sorted(results["query_id"].to_list()), (
        "a query answered twice or never"
    )
    charged = sum(float(e["usd"]) for e in events)  # type: ignore[arg-type]
    assert float(results["cost_usd"].sum()) == pytest.approx(charged)
    stats = server.stats()
    assert stats["billed_calls"] > billed_at_kill  # the rerun did real work
    billed_events = [e for e in events if e["s"] in {"ok", "not_answer"}]
    print("at kill:", seen_at_kill, "; faults:", stats["faults"], "; lost:", sum(e["s"] == "lost" for e in events))
    if idempotent:
        # calls in flight at the kill were resent under the same key: the server billed them once
        assert stats["billed_calls"] == len(billed_events)
        assert stats["billed_usd"] == pytest.approx(charged)
    else:
        # in-flight calls at the kill are charged their reservation (outcome unknown): never under the bill
        lost = [e for e in events if e["s"] == "lost"]
        assert stats["billed_calls"] <= len(billed_events) + len(lost)
        assert stats["billed_usd"] <= charged + 1e-12

    # and a third run of the same command calls nothing at all
    requests = server.stats()["requests"]
    third = run(server, out, idempotent)
    third.wait(timeout=60)
    assert third.returncode == 0, stderr_of(out)
    assert server.stats()["requests"] == requests
    assert read_results(str(out)).equals(results)
