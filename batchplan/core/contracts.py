"""The nouns every stage shares, each one schema in one place.

Glossary: one noun per thing, used for it everywhere (code, flags, files, manifest keys, logs).

| noun | what it is | in code |
|---|---|---|
| query | one row of the batch to answer (a ticket, a document) | ``query_id``; the queue is the batch's queries (QUEUE_SCHEMA) |
| LLM | a language model an endpoint serves: the only thing "model" may name | the frames' ``model`` / ``models`` columns and ``models.csv`` (below) |
| predictor | what ``batchplan train`` fits: per (query, LLM) P(correct) and cost | ``predictors.Predictor``; its registry root is ``--predictors DIR`` (``--model`` read for a release), its kind ``train --predictor NAME`` (lightgbm, prior) |
| prediction | one predictor output row | PREDICTION_SCHEMA |
| outcome | one recorded call in a history: what an LLM answered, whether right, what it cost | OUTCOMES_SCHEMA; a history is queries + outcomes + prices |
| live outcome | one call a run made, as it learns from it: an outcome plus task, round, call, status and where its ``correct`` came from | LIVE_OUTCOME_SCHEMA, a run's ``outcomes.parquet`` (``batchplan.app.outcomes``) |
| label | a ``(query_id, gold)`` row that arrives after a run (``batchplan label RUN_DIR FILE``, the DAGs' ``labels/<run>/``) | LABEL_SCHEMA, a run's ``labels.parquet`` (``batchplan.app.labels``) |
| label source | where an outcome's ``correct`` comes from: ``gold`` (a label, or the replay history), ``silver`` (an audit's reference answer: weighted lower in training, never counted as gold), null (unknown) | ``label_source``, LABEL_SOURCES |
| template | a fitted multi-LLM plan shape for a task (vote, cascade, agreement) with its calibration | ``Template``, ``PlanTemplates``; ``templates.json`` beside a predictor version (``plans.json`` read for a release); ``train --templates/--no-templates`` |
| plan kind | single / vote / cascade / agreement | PLAN_KINDS; ``--kinds`` on plan/run (``--plans`` read for a release) |
| candidate | a (query, plan kind + LLMs) pair the optimizer may choose | ``batchplan.plans.candidates.Candidates`` |
| option | a candidate as the optimizer sees it: value, cost, resource use (inside optimizer/ only) | the options table of ``optimizer.problem`` |
| compiled program | the optimizer's LP/MILP in matrix form | ``optimizer.compiled.Compiled``, a variable named ``program``; ``violated_rows(program, cols)`` lists the rows an assignment breaks (empty = feasible) |
| plan | what was chosen: one row per query | PLAN_SCHEMA, ``plan.parquet`` |
| round | one pass of calls over the open queries; a run has one or more | ROUND_PLAN_SCHEMA (``batchplan.core.rounds``) |
| observation | one call a round made, as the round planner sees it | OBSERVATION_SCHEMA (``batchplan.core.rounds``) |
| result | one row per query after dispatch: answer, status, what it cost | RESULT_SCHEMA |
| spend | money charged by the budget guard: the one spelling of spend | ``spent_usd``; per tenant ``tenant_spent_usd`` (dispatch summary, run manifest) |
| bill | what the provider charged (may be lower: a call whose bill is unknown, e.g. a timeout, is charged its reservation) | the ledger's ``usd`` |
| reservation | the high side of a call's cost, held before it is sent | ``reserve_cost_usd`` |
| audit | a uniformly sampled query that also gets a reference answer (the most accurate plan known), paid from the same budget | plan and result rows ``<query_id>#audit`` (``audit_id``); ``--audit-share`` |
| audit fit | per task, the reference plan an audit calls and every LLM's agreement with it, replayed on the history | ``batchplan.plans.audit.AuditFit`` (``fit_audit``), a variable named ``audit_fit``; ``audit.json`` beside a predictor version |

The frames keep the column name ``model`` (and ``models``, ``models_called``, ``fallback_models``) for an LLM:
it is the outcome histories' own format, read in place from ``../shared/data``, so renaming it would mean
converting every history. New code says ``llm`` for an LLM outside those frames.

Frames are validated where they enter the system (ingest, storage reads) and trusted inside.

| contract | columns |
|---|---|
| queue row | query_id (unique, non-empty), prompt (non-empty), system_prompt?, labels? (list of allowed answers, null for open tasks), task?, tenant?, priority? (> 0, default 1) |
| outcome history | queries.parquet + outcomes.parquet + models.csv, the layout of ``../shared/data`` |
| prediction | query_id, model, p_correct, cost_usd (expected), cost_high_usd (p90, what a dispatcher reserves) |
| plan row | query_id, kind (single / vote / cascade / agreement; "defer" or "unanswerable" in a run's plan file), models (call order), expected_cost_usd, expected_accuracy, reserve_cost_usd (high side, reserved before calling), thresholds (cascade), fallback_models (when a model is down) |
| result row | query_id, answer, models_called, cost_usd, status (done / failed / deferred), error (why not done), note (how a done query deviated from its plan) |
"""

