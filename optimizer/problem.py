"""The problem: an options table, an objective and constraint specs; compiled once into flat arrays.

Options table, one row per (query, option):

| column | type | meaning |
|---|---|---|
| query | Int64 | dense query index 0..n_queries-1 |
| option | Int64 | option id, unique over the table |
| value | Float64 | objective contribution when chosen (``max_value``) |
| cost | Float64 | expected cost |
| accuracy | Float64 | expected accuracy (floors) |
| any other | numeric / string | resource columns (``Capacity``) and group columns (tenant, task, model) |

The compiled program lays the options out query by query (``starts[q]:starts[q+1]``), real options sorted by
option id, then one *deferral* column for each deferrable query (value, cost and every coefficient 0).
Every query takes exactly one column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import numpy as np
import polars as pl

from batchplan.optimizer.compiled import Compiled, RowFamily, subset
from batchplan.optimizer.constraints import Allowed, Budget, Constraint, RowSpec, constraint_name

__all__ = ["REQUIRED", "Compiled", "Objective", "Problem", "compile_problem", "subset"]

Objective = Literal["max_value", "min_cost"]
REQUIRED = {"query": pl.Int64, "option": pl.Int64, "value": pl.Float64, "cost": pl.Float64}


class Problem:
    """One batch to plan. Cheap to construct; compiled (validated, sorted, rows built) on first use.

    ``deferrable``: None/False (no deferral), True (every query), a bool array over queries, or the name of a
    bool column (a query is deferrable if any of its rows says so). ``n_queries`` defaults to max(query)+1;
    queries without any option must be deferrable.
    """

    def __init__(
        self,
        options: pl.DataFrame,
        objective: Objective = "max_value",
        constraints: Sequence[Constraint] = (),
        *,
        deferrable: bool | np.ndarray | str | None = None,
        n_queries: int | None = None,
    ) -> None:
        if objective not in ("max_value", "min_cost"):
            raise ValueError(f"objective must be 'max_value' or 'min_cost', got {objective!r}")
        self.options = options
        self.objective: Objective = objective
        self.constraints = list(constraints)
        self.deferrable = deferrable
        self.n_queries = n_queries
        self._parent: Problem | None = None  # set by with_constraints: whose compiled arrays to share
        names = [constraint_name(c) for c in self.constraints]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"constraint names must be unique; repeated: {duplicates} (pass name=...)")

    def with_constraints(self, constraints: Sequence[Constraint]) -> Problem:
        """The same options, objective and deferrals under other constraints. Compiling it reuses this
        problem's compiled arrays (only the constraint rows are built again) when both filter the options
        with the same ``Allowed`` specs: a second pass at a tighter budget, or a budget frontier, costs rows,
        not a second compile of the table."""
        other = Problem(self.options, self.objective, constraints, deferrable=self.deferrable, n_queries=self.n_queries)
        other._parent = self
        return other

    @cached_property
    def compiled(self) -> Compiled:
        parent = self._parent
        if parent is not None and _filters(parent.constraints) == _filters(self.constraints):
            return recompile_rows(parent.compiled, parent.constraints, self.constraints)
        return compile_problem(self)


def _filters(constraints: Sequence[Constraint]) -> list[Allowed]:
    return [c for c in constraints if isinstance(c, Allowed)]


def recompile_rows(program: Compiled, specs: Sequence[Constraint], constraints: Sequence[Constraint]) -> Compiled:
    """``program`` (compiled under ``specs``) with the rows of ``constraints``: the arrays are shared, a spec
    equal to one of ``specs`` keeps its row family, the others are built."""
    known = list(zip(_rows(specs), program.families, strict=True))  # specs hold dicts: compared, not hashed
    out = dataclasses.replace(program, families=[], _terms=None)
    out.families = [_known_family(spec, known) or spec.rows(out) for spec in _rows(constraints)]
    return out


def _known_family(spec: RowSpec, known: list[tuple[RowSpec, RowFamily]]) -> RowFamily | None:
    """The family of an equal known spec; for a budget that differs only in its limit (a second pass at a
    tighter budget), that family with the new limit: its coefficient arrays (and their grids) are shared."""
    same = next((f for s, f in known if s == spec), None)
    if same is not None or not isinstance(spec, Budget):
        return same
    return next(
        (
            dataclasses.replace(f, rhs=np.array([float(spec.limit)]))
            for s, f in known
            if isinstance(s, Budget) and dataclasses.replace(s, limit=spec.limit) == spec
        ),
        None,
    )


def _rows(constraints: Sequence[Constraint]) -> list[RowSpec]:
    return [c for c in constraints if not isinstance(c, Allowed)]


def _deferrable_mask(problem: Problem, table: pl.DataFrame, n: int) -> np.ndarray:
    d = problem.deferrable
    if d is None or d is False:
        return np.zeros(n, dtype=bool)
    if d is True:
        return np.ones(n, dtype=bool)
    if isinstance(d, str):
        per_query = table.group_by("query").agg(pl.col(d).cast(pl.Boolean).any())
        mask = np.zeros(n, dtype=bool)
        mask[per_query["query"].to_numpy()] = per_query[d].fill_null(False).to_numpy()
        return mask
    mask = np.asarray(d, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"deferrable must have one flag per query ({n}), got shape {mask.shape}")
    return mask


def _is_sorted(table: pl.DataFrame) -> bool:
    if table.height < 2:
        return True
    dq = pl.col("query").diff()
    ok = table.select(((dq > 0) | ((dq == 0) & (pl.col("option").diff() > 0))).slice(1).all()).item()
    return bool(ok)


def compile_problem(problem: Problem) -> Compiled:
    table = problem.options
    missing = [c for c in REQUIRED if c not in table.columns]
    if problem.objective == "max_value" and "value" not in table.columns:
        missing.append("value")
    if missing:
        raise ValueError(f"options table lacks column(s) {sorted(set(missing))}; has {table.columns}")
    casts = [pl.col(c).cast(t) for c, t in REQUIRED.items()]
    if "accuracy" in table.columns:
        casts.append(pl.col("accuracy").cast(pl.Float64))
    table = table.with_columns(casts)
    n = problem.n_queries if problem.n_queries is not None else (int(table["query"].max()) + 1 if table.height else 0)  # type: ignore[arg-type]
    if table.height:
        qmin, qmax = int(table["query"].min()), int(table["query"].max())  # type: ignore[arg-type]
        if qmin < 0 or qmax >= n:
            raise ValueError(f"query must be a dense index in 0..{n - 1}; found range {qmin}..{qmax}")
        # ascending option ids (as the pipeline writes them) are unique without hashing them
        ascending = table.select((pl.col("option").diff().slice(1) > 0).all()).item()
        if not ascending and table["option"].n_unique() != table.height:
            raise ValueError("option ids must be unique over the options table")
        for col in ("value", "cost"):
            if table[col].null_count() or not np.isfinite(table[col].to_numpy()).all():
                raise ValueError(f"column {col!r} has null or non-finite values")
    defer = _deferrable_mask(problem, table, n)
    for spec in problem.constraints:
        if isinstance(spec, Allowed):
            table = table.filter(pl.col(spec.column).cast(pl.Boolean).fill_null(False))
    if not _is_sorted(table):
        table = table.sort(["query", "option"])
    q_real = table["query"].to_numpy().astype(np.int64, copy=False)
    real_counts = np.bincount(q_real, minlength=n).astype(np.int64)
    counts = real_counts + defer.astype(np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    m = int(starts[-1])
    if defer.any():
        rank = np.arange(len(q_real), dtype=np.int64) - np.repeat(np.cumsum(real_counts) - real_counts, real_counts)
        real = starts[q_real] + rank
        query = np.repeat(np.arange(n, dtype=np.int64), counts)
    else:  # program columns are exactly the sorted table rows
        real = np.arange(m, dtype=np.int64)
        query = q_real
    if defer.any():
        option = np.full(m, -1, dtype=np.int64)
        option[real] = table["option"].to_numpy()
        value = np.zeros(m)
        value[real] = table["value"].to_numpy() if "value" in table.columns else 0.0
        cost = np.zeros(m)
        cost[real] = table["cost"].to_numpy()
        accuracy = np.zeros(m)
        if "accuracy" in table.columns:
            accuracy[real] = table["accuracy"].fill_null(0.0).to_numpy()
    else:  # the table's own arrays, read-only: at 1M queries each column copied costs its page faults
        option = _frozen(table["option"].to_numpy())
        value = _frozen(table["value"].to_numpy()) if "value" in table.columns else np.zeros(m)
        cost = _frozen(table["cost"].to_numpy())
        accuracy = _frozen(table["accuracy"].fill_null(0.0).to_numpy()) if "accuracy" in table.columns else np.zeros(m)
    sign = 1.0 if problem.objective == "max_value" else -1.0
    # a read-only column is the table's, shared (nothing writes it), not copied
    c = (value if not value.flags.writeable else value.copy()) if problem.objective == "max_value" else -cost
    program = Compiled(n=n, m=m, starts=starts, query=query, option=option, real=real, table=table, value=value,
                       cost=cost, accuracy=accuracy, c=c, sign=sign, objective=problem.objective)
    program.families = [spec.rows(program) for spec in _rows(problem.constraints)]
    return program


def _frozen(values: np.ndarray) -> np.ndarray:
    """A read-only view of ``values`` (a column the program shares with its table: nothing may write it)."""
    out = values.view()
    out.flags.writeable = False
    return out
