"""Exploration (issue 15): calls of the LLMs the audit's reference does not call, on the audit sample's queries,
inside the run's one budget and its explore share, recorded as outcomes, so labels reach an LLM the plan never
calls and it gets an estimate of its own."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batchplan.app import artifacts
from batchplan.app.outcomes import runs_history
from batchplan.app.pipeline import Job, dispatch_dir, ledger_events, run_job
from batchplan.core.contracts import ContractError, audited_query_id, explore_id, is_audit, is_exploration
from batchplan.core.history import History, combine_histories, load_history
from batchplan.core.request import AUTO_EXPLORE_SHARE
from batchplan.core.storage import Storage
from batchplan.plans.audit import explore_plan, ranked_sample
from batchplan.plans.planning import PlanRequest, choose_exploration
from batchplan.predictors.live import OFFSET_SCHEMA, LiveCorrection
from tests.support.factories import EXAMPLE_HISTORY, corrupted, drifted_live, write_history, write_queue

BUDGET, EXPLORE = 0.03, 0.1


@pytest.fixture(scope="module")
def history() -> History:
    return load_history([str(EXAMPLE_HISTORY)])


@pytest.fixture(scope="module")
def trained(history: History) -> artifacts.Trained:
    return artifacts.train(history.split("train"), templates=False)


@pytest.fixture(scope="module")
def registry(trained: artifacts.Trained, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("predictors"))
    artifacts.save(trained, Storage(), root)
    return root


def explored_job(queue: str, registry: str, out: Path, served: str, explore: float | None = EXPLORE) -> Job:
    return Job(
        queue_uri=queue,
        predictors_uri=registry,
        out_uri=str(out),
        request=PlanRequest(budget_usd=BUDGET, allow_deferral=True, audit_share=0.1, explore_share=explore),
        replay_history=[served],
        run_id="explore-night",
    )


def test_explore_plan_calls_the_llms_the_reference_does_not_fewest_labels_first_within_its_cap() -> None:
    queue = pl.DataFrame({"query_id": [f"q{i}" for i in range(6)], "task": "t", "tenant": "default"})
    models = ["a", "b", "c", "d"]
    predictions = queue.select("query_id").join(pl.DataFrame({"model": models}), how="cross").with_columns(
        pl.col("model").replace_strict({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, return_dtype=pl.Float64).alias("cost_usd"),
        pl.lit(None, dtype=pl.Float64).alias("cost_high_usd"),
    )
    order = ranked_sample(queue["query_id"].to_list(), 1.0, "s")
    references = pl.DataFrame({"query_id": [order[0] + "#audit"], "models": [["d"]]})
    live = pl.DataFrame({"task": ["t"], "model": ["a"], "gold_rows": [50]})  # a is well labelled already
    rows = explore_plan(queue, predictions, references, "s", max_cost_usd=10.0, live_rows=live)
    # the first query (audited, reference d): b, c, then a (most labels): 6 of the cap; the next one fits b alone
    assert rows["query_id"].to_list() == [explore_id(order[0]), explore_id(order[1])]
    assert rows["models"].to_list() == [["b", "c", "a"], ["b"]]
    assert rows["kind"].to_list() == ["vote", "single"]  # a vote calls every member
    assert float(rows["expected_cost_usd"].sum()) <= 10.0
    assert rows.filter(is_audit()).height == rows.height  # audit rows: mandatory, never delivered
    assert rows.filter(is_exploration()).height == rows.height
    assert audited_query_id(explore_id("q1")) == "q1"
    assert explore_plan(queue, predictions, references, "s", max_cost_usd=0.5).height == 0  # nothing fits
    with pytest.raises(ContractError, match="explore_share"):
        PlanRequest(budget_usd=1.0, explore_share=1.0)


def test_exploration_stays_inside_the_budget_and_its_share_and_is_recorded_in_outcomes(
    history: History, registry: str, tmp_path: Path
) -> None:
    queue = write_queue(history, tmp_path / "queue.parquet")
    n = history.as_queue(split="test").height
    outcome = run_job(explored_job(queue, registry, tmp_path / "run", str(EXAMPLE_HISTORY)), Storage())
    report = outcome.report
    explored = report["audit"]["exploration"]
    assert explored["queries"] > 0
    assert explored["calls"] > explored["queries"]
    assert report["spent_usd"] <= BUDGET + 1e-12  # references, exploration and the batch under one budget
    assert explored["spent_usd"] <= EXPLORE * BUDGET + 1e-12
    # the report's spend is the bill: the exploration's calls counted beside the batch's and the references'
    charged = [e for e in ledger_events(Storage(), dispatch_dir(str(tmp_path / "run"))) if e.get("e") == "c"]
    assert report["spent_usd"] == pytest.approx(sum(float(e.get("usd") or 0.0) for e in charged))
    plan = pl.read_parquet(tmp_path / "run" / "plan.parquet")
    rows = plan.filter(is_exploration())
    assert rows.height == explored["queries"]
    assert float(rows["expected_cost_usd"].sum()) <= EXPLORE * BUDGET + 1e-12
    # never the reference's LLMs on the same query, never delivered, never counted as an audited reference
    references = dict(plan.filter(is_audit() & ~is_exploration()).select("query_id", "models").iter_rows())
    for query_id, models in rows.select("query_id", "models").iter_rows():
        assert not set(models) & set(references.get(audited_query_id(query_id) + "#audit", []))
    assert report["queries"] == n
    assert not outcome.results.filter(is_audit()).height
    assert report["audit"]["queries"] == plan.filter(is_audit() & ~is_exploration()).height
    assert explored["label_first"] == [audited_query_id(q) for q in rows["query_id"].to_list()]
    # every exploration call is an outcome of its query, with its verdict (the replay history's here)
    outcomes = pl.read_parquet(tmp_path / "run" / "outcomes.parquet")
    wanted = rows.select(pl.col("query_id").map_elements(audited_query_id, return_dtype=pl.String), pl.col("models").alias("model")).explode("model")
    assert wanted.join(outcomes, on=["query_id", "model"], how="semi").height == wanted.height
    assert wanted.join(outcomes, on=["query_id", "model"])["correct"].is_not_null().all()
    # without an explore share the plan explores nothing
    bare = run_job(explored_job(queue, registry, tmp_path / "bare", str(EXAMPLE_HISTORY), explore=0.0), Storage())
    assert "exploration" not in bare.report["audit"]
    assert not pl.read_parquet(tmp_path / "bare" / "plan.parquet").filter(is_exploration()).height


def test_an_llm_seen_only_through_exploration_gets_its_own_estimate(
    history: History, trained: artifacts.Trained, registry: str, tmp_path: Path
) -> None:
    """The plan never calls LLM X; tonight X answers every query wrong. Only the exploration calls see it: after
    retraining on the run (its gold verdicts), X has a live offset of its own, moved down further than its
    task's, and its predicted accuracy falls toward its labels; without exploration it only moves with its task."""
    queue = write_queue(history, tmp_path / "queue.parquet")
    # a third of the budget explores here: enough of X's labels to stand out of their noise
    clean = run_job(explored_job(queue, registry, tmp_path / "clean", str(EXAMPLE_HISTORY), explore=0.3), Storage())
    plan = pl.read_parquet(tmp_path / "clean" / "plan.parquet")
    delivered = set(plan.filter(~is_audit())["models"].explode().drop_nulls().to_list())
    tasks = dict(history.queries.select("query_id", "task").iter_rows())
    explored = plan.filter(is_exploration()).select(
        pl.col("query_id").map_elements(audited_query_id, return_dtype=pl.String), "models"
    ).explode("models")
    unseen = explored.filter(~pl.col("models").is_in(sorted(delivered)))
    assert unseen.height, f"every explored LLM is also the plan's ({sorted(delivered)}): no LLM to learn alone"
    llm = unseen["models"].value_counts(sort=True)["models"][0]
    task = tasks[unseen.filter(pl.col("models") == llm)["query_id"][0]]
    served = write_history(corrupted(history, {llm}), tmp_path / "served")
    run_job(explored_job(queue, registry, tmp_path / "run", served, explore=0.3), Storage())
    assert clean.report["audit"]["exploration"]["calls_by_llm"].get(llm)
    learned = artifacts.train(combine_histories([history.split("train"), runs_history(Storage(), [str(tmp_path / "run")])]), templates=False)
    offsets = learned.predictor.live.offsets
    own = offsets.filter((pl.col("task") == task) & (pl.col("model") == llm))
    assert own.height == 1
    assert own["gold_rows"].item() >= 5, own
    assert own["live_acc"].item() == 0.0
    assert own["offset"].item() < own["task_offset"].item() - 0.1  # its own drift, beyond its task's
    test = history.as_queue(split="test").filter(pl.col("task") == task)
    pairs = test.select("query_id").with_columns(pl.lit(llm).alias("model"))
    before = float(trained.predictor.predict(test, pairs, None)["p_correct"].mean())
    after = float(learned.predictor.predict(test, pairs, None)["p_correct"].mean())
    assert after < before - 0.05


