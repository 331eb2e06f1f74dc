"""One input, one plan: the decomposition's plan does not depend on how loaded the machine is.

The plan's own MILPs (the exact one over a small problem, the improvement polish over the split and
closest-to-tie queries) stop at a node count, not at a wall clock: a 1 s clock cut the polish short when four
jobs shared two cores, and ``bench/quality.py`` run twice on one commit gave tied plans 1e-6 apart. Here a
machine 10,000x slower is played by dividing every HiGHS time limit by 10,000: the plan must not move.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import numpy as np
import pytest

from batchplan.optimizer import Budget, Problem, solve
from batchplan.optimizer import decompose as dec
from tests.support.factories import budget_between, tiny_options

SLOWDOWN = 10_000.0


def _slow_machine(run_highs: Any) -> Any:
    """run_highs on a machine SLOWDOWN times slower: each wall-clock limit buys that much less work."""

    def run(*args: Any, options: dict[str, Any] | None = None, **kw: Any) -> Any:
        options = dict(options or {})
        if "time_limit" in options:
            options["time_limit"] = options["time_limit"] / SLOWDOWN
        return run_highs(*args, options=options, **kw)

    return run


@pytest.mark.parametrize(
    ("n", "k", "seed", "share"),
    [
        (150, 6, 3, 0.3),  # up to EXACT_QUERIES: one MILP over every query
        (600, 6, 4, 0.25),  # past it: greedy repair, then the improvement polish
    ],
)
def test_the_plan_is_the_same_twice_and_on_a_loaded_machine(n: int, k: int, seed: int, share: float) -> None:
    opts = tiny_options(n, k, seed)
    problem = Problem(opts, "max_value", [Budget(limit=budget_between(opts, share))])
    first = solve(problem, method="decompose")
    again = solve(problem, method="decompose")
    with patch.object(dec, "run_highs", _slow_machine(dec.run_highs)):
        loaded = solve(problem, method="decompose")
    for other in (again, loaded):
        assert np.array_equal(other.chosen["option"].to_numpy(), first.chosen["option"].to_numpy())
        assert other.objective == first.objective
        assert other.bound == first.bound


def test_a_solve_without_a_time_limit_gives_its_milps_a_node_limit_and_no_clock() -> None:
    opts = tiny_options(600, 6, 4)
    problem = Problem(opts, "max_value", [Budget(limit=budget_between(opts, 0.25))])
    seen: list[dict[str, Any]] = []
    real = dec.run_highs

    def spy(*args: Any, options: dict[str, Any] | None = None, integer: bool = False, **kw: Any) -> Any:
        if integer:
            seen.append(dict(options or {}))
        return real(*args, options=options, integer=integer, **kw)

    with patch.object(dec, "run_highs", spy):
        solve(problem, method="decompose")
        assert seen, "the improvement polish did not run: pick another problem"
        assert all("time_limit" not in o and o["mip_max_nodes"] == dec.POLISH_NODES for o in seen)
        seen.clear()
        solve(problem, method="decompose", time_limit=60.0)  # a caller's deadline still bounds them
        assert seen
        assert all(0 < o["time_limit"] <= 60.0 for o in seen)
