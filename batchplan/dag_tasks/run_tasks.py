"""The tasks the nightly and backfill DAGs share, written once: ``predict -> plan -> dispatch (mapped over the
shards) -> round_<k>_* -> merge -> report``, added by ``run_tasks`` to the DAG being defined (a factory, like
``rounds.round_tasks``). The DAG files keep only what is theirs: the nightly's sensor, day claim and drift
task, the backfill's claim of a range of days.

Also the settings every batchplan DAG repeats (``DAG_DEFAULTS``) and the Assets they publish and listen to
(``RESULTS``, ``OUTCOMES``, ``DRIFT``): one definition, so the retrain DAG's schedule names the very Assets
the run DAGs emit. Airflow is imported inside ``run_tasks`` and the assets' accessor: nothing here runs at
import, and the task bodies import the application when they run (a DAG file parses fast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pendulum

from batchplan.dag_tasks import common, rounds, stages

if TYPE_CHECKING:
    from airflow.sdk import Asset

# start_date only anchors the schedule (catchup is off): a fixed date, not "now", so parsing reads no clock
DAG_DEFAULTS: dict[str, Any] = {
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "tags": ["batchplan"],
}

ASSET_URIS = {
    "batchplan_results": "batchplan://results",
    "batchplan_outcomes": "batchplan://outcomes",  # new outcomes recorded: the retrain DAG's trigger
    "batchplan_drift": "batchplan://drift",  # the audits or the labels found the history off: retrain at once
}


def asset(name: str) -> Asset:
    """The Asset ``name`` (one of ``ASSET_URIS``), the same object definition in every DAG file."""
    from airflow.sdk import Asset

    return Asset(name=name, uri=ASSET_URIS[name])


def run_tasks(
    ingested: Any, *, dispatch_task_id: str = "dispatch", dispatch_parallel: int = 8, group_by: str | None = None
) -> Any:
    """Add ``predict -> plan -> <dispatch_task_id>[shards] -> rounds -> merge -> report`` after ``ingested``
    (an XComArg of a dict with the run's key under ``run``; with ``skipped`` days, the report's log lists
    them) and return the report's XComArg. ``dispatch_parallel``: the mapped dispatch's
    ``max_active_tis_per_dagrun``; ``group_by``: one shard per value of that column (the backfill's days),
    else contiguous query ranges."""
    from airflow.sdk import task

    @task
    def predict(info: dict[str, Any], params: Any = None) -> dict[str, Any]:
        return info | stages.predict_stage(
            common.storage_from_connection(), common.layout(), info["run"], params["backend"]
        )

    @task
    def plan(info: dict[str, Any], params: Any = None) -> list[dict[str, Any]]:
        run_params = common.RunParams.from_params(params)
        return stages.plan_stage(
            common.storage_from_connection(), common.layout(), info["run"], run_params, group_by=group_by
        )

    @task(max_active_tis_per_dagrun=dispatch_parallel, retries=3)
    def dispatch(shard: dict[str, Any], params: Any = None) -> dict[str, Any]:
        return rounds.dispatch_task(shard, params)

    @task(outlets=[asset("batchplan_results"), asset("batchplan_outcomes")])
    def merge(
        info: dict[str, Any],
        shards: list[dict[str, Any]],
        done: list[dict[str, Any]],
        rounds_done: dict[str, Any],
        params: Any = None,
    ) -> dict[str, Any]:
        done = list(done)
        for summary in done:  # a run in rounds: its round_<k>_dispatch tasks sent the calls
            if not summary.get("in_rounds"):
                name = summary.get("group") or f"shard {summary['shard']}"
                share = "no budget" if summary["budget_usd"] is None else f"${summary['budget_usd']:.4f} share"
                print(f"{name}: ${summary['spent_usd']:.4f} of {share}, {summary['status']}")
        manifest = rounds.merge_task(info["run"], shards, params)
        print(
            f"batchplan {info['run']}: {len(done)} shards, spend ${manifest['spent_usd']:.4f} of budget "
            f"{manifest['budget_usd']}"
        )
        return manifest

    @task
    def report(info: dict[str, Any], merged: dict[str, Any], params: Any = None, dag_run: Any = None) -> dict[str, Any]:
        storage, lay = common.storage_from_connection(), common.layout()
        out = stages.report_stage(storage, lay, info["run"], params["backend"], run_id=dag_run.run_id)
        stages.index_report(storage, lay, dag_run.dag_id, dag_run.run_id, info["run"])
        skipped = f"\nskipped days: {info['skipped']}" if "skipped" in info else ""
        print(f"batchplan report: {out['summary']}{skipped}\nHTML: {out['paths']['html']}")
        for line in out["drift_lines"]:  # the report's first lines, as its tab shows them
            print(f"batchplan {line}")
        return out

    # XComArgs stand for the values while the DAG is defined (Any: the task signatures type what they get)
    predicted: Any = predict(ingested)
    shards: Any = plan(predicted)
    done: Any = dispatch.override(task_id=dispatch_task_id).expand(shard=shards)
    merged: Any = merge(ingested, shards, done, rounds.round_tasks(ingested, done))
    return report(ingested, merged)
