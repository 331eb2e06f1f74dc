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


def training_history(storage: Storage, lay: Layout) -> tuple[Any, Any, int, int]:
    """(train, eval, found, used): the bundled histories' train/holdout split, with every run's labelled
    outcomes (``outcomes/<run>/``, after joining the label files dropped under ``labels/<run>/``; gold at
    full weight, audited silver lower) added to training except those of held-out queries (no leakage into
    the evaluation); ``found`` and ``used`` count those outcome rows."""
    from batchplan.app.outcomes import OUTCOMES_FILE, runs_history
    from batchplan.core.history import combine_histories, load_history, with_holdout
    from batchplan.core.settings import Settings
    from batchplan.dag_tasks.stages import labels_stage

    settings = Settings()
    base = with_holdout(load_history(history_dirs(), storage), settings.holdout_fraction, settings.seed)
    labels_stage(storage, lay)
    learned_dirs = sorted({u.rsplit("/", 1)[0] for u in storage.iter_parts(lay.outcomes(), OUTCOMES_FILE)})
    train = base.split("train")
    found = used = 0
    if learned_dirs:
        extra = runs_history(storage, learned_dirs)
        found = extra.outcomes.height
        evaluation_ids = base.split("test").queries["query_id"].implode()
        extra = extra.subset(extra.queries.filter(~pl.col("query_id").is_in(evaluation_ids))["query_id"])
        used = extra.outcomes.height
        train = combine_histories([train, extra])
    return train, base.split("test"), found, used


def score_predictor(predictor: Any, evaluation: Any) -> tuple[float, int]:
    """Brier score of P(correct) on the held-out (query, model) outcomes: lower is better."""
    from batchplan.predictors.metrics import brier

    queue = evaluation.as_queue("test")
    pairs = evaluation.outcomes.select("query_id", "model").join(queue.select("query_id"), on="query_id")
    predicted = predictor.predict(queue, pairs, None)
    joined = predicted.join(evaluation.outcomes.select("query_id", "model", "correct"), on=["query_id", "model"])
    return brier(joined["correct"].cast(pl.Float64).to_numpy(), joined["p_correct"].to_numpy()), joined.height


def predictor_version(when: Any) -> str:
    """A predictor version name from the run's time: ``v20261122T020000``."""
    stamp = when if isinstance(when, datetime) else datetime.fromisoformat(str(when))
    return "v" + stamp.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def train_stage(storage: Storage, lay: Layout, run: str, predictor_name: str = "lightgbm") -> dict[str, Any]:
    """Train a candidate predictor on the training history; save it as ``models/<run>/``."""
    from batchplan.app import artifacts
    from batchplan.predictors import list_versions

    out = lay.model(run)
    if run in list_versions(storage, lay.models()):
        return {"candidate": run, "uri": out, "reused": True}
    train, _, found, used = training_history(storage, lay)
    artifacts.save(artifacts.train(train, predictor=predictor_name), storage, lay.models(), version=run)
    return {
        "candidate": run,
        "uri": out,
        "train_outcomes": train.outcomes.height,
        "outcomes_found": found,
        "outcomes_used": used,
    }


def evaluate_and_promote(storage: Storage, lay: Layout, run: str, min_gain: float = 0.0) -> dict[str, Any]:
    """Score candidate and current predictor on the same held-out pairs; promote the candidate only if
    its Brier score is lower by more than ``min_gain`` (or nothing is promoted yet). Records the decision."""
    from batchplan.app.artifacts import resolve_version
    from batchplan.predictors import load_predictor

    _, evaluation, found, used = training_history(storage, lay)
    candidate_score, pairs = score_predictor(load_predictor(storage, lay.models(), version=run), evaluation)
    current = resolve_version(storage, lay.models(), None)
    current_score = None
    if current is not None and current != run:
        current_score, _ = score_predictor(load_predictor(storage, lay.models(), version=current), evaluation)
    if current is None:
        promoted, reason = True, "no promoted predictor yet"
    elif current == run:
        promoted, reason = True, "this candidate is already the promoted one (re-run)"
    elif current_score is not None and candidate_score < current_score - min_gain:
        promoted, reason = True, f"Brier {candidate_score:.5f} < current {current_score:.5f} - {min_gain}"
    else:
        promoted, reason = False, f"Brier {candidate_score:.5f} is not better than current {current_score:.5f}"
    decision = Decision(
        run=run,
        candidate=run,
        current=current,
        candidate_score=candidate_score,
        current_score=current_score,
        metric="brier",
        promoted=promoted,
        reason=reason,
        eval_pairs=pairs,
        outcomes_found=found,
        outcomes_used=used,
    )
    storage.write_text(lay.decision(run), json.dumps(asdict(decision), indent=2))
    if promoted:
        pointer = {
            "version": run,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "brier": candidate_score,
        }
        storage.write_text(lay.current_model(), json.dumps(pointer))
    log.info("retrain.decision", **asdict(decision))
    return asdict(decision)
