"""The honest-estimate check on the shifted split, over several subject hold-outs, beside its noise floor.

Issue 14's bar: on ``cascades`` with whole subjects held out (``bench.quality.subject_holdout``), the run's
``estimated_accuracy`` must land within 2 points of the realized accuracy while the single-shot plan's planned
accuracy does not. One hold-out has ~230 test queries, so even a perfectly calibrated estimate misses the
realized accuracy by sqrt(sum p(1-p)) / n (its *noise floor*, ~2 points SD) from luck alone. This bench
separates that from the systematic miss: per subject-holdout seed and budget it trains on the rest, then

- single shot (votes and cascades allowed): realized accuracy, planned accuracy, and the floor of the plan's
  own per-query P(correct);
- rounds (``round_planner`` over the trained posterior, ``--rounds``, simulated on the recorded outcomes):
  realized accuracy, the run's posterior estimate (``RoundsRun.estimated_accuracy``: through the estimate
  calibration), the same answers' stage-B posterior (what the decisions read; the estimate before the
  calibration), the floor of its final posteriors;
- audited (``--audit-shares``; each a uniform sample with the task's reference plan replayed, capped at
  ``--audit-spend-share`` of the budget as ``batchplan run`` caps the live default): ``estimate_audit`` with the
  run's posteriors as ``base`` (the difference estimator that ``run`` reports in rounds with audits) and without
  (the audits alone). The first share is also run the way ``run`` runs it, the reference calls inside the
  budget (the rounds get the budget minus their expected cost): ``audit_cost_pts`` is what that costs in
  accuracy against rounds without audits. The other shares' reference calls are paid outside the budget
  (the estimator's error only).

Printed per budget, over the seeds: mean signed miss (estimate - realized, points) and mean absolute miss of
each estimate, the mean floor, and how many seeds land within 2 points. Nothing in the estimates reads gold;
only the realized column does.

    uv run python bench/shift_estimate.py [--seeds 5] [--fractions 0.1,0.2,0.3,0.5] [--audit-shares 0.05,0.2]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import structlog

from batchplan.app import artifacts
from batchplan.app.demo import best_single_cost
from batchplan.app.pipeline import Execution, build_candidates, execute, predict
from batchplan.app.report import Truth, score_results
from batchplan.app.round_replay import RoundsRun, recorded_call, results_of, simulate_rounds
from batchplan.core.contracts import Status
from batchplan.core.history import History, load_history, stable_fold
from batchplan.core.request import DEFAULT_RUN_ROUNDS, LIVE_AUDIT_SHARE, LIVE_AUDIT_SPEND_SHARE
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.dispatchers import get_backend
from batchplan.plans.audit import AuditInputs, audit_plan, audit_queue, estimate_audit, posterior_base
from batchplan.plans.planning import PlanRequest, plan_batch
from batchplan.plans.posterior import Posterior
from batchplan.plans.round_planner import round_planner
from bench.quality import subject_holdout

WITHIN: float = 0.02  # the bar: within 2 points
TOP_CONFIDENCE: float = 0.9999  # the confidence bin where most lone answers sit (a third of all answers)


def random_holdout(history: History, fraction: float = 0.35, seed: int = 0) -> History:
    """The non-shifted twin of ``subject_holdout``: ``fraction`` of the queries, drawn by a stable hash of their
    ids whatever their subject, are the test split."""
    test = stable_fold(history.queries["query_id"], 1000, seed, salt="random:") < round(1000 * fraction)
    queries = history.queries.with_columns(pl.Series("split", np.where(test, "test", "train")))
    return History(queries=queries, outcomes=history.outcomes, prices=history.prices)


def answer_counts(run: RoundsRun) -> pl.DataFrame:
    """query_id, answers (how many LLMs answered it) of a rounds run."""
    answered = run.observations.filter(pl.col("status") == Status.OK)
    return answered.group_by("query_id").agg(pl.col("model").alias("called"), pl.len().alias("answers"))


def miss_by_answers(run: RoundsRun, right: np.ndarray) -> dict[str, float]:
    """The estimate's miss split between queries kept with a lone answer and those with several, each in points
    of the whole batch (the two add up to the miss), and the share of lone answers."""
    frame = run.answers.select("query_id", pl.col("estimated_p_correct").fill_null(0.0).fill_nan(0.0)).with_columns(
        pl.Series("right", right.astype(float))
    )
    frame = frame.join(answer_counts(run), on="query_id", how="left").with_columns(pl.col("answers").fill_null(0))
    n = max(frame.height, 1)
    lone = frame["answers"].to_numpy() == 1
    miss = frame["estimated_p_correct"].to_numpy() - frame["right"].to_numpy()
    return {"lone_share": float(lone.mean()), "lone_miss_pts": float(100 * miss[lone].sum() / n),
            "several_miss_pts": float(100 * miss[~lone].sum() / n)}  # fmt: skip


def subject_residuals(run: RoundsRun, right: np.ndarray, queries: pl.DataFrame) -> list[dict]:
    """Per (task, subject) of the batch: its task, queries n, residual r = sum(estimate - right) and binomial
    variance v = sum p(1-p): what ``subject_effect`` pools (reads gold, as the realized column does)."""
    frame = run.answers.select("query_id", pl.col("estimated_p_correct").fill_null(0.0).fill_nan(0.0).alias("p"))
    frame = frame.with_columns(pl.Series("right", right.astype(float))).join(
        queries.select("query_id", "task", pl.col("subject").fill_null("<none>")), on="query_id"
    )
    per = frame.group_by("task", "subject").agg(
        pl.len().alias("n"), (pl.col("p") - pl.col("right")).sum().alias("r"), (pl.col("p") * (1 - pl.col("p"))).sum().alias("v")
    )
    return per.drop("subject").to_dicts()


def subject_effect(cells: list[list[dict]]) -> dict[str, float]:
    """Per task, the variance tau^2 of a subject's own shift in accuracy that the estimate does not see: method of
    moments over the held-out subjects of ``cells`` (``subject_residuals`` of several runs), E[r^2] = v + n^2
    tau^2 with r taken about the task's mean miss over all of them (a bias common to every hold-out is the
    estimate's, not the subjects'), clipped at 0."""
    subjects = [s for cell in cells for s in cell]
    totals: dict[str, list[float]] = {}
    for s in subjects:
        r, n = totals.setdefault(s["task"], [0.0, 0.0])
        totals[s["task"]] = [r + s["r"], n + s["n"]]
    sums: dict[str, list[float]] = {}
    for s in subjects:
        mean = totals[s["task"]][0] / totals[s["task"]][1]
        top, bottom = sums.setdefault(s["task"], [0.0, 0.0])
        sums[s["task"]] = [top + (s["r"] - s["n"] * mean) ** 2 - s["v"], bottom + s["n"] ** 2]
    return {task: max(top / bottom, 0.0) for task, (top, bottom) in sums.items() if bottom > 0}


def subject_blind_miss(cell: list[dict], tau2: dict[str, float]) -> float:
    """The SD of the miss of an estimate that is right on average for every task but blind to each subject's own
    shift: binomial noise and the held-out subjects' effects, sqrt(sum v + sum n^2 tau^2) / N."""
    total = sum(s["n"] for s in cell)
    return float(np.sqrt(sum(s["v"] + s["n"] ** 2 * tau2.get(s["task"], 0.0) for s in cell)) / max(total, 1))