def test_a_query_answered_by_many_llms_moves_the_task_level_as_one_query() -> None:
    # four queries, nine LLMs each, all wrong where the history said 0.8: counted per row they were 36 rows
    task, model = np.array(["a"] * 36), np.array([f"m{j}" for _ in range(4) for j in range(9)])
    query = np.repeat([f"q{i}" for i in range(4)], 9)
    args = (task, model, np.zeros(36), np.full(36, 0.8), np.ones(36), np.ones(36, dtype=bool))
    per_query = LiveCorrection.fit(*args, query=query).task_offsets()["a"]
    per_row = LiveCorrection.fit(*args).task_offsets()["a"]
    assert per_row < per_query < 0  # still down, but as four queries against the ten pseudo-rows, not 36
    # (r + k p) / (n + k) with n = 4 queries, k = 10: mean P near 0.57, not 0.17
    assert 0.5 < float(LiveCorrection().apply(np.array([0.8]), np.array([per_query]))[0]) < 0.65


def test_llm_level_follows_an_llm_that_stands_out_and_not_the_noise_of_the_rest() -> None:
    """Empirical-Bayes shrinkage of the LLM level: nine LLMs labelled on 30 queries each, all as the history
    said (right at its 0.8, noise only), stay near their task's offset; one that is wrong every time moves alone."""
    rng = np.random.default_rng(3)
    llms = [f"m{j}" for j in range(9)]
    model = np.array([m for _ in range(30) for m in llms])
    query = np.repeat([f"q{i}" for i in range(30)], 9)
    task, p, w, gold = np.array(["a"] * 270), np.full(270, 0.8), np.ones(270), np.ones(270, dtype=bool)
    y = (rng.random(270) < 0.8).astype(float)
    noise = LiveCorrection.fit(task, model, y, p, w, gold, query=query).offsets
    base = np.log(0.8 / 0.2)
    own_p = 1 / (1 + np.exp(-(base + noise["offset"].to_numpy())))
    labels = noise["live_acc"].to_numpy()
    # no LLM chases its own noise: the LLMs' estimates spread by well under half their labels' spread (10 fixed
    # pseudo-rows against 30 labels kept three quarters of it; a z beyond 1.96 by chance, m3 at 20 of 30, is
    # followed part of the way by design: README, the drift stream)
    assert own_p.max() - own_p.min() < 0.4 * (labels.max() - labels.min())
    drifted = np.where(model == "m0", 0.0, y)
    offsets = LiveCorrection.fit(task, model, drifted, p, w, gold, query=query).offsets
    own = offsets.filter(pl.col("model") == "m0")["offset"].item()
    rest = offsets.filter(pl.col("model") != "m0")
    off = (rest["offset"] - rest["task_offset"]).abs().sort().to_numpy()
    assert own < float(np.median(rest["offset"].to_numpy())) - 1.5  # m0 stands out of the noise: it moves
    # the rest stay with their task, but for one at most: a z beyond 1.96 by chance (m8, 28 of 30 right) is
    # followed by design (nine LLMs: one about every third night, each part of the way)
    assert off[-2] < 0.01


