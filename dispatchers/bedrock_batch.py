"""A round by Bedrock batch inference: one ``CreateModelInvocationJob`` per LLM and round, JSONL in S3.

The sender of a round's ``mode == batch`` rows (a ``RoundSender``, ``batchplan.app.round_runner``), in the
shape every batch sender has (``dispatchers.batch_jobs``): lines grouped one job per LLM (split at 50,000
records), each line's high side reserved before its job is submitted, settled from the job's output at the
batch price (``PriceCatalog.batch_discount``, 50% of on-demand), failed and unreturned lines released and
given back to the planner; each line's call goes into ``<out>/batch/``'s ledger as the OpenAI batch sender
writes it (the executor's call event, at its bill), so the run's outcomes hold it. An LLM with fewer lines than Bedrock's per-model minimum record count (100 by
default) is sent in real time instead, with the round's real-time rows (``realtime``: a DispatchSender over
the Converse backend), and says so: a ``bedrock_batch.fallback`` log line and ``fallbacks`` in
``<out>/batch.json``.

Per job, in S3 (``s3://bucket/prefix/<token>/``)::

    input/<llm>.jsonl    {"recordId": "r0000000001", "modelInput": <Converse request body>} per line
    output/<job id>/<llm>.jsonl.out   what the service writes: recordId, modelInput, modelOutput (the
                                      Converse response, usage included) or error {errorCode, errorMessage}

``modelInvocationType="Converse"``, so a line's body and its answer are parsed exactly as a real-time
Converse call's (``BedrockBackend``). Crash safety: ``<out>/jobs/<k>-<llm>.json`` is written before the
input is uploaded (the job's idempotency token, its records) and again with the job ARN once created; a
rerun finds the ARN and polls that job, or re-creates it under the same ``clientRequestToken``, which
Bedrock answers with the job already created: no job is submitted twice. A job still running at the
``deadline`` is stopped; what it processed is billed and settled, the rest released.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl
import structlog

from batchplan.core.catalog import BATCH_TERMS, BatchTerms, batch_terms
from batchplan.core.contracts import Status
from batchplan.core.errors import ContractError
from batchplan.core.rounds import BATCH, OBSERVATION_MODE, REALTIME, ROUND_PLAN_SCHEMA, RoundRequest, with_modes
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage, join
from batchplan.dispatchers.base import CallResult
from batchplan.dispatchers.batch_jobs import (
    REFUSED_BY_BUDGET,
    JobBudget,
    Line,
    batch_lines,
    group_jobs,
    observation,
    observations_frame,
)
from batchplan.dispatchers.bedrock import BedrockBackend
from batchplan.dispatchers.executor import _to_event
from batchplan.dispatchers.ledger import Ledger, new_writer_id

log = structlog.get_logger("batchplan.dispatchers")

TERMINAL = frozenset({"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"})
MAX_TOKENS, MAX_TOKENS_OPEN = 16, 1024  # the dispatcher's defaults (round_runner.MAX_TOKENS)


@dataclass
class BedrockBatchSender:
    """``control``: a boto3 ``bedrock`` client; ``s3``: a boto3 ``s3`` client; ``realtime``: the RoundSender
    for real-time rows and for LLMs below the minimum record count (``DispatchSender(backend)``)."""

    backend: BedrockBackend
    control: Any
    s3: Any
    bucket: str
    role_arn: str
    realtime: Any
    prefix: str = "batchplan/bedrock-batch"
    terms: BatchTerms = field(default_factory=lambda: batch_terms("bedrock") or BATCH_TERMS["bedrock"])
    deadline: float | None = None  # POSIX seconds: a job still running then is stopped
    poll_seconds: float = 60.0
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    max_tokens: int = MAX_TOKENS
    max_tokens_open: int = MAX_TOKENS_OPEN

    def send(self, request: RoundRequest) -> tuple[pl.DataFrame, pl.DataFrame]:
        calls, queue, round, out_uri, storage = (
            request.calls, request.queue, request.round, request.out_uri, request.storage
        )  # fmt: skip
        # a row the planner left unmarked (a single-shot plan followed by batch) goes by batch, as with the
        # OpenAI sender (``BatchSender.default_mode``): it was priced at the batch price
        calls = with_modes(calls, BATCH)
        discount = {m: self._discount(m) for m in calls["models"].explode().drop_nulls().unique().to_list()}
        lines = batch_lines(
            calls, queue, self.backend, discount, run_key=out_uri, max_tokens=self.max_tokens,
            max_tokens_open=self.max_tokens_open,
        )  # fmt: skip
        jobs = group_jobs(lines, self.terms)
        for fallback in jobs.fallbacks:
            log.warning("bedrock_batch.fallback", round=round, reason="below the minimum record count", **fallback)
        budget = JobBudget(request.budget_usd, request.tenant_budgets_usd)
        refused: list[Line] = []
        submitted: list[tuple[dict[str, Any], list[Line]]] = []
        for k, job in enumerate(jobs.jobs):
            kept = [line for line in job if budget.reserve(line)]  # before the job exists
            refused += [line for line in job if line.record_id not in {x.record_id for x in kept}]
            if kept:
                submitted.append((self._submit(kept, round, k, out_uri, storage), kept))
        # the round's real-time rows and the LLMs below the minimum go at once, with what the jobs leave
        observed_rt, refused_rt = self._send_realtime(request, calls, jobs.realtime, budget)
        rows: list[dict[str, Any]] = []
        summary = []
        # every line's call event, as the OpenAI batch sender writes it: the run's outcomes read the ledgers
        ledger = Ledger(storage, join(out_uri, "batch"), new_writer_id())
        try:
            for state, kept in submitted:
                status = self._wait(state)
                outputs = self._outputs(state)
                for line in kept:
                    result = self._result(line, outputs.get(line.record_id), status)
                    billed = result.cost_usd * discount[line.model]
                    budget.settle(line, billed)
                    rows.append(observation(line, round, result, discount[line.model]))
                    ledger.append(_to_event(line.query_id, line.call, result, billed, BATCH) | {"job": state["job_arn"]})
                summary.append({k: state[k] for k in ("job_arn", "model", "input")} | {"status": status, "lines": len(kept)})
        finally:
            ledger.close()
        observed = pl.concat([observations_frame(rows), observed_rt], how="diagonal_relaxed")
        storage.write_text(
            join(out_uri, "batch.json"), json.dumps({"jobs": summary, "fallbacks": jobs.fallbacks}, indent=2)
        )
        log.info(
            "bedrock_batch", round=round, jobs=len(submitted), lines=len(rows), refused=len(refused),
            fallbacks=[f["model"] for f in jobs.fallbacks], spent_usd=round_usd(budget.total.spent_usd),
        )  # fmt: skip
        refused_frame = pl.DataFrame(
            {"query_id": [line.query_id for line in refused], "error": [REFUSED_BY_BUDGET] * len(refused)},
            schema={"query_id": pl.String, "error": pl.String},
        )
        return observed, pl.concat([refused_frame, refused_rt.cast(refused_frame.schema)])

    def _discount(self, model: str) -> float:
        discount = self.backend.catalog.batch_discount(model)
        return self.terms.discount if discount is None else discount

    def _send_realtime(
        self, request: RoundRequest, calls: pl.DataFrame, fallback: list[Line], budget: JobBudget
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        moved = {(line.query_id, line.model) for line in fallback}
        rows = calls.filter(pl.col("mode") == REALTIME)
        if moved:
            batch = calls.filter(pl.col("mode") == BATCH).explode("models")
            keep = [(q, m) in moved for q, m in batch.select("query_id", "models").iter_rows()]
            regrouped = (
                batch.filter(pl.Series(keep))
                .group_by("query_id", maintain_order=True)
                .agg(pl.col("models"), pl.col("reserve_cost_usd").first(), pl.col("expected_accuracy").first())
            )
            # its reserve at the real-time price again: the runner's guard holds the backend's bound anyway
            rows = pl.concat([rows, regrouped.with_columns(pl.lit(REALTIME).alias("mode"))], how="diagonal_relaxed")
        empty = pl.DataFrame(schema={"query_id": pl.String, "error": pl.String})
        if rows.filter(pl.col("models").list.len() > 0).height == 0:
            return observations_frame([]), empty
        left, tenant_left = budget.left_usd()
        rows = rows.select([c for c in ROUND_PLAN_SCHEMA.names() if c in rows.columns])
        got, refused = self.realtime.send(
            replace(request, calls=rows, budget_usd=left, tenant_budgets_usd=tenant_left,
                    out_uri=join(request.out_uri, "realtime"))
        )  # fmt: skip
        return got.with_columns(pl.lit(REALTIME).alias(OBSERVATION_MODE)), refused

    def _submit(self, lines: list[Line], round: int, k: int, out_uri: str, storage: Storage) -> dict[str, Any]:
        """Create the job (once: the state file and the idempotency token make a rerun find it)."""
        model = lines[0].model
        state_uri = join(out_uri, "jobs", f"{k:03d}-{_safe(model)}.json")
        if storage.exists(state_uri):
            state: dict[str, Any] = json.loads(storage.read_text(state_uri))
            if state.get("job_arn"):
                log.info("bedrock_batch.resumed", job_arn=state["job_arn"], model=model)
                return state
        else:
            token = hashlib.sha256(f"{out_uri}|{round}|{k}|{model}".encode()).hexdigest()[:40]
            base = f"{self.prefix.strip('/')}/{token}"
            state = {
                "token": token,
                "job_name": f"batchplan-r{round}-{k}-{token[:12]}",
                "model": model,
                "input": f"s3://{self.bucket}/{base}/input/{_safe(model)}.jsonl",
                "output": f"s3://{self.bucket}/{base}/output/",
                "records": [line.record_id for line in lines],
            }
            storage.write_text(state_uri, json.dumps(state))  # the intent: before anything is submitted
        body = "".join(
            json.dumps({"recordId": line.record_id, "modelInput": self._model_input(line)}) + "\n" for line in lines
        )
        self.s3.put_object(Bucket=self.bucket, Key=_key(state["input"]), Body=body.encode())
        created = self.control.create_model_invocation_job(
            jobName=state["job_name"],
            roleArn=self.role_arn,
            clientRequestToken=state["token"],
            modelId=self.backend.provider_model(model),
            modelInvocationType="Converse",
            inputDataConfig={"s3InputDataConfig": {"s3Uri": state["input"], "s3InputFormat": "JSONL"}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": state["output"]}},
        )
        state["job_arn"] = created["jobArn"]
        storage.write_text(state_uri, json.dumps(state))
        log.info("bedrock_batch.submitted", job_arn=state["job_arn"], model=model, records=len(lines))
        return state

    def _model_input(self, line: Line) -> dict[str, Any]:
        params = self.backend.request_params(line.request)
        params.pop("modelId")  # the job names the model
        return params

    def _wait(self, state: dict[str, Any]) -> str:
        """Poll until the job ends; stop it once the deadline has passed (what it processed is kept)."""
        stopping = False
        while True:
            status = str(self.control.get_model_invocation_job(jobIdentifier=state["job_arn"])["status"])
            if status in TERMINAL:
                return status
            if self.deadline is not None and self.clock() >= self.deadline and not stopping:
                self.control.stop_model_invocation_job(jobIdentifier=state["job_arn"])
                log.warning("bedrock_batch.stopped", job_arn=state["job_arn"], reason="deadline")
                stopping = True
            self.sleep(self.poll_seconds)

    def _outputs(self, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """recordId -> its output line, from every ``.out`` file the job wrote (the manifest aside)."""
        job_id = state["job_arn"].rsplit("/", 1)[-1]
        prefix = f"{_key(state['output'])}{job_id}/"
        out: dict[str, dict[str, Any]] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if not key.endswith(".out") or key.endswith("manifest.json.out"):
                    continue
                text = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()
                for raw in text.splitlines():
                    if raw.strip():
                        record = json.loads(raw)
                        out[str(record.get("recordId"))] = record
        return out

    def _result(self, line: Line, record: dict[str, Any] | None, status: str) -> CallResult:
        if record is None:  # never processed (stopped, expired, failed): not billed, back to the planner
            return CallResult(line.model, Status.TIMEOUT, reason=f"not returned by the batch job ({status})")
        if "modelOutput" in record:
            return self.backend._parse(line.request, record["modelOutput"], 0.0)
        error = record.get("error") or {}
        code = int(error.get("errorCode") or 500)
        kind = Status.RATE_LIMITED if code == 429 else Status.SERVER_ERROR if code >= 500 else Status.CLIENT_ERROR
        return CallResult(line.model, kind, reason=f"{code}: {error.get('errorMessage', '')}"[:300])


def bedrock_batch_sender(
    backend: BedrockBackend,
    realtime: Any,
    *,
    deadline: float | None = None,
    region_name: str | None = None,
    endpoint_url: str | None = None,
    airflow_conn_id: str | None = None,
) -> BedrockBatchSender:
    """The sender from the settings (``BATCHPLAN_BEDROCK_BATCH_URI``, ``BATCHPLAN_BEDROCK_BATCH_ROLE_ARN``,
    ``BATCHPLAN_BATCH_POLL_S``) and the standard AWS chain; ``endpoint_url``: the S3 endpoint
    (``BATCHPLAN_S3_ENDPOINT_URL`` by default). ``airflow_conn_id``: the control plane's and S3's clients come
    from that AWS connection instead, as the backend's runtime client does (its credentials, region and
    endpoints: ``service_config`` per service)."""
    import boto3

    settings = get_settings()
    if not settings.bedrock_batch_uri or not settings.bedrock_batch_uri.startswith("s3://"):
        raise ContractError(
            "bedrock batch jobs need an S3 prefix for their input and output: set BATCHPLAN_BEDROCK_BATCH_URI "
            "(s3://bucket/prefix)",
            fields=("bedrock_batch_uri",),
        )
    if not settings.bedrock_batch_role_arn:
        raise ContractError(
            "bedrock batch jobs run as an IAM service role: set BATCHPLAN_BEDROCK_BATCH_ROLE_ARN",
            fields=("bedrock_batch_role_arn",),
        )
    bucket, _, prefix = settings.bedrock_batch_uri.removeprefix("s3://").partition("/")
    if airflow_conn_id:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        def client(kind: str) -> Any:
            return AwsBaseHook(aws_conn_id=airflow_conn_id, client_type=kind).get_client_type(region_name=region_name)

        control, s3 = client("bedrock"), client("s3")
    else:
        control = boto3.client("bedrock", region_name=region_name)
        s3 = boto3.client(
            "s3", region_name=region_name or settings.s3_region, endpoint_url=endpoint_url or settings.s3_endpoint_url
        )
    return BedrockBatchSender(
        backend=backend,
        control=control,
        s3=s3,
        bucket=bucket,
        prefix=prefix.strip("/") or "batchplan/bedrock-batch",
        role_arn=settings.bedrock_batch_role_arn,
        realtime=realtime,
        deadline=deadline,
        poll_seconds=settings.batch_poll_s,
    )


def round_usd(value: float) -> float:
    return round(value, 6)


def _safe(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", model)


def _key(uri: str) -> str:
    return uri.removeprefix("s3://").partition("/")[2]
