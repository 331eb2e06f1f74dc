"""Nights bench (issue 15): ten nightly batches in production, where nobody knows the right answers.

A stream of nightly batches is drawn from a data set's test split and answered by the project's live
``openai`` backend against the OpenAI-compatible test server (``tests/support/replay_server.py``, real HTTP
on 127.0.0.1), which answers from the history: batchplan sees answers, never gold (every run gets
``truth=None``; the bench scores the results afterwards). Audits are on; gold labels for ``--label-share`` of
each night's queries arrive ``--label-delay`` nights later (for the calls the run made on them: a labelling
tool's verdict of each answer), and the predictor is retrained between nights on the training history plus
every label that has arrived.

Streams: ``cascades_open`` (its own test split) and ``cascades_shift`` (cascades, whose MMLU/MedMCQA subjects
are split: whole subjects held out of training form the stream, so the history is off for them).

Per night, three runs at the same budget (``--budget-fraction`` of the night's best single model cost):

- ``learned+audits``: the retrained predictor, audits on (the run under test): ``--audit-share`` of the
  queries, capped at ``--audit-spend-share`` of the budget (the live default), audited queries delivered
  their reference where it is the likelier right answer;
- ``learned, no audits``: the same predictor, no audits (do audits pay for themselves?);
- ``never learned``: the predictor trained once on the history, no audits.

Columns: realized accuracy (scored by the bench), the audited estimate and its 95% interval (the run's own,
no gold), whether the interval covers the realized accuracy, the calibration error (ECE over the night's
calls) of the learned predictor and of the never-learned one, accuracy of the other two runs at the same
budget, and what the audits cost.

What it uses on this branch: labels are joined by the bench itself into an extra history (``queries.parquet``
+ ``outcomes.parquet`` of the labelled queries' calls), and retraining is ``artifacts.train`` on the history
plus that. Once ``batchplan label RUN_DIR FILE`` and ``batchplan train --from-run`` are merged (h15a), the
labels go through the label join and the retrain reads the runs (gold weighted over the audits' silver).
Training skips vote/cascade templates (``templates=False``) to keep ten retrains in minutes: the open
stream has no label set, so it has none anyway.

    uv run python bench/nights.py [--streams cascades_open,cascades_shift] [--nights 10] [--night-size 150]
        [--audit-share 0.1] [--budget-fraction 0.5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.app import artifacts, pipeline
from batchplan.app.pipeline import Job, calls_made, run_job
from batchplan.app.report import Truth, score_results
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import AUDIT_SUFFIX
from batchplan.core.history import History, load_history, stable_fold
from batchplan.core.request import LIVE_AUDIT_SPEND_SHARE
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.plans.audit import audited_ids
from batchplan.plans.best_single import best_single_llms
from batchplan.plans.planning import PlanRequest
from batchplan.predictors.metrics import ece
from tests.support.replay_server import ReplayServer

SHIFT_HELD_OUT = 0.5  # share of cascades' subjects held out of training in the shifted stream


def streams(name: str, data: Path, storage: Storage) -> tuple[History, History, list[str]]:
    """(full history the server answers from, training history, the stream's query ids in a fixed order)."""
    if name == "cascades_open":
        full = load_history([str(data / "cascades_open")], storage)
        stream = full.queries.filter(pl.col("split") == "test")["query_id"].to_list()
        return full, full.split("train"), stream
    if name == "cascades_shift":
        full = load_history([str(data / "cascades")], storage)
        subjects = sorted({s for s in full.queries["subject"].to_list() if s is not None})
        held = {s for s, f in zip(subjects, stable_fold(subjects, 1000, 0), strict=True) if f < SHIFT_HELD_OUT * 1000}
        is_held = pl.col("subject").is_in(pl.Series(sorted(held), dtype=pl.String).implode())
        stream = full.queries.filter(is_held)["query_id"].to_list()
        train = full.queries.filter(~is_held)["query_id"].to_list()
        return full, full.subset(train), stream
    raise SystemExit(f"unknown stream {name!r}: cascades_open or cascades_shift")


def best_single_cost(full: History, train: History, ids: list[str]) -> float:
    """What sending the night to each task's best single LLM (on the training history) would cost."""
    best = best_single_llms(train.outcomes.join(train.queries.select("query_id", "task"), on="query_id"))
    night = full.queries.filter(pl.col("query_id").is_in(pl.Series(ids).implode())).select("query_id", "task")
    pairs = night.join(best.select("task", "model"), on="task")
    return float(full.outcomes.join(pairs, on=["query_id", "model"])["cost_usd"].sum())


def labelled_history(full: History, run_dir: str, ids: list[str], storage: Storage) -> History:
    """The labels that arrive for ``ids`` of a past run: the calls it made on them, each with its verdict."""
    called = calls_made(storage, run_dir).with_columns(pl.col("query_id").str.strip_suffix(AUDIT_SUFFIX))
    called = called.filter(pl.col("query_id").is_in(pl.Series(ids).implode())).select("query_id", "model").unique()
    return History(
        queries=full.queries.filter(pl.col("query_id").is_in(pl.Series(ids).implode())),
        outcomes=full.outcomes.join(called, on=["query_id", "model"], how="semi"),
        prices=full.prices,
    )


def tonight(order: list[str], night: int, size: int, labelled: set[str], rng: np.random.Generator) -> list[str]:
    """The night's queries: the stream's next ``size`` where it is long enough (cascades_open's test split);
    else (the held-out subjects of cascades) a fresh draw from it, never a query whose label has arrived, so
    no gold a retrain saw is asked again."""
    if len(order) >= night * size:
        return order[(night - 1) * size : night * size]
    pool = [q for q in order if q not in labelled]
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(size, len(pool)), replace=False))]


