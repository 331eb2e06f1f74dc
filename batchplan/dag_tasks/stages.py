"""The stages the nightly and backfill DAGs run: ingest -> predict -> plan -> dispatch (per shard) -> merge
-> report, and the report lookup the UI plugin uses.

Idempotence, by construction:

- a day's queue is *claimed* once (``common.claim_queue``: ``Storage.put_if_absent`` = S3 conditional
  write) by one DAG run; a second run racing for the same day finds the claim and is skipped; the same run
  re-running finds its own claim and resumes;
- each stage writes its output under the run key (``nightly-<day>``) and a re-run reuses what is there
  (queue snapshot, predictions, plan, shards) instead of recomputing it, so shards never move;
- each shard dispatches into its own results folder, whose ledger (``dispatchers``) records every paid
  call by (query_id, call): a re-run of the shard finds them and neither calls nor pays again;
- the one global budget is split into shard budgets that sum to at most the budget (integer
  nano-dollars, rounded down), and each shard's dispatcher enforces its share: the sum can never pass it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from batchplan.core.contracts import (
    RESULT_SCHEMA,
    RESULT_STATUSES,
    ContractError,
    audited_query,
    is_audit,
)
from batchplan.core.layout import Layout
from batchplan.core.storage import Storage
from batchplan.dag_tasks.common import BACKEND_CONN_IDS, MAX_ROUNDS, MAX_SHARDS, RunParams, history_dirs, log

if TYPE_CHECKING:  # the app layer is imported inside the tasks (a DAG file parses fast)
    from batchplan.app.round_runner import RoundsOutcome

MIN_ROWS_PER_SHARD = 200
NANO = 1_000_000_000


def ingest_stage(storage: Storage, lay: Layout, run: str, source: str | Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Validate the queue(s); quarantine bad rows; snapshot the valid ones to ``plans/<run>/queue.parquet``.

    ``source`` is one queue URI, or (day, URI) pairs for a backfill (a ``day`` column is added). A re-run
    reuses the snapshot: parts dropped after the first run do not change what this run planned."""
    from batchplan.app.pipeline import ingest

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
    """The DAG's backend: replay answers from the bundled histories; a live one takes its endpoint and key
    from its Airflow connection (``BACKEND_CONN_IDS``) and its prices from the layout's ``prices/models.csv``."""
    from batchplan.app.pipeline import make_backend

    if name == "replay":
        return make_backend(name, storage=storage, replay_history=history_dirs())
    prices = Layout.from_settings().prices()
    if name in BACKEND_CONN_IDS and not storage.exists(prices):
        raise ContractError(
            f"the {name} backend bills and plans at the prices in {prices} (model, usd_per_mtok_in, "
            "usd_per_mtok_out[, batch_discount]): put the price list there",
            fields=("prices",),
        )
    return make_backend(name, storage=storage, prices_uri=prices, airflow_conn_id=BACKEND_CONN_IDS.get(name))


LIVE_OFFSETS_FILE = "live_offsets.parquet"  # the live correction the run's predictions used, beside them


