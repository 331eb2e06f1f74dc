"""The optimizer's oracle: every assignment enumerated (tiny instances), and the feasibility check every
optimizer test applies to a Solution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from batchplan.optimizer import InfeasibleError, Problem, Solution, solve


def brute_force(problem: Problem) -> tuple[float, tuple[int, ...]] | None:
    """Enumerate every assignment (deferral included); returns (best objective, chosen columns) or None."""
    model = problem.compiled
    per_query = [range(model.starts[q], model.starts[q + 1]) for q in range(model.n)]
    rhs = model.le_rhs()
    best: tuple[float, tuple[int, ...]] | None = None
    for combo in itertools.product(*per_query):
        x = np.zeros(model.m)
        x[list(combo)] = 1.0
        if np.any(model.le_usage(x) > rhs + 1e-9):
            continue
        obj = float(model.c @ x)
        if best is None or obj > best[0] + 1e-12:
            best = (obj, combo)
    if best is None:
        return None
    return model.sign * best[0], best[1]


def assert_feasible(problem: Problem, solution: Solution) -> None:
    model = problem.compiled
    served = set(solution.chosen["query"].to_list())
    deferred = set(solution.deferred.tolist())
    assert served.isdisjoint(deferred)
    assert served | deferred == set(range(model.n))
    assert solution.chosen["query"].is_unique().all()
    table = model.table
    joined = solution.chosen.join(table, on=["query", "option"], how="left")
    assert joined["cost"].null_count() == 0, "chosen an option that is not in the (allowed) table"
    for name, used in solution.usage.items():
        limit = solution.limits[name]
        sense = next(f.sense for f in model.families if name in f.names)
        if sense == "<=":
            assert used <= limit + 1e-9 * max(1.0, abs(limit)), (name, used, limit)
        else:
            assert used >= limit - 1e-6 * max(1.0, abs(limit)), (name, used, limit)


def check_against_brute_force(problem: Problem, method: str) -> None:
    truth = brute_force(problem)
    if truth is None:
        with pytest.raises(InfeasibleError):
            solve(problem, method=method)  # type: ignore[arg-type]
        return
    solution = solve(problem, method=method)  # type: ignore[arg-type]
    assert_feasible(problem, solution)
    optimum = truth[0]
    tol = 1e-6 * max(1.0, abs(optimum))
    assert solution.objective == pytest.approx(optimum, abs=1e-5 * max(1.0, abs(optimum))), (method, solution.summary())
    if problem.objective == "max_value":
        assert solution.bound >= optimum - tol
    else:
        assert solution.bound <= optimum + tol
