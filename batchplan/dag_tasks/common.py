"""Shared by every DAG: the S3 connection -> Storage, the bucket layout, the validated DAG params, the
queue's day and URIs, the day's claim (one DAG run per queue)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from batchplan.core import history
from batchplan.core.contracts import ContractError
from batchplan.core.layout import Layout, day
from batchplan.core.request import DEFAULT_ROUND_PLANNER, DEFAULT_RUN_ROUNDS, default_audit_spend_share
from batchplan.core.settings import Settings
from batchplan.core.storage import Storage

log = structlog.get_logger("batchplan.airflow")

CONN_ID = "batchplan_s3"
# The live backends' endpoints and keys, one Airflow connection each (never in code, params or logs): openai's
# host is its base URL (ending in /v1) and its password the API key; bedrock's is an AWS connection.
BACKEND_CONN_IDS = {"openai": "batchplan_openai", "bedrock": "batchplan_bedrock"}
MAX_SHARDS = 32
MAX_ROUNDS = 4  # the DAGs unroll this many rounds (a static graph); rounds past the param are no-ops


class QueueClaimed(RuntimeError):
    """Another DAG run already took this day's queue."""


# ---------------------------------------------------------------------------------------------- storage
def storage_from_connection(conn_id: str = CONN_ID) -> Storage:
    """A Storage whose S3 calls use the Airflow AWS connection ``conn_id`` (endpoint, region, credentials).

    Called inside tasks only, never at parse time."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    client = S3Hook(aws_conn_id=conn_id).get_conn()
    return Storage(s3_endpoint_url=client.meta.endpoint_url, s3_region=client.meta.region_name, s3_client=client)


def layout() -> Layout:
    return Layout.from_settings()


# ------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class RunParams:
    """The DAG params, validated: what the UI's trigger form edits."""

    budget_usd: float | None
    accuracy_target: float | None
    allow_deferral: bool
    backend: str = "replay"
    max_shards: int = MAX_SHARDS
    tenant_budgets_usd: dict[str, float] = field(default_factory=dict)
    allow_unused_constraints: bool = False  # a config listing every tenant, not all queued tonight
    rounds: int = 1  # > 1: execute in rounds (batchplan.dag_tasks.rounds), at most MAX_ROUNDS
    round_planner: str = DEFAULT_ROUND_PLANNER
    audit_share: float = 0.0  # the share of queries audited (batchplan.plans.audit); default by backend
    audit_spend_share: float | None = None  # and at most this share of the budget on them (the live default caps)
    explore_share: float | None = None  # at most this share of the budget exploring (PlanRequest's); None: on drift
    batch_api: bool = False  # rounds sent as provider batch jobs (in rounds even when rounds == 1)

    @property
    def in_rounds(self) -> bool:
        return self.rounds > 1 or self.batch_api

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunParams:
        budget = params.get("budget_usd")
        target = params.get("accuracy_target")
        shards = int(params.get("max_shards") or MAX_SHARDS)
        if not 1 <= shards <= MAX_SHARDS:
            raise ContractError(f"max_shards must be in [1, {MAX_SHARDS}], got {shards}")
        rounds = int(params.get("rounds") or DEFAULT_RUN_ROUNDS)
        if not 1 <= rounds <= MAX_ROUNDS:
            raise ContractError(f"rounds must be in [1, {MAX_ROUNDS}], got {rounds}")
        planner = str(params.get("round_planner") or DEFAULT_ROUND_PLANNER)
        batch_api = bool(params.get("batch_api", False))
        if batch_api:
            from batchplan.app.pipeline import check_batch_api

            check_batch_api(str(params.get("backend") or "replay"))
        if rounds > 1 or batch_api:
            from batchplan.app.round_runner import check_round_planner

            check_round_planner(planner)
        return cls(
            budget_usd=float(budget) if budget not in (None, "") else None,
            accuracy_target=float(target) if target not in (None, "", 0) else None,
            allow_deferral=bool(params.get("allow_deferral", True)),
            backend=str(params.get("backend") or "replay"),
            max_shards=shards,
            tenant_budgets_usd=_tenant_budgets(params.get("tenant_budgets_usd")),
            allow_unused_constraints=bool(params.get("allow_unused_constraints", False)),
            rounds=rounds,
            round_planner=planner,
            audit_share=_audit_share(params.get("audit_share"), str(params.get("backend") or "replay")),
            # the live default share comes with the live default cap; a share asked for is not capped
            audit_spend_share=default_audit_spend_share(
                None, params.get("audit_share") or None, str(params.get("backend") or "replay")
            ),
            explore_share=_explore_share(params.get("explore_share")),
            batch_api=batch_api,
        )

    def request(self) -> Any:
        from batchplan.plans.planning import PlanRequest

        return PlanRequest(
            budget_usd=self.budget_usd,
            accuracy_target=self.accuracy_target,
            allow_deferral=self.allow_deferral,
            tenant_budgets_usd=dict(self.tenant_budgets_usd),
            allow_unused_constraints=self.allow_unused_constraints,
            audit_share=self.audit_share,
            audit_spend_share=self.audit_spend_share,
            explore_share=self.explore_share,
        )


