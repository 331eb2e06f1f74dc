"""The general formulation in CVXPY, solved by HiGHS: build the model from named pieces, solve, read back.

    x[j] in {0,1} (or [0,1] for the LP)     one per program column (options + deferral columns)
    sum_{j in query q} x[j] == 1             every query takes exactly one column (deferral is a column)
    define_*_constraint(...)                 one named piece per constraint spec
    maximise c @ x                           c = value (max_value) or -cost (min_cost)

Reserved for the general and smaller cases (and as the reference the fast method is benchmarked against):
CVXPY's compile alone costs ~1 s at 100k columns and 11-16 s at 1M.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from batchplan.optimizer.compiled import Compiled, RowFamily
from batchplan.optimizer.highs_lp import TIGHT_MIP_TOLERANCES
from batchplan.optimizer.solution import Solution, SolveInfo, SolverError, build_solution, violated_rows

MIP_REL_GAP = 1e-6


def _family_matrix(program: Compiled, family: RowFamily) -> sp.csr_array:
    keep = (family.gid >= 0) & (family.coef != 0)
    idx = np.flatnonzero(keep)
    return sp.csr_array((family.coef[idx], (family.gid[idx], idx)), shape=(family.size, program.m))


def define_assignment_constraint(x: cp.Variable, program: Compiled) -> cp.Constraint:
    """Every query takes exactly one column."""
    select = sp.csr_array((np.ones(program.m), (program.query, np.arange(program.m))), shape=(program.n, program.m))
    return select @ x == 1


def define_budget_constraint(x: cp.Variable, program: Compiled, family: RowFamily) -> cp.Constraint:
    """Total cost <= limit (one row)."""
    return _family_matrix(program, family) @ x <= family.rhs


def define_group_budget_constraint(x: cp.Variable, program: Compiled, family: RowFamily) -> cp.Constraint:
    """Cost per group (tenant) <= that group's limit."""
    return _family_matrix(program, family) @ x <= family.rhs


def define_capacity_constraint(x: cp.Variable, program: Compiled, family: RowFamily) -> cp.Constraint:
    """A resource column (calls, tokens), globally or per group (model), <= its limit."""
    return _family_matrix(program, family) @ x <= family.rhs


def define_accuracy_floor_constraint(x: cp.Variable, program: Compiled, family: RowFamily) -> cp.Constraint:
    """Sum of expected accuracy over a group's queries >= floor * group size."""
    return _family_matrix(program, family) @ x >= family.rhs


PIECES = {
    "budget": define_budget_constraint,
    "group_budget": define_group_budget_constraint,
    "capacity": define_capacity_constraint,
    "accuracy_floor": define_accuracy_floor_constraint,
}


@dataclass
class CvxpyModel:
    x: cp.Variable
    problem: cp.Problem
    rows: list[tuple[RowFamily, cp.Constraint]]
    integer: bool


def build_model(program: Compiled, *, integer: bool) -> CvxpyModel:
    x = cp.Variable(program.m, boolean=True) if integer else cp.Variable(program.m, nonneg=True)
    constraints: list[cp.Constraint] = [define_assignment_constraint(x, program)]
    rows = []
    for family in program.families:
        con = PIECES[family.kind](x, program, family)
        rows.append((family, con))
        constraints.append(con)
    if not integer:
        constraints.append(x <= 1)
    return CvxpyModel(x, cp.Problem(cp.Maximize(program.c @ x), constraints), rows, integer)


def solve_model(cm: CvxpyModel, *, time_limit: float | None = None, highs_options: dict[str, Any] | None = None) -> str:
    options: dict[str, Any] = {}
    if cm.integer:
        options.update(mip_rel_gap=MIP_REL_GAP, **TIGHT_MIP_TOLERANCES)
    else:
        options.update(solver="ipm", run_crossover="on")
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    options.update(highs_options or {})
    try:
        cm.problem.solve(solver=cp.HIGHS, highs_options=options)
    except cp.error.SolverError as error:
        raise SolverError(f"HiGHS via CVXPY failed: {error}") from error
    return str(cm.problem.status)


def read_solution(cm: CvxpyModel, program: Compiled, *, method: str, seconds: float) -> Solution:
    """Pick one column per query (largest x; the LP's fractional rows round to their largest share)."""
    assert cm.x.value is not None
    xv = np.asarray(cm.x.value, dtype=np.float64)
    # per query, the column with the largest x (ties: first)
    order = np.lexsort((-xv, program.query))
    first = np.searchsorted(program.query[order], np.arange(program.n))
    cols = order[first]
    stats = cm.problem.solver_stats.extra_stats
    prices = None
    if cm.integer and (violated := violated_rows(program, cols)):
        raise SolverError(f"{method}: HiGHS returned an assignment that exceeds {violated}")  # never trusted blindly
    if cm.integer:
        bound = float(getattr(stats, "mip_dual_bound", np.nan)) if stats is not None else np.nan
        objective = float(program.c @ program.choose_matrix(cols))
        if not np.isfinite(bound):
            bound = objective
        bound = max(bound, objective)
    else:
        bound = float(cm.problem.value)
        duals = [np.atleast_1d(np.asarray(con.dual_value, dtype=np.float64)) for _, con in cm.rows]
        prices = np.abs(np.concatenate(duals)) if duals else np.zeros(0)
    info = SolveInfo(cvxpy_status=str(cm.problem.status), lp_x=xv if not cm.integer else None)
    return build_solution(program, cols, bound=bound, method=method, seconds=seconds, prices=prices, info=info)


def solve_cvxpy(program: Compiled, *, integer: bool, time_limit: float | None = None,
                highs_options: dict[str, Any] | None = None) -> tuple[str, Solution | None]:
    """Returns (cvxpy status, solution or None when no solution is present)."""
    t0 = time.perf_counter()
    cm = build_model(program, integer=integer)
    status = solve_model(cm, time_limit=time_limit, highs_options=highs_options)
    if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.USER_LIMIT) or cm.x.value is None:
        return status, None
    method = "cvxpy_milp" if integer else "cvxpy_lp"
    return status, read_solution(cm, program, method=method, seconds=time.perf_counter() - t0)
