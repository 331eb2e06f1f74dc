"""A round's calls through a provider's batch API (OpenAI Files + Batches): one JSONL job per LLM, split at
the provider's limits, under the hard budget, exactly once across crashes.

Each call is one line; its ``custom_id`` is the call's key ``<run_id>/<query_id>/<slot>:<model>:0`` (the
executor's, unique per round and stable across reruns), and its outcome goes into the ledger as the
executor's call event, so the round runner reads batch calls like any other. A job goes through these
states, each appended to the ledger (``{"e": "j", "job", "st", ...}``) before the next step starts::

    intent      its lines' high-side cost is reserved (bound x the catalog's batch_discount) and its input
                file is written under out_uri/jobs/<job>.jsonl: the reservation comes before submission,
                so the hard cap never depends on the provider finishing
    uploaded    the provider's file id (a rerun first looks for a file of the job's name)
    created     the batch id (a rerun first looks for a batch whose metadata names the job: a create
                whose answer was lost to a crash is found, never made twice)
    completed   the batch's terminal status and its output / error file ids
    downloaded  every line's call event is in the ledger and its reservation settled from the output's
                usage; failed, expired and cancelled lines are released (charged 0) with a transient
                status, so the next round re-plans them
    failed      never submitted (upload failed, deadline passed first): lines released as transient

Lines the budget cannot hold go in a later wave: once the first jobs settle at their bills (well under the
bounds they held), the refused lines are reserved again and submitted as new jobs, until all are sent, none
fits, or the deadline passes; what never fits is returned as refused.

A rerun after kill -9 anywhere reads these events, re-holds the reservations of every job not yet
downloaded, and continues each job from its last state: no batch created twice, nothing paid twice.
Past ``deadline`` (absolute, time.time()) open batches are cancelled; what they finished is kept, the rest
goes back to the planner. A batch still open after the cancel grace is left: its lines are charged their
reservation (``lost``: they may yet be billed).

``cancel_run(storage, run_uri)`` (``batchplan cancel RUN_DIR``) cancels every open batch of a run and
marks the run (``cancelled.json``) so a rerun does not submit new batches unless asked (``resume``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import polars as pl
import structlog

from batchplan.core.catalog import BATCH_TERMS
from batchplan.core.contracts import Status
from batchplan.core.errors import UserError
from batchplan.core.storage import Storage, join
from batchplan.dispatchers.base import CallRequest, CallResult
from batchplan.dispatchers.budget import BudgetGuard, Reservation, hold
from batchplan.dispatchers.executor import LOST, _to_event
from batchplan.dispatchers.ledger import Lease, Ledger, ledger_events, new_writer_id, run_identity
from batchplan.dispatchers.live import secret_from
from batchplan.dispatchers.openai import OpenAIBackend, _error_message
from batchplan.dispatchers.run import tenant_guards

log = structlog.get_logger("dispatchers")

MAX_LINES: Final = 50_000  # OpenAI: requests per input file
MAX_BYTES: Final = 200 * 1024 * 1024  # OpenAI: bytes per input file
ENDPOINT: Final = "/v1/chat/completions"
TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
CANCELLED_MARKER: Final = "cancelled.json"  # under the run's directory: written by batchplan cancel
REFUSED_SCHEMA: Final = pl.Schema({"query_id": pl.String, "error": pl.String})


class BatchAPIError(Exception):
    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class RunCancelled(UserError):
    """The run was cancelled (``batchplan cancel``): no new batch is submitted unless asked."""


# --- the provider's API ------------------------------------------------------------------------------------


class OpenAIBatchAPI:
    """The Files and Batches routes of an OpenAI-compatible endpoint (httpx: the openai client is not a
    dependency). Transient failures (connection, 408/409/429/5xx) are retried with backoff; a POST whose
    answer was lost is retried only after looking for what it may have made (``find_file``/``find_batch``)."""

    def __init__(
        self, base_url: str, key: str | None, *, timeout_s: float = 60.0, attempts: int = 4, base_delay_s: float = 0.5
    ) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.attempts = attempts
        self.base_delay_s = base_delay_s

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _once(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise BatchAPIError(f"{method} {path}: {type(error).__name__}: {error}", transient=True) from error
        if response.status_code >= 400:
            transient = response.status_code in (408, 409, 429) or response.status_code >= 500
            message = f"{method} {path}: HTTP {response.status_code}: {_error_message(response.content)}"
            raise BatchAPIError(message, transient=transient)
        return response

    async def _retrying(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.attempts):
            try:
                return await self._once(method, path, **kwargs)
            except BatchAPIError as error:
                if not error.transient or attempt + 1 == self.attempts:
                    raise
            await asyncio.sleep(min(self.base_delay_s * 2**attempt, 10.0))
        raise AssertionError("unreachable")

    async def _pages(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            data = (await self._retrying("GET", path, params=params)).json()
            items.extend(data.get("data") or [])
            if not data.get("has_more") or not items:
                return items
            params = {**params, "after": items[-1]["id"]}

    async def find_file(self, filename: str) -> str | None:
        files = await self._pages("/files", {"purpose": "batch"})
        return next((f["id"] for f in files if f.get("filename") == filename and f.get("purpose") == "batch"), None)

    async def upload(self, filename: str, data: bytes) -> str:
        for attempt in range(self.attempts):
            try:
                response = await self._once(
                    "POST", "/files", files={"file": (filename, data, "application/jsonl")}, data={"purpose": "batch"}
                )
                return str(response.json()["id"])
            except BatchAPIError as error:
                if not error.transient or attempt + 1 == self.attempts:
                    raise
            found = await self.find_file(filename)
            if found is not None:
                return found
            await asyncio.sleep(min(self.base_delay_s * 2**attempt, 10.0))
        raise AssertionError("unreachable")

    async def find_batch(self, tag: str) -> dict[str, Any] | None:
        batches = await self._pages("/batches", {"limit": 100})
        return next((b for b in batches if (b.get("metadata") or {}).get("batchplan_job") == tag), None)

    async def create(self, file_id: str, tag: str) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {"batchplan_job": tag},
        }
        for attempt in range(self.attempts):
            try:
                return dict((await self._once("POST", "/batches", json=body)).json())
            except BatchAPIError as error:
                if not error.transient or attempt + 1 == self.attempts:
                    raise
            found = await self.find_batch(tag)  # the create may have happened: never make a second one
            if found is not None:
                return found
            await asyncio.sleep(min(self.base_delay_s * 2**attempt, 10.0))
        raise AssertionError("unreachable")

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return dict((await self._retrying("GET", f"/batches/{batch_id}")).json())

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return dict((await self._retrying("POST", f"/batches/{batch_id}/cancel")).json())

    async def content(self, file_id: str) -> bytes:
        return (await self._retrying("GET", f"/files/{file_id}/content")).content


# --- lines and jobs ----------------------------------------------------------------------------------------


@dataclass
class Line:
    query_id: str
    call: str  # "<slot>:<model>:0", as the executor names a call
    request: CallRequest
    reserve_usd: float
    tenant: str | None
    held: list[tuple[BudgetGuard, Reservation]] = field(default_factory=list)

    @property
    def custom_id(self) -> str:
        return self.request.key


@dataclass
class Job:
    key: str  # "<model>-<n>", unique within the round's out_uri
    model: str
    lines: list[Line]
    state: str = "intent"
    file_id: str | None = None
    batch_id: str | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    new: bool = False  # planned by this run: its input file and intent are not written yet


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


class BatchRun:
    """One round's batch calls into ``out_uri`` (resumable); ``run()`` returns the refused calls."""

    def __init__(
        self,
        calls: pl.DataFrame,
        queue: pl.DataFrame,
        backend: OpenAIBackend,
        *,
        budget_usd: float,
        tenant_budgets_usd: Mapping[str, float],
        out_uri: str,
        storage: Storage,
        deadline: float | None = None,
        poll_s: float = 30.0,
        cancel_grace_s: float = 600.0,
        max_lines: int = MAX_LINES,
        max_bytes: int = MAX_BYTES,
        max_tokens: int = 16,
        max_tokens_open: int = 1024,
        cancel_marker: str | None = None,
        resume_cancelled: bool = False,
        api_options: Mapping[str, Any] | None = None,
    ) -> None:
        """``deadline``: absolute (time.time()); ``poll_s``: between status requests; ``cancel_grace_s``: how
        long a batch cancelled at the deadline may take to stop; ``max_lines``/``max_bytes``: the provider's
        limits per input file; ``cancel_marker``: the run's cancelled.json (no new batch while it exists,
        unless ``resume_cancelled``); ``api_options``: OpenAIBatchAPI's keywords (timeout_s, attempts ...)."""
        self.calls, self.queue, self.backend = calls, queue, backend
        self.budget_usd, self.tenant_budgets_usd = budget_usd, dict(tenant_budgets_usd)
        self.out_uri, self.storage = out_uri, storage
        self.deadline, self.poll_s, self.cancel_grace_s = deadline, poll_s, cancel_grace_s
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.max_tokens, self.max_tokens_open = max_tokens, max_tokens_open
        self.cancel_marker, self.resume_cancelled = cancel_marker, resume_cancelled
        self.api_options = dict(api_options or {})
        self.refused: list[tuple[Line, str]] = []  # lines the budget cannot hold now, and why

    def discount(self, model: str) -> float:
        """The batch price of ``model`` as a share of on-demand: the catalog's, else the OpenAI Batch API's
        terms (a catalog built without a backend knows none, yet this sender is the OpenAI batch API)."""
        discount = self.backend.catalog.batch_discount(model)
        return BATCH_TERMS["openai"].discount if discount is None else discount

    def run(self) -> pl.DataFrame:
        return asyncio.run(self.arun())

    async def arun(self) -> pl.DataFrame:
        identity = run_identity(self.storage, self.out_uri)
        self.run_id = str(identity["run_id"])
        writer = new_writer_id()
        lease = Lease(self.storage, self.out_uri, writer)
        lease.acquire()
        self.lease, self._renewed = lease, time.monotonic()
        self.ledger = Ledger(self.storage, self.out_uri, writer)
        key = self.backend._key.value if self.backend._key else None
        api = self._api = OpenAIBatchAPI(self.backend.base_url, key, **self.api_options)
        charged, sent = 0.0, 0
        try:
            jobs = await self._plan_jobs()
            waves = 0
            while jobs:
                if any(job.new or job.state in ("intent", "uploaded") for job in jobs):
                    self._check_not_cancelled()  # before anything new is written or submitted
                charged += sum(await asyncio.gather(*(self._drive(job) for job in jobs)))
                sent += sum(len(job.lines) for job in jobs)
                waves += 1
                if not self.refused or self._past_deadline():
                    break
                # a wave: the jobs just settled at their bills, well under the bounds they held, so lines
                # refused before may fit now (each still reserved in full before it is submitted)
                retry, self.refused = [line for line, _ in self.refused], []
                jobs = await self._new_jobs(retry, self._taken)
        finally:
            self.ledger.close()
            lease.release()
            await api.aclose()
        log.info(
            "batch.round",
            out=self.out_uri,
            waves=waves,
            lines=sent,
            refused=len(self.refused),
            charged_usd=round(charged, 6),
            budget_usd=round(self.budget_usd, 6),
        )
        refused = [(line.query_id, why) for line, why in self.refused]
        return pl.DataFrame(refused, schema=REFUSED_SCHEMA, orient="row")

    # -- what to send, what the ledger already holds ----------------------------------------------------
    def _lines(self) -> list[Line]:
        texts = self.queue.select(
            "query_id",
            "prompt",
            "system_prompt",
            "labels",
            *(["tenant"] if "tenant" in self.queue.columns else []),
        )
        rows = self.calls.select("query_id", "models", "reserve_cost_usd").join(
            texts, on="query_id", how="left", maintain_order="left"
        )
        lines = []
        for row in rows.iter_rows(named=True):
            labels = tuple(row["labels"]) if row["labels"] is not None else None
            for slot, model in enumerate(row["models"] or []):
                call = f"{slot}:{model}:0"
                request = CallRequest(
                    row["query_id"],
                    model,
                    row["prompt"] or "",
                    row["system_prompt"],
                    labels,
                    key=f"{self.run_id}/{row['query_id']}/{call}",
                    max_tokens=self.max_tokens if labels is not None else self.max_tokens_open,
                )
                bound = self.backend.cost_bound(request)
                reserve = bound * self.discount(model) if bound is not None else row["reserve_cost_usd"]
                lines.append(Line(row["query_id"], call, request, reserve, row.get("tenant")))
        return lines

    async def _plan_jobs(self) -> list[Job]:
        """The jobs of earlier runs (from the ledger, reservations re-held) and new jobs for the rest."""
        lines = {line.custom_id: line for line in self._lines()}
        jobs: dict[str, Job] = {}
        called: dict[str, dict[str, Any]] = {}  # custom_id -> first call event
        for event in ledger_events(self.storage, self.out_uri):
            if event.get("e") == "c":
                called.setdefault(f"{self.run_id}/{event.get('q')}/{event.get('c')}", event)
            elif event.get("e") == "j":
                job = jobs.get(event["job"])
                if job is None:
                    job = jobs[event["job"]] = Job(event["job"], str(event["m"]), [])
                job.state = str(event["st"])
                job.file_id = event.get("file", job.file_id)
                job.batch_id = event.get("batch", job.batch_id)
                job.batch = event.get("b", job.batch)
        open_jobs = [j for j in jobs.values() if j.state not in ("downloaded", "failed")]
        in_jobs: set[str] = set()
        for job in jobs.values():
            ids = [json.loads(raw)["custom_id"] for raw in self._input(job).splitlines() if raw.strip()]
            job.lines = [lines[i] for i in ids if i in lines]
            in_jobs.update(ids)
        self.called = called
        # spend so far: every call event, except the lines of jobs still open (their reservation stands in)
        open_ids = {line.custom_id for job in open_jobs for line in job.lines}
        charged: dict[str, float] = {}
        for custom_id, event in called.items():
            if custom_id not in open_ids:
                charged[str(event["q"])] = charged.get(str(event["q"]), 0.0) + float(event.get("usd") or 0.0)
        self.total = BudgetGuard(max(self.budget_usd, 0.0), spent_usd=sum(charged.values()))
        self.tenants = tenant_guards(self.tenant_budgets_usd, self.queue, charged)
        for job in sorted(open_jobs, key=lambda j: j.key):
            for line in job.lines:
                line.held, refused = await self._hold(line)
                if refused is not None:  # the round's budget shrank between runs: the job is out already
                    log.warning("batch.resume_over_budget", job=job.key, call=line.custom_id, error=refused)
        fresh = [
            line for custom_id, line in lines.items() if custom_id not in in_jobs and custom_id not in called
        ]
        self._taken = {j.key for j in jobs.values()}
        new = await self._new_jobs(fresh, self._taken)
        return open_jobs + new

    async def _hold(self, line: Line) -> tuple[list[tuple[BudgetGuard, Reservation]], str | None]:
        guards = [("total budget", self.total)]
        if line.tenant in self.tenants:
            guards.insert(0, (f"tenant {line.tenant!r} budget", self.tenants[line.tenant]))
        held, refused = await hold(guards, line.reserve_usd, wait=False)
        if refused is None:
            return held, None
        name, guard = refused
        model = line.request.model
        left = guard.budget_usd - guard.spent_usd - guard.reserved_usd
        return [], f"{model}: {name}: {model} needs up to {line.reserve_usd:.6g} USD by batch, {left:.6g} USD left"

    async def _new_jobs(self, fresh: list[Line], taken: set[str]) -> list[Job]:
        """Reserve each line (refused ones are never sent) and pack the rest, per model, into jobs within
        the provider's limits."""
        by_model: dict[str, list[Line]] = {}
        for line in fresh:
            held, refused = await self._hold(line) if line.reserve_usd is not None else ([], "no cost bound")
            if refused is not None:
                self.refused.append((line, refused))
                continue
            line.held = held
            by_model.setdefault(line.request.model, []).append(line)
        jobs = []
        for model in sorted(by_model):
            current: list[Line] = []
            size = 0
            for line in by_model[model]:
                encoded = len(self._encode(line))
                if current and (len(current) >= self.max_lines or size + encoded > self.max_bytes):
                    jobs.append(self._job(model, current, taken))
                    current, size = [], 0
                current.append(line)
                size += encoded
            if current:
                jobs.append(self._job(model, current, taken))
        return jobs

    def _job(self, model: str, lines: list[Line], taken: set[str]) -> Job:
        n = 0
        while f"{_safe(model)}-{n:04d}" in taken:
            n += 1
        job = Job(f"{_safe(model)}-{n:04d}", model, lines, new=True)
        taken.add(job.key)
        return job

    def _encode(self, line: Line) -> bytes:
        body = {"custom_id": line.custom_id, "method": "POST", "url": ENDPOINT, "body": self.backend.body(line.request)}
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    def _input_uri(self, job: Job) -> str:
        return join(self.out_uri, "jobs", f"{job.key}.jsonl")

    def _input(self, job: Job) -> bytes:
        return self.storage.read_bytes(self._input_uri(job))

    def _tag(self, job: Job) -> str:
        return f"{self.run_id}/{job.key}"

    async def _mark(self, job: Job, state: str, **extra: Any) -> None:
        job.state = state
        await self.ledger.append_durable({"e": "j", "job": job.key, "m": job.model, "st": state, **extra})

    # -- one job's life ---------------------------------------------------------------------------------
    async def _drive(self, job: Job) -> float:
        """Take ``job`` from where the ledger left it to downloaded (or failed); returns what it charged."""
        if job.new:  # a file left by a run killed before its intent is overwritten: that job never was
            data = b"".join(self._encode(line) for line in job.lines)
            self.storage.write_bytes(self._input_uri(job), data)
            digest = hashlib.sha256(data).hexdigest()[:16]
            reserved = sum(line.reserve_usd for line in job.lines)
            await self._mark(job, "intent", n=len(job.lines), r=reserved, sha=digest)
            job.new = False
        if job.state == "intent":
            if self._past_deadline():
                return await self._release(job, Status.TIMEOUT, "the deadline passed before the job was submitted")
            try:
                filename = f"batchplan-{self.run_id}-{job.key}.jsonl"
                file_id = await self._api.find_file(filename) or await self._api.upload(filename, self._input(job))
            except BatchAPIError as error:
                return await self._release(job, Status.SERVER_ERROR, f"batch upload failed: {error}")
            job.file_id = file_id
            await self._mark(job, "uploaded", file=file_id)
        if job.state == "uploaded":
            if self._past_deadline():
                return await self._release(job, Status.TIMEOUT, "the deadline passed before the batch was created")
            assert job.file_id is not None
            try:
                batch = await self._api.find_batch(self._tag(job)) or await self._api.create(job.file_id, self._tag(job))
            except BatchAPIError as error:
                if error.transient:
                    raise  # it may exist: only a rerun that finds it (or finds none) may go on
                return await self._release(job, Status.CLIENT_ERROR, f"batch create refused: {error}")
            job.batch_id = str(batch["id"])
            await self._mark(job, "created", batch=job.batch_id, url=self._api.base_url)
        if job.state == "created":
            job.batch = await self._wait(job)
            keep = ("status", "output_file_id", "error_file_id", "request_counts", "errors")
            await self._mark(job, "completed", b={k: job.batch.get(k) for k in keep})
        return await self._download(job)

    async def _wait(self, job: Job) -> dict[str, Any]:
        """Poll until the batch is terminal; past the deadline cancel it, and past the grace leave it."""
        assert job.batch_id is not None
        cancelled_at: float | None = None
        batch: dict[str, Any] = {"status": "unknown"}
        while True:
            try:
                batch = await self._api.retrieve(job.batch_id)
            except BatchAPIError as error:
                if not error.transient:  # the provider does not know the batch (any more): its lines are lost
                    return {"status": "abandoned", "why": str(error)}
                log.warning("batch.poll_failed", job=job.key, error=str(error))
            if batch.get("status") in TERMINAL:
                return batch
            if cancelled_at is None and self._past_deadline():
                cancelled_at = time.time()
                try:
                    await self._api.cancel(job.batch_id)
                except BatchAPIError as error:
                    log.warning("batch.cancel_failed", job=job.key, error=str(error))
            if cancelled_at is not None and time.time() > cancelled_at + self.cancel_grace_s:
                return {**batch, "status": "abandoned"}
            self._renew()
            await asyncio.sleep(self.poll_s)

    async def _download(self, job: Job) -> float:
        """Every line's outcome into the ledger, each reservation settled (or released)."""
        batch = job.batch
        outcomes: dict[str, dict[str, Any]] = {}
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                for raw in (await self._api.content(str(batch[key]))).splitlines():
                    if raw.strip():
                        record = json.loads(raw)
                        outcomes.setdefault(str(record.get("custom_id")), record)
        status = str(batch.get("status"))
        charged = 0.0
        statuses: Counter[str] = Counter()
        for line in job.lines:
            event = self.called.get(line.custom_id)
            if event is None:  # not yet in the ledger (a download cut short leaves some in)
                result = self._outcome(line, outcomes.get(line.custom_id), status, batch)
                usd = result.cost_usd if result.billed_known else max(line.reserve_usd, result.cost_usd)
                event = _to_event(line.query_id, line.call, result, usd, "batch") | {"job": job.key}
                self.ledger.append(event)
            usd = float(event.get("usd") or 0.0)
            for guard, reservation in line.held:
                await guard.settle(reservation, usd)
            line.held = []
            charged += usd
            statuses[str(event.get("s"))] += 1
        await self._mark(job, "downloaded")
        log.info(
            "batch.job",
            job=job.key,
            batch=job.batch_id,
            status=status,
            lines=len(job.lines),
            charged_usd=round(charged, 6),
            calls=dict(statuses),
        )
        return charged

    def _outcome(self, line: Line, record: dict[str, Any] | None, status: str, batch: dict[str, Any]) -> CallResult:
        model = line.request.model
        if record is None:
            if status == "completed" or status == "abandoned":  # may yet be billed: charged its reservation
                return CallResult(model, LOST, reason=f"batch {status} without this line", billed_known=False)
            if status == "failed":
                errors = (batch.get("errors") or {}).get("data") or []
                why = "; ".join(str(e.get("message") or e.get("code")) for e in errors[:3]) or "batch failed"
                return CallResult(model, Status.CLIENT_ERROR, reason=f"batch failed validation: {why}")
            return CallResult(model, Status.TIMEOUT, reason=f"batch {status} before this line ran")
        response = record.get("response")
        if isinstance(response, dict) and response.get("status_code") == 200 and isinstance(response.get("body"), dict):
            body = response["body"]
            result = self.backend._parse(line.request, json.dumps(body).encode(), latency=0.0)
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            reported = self.backend.use_reported_cost and isinstance(usage.get("cost"), int | float)
            if not reported and result.billed_known:  # usage x list price: the batch price is a share of it
                result.cost_usd *= self.discount(model)
            result.latency_ms = None
            return result
        error: dict[str, Any] = record["error"] if isinstance(record.get("error"), dict) else {}
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            code = int(response["status_code"])
            kind = (
                Status.RATE_LIMITED
                if code == 429
                else Status.TIMEOUT
                if code in (408, 504)
                else Status.SERVER_ERROR
                if code >= 500
                else Status.UNAVAILABLE
                if code == 404
                else Status.CLIENT_ERROR
            )
            body = response.get("body")
            return CallResult(model, kind, reason=f"batch line HTTP {code}: {_error_message(json.dumps(body).encode())}")
        name = str(error.get("code") or "")
        kind = Status.TIMEOUT if name in ("batch_expired", "batch_cancelled") else Status.SERVER_ERROR
        return CallResult(model, kind, reason=f"batch line {name or 'error'}: {error.get('message') or ''}".strip())

    async def _release(self, job: Job, status: str, reason: str) -> float:
        """A job that never ran: each line recorded with ``status``, charged nothing, its reservation freed."""
        for line in job.lines:
            if line.custom_id not in self.called:
                result = CallResult(line.request.model, status, reason=reason)
                self.ledger.append(_to_event(line.query_id, line.call, result, 0.0, "batch") | {"job": job.key})
            for guard, reservation in line.held:
                await guard.release(reservation)
            line.held = []
        await self._mark(job, "failed", why=reason)
        log.info("batch.job", job=job.key, status="failed", lines=len(job.lines), error=reason)
        return 0.0

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _check_not_cancelled(self) -> None:
        if self.cancel_marker and not self.resume_cancelled and self.storage.exists(self.cancel_marker):
            raise RunCancelled(
                f"{self.cancel_marker.rsplit('/', 1)[0]} was cancelled (batchplan cancel): no new batch is submitted; "
                "rerun with --resume-cancelled to submit again"
            )

    def _renew(self) -> None:
        if time.monotonic() - self._renewed > 10.0:
            self.lease.renew()
            self._renewed = time.monotonic()


