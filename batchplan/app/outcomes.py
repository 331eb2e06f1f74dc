"""What a run learned: one live outcome per call it made, and the run as an outcome history for training.

Every run, on every backend, single shot or in rounds, CLI or DAG, writes beside its results::

    outcomes.parquet   LIVE_OUTCOME_SCHEMA: one row per call (failed calls too) from the dispatcher's ledgers:
                       LLM, answer, logprob, tokens, cost, latency, round; ``correct`` only where a label
                       (gold) or an audit (silver) says, never from a replay history in a live backend
    queries.parquet    HISTORY_QUERIES_SCHEMA: the run's queries (``gold`` filled from its labels)
    models.csv         the prices the backend billed at (MODELS_SCHEMA), for an LLM no history knows
    labels.parquet     LABEL_SCHEMA, every label received (``batchplan.app.labels``)

so a run directory is itself an outcome history: ``batchplan train --from-run RUN_DIR`` and the retrain DAG
(``outcomes/<run>/``) read it with ``runs_history``. A replay run may keep the replay history's verdicts
(``label_source`` gold): the history is that backend's truth.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import polars as pl
import structlog

from batchplan.core.contracts import (
    GOLD,
    HISTORY_QUERIES_SCHEMA,
    LABEL_SOURCES,
    LIVE_OUTCOME_SCHEMA,
    MODELS_SCHEMA,
    OUTCOMES_SCHEMA,
    SILVER,
    SILVER_WEIGHT,
    ContractError,
    Status,
    audited_query,
    conform,
)
from batchplan.core.history import History
from batchplan.core.storage import Storage, join
from batchplan.dispatchers import call_events
from batchplan.plans.audit import same_answer

log = structlog.get_logger("batchplan")

OUTCOMES_FILE = "outcomes.parquet"
QUERIES_FILE = "queries.parquet"
PRICES_FILE = "models.csv"
LABELS_FILE = "labels.parquet"
# Call statuses that say how the LLM does on the query (an answer, or a reply that is not one); a rate limit,
# a timeout or a reset says nothing about it, so those rows inform spend and latency, never accuracy.
TEACHING = (Status.OK, Status.NOT_ANSWER)
_ROUND = re.compile(r"/rounds/(\d+)/")


def call_outcomes(storage: Storage, root: str) -> pl.DataFrame:
    """LIVE_OUTCOME_SCHEMA rows (task and labels unset) of every call in every dispatcher ledger under
    ``root``: ``<root>/dispatch/`` (single shot), ``<root>/rounds/<k>/...`` (round k), DAG shards alike."""
    ledgers = sorted({u.rsplit("/ledger/", 1)[0] for u in storage.iter_parts(root, ".jsonl") if "/ledger/" in u})
    rows: list[tuple[Any, ...]] = []
    for ledger in ledgers:
        found = _ROUND.search(ledger.removeprefix(root.rstrip("/")) + "/")
        k = int(found.group(1)) if found else 1
        for event in call_events(storage, ledger):
            status = str(event.get("s"))
            rows.append(
                (
                    str(event.get("q")),
                    str(event.get("m")),
                    event.get("a") if status == Status.OK else None,
                    float(event.get("usd") or 0.0),
                    event.get("ti"),
                    event.get("to"),
                    _finite(event.get("ms")),
                    _finite(event.get("lp")),
                    k,
                    str(event.get("c")),
                    status,
                )
            )
    names = ["query_id", "model", "answer", "cost_usd", "tokens_in", "tokens_out", "latency_ms", "logprob"]
    schema = {name: LIVE_OUTCOME_SCHEMA[name] for name in [*names, "round", "call", "status"]}
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return conform(frame, LIVE_OUTCOME_SCHEMA, name="outcomes").sort("query_id", "round", "call")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def record_run_outcomes(
    storage: Storage,
    root: str,
    out_uri: str,
    queue: pl.DataFrame,
    *,
    prices: pl.DataFrame | None = None,
    truth: Any = None,
    references: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Write ``out_uri``'s outcomes, queries and prices from the ledgers under ``root``; labels already in
    ``out_uri`` (a rerun after ``batchplan label``) are applied again. ``truth`` (a ``report.Truth``) only
    for the replay backend, whose history is the truth. ``references``: the audits' records (query_id, task,
    reference_answer, reference_models), whose answers become silver verdicts. Returns the outcomes written."""
    # an audit's reference call (<query_id>#audit) is a call about the same query: its outcome is that query's
    outcomes = (
        call_outcomes(storage, root)
        .drop("task")
        .with_columns(audited_query())
        .join(queue.select("query_id", "task"), on="query_id", how="left")
    )
    queries = conform(
        queue.with_columns(pl.lit("outcomes").alias("dataset"), pl.lit("train").alias("split")),
        HISTORY_QUERIES_SCHEMA,
        name="run queries",
    )
    if truth is not None:
        outcomes = _replay_verdicts(outcomes, truth)
        queries = queries.drop("gold").join(truth.gold, on="query_id", how="left").select(HISTORY_QUERIES_SCHEMA.names())
    if references is not None and references.height:
        outcomes = silver_verdicts(outcomes, references, queue)
    outcomes = _keep_silver(storage, out_uri, outcomes.select(LIVE_OUTCOME_SCHEMA.names()))
    labels_uri = join(out_uri, LABELS_FILE)
    if storage.exists(labels_uri):
        outcomes, queries = apply_labels(outcomes, queries, latest_labels(storage.read_frame(labels_uri)))
    write_run_outcomes(storage, out_uri, outcomes, queries, prices)
    log.info(
        "outcomes",
        out=out_uri,
        calls=outcomes.height,
        gold=int((outcomes["label_source"] == GOLD).sum()),
        llms=outcomes["model"].n_unique(),
    )
    return outcomes


