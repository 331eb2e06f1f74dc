"""``solve`` and ``frontier``: the entry points the pipeline calls."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import cvxpy as cp
import numpy as np
import polars as pl

from batchplan.optimizer.constraints import Budget
from batchplan.optimizer.decompose import repair_lp_solution, solve_decompose
from batchplan.optimizer.diagnose import diagnose, empty_queries
from batchplan.optimizer.problem import Problem
from batchplan.optimizer.solution import InfeasibleError, Solution, SolverError
from batchplan.optimizer.solve_cvxpy import solve_cvxpy

Method = Literal["auto", "cvxpy_milp", "cvxpy_lp", "decompose"]


def solve(
    problem: Problem,
    method: Method = "auto",
    *,
    time_limit: float | None = None,
    gap_tol: float = 1e-4,
    highs_options: dict[str, Any] | None = None,
    warm_prices: np.ndarray | None = None,
) -> Solution:
    """Choose one option per query (or defer it). Raises InfeasibleError / SolverError.

    ``method``: "decompose" (fast: Lagrangian pricing + restricted HiGHS LPs + MILP polish, LP bound as
    certificate), "cvxpy_milp" (the whole MILP in CVXPY+HiGHS, exact within mip_rel_gap 1e-6),
    "cvxpy_lp" (LP relaxation in CVXPY+HiGHS IPM, then rounding with repair), "auto" (= decompose).

    ``time_limit`` (seconds), decompose: a guard on the whole solve. Every HiGHS call gets the time left;
    when it runs out during the pricing rounds the last restricted LP's point (feasible for the full LP)
    is rounded and repaired, and the caller gets that feasible Solution with its certified ``bound`` and
    ``gap`` (``status`` "feasible" when the gap exceeds ``gap_tol``, ``info["converged"]`` False). If no
    feasible point exists yet (the first LP did not finish, or its elastic rows still carry slack),
    SolverError. Overshoot is bounded by one pricing pass plus the rounding (short MILPs capped at the
    time left, at least 0.05 s each). cvxpy methods: passed to HiGHS as its time_limit, which HiGHS does
    not enforce during its MILP setup (see STACK.md); run those in a subprocess to guard them strictly.

    ``warm_prices``, decompose: start from these row prices (e.g. a neighbouring budget's
    ``solution.info.prices``) instead of sampling; ignored when their length does not match the rows.
    """
    t0 = time.perf_counter()
    program = problem.compiled
    if len(empty_queries(program)):
        raise diagnose(program)
    if method in ("cvxpy_milp", "cvxpy_lp"):
        integer = method == "cvxpy_milp"
        status, solution = solve_cvxpy(program, integer=integer, time_limit=time_limit, highs_options=highs_options)
        if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            raise diagnose(program)
        if solution is None:
            raise SolverError(f"{method}: HiGHS via CVXPY ended with status {status!r} and no solution")
        if not integer:
            solution = repair_lp_solution(program, solution, method=method)
        solution.solve_seconds = time.perf_counter() - t0
        solution.status = "optimal" if solution.gap <= gap_tol else "feasible"
        return solution
    if method in ("auto", "decompose"):
        solution = solve_decompose(program, time_limit=time_limit, gap_tol=gap_tol, warm_prices=warm_prices)
        solution.solve_seconds = time.perf_counter() - t0
        return solution
    raise ValueError(f"unknown method {method!r}; use auto, decompose, cvxpy_milp or cvxpy_lp")


def frontier(problem: Problem, budgets: Sequence[float], method: Method = "auto", *, budget_name: str = "budget") -> pl.DataFrame:
    """Objective at each budget (the Budget spec named ``budget_name`` is replaced or added).

    Columns: budget, objective, bound, gap, cost, accuracy (mean expected accuracy over all queries,
    deferred counting 0), deferred, seconds. Infeasible budgets give a row with nulls.
    Cheap: each budget is ``problem.with_constraints`` (the compiled arrays are shared, only the budget row
    is built) solved by ``solve``, and the decomposition warm-starts from the previous budget's prices.
    """
    base = [c for c in problem.constraints if not (isinstance(c, Budget) and c.name == budget_name)]
    rows: list[dict[str, Any]] = []
    warm: np.ndarray | None = None
    for b in sorted(float(x) for x in budgets):
        p = problem.with_constraints([*base, Budget(limit=b, name=budget_name)])
        try:
            sol = solve(p, method=method, warm_prices=warm)
        except InfeasibleError:
            rows.append({"budget": b, "objective": None, "bound": None, "gap": None, "cost": None,
                         "accuracy": None, "deferred": None, "seconds": None})
            continue
        warm = sol.info.prices
        rows.append({"budget": b, "objective": sol.objective, "bound": sol.bound, "gap": sol.gap, "cost": sol.cost,
                     "accuracy": sol.accuracy / max(p.compiled.n, 1), "deferred": len(sol.deferred),
                     "seconds": sol.solve_seconds})
    schema = {"budget": pl.Float64, "objective": pl.Float64, "bound": pl.Float64, "gap": pl.Float64,
              "cost": pl.Float64, "accuracy": pl.Float64, "deferred": pl.Int64, "seconds": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
