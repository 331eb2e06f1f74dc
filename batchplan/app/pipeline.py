"""The job, stage by stage: ingest -> predict -> candidates -> optimize -> dispatch -> results -> report.

Each stage is a plain function over frames so the CLI, the DAGs and the benchmarks call the same code; the
orchestration in ``run_job`` only wires them and writes each stage's output under the run directory:

    <out>/quarantine.parquet   rows refused at ingest, with the reason
    <out>/plan.parquet         one plan row per query (kind "defer" where the optimizer deferred it);
                               a rerun into the same directory resumes with this plan
    <out>/plan.optimizer.json  the optimizer's status, bound, gap, duals
    <out>/plan.request.json    the request (budget, constraints, plan kinds) the plan was made for: a rerun
                               asking another is refused, so the report's budget is the one enforced
    <out>/plan.frontier.json   planned accuracy and cost at a dozen budgets (the report's frontier chart)
    <out>/dispatch/            the dispatcher's ledger, result parts and manifest (resumable)
    <out>/results.parquet      one result row per query (the delivered answers; audits' reference calls apart)
    <out>/audit.parquet        per audited query: delivered and reference answer, whether they agree
    <out>/outcomes.parquet     one live outcome per call (+ queries.parquet, models.csv, labels.parquet:
                               ``batchplan.app.outcomes``): what the run teaches the predictor
    <out>/report.{json,md,html}
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import structlog

from batchplan.app import artifacts
from batchplan.app.ingest import Ingested, read_queue
from batchplan.app.labels import labels_drift, report_with_labels
from batchplan.app.outcomes import record_run_outcomes
from batchplan.app.report import Truth, build_report, dispatch_modes, summary_line, write_report
from batchplan.app.round_runner import (
    BatchSender,
    DispatchSender,
    Execution,
    RoundSender,
    RoundsOutcome,
    check_round_planner,
    make_round_planner,
    run_rounds,
    with_audits,
)
from batchplan.core.catalog import BATCH_TERMS, PriceCatalog, batch_terms
from batchplan.core.contracts import DEFER, RESULT_SCHEMA, UNANSWERABLE, ContractError, is_audit
from batchplan.core.history import History, load_history
from batchplan.core.request import DEFAULT_ROUND_PLANNER
from batchplan.core.rounds import RoundPlanner
from batchplan.core.storage import Storage, join
from batchplan.dispatchers import (
    Backend,
    DispatchOptions,
    RetryPolicy,
    check_backend,
    dispatch,
    get_backend,
    ledger_events,
    spend_by_model,
)
from batchplan.dispatchers.executor import Progress
from batchplan.dispatchers.limits import OutputCaps
from batchplan.plans.audit import (
    AuditInputs,
    audit_queue,
    count_delivered,
    deliver_references,
    estimate_audit,
    posterior_base,
)
from batchplan.plans.best_single import best_single_map
from batchplan.plans.candidates import build_candidates
from batchplan.plans.frontier import frontier_uri, plan_frontier, read_frontier, write_frontier
from batchplan.plans.modes import BatchModes, batch_priced
from batchplan.plans.planning import (
    PlanOutcome,
    PlanRequest,
    allowed_predictions,
    check_rounds_request,
    choose_exploration,
    default_rounds,
    plan_audits,
    plan_batch,
    request_changes,
    request_record,
)
from batchplan.plans.templates import PlanTemplates
from batchplan.predictors import Predictor

log = structlog.get_logger("batchplan")


def ingest(queue_uri: str, storage: Storage, out_uri: str | None = None) -> Ingested:
    """Read and validate the queue; write the quarantine file (possibly empty) beside the run's outputs."""
    started = time.perf_counter()
    ingested = read_queue(queue_uri, storage)
    if out_uri is not None:
        storage.write_frame(ingested.quarantine, join(out_uri, "quarantine.parquet"))
    log.info(
        "ingest",
        queue=queue_uri,
        parts=len(ingested.sources),
        valid=ingested.queue.height,
        quarantined=ingested.quarantine.height,
        seconds=round(time.perf_counter() - started, 2),
    )
    return ingested


