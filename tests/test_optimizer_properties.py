"""optimizer/: hypothesis properties, frontier, the larger-n decomposition path, input validation."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchplan.optimizer import (
    AccuracyFloor,
    Allowed,
    Budget,
    Capacity,
    GroupBudget,
    InfeasibleError,
    Problem,
    frontier,
    solve,
)
from bench.solver import constraints_for, make_options
from tests.support.factories import budget_between, cheapest_total, signed_constraints, signed_options, tiny_options
from tests.support.oracles import assert_feasible, brute_force, check_against_brute_force


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    n = draw(st.integers(1, 5))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    opts = tiny_options(n, k, seed)
    share = draw(st.floats(0.0, 1.2))
    constraints: list = [Budget(limit=budget_between(opts, share))]
    if draw(st.booleans()):
        t0 = float(opts.filter(pl.col("tenant") == "t0")["cost"].max() or 0.0) * n
        constraints.append(
            GroupBudget(group="tenant", limits={"t0": t0 * draw(st.floats(0.1, 1.0))}, name="tenant_budget")
        )
    if draw(st.booleans()):
        constraints.append(Capacity(column="calls", group="model", limit={f"m{k - 1}": draw(st.integers(0, n))}))
    if draw(st.booleans()):
        constraints.append(AccuracyFloor(min_mean=draw(st.floats(0.2, 0.7))))
    deferrable = draw(st.sampled_from([None, True]))
    return Problem(opts, "max_value", constraints, deferrable=deferrable)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["decompose", "cvxpy_milp"]))
def test_properties(problem: Problem, method: str) -> None:
    truth = brute_force(problem)
    if truth is None:
        with pytest.raises(InfeasibleError) as err:
            solve(problem, method=method)  # type: ignore[arg-type]
        assert err.value.constraint
        return
    solution = solve(problem, method=method)  # type: ignore[arg-type]
    # every query gets exactly one option or is deferred; no constraint violated
    assert_feasible(problem, solution)
    # the objective never beats the bound, nor the true optimum
    tol = 1e-6 * max(1.0, abs(truth[0]))
    assert solution.objective <= solution.bound + tol
    assert solution.objective <= truth[0] + tol
    assert solution.gap >= 0


def test_decompose_at_medium_size_is_certified_and_matches_lp() -> None:
    """Past the exact-polish size: nested-sample prices, pricing rounds; LP value equals CVXPY's LP."""
    opts = make_options(5_000, 1)
    problem = Problem(opts, "max_value", constraints_for(opts, "all"))
    fast = solve(problem, method="decompose")
    assert_feasible(problem, fast)
    assert fast.gap <= 1e-3
    lp = solve(problem, method="cvxpy_lp")
    assert fast.bound == pytest.approx(lp.bound, rel=1e-6)
    assert fast.objective <= fast.bound
    assert set(fast.binding) >= {n for n, p in fast.shadow_prices.items() if p > 1e-6}


def test_min_cost_with_floor_per_task_medium() -> None:
    opts = tiny_options(400, 4, 5, tasks=3)
    problem = Problem(opts, "min_cost", [AccuracyFloor(min_mean=0.6, group="task")])
    solution = solve(problem)
    assert_feasible(problem, solution)
    assert solution.objective >= solution.bound - 1e-9
    assert solution.gap < 1e-2
    milp = solve(problem, method="cvxpy_milp")
    assert solution.objective == pytest.approx(milp.objective, rel=1e-3)


def test_frontier_is_monotone_and_certified() -> None:
    opts = tiny_options(300, 4, 7)
    lo = cheapest_total(opts)
    budgets = [lo * f for f in (0.5, 1.0, 1.5, 2.5, 5.0)]
    table = frontier(Problem(opts, constraints=[Budget(limit=1.0)]), budgets)
    assert table.columns == ["budget", "objective", "bound", "gap", "cost", "accuracy", "deferred", "seconds"]
    assert table["objective"][0] is None  # below the cheapest assignment: infeasible without deferral
    feasible = table.drop_nulls("objective")
    obj = feasible["objective"].to_numpy()
    assert np.all(np.diff(obj) >= -1e-9)
    assert np.all(feasible["cost"].to_numpy() <= feasible["budget"].to_numpy() + 1e-9)
    assert np.all(obj <= feasible["bound"].to_numpy() + 1e-9)


