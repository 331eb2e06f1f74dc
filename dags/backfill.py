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

from airflow.sdk import Param, dag, task

from batchplan.core.layout import run_key
from batchplan.dag_tasks import backfill, common, rounds, stages
from batchplan.dag_tasks.run_tasks import DAG_DEFAULTS, run_tasks


@dag(
    dag_id="batchplan_backfill",
    schedule=None,
    **DAG_DEFAULTS,
    max_active_runs=1,
    doc_md=__doc__,
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

    # one shard per day, dispatched one day at a time (a failed day resumes from its ledger)
    run_tasks(ingest(claim()), dispatch_task_id="dispatch_day", dispatch_parallel=1, group_by="day")


batchplan_backfill()
