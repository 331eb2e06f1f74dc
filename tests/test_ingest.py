"""Queue contract and quarantine: every row is either in the batch or quarantined with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batchplan.contracts import QUARANTINE_SCHEMA, QUEUE_SCHEMA, ContractError, conform
from batchplan.ingest import ensure_queue, read_queue
from batchplan.storage import Storage

ROWS = [
    {"query_id": "a", "prompt": "hello", "labels": ["yes", "no"]},
    {"query_id": "b", "prompt": "   ", "labels": ["yes", "no"]},
    "this line is not json",
    {"query_id": "a", "prompt": "second copy", "labels": ["yes", "no"]},
    {"query_id": "c", "prompt": "x", "labels": "yes,no"},
    {"prompt": "no id"},
    {"query_id": "d", "prompt": "ok", "priority": -1},
    {"query_id": "e", "prompt": "ok", "priority": 2, "tenant": "acme", "task": "t1"},
    {"query_id": "f", "prompt": "one label", "labels": ["A"]},
    {"query_id": "g", "prompt": "dup labels", "labels": ["A", "A"]},
    {"query_id": "h", "prompt": "open task", "labels": None, "system_prompt": "be brief"},
    [1, 2, 3],
]
EXPECTED_REASONS = {
    1: "empty prompt",
    2: "invalid JSON",
    3: "duplicate query_id (first seen at row 0)",
    4: "labels is not a list of strings",
    5: "missing query_id",
    6: "priority must be a positive number",
    8: "labels must list at least 2",
    9: "labels contain duplicates",
    11: "invalid JSON",
}


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_jsonl_rows_are_kept_or_quarantined_with_reason(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "queue.jsonl", ROWS)
    ingested = read_queue(str(tmp_path / "queue.jsonl"), Storage())
    assert ingested.queue.schema == QUEUE_SCHEMA
    assert ingested.quarantine.schema == QUARANTINE_SCHEMA
    assert ingested.queue["query_id"].to_list() == ["a", "e", "h"]
    assert ingested.queue.height + ingested.quarantine.height == len(ROWS)
    reasons = dict(zip(ingested.quarantine["row"].to_list(), ingested.quarantine["reason"].to_list(), strict=True))
    assert set(reasons) == set(EXPECTED_REASONS)
    for row, reason in EXPECTED_REASONS.items():
        assert reasons[row].startswith(reason), (row, reasons[row])
    # the raw line is kept so a user can fix and resubmit it
    assert ingested.quarantine.filter(pl.col("row") == 4)["raw"][0] == json.dumps(ROWS[4])


def test_defaults_are_filled(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "queue.jsonl", ROWS)
    queue = read_queue(str(tmp_path / "queue.jsonl"), Storage()).queue
    row_a = queue.filter(pl.col("query_id") == "a").row(0, named=True)
    assert (row_a["task"], row_a["tenant"], row_a["priority"]) == ("default", "default", 1.0)
    row_e = queue.filter(pl.col("query_id") == "e").row(0, named=True)
    assert (row_e["task"], row_e["tenant"], row_e["priority"]) == ("t1", "acme", 2.0)


def test_parquet_parts_in_a_directory_are_read_together(tmp_path: Path) -> None:
    pl.DataFrame({"query_id": ["p1", "p2"], "prompt": ["x", "y"], "labels": [["A", "B"], ["A", "B"]]}).write_parquet(
        tmp_path / "part-0.parquet"
    )
    _write_jsonl(tmp_path / "part-1.jsonl", [{"query_id": "p1", "prompt": "again"}, {"query_id": "p3", "prompt": "z"}])
    ingested = read_queue(str(tmp_path), Storage())
    assert sorted(ingested.queue["query_id"].to_list()) == ["p1", "p2", "p3"]
    assert ingested.quarantine["reason"].to_list() == ["duplicate query_id (first seen at row 0)"]


def test_a_bad_first_copy_does_not_hide_a_good_second_one(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "q.jsonl", [{"query_id": "x", "prompt": ""}, {"query_id": "x", "prompt": "fixed"}])
    ingested = read_queue(str(tmp_path / "q.jsonl"), Storage())
    assert ingested.queue["prompt"].to_list() == ["fixed"]
    assert ingested.quarantine["reason"].to_list() == ["empty prompt"]


def test_parquet_column_of_wrong_type_is_quarantined_per_row(tmp_path: Path) -> None:
    pl.DataFrame({"query_id": ["a", "b"], "prompt": ["x", "y"], "labels": ["A|B", None]}).write_parquet(
        tmp_path / "q.parquet"
    )
    ingested = read_queue(str(tmp_path / "q.parquet"), Storage())
    assert ingested.queue["query_id"].to_list() == ["b"]
    assert ingested.quarantine["reason"][0].startswith("labels is String, expected a list of strings")


def test_strict_validation_names_row_and_reason() -> None:
    with pytest.raises(ContractError, match=r"row 1 \(query_id='b'\): empty prompt"):
        ensure_queue(pl.DataFrame({"query_id": ["a", "b"], "prompt": ["x", ""]}))


def test_conform_names_the_column_that_cannot_be_cast() -> None:
    with pytest.raises(ContractError, match="column 'priority'"):
        conform(pl.DataFrame({"query_id": ["a"], "prompt": ["x"], "priority": ["high"]}), QUEUE_SCHEMA, name="queue")
    with pytest.raises(ContractError, match="missing required column"):
        conform(pl.DataFrame({"prompt": ["x"]}), QUEUE_SCHEMA, name="queue", required=("query_id",))
