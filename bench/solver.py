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

End to end (``--end-to-end``): ``batchplan plan``'s code path stage by stage on a queue of N queries sampled
from a real history (``--history``, default routerbench: 11 LLMs, 3 tasks) under new query ids, with a
predictor and templates trained once on that history's train split (cached under ``--work``). Stages:
ingest (read + validate the queue parquet), load (the trained predictor), predict, candidates, solve
(``plan_batch``: restrictions, both budget passes, the plan rows; "solve alone" is the optimizer's own time)
and write (plan parquet). Each size runs in its own subprocess; wall seconds per stage, process CPU seconds
(all threads) below them, peak GiB per stage from RSS sampled every 20 ms, the whole from ru_maxrss.

    uv run python bench/solver.py                      # 10k, 100k, 1M; baselines up to their time-out
    uv run python bench/solver.py --sizes 10000,100000 --baseline-timeout 120
    uv run python bench/solver.py --end-to-end --sizes 1000000
    uv run python bench/solver.py --end-to-end --sizes 1000000 --distinct-prompts   # a batch of all-new prompts
    uv run python bench/solver.py --replan-table [--replan-compare] [--replan-queries 200000]
    uv run python bench/solver.py --replan-table --replan-against 2b65e30   # before (that commit) / after

The re-plan table (also after the optimizer's): a row per round position of a 3-round run (first, middle,
last) re-planning N open queries, beside the 10 s target; ``--replan-compare`` adds the full price search
(every bisection step over the whole batch) and whether both plan the same calls. ``--replan-against REV``
runs each position on that commit's code too (``git archive`` into a temporary tree first on the path),
before and after in turn, and prints both beside each other with the ratio, whether they plan the same calls
(frame-equal), and the CPU seconds of the re-plan's steps (observe, evaluate, the look-ahead's price search,
the solve with its options table) before -> after.
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
    from batchplan.optimizer import Budget, Capacity, GroupBudget

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
    from batchplan.optimizer import Problem, solve

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
               "status": solution.status, "info": {"fractional": solution.info.fractional, "timings": solution.info.timings}}
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


E2E_STAGES = ("ingest", "load", "predict", "candidates", "solve", "write")  # pipeline.PLAN_STAGES, then the write


def prepare_end_to_end(n: int, history_dir: str, work: str, seed: int, distinct: bool = False) -> tuple[str, str]:
    """The trained model (once per history) and an N-query queue parquet (once per size): not timed.
    ``distinct``: every prompt made distinct (its query id appended, inside the tail the text encoder reads),
    as a batch of all-new tickets is: the encoder's per-distinct-tail saving is then nil."""
    from pathlib import Path

    from batchplan.app import artifacts
    from batchplan.core.history import load_history, with_holdout
    from batchplan.core.storage import Storage

    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    history = load_history(history_dir)
    model_uri = str(root / "model")
    if not (root / "model").exists():
        train = with_holdout(history, seed=seed).split("train")
        artifacts.save(artifacts.train(train, seed=seed), Storage(), model_uri)
    queue_uri = str(root / f"queue-{n}{'-distinct' if distinct else ''}.parquet")
    if not Path(queue_uri).exists():
        base = history.as_queue()
        rows = np.random.default_rng(seed).integers(0, base.height, n)
        rng = np.random.default_rng(seed + 1)
        tenants = pl.Series([f"tenant{t}" for t in rng.integers(0, N_TENANTS, n)])
        queue = base[rows].with_columns(
            pl.format("q-{}", pl.int_range(pl.len()).cast(pl.String).str.zfill(8)).alias("query_id"),
            tenants.alias("tenant"),
            pl.Series(rng.choice(np.array([1.0, 2.0, 3.0]), n, p=[0.6, 0.3, 0.1])).alias("priority"),
        )
        if distinct:
            queue = queue.with_columns(pl.format("{} (ticket {})", "prompt", "query_id").alias("prompt"))
        queue.write_parquet(queue_uri)
    return model_uri, queue_uri


