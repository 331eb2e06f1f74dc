"""The posterior of a query's answer given what its calls so far returned, fitted on the history by replay.

Between rounds the planner needs, per open query, two numbers (``Posterior``):

- ``current``: P(the answer the query keeps now is right | what was observed for it), and which answer that is;
- ``after``: P(the answer it keeps after one more call to LLM m is right | the same), for every LLM not yet asked.

Inputs per called LLM: its prior P(correct) (the predictor's, out-of-fold on the history), its answer, its
confidence exp(logprob) where the endpoint gives one, and how its answer relates to the other answers of the
query (how many agree, how strong they are, how strong the dissent is). Nothing assumes members err
independently: every model below is fitted on *replay states* built from the history's recorded joint
outcomes (the real answers of several LLMs to the same query), so agreement between two correlated LLMs
counts for what it was worth on the history, not for what independence would promise.

The answer rule (``choose``): among the LLMs that answered, score each one's answer by stage A (a logistic on
the features above, per task); the query keeps the answer of the highest score, i.e. among its distinct
answers the one with the highest posterior, agreement included. Tasks whose answers are not kept as text (code:
the history holds the verdict only) keep the last answer given, as the report scores them. ``current`` is
stage B, a Platt map of the kept answer's stage-A score fitted on whether *that rule's* answer was right, so it
is about exactly the rule (the max of several scores is biased up: B removes that). ``after`` is stage C, a
logistic on the current state and the candidate LLM, fitted on whether the rule's answer after that LLM's
recorded reply was right (what the replay says the call is worth, correlation included).

The run's estimate (``estimate``; ``estimated_accuracy`` is its mean over the final answers) is stage B's p
through a calibration fitted apart (``fit_estimates``: cross-fitted on replay states, the kept answer's
confidence logit clipped at 1e-8 rather than P_CLIP with bends at 0.9-0.9999, lone answer, agreement, the kept
LLM): stage B is pessimistic on confident lone answers (above 1 - 1e-4 they look alike to it), but a finer
confidence in stages A-C cost accuracy, so no decision reads the calibration.

Replay states: per training query, every subset of one to three LLMs (at most ``MAX_SUBSETS`` per size, chosen
at random), as if exactly those had been called; a size's rows weigh 1 / (subsets of that size) so each
depth counts alike. Stage C learns from every transition of a state of one or two LLMs to one more.

Answers are compared after ``normalize`` (case, punctuation, spacing); open answers (no label set) also agree as
the audit compares them (``open_agreement``: token F1 >= 0.5, so "Everton" and "Everton FC" are one answer):
on TriviaQA that splits right from wrong more sharply than equal text (gpt-4o-mini is right 98% of the time
when 405b agrees by either rule, but 55% when it disagrees by token F1 against 67% by text). Failed calls and
answers outside the labels carry no answer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import polars as pl

from batchplan.core.history import History, stable_fold
from batchplan.core.numerics import fit_logistic, logit, sigmoid
from batchplan.plans.audit import answer_tokens, f1_agrees
from batchplan.predictors.metrics import ece

NONE: Final = -2  # no answer: not called, or the call failed / gave no usable answer
OPAQUE: Final = -1  # answered, text not kept (open tasks scored by a recorded verdict)
MAX_SUBSETS: Final = 30
MAX_ROWS: Final = 30_000  # replay rows per stage fit
MAX_DEPTH: Final = 3  # replay states of up to this many calls
L2: Final = 1.0
FOLDS: Final = 4
LAMBDA_GRID: Final = tuple(float(x) for x in np.geomspace(1.0, 1e8, 49))  # accuracy per USD
POOLED: Final = "*"  # the model fitted on every task together: used for a task the history did not have


def normalize(answers: pl.Expr) -> pl.Expr:
    """Answers as compared for agreement: lower case, punctuation dropped, spaces collapsed."""
    return (
        answers.str.to_lowercase()
        .str.replace_all(r"[^\p{L}\p{N}\s]", "")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def open_agreement(query: np.ndarray, code: np.ndarray, answer: pl.Series, open_: np.ndarray) -> np.ndarray:
    """``code`` (per answer row: its ``normalize``d text's id within the query ``query``, < 1 none) with the
    ids of an open query's answers that agree as the audit compares open answers (``audit.same_answer``:
    token F1 >= OPEN_AGREEMENT, so "Everton" and "Everton FC" are one answer) merged, transitively, into the
    smallest. Labelled answers agree only when equal, as before. In frames (no per-pair Python): at 1M open
    queries the round planner's state is built every round."""
    out = code.copy()
    text = open_ & (code > 0)
    if not text.any():
        return out
    # ids are dense ranks from 1: a query has two different answers exactly when one of its ids is 2 or more
    top = np.zeros(int(query.max()) + 1, dtype=np.int64)
    np.maximum.at(top, query[text], code[text])
    rows = np.flatnonzero(text & (top[query] >= 2))
    if len(rows) < 2:
        return out
    # one text per (query, id): equal normalized texts already share the id
    reps = (
        pl.DataFrame({"q": query[rows], "c": code[rows], "a": answer.gather(rows)})
        .unique(["q", "c"], keep="first", maintain_order=True)
        .with_row_index("node")
    )
    tokens = reps.select("node", "q", answer_tokens(pl.col("a")).alias("t")).explode("t").drop_nulls("t")
    sizes = tokens.group_by("node").len("n")
    # tokens compared by hash (a collision, ~1e-19 a pair, could only make two answers agree by one token)
    counts = tokens.group_by("node", "q", pl.col("t").hash().alias("t")).len("k")
    common = (
        counts.join(counts, on=["q", "t"], suffix="_b")
        .filter(pl.col("node") < pl.col("node_b"))
        .group_by("node", "node_b")
        .agg(pl.min_horizontal("k", "k_b").sum().alias("common"))
        .join(sizes, on="node")
        .join(sizes.rename({"node": "node_b", "n": "n_b"}), on="node_b")
    )
    edges = common.filter(f1_agrees(pl.col("common"), pl.col("n") + pl.col("n_b")))
    if edges.height == 0:
        return out
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    k = reps.height
    graph = coo_matrix((np.ones(edges.height), (edges["node"].to_numpy(), edges["node_b"].to_numpy())), shape=(k, k))
    _, component = connected_components(graph, directed=False)
    merged = reps.with_columns(pl.Series("g", component)).with_columns(pl.col("c").min().over("g").alias("to"))
    # every row of a merged id takes its component's smallest id (rows are keyed by query and id)
    key = pl.DataFrame({"q": query[rows], "c": code[rows]}).join(
        merged.select("q", "c", "to"), on=["q", "c"], how="left", maintain_order="left"
    )
    out[rows] = key["to"].fill_null(key["c"]).to_numpy()
    return out


