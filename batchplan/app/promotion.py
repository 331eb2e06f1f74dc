"""Which predictor to promote, judged on what the traffic says: the retrain's evaluation set and its verdict.

A candidate predictor and the promoted one are scored on the same (query, LLM) outcomes, Brier score of
P(correct), lower is better. Which outcomes, in order of preference (``evaluation_set``):

1. ``gold``: the most recent gold-labelled outcomes of live runs (labels joined into ``outcomes/<run>/``),
   newest runs first (run keys carry the queue date), up to ``max_rows``, when there are at least
   ``min_rows`` of them: the traffic the predictor will meet, judged by people;
2. ``silver``: else the most recent audited outcomes (an audit's reference answer as the verdict), when
   there are ``min_rows``: the traffic, judged by the reference plan, which is itself wrong some of the time,
   so the decision record flags it (``silver`` true) and never calls it gold;
3. ``holdout``: else the bundled histories' fixed holdout split.

The live rows chosen for the evaluation are kept out of the candidate's training (``training_history``
drops their queries), so it is not scored on what it learned from; the bundled holdout is never trained on.

So once there are ``min_rows`` live gold rows, the newest of them (up to ``max_rows``) never reach a trained
predictor, its live correction included: a retrain lags the drift they show. The next plan does not wait
for it: the run DAGs' predict step fits the live correction again on every past run's gold outcomes, the
newest first (``app.labels.live_correction``), against the promoted predictor's own P for them, so
tonight's labels move tomorrow's estimates whichever predictor is promoted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import polars as pl

from batchplan.app.outcomes import runs_history
from batchplan.core.contracts import GOLD, SILVER
from batchplan.core.history import History, combine_histories
from batchplan.core.storage import Storage
from batchplan.predictors.metrics import brier

MIN_LIVE_ROWS: Final = 200  # live outcomes a verdict needs before it outranks the bundled holdout
MAX_LIVE_ROWS: Final = 5000  # the most recent ones only: a verdict on tonight's traffic, not last year's
HOLDOUT: Final = "holdout"


@dataclass(frozen=True)
class EvaluationSet:
    """The outcomes both predictors are scored on, and where they come from."""

    source: str  # gold / silver / holdout
    history: History  # the queries and their (query, LLM) outcomes with ``correct``
    runs: tuple[str, ...]  # the runs the live rows come from, newest first (none for the holdout)
    gold_rows: int  # live gold outcomes available (all runs), whichever source was chosen
    silver_rows: int  # live silver outcomes available
    min_rows: int  # live outcomes a source needed to be chosen

    @property
    def rows(self) -> int:
        return self.history.outcomes.height

    @property
    def live_query_ids(self) -> pl.Series:
        """The live queries scored: kept out of the candidate's training."""
        ids = self.history.queries["query_id"] if self.source != HOLDOUT else pl.Series([], dtype=pl.String)
        return ids.alias("query_id")


def evaluation_set(
    storage: Storage,
    run_uris: Sequence[str],
    holdout: History,
    *,
    min_rows: int = MIN_LIVE_ROWS,
    max_rows: int = MAX_LIVE_ROWS,
) -> EvaluationSet:
    """The evaluation set (see the module's note). ``run_uris``: the runs' outcome directories, in any order;
    ``holdout``: the bundled histories' held-out split."""
    newest_first = sorted(run_uris, reverse=True)
    per_run = [(uri, runs_history(storage, [uri])) for uri in newest_first]
    counts = {
        source: sum(int((h.outcomes["label_source"] == source).sum()) for _, h in per_run) for source in (GOLD, SILVER)
    }
    for source in (GOLD, SILVER):
        if counts[source] < min_rows:
            continue
        picked: list[History] = []
        runs: list[str] = []
        taken = 0
        for uri, history in per_run:
            rows = history.outcomes.filter(pl.col("label_source") == source)
            if rows.height == 0:
                continue
            picked.append(History(queries=history.queries, outcomes=rows, prices=history.prices))
            runs.append(uri)
            taken += rows.height
            if taken >= max_rows:
                break
        chosen = combine_histories(picked)
        # whole queries, so no query is both scored and trained on
        chosen = chosen.subset(chosen.outcomes["query_id"].unique())
        return EvaluationSet(source, chosen, tuple(runs), counts[GOLD], counts[SILVER], min_rows)
    return EvaluationSet(HOLDOUT, holdout, (), counts[GOLD], counts[SILVER], min_rows)


def score_predictor(predictor: Any, evaluation: History) -> tuple[float, int]:
    """(Brier score of P(correct), pairs scored) on every (query, LLM) outcome of ``evaluation``: lower is better."""
    queue = evaluation.as_queue()
    outcomes = evaluation.outcomes.filter(pl.col("correct").is_not_null())
    pairs = outcomes.select("query_id", "model").join(queue.select("query_id"), on="query_id")
    predicted = predictor.predict(queue, pairs, None)
    joined = predicted.join(outcomes.select("query_id", "model", "correct"), on=["query_id", "model"])
    return brier(joined["correct"].cast(pl.Float64).to_numpy(), joined["p_correct"].to_numpy()), joined.height


@dataclass(frozen=True)
class Verdict:
    source: str
    silver: bool  # the verdict rests on audits' reference answers, not on gold
    eval_pairs: int  # (query, LLM) outcomes scored
    candidate_score: float
    current_score: float | None
    promoted: bool
    reason: str


def judge(
    candidate: Any,
    current: Any | None,
    evaluation: EvaluationSet,
    *,
    min_gain: float = 0.0,
    same: bool = False,
) -> Verdict:
    """Score ``candidate`` and ``current`` (None: nothing promoted yet) on ``evaluation`` and decide: promote
    when nothing is promoted, when the candidate is the promoted one (``same``: a re-run), or when its Brier
    score is lower than the current one's by more than ``min_gain``."""
    candidate_score, rows = score_predictor(candidate, evaluation.history)
    current_score = None if current is None or same else score_predictor(current, evaluation.history)[0]
    on = f"on {rows} {evaluation.source} outcomes" + (" (audited silver, not gold)" if evaluation.source == SILVER else "")
    if current is None:
        promoted, reason = True, "no promoted predictor yet"
    elif same:
        promoted, reason = True, "this candidate is already the promoted one (re-run)"
    elif current_score is not None and candidate_score < current_score - min_gain:
        promoted, reason = True, f"Brier {candidate_score:.5f} < current {current_score:.5f} - {min_gain} {on}"
    else:
        promoted, reason = False, f"Brier {candidate_score:.5f} is not better than current {current_score:.5f} {on}"
    return Verdict(evaluation.source, evaluation.source == SILVER, rows, candidate_score, current_score, promoted, reason)
