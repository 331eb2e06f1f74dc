"""
### batchplan_retrain: learn from new outcomes, promote only a better predictor

Runs when the nightly DAG publishes new outcomes (Asset `batchplan_outcomes`), or at once when its audits or
the labels of past runs found drift (Asset `batchplan_drift`, emitted by its `drift` task only then). Trains a candidate on the
bundled histories' training split plus the labelled outcomes of every `outcomes/<run>/` recorded so far
(label files dropped under `labels/<run>/` joined first; gold at full weight, audited silver lower), saves it as
`models/<version>/`, scores it and the promoted predictor on the same outcomes (Brier score of
P(correct)): the most recent gold labels of live runs when there are `min_live_rows` of them, else the
audited silver (flagged `silver` in the decision), else the bundled holdout; those live queries are kept out
of the candidate's training. It promotes it (`models/CURRENT.json`) only if it is better by more than `min_gain`, or if
nothing is promoted yet. Every decision, promoted or not, is written to `models/decisions/<version>.json`, with its `source` (gold /
silver / holdout), rows scored, both scores and the verdict.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Param, dag, task

from batchplan.app.promotion import MIN_LIVE_ROWS
from batchplan.dag_tasks import common, retrain
from batchplan.dag_tasks.run_tasks import DAG_DEFAULTS, asset

OUTCOMES = asset("batchplan_outcomes")
DRIFT = asset("batchplan_drift")


@dag(
    dag_id="batchplan_retrain",
    schedule=OUTCOMES | DRIFT,
    **DAG_DEFAULTS,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=5)},
    params={
        "predictor": Param("lightgbm", type="string", description="Predictor family to train."),
        "min_gain": Param(
            0.0, type="number", minimum=0, description="Promote only if Brier improves by more than this."
        ),
        "min_live_rows": Param(
            MIN_LIVE_ROWS,
            type="integer",
            minimum=1,
            description="Live gold (else audited silver) outcomes needed to judge on them rather than the holdout.",
        ),
        "round_choice": Param(
            True,
            type="boolean",
            description="Replay the training history to choose each task's round planner (off: the default planner).",
        ),
    },
)
def batchplan_retrain() -> None:
    @task
    def train(params: Any = None, dag_run: Any = None) -> dict[str, Any]:
        version = retrain.predictor_version(dag_run.run_after)
        return retrain.train_stage(
            common.storage_from_connection(),
            common.layout(),
            version,
            params["predictor"],
            int(params["min_live_rows"]),
            round_choice=bool(params["round_choice"]),
        )

    @task
    def evaluate_and_promote(candidate: dict[str, Any], params: Any = None) -> dict[str, Any]:
        decision = retrain.evaluate_and_promote(
            common.storage_from_connection(),
            common.layout(),
            candidate["candidate"],
            float(params["min_gain"]),
            int(params["min_live_rows"]),
        )
        verdict = "PROMOTED" if decision["promoted"] else "kept current"
        print(f"batchplan retrain: {verdict} (scored on {decision['source']}): {decision['reason']}")
        return decision

    evaluate_and_promote(train())


batchplan_retrain()
