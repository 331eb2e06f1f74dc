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

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from optimizer.diagnose import diagnose
from optimizer.highs_lp import HighsResult, run_highs
from optimizer.problem import Compiled
from optimizer.solution import InfeasibleError, Solution, SolverError, build_solution

SAMPLE_QUERIES = 20_000  # LP on this many queries gives the initial prices
ACTIVE_FRACTION = 0.02  # share of queries (closest to a tie) in the first restricted LP
MIN_ACTIVE = 2_000
POLISH_QUERIES = 1_000  # queries in the integer polish MILP
MAX_ROUNDS = 30
LP_OPTIONS: dict[str, Any] = {"solver": "simplex"}


@dataclass
class Pricing:
    """Per-query best column and margin to the runner-up under given prices."""

    r: np.ndarray
    best: np.ndarray  # float per query
    best_col: np.ndarray  # int64 per query
    margin: np.ndarray  # best - second best (inf if a single column)


def price(model: Compiled, lam: np.ndarray) -> Pricing:
    r = model.reduced(lam)
    heads = model.starts[:-1]
    best = np.maximum.reduceat(r, heads)
    is_best = r >= best[model.query]
    cols = np.flatnonzero(is_best)
    qs = model.query[cols]
    first = np.ones(len(cols), dtype=bool)
    first[1:] = qs[1:] != qs[:-1]
    best_col = cols[first]
    r2 = r.copy()
    r2[best_col] = -np.inf
    second = np.maximum.reduceat(r2, heads)
    margin = best - second
    return Pricing(r, best, best_col, margin)


def lagrangian_bound(model: Compiled, lam: np.ndarray, pricing: Pricing | None = None) -> float:
    """Upper bound on the (max-form) LP optimum, valid for any lam >= 0."""
    p = pricing or price(model, lam)
    return float(p.best.sum() + lam @ model.le_rhs())


@dataclass
class Restricted:
    queries: np.ndarray  # active query ids, sorted
    cols: np.ndarray  # candidate model columns, sorted (grouped by query)
    fixed_cols: np.ndarray  # chosen column for every query (active queries: placeholder)
    result: HighsResult
    slack: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _penalties(model: Compiled) -> np.ndarray:
    """Elastic-slack penalty per <= row: far above any price a feasible LP can have."""
    crange = float(np.ptp(model.c)) + 1.0 if model.m else 1.0
    out = []
    for f in model.families:
        nz = np.abs(f.coef[(f.gid >= 0) & (f.coef != 0)])
        unit = float(np.median(nz)) if len(nz) else 1.0
        out.append(np.full(f.size, 1e5 * crange / max(unit, 1e-12)))
    return np.concatenate(out) if out else np.zeros(0)


def solve_restricted(
    model: Compiled,
    queries: np.ndarray,
    cols: np.ndarray,
    fixed_cols: np.ndarray,
    rhs: np.ndarray,
    *,
    integer: bool = False,
    elastic: np.ndarray | None = None,
    options: dict[str, Any] | None = None,
) -> Restricted:
    """LP (or MILP) over ``cols`` of ``queries``; every other query at ``fixed_cols``; rows rhs - fixed usage."""
    k = len(rhs)
    fixed_mask = np.ones(model.n, dtype=bool)
    fixed_mask[queries] = False
    x_fixed = np.zeros(model.m)
    x_fixed[fixed_cols[fixed_mask]] = 1.0
    residual = rhs - model.le_usage(x_fixed) if k else rhs
    r_idx, c_idx, vals = model.matrix(cols)
    qpos = np.searchsorted(queries, model.query[cols])
    n_cols = len(cols)
    rows = [r_idx, k + qpos]
    cidx = [c_idx, np.arange(n_cols)]
    vv = [vals, np.ones(n_cols)]
    costs = [model.c[cols]]
    lower, upper = [np.zeros(n_cols)], [np.ones(n_cols)]
    if elastic is not None and k:
        rows.append(np.arange(k))
        cidx.append(n_cols + np.arange(k))
        vv.append(-np.ones(k))
        costs.append(-elastic)
        lower.append(np.zeros(k))
        upper.append(np.full(k, np.inf))
    total_cols = n_cols + (k if elastic is not None else 0)
    a = sp.csc_array((np.concatenate(vv), (np.concatenate(rows), np.concatenate(cidx))), shape=(k + len(queries), total_cols))
    row_lower = np.concatenate([np.full(k, -np.inf), np.ones(len(queries))])
    row_upper = np.concatenate([residual, np.ones(len(queries))])
    result = run_highs(np.concatenate(costs), np.concatenate(lower), np.concatenate(upper), row_lower, row_upper, a,
                       integer=integer, options=options)
    slack = result.x[n_cols:] if (elastic is not None and len(result.x)) else np.zeros(k)
    return Restricted(queries, cols, fixed_cols, result, slack)


