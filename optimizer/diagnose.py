"""Why a request is infeasible, and the smallest change that makes it feasible.

Run only after a solver reported infeasibility (or the fast method's elastic rows kept a slack), so its
cost never touches the happy path.

1. Queries with no allowed option that may not be deferred -> ``allowed``.
2. Each row alone: a ``<=`` row whose smallest reachable usage (every query at its own minimum) exceeds
   the limit (budget below the cheapest assignment -> ``min_budget``; capacity -> ``missing_capacity``);
   a floor above the best reachable mean -> ``max_accuracy``. These suggestions are exact.
3. Rows jointly infeasible (each fine alone): the elastic LP's slacks say by how much each row must move.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchplan.optimizer.compiled import Compiled, RowFamily
from batchplan.optimizer.solution import InfeasibleError


def _per_query(program: Compiled, values: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    return ufunc.reduceat(values, program.starts[:-1]) if program.m else np.zeros(program.n)


def empty_queries(program: Compiled) -> np.ndarray:
    return np.flatnonzero(np.diff(program.starts) == 0)


def row_extremes(program: Compiled, family: RowFamily) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (smallest, largest) reachable usage, each query independently at its extreme."""
    lo, hi = np.zeros(family.size), np.zeros(family.size)
    nonempty = np.diff(program.starts) > 0
    for g in range(family.size):
        contrib = np.where(family.gid == g, family.coef, 0.0)
        lo[g] = float(_per_query(program, contrib, np.minimum)[nonempty].sum())
        hi[g] = float(_per_query(program, contrib, np.maximum)[nonempty].sum())
    return lo, hi


def _row_suggestion(family: RowFamily, g: int, lo: float, hi: float) -> dict[str, Any] | None:
    limit = float(family.rhs[g])
    tol = 1e-9 * max(1.0, abs(limit))
    if family.sense == "<=" and lo > limit + tol:
        if family.kind in ("budget", "group_budget"):
            return {"min_budget": lo}
        return {"min_capacity": lo, "missing_capacity": lo - limit}
    if family.sense == ">=" and hi < limit - tol:
        count = float(family.scale[g]) if family.scale is not None else float("nan")
        return {"max_accuracy": hi / count if count else float("nan"), "required": limit, "reachable": hi}
    return None


def _describe(row: str, fix: dict[str, Any]) -> str:
    """One row's fault in words, e.g. 'budget: at least 0.0794 needed'."""
    if "min_budget" in fix:
        return f"{row}: at least {fix['min_budget']:.6g} needed"
    if "missing_capacity" in fix:
        return f"{row}: at least {fix['min_capacity']:.6g} needed, {fix['missing_capacity']:.6g} more than the limit"
    if "max_accuracy" in fix:
        return f"{row}: a mean of at most {fix['max_accuracy']:.6g} is reachable"
    return f"{row}: {fix}"


def diagnose(program: Compiled, elastic: dict[str, float] | None = None) -> InfeasibleError:
    """Build the typed error for an infeasible program. ``elastic``: row -> slack needed, from an elastic LP."""
    empty = empty_queries(program)
    if len(empty):
        return InfeasibleError(
            "allowed",
            f"{len(empty)} queries have no allowed option and may not be deferred (e.g. query {int(empty[0])})",
            {"queries_without_options": empty[:100].tolist(), "allow_deferral": True},
        )
    faults: dict[str, dict[str, Any]] = {}
    for family in program.families:
        lo, hi = row_extremes(program, family)
        for g, name in enumerate(family.names):
            s = _row_suggestion(family, g, float(lo[g]), float(hi[g]))
            if s is not None:
                faults[name] = s
    if faults:
        names = list(faults)
        suggestion: dict[str, Any] = faults[names[0]] if len(names) == 1 else faults
        what = "; ".join(_describe(n, s) for n, s in faults.items())
        return InfeasibleError(names[0] if len(names) == 1 else names, f"infeasible on its own: {what}", suggestion)
    if elastic:
        at_fault = {n: s for n, s in elastic.items() if s > 0}
        limits = {n: float(r) for f in program.families for n, r in zip(f.names, f.rhs, strict=True)}
        senses = {n: f.sense for f in program.families for n in f.names}
        change = {
            n: {"change": float(s if senses[n] == "<=" else -s),
                "feasible_limit": float(limits[n] + (s if senses[n] == "<=" else -s))}
            for n, s in at_fault.items()
        }
        names = list(change) or ["<joint>"]
        budget_rows = [n for n in names if n in limits and program.families and _kind(program, n) == "budget"]
        suggestion: dict[str, Any] = {"rows": change}  # type: ignore[no-redef]
        if budget_rows:
            suggestion["min_budget"] = change[budget_rows[0]]["feasible_limit"]
        relax = "; ".join(f"{n} to {c['feasible_limit']:.6g}" for n, c in change.items())
        return InfeasibleError(names[0] if len(names) == 1 else names,
                               f"constraints are jointly infeasible; relax {relax or 'them'}", suggestion)
    return InfeasibleError("<joint>", "the constraints are jointly infeasible", {})


def _kind(program: Compiled, row: str) -> str:
    for f in program.families:
        if row in f.names:
            return f.kind
    return ""