def make_backend(
    name: str,
    *,
    storage: Storage,
    replay_history: Sequence[str] = (),
    replay: History | None = None,
    base_url: str | None = None,
    prices_uri: str | None = None,
    **options: Any,
) -> Backend:
    """Build a dispatcher backend by name from plain settings (CLI flags, DAG params); ``replay`` is the
    replay history when the caller has it loaded already."""
    if name == "replay":
        check_backend("replay", history=replay if replay is not None else replay_history or None)
        history = replay if replay is not None else load_history(list(replay_history), storage)
        return get_backend("replay", history=history, **options)
    catalog = None
    if prices_uri is not None:
        catalog = PriceCatalog.from_prices(storage.read_frame(prices_uri)).for_backend(name)  # its batch price
    if base_url is not None:  # the endpoint: OpenAI-compatible for openai, a Bedrock runtime URL for bedrock
        options["endpoint_url" if name == "bedrock" else "base_url"] = base_url
    return get_backend(name, catalog=catalog, **options)


def predict(queue: pl.DataFrame, predictor: Predictor, backend: Backend | None) -> pl.DataFrame:
    """P(correct) and cost for every (query, model) the backend can serve; without a backend, for every
    model the predictor knows, at the prices it learned."""
    started = time.perf_counter()
    if unseen := unseen_tasks(queue, predictor):
        log.warning("predict.unseen_tasks", tasks=unseen, known=sorted(predictor.tasks.values))
    if backend is None:
        models = pl.DataFrame({"model": predictor.models}, schema={"model": pl.String})
        predictions = predictor.predict(queue, queue.select("query_id").join(models, how="cross"), None)
    else:
        predictions = predictor.predict(queue, backend.offered_pairs(queue), backend.catalog)
    log.info(
        "predict",
        pairs=predictions.height,
        models=predictions["model"].n_unique(),
        seconds=round(time.perf_counter() - started, 2),
    )
    return predictions


def unseen_tasks(queue: pl.DataFrame, predictor: Predictor) -> list[str]:
    """The queue's tasks the predictor never saw in training: their accuracy is each model's mean over all
    tasks, so the plan for them is a guess the user should know about (a typo'd task name looks the same)."""
    return sorted(set(queue["task"].unique().to_list()) - set(predictor.tasks.values))


@dataclass(frozen=True)
class Planned:
    """What ``plan_queue`` made: the valid queue (its prompts dropped once predicted), the quarantined rows,
    the trained artifacts, the predictions and the plan."""

    ingested: Ingested
    trained: artifacts.Trained
    predictions: pl.DataFrame
    outcome: PlanOutcome


PLAN_STAGES = ("ingest", "load", "predict", "candidates", "solve")


def plan_queue(
    queue_uri: str,
    storage: Storage,
    predictors_uri: str,
    request: PlanRequest | Callable[[pl.DataFrame], PlanRequest],
    *,
    backend: Backend | None = None,
    version: str | None = None,
    on_ingested: Callable[[Ingested], None] | None = None,
    lap: Callable[[str], None] | None = None,
) -> Planned:
    """``batchplan plan``'s stages (``PLAN_STAGES``), one code path for the CLI and ``bench/solver.py``:
    ingest, load the predictors, predict, build the candidates, solve. ``request``: the request, or how to
    make it from the predictions (the bench's budget is a share of their cost spread); ``on_ingested``
    sees the ingest's result before anything else is done (the CLI writes the quarantine there); ``lap``
    is called with each stage's name as it ends. The prompts are dropped once predicted: nothing after
    reads them, and at 1M all-distinct prompts they are GBs held through the solve."""
    ingested = ingest(queue_uri, storage, out_uri=None)
    if on_ingested is not None:
        on_ingested(ingested)
    _lap(lap, "ingest")
    trained = artifacts.load(storage, predictors_uri, version=version)
    _lap(lap, "load")
    predictions = predict(ingested.queue, trained.predictor, backend)
    ingested = dataclasses.replace(ingested, queue=ingested.queue.drop("prompt"))
    _lap(lap, "predict")
    asked = request(predictions) if callable(request) else request
    candidates = build_candidates(ingested.queue, predictions, trained.templates, asked.kinds)
    _lap(lap, "candidates")
    outcome = plan_batch(candidates, asked, trained.templates)
    _lap(lap, "solve")
    return Planned(ingested=ingested, trained=trained, predictions=predictions, outcome=outcome)