def silver_verdicts(outcomes: pl.DataFrame, references: pl.DataFrame, queue: pl.DataFrame) -> pl.DataFrame:
    """Outcomes with a silver ``correct`` (the call's answer agrees with its query's audit reference,
    ``batchplan.plans.audit.same_answer``) on the audited queries' calls that taught something and have no
    label yet. A single-LLM reference's own LLM stays unlabelled (agreeing with itself says nothing about it);
    a vote's members are labelled by the vote, as the audit's agreement rates count them."""
    open_tasks = set(queue.filter(pl.col("labels").is_null())["task"].unique().to_list())
    refs = {q: (a, set(ms or []), t) for q, t, a, ms in references.select(
        "query_id", "task", "reference_answer", "reference_models").iter_rows()}  # fmt: skip
    verdicts: list[bool | None] = []
    for query_id, llm, answer, status, source in outcomes.select(
        "query_id", "model", "answer", "status", "label_source"
    ).iter_rows():
        ref = refs.get(query_id)
        if ref is None or ref[0] is None or source is not None or status not in TEACHING or ref[1] == {llm}:
            verdicts.append(None)
        else:
            verdicts.append(same_answer(answer, ref[0], ref[2] in open_tasks))
    silver = pl.Series("_silver", verdicts, dtype=pl.Boolean)
    return (
        outcomes.with_columns(silver)
        .with_columns(
            pl.coalesce("correct", "_silver").alias("correct"),
            pl.when(pl.col("_silver").is_not_null()).then(pl.lit(SILVER)).otherwise(pl.col("label_source")).alias("label_source"),
        )
        .drop("_silver")
    )


def _keep_silver(storage: Storage, out_uri: str, outcomes: pl.DataFrame) -> pl.DataFrame:
    """``outcomes`` with the silver verdicts an audit already wrote into ``out_uri`` for the same calls: a
    rerun rebuilds the outcomes from the ledgers and must not forget what the audit found."""
    uri = join(out_uri, OUTCOMES_FILE)
    if not storage.exists(uri):
        return outcomes
    key = ["query_id", "round", "call"]
    before = conform(storage.read_frame(uri), LIVE_OUTCOME_SCHEMA, name=uri).filter(pl.col("label_source") == SILVER)
    if before.height == 0:
        return outcomes
    silver = before.select(*key, pl.col("correct").alias("_correct"), pl.col("label_source").alias("_source"))
    return (
        outcomes.join(silver, on=key, how="left", maintain_order="left")
        .with_columns(
            pl.when(pl.col("label_source").is_null()).then(pl.col("_correct")).otherwise(pl.col("correct")).alias("correct"),
            pl.coalesce("label_source", "_source").alias("label_source"),
        )
        .select(outcomes.columns)
    )


