"""optimizer/: every method against brute force on tiny instances, for every constraint type."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import polars as pl
import pytest

from batchplan.optimizer import AccuracyFloor, Allowed, Budget, Capacity, GroupBudget, InfeasibleError, Problem, solve
from batchplan.optimizer.constraints import Constraint
from tests.support.factories import budget_between, cheapest_total, dearest_total, tiny_options
from tests.support.oracles import brute_force, check_against_brute_force

METHODS = ("cvxpy_milp", "decompose", "auto")


def _cases(opts: pl.DataFrame) -> dict[str, tuple[str, Sequence[Constraint], dict[str, object]]]:
    b = budget_between(opts, 0.3)
    tenant_cost = opts.group_by("tenant").agg(pl.col("cost").max() * pl.len() / 3)
    limits = {row["tenant"]: row["cost"] * 0.6 for row in tenant_cost.iter_rows(named=True)}
    return {
        "budget": ("max_value", [Budget(limit=b)], {}),
        "budget_defer": ("max_value", [Budget(limit=budget_between(opts, 0.0) * 0.6)], {"deferrable": True}),
        "group_budget": ("max_value", [Budget(limit=b * 2), GroupBudget(group="tenant", limits=limits, name="tenant_budget")], {}),
        "capacity_global": ("max_value", [Budget(limit=b * 3), Capacity(column="tokens", limit=float(opts["tokens"].sum() / 3 * 0.8))], {}),
        "capacity_per_model": (
            "max_value",
            [Budget(limit=b * 3), Capacity(column="calls", group="model", limit={"m2": 1, "m1": 2})],
            {},
        ),
        "allowed": ("max_value", [Budget(limit=b), Allowed(column="allowed")], {"deferrable": True}),
        "floor_min_cost": ("min_cost", [AccuracyFloor(min_mean=0.6)], {}),
        "floor_per_task": ("min_cost", [AccuracyFloor(min_mean={"task0": 0.62, "task1": 0.55}, group="task")], {}),
        "floor_with_budget": ("max_value", [Budget(limit=b), AccuracyFloor(min_mean=0.55, group="task")], {}),
        "all": (
            "max_value",
            [
                Budget(limit=b * 1.2),
                GroupBudget(group="tenant", limits=limits, name="tenant_budget"),
                Capacity(column="calls", group="model", limit={"m2": 2}),
                AccuracyFloor(min_mean=0.5),
                Allowed(column="allowed"),
            ],
            {"deferrable": np.array([True, False, True, False, True])},
        ),
    }


CASE_NAMES = list(_cases(tiny_options()).keys())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(case: str, method: str, seed: int) -> None:
    opts = tiny_options(5, 3, seed)
    objective, constraints, kwargs = _cases(opts)[case]
    problem = Problem(opts, objective, constraints, **kwargs)  # type: ignore[arg-type]
    check_against_brute_force(problem, method)


def test_budget_below_cheapest_names_min_budget() -> None:
    opts = tiny_options(5, 3, 0)
    need = cheapest_total(opts)
    for method in METHODS:
        with pytest.raises(InfeasibleError) as err:
            solve(Problem(opts, constraints=[Budget(limit=need * 0.5)]), method=method)  # type: ignore[arg-type]
        assert err.value.constraint == "budget"
        assert err.value.suggestion["min_budget"] == pytest.approx(need)


def test_budget_below_cheapest_with_deferral_defers() -> None:
    opts = tiny_options(5, 3, 0)
    solution = solve(Problem(opts, constraints=[Budget(limit=cheapest_total(opts) * 0.5)], deferrable=True))
    assert len(solution.deferred) > 0
    assert solution.cost <= cheapest_total(opts) * 0.5 + 1e-9


def test_floor_above_reachable_names_max_accuracy() -> None:
    opts = tiny_options(5, 3, 0)
    best = float(opts.group_by("query").agg(pl.col("accuracy").max())["accuracy"].mean())  # type: ignore[arg-type]
    for method in METHODS:
        with pytest.raises(InfeasibleError) as err:
            solve(Problem(opts, "min_cost", [AccuracyFloor(min_mean=min(best + 0.05, 1.0))]), method=method)  # type: ignore[arg-type]
        assert err.value.constraint == "accuracy_floor"
        assert err.value.suggestion["max_accuracy"] == pytest.approx(best)


def test_capacity_short_names_missing_capacity() -> None:
    opts = tiny_options(5, 3, 0)
    need = float(opts.group_by("query").agg(pl.col("tokens").min())["tokens"].sum())
    with pytest.raises(InfeasibleError) as err:
        solve(Problem(opts, constraints=[Capacity(column="tokens", limit=need - 10)]))
    assert err.value.constraint == "capacity:tokens"
    assert err.value.suggestion["missing_capacity"] == pytest.approx(10)


def test_jointly_infeasible_budget_and_floor() -> None:
    opts = tiny_options(5, 3, 0)
    cheap = cheapest_total(opts)
    best = float(opts.group_by("query").agg(pl.col("accuracy").max())["accuracy"].mean())  # type: ignore[arg-type]
    problem = Problem(opts, constraints=[Budget(limit=cheap * 1.01), AccuracyFloor(min_mean=best - 0.01)])
    for method in METHODS:
        with pytest.raises(InfeasibleError) as err:
            solve(problem, method=method)  # type: ignore[arg-type]
        assert err.value.constraint


def test_query_without_allowed_option() -> None:
    opts = tiny_options(4, 3, 0).with_columns(allowed=pl.col("query") != 2)
    with pytest.raises(InfeasibleError) as err:
        solve(Problem(opts, constraints=[Allowed()]))
    assert err.value.constraint == "allowed"
    solution = solve(Problem(opts, constraints=[Allowed()], deferrable=True))
    assert solution.deferred.tolist() == [2]


def test_shadow_price_and_binding() -> None:
    opts = tiny_options(40, 4, 3)
    problem = Problem(opts, constraints=[Budget(limit=budget_between(opts, 0.4))])
    solution = solve(problem)
    assert "budget" in solution.binding
    assert solution.shadow_prices["budget"] > 0
    loose = solve(Problem(opts, constraints=[Budget(limit=dearest_total(opts) * 2)]))
    assert loose.shadow_prices["budget"] == 0
    assert "budget" not in loose.binding


def test_solution_shapes() -> None:
    """A Solution's totals are the sums over its chosen options, its gap is that of its objective and
    bound, and it is the brute-force optimum (so "optimal" is earned, not a default)."""
    opts = tiny_options(6, 3, 1)
    budget = budget_between(opts, 0.5)
    problem = Problem(opts, constraints=[Budget(limit=budget)])
    t0 = time.perf_counter()
    solution = solve(problem)
    wall = time.perf_counter() - t0
    assert solution.chosen.schema == pl.Schema({"query": pl.Int64, "option": pl.Int64})
    assert solution.deferred.dtype == np.int64
    assert solution.deferred.size == 0  # nothing may be deferred without deferrable=True
    picked = solution.chosen.join(opts, on=["query", "option"])
    assert picked.height == 6
    assert solution.cost == pytest.approx(picked["cost"].sum(), rel=1e-12)
    assert solution.value == pytest.approx(picked["value"].sum(), rel=1e-12)
    assert solution.accuracy == pytest.approx(picked["accuracy"].sum(), rel=1e-12)
    assert solution.usage["budget"] == pytest.approx(solution.cost, rel=1e-12)
    assert solution.limits["budget"] == pytest.approx(budget, rel=1e-12)
    truth = brute_force(problem)
    assert truth is not None
    assert solution.objective == pytest.approx(truth[0], rel=1e-9)
    assert solution.bound >= solution.objective - 1e-12
    assert solution.gap == pytest.approx((solution.bound - solution.objective) / abs(solution.bound), abs=1e-12)
    assert solution.status == ("optimal" if solution.gap <= 1e-4 else "feasible")
    assert 0 < solution.solve_seconds <= wall