@dataclass
class States:
    """Per query (rows) and LLM (columns) what was observed; dense, one task or a whole batch."""

    prior: np.ndarray  # float [n, M]: P(correct) predicted; nan where the LLM is not offered
    code: np.ndarray  # int32 [n, M]: answer id within the query (equal = same answer), OPAQUE or NONE
    conf: np.ndarray  # float [n, M]: exp(logprob) of the answer; nan where unknown
    order: np.ndarray  # int32 [n, M]: call sequence (larger = later); -1 not called
    # logit of ``prior`` (``prior_logit``): stages A and C both read it, once per re-plan is enough
    _lp_cache: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def answered(self) -> np.ndarray:
        return self.code != NONE

    def prior_logit(self) -> np.ndarray:
        if self._lp_cache is None:
            self._lp_cache = _lp(self.prior)
        return self._lp_cache

    def with_call(self, j: int, code: np.ndarray, conf: np.ndarray) -> States:
        """The states after LLM ``j`` answered ``code`` with ``conf`` on every row (replay)."""
        new_code, new_conf, new_order = self.code.copy(), self.conf.copy(), self.order.copy()
        new_code[:, j], new_conf[:, j] = code, conf
        new_order[:, j] = np.where(code != NONE, self.order.max(axis=1) + 1, -1)
        return States(self.prior, new_code, new_conf, new_order)


def _lp(p: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(p), logit(np.nan_to_num(p, nan=0.5)), 0.0)


def _answer_columns(s: States) -> tuple[list[np.ndarray], np.ndarray]:
    """Stage A's per-(query, LLM) columns [n, M] (before the per-LLM terms), and the confidence logits."""
    lp = s.prior_logit()
    known = np.isfinite(s.conf)
    lc = np.where(known, logit(np.nan_to_num(s.conf, nan=0.5)), 0.0)
    pairwise = [np.zeros_like(lp) for _ in range(6)]
    # agreement only between LLMs that answered: the [n, A, A] comparisons over the A columns any row answered
    active = np.flatnonzero((s.code >= 0).any(axis=0))
    if len(active) > 1:
        code, a_lp, a_lc = s.code[:, active], lp[:, active], lc[:, active]
        text = code >= 0
        others = ~np.eye(len(active), dtype=bool)[None]
        both = text[:, :, None] & text[:, None, :] & others
        same = both & (code[:, :, None] == code[:, None, :])
        diff = both & ~same
        any_dis = diff.any(axis=2)
        found = [
            same.sum(axis=2).astype(float),
            (same * a_lp[:, None, :]).sum(axis=2),
            (same * a_lc[:, None, :]).sum(axis=2),
            diff.sum(axis=2).astype(float),
            np.where(any_dis, np.where(diff, a_lp[:, None, :], -1e9).max(axis=2), 0.0),
            np.where(any_dis, np.where(diff, a_lc[:, None, :], -1e9).max(axis=2), 0.0),
        ]
        for column, values in zip(pairwise, found, strict=True):
            column[:, active] = values
    columns = [np.ones_like(lp), lp, lc, (~known).astype(float), *pairwise]
    return columns, lc


AGREE_COLUMN: Final = 4  # in _answer_columns: LLMs agreeing with this one


def _hot(onehot: np.ndarray, width: int) -> np.ndarray:
    hot = np.zeros((len(onehot), width))
    hot[np.arange(len(onehot))[onehot >= 0], onehot[onehot >= 0]] = 1.0
    return hot


