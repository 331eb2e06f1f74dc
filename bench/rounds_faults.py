"""Fault bench: a run against an endpoint where ~18% of calls fail, single shot vs in rounds.

The project's own fault-injecting server (``tests/support/replay_server.py``, real HTTP on 127.0.0.1, a fresh
one per run so its ``/stats`` bill is that run's) answers the test split of a data set as the recorded
models did; the project's openai backend calls it. The predictor is trained on the train split; each
cell plans the test split at a share of the best single model's cost and runs it:

- ``rounds=1``: today's single-shot dispatch of the plan;
- ``rounds=N``: the round runner with each round planner: ``plan`` (the single-shot plan's kinds, step by
  step) and ``posterior`` (the posterior model re-planning every open query with the optimizer).

Faults (per attempt): 429 4%, 500 4%, truncated body 3%, connection reset 3%, slow 4%. A truncated body and
a reset leave the bill unknown, so the budget guard charges those attempts their reservation: the hard
cost bound (prompt bytes x input price + max_tokens x output price), several times a bill. Open tasks send
the max_tokens learned per (task, LLM) at train (``OutputCaps``; ``--no-output-caps``: the flat 1024), and
the server cuts (and bills) an answer at max_tokens, so that bound is a real one. The server
bills neither, so the provider's bill (``billed USD``) falls below what the run charged (``charged USD``).

Targets (issue 14): deferred <= 1% while the budget left covers the cheapest LLM's call, accuracy within
1 point of the fault-free run at the same budget, charged <= budget in every cell.

    uv run python bench/rounds_faults.py [--datasets cascades,overruling,cascades_open] [--fractions 0.3]
        [--rounds 3] [--round-planners plan,posterior] [--fault-seeds 11,12,13]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import structlog

from batchplan.app import artifacts
from batchplan.app.demo import best_single_cost
from batchplan.app.pipeline import Execution, build_candidates, execute, execute_rounds, predict
from batchplan.app.report import Truth, score_results
from batchplan.app.round_runner import make_round_planner
from batchplan.core.catalog import PriceCatalog
from batchplan.core.history import History, load_history, with_holdout
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.dispatchers import RetryPolicy, get_backend
from batchplan.plans.planning import PlanRequest, plan_batch
from tests.support.replay_server import Faults, ReplayServer

# a fault's draw is fixed by the call and its attempt (``replay_server.fault_draw``), so one seed is one fixed set
# of faults: the same on every run, one sample of the ~18% mix. ``--fault-seeds`` measures over several.
DEFAULT_FAULT_SEED = 11
FAULTS = {"rate_429": 0.04, "rate_500": 0.04, "rate_malformed": 0.03, "rate_reset": 0.03, "rate_slow": 0.04}


def run_cell(
    history: History,
    queue: pl.DataFrame,
    plan: pl.DataFrame,
    predictions: pl.DataFrame,
    trained: artifacts.Trained,
    *,
    budget: float,
    rounds: int,
    fault_seed: int | None,
    planner_name: str,
    workdir: str,
    caps: bool = True,
) -> dict[str, object]:
    """One run; ``fault_seed`` None: fault-free, else the server's faults drawn with that seed."""
    faults = fault_seed is not None
    fault_set = Faults(**FAULTS, retry_after_s=0.01, slow_s=0.01, seed=fault_seed) if faults else Faults()
    storage = Storage()
    out = f"{workdir}/r{rounds}-f{fault_seed}"
    with ReplayServer(history, fault_set) as server:
        catalog = PriceCatalog.from_history(history.prices, history.outcomes)
        backend = get_backend("openai", base_url=server.base_url, catalog=catalog)
        retry = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)
        caps_used = trained.output_caps if caps else None
        execution = Execution(budget_usd=budget, out_uri=out, storage=storage, retry=retry, output_caps=caps_used)
        started = time.perf_counter()
        if rounds == 1:
            results = execute(
                plan,
                queue,
                backend,
                execution,
            )
            estimated = None
        else:
            planner = make_round_planner(planner_name, plan=plan, queue=queue, predictions=predictions, trained=trained)
            outcome = execute_rounds(
                plan,
                queue,
                predictions,
                backend,
                planner,
                execution,
                rounds=rounds,
            )
            results, estimated = outcome.results, outcome.estimated_accuracy
        seconds = time.perf_counter() - started
        stats = server.stats()
    correct = score_results(results, Truth.from_history(history))["correct"].fill_null(False)
    charged = float(results["cost_usd"].sum())
    return {
        "rounds": rounds,
        "faults": "off" if fault_seed is None else f"seed {fault_seed}",
        "accuracy": float(correct.mean()),
        "estimated": estimated,
        "deferred_pct": 100 * float((results["status"] == "deferred").mean()),
        "failed_pct": 100 * float((results["status"] == "failed").mean()),
        "charged_usd": charged,
        "billed_usd": float(stats["billed_usd"]),
        "budget_usd": budget,
        "within_budget": charged <= budget + 1e-12,
        "requests": int(stats["requests"]),
        "seconds": round(seconds, 1),
    }


