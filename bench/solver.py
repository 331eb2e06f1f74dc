"""Benchmark the optimizer: fast method vs plain CVXPY+HiGHS (MILP and LP) on synthetic batches.

Synthetic instance (``make_options``), shaped like ``../shared/data``: N queries x 10 models; model prices
span 100x (geometric), per-query token counts lognormal, so per-(query, model) cost = tokens x price
(x per-pair jitter); accuracy = sigmoid(model skill rising with price - query difficulty + N(0, 0.5) pair
noise); value = priority (1, 2 or 3) x accuracy; 8 tenants.
Constraint sets:
  budget: total cost <= 30% of the way from the cheapest to the dearest assignment;
  all:    that budget + per-model calls capacity (the 3 dearest models capped) + per-model token capacity
          + per-tenant budgets (each tenant at 35% of its way from cheapest to dearest).

Every case runs in its own subprocess (peak RSS from ru_maxrss; a time-out kills it).

    uv run python bench/solver.py                      # 10k, 100k, 1M; baselines up to their time-out
    uv run python bench/solver.py --sizes 10000,100000 --baseline-timeout 120
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from typing import Any

import numpy as np
import polars as pl

N_MODELS = 10
N_TENANTS = 8


def make_options(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    k = N_MODELS
    price = np.geomspace(0.1, 10.0, k) / 1e6  # USD per token: 100x span
    skill = np.linspace(-0.5, 2.5, k)
    tokens = rng.lognormal(6.0, 0.7, n)[:, None] * rng.uniform(0.9, 1.1, (n, k))
    cost = tokens * price[None, :]
    difficulty = rng.normal(0.0, 1.3, n)
    logit = skill[None, :] - difficulty[:, None] + rng.normal(0.0, 0.5, (n, k))
    acc = 1.0 / (1.0 + np.exp(-logit))
    priority = rng.choice(np.array([1.0, 2.0, 3.0]), n, p=[0.6, 0.3, 0.1])
    tenant = rng.integers(0, N_TENANTS, n)
    tenants = pl.Series("tenant", [f"tenant{t}" for t in range(N_TENANTS)])
    models = pl.Series("model", [f"model{j}" for j in range(k)])
    return pl.DataFrame(
        {
            "query": np.repeat(np.arange(n, dtype=np.int64), k),
            "option": np.arange(n * k, dtype=np.int64),
            "value": (acc * priority[:, None]).ravel(),
            "cost": cost.ravel(),
            "accuracy": acc.ravel(),
            "tenant": pl.Series(np.repeat(tenant, k)).replace_strict(np.arange(N_TENANTS), tenants, return_dtype=pl.String).cast(pl.Categorical),
            "model": pl.Series(np.tile(np.arange(k), n)).replace_strict(np.arange(k), models, return_dtype=pl.String).cast(pl.Categorical),
            "calls": np.ones(n * k),
            "tokens": tokens.ravel(),
        }
    )


def constraints_for(options: pl.DataFrame, which: str) -> list[Any]:
    from optimizer import Budget, Capacity, GroupBudget

    per_q = options.group_by("query").agg(pl.col("cost").min().alias("lo"), pl.col("cost").max().alias("hi"), pl.col("tenant").first())
    lo, hi = float(per_q["lo"].sum()), float(per_q["hi"].sum())
    specs: list[Any] = [Budget(limit=lo + 0.3 * (hi - lo))]
    if which == "all":
        n = per_q.height
        calls = {f"model{j}": float(n) * s for j, s in zip(range(N_MODELS - 3, N_MODELS), (0.12, 0.08, 0.05), strict=True)}
        tok = options.group_by("model").agg(pl.col("tokens").sum())
        tokens = {str(m): float(t) * 0.15 for m, t in tok.iter_rows()}
        by_t = per_q.group_by("tenant").agg(pl.col("lo").sum(), pl.col("hi").sum())
        tenant_limits = {str(t): float(a + 0.35 * (b - a)) for t, a, b in by_t.iter_rows()}
        specs += [
            Capacity(column="calls", group="model", limit=calls, name="calls"),
            Capacity(column="tokens", group="model", limit=tokens, name="tokens"),
            GroupBudget(group="tenant", limits=tenant_limits, name="tenant_budget"),
        ]
    return specs


# the best plain CVXPY+HiGHS configuration measured (STACK.md): presolve off, IPM for the root LP
TUNED: dict[str, tuple[str, dict[str, Any]]] = {
    "cvxpy_milp_tuned": ("cvxpy_milp", {"presolve": "off", "mip_lp_solver": "ipm"}),
}


def _run_case(n: int, which: str, method: str, seed: int, queue: Any) -> None:
    from optimizer import Problem, solve

    try:
        options = make_options(n, seed)
        problem = Problem(options, "max_value", constraints_for(options, which))
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if method in TUNED:
            kwargs["highs_options"] = TUNED[method][1]
            method = TUNED[method][0]
        solution = solve(problem, method=method, **kwargs)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
        out = {"ok": True, "seconds": wall, "objective": solution.objective, "bound": solution.bound, "gap": solution.gap,
               "status": solution.status, "info": {k: v for k, v in solution.info.items() if k in ("rounds", "active", "fractional", "timings")}}
    except Exception as error:  # report, don't crash the table
        out = {"ok": False, "error": f"{type(error).__name__}: {error}"[:200]}
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put(out)


def run_case(n: int, which: str, method: str, seed: int, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_case, args=(n, which, method, seed, queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "seconds": time.perf_counter() - t0}
    try:
        return dict(queue.get(timeout=5))
    except Exception:
        return {"ok": False, "error": f"process exited with code {proc.exitcode}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--constraints", default="budget,all")
    parser.add_argument("--methods", default="decompose,cvxpy_milp,cvxpy_lp")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-case time-out for the fast method (s)")
    parser.add_argument("--baseline-timeout", type=float, default=120.0, help="per-case time-out for CVXPY baselines (s)")
    parser.add_argument("--baseline-max-n", type=int, default=100_000, help="skip baselines above this N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--replan-queries", type=int, default=1_000_000, help="open queries of the round re-plan line (0: skip)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    header = f"{'N':>9} {'constraints':>11} {'method':>16} {'seconds':>9} {'peak GiB':>9} {'gap':>10} {'objective':>14} {'x faster':>9}  note"
    print(header)
    print("-" * len(header))
    for which in args.constraints.split(","):
        for n in sizes:
            fast_seconds = None
            for method in args.methods.split(","):
                baseline = method.startswith("cvxpy")
                if baseline and n > args.baseline_max_n:
                    res: dict[str, Any] = {"ok": False, "error": f"skipped (N > --baseline-max-n {args.baseline_max_n})"}
                else:
                    res = run_case(n, which, method, args.seed, args.baseline_timeout if baseline else args.timeout)
                if method == "decompose" and res.get("ok"):
                    fast_seconds = res["seconds"]
                ratio = ""
                if baseline and fast_seconds:
                    secs = res["seconds"] if res.get("ok") else (args.baseline_timeout if "timeout" in res.get("error", "") else None)
                    if secs:
                        ratio = ("> " if not res.get("ok") else "") + f"{secs / fast_seconds:.0f}"
                row = {"n": n, "constraints": which, "method": method, "ratio": ratio, **res}
                rows.append(row)
                if res.get("ok"):
                    note = json.dumps(res.get("info", {}))[:80] if method == "decompose" else res.get("status", "")
                    print(f"{n:>9} {which:>11} {method:>16} {res['seconds']:>9.2f} {res['peak_rss_gib']:>9.2f} {res['gap']:>10.2e} "
                          f"{res['objective']:>14.2f} {ratio:>9}  {note}", flush=True)
                else:
                    print(f"{n:>9} {which:>11} {method:>16} {'-':>9} {res.get('peak_rss_gib', float('nan')):>9.2f} {'-':>10} {'-':>14} "
                          f"{ratio:>9}  {res.get('error', '')}", flush=True)
    print("\nspeed-up of decompose (wall, compile included) over plain CVXPY+HiGHS:")
    for which in args.constraints.split(","):
        for n in sizes:
            case = [r for r in rows if r["n"] == n and r["constraints"] == which]
            fast = next((r for r in case if r["method"] == "decompose" and r.get("ok")), None)
            if fast is None:
                continue
            parts = []
            for r in case:
                if not r["method"].startswith("cvxpy") or not r.get("ratio"):
                    continue
                secs = f"{r['seconds']:.1f} s" if r.get("ok") else f"> {args.baseline_timeout:.0f} s (timed out)"
                parts.append(f"{r['method']} {secs}: {r['ratio']}x")
            if parts:
                print(f"  {n:>9} {which:>7}: decompose {fast['seconds']:.2f} s; " + "; ".join(parts))
    if args.replan_queries > 0:
        print(time_round_replan(args.replan_queries, seed=args.seed))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 0


def time_round_replan(n: int, seed: int = 0) -> str:
    """One re-plan (round 2 of 2) of ``n`` open queries x N_MODELS LLMs after a round that called one cheap
    LLM on each, through ``PosteriorRoundPlanner.plan_round``: the posterior on every query, the options
    table, the budgeted solve. The posterior is fitted on a small synthetic history (not timed)."""
    from batchplan.history import synthetic_history
    from batchplan.posterior import fit_posterior
    from batchplan.round_planner import PosteriorRoundPlanner
    from batchplan.rounds import OBSERVATION_SCHEMA, RoundState

    history = synthetic_history(400, N_MODELS, n_tasks=1, seed=seed)
    skill = history.outcomes.group_by("model").agg(pl.col("correct").mean().alias("p_correct"))
    posterior = fit_posterior(history, history.outcomes.select("query_id", "model").join(skill, on="model"))
    rng = np.random.default_rng(seed)
    ids = pl.Series("query_id", [f"q{i:07d}" for i in range(n)])
    models = sorted(skill["model"].to_list())
    queue = pl.DataFrame({"query_id": ids, "task": "task0", "tenant": "default", "priority": 1.0})
    p = rng.uniform(0.3, 0.95, (n, N_MODELS))
    cost = np.geomspace(1e-6, 1e-4, N_MODELS)[None] * rng.lognormal(0, 0.5, (n, 1))
    predictions = pl.DataFrame(
        {
            "query_id": np.repeat(ids.to_numpy(), N_MODELS),
            "model": np.tile(models, n),
            "p_correct": p.ravel(),
            "cost_usd": cost.ravel(),
            "cost_high_usd": 1.3 * cost.ravel(),
        }
    )
    observations = pl.DataFrame(
        {
            "query_id": ids,
            "round": 1,
            "model": models[0],
            "status": "ok",
            "answer": rng.choice(["A", "B", "C"], n),
            "logprob": np.log(rng.uniform(0.3, 1.0, n)),
            "cost_usd": cost[:, 0],
            "billed_known": True,
            "tokens_in": 100,
            "tokens_out": 1,
        },
        schema_overrides=dict(OBSERVATION_SCHEMA),
    ).select(OBSERVATION_SCHEMA.names())
    budget = float(cost[:, 4].sum())  # room to escalate a part of the batch
    state = RoundState(2, 2, queue, predictions, observations, budget)
    started = time.perf_counter()
    plan = PosteriorRoundPlanner(posterior).plan_round(state)
    seconds = time.perf_counter() - started
    return (
        f"round re-plan: {n:,} open queries x {N_MODELS} LLMs in {seconds:.1f} s (target <= 10 s); "
        f"{plan.calls.height:,} calls planned, solver {plan.diagnostics['status']}, gap {plan.diagnostics['gap']:.1e}"
    )


if __name__ == "__main__":
    sys.exit(main())
