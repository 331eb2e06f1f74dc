"""Report figures on a hand-built history where every number can be checked by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from batchplan.app.report import (
    OPTIMIZER_GLOSSARY,
    Report,
    Truth,
    baseline_policies,
    build_report,
    render_html,
    render_markdown,
    score_results,
    write_report,
)
from batchplan.core.storage import Storage
from batchplan.dispatchers import spend_by_model
from batchplan.plans.candidates import build_candidates
from batchplan.plans.frontier import frontier_uri, plan_frontier, read_frontier, write_frontier
from batchplan.plans.planning import PlanRequest, plan_batch

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
QUEUE_WITH_TENANTS = TASKS.with_columns(pl.Series("tenant", ["acme", "globex"]))
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
    rows = baseline_policies(pl.Series(["q1", "q2"]), TRUTH, budget, {"t": "dear"}, TASKS)
    assert rows["cheapest model"]["accuracy"] == pytest.approx(cheapest)
    assert rows["oracle"]["accuracy"] == pytest.approx(oracle)
    assert rows["best single model"]["accuracy"] == pytest.approx(1.0)
    assert rows["best single model"]["spent_usd"] == pytest.approx(20.0)  # at its own cost, whatever the budget
    if budget is not None:
        for name in ("cheapest model", "random model", "oracle"):
            assert rows[name]["spent_usd"] <= budget


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
    assert report.accuracy == 1.0
    assert report.spent_usd == 11.0
    assert report.status == {"done": 2, "failed": 0, "deferred": 0}
    assert {m["model"]: m["share"] for m in report.model_share} == {"cheap": 0.5, "dear": 0.5}
    # the best single model ("dear") is right on both at 20 USD: we pay 11
    assert report.savings == pytest.approx({"spend_saved_pct": 45.0, "accuracy_delta_pts": 0.0})
    paths = write_report(report, str(tmp_path), Storage())
    assert set(paths) == {"json", "md", "html"}
    assert "oracle" in render_markdown(report)
    assert "<table>" in render_html(report)
    assert Path(paths["html"]).read_text().startswith("<!doctype html>")


def test_report_without_truth_has_no_accuracy() -> None:
    report = build_report(results=RESULTS, plan=PLAN, budget_usd=12.0)
    assert report.accuracy is None
    assert report.baselines == []
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
    assert report.per_tenant == [
        {"tenant": "acme", "queries": 1, "deferred": 0, "spent_usd": 1.0, "accuracy": 1.0, "budget_usd": None},
        {"tenant": "globex", "queries": 1, "deferred": 1, "spent_usd": 0.0, "accuracy": 0.0, "budget_usd": 5.0},
    ]
    assert "| globex | 1 | 1 | 0.0% | 0.0000 | 5.0000 |" in render_markdown(report)
    assert "<h2>Per tenant</h2>" in render_html(report)
    untruthful = build_report(results=deferred, plan=PLAN, budget_usd=12.0, queue=queue)
    assert [t["accuracy"] for t in untruthful.per_tenant or []] == [None, None]


def _html_rows(page: str) -> list[list[str]]:
    """Every table row of an HTML report, as cell texts."""
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]


def test_baselines_tell_deferred_from_unrecorded_and_answered() -> None:
    # q3 has an answer from "dear" only: the cheapest model ("cheap") cannot be replayed there
    outcomes = pl.concat(
        [
            OUTCOMES,
            pl.DataFrame(
                {"query_id": ["q3"], "model": ["dear"], "answer": ["A"], "correct": [True], "cost_usd": [10.0]}
            ),
        ]
    )
    truth = Truth(outcomes=outcomes, gold=pl.DataFrame({"query_id": ["q1", "q2", "q3"], "gold": ["A", "A", "A"]}))
    tasks = pl.DataFrame({"query_id": ["q1", "q2", "q3"], "task": ["t", "t", "t"]})
    rows = baseline_policies(pl.Series(["q1", "q2", "q3"]), truth, 1.5, {"t": "dear"}, tasks)
    cheapest = rows["cheapest model"]  # q1 at $1 fits the budget, q2 would pass it, q3 has no recorded answer
    assert (cheapest["answered"], cheapest["deferred"], cheapest["unrecorded"]) == (1, 1, 1)
    assert cheapest["accuracy"] == pytest.approx(1 / 3)
    assert cheapest["accuracy_answered"] == pytest.approx(1.0)
    best = rows["best single model"]
    assert (best["answered"], best["deferred"], best["unrecorded"]) == (3, 0, 0)
    oracle = rows["oracle"]  # every query has a right answer; only q1's cheapest ($1) fits
    assert (oracle["answered"], oracle["deferred"], oracle["unrecorded"]) == (1, 2, 0)
    for row in rows.values():
        assert row["answered"] + row["deferred"] + row["unrecorded"] == 3


def sample_report(**overrides: object) -> Report:
    args: dict = {
        "results": RESULTS,
        "plan": PLAN,
        "budget_usd": 12.0,
        "truth": TRUTH,
        "reference_models": {"t": "dear"},
        "queue": TASKS,
        "run_id": "r1",
        "optimizer": {
            "status": "optimal",
            "bound": 1.7,
            "gap": 0.001,
            "shadow_prices": {"budget": 0.02},
            "templates_withheld": ["t"],
        },
    }
    return build_report(**(args | overrides))


def test_html_shows_answered_and_deferred_beside_each_baseline() -> None:
    rows = _html_rows(render_html(sample_report(budget_usd=1.5)))
    header = next(r for r in rows if r[:1] == ["policy"])
    assert header[3:7] == ["answered", "deferred", "failed", "no recorded answer"]
    cheapest = next(r for r in rows if r[:1] == ["cheapest model"])
    assert cheapest == ["cheapest model", "50.0%", "100.0%", "1", "1", "-", "0", "1.0000"]
    this_run = next(r for r in rows if r[:1] == ["batchplan (this run)"])
    assert this_run[3:6] == ["2", "0", "0"]


def test_signed_differences_read_right() -> None:
    dearer = RESULTS.with_columns(pl.Series("cost_usd", [25.0, 10.0]))  # $35 against the best single model's $20
    text = render_markdown(sample_report(results=dearer))
    assert "75% more spend" in text
    assert "less spend" not in text
    assert "-75%" not in text
    cheaper = render_markdown(sample_report())
    assert "45% less spend, the same accuracy" in cheaper
    worse = RESULTS.with_columns(pl.Series("answer", ["A", "B"]))
    assert "50.0 accuracy points lower" in render_markdown(sample_report(results=worse))


def test_markdown_and_html_have_the_same_sections() -> None:
    report = sample_report(queue=QUEUE_WITH_TENANTS)
    md_sections = re.findall(r"^## (.+)$", render_markdown(report), flags=re.MULTILINE)
    html_sections = re.findall(r"<h2>(.*?)</h2>", render_html(report))
    assert md_sections == html_sections
    assert {"Deferred and failed", "Plan", "Per tenant", "Optimizer", "Spend against budget"} <= set(md_sections)


def test_the_optimizer_figures_are_explained() -> None:
    report = sample_report()
    md, page = render_markdown(report), render_html(report)
    for term in ("shadow price:", "bound:", "gap:", "templates withheld:"):
        line = next(line for line in OPTIMIZER_GLOSSARY if line.startswith(term))
        assert line in md
        assert line.replace("'", "&#x27;") in page


def test_per_task_planned_against_realized_and_spend_per_model() -> None:
    report = sample_report()
    assert report.per_task == [
        {"task": "t", "queries": 2, "planned_accuracy": pytest.approx(0.85), "accuracy": 1.0, "spent_usd": 11.0}
    ]
    # without a ledger, one-call queries give each model's spend
    assert report.spend_per_model == [
        {"model": "dear", "calls": 1, "spent_usd": 10.0},
        {"model": "cheap", "calls": 1, "spent_usd": 1.0},
    ]
    page = render_html(report)
    assert page.count("<svg") == 3
    for title in ("Planned against realized accuracy per task", "Spend per model"):
        assert f"<title>{title}</title>" in page


def test_spend_by_model_reads_the_ledger_once_per_call(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    calls = [
        {"e": "i", "q": "q1", "c": "0:cheap:0", "m": "cheap", "r": 2.0},
        {"e": "c", "q": "q1", "c": "0:cheap:0", "m": "cheap", "s": "ok", "usd": 1.0},
        {"e": "c", "q": "q1", "c": "1:dear:0", "m": "dear", "s": "ok", "usd": 10.0},  # a cascade's second call
    ]
    (ledger / "a.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    (ledger / "b.jsonl").write_text(json.dumps(calls[1]) + "\n")  # a rerun that found the same call
    assert spend_by_model(Storage(), str(tmp_path)) == {"cheap": 1.0, "dear": 10.0}


def test_the_frontier_is_the_plan_at_a_range_of_budgets(tmp_path: Path) -> None:
    queue = pl.DataFrame(
        {"query_id": [f"q{i}" for i in range(6)], "tenant": ["a"] * 6, "task": ["t"] * 6, "priority": [1.0] * 6}
    )
    predictions = pl.DataFrame(
        {
            "query_id": [f"q{i}" for i in range(6) for _ in range(2)],
            "model": ["cheap", "dear"] * 6,
            "p_correct": [0.5, 0.9] * 6,
            "cost_usd": [1.0, 10.0] * 6,
            "cost_high_usd": [1.0, 10.0] * 6,
        }
    )
    outcome = plan_batch(build_candidates(queue, predictions), PlanRequest(budget_usd=24.0))
    rows = plan_frontier(outcome, 24.0)
    assert 8 <= len(rows) <= 12
    budgets = [r["budget_usd"] for r in rows]
    assert 24.0 in budgets
    assert max(budgets) == pytest.approx(60.0)  # every query on its most accurate model
    accuracies = [r["planned_accuracy"] for r in rows]
    assert accuracies == sorted(accuracies)
    assert accuracies[-1] == pytest.approx(0.9)
    assert all(r["planned_cost_usd"] <= r["budget_usd"] + 1e-9 for r in rows)
    uri = frontier_uri(str(tmp_path / "plan.parquet"))
    assert uri.endswith("plan.frontier.json")
    write_frontier(Storage(), uri, rows)
    assert read_frontier(Storage(), uri) == rows
    assert read_frontier(Storage(), str(tmp_path / "nothing.json")) == []
    report = sample_report(frontier=rows)
    assert report.frontier == rows
    assert "| 24.0000 |" in render_markdown(report)
    assert "<title>Cost against accuracy: the frontier, this run and the baselines</title>" in render_html(report)


def test_reasons_not_answered_are_grouped_whatever_the_amounts() -> None:
    short = RESULTS.with_columns(
        pl.lit("deferred").alias("status"),
        pl.Series(
            "error",
            [
                "total budget: gpt-4o needs up to 0.000268 USD, 3e-05 USD left",
                "total budget: gpt-4o needs up to 0.000309 USD, 1.5e-05 USD left",
            ],
        ),
    )
    report = sample_report(results=short)
    assert report.not_answered == [
        {"status": "deferred", "reason": "total budget: gpt-4o needs up to … USD, … USD left", "queries": 2}
    ]
    assert "| deferred | total budget: gpt-4o needs up to … USD, … USD left | 2 |" in render_markdown(report)


def test_report_json_keeps_its_keys_and_reads_back() -> None:
    written = sample_report().as_json()
    assert list(written) == [
        "run_id", "created", "queries", "quarantined", "status", "budget_usd", "spent_usd", "planned_cost_usd",
        "planned_accuracy", "estimated_accuracy", "estimated_accuracy_source", "plan_kinds", "model_share",
        "calls_per_model", "spend_per_model", "not_answered", "optimizer", "unused_constraints", "unseen_tasks",
        "frontier", "accuracy", "accuracy_answered", "baselines", "rounds", "accuracy_known_for", "per_task",
        "savings",
    ]  # fmt: skip
    bare = build_report(results=RESULTS, plan=PLAN, budget_usd=12.0).as_json()
    assert not {"per_tenant", "accuracy_known_for", "per_task", "audit", "drift", "estimated_accuracy_ci95"} & set(bare)
    # a key a newer writer added survives a re-render (batchplan label reads report.json back)
    newer = written | {"spend_per_round": [{"round": 1, "spent_usd": 1.0}]}
    assert Report.from_json(newer).as_json() == newer
    assert Report.from_json(newer).savings == written["savings"]


def test_plan_kinds_come_in_one_order_run_after_run() -> None:
    """polars' group_by gives its groups in no fixed order: unsorted, two renders of one run (and two runs of
    bench/quality.py, which counts kinds the same way) printed the same counts in different orders."""
    plan = PLAN.with_columns(pl.Series("kind", ["single", "cascade"]))
    for _ in range(20):
        kinds = build_report(results=RESULTS, plan=plan, budget_usd=12.0).as_json()["plan_kinds"]
        assert list(kinds) == ["cascade", "single"]