def _lap(lap: Callable[[str], None] | None, stage: str) -> None:
    if lap is not None:
        lap(stage)


def dispatch_dir(out_uri: str) -> str:
    """Where ``execute`` keeps the dispatcher's ledger, result parts and manifest under a run's outputs."""
    return join(out_uri, "dispatch")


def hard_budget(plan: pl.DataFrame, budget_usd: float | None) -> float:
    """What the dispatcher may spend at most: the budget; without one (minimize cost for a target), the plan's
    own high side (deferred and unanswerable rows reserve nothing)."""
    if budget_usd is not None:
        return budget_usd
    return float(plan.filter(~pl.col("kind").is_in([DEFER, UNANSWERABLE]))["reserve_cost_usd"].sum())


def execute(plan: pl.DataFrame, queue: pl.DataFrame, backend: Backend, run: Execution) -> pl.DataFrame:
    """Dispatch every planned query; deferred plan rows become deferred results. One row per query."""
    started = time.perf_counter()
    runnable = plan.filter(~pl.col("kind").is_in([DEFER, UNANSWERABLE]))
    limit = hard_budget(plan, run.budget_usd)
    dispatched = dispatch(
        runnable,
        queue,
        backend,
        budget_usd=limit,
        out_uri=dispatch_dir(run.out_uri),
        tenant_budgets_usd=run.tenant_budgets_usd,
        storage=run.storage,
        progress=run.progress,
        options=DispatchOptions(retry=run.retry, output_caps=run.output_caps),
    )
    deferred = _not_called(plan.filter(pl.col("kind") == DEFER), "deferred", pl.lit(DEFERRED_BY_PLAN))
    failed = unanswerable_results(plan, queue, backend)
    results = pl.concat([dispatched.select(RESULT_SCHEMA.names()).cast(RESULT_SCHEMA), deferred, failed])
    results = plan.select("query_id").join(results, on="query_id", how="left")
    log.info(
        "dispatch",
        calls=int(results["models_called"].list.len().sum()),
        spent_usd=round(float(results["cost_usd"].sum()), 6),
        done=int((results["status"] == "done").sum()),
        seconds=round(time.perf_counter() - started, 2),
    )
    return results


DEFERRED_BY_PLAN = "deferred by the plan: not worth its cost under the budget"


def unanswerable_results(plan: pl.DataFrame, queue: pl.DataFrame, backend: Backend) -> pl.DataFrame:
    """Failed result rows for the plan's unanswerable queries, saying why: no LLM the backend offers can
    answer it, or none its tenant may use."""
    unanswerable = plan.filter(pl.col("kind") == UNANSWERABLE)
    offered = backend.offered_pairs(queue.filter(pl.col("query_id").is_in(unanswerable["query_id"].implode())))
    reason = (
        pl.when(pl.col("query_id").is_in(offered["query_id"].implode()))
        .then(pl.lit("no LLM the backend offers for this query is one its tenant may use (--allow)"))
        .otherwise(pl.lit(f"no LLM the backend offers can answer this query: {backend.unoffered_reason}"))
    )
    return _not_called(unanswerable, "failed", reason)


