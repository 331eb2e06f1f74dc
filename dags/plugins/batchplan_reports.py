"""The batchplan report inside the Airflow UI: a *batchplan report* tab on every DAG run page.

An Airflow 3 plugin: a FastAPI app mounted at ``/batchplan`` serves ``reports/<run>/report.html`` from
the bucket (through the ``batchplan_s3`` connection), and an external view with destination ``dag_run``
puts it on the run page (the UI fills ``{DAG_ID}`` and ``{RUN_ID}``). Enable it with
``AIRFLOW__CORE__PLUGINS_FOLDER=<repo>/dags/plugins`` (docker-compose and the Helm values set it).
"""

from __future__ import annotations

from html import escape
from typing import Any, ClassVar

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

app = FastAPI(title="batchplan reports")


# Same rule as the REST API's DAG-run endpoints: the caller (UI cookie or bearer token) may read this
# DAG's runs. Plugin FastAPI apps are not protected by Airflow unless they say so.
@app.get(
    "/reports/{dag_id}/{run_id}",
    response_class=HTMLResponse,
    dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
)
def report(dag_id: str, run_id: str) -> HTMLResponse:
    from batchplan.dag_tasks import common, stages

    html = stages.report_html_for(common.storage_from_connection(), common.layout(), dag_id, run_id)
    if html is None:
        # shown inside the run page's tab: a sentence, not a JSON error body
        missing = escape(
            f"No batchplan report for {dag_id} / {run_id} yet: it is written when the run's report task finishes."
        )
        return HTMLResponse(f"<!doctype html><html><body><p>{missing}</p></body></html>", status_code=404)
    return HTMLResponse(html)


class BatchplanReportsPlugin(AirflowPlugin):
    name = "batchplan_reports"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": app, "url_prefix": "/batchplan", "name": "batchplan reports"}
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "batchplan report",
            "href": "batchplan/reports/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "batchplan_report",
        }
    ]
