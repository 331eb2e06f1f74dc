"""Rounds in the DAGs: plan round k once for the whole batch -> dispatch its calls in shards -> observe,
for k = 1..MAX_ROUNDS (Airflow graphs are static: rounds past the ``rounds`` param are no-ops).

The re-plan is global: ``round_plan_stage`` sees every shard's observations of the earlier rounds and the
budget they left, then splits round k's calls into shards with budget shares that sum to at most what is
left (``stages.budget_shares``), so the hard caps hold across shards and rounds. Files, under
``results/<run>/``: ``rounds/<k>/calls.parquet`` (the round's plan, reused by a re-run), ``rounds/<k>/
shard-<i>/`` (each shard's calls, ledger and observations) and ``rounds/<k>/observations.parquet`` (the
round complete). A shard's ledger makes a re-run free; a complete round is never planned or sent again.

With ``rounds`` = 1 every task here returns at once and the single-shot dispatch runs as before.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import polars as pl

from batchplan.core.layout import Layout
from batchplan.core.rounds import RoundRequest
from batchplan.core.storage import Storage, join
from batchplan.dag_tasks import common  # common.storage_from_connection looked up per call: the DAG tests swap it
from batchplan.dag_tasks.common import BACKEND_CONN_IDS, MAX_ROUNDS, RunParams, log
from batchplan.dag_tasks.stages import (
    _backend,
    _tenant_shares,
    batch_modes_of,
    budget_shares,
    dispatch_shard,
    merge_stage,
    shard_count,
    shard_output_caps,
)

if TYPE_CHECKING:  # the app layer is imported inside the tasks (a DAG file parses fast)
    from batchplan.app.round_runner import RoundsOutcome

__all__ = [
    "MAX_ROUNDS",
    "dispatch_task",
    "merge_task",
    "round_dispatch_shard",
    "round_observe_stage",
    "round_plan_stage",
    "rounds_results",
]
NOOP: dict[str, Any] = {"noop": True}  # one mapped task instance that does nothing: no empty expansion


def rounds_uri(lay: Layout, run: str) -> str:
    """The round runner's ``out_uri`` for a DAG run: ``results/<run>/`` (its rounds under ``rounds/``)."""
    return lay.results(run).rstrip("/")


def _inputs(storage: Storage, lay: Layout, run: str, params: RunParams) -> dict[str, Any]:
    """What the round planner is built from: the queue, predictions, single-shot plan, loaded artifacts."""
    from batchplan.app import artifacts
    from batchplan.plans.planning import allowed_predictions

    version = artifacts.resolve_version(storage, lay.predictors(), None)
    request = params.request()
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet")).drop("day", strict=False)
    predictions = storage.read_frame(lay.plan_file(run, "predictions.parquet"))
    return {
        "plan": storage.read_frame(lay.plan_file(run, "plan.parquet")),
        "queue": queue,
        # a round planner calls only what each tenant may use (the single-shot plan was restricted too)
        "predictions": allowed_predictions(predictions, queue, request.allowed_models),
        "trained": artifacts.load(storage, lay.predictors(), version) if version else None,
        "request": request,
        # a batch API's prices and turnaround, for the planners that weigh the modes (as the CLI's run)
        "modes": batch_modes_of(storage, params, predictions) if params.batch_api else None,
    }


def _planner(params: RunParams, inputs: dict[str, Any]) -> tuple[Any, pl.DataFrame, pl.DataFrame]:
    """The round planner, queue and predictions of the run: an audit's reference calls beside the batch's
    (``round_runner.with_audits``), as the CLI runs them."""
    from batchplan.app.round_runner import make_round_planner, with_audits
    from batchplan.core.contracts import is_audit

    plan = inputs["plan"]
    planner = make_round_planner(params.round_planner, **{**inputs, "plan": plan.filter(~is_audit())})
    return with_audits(planner, plan, inputs["queue"], inputs["predictions"])


def _bounds(storage: Storage, params: RunParams, inputs: dict[str, Any]) -> pl.DataFrame:
    """Every (query, model)'s cost bound on the run's backend (BOUNDS_SCHEMA), as the dispatcher sends it."""
    backend = _backend(params.backend, storage)
    pairs = inputs["predictions"].select("query_id", "model")
    return backend.cost_bounds(inputs["queue"], pairs, _caps(inputs))


def _caps(inputs: dict[str, Any]) -> Any:
    """The trained open tasks' max_tokens (``OutputCaps``), or None (a version trained without: flat 1024)."""
    return getattr(inputs["trained"], "output_caps", None)


def _budget(params: RunParams, plan: pl.DataFrame) -> float:
    """The run's hard budget, as single shot (``pipeline.hard_budget``)."""
    from batchplan.app.pipeline import hard_budget

    return hard_budget(plan, params.budget_usd)