def _not_called(plan: pl.DataFrame, status: str, error: pl.Expr) -> pl.DataFrame:
    """Result rows for plan rows nothing is called for (deferred, unanswerable): no answer, no spend."""
    return plan.select(
        "query_id",
        pl.lit(None, dtype=pl.String).alias("answer"),
        pl.lit([], dtype=pl.List(pl.String)).alias("models_called"),
        pl.lit(0.0).alias("cost_usd"),
        pl.lit(status).alias("status"),
        error.alias("error"),
        pl.lit(None, dtype=pl.String).alias("note"),
    ).cast(RESULT_SCHEMA)


def execute_rounds(
    plan: pl.DataFrame,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    backend: Backend,
    planner: RoundPlanner,
    run: Execution,
    *,
    rounds: int,
    sender: RoundSender | None = None,
) -> RoundsOutcome:
    """``execute`` in rounds: each round planned by ``planner`` from what the earlier ones observed, under
    the budget they left; under ``<out>/rounds/`` (resumable, see ``batchplan.app.round_runner``).
    ``sender``: how a round is sent (default: the dispatcher, in real time; ``BatchSender``: batch APIs)."""
    started = time.perf_counter()
    limit = hard_budget(plan, run.budget_usd)
    pairs = predictions.select("query_id", "model")
    bounds = backend.cost_bounds(queue, pairs, run.output_caps)
    outcome = run_rounds(
        planner,
        queue,
        predictions,
        sender or realtime_sender(backend, run.retry, run.output_caps),
        rounds=rounds,
        run=dataclasses.replace(run, budget_usd=limit),
        call_bounds=bounds,
    )
    # a query no offered LLM can answer failed, as in single shot (the planners only know it was never called)
    failed = unanswerable_results(plan, queue, backend)
    if failed.height:
        kept = outcome.results.filter(~pl.col("query_id").is_in(failed["query_id"].implode()))
        merged = queue.select("query_id").join(pl.concat([kept, failed]), on="query_id", how="left", maintain_order="left")
        outcome = dataclasses.replace(outcome, results=merged)
    results = outcome.results
    log.info(
        "dispatch",
        rounds=rounds,
        calls=outcome.observations.height,
        spent_usd=round(float(results["cost_usd"].sum()), 6),
        done=int((results["status"] == "done").sum()),
        estimated_accuracy=round(outcome.estimated_accuracy, 4),
        seconds=round(time.perf_counter() - started, 2),
    )
    return outcome


def realtime_sender(
    backend: Backend, retry: RetryPolicy | None = None, output_caps: OutputCaps | None = None
) -> DispatchSender:
    return DispatchSender(backend, DispatchOptions(retry=retry, output_caps=output_caps))


BATCH_API_BACKENDS = tuple(sorted(BATCH_TERMS))  # backends with a batch sender: OpenAI Batch, Bedrock batch


def check_batch_api(backend: str) -> None:
    if backend not in BATCH_API_BACKENDS:
        raise ContractError(
            f"batch_api needs a backend with a batch API ({', '.join(BATCH_API_BACKENDS)}), not {backend!r}",
            fields=("batch_api",),
        )


def batch_sender(
    backend: Backend,
    run_uri: str,
    *,
    resume_cancelled: bool = False,
    deadline: float | None = None,
    output_caps: OutputCaps | None = None,
    **options: Any,
) -> BatchSender:
    """Rounds of the run under ``run_uri`` by batch (real time for rows the planner marks so); a run marked
    by ``batchplan cancel`` submits nothing new unless ``resume_cancelled``."""
    from batchplan.core.settings import get_settings
    from batchplan.dispatchers.batch import CANCELLED_MARKER

    return BatchSender(
        backend,
        realtime_sender(backend, output_caps=output_caps),
        deadline=deadline,
        poll_s=get_settings().batch_poll_s,
        options={"cancel_marker": join(run_uri, CANCELLED_MARKER), "resume_cancelled": resume_cancelled, **options},
    )