def second_opinion_llms(train: History) -> dict[str, list[str]]:
    """Per task, the LLMs a second opinion comes from, the most accurate on the training history first: those
    whose mean cost there is at most a third of the dearest LLM's (the dearest cost 20x the cheap one that gives
    most lone answers: a second opinion from them would cost more than the whole budget at 20-30%)."""
    rows = train.outcomes.join(train.queries.select("query_id", "task"), on="query_id")
    llms = {}
    for (task,), group in rows.group_by("task"):
        per = group.group_by("model").agg(pl.col("correct").mean(), pl.col("cost_usd").mean())
        cheap = per.filter(pl.col("cost_usd") <= per["cost_usd"].max() / 3)  # type: ignore[operator]
        llms[str(task)] = cheap.sort("correct", descending=True)["model"].to_list()
    return llms


def with_second_opinions(
    run: RoundsRun, queue: pl.DataFrame, predictions: pl.DataFrame, recorded: pl.DataFrame, posterior: Posterior,
    llms: dict[str, list[str]], share: float, seed: int,
) -> tuple[pl.DataFrame, pl.DataFrame, float]:  # fmt: skip
    """The run's final answers after ``share`` of its lone answers (a stable sample) got one more answer, from
    the first of their task's ``llms`` not yet called, paid outside the budget: (answers, results, what the
    second opinions cost). The estimate then reads two answers where it read one; nothing reads gold."""
    counts = answer_counts(run).filter(pl.col("answers") == 1)
    sampled = counts.filter(pl.Series(stable_fold(counts["query_id"], 1000, seed, salt="second:") < round(1000 * share)))
    task_of = dict(zip(queue["query_id"].to_list(), queue["task"].to_list(), strict=True))
    labels = dict(zip(queue["query_id"].to_list(), queue["labels"].to_list(), strict=True))
    table = {(q, m): (a, c or 0.0, lp, ti, to) for q, m, a, c, lp, ti, to in recorded.iter_rows()}
    rows, after_last = [], len(run.diagnostics) + 1  # one diagnostics entry per round
    for query_id, called, _ in sampled.iter_rows():
        second = next((m for m in llms.get(task_of[query_id], []) if m not in called), None)
        if second is not None:
            call = recorded_call(table.get((query_id, second)), labels.get(query_id))
            rows.append({"query_id": query_id, "round": after_last,
                         "model": second, **call, "mode": run.observations["mode"][0]})  # fmt: skip
    observations = run.observations
    if rows:
        observations = pl.concat([observations, pl.DataFrame(rows, schema=observations.schema)])
    answers = round_planner(posterior).answers(queue, predictions, observations)
    return answers, results_of(answers, observations), float(sum(r["cost_usd"] for r in rows))


