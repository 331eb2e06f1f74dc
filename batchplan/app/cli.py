"""``batchplan``: the command line. Thin: parses flags, calls the pipeline, shows progress and the summary.

The commands ``train``, ``plan``, ``run`` and ``demo`` and their flags are the stable evaluation interface.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.core import Context, Parameter  # typer (0.29) vendors click: its types live in typer._click
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperCommand, TyperGroup

from batchplan.core.errors import UserError
from batchplan.core.request import DEFAULT_ROUND_PLANNER, DEFAULT_RUN_ROUNDS, PlanRequest

# Heavy modules (polars, structlog, pydantic, LightGBM, the solvers) are imported inside the commands, after
# the flags are parsed and the request checked: a mistyped flag is answered at once.
if TYPE_CHECKING:
    from batchplan.core.storage import Storage

# The request's fields (named in library errors, which are also the DAG params) as this CLI's flags.
FLAGS = {
    "budget_usd": "--budget-usd",
    "accuracy_target": "--accuracy-target",
    "allow_deferral": "--allow-deferral",
    "tenant_budgets_usd": "--tenant-budget",
    "model_max_calls": "--max-calls",
    "task_accuracy_floors": "--task-floor",
    "allowed_models": "--allow",
    "kinds": "--kinds",
    "label_error_max": "--label-error",
    "label_error_mode": "--label-error-mode",
    "backend": "--backend",
    "replay_history": "--replay-history",
    "history": "--replay-history",  # the replay backend's setting
    "base_url": "--base-url",
    "catalog": "--prices",
    "predictor_version": "--predictor-version",
    "predictor": "--predictor",
    "rounds": "--rounds",
    "audit_share": "--audit-share",
    "audit_spend_share": "--audit-spend-share",
    "explore_share": "--explore-share",
    "batch_api": "--batch-api",
    "round_planner": "--round-planner",
    "deadline": "--deadline",
}


def _no_value_shown(params: list[Parameter]) -> list[Parameter]:
    """typer renders ``<bool>`` after every flag, as if it took a value: an empty metavar says it takes none."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


def _renamed(args: list[str], aliases: dict[str, str]) -> list[str]:
    """The old spelling of a renamed flag as its new one (``--old VALUE`` and ``--old=VALUE``), up to ``--``.

    The options are declared under their new names only, so ``--help`` and every error name just those."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if name in aliases:
            console.print(
                f"note: {name} is now {aliases[name]}; the old name goes in the next release", highlight=False, soft_wrap=True
            )
            arg = aliases[name] + eq + value
        out.append(arg)
    return out


class _Command(TyperCommand):
    # Flags renamed to the glossary's nouns (batchplan/core/contracts.py), still read under their old names for a
    # release: old name -> new name.
    aliases: ClassVar[dict[str, str]] = {}

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _no_value_shown(super().get_params(ctx))

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _renamed(args, self.aliases))


class _TrainCommand(_Command):
    aliases: ClassVar[dict[str, str]] = {"--plans": "--templates", "--no-plans": "--no-templates"}


class _PlanCommand(_Command):
    aliases: ClassVar[dict[str, str]] = {
        "--model": "--predictors",
        "--plans": "--kinds",
        "--model-version": "--predictor-version",
    }


class _Group(TyperGroup):
    """Usage errors (a missing option, a value of the wrong type, an unknown command) as one line, exit 2,
    like every other error a user can fix, instead of typer's usage lines and framed panel."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _no_value_shown(super().get_params(ctx))

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def main(standalone: bool) -> Any:
            return super(_Group, self).main(args, prog_name, complete_var, standalone, windows_expand_args, **extra)

        if not standalone_mode:
            return main(standalone=False)
        try:
            code = main(standalone=False)
        except NoArgsIsHelpError as error:  # bare `batchplan`: the help, as before
            error.show()
            sys.exit(error.exit_code)
        except UsageError as error:
            where = f" (see: {error.ctx.command_path} --help)" if error.ctx is not None else ""
            console.print(f"[bold red]error:[/] {escape(error.format_message() + where)}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Plan and run a whole batch of LLM queries under one budget.",
    epilog="Start with: batchplan demo. Each command's --help ends with an example.",
)
console = Console(stderr=True)
_verbose = {"on": False}


def _configure_logging(verbose: bool) -> None:
    import logging

    import structlog

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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"batchplan {version('batchplan')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _verbose["on"] = verbose


def _storage() -> Storage:
    from batchplan.core.settings import get_settings
    from batchplan.core.storage import Storage

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


