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

The compiled model lays the options out query by query (``starts[q]:starts[q+1]``), real options sorted by
option id, then one *deferral* column for each deferrable query (value, cost and every coefficient 0).
Every query takes exactly one column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import polars as pl

from optimizer.constraints import Allowed, Constraint, RowFamily, constraint_name

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
        names = [constraint_name(c) for c in self.constraints]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"constraint names must be unique; repeated: {duplicates} (pass name=...)")

    def with_constraints(self, constraints: Sequence[Constraint]) -> Problem:
        return Problem(self.options, self.objective, constraints, deferrable=self.deferrable, n_queries=self.n_queries)

    @cached_property
    def compiled(self) -> Compiled:
        return compile_problem(self)


@dataclass
class Compiled:
    """Flat arrays over model columns (real options + deferral columns), query by query."""

    n: int
    m: int
    starts: np.ndarray  # int64, n+1
    query: np.ndarray  # int64 per column
    option: np.ndarray  # int64 per column; -1 = defer
    real: np.ndarray  # int64 positions of the real option rows (in table order)
    table: pl.DataFrame  # the allowed options, sorted by (query, option)
    value: np.ndarray
    cost: np.ndarray
    accuracy: np.ndarray
    c: np.ndarray  # objective coefficient to MAXIMISE (value, or -cost)
    sign: float  # +1 max_value, -1 min_cost: reported objective = sign * c @ x
    objective: str
    families: list[RowFamily] = field(default_factory=list)
    _terms: tuple[tuple[RowFamily, ...], Any] | None = field(default=None, repr=False, compare=False)

    def column(self, name: str) -> pl.Series:
        if name not in self.table.columns:
            raise KeyError(f"options table has no column {name!r} (columns: {self.table.columns})")
        return self.table[name]

    def expand(self, values: np.ndarray, fill: float | int) -> np.ndarray:
        if len(self.real) == self.m:  # no deferral columns: model columns are the table rows
            return np.asarray(values)
        out = np.full(self.m, fill, dtype=np.asarray(values).dtype)
        out[self.real] = values
        return out

    @property
    def k(self) -> int:
        return sum(f.size for f in self.families)

    @property
    def row_names(self) -> list[str]:
        return [n for f in self.families for n in f.names]

    def row_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([f.size for f in self.families])]).astype(np.int64)

    def le_rhs(self) -> np.ndarray:
        """All rows in ``<=`` form (>= rows negated)."""
        return np.concatenate([f.rhs * (1.0 if f.sense == "<=" else -1.0) for f in self.families]) if self.families else np.zeros(0)

    def le_usage(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([f.usage(x) * (1.0 if f.sense == "<=" else -1.0) for f in self.families]) if self.families else np.zeros(0)

    def le_usage_cols(self, cols: np.ndarray) -> np.ndarray:
        """``le_usage`` of the assignment choosing exactly ``cols`` (one column per query): O(n), not O(m)."""
        return np.concatenate([f.usage_cols(cols) * (1.0 if f.sense == "<=" else -1.0) for f in self.families]) if self.families else np.zeros(0)

    @property
    def width(self) -> int:
        """Columns per query when every query has the same number (the regular n x width layout), else 0."""
        if self.n == 0 or self.m % self.n:
            return 0
        w = self.m // self.n
        return w if bool(np.all(np.diff(self.starts) == w)) else 0

    def price_terms(self) -> list[tuple[np.ndarray | None, list[tuple[RowFamily, int, str, Any]]]]:
        """Structure of ``A^T lam`` on the regular layout, computed once per family list.

        Families sharing one coefficient column (budget and tenant budgets on cost) form one term; each
        family's row ids are classified as constant, per position (e.g. per model) or per query (e.g. per
        tenant), so a price vector becomes ``coef * (broadcast sums)`` on the n x width grid.
        """
        key = tuple(self.families)
        if self._terms is not None and len(self._terms[0]) == len(key) and all(a is b for a, b in zip(self._terms[0], key, strict=True)):
            return self._terms[1]
        n, w = self.n, self.width
        terms: list[tuple[np.ndarray | None, list[tuple[RowFamily, int, str, Any]]]] = []
        coefs: list[np.ndarray] = []
        for off, f in zip(self.row_offsets()[:-1], self.families, strict=False):
            g2 = f.gid.reshape(n, w)
            idx: Any
            if bool(np.all(g2 == g2[0, 0])):
                kind, idx = "const", int(g2[0, 0])
            elif bool(np.all(g2 == g2[0:1, :])):
                kind, idx = "position", g2[0].copy()
            elif bool(np.all(g2 == g2[:, 0:1])):
                kind, idx = "query", g2[:, 0].copy()
            else:
                kind, idx = "general", g2
            entry = (f, int(off), kind, idx)
            for i, c in enumerate(coefs):
                if c is f.coef or (c.shape == f.coef.shape and np.array_equal(c[:64], f.coef[:64]) and np.array_equal(c, f.coef)):
                    terms[i][1].append(entry)
                    break
            else:
                coefs.append(f.coef)
                ones = bool(np.all(f.coef == 1.0))
                terms.append((None if ones else f.coef.reshape(n, w), [entry]))
        self._terms = (key, terms)
        return terms

    def reduced(self, lam: np.ndarray) -> np.ndarray:
        """``c - A_le^T lam`` for prices ``lam >= 0`` on the ``<=`` rows."""
        if self.families and self.width:
            return self._reduced_regular(lam)
        r = self.c.copy()
        for f, off in zip(self.families, self.row_offsets()[:-1], strict=False):
            s = 1.0 if f.sense == "<=" else -1.0
            ext = np.append(lam[off : off + f.size] * s, 0.0)  # gid -1 -> price 0
            r -= f.coef * ext[f.gid]
        return r

    def _reduced_regular(self, lam: np.ndarray) -> np.ndarray:
        n, w = self.n, self.width
        r = self.c.reshape(n, w).copy()
        for coef, entries in self.price_terms():
            mult: Any = 0.0
            for f, off, kind, idx in entries:
                s = 1.0 if f.sense == "<=" else -1.0
                ext = np.append(lam[off : off + f.size] * s, 0.0)  # row id -1 -> price 0
                part = ext[idx]
                mult = mult + (part[None, :] if kind == "position" else part[:, None] if kind == "query" else part)
            if coef is None:
                r -= mult
            else:
                r -= coef * mult
        return r.reshape(-1)

    def matrix(self, cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """COO triplets (row, col, val) of the ``<=`` coupling rows restricted to ``cols`` (local col index)."""
        cols = np.arange(self.m) if cols is None else cols
        rows_, cols_, vals_ = [], [], []
        for f, off in zip(self.families, self.row_offsets()[:-1], strict=False):
            s = 1.0 if f.sense == "<=" else -1.0
            g = f.gid[cols]
            v = f.coef[cols]
            keep = (g >= 0) & (v != 0)
            idx = np.flatnonzero(keep)
            rows_.append(g[idx].astype(np.int64) + off)
            cols_.append(idx)
            vals_.append(v[idx] * s)
        if not rows_:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(rows_), np.concatenate(cols_), np.concatenate(vals_)

    def choose_matrix(self, x_cols: np.ndarray) -> np.ndarray:
        """Column indicator (0/1 float) for one chosen column per query."""
        x = np.zeros(self.m)
        x[x_cols] = 1.0
        return x


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
        if table["option"].n_unique() != table.height:
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
    q_real = table["query"].to_numpy().astype(np.int64)
    real_counts = np.bincount(q_real, minlength=n).astype(np.int64)
    counts = real_counts + defer.astype(np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    m = int(starts[-1])
    if defer.any():
        rank = np.arange(len(q_real), dtype=np.int64) - np.repeat(np.cumsum(real_counts) - real_counts, real_counts)
        real = starts[q_real] + rank
        query = np.repeat(np.arange(n, dtype=np.int64), counts)
    else:  # model columns are exactly the sorted table rows
        real = np.arange(m, dtype=np.int64)
        query = q_real
    option = np.full(m, -1, dtype=np.int64)
    option[real] = table["option"].to_numpy()
    value = np.zeros(m)
    value[real] = table["value"].to_numpy() if "value" in table.columns else 0.0
    cost = np.zeros(m)
    cost[real] = table["cost"].to_numpy()
    accuracy = np.zeros(m)
    if "accuracy" in table.columns:
        accuracy[real] = table["accuracy"].fill_null(0.0).to_numpy()
    sign = 1.0 if problem.objective == "max_value" else -1.0
    c = value.copy() if problem.objective == "max_value" else -cost
    model = Compiled(n=n, m=m, starts=starts, query=query, option=option, real=real, table=table, value=value,
                     cost=cost, accuracy=accuracy, c=c, sign=sign, objective=problem.objective)
    model.families = [spec.rows(model) for spec in problem.constraints if not isinstance(spec, Allowed)]
    return model


def subset(model: Compiled, queries: np.ndarray) -> Compiled:
    """The sub-model of ``queries`` (sorted) with every row's limit scaled by the subset's share of that row.

    The share of a row is measured on its coefficients (sum over the subset's columns / sum over all), so a
    tenant that is rare in the sample gets a proportionally small limit. Used for the initial prices.
    """
    counts = np.diff(model.starts)[queries]
    starts = np.zeros(len(queries) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    cols = np.repeat(model.starts[queries], counts) + (np.arange(int(counts.sum())) - np.repeat(starts[:-1], counts))
    families = []
    for f in model.families:
        inside = f.gid >= 0
        total = np.bincount(f.gid[inside], weights=np.abs(f.coef[inside]), minlength=f.size)
        g_sub, c_sub = f.gid[cols], f.coef[cols]
        ins = g_sub >= 0
        part = np.bincount(g_sub[ins], weights=np.abs(c_sub[ins]), minlength=f.size)
        share = np.divide(part, total, out=np.full(f.size, len(queries) / max(model.n, 1)), where=total > 0)
        families.append(RowFamily(f.constraint, f.kind, f.sense, f.names, f.rhs * share, c_sub, g_sub,
                                  None if f.scale is None else f.scale * share))
    real_mask = model.option[cols] >= 0
    return Compiled(
        n=len(queries), m=len(cols), starts=starts, query=np.repeat(np.arange(len(queries), dtype=np.int64), counts),
        option=model.option[cols], real=np.flatnonzero(real_mask), table=model.table.head(0), value=model.value[cols],
        cost=model.cost[cols], accuracy=model.accuracy[cols], c=model.c[cols], sign=model.sign, objective=model.objective,
        families=families,
    )