def _audit_share(raw: Any, backend: str) -> float:
    """The ``audit_share`` param: empty = the backend's default (``default_audit_share``)."""
    from batchplan.core.request import default_audit_share

    try:
        return default_audit_share(None if raw in (None, "") else float(raw), backend)
    except (TypeError, ValueError):
        raise ContractError(f"audit_share must be a number in [0, 1), got {raw!r}") from None


def _explore_share(raw: Any) -> float | None:
    """The ``explore_share`` param: empty = None (automatic: on while the labels show drift,
    ``plans.planning.choose_exploration``); 0 turns it off."""
    if raw in (None, ""):
        return None
    try:
        share = float(raw)
    except (TypeError, ValueError):
        share = math.nan
    if not 0 <= share < 1:
        raise ContractError(f"explore_share must be a number in [0, 1), got {raw!r}")
    return share


def audit_params() -> dict[str, Any]:
    """The ``audit_share`` and ``explore_share`` params of the nightly and backfill DAGs."""
    from airflow.sdk import Param

    return {
        "audit_share": Param(
            None,
            type=["number", "null"],
            minimum=0,
            maximum=0.99,
            description="Share of queries that also get a reference answer inside the budget (accuracy without "
            "gold, drift); empty = 0.05 for a live backend, 0 for replay.",
        ),
        "explore_share": Param(
            None,
            type=["number", "null"],
            minimum=0,
            maximum=0.99,
            description="At most this share of the budget on calls of the LLMs the audit's reference does not call, "
            "on the audited queries (labels and silver reach the LLMs the plan never calls); empty = while the "
            "labels of past runs put an LLM outside the history's interval, 0.10 of the drifted tasks' part of "
            "the budget, on their queries, else none; 0: none.",
        ),
    }


def _tenant_budgets(raw: Any) -> dict[str, float]:
    """The ``tenant_budgets_usd`` param: {tenant: USD >= 0}; empty or missing = no tenant caps."""
    if raw in (None, "", {}):
        return {}
    if not isinstance(raw, dict):
        raise ContractError(f"tenant_budgets_usd must be an object {{tenant: USD}}, got {raw!r}")
    budgets: dict[str, float] = {}
    for tenant, value in raw.items():
        try:
            budgets[str(tenant)] = float(value)
        except (TypeError, ValueError):
            raise ContractError(f"tenant_budgets_usd[{tenant!r}] must be a number of USD, got {value!r}") from None
        if not budgets[str(tenant)] >= 0:
            raise ContractError(f"tenant_budgets_usd[{tenant!r}] must be >= 0, got {value!r}")
    return budgets


def queue_day(params: dict[str, Any], logical_date: Any) -> str:
    """The queue's day: the ``queue_date`` param, else the run's logical date (UTC)."""
    value = params.get("queue_date") or ""
    if value:
        return day(value)
    if logical_date is None:
        return datetime.now(UTC).date().isoformat()
    return day(logical_date.date() if isinstance(logical_date, datetime) else logical_date)


def queue_uri(lay: Layout, params: dict[str, Any], the_day: str) -> str:
    """The ``queue_prefix`` param (a full URI, ``{date}`` filled in), else ``queue/<day>/`` of the layout."""
    prefix = str(params.get("queue_prefix") or "")
    if prefix:
        return prefix.replace("{date}", the_day).rstrip("/") + "/"
    return lay.queue(the_day)


def sensor_key(lay: Layout, params: dict[str, Any], logical_date: Any) -> str:
    """The S3KeySensor's wildcard key: any part under the day's queue prefix."""
    return queue_uri(lay, params, queue_day(params, logical_date)) + "*"


def history_dirs(data_dir: str | None = None) -> list[str]:
    """The outcome histories the replay backend answers from (``BATCHPLAN_DATA_DIR``); at least one."""
    root = data_dir or Settings().data_dir
    dirs = history.history_dirs(root)
    if not dirs:
        raise ContractError(f"no outcome histories under {root} (set BATCHPLAN_DATA_DIR)")
    return dirs


# ------------------------------------------------------------------------------------------------ claims
def claim_queue(storage: Storage, lay: Layout, the_day: str, owner: str) -> bool:
    """Take the day's queue for ``owner`` (``dag_id/run_id``). True if it is ours (new or a re-run of the
    same owner); raises QueueClaimed if another run holds it."""
    uri = lay.claim(the_day)
    body = json.dumps({"owner": owner, "day": the_day, "claimed_at": datetime.now(UTC).isoformat()}).encode()
    if storage.put_if_absent(uri, body):
        log.info("claim.taken", day=the_day, owner=owner)
        return True
    holder = json.loads(storage.read_bytes(uri)).get("owner")
    if holder == owner:
        log.info("claim.resumed", day=the_day, owner=owner)
        return True
    raise QueueClaimed(f"queue {the_day} is claimed by {holder!r} ({uri}); this run ({owner}) leaves it alone")