def reference_models(predictions: pl.DataFrame, queue: pl.DataFrame) -> dict[str, str]:
    """Per task, the best single model (``best_single_llms``) by the predictor's expectations: the report's
    baseline where the job was given no ``reference_models`` (a batch has no outcomes to judge by)."""
    return best_single_map(predictions.join(queue.select("query_id", "task"), on="query_id"), accuracy="p_correct")


@dataclass
class Job:
    """One run of the batch job, from plain settings."""

    queue_uri: str
    predictors_uri: str  # the predictor registry root (--predictors)
    out_uri: str
    request: PlanRequest
    backend: str = "replay"
    replay_history: list[str] = field(default_factory=list)
    base_url: str | None = None
    prices_uri: str | None = None
    predictor_version: str | None = None
    run_id: str | None = None
    reference_models: dict[str, str] | None = None  # task -> model for the 'best single model' baseline
    backend_options: dict[str, Any] = field(default_factory=dict)
    # > 1: execute in rounds, re-planned after each (batchplan.app.round_runner); 1: single shot; None: the
    # default (``planning.default_rounds``: 3 unless the round planner cannot hold the request), as `run` gives
    rounds: int | None = 1
    round_planner: str = DEFAULT_ROUND_PLANNER  # a name in batchplan.app.round_runner.ROUND_PLANNERS
    batch_api: bool = False  # rounds sent as provider batch jobs (BatchSender), in rounds even when rounds == 1
    resume_cancelled: bool = False  # submit batches again in a run marked by `batchplan cancel`
    deadline: float | None = None  # POSIX seconds (``request.deadline_at``): bounds the batch rounds


@dataclass(frozen=True)
class JobOutcome:
    report: dict[str, Any]  # report.json's content (``Report.from_json`` to render it)
    plan: pl.DataFrame
    results: pl.DataFrame
    paths: dict[str, str]


