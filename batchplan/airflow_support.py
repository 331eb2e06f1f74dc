"""What the DAGs in ``dags/`` call: each task is one function here over plain values (URIs, numbers,
dicts), so the DAG files stay thin and every step can be tested without Airflow.

Idempotence, by construction:

- a day's queue is *claimed* once (``Storage.put_if_absent`` = S3 conditional write) by one DAG run; a
  second run racing for the same day finds the claim and is skipped; the same run re-running finds its
  own claim and resumes;
- each stage writes its output under the run key (``nightly-<day>``) and a re-run reuses what is there
  (queue snapshot, predictions, plan, shards) instead of recomputing it, so shards never move;
- each shard dispatches into its own results folder, whose ledger (``dispatchers``) records every paid
  call by (query_id, call): a re-run of the shard finds them and neither calls nor pays again;
- the one global budget is split into shard budgets that sum to at most the budget (integer
  nano-dollars, rounded down), and each shard's dispatcher enforces its share: the sum can never pass it.

Nothing here is imported by the library below it; only ``dags/`` imports this module.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import structlog

from batchplan.contracts import (
    HISTORY_QUERIES_SCHEMA,
    OUTCOMES_SCHEMA,
    RESULT_SCHEMA,
    RESULT_STATUSES,
    ContractError,
    conform,
)
from batchplan.layout import Layout, day, run_key
from batchplan.storage import Storage, StorageError

log = structlog.get_logger("batchplan.airflow")

CONN_ID = "batchplan_s3"
MAX_SHARDS = 32
MIN_ROWS_PER_SHARD = 200
MAX_BACKFILL_DAYS = 92
NANO = 1_000_000_000


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
    return Layout.from_env()


# ------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class RunParams:
    """The DAG params, validated: what the UI's trigger form edits."""

    budget_usd: float | None
    accuracy_target: float | None
    allow_deferral: bool
    backend: str = "replay"
    max_shards: int = MAX_SHARDS

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunParams:
        budget = params.get("budget_usd")
        target = params.get("accuracy_target")
        shards = int(params.get("max_shards") or MAX_SHARDS)
        if not 1 <= shards <= MAX_SHARDS:
            raise ContractError(f"max_shards must be in [1, {MAX_SHARDS}], got {shards}")
        return cls(
            budget_usd=float(budget) if budget not in (None, "") else None,
            accuracy_target=float(target) if target not in (None, "", 0) else None,
            allow_deferral=bool(params.get("allow_deferral", True)),
            backend=str(params.get("backend") or "replay"),
            max_shards=shards,
        )

    def request(self) -> Any:
        from batchplan.planning import PlanRequest

        return PlanRequest(
            budget_usd=self.budget_usd, accuracy_target=self.accuracy_target, allow_deferral=self.allow_deferral
        )


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
    """The outcome histories the replay backend answers from (``BATCHPLAN_DATA_DIR``)."""
    from batchplan.settings import Settings

    root = Path(data_dir or Settings().data_dir)
    dirs = sorted(str(p.parent) for p in root.glob("*/queries.parquet")) if root.is_dir() else []
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


# ------------------------------------------------------------------------------------------------ stages
def _exists_all(storage: Storage, *uris: str) -> bool:
    return all(storage.exists(u) for u in uris)