def _say_quarantined(rows: int, uri: str) -> None:
    """Where the refused rows went (each with its reason), from every command that ingests a queue."""
    console.print(f"quarantined {rows} rows -> {uri}", highlight=False, soft_wrap=True)


@contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A progress bar in the terminal only; the callback takes (done, total)."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def _user_errors() -> Iterator[None]:
    """Every command runs inside this: logs set up, and an error a user can fix (any ``UserError``: a bad
    flag or file, storage out of reach, a run held by another process, an infeasible request) printed as
    one line naming the flag, exit code 2, not a traceback."""
    _configure_logging(_verbose["on"])
    try:
        yield
    except UserError as error:
        console.print(f"[bold red]error:[/] {escape(error.worded(FLAGS))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from error


def _check_backend(backend: str | None, *, replay_history: list[str], prices: str | None, base_url: str | None) -> None:
    """The backend's name and the flags it needs, before the heavy imports (the registry is light); the
    files stand for what they will be read into (the replay history, the price catalog)."""
    if backend is not None:
        from batchplan.dispatchers import check_backend

        check_backend(backend, history=replay_history or None, catalog=prices, base_url=base_url)


GOAL = "One of --budget-usd / --accuracy-target is required; with both, the target is a floor under the budget."
BudgetOpt = Annotated[
    float | None,
    typer.Option("--budget-usd", help="Global budget in USD for the whole batch: maximize accuracy under it. " + GOAL),
]
TargetOpt = Annotated[
    float | None,
    typer.Option("--accuracy-target", help="Mean expected accuracy in (0, 1]: the cheapest plan reaching it. " + GOAL),
]
DeferOpt = Annotated[
    bool,
    typer.Option("--allow-deferral", help="Queries not worth their cost may wait for a later run (status deferred)."),
]
TenantOpt = Annotated[list[str], typer.Option("--tenant-budget", help="TENANT=USD, a hard cap within the total; repeatable.")]
CallsOpt = Annotated[list[str], typer.Option("--max-calls", help="MODEL=N calls in this run's window, repeatable.")]
FloorOpt = Annotated[list[str], typer.Option("--task-floor", help="TASK=ACCURACY floor, repeatable.")]
LabelErrorOpt = Annotated[
    list[str],
    typer.Option("--label-error", help="TASK=ALPHA ('*' = every task): P(wrong | true label) <= ALPHA, repeatable."),
]
LabelModeOpt = Annotated[
    str, typer.Option("--label-error-mode", help="per_query (every plan meets it) or aggregate (the batch does).")
]
KindsOpt = Annotated[str, typer.Option("--kinds", help="Plan kinds to choose from: single,vote,cascade,agreement.")]
UnusedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unused-constraints",
        help="Accept constraints naming a tenant, model or task not in this batch (the report lists them); "
        "without it such a name is refused as a typo.",
    ),
]
AllowOpt = Annotated[
    list[str], typer.Option("--allow", help="TENANT=MODEL,MODEL: models a tenant may use, repeatable.")
]
BackendOpt = Annotated[str, typer.Option("--backend", help="Dispatcher backend: replay, openai, bedrock.")]
ReplayOpt = Annotated[
    list[str], typer.Option("--replay-history", help="Outcome history DIR the replay backend answers from; repeatable.")
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        help="Endpoint of a live backend: OpenAI-compatible for openai (e.g. http://127.0.0.1:8000/v1), "
        "a Bedrock runtime URL for bedrock. Required for openai.",
    ),
]
PricesOpt = Annotated[
    str | None,
    typer.Option(
        "--prices", help="models.csv (model, usd_per_mtok_in, usd_per_mtok_out): required for openai and bedrock."
    ),
]
VersionOpt = Annotated[
    str | None,
    typer.Option(
        "--predictor-version",
        help="Predictor version under --predictors (default: the promoted one in <predictors>/CURRENT.json, else the "
        "newest).",
    ),
]
QueueOpt = Annotated[
    str, typer.Option("--queue", help="Queue: parquet or jsonl file or directory of parts, local or s3://.")
]
PredictorsOpt = Annotated[
    str, typer.Option("--predictors", help="Predictor registry root written by `batchplan train`.")
]
RoundsOpt = Annotated[
    int | None,
    typer.Option(
        "--rounds",
        min=1,
        help="Execute in N rounds, re-planned after each under what is left (1: single shot). Default 3 (1 when the "
        "round planner cannot hold a constraint asked for, such as --max-calls with --round-planner plan): 3 rounds "
        "of the plan measured best, as single shot when nothing fails, and what failed is re-called instead of "
        "deferred (README, Rounds).",
    ),
]
AuditShareOpt = Annotated[
    float | None,
    typer.Option(
        "--audit-share",
        help="Share of the queries (a uniform sample seeded by the run id) that also get a reference answer, paid "
        "from the budget: the report's accuracy estimate without gold, and drift. Default 0.05 for a live "
        "backend, 0 for replay and for runs in rounds.",
    ),
]
AuditSpendShareOpt = Annotated[
    float | None,
    typer.Option(
        "--audit-spend-share",
        help="At most this share of the budget on the audits' reference answers: the sample, in its random "
        "order, stops where they would pass it (still uniform, smaller). Default 0.05 with the live default "
        "audit share, none when --audit-share is given.",
    ),
]
ExploreShareOpt = Annotated[
    float | None,
    typer.Option(
        "--explore-share",
        help="At most this share of the budget on exploration: calls of the LLMs the audit's reference does not "
        "call, on the audit sample's queries (the report lists them under audit.exploration.label_first: label "
        "those first), so labels and silver reach LLMs the plan never calls. Default: while the labels of past "
        "runs put an LLM outside the history's interval, 0.10 of the drifted tasks' part of the budget, on their "
        "queries (the report says why), else none; 0 turns it off.",
    ),
]
BatchApiOpt = Annotated[
    bool,
    typer.Option(
        "--batch-api",
        help="Send each round's calls as provider batch jobs (OpenAI Batch API: half the price, results within 24h) "
        "unless the round planner marks them realtime; runs in rounds (give --rounds N for cascades' later steps).",
    ),
]
ResumeCancelledOpt = Annotated[
    bool,
    typer.Option("--resume-cancelled", help="Submit batches again in a run stopped by `batchplan cancel`."),
]
DeadlineOpt = Annotated[
    str | None,
    typer.Option(
        "--deadline",
        help="When the run must be done, for batch rounds: a duration (6h, 90m) or an hour of the day (06:00 local, "
        "06:00Z UTC). Rounds go by batch while their typical turnaround fits; the last goes in real time.",
    ),
]
RoundPlannerOpt = Annotated[
    str,
    typer.Option(
        "--round-planner",
        help="Who plans each round: plan (the single-shot plan's kinds, step by step), posterior (every open query "
        "re-planned by the optimizer from a posterior fitted on the history) or per_task (the default: the "
        "posterior for tasks whose history has logprobs no cascade template uses, the plan for the rest).",
    ),
]



