"""A local Bedrock control plane for batch inference (moto does not implement it), answering from a history.

It speaks the three REST routes the ``bedrock`` boto3 client calls for a batch job, on 127.0.0.1 (and
``bedrock-runtime``'s Converse, for a round's real-time calls):
``POST /model-invocation-job`` (CreateModelInvocationJob, idempotent on ``clientRequestToken`` as the
service is: the same token answers the job already created), ``GET /model-invocation-job/{arn}`` and ``POST
/model-invocation-job/{arn}/stop``. A job goes ``Submitted`` -> ``InProgress`` (``run_s``) -> ``Completed``
by the wall clock, evaluated when it is asked about; on completion it reads the job's JSONL input from S3
(moto's server, through ``s3``), answers each record with ``ReplayServer.answer`` (the recorded answer and
tokens, as a Converse response) and writes ``<output>/<job id>/<input name>.out`` as the service does.

The bill is Bedrock's: each processed record's usage tokens x the history's list price x ``batch_discount``
(50%), once per job. ``stats()`` adds the jobs created (``jobs``), every create request (``creates``, a
retried token among them) and the records processed in more than one job (``processed_twice``), so a test
can assert no job was created twice and nothing was billed twice. ``create_delay_s``: the job is created at
once and its answer sent this late (a client killed in between lost it).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batchplan.core.history import History
from tests.support.replay_server import ReplayServer, _Protocol

ROUTE = "/model-invocation-job"


@dataclass
class _Job:
    arn: str
    token: str
    name: str
    model: str
    role: str
    input_uri: str
    output_uri: str
    created: float
    status: str = "Submitted"
    stopped_at: float | None = None
    records: list[str] = field(default_factory=list)


class BedrockControlServer(ReplayServer):
    def __init__(
        self,
        history: History,
        s3: Any,
        *,
        run_s: float = 0.2,
        create_delay_s: float = 0.0,
        batch_discount: float = 0.5,
        port: int = 0,
    ) -> None:
        super().__init__(history, port=port)
        self._lock = threading.RLock()  # a job finishing under it answers records, which take it too
        self.s3, self.run_s, self.create_delay_s, self.batch_discount = s3, run_s, create_delay_s, batch_discount
        self.prices = {
            str(m): (float(i) / 1e6, float(o) / 1e6)
            for m, i, o in history.prices.select("model", "usd_per_mtok_in", "usd_per_mtok_out").iter_rows()
            if i is not None and o is not None
        }
        self.jobs: dict[str, _Job] = {}  # arn -> job
        self.creates = 0
        self.processed: Counter[str] = Counter()  # "<model>|<query_id>" -> jobs that processed it

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        with self._lock:
            stats["jobs"] = [
                {"arn": j.arn, "token": j.token, "model": j.model, "status": j.status, "records": len(j.records)}
                for j in self.jobs.values()
            ]
            stats["creates"] = self.creates
            stats["processed_twice"] = sorted(k for k, n in self.processed.items() if n > 1)
        return stats

    def handle(self, proto: _Protocol, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        route = urllib.parse.unquote(path.split("?", 1)[0]).rstrip("/")
        if method == "POST" and route.startswith("/model/") and route.endswith("/converse"):
            return self._converse_now(proto, route.removeprefix("/model/").removesuffix("/converse"), body)
        if not route.startswith(ROUTE):
            return super().handle(proto, method, path, headers, body)
        with self._lock:
            self.requests += 1
        if method == "POST" and route == ROUTE:
            return self._create(proto, json.loads(body or b"{}"))
        rest = route.removeprefix(ROUTE + "/")
        stop = rest.endswith("/stop")
        job = self.jobs.get(rest.removesuffix("/stop"))
        if job is None:
            return proto.respond(404, json.dumps({"message": f"no job {rest!r}"}).encode())
        if method == "POST" and stop:
            with self._lock:
                if job.status in ("Submitted", "InProgress"):
                    job.status, job.stopped_at = "Stopping", time.time()
            return proto.respond(200, b"{}")
        if method == "GET":
            return proto.respond(200, json.dumps(self._describe(self._advance(job))).encode())
        return proto.respond(405, b"{}")

    def _create(self, proto: _Protocol, request: dict[str, Any]) -> None:
        token = str(request.get("clientRequestToken") or "")
        with self._lock:
            self.creates += 1
            job = next((j for j in self.jobs.values() if token and j.token == token), None)
            if job is None:
                arn = f"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/job{len(self.jobs):08d}"
                job = self.jobs[arn] = _Job(
                    arn=arn,
                    token=token,
                    name=str(request["jobName"]),
                    model=str(request["modelId"]),
                    role=str(request["roleArn"]),
                    input_uri=str(request["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]),
                    output_uri=str(request["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"]),
                    created=time.time(),
                )
        payload = json.dumps({"jobArn": job.arn}).encode()
        if self.create_delay_s <= 0:
            return proto.respond(200, payload)
        assert self._loop is not None
        self._loop.call_later(self.create_delay_s, lambda: proto.respond(200, payload))

    def _advance(self, job: _Job) -> _Job:
        with self._lock:
            if job.status == "Stopping":
                job.status = "Stopped"  # nothing processed: a stop before the end returns no records
            elif job.status in ("Submitted", "InProgress"):
                job.status = "Completed" if time.time() >= job.created + self.run_s else "InProgress"
                if job.status == "Completed":
                    self._finish(job)
        return job

    def _finish(self, job: _Job) -> None:
        """Answer every record of the job's input into its output prefix, and bill them (once: at the end)."""
        bucket, key = job.input_uri.removeprefix("s3://").split("/", 1)
        lines = [json.loads(x) for x in self.s3.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines() if x]
        out = []
        for line in lines:
            model_input = line["modelInput"]
            query_id, code, output = self._converse(job.model, model_input)
            record: dict[str, Any] = {"recordId": line["recordId"], "modelInput": model_input}
            if code != 200:
                record["error"] = {"errorCode": code, "errorMessage": output["message"]}
            else:
                record["modelOutput"] = output
                tin, tout = output["usage"]["inputTokens"], output["usage"]["outputTokens"]
                p_in, p_out = self.prices[job.model]
                self.billed_calls += 1
                self.billed_usd += (tin * p_in + tout * p_out) * self.batch_discount
                self.billed_keys[(query_id, job.model)] += 1
                self.processed[f"{job.model}|{query_id}"] += 1
            job.records.append(str(line["recordId"]))
            out.append(json.dumps(record))
        out_bucket, out_key = job.output_uri.removeprefix("s3://").split("/", 1)
        name = key.rsplit("/", 1)[-1]
        prefix = f"{out_key.rstrip('/')}/{job.arn.rsplit('/', 1)[-1]}/"
        self.s3.put_object(Bucket=out_bucket, Key=prefix + name + ".out", Body="\n".join(out).encode())
        self.s3.put_object(Bucket=out_bucket, Key=prefix + "manifest.json.out", Body=json.dumps({"totalRecordCount": len(out)}).encode())

    def _converse(self, model: str, model_input: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        """(query_id, status, the Converse response or {"message": why}) of one Converse request body, as the
        history recorded it (``ReplayServer.answer``)."""
        messages = [{"role": "system", "content": s["text"]} for s in model_input.get("system", [])]
        messages += [{"role": m["role"], "content": m["content"][0]["text"]} for m in model_input["messages"]]
        chat = {"model": model, "messages": messages, "max_tokens": model_input["inferenceConfig"]["maxTokens"]}
        query_id, code, payload, _ = self.answer(chat)
        if code != 200:
            return query_id, code, {"message": json.loads(payload)["error"]["message"]}
        answer = json.loads(payload)
        tin, tout = int(answer["usage"]["prompt_tokens"]), int(answer["usage"]["completion_tokens"])
        return query_id, 200, {
            "output": {"message": {"role": "assistant", "content": [{"text": answer["choices"][0]["message"]["content"]}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": tin, "outputTokens": tout, "totalTokens": tin + tout},
            "metrics": {"latencyMs": 100},
        }

    def _converse_now(self, proto: _Protocol, model: str, body: bytes) -> None:
        """Bedrock runtime's Converse (``POST /model/{modelId}/converse``): a real-time call (the rows a batch
        round sends now, an LLM below the minimum record count), billed at the list price."""
        query_id, code, output = self._converse(model, json.loads(body or b"{}"))
        if code == 200:
            p_in, p_out = self.prices[model]
            with self._lock:
                self.billed_calls += 1
                self.billed_usd += output["usage"]["inputTokens"] * p_in + output["usage"]["outputTokens"] * p_out
                self.billed_keys[(query_id, model)] += 1
        proto.respond(code, json.dumps(output).encode())

    def _describe(self, job: _Job) -> dict[str, Any]:
        return {
            "jobArn": job.arn,
            "jobName": job.name,
            "modelId": job.model,
            "roleArn": job.role,
            "status": job.status,
            "submitTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.created)),
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": job.input_uri}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": job.output_uri}},
        }