def _window_cols(model: Compiled, pricing: Pricing, queries: np.ndarray, window: np.ndarray | float) -> np.ndarray:
    """Columns of ``queries`` whose reduced cost is within ``window`` of their query's best."""
    sel = np.zeros(model.n, dtype=bool)
    sel[queries] = True
    in_q = sel[model.query]
    w = np.zeros(model.n)
    w[queries] = window
    keep = in_q & (pricing.r >= (pricing.best - w)[model.query])
    return np.flatnonzero(keep)


def _initial_prices(model: Compiled, rhs: np.ndarray, penalties: np.ndarray, sample: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(model.n, size=sample, replace=False))
    frac = sample / model.n
    counts = np.diff(model.starts)
    cols = np.repeat(model.starts[queries], counts[queries]) + (
        np.arange(counts[queries].sum()) - np.repeat(np.cumsum(counts[queries]) - counts[queries], counts[queries])
    )
    # a sub-model: only the sample's columns, limits scaled by the sample's share
    fixed = np.full(model.n, -1, dtype=np.int64)
    others = np.ones(model.n, dtype=bool)
    others[queries] = False
    # no fixed usage: rows count only the sample (residual = scaled rhs)
    res = _solve_sub(model, queries, cols, rhs * frac, penalties)
    del fixed, others
    if res.row_dual.size == 0:
        return np.zeros(len(rhs))
    return np.clip(res.row_dual[: len(rhs)], 0.0, None)


def _solve_sub(model: Compiled, queries: np.ndarray, cols: np.ndarray, rhs: np.ndarray, penalties: np.ndarray) -> HighsResult:
    k = len(rhs)
    r_idx, c_idx, vals = model.matrix(cols)
    qpos = np.searchsorted(queries, model.query[cols])
    n_cols = len(cols)
    a = sp.csc_array(
        (np.concatenate([vals, np.ones(n_cols), -np.ones(k)]),
         (np.concatenate([r_idx, k + qpos, np.arange(k)]), np.concatenate([c_idx, np.arange(n_cols), n_cols + np.arange(k)]))),
        shape=(k + len(queries), n_cols + k),
    )
    c = np.concatenate([model.c[cols], -penalties])
    return run_highs(c, np.zeros(n_cols + k), np.concatenate([np.ones(n_cols), np.full(k, np.inf)]),
                     np.concatenate([np.full(k, -np.inf), np.ones(len(queries))]), np.concatenate([rhs, np.ones(len(queries))]),
                     a, options=LP_OPTIONS)