@dataclasses.dataclass(frozen=True)
class RequestFlags:
    """The request's flags, which ``plan`` and ``run`` share: declared once here, spread into each command's
    options by ``_spread`` (a command takes them as one parameter of this type)."""

    budget_usd: BudgetOpt = None
    accuracy_target: TargetOpt = None
    allow_deferral: DeferOpt = False
    tenant_budget: TenantOpt = dataclasses.field(default_factory=list)
    max_calls: CallsOpt = dataclasses.field(default_factory=list)
    task_floor: FloorOpt = dataclasses.field(default_factory=list)
    allow: AllowOpt = dataclasses.field(default_factory=list)
    kinds: KindsOpt = "single,vote,cascade,agreement"
    label_error: LabelErrorOpt = dataclasses.field(default_factory=list)
    label_error_mode: LabelModeOpt = "per_query"
    allow_unused_constraints: UnusedOpt = False

    def request(self) -> PlanRequest:
        return PlanRequest(
            budget_usd=self.budget_usd,
            accuracy_target=self.accuracy_target,
            allow_deferral=self.allow_deferral,
            tenant_budgets_usd=_floats(self.tenant_budget, "--tenant-budget"),
            model_max_calls={k: int(v) for k, v in _floats(self.max_calls, "--max-calls").items()},
            task_accuracy_floors=_floats(self.task_floor, "--task-floor"),
            allowed_models={t: m.split(",") for t, m in _pairs(self.allow, "--allow").items()},
            kinds=tuple(k.strip() for k in self.kinds.split(",") if k.strip()),
            label_error_max=dict(_floats(self.label_error, "--label-error")),
            label_error_mode=self.label_error_mode,
            allow_unused_constraints=self.allow_unused_constraints,
        )


