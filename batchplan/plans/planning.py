"""The optimize stage: turn what the user asks (budget, target, tenant budgets, capacities, floors, allowed
models, deferral) into an optimizer problem over plan candidates, and read the solution back as plan rows.

The optimizer itself knows nothing of LLMs; this module is the translation layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.core.contracts import DEFER, PLAN_SCHEMA, UNANSWERABLE, ContractError
from batchplan.core.errors import closest_first
from batchplan.core.request import AUTO_EXPLORE_SHARE, PlanRequest
from batchplan.optimizer import (
    AccuracyFloor,
    Budget,
    Capacity,
    GroupBudget,
    InfeasibleError,
    Problem,
    Solution,
    solve,
)
from batchplan.optimizer.problem import Objective
from batchplan.plans.audit import AuditFit, audit_plan, explore_plan, label_drift
from batchplan.plans.best_single import best_single_llms
from batchplan.plans.candidates import Candidates
from batchplan.plans.infeasible import RequestInfeasible, up, usd, word
from batchplan.plans.templates import PlanTemplates

log = structlog.get_logger("batchplan")


@dataclass(frozen=True)
class PlanOutcome:
    plan: pl.DataFrame  # PLAN_SCHEMA, one row per query; kind "defer" for deferred queries
    solution: Solution
    spend_margin_usd: float = 0.0
    templates_withheld: list[str] = field(default_factory=list)  # tasks whose votes/cascades this budget left out
    unused_constraints: list[str] = field(default_factory=list)  # constraints naming what the batch lacks
    problem: Problem | None = None  # what was solved (options and constraints): the report's frontier re-solves it

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
            "unused_constraints": self.unused_constraints,
        }


def request_record(request: PlanRequest) -> dict[str, Any]:
    """The request as plain JSON values: stored beside a plan, so a rerun can tell whether it asks the same."""
    return dict(json.loads(json.dumps(asdict(request))))


def request_changes(stored: dict[str, Any], request: PlanRequest) -> list[str]:
    """What ``request`` asks differently from a stored request record, as 'field: old -> new' (empty if same)."""
    now = request_record(request)
    return [
        f"{key}: {json.dumps(stored.get(key))} -> {json.dumps(now.get(key))}"
        for key in sorted(set(stored) | set(now))
        if stored.get(key) != now.get(key)
    ]


def _closest(name: str, known: list[str], limit: int = 5) -> str:
    """``known`` as a short list, most similar to ``name`` first (``closest_first``)."""
    ranked = closest_first(name, known)
    shown = ", ".join(repr(k) for k in ranked[:limit])
    return f"{shown}, ... ({len(ranked)} in all)" if len(ranked) > limit else shown or "none"


def check_constraint_names(request: PlanRequest, candidates: Candidates) -> list[str]:
    """Every tenant, model and task a constraint names must be in the batch (its queue, the models offered).

    A misspelt name would cap nothing, which for a budget tool is the worst failure: refused with one line
    naming it and the known names, closest first. With ``allow_unused_constraints`` (a config that lists
    every tenant, not all queued tonight) returns the constraints that bind nothing instead."""
    tenants = sorted(candidates.queries["tenant"].unique().to_list())
    tasks = sorted(candidates.queries["task"].unique().to_list())
    models = sorted(candidates.llms)  # the LLMs the backend offers for this batch
    checks: list[tuple[str, str, str, list[str]]] = [  # (constraint, name, what it names, known names)
        *(("tenant budget", t, "tenant", tenants) for t in request.tenant_budgets_usd),
        *(("max calls", m, "model", models) for m in request.model_max_calls),
        *(("task floor", t, "task", tasks) for t in request.task_accuracy_floors),
        *(("allowed models", t, "tenant", tenants) for t in request.allowed_models),
        *((f"allowed models of {t!r}", m, "model", models) for t, ms in request.allowed_models.items() for m in ms),
        *(("label error bound", t, "task", tasks) for t in request.label_error_max if t != "*"),
    ]
    unknown = [(c, n, what, known) for c, n, what, known in checks if n not in known]
    unused = [f"{c}: {what} {n!r} is not in this batch" for c, n, what, _ in unknown]
    if unknown and not request.allow_unused_constraints:
        raise ContractError(
            "; ".join(
                f"{line} ({what}s, closest first: {_closest(n, known)})"
                for line, (_, n, what, known) in zip(unused, unknown, strict=True)
            )
            + "; fix the name, or allow unused constraints (--allow-unused-constraints, DAG param "
            "allow_unused_constraints) if it is legitimately absent"
        )
    if unused:
        log.warning("constraints.unused", constraints=unused)
    return unused


def choose_exploration(
    request: PlanRequest, live_rows: pl.DataFrame | None, tasks: set[str], seed: str
) -> tuple[PlanRequest, dict[str, Any] | None]:
    """The request with its exploration share decided, and why (the report's ``exploration``; None: no
    exploration); a request that then audits or explores samples with ``audit_seed`` = ``seed`` (the run's: the
    same sample on resume) unless it gave one. Deciding first keeps a run that samples nothing seedless, as it was
    recorded before automatic exploration (a retry compares the recorded request). A share asked for
    (``explore_share``, 0 included) is kept; unset (None), exploration is on at
    ``AUTO_EXPLORE_SHARE`` while the live labels of past runs (``live_rows``, the live correction this plan
    uses) put an LLM of one of ``tasks`` outside the history's interval (``plans.audit.label_drift``), else off.

    Why only then: the labels of a run that does not explore land on the LLMs its plan calls, so they cannot tell
    an LLM that got worse from a task that got harder (the correction moves every LLM of the task down together
    and the plan keeps the drifted one); exploration's labels on the other LLMs separate the two. Always on, it
    costs its share of the budget where the history is right. Turned on by drift, it explores only the drifted
    tasks (the decision's ``tasks``): elsewhere the labels agree with the history, and the share spent there
    would leave the drifted task's other LLMs unlabelled longer. One decision for the CLI's and the DAGs' plan."""
    drift = label_drift(live_rows, tasks) if request.explore_share is None and live_rows is not None else []
    share = request.explore_share if request.explore_share is not None else AUTO_EXPLORE_SHARE if drift else 0.0
    chosen = dataclasses.replace(request, explore_share=share)
    if (chosen.audit_share > 0 or share > 0) and not chosen.audit_seed:
        chosen = dataclasses.replace(chosen, audit_seed=seed)
    if request.explore_share is not None:
        return chosen, ({"share": share, "source": "asked", "reason": "explore_share asked"} if share > 0 else None)
    if not drift:
        return chosen, None
    pairs = [f"{d['name']} on {d['task']} ({d['direction']})" for d in drift]
    return chosen, {
        "share": AUTO_EXPLORE_SHARE,
        "source": "drift",
        "reason": "the labels of past runs put " + ", ".join(pairs) + " outside the history's interval",
        "drift": [{"model": d["name"], "task": d["task"], "direction": d["direction"]} for d in drift],
        "tasks": sorted({d["task"] for d in drift}),  # where it explores (``plan_audits``)
    }


def plan_audits(
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    audit_fit: AuditFit | None,
    request: PlanRequest,
    live_rows: pl.DataFrame | None = None,
    exploration: dict[str, Any] | None = None,
) -> pl.DataFrame | None:
    """The audited sample's reference rows (``plans.audit.audit_plan``) as the request asks them: its share,
    seed and spend cap, over the LLMs each tenant may use, and with ``explore_share`` the exploration rows
    (``plans.audit.explore_plan``, ``live_rows`` its live gold counts) on the queries of the tasks
    ``exploration`` (``choose_exploration``'s decision) names, within ``explore_share`` of their part of the
    budget (their queries' share), every task and the whole budget when it names none (a share asked); None
    when the request audits and explores nothing. One for the CLI's and the DAGs' plan."""
    explore_usd = (request.explore_share or 0.0) * (request.budget_usd or 0.0)  # decided: ``choose_exploration``
    if request.audit_share <= 0 and explore_usd <= 0:
        return None
    allowed = allowed_predictions(predictions, queue, request.allowed_models)
    rows = audit_plan(
        queue, allowed, audit_fit, request.audit_share, request.audit_seed, max_cost_usd=request.audit_max_cost_usd
    )
    if explore_usd > 0:
        tasks = (exploration or {}).get("tasks")
        where = queue if tasks is None else queue.filter(pl.col("task").is_in(pl.Series(tasks, dtype=pl.String).implode()))
        # of the explored tasks' part of the budget: what they got when exploration spent on every task
        explored = explore_plan(where, allowed, rows, request.audit_seed, explore_usd * where.height / queue.height, live_rows)
        rows = pl.concat([rows, explored])
    return rows if rows.height else None


def allowed_predictions(
    predictions: pl.DataFrame, queue: pl.DataFrame, allowed_models: dict[str, list[str]]
) -> pl.DataFrame:
    """The (query, LLM) predictions a tenant may use (data residency): what a round planner may call. A tenant
    without an entry may use every LLM, as in ``restrict_allowed``."""
    if not allowed_models:
        return predictions
    allowed = pl.DataFrame(
        [(t, m) for t, models in allowed_models.items() for m in models],
        schema={"tenant": pl.String, "model": pl.String},
        orient="row",
    ).with_columns(pl.lit(True).alias("_ok"))
    limited = pl.Series(list(allowed_models), dtype=pl.String).implode()
    return (
        predictions.join(queue.select("query_id", "tenant"), on="query_id", how="left")
        .join(allowed, on=["tenant", "model"], how="left")
        .filter(pl.col("_ok").fill_null(False) | ~pl.col("tenant").is_in(limited))
        .select(predictions.columns)
    )


# What each round planner re-plans under besides the total and tenant budgets and the allowed LLMs: the
# posterior planner holds call capacities (calls left per LLM) and task floors in every re-plan; the plan
# continuation runs the single-shot plan, which holds the floors (a re-call of a failed query may move to a
# cheaper LLM, past its capacity). Label-error bounds are held by the single-shot plan only: no round planner
# estimates P(wrong | true label) from what a round observed.
ROUND_PLANNERS_HOLD: dict[str, frozenset[str]] = {
    # audits: the reference calls go beside the planner's, mandatory (``app.round_runner.AuditedPlanner``)
    "posterior": frozenset({"model_max_calls", "task_accuracy_floors", "audit_share"}),
    "plan": frozenset({"task_accuracy_floors", "audit_share"}),
    # per task one of the two (``batchplan.plans.per_task``): what both hold
    "per_task": frozenset({"task_accuracy_floors", "audit_share"}),
}


def check_rounds_request(request: PlanRequest, planner: str = "plan") -> None:
    """What a run in rounds with ``planner`` cannot hold is refused, never dropped (``ROUND_PLANNERS_HOLD``)."""
    holds = ROUND_PLANNERS_HOLD.get(planner, frozenset())
    not_held = [
        name
        for name, asked in (
            ("model_max_calls", request.model_max_calls),
            ("task_accuracy_floors", request.task_accuracy_floors),
            ("label_error_max", request.label_error_max),
            ("audit_share", request.audit_share),
        )
        if asked and name not in holds
    ]
    if not_held:
        others = sorted(p for p, held in ROUND_PLANNERS_HOLD.items() if set(not_held) <= held)
        instead = f"use round_planner {others[0]}, " if others else ""
        raise ContractError(
            f"{', '.join(not_held)} cannot be held by a multi-round run with round_planner {planner}: "
            f"{instead}set rounds 1 (the single-shot plan holds it), or drop it",
            fields=(*not_held, "rounds", "round_planner"),
        )


def default_rounds(asked: int | None, request: PlanRequest, planner: str = "plan") -> int:
    """The rounds a run executes in: what was asked; else ``DEFAULT_RUN_ROUNDS`` when ``planner`` holds
    everything the request asks for, else single shot (a request with ``--max-calls`` under the plan
    planner, say), which holds it all: the default never turns a request into a refusal."""
    from batchplan.core.request import DEFAULT_RUN_ROUNDS

    if asked is not None:
        return asked
    try:
        check_rounds_request(request, planner)
    except ContractError:
        return 1
    return DEFAULT_RUN_ROUNDS


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
        constraints.append(GroupBudget(group="tenant", limits=dict(request.tenant_budgets_usd), name="tenant_budget"))
    for model, calls in sorted(request.model_max_calls.items()):
        column = f"calls:{model}"
        extra.append(column)
        constraints.append(Capacity(column=column, limit=float(calls), name=f"capacity[{model}]"))
    tasks = set(candidates.queries["task"].unique().to_list())
    if floors := {t: f for t, f in request.task_accuracy_floors.items() if t in tasks}:  # others: unused, allowed
        constraints.append(AccuracyFloor(min_mean=floors, group="task", name="task_floor"))
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
        raise RequestInfeasible(
            constraint="label_error_max",
            message=f"{stranded.height} queries have no plan meeting the per-label error bound ({detail}); "
            "loosen label_error_max for those tasks, or use label_error_mode 'aggregate'",
            suggestion={t: w for t, w in worst.select("task", "worst").iter_rows()},
            fields=("label_error_max", "label_error_mode"),
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
    """The budget as a share of what sending every query to its task's best single model would cost
    (``best_single_llms`` on the single-model candidates' expected accuracy and cost): the scale
    ``PlanTemplates.offered`` was validated on."""
    single = candidates.is_single()
    task, _ = candidates.codes("task")
    first = candidates.templates["members"].list.first().to_numpy()  # LLM index: sorted as the names are
    plans = candidates.plans.select("query", "template", "expected_accuracy", "expected_cost_usd").filter(single)
    scores = pl.DataFrame(
        {
            "task": task[plans["query"].to_numpy()],
            "model": first[plans["template"].to_numpy()],
            "correct": plans["expected_accuracy"],
            "cost_usd": plans["expected_cost_usd"],
        }
    )
    reference = float(best_single_llms(scores)["cost_usd"].sum())
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


def hold_audits(constraints: list[Any], audit: pl.DataFrame) -> list[Any]:
    """The constraints with the audits' reference calls held inside them: the reference calls are mandatory
    (a fixed choice, ``batchplan.plans.audit``), so the optimizer plans the rest of the batch in what they
    leave of the total and tenant budgets and of each LLM's call capacity. A budget (the total or a
    tenant's) they alone exceed is refused with the audit share named."""
    cost = float(audit["expected_cost_usd"].sum())
    by_tenant = dict(audit.group_by("tenant").agg(pl.col("expected_cost_usd").sum()).iter_rows())
    calls = dict(audit.select(pl.col("models").explode().alias("m")).group_by("m").len().iter_rows())
    held: list[Any] = []
    for c in constraints:
        if isinstance(c, Budget):
            left = c.limit - cost
            if left < 0:
                raise RequestInfeasible(
                    constraint="audit_share",
                    message=f"the {audit.height} audited queries' reference calls alone are expected to cost "
                    f"${cost:.6g}, more than the budget ${c.limit:.6g}: lower audit_share or raise budget_usd",
                    suggestion={"budget_usd": cost},
                    fields=("audit_share", "budget_usd"),
                )
            c = dataclasses.replace(c, limit=left)
        elif isinstance(c, GroupBudget) and c.group == "tenant":
            left_of = {t: v - float(by_tenant.get(t, 0.0)) for t, v in c.limits.items()}
            if over := sorted(t for t, left in left_of.items() if left < 0):
                raise _tenant_audits_over(audit, {t: c.limits[t] for t in over}, by_tenant)
            c = dataclasses.replace(c, limits=left_of)
        elif isinstance(c, Capacity) and c.column.startswith("calls:") and not isinstance(c.limit, Mapping):
            c = dataclasses.replace(c, limit=c.limit - float(calls.get(c.column.split(":", 1)[1], 0)))
        held.append(c)
    return held


def _tenant_audits_over(
    audit: pl.DataFrame, limits: Mapping[str, float], by_tenant: Mapping[str, float]
) -> RequestInfeasible:
    """The refusal of tenant budgets the audits' mandatory reference calls alone exceed (else the optimizer
    would see a negative limit and report a bare infeasible row), naming audit_share, each tenant and what
    its budget would need."""
    parts = []
    for tenant, limit in limits.items():
        n = int((audit["tenant"] == tenant).sum())
        parts.append(
            f"tenant '{tenant}': the reference calls of its {n} audited queries alone are expected to cost "
            f"${by_tenant[tenant]:.6g}, more than tenant_budgets_usd {tenant}={usd(limit)}; it would need at least "
            f"${usd(up(by_tenant[tenant]))}"
        )
    return RequestInfeasible(
        constraint="audit_share",
        message="; ".join(parts) + ": lower audit_share or raise tenant_budgets_usd",
        suggestion={"tenant_budgets_usd": {t: float(by_tenant[t]) for t in limits}},
        fields=("audit_share", "tenant_budgets_usd"),
    )


def plan_batch(
    candidates: Candidates,
    request: PlanRequest,
    templates: PlanTemplates | None = None,
    audit: pl.DataFrame | None = None,
) -> PlanOutcome:
    """Choose one candidate (or deferral) per query for the whole batch at once. A query no offered model
    may answer gets a plan row of kind UNANSWERABLE (it ends ``failed`` with the reason); the rest are planned.
    ``audit``: the audited queries' reference plan rows (``batchplan.plans.audit.audit_plan``), held inside the
    constraints and appended to the plan."""
    unused = check_constraint_names(request, candidates)
    order = candidates.queries.select("query_id")  # plan rows in queue order, the set-aside ones included
    candidates = restrict_allowed(candidates, request.allowed_models)
    candidates, unanswerable = split_unanswerable(candidates)
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
    constraints, extra = define_constraints(request, candidates)
    constraints += [Capacity(column=c, limit=0.0, name=c) for c in label_columns]
    audit = audit if audit is not None and audit.height else None
    if audit is not None:
        constraints = hold_audits(constraints, audit)
    groups = sorted({g for c in constraints if (g := getattr(c, "group", None)) is not None})
    options = options_table(candidates, extra, label_columns, groups)
    objective: Objective = "max_value" if request.budget_usd is not None else "min_cost"
    deferrable = np.full(candidates.queries.height, request.allow_deferral)
    problem = Problem(options, objective=objective, constraints=constraints, deferrable=deferrable)
    try:
        solution = solve(problem, method=request.method)
    except InfeasibleError as error:
        raise word(error, request, candidates.queries) from error
    audit_var = float(audit["cost_var"].sum()) if audit is not None else 0.0
    margin = spend_margin(candidates, solution, request.spend_confidence, audit_var)
    if request.budget_usd is not None and margin > 0:
        # Second pass: leave the margin unplanned, so the expected spend plus z standard deviations fits.
        tightened = [dataclasses.replace(c, limit=c.limit - margin) if isinstance(c, Budget) else c for c in constraints]
        with contextlib.suppress(InfeasibleError):  # no room for the margin: keep the first pass
            solution = solve(problem.with_constraints(tightened), method=request.method, warm_prices=solution.info.prices)
    plan = plan_rows(candidates, solution)
    if unanswerable.height:
        plan = order.join(
            pl.concat([plan, unanswerable_rows(unanswerable["query_id"])]), on="query_id", maintain_order="left"
        )
    if audit is not None:  # last: the delivered rows keep the queue's order
        plan = pl.concat([plan, audit.select(PLAN_SCHEMA.names()).cast(PLAN_SCHEMA)])
    outcome = PlanOutcome(
        plan=plan,
        solution=solution,
        spend_margin_usd=margin,
        templates_withheld=withheld,
        unused_constraints=unused,
        problem=problem,
    )
    deferred = int((plan["kind"] == DEFER).sum())
    log.info("optimize", queries=plan.height, deferred=deferred, **outcome.diagnostics)
    return outcome


def chosen_rows(candidates: Candidates, solution: Solution) -> np.ndarray:
    """Row positions in ``candidates.plans`` of the solution's chosen options (options ascend: no join). Ids are
    dense (``keep`` only drops some): an inverse over their range is two passes, where a binary search per
    chosen query cost 0.3 s at 1M queries; sparse ids (a caller's own) are searched."""
    options, chosen = candidates.plans["option"].to_numpy(), solution.chosen["option"].to_numpy()
    if len(options) == 0 or int(options[0]) < 0 or int(options[-1]) >= 2 * len(options):
        return np.searchsorted(options, chosen)
    inverse = np.empty(int(options[-1]) + 1, dtype=np.int64)
    inverse[options] = np.arange(len(options))
    return inverse[chosen]


def plan_rows(candidates: Candidates, solution: Solution) -> pl.DataFrame:
    """PLAN_SCHEMA, one row per query: the chosen candidate with its names joined, or a deferral."""
    rows = chosen_rows(candidates, solution)
    chosen = candidates.plans.select("query", "template", "expected_cost_usd", "expected_accuracy", "reserve_cost_usd")[rows]
    chosen = candidates.named(chosen).with_columns(fallbacks(candidates, solution, rows))
    queries = candidates.queries.select("query", "query_id")
    if chosen.height == queries.height and chosen["query"].equals(queries["query"]):
        by_query = queries.hstack(chosen.drop("query").get_columns())  # nothing deferred: the join is a no-op
    else:
        by_query = queries.join(chosen, on="query", how="left", maintain_order="left")
    return (
        by_query.with_columns(
            pl.col("kind").fill_null("defer"),
            pl.col("models").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.col("expected_cost_usd").fill_null(0.0),
            pl.col("expected_accuracy").fill_null(0.0),
            pl.col("reserve_cost_usd").fill_null(0.0),
        )
        .select(PLAN_SCHEMA.names())
    )


def split_unanswerable(candidates: Candidates) -> tuple[Candidates, pl.DataFrame]:
    """Set aside the queries with no candidate (no offered model, or none their tenant may use): they cannot
    be answered, but the rest of the batch can. Raises only when no query is left to plan."""
    # queries are a dense index: a count per query, not a unique + anti join over every candidate
    has = np.bincount(candidates.plans["query"].to_numpy(), minlength=candidates.queries.height) > 0
    if has.all():
        return candidates, candidates.queries.clear()
    missing = candidates.queries.filter(~pl.Series(has[candidates.queries["query"].to_numpy()]))
    if missing.height == candidates.queries.height:
        raise ContractError(
            f"none of the {missing.height} queries can be answered by a model the backend offers "
            f"(first: {missing['query_id'][0]!r}): check --backend and --replay-history, and the tenants' "
            "allowed models (--allow)"
        )
    log.warning("plan.unanswerable", queries=missing.height, first=missing["query_id"][0])
    kept = candidates.queries.join(missing.select("query"), on="query", how="anti")
    renumber = kept.select("query", pl.int_range(pl.len(), dtype=pl.Int64).alias("_new"))
    plans = candidates.plans.join(renumber, on="query").drop("query").rename({"_new": "query"})
    queries = kept.join(renumber, on="query").drop("query").rename({"_new": "query"})
    return dataclasses.replace(
        candidates, plans=plans.select(candidates.plans.columns), queries=queries.select(kept.columns)
    ), missing


def unanswerable_rows(query_ids: pl.Series) -> pl.DataFrame:
    """Plan rows for queries no offered model can answer: nothing to call, nothing to spend."""
    return (
        pl.DataFrame({"query_id": query_ids})
        .select(
            "query_id",
            pl.lit(UNANSWERABLE).alias("kind"),
            pl.lit([], dtype=pl.List(pl.String)).alias("models"),
            pl.lit(0.0).alias("expected_cost_usd"),
            pl.lit(0.0).alias("expected_accuracy"),
            pl.lit(0.0).alias("reserve_cost_usd"),
            pl.lit(None, dtype=pl.List(pl.Float64)).alias("thresholds"),
            pl.lit([], dtype=pl.List(pl.String)).alias("fallback_models"),
        )
        .cast(PLAN_SCHEMA)
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
    at = np.flatnonzero(single)  # one pass over the mask, then gathers: four masked copies cost 0.6 s at 1M
    score[plans["query"].to_numpy().take(at), member.argmax(axis=1).take(plans["template"].to_numpy().take(at))] = (
        plans["expected_accuracy"].to_numpy().take(at) - price * plans["expected_cost_usd"].to_numpy().take(at)
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


def spend_margin(candidates: Candidates, solution: Solution, confidence: float, extra_var: float = 0.0) -> float:
    """z * sd of the chosen plans' total spend (plus ``extra_var``, the audits' reference calls): the slack
    that keeps P(spend > budget) under 1 - confidence."""
    if confidence <= 0.5:
        return 0.0
    variance = float(candidates.plans["cost_var"].gather(chosen_rows(candidates, solution)).sum()) + extra_var
    return float(NormalDist().inv_cdf(confidence) * np.sqrt(max(float(variance), 0.0)))
