"""``batchplan demo`` end to end, as a newcomer runs it where the bundled data is absent: the synthetic
history, train, plan and replay under one budget, the report printed and written under the work dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchplan.app.cli import app
from batchplan.core.settings import get_settings


@pytest.mark.slow
def test_demo_without_data_runs_on_the_synthetic_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / ".batchplan"
    monkeypatch.setenv("BATCHPLAN_DATA_DIR", str(tmp_path / "no-data"))  # absent: the demo generates a history
    monkeypatch.setenv("BATCHPLAN_WORK_DIR", str(work))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["demo", "--budget-fraction", "0.3"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "data: synthetic (no real data found)" in result.output
    assert "budget $" in result.output
    html = work / "demo" / "run" / "report.html"
    assert f"report: {html}" in result.output
    assert "batchplan report" in html.read_text()
    report = json.loads((work / "demo" / "run" / "report.json").read_text())
    # the budget held, every test query of the synthetic history was answered or deferred, none lost
    budget = float(result.output.split("budget $", 1)[1].split(" ", 1)[0])
    assert report["spent_usd"] <= budget + 1e-12
    assert report["queries"] > 0
    assert (work / "synthetic-history" / "queries.parquet").exists()
    assert (work / "demo" / "models").is_dir()
