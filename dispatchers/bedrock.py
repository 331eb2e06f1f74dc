"""AWS Bedrock Converse (boto3 ``bedrock-runtime``), one call per thread from the executor's event loop.

boto3 is synchronous: calls run in a bounded thread pool (``max_workers``). botocore's own retries are
switched off (``max_attempts=1``): retries, backoff and Retry-After belong to the executor, which also
keeps the budget and the ledger for them. Credentials come from the standard AWS chain or an Airflow
``aws`` connection, never from arguments that could be logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import Status
from batchplan.core.errors import ContractError
from batchplan.dispatchers.base import CallRequest, CallResult, answer_result, parse_answer
from batchplan.dispatchers.live import LiveBackend

_ERROR_STATUS = {
    "ThrottlingException": Status.RATE_LIMITED,
    "ServiceUnavailableException": Status.SERVER_ERROR,
    "InternalServerException": Status.SERVER_ERROR,
    "ModelNotReadyException": Status.SERVER_ERROR,
    "ModelErrorException": Status.SERVER_ERROR,
    "ModelTimeoutException": Status.TIMEOUT,
    "ResourceNotFoundException": Status.UNAVAILABLE,
    "AccessDeniedException": Status.CLIENT_ERROR,
    "ValidationException": Status.CLIENT_ERROR,
}


class BedrockBackend(LiveBackend):
    name = "bedrock"

    def __init__(
        self,
        *,
        catalog: PriceCatalog | None,
        model_map: Mapping[str, str] | None = None,
        client: Any | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        airflow_conn_id: str | None = None,
        max_workers: int = 32,
        timeout_s: float = 60.0,
    ) -> None:
        """``model_map`` maps plan model names to Bedrock model ids (or inference profile ARNs).
        ``client``: a ready ``bedrock-runtime`` client (tests pass one wrapped in botocore's Stubber)."""
        super().__init__(catalog, model_map)
        if client is None:
            client = _make_client(region_name, endpoint_url, airflow_conn_id, timeout_s)
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="bedrock")

    def __repr__(self) -> str:
        return f"BedrockBackend(models={len(self.catalog.models)})"

    def request_params(self, request: CallRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "modelId": self.provider_model(request.model),
            "messages": [{"role": "user", "content": [{"text": request.prompt}]}],
            "inferenceConfig": {"maxTokens": request.max_tokens, "temperature": 0.0},
        }
        if request.system_prompt:
            params["system"] = [{"text": request.system_prompt}]
        return params

    async def call(self, request: CallRequest) -> CallResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            response = await loop.run_in_executor(
                self._pool, lambda: self.client.converse(**self.request_params(request))
            )
        except Exception as error:
            return _failure(request.model, error)
        return self._parse(request, response, (time.perf_counter() - started) * 1000)

    def _parse(self, request: CallRequest, response: dict[str, Any], latency: float) -> CallResult:
        model = request.model
        usage = response.get("usage") or {}
        tokens_in, tokens_out = usage.get("inputTokens"), usage.get("outputTokens")
        cost = self.price(model, int(tokens_in or 0), int(tokens_out or 0)) if tokens_in is not None else None
        billed_known = cost is not None
        parts = ((response.get("output") or {}).get("message") or {}).get("content") or []
        text = "".join(p.get("text", "") for p in parts if isinstance(p, dict)) or None
        answer: str | None
        why: str | None
        if response.get("stopReason") in {"guardrail_intervened", "content_filtered"}:
            answer, why = None, "refusal"
        else:
            answer, why = parse_answer(text, request.labels)
        cut = response.get("stopReason") == "max_tokens"
        return answer_result(
            request, answer, why, cut=cut, raw=text, cost_usd=cost or 0.0, billed_known=billed_known,
            tokens_in=tokens_in, tokens_out=tokens_out, latency_ms=latency,
        )  # fmt: skip

    async def aclose(self) -> None:
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _failure(model: str, error: Exception) -> CallResult:
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = _ERROR_STATUS.get(
            code,
            Status.SERVER_ERROR
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) >= 500
            else Status.CLIENT_ERROR,
        )
        # errors with a code are answered by the service before inference: not billed
        return CallResult(model, status, reason=f"{code}: {error.response.get('Error', {}).get('Message', '')}"[:300])
    if isinstance(error, ConnectTimeoutError | EndpointConnectionError):
        return CallResult(model, Status.CONNECTION, reason=type(error).__name__)
    if isinstance(error, ReadTimeoutError):
        return CallResult(model, Status.TIMEOUT, reason=type(error).__name__, billed_known=False)
    return CallResult(model, Status.CONNECTION, reason=f"{type(error).__name__}: {error}"[:300], billed_known=False)


def _make_client(
    region_name: str | None, endpoint_url: str | None, airflow_conn_id: str | None, timeout_s: float
) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},
        read_timeout=timeout_s,
        connect_timeout=5,
        max_pool_connections=64,
    )
    if airflow_conn_id:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        hook = AwsBaseHook(
            aws_conn_id=airflow_conn_id, client_type="bedrock-runtime", region_name=region_name, config=config
        )
        return hook.get_client_type(region_name=region_name)
    from botocore.exceptions import NoRegionError

    try:
        return boto3.client("bedrock-runtime", region_name=region_name, endpoint_url=endpoint_url, config=config)
    except NoRegionError as error:
        raise ContractError(
            "the bedrock backend needs an AWS region: set AWS_DEFAULT_REGION (or pass region_name)",
            fields=("region_name",),
        ) from error