def test_choose_exploration_turns_on_where_the_labels_show_drift_and_an_asked_share_wins() -> None:
    live = drifted_live("t", "a")
    request = PlanRequest(budget_usd=1.0, audit_share=0.1)  # explore_share unset: automatic
    chosen, why = choose_exploration(request, live.offsets, {"t"}, "run-1")
    assert chosen.explore_share == AUTO_EXPLORE_SHARE
    assert chosen.audit_seed == "run-1"  # the run's own sample
    assert why is not None
    assert why["source"] == "drift"
    assert why["share"] == AUTO_EXPLORE_SHARE
    assert "a on t (worse)" in why["reason"]
    assert why["drift"] == [{"model": "a", "task": "t", "direction": "worse"}]
    # the drift is on a task this batch does not have, or there are no labels: no exploration
    for offsets, tasks in ((live.offsets, {"other"}), (LiveCorrection().offsets, {"t"}), (None, {"t"})):
        chosen, why = choose_exploration(request, offsets, tasks, "run-1")
        assert chosen.explore_share == 0.0
        assert why is None
    # labels that agree with the history (within their interval): none either
    agreeing = live.offsets.with_columns(pl.lit(0.88).alias("live_acc"))
    seeded = dataclasses.replace(request, audit_seed="run-1")
    assert choose_exploration(request, agreeing, {"t"}, "run-1") == (dataclasses.replace(seeded, explore_share=0.0), None)
    # a run that neither audits nor explores samples nothing: it stays seedless (as recorded before this default)
    quiet = PlanRequest(budget_usd=1.0)
    assert choose_exploration(quiet, agreeing, {"t"}, "run-1") == (dataclasses.replace(quiet, explore_share=0.0), None)
    # an explicit share wins: 0 turns it off under drift, a share is kept and said as asked
    off = dataclasses.replace(request, explore_share=0.0)
    assert choose_exploration(off, live.offsets, {"t"}, "run-1") == (dataclasses.replace(off, audit_seed="run-1"), None)
    asked = dataclasses.replace(request, explore_share=0.1)
    chosen, why = choose_exploration(asked, live.offsets, {"t"}, "run-1")
    assert chosen.explore_share == 0.1
    assert why is not None
    assert why["source"] == "asked"