def solve_lp(
    model: Compiled,
    *,
    warm_prices: np.ndarray | None = None,
    sample: int = SAMPLE_QUERIES,
    seed: int = 0,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray, Restricted, dict[str, Any]]:
    """Full LP optimum by pricing + restricted LPs. Returns (prices, per-query LP column, restricted, info)."""
    rhs = model.le_rhs()
    k = len(rhs)
    penalties = _penalties(model)
    info: dict[str, Any] = {"rounds": 0, "active": []}
    if warm_prices is not None and len(warm_prices) == k:
        lam = np.asarray(warm_prices, dtype=np.float64)
    elif model.n > 2 * sample:
        lam = _initial_prices(model, rhs, penalties, sample, seed)
    else:
        lam = np.zeros(k)
    pricing = price(model, lam)
    if model.n <= 2 * sample:
        active = np.arange(model.n)
        window: np.ndarray | float = np.inf
    else:
        target = min(model.n, max(MIN_ACTIVE, int(ACTIVE_FRACTION * model.n)))
        delta = float(np.partition(pricing.margin, target - 1)[target - 1])
        active = np.flatnonzero(pricing.margin <= delta)
        window = max(delta, 0.0)
    cols = _window_cols(model, pricing, active, window)
    fixed_cols = pricing.best_col.copy()
    scale = max(float(np.abs(model.c).max()) if model.m else 1.0, 1e-12)
    eps = 1e-9 * scale
    for round_ in range(MAX_ROUNDS):
        if deadline is not None and time.perf_counter() > deadline:
            raise SolverError(f"decompose: time limit reached after {round_} pricing rounds")
        restricted = solve_restricted(model, active, cols, fixed_cols, rhs, elastic=penalties, options=LP_OPTIONS)
        res = restricted.result
        info["rounds"] = round_ + 1
        info["active"].append(len(active))
        if not res.optimal or res.row_dual.size == 0:
            raise SolverError(f"decompose: restricted LP ended with HiGHS status {res.status}")
        lam = np.clip(res.row_dual[:k], 0.0, None)
        mu = res.row_dual[k:]
        pricing = price(model, lam)
        # fixed queries whose best column moved
        fixed_mask = np.ones(model.n, dtype=bool)
        fixed_mask[active] = False
        moved = fixed_mask & (pricing.best > pricing.r[fixed_cols] + eps)
        # active queries with an excluded column that prices in
        mu_full = np.full(model.n, np.inf)
        mu_full[active] = mu
        in_cols = np.zeros(model.m, dtype=bool)
        in_cols[cols] = True
        entering = (~in_cols) & (~fixed_mask[model.query]) & (pricing.r > mu_full[model.query] + eps)
        n_moved, n_enter = int(moved.sum()), int(entering.sum())
        if n_moved == 0 and n_enter == 0:
            break
        new_q = np.flatnonzero(moved)
        # widen: moved queries enter with every column near their new best
        near = _window_cols(model, pricing, new_q, np.maximum(pricing.margin[new_q], 0.0) * 2 + eps) if len(new_q) else np.zeros(0, np.int64)
        also = np.concatenate([fixed_cols[new_q], near, np.flatnonzero(entering)])
        active = np.union1d(active, new_q)
        cols = np.union1d(cols, also)
    else:
        raise SolverError(f"decompose: pricing did not converge in {MAX_ROUNDS} rounds")
    # LP column per query (fixed ones; active ones resolved by the caller from restricted.result.x)
    info["slack"] = restricted.slack
    info["lp_objective_max"] = float(res.objective)
    return lam, fixed_cols, restricted, info


