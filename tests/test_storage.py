"""Storage: the same calls on local paths and on a real S3 protocol endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batchplan.core.history import load_history, synthetic_history
from batchplan.core.storage import Storage, StorageError, join

FRAME = pl.DataFrame({"query_id": ["a", "b"], "labels": [["x", "y"], None], "cost": [0.1, 0.2]})


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    if request.param == "local":
        return Storage(), str(tmp_path)
    return request.getfixturevalue("s3_storage"), request.getfixturevalue("s3_bucket") + "/prefix"


@pytest.mark.parametrize("name", ["f.parquet", "f.jsonl", "f.json"])
def test_frame_round_trip(root: tuple[Storage, str], name: str) -> None:
    storage, base = root
    uri = join(base, "dir", name)
    storage.write_frame(FRAME, uri)
    assert storage.exists(uri)
    assert storage.read_frame(uri).equals(FRAME)


def test_list_and_read_parts_as_one_frame(root: tuple[Storage, str]) -> None:
    storage, base = root
    storage.write_frame(FRAME, join(base, "parts", "part-0.parquet"))
    storage.write_frame(FRAME.with_columns(pl.col("cost") * 10), join(base, "parts", "part-1.parquet"))
    storage.write_text(join(base, "parts", "_manifest.json"), "{}")
    assert [u.rsplit("/", 1)[1] for u in storage.list(join(base, "parts"))] == [
        "_manifest.json",
        "part-0.parquet",
        "part-1.parquet",
    ]
    assert storage.read_frame(join(base, "parts"))["cost"].to_list() == [0.1, 0.2, 1.0, 2.0]


def test_put_if_absent_is_a_lock(root: tuple[Storage, str]) -> None:
    storage, base = root
    uri = join(base, "locks", "queue-2026-11-22")
    assert storage.put_if_absent(uri, b"run-1")
    assert not storage.put_if_absent(uri, b"run-2")
    assert storage.read_text(uri) == "run-1"
    storage.delete(uri)
    assert not storage.exists(uri)


def test_missing_object_is_a_storage_error(root: tuple[Storage, str]) -> None:
    storage, base = root
    with pytest.raises(StorageError, match="no such"):
        storage.read_bytes(join(base, "nope.parquet"))
    with pytest.raises(StorageError, match="no parquet or jsonl data"):
        storage.read_frame(join(base, "empty-dir"))


def test_history_loads_from_s3(s3_storage: Storage, s3_bucket: str) -> None:
    history = synthetic_history(50, 3, seed=3)
    base = join(s3_bucket, "outcomes", "synthetic")
    s3_storage.write_frame(history.queries, join(base, "queries.parquet"))
    s3_storage.write_frame(history.outcomes, join(base, "outcomes.parquet"))
    s3_storage.write_frame(history.prices, join(base, "models.csv"))
    loaded = load_history(base, s3_storage)
    assert loaded.queries.equals(history.queries)
    assert loaded.outcomes.height == 150
    assert loaded.models == history.models


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    storage = Storage()
    uri = str(tmp_path / "a" / "b.parquet")
    storage.write_frame(FRAME, uri)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.parquet"]  # no temp file left behind