from __future__ import annotations

from typing import Any, Final

import polars as pl

from batchplan.core.errors import ContractError
from batchplan.core.request import PLAN_KINDS as PLAN_KINDS  # beside the request: checked before heavy imports


def _columns(columns: dict[str, Any]) -> dict[str, Any]:
    """Typed column maps for the schemas below (mypy widens a bare dict literal of dtypes to object)."""
    return columns


QUEUE_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "prompt": pl.String,
            "system_prompt": pl.String,
            "labels": pl.List(pl.String),
            "task": pl.String,
            "tenant": pl.String,
            "priority": pl.Float64,
        }
    )
)
DEFAULT_TASK: Final = "default"
DEFAULT_TENANT: Final = "default"

HISTORY_QUERIES_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "dataset": pl.String,
            "task": pl.String,
            "split": pl.String,
            "subject": pl.String,
            "system_prompt": pl.String,
            "prompt": pl.String,
            "labels": pl.List(pl.String),
            "gold": pl.String,
        }
    )
)
OUTCOMES_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "model": pl.String,
            "answer": pl.String,
            "correct": pl.Boolean,
            "cost_usd": pl.Float64,
            "tokens_in": pl.Int64,
            "tokens_out": pl.Int64,
            "latency_ms": pl.Float64,
            "logprob": pl.Float64,
        }
    )
)


class Status:
    """The status of one call, the one vocabulary of ``CallResult.status`` and of the observations' and live
    outcomes' ``status`` column (``Status.OK``, ``Status.TIMEOUT``, ...). ``OK`` is an answer; the rest are failed
    attempts."""

    OK: Final = "ok"
    NOT_ANSWER: Final = "not_answer"  # a 200 whose text is not an answer (empty, refusal, outside the labels, bad JSON)
    # an open answer cut at max_tokens (finish_reason "length"): billed, not an answer, and the same call would be
    # cut again, so it is not retried; another LLM may answer it
    TRUNCATED: Final = "truncated"
    RATE_LIMITED: Final = "rate_limited"  # 429
    SERVER_ERROR: Final = "server_error"  # 5xx, malformed body
    TIMEOUT: Final = "timeout"
    CONNECTION: Final = "connection"  # reset, refused
    CLIENT_ERROR: Final = "client_error"  # other 4xx: retrying will not help
    UNAVAILABLE: Final = "unavailable"  # the backend does not offer this (query, model)


# A run's outcomes.parquet: one row per call the run made (failed calls too), correctness only from labels
# (gold) or audits (silver), never from a replay history in a live backend. The history columns come first,
# so a run directory (queries.parquet + outcomes.parquet + models.csv) is itself an outcome history.
GOLD: Final = "gold"
SILVER: Final = "silver"
LABEL_SOURCES: Final = (GOLD, SILVER)
# A silver outcome's weight in training, against 1 for gold: an audit's reference answer is itself wrong
# some of the time, so it may teach, never outweigh, a label.
SILVER_WEIGHT: Final = 0.3
LIVE_OUTCOME_SCHEMA: Final = pl.Schema(
    _columns(
        {
            **OUTCOMES_SCHEMA,
            "task": pl.String,
            "round": pl.Int64,  # 1-based; a single-shot run is round 1
            "call": pl.String,  # the ledger's call id, "<slot>:<model>:<attempt>": unique per query and round
            "status": pl.String,  # Status: ok, not_answer, rate_limited, ... (only ok/not_answer teach)
            "label_source": pl.String,  # gold / silver / null (LABEL_SOURCES): where ``correct`` comes from
        }
    )
)
# A run's labels.parquet: every label row received for it, first arrival kept (re-sending a file is a no-op).
LABEL_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "gold": pl.String,
            "received_at": pl.Datetime("us", "UTC"),
            "source_file": pl.String,
        }
    )
)
MODELS_SCHEMA: Final = pl.Schema({"model": pl.String, "usd_per_mtok_in": pl.Float64, "usd_per_mtok_out": pl.Float64})

