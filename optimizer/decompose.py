"""The fast method: price every column with Lagrangian multipliers, solve LPs only where the choice is close.

With prices ``lam >= 0`` on the K coupling rows, a query's best column is ``argmax_j c_j - lam @ A_j``.
For prices near the LP optimum only a few queries are close to a tie; every other query's choice is
settled. So:

1. **Initial prices** from the LP on a random sample of queries with scaled limits (or a warm start).
2. **Restricted LP** (HiGHS, via highspy): the near-tie queries with their near-best columns, every other
   query fixed at its best column (its usage subtracted from the limits), elastic slacks on the rows.
3. **Pricing** on the full problem with the restricted LP's duals: a fixed query whose best column changed,
   or an excluded column that would enter, joins the restricted set; repeat until none does. Then the
   restricted LP's optimum is the full LP's optimum.
4. **Certificate**: for ANY ``lam >= 0``, ``L(lam) = sum_q max_j (c_j - lam A_j) + lam @ b`` bounds the LP
   (hence the integer) optimum from above; computed in one vectorised pass over all columns.
5. **Integer polish**: a basic LP optimum has at most K fractional queries. A small HiGHS MILP over those
   queries plus the closest-to-tie others (everything else fixed) rounds them with repair; on tiny
   problems it covers every query and is exact.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from batchplan.optimizer.compiled import Compiled, subset
from batchplan.optimizer.diagnose import diagnose
from batchplan.optimizer.highs_lp import TIGHT_MIP_TOLERANCES, HighsResult, run_highs
from batchplan.optimizer.solution import (
    InfeasibleError,
    Level,
    Rounding,
    Solution,
    SolveInfo,
    SolverError,
    build_solution,
    violated_rows,
)

BASE_QUERIES = 2_000  # at most this many queries: the master LP holds every column
LEVEL_FACTOR = 10  # initial prices come from a nested sample this many times smaller
ACTIVE_FRACTION = 0.2  # share of queries (closest to a tie) that get candidate moves in the first master
MIN_ACTIVE = 500
MAX_INITIAL = 50_000  # at most this many queries get candidate moves in the first master (measured at 1M:
# 50k near-tie queries up front and 50k additions per round converge in 2 rounds, 3-4x faster than 3k/10k)
PARALLEL_QUERIES = 200_000  # from this many queries full-grid pricing passes run on two threads
POLISH_QUERIES = 30  # closest-to-tie queries joining the split ones in the integer polish MILP
# Work limit of the plan's own MILPs (the exact one, the improvement polish): nodes, not seconds, so one input
# gives one plan on a loaded machine too. A 1 s wall clock cut the improvement polish (0.05-0.6 s alone, ~1-70
# nodes on the bundled data sets) short when four jobs shared two cores: tied plans differed by 1e-6.
POLISH_NODES = 1_000
MAX_ROUNDS = 60
MAX_ADD = 50_000  # columns added per pricing round
LP_OPTIONS: dict[str, Any] = {"solver": "simplex", "presolve": "off"}  # presolve costs 20x here


@dataclass
class Pricing:
    """Per-query best column and margin to the runner-up under given prices."""

    r: np.ndarray
    best: np.ndarray  # float per query
    best_col: np.ndarray  # int64 per query
    margin: np.ndarray  # best - second best (inf if a single column)


def price(program: Compiled, lam: np.ndarray, *, margin: bool = True) -> Pricing:
    r = program.reduced(lam)
    w = program.width
    if w:  # regular layout: row-wise argmax on the n x w grid
        r2 = r.reshape(program.n, w)
        pos = r2.argmax(axis=1)
        rows = np.arange(program.n)
        best = r2[rows, pos]
        best_col = program.starts[:-1] + pos
        if not margin:
            return Pricing(r, best, best_col, np.zeros(0))
        if w == 1:
            return Pricing(r, best, best_col, np.full(program.n, np.inf))
        r2[rows, pos] = -np.inf
        second = r2.max(axis=1)
        r2[rows, pos] = best
        return Pricing(r, best, best_col, best - second)
    heads = program.starts[:-1]
    best = np.maximum.reduceat(r, heads)
    is_best = r >= np.repeat(best, np.diff(program.starts))  # = best[program.query], without a gather
    cols = np.flatnonzero(is_best)
    qs = program.query[cols]
    first = np.ones(len(cols), dtype=bool)
    first[1:] = qs[1:] != qs[:-1]
    best_col = cols[first]
    if not margin:
        return Pricing(r, best, best_col, np.zeros(0))
    saved = r[best_col]
    r[best_col] = -np.inf
    second = np.maximum.reduceat(r, heads)
    r[best_col] = saved
    return Pricing(r, best, best_col, best - second)


def _penalties(program: Compiled) -> np.ndarray:
    """Elastic-slack penalty per <= row: far above any price a feasible LP can have."""
    crange = float(np.ptp(program.c)) + 1.0 if program.m else 1.0
    out = []
    step = max(1, program.m // 200_000)  # the median of a strided sample is plenty for a penalty scale
    for f in program.families:
        coef, gid = f.coef[::step], f.gid[::step]
        nz = np.abs(coef[(gid >= 0) & (coef != 0)])
        if len(nz) == 0:
            nz = np.abs(f.coef[(f.gid >= 0) & (f.coef != 0)])
        unit = float(np.median(nz)) if len(nz) else 1.0
        out.append(np.full(f.size, 1e4 * crange / max(unit, 1e-12)))
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class Master:
    """The restricted LP in *move* form: every query sits at its ``base`` column; ``y[j]`` in [0, 1] moves
    it to ``extra[j]``. Queries with one extra need no row (just the bound), with several a row
    ``sum y <= 1``. So the LP has K coupling rows plus a few, and one column per candidate move."""

    base: np.ndarray  # column per query
    extra: np.ndarray  # candidate move targets (program columns, sorted, never a base)
    result: HighsResult
    y: np.ndarray
    slack: np.ndarray
    lam: np.ndarray
    value: float  # c @ x of the LP point (max form), penalties excluded
    pricing: Pricing | None = None  # the full program priced at ``lam`` (set by ``_entering``): reused, not redone


def solve_master(
    program: Compiled, base: np.ndarray, extra: np.ndarray, rhs: np.ndarray, penalties: np.ndarray,
    options: dict[str, Any] | None = None, base_usage: tuple[np.ndarray, float] | None = None,
) -> Master:
    k = len(rhs)
    if base_usage is None:
        base_usage = (program.le_usage_cols(base), float(program.c[base].sum()))
    residual = rhs - base_usage[0]
    qe = program.query[extra]
    b = base[qe]
    r1, c1, v1 = program.matrix(extra)
    r2, c2, v2 = program.matrix(b)
    _, inv, cnt = np.unique(qe, return_inverse=True, return_counts=True)
    multi_q = cnt >= 2
    multi_row = np.cumsum(multi_q) - 1 + k
    in_multi = multi_q[inv]
    n_multi = int(multi_q.sum())
    ne = len(extra)
    rows = [r1, r2, multi_row[inv][in_multi], np.arange(k)]
    cols = [c1, c2, np.flatnonzero(in_multi), ne + np.arange(k)]
    vals = [v1, -v2, np.ones(int(in_multi.sum())), -np.ones(k)]
    a = sp.csc_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(k + n_multi, ne + k))
    # scale every coupling row to unit largest coefficient: rows in dollars, calls and tokens differ by 1e9
    big = np.zeros(k + n_multi)
    coo = a.tocoo()
    np.maximum.at(big, coo.row, np.abs(coo.data))
    d = np.ones(k + n_multi)
    d[:k] = 1.0 / np.where(big[:k] > 0, big[:k], np.maximum(np.abs(residual), 1.0))
    a = sp.csc_array(sp.diags_array(d) @ a)
    slack_cost = -penalties / d[:k]
    obj = np.concatenate([program.c[extra] - program.c[b], slack_cost])
    lower = np.zeros(ne + k)
    upper = np.concatenate([np.ones(ne), np.full(k, np.inf)])
    row_lower = np.full(k + n_multi, -np.inf)
    row_upper = np.concatenate([residual * d[:k], np.ones(n_multi)])
    res = run_highs(obj, lower, upper, row_lower, row_upper, a, options=options or LP_OPTIONS)
    if not res.optimal or res.row_dual.size == 0 or res.x.size == 0:
        raise SolverError(f"decompose: restricted LP ended with HiGHS status {res.status}")
    y = res.x[:ne]
    lam = np.clip(res.row_dual[:k] * d[:k], 0.0, None)
    value = float(base_usage[1] + (program.c[extra] - program.c[b]) @ y)
    return Master(base, extra, res, y, res.x[ne:] / d[:k], lam, value)


def _near_columns(program: Compiled, pricing: Pricing, fraction: float, minimum: int) -> np.ndarray:
    """Non-best columns of the queries closest to a tie, within their query's tie margin."""
    target = min(program.n, max(minimum, min(int(fraction * program.n), MAX_INITIAL)))
    delta = np.inf if target >= program.n else float(np.partition(pricing.margin, target - 1)[target - 1])
    close = pricing.margin <= delta
    keep = close[program.query] & (pricing.r >= pricing.best[program.query] - delta)
    keep[pricing.best_col] = False
    return np.flatnonzero(keep)