def round_plan_stage(storage: Storage, lay: Layout, run: str, params: RunParams, k: int) -> list[dict[str, Any]]:
    """Plan round ``k`` for the whole batch (once; a re-run reuses it) and split its calls into shards."""
    from batchplan.app.round_runner import (
        OBSERVATION_SCHEMA,
        REFUSED_SCHEMA,
        Execution,
        complete_round,
        plan_round,
        round_complete,
    )

    out = rounds_uri(lay, run)
    if not params.in_rounds or k > params.rounds or round_complete(storage, out, k):
        return [NOOP]
    inputs = _inputs(storage, lay, run, params)
    planner, queue, predictions = _planner(params, inputs)
    inputs = {**inputs, "queue": queue, "predictions": predictions}
    execution = Execution(
        budget_usd=_budget(params, inputs["plan"]), out_uri=out, storage=storage, tenant_budgets_usd=params.tenant_budgets_usd
    )
    calls, left, tenant_left = plan_round(
        planner, queue, predictions, k=k, rounds=params.rounds, run=execution, call_bounds=_bounds(storage, params, inputs)
    )
    calls = calls.filter(pl.col("models").list.len() > 0).sort("query_id")
    if calls.height == 0:  # nothing to call: the round is complete as planned
        complete_round(storage, out, k, pl.DataFrame(schema=OBSERVATION_SCHEMA), pl.DataFrame(schema=REFUSED_SCHEMA))
        return [NOOP]
    n = shard_count(calls.height, params.max_shards)
    size = max(math.ceil(calls.height / n), 1)
    parts = [(None, calls.slice(i * size, size)) for i in range(n) if i * size < calls.height]
    shares = budget_shares([float(p["expected_cost_usd"].sum()) for _, p in parts], max(left, 0.0))
    tenant_shares = _tenant_shares(parts, queue, {t: max(v, 0.0) for t, v in tenant_left.items()})
    shards: list[dict[str, Any]] = []
    for i, ((_, part), share) in enumerate(zip(parts, shares, strict=True)):
        uri = join(out, "rounds", str(k), f"shard-{i:03d}", "calls.parquet")
        storage.write_frame(part, uri)
        shards.append(
            {
                "run": run,
                "round": k,
                "shard": i,
                "calls": uri,
                "queue": lay.plan_file(run, "queue.parquet"),
                "rows": part.height,
                "budget_usd": share,
                "tenant_budgets_usd": {t: by_part[i] for t, by_part in tenant_shares.items()},
                "output_caps": caps.to_json() if (caps := _caps(inputs)) is not None else None,
            }
        )
    log.info("round.sharded", run=run, round=k, shards=len(shards), queries=calls.height, budget_left_usd=left)
    return shards


def round_dispatch_shard(
    storage: Storage, shard: dict[str, Any], backend: str, *, batch_api: bool = False, run_uri: str | None = None
) -> dict[str, Any]:
    """Send one shard of a round within its budget share; its observations are written last (reused).
    ``batch_api``: by the provider's batch API (``run_uri``: where ``batchplan cancel`` marks the run)."""
    from batchplan.app.pipeline import backend_batch_sender
    from batchplan.app.round_runner import REFUSED_SCHEMA, DispatchSender
    from batchplan.dispatchers import DispatchOptions
    from batchplan.plans.audit import audit_queue

    if shard.get("noop") or "calls" not in shard:
        return {"noop": True}
    here = shard["calls"].rsplit("/", 1)[0]
    marker = join(here, "observations.parquet")
    if storage.exists(marker):
        return {"round": shard["round"], "shard": shard["shard"], "reused": True}
    calls = storage.read_frame(shard["calls"])
    queue = storage.read_frame(shard["queue"]).drop("day", strict=False)
    queue = pl.concat([queue, audit_queue(queue, calls)])  # an audit's reference calls ask the audited query
    queue = queue.filter(pl.col("query_id").is_in(calls["query_id"].implode()))
    chosen = _backend(backend, storage)
    caps = DispatchOptions(output_caps=shard_output_caps(shard))
    sender = (
        backend_batch_sender(
            backend, chosen, run_uri or here, output_caps=caps.output_caps, airflow_conn_id=BACKEND_CONN_IDS.get(backend)
        )
        if batch_api
        else DispatchSender(chosen, caps)
    )
    got, refused = sender.send(
        RoundRequest(
            calls,
            queue,
            round=int(shard["round"]),
            budget_usd=float(shard["budget_usd"]),
            tenant_budgets_usd=shard.get("tenant_budgets_usd") or {},
            out_uri=join(here, "dispatch"),
            storage=storage,
        )
    )
    storage.write_frame(refused.cast(REFUSED_SCHEMA), join(here, "refused.parquet"))
    storage.write_frame(got, marker)
    charged = float(got["cost_usd"].sum())
    if charged > float(shard["budget_usd"]) + 1e-9:
        raise RuntimeError(f"round {shard['round']} shard {shard['shard']} charged ${charged:.6f} over its share")
    return {"round": shard["round"], "shard": shard["shard"], "calls": got.height, "charged_usd": charged}


