"""Where everything lives in the batchplan bucket: pure path functions, no I/O.

The root is ``s3://<bucket>/<prefix>`` (``BATCHPLAN_BUCKET``, ``BATCHPLAN_PREFIX``; a local directory
works the same for tests and laptops, ``BATCHPLAN_ROOT`` overrides both)::

    queue/<YYYY-MM-DD>/            producers drop parquet or jsonl parts here, one folder per day
    claims/<YYYY-MM-DD>.json       who took a day's queue (written once, conditional PUT): one run per day
    quarantine/<run>/              rows refused at ingest, with the reason (quarantine.parquet)
    plans/<run>/                   queue.parquet (the snapshot planned), predictions.parquet, plan.parquet,
                                   plan.frontier.json (planned accuracy at a dozen budgets, for the report),
                                   shards/<i>.parquet and shards.json (each shard's rows and budget share)
    results/<run>/                 shard-<i>/ (backfill: <day>/): the dispatcher's ledger, parts and manifest
                                   (resumable) and the shard's results.parquet;
                                   results.parquet (one row per query) and manifest.json (spend, counts)
    reports/<run>/                 report.html, report.md, report.json
    reports/_runs/<dag>/<run_id>.json  which run key an Airflow DAG run wrote (the UI's report view uses it)
    models/<version>/              one trained predictor per version
    models/CURRENT.json            the promoted version (written by the retrain DAG when a candidate wins)
    models/decisions/<run>.json    every retrain decision, promoted or not, with both scores
    outcomes/<run>/                what a run learned, one live outcome per call (``batchplan.app.outcomes``):
                                   outcomes.parquet, queries.parquet, models.csv (the history layout, read for
                                   retraining) and labels.parquet (every label joined into it)
    prices/models.csv              the live backends' price list (model, usd_per_mtok_in, usd_per_mtok_out, optional
                                   batch_discount): what the DAGs' openai and bedrock backends bill and plan with
    labels/<run>/                  label files (csv, jsonl, parquet: query_id, gold) dropped for a past run; the
                                   nightly report step and the retrain DAG join them into outcomes/<run>/

``<run>`` is a run key: the DAG's name and the queue date (``nightly-2026-11-22``), so a re-run of the
same logical date lands in the same folders and the dispatcher's ledger there stops it paying twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from batchplan.core.settings import Settings
from batchplan.core.storage import join

CURRENT_FILE = "CURRENT.json"  # in the models root: {"version": ...}, the promoted version
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def run_key(*parts: str) -> str:
    """A key safe in S3 and on disk from free text (a DAG id, a run id, a date): ``[A-Za-z0-9._=-]``."""
    key = "-".join(_UNSAFE.sub("_", p).strip("_") for p in parts if p)
    if not key:
        raise ValueError("a run key needs at least one non-empty part")
    return key


def day(value: str | date) -> str:
    """``YYYY-MM-DD`` for a date or an ISO date(time) string; raises ValueError otherwise."""
    if isinstance(value, date):
        return value.isoformat()[:10]
    return date.fromisoformat(str(value)[:10]).isoformat()


@dataclass(frozen=True)
class Layout:
    """Paths under one root (``s3://bucket/prefix`` or a local directory). Every method is pure."""

    root: str

    @classmethod
    def for_bucket(cls, bucket: str, prefix: str = "") -> Layout:
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket must be a bare bucket name, got {bucket!r}")
        prefix = prefix.strip("/")
        return cls(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Layout:
        """``settings.root`` (``BATCHPLAN_ROOT``), else ``s3://<bucket>/<prefix>`` (``BATCHPLAN_BUCKET``, default
        ``batchplan``; ``BATCHPLAN_PREFIX``). Without ``settings``, read fresh from the environment: a DAG task
        must see the environment it runs in, not the one a cached Settings saw first."""
        current = Settings() if settings is None else settings
        if current.root:
            return cls(current.root.rstrip("/"))
        return cls.for_bucket(current.bucket or "batchplan", current.prefix)

    @property
    def bucket(self) -> str | None:
        return self.root.removeprefix("s3://").split("/", 1)[0] if self.root.startswith("s3://") else None

    def _at(self, *parts: str) -> str:
        return join(self.root, *parts)

    # producers' input
    def queue(self, queue_day: str | date) -> str:
        return self._at("queue", day(queue_day)) + "/"

    def claim(self, queue_day: str | date) -> str:
        return self._at("claims", f"{day(queue_day)}.json")

    # one run's outputs
    def quarantine(self, run: str) -> str:
        return self._at("quarantine", run) + "/"

    def plans(self, run: str) -> str:
        return self._at("plans", run) + "/"

    def plan_file(self, run: str, name: str) -> str:
        return self._at("plans", run, name)

    def shard_plan(self, run: str, shard: int) -> str:
        return self._at("plans", run, "shards", f"{shard:03d}.parquet")

    def shards_manifest(self, run: str) -> str:
        return self._at("plans", run, "shards.json")

    def results(self, run: str) -> str:
        return self._at("results", run) + "/"

    def shard_results(self, run: str, shard: int | str) -> str:
        name = f"shard-{shard:03d}" if isinstance(shard, int) else run_key(shard)
        return self._at("results", run, name)

    def results_file(self, run: str) -> str:
        return self._at("results", run, "results.parquet")

    def results_manifest(self, run: str) -> str:
        return self._at("results", run, "manifest.json")

    def reports(self, run: str) -> str:
        return self._at("reports", run)

    def report_html(self, run: str) -> str:
        return self._at("reports", run, "report.html")

    def report_index(self, dag_id: str, airflow_run_id: str) -> str:
        return self._at("reports", "_runs", run_key(dag_id), f"{run_key(airflow_run_id)}.json")

    # the predictor's life cycle
    # stored under models/ (the bucket layout buckets already have); the methods say the glossary's noun
    def predictors(self) -> str:
        return self._at("models")

    def predictor(self, version: str) -> str:
        return self._at("models", version)

    def current_predictor(self) -> str:
        return self._at("models", CURRENT_FILE)

    def decision(self, run: str) -> str:
        return self._at("models", "decisions", f"{run}.json")

    def outcomes(self, run: str | None = None) -> str:
        return self._at("outcomes", run) if run else self._at("outcomes") + "/"

    def prices(self) -> str:
        return self._at("prices", "models.csv")

    def labels(self, run: str | None = None) -> str:
        return self._at("labels", run) + "/" if run else self._at("labels") + "/"
