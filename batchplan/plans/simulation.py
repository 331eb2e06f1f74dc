"""Exact replay of plan kinds on recorded outcomes: what a plan would have answered and paid per query.

The semantics mirror the dispatcher's executor (``dispatchers/executor.py``), so a plan's simulated
accuracy and cost on a history are what replaying it through the dispatcher realizes:

- ``single``: call ``models[0]``.
- ``vote``: call every member; the answer given most often wins; ties go to the larger sum of logprobs
  (0 where unknown), then to the earlier member.
- ``cascade``: call members in order; stop at member i when it answered and exp(logprob) >= thresholds[i];
  the last member always ends it; the answer is the last one given.
- ``agreement``: call the first two; if both answered the same, stop; otherwise call the third and keep
  its answer (or, if it gave none, the first answer given). FrugalGPT/AutoMix-style escalation with the
  disagreement of two cheap calls as the confidence signal, for endpoints without logprobs.

Correlation between models' errors is not modelled: it is replayed, because the members' recorded answers
to the same query are used together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from batchplan.core.contracts import PLAN_KINDS
from batchplan.core.history import History


@dataclass(frozen=True)
class PlanSpec:
    kind: str
    models: tuple[str, ...]
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"unknown plan kind {self.kind!r}: one of {PLAN_KINDS}")
        size = {"single": (1, 1), "vote": (2, 5), "cascade": (2, 4), "agreement": (3, 3)}[self.kind]
        if not size[0] <= len(self.models) <= size[1]:
            raise ValueError(f"a {self.kind} plan takes {size[0]}-{size[1]} models, got {len(self.models)}")
        if self.kind == "cascade" and len(self.thresholds) != len(self.models) - 1:
            raise ValueError("a cascade needs one threshold per member but the last")

    @property
    def label(self) -> str:
        body = "+".join(self.models)
        if self.kind == "cascade":
            body = (
                " > ".join(f"{m}@{t:g}" for m, t in zip(self.models, self.thresholds, strict=False))
                + f" > {self.models[-1]}"
            )
        return f"{self.kind}({body})"


@dataclass(frozen=True)
class Recorded:
    """One task's recorded outcomes as dense matrices over (query, model)."""

    task: str
    query_ids: list[str]
    models: list[str]
    labels: list[str]  # answer code i <-> labels[i]
    answers: np.ndarray  # int32 [n, M]; -1 = no answer recorded / unparseable
    logprob: np.ndarray  # float64 [n, M]; nan = unknown
    cost: np.ndarray  # float64 [n, M]
    correct: np.ndarray  # bool [n, M]: the recorded verdict
    gold: np.ndarray  # int32 [n]; -1 = unknown
    present: np.ndarray  # bool [n, M]: an outcome was recorded

    def column(self, model: str) -> int:
        return self.models.index(model)

    @property
    def has_logprobs(self) -> bool:
        return bool(np.isfinite(self.logprob[self.present]).mean() > 0.9) if self.present.any() else False


def recorded_by_task(history: History) -> dict[str, Recorded]:
    """Dense outcome matrices per task, for tasks with a label set (open tasks cannot vote or agree)."""
    queries = history.queries.filter(pl.col("labels").is_not_null())
    out: dict[str, Recorded] = {}
    for (task,), group in queries.group_by("task", maintain_order=True):
        ids = group["query_id"].to_list()
        outcomes = history.outcomes.filter(pl.col("query_id").is_in(group["query_id"].implode()))
        if outcomes.height == 0:
            continue
        models = sorted(outcomes["model"].unique().to_list())
        labels = sorted({lab for labs in group["labels"].to_list() for lab in labs})
        code = {lab: i for i, lab in enumerate(labels)}
        qi = {q: i for i, q in enumerate(ids)}
        mi = {m: j for j, m in enumerate(models)}
        n, m = len(ids), len(models)
        answers = np.full((n, m), -1, dtype=np.int32)
        logprob = np.full((n, m), np.nan)
        cost = np.zeros((n, m))
        correct = np.zeros((n, m), dtype=bool)
        present = np.zeros((n, m), dtype=bool)
        rows = np.array([qi[q] for q in outcomes["query_id"].to_list()], dtype=np.int64)
        cols = np.array([mi[x] for x in outcomes["model"].to_list()], dtype=np.int64)
        answers[rows, cols] = [code.get(a, -1) if a is not None else -1 for a in outcomes["answer"].to_list()]
        logprob[rows, cols] = outcomes["logprob"].fill_null(np.nan).to_numpy()
        cost[rows, cols] = outcomes["cost_usd"].fill_null(0.0).to_numpy()
        correct[rows, cols] = outcomes["correct"].fill_null(False).to_numpy()
        present[rows, cols] = True
        gold = np.array([code.get(g, -1) if g is not None else -1 for g in group["gold"].to_list()], dtype=np.int32)
        out[str(task)] = Recorded(str(task), ids, models, labels, answers, logprob, cost, correct, gold, present)
    return out


