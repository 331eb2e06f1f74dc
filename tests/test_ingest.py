"""Queue contract and quarantine: every row is either in the batch or quarantined with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batchplan.app.ingest import ensure_queue, read_queue
from batchplan.core.contracts import QUARANTINE_SCHEMA, QUEUE_SCHEMA, ContractError, conform
from batchplan.core.storage import Storage

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
CONFLICT_A = "conflicting copies of query_id a at rows 0, 3"
EXPECTED_REASONS = {
    0: CONFLICT_A,
    1: "empty prompt",
    2: "invalid JSON",
    3: CONFLICT_A,
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
    assert ingested.queue["query_id"].to_list() == ["e", "h"]
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
    row_h = queue.filter(pl.col("query_id") == "h").row(0, named=True)
    assert (row_h["task"], row_h["tenant"], row_h["priority"]) == ("default", "default", 1.0)
    row_e = queue.filter(pl.col("query_id") == "e").row(0, named=True)
    assert (row_e["task"], row_e["tenant"], row_e["priority"]) == ("t1", "acme", 2.0)


def test_parquet_parts_in_a_directory_are_read_together(tmp_path: Path) -> None:
    pl.DataFrame({"query_id": ["p1", "p2"], "prompt": ["x", "y"], "labels": [["A", "B"], ["A", "B"]]}).write_parquet(
        tmp_path / "part-0.parquet"
    )
    _write_jsonl(tmp_path / "part-1.jsonl", [{"query_id": "p1", "prompt": "again"}, {"query_id": "p3", "prompt": "z"}])
    ingested = read_queue(str(tmp_path), Storage())
    assert sorted(ingested.queue["query_id"].to_list()) == ["p2", "p3"]
    assert ingested.quarantine["row"].to_list() == [0, 2]  # both copies of p1, across the two formats
    assert set(ingested.quarantine["reason"].str.slice(0, 46).to_list()) == {
        "conflicting copies of query_id p1 at rows 0, 2"
    }


def test_a_bad_first_copy_does_not_hide_a_good_second_one(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "q.jsonl", [{"query_id": "x", "prompt": ""}, {"query_id": "x", "prompt": "fixed"}])
    ingested = read_queue(str(tmp_path / "q.jsonl"), Storage())
    assert ingested.queue["prompt"].to_list() == ["fixed"]
    assert ingested.quarantine["reason"].to_list() == ["empty prompt"]


def test_a_prompt_of_only_whitespace_is_empty_whatever_the_whitespace(tmp_path: Path) -> None:
    """Any Unicode White_Space (what polars' strip_chars strips) counts as empty; a prompt with one other
    character does not (a zero-width space and the ASCII separators \\x1c-\\x1f are not White_Space)."""
    prompts = [" \t\n", "\u3000\u00a0\u2028", "\u3000x ", "\u200b", "\x85\u1680", "\x1c\x1f"]
    _write_jsonl(tmp_path / "q.jsonl", [{"query_id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)])
    ingested = read_queue(str(tmp_path / "q.jsonl"), Storage())
    assert ingested.queue["query_id"].to_list() == ["q2", "q3", "q5"]
    assert ingested.quarantine["reason"].to_list() == ["empty prompt"] * 3


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


def test_exact_copies_collapse_and_differing_copies_are_all_quarantined(tmp_path: Path) -> None:
    rows = [
        {"query_id": "x", "prompt": "same"},
        {"query_id": "y", "prompt": "first"},
        {"query_id": "x", "prompt": "same"},
        {"query_id": "y", "prompt": "second"},
        {"query_id": "y", "prompt": "first"},
    ]
    _write_jsonl(tmp_path / "q.jsonl", rows)
    ingested = read_queue(str(tmp_path / "q.jsonl"), Storage())
    assert ingested.queue["query_id"].to_list() == ["x"]  # its exact copy collapsed into it
    assert ingested.quarantine["row"].to_list() == [1, 3, 4]  # no copy of y is preferred to another
    for reason in ingested.quarantine["reason"]:
        assert reason.startswith("conflicting copies of query_id y at rows 1, 3, 4"), reason


def test_bytes_that_are_not_utf8_are_quarantined_naming_the_field(tmp_path: Path) -> None:
    good = json.dumps({"query_id": "ok", "prompt": "fine"}).encode()
    bad = b'{"query_id": "bad", "prompt": "caf\xe9 au lait"}'
    (tmp_path / "q.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    ingested = read_queue(str(tmp_path / "q.jsonl"), Storage())
    assert ingested.queue["query_id"].to_list() == ["ok"]
    assert ingested.quarantine["query_id"].to_list() == ["bad"]
    assert ingested.quarantine["reason"].to_list() == [
        "prompt is not valid UTF-8 (byte 0xe9 at offset 34 of the line): re-encode it as UTF-8"
    ]
    # the same rule for parquet, where such text arrives as a binary column
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = pa.array([b"fine", b"caf\xe9"], type=pa.binary())
    pq.write_table(pa.table({"query_id": ["ok", "bad"], "prompt": prompts}), tmp_path / "q.parquet")
    ingested = read_queue(str(tmp_path / "q.parquet"), Storage())
    assert ingested.queue["prompt"].to_list() == ["fine"]
    assert ingested.quarantine["reason"][0].startswith("prompt is not valid UTF-8 (byte 0xe9 at offset 3 of the value)")


def test_an_integer_query_id_is_read_alike_from_every_format(tmp_path: Path) -> None:
    pl.DataFrame({"query_id": [1, 2], "prompt": ["x", "y"]}).write_parquet(tmp_path / "q.parquet")
    _write_jsonl(tmp_path / "q.jsonl", [{"query_id": 1, "prompt": "x"}, {"query_id": 2, "prompt": "y"}])
    for name in ("q.parquet", "q.jsonl"):
        ingested = read_queue(str(tmp_path / name), Storage())
        assert ingested.queue["query_id"].to_list() == ["1", "2"], name
        assert ingested.quarantine.height == 0, name


def test_a_prompt_past_the_maximum_is_quarantined_before_planning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchplan.core.settings import get_settings

    _write_jsonl(
        tmp_path / "q.jsonl", [{"query_id": "huge", "prompt": "x" * 2_000_000}, {"query_id": "ok", "prompt": "hi"}]
    )
    ingested = read_queue(str(tmp_path / "q.jsonl"), Storage())  # the default maximum
    assert ingested.queue["query_id"].to_list() == ["ok"]
    assert ingested.quarantine["query_id"].to_list() == ["huge"]
    assert ingested.quarantine["reason"].to_list() == [
        "prompt and system prompt are 2000000 characters, past the maximum of 100000 (BATCHPLAN_MAX_PROMPT_CHARS)"
    ]
    monkeypatch.setenv("BATCHPLAN_MAX_PROMPT_CHARS", "1")
    get_settings.cache_clear()
    try:
        assert read_queue(str(tmp_path / "q.jsonl"), Storage()).queue.height == 0
    finally:
        get_settings.cache_clear()
