"""The optimize stage: turn what the user asks (budget, target, tenant budgets, capacities, floors, allowed
models, deferral) into an optimizer problem over plan candidates, and read the solution back as plan rows.

The optimizer itself knows nothing of LLMs; this module is the translation layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.candidates import Candidates
from batchplan.contracts import PLAN_KINDS, PLAN_SCHEMA, ContractError
from batchplan.plan_templates import PlanTemplates
from optimizer import (
    AccuracyFloor,
    Budget,
    Capacity,
    GroupBudget,
    InfeasibleError,
    Problem,
    Solution,
    solve,
)
from optimizer.api import Method
from optimizer.problem import Objective

log = structlog.get_logger("batchplan")


@dataclass
class PlanRequest:
    """What the user asks for one batch. Either ``budget_usd`` (maximize accuracy) or ``accuracy_target``
    (minimize cost), or both (maximize accuracy under the budget with the target as a floor)."""

    budget_usd: float | None = None
    accuracy_target: float | None = None
    allow_deferral: bool = False
    tenant_budgets_usd: dict[str, float] = field(default_factory=dict)
    model_max_calls: dict[str, int] = field(default_factory=dict)
    task_accuracy_floors: dict[str, float] = field(default_factory=dict)
    allowed_models: dict[str, list[str]] = field(default_factory=dict)  # tenant -> models (data residency)
    kinds: tuple[str, ...] = PLAN_KINDS  # plan kinds the optimizer may choose from
    # Statewise error bound: task ("*" = every task) -> alpha, or label -> alpha, bounding
    # P(wrong | true label = y) <= alpha_y. Mode "per_query": only plans that meet it are offered; "aggregate":
    # the batch as a whole meets it (a linear constraint per task and label).
    label_error_max: dict[str, float | dict[str, float]] = field(default_factory=dict)
    label_error_mode: str = "per_query"
    # Plan so that realized spend stays within the budget with this probability (normal approximation over
    # the plans' cost variances): a query deferred by the dispatcher's hard stop is a lost answer.
    spend_confidence: float = 0.95
    method: Method = "auto"

    def __post_init__(self) -> None:
        if self.budget_usd is None and self.accuracy_target is None:
            raise ContractError("give a budget (budget_usd) or an accuracy target (accuracy_target), or both")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ContractError(f"budget_usd must be >= 0, got {self.budget_usd}")
        if self.accuracy_target is not None and not 0 < self.accuracy_target <= 1:
            raise ContractError(f"accuracy_target must be in (0, 1], got {self.accuracy_target}")
        if self.label_error_mode not in ("per_query", "aggregate"):
            raise ContractError(f"label_error_mode must be 'per_query' or 'aggregate', got {self.label_error_mode!r}")
        unknown = set(self.kinds) - set(PLAN_KINDS)
        if unknown or "single" not in self.kinds:
            raise ContractError(f"plan kinds must include 'single' and be among {PLAN_KINDS}; got {self.kinds}")


@dataclass(frozen=True)
class PlanOutcome:
    plan: pl.DataFrame  # PLAN_SCHEMA, one row per query; kind "defer" for deferred queries
    solution: Solution
    spend_margin_usd: float = 0.0
    templates_withheld: list[str] = field(default_factory=list)  # tasks whose votes/cascades this budget left out

    @property
    def diagnostics(self) -> dict[str, Any]:
        s = self.solution
        return {
            "method": s.method,
            "status": s.status,
            "objective": s.objective,
            "bound": s.bound,
            "gap": s.gap,
            "solve_seconds": round(s.solve_seconds, 3),
            "shadow_prices": s.shadow_prices,
            "binding": s.binding,
            "spend_margin_usd": self.spend_margin_usd,
            "templates_withheld": self.templates_withheld,
        }


def restrict_allowed(candidates: Candidates, allowed_models: dict[str, list[str]]) -> Candidates:
    """Drop candidates that call a model the query's tenant may not use."""
    if not allowed_models:
        return candidates
    limited = list(allowed_models)
    allowed = np.array([[m in set(allowed_models[t]) for m in candidates.llms] for t in limited], dtype=bool)
    calls = candidates.calls() > 0
    # (limited tenant, template): every member allowed; a last row of True for the tenants without a list
    ok = np.vstack([~(calls[None, :, :] & ~allowed[:, None, :]).any(axis=2), np.ones((1, len(calls)), dtype=bool)])
    tenant = (
        candidates.queries["tenant"]
        .replace_strict(limited, list(range(len(limited))), default=len(limited), return_dtype=pl.Int64)
        .to_numpy()
    )
    keep = ok[tenant[candidates.plans["query"].to_numpy()], candidates.plans["template"].to_numpy()]
    return candidates.keep(keep)


