"""Audits: what a run can say about its own accuracy without gold, and where the history it planned from is off.

A run with ``audit_share`` S > 0 gives a uniform random sample of S of its queries (seeded by the run id, so
a resumed run audits the same queries) a *reference answer* as well: the most accurate plan the history
knows for the query's task (``AuditFit.references``: the best single LLM, or a vote of the three best
where that replayed better), called once more beside the delivered plan. The reference calls are plan rows
of their own (``<query_id>#audit``), mandatory, inside the same budget: ``planning.plan_batch`` takes their
expected cost off the total and the tenant budgets (and their calls off the call capacities) before it
optimizes the rest, and counts their spend variance in the margin, so the dispatcher's one hard cap holds
both.

The estimate (``estimate_audit``), per task and without gold. A delivered answer D agrees with the reference
answer R with probability  a = acc * s + (1 - acc) * q,  where s = P(agree | D right) and q = P(agree | D
wrong) are measured on the training history for the LLM that gave D against the task's reference
(``AuditFit.rates``): they carry the reference's own error (s < 1 where R is wrong) and the correlation of
the two (both wrong the same way, q > 0), replayed rather than assumed. So  acc = (a - q) / (s - q), the
misclassification-corrected estimator, over the audited queries whose source LLM tells D and R apart (s - q
>= MIN_SEPARATION); where the delivered answer is the reference's own (the same LLM, s = q = 1) the audit says
nothing, and the predictor's accuracy stands for it. Queries not answered count 0. The task estimates are
weighted by the batch's task shares. The 95% interval is the central 95% of posterior draws: per task the
agreement rate from its Beta (Jeffreys) posterior, s and q from their Beta posteriors on the history's counts
(capped at RATE_CAP observations, because the batch is not the history), and the rows the audit cannot tell
apart as Binomial draws of the predictor's accuracy; the estimate is the draws' median. Late labels enter through retraining: a run's labelled
queries become history, and the rates are refitted on them.

Open answers (no label set) agree when their token F1 after ``normalize`` is >= OPEN_AGREEMENT (short
paraphrases of one fact agree; two different claims do not); labelled answers when they are equal.

Drift: an LLM is *worse than the history says* when the predictor's mean P(correct) for it on the audited
queries is above the 95% interval of its implied accuracy (from its agreement with the reference); a task
when its planned accuracy is outside the task's audited interval.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

import numpy as np
import polars as pl

from batchplan.core.contracts import (
    PLAN_SCHEMA,
    audit_id,
    audited_query,
    audited_query_id,
    explore_id,
    is_audit,
    is_exploration,
)
from batchplan.core.history import History
from batchplan.plans.candidates import P90_Z
from batchplan.plans.simulation import PlanSpec, recorded_by_task, simulate

OPEN_AGREEMENT: Final = 0.5  # token F1 at which two open answers count as the same answer
MIN_SEPARATION: Final = 0.15  # s - q below this: the audit cannot tell right from wrong for that LLM
MIN_RATE_ROWS: Final = 5  # right and wrong rows an LLM needs on the history for its own s and q
RATE_CAP: Final = 300  # history observations a rate's Beta posterior counts at most
DRAWS: Final = 4000  # posterior draws of the estimate
# audited queries a task needs before the difference estimator corrects its posterior: below it the sample's
# noise (>= 9 points for a proportion) dwarfs any shift, and one disagreeing audit's Jeffreys posterior is tight
# enough to fool the shrinkage (bench/shift_estimate.py: 1-7 audits moved the estimate 12 points the wrong way)
MIN_CORRECTION_ROWS: Final = 20
Z95: Final = 1.959964


TOKEN_DROP: Final = r"[^\w\s]"  # dropped before an answer is split into its tokens


def _tokens(text: str | None) -> list[str]:
    text = re.sub(TOKEN_DROP, "", (text or "").lower())
    return text.split()


def answer_tokens(answers: pl.Expr) -> pl.Expr:
    """``_tokens`` of every answer, in a frame (the posterior's open agreement over a whole batch)."""
    return answers.str.to_lowercase().str.replace_all(TOKEN_DROP, "").str.extract_all(r"\S+")


def f1_agrees(common: Any, total: Any) -> Any:
    """Two open answers with ``common`` tokens in common and ``total`` tokens between them agree: their token
    F1, 2 x common / total, is >= OPEN_AGREEMENT (numbers or polars expressions)."""
    return (common > 0) & (2 * common >= OPEN_AGREEMENT * total)


def same_answer(a: str | None, b: str | None, open_task: bool) -> bool:
    """Whether two answers to one query agree (see the module's note on open answers)."""
    if a is None or b is None:
        return False
    ta, tb = _tokens(a), _tokens(b)
    if not open_task or not ta or not tb:
        return ta == tb and bool(ta)
    return bool(f1_agrees(sum((Counter(ta) & Counter(tb)).values()), len(ta) + len(tb)))


@dataclass
class AuditFit:
    """Per task: the reference plan (``{"kind", "models", "accuracy", "queries"}``) and, per LLM, the
    history's agreement counts with it ``[agree when right, right, agree when wrong, wrong]``."""

    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    rates: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AuditFit:
        raw = json.loads(text)
        return cls(references=raw.get("references", {}), rates=raw.get("rates", {}))


def fit_audit(history: History) -> AuditFit:
    """The reference plan per task and every LLM's agreement with it, replayed on ``history``."""
    joined = history.outcomes.join(history.queries.select("query_id", "task", "labels"), on="query_id")
    recorded = recorded_by_task(history)
    fit = AuditFit()
    for (task,), rows in joined.group_by("task", maintain_order=True):
        task = str(task)
        accuracy = rows.group_by("model").agg(pl.col("correct").mean(), pl.len()).sort(
            ["correct", "model"], descending=[True, False]
        )
        best = accuracy["model"].to_list()
        reference: dict[str, Any] = {"kind": "single", "models": best[:1], "accuracy": float(accuracy["correct"][0])}
        answers: dict[str, str | None] = dict(
            rows.filter(pl.col("model") == best[0]).select("query_id", "answer").iter_rows()
        )
        rec = recorded.get(task)
        if rec is not None and len(best) >= 3:
            vote = simulate(PlanSpec("vote", tuple(best[:3])), rec)
            usable = vote.covered
            if usable.any() and float(vote.correct[usable].mean()) > reference["accuracy"]:
                reference = {"kind": "vote", "models": best[:3], "accuracy": float(vote.correct[usable].mean())}
                answers = {
                    q: (rec.labels[c] if c >= 0 else None)
                    for q, c, ok in zip(rec.query_ids, vote.answer.tolist(), usable.tolist(), strict=True)
                    if ok
                }
        reference["queries"] = len(answers)
        fit.references[task] = reference
        counts: dict[str, list[int]] = {}
        for query_id, llm, answer, correct, labels in rows.select(
            "query_id", "model", "answer", "correct", "labels"
        ).iter_rows():
            if query_id not in answers or correct is None:
                continue
            agree = same_answer(answer, answers[query_id], labels is None)
            c = counts.setdefault(str(llm), [0, 0, 0, 0])
            c[0 if correct else 2] += int(agree)
            c[1 if correct else 3] += 1
        fit.rates[task] = counts
    return fit


def audited_ids(query_ids: list[str], share: float, seed: str) -> list[str]:
    """A uniform sample of ``share`` of the queries (at least one when share > 0), the same for the same run
    id whatever the queue's order: the ids with the smallest keyed hashes."""
    return sorted(ranked_sample(query_ids, share, seed))


def ranked_sample(query_ids: list[str], share: float, seed: str) -> list[str]:
    """``audited_ids`` in its random order (a prefix of it is a uniform sample too)."""
    if share <= 0 or not query_ids:
        return []
    size = max(1, round(share * len(query_ids)))
    key = seed.encode()
    ranked = sorted(query_ids, key=lambda q: hashlib.blake2b(q.encode(), key=key[:64], digest_size=8).digest())
    return ranked[:size]


AUDIT_PLAN_SCHEMA: Final = pl.Schema(
    [*PLAN_SCHEMA.items(), ("tenant", pl.String), ("cost_var", pl.Float64), ("fitted_reference", pl.Boolean)]
)


def audit_plan(
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    audit_fit: AuditFit | None,
    share: float,
    seed: str,
    max_cost_usd: float | None = None,
) -> pl.DataFrame:
    """The reference plan rows (AUDIT_PLAN_SCHEMA, ids ``<query_id>#audit``) of the audited sample; with
    ``max_cost_usd``, the sample's first queries in its random order whose references' expected cost fits it
    (at least one: a uniform sample still, only smaller).

    ``predictions`` are the (query, LLM) pairs the query's tenant may use and the backend offers. Where the
    task's fitted reference cannot be called whole (an LLM not offered or not allowed; a task the history
    lacks), the most accurate offered single LLM by the predictor stands in (``fitted_reference`` false:
    its estimate then assumes independent errors)."""
    chosen = ranked_sample(queue["query_id"].to_list(), share, seed)
    rows: list[dict[str, Any]] = []
    if not chosen:
        return pl.DataFrame(schema=AUDIT_PLAN_SCHEMA)
    queries = queue.filter(pl.col("query_id").is_in(pl.Series(chosen, dtype=pl.String).implode()))
    offered = predictions.filter(pl.col("query_id").is_in(pl.Series(chosen, dtype=pl.String).implode()))
    by_query = {q: frame for (q,), frame in offered.group_by("query_id")}
    order = {q: i for i, q in enumerate(chosen)}
    spent = 0.0
    ranked = (
        queries.with_row_index("_pos")
        .with_columns(pl.col("query_id").replace_strict(order, return_dtype=pl.Int64).alias("_rank"))
        .sort("_rank")
    )
    kept: list[int] = []
    for pos, query_id, task, tenant in ranked.select("_pos", "query_id", "task", "tenant").iter_rows():
        pairs = by_query.get(query_id)
        if pairs is None or pairs.height == 0:
            continue  # no LLM may answer it: nothing to audit
        reference = (audit_fit.references.get(task) if audit_fit is not None else None) or {}
        members = [m for m in reference.get("models", []) if m in set(pairs["model"].to_list())]
        fitted = bool(reference) and len(members) == len(reference["models"])
        if fitted:
            kind, accuracy = str(reference["kind"]), float(reference["accuracy"])
            picked = pairs.filter(pl.col("model").is_in(pl.Series(members, dtype=pl.String).implode()))
        else:
            picked = pairs.sort(["p_correct", "model"], descending=[True, False]).head(1)
            kind, members, accuracy = "single", picked["model"].to_list(), float(picked["p_correct"][0])
        cost = picked["cost_usd"].to_numpy()
        if max_cost_usd is not None and rows and spent + float(cost.sum()) > max_cost_usd:
            break  # the rest of the random order would pass the audits' share of the budget
        spent += float(cost.sum())
        kept.append(pos)
        high = np.maximum(picked["cost_high_usd"].fill_null(0.0).to_numpy(), cost)
        rows.append(
            {
                "query_id": audit_id(query_id),
                "kind": kind,
                "models": members,
                "expected_cost_usd": float(cost.sum()),
                "expected_accuracy": accuracy,
                "reserve_cost_usd": float(high.sum()),
                "thresholds": None,
                "fallback_models": [],
                "tenant": tenant,
                "cost_var": float((((high - cost) / P90_Z) ** 2).sum()),
                "fitted_reference": fitted,
            }
        )
    # in the queue's order, as before the cap
    return pl.DataFrame([rows[i] for i in np.argsort(kept, kind="stable")], schema=AUDIT_PLAN_SCHEMA)


def explore_plan(
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    references: pl.DataFrame,
    seed: str,
    max_cost_usd: float,
    live_rows: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Exploration rows (AUDIT_PLAN_SCHEMA, ids ``<query_id>#explore#audit``): calls of the LLMs the audit's
    reference does not call, on the audit sample's queries in its random order (the audited ones first, so
    their calls get silver verdicts; the next ones are where labels are asked first), within ``max_cost_usd``.

    Why: labels and silver land only on the LLMs a run calls, and the plan calls the LLMs the history already
    rates best, so a drift that changes the LLMs' order (one the plan never calls got better) is never seen.
    Per query every offered LLM outside its reference is called, fewest live gold rows of the task first
    (``live_rows``: task, model, gold_rows; the live correction's), then cheapest; the sample stops at the
    first LLM that does not fit (a uniform sample still). Rows are mandatory like the references', inside
    the same budget; their answers are never delivered."""
    if max_cost_usd <= 0 or queue.height == 0:
        return pl.DataFrame(schema=AUDIT_PLAN_SCHEMA)
    order = ranked_sample(queue["query_id"].to_list(), 1.0, seed)
    called = {audited_query_id(q): set(ms or []) for q, ms in references.select("query_id", "models").iter_rows()}
    known = (
        {(t, m): int(n) for t, m, n in live_rows.select("task", "model", "gold_rows").iter_rows()}
        if live_rows is not None
        else {}
    )
    tasks = dict(queue.select("query_id", "task").iter_rows())
    tenants = dict(queue.select("query_id", "tenant").iter_rows())
    by_query = {str(q): frame for (q,), frame in predictions.group_by("query_id")}
    spent, rows = 0.0, []
    for query_id in order:
        pairs = by_query.get(query_id)
        if pairs is None:
            continue
        task = tasks[query_id]
        picked = pairs.filter(~pl.col("model").is_in(pl.Series(sorted(called.get(query_id, set())), dtype=pl.String).implode()))
        picked = picked.with_columns(
            pl.col("model").replace_strict({m: known.get((task, m), 0) for m in picked["model"].to_list()}, return_dtype=pl.Int64).alias("_known")
        ).sort(["_known", "cost_usd", "model"])
        cost = picked["cost_usd"].to_numpy()
        fits = int(np.searchsorted(np.cumsum(cost), max_cost_usd - spent, side="right"))
        whole = fits == len(cost)
        if fits:
            picked, cost = picked.head(fits), cost[:fits]
            spent += float(cost.sum())
            high = np.maximum(picked["cost_high_usd"].fill_null(0.0).to_numpy(), cost)
            models = picked["model"].to_list()
            rows.append(
                {
                    "query_id": explore_id(query_id),
                    "kind": "vote" if len(models) > 1 else "single",  # a vote calls every member
                    "models": models,
                    "expected_cost_usd": float(cost.sum()),
                    "expected_accuracy": 0.0,  # never delivered
                    "reserve_cost_usd": float(high.sum()),
                    "thresholds": None,
                    "fallback_models": [],
                    "tenant": tenants[query_id],
                    "cost_var": float((((high - cost) / P90_Z) ** 2).sum()),
                    "fitted_reference": False,
                }
            )
        if not whole:
            break  # the next LLM would pass the exploration's share of the budget
    return pl.DataFrame(rows, schema=AUDIT_PLAN_SCHEMA)


def references_only(frame: pl.DataFrame) -> pl.DataFrame:
    """An audit plan's or results' reference rows (the explorations' apart)."""
    return frame.filter(~is_exploration())


def exploration_summary(audit_plan_rows: pl.DataFrame, audit_results: pl.DataFrame) -> dict[str, Any]:
    """The report's account of the exploration calls: queries, calls per LLM, spend."""
    planned = audit_plan_rows.filter(is_exploration())
    done = audit_results.filter(is_exploration())
    calls = planned.select(pl.col("models").explode().alias("model")).group_by("model").len().sort("model")
    return {
        "queries": planned.height,
        "calls": int(calls["len"].sum()) if calls.height else 0,
        "calls_by_llm": dict(calls.iter_rows()),
        "spent_usd": float(done["cost_usd"].fill_null(0.0).sum()) if "cost_usd" in done.columns else 0.0,
        "label_first": planned.select(audited_query())["query_id"].to_list(),
    }


def under_audit_ids(frame: pl.DataFrame, audit_ids: list[str]) -> pl.DataFrame:
    """``frame``'s rows (queue or predictions) of each audit row's query, under that row's id."""
    ids = pl.DataFrame({"_id": pl.Series([q for q in audit_ids if q != audited_query_id(q)], dtype=pl.String)})
    keyed = ids.with_columns(audited_query("_id").alias("query_id"))
    return keyed.join(frame, on="query_id").drop("query_id").rename({"_id": "query_id"}).select(frame.columns)


def audit_queue(queue: pl.DataFrame, plan: pl.DataFrame) -> pl.DataFrame:
    """The queue rows the dispatcher needs for the plan's audit rows: the audited queries under their audit ids."""
    return under_audit_ids(queue, plan["query_id"].to_list())


def source_llms(calls: pl.DataFrame, results: pl.DataFrame, open_tasks: set[str], tasks: dict[str, str]) -> dict[str, str]:
    """Per answered query, the LLM whose answer was delivered: the last one called that gave it (a cascade's
    last member, a vote's first agreeing member in call order from the end)."""
    answers = dict(results.filter(pl.col("status") == "done").select("query_id", "answer").iter_rows())
    out: dict[str, str] = {}
    for query_id, llm, answer in calls.select("query_id", "model", "answer").iter_rows():
        if query_id in answers and answer is not None:
            delivered = answers[query_id]
            if answer == delivered or same_answer(answer, delivered, tasks.get(query_id) in open_tasks):
                out[query_id] = llm  # later calls overwrite earlier ones: the last one that gave it
    return out


# reference_gain's (r, s, q, answered) where nothing is known of a query's reference: it adds nothing
NO_SWAP_TERMS: Final = (0.0, 1.0, 0.0, True)


@dataclass(frozen=True)
class _Row:
    task: str
    done: bool
    agree: bool
    informative: bool
    prior: float  # the predictor's accuracy for the delivered plan: stands in where the audit says nothing
    rate: tuple[float, float, float, float]  # agree when right, right, agree when wrong, wrong (capped counts)
    base: float = 0.0  # the run's own gold-free P(delivered answer right) (``estimate_audit``'s ``base``)
    swap: tuple[float, float, float, bool] = NO_SWAP_TERMS  # (r, s, q, answered): ``reference_gain``'s terms


def _rates(audit_fit: AuditFit | None, task: str, llm: str | None, fitted: bool, r: float, k: float) -> tuple[float, ...]:
    """The (agree|right, right, agree|wrong, wrong) counts of ``llm`` against the task's reference: the
    history's where fitted and enough, else independence with reference accuracy ``r`` and chance ``k`` of
    the same wrong answer (50 pseudo-observations)."""
    counts = audit_fit.rates.get(task, {}).get(llm or "") if (audit_fit is not None and fitted) else None
    if counts is not None and counts[1] >= MIN_RATE_ROWS and counts[3] >= MIN_RATE_ROWS:
        scale = min(1.0, RATE_CAP / max(counts[1] + counts[3], 1))
        return (counts[0] * scale, counts[1] * scale, counts[2] * scale, counts[3] * scale)
    s, q = r, (1 - r) * k
    return (50 * s, 50.0, 50 * q, 50.0)


def _task_draws(rows: list[_Row], rng: np.random.Generator, draws: int) -> np.ndarray:
    """Posterior draws of one task's accuracy from its audited rows: the agreement rate from its Beta
    (Jeffreys) posterior, s and q from theirs on the history's counts (one draw per LLM, shared by its rows),
    the rows where the audit says nothing as Binomial draws of the predictor's accuracy, rows not answered 0."""
    inform = [r for r in rows if r.done and r.informative]
    blind = [r.prior for r in rows if r.done and not r.informative]
    sample = np.zeros(draws)
    if blind:
        sample += rng.binomial(len(blind), float(np.mean(blind)), draws)
    if inform:
        keys = sorted({r.rate for r in inform})
        rates = np.array(keys)
        use = np.array([keys.index(r.rate) for r in inform])
        agree = sum(r.agree for r in inform)
        a = rng.beta(agree + 0.5, len(inform) - agree + 0.5, draws)
        s = rng.beta(rates[:, 0] + 1, rates[:, 1] - rates[:, 0] + 1, (draws, len(keys)))[:, use].mean(axis=1)
        q = rng.beta(rates[:, 2] + 1, rates[:, 3] - rates[:, 2] + 1, (draws, len(keys)))[:, use].mean(axis=1)
        sample += len(inform) * np.clip((a - q) / np.maximum(s - q, 1e-6), 0.0, 1.0)
    return sample / len(rows)


def _rows_for(
    plan: pl.DataFrame,
    results: pl.DataFrame,
    audits: pl.DataFrame,
    calls: pl.DataFrame,
    queue: pl.DataFrame,
    audit_fit: AuditFit | None,
    base: dict[str, float] | None = None,
) -> tuple[list[_Row], list[dict[str, Any]]]:
    tasks = dict(queue.select("query_id", "task").iter_rows())
    open_tasks = set(queue.filter(pl.col("labels").is_null())["task"].unique().to_list())
    labels = {t: len(ls) for t, ls in queue.select("task", "labels").unique("task").iter_rows() if ls is not None}
    source = source_llms(calls, results, open_tasks, tasks)
    delivered = {q: (s, a) for q, s, a in results.select("query_id", "status", "answer").iter_rows()}
    planned = dict(plan.select("query_id", "expected_accuracy").iter_rows())
    rows: list[_Row] = []
    records: list[dict[str, Any]] = []
    for audit, status, reference, kind, models, fitted, accuracy in audits.select(
        "query_id", "status", "answer", "kind", "models", "fitted_reference", "expected_accuracy"
    ).iter_rows():
        query_id = audited_query_id(audit)
        if status != "done" or reference is None or query_id not in delivered:
            continue  # the reference was not obtained (failed, over budget): the sample is one smaller
        task = tasks[query_id]
        state, answer = delivered[query_id]
        llm = source.get(query_id)
        agree = state == "done" and same_answer(answer, reference, task in open_tasks)
        k = 0.0 if task in open_tasks else 1.0 / max(labels.get(task, 2) - 1, 1)
        rate = _rates(audit_fit, task, llm, bool(fitted), float(accuracy), k)
        s, q = (rate[0] + 1) / (rate[1] + 2), (rate[2] + 1) / (rate[3] + 2)
        # the delivered answer is the reference's own call (same single LLM): agreement is certain, no evidence
        own = kind == "single" and llm in (models or [])
        swap = (float(accuracy), s, q, state == "done")
        rows.append(
            _Row(task, state == "done", agree, (s - q) >= MIN_SEPARATION and not own, float(planned.get(query_id, 0.0)), rate, (base or {}).get(query_id, 0.0), swap)  # type: ignore[arg-type]
        )
        records.append(
            {
                "query_id": query_id,
                "task": task,
                "delivered_answer": answer,
                "reference_answer": reference,
                "agree": agree,
                "source_model": llm,
                "reference_models": list(models or []),
            }
        )
    return rows, records


def reference_gain(p: float, r: float, s: float, q: float, *, answered: bool) -> float:
    """What delivering an audited query its reference's answer instead of the plan's adds to P(right), by the
    history: the plan's answer right with ``p``, the reference's with ``r``, the two agreeing with ``s`` when the
    plan's is right and ``q`` when it is wrong. Only a disagreement is swapped; given one, P(plan right) =
    p(1 - s) / d and P(reference right) = (r - p s) / d, d = 1 - p s - (1 - p) q (agreeing with a right answer
    is the reference being right), so the gain is (r - p) / d. The plan's answer missing: r."""
    if not answered:
        return min(max(r, 0.0), 1.0)
    return min(max((r - p) / max(1.0 - p * s - (1.0 - p) * q, 1e-6), 0.0), 1.0)


def correction_shrink(correction: np.ndarray) -> float:
    """How much of the audited correction (its posterior draws) the difference estimator keeps: positive-part
    James-Stein, max(0, 1 - SE^2 / c^2). A handful of audited queries (the live default caps the references at
    5% of the budget: 1-7 on a 230-query night) gives a correction whose noise dwarfs any shift, and applied
    whole it moved the estimate further from the truth than the posterior alone (bench/shift_estimate.py); a
    correction well outside its own noise (a shift the sample sees) is kept nearly whole."""
    centre, se = float(correction.mean()), float(correction.std())
    return 0.0 if centre == 0.0 else max(0.0, 1.0 - se * se / (centre * centre))


def posterior_base(answers: pl.DataFrame) -> pl.DataFrame:
    """``estimate_audit``'s ``base`` from a run in rounds: the posterior of each final answer (ROUND_ANSWER_SCHEMA
    rows; the audits' own reference rows apart), what the run's ``estimated_accuracy`` averages."""
    return answers.filter(~is_audit()).select(
        "query_id", pl.col("estimated_p_correct").fill_null(0.0).fill_nan(0.0).alias("p")
    )


def base_probabilities(base: pl.DataFrame, results: pl.DataFrame) -> dict[str, float]:
    """``base``'s p per query, 0 where the query was not answered (as the run's own estimate counts it)."""
    done = set(results.filter(pl.col("status") == "done")["query_id"].to_list())
    return {
        q: (float(p) if p is not None and p == p and q in done else 0.0)
        for q, p in base.select("query_id", "p").iter_rows()
    }


@dataclass(frozen=True)
class AuditInputs:
    """What ``estimate_audit`` reads (and ``app.pipeline.settle_audits``, which delivers the references after):
    ``plan``/``results`` the delivered rows (audits apart); ``audit_plan_rows`` the audited sample's reference
    plan rows and ``audit_results`` their result rows; ``calls`` every call made (query_id, model, answer,
    status, in call order); ``audit_fit`` the audit's fit on the history (``fit_audit``); ``seed`` the draws' seed (the run's); ``base``
    (query_id, p) the run's own gold-free P(right) per query, or None."""

    plan: pl.DataFrame
    results: pl.DataFrame
    audit_plan_rows: pl.DataFrame
    audit_results: pl.DataFrame
    calls: pl.DataFrame
    queue: pl.DataFrame
    predictions: pl.DataFrame
    audit_fit: AuditFit | None
    seed: str = ""
    base: pl.DataFrame | None = None


def _base_by_task(queue: pl.DataFrame, base_p: dict[str, float]) -> tuple[dict[Any, tuple[float, float]], float | None]:
    """Per task the mean of the run's own P(right) over all its queries (0 where missing) and the realized
    accuracy's spread around it (sqrt(sum p(1-p)) / n); and the batch's mean."""
    p_all = queue.select("query_id", "task").with_columns(
        pl.col("query_id").replace_strict(base_p, default=0.0, return_dtype=pl.Float64).alias("p")
    )
    base_task = {
        task: (float(mean_p), math.sqrt(float(var_sum)) / max(int(n), 1))
        for task, mean_p, var_sum, n in p_all.group_by("task")
        .agg(pl.col("p").mean().alias("mean"), (pl.col("p") * (1 - pl.col("p"))).sum().alias("var"), pl.len())
        .iter_rows()
    }
    return base_task, float(p_all["p"].to_numpy().mean()) if p_all.height else None


def estimate_audit(inputs: AuditInputs) -> dict[str, Any]:
    """The audited estimate of the batch's accuracy, its 95% interval, agreement per task, the LLMs worse than
    the history says and the drift found, from ``inputs`` (``AuditInputs``).

    ``base`` (query_id, p): the run's own gold-free P(its delivered answer is right) for every query (a run in
    rounds: the posterior of its final answers; a query missing or not answered counts 0). With it the estimate
    is a difference estimator (prediction-powered inference): per task, the mean of ``base`` over all the task's
    queries plus the audited sample's mean of (audited accuracy - base). The sample is uniform, so the
    correction is unbiased for whatever bias ``base`` has (a batch easier or harder than the history), and where
    ``base`` is good the correction is small; where the audit says nothing for a row its base stands. The
    correction is shrunk by its own noise (``correction_shrink``), and none is made for a task with fewer than
    ``MIN_CORRECTION_ROWS`` audited queries (the live default's handful leaves the posterior as it is); the
    interval keeps the audit's whole spread and adds that of the realized accuracy around ``base`` (sqrt(sum
    p(1-p)) / n).
    Without ``base``, the audited rows' accuracy alone, the plan's promise for tasks not audited (in the
    interval with the binomial spread of their realized accuracy around it, as with a base).

    Exploration rows (``explore_plan``) are no references: only their calls count, as the LLMs' agreement
    with the reference (``llm_drift``), and the report's ``exploration`` says what they cost."""
    plan, results, queue = inputs.plan, inputs.results, inputs.queue
    explored = exploration_summary(inputs.audit_plan_rows, inputs.audit_results)
    audit_plan_rows, audit_results = references_only(inputs.audit_plan_rows), references_only(inputs.audit_results)
    audits = audit_results.join(
        audit_plan_rows.select("query_id", "kind", "models", "fitted_reference", "expected_accuracy"), on="query_id"
    )
    base_p = None if inputs.base is None else base_probabilities(inputs.base, results)
    rows, records = _rows_for(plan, results, audits, inputs.calls, queue, inputs.audit_fit, base_p)
    swaps = {str(record["query_id"]): [*r.swap] for r, record in zip(rows, records, strict=True)}
    if base_p is not None:  # where the audit says nothing, the run's own estimate stands (no correction)
        rows = [replace(r, prior=r.base) for r in rows]
    spend = float(audit_results["cost_usd"].fill_null(0.0).sum())
    out: dict[str, Any] = {
        "queries": audit_plan_rows.height,
        "audited": len(rows),
        "spent_usd": spend,
        "method": "misclassification-corrected agreement with a reference plan, acc = (a - q) / (s - q), s and q "
        "replayed on the history; 95% interval from posterior draws (agreement, s and q)",
        "per_task": [],
        "llms_worse": [],
        "llms_better": [],
        "drift": [],
        "records": records,
        "swap_terms": swaps,  # per audited query, (r, s, q, answered) for count_delivered's reference_gain
    }
    if explored["queries"]:
        out["exploration"] = explored
    if not rows:
        out["estimated_accuracy"], out["ci95"] = None, None
        return out
    weights = queue.group_by("task").len().sort("task")  # the draws share one rng: tasks in a fixed order
    n_total = float(weights["len"].sum())
    by_task = {str(t): [r for r in rows if r.task == t] for t in sorted({r.task for r in rows})}
    planned_task = dict(
        plan.join(queue.select("query_id", "task"), on="query_id")
        .group_by("task")
        .agg(pl.col("expected_accuracy").fill_null(0.0).mean())
        .iter_rows()
    )
    base_task: dict[Any, tuple[float, float]] = {}
    if base_p is not None:
        out["method"] = (
            "difference estimator: mean of the run's posterior over the batch + the audited sample's mean of "
            "(misclassification-corrected accuracy - posterior), per task; 95% interval from posterior draws"
        )
        base_task, out["base_accuracy"] = _base_by_task(queue, base_p)
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(inputs.seed.encode(), digest_size=4).digest(), "little"))
    draws = np.zeros(DRAWS)
    point = 0.0  # the difference estimator's point estimate (with a base)
    for task, weight in weights.iter_rows():
        share = weight / n_total
        task_rows = by_task.get(str(task))
        if not task_rows:  # no audited query of this task: the run's base, else the plan's promise, stands in
            stand_in = base_task[task][0] if task in base_task else float(planned_task.get(task, 0.0))
            # with the realized accuracy's own spread around it, as the audited tasks' rows the audit says nothing
            # of (``_task_draws``): a constant here made the interval's top the estimate itself on nights where
            # only the other task was audited (bench/nights.py: realized above it, not covered)
            draws += share * rng.binomial(int(weight), min(max(stand_in, 0.0), 1.0), DRAWS) / max(int(weight), 1)
            point += share * stand_in
            continue
        task_draws = _task_draws(task_rows, rng, DRAWS)
        shrink, centre = None, 0.0
        if task in base_task:  # the difference estimator (docstring)
            mean_base, spread = base_task[task]
            correction = task_draws - float(np.mean([r.base for r in task_rows]))
            shrink = correction_shrink(correction) if len(task_rows) >= MIN_CORRECTION_ROWS else 0.0
            centre = float(correction.mean())
            # the draws' median (the estimate) moves by the shrunk correction; their spread stays the audit's (the
            # interval is not narrowed)
            spread_draws = correction - float(np.median(correction)) + rng.normal(0.0, spread, DRAWS)
            task_draws = np.clip(mean_base + shrink * centre + spread_draws, 0.0, 1.0)
        low, high = np.quantile(task_draws, [0.025, 0.975])
        # with a base, the estimate is the posterior plus the kept correction itself (the draws' skew, from
        # clipped agreement rates, would move their median off it even when nothing is kept)
        estimate = base_task[task][0] + (shrink or 0.0) * centre if task in base_task else float(np.median(task_draws))
        low, high = min(float(low), estimate), max(float(high), estimate)
        draws += share * task_draws
        point += share * estimate
        agreement = float(np.mean([r.agree for r in task_rows]))
        entry = {
            "task": task,
            "queries": int(weight),
            "audited": len(task_rows),
            "agreement": agreement,
            "estimated_accuracy": estimate,
            "ci95": [float(low), float(high)],
            "planned_accuracy": float(planned_task.get(task, 0.0)),
        }
        if shrink is not None:
            entry["base_accuracy"], entry["correction_kept"] = base_task[task][0], shrink
        out["per_task"].append(entry)
        if not low <= entry["planned_accuracy"] <= high:
            out["drift"].append(
                {
                    "kind": "task",
                    "name": task,
                    "planned_accuracy": entry["planned_accuracy"],
                    "estimated_accuracy": estimate,
                    "ci95": entry["ci95"],
                    "direction": "worse" if entry["planned_accuracy"] > high else "better",
                }
            )
    low, high = np.quantile(draws, [0.025, 0.975])
    out["estimated_accuracy"] = point if base_task else float(np.median(draws))
    low, high = min(float(low), out["estimated_accuracy"]), max(float(high), out["estimated_accuracy"])
    out["ci95"] = [float(low), float(high)]
    llms = llm_drift(audits, inputs.calls, queue, inputs.predictions, inputs.audit_fit)
    for entry in llms:
        out["llms_worse" if entry["direction"] == "worse" else "llms_better"].append(entry)
    out["drift"] = [*llms, *out["drift"]]  # the LLMs first: what went wrong, then where it shows
    return out


def llm_drift(
    audits: pl.DataFrame, calls: pl.DataFrame, queue: pl.DataFrame, predictions: pl.DataFrame, audit_fit: AuditFit | None
) -> list[dict[str, Any]]:
    """Per LLM called on the audited queries (other than as the reference's single LLM): the accuracy its
    agreement with the reference implies, with a 95% (Wilson) interval, against the predictor's mean
    P(correct) for it on those queries; the ones outside, worse first."""
    done = audits.filter((pl.col("status") == "done") & pl.col("answer").is_not_null())
    reference = {audited_query_id(q): (a, ms, f, acc) for q, a, ms, f, acc in done.select(
        "query_id", "answer", "models", "fitted_reference", "expected_accuracy").iter_rows()}  # fmt: skip
    tasks = dict(queue.select("query_id", "task").iter_rows())
    open_tasks = set(queue.filter(pl.col("labels").is_null())["task"].unique().to_list())
    labels = {t: len(ls) for t, ls in queue.select("task", "labels").unique("task").iter_rows() if ls is not None}
    prior = {(q, m): p for q, m, p in predictions.select("query_id", "model", "p_correct").iter_rows()}
    per_llm: dict[str, list[tuple[bool, float, float, float]]] = {}
    seen: set[tuple[str, str]] = set()
    for call_id, llm, answer in calls.select("query_id", "model", "answer").iter_rows():
        query_id = audited_query_id(call_id)
        if query_id not in reference or answer is None or (query_id, llm) in seen:
            continue
        ref_answer, models, fitted, accuracy = reference[query_id]
        if len(models) == 1 and llm in models:
            continue  # the reference's own LLM: agreeing with itself says nothing
        seen.add((query_id, llm))
        task = tasks[query_id]
        k = 0.0 if task in open_tasks else 1.0 / max(labels.get(task, 2) - 1, 1)
        rate = _rates(audit_fit, task, llm, bool(fitted), float(accuracy), k)
        s, q = (rate[0] + 1) / (rate[1] + 2), (rate[2] + 1) / (rate[3] + 2)
        if s - q < MIN_SEPARATION:
            continue
        agree = same_answer(answer, ref_answer, task in open_tasks)
        per_llm.setdefault(llm, []).append((agree, s, q, float(prior.get((query_id, llm), math.nan))))
    found: list[dict[str, Any]] = []
    for llm, obs in sorted(per_llm.items()):
        if len(obs) < MIN_RATE_ROWS:
            continue
        n = len(obs)
        a = sum(o[0] for o in obs) / n
        s = float(np.mean([o[1] for o in obs]))
        q = float(np.mean([o[2] for o in obs]))
        predicted = float(np.nanmean([o[3] for o in obs]))
        low, high = (float(np.clip((x - q) / (s - q), 0.0, 1.0)) for x in wilson(a, n))
        implied = float(np.clip((a - q) / (s - q), 0.0, 1.0))
        if not low <= predicted <= high:
            found.append(
                {
                    "kind": "llm",
                    "name": llm,
                    "calls": n,
                    "agreement": a,
                    "predicted_accuracy": predicted,
                    "estimated_accuracy": implied,
                    "ci95": [low, high],
                    "direction": "worse" if predicted > high else "better",
                }
            )
    return sorted(found, key=lambda e: (e["direction"] != "worse", e["estimated_accuracy"] - e["predicted_accuracy"]))


def wilson(share: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a share observed on ``n`` rows (sound at 0 or n of n)."""
    centre = (share + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(share * (1 - share) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


MIN_LABEL_ROWS: Final = 5  # live labels of a (task, LLM) before they can say it drifted
DRIFT_ALPHA: Final = 0.05  # the labels' drift test's family-wise error rate, over the (task, LLM)s tested


def score_p_value(share: float, n: int, expected: float) -> float:
    """Two-sided p-value of the score test of ``share`` observed on ``n`` rows against ``expected``: ``expected``
    is outside ``wilson(share, n)`` exactly when it is below 5% (the Wilson interval inverts this test)."""
    p = min(max(expected, 1e-9), 1 - 1e-9)
    return math.erfc(abs(share - p) * math.sqrt(n / (p * (1 - p))) / math.sqrt(2))


def label_drift(offsets: pl.DataFrame, tasks: set[str]) -> list[dict[str, Any]]:
    """Per (task, LLM) of tonight's tasks with live labels (the predictor's live correction, ``offsets``:
    ``predictors.live.OFFSET_SCHEMA``): where the labels' accuracy over ``gold_rows`` differs from what the
    history predicted for those rows (``p_before``) at a family-wise 5% over the (task, LLM)s tested (Holm's
    step-down on the score test's p-values; one tested: the history outside the labels' 95% Wilson interval,
    ``ci95``). The labels already corrected the estimate this plan used (the live correction); this says the
    history is off there, out loud.

    Why: an audit sees a handful of queries a night (its spend is capped), too few for an LLM's own interval;
    the labels of past nights add up, and a provider that silently changed an LLM shows there first. Why Holm:
    a 95% test on each of ~15 (task, LLM)s raises a false alarm most nights where nothing drifted, and each
    alarm turns exploration on (``plans.planning.choose_exploration``)."""
    ranked = sorted(
        (score_p_value(float(acc), int(n), float(before)), task, llm, int(n), float(before), float(acc))
        for task, llm, n, before, acc in offsets.select("task", "model", "gold_rows", "p_before", "live_acc").iter_rows()
        if task in tasks and n >= MIN_LABEL_ROWS
    )
    found = []
    for k, (p_value, task, llm, n, before, acc) in enumerate(ranked):
        if p_value > DRIFT_ALPHA / (len(ranked) - k):
            break  # Holm: no later (larger) p-value can be rejected once one is not
        low, high = (float(np.clip(x, 0.0, 1.0)) for x in wilson(acc, n))
        found.append(
            {"kind": "llm", "source": "labels", "name": llm, "task": task, "calls": n, "predicted_accuracy": before,
             "estimated_accuracy": acc, "ci95": [low, high], "p_value": p_value, "tested": len(ranked),
             "direction": "worse" if before > acc else "better"}
        )  # fmt: skip
    return sorted(found, key=lambda e: (e["direction"] != "worse", e["estimated_accuracy"] - e["predicted_accuracy"]))


def drift_lines(report: dict[str, Any]) -> list[str]:
    """The drift found, one sentence each: the report's first lines."""
    lines = []
    for d in report.get("drift") or []:
        what = "LLM" if d["kind"] == "llm" else "task"
        promised = d.get("predicted_accuracy", d.get("planned_accuracy"))
        if d.get("source") == "labels":  # the live labels of past runs (``label_drift``): the plan already used them
            lines.append(
                f"DRIFT: LLM {d['name']} on {d['task']} is {d['direction']} than the history says: labelled accuracy "
                f"{d['estimated_accuracy']:.1%} over {d['calls']} labels (95% CI {d['ci95'][0]:.1%}-{d['ci95'][1]:.1%}"
                + (f"; p {d['p_value']:.2g} of {d['tested']} (task, LLM)s tested, Holm" if "tested" in d else "")
                + f") against the history's {promised:.1%}; this plan used the labels' correction"
            )
            continue
        lines.append(
            f"DRIFT: {what} {d['name']} is {d['direction']} than the history says: audited accuracy "
            f"{d['estimated_accuracy']:.1%} (95% CI {d['ci95'][0]:.1%}-{d['ci95'][1]:.1%}) against the predictor's "
            f"{promised:.1%}; retrain on this run's outcomes"
        )
    return lines


AUDIT_DELIVERED_NOTE: Final = "answered by its audit's reference plan"


def deliver_references(
    results: pl.DataFrame, plan: pl.DataFrame, audit_plan_rows: pl.DataFrame, audit_results: pl.DataFrame, queue: pl.DataFrame
) -> tuple[pl.DataFrame, list[str]]:
    """The delivered results with an audited query answered by its reference where that is the likelier right
    answer: the plan's answer is missing (failed, deferred) or disagrees with the reference and the reference
    is the more accurate of the two by the history (``expected_accuracy``: when two answers differ, the one
    from the more accurate plan is the likelier right, whatever their errors' correlation). The reference was
    paid for; throwing it away would make the audit cost accuracy. Call it after ``estimate_audit``: the
    estimate is the plan's own answers' agreement with the reference, and ``count_delivered`` then adds what the
    swap is expected to add. Returns (results, the queries answered by their reference); costs unchanged (the
    reference's spend is the audit's)."""
    audit_results = references_only(audit_results)
    if audit_results.height == 0:
        return results, []
    open_tasks = set(queue.filter(pl.col("labels").is_null())["task"].unique().to_list())
    tasks = dict(queue.select("query_id", "task").iter_rows())
    planned = dict(plan.select("query_id", "expected_accuracy").iter_rows())
    references = audit_results.join(audit_plan_rows.select("query_id", "expected_accuracy", "models"), on="query_id")
    delivered = {q: (s, a) for q, s, a in results.select("query_id", "status", "answer").iter_rows()}
    swap: dict[str, tuple[str, list[str]]] = {}
    for audit, status, answer, accuracy, models in references.select(
        "query_id", "status", "answer", "expected_accuracy", "models"
    ).iter_rows():
        query_id = audited_query_id(audit)
        if status != "done" or answer is None or query_id not in delivered:
            continue
        state, mine = delivered[query_id]
        missing = state != "done" or mine is None
        likelier = float(accuracy or 0.0) > float(planned.get(query_id) or 0.0)
        if missing or (likelier and not same_answer(mine, answer, tasks.get(query_id) in open_tasks)):
            swap[query_id] = (answer, list(models or []))
    if not swap:
        return results, []
    ids = pl.Series(list(swap), dtype=pl.String)
    patch = pl.DataFrame(
        {
            "query_id": ids,
            "_answer": [a for a, _ in swap.values()],
            "_models": pl.Series([m for _, m in swap.values()], dtype=pl.List(pl.String)),
        }
    )
    hit = pl.col("_answer").is_not_null()
    out = (
        results.join(patch, on="query_id", how="left", maintain_order="left")
        .with_columns(
            pl.when(hit).then(pl.col("_answer")).otherwise(pl.col("answer")).alias("answer"),
            pl.when(hit)
            .then(pl.concat_list(pl.col("models_called").fill_null(pl.lit([], dtype=pl.List(pl.String))), "_models").list.unique(maintain_order=True))
            .otherwise(pl.col("models_called"))
            .alias("models_called"),
            pl.when(hit).then(pl.lit("done")).otherwise(pl.col("status")).alias("status"),
            pl.when(hit).then(pl.lit(None, dtype=pl.String)).otherwise(pl.col("error")).alias("error"),
            pl.when(hit)
            .then(pl.concat_str([pl.col("note"), pl.lit(AUDIT_DELIVERED_NOTE)], separator="; ", ignore_nulls=True))
            .otherwise(pl.col("note"))
            .alias("note"),
        )
        .select(results.columns)
    )
    return out, list(swap)


def count_delivered(audited: dict[str, Any], swapped: list[str], queue: pl.DataFrame) -> dict[str, Any]:
    """``estimate_audit``'s section for the delivered batch, once ``deliver_references`` has swapped ``swapped``:
    the estimate (and its interval) is of the plan's own answers; the delivered answers' accuracy is higher by
    the swapped queries' expected gains (``reference_gain``, the plan's accuracy the task's audited estimate, the
    reference's and the agreement rates the history's) over the batch's queries, per task and in all. The
    agreement and the drift found stay the plan's (they compare it with what it promised)."""
    terms = audited.pop("swap_terms", {})
    audited["delivered_references"] = len(swapped)
    audited["delivered_gain"] = 0.0
    if not swapped or audited.get("estimated_accuracy") is None:
        return audited
    tasks = dict(queue.select("query_id", "task").iter_rows())
    plan_accuracy = {e["task"]: float(e["estimated_accuracy"]) for e in audited["per_task"]}
    added: dict[str, float] = {}
    for query_id in swapped:
        r, s, q, answered = terms.get(query_id, NO_SWAP_TERMS)
        p = plan_accuracy.get(tasks.get(query_id), float(audited["estimated_accuracy"]))
        added[query_id] = reference_gain(p, r, s, q, answered=bool(answered))

    def shifted(entry: dict[str, Any], by: float) -> None:
        entry["estimated_accuracy"] = min(entry["estimated_accuracy"] + by, 1.0)
        entry["ci95"] = [min(entry["ci95"][0] + by, 1.0), min(entry["ci95"][1] + by, 1.0)]

    for entry in audited["per_task"]:
        by_task = sum(g for q, g in added.items() if tasks.get(q) == entry["task"])
        shifted(entry, by_task / max(int(entry["queries"]), 1))
    audited["delivered_gain"] = sum(added.values()) / max(queue.height, 1)
    shifted(audited, audited["delivered_gain"])
    return audited
