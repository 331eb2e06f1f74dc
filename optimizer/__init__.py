"""batchplan's optimizer: a small math library that knows nothing about LLMs.

Give it an options table (query, option, value, cost, accuracy, resource and group columns) and
constraint specs; it returns the chosen option per query (or deferral), the bound, the gap and the duals.

    from batchplan.optimizer import Problem, solve, frontier, Budget
    solution = solve(Problem(options, constraints=[Budget(limit=12.5)]))
"""

from batchplan.optimizer.api import frontier, solve
from batchplan.optimizer.constraints import AccuracyFloor, Allowed, Budget, Capacity, GroupBudget
from batchplan.optimizer.problem import Problem
from batchplan.optimizer.solution import InfeasibleError, Solution, SolverError

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
