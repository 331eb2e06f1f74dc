"""`batchplan run --backend openai --batch-api` and `batchplan cancel` end to end against the local Batches
server (the bundled example history): every round by batch, half the bill, flags refused in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from batchplan.app.cli import app
from batchplan.core.history import load_history
from batchplan.core.settings import get_settings
from tests.support.batch_server import BatchFaults, BatchServer
from tests.support.factories import EXAMPLE_HISTORY

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_QUEUE = ROOT / "examples" / "queue.jsonl"


@pytest.fixture
def server() -> Iterator[BatchServer]:
    with BatchServer(load_history([str(EXAMPLE_HISTORY)]), BatchFaults(validate_s=0.0, run_s=0.05)) as srv:
        yield srv


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BATCHPLAN_BATCH_POLL_S", "0.02")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _run_by_batch(server: BatchServer, tmp_path: Path) -> tuple[Path, list[str]]:
    """Train on the example history, then `batchplan run --batch-api --rounds 2` against ``server``."""
    models = tmp_path / "models"
    trained = runner.invoke(app, ["train", "--history", str(EXAMPLE_HISTORY), "--out", str(models)])
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "run"
    args = [
        "run", "--queue", str(EXAMPLE_QUEUE), "--predictors", str(models), "--budget-usd", "0.01",
        "--backend", "openai", "--base-url", server.base_url, "--prices", str(EXAMPLE_HISTORY / "models.csv"),
        "--batch-api", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, args


def test_run_by_batch_api_then_cancel(server: BatchServer, tmp_path: Path, fast_polls: None) -> None:
    out, args = _run_by_batch(server, tmp_path)
    stats = server.stats()
    report = json.loads((out / "report.json").read_text())
    results = pl.read_parquet(out / "results.parquet")
    assert report["spent_usd"] <= 0.01
    assert stats["batches"], "nothing went by batch"
    assert stats["billed_calls"] == sum(b["request_counts"]["completed"] for b in stats["batches"])  # no real time
    # the run's spend is the bill: the delivered answers' calls and the live default audits' reference calls
    assert report["audit"]["audited"] > 0
    assert report["spent_usd"] == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert float(results["cost_usd"].sum()) < report["spent_usd"]
    assert stats["submitted_twice"] == []
    # the batch calls are live outcomes like any other call: one per billed line, at what it was billed
    outcomes = pl.read_parquet(out / "outcomes.parquet")
    assert outcomes.filter(pl.col("status") == "ok").height == stats["billed_calls"]
    assert float(outcomes["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert set(outcomes.filter(pl.col("status") == "ok")["query_id"].to_list()) <= set(results["query_id"].to_list())
    # the report's spend by mode: every call by batch, the whole bill
    modes = report["dispatch_modes"]
    assert [r["mode"] for r in modes["spend_by_mode"]] == ["batch"]
    assert modes["spend_by_mode"][0]["spent_usd"] == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert modes["planned_batch_sent_realtime"] == 0
    assert "Batch API and real time" in (out / "report.md").read_text()
    # cancel: nothing is open any more, the run is marked; a rerun reuses every round and submits nothing
    cancelled = runner.invoke(app, ["cancel", str(out)])
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled 0 open batch job(s)" in cancelled.output
    assert (out / "cancelled.json").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(server.stats()["batches"]) == len(stats["batches"])


def test_batch_api_needs_a_backend_with_one(tmp_path: Path) -> None:
    args = [
        "run", "--queue", str(EXAMPLE_QUEUE), "--predictors", "models", "--budget-usd", "1",
        "--backend", "replay", "--replay-history", str(EXAMPLE_HISTORY), "--batch-api", "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--batch-api needs a backend with a batch API (bedrock, openai), not 'replay'" in result.output
    assert not (tmp_path / "r").exists()


def test_the_report_counts_the_lines_released_and_re_planned(tmp_path: Path, fast_polls: None) -> None:
    """Per-line errors: those lines are released unbilled and re-planned, and the report says how many, per LLM."""
    faults = BatchFaults(validate_s=0.0, run_s=0.05, line_error_rate=0.2, seed=1)
    with BatchServer(load_history([str(EXAMPLE_HISTORY)]), faults) as server:
        out, _ = _run_by_batch(server, tmp_path)
        stats = server.stats()
    report = json.loads((out / "report.json").read_text())
    modes = report["dispatch_modes"]
    failed = sum(b["request_counts"]["failed"] for b in stats["batches"])
    assert failed > 0
    assert modes["released_replanned"] == failed  # each failed line, once
    assert sum(r["released_replanned"] for r in modes["per_llm"]) == failed
    assert sum(r["spent_usd"] for r in modes["spend_by_mode"]) == pytest.approx(stats["billed_usd"], rel=1e-9)
    outcomes = pl.read_parquet(out / "outcomes.parquet")
    assert (outcomes["status"] != "ok").sum() >= failed  # the failed lines are outcomes too (unbilled)
    assert f"{failed} batch lines failed, expired or were cancelled" in (out / "report.md").read_text()


def test_dispatch_modes_counts_calls_planned_by_batch_that_went_in_real_time(tmp_path: Path) -> None:
    from batchplan.app.report import dispatch_modes
    from batchplan.core.storage import Storage

    here = tmp_path / "rounds" / "1"
    here.mkdir(parents=True)
    pl.DataFrame(
        {"query_id": ["a", "b", "c"], "models": [["m1"], ["m2"], ["m2"]], "mode": ["batch", "batch", "realtime"]}
    ).write_parquet(here / "calls.parquet")
    pl.DataFrame(
        {
            "query_id": ["a", "b", "c"],
            "model": ["m1", "m2", "m2"],
            "status": ["ok", "ok", "ok"],
            "cost_usd": [0.5, 1.0, 2.0],
            "mode": ["batch", "realtime", "realtime"],  # b: m2 fell short of the provider's minimum job size
        }
    ).write_parquet(here / "observations.parquet")
    modes = dispatch_modes(Storage(), str(tmp_path), 2)
    assert modes is not None
    assert modes["spend_by_mode"] == [
        {"mode": "batch", "calls": 1, "spent_usd": 0.5},
        {"mode": "realtime", "calls": 2, "spent_usd": 3.0},
    ]
    assert modes["planned_batch_sent_realtime"] == 1
    m2 = next(r for r in modes["per_llm"] if r["model"] == "m2")
    assert m2["planned_batch_sent_realtime"] == 1
    assert dispatch_modes(Storage(), str(tmp_path / "none"), 2) is None  # a run that never went by batch
