"""optimizer/: every method against brute force on tiny instances, for every constraint type."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import polars as pl
import pytest

from optimizer import (
    AccuracyFloor,
    Allowed,
    Budget,
    Capacity,
    GroupBudget,
    InfeasibleError,
    Problem,
    solve,
)
from optimizer.constraints import Constraint

METHODS = ("cvxpy_milp", "decompose", "auto")


def tiny_options(n: int = 5, k: int = 3, seed: int = 0, *, tenants: int = 2, tasks: int = 2) -> pl.DataFrame:
    """n queries x k options; cost spans ~100x, accuracy rises with log cost plus noise."""
    rng = np.random.default_rng(seed)
    base = np.geomspace(0.01, 1.0, k)
    cost = base[None, :] * rng.uniform(0.7, 1.3, (n, k))
    acc = np.clip(0.45 + 0.08 * np.log(cost / 0.01) + rng.normal(0, 0.08, (n, k)), 0.0, 1.0)
    priority = rng.choice([1.0, 2.0], n)
    tenant = rng.integers(0, tenants, n)
    task = rng.integers(0, tasks, n)
    return pl.DataFrame(
        {
            "query": np.repeat(np.arange(n), k),
            "option": np.arange(n * k) + 100,
            "value": (acc * priority[:, None]).ravel(),
            "cost": cost.ravel(),
            "accuracy": acc.ravel(),
            "tenant": np.repeat([f"t{t}" for t in tenant], k),
            "task": np.repeat([f"task{t}" for t in task], k),
            "model": np.tile([f"m{j}" for j in range(k)], n),
            "calls": np.ones(n * k),
            "tokens": rng.integers(100, 1000, n * k).astype(np.float64),
            "allowed": rng.random(n * k) > 0.2,
        }
    )


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


def assert_feasible(problem: Problem, solution) -> None:  # type: ignore[no-untyped-def]
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


def cheapest_total(opts: pl.DataFrame) -> float:
    return float(opts.group_by("query").agg(pl.col("cost").min())["cost"].sum())


def dearest_total(opts: pl.DataFrame) -> float:
    return float(opts.group_by("query").agg(pl.col("cost").max())["cost"].sum())


def budget_between(opts: pl.DataFrame, share: float) -> float:
    lo, hi = cheapest_total(opts), dearest_total(opts)
    return lo + share * (hi - lo)


CASES: dict[str, tuple[str, object]] = {}


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
    opts = tiny_options(6, 3, 1)
    solution = solve(Problem(opts, constraints=[Budget(limit=budget_between(opts, 0.5))]))
    assert solution.chosen.schema == pl.Schema({"query": pl.Int64, "option": pl.Int64})
    assert solution.deferred.dtype == np.int64
    assert solution.gap >= 0
    assert solution.status == "optimal"
    assert solution.solve_seconds >= 0
