"""A local OpenAI-compatible chat completions server that answers from an outcome history, with faults.

For tests, the README and benchmarks: it listens on 127.0.0.1 only, answers ``POST /v1/chat/completions``
exactly as the recorded model answered the query (found by the ``X-Batchplan-Query-Id`` header, else by
the prompt text), reports the recorded usage and cost (``usage.cost``, as OpenRouter-style gateways do),
and keeps a server-side bill: one charge per billed call, none for a replayed ``Idempotency-Key``. It honours
``max_tokens``: an answer the history recorded longer is cut there (``finish_reason`` "length", usage and
bill at most max_tokens of output), as a real endpoint does.

Faults are drawn per request with the given rates, each request's draw fixed by its call (query and LLM) and how
many times that call was asked before (``fault_draw``), not by the order requests arrive in, so concurrent
clients meet the same faults on every run: 429 with Retry-After, 500, slow responses, responses
slower than a client's timeout, malformed bodies, connection resets, refusals (billed, not an answer), and
models that are down (503 always). ``GET /stats`` returns the bill; ``POST /admin/faults`` changes faults.

Drift (``--drift``, ``Drift``): a provider that silently changed an LLM. Its calls are answered from a degraded
source while the history (what batchplan trained on) still says it is good: ``LLM=OTHER`` gives OTHER's recorded
answer to the same query (a worse checkpoint behind the same name; the LLM's own usage and bill), ``LLM:-0.2``
turns that share of the queries, of the ones it answered right, wrong (another option; on open tasks another
LLM's wrong answer or none). ``drifted_history`` is what the server answers from (a bench scores against it).

    python -m tests.support.replay_server --history ../shared/data/cascades --port 8765 --fault-429 0.05
    python -m tests.support.replay_server --synthetic 100000 --models 4 --port 8765
    python -m tests.support.replay_server --history ../shared/data/cascades --drift gpt-4o-mini=llama3.2-3b
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import polars as pl

from batchplan.core.contracts import audited_query_id
from batchplan.core.history import History, load_history, stable_fold, synthetic_history

HOST = "127.0.0.1"


@dataclass
class Faults:
    rate_429: float = 0.0
    retry_after_s: float = 0.05
    rate_500: float = 0.0
    rate_slow: float = 0.0
    slow_s: float = 0.05
    rate_timeout: float = 0.0  # a response delayed by timeout_s: longer than the client waits
    timeout_s: float = 2.0
    rate_malformed: float = 0.0  # 200 with a truncated JSON body
    rate_reset: float = 0.0  # the connection is reset (RST) instead of answered
    rate_refusal: float = 0.0  # 200, billed, text is a refusal
    down_models: list[str] = field(default_factory=list)  # always 503
    seed: int = 0


@dataclass(frozen=True)
class Drift:
    """One LLM the provider silently changed (module docstring): its answers come from ``source`` (another LLM's
    recorded answers to the same queries), or ``accuracy_delta`` (< 0) of its accuracy is lost: that share of all
    its answers, drawn from its right ones, turned wrong."""

    model: str
    source: str | None = None
    accuracy_delta: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Drift:
        """``LLM=OTHER`` or ``LLM:-0.2`` (one line naming the flag on anything else: ValueError)."""
        if "=" in text:
            model, source = (part.strip() for part in text.split("=", 1))
            if model and source and model != source:
                return cls(model, source=source)
        elif ":" in text:
            model, delta = text.rsplit(":", 1)
            try:
                value = float(delta)
            except ValueError:
                value = 0.0
            if model.strip() and -1.0 <= value < 0.0:
                return cls(model.strip(), accuracy_delta=value)
        raise ValueError(f"--drift {text!r}: give LLM=OTHER (another LLM's answers) or LLM:-0.2 (accuracy lost, in [-1, 0))")


def drifted_history(history: History, drifts: Sequence[Drift]) -> History:
    """``history`` with each drifted LLM's answers (answer, verdict, logprob) replaced as ``Drift`` says; its
    tokens, cost and latency stay its own (the same price for a worse answer). Queries the source never
    answered keep the LLM's own."""
    outcomes = history.outcomes
    for drift in drifts:
        if drift.model not in set(outcomes["model"].unique().to_list()):
            raise ValueError(f"--drift {drift.model!r}: no such LLM in the history")
        mine = pl.col("model") == drift.model
        if drift.source is not None:
            source = outcomes.filter(pl.col("model") == drift.source).select(
                "query_id", *(pl.col(c).alias(f"_{c}") for c in ("answer", "correct", "logprob"))
            )
            if source.height == 0:
                raise ValueError(f"--drift {drift.model}={drift.source}: no such LLM in the history")
            joined = outcomes.join(source, on="query_id", how="left")
            has = mine & pl.col("_correct").is_not_null()
            outcomes = joined.with_columns(
                *(pl.when(has).then(pl.col(f"_{c}")).otherwise(pl.col(c)).alias(c) for c in ("answer", "correct", "logprob"))
            ).drop("_answer", "_correct", "_logprob")
            continue
        rows = outcomes.filter(mine)
        right = rows.filter(pl.col("correct"))
        share = min(1.0, -drift.accuracy_delta * rows.height / max(right.height, 1))
        keys = right["query_id"].to_list()
        turned = [q for q, f in zip(keys, stable_fold(keys, 10_000, 0, salt=f"drift:{drift.model}"), strict=True) if f < share * 10_000]
        outcomes = outcomes.join(_wrong_answers(history, turned), on="query_id", how="left").with_columns(
            pl.when(mine & pl.col("query_id").is_in(pl.Series(turned, dtype=pl.String).implode()))
            .then(pl.col("_wrong"))
            .otherwise(pl.col("answer"))
            .alias("answer"),
            (pl.col("correct") & ~(mine & pl.col("query_id").is_in(pl.Series(turned, dtype=pl.String).implode()))).alias("correct"),
        ).drop("_wrong")
    return History(queries=history.queries, outcomes=outcomes.select(history.outcomes.columns), prices=history.prices)


