"""batchplan's optimizer: a small math library that knows nothing about LLMs.

Give it an options table (query, option, value, cost, accuracy, resource and group columns) and
constraint specs; it returns the chosen option per query (or deferral), the bound, the gap and the duals.

    from optimizer import Problem, solve, frontier, Budget
    solution = solve(Problem(options, constraints=[Budget(limit=12.5)]))
"""

from optimizer.api import frontier, solve
from optimizer.constraints import AccuracyFloor, Allowed, Budget, Capacity, GroupBudget
from optimizer.problem import Problem
from optimizer.solution import InfeasibleError, Solution, SolverError

__all__ = [
    "AccuracyFloor",
    "Allowed",
    "Budget",
    "Capacity",
    "GroupBudget",
    "InfeasibleError",
    "Problem",
    "Solution",
    "SolverError",
    "frontier",
    "solve",
]
