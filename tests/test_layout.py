"""Where the bucket layout's root comes from: Settings (``BATCHPLAN_ROOT``, ``BATCHPLAN_BUCKET``,
``BATCHPLAN_PREFIX``), read fresh from the environment by default."""

from __future__ import annotations

import pytest

from batchplan.core.layout import Layout
from batchplan.core.settings import Settings


def test_root_overrides_bucket_and_prefix() -> None:
    assert Layout.from_settings(Settings(root="/tmp/x/", bucket="b", prefix="p")).root == "/tmp/x"
    assert Layout.from_settings(Settings(bucket="b", prefix="/p/")).root == "s3://b/p"
    assert Layout.from_settings(Settings(bucket="", prefix="")).root == "s3://batchplan"


def test_layout_reads_the_environment_it_runs_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHPLAN_ROOT", raising=False)
    monkeypatch.setenv("BATCHPLAN_BUCKET", "first")
    monkeypatch.setenv("BATCHPLAN_PREFIX", "bp")
    assert Layout.from_settings().root == "s3://first/bp"
    monkeypatch.setenv("BATCHPLAN_BUCKET", "second")
    assert Layout.from_settings().predictors() == "s3://second/bp/models"
    monkeypatch.setenv("BATCHPLAN_ROOT", "/data/bp")
    assert Layout.from_settings().current_predictor() == "/data/bp/models/CURRENT.json"