def _wrong_answers(history: History, query_ids: list[str]) -> pl.DataFrame:
    """query_id, _wrong: a wrong answer to each query: its first option other than gold (multiple choice), else the
    first wrong answer another LLM gave (open tasks; null where none did)."""
    picked = pl.Series(query_ids, dtype=pl.String).implode()
    queries = history.queries.filter(pl.col("query_id").is_in(picked))
    options = queries.filter(pl.col("labels").is_not_null()).select(
        "query_id", pl.col("labels").list.set_difference(pl.concat_list(pl.col("gold").cast(pl.String))).list.sort().list.first().alias("_wrong")
    )
    given = (
        history.outcomes.filter(pl.col("query_id").is_in(picked) & ~pl.col("correct") & pl.col("answer").is_not_null())
        .sort("query_id", "model")
        .group_by("query_id", maintain_order=True)
        .agg(pl.col("answer").first().alias("_given"))
    )
    return (
        queries.select("query_id")
        .join(options, on="query_id", how="left")
        .join(given, on="query_id", how="left")
        .select("query_id", pl.coalesce("_wrong", "_given").alias("_wrong"))
    )


def prompt_key(system_prompt: str | None, prompt: str) -> str:
    return hashlib.blake2b(f"{system_prompt or ''}\x00{prompt}".encode(), digest_size=12).hexdigest()


def _billed_share(prices: tuple[float, float] | None, tokens_in: int | None, tokens_out: int, cap: int) -> float:
    """The share of a recorded bill an answer cut from ``tokens_out`` to ``cap`` tokens is billed: the list cost
    of the usage sent over the recorded usage's (its tokens in and out at the same per-token rates), or the
    share of the tokens where the prices or the input are unknown."""
    if prices is not None and tokens_in is not None:
        full = tokens_in * prices[0] + tokens_out * prices[1]
        if full > 0:
            return (tokens_in * prices[0] + cap * prices[1]) / full
    return cap / tokens_out


