"""A simulated round loop on recorded outcomes: benchmarks and tests without the dispatcher.

``simulate_rounds`` drives a ``RoundPlanner`` for ``rounds`` rounds and answers every planned call from the
recorded outcome rows, as the replay backend (``dispatchers/replay.py``) would:

- a recorded (query, LLM) row answers ``ok`` with its answer and logprob, charged its recorded ``cost_usd``;
  a null answer on an open task (no labels) is ``ok`` with no text (the verdict is kept, not the text);
  a null answer, or one outside the query's labels, is ``not_answer`` (charged, no answer);
- no recorded row: ``unavailable``, charged nothing;
- a call the plan sends by batch (its ``mode`` column) is charged its recorded cost x the LLM's batch
  discount (``discounts``), as the provider's batch API bills it; it answers as in real time.

The budget guard is the executor's with the replay backend, whose cost bound is the recorded cost: a planned
call goes out, in the plan's row order, only if what was charged so far plus its recorded cost fits the total
budget (and its tenant's budget); otherwise it is refused (nothing observed, nothing charged: the query waits
or keeps what it has). So the hard caps hold exactly.

After the last round the planner's ``answers`` are turned into result rows (``models_called`` in call order,
status ``done`` with an answer or a verdict-only answer, else ``deferred``) that ``report.score_results``
scores like any run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from batchplan.core.contracts import DEFAULT_TENANT, RESULT_SCHEMA, Status
from batchplan.core.rounds import BATCH, OBSERVATION_MODE, OBSERVATION_SCHEMA, REALTIME, RoundPlanner, RoundState


@dataclass
class RoundsRun:
    observations: pl.DataFrame  # OBSERVATION_SCHEMA
    answers: pl.DataFrame  # ROUND_ANSWER_SCHEMA
    results: pl.DataFrame  # RESULT_SCHEMA
    spent_usd: float
    refused: int  # planned calls the budget guard refused
    diagnostics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def estimated_accuracy(self) -> float:
        p = self.answers["estimated_p_correct"].fill_null(0.0).to_numpy()
        return float(p.mean()) if len(p) else 0.0


def simulate_rounds(
    planner: RoundPlanner,
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    outcomes: pl.DataFrame,
    budget_usd: float | None,
    rounds: int,
    tenant_budgets_usd: dict[str, float] | None = None,
    discounts: dict[str, float] | None = None,
    after_round: Callable[[pl.DataFrame], None] | None = None,
) -> RoundsRun:
    """Run ``rounds`` rounds of ``planner`` on ``queue`` with calls answered from ``outcomes`` (module docstring).
    ``outcomes`` needs query_id, model, answer, cost_usd, logprob (tokens optional); never gold or verdicts.
    ``discounts``: per-LLM batch price factors for calls the plan sends by batch; ``after_round``: called with
    each round's calls once they are answered (a simulated clock: ``plans.modes.SimulatedClock``)."""
    table = {
        (q, m): (a, c, lp, ti, to)
        for q, m, a, c, lp, ti, to in outcomes.select(
            "query_id",
            "model",
            "answer",
            pl.col("cost_usd").fill_null(0.0),
            "logprob",
            *(
                pl.col(c) if c in outcomes.columns else pl.lit(None, dtype=pl.Int64).alias(c)
                for c in ("tokens_in", "tokens_out")
            ),
        ).iter_rows()
    }
    labels = dict(zip(queue["query_id"].to_list(), queue["labels"].to_list(), strict=True))
    tenant_of = dict(zip(queue["query_id"].to_list(), queue["tenant"].fill_null(DEFAULT_TENANT).to_list(), strict=True))
    tenant_budgets = dict(tenant_budgets_usd or {})
    spent = 0.0
    tenant_spent = dict.fromkeys(tenant_budgets, 0.0)
    rows: list[dict[str, Any]] = []
    refused = 0
    diagnostics = []
    schema = pl.Schema({**OBSERVATION_SCHEMA, OBSERVATION_MODE: pl.String()})
    observations = pl.DataFrame(schema=schema)
    for k in range(1, rounds + 1):
        state = RoundState(
            round=k,
            rounds=rounds,
            queue=queue,
            predictions=predictions,
            observations=observations,
            budget_left_usd=None if budget_usd is None else budget_usd - spent,
            tenant_budgets_left_usd={t: b - tenant_spent[t] for t, b in tenant_budgets.items()},
        )
        plan = planner.plan_round(state)
        diagnostics.append(plan.diagnostics)
        mode_of = pl.col("mode") if "mode" in plan.calls.columns else pl.lit(None, dtype=pl.String)
        for query_id, models, mode in plan.calls.select("query_id", "models", mode_of).iter_rows():
            tenant = tenant_of[query_id]
            for model in models or []:
                row = recorded_call(table.get((query_id, model)), labels.get(query_id))
                row[OBSERVATION_MODE] = BATCH if mode == BATCH else REALTIME
                if mode == BATCH:
                    row["cost_usd"] *= (discounts or {}).get(model, 1.0)
                over_total = budget_usd is not None and spent + row["cost_usd"] > budget_usd + 1e-12
                over_tenant = (
                    tenant in tenant_budgets and tenant_spent[tenant] + row["cost_usd"] > tenant_budgets[tenant] + 1e-12
                )
                if over_total or over_tenant:
                    refused += 1
                    continue
                rows.append({"query_id": query_id, "round": k, "model": model, **row})
                spent += row["cost_usd"]
                if tenant in tenant_spent:
                    tenant_spent[tenant] += row["cost_usd"]
        observations = pl.DataFrame(rows, schema=schema) if rows else observations
        if after_round is not None:
            after_round(plan.calls)
    answers = planner.answers(queue, predictions, observations)
    return RoundsRun(observations, answers, results_of(answers, observations), spent, refused, diagnostics)