def run_job(job: Job, storage: Storage, progress: Progress | None = None, truth: Truth | None = None) -> JobOutcome:
    """Plan and dispatch the whole batch; write plan, results and report under ``job.out_uri``."""
    started = time.perf_counter()
    rounds = default_rounds(job.rounds, job.request, job.round_planner)
    in_rounds = rounds > 1 or job.batch_api
    if in_rounds:  # before anything is planned or sent
        check_round_planner(job.round_planner)
        check_rounds_request(job.request, job.round_planner)
    if job.batch_api:
        check_batch_api(job.backend)
    if job.deadline is not None and not job.batch_api:
        raise ContractError(
            "deadline bounds the rounds sent by a provider's batch API: pass batch_api with it (real-time rounds "
            "need no deadline)",
            fields=("deadline", "batch_api"),
        )
    # the replay history is read once: it answers the calls and is the truth the report scores against
    replay = load_history(job.replay_history, storage) if job.backend == "replay" and job.replay_history else None
    backend = make_backend(
        job.backend,
        storage=storage,
        replay=replay,
        base_url=job.base_url,
        prices_uri=job.prices_uri,
        **job.backend_options,
    )
    if truth is None and replay is not None:
        truth = Truth.from_history(replay)
    ingested = ingest(job.queue_uri, storage, job.out_uri)
    if ingested.queue.height == 0:
        raise ContractError(f"no valid queries in {job.queue_uri}: see {join(job.out_uri, 'quarantine.parquet')}")
    trained = artifacts.load(storage, job.predictors_uri, version=job.predictor_version)
    tasks = set(ingested.queue["task"].unique().to_list())
    request, exploration = choose_exploration(job.request, trained.predictor.live.offsets, tasks, job.run_id or job.out_uri)
    job = dataclasses.replace(job, request=request)
    predictions = predict(ingested.queue, trained.predictor, backend)
    paths = {"plan": join(job.out_uri, "plan.parquet"), "results": join(job.out_uri, "results.parquet")}
    audit = plan_audits(
        ingested.queue, predictions, trained.audit, job.request, trained.predictor.live.offsets, exploration
    )
    modes = batch_modes(job, backend, predictions) if job.batch_api else None
    plan, diagnostics = _resume_or_plan(
        storage,
        paths["plan"],
        ingested.queue,
        # single shot by batch: every call at the batch price
        batch_priced(predictions, modes.discounts) if modes is not None and rounds == 1 else predictions,
        trained.templates,
        job.request,
        audit,
    )
    estimated: float | None = None
    in_rounds_outcome: RoundsOutcome | None = None
    execution = Execution(
        budget_usd=job.request.budget_usd,
        out_uri=job.out_uri,
        storage=storage,
        tenant_budgets_usd=job.request.tenant_budgets_usd,
        progress=progress,
        output_caps=trained.output_caps,
    )
    if in_rounds:
        planner = make_round_planner(
            job.round_planner,
            plan=plan.filter(~is_audit()),
            queue=ingested.queue,
            predictions=predictions,
            trained=trained,
            request=job.request,
            modes=modes,
        )
        # audits: the reference calls go beside the batch's, mandatory, inside the same budget
        planner, round_queue, round_predictions = with_audits(
            planner, plan, ingested.queue, allowed_predictions(predictions, ingested.queue, job.request.allowed_models)
        )
        outcome = execute_rounds(
            plan,
            round_queue,
            round_predictions,
            backend,
            planner,
            execution,
            rounds=rounds,
            sender=round_batch_sender(job, backend, trained.output_caps) if job.batch_api else None,
        )
        results, estimated, in_rounds_outcome = outcome.results, outcome.estimated_accuracy, outcome
    else:
        results = execute(
            plan,
            pl.concat([ingested.queue, audit_queue(ingested.queue, plan)]) if audit is not None else ingested.queue,
            backend,
            execution,
        )
    audited: dict[str, Any] | None = None
    references: pl.DataFrame | None = None
    if audit is not None:  # the reference calls are the audit's, not answers the batch delivers
        audit_results, results, plan = results.filter(is_audit()), results.filter(~is_audit()), plan.filter(~is_audit())
        inputs = AuditInputs(
            plan=plan,
            results=results,
            audit_plan_rows=audit,
            audit_results=audit_results,
            calls=calls_made(storage, job.out_uri)
            if in_rounds_outcome is None
            else in_rounds_outcome.observations.select("query_id", "model", "answer", "status"),
            queue=ingested.queue,
            predictions=predictions,
            audit_fit=trained.audit,
            seed=job.request.audit_seed,
            # in rounds: the posterior of the final answers, corrected by the audited sample (a difference estimator)
            base=None if in_rounds_outcome is None else posterior_base(in_rounds_outcome.answers),
        )
        results, audited, references = settle_audits(inputs)
        paths["audit"] = join(job.out_uri, "audit.parquet")
        storage.write_frame(references, paths["audit"])
    storage.write_frame(results, paths["results"])
    # every call the run made, as outcomes to learn from; correctness from the replay history only when that
    # history answered the calls (a live backend's is unknown until labels or audits say)
    record_run_outcomes(
        storage,
        job.out_uri,
        job.out_uri,
        ingested.queue,
        prices=backend.catalog.prices,
        truth=truth if job.backend == "replay" else None,
        references=references,
    )
    report = build_report(
        results=results,
        plan=plan,
        budget_usd=job.request.budget_usd,
        quarantined=ingested.quarantine.height,
        truth=truth,
        reference_models=job.reference_models or reference_models(predictions, ingested.queue),
        queue=ingested.queue,
        optimizer=diagnostics,
        run_id=job.run_id,
        tenant_budgets_usd=job.request.tenant_budgets_usd,
        unseen_tasks=unseen_tasks(ingested.queue, trained.predictor),
        frontier=read_frontier(storage, frontier_uri(paths["plan"])),
        # in rounds every round has its own ledger: the per-LLM spend is what the rounds' observations charged
        spend_by_model=in_rounds_outcome.spend_by_model
        if in_rounds_outcome is not None
        else spend_by_model(storage, dispatch_dir(job.out_uri)),
        estimated_accuracy=estimated,
        rounds=in_rounds_outcome.rounds if in_rounds_outcome is not None else None,
        audit=audited,
    )
    report.exploration = exploration  # why exploration is on (asked, or the labels' drift), None when off
    if in_rounds and (modes_used := dispatch_modes(storage, job.out_uri, rounds)) is not None:
        report.dispatch_modes = modes_used  # the batch API's share, its fallbacks
    # the live labels of past runs that put an LLM outside the history's estimate: said with the audits' drift
    if labelled := labels_drift(trained.predictor.live.offsets, ingested.queue):
        report.drift = [*(report.drift or []), *labelled]
    report = report_with_labels(storage, job.out_uri, results, report)  # a rerun after `batchplan label`
    paths |= write_report(report, job.out_uri, storage)
    log.info("run", summary=summary_line(report), out=job.out_uri, seconds=round(time.perf_counter() - started, 2))
    return JobOutcome(report=report.as_json(), plan=plan, results=results, paths=paths)