def _lp_assignment(model: Compiled, restricted: Restricted) -> tuple[np.ndarray, np.ndarray]:
    """(integral column per query taking each active query's largest share, fractional query ids)."""
    cols = restricted.fixed_cols.copy()
    x = restricted.result.x[: len(restricted.cols)]
    order = np.lexsort((-x, model.query[restricted.cols]))
    qs = model.query[restricted.cols][order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = qs[1:] != qs[:-1]
    top = order[first]
    cols[model.query[restricted.cols][top]] = restricted.cols[top]
    frac_q = np.unique(model.query[restricted.cols][(x > 1e-7) & (x < 1 - 1e-7)])
    return cols, frac_q


def polish(model: Compiled, cols: np.ndarray, queries: np.ndarray, *, time_limit: float = 10.0) -> tuple[np.ndarray, HighsResult | None]:
    """Integer re-optimisation of ``queries`` over all their columns with every other query fixed at ``cols``."""
    rhs = model.le_rhs()
    counts = np.diff(model.starts)
    qc = counts[queries]
    all_cols = np.repeat(model.starts[queries], qc) + (np.arange(qc.sum()) - np.repeat(np.cumsum(qc) - qc, qc))
    options = {"mip_rel_gap": 1e-7, "time_limit": float(time_limit)}
    restricted = solve_restricted(model, queries, all_cols, cols, rhs, integer=True, options=options)
    res = restricted.result
    if not res.has_solution:
        return cols, res
    out = cols.copy()
    xr = res.x[: len(all_cols)]
    chosen = all_cols[xr > 0.5]
    out[model.query[chosen]] = chosen
    return out, res


def greedy_repair(model: Compiled, cols: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Move each of ``queries`` to the best column that keeps every row within its limit (fallback)."""
    out = cols.copy()
    rhs = model.le_rhs()
    for q in queries:
        x = model.choose_matrix(out)
        x[out[q]] = 0.0
        base = model.le_usage(x)
        best, best_val, least, least_viol = -1, -np.inf, -1, np.inf
        for j in range(model.starts[q], model.starts[q + 1]):
            e = np.zeros(model.m)
            e[j] = 1.0
            use = base + model.le_usage(e)
            viol = float(np.maximum(use - rhs, 0).sum())
            if viol <= 1e-9 and model.c[j] > best_val:
                best, best_val = j, float(model.c[j])
            if viol < least_viol:
                least, least_viol = j, viol
        out[q] = best if best >= 0 else least
    return out


def solve_decompose(
    model: Compiled,
    *,
    warm_prices: np.ndarray | None = None,
    time_limit: float | None = None,
    gap_tol: float = 1e-4,
    polish_queries: int = POLISH_QUERIES,
    seed: int = 0,
) -> Solution:
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    k = model.k
    if k == 0:
        pricing = price(model, np.zeros(0))
        return build_solution(model, pricing.best_col, bound=float(pricing.best.sum()), method="decompose",
                              seconds=time.perf_counter() - t0, prices=np.zeros(0), gap_tol=gap_tol)
    lam, _fixed, restricted, info = solve_lp(model, warm_prices=warm_prices, seed=seed, deadline=deadline)
    slack = info["slack"]
    rhs = model.le_rhs()
    if np.any(slack > 1e-7 * np.maximum(1.0, np.abs(rhs))):
        raise diagnose(model, elastic={n: float(s) for n, s in zip(model.row_names, slack, strict=True) if s > 0})
    pricing = price(model, lam)
    bound = float(pricing.best.sum() + lam @ rhs)
    lp_value = info["lp_objective_max"] + float(model.c[restricted.fixed_cols[_fixed_mask(model, restricted.queries)]].sum())
    bound = min(bound, lp_value + 1e-9 * max(1.0, abs(lp_value))) if np.isfinite(lp_value) else bound
    cols, frac_q = _lp_assignment(model, restricted)
    # integer polish: fractional queries + the closest-to-tie others
    n_polish = min(model.n, max(polish_queries, 4 * len(frac_q)))
    if n_polish >= model.n:
        polish_q = np.arange(model.n)
    else:
        near = np.argpartition(pricing.margin, n_polish - 1)[:n_polish]
        polish_q = np.union1d(frac_q, near)[: max(n_polish, len(frac_q))]
        polish_q = np.union1d(polish_q, frac_q)
    remaining = None if deadline is None else max(deadline - time.perf_counter(), 1.0)
    cols, res = polish(model, cols, polish_q, time_limit=min(10.0, remaining or 10.0))
    if res is not None and res.status == "kOptimal" and len(polish_q) == model.n and np.isfinite(res.mip_dual_bound):
        bound = min(bound, res.mip_dual_bound)
    from optimizer.solution import check_feasible

    if check_feasible(model, cols):
        cols = greedy_repair(model, cols, frac_q)
        violated = check_feasible(model, cols)
        if violated:
            raise InfeasibleError(violated, f"no integral assignment found within the limits of {violated} "
                                  "(the LP relaxation is feasible; loosen these rows slightly)", {})
    info.update(prices=lam, fractional=len(frac_q), polish_queries=len(polish_q),
                polish_status=None if res is None else res.status, lp_bound=bound)
    return build_solution(model, cols, bound=bound, method="decompose", seconds=time.perf_counter() - t0,
                          prices=lam, gap_tol=gap_tol, info=info)


def _fixed_mask(model: Compiled, active: np.ndarray) -> np.ndarray:
    mask = np.ones(model.n, dtype=bool)
    mask[active] = False
    return mask


def repair_lp_solution(model: Compiled, solution: Solution, *, method: str) -> Solution:
    """Round an LP solution (from CVXPY) to integers: polish its fractional queries, keep its bound and duals."""
    x = solution.info.get("lp_x")
    if x is None:
        return solution
    frac = np.unique(model.query[(x > 1e-7) & (x < 1 - 1e-7)])
    order = np.lexsort((-x, model.query))
    first = np.searchsorted(model.query[order], np.arange(model.n))
    cols = order[first]
    if len(frac):
        cols, _ = polish(model, cols, frac)
    from optimizer.solution import check_feasible

    if check_feasible(model, cols):
        cols = greedy_repair(model, cols, frac)
    prices = np.array([solution.shadow_prices.get(n, 0.0) for n in model.row_names])
    bound = model.sign * solution.bound
    return build_solution(model, cols, bound=bound, method=method, seconds=solution.solve_seconds, prices=prices)