def predict_stage(storage: Storage, lay: Layout, run: str, backend: str) -> dict[str, Any]:
    """P(correct) and cost per (query, model) with the promoted predictor, corrected by what the labels of
    past runs say; reused on a re-run.

    The label files dropped under ``labels/<run>/`` are joined first (``labels_stage``), then the predictor's
    live correction is fitted again on the gold outcomes of every past run under ``outcomes/``
    (``app.labels.live_correction``): labels that arrived since the promoted predictor was trained move
    tonight's estimates, without waiting for a retrain. The correction used is written beside the
    predictions (``LIVE_OFFSETS_FILE``): the plan's exploration and the report's drift read it."""
    from batchplan.app import artifacts
    from batchplan.app.labels import live_correction
    from batchplan.app.outcomes import run_outcome_dirs
    from batchplan.app.pipeline import predict

    out = lay.plan_file(run, "predictions.parquet")
    if storage.exists(out):
        return {"predictions": out, "reused": True}
    version = artifacts.resolve_version(storage, lay.predictors(), None)
    if version is None:
        raise ContractError(f"no promoted predictor at {lay.current_predictor()}: run the batchplan_retrain DAG first")
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
    predictor = artifacts.load(storage, lay.predictors(), version=version).predictor
    labelled = labels_stage(storage, lay)  # before the correction: tonight's plan uses what arrived today
    past = [d for d in run_outcome_dirs(storage, lay.outcomes()) if d != lay.outcomes(run)]
    predictor.live, live_source = live_correction(storage, past, predictor)
    storage.write_frame(predictor.live.offsets, lay.plan_file(run, LIVE_OFFSETS_FILE))
    predictions = predict(queue.drop("day", strict=False), predictor, _backend(backend, storage))
    storage.write_frame(predictions, out)
    return {
        "predictions": out,
        "predictor_version": version,
        "pairs": predictions.height,
        "reused": False,
        "live_source": live_source,  # runs: fitted on past runs' gold; predictor: the promoted one's own
        "live_pairs": predictor.live.offsets.height,
        "labels": labelled,
    }


def live_offsets(storage: Storage, lay: Layout, run: str) -> pl.DataFrame:
    """The live correction the run's predictions used (``LIVE_OFFSETS_FILE``, written by ``predict_stage``);
    a run predicted before that file existed (or its predictions copied without it): the promoted
    predictor's own, the one it would have used, logged; none promoted: no correction."""
    from batchplan.app import artifacts
    from batchplan.predictors.live import OFFSET_SCHEMA

    uri = lay.plan_file(run, LIVE_OFFSETS_FILE)
    if storage.exists(uri):
        return storage.read_frame(uri)
    version = artifacts.resolve_version(storage, lay.predictors(), None)
    log.warning("live_offsets.missing", run=run, file=uri, fallback=version or "none")
    if version is None:
        return pl.DataFrame(schema=OFFSET_SCHEMA)
    return artifacts.load(storage, lay.predictors(), version).predictor.live.offsets


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


def batch_modes_of(storage: Storage, params: RunParams, predictions: pl.DataFrame) -> Any:
    """The run's batch mode (``pipeline.backend_batch_modes``): what the planners price a batch call at."""
    from batchplan.app.pipeline import backend_batch_modes

    return backend_batch_modes(params.backend, _backend(params.backend, storage), predictions)


