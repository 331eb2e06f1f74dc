"""The live drift correction (predictors/live.py): what live labels say about a (task, LLM) moves that LLM's
predicted accuracy on that task toward them, through `batchplan train --from-run` and into the next plan;
silver verdicts never enter it; an LLM the labels never saw moves with its task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
from typer.testing import CliRunner

from batchplan.app.cli import app
from batchplan.core.history import History, synthetic_history
from batchplan.core.storage import Storage
from batchplan.plans.candidates import build_candidates
from batchplan.plans.planning import PlanRequest, plan_batch
from batchplan.plans.templates import PlanTemplates
from batchplan.predictors import Predictor, load_predictor
from batchplan.predictors.live import LiveCorrection
from tests.support.factories import run_dir_of  # a run directory as `batchplan run` writes it, gold or silver verdicts

runner = CliRunner()
DRIFTED, STEADY, TASK = "synth-04", "synth-02", "task1"


def test_offsets_move_the_labelled_llm_toward_its_labels_shrunk_and_its_task_with_it() -> None:
    # task a: m1 right on 5 of 15 live rows, m2 on 5 of 5; task b: m1 on 5 of 5; every prediction 0.9
    task = np.array(["a"] * 20 + ["b"] * 5)
    model = np.array(["m1"] * 15 + ["m2"] * 5 + ["m1"] * 5)
    y = np.r_[np.zeros(10), np.ones(15)]
    p = np.full(25, 0.9)
    fitted = LiveCorrection.fit(task, model, y, p, np.ones(25), np.ones(25, dtype=bool))
    matrix = fitted.matrix(["a", "b", "c"], ["m1", "m2", "m3"])
    assert matrix is not None
    moved = fitted.apply(np.full((3, 3), 0.9), matrix)
    assert 1 / 3 < moved[0, 0] < 0.9  # toward its live accuracy, not all the way (10 pseudo-rows at 0.9)
    assert moved[0, 0] < moved[0, 2] < 0.9  # m3, never labelled on a: moves with the task's drift
    assert moved[1, 0] > 0.9  # task b's labels lift m1 there
    assert np.allclose(moved[2], 0.9)  # a task with no live rows is as the history says
    # more of the same labels move it further
    more = LiveCorrection.fit(np.r_[task, ["a"] * 30], np.r_[model, ["m1"] * 30], np.r_[y, np.zeros(30)],
                              np.full(55, 0.9), np.ones(55), np.ones(55, dtype=bool))  # fmt: skip
    again = more.matrix(["a"], ["m1"])
    assert again is not None
    assert more.apply(np.array([0.9]), again[0])[0] < moved[0, 0]


def test_the_llm_the_plan_labels_most_does_not_drag_its_task_when_it_alone_drifted() -> None:
    # task a: m1, the plan's main LLM, drifted (12 of 24 right); m2..m4 as the history says (5 of 6 right
    # each, predicted 0.85). Counted by rows, m1's labels made the task's level and dragged the steady LLMs
    # to 0.73 (m5, never labelled, to 0.68): m1 looked no worse than the rest and was bought again
    model = np.array(["m1"] * 24 + ["m2"] * 6 + ["m3"] * 6 + ["m4"] * 6)
    y = np.r_[np.ones(12), np.zeros(12), np.tile(np.r_[np.ones(5), 0], 3)]
    fitted = LiveCorrection.fit(np.array(["a"] * len(y)), model, y, np.full(len(y), 0.85), np.ones(len(y)), np.ones(len(y), dtype=bool))
    matrix = fitted.matrix(["a"], ["m1", "m2", "m3", "m4", "m5"])
    assert matrix is not None
    moved = fitted.apply(np.full(5, 0.85), matrix[0])
    assert moved[0] < 0.65  # the drifted LLM: most of the way to its labels
    assert np.all(moved[1:4] > 0.77)  # the steady ones stay near theirs (0.83)
    assert moved[0] + 0.15 < moved[4] < 0.85  # the unlabelled one moves with the task, far less than m1


def test_silver_verdicts_never_enter_the_correction() -> None:
    task, model = np.array(["a"] * 10), np.array(["m1"] * 10)
    silver_only = LiveCorrection.fit(task, model, np.zeros(10), np.full(10, 0.9), np.full(10, 0.3), np.zeros(10, dtype=bool))
    assert silver_only.offsets.height == 0
    assert silver_only.matrix(["a"], ["m1"]) is None


def _train(tmp_path: Path, name: str, history_dir: str, runs: list[str]) -> Predictor:
    out = tmp_path / name
    args = ["train", "--history", history_dir, "--out", str(out), "--no-templates", "--no-holdout"]
    result = runner.invoke(app, [*args, *(a for r in runs for a in ("--from-run", r))])
    assert result.exit_code == 0, result.output
    return load_predictor(Storage(), str(out))  # the correction is stored with the version


def _mean_p(predictor: Predictor, queue: pl.DataFrame) -> dict[tuple[str, str], float]:
    pairs = queue.select("query_id").join(pl.DataFrame({"model": predictor.models}), how="cross")
    got = predictor.predict(queue, pairs, None).join(queue.select("query_id", "task"), on="query_id")
    return {(t, m): p for t, m, p in got.group_by("task", "model").agg(pl.col("p_correct").mean()).iter_rows()}


def _drifted(tmp_path: Path) -> tuple[str, str, str, pl.DataFrame]:
    """(history dir, gold run, silver run, queue): a bundled history where synth-04 is the best LLM on task1,
    and a live run whose 25 labels say it is wrong there every time (synth-02 as the history says), as gold
    and as silver; the queue is the rest of the test split."""
    full = synthetic_history(600, 5, seed=4)
    history_ids = full.queries.filter(pl.col("split") == "train")["query_id"]
    live_queries = full.queries.filter((pl.col("split") == "test") & (pl.col("task") == TASK)).head(25)
    bundled = full.subset(history_ids)
    history_dir = tmp_path / "history"
    history_dir.mkdir()
    bundled.queries.write_parquet(history_dir / "queries.parquet")
    bundled.outcomes.write_parquet(history_dir / "outcomes.parquet")
    bundled.prices.write_csv(history_dir / "models.csv")
    live = full.subset(live_queries["query_id"])
    wrong = live.outcomes.filter(pl.col("model").is_in([DRIFTED, STEADY])).with_columns(
        pl.when(pl.col("model") == DRIFTED).then(pl.lit(False)).otherwise(pl.col("correct")).alias("correct")
    )
    gold_run = run_dir_of(History(live.queries, wrong, live.prices), tmp_path / "run_gold")
    silver_run = run_dir_of(History(live.queries, wrong, live.prices), tmp_path / "run_silver", silver={DRIFTED, STEADY})
    queue = full.as_queue("test").filter(~pl.col("query_id").is_in(live_queries["query_id"].implode()))
    return str(history_dir), gold_run, silver_run, queue


def test_the_live_correction_refitted_on_past_runs_moves_the_next_plan_without_a_retrain(tmp_path: Path) -> None:
    """What a DAG's predict step does (``app.labels.live_correction``): a predictor trained on the bundled
    history alone, its live correction fitted again on a past run's labels, moves the drifted LLM as training
    on the run would (``batchplan train --from-run``); silver runs or none leave the predictor's own. The
    prior baseline (the DAG tests' predictor) trains a live correction too and applies it."""
    from batchplan.app.labels import labels_drift, live_correction

    history_dir, gold_run, silver_run, queue = _drifted(tmp_path)
    storage = Storage()
    plain = _train(tmp_path, "plain", history_dir, [])
    before = _mean_p(plain, queue)
    own, source = live_correction(storage, [], plain)
    assert own is plain.live
    assert source == "predictor"
    assert live_correction(storage, [silver_run], plain)[1] == "predictor"  # no gold: nothing to refit on
    plain.live, source = live_correction(storage, [gold_run], plain)
    assert source == "runs"
    after = _mean_p(plain, queue)
    assert after[(TASK, DRIFTED)] < before[(TASK, DRIFTED)] - 0.2
    for other in ("task0", "task2"):
        assert abs(after[(other, DRIFTED)] - before[(other, DRIFTED)]) < 0.05
    [said] = [d for d in labels_drift(plain.live.offsets, queue) if d["name"] == DRIFTED]
    assert (said["task"], said["direction"], said["calls"], said["source"]) == (TASK, "worse", 25, "labels")
    # the prior baseline: trained on the run, its live correction moves the LLM the same way
    out = tmp_path / "prior"
    args = ["train", "--history", history_dir, "--out", str(out), "--no-templates", "--no-holdout", "--predictor", "prior"]
    result = runner.invoke(app, [*args, "--from-run", gold_run])
    assert result.exit_code == 0, result.output
    prior = load_predictor(storage, str(out))
    assert prior.live.offsets.filter((pl.col("task") == TASK) & (pl.col("model") == DRIFTED))["offset"].item() < -0.5
    bare = _mean_p(_without_live(prior), queue)
    assert _mean_p(prior, queue)[(TASK, DRIFTED)] < bare[(TASK, DRIFTED)] - 0.2


def _without_live(predictor: Predictor) -> Predictor:
    return dataclasses.replace(predictor, live=LiveCorrection())


def test_train_from_run_moves_a_drifted_llm_toward_its_labels_and_the_plan_follows(tmp_path: Path) -> None:
    """The history says synth-04 is the best LLM on task1; a live run's labels say it is wrong there every time,
    while synth-02 is as the history says. After `batchplan train --from-run`, synth-04's predicted accuracy on
    task1 moves toward its labels (the other tasks keep theirs), and a plan made with the retrained predictor
    sends task1 elsewhere. The same rows as silver move no offset."""
    history_dir, gold_run, silver_run, queue = _drifted(tmp_path)
    plain = _train(tmp_path, "plain", history_dir, [])
    learned = _train(tmp_path, "learned", history_dir, [gold_run])
    silvered = _train(tmp_path, "silvered", history_dir, [silver_run])
    before, after = _mean_p(plain, queue), _mean_p(learned, queue)
    assert after[(TASK, DRIFTED)] < before[(TASK, DRIFTED)] - 0.2  # toward the labels (all wrong)
    assert after[(TASK, DRIFTED)] > 0.05  # shrunk: 25 labels are not the end of the story
    for other in ("task0", "task2"):
        assert abs(after[(other, DRIFTED)] - before[(other, DRIFTED)]) < 0.05
    offsets = learned.live.offsets
    assert offsets.filter((pl.col("task") == TASK) & (pl.col("model") == DRIFTED))["gold_rows"].item() == 25
    # the steady LLM's labels say the task itself has not drifted: the drifted one moves, the steady one little
    assert abs(after[(TASK, STEADY)] - before[(TASK, STEADY)]) < (before[(TASK, DRIFTED)] - after[(TASK, DRIFTED)]) / 2
    assert learned.metadata["live_correction"]  # said in the version's metadata
    assert silvered.live.offsets.height == 0  # silver: weighted in the fits, never a drift correction

    def task1_share(predictor: Predictor) -> float:
        task1 = queue.filter(pl.col("task") == TASK)
        pairs = task1.select("query_id").join(pl.DataFrame({"model": predictor.models}), how="cross")
        predictions = predictor.predict(task1, pairs, None)
        # what sending every query to the drifted LLM costs: it, or a mix around it, is what the history buys
        budget = float(predictions.filter(pl.col("model") == DRIFTED)["cost_usd"].sum())
        candidates = build_candidates(task1, predictions, PlanTemplates(), "single")
        plan = plan_batch(candidates, PlanRequest(budget_usd=budget), PlanTemplates()).plan
        return float((plan["models"].list.first() == DRIFTED).mean())

    share_before, share_after = task1_share(plain), task1_share(learned)
    assert share_before > 0.3
    assert share_after < share_before - 0.2