def test_frontier_with_deferral_has_no_gaps() -> None:
    opts = tiny_options(100, 3, 8)
    table = frontier(Problem(opts, deferrable=True), [0.0, 0.5, 2.0, 10.0])
    assert table["objective"].null_count() == 0
    assert table["deferred"][0] == 100


def test_a_warm_start_takes_the_exact_price_of_a_lone_budget() -> None:
    """A frontier warm-starts each budget from the last one's price; with one coupling row the exact
    bisection price must still be used (a stale price cost dozens of column-generation rounds: 30-50 s a
    frontier point at 20k queries against 2 s cold)."""
    from batchplan.optimizer.decompose import BASE_QUERIES, solve_lp
    from batchplan.optimizer.solution import SolveInfo

    opts = tiny_options(BASE_QUERIES * 2, 6, 12)
    model = Problem(opts, constraints=[Budget(limit=cheapest_total(opts) * 1.5)]).compiled
    cold_info = SolveInfo()
    cold = solve_lp(model, info=cold_info)
    warm_info = SolveInfo()
    warm = solve_lp(model, warm_prices=cold.lam * 5.0, info=warm_info)
    assert warm.value == pytest.approx(cold.value, rel=1e-9)
    assert len(warm_info.levels[-1].masters) == len(cold_info.levels[-1].masters)


def test_frontier_checks_like_solve() -> None:
    """A query with no option that may not be deferred is infeasible at every budget, as ``solve`` says,
    instead of being priced as if it were not there."""
    opts = tiny_options(50, 3, 9)
    problem = Problem(opts, constraints=[Budget(limit=1.0)], n_queries=51)  # query 50 has no option
    with pytest.raises(InfeasibleError):
        solve(problem)
    table = frontier(problem, [cheapest_total(opts) * 2, 1e9])
    assert table["objective"].null_count() == 2


def test_with_constraints_shares_the_compiled_arrays() -> None:
    opts = tiny_options(300, 4, 10)
    loose = Problem(opts, constraints=[Budget(limit=1e9), Capacity(column="calls", limit=300.0)])
    tight = loose.with_constraints([Budget(limit=cheapest_total(opts) * 1.5), Capacity(column="calls", limit=300.0)])
    assert tight.compiled.table is loose.compiled.table
    assert tight.compiled.families[1] is loose.compiled.families[1]  # an unchanged spec keeps its rows
    fresh = Problem(opts, constraints=tight.constraints)
    assert solve(tight).chosen.equals(solve(fresh).chosen)
    # another options filter compiles afresh
    allowed = opts.with_columns((pl.col("option") % 5 != 0).alias("allowed"))
    filtered = Problem(allowed, constraints=[Budget(limit=1e9)]).with_constraints([Budget(limit=1e9), Allowed()])
    assert filtered.compiled.table.height < allowed.height


def test_a_tighter_budget_reuses_its_rows_and_the_threaded_pricing_answers_the_same() -> None:
    # the plan's second pass (budget less the spend margin) shares the budget's coefficient arrays, so their
    # grid is built once; full-grid pricing passes on two threads give the single thread's answer
    from batchplan.optimizer import decompose

    opts = make_options(3000, seed=3)
    loose = Problem(opts, constraints=[Budget(limit=budget_between(opts, 0.4))], deferrable=True)
    tight = loose.with_constraints([Budget(limit=budget_between(opts, 0.3))])
    assert tight.compiled.families[0].coef is loose.compiled.families[0].coef
    # the new limit (its last bit may differ: the limit and the shared arrays are summed in another order)
    assert float(tight.compiled.families[0].rhs[0]) == pytest.approx(budget_between(opts, 0.3), rel=1e-12)
    fresh = Problem(opts, constraints=tight.constraints, deferrable=True)
    serial = solve(fresh)
    assert solve(tight).chosen.equals(serial.chosen)
    with patch.object(decompose, "PARALLEL_QUERIES", 1), patch.object(decompose, "BASE_QUERIES", 100):
        threaded = solve(Problem(opts, constraints=tight.constraints, deferrable=True))
    with patch.object(decompose, "BASE_QUERIES", 100):
        single = solve(Problem(opts, constraints=tight.constraints, deferrable=True))
    assert threaded.chosen.equals(single.chosen)
    assert threaded.bound == single.bound