def shard_count(rows: int, max_shards: int = MAX_SHARDS, min_rows: int = MIN_ROWS_PER_SHARD) -> int:
    """Bounded: at most ``max_shards``, at least one, never more than one per ``min_rows`` queries."""
    return max(1, min(max_shards, MAX_SHARDS, rows // max(min_rows, 1)))


def plan_stage(
    storage: Storage, lay: Layout, run: str, params: RunParams, *, group_by: str | None = None
) -> list[dict[str, Any]]:
    """Optimize the whole batch under the one budget, then split the plan into bounded shards (contiguous
    query_id ranges, or one per ``group_by`` value, e.g. the backfill's days), each with its budget share.

    ``plans/<run>/shards.json`` is written last; when it exists a re-run returns it unchanged."""
    from batchplan.app import artifacts
    from batchplan.app.pipeline import build_candidates
    from batchplan.plans.frontier import frontier_uri, plan_frontier, write_frontier
    from batchplan.plans.planning import choose_exploration, plan_audits, plan_batch, request_changes, request_record

    manifest_uri = lay.shards_manifest(run)
    request = params.request()
    # exploration decided before the manifest's check (it records the decided share and the run's own sample
    # seed, the same when retried): asked, or on the labels' drift in the live correction the predictions used;
    # it asks the LLMs with the fewest live labels first
    live = live_offsets(storage, lay, run) if request.explore_share != 0 else None
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
    request, exploration = choose_exploration(request, live, set(queue["task"].unique().to_list()), run)
    if storage.exists(manifest_uri):
        stored = json.loads(storage.read_bytes(manifest_uri))
        # the shards' budgets and the report follow the stored plan: a run asking another budget would see
        # it reported, not enforced (a manifest older than the request record holds its two budgets)
        recorded = stored.get("request") or {k: stored.get(k) for k in ("budget_usd", "tenant_budgets_usd")}
        changed = [c for c in request_changes(recorded, request) if c.split(":", 1)[0] in recorded]
        if changed:
            raise ContractError(
                f"run {run} was planned for another request ({'; '.join(changed)}): trigger it with the params "
                "it was planned for to resume it; another budget is another run"
            )
        return list(stored["shards"])
    predictions = storage.read_frame(lay.plan_file(run, "predictions.parquet"))
    if params.batch_api and params.rounds == 1:  # single shot by batch: every call at the batch price (as the CLI)
        from batchplan.plans.modes import batch_priced

        predictions = batch_priced(predictions, batch_modes_of(storage, params, predictions).discounts)
    version = artifacts.resolve_version(storage, lay.predictors(), None)
    templates = artifacts.load_templates(storage, lay.predictors(), version) if version else None
    caps = artifacts.load_output_caps(storage, lay.predictors(), version) if version else None
    candidates = build_candidates(queue.drop("day", strict=False), predictions, templates, request.kinds)
    audit_fit = artifacts.load_audit(storage, lay.predictors(), version) if version and request.audit_share > 0 else None
    audit = plan_audits(queue.drop("day", strict=False), predictions, audit_fit, request, live, exploration)
    if audit is not None:
        storage.write_frame(audit, lay.plan_file(run, AUDIT_PLAN_FILE))
    planned = plan_batch(candidates, request, templates, audit)
    plan = planned.plan.sort("query_id")
    plan_uri = lay.plan_file(run, "plan.parquet")
    write_frontier(storage, frontier_uri(plan_uri), plan_frontier(planned, request.budget_usd, request.method))
    storage.write_frame(plan, plan_uri)
    if group_by is not None:
        # an audit's reference rows go with their query's group (its day)
        of_query = audited_query().alias("_of")
        keyed = plan.with_columns(of_query).join(
            queue.select(pl.col("query_id").alias("_of"), group_by), on="_of", how="left"
        ).drop("_of")
        groups = sorted(keyed[group_by].unique().to_list())
        parts = [(g, keyed.filter(pl.col(group_by) == g).drop(group_by)) for g in groups]
    else:
        k = shard_count(plan.height, params.max_shards)
        size = math.ceil(plan.height / k)
        parts = [(None, plan.slice(i * size, size)) for i in range(k) if i * size < plan.height]
    shares = budget_shares([float(p["expected_cost_usd"].sum()) for _, p in parts], params.budget_usd)
    tenant_shares = _tenant_shares(parts, queue, params.tenant_budgets_usd)
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
                "tenant_budgets_usd": {tenant: by_part[i] for tenant, by_part in tenant_shares.items()},
                "output_caps": caps.to_json() if caps is not None else None,
            }
        )
    manifest = {
        "run": run,
        "budget_usd": params.budget_usd,
        "tenant_budgets_usd": params.tenant_budgets_usd,
        "request": request_record(request),
        "exploration": exploration,  # why exploration is on (the report says it), None when off
        "shards": shards,
        "optimizer": planned.diagnostics,
    }
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2, default=str))
    log.info("plan.sharded", run=run, shards=len(shards), queries=plan.height, budget_usd=params.budget_usd)
    return shards


def _tenant_shares(
    parts: list[tuple[Any, pl.DataFrame]], queue: pl.DataFrame, budgets_usd: dict[str, float]
) -> dict[str, list[float]]:
    """Each tenant budget split over the shards like the total: in proportion to the tenant's planned spend
    in each shard, rounded down, so a tenant's shares never sum past its budget."""
    tenant_of = queue.select("query_id", "tenant")
    planned = [  # one pass per shard: tenant -> its planned spend there
        dict(part.join(tenant_of, on="query_id").group_by("tenant").agg(pl.col("expected_cost_usd").sum()).iter_rows())
        for _, part in parts
    ]
    return {
        tenant: [float(share or 0.0) for share in budget_shares([p.get(tenant, 0.0) for p in planned], budget)]
        for tenant, budget in budgets_usd.items()
    }