def combine(base: History, extra: list[History]) -> History:
    if not extra:
        return base
    queries = pl.concat([base.queries, *(e.queries for e in extra)]).unique("query_id", keep="first")
    outcomes = pl.concat([base.outcomes, *(e.outcomes for e in extra)]).unique(["query_id", "model"], keep="first")
    return History(queries=queries, outcomes=outcomes, prices=base.prices)


def realized(results: pl.DataFrame, truth: Truth) -> float:
    return float(score_results(results, truth)["correct"].fill_null(False).mean())


def calibration(trained: artifacts.Trained, queue: pl.DataFrame, calls: pl.DataFrame, full: History, catalog: PriceCatalog) -> float:
    """ECE of a predictor's P(correct) over the delivered calls of a night, against the recorded verdicts."""
    pairs = calls.filter(~pl.col("query_id").str.contains("#")).select("query_id", "model").unique()
    scored = pairs.join(full.outcomes.select("query_id", "model", "correct"), on=["query_id", "model"])
    predicted = trained.predictor.predict(queue, scored.select("query_id", "model"), catalog)
    joined = scored.join(predicted.select("query_id", "model", "p_correct"), on=["query_id", "model"])
    return float(ece(joined["correct"].cast(pl.Float64).to_numpy(), joined["p_correct"].to_numpy()))