def write_run_outcomes(
    storage: Storage, out_uri: str, outcomes: pl.DataFrame, queries: pl.DataFrame, prices: pl.DataFrame | None = None
) -> None:
    """Queries and prices first, outcomes last: an outcomes file always has its queries beside it."""
    storage.write_frame(queries, join(out_uri, QUERIES_FILE))
    if prices is not None and prices.height:
        storage.write_frame(conform(prices, MODELS_SCHEMA, name="prices", required=("model",)), join(out_uri, PRICES_FILE))
    storage.write_frame(outcomes, join(out_uri, OUTCOMES_FILE))


def _replay_verdicts(outcomes: pl.DataFrame, truth: Any) -> pl.DataFrame:
    """A replay run's calls scored as the report scores them: the answer against gold where both are known,
    else the history's recorded verdict for (query, LLM) (open tasks keep the verdict, not the text)."""
    recorded = truth.outcomes.select("query_id", "model", pl.col("correct").alias("_recorded")).unique(
        ["query_id", "model"], keep="first"
    )
    scored = (
        outcomes.join(truth.gold, on="query_id", how="left")
        .join(recorded, on=["query_id", "model"], how="left")
        .with_columns(
            pl.when(~pl.col("status").is_in(TEACHING))
            .then(pl.lit(None, dtype=pl.Boolean))
            .when(pl.col("gold").is_not_null() & pl.col("answer").is_not_null())
            .then(pl.col("answer") == pl.col("gold"))
            .when(pl.col("status") == Status.NOT_ANSWER)
            .then(pl.lit(False))
            .otherwise(pl.col("_recorded"))
            .alias("correct")
        )
    )
    return scored.with_columns(
        pl.when(pl.col("correct").is_not_null()).then(pl.lit(GOLD)).otherwise(pl.lit(None)).alias("label_source")
    ).drop("gold", "_recorded")


def latest_labels(labels: pl.DataFrame) -> pl.DataFrame:
    """query_id, gold: each query's latest label (a later file corrects an earlier one)."""
    if labels.height == 0:
        return pl.DataFrame(schema={"query_id": pl.String, "gold": pl.String})
    return (
        labels.with_row_index("_order")
        .sort("received_at", "_order")
        .group_by("query_id", maintain_order=True)
        .last()
        .select("query_id", "gold")
    )


def kinds_of(queries: pl.DataFrame) -> pl.DataFrame:
    """query_id, task, _open (no label list: an open task, no judge), labels."""
    return queries.select("query_id", pl.col("task").fill_null("default"), pl.col("labels").is_null().alias("_open"), "labels")


