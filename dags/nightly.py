"""
### batchplan_nightly: tonight's queue, planned and run under one budget

Waits for parts under `queue/<date>/` in the batchplan bucket (connection `batchplan_s3`), takes the day's
queue with a conditional write (a second run for the same day is skipped), then:

`ingest` (bad rows to `quarantine/<run>/`) -> `predict` (promoted predictor; label files dropped under
`labels/<run>/` for past runs joined first, and the predictor's live correction fitted again on the gold
outcomes of past runs, so tonight's plan uses the labels' corrected estimates) -> `plan` (one optimization
over the whole batch, split into at most 32 shards, each with its share of the budget: the shares sum to at
most `budget_usd`) -> `dispatch` (mapped over the shards; each shard's ledger makes re-runs free) ->
`merge` (`results/<run>/`; `outcomes/<run>/`: one outcome per call, for retraining) -> `report`
(`reports/<run>/report.html`; label files dropped under `labels/<run>/` for past runs are joined into their
outcomes and their reports re-rendered with the accuracy measured on them) -> `drift` (emits the Asset
`batchplan_drift`, which triggers the retrain DAG, only when the audits or the labels found drift, and logs
which; else skipped).

**Audits**: `audit_share` (empty: 5% for a live backend, none for replay; in rounds too) of the queries also get a
reference answer inside the budget; the report's first lines give the audited accuracy with its 95% interval
and any drift (an LLM or task outside the predictor's interval; from the labels of past runs: an LLM whose
labelled accuracy on a task excludes the history's estimate, which this plan already corrected). `explore_share`: at most that share
of the budget on calls of the LLMs the reference does not call, on the audited queries, so labels and silver
reach LLMs the plan never calls; empty: while those labels show drift on a task of the batch, 10% of the drifted
tasks' part of the budget, on their queries (the report says why), else none; 0: none.

**Report**: the *batchplan report* tab of the run (plugin `dags/plugins/batchplan_reports.py`), or
`reports/nightly-<date>/report.html` in the bucket; the `report` task's log has the one-line summary.

**Params** (editable in *Trigger DAG*; the defaults trigger as they are): `budget_usd`, `accuracy_target`,
`allow_deferral`, `queue_date` (optional; default: the run's logical date, today for a manual run),
`queue_prefix` (optional; a full URI, `{date}` filled in), `backend`, `max_shards`.

**Runs**: up to 4 at once, so a run triggered by hand never waits behind a scheduled one still waiting for
its queue; two runs for the same day are safe (the day's claim lets one through, the other is skipped). The
sensor waits up to 8 h in reschedule mode, then skips the run.

**Constraints**: a `tenant_budgets_usd` tenant not in the queue fails the run at `plan`, naming the queued
tenants, unless `allow_unused_constraints` (the report then lists it). Re-running a run with another budget
is refused at `plan`: the stored plan and its shards' budgets stand.

**Live backends** (`backend` openai or bedrock): the endpoint and key come from the Airflow connection
`batchplan_openai` (host: the base URL ending in /v1; password: the API key, else `OPENAI_API_KEY` in the
workers' environment) or `batchplan_bedrock` (an AWS connection), never from params; the prices the run
plans and bills with from `prices/models.csv` in the bucket (`model, usd_per_mtok_in, usd_per_mtok_out`,
optional `batch_discount`). `batch_api`: the rounds go as provider batch jobs (half price), planned at batch
prices; the report's *Batch API and real time* section gives the spend by mode and the fallbacks.

**Rounds**: `rounds` (> 1: `round_<k>_plan` -> `round_<k>_dispatch` (mapped over shards) -> `round_<k>_observe`
for each round, re-planned over the whole batch under what is left; rounds past the param do nothing; default
3, 1 = single shot) and `round_planner` (default `plan`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import Param, dag, task

from batchplan.core.layout import run_key
from batchplan.dag_tasks import common, rounds, stages
from batchplan.dag_tasks.run_tasks import DAG_DEFAULTS, asset, run_tasks

DRIFT = asset("batchplan_drift")  # the audits or the labels found the history off: retrain


def _sensor_key(params: dict[str, Any], logical_date: Any) -> str:
    return common.sensor_key(common.layout(), params, logical_date)


@dag(
    dag_id="batchplan_nightly",
    schedule="0 2 * * *",
    **DAG_DEFAULTS,
    # More than one: a run triggered by hand must not queue behind the scheduled run that unpausing creates,
    # which may wait hours in the sensor for a queue that is not there yet. Runs for the same day cannot
    # collide: the day's claim (ingest) lets one of them through and skips the other.
    max_active_runs=4,
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": True},
    user_defined_macros={"batchplan_sensor_key": _sensor_key},
    params={
        "budget_usd": Param(
            5.0, type=["number", "null"], minimum=0, description="One budget for the whole batch (USD)."
        ),
        "accuracy_target": Param(
            None,
            type=["number", "null"],
            minimum=0,
            maximum=1,
            description="Minimum mean accuracy; with no budget, the cheapest plan that reaches it.",
        ),
        "allow_deferral": Param(True, type="boolean", description="May the plan defer queries not worth their cost?"),
        "tenant_budgets_usd": Param(
            {}, type="object", description='Per-tenant budgets (USD) within the total, e.g. {"acme": 2.0}: hard caps.'
        ),
        "allow_unused_constraints": Param(
            False,
            type="boolean",
            description="Accept tenant budgets naming no queued tenant (a config listing every tenant); "
            "the report lists them. Off: such a name fails the run at plan, naming the queued tenants.",
        ),
        # Optional (the type admits null, default None): Airflow's trigger form treats a field whose type does
        # not admit null as required, and refuses to trigger while a required string is empty.
        "queue_date": Param(
            None,
            type=["null", "string"],
            format="date",
            description="YYYY-MM-DD of the queue to run; empty = the run's logical date (a manual run: today, UTC).",
        ),
        "queue_prefix": Param(
            None,
            type=["null", "string"],
            description="Full URI of the queue folder ({date} filled in); empty = queue/<date>/ in the bucket.",
        ),
        "backend": Param("replay", enum=["replay", "openai", "bedrock"], description="Dispatcher backend."),
        "max_shards": Param(
            common.MAX_SHARDS,
            type="integer",
            minimum=1,
            maximum=common.MAX_SHARDS,
            description="Upper bound on parallel dispatch tasks.",
        ),
        **common.audit_params(),
        **rounds.params(),
    },
)
def batchplan_nightly() -> None:
    wait_for_queue = S3KeySensor(
        task_id="wait_for_queue",
        bucket_key="{{ batchplan_sensor_key(params, logical_date) }}",
        wildcard_match=True,
        aws_conn_id=common.CONN_ID,
        mode="reschedule",  # frees its worker slot between pokes
        poke_interval=300,
        timeout=timedelta(hours=8).total_seconds(),
        soft_fail=True,  # no queue by the deadline: the run is skipped (nothing to do), not failed
    )

    @task
    def ingest(params: Any = None, dag_run: Any = None, logical_date: Any = None) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        storage, lay = common.storage_from_connection(), common.layout()
        day = common.queue_day(params, logical_date)
        run = run_key("nightly", day)
        try:
            common.claim_queue(storage, lay, day, owner=f"{dag_run.dag_id}/{dag_run.run_id}")
        except common.QueueClaimed as error:
            raise AirflowSkipException(str(error)) from error
        return {"run": run, "day": day} | stages.ingest_stage(storage, lay, run, common.queue_uri(lay, params, day))

    @task(outlets=[DRIFT])
    def drift(reported: dict[str, Any]) -> list[dict[str, Any]]:
        """Emits the drift Asset (the retrain DAG's trigger) only when the audits or the labels of past runs
        found drift, and logs which: a skipped task emits no Asset event."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not reported.get("drift"):
            raise AirflowSkipException("no drift found by the audits or the labels")
        sources = " and ".join(reported["drift_sources"])  # the report stage's: audits, labels
        print(f"batchplan drift from {sources}: {len(reported['drift'])} found; retrain triggered")
        return list(reported["drift"])

    ingested = ingest()
    wait_for_queue >> ingested
    drift(run_tasks(ingested))


batchplan_nightly()
