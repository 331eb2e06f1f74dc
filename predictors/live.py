"""The live correction: what the labels of live runs say about each (task, LLM), on top of the history.

A retrain on the bundled histories plus a few nights of live labels sees thousands of history rows and a
few dozen live ones: every fit (priors, difficulty, stage 2) is the history's, and the live rows move it by
their share, about nothing. When the traffic has drifted away from the history (new subjects, a model that
got worse) that is the wrong weighting: the live rows are the only ones about tonight's traffic.

So training fits, on the gold rows of live runs only (joined labels, or a replay run's verdicts), a logit
offset per (task, LLM) against the predictor's out-of-fold P(correct) for those rows,
p' = sigmoid(logit p + delta_task + delta_task,LLM), in two levels:

- ``delta_task`` on every live row of the task: new traffic that is harder or easier than the history is so
  for every LLM (held-out subjects move all of them the same way), and an LLM the plans never called, so
  never labelled, must move with the rest; else lowering the labelled LLM sends its queries to an
  unlabelled one whose estimate is just as far off. No LLM's rows weigh more there than the task's median
  labelled LLM's (``_capped_by_llm``): the LLM the plan calls most is the one labelled most, and when it alone
  drifted its rows alone would set every LLM's level;
- per (task, LLM) on the LLM's own rows, shrunk toward the task's drift as the *other* LLMs' rows show it
  (so its own rows count once): what sets the LLM apart from the task's drift.

Each level is shrunk by ``LIVE_PRIOR_ROWS`` pseudo-rows whose verdict is the estimate one level up (the history's prediction for the task; the one corrected
by the other LLMs' drift for an LLM), so the corrected mean P of n live rows with r right lands near
(r + k x p) / (n + k): one label moves an estimate a little, a few nights of them most of the way.

The task level, and an LLM's prior from the other LLMs, count each labelled *query* once (its rows share
its weight): a query several LLMs answered (an audit's reference vote, an exploration's calls) says how hard
that query is once, not once per LLM. Counted per row, four explored queries with nine LLMs each read as 36
rows against the 10 pseudo-rows, and their difficulty moved every LLM of the task most of the way (the nights
bench's oracle arm: -6 points on its first night with labels). The LLM level stays per row: its own rows are
one per query.

Silver verdicts (an audit's reference answer) stay out of the offsets: they measure agreement with a
reference that is itself wrong at times, so they read low for an LLM as good as the reference (the audit's
estimate corrects that with its s/q rates; an offset would learn the reference's error as the LLM's
drift). They teach the predictor's fits at their weight. The offsets are the drift correction the next
plan uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import polars as pl

from batchplan.core.numerics import P_CLIP, fit_logistic, logit, sigmoid

# pseudo-rows each level is shrunk by, the same for both: with a stronger LLM level an LLM's own bad labels
# would move the task's unlabelled LLMs further than itself (the nights bench: 30 calibrated worse, 0.042 vs
# 0.023 ECE, for no accuracy either way)
LIVE_PRIOR_ROWS: Final = 10.0
# the LLM level's empirical-Bayes shrinkage (``_llm_prior_rows``): rows an LLM needs to count, (task, LLM)s
# needed to estimate the spread, and the most pseudo-rows (no spread: the LLM level stays with its task)
EB_MIN_ROWS: Final = 5
EB_MIN_PAIRS: Final = 6
EB_MAX_ROWS: Final = 10_000.0
EB_Z: Final = 1.645  # one-sided 95%: the pooled spread
EB_OWN_Z: Final = 1.96  # one LLM standing out alone: its own z beyond 1.96 (at 2.58 a drifted LLM was pinned to its task: README)
MAX_OFFSET: Final = 3.0  # |delta| at most (logit units): a handful of labels never flips a model to 0 or 1

OFFSET_SCHEMA = pl.Schema(
    [("task", pl.String), ("model", pl.String), ("offset", pl.Float64), ("task_offset", pl.Float64),
     ("rows", pl.Float64), ("gold_rows", pl.Int64), ("p_before", pl.Float64), ("live_acc", pl.Float64)]
)  # fmt: skip


@dataclass
class LiveCorrection:
    """Per (task, LLM) logit offsets fitted on live gold rows; empty: no correction."""

    offsets: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=OFFSET_SCHEMA))

    @classmethod
    def fit(
        cls,
        task: np.ndarray,
        model: np.ndarray,
        y: np.ndarray,
        p: np.ndarray,
        weight: np.ndarray,
        gold: np.ndarray,
        prior_rows: float = LIVE_PRIOR_ROWS,
        query: np.ndarray | None = None,
    ) -> LiveCorrection:
        """``task``/``model`` name each live row; ``p`` its out-of-fold P(correct), ``y`` its verdict,
        ``weight`` its training weight, ``gold`` whether the verdict is a label (only those are fitted);
        ``query`` its query (the task level counts each query once; without it each row is its own query).
        ``offset`` per (task, LLM) is the total (task level plus the LLM's own), ``task_offset`` the task's."""
        keep = np.asarray(gold, dtype=bool)
        per_query = _per_query(np.asarray(query)[keep] if query is not None else None, int(keep.sum()))
        task, model, y = np.asarray(task)[keep], np.asarray(model)[keep], np.asarray(y, dtype=np.float64)[keep]
        p = np.clip(np.asarray(p, dtype=np.float64)[keep], P_CLIP, 1 - P_CLIP)
        weight = np.asarray(weight, dtype=np.float64)[keep]
        if len(y) == 0:
            return cls()
        frame = pl.DataFrame({"task": task, "model": model, "_i": np.arange(len(y))})
        # a query's rows share its weight at the task level, and no LLM outweighs the task's median LLM there
        shared = _capped_by_llm(frame, weight * per_query)
        by_task = {str(t): _offset(y[part["_i"]], logit(p[part["_i"]]), shared[part["_i"]], prior_rows)
                   for (t,), part in frame.group_by("task", maintain_order=True)}  # fmt: skip
        levels: list[tuple[str, str, np.ndarray, float]] = []
        for (t, m), part in frame.group_by("task", "model", maintain_order=True):
            i = part["_i"].to_numpy()
            # the LLM's own rows against the history's logits, shrunk toward the task's drift as the other
            # LLMs' rows show it (its own rows counted once, not again through the task level)
            others = np.setdiff1d(frame.filter(pl.col("task") == t)["_i"].to_numpy(), i)
            prior = _offset(y[others], logit(p[others]), shared[others], prior_rows) if len(others) else 0.0
            levels.append((str(t), str(m), i, prior))
        llm_rows = _llm_prior_rows(levels, y, p, weight, prior_rows, by_task)
        rows: list[tuple[Any, ...]] = []
        for (t, m, i, prior), pseudo in zip(levels, llm_rows, strict=True):
            # shrunk harder than the floor, toward the task's level (shrunk itself, each query once): the other
            # LLMs' level alone is anti-correlated with the LLM's own rows (a low-scoring LLM's others read
            # high), which a strong shrinkage would hand it whole; at the floor, the others' level (its own rows
            # counted once)
            toward = prior + (1 - prior_rows / pseudo) * (by_task[t] - prior)
            delta = _offset(y[i], logit(p[i]), weight[i], pseudo, target=sigmoid(logit(p[i]) + toward))
            rows.append((t, m, delta, by_task[t], float(weight[i].sum()), len(i), float(np.mean(p[i])),
                         float(np.sum(weight[i] * y[i]) / max(float(np.sum(weight[i])), 1e-12))))  # fmt: skip
        return cls(pl.DataFrame(rows, schema=OFFSET_SCHEMA, orient="row").sort("task", "model"))

    def task_offsets(self) -> dict[str, float]:
        """The task level alone: what an LLM with no live rows of the task moves by."""
        return dict(self.offsets.select("task", "task_offset").unique("task").iter_rows())

    def matrix(self, tasks: list[str], models: list[str]) -> np.ndarray | None:
        """(len(tasks), len(models)) offsets, 0 where none was fitted; None when there is no correction."""
        if self.offsets.height == 0:
            return None
        t_index = {t: i for i, t in enumerate(tasks)}
        m_index = {m: j for j, m in enumerate(models)}
        out = np.zeros((len(tasks), len(models)))
        for t, delta in self.task_offsets().items():
            if t in t_index:
                out[t_index[t], :] = delta
        for t, m, delta in self.offsets.select("task", "model", "offset").iter_rows():
            if t in t_index and m in m_index:
                out[t_index[t], m_index[m]] = delta
        return out if out.any() else None

    def apply(self, p: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """``p`` moved by each pair's ``offset`` on the logit scale."""
        return np.clip(sigmoid(logit(np.asarray(p, dtype=np.float64)) + offset), P_CLIP, 1 - P_CLIP)

    def to_state(self) -> list[dict[str, Any]]:
        return self.offsets.to_dicts()

    @classmethod
    def from_state(cls, state: list[dict[str, Any]] | None) -> LiveCorrection:
        return cls(pl.DataFrame(state or [], schema=OFFSET_SCHEMA))


def _llm_prior_rows(
    levels: list[tuple[str, str, np.ndarray, float]],
    y: np.ndarray,
    p: np.ndarray,
    weight: np.ndarray,
    floor: float,
    task_levels: dict[str, float],
) -> list[float]:
    """Per (task, LLM) of ``levels``, its level's pseudo-rows, empirical Bayes: the prior spread of an LLM's own
    drift around its task's, tau^2, as rows 1 / (tau^2 x p(1-p)), never fewer than ``floor``.

    tau^2 is the larger of the pooled spread (mean(d^2 - v) over the other (task, LLM)s with EB_MIN_ROWS rows, less
    EB_Z of its SD under no spread) and the LLM's own excess (d^2 - EB_OWN_Z^2 v): d its nearly unshrunk offset
    from its prior, v its sampling variance under the prior (the score test's, sound at 0 of 6 right; the ones
    standing out alone are not pooled). So the
    LLMs move apart only where the labels show it: all of them when they spread beyond their noise, one alone
    when its own labels stand out of theirs (an LLM wrong every time); else the LLM level stays with its task.
    With fewer than EB_MIN_PAIRS (task, LLM)s of EB_MIN_ROWS rows (labels on the plan's two or three LLMs a
    task), no spread can be told from noise: the floor, as before.

    Why: with a fixed 10 rows a dozen labels per LLM moved each LLM most of the way to its own noise, and the
    plan chased it (the winner's curse: the LLMs whose labels happened to read high were bought, and delivered
    as the history said: the nights bench's oracle_labels arm, every LLM's verdict on the labelled queries,
    lost 1.7 points on cascades_open with 10 rows)."""
    raws, noise, pq = [], [], []
    for _, _, i, prior in levels:
        raws.append(_offset(y[i], logit(p[i]), weight[i], 1.0, target=sigmoid(logit(p[i]) + prior)))
        q = sigmoid(logit(p[i]) + prior)
        noise.append(1.0 / max(float(np.sum(weight[i] * q * (1 - q))), 1e-9))
        pq.append(float(np.mean(q * (1 - q))))
    # d from the task's median LLM where EB_MIN_PAIRS of them have EB_MIN_ROWS rows, not from the others'
    # level: an LLM wrong every time drags the others' level of every other LLM, each of which would then
    # seem to stand out; with fewer, from the task's (shrunk) level (one LLM's raw level is no centre)
    by_task: dict[str, list[float]] = {}
    for (t, _, i, _), raw in zip(levels, raws, strict=True):
        if len(i) >= EB_MIN_ROWS:
            by_task.setdefault(t, []).append(raw)
    centres = {t: float(np.median(r)) if len(r) >= EB_MIN_PAIRS else task_levels[t] for t, r in by_task.items()}
    d2 = [(raw - centres.get(t, task_levels[t])) ** 2 for (t, _, _, _), raw in zip(levels, raws, strict=True)]
    alone = [d2[j] - EB_OWN_Z**2 * noise[j] for j in range(len(levels))]
    # the pooled spread is the rest's: one LLM wrong every time would otherwise read as a spread of all of them
    pooled = [j for j, (_, _, i, _) in enumerate(levels) if len(i) >= EB_MIN_ROWS and alone[j] <= 0]
    if sum(len(i) >= EB_MIN_ROWS for _, _, i, _ in levels) < EB_MIN_PAIRS:
        return [floor] * len(levels)
    tau2 = 0.0
    if len(pooled) >= EB_MIN_PAIRS:
        v = np.array([noise[j] for j in pooled])
        # under no spread d^2 / v is chi-square with one degree of freedom, so mean(d^2 - v) has SD
        # sqrt(2 sum v^2) / J: a spread only a one-sided test sees (the plain moment estimate of nine noisy LLMs
        # reads one every other time)
        excess = float(np.mean([d2[j] for j in pooled]) - v.mean()) - EB_Z * math.sqrt(2 * float(np.sum(v * v))) / len(v)
        tau2 = max(excess, 0.0)
    out = []
    for j in range(len(levels)):
        own = max(tau2, alone[j])
        out.append(max(floor, min(EB_MAX_ROWS, 1.0 / max(own * pq[j], 1e-12))))
    return out


def _capped_by_llm(frame: pl.DataFrame, shared: np.ndarray) -> np.ndarray:
    """``shared`` scaled down per (task, LLM) so that no LLM's rows weigh more, at the task level, than its
    task's median labelled LLM's.

    Why: the task level moves every LLM of the task, and the plan labels most the LLM it calls most. When that
    LLM is the one that drifted (the nights bench, llama3.1-70b on medmcqa: 24 of 48 labels, at 0.54 against
    0.87) its rows made the task's level, every other LLM read ~0.2 below what the stream gave it (gpt-4o 0.64
    against 0.91), and the drifted LLM looked no worse than the rest. Where the whole task moved (held-out
    subjects) every LLM says so and the cap changes little."""
    out = shared.copy()
    for _, part in frame.group_by("task", maintain_order=True):
        rows = {m: g["_i"].to_numpy() for (m,), g in part.group_by("model", maintain_order=True)}
        cap = float(np.median([shared[i].sum() for i in rows.values()]))
        for i in rows.values():
            total = float(shared[i].sum())
            if total > cap:
                out[i] = shared[i] * cap / total
    return out


def _per_query(query: np.ndarray | None, n: int) -> np.ndarray:
    """Per row, 1 / (rows of its query): a query's rows together weigh one row (all 1 without ``query``)."""
    if query is None:
        return np.ones(n)
    _, inverse, counts = np.unique(query.astype(str), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def _offset(
    y: np.ndarray, base_logit: np.ndarray, weight: np.ndarray, prior_rows: float, target: np.ndarray | None = None
) -> float:
    """The logit shift that fits rows with verdicts ``y`` at logits ``base_logit`` together with
    ``prior_rows`` pseudo-rows (spread over the rows) whose verdict is ``target`` (soft labels; default the
    prediction itself): the shifted mean P lands near (right answers + prior_rows x mean target) / (rows +
    prior_rows)."""
    soft = sigmoid(base_logit) if target is None else target
    pseudo = np.full(len(y), prior_rows / len(y))
    beta = fit_logistic(
        np.ones((2 * len(y), 1)), np.r_[y, soft], offset=np.r_[base_logit, base_logit], weights=np.r_[weight, pseudo]
    )
    return float(np.clip(beta[0], -MAX_OFFSET, MAX_OFFSET))