PREDICTION_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "model": pl.String,
            "p_correct": pl.Float64,
            "cost_usd": pl.Float64,
            "cost_high_usd": pl.Float64,
        }
    )
)

# Plan kinds of a run's plan file beyond PLAN_KINDS: nothing is called for these rows.
DEFER: Final = "defer"  # the optimizer left the query for a later run
UNANSWERABLE: Final = "unanswerable"  # no model the backend offers (and the tenant may use) can answer it
PLAN_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "kind": pl.String,
            "models": pl.List(pl.String),
            "expected_cost_usd": pl.Float64,
            "expected_accuracy": pl.Float64,
            "reserve_cost_usd": pl.Float64,
            # cascade only: stop at models[i] when its confidence >= thresholds[i] (len = len(models) - 1)
            "thresholds": pl.List(pl.Float64),
            # single models to ask instead when a planned model is down, best first (recorded as a fallback)
            "fallback_models": pl.List(pl.String),
        }
    )
)

RESULT_STATUSES: Final = ("done", "failed", "deferred")
RESULT_SCHEMA: Final = pl.Schema(
    _columns(
        {
            "query_id": pl.String,
            "answer": pl.String,
            "models_called": pl.List(pl.String),
            "cost_usd": pl.Float64,
            "status": pl.String,
            "error": pl.String,  # why a query failed or was deferred
            "note": pl.String,  # how a done query was answered when not as planned: fallback, partial vote ...
        }
    )
)

QUARANTINE_SCHEMA: Final = pl.Schema(
    _columns({"row": pl.Int64, "query_id": pl.String, "reason": pl.String, "raw": pl.String})
)


def conform(frame: pl.DataFrame, schema: pl.Schema, *, name: str, required: tuple[str, ...] = ()) -> pl.DataFrame:
    """Return ``frame`` with exactly the columns of ``schema``, cast to its types.

    Columns in ``required`` must be present; other missing columns are filled with nulls. A column that
    cannot be cast raises a ContractError naming it, rather than turning values into nulls silently.
    """
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ContractError(f"{name}: missing required column(s) {missing}; found {frame.columns}")
    columns = []
    for column, dtype in schema.items():
        if column not in frame.columns:
            columns.append(pl.lit(None, dtype=dtype).alias(column))
            continue
        have = frame.schema[column]
        if have == dtype or have == pl.Null:
            columns.append(pl.col(column).cast(dtype))
            continue
        try:
            frame.select(pl.col(column).cast(dtype, strict=True))
        except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as error:
            raise ContractError(f"{name}: column {column!r} is {have}, expected {dtype}: {error}") from error
        columns.append(pl.col(column).cast(dtype))
    return frame.select(columns)


AUDIT_SUFFIX: Final = "#audit"  # an audit's plan and result rows: the audited query's id with this suffix


def audit_id(query_id: str) -> str:
    """The id of the reference call(s) of an audited query: its own plan and result rows, its own ledger keys."""
    return query_id + AUDIT_SUFFIX


# an exploration's plan and result rows (``<query_id>#explore#audit``): calls of LLMs beside the reference on a
# sampled query, so labels and silver reach LLMs the plan does not call; audit rows (``is_audit``), not references
EXPLORE_SUFFIX: Final = "#explore" + AUDIT_SUFFIX


def explore_id(query_id: str) -> str:
    """The id of an explored query's exploration calls: its own plan and result rows, its own ledger keys."""
    return query_id + EXPLORE_SUFFIX


def audited_query_id(query_id: str) -> str:
    """The query an id belongs to: an audit's or exploration's id without its suffix, any other id as is (what
    a backend that answers from a history, or the endpoint's prompt, is about)."""
    return query_id.removesuffix(EXPLORE_SUFFIX).removesuffix(AUDIT_SUFFIX)


def audited_query(column: str = "query_id") -> pl.Expr:
    """``audited_query_id`` of a column: the query each row is about."""
    return pl.col(column).str.strip_suffix(EXPLORE_SUFFIX).str.strip_suffix(AUDIT_SUFFIX)


def is_exploration(column: str = "query_id") -> pl.Expr:
    """Whether a row is an exploration's (an audit row that is no reference: ``EXPLORE_SUFFIX``)."""
    return pl.col(column).str.ends_with(EXPLORE_SUFFIX)


def is_audit(column: str = "query_id") -> pl.Expr:
    """Whether a row of a plan or results frame is an audit's reference call rather than a delivered answer."""
    return pl.col(column).str.ends_with(AUDIT_SUFFIX)