def ingest_stage(storage: Storage, lay: Layout, run: str, source: str | Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Validate the queue(s); quarantine bad rows; snapshot the valid ones to ``plans/<run>/queue.parquet``.

    ``source`` is one queue URI, or (day, URI) pairs for a backfill (a ``day`` column is added). A re-run
    reuses the snapshot: parts dropped after the first run do not change what this run planned."""
    from batchplan.pipeline import ingest

    snapshot = lay.plan_file(run, "queue.parquet")
    if storage.exists(snapshot):
        queue = storage.read_frame(snapshot)
        return {"queue": snapshot, "queries": queue.height, "reused": True}
    sources = [("", source)] if isinstance(source, str) else list(source)
    frames, quarantined = [], 0
    for the_day, uri in sources:
        out = lay.quarantine(run) if not the_day else lay.quarantine(run) + the_day
        got = ingest(uri, storage, out_uri=out)
        quarantined += got.quarantine.height
        frames.append(got.queue.with_columns(pl.lit(the_day).alias("day")) if the_day else got.queue)
    queue = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    duplicated = queue.filter(pl.col("query_id").is_duplicated())["query_id"].unique().to_list() if queue.height else []
    if duplicated:
        raise ContractError(f"query_id appears in more than one queue part/day: {duplicated[:5]}")
    if queue.height == 0:
        raise ContractError(f"no valid queries in {sources}: see {lay.quarantine(run)}")
    storage.write_frame(queue, snapshot)
    return {"queue": snapshot, "queries": queue.height, "quarantined": quarantined, "reused": False}


def _backend(name: str, storage: Storage) -> Any:
    from batchplan.pipeline import make_backend

    return make_backend(name, storage=storage, replay_history=history_dirs() if name == "replay" else ())


def current_model(storage: Storage, lay: Layout) -> str | None:
    """The promoted model version (``models/CURRENT.json``), or None before the first promotion."""
    if not storage.exists(lay.current_model()):
        return None
    return str(json.loads(storage.read_bytes(lay.current_model()))["version"])


def predict_stage(storage: Storage, lay: Layout, run: str, backend: str) -> dict[str, Any]:
    """P(correct) and cost per (query, model) with the promoted predictor; reused on a re-run."""
    from batchplan import artifacts
    from batchplan.pipeline import predict

    out = lay.plan_file(run, "predictions.parquet")
    if storage.exists(out):
        return {"predictions": out, "reused": True}
    version = current_model(storage, lay)
    if version is None:
        raise ContractError(f"no promoted predictor at {lay.current_model()}: run the batchplan_retrain DAG first")
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
    predictor = artifacts.load(storage, lay.models(), version=version).predictor
    predictions = predict(queue.drop("day", strict=False), predictor, _backend(backend, storage))
    storage.write_frame(predictions, out)
    return {"predictions": out, "model_version": version, "pairs": predictions.height, "reused": False}


def budget_shares(weights: Sequence[float], budget_usd: float | None) -> list[float | None]:
    """Split one budget over parts in proportion to ``weights`` (planned spend): integer nano-dollars
    rounded down, so the shares never sum past the budget. Equal split when all weights are zero."""
    if budget_usd is None:
        return [None] * len(weights)
    # One nano-dollar of slack per part absorbs the float rounding of summing the shares back up.
    total_nano = max(math.floor(budget_usd * NANO) - len(weights), 0)
    clean = [max(float(w), 0.0) for w in weights]
    mass = sum(clean)
    if mass <= 0:
        clean, mass = [1.0] * len(weights), float(len(weights))
    return [math.floor(total_nano * w / mass) / NANO for w in clean]


def shard_count(rows: int, max_shards: int = MAX_SHARDS, min_rows: int = MIN_ROWS_PER_SHARD) -> int:
    """Bounded: at most ``max_shards``, at least one, never more than one per ``min_rows`` queries."""
    return max(1, min(max_shards, MAX_SHARDS, rows // max(min_rows, 1)))


def plan_stage(
    storage: Storage, lay: Layout, run: str, params: RunParams, *, group_by: str | None = None
) -> list[dict[str, Any]]:
    """Optimize the whole batch under the one budget, then split the plan into bounded shards (contiguous
    query_id ranges, or one per ``group_by`` value, e.g. the backfill's days), each with its budget share.

    ``plans/<run>/shards.json`` is written last; when it exists a re-run returns it unchanged."""
    from batchplan import artifacts
    from batchplan.pipeline import build_candidates, optimize

    manifest_uri = lay.shards_manifest(run)
    if storage.exists(manifest_uri):
        return list(json.loads(storage.read_bytes(manifest_uri))["shards"])
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
    predictions = storage.read_frame(lay.plan_file(run, "predictions.parquet"))
    request = params.request()
    version = current_model(storage, lay)
    templates = artifacts.load_templates(storage, lay.models(), version) if version else None
    candidates = build_candidates(queue.drop("day", strict=False), predictions, templates, request.kinds)
    planned = optimize(candidates, request, templates)
    plan = planned.plan.sort("query_id")
    storage.write_frame(plan, lay.plan_file(run, "plan.parquet"))
    if group_by is not None:
        keyed = plan.join(queue.select("query_id", group_by), on="query_id", how="left")
        groups = sorted(keyed[group_by].unique().to_list())
        parts = [(g, keyed.filter(pl.col(group_by) == g).drop(group_by)) for g in groups]
    else:
        k = shard_count(plan.height, params.max_shards)
        size = math.ceil(plan.height / k)
        parts = [(None, plan.slice(i * size, size)) for i in range(k) if i * size < plan.height]
    shares = budget_shares([float(p["expected_cost_usd"].sum()) for _, p in parts], params.budget_usd)
    shards = []
    for i, ((group, part), share) in enumerate(zip(parts, shares, strict=True)):
        uri = lay.shard_plan(run, i)
        storage.write_frame(part, uri)
        shards.append(
            {
                "run": run,
                "shard": i,
                "group": group,
                "plan": uri,
                "rows": part.height,
                "planned_cost_usd": float(part["expected_cost_usd"].sum()),
                "budget_usd": share,
            }
        )
    manifest = {"run": run, "budget_usd": params.budget_usd, "shards": shards, "optimizer": planned.diagnostics}
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2, default=str))
    log.info("plan.sharded", run=run, shards=len(shards), queries=plan.height, budget_usd=params.budget_usd)
    return shards


def shard_results_uri(lay: Layout, shard: dict[str, Any]) -> str:
    return lay.shard_results(shard["run"], shard["group"] if shard.get("group") else int(shard["shard"]))


def dispatch_shard(storage: Storage, lay: Layout, shard: dict[str, Any], backend: str) -> dict[str, Any]:
    """Run one shard's plan within its budget share. Its folder holds the dispatcher's ledger: a re-run
    neither calls nor pays again for what is recorded there, and a finished shard is not touched."""
    from batchplan.pipeline import execute

    out = shard_results_uri(lay, shard)
    done_uri = f"{out}/results.parquet"
    if storage.exists(done_uri):
        results = storage.read_frame(done_uri)
        return _shard_summary(shard, results, reused=True)
    plan = storage.read_frame(shard["plan"])
    queue = storage.read_frame(lay.plan_file(shard["run"], "queue.parquet")).drop("day", strict=False)
    queue = queue.filter(pl.col("query_id").is_in(plan["query_id"].implode()))
    started = time.perf_counter()
    results = execute(
        plan, queue, _backend(backend, storage), budget_usd=shard["budget_usd"], out_uri=out, storage=storage
    )
    storage.write_frame(results, done_uri)
    summary = _shard_summary(shard, results, reused=False)
    log.info("shard.done", seconds=round(time.perf_counter() - started, 2), **summary)
    return summary


def _shard_summary(shard: dict[str, Any], results: pl.DataFrame, *, reused: bool) -> dict[str, Any]:
    spend = float(results["cost_usd"].fill_null(0).sum())
    budget = shard["budget_usd"]
    if budget is not None and spend > budget + 1e-9:
        raise ContractError(f"shard {shard['shard']} spent ${spend:.6f} over its share ${budget:.6f}")
    return {
        "shard": shard["shard"],
        "group": shard.get("group"),
        "queries": results.height,
        "spend_usd": spend,
        "budget_usd": budget,
        "status": {s: int((results["status"] == s).sum()) for s in RESULT_STATUSES},
        "reused": reused,
    }


def truth_for(backend: str, storage: Storage) -> Any:
    """The ground truth to score a run: the recorded history for the replay backend, else None."""
    if backend != "replay":
        return None
    from batchplan.history import load_history
    from batchplan.report import Truth

    return Truth.from_history(load_history(history_dirs(), storage))


def merge_stage(storage: Storage, lay: Layout, run: str, shards: list[dict[str, Any]], backend: str) -> dict[str, Any]:
    """One result row per query from the shards; the run's manifest; the outcomes it taught us."""
    frames = [storage.read_frame(f"{shard_results_uri(lay, s)}/results.parquet") for s in shards]
    results = pl.concat(frames).select(RESULT_SCHEMA.names()) if frames else pl.DataFrame(schema=RESULT_SCHEMA)
    plan = storage.read_frame(lay.plan_file(run, "plan.parquet"))
    if results.height != plan.height or results["query_id"].n_unique() != plan.height:
        raise ContractError(f"run {run}: {results.height} results for {plan.height} planned queries")
    storage.write_frame(results, lay.results_file(run))
    manifest_in = json.loads(storage.read_bytes(lay.shards_manifest(run)))
    spend = float(results["cost_usd"].fill_null(0).sum())
    budget = manifest_in.get("budget_usd")
    manifest = {
        "run": run,
        "queries": results.height,
        "spend_usd": spend,
        "budget_usd": budget,
        "within_budget": budget is None or spend <= budget + 1e-9,
        "status": {s: int((results["status"] == s).sum()) for s in RESULT_STATUSES},
        "shards": len(shards),
        "merged_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_text(lay.results_manifest(run), json.dumps(manifest, indent=2))
    learned = record_outcomes(storage, lay, run, results, truth_for(backend, storage))
    return manifest | {"results": lay.results_file(run), "outcomes_recorded": learned}


def record_outcomes(storage: Storage, lay: Layout, run: str, results: pl.DataFrame, truth: Any) -> int:
    """Write ``outcomes/<run>/`` in the history layout for answered queries whose gold is known."""
    if truth is None:
        return 0
    answered = results.filter(pl.col("status") == "done").with_columns(
        pl.col("models_called").list.last().alias("model")
    )
    known = answered.join(truth.gold.drop_nulls("gold"), on="query_id", how="inner")
    if known.height == 0:
        return 0
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
    outcomes = conform(
        known.select("query_id", "model", "answer", (pl.col("answer") == pl.col("gold")).alias("correct"), "cost_usd"),
        OUTCOMES_SCHEMA,
        name="outcomes",
    )
    queries = conform(
        queue.join(known.select("query_id", "gold"), on="query_id").with_columns(
            pl.lit("outcomes").alias("dataset"), pl.lit("train").alias("split")
        ),
        HISTORY_QUERIES_SCHEMA,
        name="outcome queries",
    )
    storage.write_frame(queries, f"{lay.outcomes(run)}/queries.parquet")
    storage.write_frame(outcomes, f"{lay.outcomes(run)}/outcomes.parquet")
    return outcomes.height


def report_stage(storage: Storage, lay: Layout, run: str, backend: str, *, run_id: str | None = None) -> dict[str, Any]:
    """The run report (JSON, Markdown, HTML) under ``reports/<run>/``; returns its paths and summary."""
    from batchplan.pipeline import reference_models
    from batchplan.report import build_report, summary_line, write_report

    results = storage.read_frame(lay.results_file(run))
    plan = storage.read_frame(lay.plan_file(run, "plan.parquet"))
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet")).drop("day", strict=False)
    predictions = storage.read_frame(lay.plan_file(run, "predictions.parquet"))
    manifest = json.loads(storage.read_bytes(lay.shards_manifest(run)))
    quarantined = sum(storage.read_frame(u).height for u in storage.iter_parts(lay.quarantine(run)))
    report = build_report(
        results=results,
        plan=plan,
        budget_usd=manifest.get("budget_usd"),
        quarantined=quarantined,
        truth=truth_for(backend, storage),
        reference_models=reference_models(predictions, queue),
        queue=queue,
        optimizer=manifest.get("optimizer"),
        run_id=run_id or run,
    )
    paths = write_report(report, lay.reports(run), storage)
    return {"summary": summary_line(report), "paths": paths, "spend_usd": report["spend_usd"]}


def index_report(storage: Storage, lay: Layout, dag_id: str, airflow_run_id: str, run: str) -> str:
    """Record which run key this Airflow run wrote, so the UI's report view finds it from the run id."""
    uri = lay.report_index(dag_id, airflow_run_id)
    storage.write_text(uri, json.dumps({"dag_id": dag_id, "run_id": airflow_run_id, "run": run}))
    return uri


def report_html_for(storage: Storage, lay: Layout, dag_id: str, airflow_run_id: str) -> str | None:
    """The HTML report of an Airflow DAG run, or None if it has none (yet)."""
    index = lay.report_index(dag_id, airflow_run_id)
    if not storage.exists(index):
        return None
    run = json.loads(storage.read_bytes(index))["run"]
    html_uri = lay.report_html(run)
    return storage.read_text(html_uri) if storage.exists(html_uri) else None


# ---------------------------------------------------------------------------------------------- backfill
def backfill_days(start: str, end: str) -> list[str]:
    first, last = date.fromisoformat(day(start)), date.fromisoformat(day(end))
    if last < first:
        raise ContractError(f"end_date {last} is before start_date {first}")
    n = (last - first).days + 1
    if n > MAX_BACKFILL_DAYS:
        raise ContractError(f"a backfill covers at most {MAX_BACKFILL_DAYS} days, got {n}: split the range")
    return [(first + timedelta(days=i)).isoformat() for i in range(n)]


def claim_days(storage: Storage, lay: Layout, days: list[str], owner: str) -> dict[str, list[str]]:
    """Claim every day that has queue parts; days already taken by another run (a nightly) are skipped."""
    taken, skipped, empty = [], [], []
    for the_day in days:
        if not any(True for _ in storage.list(lay.queue(the_day))):
            empty.append(the_day)
            continue
        try:
            claim_queue(storage, lay, the_day, owner)
            taken.append(the_day)
        except QueueClaimed as error:
            log.warning("backfill.day_skipped", day=the_day, reason=str(error))
            skipped.append(the_day)
    if not taken:
        raise ContractError(f"nothing to backfill in {days[0]}..{days[-1]}: empty {empty}, claimed elsewhere {skipped}")
    return {"days": taken, "skipped": skipped, "empty": empty}


# ----------------------------------------------------------------------------------------------- retrain
@dataclass(frozen=True)
class Decision:
    run: str
    candidate: str
    current: str | None
    candidate_score: float
    current_score: float | None
    metric: str
    promoted: bool
    reason: str
    eval_pairs: int
    outcomes_found: int
    outcomes_used: int


def training_history(storage: Storage, lay: Layout) -> tuple[Any, Any, int, int]:
    """(train, eval, found, used): the bundled histories' train/holdout split, with every recorded outcome
    added to training except those of held-out queries (no leakage into the evaluation); ``found`` and
    ``used`` count the recorded outcome rows."""
    from batchplan.history import History, load_history, with_holdout
    from batchplan.settings import Settings

    settings = Settings()
    base = with_holdout(load_history(history_dirs(), storage), settings.holdout_fraction, settings.seed)
    learned_dirs = sorted({u.rsplit("/", 1)[0] for u in storage.iter_parts(lay.outcomes(), "outcomes.parquet")})
    train = base.split("train")
    found = used = 0
    if learned_dirs:
        extra = load_history(learned_dirs, storage)
        found = extra.outcomes.height
        evaluation_ids = base.split("test").queries["query_id"].implode()
        extra = extra.subset(extra.queries.filter(~pl.col("query_id").is_in(evaluation_ids))["query_id"])
        used = extra.outcomes.height
        train = History(
            queries=pl.concat([train.queries, extra.queries]).unique("query_id", keep="first"),
            outcomes=pl.concat([train.outcomes, extra.outcomes]).unique(["query_id", "model"], keep="first"),
            prices=train.prices,
        )
    return train, base.split("test"), found, used


def score_predictor(predictor: Any, evaluation: Any) -> tuple[float, int]:
    """Brier score of P(correct) on the held-out (query, model) outcomes: lower is better."""
    from predictors.metrics import brier

    queue = evaluation.as_queue("test")
    pairs = evaluation.outcomes.select("query_id", "model").join(queue.select("query_id"), on="query_id")
    predicted = predictor.predict(queue, pairs, None)
    joined = predicted.join(evaluation.outcomes.select("query_id", "model", "correct"), on=["query_id", "model"])
    return brier(joined["correct"].cast(pl.Float64).to_numpy(), joined["p_correct"].to_numpy()), joined.height


def model_version(when: Any) -> str:
    """A model version name from the run's time: ``v20261122T020000``."""
    stamp = when if isinstance(when, datetime) else datetime.fromisoformat(str(when))
    return "v" + stamp.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def train_stage(storage: Storage, lay: Layout, run: str, predictor_name: str = "lightgbm") -> dict[str, Any]:
    """Train a candidate predictor on the training history; save it as ``models/<run>/``."""
    from batchplan import artifacts
    from predictors import list_versions

    out = lay.model(run)
    if run in list_versions(storage, lay.models()):
        return {"candidate": run, "uri": out, "reused": True}
    train, _, found, used = training_history(storage, lay)
    artifacts.save(artifacts.train(train, predictor=predictor_name), storage, lay.models(), version=run)
    return {
        "candidate": run,
        "uri": out,
        "train_outcomes": train.outcomes.height,
        "outcomes_found": found,
        "outcomes_used": used,
    }


def evaluate_and_promote(storage: Storage, lay: Layout, run: str, min_gain: float = 0.0) -> dict[str, Any]:
    """Score candidate and current predictor on the same held-out pairs; promote the candidate only if
    its Brier score is lower by more than ``min_gain`` (or nothing is promoted yet). Records the decision."""
    from predictors import load_predictor

    _, evaluation, found, used = training_history(storage, lay)
    candidate_score, pairs = score_predictor(load_predictor(storage, lay.models(), version=run), evaluation)
    current = current_model(storage, lay)
    current_score = None
    if current is not None and current != run:
        current_score, _ = score_predictor(load_predictor(storage, lay.models(), version=current), evaluation)
    if current is None:
        promoted, reason = True, "no promoted predictor yet"
    elif current == run:
        promoted, reason = True, "this candidate is already the promoted one (re-run)"
    elif current_score is not None and candidate_score < current_score - min_gain:
        promoted, reason = True, f"Brier {candidate_score:.5f} < current {current_score:.5f} - {min_gain}"
    else:
        promoted, reason = False, f"Brier {candidate_score:.5f} is not better than current {current_score:.5f}"
    decision = Decision(
        run=run,
        candidate=run,
        current=current,
        candidate_score=candidate_score,
        current_score=current_score,
        metric="brier",
        promoted=promoted,
        reason=reason,
        eval_pairs=pairs,
        outcomes_found=found,
        outcomes_used=used,
    )
    storage.write_text(lay.decision(run), json.dumps(asdict(decision), indent=2))
    if promoted:
        pointer = {
            "version": run,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "brier": candidate_score,
        }
        storage.write_text(lay.current_model(), json.dumps(pointer))
    log.info("retrain.decision", **asdict(decision))
    return asdict(decision)


# ------------------------------------------------------------------------------------------ local seed
def seed_queue(
    storage: Storage, lay: Layout, the_day: str, queries: int, *, offset: int = 0, seed: int = 7
) -> list[str]:
    """Drop queue parts for ``the_day`` made of held-out queries of the bundled histories (replayable)."""
    from batchplan.history import load_history, with_holdout

    history = with_holdout(load_history(history_dirs(), storage))
    queue = history.as_queue("test").sample(fraction=1.0, shuffle=True, seed=seed).slice(offset, queries)
    half = queue.height // 2
    parts = [f"{lay.queue(the_day)}part-0.parquet", f"{lay.queue(the_day)}part-1.jsonl"]
    storage.write_frame(queue.head(half), parts[0])
    storage.write_frame(queue.tail(queue.height - half), parts[1])
    return parts


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m batchplan.airflow_support seed --day 2026-03-02 --queries 450``: create the bucket of
    the ``batchplan_s3`` connection if needed and drop a replayable queue for that day (local try-outs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m batchplan.airflow_support")
    parser.add_argument("command", choices=["seed"])
    parser.add_argument("--day", required=True, help="YYYY-MM-DD")
    parser.add_argument("--queries", type=int, default=450)
    parser.add_argument("--offset", type=int, default=0, help="skip this many queries (disjoint days)")
    args = parser.parse_args(argv)
    lay = layout()
    if lay.bucket:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(aws_conn_id=CONN_ID)
        if not hook.check_for_bucket(lay.bucket):
            hook.create_bucket(bucket_name=lay.bucket)
    storage = storage_from_connection() if lay.bucket else Storage()
    for part in seed_queue(storage, lay, day(args.day), args.queries, offset=args.offset):
        print(part)


__all__ = [
    "CONN_ID",
    "MAX_SHARDS",
    "QueueClaimed",
    "RunParams",
    "StorageError",
    "backfill_days",
    "budget_shares",
    "claim_days",
    "claim_queue",
    "dispatch_shard",
    "evaluate_and_promote",
    "index_report",
    "ingest_stage",
    "layout",
    "merge_stage",
    "model_version",
    "plan_stage",
    "predict_stage",
    "queue_day",
    "queue_uri",
    "report_html_for",
    "report_stage",
    "run_key",
    "sensor_key",
    "storage_from_connection",
    "train_stage",
]


if __name__ == "__main__":
    main()