AUDIT_RECORD_SCHEMA = pl.Schema(
    [
        ("query_id", pl.String),
        ("task", pl.String),
        ("delivered_answer", pl.String),
        ("reference_answer", pl.String),
        ("agree", pl.Boolean),
        ("source_model", pl.String),
        ("reference_models", pl.List(pl.String)),
    ]
)


def settle_audits(inputs: AuditInputs) -> tuple[pl.DataFrame, dict[str, Any], pl.DataFrame]:
    """What the audits give a run, the same for the CLI and the DAGs: the audited estimate from the plan's
    own answers (``estimate_audit``; ``inputs.plan``/``results`` the delivered rows, audits apart), then the
    paid reference answers delivered where they are the likelier right (``deliver_references``). Returns
    (the delivered results, the report's audit section with ``delivered_references``, the audit records as
    ``AUDIT_RECORD_SCHEMA``: the silver labels' source)."""
    audited = estimate_audit(inputs)
    references = pl.DataFrame(audited.pop("records"), schema=AUDIT_RECORD_SCHEMA)
    # after the estimate: the estimate is of the plan's answers, the swap only makes the delivered batch better,
    # by what count_delivered adds
    delivered, swapped = deliver_references(
        inputs.results, inputs.plan, inputs.audit_plan_rows, inputs.audit_results, inputs.queue
    )
    return delivered, count_delivered(audited, swapped, inputs.queue), references