def round_observe_stage(storage: Storage, lay: Layout, run: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Round complete: every shard's observations and refusals as the round's own (the marker)."""
    from batchplan.app.round_runner import OBSERVATION_SCHEMA, REFUSED_SCHEMA, complete_round, round_complete

    real = [s for s in shards if not s.get("noop")]
    if not real:
        return {"round": None}
    k, out = int(real[0]["round"]), rounds_uri(lay, run)
    if not round_complete(storage, out, k):
        heres = [s["calls"].rsplit("/", 1)[0] for s in real]
        observations = pl.concat(
            [storage.read_frame(join(h, "observations.parquet")) for h in heres]
            or [pl.DataFrame(schema=OBSERVATION_SCHEMA)]
        )
        refused = pl.concat(
            [storage.read_frame(join(h, "refused.parquet")).cast(REFUSED_SCHEMA) for h in heres]
            or [pl.DataFrame(schema=REFUSED_SCHEMA)]
        )
        complete_round(storage, out, k, observations, refused)
    return {"round": k, "shards": len(real)}


def rounds_results(storage: Storage, lay: Layout, run: str, params: RunParams) -> RoundsOutcome | None:
    """The run's results, estimated accuracy, per-LLM spend and round lines from its rounds (None when it
    ran single shot)."""
    from batchplan.app.round_runner import finish_rounds

    if not params.in_rounds:
        return None
    inputs = _inputs(storage, lay, run, params)
    planner, queue, predictions = _planner(params, inputs)
    inputs = {**inputs, "queue": queue, "predictions": predictions}
    outcome = finish_rounds(
        planner,
        queue,
        predictions,
        rounds=params.rounds,
        out_uri=rounds_uri(lay, run),
        storage=storage,
        call_bounds=_bounds(storage, params, inputs),
    )
    return outcome


def params() -> dict[str, Any]:
    """The ``rounds`` and ``round_planner`` params of the nightly and backfill DAGs."""
    from airflow.sdk import Param

    from batchplan.core.request import DEFAULT_ROUND_PLANNER, DEFAULT_RUN_ROUNDS

    return {
        "rounds": Param(
            DEFAULT_RUN_ROUNDS,
            type="integer",
            minimum=1,
            maximum=MAX_ROUNDS,
            description="Execute in N rounds, re-planned over the whole batch after each under what is left (1: single "
            "shot; 3 rounds of the per_task planner measured best: README, Rounds).",
        ),
        "round_planner": Param(DEFAULT_ROUND_PLANNER, type="string", description="Who plans each round (batchplan.app.round_runner)."),
        "batch_api": Param(
            False,
            type="boolean",
            description="Send the rounds as provider batch jobs (OpenAI Batch API, half price, within 24h); "
            "executes in rounds even with rounds = 1.",
        ),
    }


def in_rounds(params: dict[str, Any]) -> bool:
    """The run executes in rounds: the single-shot dispatch tasks stand aside."""
    return RunParams.from_params(params).in_rounds


def dispatch_task(shard: dict[str, Any], params: Any) -> dict[str, Any]:
    """The nightly and backfill DAGs' mapped dispatch: one shard through the dispatcher, or, for a run in
    rounds, a marker (the round_<k> tasks dispatch)."""
    if in_rounds(params):
        return {"shard": shard["shard"], "in_rounds": True}
    return dispatch_shard(common.storage_from_connection(), common.layout(), shard, params["backend"])


def merge_task(run: str, shards: list[dict[str, Any]], params: Any) -> dict[str, Any]:
    """The nightly and backfill DAGs' merge: the shards' results (or the rounds') into the run's results."""
    storage, lay = common.storage_from_connection(), common.layout()
    in_rounds_results = rounds_results(storage, lay, run, RunParams.from_params(params))
    return merge_stage(storage, lay, run, shards, params["backend"], rounds=in_rounds_results)


def round_tasks(info: Any, after: Any, backend_param: str = "backend") -> Any:
    """Add ``round_<k>_plan -> round_<k>_dispatch[shards] -> round_<k>_observe`` for k = 1..MAX_ROUNDS to
    the DAG being defined, after ``after``; returns the last observe (what the merge waits for)."""
    from airflow.sdk import task

    @task
    def round_plan(info: dict[str, Any], k: int, after: Any, params: Any = None) -> list[dict[str, Any]]:
        storage, lay = common.storage_from_connection(), common.layout()
        return round_plan_stage(storage, lay, info["run"], RunParams.from_params(params), k)

    @task(max_active_tis_per_dagrun=8, retries=3)
    def round_dispatch(shard: dict[str, Any], params: Any = None) -> dict[str, Any]:
        run_uri = rounds_uri(common.layout(), shard["run"]) if "run" in shard else None
        return round_dispatch_shard(
            common.storage_from_connection(),
            shard,
            params[backend_param],
            batch_api=bool(params.get("batch_api")),
            run_uri=run_uri,
        )

    @task
    def round_observe(info: dict[str, Any], shards: Any, sent: Any) -> dict[str, Any]:
        return round_observe_stage(common.storage_from_connection(), common.layout(), info["run"], list(shards))

    previous = after
    for k in range(1, MAX_ROUNDS + 1):
        shards = round_plan.override(task_id=f"round_{k}_plan")(info, k, previous)
        sent = round_dispatch.override(task_id=f"round_{k}_dispatch").expand(shard=shards)
        previous = round_observe.override(task_id=f"round_{k}_observe")(info, shards, sent)
    return previous