def test_one_marginal_pair_among_many_tested_is_no_drift_and_turns_nothing_on() -> None:
    """The labels' drift test holds its 5% over the (task, LLM)s tested (Holm): 7 of 30 right against the
    history's 0.9 (p ~1e-33) is drift among 15 pairs; 26 of 30 (p ~0.5) is none; 23 of 30 (p ~0.015) is drift when
    tested alone (the history outside its 95% interval) but not among 14 agreeing pairs, so it turns
    exploration on alone only."""
    from batchplan.plans.audit import label_drift

    def offsets(accuracies: dict[str, float]) -> pl.DataFrame:
        rows = [{"task": "t", "model": m, "offset": 0.0, "task_offset": 0.0, "rows": 30.0, "gold_rows": 30, "p_before": 0.9,
                 "live_acc": a} for m, a in accuracies.items()]  # fmt: skip
        return pl.DataFrame(rows, schema=OFFSET_SCHEMA)

    agreeing = {f"ok{i}": 26 / 30 for i in range(13)}
    assert [d["name"] for d in label_drift(offsets({"marginal": 23 / 30}), {"t"})] == ["marginal"]
    found = label_drift(offsets(agreeing | {"marginal": 23 / 30, "bad": 7 / 30}), {"t"})
    assert [(d["name"], d["tested"]) for d in found] == [("bad", 15)]
    assert found[0]["p_value"] < 0.05 / 15
    request = PlanRequest(budget_usd=1.0, audit_share=0.1)
    assert choose_exploration(request, offsets(agreeing | {"marginal": 23 / 30}), {"t"}, "r")[1] is None
    assert choose_exploration(request, offsets({"marginal": 23 / 30}), {"t"}, "r")[1] is not None


def test_a_run_whose_labels_show_drift_explores_and_its_report_says_why(
    history: History, trained: artifacts.Trained, tmp_path: Path
) -> None:
    queue = write_queue(history, tmp_path / "queue.parquet")
    task = str(history.as_queue(split="test")["task"][0])
    predictor = dataclasses.replace(trained.predictor, live=drifted_live(task, history.models[0]))
    registry = str(tmp_path / "predictors")
    artifacts.save(dataclasses.replace(trained, predictor=predictor), Storage(), registry)
    auto = run_job(explored_job(queue, registry, tmp_path / "auto", str(EXAMPLE_HISTORY), explore=None), Storage())
    why = auto.report["exploration"]
    assert why["source"] == "drift"
    assert why["share"] == AUTO_EXPLORE_SHARE
    assert why["tasks"] == [task]
    explored = pl.read_parquet(tmp_path / "auto" / "plan.parquet").filter(is_exploration())
    assert explored.height > 0
    # only the drifted task's queries are explored: the labels agree with the history on the others
    tasks = dict(history.as_queue(split="test").select("query_id", "task").iter_rows())
    assert len(set(tasks.values())) > 1
    assert {tasks[audited_query_id(q)] for q in explored["query_id"]} == {task}
    assert auto.report["audit"]["exploration"]["queries"] == explored.height
    part = sum(t == task for t in tasks.values()) / len(tasks)  # the task's part of the budget: its queries' share
    assert float(explored["expected_cost_usd"].sum()) <= AUTO_EXPLORE_SHARE * BUDGET * part + 1e-12  # the share planned
    said = f"Exploration on: up to {AUTO_EXPLORE_SHARE:.0%} of {task}'s part of the budget on calls of the LLMs"
    assert said in (tmp_path / "auto" / "report.md").read_text()
    assert history.models[0] in (tmp_path / "auto" / "report.md").read_text()
    # 0 given explicitly wins over the drift
    off = run_job(explored_job(queue, registry, tmp_path / "off", str(EXAMPLE_HISTORY), explore=0.0), Storage())
    assert "exploration" not in off.report
    assert "exploration" not in off.report["audit"]
    assert not pl.read_parquet(tmp_path / "off" / "plan.parquet").filter(is_exploration()).height


def test_a_run_whose_labels_agree_with_the_history_does_not_explore(history: History, registry: str, tmp_path: Path) -> None:
    queue = write_queue(history, tmp_path / "queue.parquet")
    run = run_job(explored_job(queue, registry, tmp_path / "run", str(EXAMPLE_HISTORY), explore=None), Storage())
    assert "exploration" not in run.report
    assert "exploration" not in run.report["audit"]
    assert "Exploration on" not in (tmp_path / "run" / "report.md").read_text()
    assert not pl.read_parquet(tmp_path / "run" / "plan.parquet").filter(is_exploration()).height