def shard_results_uri(lay: Layout, shard: dict[str, Any]) -> str:
    return lay.shard_results(shard["run"], shard["group"] if shard.get("group") else int(shard["shard"]))


def dispatch_shard(storage: Storage, lay: Layout, shard: dict[str, Any], backend: str) -> dict[str, Any]:
    """Run one shard's plan within its budget share. Its folder holds the dispatcher's ledger: a re-run
    neither calls nor pays again for what is recorded there, and a finished shard is not touched."""
    from batchplan.app.pipeline import Execution, execute

    out = shard_results_uri(lay, shard)
    done_uri = f"{out}/results.parquet"
    if storage.exists(done_uri):
        results = storage.read_frame(done_uri)
        return _shard_summary(shard, results, reused=True)
    from batchplan.plans.audit import audit_queue

    plan = storage.read_frame(shard["plan"])
    queue = storage.read_frame(lay.plan_file(shard["run"], "queue.parquet")).drop("day", strict=False)
    queue = pl.concat([queue, audit_queue(queue, plan)])  # an audit's reference calls ask the audited query
    queue = queue.filter(pl.col("query_id").is_in(plan["query_id"].implode()))
    started = time.perf_counter()
    results = execute(
        plan,
        queue,
        _backend(backend, storage),
        Execution(
            budget_usd=shard["budget_usd"],
            out_uri=out,
            storage=storage,
            tenant_budgets_usd=shard.get("tenant_budgets_usd") or None,
            output_caps=shard_output_caps(shard),
        ),
    )
    storage.write_frame(results, done_uri)
    summary = _shard_summary(shard, results, reused=False)
    log.info("shard.done", seconds=round(time.perf_counter() - started, 2), **summary)
    return summary


def shard_output_caps(shard: dict[str, Any]) -> Any:
    """The open tasks' max_tokens the plan stage put in the shard (``OutputCaps``; None: the flat default)."""
    from batchplan.dispatchers import OutputCaps

    return OutputCaps.from_json(shard["output_caps"]) if shard.get("output_caps") else None


def _shard_summary(shard: dict[str, Any], results: pl.DataFrame, *, reused: bool) -> dict[str, Any]:
    spend = float(results["cost_usd"].fill_null(0).sum())
    budget = shard["budget_usd"]
    if budget is not None and spend > budget + 1e-9:
        raise ContractError(f"shard {shard['shard']} spent ${spend:.6f} over its share ${budget:.6f}")
    return {
        "shard": shard["shard"],
        "group": shard.get("group"),
        "queries": results.height,
        "spent_usd": spend,
        "budget_usd": budget,
        "status": {s: int((results["status"] == s).sum()) for s in RESULT_STATUSES},
        "reused": reused,
    }


def truth_for(backend: str, storage: Storage) -> Any:
    """The ground truth to score a run: the recorded history for the replay backend, else None."""
    if backend != "replay":
        return None
    from batchplan.app.report import Truth
    from batchplan.core.history import load_history

    return Truth.from_history(load_history(history_dirs(), storage))


