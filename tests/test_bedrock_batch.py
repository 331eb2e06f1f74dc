"""Bedrock batch inference as a round's sender: the real boto3 clients, S3 on moto's server (127.0.0.1), the
control plane (create / get / stop model invocation job, which moto does not implement) through botocore's
Stubber, and the job's output written into S3 as the service writes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest
from botocore.stub import ANY, Stubber
from moto.server import ThreadedMotoServer

from batchplan.app.round_runner import DispatchSender
from batchplan.core.catalog import BatchTerms, PriceCatalog
from batchplan.core.contracts import QUEUE_SCHEMA, conform
from batchplan.core.rounds import ROUND_PLAN_SCHEMA, RoundRequest
from batchplan.core.storage import Storage
from batchplan.dispatchers import DispatchOptions
from batchplan.dispatchers.batch_jobs import batch_lines
from batchplan.dispatchers.bedrock import BedrockBackend
from batchplan.dispatchers.bedrock_batch import BedrockBatchSender

BUCKET = "nightly"
ARN = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/job0abc123"
PRICE = 1.0  # USD per Mtok in and out


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _client(service: str, endpoint: str | None = None) -> Any:
    return boto3.client(
        service, region_name="us-east-1", endpoint_url=endpoint,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    client = _client("s3", s3_endpoint)
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


def _queue(n: int) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "query_id": [f"q{i:03d}" for i in range(n)],
            "prompt": [f"question {i}? A or B" for i in range(n)],
            "labels": [["A", "B"]] * n,
        }
    )
    return conform(frame, QUEUE_SCHEMA, name="queue", required=("query_id", "prompt"))


def _calls(queue: pl.DataFrame, model: str = "small", mode: str = "batch") -> pl.DataFrame:
    n = queue.height
    return conform(
        pl.DataFrame(
            {
                "query_id": queue["query_id"],
                "models": [[model]] * n,
                "reserve_cost_usd": [1e-4] * n,
                "expected_cost_usd": [5e-5] * n,
                "expected_accuracy": [0.8] * n,
                "mode": [mode] * n,
            }
        ),
        ROUND_PLAN_SCHEMA,
        name="calls",
    )


def _backend(runtime: Any | None = None) -> BedrockBackend:
    prices = pl.DataFrame({"model": ["small"], "usd_per_mtok_in": [PRICE], "usd_per_mtok_out": [PRICE]})
    catalog = PriceCatalog.from_prices(prices).for_backend("bedrock")
    return BedrockBackend(catalog=catalog, client=runtime or _client("bedrock-runtime"), max_workers=1)


def _converse(answer: str, tokens_in: int = 40) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": answer}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": tokens_in, "outputTokens": 1, "totalTokens": tokens_in + 1},
        "metrics": {"latencyMs": 90},
    }


def _job(status: str) -> dict[str, Any]:
    return {
        "jobArn": ARN, "modelId": "small", "roleArn": "arn:aws:iam::123456789012:role/batch", "status": status,
        "submitTime": datetime(2026, 12, 1, tzinfo=UTC),
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://x/in"}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://x/out"}},
    }  # fmt: skip


class Service:
    """Writes the job's output into S3 as Bedrock does, on the first poll's wait: every record answered
    ``A`` with 40 input tokens, except record 1 (a model error) and the last one (never processed)."""

    def __init__(self, s3: Any, out: Path) -> None:
        self.s3, self.out, self.waits = s3, out, 0

    def sleep(self, _seconds: float) -> None:
        self.waits += 1
        if self.waits > 1:
            return
        state = json.loads(next((self.out / "jobs").glob("*.json")).read_text())
        key_in = state["input"].removeprefix(f"s3://{BUCKET}/")
        lines = [json.loads(x) for x in self.s3.get_object(Bucket=BUCKET, Key=key_in)["Body"].read().splitlines()]
        out = []
        for i, line in enumerate(lines[:-1]):
            record = {"recordId": line["recordId"], "modelInput": line["modelInput"]}
            if i == 1:
                record["error"] = {"errorCode": 400, "errorMessage": "bad request"}
            else:
                record["modelOutput"] = _converse("A")
            out.append(json.dumps(record))
        prefix = state["output"].removeprefix(f"s3://{BUCKET}/") + ARN.rsplit("/", 1)[-1] + "/"
        self.s3.put_object(Bucket=BUCKET, Key=prefix + "small.jsonl.out", Body="\n".join(out).encode())
        self.s3.put_object(Bucket=BUCKET, Key=prefix + "manifest.json.out", Body=b'{"totalRecordCount": 1}')


def _sender(control: Any, s3: Any, service: Service | None, realtime: Any = None, **options: Any) -> BedrockBatchSender:
    backend = _backend()
    return BedrockBatchSender(
        backend=backend, control=control, s3=s3, bucket=BUCKET, role_arn="arn:aws:iam::123456789012:role/batch",
        realtime=realtime or DispatchSender(backend, DispatchOptions(concurrency=1)), poll_seconds=0.0,
        sleep=service.sleep if service else (lambda _s: None), **options,
    )  # fmt: skip


def _send(sender: BedrockBatchSender, calls: pl.DataFrame, queue: pl.DataFrame, out: Path, budget: float):  # type: ignore[no-untyped-def]
    return sender.send(RoundRequest(calls, queue, 1, budget, {}, str(out), Storage()))


def test_a_round_by_bedrock_batch_round_trips_through_s3(s3: Any, tmp_path: Path) -> None:
    queue = _queue(120)  # above Bedrock's minimum of 100 records
    control = _client("bedrock")
    service = Service(s3, tmp_path)
    with Stubber(control) as stub:
        stub.add_response(
            "create_model_invocation_job",
            {"jobArn": ARN},
            {
                "jobName": ANY,
                "roleArn": ANY,
                "clientRequestToken": ANY,
                "modelId": "small",
                "modelInvocationType": "Converse",
                "inputDataConfig": ANY,
                "outputDataConfig": ANY,
            },
        )
        stub.add_response("get_model_invocation_job", _job("InProgress"), {"jobIdentifier": ARN})
        stub.add_response("get_model_invocation_job", _job("Completed"), {"jobIdentifier": ARN})
        observed, refused = _send(_sender(control, s3, service), _calls(queue), queue, tmp_path, budget=1.0)
        stub.assert_no_pending_responses()
    assert observed.height == 120
    assert refused.height == 0
    by_status = dict(observed.group_by("status").len().iter_rows())
    assert by_status == {"ok": 118, "client_error": 1, "timeout": 1}
    assert set(observed["mode"].to_list()) == {"batch"}
    ok = observed.filter(pl.col("status") == "ok")
    assert ok["answer"].unique().to_list() == ["A"]
    # billed at half the on-demand price: (40 in + 1 out) tokens x $1/Mtok x 0.5
    assert ok["cost_usd"].to_list() == pytest.approx([41 * PRICE / 1e6 * 0.5] * 118)
    failed = observed.filter(pl.col("status") != "ok")
    assert failed["cost_usd"].to_list() == [0.0, 0.0]  # released, back to the planner
    summary = json.loads((tmp_path / "batch.json").read_text())
    assert summary["jobs"][0]["job_arn"] == ARN
    assert summary["jobs"][0]["lines"] == 120
    # the input as Bedrock reads it: recordId + a Converse body without the model id
    state = json.loads(next((tmp_path / "jobs").glob("*.json")).read_text())
    first = json.loads(s3.get_object(Bucket=BUCKET, Key=state["input"].removeprefix(f"s3://{BUCKET}/"))["Body"]
                       .read().splitlines()[0])  # fmt: skip
    assert set(first) == {"recordId", "modelInput"}
    assert len(first["recordId"]) == 11
    assert first["modelInput"]["messages"][0]["content"][0]["text"] == "question 0? A or B"
    assert "modelId" not in first["modelInput"]

    # a rerun (the process was killed after the job was created) polls the same job: no second submission
    control_again = _client("bedrock")
    with Stubber(control_again) as stub:
        stub.add_response("get_model_invocation_job", _job("Completed"), {"jobIdentifier": ARN})
        again, _ = _send(_sender(control_again, s3, None), _calls(queue), queue, tmp_path, budget=1.0)
        stub.assert_no_pending_responses()  # and create_model_invocation_job was never called
    assert again.sort("query_id").equals(observed.sort("query_id"))


def test_the_budget_holds_each_lines_high_side_before_the_job_is_submitted(s3: Any, tmp_path: Path) -> None:
    queue = _queue(150)
    sender = _sender(_client("bedrock"), s3, None)
    lines = batch_lines(_calls(queue), queue, sender.backend, {"small": 0.5}, run_key="k", max_tokens=16,
                        max_tokens_open=16)  # fmt: skip
    bounds = [sender.backend.cost_bound(line.request) or 0.0 for line in lines]
    budget = sum(bounds[:120]) * 0.5 + 1e-9  # room for 120 lines' high sides at the batch price, not 150
    control = sender.control
    with Stubber(control) as stub:
        stub.add_response("create_model_invocation_job", {"jobArn": ARN}, None)
        stub.add_response("get_model_invocation_job", _job("Completed"), {"jobIdentifier": ARN})
        observed, refused = _send(sender, _calls(queue), queue, tmp_path, budget=budget)
    assert refused.height == 30  # never sent
    assert refused["error"].str.contains("budget").all()
    state = json.loads(next((tmp_path / "jobs").glob("*.json")).read_text())
    assert len(state["records"]) == 120
    # the job came back empty (nothing written): every line released, nothing charged
    assert observed["cost_usd"].sum() == 0.0
    assert (observed["status"] == "timeout").all()


def test_rows_the_planner_left_unmarked_go_by_batch(s3: Any, tmp_path: Path) -> None:
    """A single-shot plan followed by batch marks no mode (priced at the batch price): its calls go in a job,
    as the OpenAI batch sender sends them, not in real time at twice the price."""
    queue = _queue(120)
    sender = _sender(_client("bedrock"), s3, None)
    unmarked = _calls(queue).with_columns(pl.lit(None, dtype=pl.String).alias("mode"))
    with Stubber(sender.control) as stub:
        stub.add_response("create_model_invocation_job", {"jobArn": ARN}, None)
        stub.add_response("get_model_invocation_job", _job("Completed"), {"jobIdentifier": ARN})
        observed, refused = _send(sender, unmarked, queue, tmp_path, budget=1.0)
    assert refused.height == 0
    state = json.loads(next((tmp_path / "jobs").glob("*.json")).read_text())
    assert len(state["records"]) == 120
    assert set(observed["mode"].to_list()) == {"batch"}


def test_below_bedrocks_minimum_record_count_the_llm_goes_in_real_time(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = _queue(5)
    runtime = _client("bedrock-runtime")
    control = _client("bedrock")
    backend = _backend(runtime)
    with Stubber(runtime) as live, Stubber(control) as stub:
        for _ in range(5):
            live.add_response("converse", _converse("B"))
        sender = _sender(control, s3, None, realtime=DispatchSender(backend, DispatchOptions(concurrency=1)))
        sender.backend = backend
        observed, refused = _send(sender, _calls(queue), queue, tmp_path, budget=1.0)
        stub.assert_no_pending_responses()  # no job was created
        live.assert_no_pending_responses()
    assert observed.height == 5
    assert (observed["status"] == "ok").all()
    assert set(observed["mode"].to_list()) == {"realtime"}
    assert observed["cost_usd"].to_list() == pytest.approx([41 * PRICE / 1e6] * 5)  # the on-demand price
    summary = json.loads((tmp_path / "batch.json").read_text())
    assert summary["fallbacks"] == [{"model": "small", "records": 5, "min_records": 100}]
    logged = capsys.readouterr()
    assert "bedrock_batch.fallback" in logged.out + logged.err  # where structlog prints depends on the CLI's setup
    assert refused.height == 0


def test_a_job_running_past_the_deadline_is_stopped_and_its_open_lines_released(s3: Any, tmp_path: Path) -> None:
    queue = _queue(100)
    control = _client("bedrock")
    with Stubber(control) as stub:
        stub.add_response("create_model_invocation_job", {"jobArn": ARN}, None)
        stub.add_response("get_model_invocation_job", _job("InProgress"), {"jobIdentifier": ARN})
        stub.add_response("stop_model_invocation_job", {}, {"jobIdentifier": ARN})
        stub.add_response("get_model_invocation_job", _job("Stopped"), {"jobIdentifier": ARN})
        sender = _sender(control, s3, None, deadline=1.0, clock=lambda: 2.0, terms=BatchTerms(min_records=100))
        observed, _ = _send(sender, _calls(queue), queue, tmp_path, budget=1.0)
        stub.assert_no_pending_responses()
    assert (observed["status"] == "timeout").all()
    assert observed["cost_usd"].sum() == 0.0


def test_the_sender_from_settings_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchplan.core.errors import ContractError
    from batchplan.core.settings import get_settings
    from batchplan.dispatchers.bedrock_batch import bedrock_batch_sender

    monkeypatch.delenv("BATCHPLAN_BEDROCK_BATCH_URI", raising=False)
    monkeypatch.setenv("BATCHPLAN_BEDROCK_BATCH_ROLE_ARN", "arn:aws:iam::123456789012:role/batch")
    get_settings.cache_clear()
    try:
        with pytest.raises(ContractError, match="set BATCHPLAN_BEDROCK_BATCH_URI"):
            bedrock_batch_sender(_backend(), None, region_name="us-east-1")
        monkeypatch.setenv("BATCHPLAN_BEDROCK_BATCH_URI", "s3://nightly/jobs")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        get_settings.cache_clear()
        sender = bedrock_batch_sender(_backend(), None, region_name="us-east-1")
        assert (sender.bucket, sender.prefix) == ("nightly", "jobs")
    finally:
        get_settings.cache_clear()


def test_every_call_of_a_bedrock_batch_round_is_in_the_runs_outcomes_at_its_bill(s3: Any, tmp_path: Path) -> None:
    """The run's ``outcomes.parquet`` (``record_run_outcomes`` over the run's ledgers) holds every call of a
    round sent by Bedrock batch (one job per LLM), as it holds the OpenAI batch sender's: each line at what it
    was billed (the service's bill, half the list price), beside the real-time calls of an LLM below the
    minimum record count, once, also after a rerun of the round. The local control plane (and Converse)
    answers from a history over moto's S3."""
    from batchplan.app.outcomes import record_run_outcomes
    from batchplan.core.history import synthetic_history
    from tests.support.bedrock_control_server import BedrockControlServer

    history = synthetic_history(270, 4, seed=31)
    queue = conform(history.queries, QUEUE_SCHEMA, name="queue")
    # two jobs of 120 (above Bedrock's minimum of 100 records), and 30 calls of a third LLM in real time
    models = [[history.models[i % 2 if i < 240 else 2]] for i in range(queue.height)]
    calls = conform(
        pl.DataFrame({
            "query_id": queue["query_id"], "models": models, "reserve_cost_usd": [1e-4] * queue.height,
            "expected_cost_usd": [5e-5] * queue.height, "expected_accuracy": [0.8] * queue.height,
            "mode": ["batch"] * queue.height,
        }),
        ROUND_PLAN_SCHEMA, name="calls",
    )  # fmt: skip
    with BedrockControlServer(history, s3, run_s=0.05) as control:
        runtime = _client("bedrock-runtime", control.endpoint_url)
        backend = BedrockBackend(
            catalog=PriceCatalog.from_prices(history.prices).for_backend("bedrock"), client=runtime, max_workers=1
        )
        plane = _client("bedrock", control.endpoint_url)
        sender = BedrockBatchSender(
            backend=backend, control=plane, s3=s3, bucket=BUCKET,
            role_arn="arn:aws:iam::123456789012:role/batch", poll_seconds=0.02,
            realtime=DispatchSender(backend, DispatchOptions(concurrency=1)),
        )  # fmt: skip
        request = RoundRequest(calls, queue, 1, 1.0, {}, str(tmp_path / "rounds" / "1"), Storage())
        observed, refused = sender.send(request)
        # a rerun of the round (after a crash: the job found by its state file, its output read again)
        sender.send(request)
        stats = control.stats()
        plane.close()  # its kept-alive connection, before the server stops
        runtime.close()
    assert refused.height == 0
    assert dict(observed.group_by("mode").len().iter_rows()) == {"batch": 240, "realtime": 30}
    assert (observed["status"] == "ok").all()
    assert stats["creates"] == 2
    assert stats["billed_twice"] == []
    outcomes = record_run_outcomes(Storage(), str(tmp_path), str(tmp_path), queue, prices=history.prices)
    assert pl.read_parquet(tmp_path / "outcomes.parquet").height == outcomes.height == 270  # every call, once
    columns = ["query_id", "model", "answer", "tokens_in", "round"]
    recorded, expected = outcomes.sort("query_id"), observed.sort("query_id")
    assert recorded.select(columns).equals(expected.select(columns).cast(recorded.select(columns).schema))
    assert recorded["cost_usd"].to_list() == pytest.approx(expected["cost_usd"].to_list(), rel=1e-12)  # as billed
    assert float(outcomes["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)  # the bill, once