@dataclasses.dataclass(frozen=True)
class SourceFlags:
    """Where ``plan`` and ``run`` read the backend's answers and prices and the predictor's version from."""

    replay_history: ReplayOpt = dataclasses.field(default_factory=list)
    base_url: BaseUrlOpt = None
    prices: PricesOpt = None
    predictor_version: VersionOpt = None


def _spread(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with each parameter typed as a flags dataclass (``RequestFlags``, ``SourceFlags``) spread
    into that dataclass's fields, as options where the parameter stands (``--help`` lists them in that
    order), and gathered back into one value of it for each call."""
    hints = typing.get_type_hints(command, include_extras=True)
    options: list[inspect.Parameter] = []
    groups: dict[str, tuple[Any, list[str]]] = {}
    for name, param in inspect.signature(command).parameters.items():
        kind = hints[name]
        if not dataclasses.is_dataclass(kind):
            options.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))
            continue
        types = typing.get_type_hints(kind, include_extras=True)
        for f in dataclasses.fields(kind):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]
            options.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=types[f.name]))
        groups[name] = (kind, [f.name for f in dataclasses.fields(kind)])

    @functools.wraps(command)
    def spread(**values: Any) -> None:
        for name, (kind, names) in groups.items():
            values[name] = kind(**{n: values.pop(n) for n in names})
        command(**values)

    spread.__signature__ = inspect.Signature(options)  # type: ignore[attr-defined]
    spread.__annotations__ = {p.name: p.annotation for p in options}
    return spread


@app.command(
    cls=_TrainCommand,
    epilog="Example: batchplan train --history examples/history --out models/",
)
def train(
    history: Annotated[
        list[str],
        typer.Option(
            "--history", help="Outcome history DIR (queries.parquet, outcomes.parquet, models.csv); repeatable."
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Predictor registry root (local or s3://).")],
    predictor: Annotated[str, typer.Option("--predictor", help="Predictor name from the registry.")] = "lightgbm",
    holdout: Annotated[
        bool,
        typer.Option(
            "--holdout/--no-holdout",
            help="Hold out a test split where a data set has none, and train on train rows only.",
        ),
    ] = True,
    templates: Annotated[
        bool,
        typer.Option(
            "--templates/--no-templates", help="Also fit vote and cascade templates (cross-fits the predictor)."
        ),
    ] = True,
    from_run: Annotated[
        list[str],
        typer.Option(
            "--from-run",
            help="Run directory (or a DAG run's outcomes/<run>/) whose labelled outcomes join the training "
            "history: gold at full weight, audited silver lower; repeatable.",
        ),
    ] = [],  # noqa: B006
) -> None:
    """Train a predictor (and its vote/cascade templates) on outcome histories; store it as a new version."""
    with _user_errors():
        from batchplan.app import artifacts
        from batchplan.app.outcomes import runs_history
        from batchplan.core.contracts import GOLD, SILVER
        from batchplan.core.history import combine_histories, load_history, with_holdout
        from batchplan.core.settings import get_settings

        settings = get_settings()
        storage = _storage()
        loaded = load_history(history, storage)
        if holdout:
            loaded = with_holdout(loaded, settings.holdout_fraction, settings.seed).split("train")
        if from_run:  # after the holdout: a run's labels are all for training, none is held out
            runs = runs_history(storage, from_run)
            only_runs = sorted(set(runs.models) - set(loaded.models))
            console.print(
                f"from {len(from_run)} runs: {int((runs.outcomes['label_source'] == GOLD).sum())} gold and "
                f"{int((runs.outcomes['label_source'] == SILVER).sum())} silver outcomes"
                + (f"; LLMs seen only in runs: {', '.join(only_runs)}" if only_runs else ""),
                highlight=False,
                soft_wrap=True,
            )
            loaded = combine_histories([loaded, runs])
        trained = artifacts.train(loaded, predictor=predictor, seed=settings.seed, templates=templates)
        uri = artifacts.save(trained, storage, out)
    console.print(
        f"trained {predictor} on {loaded.queries.height} queries x {len(loaded.models)} models, "
        f"{len(trained.templates.templates)} vote/cascade templates -> {uri}",
        highlight=False,
        soft_wrap=True,
    )


@app.command(
    cls=_PlanCommand,
    epilog="Example: batchplan plan --queue examples/queue.jsonl --predictors models/ --budget-usd 0.002 "
    "--out runs/plan.parquet",
)
@_spread
def plan(
    queue: QueueOpt,
    predictors: PredictorsOpt,
    out: Annotated[str, typer.Option("--out", help="Plan file to write (.parquet or .jsonl).")],
    flags: RequestFlags,
    backend: Annotated[
        str | None, typer.Option("--backend", help="Plan for this backend's models (default: the predictor's).")
    ] = None,
    source: SourceFlags = SourceFlags(),
) -> None:
    """Plan the batch: one plan per query, under the budget and constraints. Writes the plan; calls nothing."""
    with _user_errors():
        request = flags.request()
        _check_backend(backend, replay_history=source.replay_history, prices=source.prices, base_url=source.base_url)
        import polars as pl

        from batchplan.app import pipeline
        from batchplan.app.ingest import Ingested
        from batchplan.app.report import Report, notes
        from batchplan.core.contracts import UNANSWERABLE

        storage = _storage()
        chosen_backend = (
            pipeline.make_backend(
                backend, storage=storage, replay_history=source.replay_history, base_url=source.base_url, prices_uri=source.prices
            )
            if backend
            else None
        )

        def quarantine(ingested: Ingested) -> None:
            if ingested.quarantine.height:
                quarantine_uri = out.rsplit(".", 1)[0] + ".quarantine.parquet"
                storage.write_frame(ingested.quarantine, quarantine_uri)
                _say_quarantined(ingested.quarantine.height, quarantine_uri)

        planned = pipeline.plan_queue(
            queue,
            storage,
            predictors,
            request,
            backend=chosen_backend,
            version=source.predictor_version,
            on_ingested=quarantine,
        )
        for line in notes(Report(unseen_tasks=pipeline.unseen_tasks(planned.ingested.queue, planned.trained.predictor))):
            console.print(f"note: {line}")
        outcome = planned.outcome
        storage.write_frame(outcome.plan, out)
    d = outcome.diagnostics
    cost = outcome.plan.select(pl.col("expected_cost_usd").sum()).item()
    accuracy = outcome.plan.select(pl.col("expected_accuracy").mean()).item() or 0.0
    console.print(
        f"planned {outcome.plan.height} queries: expected cost ${cost:.4f}, expected accuracy {accuracy:.1%}, "
        f"status {d['status']}, gap {d['gap']:.2e}, spend margin ${d['spend_margin_usd']:.4f} -> {out}",
        highlight=False,
        soft_wrap=True,
    )
    if unanswerable := int((outcome.plan["kind"] == UNANSWERABLE).sum()):
        console.print(f"note: {unanswerable} queries no offered model can answer (plan kind {UNANSWERABLE!r})")


@app.command(
    cls=_PlanCommand,
    epilog="Example: batchplan run --queue examples/queue.jsonl --predictors models/ --budget-usd 0.002 "
    "--backend replay --replay-history examples/history --out runs/r1",
)
@_spread
def run(
    queue: QueueOpt,
    predictors: PredictorsOpt,
    out: Annotated[str, typer.Option("--out", help="Run directory: plan, dispatch ledger, results.parquet, report.")],
    flags: RequestFlags,
    backend: BackendOpt = "replay",
    source: SourceFlags = SourceFlags(),
    run_id: Annotated[str | None, typer.Option("--run-id", help="Name shown in the report.")] = None,
    rounds: RoundsOpt = None,
    round_planner: RoundPlannerOpt = DEFAULT_ROUND_PLANNER,
    audit_share: AuditShareOpt = None,
    audit_spend_share: AuditSpendShareOpt = None,
    explore_share: ExploreShareOpt = None,
    batch_api: BatchApiOpt = False,
    resume_cancelled: ResumeCancelledOpt = False,
    deadline: DeadlineOpt = None,
) -> None:
    """Plan and dispatch the batch; rerunning the same command resumes without paying twice."""
    with _user_errors():
        from batchplan.core.request import deadline_at

        deadline_ts = deadline_at(deadline) if deadline is not None else None
        request = flags.request()
        from batchplan.core.request import default_audit_share, default_audit_spend_share

        request = dataclasses.replace(
            request,
            audit_share=default_audit_share(audit_share, backend),
            audit_spend_share=default_audit_spend_share(audit_spend_share, audit_share, backend),
            explore_share=explore_share,
        )
        _check_backend(backend, replay_history=source.replay_history, prices=source.prices, base_url=source.base_url)
        if batch_api:
            from batchplan.app.pipeline import check_batch_api

            check_batch_api(backend)
        from batchplan.app.pipeline import Job, run_job
        from batchplan.app.report import Report, render_markdown

        job = Job(
            queue_uri=queue,
            predictors_uri=predictors,
            out_uri=out,
            request=request,
            backend=backend,
            replay_history=source.replay_history,
            base_url=source.base_url,
            prices_uri=source.prices,
            predictor_version=source.predictor_version,
            run_id=run_id,
            rounds=rounds,  # None: the default (``planning.default_rounds``, resolved by run_job)
            round_planner=round_planner,
            batch_api=batch_api,
            resume_cancelled=resume_cancelled,
            deadline=deadline_ts,
        )
        with _progress("dispatch") as progress:
            outcome = run_job(job, _storage(), progress=progress)
    typer.echo(render_markdown(Report.from_json(outcome.report)))
    if outcome.report["quarantined"]:
        from batchplan.core.storage import join

        _say_quarantined(outcome.report["quarantined"], join(out, "quarantine.parquet"))
    console.print(f"wrote {', '.join(outcome.paths.values())}", highlight=False, soft_wrap=True)


@app.command(cls=_Command, epilog="Example: batchplan demo --budget-fraction 0.5")
def demo(
    budget_fraction: Annotated[
        float, typer.Option("--budget-fraction", help="Budget as a share of the best single model's cost.")
    ] = 0.3,
    out: Annotated[str | None, typer.Option("--out", help="Where to write (default: <work_dir>/demo).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    # the demo runs in rounds, as many as run's default (posterior rounds beat single shot on the bundled data)
    rounds: RoundsOpt = DEFAULT_RUN_ROUNDS,
    round_planner: RoundPlannerOpt = "posterior",
) -> None:
    """The main job on the bundled data: train on train splits, plan + replay the test splits under a budget."""
    with _user_errors(), _progress("dispatch") as progress:
        from batchplan.app.demo import run_demo
        from batchplan.app.report import Report, render_markdown
        from batchplan.core.settings import get_settings

        outcome, context = run_demo(
            get_settings(),
            _storage(),
            budget_fraction=budget_fraction,
            out_uri=out,
            progress=progress,
            rounds=rounds or DEFAULT_RUN_ROUNDS,  # --rounds' help says run's default: the demo's is the same
            round_planner=round_planner,
        )
    if as_json:
        typer.echo(json.dumps({"context": context, "report": outcome.report}, indent=2, default=str))
        return
    typer.echo(
        f"data: {context['data']}; {context['queries']} test queries; budget ${context['budget_usd']:.4f} = "
        f"{context['budget_fraction']:.0%} of the best single models' cost ${context['best_single_cost_usd']:.4f}"
    )
    typer.echo(render_markdown(Report.from_json(outcome.report)))
    typer.echo(f"report: {outcome.paths['html']}")


@app.command("label", cls=_Command, epilog="Example: batchplan label runs/r1 labels.csv")
def label(
    run_dir: Annotated[str, typer.Argument(help="Run directory written by `batchplan run`.")],
    file: Annotated[str, typer.Argument(help="Labels: CSV, JSONL or parquet with query_id and gold columns.")],
) -> None:
    """Join late labels into a past run: its outcomes get their correctness, its report the measured accuracy."""
    with _user_errors():
        from batchplan.app.labels import join_labels, read_label_file

        storage = _storage()
        got = join_labels(storage, run_dir, read_label_file(storage, file), source_file=file)
    console.print(got.line(), highlight=False, soft_wrap=True)


@app.command(cls=_Command, epilog="Example: batchplan cancel runs/r1")
def cancel(run_dir: Annotated[str, typer.Argument(help="Run directory written by `batchplan run --batch-api`.")]) -> None:
    """Cancel the run's open batch jobs at their provider and mark the run, so that a rerun submits no new
    batch unless given --resume-cancelled (what the cancelled batches finished is kept and paid once)."""
    with _user_errors():
        from batchplan.dispatchers.batch import cancel_run

        cancelled = cancel_run(_storage(), run_dir)
    for job in cancelled:
        typer.echo(f"{job['batch']} ({job['job']}): {job.get('status')}{' - ' + job['error'] if job.get('error') else ''}")
    typer.echo(f"cancelled {len(cancelled)} open batch job(s); {run_dir} is marked: rerun with --resume-cancelled to go on")


@app.command("show-report", cls=_Command, epilog="Example: batchplan show-report runs/r1")
def show_report(run_dir: Annotated[str, typer.Argument(help="Run directory written by `batchplan run`.")]) -> None:
    """Print a run's report."""
    with _user_errors():
        from batchplan.core.storage import join

        typer.echo(_storage().read_text(join(run_dir, "report.md")))
