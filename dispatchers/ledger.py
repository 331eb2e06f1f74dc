"""Exactly-once bookkeeping under ``out_uri``: the call ledger, result parts and the manifest.

Layout (local directory or ``s3://bucket/prefix``)::

    out_uri/
      run.json                          run_id (idempotency keys derive from it), created_at; written once
      ledger/<writer>.jsonl             local: one line appended per event, as it happens (os.write)
      ledger/<writer>-<seq>.jsonl       S3: the same lines in segments, flushed every N events / T seconds
      results/part-<writer>-<seq>.parquet   RESULT_SCHEMA rows of finished queries, written atomically
      manifest.json                     the committed parts, counts and spend; rewritten after each part
      lock.json                         the live writer's lease (host, pid, heartbeat); removed at the end

Ledger events, one JSON object per line, keyed by (``q`` query_id, ``c`` call):

- intent ``{"e": "i", "q", "c", "m", "r"}``: a call is about to be sent, ``r`` USD reserved for it;
- call ``{"e": "c", "q", "c", "m", "s", "a", "raw", "why", "usd", "bk", "lp", "ti", "to", "role"}``: it
  completed with status ``s``; ``usd`` is what it is charged (billed, or the reservation when ``bk`` is
  false because the bill is unknown, e.g. a timeout).

``call`` is ``"<slot>:<model>:<attempt>"``: the plan step, the model sent to, the retry number. It is the
same on every rerun, so a rerun finds what was already paid for and never pays for it again.

Durability: an intent is durable before its call is sent. Locally each line is one ``os.write`` (in the
kernel once it returns: it survives kill -9). On S3 lines are buffered and written as segments; a call's
intent waits for a group commit (every ``group_commit_s``, one PUT for every call waiting) before the call
is sent, and completions ride along with the next segment. So after any crash every call that may have
been billed has a durable intent: a rerun either resends it under the same idempotency key (endpoints
that honour keys: no second bill) or charges it its reservation (``lost``).

A writer id is fresh per process, so two runs never append to the same file; a torn last line (kill -9
mid-write) is skipped on read.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from batchplan.core.contracts import RESULT_SCHEMA, conform
from batchplan.core.errors import UserError
from batchplan.core.storage import NotFound, Storage, is_s3, join

FINAL_STATUSES = frozenset({"done", "failed"})


def new_writer_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class PriorCalls:
    """What the ledger already holds for one query."""

    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # call id -> call event
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)  # call id -> intent with no call event

    @property
    def charged_usd(self) -> float:
        return sum(float(c.get("usd") or 0.0) for c in self.calls.values())


class Ledger:
    def __init__(
        self,
        storage: Storage,
        out_uri: str,
        writer_id: str,
        *,
        flush_events: int = 2_000,
        flush_seconds: float = 1.0,
        group_commit_s: float = 0.02,
    ) -> None:
        self.storage = storage
        self.out_uri = out_uri
        self.writer_id = writer_id
        self.dir = join(out_uri, "ledger")
        self._s3 = is_s3(out_uri)
        self._flush_events = flush_events
        self._flush_seconds = flush_seconds
        self._buffer: list[bytes] = []
        self._last_flush = time.monotonic()
        self._segment = 0
        self._group_commit_s = group_commit_s
        self._group: asyncio.Future[None] | None = None
        self._fd: int | None = None
        if not self._s3:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            self._fd = os.open(join(self.dir, f"{writer_id}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # -- write ----------------------------------------------------------------------------------------
    def append(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        if self._fd is not None:
            os.write(self._fd, line)  # in the kernel's page cache once this returns: survives kill -9
            return
        self._buffer.append(line)
        if len(self._buffer) >= self._flush_events or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    async def append_durable(self, event: dict[str, Any]) -> None:
        """Append ``event`` and return once it is durable (S3: after the next group commit)."""
        self.append(event)
        if self._fd is not None:
            return
        if self._group is None:
            loop = asyncio.get_running_loop()
            self._group = loop.create_future()
            loop.call_later(self._group_commit_s, lambda: loop.create_task(self._group_commit()))
        await asyncio.shield(self._group)

    async def _group_commit(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        try:
            uri, data = self._take_segment()
            if data:
                await asyncio.to_thread(self.storage.write_bytes, uri, data)
        except Exception as error:
            group.set_exception(error)
        else:
            group.set_result(None)

    def _take_segment(self) -> tuple[str, bytes]:
        uri = join(self.dir, f"{self.writer_id}-{self._segment:06d}.jsonl")
        data = b"".join(self._buffer)
        if data:
            self._segment += 1
        self._buffer.clear()
        self._last_flush = time.monotonic()
        return uri, data

    def flush(self) -> None:
        if self._fd is not None:
            return
        uri, data = self._take_segment()
        if data:
            self.storage.write_bytes(uri, data)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    # -- read -----------------------------------------------------------------------------------------
    def load(self, skip: set[str] | frozenset[str] = frozenset()) -> tuple[dict[str, PriorCalls], dict[str, float]]:
        """Prior calls and dangling intents of every query not in ``skip`` (already final), and what every
        call in the ledger charged, per query (all queries): the spend a rerun starts from."""
        prior: dict[str, PriorCalls] = {}
        seen: set[tuple[str, str]] = set()
        charged: dict[str, float] = {}
        for event in self.events():
            q = event.get("q")
            if not isinstance(q, str):
                continue
            call = str(event.get("c"))
            if event.get("e") == "c" and (q, call) not in seen:
                seen.add((q, call))
                charged[q] = charged.get(q, 0.0) + float(event.get("usd") or 0.0)
            if q in skip:
                continue
            entry = prior.setdefault(q, PriorCalls())
            if event.get("e") == "c":
                entry.calls.setdefault(call, event)
                entry.intents.pop(call, None)
            elif event.get("e") == "i" and call not in entry.calls:
                entry.intents[call] = event
        return prior, charged

    def events(self) -> Iterable[dict[str, Any]]:
        return ledger_events(self.storage, self.out_uri)


def ledger_events(storage: Storage, out_uri: str) -> Iterable[dict[str, Any]]:
    """Every event in ``out_uri``'s ledger, as written (a call appended twice by a resumed run appears
    twice: readers keep the first per (query, call))."""
    for uri in storage.list(join(out_uri, "ledger")):
        if uri.endswith(".jsonl"):
            yield from _events(storage.read_bytes(uri))


def call_events(storage: Storage, out_uri: str) -> Iterable[dict[str, Any]]:
    """Every completed call in ``out_uri``'s ledger once: the first event per (query, call), as readers keep
    it (a resumed run that found a call may append it again)."""
    seen: set[tuple[str, str]] = set()
    for event in ledger_events(storage, out_uri):
        key = (str(event.get("q")), str(event.get("c")))
        if event.get("e") != "c" or key in seen:
            continue
        seen.add(key)
        yield event


def _events(data: bytes) -> Iterable[dict[str, Any]]:
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill mid-write: that event never happened
        if isinstance(event, dict):
            yield event


# --- run identity, result parts and the manifest ---------------------------------------------------------


def run_identity(storage: Storage, out_uri: str) -> dict[str, Any]:
    """The run's identity, created once (put_if_absent) and read back on every rerun."""
    uri = join(out_uri, "run.json")
    candidate = {"run_id": uuid.uuid4().hex, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.put_if_absent(uri, json.dumps(candidate).encode())
    return dict(json.loads(storage.read_bytes(uri)))


class ResultWriter:
    """Buffers finished rows and commits them as parquet parts listed in ``manifest.json``.

    A part is visible only once the manifest names it: a part written just before a kill is ignored (its
    queries are redone from the ledger, without calling again).
    """

    def __init__(
        self, storage: Storage, out_uri: str, writer_id: str, *, part_rows: int = 5_000, part_seconds: float = 5.0
    ) -> None:
        self.storage = storage
        self.out_uri = out_uri
        self.writer_id = writer_id
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.manifest = read_manifest(storage, out_uri)
        self._rows: list[tuple[Any, ...]] = []
        self._seq = 0
        self._last = time.monotonic()

    def add(self, row: tuple[Any, ...]) -> bool:
        """Buffer one RESULT_SCHEMA row; True when the buffer is due for a commit."""
        self._rows.append(row)
        return len(self._rows) >= self.part_rows or time.monotonic() - self._last >= self.part_seconds

    def commit(self, ledger: Ledger, extra: dict[str, Any]) -> None:
        """Flush the ledger, write the part, then the manifest that names it (in that order)."""
        ledger.flush()
        if self._rows:
            columns = dict(zip(RESULT_SCHEMA.names(), zip(*self._rows, strict=True), strict=True))
            frame = pl.DataFrame({name: list(values) for name, values in columns.items()}, schema=RESULT_SCHEMA)
            name = f"part-{self.writer_id}-{self._seq:05d}.parquet"
            self.storage.write_frame(frame, join(self.out_uri, "results", name))
            self._seq += 1
            self.manifest.setdefault("parts", []).append({"name": name, "rows": frame.height})
            self._rows.clear()
        self.manifest.update(extra)
        self.manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.storage.write_bytes(join(self.out_uri, "manifest.json"), json.dumps(self.manifest, indent=1).encode())
        self._last = time.monotonic()


def read_manifest(storage: Storage, out_uri: str) -> dict[str, Any]:
    uri = join(out_uri, "manifest.json")
    try:
        return dict(json.loads(storage.read_bytes(uri)))
    except NotFound:  # nothing committed yet; any other storage error must stop the run, not restart it
        return {"parts": [], "complete": False}


def read_results(out_uri: str, storage: Storage | None = None) -> pl.DataFrame:
    """Every committed result row under ``out_uri`` (the latest row per query wins), RESULT_SCHEMA."""
    storage = storage or Storage()
    manifest = read_manifest(storage, out_uri)
    # conformed: parts written by an older version lack the columns added since (``note``)
    frames = [
        conform(storage.read_frame(join(out_uri, "results", part["name"])), RESULT_SCHEMA, name=part["name"])
        for part in manifest.get("parts", [])
    ]
    if not frames:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    frame = pl.concat(frames, rechunk=False)
    if frame["query_id"].is_duplicated().any():  # a deferred query redone by a later run: the later row wins
        frame = frame.unique("query_id", keep="last", maintain_order=True)
    return frame


def spend_by_model(storage: Storage, out_uri: str) -> dict[str, float]:
    """What every call in the ledger under ``out_uri`` charged, summed per model (a cascade's calls each to
    its own model; a call recorded twice, once per rerun that found it, counts once)."""
    spend: dict[str, float] = {}
    for event in call_events(storage, out_uri):
        model = str(event.get("m"))
        spend[model] = spend.get(model, 0.0) + float(event.get("usd") or 0.0)
    return spend


class RunLocked(UserError, RuntimeError):
    """Another live process is dispatching into the same out_uri."""


def _alive(pid: int) -> bool:
    """Is process ``pid`` running? A zombie is not: a process killed in a container without an init (or
    whose parent never waits) stays in the table as state 'Z' until reaped, and ``kill(pid, 0)`` succeeds
    on it. Where /proc is missing (macOS), existence is all there is to go on."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()  # /proc present but no entry: it just exited
    except OSError:
        return True
    # state is the field after the command name, which is in parentheses and may hold spaces or ')'
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] not in {"Z", "X"}


class Lease:
    """One writer per ``out_uri``: two processes on one ledger would both pay for the same calls.

    Taken with ``put_if_absent``; renewed by a heartbeat; a lease is stale (taken over) when its process
    is gone (same host, pid no longer alive: e.g. kill -9, or a zombie nobody reaped) or its heartbeat is
    older than ``ttl_s``.
    """

    def __init__(self, storage: Storage, out_uri: str, writer_id: str, ttl_s: float = 60.0) -> None:
        self.storage = storage
        self.uri = join(out_uri, "lock.json")
        self.writer_id = writer_id
        self.ttl_s = ttl_s

    def _body(self) -> bytes:
        return json.dumps(
            {"writer": self.writer_id, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
        ).encode()

    def acquire(self) -> None:
        if self.storage.put_if_absent(self.uri, self._body()):
            return
        try:
            holder = json.loads(self.storage.read_bytes(self.uri))
        except (NotFound, json.JSONDecodeError):
            holder = {}
        if holder and not self._stale(holder):
            age = time.time() - float(holder.get("at", 0))
            raise RunLocked(
                f"{self.uri.rsplit('/', 1)[0]} is being dispatched by pid {holder.get('pid')} on {holder.get('host')} "
                f"(heartbeat {age:.0f}s ago): wait for it, or delete lock.json if that process is gone"
            )
        self.storage.write_bytes(self.uri, self._body())

    def _stale(self, holder: dict[str, Any]) -> bool:
        if time.time() - float(holder.get("at", 0)) > self.ttl_s:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                return not _alive(int(holder.get("pid", -1)))
            except (ValueError, OverflowError):
                return False
        return False

    def renew(self) -> None:
        self.storage.write_bytes(self.uri, self._body())

    def release(self) -> None:
        self.storage.delete(self.uri)