# --- batchplan cancel RUN_DIR ----------------------------------------------------------------------------


def open_jobs(storage: Storage, run_uri: str) -> list[dict[str, Any]]:
    """Every batch of the run under ``run_uri`` that was created and not yet seen finished: its ledger
    directory, job, batch id and endpoint (from the job's ``created`` event)."""
    dirs = sorted({uri.rsplit("/ledger/", 1)[0] for uri in storage.list(run_uri) if "/ledger/" in uri})
    found = []
    for here in dirs:
        last: dict[str, dict[str, Any]] = {}
        created: dict[str, dict[str, Any]] = {}
        for event in ledger_events(storage, here):
            if event.get("e") == "j":
                last[str(event["job"])] = event
                if event.get("st") == "created":
                    created[str(event["job"])] = event
        for job, event in last.items():
            if event.get("st") == "created":
                found.append({"dir": here, "job": job, "batch": created[job]["batch"], "url": created[job].get("url")})
    return found


def cancel_run(
    storage: Storage, run_uri: str, *, api_key_env: str | None = "OPENAI_API_KEY", airflow_conn_id: str | None = None
) -> list[dict[str, Any]]:
    """Mark the run cancelled (first: a rerun then submits nothing new unless asked) and cancel each of its
    open batches at its provider; returns them with the status the provider answered."""
    storage.write_text(
        join(run_uri, CANCELLED_MARKER), json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    )
    jobs = open_jobs(storage, run_uri)
    key, _ = secret_from(api_key_env, airflow_conn_id)

    async def cancel_all() -> None:
        for job in jobs:
            api = OpenAIBatchAPI(str(job["url"]), key.value if key else None)
            try:
                job["status"] = (await api.cancel(str(job["batch"]))).get("status")
            except BatchAPIError as error:
                job["status"], job["error"] = "unknown", str(error)
            finally:
                await api.aclose()

    asyncio.run(cancel_all())
    log.info("batch.cancel", run=run_uri, batches=len(jobs), statuses=[j.get("status") for j in jobs])
    return jobs
