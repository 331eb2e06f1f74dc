"""
### batchplan_backfill: a range of days under ONE total budget

Trigger with `start_date`, `end_date` (at most 92 days) and `budget_usd`, the total for the whole range.
The optimizer plans every day's queries **together** (one problem, one budget): a day whose queries are
cheap to get right gets less, a hard day more; the budget is not split evenly. The plan is then cut by
day, each day's share being its planned spend, scaled to the budget (the shares sum to at most it).

Days already taken by another run (e.g. the nightly) are skipped; empty days are ignored. Dispatch is mapped
over the days, one day at a time; a finished day is never redone and a failed one resumes from
its ledger: clear the failed task (or trigger the same range again) to continue day by day.

Outputs under `plans/`, `results/`, `reports/backfill-<start>-<end>/` (one results folder per day).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Asset, Param, dag, task

from batchplan.core.layout import run_key
from batchplan.dag_tasks import backfill, common, rounds, stages

RESULTS = Asset(name="batchplan_results", uri="batchplan://results")
OUTCOMES = Asset(name="batchplan_outcomes", uri="batchplan://outcomes")


@dag(
    dag_id="batchplan_backfill",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["batchplan"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    params={
        "start_date": Param("2026-01-01", type="string", format="date", description="First day (YYYY-MM-DD)."),
        "end_date": Param("2026-01-07", type="string", format="date", description="Last day, inclusive."),
        "budget_usd": Param(20.0, type="number", minimum=0, description="ONE budget for the whole range (USD)."),
        "accuracy_target": Param(None, type=["number", "null"], minimum=0, maximum=1),
        "allow_deferral": Param(True, type="boolean"),
        "tenant_budgets_usd": Param({}, type="object", description="Per-tenant budgets (USD) for the whole range."),
        "allow_unused_constraints": Param(
            False,
            type="boolean",
            description="Accept tenant budgets naming no queued tenant (a config listing every tenant); "
            "the report lists them. Off: such a name fails the run at plan, naming the queued tenants.",
        ),
        "backend": Param("replay", enum=["replay", "openai", "bedrock"]),
        **common.audit_params(),
        **rounds.params(),
    },
)
def batchplan_backfill() -> None:
    @task
    def claim(params: Any = None) -> dict[str, Any]:
        days = backfill.backfill_days(params["start_date"], params["end_date"])
        run = run_key("backfill", days[0], days[-1])
        storage, lay = common.storage_from_connection(), common.layout()
        # The owner is the range, not the Airflow run: triggering the same range again resumes it.
        claimed = backfill.claim_days(storage, lay, days, owner=f"batchplan_backfill/{run}")
        return {"run": run} | claimed

    @task
    def ingest(info: dict[str, Any]) -> dict[str, Any]:
        storage, lay = common.storage_from_connection(), common.layout()
        sources = [(d, lay.queue(d)) for d in info["days"]]
        return info | stages.ingest_stage(storage, lay, info["run"], sources)

    @task
    def predict(info: dict[str, Any], params: Any = None) -> dict[str, Any]:
        return info | stages.predict_stage(
            common.storage_from_connection(), common.layout(), info["run"], params["backend"]
        )

    @task
    def plan(info: dict[str, Any], params: Any = None) -> list[dict[str, Any]]:
        run_params = common.RunParams.from_params(params)
        return stages.plan_stage(
            common.storage_from_connection(), common.layout(), info["run"], run_params, group_by="day"
        )

    @task(max_active_tis_per_dagrun=1, retries=3)
    def dispatch_day(shard: dict[str, Any], params: Any = None) -> dict[str, Any]:
        return rounds.dispatch_task(shard, params)

    @task(outlets=[RESULTS, OUTCOMES])
    def merge(
        info: dict[str, Any],
        days: list[dict[str, Any]],
        done: list[dict[str, Any]],
        rounds_done: dict[str, Any],
        params: Any = None,
    ) -> dict[str, Any]:
        for summary in done:
            if not summary.get("in_rounds"):
                print(
                    f"{summary['group']}: ${summary['spent_usd']:.4f} of ${summary['budget_usd']:.4f} share, {summary['status']}"
                )
        return rounds.merge_task(info["run"], days, params)

    @task
    def report(info: dict[str, Any], merged: dict[str, Any], params: Any = None, dag_run: Any = None) -> dict[str, Any]:
        storage, lay = common.storage_from_connection(), common.layout()
        out = stages.report_stage(storage, lay, info["run"], params["backend"], run_id=dag_run.run_id)
        stages.index_report(storage, lay, dag_run.dag_id, dag_run.run_id, info["run"])
        print(f"batchplan report: {out['summary']}\nskipped days: {info['skipped']}\nHTML: {out['paths']['html']}")
        return out

    claimed = claim()
    ingested = ingest(claimed)
    days = plan(predict(ingested))
    done = dispatch_day.expand(shard=days)
    report(ingested, merge(ingested, days, done, rounds.round_tasks(ingested, done)))


batchplan_backfill()