def define_constraints(request: PlanRequest, candidates: Candidates) -> tuple[list[Any], list[str]]:
    """Named constraint pieces for the optimizer, plus the extra resource columns they need."""
    constraints: list[Any] = []
    extra: list[str] = []
    if request.budget_usd is not None:
        constraints.append(Budget(limit=request.budget_usd))
    if request.tenant_budgets_usd:
        tenants = set(candidates.queries["tenant"].unique().to_list())
        if unused := sorted(set(request.tenant_budgets_usd) - tenants):
            # a nightly config may list tenants with nothing queued tonight; a misspelt one caps nothing
            log.warning("tenant_budget.unused", tenants=unused, queued_tenants=sorted(tenants))
        constraints.append(GroupBudget(group="tenant", limits=dict(request.tenant_budgets_usd), name="tenant_budget"))
    for model, calls in sorted(request.model_max_calls.items()):
        column = f"calls:{model}"
        extra.append(column)
        constraints.append(Capacity(column=column, limit=float(calls), name=f"capacity[{model}]"))
    if request.task_accuracy_floors:
        constraints.append(AccuracyFloor(min_mean=dict(request.task_accuracy_floors), group="task", name="task_floor"))
    if request.accuracy_target is not None:
        constraints.append(AccuracyFloor(min_mean=request.accuracy_target, name="accuracy_target"))
    return constraints, extra


def options_table(
    candidates: Candidates,
    resource_columns: list[str],
    passthrough: list[str] | None = None,
    groups: Sequence[str] = ("tenant", "task"),
) -> pl.DataFrame:
    """The optimizer's options; ``calls:<model>`` columns count a plan's calls to that model; ``groups`` the
    query attributes the constraints group by."""
    if resource_columns:
        calls = candidates.calls().astype(np.float64)
        template = candidates.plans["template"].to_numpy()
        counts = {
            column: calls[template, candidates.llms.index(model)]
            if (model := column.split(":", 1)[1]) in candidates.llms
            else np.zeros(len(template))
            for column in resource_columns
        }
        candidates = dataclasses.replace(candidates, plans=candidates.plans.with_columns(**counts))
    return candidates.options((*resource_columns, *(passthrough or [])), groups)


