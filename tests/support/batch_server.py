"""A local OpenAI Files + Batches API server that answers each batch line from an outcome history, with faults.

For tests and benchmarks: it listens on 127.0.0.1 only and speaks the routes the OpenAI Batch API has
(multipart ``POST /v1/files`` with ``purpose=batch``, ``GET /v1/files``, ``GET /v1/files/{id}`` and
``/content``, ``POST /v1/batches``, ``GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST
/v1/batches/{id}/cancel``), and everything ``ReplayServer`` speaks besides (``POST /v1/chat/completions``
for the real-time calls of the same run). Each line is answered by ``ReplayServer.answer``, the same
answer and usage as a real-time call, and billed at ``batch_discount`` (50%) of the recorded cost, once,
when its batch finishes; ``usage.cost`` in the output reports that discounted bill.

A batch goes ``validating`` -> ``in_progress`` (lines finish evenly over ``run_s``; ``request_counts``
follow) -> ``finalizing`` -> ``completed``, by the wall clock, evaluated whenever it is asked about.
Faults (``BatchFaults``): per-line failures (into the error file, never billed), a batch that expires
after a share of its lines (the rest: ``batch_expired`` in the error file, what finished is billed), failed
uploads (500), slow answers to status, upload, create and content requests (so a test can kill a client in
each), and limits (lines and bytes per file, one model per file: else the batch ``failed`` validation).

``GET /stats`` is the bill (``ReplayServer.stats``) plus every batch created (``batches``) and the lines
submitted in more than one batch (``submitted_twice``), so tests can assert no job was submitted twice.

    python -m tests.support.batch_server --history ../shared/data/cascades --port 8766 --run-s 2
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from batchplan.core.history import History
from tests.support.replay_server import (
    ReplayServer,
    _error,
    _Protocol,
    fault_draw,
    serve_until_interrupted,
    served_history,
    server_parser,
)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ENDPOINT = "/v1/chat/completions"


@dataclass
class BatchFaults:
    validate_s: float = 0.05  # validating -> in_progress
    run_s: float = 0.2  # in_progress: lines finish evenly over this time
    finalize_s: float = 0.05
    cancel_s: float = 0.05  # cancelling -> cancelled
    line_error_rate: float = 0.0  # share of lines answered with line_error_status (error file, not billed)
    line_error_status: int = 500
    expire_after: float | None = None  # the batch expires once this share of its lines is done (0.5: half)
    fail_uploads: int = 0  # the next N uploads answer 500
    status_delay_s: float = 0.0  # GET /v1/batches/{id} answers this late ("slow status")
    upload_delay_s: float = 0.0  # the file is stored at once, its id answered this late
    create_delay_s: float = 0.0  # the batch is created at once, its id answered this late
    content_delay_s: float = 0.0  # file contents answered this late
    max_lines: int = 50_000  # the provider's limits per input file
    max_bytes: int = 200 * 1024 * 1024
    batch_discount: float = 0.5  # the batch price as a share of the recorded (on-demand) cost
    seed: int = 0


@dataclass
class _Batch:
    id: str
    input_file_id: str
    metadata: dict[str, Any]
    lines: list[dict[str, Any]]
    created: float  # time.time()
    model: str | None
    errors: list[dict[str, Any]] = field(default_factory=list)
    status: str = "validating"
    cancel_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    finished_at: float | None = None


class BatchServer(ReplayServer):
    def __init__(
        self,
        history: History,
        faults: BatchFaults | None = None,
        port: int = 0,
        aliases: dict[str, str] | None = None,
    ) -> None:
        super().__init__(history, port=port, aliases=aliases)
        self.batch_faults = faults or BatchFaults()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.calls: Counter[str] = Counter()  # route -> requests (uploads, creates, retrieves, contents)
        self._submissions: Counter[str] = Counter()  # custom_id -> batches created with it
        # the same call under any run id -> batches that held it: what a fault draw is keyed by, so that a
        # test's faults do not change with the run id (new for every output folder)
        self._sends: Counter[str] = Counter()
        self._query_ids = set(history.queries["query_id"].to_list())

    # -- the bill and the record ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        with self._lock:
            submitted: Counter[str] = Counter()
            for batch in self.batches.values():
                submitted.update({str(line.get("custom_id")) for line in batch.lines})
            stats["batches"] = [
                {
                    "id": b.id,
                    "input_file_id": b.input_file_id,
                    "model": b.model,
                    "lines": len(b.lines),
                    "status": b.status,
                    "metadata": b.metadata,
                    "request_counts": dict(b.counts),
                }
                for b in self.batches.values()
            ]
            stats["submitted_twice"] = sorted(c for c, n in submitted.items() if n > 1)
            stats["files"] = len(self.files)
            stats["routes"] = dict(self.calls)
        return stats

    # -- routes -----------------------------------------------------------------------------------------
    def handle(self, proto: _Protocol, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        route = path.rstrip("/")
        parts = route.split("/")
        if not route.startswith("/v1/files") and not route.startswith("/v1/batches"):
            return super().handle(proto, method, path, headers, body)
        with self._lock:
            self.requests += 1
            if headers.get("authorization", "").startswith("Bearer "):
                self.authorized += 1  # counted, never stored (as the real-time routes)
        faults = self.batch_faults
        if method == "POST" and route == "/v1/files":
            return self._upload(proto, headers, body)
        if method == "GET" and route == "/v1/files":
            return self._json(proto, 200, {"object": "list", "data": list(self.files.values()), "has_more": False})
        if method == "GET" and len(parts) == 4 and parts[2] == "files":
            found = self.files.get(parts[3])
            return self._json(proto, 200, found) if found else self._missing(proto, "file", parts[3])
        if method == "GET" and len(parts) == 5 and parts[2] == "files" and parts[4] == "content":
            self._count_route("content")
            if parts[3] not in self.contents:
                return self._missing(proto, "file", parts[3])
            data = self.contents[parts[3]]
            return self._later(faults.content_delay_s, lambda: proto.respond(200, data))
        if method == "POST" and route == "/v1/batches":
            return self._create(proto, body)
        if method == "GET" and route == "/v1/batches":
            now = time.time()
            data = [self._advance(b, now) for b in self.batches.values()]
            return self._json(proto, 200, {"object": "list", "data": data, "has_more": False})
        if method == "GET" and len(parts) == 4 and parts[2] == "batches":
            self._count_route("retrieve")
            batch = self.batches.get(parts[3])
            if batch is None:
                return self._missing(proto, "batch", parts[3])
            return self._later(faults.status_delay_s, lambda: self._json(proto, 200, self._advance(batch, time.time())))
        if method == "POST" and len(parts) == 5 and parts[2] == "batches" and parts[4] == "cancel":
            self._count_route("cancel")
            batch = self.batches.get(parts[3])
            if batch is None:
                return self._missing(proto, "batch", parts[3])
            now = time.time()
            self._advance(batch, now)
            if batch.status not in TERMINAL and batch.cancel_at is None:
                batch.cancel_at = now
            return self._json(proto, 200, self._advance(batch, now))
        return proto.respond(404, _error("not found", "invalid_request_error"))

    def _upload(self, proto: _Protocol, headers: dict[str, str], body: bytes) -> None:
        self._count_route("upload")
        faults = self.batch_faults
        if faults.fail_uploads > 0:
            faults.fail_uploads -= 1
            return proto.respond(500, _error("upload failed", "server_error"))
        form = _multipart(headers.get("content-type", ""), body)
        if form is None or "file" not in form or form.get("purpose", (None, b""))[1] != b"batch":
            return proto.respond(400, _error("multipart form with purpose=batch and a file expected", "invalid_request_error"))
        filename, data = form["file"]
        if len(data) > faults.max_bytes:
            return proto.respond(400, _error(f"file is {len(data)} bytes, over {faults.max_bytes}", "invalid_request_error"))
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = _file_object(file_id, filename or "upload.jsonl", len(data), "batch")
        self.contents[file_id] = data
        return self._later(faults.upload_delay_s, lambda: self._json(proto, 200, self.files[file_id]))

    def _create(self, proto: _Protocol, body: bytes) -> None:
        self._count_route("create")
        try:
            request = json.loads(body)
            file_id = str(request["input_file_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            return proto.respond(400, _error("input_file_id expected", "invalid_request_error"))
        if request.get("endpoint") != ENDPOINT or request.get("completion_window") != "24h":
            return proto.respond(
                400, _error(f"endpoint must be {ENDPOINT} and completion_window 24h", "invalid_request_error")
            )
        if file_id not in self.contents:
            return self._missing(proto, "file", file_id)
        lines, errors = _parse_input(self.contents[file_id], self.batch_faults.max_lines)
        models = {str(line.get("body", {}).get("model")) for line in lines}
        if len(models) > 1:
            errors.append({"code": "mixed_models", "message": f"one model per file, got {sorted(models)}"})
        batch = _Batch(
            id=f"batch_{uuid.uuid4().hex[:24]}",
            input_file_id=file_id,
            metadata=dict(request.get("metadata") or {}),
            lines=lines,
            created=time.time(),
            model=next(iter(models)) if len(models) == 1 else None,
            errors=errors,
        )
        batch.counts["total"] = len(lines)
        with self._lock:
            self.batches[batch.id] = batch
            self._submissions.update(str(line.get("custom_id")) for line in lines)
            self._sends.update(_call_of(str(line.get("custom_id"))) for line in lines)
        obj = self._advance(batch, batch.created)
        return self._later(self.batch_faults.create_delay_s, lambda: self._json(proto, 200, obj))

    # -- a batch's life ---------------------------------------------------------------------------------
    def _advance(self, b: _Batch, now: float) -> dict[str, Any]:
        """Move ``b`` to where the clock says it is (finishing it on the way) and return it as the API does."""
        f = self.batch_faults
        if b.status not in TERMINAL:
            n = len(b.lines)
            running = now - b.created - f.validate_s
            share = min(max(running / f.run_s, 0.0), 1.0) if f.run_s > 0 else float(running >= 0)
            if b.errors:
                self._finish(b, "failed", 0, "")
            elif b.cancel_at is not None:
                at = min(max((b.cancel_at - b.created - f.validate_s) / max(f.run_s, 1e-9), 0.0), 1.0)
                if now >= b.cancel_at + f.cancel_s:
                    self._finish(b, "cancelled", int(at * n), "batch_cancelled")
                else:
                    b.status = "cancelling"
            elif f.expire_after is not None and share >= f.expire_after:
                self._finish(b, "expired", int(f.expire_after * n), "batch_expired")
            elif running < 0:
                b.status = "validating"
            elif share < 1.0:
                b.status = "in_progress"
                b.counts["completed"] = int(share * n)
            elif now < b.created + f.validate_s + f.run_s + f.finalize_s:
                b.status = "finalizing"
                b.counts["completed"] = n
            else:
                self._finish(b, "completed", n, "")
        return _batch_object(b)

    def _finish(self, b: _Batch, status: str, done: int, rest_code: str) -> None:
        """Answer and bill the first ``done`` lines, put the rest in the error file with ``rest_code``."""
        f = self.batch_faults
        out: list[bytes] = []
        errors: list[bytes] = []
        completed = failed = 0
        for i, line in enumerate(b.lines):
            custom_id = line.get("custom_id")
            if i >= done:
                if rest_code:
                    message = "the batch ended before this request ran"
                    errors.append(_line(custom_id, None, {"code": rest_code, "message": message}))
                    failed += 1
                continue
            call = _call_of(str(custom_id))
            # the same call sent again in a later batch draws anew; a run id (new per output folder) draws nothing
            if fault_draw(f.seed, self._sends[call], call) < f.line_error_rate:
                status_code = f.line_error_status
                body = json.loads(_error("line failed", "server_error"))
                errors.append(_line(custom_id, {"status_code": status_code, "body": body}, None))
                failed += 1
                continue
            try:
                query_id, code, payload, cost = self.answer(line["body"], self._query_hint(custom_id))
            except (KeyError, TypeError):
                query_id, code, payload, cost = "", 400, _error("malformed body", "invalid_request_error"), 0.0
            if code != 200:
                errors.append(_line(custom_id, {"status_code": code, "body": json.loads(payload)}, None))
                failed += 1
                continue
            billed = cost * f.batch_discount
            answer = json.loads(payload)
            answer["usage"]["cost"] = billed  # what the provider charged this line: the batch price
            parts = str(custom_id).split("/")  # <run_id>/<query_id or query_id#audit>/<call>
            own = parts[1] if len(parts) >= 3 else None
            self._bill(query_id, str(line["body"].get("model")), billed, f"{b.id}/{custom_id}", payload, own)
            out.append(_line(custom_id, {"status_code": 200, "body": answer}, None))
            completed += 1
        if out:
            b.output_file_id = self._store(f"{b.id}_output.jsonl", b"".join(out))
        if errors:
            b.error_file_id = self._store(f"{b.id}_error.jsonl", b"".join(errors))
        b.counts.update(completed=completed, failed=failed)
        b.status = status
        b.finished_at = time.time()

    def _query_hint(self, custom_id: Any) -> str | None:
        """The query a line is for, from batchplan's custom_id (``<run_id>/<query_id>/<call>``): a batch line
        has no headers, and two queries may share a prompt (what X-Batchplan-Query-Id is for in real time)."""
        parts = str(custom_id).split("/")
        return parts[1] if len(parts) >= 3 and parts[1] in self._query_ids else None

    def _store(self, name: str, data: bytes) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = _file_object(file_id, name, len(data), "batch_output")
        self.contents[file_id] = data
        return file_id

    # -- helpers ----------------------------------------------------------------------------------------
    def _json(self, proto: _Protocol, status: int, obj: Any) -> None:
        proto.respond(status, json.dumps(obj).encode())

    def _missing(self, proto: _Protocol, what: str, ident: str) -> None:
        proto.respond(404, _error(f"no such {what}: {ident}", "invalid_request_error"))

    def _later(self, delay: float, send: Callable[[], None]) -> None:
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, send)
        else:
            send()

    def _count_route(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1


def _call_of(custom_id: str) -> str:
    """A custom_id without its run id (``<run_id>/<query_id>/<slot>``): the call, whatever run sent it."""
    return custom_id.split("/", 1)[-1]


def _line(custom_id: Any, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    if response is not None:
        response = {"request_id": f"req_{uuid.uuid4().hex[:16]}", **response}
    record = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(record).encode() + b"\n"


def _parse_input(data: bytes, max_lines: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input file's requests and its validation errors (as the provider lists them)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = json.loads(raw)
            custom_id = str(line["custom_id"])
            valid = line.get("method") == "POST" and line.get("url") == ENDPOINT and isinstance(line.get("body"), dict)
        except (json.JSONDecodeError, KeyError, TypeError):
            errors.append({"code": "invalid_json_line", "line": number, "message": "not a request line"})
            continue
        if not valid:
            errors.append({"code": "invalid_request", "line": number, "message": f"POST {ENDPOINT} with a body"})
        if custom_id in seen:
            errors.append({"code": "duplicate_custom_id", "line": number, "message": custom_id})
        seen.add(custom_id)
        lines.append(line)
    if len(lines) > max_lines:
        errors.append({"code": "too_many_requests", "message": f"{len(lines)} requests, over {max_lines}"})
    return lines, errors


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """name -> (filename, data) of a multipart/form-data body."""
    marker = "boundary="
    if "multipart/form-data" not in content_type or marker not in content_type:
        return None
    boundary = content_type.split(marker, 1)[1].split(";", 1)[0].strip().strip('"').encode()
    form: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary):
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = next(
            (h for h in head.decode("latin-1").split("\r\n") if h.lower().startswith("content-disposition")), ""
        )
        attrs = dict(
            (k.strip(), v.strip().strip('"')) for k, _, v in (a.partition("=") for a in disposition.split(";")[1:])
        )
        if "name" in attrs:
            form[attrs["name"]] = (attrs.get("filename"), data.removesuffix(b"\r\n"))
    return form


def _file_object(file_id: str, name: str, size: int, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": name,
        "purpose": purpose,
        "status": "processed",
    }


def _batch_object(b: _Batch) -> dict[str, Any]:
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "errors": {"object": "list", "data": b.errors} if b.errors else None,
        "input_file_id": b.input_file_id,
        "completion_window": "24h",
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": int(b.created),
        "expires_at": int(b.created) + 86_400,
        "cancelling_at": int(b.cancel_at) if b.cancel_at is not None else None,
        "request_counts": dict(b.counts),
        "metadata": b.metadata,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = server_parser(__doc__)
    for f in fields(BatchFaults):
        kind = int if f.type in ("int", int) else float
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default)
    args = parser.parse_args(argv)
    faults = BatchFaults(**{f.name: getattr(args, f.name) for f in fields(BatchFaults)})
    aliases = dict(a.split("=", 1) for a in args.alias)
    server = BatchServer(served_history(parser, args), faults, port=args.port, aliases=aliases)
    serve_until_interrupted(server, f"batch server ({asdict(faults)})")

if __name__ == "__main__":
    main()