def test_validation_errors() -> None:
    opts = tiny_options(3, 2, 0)
    with pytest.raises(ValueError, match="objective"):
        Problem(opts, "max_accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        Problem(opts, constraints=[Budget(1.0), Budget(2.0)])
    with pytest.raises(ValueError, match="option ids"):
        solve(Problem(opts.with_columns(option=pl.lit(1, dtype=pl.Int64))))
    with pytest.raises(KeyError, match="no column"):
        solve(Problem(opts, constraints=[Capacity(column="nope", limit=1.0)]))


def test_no_constraints_takes_best_option() -> None:
    opts = tiny_options(6, 3, 4)
    solution = solve(Problem(opts))
    best = opts.sort("value", descending=True).group_by("query", maintain_order=True).first().sort("query")
    assert solution.chosen["option"].to_list() == best["option"].to_list()
    assert solution.gap == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 5),
    st.integers(2, 3),
    st.integers(0, 10_000),
    st.floats(0.0, 1.0),
    st.sampled_from(["decompose", "cvxpy_milp"]),
)
def test_signed_capacity_rows_match_brute_force(n: int, k: int, seed: int, share: float, method: str) -> None:
    opts = signed_options(n, k, seed)
    problem = Problem(opts, "max_value", signed_constraints(opts, share), deferrable=seed % 2 == 0)
    check_against_brute_force(problem, method)  # every <= row within 1e-9 relative, the optimum, a valid bound


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_signed_capacity_rows_at_medium_size(seed: int) -> None:
    """Past the exact size: an LP that is feasible must give an integral plan meeting the limit-0 rows."""
    opts = signed_options(1_500, 6, seed)
    problem = Problem(opts, "max_value", signed_constraints(opts, 0.3))
    lp = solve(problem, method="cvxpy_lp") if seed == 0 else None
    solution = solve(problem, method="decompose")
    assert_feasible(problem, solution)
    assert solution.objective <= solution.bound * (1 + 1e-9)
    assert solution.gap < 1e-2
    if lp is not None:
        assert solution.bound == pytest.approx(lp.bound, rel=1e-6)


def test_repair_moves_other_queries_when_the_split_ones_cannot() -> None:
    """Start from the unconstrained best plan (violating the signed rows) with no split query to move:
    the repair must move other queries (greedy moves, then MILP neighbourhoods) to a feasible plan."""
    import batchplan.optimizer.decompose as dec
    from batchplan.optimizer.decompose import move_repair, price, round_and_repair
    from batchplan.optimizer.solution import violated_rows

    opts = signed_options(3_000, 5, 11)
    problem = Problem(opts, "max_value", signed_constraints(opts, 0.5))
    model = problem.compiled
    start = price(model, np.zeros(model.k)).best_col
    assert violated_rows(model, start)  # the unconstrained plan breaks the limit-0 rows
    moved = move_repair(model, start)
    assert not violated_rows(model, moved)
    cols, info = round_and_repair(model, start, np.zeros(0, dtype=np.int64), None, 0, 5.0)
    # no query is split, so the split-query repair changes nothing and the moves alone make it feasible
    assert info.repair == "moves"
    assert np.array_equal(cols, moved)
    assert (cols != start).sum() > 0
    # the neighbourhood MILP path on its own (the greedy moves skipped); its last MILP, over every query,
    # takes 4-12 s here on a loaded 2-core machine: the limit only guards against a hang
    with patch.object(dec, "move_repair", lambda model, cols, **_: cols):
        cols, info = round_and_repair(model, start, np.zeros(0, dtype=np.int64), None, 0, 60.0)
    assert not violated_rows(model, cols)
    assert info.repair.startswith("milp[")
    assert float(model.c[cols].sum()) <= float(model.c[start].sum())  # start is the unconstrained best


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5), st.integers(2, 3), st.integers(0, 10_000), st.floats(0.0, 1.0), st.booleans())
def test_repair_path_matches_brute_force(n: int, k: int, seed: int, share: float, skip_moves: bool) -> None:
    """The large-problem repair (forced on tiny instances): from the unconstrained best plan it reaches a
    feasible plan exactly when one exists (brute force), never better than the optimum; with no plan, the
    MILP over every query proves it."""
    import batchplan.optimizer.decompose as dec
    from batchplan.optimizer.decompose import price, round_and_repair
    from batchplan.optimizer.solution import violated_rows

    opts = signed_options(n, k, seed)
    problem = Problem(opts, "max_value", signed_constraints(opts, share), deferrable=seed % 2 == 0)
    model = problem.compiled
    truth = brute_force(problem)
    start = price(model, np.zeros(model.k)).best_col
    moves = (lambda model, cols, **_: cols) if skip_moves else dec.move_repair
    with patch.object(dec, "EXACT_QUERIES", 0), patch.object(dec, "move_repair", moves):
        if truth is None:
            with pytest.raises(InfeasibleError):
                round_and_repair(model, start, np.zeros(0, dtype=np.int64), None, 0, 5.0)
            return
        cols, info = round_and_repair(model, start, np.zeros(0, dtype=np.int64), None, 0, 5.0)
    assert not violated_rows(model, cols), info
    objective = model.sign * float(model.c[cols].sum())
    assert objective <= truth[0] + 1e-6 * max(1.0, abs(truth[0]))
    if violated_rows(model, start):
        assert info.repair != "greedy"  # something beyond the (empty) split-query repair had to act