def run_stream(name: str, args: argparse.Namespace, data: Path, work: Path, storage: Storage) -> list[dict[str, Any]]:
    full, train, stream = streams(name, data, storage)
    truth = Truth.from_history(full)
    catalog = PriceCatalog.from_history(full.prices, full.outcomes)
    prices = work / name / "models.csv"
    prices.parent.mkdir(parents=True, exist_ok=True)
    catalog_frame = full.prices
    catalog_frame.write_csv(prices)
    seed = get_settings().seed
    rng = np.random.default_rng(seed)
    order = [stream[i] for i in rng.permutation(len(stream))]
    base = artifacts.train(train, seed=seed, templates=False)
    base_uri = str(work / name / "never_learned")
    artifacts.save(base, storage, base_uri)
    learned, learned_uri = base, str(work / name / "learned")
    artifacts.save(base, storage, learned_uri)
    arrived: list[History] = []
    pending: dict[int, tuple[str, list[str]]] = {}  # night the labels arrive -> (run dir, query ids)
    rows: list[dict[str, Any]] = []
    with ReplayServer(full) as server:
        for night in range(1, args.nights + 1):
            started = time.perf_counter()
            if night in pending:  # labels of an earlier night arrive: retrain on them before tonight
                run_dir, ids = pending.pop(night)
                arrived.append(labelled_history(full, run_dir, ids, storage))
                learned = artifacts.train(combine(train, arrived), seed=seed, templates=False)
                artifacts.save(learned, storage, learned_uri)
            ids = tonight(order, night, args.night_size, {q for h in arrived for q in h.queries["query_id"]}, rng)
            queue_path = work / name / f"night{night}.parquet"
            queue = full.as_queue().filter(pl.col("query_id").is_in(pl.Series(ids).implode()))
            queue.write_parquet(queue_path)
            budget = args.budget_fraction * best_single_cost(full, train, ids)
            outcomes: dict[str, Any] = {}
            for arm, model_uri, share in (
                ("audited", learned_uri, args.audit_share),
                ("no_audit", learned_uri, 0.0),
                ("never", base_uri, 0.0),
            ):
                out = str(work / name / f"night{night}" / arm)
                job = Job(
                    queue_uri=str(queue_path),
                    predictors_uri=model_uri,
                    out_uri=out,
                    request=PlanRequest(
                        budget_usd=budget,
                        allow_deferral=True,
                        audit_share=share,
                        audit_spend_share=args.audit_spend_share if share > 0 and args.audit_spend_share < 1 else None,
                    ),
                    backend="openai",
                    base_url=server.base_url,
                    prices_uri=str(prices),
                    run_id=f"{name}-night{night}-{arm}",
                )
                outcome = run_job(job, storage)  # no truth: the run sees answers only
                outcomes[arm] = (outcome, out)
            report, out = outcomes["audited"][0].report, outcomes["audited"][1]
            accuracy = realized(outcomes["audited"][0].results, truth)
            ci = report.get("estimated_accuracy_ci95") or [float("nan"), float("nan")]
            calls = calls_made(storage, out)
            label_ids = audited_ids(ids, args.label_share, f"labels-{name}-{night}")
            pending[night + args.label_delay] = (out, label_ids)
            rows.append(
                {
                    "stream": name,
                    "night": night,
                    "labels in": sum(h.queries.height for h in arrived),
                    "realized": accuracy,
                    "audited est": report.get("estimated_accuracy"),
                    "ci low": ci[0],
                    "ci high": ci[1],
                    "covered": bool(ci[0] <= accuracy <= ci[1]),
                    "planned": report["planned_accuracy"],
                    "ECE learned": calibration(learned, queue, calls, full, catalog),
                    "ECE never": calibration(base, queue, calls, full, catalog),
                    "deferred": outcomes["audited"][0].report["status"]["deferred"],
                    "acc no audit": realized(outcomes["no_audit"][0].results, truth),
                    "deferred no audit": outcomes["no_audit"][0].report["status"]["deferred"],
                    "acc never learned": realized(outcomes["never"][0].results, truth),
                    "budget USD": budget,
                    "spend USD": report["spent_usd"],
                    "audit USD": (report.get("audit") or {}).get("spent_usd", 0.0),
                    "audits": (report.get("audit") or {}).get("audited", 0),
                    "refs delivered": (report.get("audit") or {}).get("delivered_references", 0),
                    "drift": "; ".join(f"{d['kind']} {d['name']} {d['direction']}" for d in report.get("drift") or []),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(_table(rows[-1:], header=night == 1), flush=True)
    return rows


COLUMNS = [
    "night", "labels in", "realized", "audited est", "ci low", "ci high", "covered", "planned", "ECE learned",
    "ECE never", "deferred", "acc no audit", "deferred no audit", "acc never learned", "budget USD", "spend USD", "audit USD", "audits", "refs delivered", "seconds", "drift",
]  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 0.01 or value > 1.5 else f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="cascades_open,cascades_shift")
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--night-size", type=int, default=150)
    parser.add_argument("--audit-share", type=float, default=0.1)
    parser.add_argument(
        "--audit-spend-share",
        type=float,
        default=LIVE_AUDIT_SPEND_SHARE,
        help="cap the audits at this share of the budget (the live default); 1 or more: no cap",
    )
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--label-share", type=float, default=0.05)
    parser.add_argument("--label-delay", type=int, default=2)
    args = parser.parse_args(argv)
    # The report's frontier chart re-solves each run at a dozen budgets (~20 s a night here): not what this
    # bench measures, so its runs skip it (the run's plan, dispatch and report are otherwise the CLI's).
    pipeline.plan_frontier = lambda *_, **__: []  # type: ignore[assignment]
    logging.getLogger().setLevel(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    data = Path(get_settings().data_dir)
    storage = Storage()
    with tempfile.TemporaryDirectory(prefix="nights-") as tmp:
        for name in args.streams.split(","):
            print(f"\n## {name}: {args.nights} nights x {args.night_size} queries, audit share {args.audit_share}, "
                  f"labels {args.label_share:.0%} after {args.label_delay} nights, budget {args.budget_fraction} x "
                  "best single model\n", flush=True)  # fmt: skip
            rows = run_stream(name, args, data, Path(tmp), storage)
            covered = sum(r["covered"] for r in rows)
            last = rows[-3:]
            print(
                f"\n{name}: covered {covered}/{len(rows)} nights; last 3 nights ECE learned "
                f"{np.mean([r['ECE learned'] for r in last]):.3f} vs never {np.mean([r['ECE never'] for r in last]):.3f}; "
                f"accuracy with audits {np.mean([r['realized'] for r in rows]):.3f}, without "
                f"{np.mean([r['acc no audit'] for r in rows]):.3f}, never learned "
                f"{np.mean([r['acc never learned'] for r in rows]):.3f} (mean over nights); night 1 audits cost "
                f"{100 * (rows[0]['acc no audit'] - rows[0]['realized']):+.1f} pts",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