def label_errors(
    candidates: Candidates, templates: PlanTemplates, bounds: dict[str, float | dict[str, float]]
) -> pl.DataFrame:
    """Per (option, label) of a bounded task: the plan's estimated P(wrong | true label) and its alpha.

    The estimate is the plan's error rate per true label when replayed on the training history
    (``plan_simulation.error_by_label``): a per-task, per-plan rate, shared by the task's queries.
    """
    ids = {
        (task, kind, tuple(models), tuple(thresholds or ())): template
        for template, kind, models, thresholds, task in candidates.templates.select(
            "template", "kind", "models", "thresholds", "task"
        ).iter_rows()
    }
    singles = {models[0]: template for template, models in candidates.templates.filter(
        pl.col("kind") == "single").select("template", "models").iter_rows()}  # fmt: skip
    rows: list[tuple[str, int, str, float]] = []
    for template in templates.templates:
        key = (template.task, template.kind, tuple(template.models), tuple(template.thresholds or ()))
        if key in ids:
            rows.extend((template.task, ids[key], label, err) for label, err in template.error_by_label.items())
    for task, by_model in templates.single_errors.items():
        for model, by_label in by_model.items():
            if model in singles:
                rows.extend((task, singles[model], label, err) for label, err in by_label.items())
    table = pl.DataFrame(
        rows, schema={"task": pl.String, "template": pl.Int32, "label": pl.String, "error": pl.Float64}, orient="row"
    )
    alphas: list[tuple[str, str, float]] = []
    for task in candidates.queries["task"].unique().to_list():
        bound = bounds.get(task, bounds.get("*"))
        if bound is None:
            continue
        labels = templates.label_priors.get(task)
        if not labels:
            raise ContractError(
                f"task {task!r}: no per-label error history (open task or unseen): drop its label_error_max"
            )
        alphas.extend(
            (task, y, float(bound[y] if isinstance(bound, dict) else bound))
            for y in labels
            if not isinstance(bound, dict) or y in bound
        )
    alpha = pl.DataFrame(alphas, schema={"task": pl.String, "label": pl.String, "alpha": pl.Float64}, orient="row")
    options = candidates.plans.select(
        "option", "query", "template", candidates.queries["task"].gather(candidates.plans["query"])
    )
    errors = options.join(alpha, on="task").join(table, on=["task", "template", "label"], how="left")
    # a plan never replayed on a label (no such gold in training) is treated as failing the bound, not guessed
    return errors.with_columns(pl.col("error").fill_null(1.0))


def meet_label_errors(candidates: Candidates, errors: pl.DataFrame) -> Candidates:
    """Offer only plans whose error stays under alpha for every true label; name the tasks where none does."""
    failing = errors.filter(pl.col("error") > pl.col("alpha"))["option"].unique()
    kept = candidates.keep(~pl.col("option").is_in(failing.implode()))
    stranded = candidates.queries.join(kept.plans.select("query").unique(), on="query", how="anti")
    if stranded.height:
        worst = (
            errors.join(stranded.select("query"), on="query")
            .group_by("task", "option")
            .agg((pl.col("error") - pl.col("alpha")).max().alias("excess"), pl.col("error").max().alias("worst"))
            .sort("excess")
            .group_by("task", maintain_order=True)
            .first()
        )
        detail = "; ".join(
            f"task {t!r}: the best plan still errs {w:.3f} on some label"
            for t, w in worst.select("task", "worst").iter_rows()
        )
        raise InfeasibleError(
            constraint="label_error_max",
            message=f"{stranded.height} queries have no plan meeting the per-label error bound ({detail}); "
            "loosen alpha for those tasks, or use label_error_mode='aggregate'",
            suggestion={t: w for t, w in worst.select("task", "worst").iter_rows()},
        )
    return kept


def aggregate_label_error_columns(
    candidates: Candidates, errors: pl.DataFrame, templates: PlanTemplates
) -> tuple[Candidates, list[str]]:
    """One resource column per (task, label): prior(y) x (error - alpha). Summed over the batch it must be
    <= 0, i.e. the batch's expected error rate on each true label stays under its alpha."""
    priors = pl.DataFrame(
        [(t, y, p) for t, by in templates.label_priors.items() for y, p in by.items()],
        schema=["task", "label", "prior"],
        orient="row",
    )
    usage = (
        errors.join(priors, on=["task", "label"])
        .with_columns(
            (pl.col("prior") * (pl.col("error") - pl.col("alpha"))).alias("use"),
            pl.format("label_error[{}:{}]", "task", "label").alias("column"),
        )
        .pivot(on="column", index="option", values="use")
    )
    columns = [c for c in usage.columns if c != "option"]
    plans = candidates.plans.join(usage, on="option", how="left").with_columns(
        pl.col(c).fill_null(0.0) for c in columns
    )
    return dataclasses.replace(candidates, plans=plans), columns