def confidence_shift(split: History, run: RoundsRun, llms: dict[str, list[str]]) -> list[dict]:
    """Per task, for the LLM that gives most of its lone answers in ``run``: the share of its answers above
    ``TOP_CONFIDENCE`` and their accuracy on the held-out subjects against the training ones, and how often a
    second opinion (the task's first ``second_opinion_llms``) agrees with them there. Reads gold: it says where
    the estimate's miss comes from, nothing in a run reads it."""
    counts = answer_counts(run).filter(pl.col("answers") == 1).with_columns(pl.col("called").list.first().alias("model"))
    tasks = split.queries.select("query_id", "task", "split")
    lone = counts.join(tasks, on="query_id").group_by("task", "model").len().sort("len", descending=True)
    outcomes = split.outcomes.join(tasks, on="query_id")
    found = []
    for (task,), group in lone.group_by("task", maintain_order=True):
        llm = group["model"][0]
        second = next((m for m in llms.get(str(task), []) if m != llm), None)
        mine = outcomes.filter((pl.col("task") == task) & (pl.col("model") == llm))
        other = outcomes.filter(pl.col("model") == second).select("query_id", pl.col("answer").alias("second"))
        mine = mine.join(other, on="query_id", how="left").with_columns(
            (pl.col("logprob").exp() > TOP_CONFIDENCE).alias("top"), (pl.col("answer") == pl.col("second")).alias("agree")
        )
        row: dict = {"task": task, "lone_llm": llm, "second_llm": second}
        for part in ("test", "train"):
            these = mine.filter(pl.col("split") == part)
            top = these.filter(pl.col("top"))
            row |= {f"top_share_{part}": these["top"].mean(), f"top_acc_{part}": top["correct"].mean(),
                    f"top_agree_{part}": top["agree"].mean()}  # fmt: skip
        found.append(row)
    return found


def norm_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def floor(p: np.ndarray) -> float:
    """The SD of the realized accuracy around a calibrated estimate: sqrt(sum p(1-p)) / n."""
    return float(np.sqrt(np.sum(p * (1 - p))) / max(len(p), 1))


