"""Audits (issue 15): a deterministic sample inside the budget, an accuracy interval without gold, drift said
out loud."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batchplan.app import artifacts
from batchplan.app.pipeline import Job, run_job
from batchplan.core.contracts import AUDIT_SUFFIX, audit_id, is_audit
from batchplan.core.history import History, load_history
from batchplan.core.storage import Storage
from batchplan.plans.audit import audited_ids, same_answer
from batchplan.plans.planning import PlanRequest
from tests.support.factories import EXAMPLE_HISTORY, corrupted, write_history, write_queue
from tests.support.replay_server import ReplayServer


@pytest.fixture(scope="module")
def history() -> History:
    return load_history([str(EXAMPLE_HISTORY)])


@pytest.fixture(scope="module")
def registry(history: History, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("predictors"))
    artifacts.save(artifacts.train(history.split("train"), templates=False), Storage(), root)
    return root


@pytest.fixture(scope="module")
def registry_with_posterior(history: History, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("predictors-posterior"))
    artifacts.save(artifacts.train(history.split("train")), Storage(), root)
    return root


def audited_job(queue: str, registry: str, out: Path, budget: float, run_id: str, **rounds: object) -> Job:
    """A replay run of the example queue with a quarter of it audited (``rounds``: Job's rounds fields)."""
    return Job(
        queue_uri=queue,
        predictors_uri=registry,
        out_uri=str(out),
        request=PlanRequest(budget_usd=budget, allow_deferral=True, audit_share=0.25),
        replay_history=[str(EXAMPLE_HISTORY)],
        run_id=run_id,
        **rounds,  # type: ignore[arg-type]
    )


def test_audit_sample_is_uniform_deterministic_and_the_run_id_s() -> None:
    ids = [f"q{i}" for i in range(1000)]
    chosen = audited_ids(ids, 0.05, "night-1")
    assert len(chosen) == 50
    assert audited_ids(list(reversed(ids)), 0.05, "night-1") == chosen  # not the queue's order
    assert audited_ids(ids, 0.05, "night-2") != chosen  # another run, another sample
    assert audited_ids(ids, 0.0, "night-1") == []
    assert len(audited_ids(ids[:10], 0.01, "x")) == 1  # a share > 0 audits at least one query


def test_open_answers_agree_on_paraphrase_not_on_another_claim() -> None:
    assert same_answer("The World Trade Center", "the world trade center.", open_task=True)
    assert not same_answer("Mazda", "Toyota", open_task=True)
    assert same_answer("B", "b", open_task=False)
    assert not same_answer("B", None, open_task=False)


def test_audits_are_planned_inside_the_budget_and_resume_to_the_same_sample(
    history: History, registry: str, tmp_path: Path
) -> None:
    queue = write_queue(history, tmp_path / "queue.parquet")
    n = history.as_queue(split="test").height
    budget = 0.02
    job = audited_job(queue, registry, tmp_path / "run", budget, "audit-night")
    first = run_job(job, Storage())
    plan = pl.read_parquet(tmp_path / "run" / "plan.parquet")
    audits = plan.filter(is_audit())
    assert audits.height == round(0.25 * n)
    assert audits["query_id"].str.strip_suffix(AUDIT_SUFFIX).sort().to_list() == audited_ids(
        history.as_queue(split="test")["query_id"].to_list(), 0.25, "audit-night"
    )
    # the reference calls are mandatory and planned with the rest: the total, margin included, holds
    margin = json.loads((tmp_path / "run" / "plan.optimizer.json").read_text())["spend_margin_usd"]
    assert float(plan["expected_cost_usd"].sum()) + margin <= budget + 1e-9
    assert first.report["spent_usd"] <= budget
    assert first.report["audit"]["spent_usd"] > 0
    assert first.report["queries"] == n  # the reference calls are not delivered answers
    # resumed: the same sample, nothing paid twice
    again = run_job(job, Storage())
    assert pl.read_parquet(tmp_path / "run" / "plan.parquet").equals(plan)
    assert again.report["spent_usd"] == pytest.approx(first.report["spent_usd"])
    # without audits the same budget plans the batch alone
    bare = run_job(
        Job(
            queue_uri=queue,
            predictors_uri=registry,
            out_uri=str(tmp_path / "bare"),
            request=PlanRequest(budget_usd=budget, allow_deferral=True),
            replay_history=[str(EXAMPLE_HISTORY)],
        ),
        Storage(),
    )
    assert "audit" not in bare.report
    assert not pl.read_parquet(tmp_path / "bare" / "plan.parquet").filter(is_audit()).height


@pytest.mark.parametrize("planner", ["plan", "posterior"])
def test_audits_in_rounds_are_mandatory_round_one_calls_inside_the_budget(
    history: History, registry_with_posterior: str, tmp_path: Path, planner: str
) -> None:
    queue = write_queue(history, tmp_path / "queue.parquet")
    n = history.as_queue(split="test").height
    budget = 0.02
    job = audited_job(queue, registry_with_posterior, tmp_path / "run", budget, "audit-rounds", rounds=3, round_planner=planner)
    first = run_job(job, Storage())
    sample = [audit_id(q) for q in audited_ids(history.as_queue(split="test")["query_id"].to_list(), 0.25, "audit-rounds")]
    # every reference is planned and sent in round 1, whole (the reference plans here are one call or a vote)
    round_one = pl.read_parquet(tmp_path / "run" / "rounds" / "1" / "calls.parquet")
    assert set(sample) <= set(round_one["query_id"].to_list())
    references = pl.read_parquet(tmp_path / "run" / "plan.parquet").filter(is_audit())
    sent = round_one.filter(is_audit()).join(references.select("query_id", "kind", "models"), on="query_id")
    assert sent.filter(pl.col("kind").is_in(["single", "vote"]))["models"].to_list() == sent.filter(
        pl.col("kind").is_in(["single", "vote"])
    )["models_right"].to_list()
    later = pl.concat([pl.read_parquet(tmp_path / "run" / "rounds" / str(k) / "calls.parquet") for k in (2, 3)])
    assert not later.filter(is_audit() & pl.col("query_id").is_in(sent["query_id"].implode())).height
    report = first.report
    assert report["spent_usd"] <= budget + 1e-12  # references and delivered answers under one budget
    assert report["audit"]["spent_usd"] > 0
    assert report["audit"]["audited"] > 0
    assert report["estimated_accuracy_source"] == "audit"
    # in rounds the estimate is the rounds' posterior corrected by the audited sample (a difference estimator)
    assert report["audit"]["method"].startswith("difference estimator")
    assert 0.0 <= report["audit"]["base_accuracy"] <= 1.0
    low, high = report["estimated_accuracy_ci95"]
    assert 0.0 <= low <= report["estimated_accuracy"] <= high <= 1.0
    assert report["queries"] == n  # the reference answers are not delivered ones
    assert not first.results.filter(is_audit()).height
    records = pl.read_parquet(tmp_path / "run" / "audit.parquet")
    assert records.height == report["audit"]["audited"]
    assert records["delivered_answer"].is_not_null().any()
    # resumed: no round repeated, nothing paid twice, the same estimate
    again = run_job(job, Storage())
    assert again.report["spent_usd"] == pytest.approx(report["spent_usd"])
    assert again.report["estimated_accuracy"] == pytest.approx(report["estimated_accuracy"])


def test_audits_that_alone_exceed_the_budget_are_refused_naming_audit_share(
    history: History, registry: str, tmp_path: Path
) -> None:
    from batchplan.plans.infeasible import RequestInfeasible

    job = Job(
        queue_uri=write_queue(history, tmp_path / "queue.parquet"),
        predictors_uri=registry,
        out_uri=str(tmp_path / "run"),
        request=PlanRequest(budget_usd=1e-6, allow_deferral=True, audit_share=0.5),
        replay_history=[str(EXAMPLE_HISTORY)],
    )
    with pytest.raises(RequestInfeasible, match="audit_share"):
        run_job(job, Storage())


def test_the_interval_comes_without_gold_from_a_live_endpoint(
    history: History, registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchplan.app.pipeline as pipeline
    import batchplan.app.report as report

    with ReplayServer(history) as server:  # the endpoint knows the answers; batchplan only hears them

        def no_gold(*_: object, **__: object) -> None:
            raise AssertionError("the run read gold")

        monkeypatch.setattr(pipeline, "load_history", no_gold)
        monkeypatch.setattr(report, "score_results", no_gold)
        monkeypatch.setattr(report.Truth, "from_history", no_gold)
        prices = tmp_path / "models.csv"
        history.prices.write_csv(prices)
        outcome = run_job(
            Job(
                queue_uri=write_queue(history, tmp_path / "queue.parquet"),
                predictors_uri=registry,
                out_uri=str(tmp_path / "live"),
                request=PlanRequest(budget_usd=0.05, allow_deferral=True, audit_share=0.3),
                backend="openai",
                base_url=server.base_url,
                prices_uri=str(prices),
                run_id="live-night",
            ),
            Storage(),
        )
    got = outcome.report
    assert got["accuracy"] is None  # nothing scored it
    low, high = got["estimated_accuracy_ci95"]
    assert 0.0 <= low <= got["estimated_accuracy"] <= high <= 1.0
    assert got["estimated_accuracy_source"] == "audit"
    assert got["audit"]["per_task"]
    assert got["audit"]["audited"] > 0
    audit = pl.read_parquet(tmp_path / "live" / "audit.parquet")
    assert set(audit.columns) >= {"query_id", "task", "delivered_answer", "reference_answer", "agree"}
    assert "audited estimate" in (tmp_path / "live" / "report.md").read_text()
    # the audits' references are silver verdicts of the audited queries' other calls, never gold
    outcomes = pl.read_parquet(tmp_path / "live" / "outcomes.parquet")
    silver = outcomes.filter(pl.col("label_source") == "silver")
    assert silver.height > 0
    assert not (outcomes["label_source"] == "gold").any()
    assert set(silver["query_id"]) <= set(audit["query_id"])
    own = silver.join(audit.select("query_id", "reference_models"), on="query_id")
    assert not any([m] == list(refs) for m, refs in own.select("model", "reference_models").iter_rows())


def test_drift_leads_the_report_when_an_llm_is_much_worse_than_the_history(
    history: History, registry: str, tmp_path: Path
) -> None:
    queue = write_queue(history, tmp_path / "queue.parquet")

    def night(served: str, out: str) -> dict[str, object]:
        job = Job(
            queue_uri=queue,
            predictors_uri=registry,
            out_uri=str(tmp_path / out),
            request=PlanRequest(budget_usd=0.04, allow_deferral=True, audit_share=0.5),
            replay_history=[served],
            run_id="drift-night",
        )
        return run_job(job, Storage()).report

    clean = night(str(EXAMPLE_HISTORY), "clean")
    assert not [d for d in clean["drift"] if d["kind"] == "llm"]  # as the history says: no LLM drift
    # tonight the LLM the plan leans on most answers every query wrong
    delivered = pl.read_parquet(tmp_path / "clean" / "plan.parquet").filter(~is_audit())
    bad = delivered["models"].explode().value_counts(sort=True)["models"][0]
    report = night(write_history(corrupted(history, {bad}), tmp_path / "served"), "run")
    worse = [d for d in report["drift"] if d["kind"] == "llm" and d["direction"] == "worse"]
    assert [d["name"] for d in worse] == [bad]
    assert worse[0]["ci95"][1] < worse[0]["predicted_accuracy"]
    lines = [line for line in (tmp_path / "run" / "report.md").read_text().splitlines() if line.strip()]
    assert lines[1].startswith(f"**DRIFT: LLM {bad} is worse than the history says")  # right under the title
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.index("DRIFT:") < html.index("queries=")
    assert report["accuracy"] < report["planned_accuracy"]  # scored on the served history: it really was worse


def test_a_bad_audit_share_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from batchplan.app.cli import app

    args = ["run", "--queue", "q", "--predictors", "m", "--out", str(tmp_path), "--budget-usd", "1"]
    result = CliRunner().invoke(app, [*args, "--audit-share", "1.5"])
    assert result.exit_code == 2, result.output
    assert "--audit-share" in result.output.strip().splitlines()[-1]


def test_the_default_audit_share_follows_the_backend() -> None:
    from batchplan.core.request import default_audit_share

    assert default_audit_share(None, "openai") == 0.05
    assert default_audit_share(None, "replay") == 0.0
    assert default_audit_share(0.2, "replay") == 0.2


def test_audits_that_alone_exceed_a_tenant_budget_are_refused_naming_audit_share_and_the_tenant(
    history: History, registry: str, tmp_path: Path
) -> None:
    """A tenant budget below its audited queries' mandatory reference calls: one line naming the audit share,
    the tenant and what its budget would need, exit 2, nothing sent (not the optimizer's bare infeasible row)."""
    from typer.testing import CliRunner

    from batchplan.app.cli import app

    queue = write_queue(history, tmp_path / "queue.parquet")
    [tenant] = history.as_queue(split="test")["tenant"].unique().to_list()
    args = ["run", "--queue", queue, "--predictors", registry, "--out", str(tmp_path / "run"), "--budget-usd", "1"]
    args += ["--replay-history", str(EXAMPLE_HISTORY), "--allow-deferral", "--audit-share", "0.25"]
    result = CliRunner().invoke(app, [*args, "--tenant-budget", f"{tenant}=0.000001"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "--audit-share" in line
    assert f"tenant '{tenant}': the reference calls of its 30 audited queries alone" in line
    assert f"more than --tenant-budget {tenant}=0.000001; it would need at least $" in line
    assert "infeasible on its own" not in result.output
    assert not (tmp_path / "run" / "results.parquet").exists()


def test_the_audits_spend_cap_defaults_with_the_live_share_only() -> None:
    from typer.testing import CliRunner

    from batchplan.app.cli import app
    from batchplan.core.request import LIVE_AUDIT_SPEND_SHARE, default_audit_spend_share

    assert default_audit_spend_share(None, None, "openai") == LIVE_AUDIT_SPEND_SHARE
    assert default_audit_spend_share(None, 0.3, "openai") is None  # the share asked for is not shrunk
    assert default_audit_spend_share(0.2, 0.3, "openai") == 0.2
    assert default_audit_spend_share(None, None, "replay") is None
    args = ["run", "--queue", "q", "--predictors", "m", "--out", "x", "--budget-usd", "1", "--audit-spend-share", "1.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--audit-spend-share" in result.output.strip().splitlines()[-1]


def _offers(n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    queue = pl.DataFrame(
        {"query_id": [f"q{i:03d}" for i in range(n)], "task": "t", "tenant": "a", "labels": [["A", "B"]] * n}
    )
    predictions = queue.select("query_id").join(pl.DataFrame({"model": ["big", "small"], "p_correct": [0.9, 0.7]}), how="cross")
    predictions = predictions.with_columns(
        pl.when(pl.col("model") == "big").then(1.0).otherwise(0.1).alias("cost_usd"),
        pl.when(pl.col("model") == "big").then(1.5).otherwise(0.2).alias("cost_high_usd"),
    )
    return queue, predictions


def test_the_audits_spend_cap_keeps_a_smaller_uniform_sample_in_the_queue_s_order() -> None:
    from batchplan.plans.audit import audit_plan, ranked_sample

    queue, predictions = _offers(100)
    full = audit_plan(queue, predictions, None, 0.5, "night-1")
    capped = audit_plan(queue, predictions, None, 0.5, "night-1", max_cost_usd=10.0)
    assert full.height == 50
    assert capped.height == 10  # each reference (the likeliest LLM) costs 1.0
    assert capped["expected_cost_usd"].sum() <= 10.0
    first = {f"{q}{AUDIT_SUFFIX}" for q in ranked_sample(queue["query_id"].to_list(), 0.5, "night-1")[:10]}
    assert set(capped["query_id"]) == first  # a prefix of the random order: still a uniform sample
    assert capped["query_id"].to_list() == sorted(capped["query_id"].to_list())  # the queue's order
    one = audit_plan(queue, predictions, None, 0.5, "night-1", max_cost_usd=0.01)
    assert one.height == 1  # a cap below one reference still audits one query


def test_an_audited_query_gets_its_reference_where_that_is_the_likelier_right_answer() -> None:
    from batchplan.plans.audit import AUDIT_DELIVERED_NOTE, deliver_references

    queue, _ = _offers(5)
    results = pl.DataFrame(
        {
            "query_id": queue["query_id"],
            "answer": ["A", "A", "A", None, "A"],
            "models_called": [["small"]] * 3 + [[]] + [["small"]],
            "cost_usd": [0.1, 0.1, 0.1, 0.0, 0.1],
            "status": ["done", "done", "done", "deferred", "done"],
            "error": [None, None, None, "budget", None],
            "note": None,
        },
        schema_overrides={"note": pl.String},
    )
    plan = pl.DataFrame({"query_id": queue["query_id"], "expected_accuracy": [0.7, 0.7, 0.95, 0.0, 0.7]})
    audited = queue["query_id"].head(4)  # q004 is not audited
    audit_rows = pl.DataFrame(
        {"query_id": audited + AUDIT_SUFFIX, "expected_accuracy": [0.9] * 4, "models": [["big"]] * 4}
    )
    audit_results = pl.DataFrame(
        {"query_id": audited + AUDIT_SUFFIX, "answer": ["A", "B", "B", "B"], "status": ["done"] * 4}
    )
    out, swapped = deliver_references(results, plan, audit_rows, audit_results, queue)
    assert swapped == [queue["query_id"][1], queue["query_id"][3]]
    assert out["answer"].to_list() == ["A", "B", "A", "B", "A"]  # agree; likelier; the plan is likelier; missing
    assert out["status"].to_list() == ["done"] * 5
    assert out["error"][3] is None
    assert out["models_called"][1].to_list() == ["small", "big"]
    assert [n == AUDIT_DELIVERED_NOTE for n in out["note"].to_list()] == [False, True, False, True, False]
    assert out["cost_usd"].to_list() == results["cost_usd"].to_list()  # the reference's spend is the audit's
    assert out.columns == results.columns


def _synthetic_batch(seed: int, n: int = 400, accuracy: float = 0.85, share: float = 0.25) -> dict:
    """A batch whose truth is known to the test only: the delivered answer is right ("A") with ``accuracy``; a
    uniform ``share`` is audited by a reference right 90% of the time whose wrong answers hit the delivered
    wrong one 5% of the time (s = 0.9, q = 0.05, as the audit fit's history counts say). No gold column
    reaches ``estimate_audit``."""
    import numpy as np

    from batchplan.plans.audit import AuditFit

    rng = np.random.default_rng(seed)
    ids = [f"q{i:04d}" for i in range(n)]
    right = rng.random(n) < accuracy
    delivered = np.where(right, "A", "B")
    queue = pl.DataFrame({"query_id": ids, "task": "t", "labels": [["A", "B", "C", "D"]] * n})
    results = pl.DataFrame({"query_id": ids, "status": "done", "answer": delivered})
    calls = pl.DataFrame({"query_id": ids, "model": "small", "answer": delivered, "status": "ok"})
    audited = audited_ids(ids, share, f"synthetic{seed}")
    u = rng.random(len(audited))
    reference = np.where(u < 0.9, "A", np.where(u < 0.95, "B", "C"))
    audit_rows = pl.DataFrame(
        {"query_id": [audit_id(q) for q in audited], "kind": "single", "models": [["big"]] * len(audited),
         "fitted_reference": True, "expected_accuracy": 0.9}
    )
    audit_results = pl.DataFrame(
        {"query_id": audit_rows["query_id"], "status": "done", "answer": reference, "cost_usd": 0.01}
    )
    audit_fit = AuditFit(references={"t": {"kind": "single", "models": ["big"], "accuracy": 0.9}},
                           rates={"t": {"small": [270, 300, 15, 300]}})  # fmt: skip
    return {
        "inputs": {"plan": pl.DataFrame({"query_id": ids, "expected_accuracy": 0.65}), "results": results,
                   "audit_plan_rows": audit_rows, "audit_results": audit_results, "calls": calls, "queue": queue,
                   "predictions": pl.DataFrame({"query_id": ids, "model": "small", "p_correct": 0.65}),
                   "audit_fit": audit_fit, "seed": f"synthetic{seed}"},
        "realized": float(right.mean()),
        "ids": ids,
        "right": right,
    }


def test_the_difference_estimator_corrects_a_biased_posterior_without_gold() -> None:
    """A posterior ~19 points pessimistic (a batch easier than the history): the run's mean posterior misses by
    that much; with a uniform audited sample the difference estimator is unbiased (mean miss over many batches
    ~0), and its interval holds the realized accuracy."""
    import numpy as np

    from batchplan.plans.audit import AuditInputs, estimate_audit

    misses, base_misses, covered = [], [], 0
    for seed in range(40):
        batch = _synthetic_batch(seed)
        # the run's own posterior: informative (higher where right) but ~19 points low on average
        p = np.where(batch["right"], 0.7, 0.45)
        base = pl.DataFrame({"query_id": batch["ids"], "p": p})
        found = estimate_audit(AuditInputs(**batch["inputs"], base=base))
        misses.append(found["estimated_accuracy"] - batch["realized"])
        base_misses.append(found["base_accuracy"] - batch["realized"])
        low, high = found["ci95"]
        covered += low <= batch["realized"] <= high
        assert found["method"].startswith("difference estimator")
    assert float(np.mean(base_misses)) < -0.18  # the posterior alone: ~19 points off (0.66 against 0.85)
    assert abs(float(np.mean(misses))) < 0.015  # the difference estimator: unbiased
    assert covered >= 36  # 95% interval: at least 90% of 40 batches


def test_the_estimate_counts_the_references_delivered_and_stays_unbiased_for_the_delivered_answers() -> None:
    """Audited queries whose reference (right 90%) disagrees with the plan's answer (right 85%, promised 65%)
    are delivered the reference: the delivered batch is more accurate than the plan's own answers, and the
    estimate follows it (mean miss over many batches ~0, interval holding it) where the plan's own estimate
    alone would fall short by the swaps' gain."""
    import numpy as np

    from batchplan.app.pipeline import settle_audits
    from batchplan.plans.audit import AuditInputs

    misses, plan_misses, gains, covered = [], [], [], 0
    for seed in range(40):
        batch = _synthetic_batch(seed, share=0.5)
        results = batch["inputs"]["results"].with_columns(
            models_called=pl.lit(["small"]), cost_usd=pl.lit(0.01), error=pl.lit(None, pl.String), note=pl.lit(None, pl.String)
        )
        inputs = AuditInputs(**(batch["inputs"] | {"results": results}))
        delivered, audited, _ = settle_audits(inputs)
        right = delivered.sort("query_id")["answer"].to_numpy() == "A"
        realized = float(right.mean())
        assert audited["delivered_references"] > 0
        misses.append(audited["estimated_accuracy"] - realized)
        plan_misses.append(audited["estimated_accuracy"] - audited["delivered_gain"] - realized)
        gains.append(realized - batch["realized"])
        low, high = audited["ci95"]
        covered += low <= realized <= high
    assert float(np.mean(gains)) > 0.01  # the swaps make the delivered batch better than the plan's answers
    assert float(np.mean(plan_misses)) < -0.01  # which the plan's own estimate misses
    assert abs(float(np.mean(misses))) < 0.01  # the delivered estimate: unbiased
    assert covered >= 36


def test_the_difference_estimator_keeps_a_calibrated_posterior_where_the_audit_says_nothing() -> None:
    """Rows the audit cannot tell apart (the delivered answer is the reference's own LLM) carry no correction:
    the estimate is the posterior's mean, and a task with no audited query keeps its posterior."""
    from batchplan.plans.audit import AuditInputs, estimate_audit

    batch = _synthetic_batch(0)
    inputs = batch["inputs"]
    inputs["calls"] = inputs["calls"].with_columns(pl.lit("big").alias("model"))  # the reference's own LLM
    base = pl.DataFrame({"query_id": batch["ids"], "p": 0.8})
    found = estimate_audit(AuditInputs(**inputs, base=base))
    assert found["base_accuracy"] == pytest.approx(0.8)
    assert found["estimated_accuracy"] == pytest.approx(0.8, abs=0.03)  # only the realized-vs-expected spread


def test_a_correction_inside_its_own_noise_is_shrunk_to_the_posterior() -> None:
    """Two audited queries say almost nothing: the estimate stays near the posterior's mean (the correction
    is shrunk), while a correction far outside its noise is kept nearly whole."""
    import numpy as np

    from batchplan.plans.audit import AuditInputs, correction_shrink, estimate_audit

    rng = np.random.default_rng(0)
    assert correction_shrink(rng.normal(0.05, 0.3, 4000)) == 0.0
    assert correction_shrink(rng.normal(0.2, 0.04, 4000)) > 0.9
    batch = _synthetic_batch(3, share=0.005)  # 2 of 400 audited
    base = pl.DataFrame({"query_id": batch["ids"], "p": 0.8})
    found = estimate_audit(AuditInputs(**batch["inputs"], base=base))
    assert found["audited"] == 2
    assert found["estimated_accuracy"] == pytest.approx(0.8)  # nothing kept: the posterior itself
    assert found["per_task"][0]["correction_kept"] == 0.0  # below MIN_CORRECTION_ROWS audited queries


def test_live_labels_outside_the_history_are_said_as_drift() -> None:
    """A provider silently degraded an LLM: its live labels (the live correction's rows) read 3 of 12 right where
    the history predicted 0.9; the report's drift names it, with the labels' interval, in its first lines. An
    LLM whose labels agree with the history, a task not in tonight's queue, and an LLM with fewer than
    MIN_LABEL_ROWS labels say nothing."""
    import numpy as np

    from batchplan.plans.audit import MIN_LABEL_ROWS, drift_lines, label_drift
    from batchplan.predictors.live import LiveCorrection

    rows = [("t", "bad", [1] * 3 + [0] * 9), ("t", "good", [1] * 11 + [0]), ("u", "bad", [0] * 12),
            ("t", "few", [0] * (MIN_LABEL_ROWS - 1))]  # fmt: skip
    task = np.array([t for t, _, ys in rows for _ in ys])
    model = np.array([m for _, m, ys in rows for _ in ys])
    y = np.array([v for _, _, ys in rows for v in ys], dtype=float)
    live = LiveCorrection.fit(task, model, y, np.full(len(y), 0.9), np.ones(len(y)), np.ones(len(y), dtype=bool))
    found = label_drift(live.offsets, {"t"})
    assert [(d["name"], d["task"], d["direction"], d["calls"]) for d in found] == [("bad", "t", "worse", 12)]
    assert found[0]["ci95"][1] < found[0]["predicted_accuracy"] == pytest.approx(0.9)
    (line,) = drift_lines({"drift": found})
    assert line.startswith("DRIFT: LLM bad on t is worse than the history says: labelled accuracy 25.0% over 12 labels")