def merge_stage(
    storage: Storage,
    lay: Layout,
    run: str,
    shards: list[dict[str, Any]],
    backend: str,
    rounds: RoundsOutcome | None = None,
) -> dict[str, Any]:
    """One result row per query from the shards (or, for a run in ``rounds``, its results, estimated
    accuracy, per-LLM spend and round lines: ``dag_tasks.rounds.rounds_results``); the run's manifest; the
    outcomes it taught us."""
    if rounds is not None:
        results = rounds.results.select(RESULT_SCHEMA.names())
    else:
        frames = [storage.read_frame(f"{shard_results_uri(lay, s)}/results.parquet") for s in shards]
        results = pl.concat(frames).select(RESULT_SCHEMA.names()) if frames else pl.DataFrame(schema=RESULT_SCHEMA)
    plan = storage.read_frame(lay.plan_file(run, "plan.parquet"))
    if results.height != plan.height or results["query_id"].n_unique() != plan.height:
        raise ContractError(f"run {run}: {results.height} results for {plan.height} planned queries")
    spend = float(results["cost_usd"].fill_null(0).sum())  # the audits' reference calls are in the budget too
    if (audits := results.filter(is_audit())).height:  # ...but not answers the batch delivers
        storage.write_frame(audits, audit_results_file(lay, run))
        results = results.filter(~is_audit())
        if rounds is not None:  # the audited estimate corrects the rounds' posterior (``estimate_audit``'s base)
            from batchplan.plans.audit import posterior_base

            storage.write_frame(posterior_base(rounds.answers), posterior_base_file(lay, run))
    manifest_in = json.loads(storage.read_bytes(lay.shards_manifest(run)))
    audited, references = None, None
    if storage.exists(audit_uri := lay.plan_file(run, AUDIT_PLAN_FILE)):
        # here, not in the report: the estimate reads the plan's own answers, which the rewritten results lose
        results, audited, references = _audit_of(storage, lay, run, manifest_in, results, plan, audits, audit_uri)
    storage.write_frame(results, lay.results_file(run))
    budget = manifest_in.get("budget_usd")
    tenant_budgets: dict[str, float] = manifest_in.get("tenant_budgets_usd") or {}
    tenant_spend: dict[str, float] = {}
    if tenant_budgets:  # the queue is read only when there are tenant budgets to check
        from batchplan.app.report import per_tenant

        queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
        spent = {row["tenant"]: row["spent_usd"] for row in per_tenant(results, queue, None, tenant_budgets)}
        tenant_spend = {tenant: float(spent.get(tenant, 0.0)) for tenant in tenant_budgets}
    manifest = {
        "run": run,
        "queries": results.height,
        "spent_usd": spend,
        "budget_usd": budget,
        "tenant_budgets_usd": tenant_budgets,
        "tenant_spent_usd": tenant_spend,
        "within_budget": (budget is None or spend <= budget + 1e-9)
        and all(tenant_spend[t] <= limit + 1e-9 for t, limit in tenant_budgets.items()),
        "status": {s: int((results["status"] == s).sum()) for s in RESULT_STATUSES},
        "shards": len(shards),
        "estimated_accuracy": rounds.estimated_accuracy if rounds is not None else None,
        # the report's per-LLM spend and round lines: in rounds the shards' single-shot ledgers are empty
        "spend_by_model": rounds.spend_by_model if rounds is not None else None,
        "rounds": rounds.rounds if rounds is not None else None,
        "audit": audited,  # the report's audit section (``_audit_of``)
        "merged_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_text(lay.results_manifest(run), json.dumps(manifest, indent=2))
    learned = record_outcomes(storage, lay, run, backend, references)
    return manifest | {"results": lay.results_file(run), "outcomes_recorded": learned}


def record_outcomes(
    storage: Storage, lay: Layout, run: str, backend: str, references: pl.DataFrame | None = None
) -> int:
    """Write ``outcomes/<run>/``: one live outcome per call of every shard and round (``app.outcomes``),
    scored by the replay history only on the replay backend, silver where an audit's reference says
    (``references``: the audit records); returns how many calls."""
    from batchplan.app.outcomes import record_run_outcomes

    queue = storage.read_frame(lay.plan_file(run, "queue.parquet")).drop("day", strict=False)
    outcomes = record_run_outcomes(
        storage,
        lay.results(run),
        lay.outcomes(run),
        queue,
        prices=_backend(backend, storage).catalog.prices,
        truth=truth_for(backend, storage),
        references=references,
    )
    return outcomes.height


def labels_stage(storage: Storage, lay: Layout) -> list[dict[str, Any]]:
    """Join every label file dropped under ``labels/<run>/`` into that past run (``app.labels.join_labels``):
    its outcomes and its report. A file already joined is skipped; a malformed one, or one for a run that
    does not exist (yet), is logged in one line naming it and left where it is, and the rest go on."""
    from batchplan.app.labels import join_labels, label_files, read_label_file
    from batchplan.app.outcomes import LABELS_FILE

    root = lay.labels()
    runs = sorted({u.removeprefix(root).split("/", 1)[0] for u in label_files(storage, root) if "/" in u.removeprefix(root)})
    joined: list[dict[str, Any]] = []
    for run in runs:
        labels_uri = f"{lay.outcomes(run)}/{LABELS_FILE}"
        done = set(storage.read_frame(labels_uri)["source_file"].to_list()) if storage.exists(labels_uri) else set()
        for uri in label_files(storage, lay.labels(run)):
            if uri in done:
                continue
            try:
                got = join_labels(
                    storage,
                    lay.outcomes(run),
                    read_label_file(storage, uri),
                    source_file=uri,
                    results_uri=lay.results_file(run),
                    report_uri=lay.reports(run),
                )
            except ContractError as error:
                log.error("labels.refused", run=run, file=uri, error=str(error))
                joined.append({"run": run, "file": uri, "error": str(error)})
                continue
            joined.append({"run": run, "file": uri, "summary": got.line()})
    return joined


def report_stage(storage: Storage, lay: Layout, run: str, backend: str, *, run_id: str | None = None) -> dict[str, Any]:
    """The run report (JSON, Markdown, HTML) under ``reports/<run>/``; returns its paths and summary."""
    from batchplan.app.labels import labels_drift, report_with_labels
    from batchplan.app.pipeline import dispatch_dir, reference_models
    from batchplan.app.report import build_report, dispatch_modes, summary_line, write_report
    from batchplan.dispatchers import spend_by_model
    from batchplan.plans.audit import drift_lines
    from batchplan.plans.frontier import frontier_uri, read_frontier

    results = storage.read_frame(lay.results_file(run))
    plan = storage.read_frame(lay.plan_file(run, "plan.parquet"))
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet")).drop("day", strict=False)
    predictions = storage.read_frame(lay.plan_file(run, "predictions.parquet"))
    manifest = json.loads(storage.read_bytes(lay.shards_manifest(run)))
    quarantined = sum(storage.read_frame(u).height for u in storage.iter_parts(lay.quarantine(run)))
    merged = json.loads(storage.read_text(lay.results_manifest(run)))
    spent: dict[str, float] = dict(merged.get("spend_by_model") or {})  # a run in rounds: its rounds' charges
    for shard in manifest["shards"] if merged.get("spend_by_model") is None else []:
        for model, usd in spend_by_model(storage, dispatch_dir(shard_results_uri(lay, shard))).items():
            spent[model] = spent.get(model, 0.0) + usd  # each shard's ledger: what its calls charged, per model
    report = build_report(
        results=results,
        plan=plan.filter(~is_audit()),
        budget_usd=manifest.get("budget_usd"),
        quarantined=quarantined,
        truth=truth_for(backend, storage),
        reference_models=reference_models(predictions, queue),
        queue=queue,
        optimizer=manifest.get("optimizer"),
        run_id=run_id or run,
        tenant_budgets_usd=manifest.get("tenant_budgets_usd"),
        frontier=read_frontier(storage, frontier_uri(lay.plan_file(run, "plan.parquet"))),
        spend_by_model=spent,
        estimated_accuracy=merged.get("estimated_accuracy"),
        audit=merged.get("audit"),  # the merge's: estimated on the plan's own answers
        rounds=merged.get("rounds"),
    )
    report.exploration = manifest.get("exploration")  # the plan's decision (plan_stage), as the CLI's run reports it
    if (modes_used := dispatch_modes(storage, lay.results(run).rstrip("/"), MAX_ROUNDS)) is not None:
        report.dispatch_modes = modes_used  # a run in rounds by a batch API: its share, its fallbacks
    # the labels of past runs that put an LLM outside the history's estimate (the live correction this run's
    # predictions used): said with the audits' drift, in the report's first lines, as the CLI's run does
    if labelled_drift := labels_drift(live_offsets(storage, lay, run), queue):
        report.drift = [*(report.drift or []), *labelled_drift]
    report = report_with_labels(storage, lay.outcomes(run), results, report)  # labels joined before a re-run
    paths = write_report(report, lay.reports(run), storage)
    labelled = labels_stage(storage, lay)  # late labels for past runs: their reports re-rendered
    drift = report.drift or []
    return {
        "summary": summary_line(report),
        "paths": paths,
        "spent_usd": report.spent_usd,
        "estimated_accuracy_ci95": report.estimated_accuracy_ci95,
        "drift": drift,
        "drift_sources": sorted({d.get("source", "audits") for d in drift}),  # audits, labels
        "drift_lines": drift_lines({"drift": drift}),
        "labels": labelled,
    }


AUDIT_PLAN_FILE = "audit_plan.parquet"  # the audited queries' reference plan rows, beside the plan


def audit_results_file(lay: Layout, run: str) -> str:
    """The result rows of the audits' reference calls, beside the run's results (which are the delivered ones)."""
    return lay.results_file(run).removesuffix("results.parquet") + "audit_results.parquet"


def posterior_base_file(lay: Layout, run: str) -> str:
    """A run in rounds with audits: the posterior of each final answer, which the audited estimate corrects."""
    return lay.results_file(run).removesuffix("results.parquet") + "posterior_base.parquet"


def _audit_of(
    storage: Storage,
    lay: Layout,
    run: str,
    manifest: dict[str, Any],
    results: pl.DataFrame,
    plan: pl.DataFrame,
    audit_results: pl.DataFrame,
    audit_uri: str,
) -> tuple[pl.DataFrame, dict[str, Any], pl.DataFrame]:
    """The run's audits as the CLI settles them (``pipeline.settle_audits``): the delivered results, the
    report's audit section, the audit records (also written under the run's reports)."""
    from batchplan.app import artifacts
    from batchplan.app.pipeline import settle_audits
    from batchplan.plans.audit import AuditInputs

    version = artifacts.resolve_version(storage, lay.predictors(), None)
    inputs = AuditInputs(
        plan=plan.filter(~is_audit()),
        results=results,
        audit_plan_rows=storage.read_frame(audit_uri),
        audit_results=audit_results,
        calls=_calls_of(storage, lay, run, manifest),
        queue=storage.read_frame(lay.plan_file(run, "queue.parquet")).drop("day", strict=False),
        predictions=storage.read_frame(lay.plan_file(run, "predictions.parquet")),
        audit_fit=artifacts.load_audit(storage, lay.predictors(), version) if version else None,
        seed=run,
        base=storage.read_frame(base_uri) if storage.exists(base_uri := posterior_base_file(lay, run)) else None,
    )
    delivered, audited, references = settle_audits(inputs)
    storage.write_frame(references, f"{lay.reports(run)}/audit.parquet")
    return delivered, audited, references


def _calls_of(storage: Storage, lay: Layout, run: str, manifest: dict[str, Any]) -> pl.DataFrame:
    """Every call of the run (query_id, model, answer, status): its shards' ledgers, or in rounds every
    round's (``app.outcomes.call_outcomes`` reads them all, in round order)."""
    from batchplan.app.outcomes import call_outcomes
    from batchplan.app.pipeline import calls_made

    single = [calls_made(storage, shard_results_uri(lay, s)) for s in manifest["shards"]]
    if sum(c.height for c in single):
        return pl.concat(single)
    every = call_outcomes(storage, lay.results(run).rstrip("/"))
    return every.sort("round", maintain_order=True).select("query_id", "model", "answer", "status")


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