@dataclass(frozen=True)
class Simulated:
    answer: np.ndarray  # int32 [n]; -1 = none
    correct: np.ndarray  # bool [n]
    cost: np.ndarray  # float64 [n]: what the calls made would bill
    reached: np.ndarray  # bool [n, k]: member i was called
    covered: np.ndarray  # bool [n]: every member has a recorded outcome (else the row is not usable)


def simulate(spec: PlanSpec, rec: Recorded) -> Simulated:
    cols = [rec.column(m) for m in spec.models]
    a = rec.answers[:, cols]
    lp = rec.logprob[:, cols]
    c = rec.cost[:, cols]
    ok = a >= 0
    n, k = a.shape
    reached = np.zeros((n, k), dtype=bool)
    if spec.kind == "single":
        answer = a[:, 0]
        reached[:, 0] = True
    elif spec.kind == "vote":
        reached[:] = True
        same = (a[:, :, None] == a[:, None, :]) & ok[:, :, None] & ok[:, None, :]
        count = same.sum(axis=2)
        lpsum = np.where(same, np.nan_to_num(lp, nan=0.0)[:, None, :], 0.0).sum(axis=2)
        order = np.arange(k)[None, :]
        # lexicographic (count desc, lpsum desc, order asc) among members that answered
        score = np.where(ok, count * 1e6 + np.clip(lpsum, -1e5, 1e5) - order * 1e-9, -np.inf)
        winner = np.argmax(score, axis=1)
        answer = np.where(ok.any(axis=1), a[np.arange(n), winner], -1)
    elif spec.kind == "cascade":
        answer = np.full(n, -1, dtype=np.int32)
        active = np.ones(n, dtype=bool)
        for i in range(k):
            reached[:, i] = active
            answer = np.where(active & ok[:, i], a[:, i], answer)
            if i < k - 1:
                confident = ok[:, i] & (np.exp(np.nan_to_num(lp[:, i], nan=-np.inf)) >= spec.thresholds[i])
                active = active & ~confident
    else:  # agreement
        reached[:, :2] = True
        agree = ok[:, 0] & ok[:, 1] & (a[:, 0] == a[:, 1])
        reached[:, 2] = ~agree
        first_given = np.where(ok[:, 0], a[:, 0], a[:, 1])
        answer = np.where(agree, a[:, 0], np.where(ok[:, 2], a[:, 2], first_given))
    answer = answer.astype(np.int32)
    # Correct = matches gold where gold is known; else the recorded verdict of the model whose answer was kept.
    kept_by = np.argmax((a == answer[:, None]) & ok & reached, axis=1)
    recorded_verdict = rec.correct[:, cols][np.arange(n), kept_by] & (answer >= 0)
    correct = np.where(rec.gold >= 0, (answer == rec.gold) & (answer >= 0), recorded_verdict)
    return Simulated(
        answer=answer,
        correct=correct,
        cost=(c * reached).sum(axis=1),
        reached=reached,
        covered=np.asarray(rec.present[:, cols].all(axis=1)),
    )


def error_by_label(sim: Simulated, rec: Recorded) -> dict[str, float]:
    """P(plan wrong | true label = y) on the recorded queries, for every label with known gold."""
    out: dict[str, float] = {}
    usable = sim.covered & (rec.gold >= 0)
    for code, label in enumerate(rec.labels):
        rows = usable & (rec.gold == code)
        if rows.any():
            out[label] = float(1.0 - sim.correct[rows].mean())
    return out
