"""Report figures on a hand-built history where every number can be checked by hand."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batchplan.report import Truth, baselines, build_report, render_html, render_markdown, score_results, write_report
from batchplan.storage import Storage

# Two queries, two models: cheap is right on q1 only, dear is right on both.
OUTCOMES = pl.DataFrame(
    {
        "query_id": ["q1", "q1", "q2", "q2"],
        "model": ["cheap", "dear", "cheap", "dear"],
        "answer": ["A", "A", "B", "A"],
        "correct": [True, True, False, True],
        "cost_usd": [1.0, 10.0, 1.0, 10.0],
    }
)
TRUTH = Truth(outcomes=OUTCOMES, gold=pl.DataFrame({"query_id": ["q1", "q2"], "gold": ["A", "A"]}))
TASKS = pl.DataFrame({"query_id": ["q1", "q2"], "task": ["t", "t"]})
PLAN = pl.DataFrame(
    {
        "query_id": ["q1", "q2"],
        "kind": ["single", "single"],
        "models": [["cheap"], ["dear"]],
        "expected_cost_usd": [1.0, 10.0],
        "expected_accuracy": [0.9, 0.8],
        "reserve_cost_usd": [1.0, 10.0],
        "thresholds": [None, None],
    },
    schema_overrides={"thresholds": pl.List(pl.Float64)},
)
RESULTS = pl.DataFrame(
    {
        "query_id": ["q1", "q2"],
        "answer": ["A", "A"],
        "models_called": [["cheap"], ["dear"]],
        "cost_usd": [1.0, 10.0],
        "status": ["done", "done"],
        "error": [None, None],
    },
    schema_overrides={"error": pl.String},
)


def test_score_uses_the_recorded_verdict_and_counts_deferred_as_wrong() -> None:
    deferred = RESULTS.with_columns(
        pl.when(pl.col("query_id") == "q2").then(pl.lit("deferred")).otherwise("status").alias("status")
    )
    assert score_results(RESULTS, TRUTH)["correct"].to_list() == [True, True]
    assert score_results(deferred, TRUTH)["correct"].to_list() == [True, False]


@pytest.mark.parametrize(
    ("budget", "cheapest", "oracle"),
    [(None, 0.5, 1.0), (11.0, 0.5, 1.0), (1.5, 0.5, 0.5), (0.5, 0.0, 0.0)],
)
def test_baselines_at_the_same_budget(budget: float | None, cheapest: float, oracle: float) -> None:
    rows = {
        r["policy"].split(" (")[0].split(",")[0]: r
        for r in baselines(pl.Series(["q1", "q2"]), TRUTH, budget, {"t": "dear"}, TASKS)
    }
    assert rows["cheapest model"]["accuracy"] == pytest.approx(cheapest)
    assert rows["oracle"]["accuracy"] == pytest.approx(oracle)
    assert rows["best single model"]["accuracy"] == pytest.approx(1.0)
    assert rows["best single model"]["spend_usd"] == pytest.approx(20.0)  # at its own cost, whatever the budget
    if budget is not None:
        for name in ("cheapest model", "random model", "oracle"):
            assert rows[name]["spend_usd"] <= budget


def test_report_files(tmp_path: Path) -> None:
    report = build_report(
        results=RESULTS,
        plan=PLAN,
        budget_usd=12.0,
        quarantined=3,
        truth=TRUTH,
        reference_models={"t": "dear"},
        queue=TASKS,
        run_id="r1",
    )
    assert report["accuracy"] == 1.0
    assert report["spend_usd"] == 11.0
    assert report["status"] == {"done": 2, "failed": 0, "deferred": 0}
    assert {m["model"]: m["share"] for m in report["model_share"]} == {"cheap": 0.5, "dear": 0.5}
    # the best single model ("dear") is right on both at 20 USD: we pay 11
    assert report["savings"] == pytest.approx({"spend_saved_pct": 45.0, "accuracy_delta_pts": 0.0})
    paths = write_report(report, str(tmp_path), Storage())
    assert set(paths) == {"json", "md", "html"}
    assert "oracle" in render_markdown(report)
    assert "<table>" in render_html(report)
    assert Path(paths["html"]).read_text().startswith("<!doctype html>")


def test_report_without_truth_has_no_accuracy() -> None:
    report = build_report(results=RESULTS, plan=PLAN, budget_usd=12.0)
    assert report["accuracy"] is None
    assert report["baselines"] == []
    assert "n/a" in render_markdown(report)


def test_report_per_tenant_spend_against_budgets() -> None:
    queue = TASKS.with_columns(pl.Series("tenant", ["acme", "globex"]))
    deferred = RESULTS.with_columns(
        pl.when(pl.col("query_id") == "q2").then(pl.lit("deferred")).otherwise("status").alias("status"),
        pl.when(pl.col("query_id") == "q2").then(0.0).otherwise("cost_usd").alias("cost_usd"),
    )
    report = build_report(
        results=deferred,
        plan=PLAN,
        budget_usd=12.0,
        truth=TRUTH,
        reference_models={"t": "dear"},
        queue=queue,
        tenant_budgets_usd={"globex": 5.0},
    )
    assert report["per_tenant"] == [
        {"tenant": "acme", "queries": 1, "deferred": 0, "spend_usd": 1.0, "accuracy": 1.0, "budget_usd": None},
        {"tenant": "globex", "queries": 1, "deferred": 1, "spend_usd": 0.0, "accuracy": 0.0, "budget_usd": 5.0},
    ]
    assert "| globex | 1 | 1 | 0.0% | 0.0000 | 5.0000 |" in render_markdown(report)
    assert "<h2>Per tenant</h2>" in render_html(report)
    untruthful = build_report(results=deferred, plan=PLAN, budget_usd=12.0, queue=queue)
    assert [t["accuracy"] for t in untruthful["per_tenant"]] == [None, None]