def budget_share(candidates: Candidates, budget_usd: float) -> float:
    """The budget as a share of what sending every query to its task's best single model would cost (best =
    highest mean predicted accuracy on the batch): the scale ``PlanTemplates.offered`` was validated on."""
    single = candidates.is_single()
    task, tasks = candidates.codes("task")
    width = candidates.templates.height
    key = task[candidates.plans["query"].to_numpy()[single]] * width + candidates.plans["template"].to_numpy()[single]
    size = len(tasks) * width
    count = np.bincount(key, minlength=size).reshape(-1, width)
    accuracy = np.bincount(key, candidates.plans["expected_accuracy"].to_numpy()[single], size).reshape(-1, width)
    cost = np.bincount(key, candidates.plans["expected_cost_usd"].to_numpy()[single], size).reshape(-1, width)
    mean = np.where(count > 0, accuracy / np.maximum(count, 1), -np.inf)
    seen = count.any(axis=1)
    reference = float(cost[seen, mean[seen].argmax(axis=1)].sum())
    return budget_usd / reference if reference > 0 else float("inf")


def offer_templates(
    candidates: Candidates, templates: PlanTemplates, budget_usd: float | None
) -> tuple[Candidates, list[str]]:
    """Keep a task's votes and cascades only at budgets where held-out validation showed them helping; also
    returns the tasks whose templates were left out."""
    share = None if budget_usd is None else budget_share(candidates, budget_usd)
    tasks = sorted(candidates.queries["task"].unique().to_list())
    withheld = [task for task in tasks if templates.for_task(task) and not templates.offered(task, share)]
    if not withheld:
        return candidates, []
    dropped = candidates.templates.filter((pl.col("kind") != "single") & pl.col("task").is_in(withheld))["template"]
    return candidates.keep(~pl.col("template").is_in(dropped.implode())), withheld


def plan_batch(candidates: Candidates, request: PlanRequest, templates: PlanTemplates | None = None) -> PlanOutcome:
    """Choose one candidate (or deferral) per query for the whole batch at once."""
    candidates = restrict_allowed(candidates, request.allowed_models)
    withheld: list[str] = []
    if templates is not None:
        candidates, withheld = offer_templates(candidates, templates, request.budget_usd)
    label_columns: list[str] = []
    if request.label_error_max:
        errors = label_errors(candidates, templates or PlanTemplates(), request.label_error_max)
        if request.label_error_mode == "per_query":
            candidates = meet_label_errors(candidates, errors)
        else:
            candidates, label_columns = aggregate_label_error_columns(candidates, errors, templates or PlanTemplates())
    missing = np.flatnonzero(np.bincount(candidates.plans["query"].to_numpy(), minlength=candidates.queries.height) == 0)
    if len(missing):
        raise ContractError(
            f"{len(missing)} queries have no model they may use (first: {candidates.queries['query_id'][int(missing[0])]!r}): "
            "check the backend's models and the tenant's allowed models"
        )
    constraints, extra = define_constraints(request, candidates)
    constraints += [Capacity(column=c, limit=0.0, name=c) for c in label_columns]
    groups = sorted({g for c in constraints if (g := getattr(c, "group", None)) is not None})
    options = options_table(candidates, extra, label_columns, groups)
    objective: Objective = "max_value" if request.budget_usd is not None else "min_cost"
    deferrable = np.full(candidates.queries.height, request.allow_deferral)
    problem = Problem(options, objective=objective, constraints=constraints, deferrable=deferrable)
    solution = solve(problem, method=request.method)
    margin = spend_margin(candidates, solution, request.spend_confidence)
    if request.budget_usd is not None and margin > 0:
        # Second pass: leave the margin unplanned, so the expected spend plus z standard deviations fits.
        tightened = [Budget(limit=request.budget_usd - margin) if isinstance(c, Budget) else c for c in constraints]
        with contextlib.suppress(InfeasibleError):  # no room for the margin: keep the first pass
            solution = solve(problem.with_constraints(tightened), method=request.method, warm_prices=solution.info.prices)
    return PlanOutcome(
        plan=plan_rows(candidates, solution), solution=solution, spend_margin_usd=margin, templates_withheld=withheld
    )


