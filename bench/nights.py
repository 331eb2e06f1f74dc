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

``--drift LLM=OTHER`` (or ``LLM:-0.2``, repeatable): a provider silently changed an LLM from night 1 on: the test
server answers its calls from a degraded source (``replay_server.Drift``: OTHER's recorded answers to the same
queries, at the LLM's own price), while the training history still says it is good. Nothing tells batchplan
(no gold: only its audits, the late labels and the drift detection); the bench scores every arm against what
the server really answered. The ``drifted calls`` column is the share of each arm's delivered calls (audited /
never learned / explore) that went to a drifted LLM: what the never-learned arm keeps paying for; ``drift`` and
``drift explore`` are the audited and explore arms' reports' drift warnings (audits' and, with ``(labels)``, the
live labels' of past nights: ``plans.audit.label_drift``).

Per night, three runs at the same budget (``--budget-fraction`` of the night's best single model cost):

- ``audited``: retrained on its labels and its audits' silver, audits on (the run under test):
  ``--audit-share`` of the queries, capped at ``--audit-spend-share`` of the budget (the live default),
  audited queries delivered their reference where it is the likelier right answer;
- ``no_audit``: retrained on its own labels, no audits (do audits pay for themselves?);
- ``never learned``: the predictor trained once on the history, no audits;
- ``explore`` (``--explore-share`` > 0, default 0.05): the audited arm plus exploration, at most that share of
  the budget on calls of the LLMs the audit's reference does not call, on the audit sample's queries, so late
  labels and silver reach LLMs the plan never calls. With ``--label-pick explored`` (the default) the users
  label the first queries of its audit sample (its report's ``audit.exploration.label_first``); that sample is
  uniform, so every arm gets the same ids and for the others they are a random share;
- ``--oracle`` adds ``oracle_labels`` (its labels give every LLM's verdict on the labelled queries: exploring
  every LLM there, free) and ``oracle`` (retrained each night on every LLM's verdict on the whole stream but
  that night's queries: the ceiling of learning from the stream; nothing a run could know).

Columns: realized accuracy (scored by the bench), the audited estimate and its 95% interval (the run's own,
no gold), whether the interval covers the realized accuracy, the calibration error (ECE over the night's
calls) of the learned predictor and of the never-learned one, accuracy of the other two runs at the same
budget, and what the audits cost.

Each learning arm is its own deployment, through the product's paths: the labels that arrive are joined into
its run with ``join_labels`` (what ``batchplan label RUN_DIR FILE`` does; open tasks have no judge there, so
the bench hands their verdicts to the retrain as live gold rows), and it is retrained between nights as
``batchplan train --history TRAIN --from-run RUN ...`` does (``runs_history``: gold at weight 1, the audited
arm's own silver at ``SILVER_WEIGHT``), which fits the live drift correction (``predictors/live.py``) the next
night's plan uses. Per night the bench prints each arm's mean P(correct) per corrected (task, LLM) against
the stream's accuracy, and at the end a paired bootstrap (over queries within nights) of the accuracy gain at
the same budget. Training skips vote/cascade templates (``templates=False``) to keep the retrains in minutes.

    uv run python bench/nights.py [--streams cascades_open,cascades_shift] [--nights 10] [--night-size 150]
        [--audit-share 0.1] [--budget-fraction 0.5] [--explore-share 0.05] [--label-pick explored|random] [--oracle]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.app import artifacts, pipeline
from batchplan.app.labels import join_labels
from batchplan.app.outcomes import runs_history
from batchplan.app.pipeline import Job, calls_made, run_job
from batchplan.app.report import Truth, score_results
from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import GOLD, audited_query
from batchplan.core.history import History, combine_histories, load_history, stable_fold
from batchplan.core.request import LIVE_AUDIT_SPEND_SHARE
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.plans.audit import audited_ids
from batchplan.plans.best_single import best_single_llms
from batchplan.plans.planning import PlanRequest
from batchplan.predictors.metrics import ece
from tests.support.replay_server import Drift, ReplayServer, drifted_history

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


def verdict_history(full: History, run_dir: str, ids: list[str], storage: Storage) -> History:
    """Open tasks' labels (no label set, so ``batchplan label`` keeps them unscored: no judge): a labelling
    tool's verdict of each call the run made on ``ids``, as live gold rows (``label_source`` gold, weight 1),
    which the retrain treats as it treats a joined label."""
    called = calls_made(storage, run_dir).with_columns(audited_query())
    called = called.filter(pl.col("query_id").is_in(pl.Series(ids).implode())).select("query_id", "model").unique()
    return History(
        queries=full.queries.filter(pl.col("query_id").is_in(pl.Series(ids).implode())),
        outcomes=full.outcomes.join(called, on=["query_id", "model"], how="semi").with_columns(
            pl.lit(GOLD).alias("label_source"), pl.lit(1.0).alias("weight")
        ),
        prices=full.prices,
    )


def oracle_history(full: History, ids: list[str]) -> History:
    """The oracle arm's labels (``--oracle``): every LLM's verdict on the labelled queries, as live gold rows, as
    if each had been called on them at no cost: what exploring every LLM on the labelled queries could teach."""
    picked = pl.Series(ids, dtype=pl.String).implode()
    return History(
        queries=full.queries.filter(pl.col("query_id").is_in(picked)),
        outcomes=full.outcomes.filter(pl.col("query_id").is_in(picked)).with_columns(
            pl.lit(GOLD).alias("label_source"), pl.lit(1.0).alias("weight")
        ),
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


def calibration(trained: artifacts.Trained, queue: pl.DataFrame, calls: pl.DataFrame, full: History, catalog: PriceCatalog) -> float:
    """ECE of a predictor's P(correct) over the delivered calls of a night, against the recorded verdicts."""
    pairs = calls.filter(~pl.col("query_id").str.contains("#")).select("query_id", "model").unique()
    scored = pairs.join(full.outcomes.select("query_id", "model", "correct"), on=["query_id", "model"])
    predicted = trained.predictor.predict(queue, scored.select("query_id", "model"), catalog)
    joined = scored.join(predicted.select("query_id", "model", "p_correct"), on=["query_id", "model"])
    return float(ece(joined["correct"].cast(pl.Float64).to_numpy(), joined["p_correct"].to_numpy()))


@dataclass
class Arm:
    """One production deployment of the stream: its own runs, labels and retrains (``learns``: off for the
    never-learned predictor)."""

    name: str
    audit_share: float
    learns: bool
    model_uri: str
    trained: artifacts.Trained
    # of the budget, on calls of LLMs the audit's reference does not call; None: the product's default (on while
    # the labels show drift, ``plans.planning.choose_exploration``)
    explore_share: float | None = 0.0
    # --oracle: "labels", its labels say every LLM's verdict on the labelled queries (exploring every LLM there, free);
    # "stream", it learns from every LLM's verdict on the whole stream but tonight's queries (the ceiling)
    oracle: str = ""
    runs: list[str] = field(default_factory=list)  # its run dirs, as `batchplan train --from-run` reads them
    verdicts: list[History] = field(default_factory=list)  # open tasks' labels (no judge in `batchplan label`)


def retrain(arm: Arm, train: History, storage: Storage, seed: int) -> None:
    """What `batchplan train --history TRAIN --from-run RUN ...` does: the training history plus every
    labelled outcome of the arm's runs (gold from arrived labels, its own audits' silver weighted below)."""
    runs = runs_history(storage, arm.runs)
    arm.trained = artifacts.train(combine_histories([train, runs, *arm.verdicts]), seed=seed, templates=False)
    artifacts.save(arm.trained, storage, arm.model_uri)


def llm_lines(arms: list[Arm], queue: pl.DataFrame, full: History, stream_acc: pl.DataFrame, catalog: PriceCatalog) -> str:
    """Per (task, LLM) of the stream: each arm's mean P(correct) on tonight's queries against the stream's
    accuracy (bench-side scoring), for the LLMs the learned predictors corrected or the plans used most."""
    pairs = queue.select("query_id").join(pl.DataFrame({"model": full.models}), how="cross")
    tasks = queue.select("query_id", "task")
    means = None
    shown_arm = next((a for a in arms if a.explore_share), arms[0])  # the run whose labels reach every LLM
    for arm in arms:
        got = (
            arm.trained.predictor.predict(queue, pairs, catalog)
            .join(tasks, on="query_id")
            .group_by("task", "model")
            .agg(pl.col("p_correct").mean().alias(arm.name))
        )
        means = got if means is None else means.join(got, on=["task", "model"])
    assert means is not None
    live = shown_arm.trained.predictor.live.offsets.select("task", "model", "gold_rows", "live_acc")
    shown = means.join(stream_acc, on=["task", "model"]).join(live, on=["task", "model"], how="inner")
    return "; ".join(
        f"{r['task']}/{r['model']}: " + " ".join(f"{a.name} {r[a.name]:.2f}" for a in arms)
        + f" (stream {r['acc']:.2f}; {shown_arm.name}'s {r['gold_rows']} labels {r['live_acc']:.2f})"
        for r in shown.sort("task", "model").iter_rows(named=True)
    )


def run_stream(name: str, args: argparse.Namespace, data: Path, work: Path, storage: Storage) -> list[dict[str, Any]]:
    full, train, stream = streams(name, data, storage)
    drifts = [Drift.parse(d) for d in args.drift]
    # what the server really answers (the drifted LLMs degraded): what the bench scores against; ``full`` is what
    # batchplan's history says (its training history is a part of it)
    reality = drifted_history(full, drifts)
    truth = Truth.from_history(reality)
    catalog = PriceCatalog.from_history(full.prices, full.outcomes)
    prices = work / name / "models.csv"
    prices.parent.mkdir(parents=True, exist_ok=True)
    full.prices.write_csv(prices)
    seed = get_settings().seed
    rng = np.random.default_rng(seed)
    order = [stream[i] for i in rng.permutation(len(stream))]
    base = artifacts.train(train, seed=seed, templates=False)
    arms = [
        Arm("audited", args.audit_share, True, str(work / name / "audited_models"), base, None),  # the default
        Arm("no_audit", 0.0, True, str(work / name / "no_audit_models"), base, None),
        Arm("never", 0.0, False, str(work / name / "never_models"), base),
    ]
    if args.explore_share > 0:
        arms.append(Arm("explore", args.audit_share, True, str(work / name / "explore_models"), base, args.explore_share))
    if args.fixed:  # the default before exploration turned itself on at drift: audits, never exploring
        arms.append(Arm("never_explore", args.audit_share, True, str(work / name / "never_explore_models"), base, 0.0))
    if args.oracle:
        arms.append(Arm("oracle_labels", 0.0, True, str(work / name / "oracle_labels_models"), base, oracle="labels"))
        arms.append(Arm("oracle", 0.0, False, str(work / name / "oracle_models"), base, oracle="stream"))
    for arm in arms:
        artifacts.save(base, storage, arm.model_uri)
    open_stream = bool(full.queries["labels"].is_null().all())
    stream_acc = (
        reality.outcomes.filter(pl.col("query_id").is_in(pl.Series(stream).implode()))
        .join(full.queries.select("query_id", "task"), on="query_id")
        .group_by("task", "model")
        .agg(pl.col("correct").cast(pl.Float64).mean().alias("acc"))
    )
    pending: dict[int, list[tuple[Arm, str, list[str]]]] = {}  # night the labels arrive -> (arm, run dir, ids)
    labelled: set[str] = set()
    rows: list[dict[str, Any]] = []
    with ReplayServer(full, drift=drifts) as server:
        for night in range(1, args.nights + 1):
            started = time.perf_counter()
            arrived = pending.pop(night, [])
            for arm, run_dir, ids in arrived:  # labels of an earlier night arrive: joined into that run
                gold = full.queries.filter(pl.col("query_id").is_in(pl.Series(ids).implode())).select("query_id", "gold")
                if arm.oracle == "labels":
                    arm.verdicts.append(oracle_history(reality, ids))
                elif open_stream:
                    arm.verdicts.append(verdict_history(reality, run_dir, ids, storage))
                else:
                    join_labels(storage, run_dir, gold, source_file=f"labels-night{night}")
                labelled |= set(ids)
            for arm in arms:  # retrain on what arrived: labels, and the audited arm's silver of last night
                if arm.learns and (arrived or (arm.audit_share > 0 and arm.runs)):
                    retrain(arm, train, storage, seed)
            ids = tonight(order, night, args.night_size, labelled, rng)
            for arm in arms:  # the ceiling: every LLM's verdict on the stream, tonight's queries apart
                if arm.oracle == "stream":
                    seen = oracle_history(reality, [q for q in stream if q not in set(ids)])
                    arm.trained = artifacts.train(combine_histories([train, seen]), seed=seed, templates=False)
                    artifacts.save(arm.trained, storage, arm.model_uri)
            queue_path = work / name / f"night{night}.parquet"
            queue = full.as_queue().filter(pl.col("query_id").is_in(pl.Series(ids).implode()))
            queue.write_parquet(queue_path)
            budget = args.budget_fraction * best_single_cost(full, train, ids)
            outcomes: dict[str, Any] = {}
            # which queries the users label: a random share, or (``explored``) the first of the one audit sample
            # every audited arm draws, where each arm that explores (the explore arm, the default once it turns
            # exploration on) asks for labels first (audit.exploration.label_first); the sample is uniform, so for
            # the arms that do not explore the same ids are a random share as well
            sample_seed = f"{name}-night{night}-explore"
            label_ids = (
                audited_ids(ids, args.label_share, sample_seed)
                if args.label_pick == "explored"
                else audited_ids(ids, args.label_share, f"labels-{name}-{night}")
            )
            for arm in arms:
                out = str(work / name / f"night{night}" / arm.name)
                job = Job(
                    queue_uri=str(queue_path),
                    predictors_uri=arm.model_uri,
                    out_uri=out,
                    request=PlanRequest(
                        budget_usd=budget,
                        allow_deferral=True,
                        audit_share=arm.audit_share,
                        audit_spend_share=args.audit_spend_share
                        if arm.audit_share > 0 and args.audit_spend_share < 1
                        else None,
                        explore_share=arm.explore_share,
                        audit_seed=sample_seed if arm.audit_share > 0 else "",
                    ),
                    backend="openai",
                    base_url=server.base_url,
                    prices_uri=str(prices),
                    run_id=f"{name}-night{night}-{arm.name}",
                )
                outcome = run_job(job, storage)  # no truth: the run sees answers only
                outcomes[arm.name] = outcome
                if arm.learns:
                    arm.runs.append(out)
                    pending.setdefault(night + args.label_delay, []).append((arm, out, label_ids))
            report = outcomes["audited"].report
            out = str(work / name / f"night{night}" / "audited")
            scored = {a: per_query(outcomes[a].results, truth) for a in outcomes}
            accuracy = share(scored["audited"]["correct"])
            ci = report.get("estimated_accuracy_ci95") or [float("nan"), float("nan")]
            calls = calls_made(storage, out)
            audited_p, never_p = arms[0].trained, arms[2].trained
            rows.append(
                {
                    "stream": name,
                    "night": night,
                    "labels in": len(labelled),
                    "realized": accuracy,
                    "audited est": report.get("estimated_accuracy"),
                    "ci low": ci[0],
                    "ci high": ci[1],
                    "covered": bool(ci[0] <= accuracy <= ci[1]),
                    "planned": report["planned_accuracy"],
                    "ECE learned": calibration(audited_p, queue, calls, reality, catalog),
                    "ECE never": calibration(never_p, queue, calls, reality, catalog),
                    "deferred": report["status"]["deferred"],
                    "acc no audit": share(scored["no_audit"]["correct"]),
                    "acc never learned": share(scored["never"]["correct"]),
                    "moved": moved(outcomes["audited"].plan, outcomes["never"].plan),
                    "drifted calls": "/".join(
                        f"{drifted_share(calls_made(storage, str(work / name / f'night{night}' / a)), drifts):.2f}"
                        for a in ("audited", "never", *(["explore"] if "explore" in outcomes else []))
                    )
                    if drifts
                    else None,
                    "by task": by_task(scored, queue),
                    "budget USD": budget,
                    "spend USD": report["spent_usd"],
                    "audit USD": (report.get("audit") or {}).get("spent_usd", 0.0),
                    "audits": (report.get("audit") or {}).get("audited", 0),
                    "refs delivered": (report.get("audit") or {}).get("delivered_references", 0),
                    "drift": drift_cell(report),
                    "explore on": (report.get("exploration") or {}).get("source", ""),  # the default's own decision
                    "audited explore USD": ((report.get("audit") or {}).get("exploration") or {}).get("spent_usd", 0.0),
                    "seconds": round(time.perf_counter() - started, 1),
                    "_scored": scored,
                    **explore_columns(arms, outcomes, scored, queue, calls_of=lambda a, night=night: calls_made(storage, str(work / name / f"night{night}" / a)), full=reality, catalog=catalog),
                }
            )
            print(_table(rows[-1:], header=night == 1), flush=True)
            if lines := llm_lines(arms, queue, reality, stream_acc, catalog):
                print(f"  night {night} P(correct) by (task, LLM), corrected ones: {lines}", flush=True)
    silver = runs_history(storage, arms[0].runs).outcomes.filter(pl.col("label_source") == "silver")
    checked = silver.join(reality.outcomes.select("query_id", "model", pl.col("correct").alias("_truth")), on=["query_id", "model"])
    print(
        f"\n{name}: the audited arm's silver verdicts: {checked.height} (query, LLM) rows, mean silver "
        f"{share(checked['correct']):.2f} vs their true accuracy {share(checked['_truth']):.2f}, agreeing on "
        f"{share(checked['correct'] == checked['_truth']):.2f} (bench-side check)",
        flush=True,
    )
    return rows


def explore_columns(
    arms: list[Arm], outcomes: dict[str, Any], scored: dict[str, pl.DataFrame], queue: pl.DataFrame, *, calls_of: Any, full: History, catalog: PriceCatalog
) -> dict[str, Any]:
    """The explore and oracle arms' columns (none without them): accuracy, what exploring cost, calibration."""
    out: dict[str, Any] = {}
    for arm in arms:
        if arm.explore_share:
            report = outcomes[arm.name].report
            explored = (report.get("audit") or {}).get("exploration") or {}
            out |= {
                "acc explore": share(scored[arm.name]["correct"]),
                "explored": explored.get("queries", 0),
                "explore calls": explored.get("calls", 0),
                "explore USD": explored.get("spent_usd", 0.0),
                "spend explore USD": report["spent_usd"],
                "ECE explore": calibration(arm.trained, queue, calls_of(arm.name), full, catalog),
                "moved explore": moved(outcomes[arm.name].plan, outcomes["never"].plan),
                "drift explore": drift_cell(report),
            }
        if arm.name == "never_explore":  # --fixed: the audited arm's before
            out["acc never_explore"] = share(scored[arm.name]["correct"])
        if arm.oracle:
            out |= {
                f"acc {arm.name}": share(scored[arm.name]["correct"]),
                f"moved {arm.name}": moved(outcomes[arm.name].plan, outcomes["never"].plan),
            }
    return out


def drift_cell(report: dict[str, Any]) -> str:
    """A run's drift warnings, short: kind, name (the task of a labels' one), direction, source."""
    return "; ".join(
        f"{d['kind']} {d['name']}{' on ' + d['task'] if d.get('task') else ''} {d['direction']}"
        + (" (labels)" if d.get("source") == "labels" else "")
        for d in report.get("drift") or []
    )


def drifted_share(calls: pl.DataFrame, drifts: list[Drift]) -> float:
    """Share of a run's plan calls (audit calls apart) that went to a drifted LLM."""
    plan = calls.filter(~pl.col("query_id").str.contains("#"))
    return share(plan["model"].is_in(pl.Series([d.model for d in drifts], dtype=pl.String).implode()))


def per_query(results: pl.DataFrame, truth: Truth) -> pl.DataFrame:
    """query_id, correct (a deferred or failed query counts wrong), as the bench scores a run."""
    return score_results(results, truth).select("query_id", pl.col("correct").fill_null(False)).sort("query_id")


def share(flags: pl.Series) -> float:
    """Mean of a boolean column (0 when empty)."""
    return float(flags.cast(pl.Float64).to_numpy().mean()) if flags.len() else 0.0


def by_task(scored: dict[str, pl.DataFrame], queue: pl.DataFrame) -> str:
    """Each arm's accuracy per task on the night, audited / no audit / never."""
    tasks = queue.select("query_id", "task")
    acc = {a: s.join(tasks, on="query_id").group_by("task").agg(pl.col("correct").mean()) for a, s in scored.items()}
    return " ".join(
        f"{t} " + "/".join(f"{dict(acc[a].iter_rows())[t]:.2f}" for a in scored) for t in sorted(tasks["task"].unique())
    )


def moved(plan: pl.DataFrame, other: pl.DataFrame) -> float:
    """Share of the queries whose delivered plan (kind and LLMs) differs between two runs' plans."""
    key = [pl.col("kind"), pl.col("models").list.join("+")]
    a = plan.select("query_id", pl.concat_str(key, separator=":").alias("a"))
    b = other.select("query_id", pl.concat_str(key, separator=":").alias("b"))
    joined = a.join(b, on="query_id")
    return share(joined["a"] != joined["b"])


def paired_gain(rows: list[dict[str, Any]], arm: str, against: str, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy gain of ``arm`` over ``against`` on the nights ``rows`` (the same queries, so paired),
    with a 95% interval from a bootstrap over queries within each night (stratified by night)."""
    diffs = [
        r["_scored"][arm].join(r["_scored"][against], on="query_id", suffix="_b")
        .select((pl.col("correct").cast(pl.Float64) - pl.col("correct_b").cast(pl.Float64)).alias("d"))["d"].to_numpy()
        for r in rows
    ]
    total = sum(len(d) for d in diffs)
    rng = np.random.default_rng(seed)
    boot = np.zeros(draws)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(draws, len(d)))].sum(axis=1)
    boot /= total
    point = float(sum(d.sum() for d in diffs) / total)
    return point, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


COLUMNS = [
    "night", "labels in", "realized", "audited est", "ci low", "ci high", "covered", "planned", "ECE learned",
    "ECE never", "deferred", "acc no audit", "acc never learned", "moved", "budget USD", "spend USD", "audit USD",
    "audits", "refs delivered", "seconds", "by task", "drift", "drifted calls", "explore on", "audited explore USD",
]  # fmt: skip
# the explore and oracle arms' columns, shown when the run has them
EXTRA_COLUMNS = [
    "acc explore", "explored", "explore calls", "explore USD", "spend explore USD", "ECE explore", "moved explore",
    "drift explore",
    "acc oracle_labels", "moved oracle_labels", "acc oracle", "moved oracle", "acc never_explore",
]  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 0.01 or value > 1.5 else f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]], header: bool = True) -> str:
    columns = COLUMNS + [c for c in EXTRA_COLUMNS if any(c in r for r in rows)]
    lines = []
    if header:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
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
    parser.add_argument(
        "--explore-share",
        type=float,
        default=0.05,
        help="the explore arm: audits as the audited arm's, plus this share of the budget on calls of the LLMs the "
        "audit's reference does not call (0: no explore arm)",
    )
    parser.add_argument(
        "--fixed",
        action="store_true",
        help="add the never_explore arm: the audited arm with --explore-share 0 given (the default before the "
        "automatic exploration: audits, never exploring), the audited arm's before",
    )
    parser.add_argument(
        "--label-pick",
        choices=("explored", "random"),
        default="explored",
        help="which queries get labels: the first of the explore arm's audit sample (its report's label_first; "
        "uniform, so a random share for every other arm), or a random share of its own",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="add two oracle arms: oracle_labels, whose labels give every LLM's verdict on the labelled queries "
        "(exploring every LLM there, at no cost), and oracle, retrained each night on every LLM's verdict on the "
        "whole stream but that night's queries (the ceiling of learning from the stream)",
    )
    parser.add_argument(
        "--drift",
        action="append",
        default=[],
        help="LLM=OTHER or LLM:-0.2 (repeatable): the test server answers LLM from a degraded source from night 1 "
        "on (OTHER's recorded answers, or that much accuracy lost) while the history says it is good",
    )
    parser.add_argument("--work", default=None, help="keep the runs in this directory (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        for spec in args.drift:
            Drift.parse(spec)
    except ValueError as exc:
        parser.error(str(exc))
    # The report's frontier chart re-solves each run at a dozen budgets (~20 s a night here): not what this
    # bench measures, so its runs skip it (the run's plan, dispatch and report are otherwise the CLI's).
    pipeline.plan_frontier = lambda *_, **__: []  # type: ignore[assignment]
    logging.getLogger().setLevel(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    data = Path(get_settings().data_dir)
    storage = Storage()
    with tempfile.TemporaryDirectory(prefix="nights-") as scratch:
        tmp = args.work or scratch
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
                f"{np.mean([r['acc never learned'] for r in rows]):.3f}"
                + (f", explore {np.mean([r['acc explore'] for r in rows]):.3f}" if "acc explore" in rows[0] else "")
                + f" (mean over nights); night 1 audits cost {100 * (rows[0]['acc no audit'] - rows[0]['realized']):+.1f} pts"
                + (f" (explore {100 * (rows[0]['acc no audit'] - rows[0]['acc explore']):+.1f})" if "acc explore" in rows[0] else ""),
                flush=True,
            )
            learning = [r for r in rows if r["labels in"] > 0] or rows
            print(f"\nAccuracy gain at the same budget (paired bootstrap over queries within nights, 95%), {name}:\n")
            pairs = [("audited", "never"), ("no_audit", "never"), ("audited", "no_audit")]
            extra = (
                ("explore", "never"), ("explore", "audited"), ("explore", "no_audit"), ("never_explore", "never"),
                ("audited", "never_explore"), ("oracle_labels", "never"), ("oracle", "never"),
            )  # fmt: skip
            pairs += [(a, b) for a, b in extra if a in rows[0]["_scored"]]
            print("| nights | " + " | ".join(f"{a} - {b}".replace("_", " ") for a, b in pairs) + " |")
            print("|---|" + "---|" * len(pairs))
            for label, part in (
                ("all", rows),
                (f"{learning[0]['night']}-{rows[-1]['night']} (labels in)", learning),
                ("last 3", last),
            ):
                cells = [paired_gain(part, a, b) for a, b in pairs]
                print(f"| {label} | " + " | ".join(f"{100 * g:+.2f} pts [{100 * lo:+.2f}, {100 * hi:+.2f}]" for g, lo, hi in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