class ReplayServer:
    """Serves one history on 127.0.0.1 from a background thread (``start``/``stop``) or in the foreground."""

    def __init__(
        self,
        history: History,
        faults: Faults | None = None,
        port: int = 0,
        aliases: dict[str, str] | None = None,
        drift: Sequence[Drift] = (),
    ) -> None:
        """``aliases``: provider model names -> the history's model names (as a gateway would name them);
        ``drift``: LLMs answered from a degraded source (``drifted_history``)."""
        history = drifted_history(history, drift) if drift else history
        self.faults = faults or Faults()
        self.aliases = dict(aliases or {})
        self._asked: Counter[str] = Counter()  # call -> requests so far (``fault_draw``'s attempt)
        self._port = port
        rows = history.outcomes.select("query_id", "model", "answer", "cost_usd", "tokens_in", "tokens_out", "logprob")
        self._table: dict[tuple[str, str], tuple[Any, ...]] = {(r[0], r[1]): r[2:] for r in rows.iter_rows()}
        self._by_prompt = {
            prompt_key(s, p): q for q, s, p in history.queries.select("query_id", "system_prompt", "prompt").iter_rows()
        }
        self._models = sorted({m for _, m in self._table})
        # USD per (input, output) token: a cut answer is billed at the rate its recorded bill was (below)
        self._usd = {
            str(m): (float(i) / 1e6, float(o) / 1e6)
            for m, i, o in history.prices.select("model", "usd_per_mtok_in", "usd_per_mtok_out").iter_rows()
            if i is not None and o is not None
        }
        self._idempotent: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.authorized = 0
        self.billed_calls = 0
        self.billed_usd = 0.0
        self.billed_keys: Counter[tuple[str, str]] = Counter()  # (query_id, model) -> number of billed calls
        # (the caller's own id, model): an audit's reference call (<query_id>#audit) is its own call, so the
        # same LLM asked for the plan's answer and for the reference is not a call billed twice
        self.billed_ids: Counter[tuple[str, str]] = Counter()
        self.faults_sent: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._port}/v1"

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Protocol(self), HOST, self._port, backlog=1024)
        self._port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.serve_forever()

    def start(self) -> ReplayServer:
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), name="replay-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("replay server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "authorized": self.authorized,
                "billed_calls": self.billed_calls,
                "billed_usd": self.billed_usd,
                "billed_twice": sorted(f"{q}|{m}" for (q, m), n in self.billed_ids.items() if n > 1),
                "faults": dict(self.faults_sent),
            }

    # -- one request ------------------------------------------------------------------------------------
    def handle(self, proto: _Protocol, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            self.requests += 1
            if headers.get("authorization", "").startswith("Bearer "):
                self.authorized += 1  # counted, never stored
        if method == "GET" and path.rstrip("/") == "/stats":
            return proto.respond(200, json.dumps(self.stats()).encode())
        if method == "GET" and path.rstrip("/") == "/v1/models":
            data = {
                "object": "list",
                "data": [{"id": m, "object": "model", "owned_by": "replay"} for m in self._models],
            }
            return proto.respond(200, json.dumps(data).encode())
        if method == "POST" and path.rstrip("/") == "/admin/faults":
            changes = json.loads(body or b"{}")
            known = {f.name for f in fields(Faults)}
            self.faults = Faults(**{**asdict(self.faults), **{k: v for k, v in changes.items() if k in known}})
            with self._lock:
                self._asked.clear()
            return proto.respond(200, json.dumps(asdict(self.faults)).encode())
        if method != "POST" or path.rstrip("/") != "/v1/chat/completions":
            return proto.respond(404, _error("not found", "invalid_request_error"))
        try:
            request = json.loads(body)
            model = str(request["model"])
            model = self.aliases.get(model, model)
            if not isinstance(request["messages"], list):
                raise TypeError("messages must be a list")
        except (json.JSONDecodeError, KeyError, TypeError):
            return proto.respond(400, _error("malformed request body", "invalid_request_error"))
        key = headers.get("idempotency-key")
        if key is not None and key in self._idempotent:
            self._count("idempotent_replay")
            return proto.respond(200, self._idempotent[key])
        faults = self.faults
        if model in faults.down_models:
            self._count("down")
            return proto.respond(503, _error(f"model {model} is unavailable", "server_error"))
        call = f"{headers.get('x-batchplan-query-id') or self._prompt_of(request['messages'])}\x00{model}"
        with self._lock:
            self._asked[call] += 1
            draw = fault_draw(faults.seed, self._asked[call], call)
        name = ""
        for candidate, rate in (
            ("429", faults.rate_429),
            ("500", faults.rate_500),
            ("reset", faults.rate_reset),
            ("malformed", faults.rate_malformed),
            ("timeout", faults.rate_timeout),
            ("slow", faults.rate_slow),
            ("refusal", faults.rate_refusal),
        ):
            if draw < rate:
                name = candidate
                break
            draw -= rate
        if name:
            self._count(name)
        if name == "429":
            return proto.respond(
                429, _error("rate limited", "rate_limit_error"), {"Retry-After": f"{faults.retry_after_s:g}"}
            )
        if name == "500":
            return proto.respond(500, _error("internal error", "server_error"))
        if name == "reset":
            return proto.reset()
        if name == "malformed":
            return proto.respond(200, b'{"id": "x", "choices": [{"message": {"content": ')
        query_id, status, payload, cost = self.answer(
            request, headers.get("x-batchplan-query-id"), refusal=name == "refusal"
        )
        if status != 200:
            return proto.respond(status, payload)
        delay = faults.timeout_s if name == "timeout" else faults.slow_s if name == "slow" else 0.0

        def send() -> None:
            self._bill(query_id, model, cost, key, payload, headers.get("x-batchplan-query-id"))
            proto.respond(200, payload)

        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, send)
        else:
            send()

    def answer(
        self, request: dict[str, Any], query_id: str | None = None, *, refusal: bool = False
    ) -> tuple[str, int, bytes, float]:
        """(query_id, HTTP status, body, on-demand cost) of one chat completion request body, as recorded:
        the answer every endpoint of this server gives (real time here, batch lines in batch_server)."""
        model = self.aliases.get(str(request["model"]), str(request["model"]))
        # an audit's reference call carries its own id (<query_id>#audit): it is the same query's prompt
        query_id = audited_query_id(query_id or "") or self._find(request["messages"])
        row = self._table.get((query_id or "", model))
        if row is None:
            message = f"no recorded outcome for query {query_id!r} on model {model!r}"
            return query_id or "", 404, _error(message, "not_found_error"), 0.0
        answer, cost, tokens_in, tokens_out, logprob = row
        text = (
            "I'm sorry, but I can't help with that."
            if refusal
            else (answer if answer is not None else "I am not sure.")
        )
        cap, finish = request.get("max_tokens"), "stop"
        if isinstance(cap, int) and cap > 0 and tokens_out is not None and tokens_out > cap:
            # as an endpoint does: generation stops at max_tokens, the answer is cut and billed up to there, at
            # the rate the recorded answer was billed (a history billed above its price list, as cascades_open's
            # ~3x is, saves that rate on the tokens never generated, not the list price)
            cost = (cost or 0.0) * _billed_share(self._usd.get(model), tokens_in, tokens_out, cap)
            text, tokens_out, finish = text[: max(1, len(text) * cap // tokens_out)], cap, "length"
        payload = _completion(
            model, text, cost or 0.0, tokens_in, tokens_out, logprob, bool(request.get("logprobs")), finish
        )
        return query_id or "", 200, payload, float(cost or 0.0)

    def _find(self, messages: Sequence[dict[str, Any]]) -> str | None:
        return self._by_prompt.get(self._prompt_of(messages))

    @staticmethod
    def _prompt_of(messages: Sequence[dict[str, Any]]) -> str:
        system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
        user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        return prompt_key(system, str(user))

    def _bill(
        self, query_id: str, model: str, cost: float, key: str | None, payload: bytes, call_id: str | None = None
    ) -> None:
        with self._lock:
            if key is not None:
                if key in self._idempotent:
                    return
                self._idempotent[key] = payload
            self.billed_calls += 1
            self.billed_usd += cost
            self.billed_keys[(query_id, model)] += 1
            self.billed_ids[(call_id or query_id, model)] += 1

    def _count(self, name: str) -> None:
        with self._lock:
            self.faults_sent[name] += 1


def fault_draw(seed: int, attempt: int, call: str) -> float:
    """A uniform draw in [0, 1) fixed by ``seed``, the ``call`` and its ``attempt`` (not by request order): the
    same call asked again draws anew, and a run meets the same faults whatever order its requests arrive in."""
    digest = hashlib.blake2b(f"{seed}\x00{attempt}\x00{call}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _error(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


def _completion(
    model: str,
    text: str,
    cost: float,
    tokens_in: int | None,
    tokens_out: int | None,
    logprob: float | None,
    want_logprobs: bool,
    finish_reason: str = "stop",
) -> bytes:
    tokens_in = tokens_in if tokens_in is not None else 0
    tokens_out = tokens_out if tokens_out is not None else 1
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
    }
    if want_logprobs and logprob is not None:
        choice["logprobs"] = {"content": [{"token": text, "logprob": logprob, "top_logprobs": []}]}
    body = {
        "id": f"chatcmpl-{random.getrandbits(48):012x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out,
            "cost": cost,
        },
    }
    return json.dumps(body).encode()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _Protocol(asyncio.Protocol):
    """Minimal HTTP/1.1 with keep-alive: enough for OpenAI clients, fast enough to benchmark against."""

    def __init__(self, server: ReplayServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            parts = head[0].split(" ")
            if len(parts) < 2:
                self.respond(400, _error("bad request line", "invalid_request_error"))
                continue
            self.server.handle(self, parts[0], parts[1].split("?", 1)[0], headers, body)

    def respond(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        for name, value in (extra or {}).items():
            head += f"{name}: {value}\r\n"
        self.transport.write(head.encode() + b"\r\n" + body)

    def reset(self) -> None:
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def server_parser(description: str | None) -> argparse.ArgumentParser:
    """The flags the test servers' command lines share: the history served (``served_history``), the
    port, the provider's names for its LLMs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", action="append", default=[], help="history directory (repeatable)")
    parser.add_argument("--synthetic", type=int, default=0, help="serve synthetic_history(N) instead")
    parser.add_argument("--models", type=int, default=4, help="models in the synthetic history")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--alias", action="append", default=[], help="PROVIDER_NAME=HISTORY_MODEL (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = server_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    for f in fields(Faults):
        if f.name in {"down_models", "seed"}:
            continue
        flag = (
            "--fault-" + f.name.removeprefix("rate_").replace("_", "-")
            if f.name.startswith("rate_")
            else "--" + f.name.replace("_", "-")
        )
        parser.add_argument(flag, dest=f.name, type=float, default=f.default)
    parser.add_argument("--down-model", action="append", default=[], dest="down_models")
    parser.add_argument(
        "--drift", action="append", default=[], help="LLM=OTHER or LLM:-0.2: a silently degraded LLM (repeatable)"
    )
    args = parser.parse_args(argv)
    history = served_history(parser, args)
    try:
        drifts = [Drift.parse(d) for d in args.drift]
        history = drifted_history(history, drifts) if drifts else history
    except ValueError as exc:
        parser.error(str(exc))
    faults = Faults(**{f.name: getattr(args, f.name) for f in fields(Faults) if f.name != "seed"}, seed=args.seed)
    aliases = dict(a.split("=", 1) for a in args.alias)
    serve_until_interrupted(ReplayServer(history, faults, port=args.port, aliases=aliases), "replay server")


def served_history(parser: argparse.ArgumentParser, args: argparse.Namespace) -> History:
    """The history named by --history or --synthetic (the servers' command lines share these flags)."""
    if args.synthetic:
        return synthetic_history(args.synthetic, args.models, seed=args.seed)
    if args.history:
        return load_history(args.history)
    parser.error("give --history DIR or --synthetic N")


def serve_until_interrupted(server: ReplayServer, name: str) -> None:
    """Serve in the foreground, saying where, until Ctrl-C."""

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        await asyncio.get_running_loop().run_in_executor(None, server._ready.wait)
        print(f"{name} listening on {server.base_url}", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