def _run_end_to_end(model_uri: str, queue_uri: str, plan_uri: str, budget_share: float, queue: Any) -> None:
    import threading

    from batchplan.app import pipeline
    from batchplan.core.storage import Storage
    from batchplan.plans.planning import PlanRequest

    stage = ["start"]
    peaks: dict[str, float] = {}
    running = True
    page = resource.getpagesize()

    def sample() -> None:  # RSS per stage: ru_maxrss only knows the whole run's peak
        while running:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * page / 2**30
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds (all threads): less at the mercy of a busy machine than wall
    out: dict[str, Any] = {"ok": True}
    try:
        storage = Storage()
        t, c = time.perf_counter(), time.process_time()

        def lap(name: str) -> None:
            nonlocal t, c
            now, now_cpu = time.perf_counter(), time.process_time()
            seconds[name], cpu[name] = now - t, now_cpu - c
            t, c = now, now_cpu
            stage[0] = E2E_STAGES[E2E_STAGES.index(name) + 1] if name != E2E_STAGES[-1] else "end"

        def budgeted(predictions: pl.DataFrame) -> PlanRequest:
            # the budget: a share of what the cheapest-to-dearest spread of single models costs (not timed: O(pairs))
            nonlocal t, c
            per_query = predictions.group_by("query_id").agg(pl.col("cost_usd").min().alias("lo"), pl.col("cost_usd").max().alias("hi"))
            lo, hi = float(per_query["lo"].sum()), float(per_query["hi"].sum())
            t, c = time.perf_counter(), time.process_time()
            return PlanRequest(budget_usd=lo + budget_share * (hi - lo))

        stage[0] = "ingest"
        # cli.plan's own code path, stage by stage
        planned = pipeline.plan_queue(queue_uri, storage, model_uri, budgeted, lap=lap)
        outcome = planned.outcome
        storage.write_frame(outcome.plan, plan_uri)
        lap("write")
        out.update(
            queries=planned.ingested.queue.height,
            pairs=planned.predictions.height,
            options=outcome.problem.options.height if outcome.problem is not None else None,
            solve_alone=outcome.solution.solve_seconds,
            status=outcome.solution.status,
            objective=outcome.solution.objective,
            gap=outcome.solution.gap,
        )
    except Exception as error:  # report, don't crash the table
        out = {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    running = False
    sampler.join()
    out.update(seconds=seconds, cpu=cpu, peaks=peaks, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    queue.put(out)


def end_to_end(args: argparse.Namespace) -> int:
    header = f"{'N':>9} " + " ".join(f"{s:>10}" for s in (*E2E_STAGES, "total", "solve alone", "peak GiB")) + "  note"
    print(header)
    print("-" * len(header))
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        model_uri, queue_uri = prepare_end_to_end(n, args.history, args.work, args.seed, args.distinct_prompts)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        plan_uri = args.plan_out or f"{args.work}/plan-{n}.parquet"
        proc = ctx.Process(target=_run_end_to_end, args=(model_uri, queue_uri, plan_uri, args.budget_share, queue))
        proc.start()
        proc.join(args.timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            print(f"{n:>9}  timeout after {args.timeout:.0f} s")
            continue
        res = dict(queue.get(timeout=5))
        rows.append({"n": n, **res})
        secs = res["seconds"]
        cells = [f"{secs[s]:>10.2f}" if s in secs else f"{'-':>10}" for s in E2E_STAGES]
        total = sum(secs.values())
        note = f"{res.get('options')} options solved over, {res.get('status')}" if res["ok"] else res["error"]
        solve_alone = f"{res['solve_alone']:>10.2f}" if res["ok"] else f"{'-':>10}"
        print(f"{n:>9} " + " ".join(cells) + f" {total:>10.2f} {solve_alone} {res['peak_rss_gib']:>10.2f}  {note}")
        print(f"{'cpu s':>9} " + " ".join(f"{res['cpu'][s]:>10.2f}" if s in res["cpu"] else f"{'-':>10}" for s in E2E_STAGES)
              + f" {sum(res['cpu'].values()):>10.2f}")
        print(f"{'peak GiB':>9} " + " ".join(f"{res['peaks'].get(s, float('nan')):>10.2f}" for s in E2E_STAGES), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 0


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
    parser.add_argument("--end-to-end", action="store_true", help="time `batchplan plan`'s stages instead")
    parser.add_argument("--history", default="../shared/data/routerbench", help="end to end: history to sample")
    parser.add_argument("--work", default="/tmp/batchplan-bench-e2e", help="end to end: cached model and queues")
    parser.add_argument("--budget-share", type=float, default=0.3, help="end to end: budget between cheapest and dearest")
    parser.add_argument(
        "--distinct-prompts", action="store_true", help="end to end: every prompt made distinct (its query id appended)"
    )
    parser.add_argument("--plan-out", help="end to end: write the plan here (default under --work)")
    parser.add_argument("--replan-queries", type=int, default=1_000_000, help="open queries of the round re-plan line (0: skip)")
    parser.add_argument("--replan-only", action="store_true", help="print only the round re-plan line")
    parser.add_argument("--replan-rounds", type=int, default=2, help="the re-plan's rounds (2: the last; 3: a middle)")
    parser.add_argument("--replan-table", action="store_true", help="print only the re-plan table: first, middle, last round of 3")
    parser.add_argument("--replan-compare", action="store_true", help="the table also times the full price search and compares plans")
    parser.add_argument("--replan-against", metavar="REV", help="the re-plan table before (that commit's code) and after, side by side")
    args = parser.parse_args(argv)
    if args.replan_table:
        replan_table(args.replan_queries, seed=args.seed, compare=args.replan_compare, against=args.replan_against)
        return 0
    if args.replan_only:
        print(time_round_replan(args.replan_queries, seed=args.seed, rounds=args.replan_rounds))
        return 0
    if args.end_to_end:
        if args.timeout == 120.0:
            args.timeout = 900.0
        return end_to_end(args)
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
        replan_table(args.replan_queries, seed=args.seed, compare=args.replan_compare)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 0


def time_round_replan(n: int, seed: int = 0, rounds: int = 2) -> str:
    """One re-plan (round 2 of ``rounds``: 2 is the last round, 3 a middle one with the look-ahead's price
    bisection) of ``n`` open queries x N_MODELS LLMs after a round that called one cheap LLM on each, through
    ``PosteriorRoundPlanner.plan_round``: the posterior on every query, the options table, the budgeted solve.
    The posterior is fitted on a small synthetic history (not timed)."""
    from batchplan.plans.round_planner import PosteriorRoundPlanner

    posterior, state = replan_state(n, seed, rounds)
    started, started_cpu = time.perf_counter(), time.process_time()
    plan = PosteriorRoundPlanner(posterior).plan_round(state)
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    return (
        f"round re-plan (round 2 of {rounds}): {n:,} open queries x {N_MODELS} LLMs in {seconds:.1f} s (CPU {cpu:.1f} s; target <= 10 s); "
        f"{plan.calls.height:,} calls planned, solver {plan.diagnostics['status']}, gap {plan.diagnostics['gap']:.1e}"
    )


# the round positions of a 3-round run: (name, round, rounds); the first and the middle search the look-ahead's price
REPLAN_POSITIONS = (("first", 1, 3), ("middle", 2, 3), ("last", 3, 3))
REPLAN_TARGET_S = 10.0


# the re-plan's steps whose CPU seconds ``--replan-against`` prints (names both trees define)
REPLAN_STEPS = (("observe", "observe"), ("evaluate", "evaluate"), ("price", "_escalation_price"), ("solve", "_solve"))


def _timed_steps(module: Any) -> dict[str, float]:
    """Wrap ``REPLAN_STEPS`` in ``module`` (the round planner) to add up their CPU seconds (a bench's probe)."""
    spent = {name: 0.0 for name, _ in REPLAN_STEPS}
    for name, attr in REPLAN_STEPS:
        owner = module if hasattr(module, attr) else module.PosteriorRoundPlanner
        inner = getattr(owner, attr)

        def timed(*args: Any, _inner: Any = inner, _name: str = name, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_name] += time.process_time() - started

        setattr(owner, attr, timed)
    return spent


def _run_replan(
    n: int, seed: int, round_: int, rounds: int, price_sample: int | None, out: str, queue: Any, tree: str | None = None
) -> None:
    if tree is not None:  # another commit's code (``--replan-against``), ahead of this checkout's
        sys.path.insert(0, tree)
    import batchplan.plans.round_planner as planner_module
    from batchplan.plans.round_planner import PosteriorRoundPlanner

    try:
        posterior, state = replan_state(n, seed, rounds, round_)
        planner = PosteriorRoundPlanner(posterior)
        if price_sample is not None:
            planner.price_sample = price_sample
        steps = _timed_steps(planner_module) if tree is not None or price_sample == -1 else {}
        if price_sample == -1:
            planner.price_sample = PosteriorRoundPlanner.price_sample
        faults = resource.getrusage(resource.RUSAGE_SELF)
        started, started_cpu = time.perf_counter(), time.process_time()
        plan = planner.plan_round(state)
        res: dict[str, Any] = {"ok": True, "seconds": time.perf_counter() - started, "cpu": time.process_time() - started_cpu}
        after = resource.getrusage(resource.RUSAGE_SELF)
        res.update(steps=steps, sys=after.ru_stime - faults.ru_stime, faults=after.ru_minflt - faults.ru_minflt)
        plan.calls.write_parquet(out)
        d = plan.diagnostics
        res.update(calls=plan.calls.height, price=d["escalation_price"], status=d["status"], gap=d["gap"],
                   objective=d["objective"], spend=d["expected_cost_usd"], budget=state.budget_left_usd)
    except Exception as error:  # report, don't crash the table
        res = {"ok": False, "error": f"{type(error).__name__}: {error}"[:200]}
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put(res)


def _spawn_replan(args: tuple[Any, ...], timeout: float, tree: str | None = None) -> dict[str, Any]:
    """``_run_replan(*args)`` in its own process (its peak RSS), killed after ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_replan, args=(*args, queue, tree))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    return dict(queue.get(timeout=5))


def replan_table(n: int, seed: int = 0, compare: bool = False, timeout: float = 900.0, against: str | None = None) -> list[str]:
    """A row per round position of a 3-round run (``REPLAN_POSITIONS``): one re-plan of ``n`` open queries x
    N_MODELS LLMs through ``PosteriorRoundPlanner.plan_round``, each in its own subprocess (peak RSS), beside
    the target. ``compare``: also the full price search (``price_sample=0``: every bisection step a pass over
    the whole batch), and whether both plan the same calls (frame-equal). Prints each line as it comes."""
    import os
    import tempfile

    from polars.testing import assert_frame_equal

    if against is not None:
        return _replan_against(n, seed, against, timeout)

    def run(round_: int, rounds: int, price_sample: int | None, out: str) -> dict[str, Any]:
        return _spawn_replan((n, seed, round_, rounds, price_sample, out), timeout)

    lines = [f"round re-plan, {n:,} open queries x {N_MODELS} LLMs (load average before: {os.getloadavg()[0]:.1f})"]
    header = f"{'round':>12} {'wall s':>8} {'CPU s':>7} {'target':>7} {'meets':>6} {'calls':>10} {'price':>10} {'spend/budget':>13} {'gap':>8} {'peak GiB':>9}"
    if compare:
        header += f" {'full search s':>14} {'CPU s':>7} {'same plan':>10}"
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name, round_, rounds in REPLAN_POSITIONS:
            res = run(round_, rounds, None, f"{work}/{name}.parquet")
            label = f"{name} {round_}/{rounds}"
            if not res["ok"]:
                lines.append(f"{label:>12}  {res['error']}")
                print(lines[-1], flush=True)
                continue
            meets = "yes" if res["seconds"] <= REPLAN_TARGET_S else "no"
            line = (f"{label:>12} {res['seconds']:>8.1f} {res['cpu']:>7.1f} {REPLAN_TARGET_S:>7.0f} {meets:>6} {res['calls']:>10,} "
                    f"{res['price']:>10.1f} {res['spend'] / res['budget']:>13.3f} {res['gap']:>8.1e} {res['peak_rss_gib']:>9.2f}")
            if compare:
                full = run(round_, rounds, 0, f"{work}/{name}-full.parquet")
                if full["ok"]:
                    try:
                        assert_frame_equal(pl.read_parquet(f"{work}/{name}.parquet"), pl.read_parquet(f"{work}/{name}-full.parquet"))
                        same = "yes"
                    except AssertionError:
                        same = "NO"
                    line += f" {full['seconds']:>14.1f} {full['cpu']:>7.1f} {same:>10}"
                else:
                    line += f"  full search: {full['error']}"
            lines.append(line)
            print(line, flush=True)
    lines.append(f"(load average after: {os.getloadavg()[0]:.1f}; on a shared machine CPU s is the steadier figure)")
    print(lines[-1], flush=True)
    return lines


def _replan_against(n: int, seed: int, rev: str, timeout: float) -> list[str]:
    """``replan_table`` before (commit ``rev``) and after (this checkout), each position run on both in turn."""
    import os
    import subprocess
    import tempfile

    from polars.testing import assert_frame_equal

    def run(round_: int, rounds: int, out: str, tree: str | None) -> dict[str, Any]:
        # price_sample -1: the default search, its steps timed (as the other tree's are)
        return _spawn_replan((n, seed, round_, rounds, -1, out), timeout, tree)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = [f"round re-plan, {n:,} open queries x {N_MODELS} LLMs, before ({rev}) / after (this checkout), each position run on both in turn"]
    header = (f"{'round':>12} {'wall s':>13} {'CPU s':>13} {'sys s':>11} {'peak GiB':>11} {'CPU after/before':>17} "
              f"{'meets 10 s':>11} {'same plan':>10} {'load':>5}  CPU s per step, before -> after")
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as work:
        tree = f"{work}/tree"
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", root, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        for name, round_, rounds in REPLAN_POSITIONS:
            load = os.getloadavg()[0]
            before = run(round_, rounds, f"{work}/{name}-before.parquet", tree)
            after = run(round_, rounds, f"{work}/{name}-after.parquet", None)
            label = f"{name} {round_}/{rounds}"
            if not (before["ok"] and after["ok"]):
                lines.append(f"{label:>12}  before: {before.get('error', 'ok')}; after: {after.get('error', 'ok')}")
                print(lines[-1], flush=True)
                continue
            try:
                assert_frame_equal(pl.read_parquet(f"{work}/{name}-before.parquet"), pl.read_parquet(f"{work}/{name}-after.parquet"))
                same = "yes" if before["price"] == after["price"] else "NO (price)"
            except AssertionError:
                same = "NO"
            steps = ", ".join(f"{k} {before['steps'][k]:.1f} -> {after['steps'][k]:.1f}" for k, _ in REPLAN_STEPS)
            meets = "yes" if after["seconds"] <= REPLAN_TARGET_S else "no"
            line = (f"{label:>12} {before['seconds']:>5.1f} / {after['seconds']:>5.1f} {before['cpu']:>5.1f} / {after['cpu']:>5.1f} "
                    f"{before['sys']:>4.1f} / {after['sys']:>4.1f} {before['peak_rss_gib']:>4.2f} / {after['peak_rss_gib']:>4.2f} "
                    f"{after['cpu'] / before['cpu']:>17.2f} {meets:>11} {same:>10} {load:>5.1f}  {steps}")
            lines.append(line)
            print(line, flush=True)
    lines.append(f"(load average after: {os.getloadavg()[0]:.1f}; wall s / CPU s / sys s as before / after; sys s: the kernel's, "
                 "mostly zeroing fresh pages; on a shared machine CPU s and the ratio are the steadier figures)")
    print(lines[-1], flush=True)
    return lines


def replan_state(n: int, seed: int = 0, rounds: int = 2, round_: int = 2) -> tuple[Any, Any]:
    """The posterior and the ``RoundState`` of round ``round_`` of ``rounds`` for ``time_round_replan`` (not
    timed): round 1 has seen nothing; round 2 saw one cheap LLM's answer on every query; round 3 also a
    stronger LLM's on a random 40% of them, whose cost the budget left no longer holds."""
    from batchplan.core.history import synthetic_history
    from batchplan.core.rounds import OBSERVATION_SCHEMA, RoundState
    from batchplan.plans.posterior import fit_posterior

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

    def answered(rows: np.ndarray, round_of: int, j: int) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "query_id": ids.gather(rows),
                "round": round_of,
                "model": models[j],
                "status": "ok",
                "answer": rng.choice(["A", "B", "C"], len(rows)),
                "logprob": np.log(rng.uniform(0.3, 1.0, len(rows))),
                "cost_usd": cost[rows, j],
                "billed_known": True,
                "tokens_in": 100,
                "tokens_out": 1,
            },
            schema_overrides=dict(OBSERVATION_SCHEMA),
        ).select(OBSERVATION_SCHEMA.names())

    budget = float(cost[:, 4].sum())  # room to escalate a part of the batch
    if round_ == 1:
        return posterior, RoundState(1, rounds, queue, predictions, answered(np.arange(0), 1, 0), budget)
    observations = answered(np.arange(n), 1, 0)
    if round_ >= 3:
        second = np.flatnonzero(rng.uniform(size=n) < 0.4)
        observations = pl.concat([observations, answered(second, 2, 5)])
        budget -= float(cost[second, 5].sum()) * 0.5
    return posterior, RoundState(round_, rounds, queue, predictions, observations, budget)


if __name__ == "__main__":
    sys.exit(main())
