"""The retrain DAG's steps: the training history (with recorded outcomes, none of held-out queries), train
a candidate predictor, score it against the promoted one and promote it only if better."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from batchplan.core.layout import Layout
from batchplan.core.storage import Storage
from batchplan.dag_tasks.common import history_dirs, log


@dataclass(frozen=True)
class Decision:
    run: str
    candidate: str
    current: str | None
    candidate_score: float
    current_score: float | None
    metric: str
    promoted: bool
    reason: str
    eval_pairs: int
    outcomes_found: int
    outcomes_used: int
    # what both were scored on (``batchplan.app.promotion``): gold labels of live runs, audited silver
    # (``silver`` true: not gold) or the bundled holdout; the live rows available; the runs scored on
    source: str = "holdout"
    silver: bool = False
    live_gold_rows: int = 0
    live_silver_rows: int = 0
    min_live_rows: int = 0
    eval_runs: tuple[str, ...] = ()


def training_history(storage: Storage, lay: Layout, min_live_rows: int | None = None) -> tuple[Any, Any, int, int]:
    """(train, evaluation, found, used): the bundled histories' train split with every run's labelled
    outcomes (``outcomes/<run>/``, after joining the label files dropped under ``labels/<run>/``; gold at
    full weight, audited silver lower) added, and the evaluation set (``batchplan.app.promotion.
    evaluation_set``: recent live gold, else audited silver, else the bundled holdout). Neither the bundled
    holdout nor the live queries scored are trained on; ``found`` and ``used`` count the runs' outcome rows."""
    from batchplan.app.outcomes import run_outcome_dirs, runs_history
    from batchplan.app.promotion import MIN_LIVE_ROWS, evaluation_set
    from batchplan.core.history import combine_histories, load_history, with_holdout
    from batchplan.core.settings import Settings
    from batchplan.dag_tasks.stages import labels_stage

    settings = Settings()
    base = with_holdout(load_history(history_dirs(), storage), settings.holdout_fraction, settings.seed)
    labels_stage(storage, lay)
    learned_dirs = run_outcome_dirs(storage, lay.outcomes())
    train = base.split("train")
    evaluation = evaluation_set(
        storage, learned_dirs, base.split("test"), min_rows=MIN_LIVE_ROWS if min_live_rows is None else min_live_rows
    )
    found = used = 0
    if learned_dirs:
        extra = runs_history(storage, learned_dirs)
        found = extra.outcomes.height
        held = pl.concat([base.split("test").queries["query_id"], evaluation.live_query_ids]).implode()
        extra = extra.subset(extra.queries.filter(~pl.col("query_id").is_in(held))["query_id"])
        used = extra.outcomes.height
        train = combine_histories([train, extra])
    return train, evaluation, found, used


def predictor_version(when: Any) -> str:
    """A predictor version name from the run's time: ``v20261122T020000``."""
    stamp = when if isinstance(when, datetime) else datetime.fromisoformat(str(when))
    return "v" + stamp.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def train_stage(
    storage: Storage,
    lay: Layout,
    run: str,
    predictor_name: str = "lightgbm",
    min_live_rows: int | None = None,
    *,
    round_choice: bool = True,
) -> dict[str, Any]:
    """Train a candidate predictor on the training history; save it as ``models/<run>/``. ``round_choice`` off
    skips the replay that chooses each task's round planner (the version then plans with the default one)."""
    from batchplan.app import artifacts
    from batchplan.predictors import list_versions

    out = lay.predictor(run)
    if run in list_versions(storage, lay.predictors()):
        return {"candidate": run, "uri": out, "reused": True}
    train, _, found, used = training_history(storage, lay, min_live_rows)
    trained = artifacts.train(train, predictor=predictor_name, round_choice=round_choice)
    artifacts.save(trained, storage, lay.predictors(), version=run)
    return {
        "candidate": run,
        "uri": out,
        "train_outcomes": train.outcomes.height,
        "outcomes_found": found,
        "outcomes_used": used,
    }


def evaluate_and_promote(
    storage: Storage, lay: Layout, run: str, min_gain: float = 0.0, min_live_rows: int | None = None
) -> dict[str, Any]:
    """Score candidate and current predictor on the same outcomes (recent live gold, else audited silver,
    else the bundled holdout: ``batchplan.app.promotion``); promote the candidate only if its Brier score is
    lower by more than ``min_gain`` (or nothing is promoted yet). Records the decision."""
    from batchplan.app.artifacts import resolve_version
    from batchplan.app.promotion import judge
    from batchplan.predictors import load_predictor

    _, evaluation, found, used = training_history(storage, lay, min_live_rows)
    current = resolve_version(storage, lay.predictors(), None)
    verdict = judge(
        load_predictor(storage, lay.predictors(), version=run),
        load_predictor(storage, lay.predictors(), version=current) if current is not None and current != run else None,
        evaluation,
        min_gain=min_gain,
        same=current == run,
    )
    decision = Decision(
        run=run,
        candidate=run,
        current=current,
        metric="brier",
        outcomes_found=found,
        outcomes_used=used,
        **asdict(verdict),  # the judge's fields as they are: scores, promoted, reason, eval_pairs, source, silver
        live_gold_rows=evaluation.gold_rows,
        live_silver_rows=evaluation.silver_rows,
        min_live_rows=evaluation.min_rows,
        eval_runs=tuple(u.rstrip("/").rsplit("/", 1)[-1] for u in evaluation.runs),
    )
    storage.write_text(lay.decision(run), json.dumps(asdict(decision), indent=2))
    if decision.promoted:
        pointer = {
            "version": run,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "brier": decision.candidate_score,
            "source": decision.source,
        }
        storage.write_text(lay.current_predictor(), json.dumps(pointer))
    log.info("retrain.decision", **asdict(decision))
    return asdict(decision)