def answer_features(s: States, onehot: np.ndarray, width: int) -> np.ndarray:
    """Stage A design [n, M, F] for every (query, LLM) (meaningful where the LLM answered): the columns, a
    per-LLM intercept and a per-LLM slope on confidence."""
    columns, lc = _answer_columns(s)
    n, m = lc.shape
    hot = _hot(onehot, width)
    base = np.stack(columns, axis=2)
    return np.concatenate([base, np.broadcast_to(hot, (n, m, width)), hot[None] * lc[:, :, None]], axis=2)


def answer_logit(s: States, onehot: np.ndarray, width: int, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``answer_features(s) @ a`` without the [n, M, F] design (the per-LLM terms gathered), and the agree column."""
    columns, lc = _answer_columns(s)
    k = len(columns)
    hot = _hot(onehot, width)
    z = sum(w * col for w, col in zip(a[:k], columns, strict=True)) + (hot @ a[k : k + width])[None]
    return z + (hot @ a[k + width :])[None] * lc, columns[AGREE_COLUMN]


@dataclass
class Choice:
    """The answer rule applied to states: which LLM's answer each query keeps, and the posteriors."""

    chosen: np.ndarray  # int [n]: column of the kept answer; -1 none
    raw: np.ndarray  # float [n]: stage-A score of the kept answer (0 where none)
    p: np.ndarray  # float [n]: stage B, P(the kept answer is right) (0 where none)
    n_answers: np.ndarray  # int [n]: LLMs that answered
    agree: np.ndarray  # float [n]: LLMs agreeing with the kept answer (itself excluded)


@dataclass
class TaskModel:
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    # the estimate calibration (``estimate_design``): None where not fitted (the estimate is stage B's p)
    e: np.ndarray | None = None

    def to_dict(self) -> dict[str, list[float] | None]:
        return {"a": self.a.tolist(), "b": self.b.tolist(), "c": self.c.tolist(),
                "e": None if self.e is None else self.e.tolist()}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TaskModel:
        e = raw.get("e")
        return cls(np.asarray(raw["a"]), np.asarray(raw["b"]), np.asarray(raw["c"]), None if e is None else np.asarray(e))


def _b_design(raw: np.ndarray, n_answers: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(raw)), logit(raw), np.minimum(n_answers, 4) - 1.0])


def choose(s: States, a: np.ndarray, b: np.ndarray, onehot: np.ndarray, width: int) -> Choice:
    """Apply the answer rule (module docstring) with stage-A weights ``a`` and stage-B weights ``b``."""
    used = np.flatnonzero(s.answered.any(axis=0))
    if len(used) < s.code.shape[1]:
        # the rule reads scores only where a query has an answer: the columns of LLMs nobody answered yet
        # (nine in ten after round 1 of a 10-LLM batch) are not computed (score and agreement 0 there)
        part = States(s.prior[:, used], s.code[:, used], s.conf[:, used], s.order[:, used])
        z_used, agree_used = answer_logit(part, onehot[used], width, a)
        z, agreeing = np.zeros(s.code.shape), np.zeros(s.code.shape)
        z[:, used], agreeing[:, used] = z_used, agree_used
    else:
        z, agreeing = answer_logit(s, onehot, width, a)
    score = sigmoid(z)
    text = s.code >= 0
    answered = s.answered
    n_answers = answered.sum(axis=1)
    by_score = np.where(text, score, -1.0).argmax(axis=1)
    last = np.where(answered, s.order, -1).argmax(axis=1)
    has_text = text.any(axis=1)
    chosen = np.where(has_text, by_score, np.where(answered.any(axis=1), last, -1))
    rows = np.arange(len(chosen))
    safe = np.maximum(chosen, 0)
    raw = np.where(chosen >= 0, score[rows, safe], 0.0)
    agree = np.where(chosen >= 0, agreeing[rows, safe], 0.0)
    p = np.where(chosen >= 0, sigmoid(_b_design(np.maximum(raw, 1e-6), n_answers) @ b), 0.0)
    return Choice(chosen, raw, p, n_answers, agree)


