"""The Bedrock batch sender killed -9 after a job's create (its answer lost) and during polling, then rerun:
the real boto3 clients, S3 on moto's server and the control plane on a local server (both on 127.0.0.1,
both outliving the killed process). The rerun finds each job (its state file, or the service answering the
same clientRequestToken with the job already created): no job created twice, no record processed or billed
twice, one observation per call, and what the sender charged is the service's bill, within the budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest
from moto.server import ThreadedMotoServer

from batchplan.core.history import synthetic_history
from tests.support.bedrock_control_server import BedrockControlServer

N_QUERIES, SEED, BUDGET, BUCKET = 240, 31, 0.05, "nightly"

SCRIPT = f"""
import sys
import boto3
import polars as pl
from batchplan.app.round_runner import DispatchSender
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import QUEUE_SCHEMA, conform
from batchplan.core.history import synthetic_history
from batchplan.core.rounds import ROUND_PLAN_SCHEMA, RoundRequest
from batchplan.core.storage import Storage
from batchplan.dispatchers import DispatchOptions
from batchplan.dispatchers.bedrock import BedrockBackend
from batchplan.dispatchers.bedrock_batch import BedrockBatchSender

control_url, s3_url, out = sys.argv[1], sys.argv[2], sys.argv[3]
h = synthetic_history({N_QUERIES}, 4, seed={SEED})
queue = conform(h.queries, QUEUE_SCHEMA, name="queue")
n = queue.height
models = [[h.models[i % 2]] for i in range(n)]  # two LLMs, 120 records each: above Bedrock's minimum of 100
calls = conform(pl.DataFrame({{
    "query_id": queue["query_id"], "models": models, "reserve_cost_usd": [1e-4] * n,
    "expected_cost_usd": [5e-5] * n, "expected_accuracy": [0.8] * n, "mode": ["batch"] * n,
}}), ROUND_PLAN_SCHEMA, name="calls")

def client(service, url):
    return boto3.client(service, region_name="us-east-1", endpoint_url=url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")

backend = BedrockBackend(catalog=PriceCatalog.from_prices(h.prices).for_backend("bedrock"),
                         client=client("bedrock-runtime", control_url), max_workers=1)
sender = BedrockBatchSender(
    backend=backend, control=client("bedrock", control_url), s3=client("s3", s3_url), bucket="{BUCKET}",
    role_arn="arn:aws:iam::123456789012:role/batch", realtime=DispatchSender(backend, DispatchOptions(concurrency=1)),
    poll_seconds=0.05,
)
observed, refused = sender.send(RoundRequest(calls, queue, round=1, budget_usd={BUDGET}, tenant_budgets_usd={{}},
                                             out_uri=out, storage=Storage()))
observed.write_parquet(out + "/observed.parquet")
"""


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _s3(url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def _s3(url: str) -> Any:
    return boto3.client(
        "s3", region_name="us-east-1", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


@pytest.fixture
def control(s3_url: str) -> Iterator[BedrockControlServer]:
    with BedrockControlServer(synthetic_history(N_QUERIES, 4, seed=SEED), _s3(s3_url)) as server:
        yield server  # type: ignore[misc]


def _start(control: BedrockControlServer, s3_url: str, out: Path, logs: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    with open(logs / "stderr.txt", "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT, control.endpoint_url, s3_url, str(out)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=Path(__file__).resolve().parent.parent,
            env=os.environ.copy(),
        )


def _states(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))] if (out / "jobs").exists() else []


# each crash point: what holds the sender there, and when it is there
POINTS: dict[str, tuple[dict[str, float], Callable[[BedrockControlServer, Path], bool]]] = {
    "after create, its answer lost": ({"create_delay_s": 3.0}, lambda c, out: len(c.jobs) >= 1),
    "during polling": (
        {"run_s": 60.0},
        lambda c, out: len(s := _states(out)) == 2 and all(x.get("job_arn") for x in s),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_the_bedrock_sender_then_rerun_creates_and_bills_nothing_twice(
    control: BedrockControlServer, s3_url: str, tmp_path: Path, point: str
) -> None:
    out, logs = tmp_path / "round", tmp_path
    slow, ready = POINTS[point]
    normal = {name: getattr(control, name) for name in slow}
    for name, value in slow.items():
        setattr(control, name, value)
    process = _start(control, s3_url, out, logs)
    deadline = time.monotonic() + 300  # a loaded 2-core machine can take a minute to import
    while time.monotonic() < deadline and not ready(control, out):
        assert process.poll() is None, f"finished before the kill: {(logs / 'stderr.txt').read_text()[-3000:]}"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert ready(control, out), "the sender never got there"
    assert not (out / "observed.parquet").exists()
    billed_before = control.stats()["billed_calls"]
    assert billed_before == 0  # killed before any job finished
    for name, value in normal.items():
        setattr(control, name, value)
    rerun = _start(control, s3_url, out, logs)
    rerun.wait(timeout=300)
    assert rerun.returncode == 0, (logs / "stderr.txt").read_text()[-3000:]
    stats = control.stats()
    assert len(stats["jobs"]) == 2, stats["jobs"]  # one per LLM, whatever the kill
    assert len({j["token"] for j in stats["jobs"]}) == 2
    assert all(j["status"] == "Completed" for j in stats["jobs"])
    if point == "after create, its answer lost":
        assert stats["creates"] == 3  # the lost answer's job asked again under its token: the same job
    else:
        assert stats["creates"] == 2  # the rerun found both ARNs in the state files: nothing created again
    assert stats["processed_twice"] == []
    assert stats["billed_twice"] == []
    observed = pl.read_parquet(out / "observed.parquet")
    assert observed.height == N_QUERIES
    assert observed["query_id"].n_unique() == N_QUERIES
    assert (observed["status"] == "ok").all()
    assert float(observed["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert 0 < stats["billed_usd"] <= BUDGET
    assert stats["billed_calls"] == N_QUERIES