def calls_made(storage: Storage, out_uri: str) -> pl.DataFrame:
    """Every call the dispatcher made for a run (query_id, model, answer, status), in call order, once each
    (a resumed run's ledger may hold a call twice)."""
    seen: set[tuple[str, str]] = set()
    rows = []
    for event in ledger_events(storage, dispatch_dir(out_uri)):
        if event.get("e") == "c" and (key := (str(event["q"]), str(event["c"]))) not in seen:
            seen.add(key)
            rows.append((key[0], str(event.get("m")), event.get("a"), str(event.get("s"))))
    schema = {"query_id": pl.String, "model": pl.String, "answer": pl.String, "status": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")


def batch_modes(job: Job, backend: Backend, predictions: pl.DataFrame) -> BatchModes:
    """The batch mode of ``job.backend`` for the planners: its LLMs' batch discounts, its turnaround, the deadline."""
    return backend_batch_modes(job.backend, backend, predictions, deadline=job.deadline)


def backend_batch_modes(
    name: str, backend: Backend, predictions: pl.DataFrame, *, deadline: float | None = None
) -> BatchModes:
    """``batch_modes`` from the backend's name (the DAGs have no Job): the batch terms of ``name``."""
    terms = batch_terms(name)
    models = sorted(predictions["model"].unique().to_list())
    if terms is None or not any(backend.catalog.batch_discount(m) is not None for m in models):
        raise ContractError(
            f"batch_api: the {name} backend has no batch API (those with one: {', '.join(sorted(BATCH_TERMS))})",
            fields=("batch_api",),
        )
    queries = predictions["query_id"].n_unique()  # below the per-job minimum no LLM can go by batch
    return BatchModes.from_catalog(backend.catalog, models, terms, queries=queries, deadline=deadline)


def round_batch_sender(job: Job, backend: Backend, output_caps: OutputCaps | None = None) -> RoundSender:
    """How ``job``'s rounds go by its backend's batch API (``backend_batch_sender``)."""
    return backend_batch_sender(
        job.backend,
        backend,
        job.out_uri,
        output_caps=output_caps,
        resume_cancelled=job.resume_cancelled,
        deadline=job.deadline,
    )


def backend_batch_sender(
    name: str,
    backend: Backend,
    run_uri: str,
    *,
    output_caps: OutputCaps | None = None,
    resume_cancelled: bool = False,
    deadline: float | None = None,
    airflow_conn_id: str | None = None,
) -> RoundSender:
    """Rounds by the batch API of the backend named ``name`` (rows the planner marks realtime go through the
    dispatcher): Bedrock batch inference, or the OpenAI Batch API (``run_uri``: where ``batchplan cancel``
    marks the run). The CLI and the DAGs build their senders here (the DAGs' Bedrock jobs with the clients of
    ``airflow_conn_id``, the backend's connection)."""
    if name == "bedrock":
        from batchplan.dispatchers.bedrock_batch import bedrock_batch_sender

        realtime = realtime_sender(backend, output_caps=output_caps)
        return bedrock_batch_sender(backend, realtime, deadline=deadline, airflow_conn_id=airflow_conn_id)  # type: ignore[arg-type]
    return batch_sender(backend, run_uri, resume_cancelled=resume_cancelled, deadline=deadline, output_caps=output_caps)


def _resume_or_plan(
    storage: Storage,
    plan_uri: str,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    templates: PlanTemplates,
    request: PlanRequest,
    audit: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A rerun into the same run directory keeps the plan it started with: re-planning could move a query to
    another model, and the dispatcher would then call (and pay) again for a query already answered. So a
    rerun must ask what the plan was made for: another budget or constraint would be reported but not
    enforced (the dispatcher follows the old plan), and is refused with the way to start a new run."""
    stem = plan_uri.removesuffix(".parquet")
    diagnostics_uri, request_uri = stem + ".optimizer.json", stem + ".request.json"
    if storage.exists(plan_uri):
        plan = storage.read_frame(plan_uri)
        if set(plan.filter(~is_audit())["query_id"].to_list()) != set(queue["query_id"].to_list()):
            raise ContractError(f"{plan_uri} holds the plan of another queue: write this run to a new --out directory")
        if not storage.exists(request_uri):
            raise ContractError(
                f"{plan_uri} has no record of the request it was planned for ({request_uri}): "
                "write this run to a new --out directory"
            )
        if changed := request_changes(json.loads(storage.read_text(request_uri)), request):
            raise ContractError(
                f"{plan_uri} was planned for another request ({'; '.join(changed)}): rerun with the settings it was "
                "planned for to resume it, or write this run to a new --out directory"
            )
        log.info("optimize", resumed=plan_uri, queries=plan.height)
        diagnostics = json.loads(storage.read_text(diagnostics_uri)) if storage.exists(diagnostics_uri) else {}
        return plan, {**diagnostics, "resumed_from": plan_uri}
    planned = plan_batch(build_candidates(queue, predictions, templates, request.kinds), request, templates, audit)
    storage.write_text(diagnostics_uri, json.dumps(planned.diagnostics, default=str))
    storage.write_text(request_uri, json.dumps(request_record(request), indent=2))
    write_frontier(storage, frontier_uri(plan_uri), plan_frontier(planned, request.budget_usd, request.method))
    storage.write_frame(planned.plan, plan_uri)  # last: a plan file always has its request beside it
    return planned.plan, planned.diagnostics
