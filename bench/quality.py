"""Quality benchmark: accuracy and realized spend at budgets relative to the best single model.

For each data set in the data dir (``BATCHPLAN_DATA_DIR``, default ../shared/data): train the predictor on
the train split, then plan and replay the test split at budgets of 10-100% of the best single model's cost (best =
highest train accuracy; its cost measured on the test queries). Prints batchplan's accuracy and realized
spend, with single-model plans only and with votes and cascades allowed, beside the baselines at the same
budget (cheapest model, random assignment, the oracle) and the best single model at its own cost. Realized
spend must never pass the budget: ``within_budget`` checks it in every cell.

A data set without a test split (``cascades``) is cross-validated on its train split: 5 folds by a stable
query_id hash, each in turn the test split of a model trained on the other four; every budget is a share of
the best single model's cost on that fold, and each row pools the folds (all 585 queries planned and replayed
once; budgets and spends summed). One 30% hold-out would be ~170 queries, where one query moves accuracy
0.6 points: ``--cv-folds 0`` gives that instead.

Beside the realized rows, a hindsight ceiling (``hindsight_*``): the best accuracy any mix of per-task uniform
plans reaches on the test queries when chosen with their outcomes known, single models only and with votes
and cascades (an LP: each task splits its queries among plans). Nothing that picks plans per task can beat
it; only per-query routing can, so the gap between its two columns bounds what votes and cascades add
unless the predictor tells queries apart. A cross-validated data set gets one ceiling over all its folds' queries.
``gain_pts_95%``: the accuracy gain of votes and cascades over single-model plans, with a 95% paired-bootstrap
interval over the queries (one query is 0.1-0.2 points here: most differences are inside it).

``rounds``: what ``batchplan run`` does by default: ``--rounds`` rounds (default ``DEFAULT_RUN_ROUNDS``) of the
default round planner (``DEFAULT_ROUND_PLANNER``, ``batchplan.plans.per_task``) over the single-shot plan with
votes and cascades and the trained posterior, simulated on the recorded outcomes by
``round_replay.simulate_rounds`` (as the replay backend answers), with its gain over that single-shot plan
(``rounds_gain_pts_95%``, paired bootstrap) and the accuracy it estimates without gold (``rounds_estimated``)
beside the single-shot plan's planned accuracy (``all_planned``): the honest-estimate check. ``posterior``:
the same rounds of the posterior planner alone (``--round-planner posterior``), with its gain
(``posterior_gain_pts_95%``); ``--rounds-sweep`` sweeps its round count.

``cascades_shifted`` (built from ``cascades`` when it is benched): whole subjects held out per task
(``subject_holdout``: about a third of each task's queries, subjects chosen by a stable hash), trained on the
rest. The batch is not the history: the setting rounds are for. By default one hold-out (the settings' seed,
~230 queries: too few for a clear interval); ``--shift-seeds 0,1,2,3`` benches one hold-out per seed of the
subject order (each trained on the rest of ``cascades``) and pools them: each row's accuracies are over all the
hold-outs' queries (a query held out by several seeds counts once per hold-out), and every gain's interval
resamples whole queries (all the rows of a query_id together), since the hold-outs share many of their
queries. Each hold-out's hindsight ceiling is its own (each is a batch of its own), pooled by its queries.

The ceilings of run-time cascades (2-/3-stage logprob cascades and votes chosen with the test split's gold,
uniform and per task) are printed by ``bench/ceiling.py``: unreachable upper bounds for the rounds column.

AIQ (RouterBench's average improvement in quality, here over the budget grid): the area under accuracy vs
budget (as a share of the best single model's cost) by the trapezoid rule, divided by the grid's width.

    uv run python bench/quality.py [--datasets routerbench,cascades] [--no-shifted] [--fractions 0.1,0.2] [--json out.json]
    uv run python bench/quality.py --datasets cascades_shifted --shift-seeds 0,1,2,3 --fractions 0.2,0.3,0.5

Which data sets: every one found (``--datasets``: the named ones); wherever ``cascades`` is benched,
``cascades_shifted`` too unless ``--no-shifted``; ``--datasets cascades_shifted``: the shifted split alone.
A name that is not a data set here, or ``--no-shifted`` beside ``cascades_shifted``, is refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import structlog
from scipy.optimize import linprog

from batchplan.app import artifacts
from batchplan.app.demo import best_single_cost
from batchplan.app.pipeline import Execution, build_candidates, execute, predict
from batchplan.app.report import Truth, baseline_policies, score_results
from batchplan.app.round_replay import simulate_rounds
from batchplan.app.round_runner import make_round_planner
from batchplan.core.history import History, cross_validation_fold, load_history, stable_fold, with_holdout
from batchplan.core.request import DEFAULT_ROUND_PLANNER, DEFAULT_RUN_ROUNDS
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.dispatchers import get_backend
from batchplan.plans.infeasible import RequestInfeasible
from batchplan.plans.planning import PlanRequest, plan_batch
from batchplan.plans.round_planner import round_planner
from batchplan.plans.simulation import PlanSpec, recorded_by_task, simulate
from batchplan.plans.templates import enumerate_specs

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
CV_FOLDS = 5
SHIFTED = "_shifted"  # the suffix of a split built from a data set by subject_holdout
SHIFTS = ("cascades",)  # the data sets benched shifted too


def bench_jobs(found: list[Path], datasets: str | None, no_shifted: bool) -> list[tuple[Path, bool]]:
    """(data set directory, shifted) for each split to bench, in ``found``'s order (the module docstring says
    which). Raises ValueError naming what cannot be benched, rather than quietly benching less."""
    by_name = {d.name: d for d in found}
    offered = [*by_name, *(f"{n}{SHIFTED}" for n in SHIFTS if n in by_name)]
    wanted = [w for w in (datasets or "").split(",") if w] or None
    if wanted is not None and (unknown := [w for w in wanted if w not in offered]):
        raise ValueError(f"--datasets: no data set {', '.join(unknown)} here; choose from {', '.join(offered)}")
    if no_shifted and wanted is not None and (both := [w for w in wanted if w.endswith(SHIFTED)]):
        raise ValueError(f"--no-shifted skips the shifted splits, but --datasets names {', '.join(both)}")
    jobs = []
    for name, directory in by_name.items():
        plain = wanted is None or name in wanted
        shifted = name in SHIFTS and (
            (wanted is not None and f"{name}{SHIFTED}" in wanted) or (plain and not no_shifted)
        )
        jobs += [(directory, False)] * plain + [(directory, True)] * shifted
    return jobs


def subject_holdout(history: History, fraction: float = 0.35, seed: int = 0) -> History:
    """A shifted split: per task, whole subjects (in the order of a stable hash of their names) go to the test
    split until it holds ``fraction`` of the task's queries; the rest is the train split."""
    queries = history.queries.with_columns(pl.col("subject").fill_null("<none>"))
    test: set[tuple[str, str]] = set()
    for (task,), group in queries.group_by("task", maintain_order=True):
        sizes = group.group_by("subject").len()
        rank = dict(zip(sizes["subject"], stable_fold(sizes["subject"], 2**32, seed, salt="subject:"), strict=True))
        order = sorted(sizes.iter_rows(), key=lambda r: rank[r[0]])
        held = 0
        for subject, size in order:
            if held >= fraction * group.height:
                break
            test.add((str(task), str(subject)))
            held += size
    marked = queries.with_columns(
        pl.when(
            pl.struct("task", "subject").map_elements(
                lambda r: (r["task"], r["subject"]) in test, return_dtype=pl.Boolean
            )
        )
        .then(pl.lit("test"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )
    return History(
        queries=marked.with_columns(history.queries["subject"]), outcomes=history.outcomes, prices=history.prices
    )


@dataclass(frozen=True)
class BenchSettings:
    """What every split of a bench run is benched with: the budgets (shares of the best single model's cost),
    the predictor, where replays write (``workdir``), the rounds and the round counts of ``sweep``."""

    fractions: tuple[float, ...]
    predictor_name: str
    storage: Storage
    workdir: str
    rounds: int = DEFAULT_RUN_ROUNDS
    sweep: tuple[int, ...] = ()


def bench_dataset(
    directory: Path,
    bench: BenchSettings,
    cv_folds: int = CV_FOLDS,
    shifted: bool = False,
    shift_seeds: tuple[int, ...] = (),
) -> list[dict]:
    """One row per budget. A data set without a test split is cross-validated: ``cv_folds`` hash folds of its
    train split each take a turn as the test split, and the rows pool all folds (every query planned and
    replayed once, by a model that never saw it); ``cv_folds=0`` holds out ``holdout_fraction`` once.
    ``shifted``: the subject hold-out split instead (``subject_holdout``), named ``<name>_shifted``: one per seed
    of ``shift_seeds`` (pooled as the folds are), or one at the settings' seed."""
    settings = get_settings()
    history = load_history(str(directory), bench.storage)
    name = directory.name
    if shifted:
        name = f"{directory.name}{SHIFTED}"
        splits = [subject_holdout(history, seed=seed) for seed in shift_seeds or (settings.seed,)]
    elif cv_folds < 2 or (history.queries["split"] == "test").any():
        splits = [with_holdout(history, settings.holdout_fraction, settings.seed)]
    else:
        splits = [cross_validation_fold(history, cv_folds, k, settings.seed) for k in range(cv_folds)]
    per_split = [
        bench_split(split, name, replace(bench, workdir=f"{bench.workdir}/{k}")) for k, split in enumerate(splits)
    ]
    pooled = [pool_folds([rows[i] for rows in per_split]) for i in range(len(bench.fractions))]
    # cross-validated: one per-task choice for all the folds' queries together (per fold, ~1/5 of the queries,
    # the ceiling could pick a different plan mix for each fold and overstate what a per-task choice can do);
    # shifted hold-outs are batches of their own: each its own ceiling, pooled by its queries
    batches = [split.split("test") for split in splits] if shifted or len(splits) == 1 else [history]
    plans = [uniform_plans(batch) for batch in batches]
    for i, row in enumerate(pooled):
        parts = [rows[i] for rows in per_split] if len(batches) > 1 else [row]
        singles = [p.filter(pl.col("kind") == "single") for p in plans]
        for column, mixes in (("hindsight_singles_accuracy", singles), ("hindsight_all_accuracy", plans)):
            right = [
                part["queries"] * hindsight_accuracy(m, part["queries"], part["budget_usd"])
                for m, part in zip(mixes, parts, strict=True)
            ]
            row[column] = sum(right) / row["queries"]
        ids = row.pop("_query_ids")
        row["unique_queries"] = len(np.unique(ids))
        row["gain_low"], row["gain_high"] = gain_interval(row.pop("_paired_gain"), ids)
        row["rounds_gain_low"], row["rounds_gain_high"] = gain_interval(row.pop("_paired_gain_rounds"), ids)
        row["posterior_gain_low"], row["posterior_gain_high"] = gain_interval(row.pop("_paired_gain_posterior"), ids)
    return pooled


def pool_folds(rows: list[dict]) -> dict:
    """One budget's rows of several folds as one: accuracies weighted by queries, spends and budgets summed."""
    if len(rows) == 1:
        return rows[0]
    n = sum(r["queries"] for r in rows)
    pooled = dict(rows[0]) | {"queries": n, "folds": len(rows)}
    for key in rows[0]:
        if key.endswith("_accuracy") or key in ("cheapest", "random", "best_single", "oracle"):
            pooled[key] = sum(r[key] * r["queries"] for r in rows) / n
        elif key.endswith(("_usd", "_seconds")):
            pooled[key] = sum(r[key] for r in rows)
        elif key.endswith("_within_budget"):
            pooled[key] = all(r[key] for r in rows)
        elif key.endswith("_gap"):
            pooled[key] = max(r[key] for r in rows)
        elif key.endswith("_kinds"):
            pooled[key] = {k: sum(r[key].get(k, 0) for r in rows) for k in {k for r in rows for k in r[key]}}
        elif key == "replanned_tasks":
            pooled[key] = sorted({t for r in rows for t in r[key]})
        elif key == "best_single_model":
            pooled[key] = "/".join(sorted({r[key] for r in rows}))
        elif key in ("_paired_gain", "_paired_gain_rounds", "_paired_gain_posterior", "_query_ids"):
            pooled[key] = np.concatenate([r[key] for r in rows])
        elif key.endswith("_estimated") or key == "all_planned":
            pooled[key] = sum(r[key] * r["queries"] for r in rows) / n
    return pooled


def gain_interval(
    paired_gain: np.ndarray, query_ids: np.ndarray | None = None, resamples: int = 2_000, seed: int = 0
) -> tuple[float, float]:
    """95% paired-bootstrap interval of the accuracy gain of votes and cascades over single-model plans
    (per row: 1 if only the plan with them was right, -1 if only the single-model plan was). ``query_ids``:
    each row's query; where a query has several rows (pooled hold-outs that share queries), the bootstrap
    resamples whole queries, all of a query's rows together (the mean over the rows drawn), so rows of one query
    are not counted as independent evidence; one row per query resamples the rows as without."""
    rng = np.random.default_rng(seed)
    if query_ids is None or len(np.unique(query_ids)) == len(query_ids):
        means = paired_gain[rng.integers(0, len(paired_gain), (resamples, len(paired_gain)))].mean(axis=1)
    else:
        _, query = np.unique(query_ids, return_inverse=True)
        sums, rows = np.bincount(query, weights=paired_gain), np.bincount(query).astype(float)
        drawn = rng.integers(0, len(sums), (resamples, len(sums)))
        means = sums[drawn].sum(axis=1) / rows[drawn].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def uniform_plans(test: History, min_coverage: float = 0.95) -> pl.DataFrame:
    """Every per-task uniform plan on ``test``'s queries, replayed: task, kind, total cost, queries right.
    Single models for every task, and the votes and cascades training enumerates for tasks with labels."""
    rows = []
    labelled = recorded_by_task(test)
    for task, rec in labelled.items():
        for spec in [PlanSpec("single", (m,)) for m in rec.models] + enumerate_specs(rec):
            sim = simulate(spec, rec)
            if sim.covered.mean() >= min_coverage:
                rows.append((task, spec.kind, float(sim.cost.sum()), float(sim.correct.sum())))
    open_tasks = test.outcomes.join(test.queries.select("query_id", "task"), on="query_id").filter(
        ~pl.col("task").is_in(list(labelled))
    )
    for (task, _model), group in open_tasks.group_by("task", "model"):
        rows.append((task, "single", float(group["cost_usd"].sum()), float(group["correct"].sum())))
    return pl.DataFrame(rows, schema=["task", "kind", "cost_usd", "correct"], orient="row")


def hindsight_accuracy(plans: pl.DataFrame, queries: int, budget_usd: float) -> float:
    """The best accuracy of a mix of ``plans`` (each task's queries split among its plans) within the budget,
    outcomes known: an LP, so a ceiling for any per-task choice; nan where the cheapest mix is over budget."""
    tasks = sorted(plans["task"].unique().to_list())
    in_task = np.array([[t == task for t in plans["task"].to_list()] for task in tasks], dtype=float)
    solved = linprog(
        -plans["correct"].to_numpy(),
        A_ub=plans["cost_usd"].to_numpy()[None, :],
        b_ub=[budget_usd],
        A_eq=in_task,
        b_eq=np.ones(len(tasks)),
        bounds=(0, 1),
        method="highs",
    )
    return float(-solved.fun / queries) if solved.status == 0 else float("nan")


def bench_split(history: History, name: str, bench: BenchSettings) -> list[dict]:
    """Train on the train split, then plan and replay the test split at every budget (single-shot plans, and
    ``bench.rounds`` rounds; also every round count in ``bench.sweep``, columns ``rounds<k>_accuracy``)."""
    settings = get_settings()
    queue = history.as_queue("test")
    started = time.perf_counter()
    # the per_task choice replays as many rounds as the bench runs (``bench.rounds``), as a run's train should
    trained = artifacts.train(
        history.split("train"), predictor=bench.predictor_name, seed=settings.seed, rounds=bench.rounds
    )
    train_seconds = time.perf_counter() - started
    backend = get_backend("replay", history=history)
    truth = Truth.from_history(history)
    predictions = predict(queue, trained.predictor, backend)
    variants = {
        "singles": build_candidates(queue, predictions, trained.templates, kinds=("single",)),
        "all": build_candidates(queue, predictions, trained.templates),
    }
    reference_cost, reference = best_single_cost(history, queue)
    # what the replay backend answers from: never gold nor the recorded verdicts
    recorded = history.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
    rows = []
    for fraction in bench.fractions:
        budget = fraction * reference_cost
        base = baseline_policies(queue["query_id"], truth, budget, reference, queue.select("query_id", "task"))
        row = {
            "dataset": name,
            "queries": queue.height,
            "budget_pct": round(100 * fraction),
            "budget_usd": budget,
            "cheapest": base["cheapest model"]["accuracy"],
            "random": base["random model"]["accuracy"],
            "best_single": base["best single model"]["accuracy"],
            "best_single_cost_usd": base["best single model"]["spent_usd"],
            "best_single_model": next(iter(reference.values())),
            "oracle": base["oracle"]["accuracy"],
            "train_seconds": train_seconds,
            "_query_ids": queue["query_id"].to_numpy(),
        }
        correct: dict[str, np.ndarray] = {}
        plans: dict[str, pl.DataFrame] = {}
        for variant, candidates in variants.items():
            try:
                outcome = plan_batch(candidates, PlanRequest(budget_usd=budget), trained.templates)
            except RequestInfeasible:  # a fold whose cheapest answers cost more than the budget: defer some
                outcome = plan_batch(candidates, PlanRequest(budget_usd=budget, allow_deferral=True), trained.templates)
            plans[variant] = outcome.plan
            out = f"{bench.workdir}/{name}-{variant}-{fraction}"
            run_at = Execution(budget_usd=budget, out_uri=out, storage=bench.storage)
            results = execute(outcome.plan, queue, backend, run_at)
            spend = float(results["cost_usd"].sum())
            correct[variant] = score_results(results, truth)["correct"].fill_null(False).to_numpy()
            row |= {
                f"{variant}_accuracy": float(correct[variant].mean()),
                f"{variant}_spent_usd": spend,
                f"{variant}_within_budget": spend <= budget + 1e-12,
                f"{variant}_gap": outcome.solution.gap,
                f"{variant}_kinds": dict(outcome.plan.group_by("kind").len().sort("kind").iter_rows()),
            }
            if variant == "all":
                row["all_planned"] = float(outcome.plan["expected_accuracy"].to_numpy().mean())
        row["_paired_gain"] = correct["all"].astype(float) - correct["singles"].astype(float)
        default = make_round_planner(
            DEFAULT_ROUND_PLANNER,
            plan=plans["all"],
            queue=queue,
            predictions=predictions,
            trained=trained,
            request=PlanRequest(budget_usd=budget),
        )
        # the tasks the default's posterior re-plans at this budget (the rest run the single-shot plan)
        row["replanned_tasks"] = sorted(getattr(default, "replanned", ()))
        counts = (bench.rounds, *bench.sweep)
        runs = [("rounds", default, bench.rounds)] + [("posterior", round_planner(trained.posterior), k) for k in counts]
        for column, planner, count in runs:
            run = simulate_rounds(planner, queue, predictions, recorded, budget, count)
            right = score_results(run.results, truth)["correct"].fill_null(False).to_numpy()
            if column == "posterior":
                row |= {f"rounds{count}_accuracy": float(right.mean()), f"rounds{count}_estimated": run.estimated_accuracy}
            if count == bench.rounds and f"{column}_accuracy" not in row:
                row |= {
                    f"{column}_accuracy": float(right.mean()),
                    f"{column}_estimated": run.estimated_accuracy,
                    f"{column}_spent_usd": run.spent_usd,
                    f"{column}_within_budget": run.spent_usd <= budget + 1e-12,
                    f"_paired_gain_{column}": right.astype(float) - correct["all"].astype(float),
                }
        rows.append(row)
    return rows


def aiq(rows: list[dict], column: str) -> float:
    x = np.array([r["budget_pct"] / 100 for r in rows])
    y = np.array([r[column] for r in rows])
    return float(np.trapezoid(y, x) / (x[-1] - x[0])) if len(x) > 1 else float(y[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=get_settings().data_dir)
    parser.add_argument(
        "--datasets",
        default=None,
        help="comma-separated names (default: every data set found); cascades brings cascades_shifted along "
        "(unless --no-shifted), cascades_shifted alone is the shifted split only",
    )
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--predictor", default="lightgbm")
    parser.add_argument(
        "--cv-folds",
        type=int,
        default=CV_FOLDS,
        help="folds for data sets without a test split (cascades); 0 = one hold-out of holdout_fraction",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_RUN_ROUNDS, help="rounds of the rounds and posterior columns"
    )
    parser.add_argument(
        "--rounds-sweep", default="", help="also the posterior planner at these round counts, e.g. 1,2,3,4 (a table)"
    )
    parser.add_argument(
        "--no-shifted",
        action="store_true",
        help="skip cascades_shifted (subjects held out of cascades), with or without --datasets",
    )
    parser.add_argument(
        "--shift-seeds",
        default="",
        help="cascades_shifted as one subject hold-out per seed, pooled (e.g. 0,1,2,3); default: one hold-out at "
        "the settings' seed",
    )
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--verbose", action="store_true", help="log every stage (to stderr)")
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if args.verbose else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )

    root = Path(args.data_dir)
    found = sorted(p.parent for p in root.glob("*/queries.parquet"))
    if not found:
        print(f"no data sets under {root}: set BATCHPLAN_DATA_DIR", file=sys.stderr)
        return 1
    try:
        jobs = bench_jobs(found, args.datasets, args.no_shifted)
    except ValueError as refused:
        parser.error(str(refused))  # one line, exit 2
    fractions = tuple(float(f) for f in args.fractions.split(","))
    storage = Storage()
    rows: list[dict] = []
    sweep = tuple(int(k) for k in args.rounds_sweep.split(",") if k)
    shift_seeds = tuple(int(k) for k in args.shift_seeds.split(",") if k)
    with tempfile.TemporaryDirectory() as workdir:
        bench = BenchSettings(fractions, args.predictor, storage, workdir, args.rounds, sweep)
        for directory, shifted in jobs:  # a shifted split is subject hold-outs (cv_folds 0)
            folds = 0 if shifted else args.cv_folds
            split_rows = bench_dataset(directory, bench, folds, shifted, shift_seeds)
            rows.extend(split_rows)
    table = pl.DataFrame([{k: v for k, v in r.items() if not k.endswith("_kinds") and k != "replanned_tasks"} for r in rows])
    columns = (
        "singles_accuracy", "all_accuracy", "rounds_accuracy", "posterior_accuracy", "rounds_estimated", "all_planned",
        "hindsight_singles_accuracy", "hindsight_all_accuracy", "cheapest", "random", "best_single", "oracle",
    )  # fmt: skip
    percents = [(pl.col(c) * 100).round(1).alias(c.removesuffix("_accuracy") + "_%") for c in columns]
    max_gap = pl.max_horizontal("singles_gap", "all_gap").map_elements(lambda g: f"{g:.1e}", return_dtype=pl.String)
    within = (
        pl.col("singles_within_budget")
        & pl.col("all_within_budget")
        & pl.col("rounds_within_budget")
        & pl.col("posterior_within_budget")
    )
    rounds_gain, posterior_gain = (
        pl.format("{} [{}, {}]", *((pl.col(f"{c}{s}") * 100).round(1) for s in ("_gain", "_gain_low", "_gain_high")))
        .alias(f"{c}_gain_pts_95%")
        for c in ("rounds", "posterior")
    )
    gain = pl.format("{} [{}, {}]", *((pl.col(c) * 100).round(1) for c in ("gain", "gain_low", "gain_high"))).alias(
        "gain_pts_95%"
    )
    table = table.with_columns(
        (pl.col("all_accuracy") - pl.col("singles_accuracy")).alias("gain"),
        (pl.col("rounds_accuracy") - pl.col("all_accuracy")).alias("rounds_gain"),
        (pl.col("posterior_accuracy") - pl.col("all_accuracy")).alias("posterior_gain"),
    )
    with pl.Config(tbl_rows=100, tbl_cols=30, tbl_width_chars=320, float_precision=4, tbl_hide_dataframe_shape=True):
        print(
            table.select(
                "dataset", "queries", "budget_pct", "budget_usd", "singles_spent_usd", "all_spent_usd",
                within.alias("within_budget"), *percents, gain, rounds_gain, posterior_gain, "best_single_cost_usd",
                max_gap.alias("max_gap"),
            )
        )  # fmt: skip
    print("best single model per data set (by train accuracy):", {r["dataset"]: r["best_single_model"] for r in rows})
    for r in {r["dataset"]: r for r in rows if r.get("folds", 1) > 1}.values():
        print(f"{r['dataset']}: {r['folds']} splits pooled, {r['queries']} rows of {r['unique_queries']} queries")
    print("AIQ over the budget grid (singles only -> with votes and cascades -> the run's default rounds):")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == dataset]
        print(
            f"  {dataset}: {aiq(group, 'singles_accuracy'):.4f} -> {aiq(group, 'all_accuracy'):.4f}"
            f" -> rounds {aiq(group, 'rounds_accuracy'):.4f} (posterior alone {aiq(group, 'posterior_accuracy'):.4f})"
        )
    if sweep:
        print("accuracy % by number of rounds (realized / estimated without gold):")
        for r in rows:
            cells = [
                f"{k}: {100 * r[f'rounds{k}_accuracy']:.1f} / {100 * r[f'rounds{k}_estimated']:.1f}" for k in sweep
            ]
            print(f"  {r['dataset']} @ {r['budget_pct']}%: " + "; ".join(cells))
    print("tasks the default round planner re-plans by the posterior (per_task; the rest: the single-shot plan):")
    for r in rows:
        print(f"  {r['dataset']} @ {r['budget_pct']}%: {r['replanned_tasks']}")
    print("plan kinds chosen with votes and cascades:")
    for r in rows:
        print(f"  {r['dataset']} @ {r['budget_pct']}%: {r['all_kinds']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    within_all = (
        table["singles_within_budget"]
        & table["all_within_budget"]
        & table["rounds_within_budget"]
        & table["posterior_within_budget"]
    )
    return 0 if within_all.all() else 3


if __name__ == "__main__":
    raise SystemExit(main())
