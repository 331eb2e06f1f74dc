"""Labels that arrive late: ``(query_id, gold)`` rows for a past run, joined into its outcomes and report.

``batchplan label RUN_DIR FILE`` (CSV, JSONL or parquet with ``query_id`` and ``gold``) and, in the DAGs,
files dropped under ``labels/<run>/`` (``batchplan.dag_tasks.stages.labels_stage``) both call
``join_labels``:

- every row is kept in the run's ``labels.parquet`` (LABEL_SCHEMA), the first arrival of each
  (query_id, gold); a later file with another gold for a query corrects it (the latest wins);
- the run's outcomes get ``correct`` = the call's answer is the gold label (``label_source`` gold), for
  classification queries, where the gold is matched to the query's labels as answers are
  (``dispatchers.base.parse_answer``: case, "(B)", "Answer: B"). Open tasks have no judge: their labels are
  kept and counted as unscorable, never scored;
- the report is re-rendered with the accuracy measured over the labelled queries, with their count.

The same file twice changes nothing (no file is rewritten). Labels naming a query the run does not have are
kept and reported (count and first ids); a file where none matches is refused: it is for another run.

The next plan uses them: ``live_correction`` fits the predictor's live correction (``predictors.live``) again
on the gold outcomes of past runs, newest first, so a DAG's predict step moves each (task, LLM) the labels say
is off without waiting for a retrain (which keeps the newest gold out of training once there are
``promotion.MIN_LIVE_ROWS`` of them, to judge on); ``labels_drift`` says out loud where they put an LLM
outside the history's interval (``plans.audit.label_drift``, what the CLI's run reports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import polars as pl
import structlog

from batchplan.app.outcomes import (
    LABELS_FILE,
    QUERIES_FILE,
    apply_labels,
    kinds_of,
    latest_labels,
    read_run_outcomes,
    runs_history,
    write_run_outcomes,
)
from batchplan.app.report import Report, write_report
from batchplan.core.contracts import GOLD, LABEL_SCHEMA, ContractError, conform
from batchplan.core.history import History, combine_histories
from batchplan.core.storage import Storage, StorageError, join
from batchplan.dispatchers import parse_answer
from batchplan.plans.audit import label_drift
from batchplan.predictors import Predictor
from batchplan.predictors.live import LiveCorrection
from batchplan.predictors.training import refit_live_correction

log = structlog.get_logger("batchplan")

SHOWN_IDS = 5  # unknown query_ids named in the one-line summary
# the most gold outcomes of past runs (newest runs first) the live correction is fitted on again: drift is
# about tonight's traffic, and predicting them is the refit's cost (a replay night's outcomes are all gold)
LIVE_REFIT_MAX_ROWS = 20_000


@dataclass(frozen=True)
class LabelReport:
    """What one label file did to a run."""

    run: str
    source_file: str
    rows: int  # distinct (query_id, gold) rows in the file
    matched: int  # of them, naming a query of the run
    new: int  # not received before (the rest were: a file sent twice adds nothing)
    changed: int  # queries whose gold a later file corrected
    unknown: list[str] = field(default_factory=list)  # query_ids the run does not have (kept, not scored)
    unscorable: int = 0  # labelled queries of open tasks (no judge), over every label the run holds
    accuracy: float | None = None  # over the run's labelled, scorable queries
    n: int = 0

    def line(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.1%}"
        text = (
            f"{self.run}: {self.matched} of {self.rows} labels matched ({self.new} new, {self.changed} changed); "
            f"accuracy {acc} over {self.n} labelled queries"
        )
        if self.unscorable:
            text += f"; {self.unscorable} labelled queries of open tasks unscorable (no judge)"
        if self.unknown:
            text += (
                f"; {len(self.unknown)} labels name query_ids this run does not have (kept, not scored): "
                + ", ".join(self.unknown[:SHOWN_IDS])
                + (", ..." if len(self.unknown) > SHOWN_IDS else "")
            )
        return text


def read_label_file(storage: Storage, uri: str) -> pl.DataFrame:
    """``query_id``, ``gold`` and ``_row`` (1-based data row) from a CSV, JSONL or parquet file; a file that is
    malformed is refused naming the row and field."""
    if not storage.exists(uri):
        raise ContractError(f"label file {uri}: not found")
    try:
        frame = storage.read_frame(uri)
    except StorageError as error:
        raise ContractError(f"label file {uri}: {error}") from error
    except (pl.exceptions.PolarsError, OSError, ValueError) as error:
        raise ContractError(f"label file {uri}: {_first_bad_line(storage, uri) or str(error).splitlines()[0]}") from error
    missing = [c for c in ("query_id", "gold") if c not in frame.columns]
    if missing:
        raise ContractError(f"label file {uri}: missing column(s) {', '.join(missing)} (found {', '.join(frame.columns)})")
    frame = frame.select(
        pl.col("query_id").cast(pl.String), pl.col("gold").cast(pl.String)
    ).with_row_index("_row", offset=1)
    for name in ("query_id", "gold"):
        empty = frame.filter(pl.col(name).is_null() | (pl.col(name).str.strip_chars() == ""))
        if empty.height:
            raise ContractError(f"label file {uri} row {empty['_row'][0]}: field {name!r} is empty")
    frame = frame.unique(["query_id", "gold"], keep="first", maintain_order=True)
    twice = frame.filter(pl.col("query_id").is_duplicated())
    if twice.height:
        first = twice.filter(pl.col("query_id") == twice["query_id"][0])
        raise ContractError(
            f"label file {uri} rows {', '.join(map(str, first['_row']))}: query_id {first['query_id'][0]!r} has "
            f"different gold labels ({', '.join(map(repr, first['gold']))}): keep one"
        )
    return frame


def _first_bad_line(storage: Storage, uri: str) -> str | None:
    """For a JSONL file polars cannot read, the first line that is not a JSON object, named."""
    if not uri.lower().endswith((".jsonl", ".ndjson")):
        return None
    for number, line in enumerate(storage.read_bytes(uri).decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            return f"row {number}: not a JSON object: {line[:60]!r}"
    return None


def measured_accuracy(results: pl.DataFrame, queries: pl.DataFrame, latest: pl.DataFrame) -> dict[str, Any]:
    """Accuracy of the delivered answers over the labelled classification queries (deferred and failed ones
    count as wrong, as the report's accuracy does), per task, and how many labelled open-task queries
    could not be scored."""
    labelled = latest.join(kinds_of(queries), on="query_id", how="inner")
    scorable = labelled.filter(~pl.col("_open")).join(
        results.select("query_id", "answer", "status"), on="query_id", how="left"
    )
    scorable = scorable.with_columns(
        ((pl.col("status") == "done") & (pl.col("answer") == pl.col("gold"))).fill_null(False).alias("correct")
    )
    answered = scorable.filter(pl.col("status") == "done")
    per_task = (
        scorable.group_by("task").agg(pl.len().alias("n"), pl.col("correct").mean().alias("accuracy")).sort("task")
    )
    return {
        "n": scorable.height,
        "accuracy": float(scorable["correct"].mean()) if scorable.height else None,  # type: ignore[arg-type]
        "answered": answered.height,
        "accuracy_answered": float(answered["correct"].mean()) if answered.height else None,  # type: ignore[arg-type]
        "unscorable": labelled.height - scorable.height,
        "per_task": per_task.to_dicts(),
    }


def with_measured(report: Report, measured: dict[str, Any] | None) -> Report:
    """The report with its labelled accuracy; where it has no accuracy of its own (a live run: no truth)
    the measured one is its accuracy, over ``accuracy_known_for`` queries, ``accuracy_source`` labels."""
    if not measured:
        return report
    report = replace(report, labelled_accuracy=measured)
    if report.accuracy is None or report.accuracy_source == "labels":
        report = replace(
            report,
            accuracy=measured["accuracy"],
            accuracy_answered=measured["accuracy_answered"],
            accuracy_known_for=measured["n"],
            accuracy_source="labels",
        )
    return report


def report_with_labels(storage: Storage, run_uri: str, results: pl.DataFrame, report: Report) -> Report:
    """``report`` with the accuracy measured on the labels ``run_uri`` holds (unchanged without labels): a
    report built again after ``batchplan label`` (a rerun, the DAG's report step) keeps it."""
    labels_uri, queries_uri = join(run_uri, LABELS_FILE), join(run_uri, QUERIES_FILE)
    if not (storage.exists(labels_uri) and storage.exists(queries_uri)):
        return report
    latest = latest_labels(storage.read_frame(labels_uri))
    return with_measured(report, measured_accuracy(results, storage.read_frame(queries_uri), latest))


def join_labels(
    storage: Storage,
    run_uri: str,
    labels_df: pl.DataFrame,
    *,
    source_file: str = "",
    results_uri: str | None = None,
    report_uri: str | None = None,
    received_at: datetime | None = None,
) -> LabelReport:
    """Join ``labels_df`` (query_id, gold; from ``read_label_file``) into the run at ``run_uri`` (its
    outcomes.parquet, queries.parquet and labels.parquet; a DAG run's ``outcomes/<run>/``) and re-render its
    report (``report_uri``, default ``run_uri``; results from ``results_uri``, default
    ``<run_uri>/results.parquet``). Idempotent; refuses a file none of whose rows names a query of the run."""
    outcomes, queries = read_run_outcomes(storage, run_uri)
    given = labels_df if "_row" in labels_df.columns else labels_df.with_row_index("_row", offset=1)
    given = given.select("_row", pl.col("query_id").cast(pl.String), pl.col("gold").cast(pl.String))
    known = given.join(queries.select("query_id"), on="query_id", how="semi")
    unknown = given.join(queries.select("query_id"), on="query_id", how="anti")["query_id"].to_list()
    name = source_file or "labels"
    if known.height == 0:
        shown = ", ".join(unknown[:SHOWN_IDS])
        raise ContractError(
            f"{name}: none of its {given.height} labels names a query of {run_uri} (first: {shown}): is it "
            "another run's?"
        )
    canonical = _canonical(known, queries, name)
    if unknown:  # kept as they came: there is no label list to match them to
        canonical = pl.concat([canonical, given.filter(pl.col("query_id").is_in(unknown)).select("query_id", "gold")])
    labels_uri = join(run_uri, LABELS_FILE)
    before = (
        conform(storage.read_frame(labels_uri), LABEL_SCHEMA, name=labels_uri)
        if storage.exists(labels_uri)
        else pl.DataFrame(schema=LABEL_SCHEMA)
    )
    fresh = canonical.join(before.select("query_id", "gold"), on=["query_id", "gold"], how="anti")
    previous = latest_labels(before)
    changed = fresh.join(previous, on="query_id", how="semi").height
    results = storage.read_frame(results_uri or join(run_uri, "results.parquet"))
    latest = previous
    if fresh.height:
        stamp = received_at or datetime.now(UTC)
        added = fresh.with_columns(pl.lit(stamp).alias("received_at"), pl.lit(source_file).alias("source_file"))
        labels = pl.concat([before, conform(added, LABEL_SCHEMA, name="labels")])
        latest = latest_labels(labels)
        outcomes, queries = apply_labels(outcomes, queries, latest)
        write_run_outcomes(storage, run_uri, outcomes, queries)
        storage.write_frame(labels, labels_uri)  # last: a label recorded is a label applied
        _rerender(storage, report_uri or run_uri, measured_accuracy(results, queries, latest))
    measured = measured_accuracy(results, queries, latest)
    got = LabelReport(
        run=run_uri,
        source_file=source_file,
        rows=given.height,
        matched=known.height,
        new=fresh.height,
        changed=changed,
        unknown=unknown,
        unscorable=int(measured["unscorable"]),
        accuracy=measured["accuracy"],
        n=int(measured["n"]),
    )
    log.info("labels", **{k: v for k, v in got.__dict__.items() if k != "unknown"}, unknown=len(unknown))
    return got


def _canonical(known: pl.DataFrame, queries: pl.DataFrame, name: str) -> pl.DataFrame:
    """query_id, gold with a classification query's gold mapped to its label as answers are ("b" -> "B"); a
    gold that is none of the query's labels is refused naming its row."""
    rows = known.join(queries.select("query_id", "labels"), on="query_id", how="left", maintain_order="left")
    golds = []
    for row, query_id, gold, labels in rows.iter_rows():
        if labels is None:
            golds.append(gold)
            continue
        matched, _ = parse_answer(gold, tuple(labels))
        if matched is None:
            raise ContractError(
                f"{name} row {row}: field 'gold' {gold!r} is not one of query {query_id!r}'s labels "
                f"({', '.join(labels)})"
            )
        golds.append(matched)
    return rows.select("query_id", pl.Series("gold", golds, dtype=pl.String))


def _rerender(storage: Storage, report_uri: str, measured: dict[str, Any]) -> None:
    """Write the run's report again with the measured accuracy (a run without a report yet: nothing)."""
    uri = join(report_uri, "report.json")
    if storage.exists(uri):
        written = Report.from_json(json.loads(storage.read_text(uri)))
        write_report(with_measured(written, measured), report_uri, storage)


def label_files(storage: Storage, prefix: str) -> Sequence[str]:
    """The label files under a DAG run's ``labels/<run>/`` prefix, in name order."""
    return sorted(u for u in storage.list(prefix) if u.lower().endswith((".csv", ".jsonl", ".ndjson", ".parquet")))


def live_history(storage: Storage, run_uris: Sequence[str], max_rows: int = LIVE_REFIT_MAX_ROWS) -> History | None:
    """The gold outcomes (labels joined, or a replay run's verdicts) of the runs at ``run_uris`` (their
    ``outcomes/<run>/``), newest run first (run keys carry the date) until ``max_rows``; None without any."""
    parts: list[History] = []
    taken = 0
    for uri in sorted(run_uris, reverse=True):
        if taken >= max_rows:
            break
        history = runs_history(storage, [uri])
        gold = history.outcomes.filter(pl.col("label_source") == GOLD)
        if gold.height == 0:
            continue
        parts.append(History(queries=history.queries, outcomes=gold, prices=history.prices))
        taken += gold.height
    return combine_histories(parts) if parts else None


def live_correction(
    storage: Storage, run_uris: Sequence[str], predictor: Predictor, max_rows: int = LIVE_REFIT_MAX_ROWS
) -> tuple[LiveCorrection, str]:
    """The live correction the next plan uses, and where it comes from: fitted again on the gold outcomes of
    the past runs at ``run_uris`` (``live_history``; ``"runs"``), against ``predictor``'s own P for them
    (``predictors.training.refit_live_correction``); without any, the predictor's own (``"predictor"``: the
    one its training fitted, empty for one trained on the bundled histories alone)."""
    history = live_history(storage, run_uris, max_rows)
    if history is None:
        return predictor.live, "predictor"
    live = refit_live_correction(predictor, history)
    log.info("labels.live_correction", runs=len(run_uris), gold_rows=history.outcomes.height, pairs=live.offsets.height)
    return live, "runs"


def labels_drift(offsets: pl.DataFrame, queue: pl.DataFrame) -> list[dict[str, Any]]:
    """The drift the live labels show for tonight's tasks (``plans.audit.label_drift`` on the live
    correction the plan used, ``offsets``): the same entries the CLI's run reports, ``source`` labels."""
    return label_drift(offsets, set(queue["task"].unique().to_list()))
