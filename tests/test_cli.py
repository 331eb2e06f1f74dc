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
    # the duplicate differs from its original: both copies are quarantined, with the broken and empty rows
    assert pl.read_parquet(tmp_path / "plan.quarantine.parquet").height == 4


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
    assert f"quarantined 4 rows -> {out / 'quarantine.parquet'}" in output.replace("\n", "")
    results = pl.read_parquet(out / "results.parquet")
    assert results.schema == RESULT_SCHEMA
    report = json.loads((out / "report.json").read_text())
    assert report["spend_usd"] <= 0.01 + 1e-12
    assert report["quarantined"] == 4
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
    # Another budget into the same run would be reported but not enforced (the stored plan stands): refused.
    changed = runner.invoke(app, [*args[:6], "0.5", *args[7:]])
    assert changed.exit_code == 2, changed.output
    message = " ".join(changed.output.split())
    assert "was planned for another request (budget_usd: 0.01 -> 0.5)" in message
    assert "write this run to a new --out directory" in message
    assert json.loads((out / "report.json").read_text())["budget_usd"] == 0.01


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


def test_a_constraint_naming_what_the_batch_lacks_exits_2(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    tenant = load_history(history_dir).queries["dataset"][0]
    common = ["--queue", queue, "--model", models, "--budget-usd", "0.01", "--backend", "replay"]
    common += ["--replay-history", history_dir]
    typos = ["--tenant-budget", f"{tenant}x=0.5", "--max-calls", "gpt-5=10", "--task-floor", "mbbp=0.5"]
    result = runner.invoke(app, ["plan", *common, *typos, "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"tenant budget: tenant '{tenant}x' is not in this batch (tenants, closest first: '{tenant}')" in message
    assert "max calls: model 'gpt-5' is not in this batch" in message
    assert "task floor: task 'mbbp' is not in this batch" in message
    assert not (tmp_path / "p.parquet").exists()
    # opted in (a config naming every tenant): it runs, and the report lists what bound nothing
    out = tmp_path / "run"
    _run(["run", *common, "--tenant-budget", "acme=0.5", "--allow-unused-constraints", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["unused_constraints"] == ["tenant budget: tenant 'acme' is not in this batch"]
    assert "Constraint that bound nothing: tenant budget: tenant 'acme'" in (out / "report.md").read_text()
    assert "Constraint that bound nothing" in (out / "report.html").read_text()


def test_queries_the_replay_history_cannot_answer_fail_and_the_rest_run(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    rows = Path(queue).read_text().splitlines()
    unknown = [
        json.dumps({"query_id": f"new-{i}", "prompt": f"a question nobody recorded {i}", "task": "mmlu2"})
        for i in range(2)
    ]
    (tmp_path / "queue.jsonl").write_text("\n".join([*rows, *unknown]) + "\n")
    out = tmp_path / "run"
    common = ["--model", models, "--budget-usd", "0.01", "--backend", "replay", "--replay-history", history_dir]
    _run(["run", "--queue", str(tmp_path / "queue.jsonl"), *common, "--out", str(out)])
    results = pl.read_parquet(out / "results.parquet")
    failed = results.filter(pl.col("query_id").str.starts_with("new-"))
    assert failed["status"].to_list() == ["failed", "failed"]
    assert set(failed["error"].to_list()) == {
        "no LLM the backend offers can answer this query: the replay history has no outcome for it"
    }
    report = json.loads((out / "report.json").read_text())
    assert report["status"]["failed"] >= 2
    assert report["status"]["done"] > 0
    # a task the predictor never saw is named, not guessed at silently
    assert report["unseen_tasks"] == ["mmlu2"]
    assert "Tasks the predictor never saw: mmlu2" in (out / "report.md").read_text()
    planned = " ".join(
        _run(["plan", "--queue", str(tmp_path / "queue.jsonl"), *common, "--out", str(tmp_path / "p.parquet")]).split()
    )
    assert "note: 2 queries no offered model can answer (plan kind 'unanswerable')" in planned
    assert "note: Tasks the predictor never saw: mmlu2" in planned