def recorded_call(
    recorded: tuple[str | None, float, float | None, int | None, int | None] | None, labels: list[str] | None
) -> dict[str, Any]:
    """One call answered from its recorded outcome, as the replay backend answers it."""
    if recorded is None:
        return {"status": "unavailable", "answer": None, "logprob": None, "cost_usd": 0.0, "billed_known": True,
                "tokens_in": None, "tokens_out": None}  # fmt: skip
    answer, cost, logprob, tokens_in, tokens_out = recorded
    usable = (answer is None and labels is None) or (answer is not None and (labels is None or answer in labels))
    return {
        "status": Status.OK if usable else Status.NOT_ANSWER,
        "answer": answer if usable else None,
        "logprob": logprob if usable and logprob is not None and logprob == logprob else None,
        "cost_usd": float(cost),
        "billed_known": True,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
    }


def results_of(answers: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
    """RESULT_SCHEMA rows: each query's kept answer, every LLM it called (call order) and what it was charged."""
    called = (
        observations.with_row_index("_seq")
        .sort("round", "_seq")
        .group_by("query_id", maintain_order=True)
        .agg(
            pl.col("model").filter(pl.col("status") == Status.OK).alias("models_called"),
            pl.col("cost_usd").sum(),
            (pl.col("status") == Status.OK).any().alias("_answered"),
        )
    )
    return (
        answers.join(called, on="query_id", how="left")
        .with_columns(
            pl.col("models_called").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.col("cost_usd").fill_null(0.0),
            pl.when(pl.col("_answered").fill_null(False))
            .then(pl.lit("done"))
            .otherwise(pl.lit("deferred"))
            .alias("status"),
            pl.when(pl.col("_answered").fill_null(False))
            .then(pl.lit(None, dtype=pl.String))
            .otherwise(pl.lit("no call answered"))
            .alias("error"),
            pl.lit(None, dtype=pl.String).alias("note"),
        )
        .select(list(RESULT_SCHEMA.names()))
        .cast(dict(RESULT_SCHEMA))  # type: ignore[arg-type]
    )
