"""The batch's cost-accuracy frontier: the plan re-solved at a dozen budgets, for the report's chart.

Computed where the candidates exist (right after planning, in ``run_job`` and the DAG's plan stage) and kept
as a small table beside the plan (``frontier.json``), so the report can draw it without re-planning:

    [{"budget_usd", "planned_cost_usd", "planned_accuracy", "deferred", "gap"}, ...]

Each point is the problem this run solved (same options, tenant budgets, capacities, floors) under another
total budget, maximizing accuracy with deferral allowed (so the curve reaches down to small budgets); an
accuracy target, if the run had one, is dropped, since the frontier is the trade between the two itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.core.storage import Storage
from batchplan.optimizer import AccuracyFloor, Problem, frontier
from batchplan.optimizer.api import Method
from batchplan.plans.planning import PlanOutcome

log = structlog.get_logger("batchplan")

FRONTIER_POINTS = 12
# Past this many options the exact cvxpy methods get slow (STACK.md): the frontier takes the decomposition.
EXACT_METHOD_MAX_OPTIONS = 50_000


def budget_grid(options: pl.DataFrame, budget_usd: float | None, points: int = FRONTIER_POINTS) -> list[float]:
    """Geometric budgets up to the spend at which every query gets its most accurate option (past it, more
    budget buys nothing), plus the run's own budget so its planned point lies on the curve."""
    top = float(
        options.sort("query", "value", "cost", descending=[False, True, False])
        .group_by("query", maintain_order=True)
        .first()["cost"]
        .sum()
    )
    if top <= 0:
        return [budget_usd] if budget_usd is not None else []
    grid = [float(b) for b in np.geomspace(top / 100, top, points - 1)]
    if budget_usd is not None:
        grid.append(float(budget_usd))
    return sorted(set(grid))


def plan_frontier(outcome: PlanOutcome, budget_usd: float | None, method: Method = "auto") -> list[dict[str, Any]]:
    """Planned accuracy and cost at each budget of ``budget_grid``; budgets no plan meets are left out."""
    problem = outcome.problem
    if problem is None:
        return []
    constraints = [c for c in problem.constraints if not (isinstance(c, AccuracyFloor) and c.name == "accuracy_target")]
    curve = Problem(problem.options, "max_value", constraints, deferrable=True, n_queries=problem.n_queries)
    if problem.options.height > EXACT_METHOD_MAX_OPTIONS:
        method = "decompose"
    started = time.perf_counter()
    table = frontier(curve, budget_grid(problem.options, budget_usd), method)
    log.info("frontier", points=table.height, method=method, seconds=round(time.perf_counter() - started, 2))
    return [
        {
            "budget_usd": row["budget"],
            "planned_cost_usd": row["cost"],
            "planned_accuracy": row["accuracy"],
            "deferred": row["deferred"],
            "gap": row["gap"],
        }
        for row in table.drop_nulls("accuracy").iter_rows(named=True)
    ]


def frontier_uri(plan_uri: str) -> str:
    """Kept beside the plan, like its optimizer diagnostics: ``plan.parquet`` -> ``plan.frontier.json``."""
    return plan_uri.removesuffix(".parquet") + ".frontier.json"


def write_frontier(storage: Storage, uri: str, rows: list[dict[str, Any]]) -> None:
    storage.write_text(uri, json.dumps(rows, indent=1))


def read_frontier(storage: Storage, uri: str) -> list[dict[str, Any]]:
    """The stored frontier, or none (a run planned before frontiers were kept)."""
    return list(json.loads(storage.read_text(uri))) if storage.exists(uri) else []
