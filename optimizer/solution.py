"""What a solve returns, and the typed errors it raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from batchplan.optimizer.compiled import Compiled


class SolverError(RuntimeError):
    """The solver failed (error status, time-out, numerical trouble): not a statement about feasibility."""


class InfeasibleError(ValueError):
    """No assignment satisfies the constraints.

    ``constraint``: the name(s) at fault (e.g. "budget", "accuracy_floor:task[qa]", "capacity:tokens:model[m1]").
    ``suggestion``: the smallest change that makes the request feasible, e.g. ``{"min_budget": 12.3}``,
    ``{"max_accuracy": 0.81}``, ``{"missing_capacity": 1500.0}``; keyed by row when several rows are at fault.
    """

    def __init__(self, constraint: str | list[str], message: str, suggestion: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint
        self.message = message
        self.suggestion = suggestion or {}

    def __str__(self) -> str:
        # the facts are in ``constraint`` and ``suggestion``; the message states them once, in words
        return self.message


@dataclass
class Level:
    """One level of the decomposition: a (sampled) program's queries and its restricted LPs."""

    n: int
    masters: list[tuple[int, float]] = field(default_factory=list)  # (candidate moves, seconds) per LP
    converged: bool = True


@dataclass
class Rounding:
    """How an LP point became an integral assignment (``decompose.round_and_repair``)."""

    repair: str  # "exact" (one MILP over every query), "greedy", "moves" or "milp[<queries>]"
    polish_queries: int = 0
    polish_status: str | None = None  # HiGHS status of the last MILP
    polish_bound: float | None = None  # its proven bound, where it covered every query to optimality
    polish_skipped: bool = False  # the plan was already within POLISH_SKIP_GAP of the bound


@dataclass
class SolveInfo:
    """What a solve did besides its answer; each method fills what it has."""

    converged: bool = True  # False: the time limit cut the LP short (the bound still holds)
    prices: np.ndarray | None = None  # the LP's row prices (``<=`` form), a warm start for a neighbour
    levels: list[Level] = field(default_factory=list)  # decompose: the nested samples, the full program last
    fractional: int = 0  # queries the LP split
    lp_value: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    rounding: Rounding | None = None
    cvxpy_status: str | None = None
    lp_x: np.ndarray | None = None  # cvxpy_lp: the LP point, for the rounding


@dataclass
class Solution:
    """The chosen option per query, with the certificate.

    ``objective``: total value (max_value) or total cost (min_cost) of the assignment. ``bound``: a proven
    bound on the best possible objective (the LP relaxation / Lagrangian dual, or HiGHS's MIP dual bound).
    ``gap``: |bound - objective| / |bound|. ``shadow_prices``: per constraint row, how much the objective would
    improve per unit of relaxation of that row (e.g. value per extra dollar of budget), from the LP duals.
    ``binding``: rows that are tight (positive price or no slack).
    """

    chosen: pl.DataFrame  # query: Int64, option: Int64, one row per non-deferred query
    deferred: np.ndarray  # int64 query indices
    status: str  # "optimal" (gap within tolerance) or "feasible"
    objective: float
    bound: float
    gap: float
    solve_seconds: float
    method: str
    shadow_prices: dict[str, float] = field(default_factory=dict)
    binding: list[str] = field(default_factory=list)
    usage: dict[str, float] = field(default_factory=dict)  # left-hand side of every row
    limits: dict[str, float] = field(default_factory=dict)  # right-hand side of every row
    cost: float = 0.0
    value: float = 0.0
    accuracy: float = 0.0  # sum of expected accuracy of the chosen options
    info: SolveInfo = field(default_factory=SolveInfo)

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status, "method": self.method, "objective": self.objective, "bound": self.bound,
            "gap": self.gap, "seconds": self.solve_seconds, "cost": self.cost, "value": self.value,
            "n_chosen": self.chosen.height, "n_deferred": len(self.deferred), "binding": self.binding,
            "shadow_prices": self.shadow_prices,
        }


def relative_gap(objective: float, bound: float, sign: float) -> float:
    """(bound - objective)/|bound| for max, (objective - bound)/|bound| for min; never negative beyond noise."""
    diff = (bound - objective) if sign > 0 else (objective - bound)
    scale = max(abs(bound), 1e-12)
    return max(diff / scale, 0.0) if abs(diff) > 1e-12 * max(1.0, abs(bound)) else 0.0


def build_solution(
    program: Compiled,
    cols: np.ndarray,
    *,
    bound: float,
    method: str,
    seconds: float,
    prices: np.ndarray | None,
    gap_tol: float = 1e-4,
    info: SolveInfo | None = None,
) -> Solution:
    """Read back one chosen program column per query into a Solution (``cols``: column index per query)."""
    objective_max = float(program.c[cols].sum())
    objective = program.sign * objective_max
    bound_nat = program.sign * bound
    gap = relative_gap(objective, bound_nat, program.sign)
    options = program.option[cols]
    real = options >= 0
    chosen = pl.DataFrame(
        {"query": np.flatnonzero(real).astype(np.int64), "option": options[real]},
        schema={"query": pl.Int64, "option": pl.Int64},
    )
    deferred = np.flatnonzero(~real).astype(np.int64)
    names = program.row_names
    usage_le = program.le_usage_cols(cols)
    rhs_le = program.le_rhs()
    natural_usage: dict[str, float] = {}
    limits: dict[str, float] = {}
    for f in program.families:
        u = f.usage_cols(cols)
        for name, val, lim in zip(f.names, u, f.rhs, strict=True):
            natural_usage[name] = float(val)
            limits[name] = float(lim)
    shadow = {}
    if prices is not None:
        shadow = {name: float(max(p, 0.0)) for name, p in zip(names, prices, strict=True)}
    binding = []
    for i, name in enumerate(names):
        slack = rhs_le[i] - usage_le[i]
        tight = slack <= 1e-6 * max(1.0, abs(rhs_le[i])) + 1e-9
        priced = prices is not None and prices[i] > 1e-9
        if tight or priced:
            binding.append(name)
    return Solution(
        chosen=chosen,
        deferred=deferred,
        status="optimal" if gap <= gap_tol else "feasible",
        objective=objective,
        bound=bound_nat,
        gap=gap,
        solve_seconds=seconds,
        method=method,
        shadow_prices=shadow,
        binding=binding,
        usage=natural_usage,
        limits=limits,
        cost=float(program.cost[cols].sum()),
        value=float(program.value[cols].sum()),
        accuracy=float(program.accuracy[cols].sum()),
        info=info or SolveInfo(),
    )


def violated_rows(program: Compiled, cols: np.ndarray, tol: float = 1e-9) -> list[str]:
    """Names of rows an assignment violates (relative tolerance)."""
    usage = program.le_usage_cols(cols)
    rhs = program.le_rhs()
    return [n for n, u, b in zip(program.row_names, usage, rhs, strict=True) if u > b + tol * max(1.0, abs(b))]