def apply_labels(
    outcomes: pl.DataFrame, queries: pl.DataFrame, latest: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Outcomes with ``correct`` from the labels (gold) where the query is a classification and the call
    taught something; queries with their ``gold``. Silver and unlabelled rows are left as they are."""
    kinds = kinds_of(queries).select("query_id", "_open")
    scored = (
        outcomes.join(latest.rename({"gold": "_gold"}), on="query_id", how="left")
        .join(kinds, on="query_id", how="left")
        .with_columns(
            (pl.col("_gold").is_not_null() & ~pl.col("_open").fill_null(True) & pl.col("status").is_in(TEACHING)).alias(
                "_scorable"
            )
        )
        .with_columns(
            pl.when(pl.col("_scorable"))
            .then((pl.col("answer") == pl.col("_gold")).fill_null(False))
            .otherwise(pl.col("correct"))
            .alias("correct"),
            pl.when(pl.col("_scorable")).then(pl.lit(GOLD)).otherwise(pl.col("label_source")).alias("label_source"),
        )
        .select(outcomes.columns)
    )
    gold = latest.join(kinds.filter(~pl.col("_open")), on="query_id", how="semi").rename({"gold": "_gold"})
    queries = (
        queries.join(gold, on="query_id", how="left")
        .with_columns(pl.coalesce("_gold", "gold").alias("gold"))
        .select(queries.columns)
    )
    return scored, queries


def read_run_outcomes(storage: Storage, run_uri: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A run's (outcomes, queries), validated; a directory without them is refused naming the file."""
    outcomes_uri, queries_uri = join(run_uri, OUTCOMES_FILE), join(run_uri, QUERIES_FILE)
    for uri in (outcomes_uri, queries_uri):
        if not storage.exists(uri):
            raise ContractError(
                f"{run_uri}: no {uri.rsplit('/', 1)[-1]} (a run directory written by `batchplan run`, or a DAG "
                "run's outcomes/<run>/)"
            )
    outcomes = conform(storage.read_frame(outcomes_uri), LIVE_OUTCOME_SCHEMA, name=outcomes_uri, required=("query_id", "model"))
    queries = conform(storage.read_frame(queries_uri), HISTORY_QUERIES_SCHEMA, name=queries_uri, required=("query_id",))
    return outcomes, queries


def run_outcome_dirs(storage: Storage, root: str) -> list[str]:
    """The run directories under ``root`` (a layout's ``outcomes/``) that hold an ``OUTCOMES_FILE``, in name
    order (run keys carry the date): what ``runs_history`` reads."""
    return sorted({u.rsplit("/", 1)[0] for u in storage.iter_parts(root, OUTCOMES_FILE)})


def runs_history(storage: Storage, run_uris: Sequence[str]) -> History:
    """The labelled outcomes of past runs as one history to train on: per (query, LLM) the first call that
    taught something (an answer or a non-answer) with a label, gold before silver; ``weight`` 1 for gold and
    SILVER_WEIGHT for silver, and ``label_source`` kept, so training never counts silver as gold. An LLM that
    appears only here is learned from these rows (its prices from the run's models.csv)."""
    queries, outcomes, prices = [], [], []
    for uri in run_uris:
        got, asked = read_run_outcomes(storage, uri)
        taught = got.filter(
            pl.col("correct").is_not_null()
            & pl.col("status").is_in(TEACHING)
            & pl.col("label_source").is_in(LABEL_SOURCES)
        )
        outcomes.append(taught)
        queries.append(asked.filter(pl.col("query_id").is_in(taught["query_id"].unique().implode())))
        prices_uri = join(uri, PRICES_FILE)
        if storage.exists(prices_uri):
            prices.append(conform(storage.read_frame(prices_uri), MODELS_SCHEMA, name=prices_uri, required=("model",)))
    rows = (
        pl.concat(outcomes)
        if outcomes
        else pl.DataFrame(schema=LIVE_OUTCOME_SCHEMA)
    )
    rows = (
        rows.with_columns((pl.col("label_source") == SILVER).alias("_silver"))
        .sort("_silver", "query_id", "round", "call", maintain_order=True)
        .unique(["query_id", "model"], keep="first", maintain_order=True)
        .select(
            *OUTCOMES_SCHEMA.names(),
            "label_source",
            pl.when(pl.col("_silver")).then(pl.lit(SILVER_WEIGHT)).otherwise(pl.lit(1.0)).alias("weight"),
        )
        .sort("query_id", "model")
    )
    return History(
        queries=pl.concat(queries).unique("query_id", keep="first", maintain_order=True)
        if queries
        else pl.DataFrame(schema=HISTORY_QUERIES_SCHEMA),
        outcomes=rows,
        prices=pl.concat(prices).unique("model", keep="first", maintain_order=True)
        if prices
        else pl.DataFrame(schema=MODELS_SCHEMA),
    )
