"""The compiled program: an options table laid out as flat arrays, query by query, with its coupling rows.

Model columns are the real options (sorted by option id within each query) followed, per deferrable query,
by one *deferral* column (value, cost and every coefficient 0): ``starts[q]:starts[q+1]`` are query q's
columns and every query takes exactly one. A row family is stored densely over the columns: ``coef`` (one
float per column) and ``gid`` (which row of the family the column counts towards; ``-1`` = not counted).
This keeps a 1M x 10 problem with a budget, per-model capacities and per-tenant budgets in a few hundred MB
and lets the fast solver price all columns with a handful of vectorised numpy operations.

The lowest layer of the optimizer: constraint specs compile into ``RowFamily``s over a ``Compiled``; the
solvers read only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

Sense = Literal["<=", ">="]


@dataclass(frozen=True)
class RowFamily:
    """One constraint spec compiled: ``len(names)`` rows sharing one coefficient column."""

    constraint: str  # the spec's name
    kind: str  # budget / group_budget / capacity / accuracy_floor
    sense: Sense
    names: list[str]  # one per row, e.g. "tenant_budget[acme]"
    rhs: np.ndarray  # float64, one per row
    coef: np.ndarray  # float64, one per program column
    gid: np.ndarray  # int32, one per program column: row index in this family, -1 = not in any row
    scale: np.ndarray | None = None  # floors: queries per row (rhs = min_mean * scale)

    @property
    def size(self) -> int:
        return len(self.names)

    def usage(self, x: np.ndarray) -> np.ndarray:
        """Left-hand side of every row for a (possibly fractional) column vector ``x``."""
        inside = self.gid >= 0
        return np.bincount(self.gid[inside], weights=(self.coef * x)[inside], minlength=self.size)

    def usage_cols(self, cols: np.ndarray) -> np.ndarray:
        """Left-hand side of every row when exactly the columns ``cols`` are chosen (one per query)."""
        g = self.gid[cols]
        inside = g >= 0
        return np.bincount(g[inside], weights=self.coef[cols][inside], minlength=self.size)


@dataclass
class Compiled:
    """Flat arrays over program columns (real options + deferral columns), query by query."""

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
    _grid: tuple[int, np.ndarray | None, np.ndarray] | None = field(default=None, repr=False, compare=False)
    # per single-row family's coefficient arrays: (coef, gid, the signed row on the columns, on the grid);
    # shared by the programs ``Problem.with_constraints`` derives (a budget's second pass reuses its family)
    _row_grids: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def column(self, name: str) -> pl.Series:
        if name not in self.table.columns:
            raise KeyError(f"options table has no column {name!r} (columns: {self.table.columns})")
        return self.table[name]

    def expand(self, values: np.ndarray, fill: float | int) -> np.ndarray:
        if len(self.real) == self.m:  # no deferral columns: program columns are the table rows
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

    def grid(self) -> tuple[int, np.ndarray | None, np.ndarray]:
        """(w, cells, c): the layout padded to n x w, w the most columns of any query; ``cells`` the flat grid
        cell of each column (None on the regular layout, where the columns are the grid); ``c`` on the grid
        (padding -inf). Depends on the layout and objective only, so programs sharing them
        (``Problem.with_constraints``) share it too."""
        if self._grid is None:
            if self.width:
                self._grid = (self.width, None, self.c.reshape(self.n, self.width))
            else:
                w = int(np.diff(self.starts).max()) if self.n else 0
                # query * w + rank within the query, from one repeat per query (no gathers over every column)
                cells = np.arange(self.m) + np.repeat(np.arange(self.n) * w - self.starts[:-1], np.diff(self.starts))
                c = np.full(self.n * w, -np.inf)
                c[cells] = self.c
                self._grid = (w, cells, c.reshape(self.n, w))
        return self._grid

    def row_grid(self, f: RowFamily) -> tuple[np.ndarray, np.ndarray]:
        """A one-row family's ``<=``-signed coefficient per column (0 where not counted) and the same on the
        n x w grid (0 on padding), computed once per coefficient array."""
        key = (id(f.coef), id(f.gid), f.sense)
        hit = self._row_grids.get(key)
        if hit is not None and hit[0] is f.coef and hit[1] is f.gid:
            return hit[2], hit[3]
        s = 1.0 if f.sense == "<=" else -1.0
        a = np.where(f.gid >= 0, f.coef * s, 0.0)
        w, cells, _ = self.grid()
        if cells is None:
            a2 = a.reshape(self.n, w)
        else:
            a_flat = np.zeros(self.n * w)
            a_flat[cells] = a
            a2 = a_flat.reshape(self.n, w)
        self._row_grids[key] = (f.coef, f.gid, a, a2)
        return a, a2

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
            term = ext[f.gid]
            term *= f.coef  # in place: at 1M queries each column-sized temporary costs its page faults
            r -= term
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


def subset(program: Compiled, queries: np.ndarray) -> Compiled:
    """The sub-program of ``queries`` (sorted) with every row's limit scaled by the subset's share of that row.

    The share of a row is measured on its coefficients (sum over the subset's columns / sum over all), so a
    tenant that is rare in the sample gets a proportionally small limit. Used for the initial prices.
    """
    counts = np.diff(program.starts)[queries]
    starts = np.zeros(len(queries) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    cols = np.repeat(program.starts[queries], counts) + (np.arange(int(counts.sum())) - np.repeat(starts[:-1], counts))
    families = []
    for f in program.families:
        inside = f.gid >= 0
        total = np.bincount(f.gid[inside], weights=np.abs(f.coef[inside]), minlength=f.size)
        g_sub, c_sub = f.gid[cols], f.coef[cols]
        ins = g_sub >= 0
        part = np.bincount(g_sub[ins], weights=np.abs(c_sub[ins]), minlength=f.size)
        share = np.divide(part, total, out=np.full(f.size, len(queries) / max(program.n, 1)), where=total > 0)
        families.append(RowFamily(f.constraint, f.kind, f.sense, f.names, f.rhs * share, c_sub, g_sub,
                                  None if f.scale is None else f.scale * share))
    real_mask = program.option[cols] >= 0
    return Compiled(
        n=len(queries), m=len(cols), starts=starts, query=np.repeat(np.arange(len(queries), dtype=np.int64), counts),
        option=program.option[cols], real=np.flatnonzero(real_mask), table=program.table.head(0), value=program.value[cols],
        cost=program.cost[cols], accuracy=program.accuracy[cols], c=program.c[cols], sign=program.sign, objective=program.objective,
        families=families,
    )