def chosen_rows(candidates: Candidates, solution: Solution) -> np.ndarray:
    """Row positions in ``candidates.plans`` of the solution's chosen options (options ascend: a search, no join)."""
    return np.searchsorted(candidates.plans["option"].to_numpy(), solution.chosen["option"].to_numpy())


def plan_rows(candidates: Candidates, solution: Solution) -> pl.DataFrame:
    """PLAN_SCHEMA, one row per query: the chosen candidate with its names joined, or a deferral."""
    rows = chosen_rows(candidates, solution)
    chosen = candidates.plans[rows].select(
        "query", "template", "expected_cost_usd", "expected_accuracy", "reserve_cost_usd"
    )
    chosen = candidates.named(chosen).with_columns(fallbacks(candidates, solution, rows))
    return (
        candidates.queries.select("query", "query_id")
        .join(chosen, on="query", how="left", maintain_order="left")
        .with_columns(
            pl.col("kind").fill_null("defer"),
            pl.col("models").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.col("expected_cost_usd").fill_null(0.0),
            pl.col("expected_accuracy").fill_null(0.0),
            pl.col("reserve_cost_usd").fill_null(0.0),
        )
        .select(PLAN_SCHEMA.names())
    )


def fallbacks(candidates: Candidates, solution: Solution, rows: np.ndarray, keep: int = 2) -> pl.Series:
    """Per chosen query (``rows``: its candidate's row, in ``solution.chosen``'s order), the next-best single
    models outside its plan (accuracy less the budget's price of their cost), best first, null where none is
    left: what the dispatcher asks instead when a planned model is down."""
    price = float(solution.shadow_prices.get("budget", 0.0))
    plans = candidates.plans
    single = candidates.is_single()
    member = candidates.calls() > 0
    # single candidates' scores on a queries x LLMs grid (-inf: not offered, or inside the chosen plan)
    score = np.full((candidates.queries.height, len(candidates.llms)), -np.inf)
    score[plans["query"].to_numpy()[single], member.argmax(axis=1)[plans["template"].to_numpy()[single]]] = (
        plans["expected_accuracy"].to_numpy()[single] - price * plans["expected_cost_usd"].to_numpy()[single]
    )
    score = score[solution.chosen["query"].to_numpy()]
    score[member[plans["template"].to_numpy()[rows]]] = -np.inf
    ranked = np.zeros((len(score), min(keep, score.shape[1])), dtype=np.uint32)
    found = np.zeros(len(score), dtype=np.int64)
    for r in range(ranked.shape[1]):  # ties: the LLMs' name order
        best = score.argmax(axis=1)
        ok = np.isfinite(score[np.arange(len(score)), best])
        ranked[:, r] = best
        found += ok  # once a rank finds none, no later one does
        score[np.arange(len(score)), best] = -np.inf
    # an n x keep array of LLM indices, cut to the ones found and named: no per-row lists built in Python
    names = list(candidates.llms)
    return pl.DataFrame({"ranked": ranked, "found": found}).select(
        pl.when(pl.col("found") > 0)
        .then(
            pl.col("ranked")
            .arr.to_list()
            .list.head(pl.col("found"))
            .list.eval(pl.element().replace_strict(list(range(len(names))), names, return_dtype=pl.String))
        )
        .alias("fallback_models")
    )["fallback_models"]


def spend_margin(candidates: Candidates, solution: Solution, confidence: float) -> float:
    """z * sd of the chosen plans' total spend: the slack that keeps P(spend > budget) under 1 - confidence."""
    if confidence <= 0.5:
        return 0.0
    variance = candidates.plans["cost_var"].gather(chosen_rows(candidates, solution)).sum()
    return float(NormalDist().inv_cdf(confidence) * np.sqrt(max(float(variance), 0.0)))
