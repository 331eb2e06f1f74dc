"""The CLI end to end: train -> plan -> run on real data (cascades), local and on S3, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from batchplan.cli import app
from batchplan.contracts import PLAN_SCHEMA, RESULT_SCHEMA
from batchplan.history import load_history, synthetic_history, with_holdout
from batchplan.storage import Storage, join

runner = CliRunner()


@pytest.fixture(scope="module")
def history_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    real = data_dir / "cascades"
    if (real / "queries.parquet").exists():
        return str(real)
    target = tmp_path_factory.mktemp("synthetic")
    history = synthetic_history(600, 6, seed=4)
    history.queries.write_parquet(target / "queries.parquet")
    history.outcomes.write_parquet(target / "outcomes.parquet")
    history.prices.write_csv(target / "models.csv")
    return str(target)


@pytest.fixture(scope="module")
def trained(history_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A model trained by the CLI and a queue of the held-out queries with a few bad rows appended."""
    root = tmp_path_factory.mktemp("cli")
    result = runner.invoke(app, ["train", "--history", history_dir, "--out", str(root / "models")])
    assert result.exit_code == 0, result.output
    queue = with_holdout(load_history(history_dir)).as_queue("test")
    lines = [json.dumps(r) for r in queue.to_dicts()]
    lines += [
        json.dumps({"query_id": queue["query_id"][0], "prompt": "duplicate"}),
        "{broken",
        json.dumps({"query_id": "z", "prompt": ""}),
    ]
    (root / "queue.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "models"), str(root / "queue.jsonl")


def _run(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_plan_writes_one_plan_per_valid_query(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    out = tmp_path / "plan.parquet"
    _run(
        [
            "plan",
            "--queue",
            queue,
            "--model",
            models,
            "--budget-usd",
            "0.01",
            "--out",
            str(out),
            "--backend",
            "replay",
            "--replay-history",
            history_dir,
        ]
    )
    plan = pl.read_parquet(out)
    assert plan.schema == PLAN_SCHEMA
    assert plan["query_id"].is_unique().all()
    assert plan["expected_cost_usd"].sum() <= 0.01 + 1e-9
    assert pl.read_parquet(tmp_path / "plan.quarantine.parquet").height == 3


def test_run_replays_within_budget_and_resumes(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    out = tmp_path / "run"
    args = [
        "run",
        "--queue",
        queue,
        "--model",
        models,
        "--budget-usd",
        "0.01",
        "--backend",
        "replay",
        "--replay-history",
        history_dir,
        "--out",
        str(out),
    ]
    output = _run(args)
    assert "oracle" in output
    results = pl.read_parquet(out / "results.parquet")
    assert results.schema == RESULT_SCHEMA
    report = json.loads((out / "report.json").read_text())
    assert report["spend_usd"] <= 0.01 + 1e-12
    assert report["quarantined"] == 3
    assert report["queries"] == results.height
    assert report["accuracy"] is not None
    assert (out / "report.html").exists()
    # Running the same command again pays nothing more.
    _run(args)
    again = json.loads((out / "report.json").read_text())
    assert again["spend_usd"] == pytest.approx(report["spend_usd"])
    # (a deferred query is retried; its message may word the remaining budget differently)
    columns = ["query_id", "answer", "models_called", "cost_usd", "status"]
    rerun = pl.read_parquet(out / "results.parquet").select(columns).sort("query_id")
    assert rerun.equals(results.select(columns).sort("query_id"))


def test_run_holds_each_tenant_to_its_budget(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    out = tmp_path / "run"
    tenant = load_history(history_dir).queries["dataset"][0]  # the queue's tenant: its data set
    common = ["--model", models, "--backend", "replay", "--replay-history", history_dir, "--out", str(out)]
    _run(["run", "--queue", queue, "--budget-usd", "0.01", "--tenant-budget", f"{tenant}=0.004", *common])
    manifest = json.loads((out / "dispatch" / "manifest.json").read_text())
    assert manifest["tenant_budgets_usd"] == {tenant: 0.004}
    assert 0 < manifest["tenant_spent_usd"][tenant] <= 0.004
    assert json.loads((out / "report.json").read_text())["spend_usd"] <= 0.004 + 1e-12


def test_run_on_s3(
    trained: tuple[str, str], history_dir: str, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchplan.settings import get_settings

    monkeypatch.setenv("BATCHPLAN_S3_ENDPOINT_URL", s3_endpoint)
    get_settings.cache_clear()
    storage = Storage(s3_endpoint_url=s3_endpoint)
    models, queue = trained
    queue_uri = join(s3_bucket, "queue", "2026-11-22", "part-0.jsonl")
    storage.write_bytes(queue_uri, Path(queue).read_bytes())
    out = join(s3_bucket, "results", "run-1")
    try:
        _run(
            [
                "run",
                "--queue",
                join(s3_bucket, "queue", "2026-11-22"),
                "--model",
                models,
                "--budget-usd",
                "0.02",
                "--backend",
                "replay",
                "--replay-history",
                history_dir,
                "--out",
                out,
            ]
        )
    finally:
        get_settings.cache_clear()
    report = json.loads(storage.read_text(join(out, "report.json")))
    assert report["spend_usd"] <= 0.02 + 1e-12
    assert storage.read_frame(join(out, "results.parquet")).height == report["queries"]
    assert storage.exists(join(out, "quarantine.parquet"))


def test_infeasible_budget_is_one_clear_line(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    result = runner.invoke(
        app,
        [
            "plan",
            "--queue",
            queue,
            "--model",
            models,
            "--budget-usd",
            "0.0000001",
            "--out",
            str(tmp_path / "p.parquet"),
            "--backend",
            "replay",
            "--replay-history",
            history_dir,
        ],
    )
    assert result.exit_code == 2
    assert "budget" in result.output.lower()
    assert "Traceback" not in result.output
    assert not (tmp_path / "p.parquet").exists()


def test_missing_budget_and_target_is_refused(trained: tuple[str, str], tmp_path: Path) -> None:
    models, queue = trained
    result = runner.invoke(app, ["plan", "--queue", queue, "--model", models, "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2
    assert "budget" in result.output


def test_run_in_rounds_writes_each_round_and_reports_its_estimate(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    out = tmp_path / "run"
    base = ["run", "--queue", queue, "--model", models, "--budget-usd", "0.01", "--backend", "replay"]
    args = [*base, "--replay-history", history_dir, "--out", str(out), "--rounds", "3"]
    output = _run(args)
    assert "estimated after the run" in output
    report = json.loads((out / "report.json").read_text())
    assert 0.0 < report["estimated_accuracy"] <= 1.0
    assert report["spend_usd"] <= 0.01 + 1e-12
    assert (out / "rounds" / "1" / "calls.parquet").exists()
    assert (out / "rounds" / "3" / "observations.parquet").exists()
    assert not (out / "dispatch").exists()  # the rounds' own ledgers, not the single-shot one
    results = pl.read_parquet(out / "results.parquet")
    assert results.schema == RESULT_SCHEMA
    assert report["queries"] == results.height
    # bad flags: one line, exit 2, nothing sent
    bad = runner.invoke(app, [*base, "--replay-history", history_dir, "--out", str(tmp_path / "x"), "--rounds", "0"])
    assert bad.exit_code == 2
    unknown = [*base, "--replay-history", history_dir, "--out", str(tmp_path / "y"), "--rounds", "2"]
    bad = runner.invoke(app, [*unknown, "--round-planner", "oracle"])
    assert bad.exit_code == 2
    assert "--round-planner 'oracle'" in bad.output
    assert not (tmp_path / "y" / "rounds").exists()
