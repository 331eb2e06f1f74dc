"""The round planner: before every round, re-plan every open query globally under what is left of the budget.

Per query the options are **stop** (keep the current answer; value P(current right), cost 0) or **one more
call** to an LLM not yet answered (value P(right after it), cost the predicted cost corrected by the drift
observed so far), both from ``batchplan.posterior``. The optimizer (``optimizer.solve``: the options table
and Budget / GroupBudget rows, the fast certified path) picks one option per query for the whole batch.

- **Round 1** must account for what later rounds can learn: a first call to LLM f is valued at its prior
  plus the replayed mean gain of the best escalation after it at the budget's shadow price (the
  ``Posterior.escalation_value`` tables), and costed with that escalation's mean cost, so a cheap first call
  whose answers tell right from wrong is worth more than its accuracy alone. The price is found by fixed
  point: solve, read the budget's dual, re-value, solve again.
- **Answers are mandatory** when they fit: a query without an answer yet has no stop option whenever the
  cheapest calls of all such queries fit in what is left (else stop is worth 0 and the optimizer chooses
  which to answer). So the last round never leaves a query unanswered that the budget can still answer.
- **Cost drift**: per LLM, realized / predicted cost of the calls observed so far (fault charges and
  reservations of ambiguous failures included), shrunk to 1 by ``DRIFT_PRIOR_CALLS`` pseudo-calls, scales
  the predicted cost of its next calls.
- **Spend under the budget with high probability**: like ``planning.plan_batch``, a second pass leaves
  z x the sd of the round's spend unplanned (``spend_confidence``); the round's reserve is the calls'
  high-side cost, what the budget guard holds before calling.
- A failed call (rate limit, server error, no usable answer) carries no answer: the LLM may be asked again,
  at most ``max_tries`` times per query.

Nothing here reads gold: only the queue, the predictions and the observations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl
import structlog

from batchplan.candidates import P90_Z
from batchplan.contracts import DEFAULT_TENANT, ContractError
from batchplan.posterior import NONE, OPAQUE, Posterior, States, normalize
from batchplan.rounds import ROUND_ANSWER_SCHEMA, ROUND_PLAN_SCHEMA, RoundPlan, RoundState
from optimizer import Budget, GroupBudget, InfeasibleError, Problem, solve
from optimizer.api import Method

log = structlog.get_logger("batchplan.rounds")

DRIFT_PRIOR_CALLS = 20.0
OK = "ok"


@dataclass
class Observed:
    """The batch as dense arrays: queries in queue order, LLMs sorted; what every query has seen so far."""

    query_ids: list[str]
    tasks: np.ndarray  # str [n]
    tenants: np.ndarray  # str [n]
    priority: np.ndarray  # float [n]
    models: list[str]
    states: States
    cost: np.ndarray  # predicted cost [n, M] (nan: not offered)
    high: np.ndarray  # predicted high-side cost [n, M]
    tries: np.ndarray  # int [n, M]: calls made (failed ones included)
    answer_text: list[dict[int, str | None]]  # per query: column -> the answer text of its last ok call
    drift: dict[str, float] = field(default_factory=dict)


def observe(queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> Observed:
    """Dense per-query state from the queue, the predictions and every observation so far."""
    ids = queue["query_id"].to_list()
    n = len(ids)
    models = sorted(predictions["model"].unique().to_list())
    qi = pl.DataFrame({"query_id": ids, "_q": np.arange(n, dtype=np.int64)})
    mi = pl.DataFrame({"model": models, "_m": np.arange(len(models), dtype=np.int64)})
    m = len(models)
    pred = predictions.join(qi, on="query_id").join(mi, on="model")
    prior, cost, high = (np.full((n, m), np.nan) for _ in range(3))
    r, c = pred["_q"].to_numpy(), pred["_m"].to_numpy()
    prior[r, c] = pred["p_correct"].to_numpy()
    cost[r, c] = pred["cost_usd"].to_numpy()
    high[r, c] = pred["cost_high_usd"].fill_null(pred["cost_usd"]).to_numpy()
    code = np.full((n, m), NONE, dtype=np.int32)
    conf = np.full((n, m), np.nan)
    order = np.full((n, m), -1, dtype=np.int32)
    tries = np.zeros((n, m), dtype=np.int64)
    texts: list[dict[int, str | None]] = [{} for _ in range(n)]
    drift: dict[str, float] = {}
    obs = observations.join(qi, on="query_id").join(mi, on="model").with_row_index("_seq")
    if obs.height:
        np.add.at(tries, (obs["_q"].to_numpy(), obs["_m"].to_numpy()), 1)
        # the last ok call per (query, LLM) is its answer; the order of calls is by round, then row
        ok = (
            obs.filter(pl.col("status") == OK)
            .sort("round", "_seq")
            .unique(["_q", "_m"], keep="last", maintain_order=True)
            .with_columns(
                normalize(pl.col("answer")).rank("dense").over("_q").cast(pl.Int32).alias("_code"),
                pl.int_range(pl.len()).over("_q").cast(pl.Int32).alias("_order"),
            )
        )
        r, c = ok["_q"].to_numpy(), ok["_m"].to_numpy()
        code[r, c] = np.where(ok["_code"].is_null().to_numpy(), OPAQUE, ok["_code"].fill_null(0).to_numpy())
        conf[r, c] = np.exp(ok["logprob"].fill_null(np.nan).to_numpy())
        order[r, c] = ok["_order"].to_numpy()
        for q, j, text in zip(r.tolist(), c.tolist(), ok["answer"].to_list(), strict=True):
            texts[q][j] = text
        drift = cost_drift(obs, cost)
    return Observed(
        query_ids=ids,
        tasks=queue["task"].fill_null("default").to_numpy().astype(str),
        tenants=queue["tenant"].fill_null(DEFAULT_TENANT).to_numpy().astype(str),
        priority=queue["priority"].fill_null(1.0).to_numpy().astype(float),
        models=models,
        states=States(prior, code, conf, order),
        cost=cost,
        high=high,
        tries=tries,
        answer_text=texts,
        drift=drift,
    )


def cost_drift(obs: pl.DataFrame, predicted: np.ndarray) -> dict[str, float]:
    """Per LLM: (charged + k x mean predicted x batch drift) / (predicted + k x mean predicted) over its
    observed calls, k = DRIFT_PRIOR_CALLS; "*": the batch drift (all calls), for LLMs not called yet. Prompts
    and answers that run long tonight run long for every LLM, so an LLM's own drift shrinks to the batch's."""
    pred = predicted[obs["_q"].to_numpy(), obs["_m"].to_numpy()]
    frame = obs.select("model", pl.col("cost_usd").fill_null(0.0)).with_columns(
        pl.Series("_pred", np.nan_to_num(pred, nan=0.0))
    )
    total_pred = float(frame["_pred"].sum())
    batch = float(frame["cost_usd"].sum()) / total_pred if total_pred > 0 else 1.0
    out = {"*": batch}
    for model, real, expected, calls in (
        frame.group_by("model").agg(pl.col("cost_usd").sum(), pl.col("_pred").sum(), pl.len()).iter_rows()
    ):
        k = DRIFT_PRIOR_CALLS * expected / max(calls, 1)
        out[str(model)] = float((real + k * batch) / (expected + k)) if expected > 0 else batch
    return out


@dataclass
class Evaluated:
    """Per query, what the posterior says now and after each possible next call."""

    now_answer: np.ndarray  # int [n]: column of the kept answer, -1 none
    now_p: np.ndarray  # float [n]
    after: np.ndarray  # float [n, M]: P(right after calling that LLM next); nan where it may not be called


def evaluate(posterior: Posterior, seen: Observed, max_tries: int, chunk: int = 100_000) -> Evaluated:
    """The posterior per task, in chunks of queries (the features are [rows, LLMs, LLMs] arrays)."""
    n, m = seen.states.code.shape
    now_answer = np.full(n, -1, dtype=np.int64)
    now_p = np.zeros(n)
    after = np.full((n, m), np.nan)
    for task in np.unique(seen.tasks):
        rows = np.flatnonzero(seen.tasks == task)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            s = States(seen.states.prior[part], seen.states.code[part], seen.states.conf[part], seen.states.order[part])
            now = posterior.current(str(task), s, seen.models)
            now_answer[part], now_p[part] = now.chosen, now.p
            after[part] = posterior.after(str(task), s, seen.models, now)
    callable_ = np.isfinite(seen.states.prior) & ~seen.states.answered & (seen.tries < max_tries)
    callable_ &= np.isfinite(seen.cost)
    after = np.where(callable_, after, np.nan)
    return Evaluated(now_answer, now_p, after)


@dataclass
class PosteriorRoundPlanner:
    """``RoundPlanner`` over a fitted ``Posterior`` (module docstring)."""

    posterior: Posterior
    spend_confidence: float = 0.95
    max_tries: int = 2
    method: Method = "auto"
    price_iterations: int = 2
    escalate_first_round: bool = True

    def plan_round(self, state: RoundState) -> RoundPlan:
        seen = observe(state.queue, state.predictions, state.observations)
        ev = evaluate(self.posterior, seen, self.max_tries)
        n, m = ev.after.shape
        drift = np.array([seen.drift.get(model, seen.drift.get("*", 1.0)) for model in seen.models])
        cost = seen.cost * drift[None]
        high = np.maximum(seen.high, seen.cost) * drift[None]
        call = np.isfinite(ev.after)
        budget = state.budget_left_usd
        # a query with no answer yet must get one if the cheapest calls of all such queries fit
        unanswered = ev.now_answer < 0
        cheapest = np.where(call, cost, np.inf).min(axis=1)
        need = unanswered & np.isfinite(cheapest)
        mandatory = need if budget is None or cheapest[need].sum() <= budget * (1 - 1e-9) else np.zeros(n, bool)
        first_round = bool(unanswered.all()) and not state.last and self.escalate_first_round
        value = np.where(call, ev.after, 0.0)
        extra = np.zeros((n, m))
        price = 0.0
        iterations = self.price_iterations if first_round and budget is not None else 0
        outcome = self._solve(seen, ev, value, cost, extra, high, mandatory, budget, state.tenant_budgets_left_usd)
        for _ in range(iterations):
            price = float(outcome[1].shadow_prices.get("budget", 0.0)) if outcome is not None else 0.0
            value, extra = self._with_escalation(seen, ev, cost, call, price)
            outcome = self._solve(seen, ev, value, cost, extra, high, mandatory, budget, state.tenant_budgets_left_usd)
        if outcome is None:
            return RoundPlan(calls=pl.DataFrame(schema=ROUND_PLAN_SCHEMA), diagnostics={"status": "nothing to call"})
        picked, solution = outcome
        rows = np.flatnonzero(picked >= 0)
        cols = picked[rows]
        calls = pl.DataFrame(
            {
                "query_id": [seen.query_ids[i] for i in rows],
                "models": [[seen.models[j]] for j in cols],
                "expected_cost_usd": cost[rows, cols],
                "reserve_cost_usd": high[rows, cols],
                "expected_accuracy": ev.after[rows, cols],
            },
            schema=ROUND_PLAN_SCHEMA,
        )
        diagnostics: dict[str, Any] = {
            "round": state.round,
            "rounds": state.rounds,
            "method": solution.method,
            "status": solution.status,
            "objective": solution.objective,
            "bound": solution.bound,
            "gap": solution.gap,
            "shadow_prices": solution.shadow_prices,
            "escalation_price": price,
            "cost_drift": seen.drift,
            "calls": len(rows),
            "mandatory": int(mandatory.sum()),
            "expected_cost_usd": float(cost[rows, cols].sum()),
            "planned_accuracy": float(
                np.where(picked >= 0, ev.after[np.arange(n), np.maximum(picked, 0)], ev.now_p).mean()
            )
            if n
            else 0.0,
        }
        log.info("round.plan", **{k: v for k, v in diagnostics.items() if k != "shadow_prices"})
        return RoundPlan(calls=calls, diagnostics=diagnostics)

    def _with_escalation(
        self, seen: Observed, ev: Evaluated, cost: np.ndarray, call: np.ndarray, price: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Round 1: a first call's value and cost with the replayed best escalation after it at ``price``."""
        value = np.where(call, ev.after, 0.0)
        extra = np.zeros_like(value)
        for task in np.unique(seen.tasks):
            rows = seen.tasks == task
            for j, model in enumerate(seen.models):
                gain, more = self.posterior.escalation_value(str(task), model, price)
                value[rows, j] += gain
                extra[rows, j] = more
        return np.where(call, np.minimum(value, 1.0), 0.0), np.where(call, extra, 0.0)

    def _solve(
        self,
        seen: Observed,
        ev: Evaluated,
        value: np.ndarray,
        cost: np.ndarray,
        extra: np.ndarray,
        high: np.ndarray,
        mandatory: np.ndarray,
        budget: float | None,
        tenant_left: dict[str, float],
    ) -> tuple[np.ndarray, Any] | None:
        """One option per query (stop or one call) under the budget; returns (column called or -1, solution)."""
        n = value.shape[0]
        call = np.isfinite(ev.after)
        q_idx, m_idx = np.nonzero(call)
        stop = ~mandatory | ~call.any(axis=1)
        s_idx = np.flatnonzero(stop)
        if len(q_idx) == 0:
            return None
        sd2 = ((high - cost) / P90_Z) ** 2
        options = pl.DataFrame(
            {
                "query": np.concatenate([q_idx, s_idx]).astype(np.int64),
                "option": np.arange(len(q_idx) + len(s_idx), dtype=np.int64),
                "value": np.concatenate(
                    [seen.priority[q_idx] * value[q_idx, m_idx], seen.priority[s_idx] * ev.now_p[s_idx]]
                ),
                "cost": np.concatenate([cost[q_idx, m_idx] + extra[q_idx, m_idx], np.zeros(len(s_idx))]),
                "accuracy": np.concatenate([ev.after[q_idx, m_idx], ev.now_p[s_idx]]),
                "tenant": np.concatenate([seen.tenants[q_idx], seen.tenants[s_idx]]),
                "_col": np.concatenate([m_idx, np.full(len(s_idx), -1)]).astype(np.int64),
                "_var": np.concatenate([sd2[q_idx, m_idx], np.zeros(len(s_idx))]),
            }
        )
        constraints: list[Any] = []
        if budget is not None:
            constraints.append(Budget(limit=max(budget, 0.0)))
        tenants = {t: max(v, 0.0) for t, v in tenant_left.items() if t in set(seen.tenants.tolist())}
        if tenants:
            constraints.append(GroupBudget(group="tenant", limits=tenants, name="tenant_budget"))
        problem = Problem(options.drop("_col", "_var"), constraints=constraints, n_queries=n)
        try:
            solution = solve(problem, method=self.method)
        except InfeasibleError:
            # the mandatory answers do not fit after all (tenant budgets): let the optimizer choose
            if not mandatory.any():
                raise
            return self._solve(seen, ev, value, cost, extra, high, np.zeros(n, bool), budget, tenant_left)
        chosen = solution.chosen.join(options.select("option", "_col", "_var"), on="option")
        z = NormalDist().inv_cdf(self.spend_confidence) if self.spend_confidence > 0.5 else 0.0
        margin = z * float(np.sqrt(max(float(chosen["_var"].sum()), 0.0)))
        if budget is not None and margin > 0:
            tightened = [Budget(limit=max(budget - margin, 0.0)) if isinstance(c, Budget) else c for c in constraints]
            with contextlib.suppress(InfeasibleError):  # no room for the margin: keep the first pass
                solution = solve(problem.with_constraints(tightened), method=self.method)
                chosen = solution.chosen.join(options.select("option", "_col", "_var"), on="option")
        picked = np.full(n, -1, dtype=np.int64)
        picked[chosen["query"].to_numpy()] = chosen["_col"].to_numpy()
        return picked, solution

    def answers(self, queue: pl.DataFrame, predictions: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
        seen = observe(queue, predictions, observations)
        ev = evaluate(self.posterior, seen, self.max_tries)
        texts = [seen.answer_text[i].get(int(j)) if j >= 0 else None for i, j in enumerate(ev.now_answer.tolist())]
        return pl.DataFrame(
            {
                "query_id": seen.query_ids,
                "answer": texts,
                "estimated_p_correct": ev.now_p,
                # the LLM whose answer is kept: open tasks replayed from a history keep no text
                "model": [seen.models[j] if j >= 0 else None for j in ev.now_answer.tolist()],
            },
            schema=ROUND_ANSWER_SCHEMA,
        )


def round_planner(posterior: Posterior | None, **options: Any) -> PosteriorRoundPlanner:
    """The planner for a run in rounds from a trained model's posterior (``artifacts.Trained.posterior``)."""
    if posterior is None:
        raise ContractError(
            "this model version was trained without a round posterior: run `batchplan train` again to run in rounds"
        )
    return PosteriorRoundPlanner(posterior, **options)
