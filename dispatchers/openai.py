"""OpenAI-compatible chat completions over HTTP (OpenAI, vLLM, Ollama, Together, gateways), async.

Transport chosen by measurement (``bench/dispatch.py``; 3,000 POSTs to the local replay server on this
2-core machine): aiohttp 6,900 req/s at 8 connections and 3,800 at 64; httpx 1,300 and 220 (its connection
pool's per-request scan grows with the pool). aiohttp is the default when importable, httpx the fallback
(``transport="httpx"``); both map failures the same way.

Every provider failure becomes a CallResult status (never an exception): 429 -> rate_limited with its
Retry-After, 5xx -> server_error, timeouts and resets -> timeout/connection with the bill unknown (the
executor then charges the reservation), a 200 whose body is not JSON -> server_error, a 200 whose text is
not one of the labels -> not_answer with the raw text and the reason.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import Status
from batchplan.core.errors import ContractError
from batchplan.dispatchers.base import CallRequest, CallResult, answer_result, parse_answer
from batchplan.dispatchers.live import LiveBackend, secret_from


class SendError(Exception):
    """A transport failure, normalised: ``kind`` is timeout / connect / connection; ``sent`` says whether
    the request may have reached the server (then it may have been billed)."""

    def __init__(self, kind: str, sent: bool, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.sent = sent


class _HttpxTransport:
    def __init__(
        self, base_url: str, headers: dict[str, str], timeout_s: float, connect_timeout_s: float, max_connections: int
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        try:
            response = await self._client.post(path, content=content, headers=headers)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            raise SendError("timeout", False, type(error).__name__) from error
        except httpx.TimeoutException as error:
            raise SendError("timeout", True, type(error).__name__) from error
        except httpx.ConnectError as error:
            raise SendError("connect", False, str(error)) from error
        except httpx.HTTPError as error:
            raise SendError("connection", True, f"{type(error).__name__}: {error}") from error
        return response.status_code, response.headers, response.content

    async def aclose(self) -> None:
        await self._client.aclose()


class _AiohttpTransport:
    def __init__(
        self, base_url: str, headers: dict[str, str], timeout_s: float, connect_timeout_s: float, max_connections: int
    ) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._base = base_url
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
        )

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        aiohttp = self._aiohttp
        try:
            async with self._session.post(self._base + path, data=content, headers=headers) as response:
                return response.status, response.headers, await response.read()
        except aiohttp.ConnectionTimeoutError as error:
            raise SendError("timeout", False, type(error).__name__) from error
        except TimeoutError as error:
            raise SendError("timeout", True, type(error).__name__) from error
        except aiohttp.ClientConnectorError as error:
            raise SendError("connect", False, str(error)) from error
        except (aiohttp.ClientError, OSError) as error:
            raise SendError("connection", True, f"{type(error).__name__}: {error}") from error

    async def aclose(self) -> None:
        await self._session.close()


def _default_transport() -> str:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "httpx"
    return "aiohttp"


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class OpenAIBackend(LiveBackend):
    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        catalog: PriceCatalog | None,
        api_key_env: str | None = "OPENAI_API_KEY",
        airflow_conn_id: str | None = None,
        model_map: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 128,
        logprobs: bool = True,
        use_reported_cost: bool = True,
        idempotent: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        transport: str = "auto",
    ) -> None:
        """``base_url`` ends in ``/v1``; the key comes from the Airflow connection ``airflow_conn_id``
        (password; its host is the base URL if none is given) or the ``api_key_env`` variable; none is
        sent if neither has one (local servers). ``use_reported_cost``: trust ``usage.cost`` when the
        endpoint reports it (gateways), else usage tokens x catalog price. ``idempotent``: the endpoint
        honours ``Idempotency-Key`` (a rerun resends an unfinished call instead of charging it as lost).
        ``transport``: ``aiohttp``, ``httpx`` or ``auto`` (aiohttp when installed)."""
        super().__init__(catalog, model_map)
        key, host = secret_from(api_key_env, airflow_conn_id)
        url = base_url or host
        if not url:
            from batchplan.dispatchers import missing_setting

            raise missing_setting(self.name, "base_url")
        self.base_url = url.rstrip("/")
        self._key = key
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.logprobs = logprobs
        self.use_reported_cost = use_reported_cost
        self.idempotent = idempotent
        self.extra_body = dict(extra_body or {})
        self.transport = _default_transport() if transport == "auto" else transport
        if self.transport not in {"aiohttp", "httpx"}:
            raise ContractError(f"transport must be aiohttp, httpx or auto, not {transport!r}", fields=("transport",))
        self._client: _HttpxTransport | _AiohttpTransport | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, models={len(self.catalog.models)}, key={'set' if self._key else 'none'})"

    def _http(self) -> _HttpxTransport | _AiohttpTransport:
        if self._client is None:  # created inside the running loop, closed by aclose() when a dispatch ends
            headers = {"content-type": "application/json"}
            if self._key is not None:
                headers["authorization"] = f"Bearer {self._key.value}"
            kind = _AiohttpTransport if self.transport == "aiohttp" else _HttpxTransport
            self._client = kind(self.base_url, headers, self.timeout_s, self.connect_timeout_s, self.max_connections)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def body(self, request: CallRequest) -> dict[str, Any]:
        messages = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.append({"role": "user", "content": request.prompt})
        body: dict[str, Any] = {
            "model": self.provider_model(request.model),
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": 0,
        }
        if self.logprobs:
            body["logprobs"] = True
        body.update(self.extra_body)
        return body

    async def call(self, request: CallRequest) -> CallResult:
        model = request.model
        headers = {"idempotency-key": request.key, "x-batchplan-query-id": request.query_id}
        content = json.dumps(self.body(request), separators=(",", ":")).encode()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                status, response_headers, raw = await self._http().post("/chat/completions", content, headers)
        except TimeoutError:
            return CallResult(model, Status.TIMEOUT, reason=f"no response in {self.timeout_s:g}s", billed_known=False)
        except SendError as error:
            kind = Status.TIMEOUT if error.kind == "timeout" else Status.CONNECTION
            return CallResult(model, kind, reason=f"{error.kind}: {error}", billed_known=not error.sent)
        latency = (time.perf_counter() - started) * 1000
        if status != 200:
            reason = f"HTTP {status}: {_error_message(raw)}"
            if status == 429:
                return CallResult(
                    model,
                    Status.RATE_LIMITED,
                    reason=reason,
                    retry_after_s=parse_retry_after(response_headers),
                    latency_ms=latency,
                )
            if status >= 500 or status == 408:
                kind = Status.TIMEOUT if status in (408, 504) else Status.SERVER_ERROR
                return CallResult(
                    model, kind, reason=reason, retry_after_s=parse_retry_after(response_headers), latency_ms=latency
                )
            kind = Status.UNAVAILABLE if status == 404 else Status.CLIENT_ERROR
            return CallResult(model, kind, reason=reason, latency_ms=latency)
        return self._parse(request, raw, latency)

    def _parse(self, request: CallRequest, raw: bytes, latency: float) -> CallResult:
        model = request.model
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"].get("content")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
            # a 200 we cannot read: it may well have been billed
            return CallResult(
                model,
                Status.SERVER_ERROR,
                raw=raw[:500].decode(errors="replace"),
                reason="malformed response body",
                billed_known=False,
                latency_ms=latency,
            )
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        reported = usage.get("cost")
        billed_known = True
        if self.use_reported_cost and isinstance(reported, int | float) and math.isfinite(reported):
            cost: float | None = float(reported)
        elif isinstance(tokens_in, int) and isinstance(tokens_out, int):
            cost = self.price(model, tokens_in, tokens_out)
        else:
            cost = None
        if cost is None:
            cost, billed_known = 0.0, False  # no usage: charged its reservation
        logprob = _answer_logprob(choice)
        answer, why = parse_answer(text if isinstance(text, str) else None, request.labels)
        raw_text = text if isinstance(text, str) else None
        cut = choice.get("finish_reason") == "length"
        return answer_result(
            request, answer, why, cut=cut, logprob=logprob, raw=raw_text, cost_usd=cost, billed_known=billed_known,
            tokens_in=tokens_in, tokens_out=tokens_out, latency_ms=latency,
        )  # fmt: skip


def _answer_logprob(choice: dict[str, Any]) -> float | None:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    values = [t.get("logprob") for t in logprobs["content"] if isinstance(t, dict)]
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return sum(numbers) if numbers else None


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        message = None
    return str(message or raw[:200].decode(errors="replace"))