def test_budget_is_never_exceeded_beyond_1e9_relative() -> None:
    """A budget set exactly at a reachable total is met to 1e-9 relative, not HiGHS's 1e-6/1e-7."""
    for seed in range(4):
        opts = make_options(3_000, seed)
        problem = Problem(opts, "max_value", constraints_for(opts, "all"))
        solution = solve(problem, method="decompose")
        assert_feasible(problem, solution)
        for name, used in solution.usage.items():
            assert used <= solution.limits[name] * (1 + 1e-9) + 1e-12, name


@pytest.mark.parametrize("limit", [0.01, 0.3, 60.0])
def test_time_limit_gives_solver_error_or_a_feasible_certified_plan(limit: float) -> None:
    import time

    from batchplan.optimizer import SolverError

    opts = make_options(30_000, 3)
    problem = Problem(opts, "max_value", constraints_for(opts, "all"))
    problem.compiled  # noqa: B018  (compile outside the clock)
    t0 = time.perf_counter()
    try:
        solution = solve(problem, method="decompose", time_limit=limit)
    except SolverError as error:
        message = str(error)
        solution = None
    assert time.perf_counter() - t0 < limit + 5.0
    if solution is None:
        assert limit < 60
        assert "time limit" in message
        return
    assert_feasible(problem, solution)
    assert solution.objective <= solution.bound * (1 + 1e-9)
    assert solution.status == ("optimal" if solution.gap <= 1e-4 else "feasible")
    if limit >= 60:
        assert solution.info.converged
        assert solution.gap <= 1e-4


@pytest.mark.parametrize("layout", ["regular", "ragged"])
@pytest.mark.parametrize("which", ["budget", "floor"])
def test_single_row_bisection_path_matches_lp(which: str, layout: str) -> None:
    """One coupling row past the sample size: the bisection price gives the LP optimum (CVXPY's LP bound),
    also when queries have different numbers of options (as plan candidates do: templates per task)."""
    from batchplan.optimizer.decompose import BASE_QUERIES

    opts = make_options(3 * BASE_QUERIES, 4)
    if layout == "ragged":
        opts = opts.filter((pl.col("query") % 3 == 0) | (pl.col("option") % 10 < 6 + pl.col("query") % 4))
    if which == "budget":
        problem = Problem(opts, "max_value", constraints_for(opts, "budget"))
    else:
        problem = Problem(opts, "min_cost", [AccuracyFloor(min_mean=0.8)])
    fast = solve(problem, method="decompose")
    assert_feasible(problem, fast)
    assert fast.info.levels[0].n == problem.compiled.n  # no nested sample: the bisection priced it
    lp = solve(problem, method="cvxpy_lp")
    assert fast.bound == pytest.approx(lp.bound, rel=1e-7)
    assert fast.gap <= 1e-4