def audited(
    run: RoundsRun, plan: pl.DataFrame, queue: pl.DataFrame, predictions: pl.DataFrame, trained: artifacts.Trained,
    backend: object, storage: Storage, share: float, cap_usd: float | None, seed: str, out: str,
) -> dict[str, float]:  # fmt: skip
    """The audited estimates of one run: with the run's posteriors as base, and the audits alone."""
    rows = audit_plan(queue, predictions, trained.audit, share, seed, max_cost_usd=cap_usd)
    references = execute(rows, audit_queue(queue, rows), backend, Execution(budget_usd=None, out_uri=out, storage=storage))  # type: ignore[arg-type]
    args = {
        "plan": plan,
        "results": run.results,
        "audit_plan_rows": rows,
        "audit_results": references,
        "calls": run.observations.select("query_id", "model", "answer", "status"),
        "queue": queue,
        "predictions": predictions,
        "audit_fit": trained.audit,
        "seed": seed,
    }
    with_base = estimate_audit(AuditInputs(**args, base=posterior_base(run.answers)))  # type: ignore[arg-type]
    alone = estimate_audit(AuditInputs(**args))  # type: ignore[arg-type]
    return {
        "audited": float(with_base["audited"]),
        "audit_spent_usd": float(with_base["spent_usd"]),
        "audit_expected_usd": float(rows["expected_cost_usd"].sum()),
        "difference": with_base["estimated_accuracy"],
        "difference_low": with_base["ci95"][0],
        "difference_high": with_base["ci95"][1],
        "alone": alone["estimated_accuracy"],
    }


