"""A thin, typed call into highspy: one LP or MILP given as arrays, maximised. No CVXPY in between."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import highspy
import numpy as np
import scipy.sparse as sp

# HiGHS's default feasibility tolerances (1e-6/1e-7, absolute) let a MILP answer overshoot a small budget
# (a few cents) by more than violated_rows's 1e-9 relative: every MILP whose answer is used runs with these.
TIGHT_MIP_TOLERANCES = {"mip_feasibility_tolerance": 1e-10, "primal_feasibility_tolerance": 1e-10}


@dataclass
class HighsResult:
    status: str  # HiGHS model status name, e.g. "kOptimal", "kInfeasible", "kTimeLimit"
    x: np.ndarray
    row_dual: np.ndarray  # for a maximisation: >= 0 on binding <= rows
    objective: float
    mip_dual_bound: float
    mip_gap: float
    seconds: float
    nodes: int = 0  # branch-and-bound nodes a MILP explored (the work its ``mip_max_nodes`` limit counts)

    @property
    def optimal(self) -> bool:
        return self.status == "kOptimal"

    @property
    def has_solution(self) -> bool:
        return self.status in ("kOptimal", "kTimeLimit", "kIterationLimit", "kSolutionLimit", "kInterrupt") and len(self.x) > 0


def run_highs(
    c: np.ndarray,
    col_lower: np.ndarray,
    col_upper: np.ndarray,
    row_lower: np.ndarray,
    row_upper: np.ndarray,
    matrix: sp.csc_array,
    *,
    integer: bool = False,
    options: dict[str, Any] | None = None,
) -> HighsResult:
    """Maximise ``c @ x`` s.t. row_lower <= A x <= row_upper, col bounds; integer columns if ``integer``."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    for key, val in (options or {}).items():
        if h.setOptionValue(key, val) == highspy.HighsStatus.kError:
            raise ValueError(f"HiGHS rejected option {key}={val!r}")
    num_col, num_row = int(matrix.shape[1]), int(matrix.shape[0])
    a = sp.csc_array(matrix)
    a.sort_indices()
    integrality = np.full(num_col, 1 if integer else 0, dtype=np.int32)
    status = h.passModel(
        num_col, num_row, int(a.nnz), 1, -1, 0.0,
        np.ascontiguousarray(c, dtype=np.float64),
        np.ascontiguousarray(col_lower, dtype=np.float64),
        np.ascontiguousarray(col_upper, dtype=np.float64),
        np.ascontiguousarray(row_lower, dtype=np.float64),
        np.ascontiguousarray(row_upper, dtype=np.float64),
        a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32), a.data.astype(np.float64),
        integrality,
    )
    if status == highspy.HighsStatus.kError:
        raise ValueError("HiGHS rejected the model (passModel returned kError)")
    h.run()
    model_status = h.getModelStatus().name
    info = h.getInfo()
    sol = h.getSolution()
    x = np.asarray(sol.col_value, dtype=np.float64) if sol.value_valid else np.zeros(0)
    duals = np.asarray(sol.row_dual, dtype=np.float64) if sol.dual_valid else np.zeros(0)
    return HighsResult(
        status=model_status,
        x=x,
        row_dual=duals,
        objective=float(info.objective_function_value),
        mip_dual_bound=float(info.mip_dual_bound),
        mip_gap=float(info.mip_gap),
        seconds=float(h.getRunTime()),
        nodes=int(info.mip_node_count) if integer else 0,
    )
