"""The same nightly run sent in real time and through the Batch API, against the local servers that answer
from a recorded history: accuracy, what the run counted, what the provider billed, batch jobs, wall time.

The plan is the same in both modes (this bench prices nothing: the optimizer's pricing of modes is its own
bench); what it shows is the execution: the same answers, half the bill, the budget held, no job twice.

    uv run python bench/batch_api.py --data ../shared/data/cascades --fractions 0.3,0.6
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from batchplan.app import artifacts
from batchplan.app.demo import best_single_cost
from batchplan.app.pipeline import Job, run_job
from batchplan.app.report import Truth
from batchplan.core.history import load_history, with_holdout
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage, join
from batchplan.plans.planning import PlanRequest
from tests.support.batch_server import BatchFaults, BatchServer
from tests.support.replay_server import ReplayServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/cascades", help="one history directory (with models.csv)")
    parser.add_argument("--fractions", default="0.3,0.6", help="budgets as shares of the best single models' cost")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-planner", default="posterior")
    parser.add_argument("--run-s", type=float, default=0.2, help="the local batch server's processing time")
    args = parser.parse_args()
    os.environ["BATCHPLAN_BATCH_POLL_S"] = "0.05"
    get_settings.cache_clear()
    storage = Storage()
    history = with_holdout(load_history([args.data]), 0.3, 0)
    root = tempfile.mkdtemp(prefix="bench-batch-")
    queue = history.as_queue("test")
    queue_uri = join(root, "queue.parquet")
    storage.write_frame(queue, queue_uri)
    trained = artifacts.train(history.split("train"), predictor="lightgbm", seed=0)
    artifacts.save(trained, storage, join(root, "models"))
    reference_cost, reference = best_single_cost(history, queue)
    truth = Truth.from_history(history)
    print(f"{Path(args.data).name}: {queue.height} test queries, {args.rounds} {args.round_planner} rounds")
    print("| budget | mode | accuracy | counted $ | provider bill $ | bill / budget | batches | s |")
    print("|---|---|---|---|---|---|---|---|")
    for fraction in (float(f) for f in args.fractions.split(",")):
        budget = fraction * reference_cost
        for mode in ("realtime", "batch"):
            faults = BatchFaults(validate_s=0.0, run_s=args.run_s, finalize_s=0.0)
            server = BatchServer(history, faults) if mode == "batch" else ReplayServer(history)
            with server:
                job = Job(
                    queue_uri=queue_uri,
                    predictors_uri=join(root, "models"),
                    out_uri=join(root, f"run-{fraction}-{mode}"),
                    request=PlanRequest(budget_usd=budget),
                    backend="openai",
                    base_url=server.base_url,
                    prices_uri=join(args.data, "models.csv"),
                    reference_models=reference,
                    rounds=args.rounds,
                    round_planner=args.round_planner,
                    batch_api=mode == "batch",
                )
                started = time.perf_counter()
                report = run_job(job, storage, truth=truth).report
                seconds = time.perf_counter() - started
                stats = server.stats()
            batches = len(stats.get("batches", []))
            print(
                f"| {fraction:.0%} ${budget:.4f} | {mode} | {report['accuracy']:.3f} | {report['spent_usd']:.5f} "
                f"| {stats['billed_usd']:.5f} | {stats['billed_usd'] / budget:.2f} | {batches} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
