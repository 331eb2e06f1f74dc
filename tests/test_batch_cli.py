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

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def server() -> Iterator[BatchServer]:
    with BatchServer(load_history([str(EXAMPLES / "history")]), BatchFaults(validate_s=0.0, run_s=0.05)) as srv:
        yield srv


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BATCHPLAN_BATCH_POLL_S", "0.02")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_run_by_batch_api_then_cancel(server: BatchServer, tmp_path: Path, fast_polls: None) -> None:
    models = tmp_path / "models"
    trained = runner.invoke(app, ["train", "--history", str(EXAMPLES / "history"), "--out", str(models)])
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "run"
    args = [
        "run", "--queue", str(EXAMPLES / "queue.jsonl"), "--predictors", str(models), "--budget-usd", "0.01",
        "--backend", "openai", "--base-url", server.base_url, "--prices", str(EXAMPLES / "history" / "models.csv"),
        "--batch-api", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    stats = server.stats()
    report = json.loads((out / "report.json").read_text())
    results = pl.read_parquet(out / "results.parquet")
    assert report["spent_usd"] <= 0.01
    assert stats["batches"], "nothing went by batch"
    assert stats["billed_calls"] == sum(b["request_counts"]["completed"] for b in stats["batches"])  # no real time
    assert float(results["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert stats["submitted_twice"] == []
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
        "run", "--queue", str(EXAMPLES / "queue.jsonl"), "--predictors", "models", "--budget-usd", "1",
        "--backend", "replay", "--replay-history", str(EXAMPLES / "history"), "--batch-api", "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--batch-api needs a backend with a batch API (bedrock, openai), not 'replay'" in result.output
    assert not (tmp_path / "r").exists()
