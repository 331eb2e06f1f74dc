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

from batchplan.core.history import synthetic_history
from batchplan.core.storage import Storage
from batchplan.dispatchers import read_manifest, read_results
from tests.support.replay_server import Faults, ReplayServer

N_QUERIES = 450
SEED = 21

# The command a nightly job would run: plan rows spread over four models, results under OUT.
SCRIPT = f"""
import sys
import polars as pl
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import PLAN_SCHEMA, QUEUE_SCHEMA, conform
from batchplan.core.history import synthetic_history
from batchplan.dispatchers import DispatchOptions, RetryPolicy, dispatch, get_backend

from batchplan.core.storage import Storage

base_url, out, idempotent, endpoint = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
storage = Storage(s3_endpoint_url=endpoint or None, s3_region="us-east-1")
h = synthetic_history({N_QUERIES}, 4, seed={SEED})
queue = conform(h.queries, QUEUE_SCHEMA, name="queue")
models = [[h.models[i % 4]] for i in range(queue.height)]
plan = conform(queue.select("query_id").with_columns(pl.Series("models", models), kind=pl.lit("single")), PLAN_SCHEMA, name="plan")
backend = get_backend("openai", base_url=base_url, catalog=PriceCatalog.from_history(h.prices, h.outcomes), idempotent=idempotent)
retry = RetryPolicy(max_attempts=8, base_delay_s=0.01, max_delay_s=0.1)
results = dispatch(plan, queue, backend, budget_usd=100.0, out_uri=out, storage=storage,
                   options=DispatchOptions(concurrency=8, retry=retry, part_rows=40))
print(results["status"].value_counts().to_dicts())
"""


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    faults = Faults(
        rate_slow=0.8, slow_s=0.04, rate_429=0.05, retry_after_s=0.02, rate_500=0.05, rate_refusal=0.03, seed=4
    )
    with ReplayServer(synthetic_history(N_QUERIES, 4, seed=SEED), faults) as srv:
        yield srv


class Run:
    """The same command, run (and killed) as a subprocess; ``out`` is a local path or an s3:// URI."""

    def __init__(
        self, server: ReplayServer, out: str, logs: Path, storage: Storage, endpoint: str, idempotent: bool
    ) -> None:
        self.server, self.out, self.logs, self.storage = server, out, logs, storage
        self.endpoint, self.idempotent = endpoint, idempotent

    def start(self) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-c",
            SCRIPT,
            self.server.base_url,
            self.out,
            "1" if self.idempotent else "0",
            self.endpoint,
        ]
        root = Path(__file__).resolve().parent.parent
        with open(self.logs / "stderr.txt", "ab") as stderr:  # the child keeps its own copy of the handle
            return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=root, env=os.environ.copy())

    def stderr(self) -> str:
        path = self.logs / "stderr.txt"
        return path.read_text()[-3000:] if path.exists() else ""

    def call_events(self) -> list[dict[str, object]]:
        events = []
        for uri in self.storage.list(f"{self.out}/ledger"):
            for line in self.storage.read_bytes(uri).splitlines():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line
        return [e for e in events if e["e"] == "c"]

    def kill_mid_batch(self, after_calls: int) -> int:
        process = self.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"finished before the kill: {self.stderr()}")
            # the server's own count, not the ledger's: on S3 the ledger is flushed in segments (every second)
            # and listing them is slow under load, so by the time it shows a third the batch could be over
            if self.server.stats()["requests"] >= after_calls:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return len(self.call_events())
            time.sleep(0.05)
        raise AssertionError("the batch never got going")

    def finish(self) -> None:
        process = self.start()
        process.wait(timeout=90)
        assert process.returncode == 0, self.stderr()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("idempotent", "where"),
    [(True, "local"), (False, "local"), (True, "s3")],
    ids=["idempotent-endpoint", "plain-endpoint", "idempotent-endpoint-on-s3"],
)
def test_kill_and_resume_exactly_once(
    server: ReplayServer, tmp_path: Path, idempotent: bool, where: str, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        bucket, endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_endpoint")
        storage, out = Storage(s3_endpoint_url=endpoint, s3_region="us-east-1"), f"{bucket}/runs/nightly"
    else:
        storage, out, endpoint = Storage(), str(tmp_path / "run"), ""
    job = Run(server, out, tmp_path, storage, endpoint, idempotent)
    seen_at_kill = job.kill_mid_batch(after_calls=N_QUERIES // 3)
    assert seen_at_kill < N_QUERIES
    assert not read_manifest(storage, out).get("complete")
    billed_at_kill = server.stats()["billed_calls"]

    job.finish()

    results = read_results(out, storage)
    assert results.height == N_QUERIES
    assert results["query_id"].n_unique() == N_QUERIES
    assert (results["status"] == "done").all(), results.filter(pl.col("status") != "done")
    events = job.call_events()
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
        # calls in flight at the kill (or, on S3, whose ledger segment was not flushed yet) were resent under
        # the same key: the server billed each once
        assert stats["billed_calls"] == len(billed_events)
        assert stats["billed_usd"] == pytest.approx(charged)
    else:
        # in-flight calls at the kill are charged their reservation (outcome unknown): never under the bill
        lost = [e for e in events if e["s"] == "lost"]
        assert stats["billed_calls"] <= len(billed_events) + len(lost)
        assert stats["billed_usd"] <= charged + 1e-12

    # and a third run of the same command calls nothing at all
    requests = server.stats()["requests"]
    job.finish()
    assert server.stats()["requests"] == requests
    assert read_results(out, storage).equals(results)