def bench(
    name: str,
    history: History,
    fractions: list[float],
    rounds: int,
    planners: list[str],
    workdir: str,
    caps: bool = True,
    fault_seeds: tuple[int, ...] = (DEFAULT_FAULT_SEED,),
) -> list[dict]:
    queue = history.as_queue("test")
    trained = artifacts.train(history.split("train"), seed=get_settings().seed)
    catalog_backend = get_backend(
        "openai", base_url="http://127.0.0.1:9/v1", catalog=PriceCatalog.from_history(history.prices, history.outcomes)
    )
    predictions = predict(queue, trained.predictor, catalog_backend)
    candidates = build_candidates(queue, predictions, trained.templates)
    reference_cost, _ = best_single_cost(history, queue)
    rows = []
    for fraction in fractions:
        budget = fraction * reference_cost
        plan = plan_batch(candidates, PlanRequest(budget_usd=budget), trained.templates).plan
        for fault_seed in (None, *fault_seeds):
            for n, planner in [(1, "-"), *((rounds, p) for p in planners)]:
                cell = run_cell(
                    history,
                    queue,
                    plan,
                    predictions,
                    trained,
                    budget=budget,
                    rounds=n,
                    fault_seed=fault_seed,
                    planner_name=planner,
                    workdir=f"{workdir}/{name}-{fraction}-{planner}",
                    caps=caps,
                )
                head = {
                    "dataset": name,
                    "queries": queue.height,
                    "budget_pct": round(100 * fraction),
                    "planner": planner,
                }
                rows.append(head | cell)
    return rows


def print_table(rows: list[dict]) -> None:
    headers = [
        "dataset",
        "queries",
        "budget %",
        "planner",
        "rounds",
        "faults",
        "accuracy",
        "estimated",
        "deferred %",
        "failed %",
        "charged USD",
        "billed USD",
        "budget USD",
        "within",
        "s",
    ]
    keys = [
        "dataset",
        "queries",
        "budget_pct",
        "planner",
        "rounds",
        "faults",
        "accuracy",
        "estimated",
        "deferred_pct",
        "failed_pct",
        "charged_usd",
        "billed_usd",
        "budget_usd",
        "within_budget",
        "seconds",
    ]

    def fmt(key: str, value: object) -> str:
        if value is None:
            return "-"
        if key in {"accuracy", "estimated"}:
            return f"{100 * float(value):.1f}"  # type: ignore[arg-type]
        if key == "budget_pct":
            return str(value)
        if key.endswith("_pct"):
            return f"{float(value):.1f}"  # type: ignore[arg-type]
        if key.endswith("_usd"):
            return f"{float(value):.4f}"  # type: ignore[arg-type]
        return str(value)

    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(k, row[k]) for k in keys) + " |")


def print_fault_summary(rows: list[dict]) -> None:
    """Per data set, budget and planner over the fault seeds: the accuracy lost to faults against the same cell
    fault-free (mean and worst, points), the worst deferred share, and whether every seed met issue 14's bar."""
    frame = pl.DataFrame(rows)
    free = frame.filter(pl.col("faults") == "off").select("dataset", "budget_pct", "planner", "rounds",
                                                          pl.col("accuracy").alias("free"))  # fmt: skip
    hit = (
        frame.filter(pl.col("faults") != "off")
        .join(free, on=["dataset", "budget_pct", "planner", "rounds"])
        .with_columns((100 * (pl.col("accuracy") - pl.col("free"))).alias("lost"))
    )
    per = hit.group_by("dataset", "budget_pct", "planner", "rounds", maintain_order=True).agg(
        pl.len().alias("seeds"),
        pl.col("lost").mean().alias("lost_mean"),
        pl.col("lost").min().alias("lost_worst"),
        pl.col("deferred_pct").max().alias("deferred_worst"),
        ((pl.col("lost") >= -1.0) & (pl.col("deferred_pct") <= 1.0)).sum().alias("met"),
    )
    print(
        "| dataset | budget % | planner | rounds | fault seeds | faults - fault-free, mean | worst | deferred worst % | seeds meeting the bar |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in per.iter_rows(named=True):
        print(f"| {r['dataset']} | {r['budget_pct']} | {r['planner']} | {r['rounds']} | {r['seeds']} | "
              f"{r['lost_mean']:+.1f} | {r['lost_worst']:+.1f} | {r['deferred_worst']:.1f} | {r['met']}/{r['seeds']} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cascades,overruling,cascades_open")
    parser.add_argument("--fractions", default="0.3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-planners", default="plan,posterior", help="round planners to compare")
    parser.add_argument("--fault-seeds", default=str(DEFAULT_FAULT_SEED),
                        help="the fault server's seeds, one run with faults per seed (comma-separated)")  # fmt: skip
    parser.add_argument(
        "--no-output-caps",
        action="store_true",
        help="send the flat max_tokens 1024 on open tasks instead of the learned per (task, LLM) caps",
    )
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    data = Path(get_settings().data_dir)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.datasets.split(","):
            history = with_holdout(load_history([str(data / name)]))
            fractions = [float(f) for f in args.fractions.split(",")]
            planners = args.round_planners.split(",")
            rows += bench(name, history, fractions, args.rounds, planners, workdir, caps=not args.no_output_caps,
                          fault_seeds=tuple(int(s) for s in args.fault_seeds.split(",")))  # fmt: skip
    print_table(rows)
    print()
    print_fault_summary(rows)
    return 0 if all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
