"""Read a queue (parquet or jsonl, one file or a directory of parts, local or s3://) and validate it.

Every row either enters the batch or lands in the quarantine frame with the reason: nothing is dropped
silently. Row numbers are 0-based positions in the concatenated input (per part file order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from batchplan.contracts import DEFAULT_TASK, DEFAULT_TENANT, QUARANTINE_SCHEMA, QUEUE_SCHEMA, ContractError
from batchplan.storage import Storage, StorageError

_STRING_FIELDS = ("query_id", "prompt", "system_prompt", "task", "tenant")


@dataclass(frozen=True)
class Ingested:
    queue: pl.DataFrame  # QUEUE_SCHEMA, valid rows only, task/tenant/priority filled
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    sources: list[str]


def read_queue(uri: str, storage: Storage) -> Ingested:
    """Load every part under ``uri`` and validate; raises ContractError only if nothing can be read at all."""
    parts = (
        [uri]
        if uri.endswith((".parquet", ".jsonl", ".ndjson"))
        else [u for u in storage.list(uri) if u.endswith((".parquet", ".jsonl", ".ndjson"))]
    )
    if not parts:
        raise StorageError(f"no queue parts (.parquet, .jsonl) at {uri}")
    raw_frames: list[pl.DataFrame] = []
    bad_rows: list[dict[str, Any]] = []
    offset = 0
    for part in parts:
        data = storage.read_bytes(part)
        if part.endswith(".parquet"):
            frame = _typed_parquet(pl.read_parquet(data))
            frame = frame.with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + offset).alias("_row"))
            offset += frame.height
        else:
            frame, bad, offset = _typed_jsonl(data.decode("utf-8", errors="replace"), part, offset)
            bad_rows.extend(bad)
        raw_frames.append(frame)
    raw = pl.concat(raw_frames, how="vertical") if raw_frames else pl.DataFrame()
    queue, quarantine = validate_queue(raw)
    if bad_rows:
        extra = pl.DataFrame([{k: v for k, v in b.items() if k != "_part"} for b in bad_rows], schema=QUARANTINE_SCHEMA)
        quarantine = pl.concat([extra, quarantine]).sort("row")
    return Ingested(queue=queue, quarantine=quarantine, sources=parts)


def validate_queue(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a typed raw frame (QUEUE_SCHEMA columns + ``_row`` + optional ``_type_error``) into good and quarantined rows."""
    if "_row" not in raw.columns:
        raw = raw.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"))
    if "_type_error" not in raw.columns:
        raw = raw.with_columns(pl.lit(None, dtype=pl.String).alias("_type_error"))
    for column, dtype in QUEUE_SCHEMA.items():
        if column not in raw.columns:
            raw = raw.with_columns(pl.lit(None, dtype=dtype).alias(column))
    raw = raw.with_columns(pl.col("query_id").str.strip_chars())
    labels_ok = (
        pl.col("labels").list.eval(pl.element().is_not_null() & (pl.element().str.strip_chars() != "")).list.all()
    )
    bad_priority = pl.col("priority").is_not_null() & (pl.col("priority").is_nan() | (pl.col("priority") <= 0))
    reason = (
        pl.when(pl.col("_type_error").is_not_null())
        .then(pl.col("_type_error"))
        .when(pl.col("query_id").is_null() | (pl.col("query_id") == ""))
        .then(pl.lit("missing query_id"))
        .when(pl.col("prompt").is_null() | (pl.col("prompt").str.strip_chars() == ""))
        .then(pl.lit("empty prompt"))
        .when(pl.col("labels").is_not_null() & (pl.col("labels").list.len() < 2))
        .then(pl.lit("labels must list at least 2 allowed answers (or be null for an open task)"))
        .when(pl.col("labels").is_not_null() & ~labels_ok)
        .then(pl.lit("labels contain an empty or null answer"))
        .when(pl.col("labels").is_not_null() & (pl.col("labels").list.n_unique() < pl.col("labels").list.len()))
        .then(pl.lit("labels contain duplicates"))
        .when(bad_priority)
        .then(pl.lit("priority must be a positive number"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    checked = raw.with_columns(reason.alias("_reason"))
    # Duplicates are judged among otherwise valid rows, so a bad first copy does not hide a good second one.
    valid = pl.col("_reason").is_null()
    first_valid = pl.when(valid).then(pl.col("_row")).min().over("query_id")
    checked = checked.with_columns(
        pl.when(valid & (pl.col("_row") != first_valid))
        .then(pl.format("duplicate query_id (first seen at row {})", first_valid))
        .otherwise(pl.col("_reason"))
        .alias("_reason")
    )
    good = checked.filter(pl.col("_reason").is_null())
    bad = checked.filter(pl.col("_reason").is_not_null())
    queue = good.select(
        pl.col("query_id").str.strip_chars(),
        "prompt",
        "system_prompt",
        "labels",
        pl.col("task").fill_null(DEFAULT_TASK),
        pl.col("tenant").fill_null(DEFAULT_TENANT),
        pl.col("priority").fill_null(1.0),
    )
    raw_column = pl.col("_raw") if "_raw" in bad.columns else pl.lit(None, dtype=pl.String)
    quarantine = bad.select(
        pl.col("_row").alias("row"),
        "query_id",
        pl.col("_reason").alias("reason"),
        pl.coalesce(raw_column, pl.struct(QUEUE_SCHEMA.names()).struct.json_encode()).alias("raw"),
    )
    return queue, quarantine.cast(dict(QUARANTINE_SCHEMA))  # type: ignore[arg-type]


def _typed_parquet(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast known columns; a column of the wrong type as a whole marks its non-null rows as bad."""
    errors: list[pl.Expr] = []
    columns: list[pl.Expr] = []
    for column, dtype in QUEUE_SCHEMA.items():
        if column not in frame.columns:
            columns.append(pl.lit(None, dtype=dtype).alias(column))
            continue
        have = frame.schema[column]
        castable = have == dtype or have == pl.Null or (dtype == pl.Float64 and have.is_numeric())
        if castable:
            columns.append(pl.col(column).cast(dtype))
        else:
            what = "a list of strings" if dtype == pl.List(pl.String) else str(dtype)
            errors.append(pl.when(pl.col(column).is_not_null()).then(pl.lit(f"{column} is {have}, expected {what}")))
            columns.append(pl.lit(None, dtype=dtype).alias(column))
    type_error = pl.coalesce(errors) if errors else pl.lit(None, dtype=pl.String)
    return frame.select(
        [*columns, type_error.cast(pl.String).alias("_type_error"), pl.lit(None, dtype=pl.String).alias("_raw")]
    )


def _typed_jsonl(text: str, part: str, offset: int) -> tuple[pl.DataFrame, list[dict[str, Any]], int]:
    """Parse line by line so one malformed line is quarantined, not the whole file."""
    rows: list[dict[str, Any]] = []
    positions: list[int] = []
    bad: list[dict[str, Any]] = []
    position = offset
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("a JSON object per line is expected")
        except ValueError as error:
            bad.append(
                {
                    "row": position,
                    "query_id": None,
                    "reason": f"invalid JSON: {error}",
                    "raw": line[:2000],
                    "_part": part,
                }
            )
            position += 1
            continue
        rows.append({**_typed_record(record), "_raw": line[:2000]})
        positions.append(position)
        position += 1
    schema = pl.Schema({**QUEUE_SCHEMA, "_type_error": pl.String(), "_raw": pl.String()})
    frame = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    return frame.with_columns(pl.Series("_row", positions, dtype=pl.Int64)), bad, position


def _typed_record(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"_type_error": None}
    problems: list[str] = []
    for field in _STRING_FIELDS:
        value = record.get(field)
        if value is None or isinstance(value, str):
            out[field] = value
        elif field == "query_id" and isinstance(value, int) and not isinstance(value, bool):
            out[field] = str(value)
        else:
            problems.append(f"{field} is {type(value).__name__}, expected a string")
            out[field] = None
    labels = record.get("labels")
    if labels is None or (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        out["labels"] = labels
    else:
        problems.append("labels is not a list of strings")
        out["labels"] = None
    priority = record.get("priority")
    if priority is None or (isinstance(priority, int | float) and not isinstance(priority, bool)):
        out["priority"] = None if priority is None else float(priority)
    else:
        problems.append(f"priority is {type(priority).__name__}, expected a number")
        out["priority"] = None
    if problems:
        out["_type_error"] = "; ".join(problems)
    return out


def ensure_queue(frame: pl.DataFrame) -> pl.DataFrame:
    """Validate an in-memory queue strictly: raise on the first bad row (for library callers)."""
    queue, quarantine = validate_queue(_typed_parquet(frame))
    if quarantine.height:
        first = quarantine.row(0, named=True)
        raise ContractError(f"queue row {first['row']} (query_id={first['query_id']!r}): {first['reason']}")
    return queue
