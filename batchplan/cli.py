"""``batchplan``: the command line. Thin: parses flags, calls the pipeline, shows progress and the summary.

The commands ``train``, ``plan``, ``run`` and ``demo`` and their flags are the stable evaluation interface.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import polars as pl
import structlog
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batchplan.contracts import ContractError
from batchplan.settings import get_settings
from batchplan.storage import Storage, StorageError, join

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Plan and run a whole batch of LLM queries under one budget."
)
console = Console(stderr=True)


def _configure_logging(verbose: bool) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        # sys.stderr looked up per logger, not captured once: a stream swapped in (and closed) by a caller,
        # such as a test runner, must not break later logging
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
    )


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False) -> None:
    _configure_logging(verbose)


def _storage() -> Storage:
    settings = get_settings()
    return Storage(s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, number = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what}: expected NAME=VALUE, got {value!r}")
        out[key] = number
    return out


def _floats(values: list[str], what: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in _pairs(values, what).items()}
    except ValueError as error:
        raise typer.BadParameter(f"{what}: {error}") from error


@contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A progress bar in the terminal only; the callback takes (done, total)."""
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can fix are printed as one clear line with exit code 2, not a traceback."""
    from optimizer import InfeasibleError

    try:
        yield
    except (ContractError, StorageError, InfeasibleError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from error


def _request(
    *,
    budget_usd: float | None,
    accuracy_target: float | None,
    allow_deferral: bool,
    tenant_budget: list[str],
    max_calls: list[str],
    task_floor: list[str],
    allowed: list[str],
    kinds: str,
    label_error: list[str],
    label_error_mode: str,
) -> Any:
    from batchplan.planning import PlanRequest

    return PlanRequest(
        budget_usd=budget_usd,
        accuracy_target=accuracy_target,
        allow_deferral=allow_deferral,
        tenant_budgets_usd=_floats(tenant_budget, "--tenant-budget"),
        model_max_calls={k: int(v) for k, v in _floats(max_calls, "--max-calls").items()},
        task_accuracy_floors=_floats(task_floor, "--task-floor"),
        allowed_models={t: m.split(",") for t, m in _pairs(allowed, "--allow").items()},
        kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
        label_error_max=dict(_floats(label_error, "--label-error")),
        label_error_mode=label_error_mode,
    )


BudgetOpt = Annotated[float | None, typer.Option("--budget-usd", help="Global budget in USD for the whole batch.")]
TargetOpt = Annotated[
    float | None, typer.Option("--accuracy-target", help="Minimize cost subject to this expected accuracy.")
]
DeferOpt = Annotated[
    bool, typer.Option("--allow-deferral", help="Queries not worth their cost may wait for a later run.")
]
TenantOpt = Annotated[list[str], typer.Option("--tenant-budget", help="TENANT=USD, repeatable.")]
CallsOpt = Annotated[list[str], typer.Option("--max-calls", help="MODEL=N calls in this run's window, repeatable.")]
FloorOpt = Annotated[list[str], typer.Option("--task-floor", help="TASK=ACCURACY floor, repeatable.")]
LabelErrorOpt = Annotated[
    list[str],
    typer.Option("--label-error", help="TASK=ALPHA ('*' = every task): P(wrong | true label) <= ALPHA, repeatable."),
]
LabelModeOpt = Annotated[
    str, typer.Option("--label-error-mode", help="per_query (every plan meets it) or aggregate (the batch does).")
]
KindsOpt = Annotated[str, typer.Option("--plans", help="Plan kinds to choose from: single,vote,cascade,agreement.")]
AllowOpt = Annotated[
    list[str], typer.Option("--allow", help="TENANT=MODEL,MODEL: models a tenant may use, repeatable.")
]
BackendOpt = Annotated[str, typer.Option("--backend", help="Dispatcher backend: replay, openai, bedrock.")]
ReplayOpt = Annotated[
    list[str], typer.Option("--replay-history", help="Outcome history DIR the replay backend answers from.")
]
BaseUrlOpt = Annotated[
    str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
]
PricesOpt = Annotated[
    str | None, typer.Option("--prices", help="models.csv with usd_per_mtok_in/out for a live backend.")
]
VersionOpt = Annotated[str | None, typer.Option("--model-version", help="Predictor version (default: latest).")]


@app.command()
def train(
    history: Annotated[
        list[str],
        typer.Option(
            "--history", help="Outcome history DIR (queries.parquet, outcomes.parquet, models.csv); repeatable."
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Model registry root (local or s3://).")],
    predictor: Annotated[str, typer.Option("--predictor", help="Predictor name from the registry.")] = "lightgbm",
    holdout: Annotated[
        bool, typer.Option(help="Hold out a test split where a data set has none, and train on train rows only.")
    ] = True,
    plans: Annotated[bool, typer.Option(help="Also fit vote and cascade templates (cross-fits the predictor).")] = True,
) -> None:
    """Train a predictor (and its vote/cascade templates) on outcome histories; store it as a new version."""
    from batchplan import artifacts
    from batchplan.history import load_history, with_holdout

    settings = get_settings()
    storage = _storage()
    with _user_errors():
        loaded = load_history(history, storage)
        if holdout:
            loaded = with_holdout(loaded, settings.holdout_fraction, settings.seed).split("train")
        trained = artifacts.train(loaded, predictor=predictor, seed=settings.seed, plans=plans)
        uri = artifacts.save(trained, storage, out)
    console.print(
        f"trained {predictor} on {loaded.queries.height} queries x {len(loaded.models)} models, "
        f"{len(trained.templates.templates)} vote/cascade templates -> {uri}"
    )


@app.command()
def plan(
    queue: Annotated[
        str, typer.Option("--queue", help="Queue: parquet or jsonl file or directory of parts, local or s3://.")
    ],
    model: Annotated[str, typer.Option("--model", help="Model registry root written by `batchplan train`.")],
    out: Annotated[str, typer.Option("--out", help="Plan file to write (.parquet or .jsonl).")],
    budget_usd: BudgetOpt = None,
    accuracy_target: TargetOpt = None,
    allow_deferral: DeferOpt = False,
    tenant_budget: TenantOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    max_calls: CallsOpt = [],  # noqa: B006
    task_floor: FloorOpt = [],  # noqa: B006
    allow: AllowOpt = [],  # noqa: B006
    plans: KindsOpt = "single,vote,cascade,agreement",
    label_error: LabelErrorOpt = [],  # noqa: B006
    label_error_mode: LabelModeOpt = "per_query",
    backend: Annotated[
        str | None, typer.Option("--backend", help="Plan for this backend's models (default: the predictor's).")
    ] = None,
    replay_history: ReplayOpt = [],  # noqa: B006
    base_url: BaseUrlOpt = None,
    prices: PricesOpt = None,
    model_version: VersionOpt = None,
) -> None:
    """Plan the batch: one plan per query, under the budget and constraints. Writes the plan; calls nothing."""
    from batchplan import artifacts, pipeline

    storage = _storage()
    with _user_errors():
        request = _request(
            budget_usd=budget_usd,
            accuracy_target=accuracy_target,
            allow_deferral=allow_deferral,
            tenant_budget=tenant_budget,
            max_calls=max_calls,
            task_floor=task_floor,
            allowed=allow,
            kinds=plans,
            label_error=label_error,
            label_error_mode=label_error_mode,
        )
        ingested = pipeline.ingest(queue, storage, out_uri=None)
        if ingested.quarantine.height:
            quarantine_uri = out.rsplit(".", 1)[0] + ".quarantine.parquet"
            storage.write_frame(ingested.quarantine, quarantine_uri)
            console.print(f"quarantined {ingested.quarantine.height} rows -> {quarantine_uri}")
        chosen_backend = (
            pipeline.make_backend(
                backend, storage=storage, replay_history=replay_history, base_url=base_url, prices_uri=prices
            )
            if backend
            else None
        )
        trained = artifacts.load(storage, model, version=model_version)
        predictions = pipeline.predict(ingested.queue, trained.predictor, chosen_backend)
        outcome = pipeline.optimize(
            pipeline.build_candidates(ingested.queue, predictions, trained.templates, request.kinds),
            request,
            trained.templates,
        )
        storage.write_frame(outcome.plan, out)
    d = outcome.diagnostics
    cost = outcome.plan.select(pl.col("expected_cost_usd").sum()).item()
    accuracy = outcome.plan.select(pl.col("expected_accuracy").mean()).item() or 0.0
    console.print(
        f"planned {outcome.plan.height} queries: expected cost ${cost:.4f}, expected accuracy {accuracy:.1%}, "
        f"status {d['status']}, gap {d['gap']:.2e}, spend margin ${d['spend_margin_usd']:.4f} -> {out}"
    )


@app.command()
def run(
    queue: Annotated[
        str, typer.Option("--queue", help="Queue: parquet or jsonl file or directory of parts, local or s3://.")
    ],
    model: Annotated[str, typer.Option("--model", help="Model registry root written by `batchplan train`.")],
    out: Annotated[str, typer.Option("--out", help="Run directory: plan, dispatch ledger, results.parquet, report.")],
    budget_usd: BudgetOpt = None,
    accuracy_target: TargetOpt = None,
    allow_deferral: DeferOpt = False,
    tenant_budget: TenantOpt = [],  # noqa: B006
    max_calls: CallsOpt = [],  # noqa: B006
    task_floor: FloorOpt = [],  # noqa: B006
    allow: AllowOpt = [],  # noqa: B006
    plans: KindsOpt = "single,vote,cascade,agreement",
    label_error: LabelErrorOpt = [],  # noqa: B006
    label_error_mode: LabelModeOpt = "per_query",
    backend: BackendOpt = "replay",
    replay_history: ReplayOpt = [],  # noqa: B006
    base_url: BaseUrlOpt = None,
    prices: PricesOpt = None,
    model_version: VersionOpt = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Name shown in the report.")] = None,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds", min=1, help="Execute in N rounds, re-planned after each under what is left (1: single shot)."
        ),
    ] = 1,
    round_planner: Annotated[
        str, typer.Option("--round-planner", help="Who plans each round: plan (the plan's kinds, step by step).")
    ] = "plan",
) -> None:
    """Plan and dispatch the batch; rerunning the same command resumes without paying twice."""
    from batchplan.pipeline import Job, run_job
    from batchplan.report import render_markdown

    storage = _storage()
    with _user_errors():
        job = Job(
            queue_uri=queue,
            model_uri=model,
            out_uri=out,
            request=_request(
                budget_usd=budget_usd,
                accuracy_target=accuracy_target,
                allow_deferral=allow_deferral,
                tenant_budget=tenant_budget,
                max_calls=max_calls,
                task_floor=task_floor,
                allowed=allow,
                kinds=plans,
                label_error=label_error,
                label_error_mode=label_error_mode,
            ),
            backend=backend,
            replay_history=replay_history,
            base_url=base_url,
            prices_uri=prices,
            model_version=model_version,
            run_id=run_id,
            rounds=rounds,
            round_planner=round_planner,
        )
        with _progress("dispatch") as progress:
            outcome = run_job(job, storage, progress=progress)
    typer.echo(render_markdown(outcome.report))
    console.print(f"wrote {', '.join(outcome.paths.values())}")


@app.command()
def demo(
    budget_fraction: Annotated[float, typer.Option(help="Budget as a share of the best single model's cost.")] = 0.3,
    out: Annotated[str | None, typer.Option("--out", help="Where to write (default: <work_dir>/demo).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The main job on the bundled data: train on train splits, plan + replay the test splits under a budget."""
    from batchplan.demo import run_demo
    from batchplan.report import render_markdown

    settings = get_settings()
    with _user_errors(), _progress("dispatch") as progress:
        outcome, context = run_demo(
            settings, _storage(), budget_fraction=budget_fraction, out_uri=out, progress=progress
        )
    if as_json:
        typer.echo(json.dumps({"context": context, "report": outcome.report}, indent=2, default=str))
        return
    typer.echo(
        f"data: {context['data']}; {context['queries']} test queries; budget ${context['budget_usd']:.4f} = "
        f"{context['budget_fraction']:.0%} of the best single models' cost ${context['best_single_cost_usd']:.4f}"
    )
    typer.echo(render_markdown(outcome.report))
    typer.echo(f"report: {outcome.paths['html']}")


@app.command("show-report")
def show_report(run_dir: Annotated[str, typer.Argument(help="Run directory written by `batchplan run`.")]) -> None:
    """Print a run's report."""
    storage = _storage()
    with _user_errors():
        typer.echo(storage.read_text(join(run_dir, "report.md")))