def _best_under(
    program: Compiled, a2: np.ndarray, pool: ThreadPoolExecutor | None = None
) -> Callable[[float, np.ndarray | None], np.ndarray]:
    """``best(lam, queries)``: per query (None: every query) its best column under price ``lam`` on
    coefficients ``a2`` (on the grid: ``Compiled.row_grid``; ``argmax_j c_j - lam a_j``, the first on ties), as
    program column indices, by a row-wise argmax on the n x w grid (``Compiled.grid``; padding has objective
    -inf). With a ``pool`` (two workers), full-grid passes run as two halves side by side."""
    _, _, c2 = program.grid()
    starts = program.starts[:-1]
    buffer = np.empty_like(c2)  # the full-grid passes reuse one buffer: fresh n x w temporaries cost page faults
    halves = [slice(0, program.n // 2), slice(program.n // 2, program.n)]

    def half(rows: slice, lam: float) -> np.ndarray:
        out = buffer[rows]
        np.multiply(a2[rows], -lam, out=out)
        np.add(out, c2[rows], out=out)  # c2 - lam * a2, the same value
        return np.asarray(out.argmax(axis=1))

    def best(lam: float, idx: np.ndarray | None) -> np.ndarray:
        if idx is None:
            if pool is None:
                return np.asarray(starts + half(slice(0, program.n), lam))
            # rows are independent: two halves on two threads (numpy releases the GIL), the same answer
            return np.asarray(starts + np.concatenate(list(pool.map(half, halves, (lam, lam)))))
        return np.asarray(starts[idx] + (c2[idx] - lam * a2[idx]).argmax(axis=1))

    return best


def _single_row_price(program: Compiled, rhs: np.ndarray, guess: float | None = None) -> float | None:
    """The LP price of the only coupling row, by bisection (log scale) on ``max_j c_j - lam a_j`` per query.

    Queries whose best column is the same at both ends of the bracket keep it for every price in between
    (both sides are linear in lam), so they leave the active set after each step: the work shrinks
    geometrically. The bracket is first narrowed around ``guess`` (a neighbouring problem's price) or, on
    large programs, around the price of a 2% sample. Returns the smallest bracketed price at which the row holds
    (to ~1e-13 relative), or None (the row cannot hold / needs no price, or the layout is too ragged: the
    general path decides).
    """
    w = int(np.diff(program.starts).max()) if program.n else 0
    if program.n * w > 2 * program.m + program.n:
        return None  # padding would more than double the columns (a few queries with very many options)
    a, a2 = program.row_grid(program.families[0])
    with ThreadPoolExecutor(max_workers=2) if program.n >= PARALLEL_QUERIES else contextlib.nullcontext() as pool:
        return _bracketed_price(program, a, _best_under(program, a2, pool), float(rhs[0]), guess)


def _bracketed_price(program: Compiled, a: np.ndarray, best: Callable[[float, np.ndarray | None], np.ndarray],
                     b: float, guess: float | None) -> float | None:
    """``_single_row_price`` once the row is on the grid."""
    smallest = float(np.min(np.abs(a), where=a != 0, initial=np.inf))  # one pass, no filtered copy
    hi = (float(np.ptp(program.c)) + 1.0) / max(smallest, 1e-300) * 4.0
    lo = hi * 1e-16
    rows = np.arange(program.n)
    widths: tuple[float, ...] = (1.05, 1.5, 4.0, 64.0)
    if guess is not None:
        widths = (1.01, *widths)  # a neighbour's price is close: a narrow bracket leaves few queries active
    elif program.n > 20 * BASE_QUERIES:  # a 2% sample's price (its limit scaled by size)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(program.n, size=program.n // 50, replace=False))
        guess = _bisect(best, a, b * len(sample) / program.n, lo, hi, sample)
    if guess is not None and lo <= guess <= hi:
        # usage falls as the price rises, so a bracket that holds proves the price positive and in [lo, hi]
        for width in widths:
            lo2, hi2 = max(guess / width, lo), min(guess * width, hi)
            blo, bhi = best(lo2, None), best(hi2, None)
            if float(a[blo].sum()) > b >= float(a[bhi].sum()):
                return _bisect(best, a, b, lo2, hi2, rows, blo, bhi)
    if float(a[best(0.0, None)].sum()) <= b:
        return None  # lam = 0
    best_hi, best_lo = best(hi, None), best(lo, None)
    if float(a[best_hi].sum()) > b or float(a[best_lo].sum()) <= b:
        return None
    return _bisect(best, a, b, lo, hi, rows, best_lo, best_hi)


def _bisect(best: Callable[[float, np.ndarray | None], np.ndarray], a: np.ndarray, b: float, lo: float, hi: float,
            rows: np.ndarray, best_lo: np.ndarray | None = None, best_hi: np.ndarray | None = None) -> float:
    """Smallest price in [lo, hi] (to 1e-13 relative) at which the row over ``rows`` holds; usage(lo) > b assumed."""
    best_lo = best(lo, rows) if best_lo is None else best_lo
    best_hi = best(hi, rows) if best_hi is None else best_hi
    active = rows
    fixed = 0.0
    for _ in range(200):
        settled = best_lo == best_hi
        fixed += float(a[best_lo[settled]].sum())
        active, best_lo, best_hi = active[~settled], best_lo[~settled], best_hi[~settled]
        if len(active) == 0 or hi <= lo * (1 + 1e-13):
            break
        mid = float(np.sqrt(lo * hi))
        best_mid = best(mid, active)
        if fixed + float(a[best_mid].sum()) > b:
            lo, best_lo = mid, best_mid
        else:
            hi, best_hi = mid, best_mid
    return hi


class _OutOfTime(Exception):
    """A nested sample's first restricted LP hit the deadline; carries the prices it started from."""

    def __init__(self, lam: np.ndarray) -> None:
        super().__init__("out of time")
        self.lam = lam


def _initial_prices(
    program: Compiled, rhs: np.ndarray, *, warm_prices: np.ndarray | None, seed: int, deadline: float | None,
    info: SolveInfo,
) -> tuple[np.ndarray, float]:
    """Starting prices, and the share of queries (closest to a tie) whose near-best columns join the first
    restricted LP: one coupling row gets its exact price by bisection (a tiny first master; a warm start
    narrows its bracket), a warm start its prices, a large program the LP optimum of a nested sample (recursively), a small one zero (and the master
    is the whole LP)."""
    k = len(rhs)
    warm = warm_prices is not None and len(warm_prices) == k
    if k == 1 and program.n > BASE_QUERIES:
        guess = float(warm_prices[0]) if warm and warm_prices is not None else None
        if (single := _single_row_price(program, rhs, guess)) is not None:
            return np.array([single]), 0.0
    if warm and warm_prices is not None:
        return np.asarray(warm_prices, dtype=np.float64), ACTIVE_FRACTION
    if program.n > BASE_QUERIES:
        rng = np.random.default_rng(seed)
        size = max(BASE_QUERIES, program.n // LEVEL_FACTOR)
        queries = np.sort(rng.choice(program.n, size=size, replace=False))
        try:
            return solve_lp(subset(program, queries), seed=seed + 1, deadline=deadline, info=info, nested=True).lam, ACTIVE_FRACTION
        except _OutOfTime as out:  # the sample ran out of time: its own starting prices will do
            info.converged = False
            return out.lam, ACTIVE_FRACTION
    return np.zeros(k), 1.0


def _entering(program: Compiled, master: Master, eps: float, max_add: int) -> np.ndarray | None:
    """Pricing on the full program at the master's duals: the master's candidate columns plus the best
    columns of the queries whose best lies outside them (the most violated ``max_add`` of those), or None
    when there are none: then the master's optimum is the full LP's."""
    pricing = master.pricing = price(program, master.lam)  # with margins: the caller's rounding reads them
    cand = np.zeros(program.m, dtype=bool)
    cand[master.base] = True
    cand[master.extra] = True
    cmax = np.maximum.reduceat(np.where(cand, pricing.r, -np.inf), program.starts[:-1])
    violators = np.flatnonzero(pricing.best > cmax + eps)
    if len(violators) == 0:
        return None
    if len(violators) > max_add:  # partial pricing
        worst = np.argpartition(cmax[violators] - pricing.best[violators], max_add - 1)[:max_add]
        violators = violators[worst]
    return np.union1d(master.extra, pricing.best_col[violators])


def solve_lp(
    program: Compiled,
    *,
    warm_prices: np.ndarray | None = None,
    seed: int = 0,
    deadline: float | None = None,
    info: SolveInfo | None = None,
    nested: bool = False,
) -> Master:
    """The full LP optimum: initial prices (``_initial_prices``), then column generation on ``program``: solve
    the restricted LP, price every column at its duals, add what would enter, until nothing does.

    Out of time (``deadline``) after a first master: that master (a feasible LP point) with
    ``info.converged`` False; before one: SolverError (``_OutOfTime`` inside a nested sample)."""
    info = info if info is not None else SolveInfo()
    rhs = program.le_rhs()
    penalties = _penalties(program)
    lam, fraction = _initial_prices(program, rhs, warm_prices=warm_prices, seed=seed, deadline=deadline, info=info)
    pricing = price(program, lam)
    base = pricing.best_col
    extra = _near_columns(program, pricing, fraction, MIN_ACTIVE)
    scale = max(float(np.abs(program.c).max()) if program.m else 1.0, 1e-12)
    base_usage = (program.le_usage_cols(base), float(program.c[base].sum()))
    level = Level(n=program.n)
    info.levels.append(level)
    master: Master | None = None
    for _ in range(MAX_ROUNDS):
        options = LP_OPTIONS
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0 and master is not None:  # out of time: the last master is a feasible LP point
                info.converged = level.converged = False
                return master
            options = {**LP_OPTIONS, "time_limit": max(left, 0.5 if master is None else 0.05)}
        started = time.perf_counter()
        try:
            master = solve_master(program, base, extra, rhs, penalties, options=options, base_usage=base_usage)
        except SolverError:
            if deadline is None or time.perf_counter() < deadline:
                raise
            if master is None:
                if nested:
                    raise _OutOfTime(lam) from None
                raise SolverError(f"decompose: time limit reached before the first restricted LP of {program.n} "
                                  "queries was solved (no feasible point yet)") from None
            info.converged = level.converged = False
            return master
        level.masters.append((len(extra), round(time.perf_counter() - started, 3)))
        entering = _entering(program, master, 1e-9 * scale, max(MAX_ADD, program.n // 100))
        if entering is None:
            return master
        extra = entering
    raise SolverError(f"decompose: pricing did not converge in {MAX_ROUNDS} rounds")


def lp_assignment(program: Compiled, master: Master) -> tuple[np.ndarray, np.ndarray]:
    """(column per query with the largest LP weight, ids of queries the LP splits)."""
    cols = master.base.copy()
    qe = program.query[master.extra]
    moved = np.bincount(qe, weights=master.y, minlength=program.n)
    # per query the extra with the largest y
    order = np.lexsort((-master.y, qe))
    first = np.ones(len(order), dtype=bool)
    first[1:] = qe[order][1:] != qe[order][:-1]
    top = order[first]
    top_q = qe[top]
    stay = 1.0 - moved[top_q]
    switch = master.y[top] > stay
    cols[top_q[switch]] = master.extra[top[switch]]
    tol = 1e-7
    frac_extra = (master.y > tol) & (master.y < 1 - tol)
    frac = np.unique(np.concatenate([qe[frac_extra], np.flatnonzero((moved > tol) & (moved < 1 - tol))]))
    return cols, frac


def polish(program: Compiled, cols: np.ndarray, queries: np.ndarray, *, time_limit: float | None = 10.0,
           per_query: int | None = None, lam: np.ndarray | None = None, gap: float = 1e-7,
           tight: bool = True, nodes: int | None = None) -> tuple[np.ndarray, HighsResult]:
    """Integer re-optimisation of ``queries`` with every other query fixed at ``cols``.

    ``per_query``: keep only that many columns per query (best reduced cost under ``lam``, plus the
    current one); None keeps all (exact over those queries). ``nodes``: HiGHS's ``mip_max_nodes``, a work
    limit (an answer it cuts depends on the input alone; None: HiGHS's default, none); ``time_limit``: seconds
    of wall clock, None for none (an answer the clock cuts depends on how loaded the machine is).
    """
    rhs = program.le_rhs()
    k = len(rhs)
    counts = np.diff(program.starts)[queries]
    heads = np.zeros(len(queries), dtype=np.int64)
    heads[1:] = np.cumsum(counts)[:-1]
    all_cols = np.repeat(program.starts[queries], counts) + (np.arange(int(counts.sum())) - np.repeat(heads, counts))
    if per_query is not None and lam is not None:
        r = program.c[all_cols] - _column_prices(program, all_cols, lam)
        qpos = np.repeat(np.arange(len(queries)), counts)
        order = np.lexsort((-r, qpos))
        rank = np.arange(len(order)) - np.repeat(heads, counts)
        keep = np.zeros(len(all_cols), dtype=bool)
        keep[order[rank < per_query]] = True
        keep |= np.isin(all_cols, cols[queries])
        all_cols = all_cols[keep]
    fixed = np.ones(program.n, dtype=bool)
    fixed[queries] = False
    residual = rhs - program.le_usage_cols(cols[fixed])
    r_idx, c_idx, vals = program.matrix(all_cols)
    qpos = np.searchsorted(queries, program.query[all_cols])
    nc = len(all_cols)
    a = sp.csc_array((np.concatenate([vals, np.ones(nc)]), (np.concatenate([r_idx, k + qpos]), np.concatenate([c_idx, np.arange(nc)]))),
                     shape=(k + len(queries), nc))
    # The callers re-check every answer with violated_rows, so the improvement polish (tight=False) runs at
    # HiGHS's defaults (3x+ faster) and just drops an answer that overshoots.
    tols = TIGHT_MIP_TOLERANCES if tight else {}
    limits = ({} if time_limit is None else {"time_limit": max(float(time_limit), 0.05)}) | (
        {} if nodes is None else {"mip_max_nodes": int(nodes)})
    res = run_highs(program.c[all_cols], np.zeros(nc), np.ones(nc),
                    np.concatenate([np.full(k, -np.inf), np.ones(len(queries))]), np.concatenate([residual, np.ones(len(queries))]),
                    a, integer=True, options={"mip_rel_gap": gap, **limits, **tols})
    if not res.has_solution:
        return cols, res
    out = cols.copy()
    chosen = all_cols[res.x > 0.5]
    out[program.query[chosen]] = chosen
    return out, res


def _column_prices(program: Compiled, cols: np.ndarray, lam: np.ndarray) -> np.ndarray:
    r_idx, c_idx, vals = program.matrix(cols)
    return np.bincount(c_idx, weights=vals * lam[r_idx], minlength=len(cols))


def greedy_repair(program: Compiled, cols: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Move each of ``queries`` in turn to its best column that keeps every row within its limit
    (or, if none does, to the one violating least). Incremental: one full pass, then per-column deltas."""
    out = cols.copy()
    rhs = program.le_rhs()
    k = len(rhs)
    keep = np.ones(program.n, dtype=bool)
    keep[queries] = False
    usage = program.le_usage_cols(out[keep])
    for q in queries:
        cand = np.arange(program.starts[q], program.starts[q + 1])
        r_idx, c_idx, vals = program.matrix(cand)
        use = np.zeros((len(cand), k))
        np.add.at(use, (c_idx, r_idx), vals)
        after = usage[None, :] + use
        rel = (after - rhs[None, :]) / np.maximum(1.0, np.abs(rhs))[None, :]
        viol = np.maximum(rel, 0.0).sum(axis=1)
        ok = (rel <= 0.5 * FEAS_TOL).all(axis=1)
        pick = int(np.argmax(np.where(ok, program.c[cand], -np.inf))) if ok.any() else int(np.argmin(viol))
        out[q] = cand[pick]
        usage = after[pick]
    return out


EXACT_QUERIES = 200  # up to this many queries the polish MILP covers everything (exact within mip_rel_gap)
POLISH_SKIP_GAP = 1e-6  # the improvement MILP is skipped when the repaired plan is already this close to the bound
FEAS_TOL = 1e-9  # a returned assignment exceeds no <= limit by more than this, relative to max(1, |limit|)
ESCALATION = (300, 3_000, 30_000)  # neighbourhood sizes (queries) of the repair MILPs, then every query
FULL_MILP_QUERIES = 50_000  # the last resort (a MILP over every query) only up to this size


def _violation(program: Compiled, cols: np.ndarray) -> np.ndarray:
    """Per <= row: how far the assignment exceeds its limit, in units of max(1, |limit|) (<= 0: within)."""
    rhs = program.le_rhs()
    return (program.le_usage_cols(cols) - rhs) / np.maximum(1.0, np.abs(rhs))


def _helpful(program: Compiled, cols: np.ndarray, over: np.ndarray, count: int,
             lam: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query its best move for the violated rows: (queries, target columns), the ``count`` best first.

    ``over``: violation per row (> 0 on violated rows). Weighted usage ``s = A^T w`` with ``w = 1/over``
    on the violated rows (so each violated row needs one unit of weighted reduction); a move of query q
    from its column to j gains ``s[cur] - s[j]`` and loses ``r[cur] - r[j]``, r the reduced objective under
    the LP prices ``lam`` (so moves that eat into other binding rows look dear). Efficiency = gain /
    max(loss, tiny), over moves with gain > 0. Signed rows are fine: any column whose coefficients lower
    the violated rows counts, whatever their sign.
    """
    rhs = program.le_rhs()
    scale = np.maximum(1.0, np.abs(rhs))
    w = np.where(over > 0, 1.0 / np.maximum(over * scale, 1e-300), 0.0)
    s = program.c - program.reduced(w)  # A^T w
    r = program.c if lam is None else program.reduced(lam)
    cur = cols[program.query]
    gain = s[cur] - s
    loss = r[cur] - r
    tiny = 1e-12 * max(float(np.abs(program.c).max()) if program.m else 1.0, 1e-12)
    eff = np.where(gain > 1e-15, gain / np.maximum(loss, tiny), -np.inf)
    heads = program.starts[:-1]
    best = np.maximum.reduceat(eff, heads)
    hit = np.flatnonzero(eff >= best[program.query])
    first = np.ones(len(hit), dtype=bool)
    first[1:] = program.query[hit][1:] != program.query[hit][:-1]
    best_col = hit[first]
    qs = np.flatnonzero(np.isfinite(best))
    order = qs[np.argsort(-best[qs], kind="stable")][:count]
    return order, best_col[order] if len(best_col) == program.n else np.zeros(0, np.int64)


def _row_deltas(program: Compiled, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Dense (len(src), K) change of every <= row when moving from column src[i] to dst[i]."""
    out = np.zeros((len(src), program.k))
    r_idx, c_idx, vals = program.matrix(dst)
    np.add.at(out, (c_idx, r_idx), vals)
    r_idx, c_idx, vals = program.matrix(src)
    np.add.at(out, (c_idx, r_idx), -vals)
    return out


def move_repair(program: Compiled, cols: np.ndarray, *, lam: np.ndarray | None = None, rounds: int = 5,
                candidates: int = 5_000) -> np.ndarray:
    """Greedy feasibility repair by moving *any* queries: the moves that lower the violated rows most
    per unit of (LP-priced) objective lost, one by one, each accepted only if it pushes no row past its
    limit (or further past it); until no row is violated. Returns the (possibly still infeasible) plan."""
    out = cols.copy()
    rhs = program.le_rhs()
    scale = np.maximum(1.0, np.abs(rhs))
    usage = program.le_usage_cols(out)
    for _ in range(rounds):
        over = (usage - rhs) / scale
        bad = over > 0.5 * FEAS_TOL
        if not bad.any():
            break
        queries, targets = _helpful(program, out, np.where(bad, over, 0.0), candidates, lam)
        if len(queries) == 0:
            break
        deltas = _row_deltas(program, out[queries], targets)
        moved = 0
        for i in range(len(queries)):
            d = deltas[i]
            new = usage + d
            if not np.all((new - rhs <= 0.5 * FEAS_TOL * scale) | (d <= 0)):
                continue  # would push a row past its limit, or further past it
            if not np.any((d < 0) & (usage - rhs > 0.5 * FEAS_TOL * scale)):
                continue  # helps no violated row any more
            usage = new
            out[queries[i]] = targets[i]
            moved += 1
            if np.all(usage - rhs <= 0.5 * FEAS_TOL * scale):
                break
        if moved == 0:
            break
        usage = program.le_usage_cols(out)  # exact, no drift
    return out


def _neighbourhood(program: Compiled, cols: np.ndarray, frac: np.ndarray, margin: np.ndarray | None, size: int,
                   lam: np.ndarray | None = None) -> np.ndarray:
    """``frac`` plus the queries whose moves help the violated rows most plus the closest-to-tie ones."""
    over = np.maximum(_violation(program, cols), 0.0)
    parts = [frac]
    if (over > FEAS_TOL).any():
        parts.append(_helpful(program, cols, np.where(over > FEAS_TOL, over, 0.0), size // 2, lam)[0])
    if margin is not None and len(margin):
        n_near = min(program.n, max(size - sum(len(p) for p in parts), size // 4))
        parts.append(np.argpartition(margin, n_near - 1)[:n_near] if n_near < program.n else np.arange(program.n))
    return np.unique(np.concatenate(parts).astype(np.int64))


def round_and_repair(program: Compiled, cols: np.ndarray, frac: np.ndarray, margin: np.ndarray | None,
                     polish_queries: int, time_limit: float, lam: np.ndarray | None = None,
                     deadline: float | None = None, bound: float | None = None) -> tuple[np.ndarray, Rounding]:
    """Integral assignment from an LP one.

    Small problems: one MILP over every query (exact). Large: greedy repair of the split queries (at most
    K of them at a vertex); if rows are still violated (e.g. signed rows, where only *other* queries can
    make room), a greedy repair moving any queries, then MILPs over growing neighbourhoods (split queries,
    the queries that help the violated rows most, the closest to a tie), ending with every query. Then a
    short MILP over the split plus closest-to-tie queries, kept if better (skipped when the plan is already
    within POLISH_SKIP_GAP of the LP bound).

    Raises InfeasibleError only when a MILP over every query proves infeasibility; SolverError when the
    escalation runs out of time or size without a feasible assignment.

    Without a ``deadline`` the exact and the improvement MILPs stop at POLISH_NODES nodes, never by the
    clock: the plan is a function of the input (``time_limit`` then caps only the repair MILPs, which run
    only when the greedy repairs leave a row violated). With one, every MILP also gets the time left.
    """
    def left(cap: float) -> float:
        return cap if deadline is None else max(min(cap, deadline - time.perf_counter()), 0.05)

    def clock(cap: float) -> float | None:
        """The wall clock of the plan's own MILPs: only the caller's deadline (else POLISH_NODES bounds them)."""
        return None if deadline is None else left(cap)

    if program.n <= EXACT_QUERIES:
        out, res = polish(program, cols, np.arange(program.n), time_limit=clock(time_limit), nodes=POLISH_NODES)
        if res.has_solution and not violated_rows(program, out):
            return out, Rounding("exact", program.n, res.status, res.mip_dual_bound if res.optimal else None)
        if res.status == "kInfeasible":
            violated = violated_rows(program, cols) or program.row_names
            raise InfeasibleError(violated, "no integral assignment exists (proved by a MILP over every query), "
                                  f"although the LP relaxation is feasible; loosen {violated}", {})
        cols = out
    out = greedy_repair(program, cols, frac)
    info = Rounding("greedy")
    if violated_rows(program, out):
        out = move_repair(program, out, lam=lam)
        info.repair = "moves"
    if violated_rows(program, out):
        sizes = [s for s in ESCALATION if s < program.n] + ([program.n] if program.n <= FULL_MILP_QUERIES else [])
        for size in sizes:
            queries = np.arange(program.n) if size >= program.n else _neighbourhood(program, out, frac, margin, size, lam)
            cand, res = polish(program, out, queries, time_limit=left(max(time_limit, 2.0)), gap=1e-4)
            info.repair, info.polish_queries, info.polish_status = f"milp[{len(queries)}]", len(queries), res.status
            if res.has_solution and not violated_rows(program, cand):
                out = cand
                break
            if res.status == "kInfeasible" and len(queries) == program.n:
                violated = violated_rows(program, out)
                raise InfeasibleError(violated, "no integral assignment exists (proved by a MILP over every query), "
                                      f"although the LP relaxation is feasible; loosen {violated}", {})
            if deadline is not None and time.perf_counter() > deadline:
                break
        else:
            if violated_rows(program, out):
                raise SolverError(f"decompose: no integral assignment found within {violated_rows(program, out)} "
                                  f"by repair MILPs over up to {sizes[-1] if sizes else 0} queries (the LP is feasible)")
        if violated_rows(program, out):
            raise SolverError(f"decompose: time limit reached while repairing {violated_rows(program, out)}")
    good_enough = bound is not None and bound - float(program.c[out].sum()) <= POLISH_SKIP_GAP * max(abs(bound), 1e-12)
    info.polish_skipped = good_enough
    if margin is not None and len(margin) and polish_queries > 0 and not good_enough:
        n_near = min(program.n, polish_queries)
        near = np.argpartition(margin, n_near - 1)[:n_near] if n_near < program.n else np.arange(program.n)
        queries = np.union1d(near, frac)
        cand, res = polish(program, out, queries, time_limit=clock(min(time_limit, 1.0)), per_query=3, lam=lam,
                           gap=1e-6, tight=False, nodes=POLISH_NODES)
        info.polish_queries, info.polish_status = len(queries), res.status
        if res.has_solution and not violated_rows(program, cand) and program.c[cand].sum() >= program.c[out].sum():
            out = cand
    return out, info


def solve_decompose(
    program: Compiled,
    *,
    warm_prices: np.ndarray | None = None,
    time_limit: float | None = None,
    gap_tol: float = 1e-4,
    polish_queries: int = POLISH_QUERIES,
    seed: int = 0,
) -> Solution:
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    rhs = program.le_rhs()
    if len(rhs) == 0:
        pricing = price(program, np.zeros(0))
        return build_solution(program, pricing.best_col, bound=float(pricing.best.sum()), method="decompose",
                              seconds=time.perf_counter() - t0, prices=np.zeros(0), gap_tol=gap_tol)
    info = SolveInfo()
    master = solve_lp(program, warm_prices=warm_prices, seed=seed, deadline=deadline, info=info)
    info.timings["lp"] = time.perf_counter() - t0
    if np.any(master.slack > 1e-7 * np.maximum(1.0, np.abs(rhs))):
        if not info.converged:
            raise SolverError(f"decompose: time limit ({time_limit} s) reached before a feasible LP point was found")
        raise diagnose(program, elastic={n: float(s) for n, s in zip(program.row_names, master.slack, strict=True) if s > 1e-9})
    lam = master.lam
    pricing = master.pricing if master.pricing is not None else price(program, lam)
    bound = float(pricing.best.sum() + lam @ rhs)  # valid for any lam >= 0
    cols, frac = lp_assignment(program, master)
    remaining = 10.0 if deadline is None else max(deadline - time.perf_counter(), 1.0)
    cols, info.rounding = round_and_repair(program, cols, frac, pricing.margin, polish_queries, min(10.0, remaining),
                                           lam, deadline=deadline, bound=bound)
    if info.rounding.polish_bound is not None and np.isfinite(info.rounding.polish_bound):
        bound = min(bound, float(info.rounding.polish_bound))
    violated = violated_rows(program, cols)
    if violated:  # round_and_repair raises first; kept as a last guard, never returns a violating plan
        raise SolverError(f"decompose: no integral assignment found within the limits of {violated}")
    info.timings["total"] = time.perf_counter() - t0
    info.prices, info.fractional, info.lp_value = lam, len(frac), master.value
    return build_solution(program, cols, bound=bound, method="decompose", seconds=time.perf_counter() - t0,
                          prices=lam, gap_tol=gap_tol, info=info)


def repair_lp_solution(program: Compiled, solution: Solution, *, method: str) -> Solution:
    """Round an LP solution (from CVXPY) to integers: polish its fractional queries, keep its bound and duals."""
    x = solution.info.lp_x
    if x is None:
        return solution
    frac = np.unique(program.query[(x > 1e-7) & (x < 1 - 1e-7)])
    order = np.lexsort((-x, program.query))
    first = np.searchsorted(program.query[order], np.arange(program.n))
    cols = order[first]
    prices = np.array([solution.shadow_prices.get(n, 0.0) for n in program.row_names])
    margin = price(program, prices).margin if len(prices) else None
    cols, _ = round_and_repair(program, cols, frac, margin, POLISH_QUERIES, 10.0, prices if len(prices) else None)
    bound = program.sign * solution.bound
    return build_solution(program, cols, bound=bound, method=method, seconds=solution.solve_seconds, prices=prices)