def bench_seed(seed: int, fractions: tuple[float, ...], shares: tuple[float, ...], spend_share: float,
               rounds: int, predictor: str, storage: Storage, workdir: str, data_dir: str,
               dataset: str = "cascades", opinions: tuple[float, ...] = ()) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The bench's rows of one hold-out, per budget, and ``confidence_shift``'s rows at its lowest budget."""
    settings = get_settings()
    name, _, how = dataset.partition(":")
    history = load_history(str(Path(data_dir) / name), storage)
    split = {"": subject_holdout, "random": random_holdout, "recorded": lambda h, seed: h}[how](history, seed=seed)
    queue = split.as_queue("test")
    trained = artifacts.train(split.split("train"), predictor=predictor, seed=settings.seed)
    backend = get_backend("replay", history=split)
    truth = Truth.from_history(split)
    predictions = predict(queue, trained.predictor, backend)
    candidates = build_candidates(queue, predictions, trained.templates)
    reference_cost, _ = best_single_cost(split, queue)
    uncalibrated = Posterior.from_json(trained.posterior.to_json())  # type: ignore[union-attr]
    for model in uncalibrated.tasks.values():
        model.e = None
    recorded = split.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
    llms = second_opinion_llms(split.split("train"))
    shifts: list[dict] = []

    def right(results: pl.DataFrame) -> np.ndarray:
        return score_results(results, truth)["correct"].fill_null(False).to_numpy()

    rows = []
    for fraction in fractions:
        budget = fraction * reference_cost
        row: dict = {"seed": seed, "queries": queue.height, "budget_pct": round(100 * fraction)}
        try:
            outcome = plan_batch(candidates, PlanRequest(budget_usd=budget), trained.templates)
        except Exception as error:  # a budget the cheapest plan cannot meet on this hold-out: the cell is empty
            print(f"seed {seed} @ {row['budget_pct']}%: skipped ({type(error).__name__})", file=sys.stderr)
            continue
        out = f"{workdir}/s{seed}-{fraction}"
        results = execute(outcome.plan, queue, backend, Execution(budget_usd=budget, out_uri=f"{out}/single", storage=storage))
        planned = outcome.plan["expected_accuracy"].fill_null(0.0).to_numpy()
        row |= {"single_realized": float(right(results).mean()), "single_planned": float(planned.mean()),
                "single_floor": floor(planned)}  # fmt: skip
        run = simulate_rounds(round_planner(trained.posterior), queue, predictions, recorded, budget, rounds)
        post = run.answers["estimated_p_correct"].fill_null(0.0).fill_nan(0.0).to_numpy()
        # the same run's kept answers under stage B alone (the posterior the decisions read, before the
        # estimate calibration): what ``estimated_accuracy`` was
        stage_b = round_planner(uncalibrated).answers(queue, predictions, run.observations)
        row |= {"rounds_realized": float(right(run.results).mean()), "rounds_estimated": run.estimated_accuracy,
                "rounds_stage_b": float(stage_b["estimated_p_correct"].fill_null(0.0).mean()),  # type: ignore[arg-type]
                "rounds_floor": floor(post), **miss_by_answers(run, right(run.results)),
                "subjects": subject_residuals(run, right(run.results), split.queries)}  # fmt: skip
        if not shifts:
            shifts = [{"seed": seed} | found for found in confidence_shift(split, run, llms)]
        for share in opinions:
            tag = f"so{round(100 * share)}"
            answers, results, extra = with_second_opinions(run, queue, predictions, recorded, trained.posterior,  # type: ignore[arg-type]
                                                           llms, share, seed)  # fmt: skip
            row |= {f"{tag}_realized": float(right(results).mean()),
                    f"{tag}_estimated": float(answers["estimated_p_correct"].fill_null(0.0).mean()),  # type: ignore[arg-type]
                    f"{tag}_extra_cost_pct": 100 * extra / budget}  # fmt: skip
        for k, share in enumerate(shares):
            tag = f"a{round(100 * share)}"
            cap = spend_share * budget if k == 0 else None  # the default's cap; the others: the estimator alone
            found = audited(run, outcome.plan, queue, predictions, trained, backend, storage, share, cap,
                            f"shift{seed}", f"{out}/{tag}")  # fmt: skip
            row |= {f"{tag}_{key}": value for key, value in found.items()}
            if k == 0:  # as run runs it: the reference calls inside the budget
                inside = simulate_rounds(round_planner(trained.posterior), queue, predictions, recorded,
                                         budget - found["audit_expected_usd"], rounds)  # fmt: skip
                found = audited(inside, outcome.plan, queue, predictions, trained, backend, storage, share, cap,
                                f"shift{seed}", f"{out}/{tag}-in")  # fmt: skip
                row |= {"inside_realized": float(right(inside.results).mean()),
                        "inside_estimated": inside.estimated_accuracy,
                        "inside_difference": found["difference"], "inside_audited": found["audited"]}  # fmt: skip
        rows.append(row)
    return rows, shifts


def summary(rows: list[dict], shares: tuple[float, ...], opinions: tuple[float, ...] = ()) -> pl.DataFrame:
    """Per budget over the seeds: signed and absolute miss (points) of each estimate, the floor, seeds within."""
    frame = pl.DataFrame(rows)
    estimates = [("single planned", "single_planned", "single_realized", "single_floor"),
                 ("rounds posterior", "rounds_estimated", "rounds_realized", "rounds_floor"),
                 ("rounds stage B (uncalibrated)", "rounds_stage_b", "rounds_realized", "rounds_floor")]  # fmt: skip
    for k, share in enumerate(shares):
        tag = f"a{round(100 * share)}"
        estimates.append((f"rounds + audits {share:.0%} (difference)", f"{tag}_difference", "rounds_realized", "rounds_floor"))
        estimates.append((f"rounds + audits {share:.0%} (audits alone)", f"{tag}_alone", "rounds_realized", "rounds_floor"))
        if k == 0:
            estimates.append((f"rounds, audits {share:.0%} inside the budget (difference)", "inside_difference",
                              "inside_realized", "rounds_floor"))  # fmt: skip
    for share in opinions:
        tag = f"so{round(100 * share)}"
        estimates.append((f"rounds + second opinions on {share:.0%} of lone answers (outside the budget)",
                          f"{tag}_estimated", f"{tag}_realized", "rounds_floor"))  # fmt: skip
    out = []
    for (pct,), group in frame.group_by("budget_pct", maintain_order=True):
        cells = group["subjects"].to_list() if "subjects" in group.columns else []
        tau2 = subject_effect(cells)
        if cells:  # the best a calibrated estimate blind to the subjects' own shifts can do, E|N(0, sd)|
            blind = np.array([subject_blind_miss(cell, tau2) for cell in cells]) * 100
            out.append({"budget_pct": pct, "estimate": "calibrated, subject-blind (expected)", "seeds": len(cells),
                        "realized_%": round(float(group["rounds_realized"].mean()) * 100, 1),  # type: ignore[arg-type]
                        "mean_signed_miss_pts": 0.0,
                        "mean_abs_miss_pts": round(float(np.mean(blind) * np.sqrt(2 / np.pi)), 1),
                        "floor_sd_pts": round(float(np.mean(blind)), 1),
                        "within_2pts": f"{float(np.mean([2 * norm_cdf(100 * WITHIN / b) - 1 for b in blind])) * len(blind):.1f}/{len(blind)}",
                        "tau_pts": ", ".join(f"{t} {100 * np.sqrt(v):.1f}" for t, v in sorted(tau2.items()))})  # fmt: skip
        for label, est, real, fl in estimates:
            if est not in group.columns:
                continue
            miss = (group[est] - group[real]).to_numpy() * 100
            out.append({"budget_pct": pct, "estimate": label, "seeds": len(miss),
                        "realized_%": round(float(group[real].to_numpy().mean()) * 100, 1),
                        "mean_signed_miss_pts": round(float(np.nanmean(miss)), 1),
                        "mean_abs_miss_pts": round(float(np.nanmean(np.abs(miss))), 1),
                        "floor_sd_pts": round(float(group[fl].to_numpy().mean()) * 100, 1),
                        "within_2pts": f"{int(np.sum(np.abs(miss) <= 100 * WITHIN))}/{len(miss)}"})  # fmt: skip
    return pl.DataFrame(out).sort("budget_pct", maintain_order=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=get_settings().data_dir)
    parser.add_argument("--seeds", type=int, default=5, help="subject-holdout seeds 0..N-1")
    parser.add_argument("--fractions", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--audit-shares", default=f"{LIVE_AUDIT_SHARE},0.2,0.5",
                        help="the first is capped at --audit-spend-share and also run inside the budget; the others "
                        "uncapped, paid outside it")
    parser.add_argument("--audit-spend-share", type=float, default=LIVE_AUDIT_SPEND_SHARE)
    parser.add_argument("--rounds", type=int, default=DEFAULT_RUN_ROUNDS)
    parser.add_argument("--predictor", default="lightgbm")
    parser.add_argument("--dataset", default="cascades",
                        help="the data set whose subjects are held out; the non-shifted checks: NAME:random holds "
                        "out a random share of the queries instead, NAME:recorded runs its recorded test split (every "
                        "seed the same split)")
    parser.add_argument("--second-opinions", default="",
                        help="shares of the rounds' lone answers that get one more answer (paid outside the budget): "
                        "what the estimate reads once it has two answers, and what that costs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    fractions = tuple(float(f) for f in args.fractions.split(","))
    shares = tuple(float(s) for s in args.audit_shares.split(",") if s)
    opinions = tuple(float(s) for s in args.second_opinions.split(",") if s)
    storage, rows, shifts = Storage(), [], []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            started = time.perf_counter()
            found, shifted = bench_seed(seed, fractions, shares, args.audit_spend_share, args.rounds, args.predictor,
                                        storage, workdir, args.data_dir, args.dataset, opinions)  # fmt: skip
            rows.extend(found)
            shifts.extend(shifted)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    with pl.Config(tbl_rows=200, tbl_cols=40, tbl_width_chars=320, float_precision=3, tbl_hide_dataframe_shape=True):
        per_cell = pl.DataFrame(rows)
        print("per seed and budget (accuracies as shares; aN_: audits of N% of the queries):")
        keep = [c for c in per_cell.columns if not c.endswith(("_usd", "_low", "_high", "queries", "subjects"))]
        print(per_cell.select(keep))
        print(f"over {args.seeds} subject hold-outs (miss = estimate - realized; floor = sqrt(sum p(1-p))/n):")
        print(summary(rows, shares, opinions))
        where = ["lone_share", "lone_miss_pts", "several_miss_pts", *(c for c in per_cell.columns if c.endswith("_extra_cost_pct"))]
        print("where the rounds' miss comes from (points of the whole batch, mean over the seeds; the two parts add up "
              "to the signed miss), and what second opinions cost (% of the budget):")
        print(per_cell.group_by("budget_pct", maintain_order=True).agg(pl.col(where).mean()))
        print(f"the LLM of most lone answers at the lowest budget: its answers above {TOP_CONFIDENCE} on the held-out "
              "subjects (test) and the training ones, their accuracy, and a second opinion's agreement with them:")
        print(pl.DataFrame(shifts))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