def _after_columns(s: States, now: Choice, dense: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Stage C's per-(query, LLM) columns [n, M] (before the per-LLM terms), the priors' and now's logits.
    ``dense`` False: the columns that are the same for every LLM of a query stay [n, 1] (broadcast, the same
    values): ``after_logit`` does not need them materialised."""
    lp = s.prior_logit()
    lnow = np.where(now.chosen >= 0, logit(np.maximum(now.p, 1e-6)), -4.0)[:, None]
    known = np.isfinite(s.conf) & s.answered
    lc = np.where(known, logit(np.nan_to_num(s.conf, nan=0.5)), 0.0)
    count = np.maximum(known.sum(axis=1), 1)
    max_lc = np.where(known.any(axis=1), np.where(known, lc, -1e9).max(axis=1), 0.0)[:, None]
    mean_lc = (lc.sum(axis=1) / count)[:, None]
    ones = np.ones_like(lp) if dense else np.ones((len(lp), 1))
    diff = lp - lnow
    columns = [
        ones,
        lnow * ones,
        diff,
        np.maximum(diff, 0.0),
        max_lc * ones,
        mean_lc * ones,
        (np.minimum(now.n_answers, 4)[:, None] - 1.0) * ones,
        now.agree[:, None] * ones,
    ]
    return columns, lp, lnow * ones


def after_features(s: States, now: Choice, onehot: np.ndarray, width: int) -> np.ndarray:
    """Stage C design [n, M, F] for calling each LLM next (meaningful where it has not answered): the columns,
    a per-LLM intercept and per-LLM slopes on its prior and on now."""
    columns, lp, lnow = _after_columns(s, now)
    n, m = lp.shape
    hot = _hot(onehot, width)
    base = np.stack(columns, axis=2)
    return np.concatenate(
        [base, np.broadcast_to(hot, (n, m, width)), hot[None] * lp[:, :, None], hot[None] * lnow[:, :, None]], axis=2
    )


def after_logit(s: States, now: Choice, onehot: np.ndarray, width: int, c: np.ndarray) -> np.ndarray:
    """``after_offset(now) + after_features(s, now) @ c`` without the [n, M, F] design."""
    columns, lp, lnow = _after_columns(s, now, dense=False)
    k = len(columns)
    hot = _hot(onehot, width)
    # the terms added in the design's order (the same sums to the last bit), per-query ones broadcast
    z = np.zeros(lp.shape)
    for w, col in zip(c[:k], columns, strict=True):
        z += w * col
    z += (hot @ c[k : k + width])[None]
    z = z + (hot @ c[k + width : k + 2 * width])[None] * lp + (hot @ c[k + 2 * width :])[None] * lnow
    return after_offset(now)[:, None] + z


def after_offset(now: Choice) -> np.ndarray:
    """Stage C predicts the change from now: logit P(after) = logit P(now) + features @ c, so the penalty
    shrinks every call towards "changes nothing" and a gain must be earned on the replay."""
    return np.where(now.chosen >= 0, logit(np.maximum(now.p, 1e-6)), -4.0)


@dataclass
class Replay:
    """One task's recorded joint outcomes, dense, for building replay states."""

    task: str
    query_ids: list[str]
    models: list[str]
    prior: np.ndarray  # out-of-fold P(correct) [n, M]
    code: np.ndarray  # the answer each LLM gave [n, M] (NONE: no usable answer)
    conf: np.ndarray
    correct: np.ndarray  # bool [n, M]
    cost: np.ndarray  # recorded cost [n, M]
    present: np.ndarray  # bool [n, M]


def replays(history: History, oof: pl.DataFrame) -> dict[str, Replay]:
    """Per task, the recorded outcomes with out-of-fold priors, as dense matrices."""
    queries = history.queries.select("query_id", "task", "labels")
    rows = (
        history.outcomes.join(queries, on="query_id")
        .join(oof.select("query_id", "model", "p_correct"), on=["query_id", "model"], how="left")
        .with_columns(
            pl.when(pl.col("answer").is_null())
            .then(pl.lit(None, dtype=pl.String))
            .when(pl.col("labels").is_null() | pl.col("labels").list.contains(pl.col("answer")))
            .then(normalize(pl.col("answer")))
            .alias("_norm"),
            pl.col("labels").is_null().alias("_open"),
        )
    )
    out: dict[str, Replay] = {}
    for (task,), group in rows.group_by("task", maintain_order=True):
        ids = sorted(group["query_id"].unique().to_list())
        models = sorted(group["model"].unique().to_list())
        qi = {q: i for i, q in enumerate(ids)}
        mi = {m: j for j, m in enumerate(models)}
        n, m = len(ids), len(models)
        r = np.array([qi[q] for q in group["query_id"].to_list()], dtype=np.int64)
        c = np.array([mi[x] for x in group["model"].to_list()], dtype=np.int64)
        codes = group.with_columns(pl.col("_norm").rank("dense").over("query_id").cast(pl.Int32).alias("_code"))
        dense = codes["_code"].fill_null(-1).to_numpy()
        dense = open_agreement(r, dense, group["answer"], group["_open"].to_numpy())
        code_col = np.where(
            codes["_code"].is_null().to_numpy(),
            np.where(codes["_open"].to_numpy() & group["answer"].is_null().to_numpy(), OPAQUE, NONE),
            dense,
        )
        prior, conf, cost = np.full((n, m), np.nan), np.full((n, m), np.nan), np.zeros((n, m))
        code = np.full((n, m), NONE, dtype=np.int32)
        correct, present = np.zeros((n, m), dtype=bool), np.zeros((n, m), dtype=bool)
        prior[r, c] = group["p_correct"].fill_null(np.nan).to_numpy()
        conf[r, c] = np.exp(group["logprob"].fill_null(np.nan).to_numpy())
        cost[r, c] = group["cost_usd"].fill_null(0.0).to_numpy()
        code[r, c] = code_col
        correct[r, c] = group["correct"].fill_null(False).to_numpy()
        present[r, c] = np.isfinite(prior[r, c])
        out[str(task)] = Replay(str(task), ids, models, prior, code, conf, correct, cost, present)
    return out


def _subsets(m: int, rng: np.random.Generator, depth: int = MAX_DEPTH) -> list[tuple[int, ...]]:
    chosen: list[tuple[int, ...]] = []
    for size in range(1, min(depth, m) + 1):
        every = list(itertools.combinations(range(m), size))
        if len(every) > MAX_SUBSETS:
            every = [every[i] for i in sorted(rng.choice(len(every), MAX_SUBSETS, replace=False))]
        chosen.extend(every)
    return chosen


def _state(rep: Replay, rows: np.ndarray, subset: tuple[int, ...], order_cost: np.ndarray) -> States:
    n, m = len(rows), len(rep.models)
    mask = np.zeros(m, dtype=bool)
    mask[list(subset)] = True
    code = np.where(mask[None], rep.code[rows], NONE).astype(np.int32)
    conf = np.where(mask[None], rep.conf[rows], np.nan)
    rank = np.argsort(np.argsort(order_cost))
    order = np.where(mask[None] & (code != NONE), rank[None].repeat(n, axis=0), -1).astype(np.int32)
    return States(rep.prior[rows], code, conf, order)


@dataclass
class _Rows:
    x: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    w: list[np.ndarray] = field(default_factory=list)

    z: list[np.ndarray] = field(default_factory=list)

    def add(self, x: np.ndarray, y: np.ndarray, w: float, offset: np.ndarray | None = None) -> None:
        self.x.append(x)
        self.y.append(y.astype(float))
        self.w.append(np.full(len(y), w))
        self.z.append(np.zeros(len(y)) if offset is None else offset)

    def fit(self, seed: int = 0) -> np.ndarray:
        x, y, w, z = (np.concatenate(v) for v in (self.x, self.y, self.w, self.z))
        if len(y) > MAX_ROWS:  # a few dozen coefficients: a weighted sample fits them as well, much faster
            keep = np.random.default_rng(seed).choice(len(y), MAX_ROWS, replace=False, p=w / w.sum())
            x, y, w, z = x[keep], y[keep], np.ones(MAX_ROWS), z[keep]
        return fit_logistic(
            x, y, l2=np.r_[0.0, np.full(x.shape[1] - 1, L2)], iters=30, weights=w * len(w) / w.sum(), offset=z
        )


def _complete(rep: Replay, rows: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    return rep.present[rows][:, list(subset)].all(axis=1)


def fit_task(reps: Sequence[Replay], index: dict[str, int], seed: int = 0, after: bool = True) -> TaskModel:
    """Stages A, B and (unless not ``after``) C on the replay states of ``reps`` (one task, or several pooled)."""
    width = len(index)
    rng = np.random.default_rng(seed)
    prepared = []
    for rep in reps:
        onehot = np.array([index.get(m, -1) for m in rep.models])
        mean_cost = rep.cost.mean(axis=0)
        subsets = _subsets(len(rep.models), rng)
        sizes = {k: sum(len(s) == k for s in subsets) for k in range(1, MAX_DEPTH + 1)}
        prepared.append((rep, onehot, mean_cost, subsets, sizes))
    stage_a = _Rows()
    for rep, onehot, mean_cost, subsets, sizes in prepared:
        for subset in subsets:
            rows = np.flatnonzero(_complete(rep, np.arange(len(rep.query_ids)), subset))
            s = _state(rep, rows, subset, mean_cost)
            x = answer_features(s, onehot, width)
            for j in subset:
                ok = s.code[:, j] != NONE
                stage_a.add(x[ok, j], rep.correct[rows[ok], j], 1 / sizes[len(subset)])
    a = stage_a.fit(seed)
    stage_b = _Rows()
    for rep, onehot, mean_cost, subsets, sizes in prepared:
        for subset in subsets:
            rows = np.flatnonzero(_complete(rep, np.arange(len(rep.query_ids)), subset))
            s = _state(rep, rows, subset, mean_cost)
            now = choose(s, a, np.array([0.0, 1.0, 0.0]), onehot, width)
            ok = now.chosen >= 0
            y = rep.correct[rows[ok], now.chosen[ok]]
            stage_b.add(_b_design(np.maximum(now.raw[ok], 1e-6), now.n_answers[ok]), y, 1 / sizes[len(subset)])
    b = stage_b.fit(seed)
    if not after:
        return TaskModel(a, b, np.zeros(0))
    stage_c = _Rows()
    for rep, onehot, mean_cost, subsets, sizes in prepared:
        for subset in (s for s in subsets if len(s) < MAX_DEPTH):
            rows = np.flatnonzero(_complete(rep, np.arange(len(rep.query_ids)), subset))
            s = _state(rep, rows, subset, mean_cost)
            now = choose(s, a, b, onehot, width)
            x = after_features(s, now, onehot, width)
            for j in (j for j in range(len(rep.models)) if j not in subset):
                keep = rep.present[rows, j]
                nxt = s.with_call(j, rep.code[rows, j], rep.conf[rows, j])
                then = choose(nxt, a, b, onehot, width)
                hit = then.chosen >= 0
                y = np.zeros(len(rows), dtype=bool)
                y[hit] = rep.correct[rows[hit], then.chosen[hit]]
                weight = 1 / sizes[len(subset)] / (len(rep.models) - len(subset))
                stage_c.add(x[keep, j], y[keep], weight, after_offset(now)[keep])
    c = stage_c.fit(seed)
    return TaskModel(a, b, c)


ESTIMATE_CLIP: Final = 1e-8  # the estimate's confidence logit: a third of answers are above 1 - P_CLIP
ESTIMATE_BENDS: Final = (0.9, 0.99, 0.999, 0.9999)  # hinges of the estimate's confidence logit


def estimate_design(s: States, now: Choice, onehot: np.ndarray, width: int) -> np.ndarray:
    """The estimate calibration's design [n, F] for the kept answers ``now``: stage B's logit, the kept answer's
    confidence logit clipped at ``ESTIMATE_CLIP`` (not P_CLIP, where 0.9999 and 0.99999999 look alike) with
    hinges at ``ESTIMATE_BENDS``, whether it is unknown, a lone answer, the LLMs agreeing (at most 3), and a
    per-kept-LLM intercept."""
    rows = np.arange(len(now.chosen))
    kept = now.chosen >= 0
    safe = np.maximum(now.chosen, 0)
    conf = s.conf[rows, safe] if len(rows) else np.zeros(0)
    known = kept & np.isfinite(conf)
    c = np.clip(np.nan_to_num(conf, nan=0.5), ESTIMATE_CLIP, 1 - ESTIMATE_CLIP)
    lc = np.where(known, np.log(c / (1 - c)), 0.0)
    bends = [np.where(known, np.maximum(lc - np.log(t / (1 - t)), 0.0), 0.0) for t in ESTIMATE_BENDS]
    lnow = logit(np.maximum(now.p, 1e-6))
    hot = _hot(np.where(kept, onehot[safe] if len(onehot) else -1, -1), width)
    lone = (now.n_answers == 1).astype(float)
    return np.column_stack([np.ones(len(rows)), lnow, lc, (~known).astype(float), *bends, lone,
                            np.minimum(now.agree, 3.0), hot])  # fmt: skip


def _estimate_rows(out: _Rows, rep: Replay, t: TaskModel, index: dict[str, int], rng: np.random.Generator) -> None:
    """The estimate calibration's rows of ``rep``'s replay states (as stage B's: every subset of up to
    ``MAX_DEPTH`` LLMs, a depth's rows weighing alike) under the answer rule and stage B of ``t``."""
    if not rep.query_ids:
        return
    width = len(index)
    onehot = np.array([index.get(m, -1) for m in rep.models])
    subsets = _subsets(len(rep.models), rng)
    sizes = {k: sum(len(s) == k for s in subsets) for k in range(1, MAX_DEPTH + 1)}
    for subset in subsets:
        rows = np.flatnonzero(_complete(rep, np.arange(len(rep.query_ids)), subset))
        if not len(rows):
            continue
        s = _state(rep, rows, subset, rep.cost.mean(axis=0))
        now = choose(s, t.a, t.b, onehot, width)
        ok = now.chosen >= 0
        x = estimate_design(s, now, onehot, width)[ok]
        out.add(x, rep.correct[rows[ok], now.chosen[ok]], 1 / sizes[len(subset)])


def fit_estimates(reps: dict[str, Replay], index: dict[str, int], tasks: dict[str, TaskModel], seed: int = 0) -> None:
    """Fit each task model's estimate calibration ``e`` (in place) on cross-fitted replay states: per fold, stages
    A and B refitted on the other folds score the fold's states, so the calibration learns how the posterior
    errs on queries it was not fitted on (as tonight's are), never on its own rows. It only maps the kept
    answer's posterior to the estimate the report gives: no answer choice or escalation reads it (a finer
    confidence there cost accuracy on the shifted split: 87.7% -> 84.6% at 20% of the best single's cost)."""
    rows = {t: _Rows() for t in tasks}
    rng = np.random.default_rng(seed + 2)
    folds = {t: stable_fold(r.query_ids, FOLDS, seed, salt="estimate:") for t, r in reps.items()}
    for f in range(FOLDS):
        train = {t: _sub(r, np.flatnonzero(folds[t] != f)) for t, r in reps.items()}
        test = {t: _sub(r, np.flatnonzero(folds[t] == f)) for t, r in reps.items()}
        for task in tasks:
            pooled = task == POOLED
            fitted = fit_task(list(train.values()) if pooled else [train[task]], index, seed, after=False)
            for rep in test.values() if pooled else [test[task]]:
                _estimate_rows(rows[task], rep, fitted, index, rng)
    for task, got in rows.items():
        if got.y and sum(len(y) for y in got.y) >= 30:
            tasks[task].e = got.fit(seed)


POSTERIOR_VERSION: Final = 2  # 2: the estimate calibration (TaskModel.e)


@dataclass
class Posterior:
    """Fitted stages per task (and pooled), the LLM index their one-hot features use, and held-out checks."""

    models: list[str]
    tasks: dict[str, TaskModel]
    validation: dict[str, Any] = field(default_factory=dict)
    escalation: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    singles: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # task -> LLM -> [accuracy, mean cost]
    confident: dict[str, bool] = field(default_factory=dict)  # task -> the history recorded confidences (logprobs)

    @property
    def index(self) -> dict[str, int]:
        return {m: i for i, m in enumerate(self.models)}

    def for_task(self, task: str) -> TaskModel:
        return self.tasks.get(task, self.tasks[POOLED])

    def onehot(self, models: Sequence[str]) -> np.ndarray:
        index = self.index
        return np.array([index.get(m, -1) for m in models], dtype=np.int64)

    def current(self, task: str, s: States, models: Sequence[str]) -> Choice:
        t = self.for_task(task)
        return choose(s, t.a, t.b, self.onehot(models), len(self.models))

    def after(self, task: str, s: States, models: Sequence[str], now: Choice | None = None) -> np.ndarray:
        """P(right after calling each LLM next) [n, M]; a query with no answer yet gets the LLM's prior."""
        t = self.for_task(task)
        onehot = self.onehot(models)
        now = now if now is not None else choose(s, t.a, t.b, onehot, len(self.models))
        p = sigmoid(after_logit(s, now, onehot, len(self.models), t.c))
        empty = (now.chosen < 0)[:, None]
        return np.where(empty, np.nan_to_num(s.prior, nan=0.0), p)

    def estimate(self, task: str, s: States, models: Sequence[str], now: Choice) -> np.ndarray:
        """P(the kept answers ``now`` are right) as the run's estimate reports it: stage B's p through the task's
        estimate calibration (``fit_estimates``), or stage B's p where none was fitted. Decisions read ``now.p``."""
        e = self.for_task(task).e
        if e is None:
            return now.p
        p = sigmoid(estimate_design(s, now, self.onehot(models), len(self.models)) @ e)
        return np.where(now.chosen >= 0, p, 0.0)

    def escalation_value(self, task: str, called: str, price: float) -> tuple[float, float]:
        """Mean replayed (accuracy gain, extra cost) of the best one-step escalation once the LLMs of ``called``
        (a model, or ``called_key`` of two) answered, when a USD is worth ``price`` accuracy points (0, 0 where
        never replayed)."""
        table = self.escalation.get(task, {}).get(called)
        if not table:
            return 0.0, 0.0
        x = np.log(np.asarray(LAMBDA_GRID))
        at = float(np.log(max(price, LAMBDA_GRID[0])))
        return float(np.interp(at, x, table["gain"])), float(np.interp(at, x, table["cost"]))

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": POSTERIOR_VERSION,
                "models": self.models,
                "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
                "validation": self.validation,
                "escalation": self.escalation,
                "singles": self.singles,
                "confident": self.confident,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Posterior:
        raw = json.loads(text)
        version = raw.get("version", 1)
        # version 1 (before the estimate calibration) has the same decision stages: it loads, and its runs'
        # estimate is stage B's p, as it was when it was trained; only a file from a newer batchplan is refused
        if version > POSTERIOR_VERSION:
            raise ValueError(
                f"posterior.json is format version {version}; this batchplan reads up to version {POSTERIOR_VERSION}: "
                "upgrade batchplan or retrain (`batchplan train`) with this one"
            )
        return cls(
            models=list(raw["models"]),
            tasks={k: TaskModel.from_dict(v) for k, v in raw["tasks"].items()},
            validation=raw.get("validation", {}),
            escalation=raw.get("escalation", {}),
            singles=raw.get("singles", {}),
            confident=raw.get("confident", {}),
        )


def _sub(rep: Replay, rows: np.ndarray) -> Replay:
    return Replay(
        rep.task,
        [rep.query_ids[i] for i in rows],
        rep.models,
        rep.prior[rows],
        rep.code[rows],
        rep.conf[rows],
        rep.correct[rows],
        rep.cost[rows],
        rep.present[rows],
    )


def _held_out(reps: dict[str, Replay], index: dict[str, int], folds: int, seed: int) -> dict[str, Any]:
    """ECE and accuracy of ``current`` and ``after`` on replay states of queries the fit never saw."""
    got: dict[str, list[np.ndarray]] = {"p_now": [], "y_now": [], "p_after": [], "y_after": []}
    rng = np.random.default_rng(seed + 1)
    for f in range(folds):
        train = {
            t: _sub(r, np.flatnonzero(stable_fold(r.query_ids, folds, seed, salt="posterior:") != f))
            for t, r in reps.items()
        }
        models = {t: fit_task([r], index, seed) for t, r in train.items() if len(r.query_ids) >= 30}
        for task, rep in reps.items():
            if task not in models:
                continue
            test = _sub(rep, np.flatnonzero(stable_fold(rep.query_ids, folds, seed, salt="posterior:") == f))
            t = models[task]
            onehot = np.array([index.get(m, -1) for m in rep.models])
            for subset in _subsets(len(rep.models), rng, depth=2):
                rows = np.flatnonzero(_complete(test, np.arange(len(test.query_ids)), subset))
                s = _state(test, rows, subset, test.cost.mean(axis=0) if len(rows) else np.zeros(len(rep.models)))
                now = choose(s, t.a, t.b, onehot, len(index))
                ok = now.chosen >= 0
                got["p_now"].append(now.p[ok])
                got["y_now"].append(test.correct[rows[ok], now.chosen[ok]])
                after = sigmoid(after_logit(s, now, onehot, len(index), t.c))
                for j in (j for j in range(len(rep.models)) if j not in subset):
                    keep = test.present[rows, j]
                    then = choose(s.with_call(j, test.code[rows, j], test.conf[rows, j]), t.a, t.b, onehot, len(index))
                    hit = keep & (then.chosen >= 0)
                    got["p_after"].append(np.where(hit, after[:, j], 0.0)[keep])
                    y = np.zeros(len(rows), dtype=bool)
                    y[hit] = test.correct[rows[hit], then.chosen[hit]]
                    got["y_after"].append(y[keep])
    if not got["p_now"]:
        return {}
    cat = {k: np.concatenate(v) for k, v in got.items()}
    return {
        "folds": folds,
        "current_ece": ece(cat["y_now"], cat["p_now"]),
        "current_mean_p": float(cat["p_now"].mean()),
        "current_accuracy": float(cat["y_now"].mean()),
        "after_ece": ece(cat["y_after"], cat["p_after"]),
        "after_mean_p": float(cat["p_after"].mean()),
        "after_accuracy": float(cat["y_after"].mean()),
        "states": len(cat["p_now"]),
    }


def called_key(models: Sequence[str]) -> str:
    """The key of ``Posterior.escalation`` for a query that has the answers of ``models`` (any order)."""
    return PAIR.join(sorted(models))


PAIR: Final = "+"


def _escalation_tables(reps: dict[str, Replay], posterior: Posterior) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per task and LLMs answered (one, or two: ``called_key``): the replayed mean gain and extra cost of the
    best next call at each price. The two-answer tables value a middle round's call by what a later round can
    still learn after it (a disagreement a third opinion settles, a weak answer a stronger LLM replaces)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    prices = np.asarray(LAMBDA_GRID)
    for task, rep in reps.items():
        out[task] = {}
        pairs = itertools.combinations(range(len(rep.models)), 2)
        for subset in [(j,) for j in range(len(rep.models))] + list(pairs):
            rows = np.flatnonzero(rep.present.all(axis=1))
            if len(rows) < 10:
                continue
            s = _state(rep, rows, subset, rep.cost.mean(axis=0))
            now = posterior.current(task, s, rep.models)
            after = posterior.after(task, s, rep.models, now)
            after[:, list(subset)] = -np.inf
            gain_now = after - now.p[:, None]  # [n, M]
            cost = rep.cost[rows]
            net = gain_now[None] - prices[:, None, None] * cost[None]  # [L, n, M]
            best = net.argmax(axis=2)
            take = np.take_along_axis(net, best[..., None], axis=2)[..., 0] > 0
            g = np.where(take, np.take_along_axis(np.broadcast_to(gain_now, net.shape), best[..., None], 2)[..., 0], 0)
            c = np.where(take, np.take_along_axis(np.broadcast_to(cost, net.shape), best[..., None], 2)[..., 0], 0)
            key = called_key([rep.models[j] for j in subset])
            out[task][key] = {"gain": g.mean(axis=1).tolist(), "cost": c.mean(axis=1).tolist()}
    return out


def fit_posterior(history: History, oof: pl.DataFrame, *, seed: int = 0, validate: bool = False) -> Posterior:
    """Fit the posterior on ``history`` with out-of-fold priors ``oof`` (query_id, model, p_correct); with
    ``validate``, also its held-out calibration (``validation``: ECE of both stages on unseen queries), which
    costs a fit per fold."""
    reps = {t: r for t, r in replays(history, oof).items() if len(r.query_ids) >= 10}
    models = sorted({m for r in reps.values() for m in r.models})
    index = {m: i for i, m in enumerate(models)}
    tasks = {t: fit_task([r], index, seed) for t, r in reps.items() if len(r.query_ids) >= 30}
    tasks[POOLED] = fit_task(list(reps.values()), index, seed)
    fit_estimates(reps, index, tasks, seed)
    posterior = Posterior(models, tasks)
    posterior.validation = _held_out(reps, index, FOLDS, seed) if validate else {}
    posterior.escalation = _escalation_tables(reps, posterior)
    posterior.singles = {
        task: {
            model: [float(rep.correct[rep.present[:, j], j].mean()), float(rep.cost[rep.present[:, j], j].mean())]
            for j, model in enumerate(rep.models)
            if rep.present[:, j].any()
        }
        for task, rep in reps.items()
    }
    posterior.confident = {task: bool(np.isfinite(rep.conf[rep.present]).mean() > 0.9) for task, rep in reps.items()}
    return posterior
