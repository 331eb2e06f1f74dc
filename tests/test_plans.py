"""Votes, cascades and agreement cascades: replay semantics checked by hand and against exact enumeration
of answer tuples under known confusion matrices; candidate cost formulas; the per-label error bound."""

from __future__ import annotations

import itertools
from pathlib import Path
from unittest.mock import patch

import numpy as np
import polars as pl
import pytest

from batchplan.app.report import Truth, score_results
from batchplan.core.contracts import HISTORY_QUERIES_SCHEMA, MODELS_SCHEMA, OUTCOMES_SCHEMA, ContractError
from batchplan.core.history import History
from batchplan.core.numerics import logit, sigmoid
from batchplan.core.storage import Storage
from batchplan.dispatchers import dispatch, get_backend
from batchplan.optimizer import InfeasibleError
from batchplan.plans import candidates as candidates_module
from batchplan.plans.candidates import P90_Z, Candidates, build_candidates
from batchplan.plans.estimates import Template, choose_calibration, estimate
from batchplan.plans.planning import PlanRequest, budget_share, offer_templates, plan_batch
from batchplan.plans.simulation import PlanSpec, error_by_label, recorded_by_task, simulate
from batchplan.plans.templates import PlanTemplates, fit_plan_templates, upper_hull
from batchplan.predictors import train_predictor

LABELS = ["A", "B", "C"]


def history_from(
    answers: dict[str, list[str | None]],
    gold: list[str],
    *,
    logprob: dict[str, list[float]] | None = None,
    cost: dict[str, float] | None = None,
    split: list[str] | None = None,
    task: str = "t",
) -> History:
    n = len(gold)
    ids = [f"q{i:06d}" for i in range(n)]
    queries = pl.DataFrame(
        {
            "query_id": ids,
            "dataset": "synthetic",
            "task": task,
            "split": split or ["train"] * n,
            "subject": None,
            "system_prompt": None,
            "prompt": [f"question {i}" for i in range(n)],
            "labels": [LABELS] * n,
            "gold": gold,
        },
        schema=HISTORY_QUERIES_SCHEMA,
    )
    rows = []
    for model, given in answers.items():
        for i, a in enumerate(given):
            lp = logprob[model][i] if logprob and model in logprob else None
            rows.append((ids[i], model, a, a == gold[i], (cost or {}).get(model, 1.0), 10, 1, None, lp))
    outcomes = pl.DataFrame(rows, schema=OUTCOMES_SCHEMA, orient="row")
    prices = pl.DataFrame(
        {"model": list(answers), "usd_per_mtok_in": 1.0, "usd_per_mtok_out": 1.0}, schema=MODELS_SCHEMA
    )
    return History(queries, outcomes, prices)


# ------------------------------------------------------------------ replay semantics, by hand


def test_vote_majority_and_tie_breaks_by_hand() -> None:
    h = history_from(
        {"a": ["A", "A", "B", None], "b": ["A", "B", "C", "B"], "c": ["B", "B", "A", "C"]},
        gold=["A", "B", "A", "C"],
        logprob={"a": [0, 0, -0.1, 0], "b": [0, 0, -2.0, -1.0], "c": [0, 0, -0.5, -0.2]},
    )
    sim = simulate(PlanSpec("vote", ("a", "b", "c")), recorded_by_task(h)["t"])
    codes = {lab: i for i, lab in enumerate(LABELS)}
    # q0: A,A,B -> A; q1: A,B,B -> B; q2: all differ -> largest logprob (a: B); q3: a gave nothing, B vs C -> C (logprob -0.2 > -1.0)
    assert sim.answer.tolist() == [codes["A"], codes["B"], codes["B"], codes["C"]]
    assert sim.correct.tolist() == [True, True, False, True]
    assert sim.cost.tolist() == [3.0, 3.0, 3.0, 3.0]


def test_cascade_stops_on_confidence_by_hand() -> None:
    h = history_from(
        {"cheap": ["A", "B", None], "dear": ["B", "B", "C"]},
        gold=["A", "B", "C"],
        logprob={"cheap": [np.log(0.95), np.log(0.5), 0.0], "dear": [0.0, 0.0, 0.0]},
        cost={"cheap": 1.0, "dear": 10.0},
    )
    sim = simulate(PlanSpec("cascade", ("cheap", "dear"), (0.9,)), recorded_by_task(h)["t"])
    # q0: confident -> stop (A, right); q1: unsure -> dear (B); q2: no answer -> dear (C)
    assert sim.correct.tolist() == [True, True, True]
    assert sim.cost.tolist() == [1.0, 11.0, 11.0]
    assert sim.reached[:, 1].tolist() == [False, True, True]


def test_agreement_escalates_on_disagreement_by_hand() -> None:
    h = history_from(
        {"a": ["A", "A", "C", None], "b": ["A", "B", "C", "B"], "judge": ["C", "B", "A", None]},
        gold=["A", "B", "A", "B"],
        cost={"a": 1.0, "b": 2.0, "judge": 10.0},
    )
    sim = simulate(PlanSpec("agreement", ("a", "b", "judge")), recorded_by_task(h)["t"])
    # q0 agree (A); q1 disagree -> judge B; q2 agree on C (wrong, judge not asked); q3 judge gives nothing -> b's B
    assert sim.correct.tolist() == [True, True, False, True]
    assert sim.cost.tolist() == [3.0, 13.0, 3.0, 13.0]


# ------------------------------------------------------------------ simulation vs exact enumeration


def confusion(accuracy: float) -> np.ndarray:
    """P(answer | true label): right with ``accuracy``, wrong answers split 2:1 (not uniform, on purpose)."""
    m = np.zeros((3, 3))
    for y in range(3):
        wrong = [a for a in range(3) if a != y]
        m[y, y] = accuracy
        m[y, wrong[0]] = (1 - accuracy) * 2 / 3
        m[y, wrong[1]] = (1 - accuracy) / 3
    return m


def sample_history(
    confusions: dict[str, np.ndarray], n: int, seed: int, prior: np.ndarray, split_test: float = 0.0
) -> History:
    rng = np.random.default_rng(seed)
    gold = rng.choice(3, size=n, p=prior)
    answers = {m: [LABELS[rng.choice(3, p=c[y])] for y in gold] for m, c in confusions.items()}
    split = np.where(rng.random(n) < split_test, "test", "train").tolist()
    costs = {m: float(i + 1) ** 2 for i, m in enumerate(confusions)}
    return history_from(answers, [LABELS[y] for y in gold], cost=costs, split=split)


def exact_error(spec: PlanSpec, confusions: dict[str, np.ndarray], y: int) -> float:
    """P(plan wrong | true label y) by enumerating every answer tuple (members independent given y)."""
    wrong = 0.0
    for combo in itertools.product(range(3), repeat=len(spec.models)):
        p = np.prod([confusions[m][y, a] for m, a in zip(spec.models, combo, strict=True)])
        if spec.kind == "vote":
            counts = {a: combo.count(a) for a in combo}
            best = max(counts.values())
            answer = next(a for a in combo if counts[a] == best)  # ties: earlier member (logprobs unknown)
        else:  # agreement
            answer = combo[0] if combo[0] == combo[1] else combo[2]
        wrong += p * (answer != y)
    return wrong


@pytest.mark.parametrize("spec", [PlanSpec("vote", ("m1", "m2", "m3")), PlanSpec("agreement", ("m1", "m2", "m3"))])
def test_replayed_per_label_error_matches_enumeration(spec: PlanSpec) -> None:
    confusions = {"m1": confusion(0.7), "m2": confusion(0.6), "m3": confusion(0.85)}
    history = sample_history(confusions, 30_000, seed=1, prior=np.array([0.5, 0.3, 0.2]))
    rec = recorded_by_task(history)["t"]
    errors = error_by_label(simulate(spec, rec), rec)
    for y, label in enumerate(LABELS):
        expected = exact_error(spec, confusions, y)
        n_y = int((rec.gold == y).sum())
        tolerance = 4 * np.sqrt(expected * (1 - expected) / n_y)  # 4 standard errors
        assert errors[label] == pytest.approx(expected, abs=tolerance), (label, errors[label], expected)


def test_cascade_accuracy_and_cost_match_the_formula() -> None:
    rng = np.random.default_rng(3)
    n = 20_000
    gold = ["A"] * n
    cheap_right = rng.random(n) < 0.7
    # confident on 80% of its right answers and on 30% of its wrong ones
    confident = np.where(cheap_right, rng.random(n) < 0.8, rng.random(n) < 0.3)
    dear_right = rng.random(n) < 0.9
    h = history_from(
        {"cheap": ["A" if r else "B" for r in cheap_right], "dear": ["A" if r else "C" for r in dear_right]},
        gold,
        logprob={"cheap": np.where(confident, np.log(0.95), np.log(0.5)).tolist(), "dear": [0.0] * n},
        cost={"cheap": 1.0, "dear": 20.0},
    )
    sim = simulate(PlanSpec("cascade", ("cheap", "dear"), (0.9,)), recorded_by_task(h)["t"])
    p_stop = 0.7 * 0.8 + 0.3 * 0.3
    expected_accuracy = 0.7 * 0.8 + (1 - p_stop) * 0.9
    assert sim.correct.mean() == pytest.approx(expected_accuracy, abs=0.015)
    assert sim.cost.mean() == pytest.approx(1.0 + (1 - p_stop) * 20.0, abs=0.3)


# ------------------------------------------------------------------ candidates and hull


def two_queries(cost: list[float], cost_high: list[float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A queue of two queries of task "t" and predictions for models a, b, c (P(correct) 0.6, 0.7, 0.9)."""
    queue = pl.DataFrame({"query_id": ["q1", "q2"], "tenant": "x", "task": "t", "priority": 1.0})
    predictions = pl.DataFrame(
        {
            "query_id": ["q1"] * 3 + ["q2"] * 3,
            "model": ["a", "b", "c"] * 2,
            "p_correct": [0.6, 0.7, 0.9] * 2,
            "cost_usd": cost,
            "cost_high_usd": cost_high,
        }
    )
    return queue, predictions


def named_candidates(candidates: Candidates) -> pl.DataFrame:
    """Every candidate with its query id and its template's names: what a person reads."""
    return candidates.named(candidates.plans).join(
        candidates.queries.select("query", "query_id"), on="query", maintain_order="left"
    )


def reference_candidates(queue: pl.DataFrame, predictions: pl.DataFrame, templates: PlanTemplates) -> pl.DataFrame:
    """Candidates built the plain way, one query and one plan at a time (the formulas in candidates.py's
    docstring): what the array build must reproduce, row for row and in the same order."""
    offered = {(q, m): (p, c, h) for q, m, p, c, h in predictions.iter_rows()}
    rows = []
    for query, (query_id, task) in enumerate(queue.select("query_id", "task").iter_rows()):
        own = []
        for model in sorted(predictions["model"].unique()):
            if (query_id, model) in offered:
                p, c, h = offered[query_id, model]
                high = max(h or 0.0, c)
                own.append(("single", [model], c, p, high, ((high - c) / P90_Z) ** 2, None))
        for t in templates.templates:
            if t.task != task or any((query_id, m) not in offered for m in t.models):
                continue
            p, c, h = (np.array([offered[query_id, m][i] for m in t.models], dtype=float) for i in range(3))
            high = np.maximum(np.nan_to_num(h), c)
            accuracy, called = estimate(t, p[None, :])
            sd = (high - c) / P90_Z
            variance = float((called[0] * sd**2 + called[0] * (1 - called[0]) * c**2).sum())
            own.append((t.kind, t.models, float(called[0] @ c), float(accuracy[0]), float(high.sum()), variance,
                        t.thresholds or None))  # fmt: skip
        for kind, models, cost, accuracy, reserve, variance, thresholds in sorted(own, key=lambda r: (r[0], r[1])):
            rows.append((query, query_id, kind, models, cost, accuracy, reserve, variance, thresholds))
    schema = {"query": pl.Int64, "query_id": pl.String, "kind": pl.String, "models": pl.List(pl.String),
              "expected_cost_usd": pl.Float64, "expected_accuracy": pl.Float64, "reserve_cost_usd": pl.Float64,
              "cost_var": pl.Float64, "thresholds": pl.List(pl.Float64)}  # fmt: skip
    return pl.DataFrame(rows, schema=schema, orient="row").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("option")
    )


def test_array_candidates_equal_the_plain_ones() -> None:
    """Template ids instead of name lists change no option: same query, kind, members, cost, accuracy,
    reserve, variance and order, on a batch of two tasks where some pairs are not offered."""
    rng = np.random.default_rng(7)
    models = ["m1", "m2", "m3", "m4"]
    queue = pl.DataFrame(
        {"query_id": [f"q{i}" for i in range(12)], "tenant": "x", "task": ["t", "u", "v"] * 4, "priority": 1.0}
    )
    # q3 is not offered m2, q7 only m1
    offered = [(q, m) for q in queue["query_id"] for m in models]
    pairs = [(q, m) for q, m in offered if (q, m) != ("q3", "m2") and (q != "q7" or m == "m1")]
    predictions = pl.DataFrame(
        {
            "query_id": [q for q, _ in pairs],
            "model": [m for _, m in pairs],
            "p_correct": rng.uniform(0.3, 0.95, len(pairs)),
            "cost_usd": rng.uniform(0.5, 5.0, len(pairs)),
            "cost_high_usd": [None if i % 5 == 0 else float(x) for i, x in enumerate(rng.uniform(0.0, 9.0, len(pairs)))],
        }
    )
    templates = PlanTemplates(
        templates=[
            Template("t", "vote", ["m1", "m2", "m3"], [], [0.0, 1.0], [], 0.8, 5.0, 1_000, {}, n_labels=3),
            Template("t", "cascade", ["m1", "m4"], [0.7], [0.1, 0.9], [[0.2, 1.0, -0.5]], 0.7, 2.0, 500, {},
                     calibration="offset"),
            Template("t", "cascade", ["m1", "m4"], [0.9], [0.0, 1.0, 0.3], [[0.5, 0.5, 0.1]], 0.7, 2.0, 500, {}),
            Template("u", "agreement", ["m2", "m1", "m3"], [], [0.0, 1.0], [[1.0, 0.0], [0.3, -0.2]], 0.8, 5.0,
                     900, {}, n_labels=4),
            Template("u", "vote", ["m5", "m1", "m2"], [], [0.0, 1.0], [], 0.8, 5.0, 900, {}),  # m5 not offered
        ]
    )  # fmt: skip
    candidates = build_candidates(queue, predictions, templates)
    got = named_candidates(candidates).select(reference_candidates(queue, predictions, templates).columns)
    want = reference_candidates(queue, predictions, templates)
    # singles (48 pairs less q3's m2 and q7's three) + t's vote (not q3) and two cascades + u's agreement (not q7)
    assert got.height == want.height == 44 + 3 + 2 * 4 + 3
    for column in ("query", "query_id", "kind", "models", "option", "thresholds"):
        assert got[column].to_list() == want[column].to_list(), column
    for column in ("expected_cost_usd", "expected_accuracy", "reserve_cost_usd", "cost_var"):
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-12, err_msg=column)
    # a kind filter drops templates before they are built, numbering the options that remain densely
    votes = build_candidates(queue, predictions, templates, kinds=("single", "vote"))
    assert named_candidates(votes).select("query", "kind", "models").equals(
        want.filter(pl.col("kind").is_in(["single", "vote"])).select("query", "kind", "models")
    )
    assert votes.plans["option"].to_list() == list(range(votes.plans.height))
    # on big batches two threads fill the templates' rows: the same frame
    with patch.object(candidates_module, "PARALLEL_CANDIDATES", 1):
        threaded = build_candidates(queue, predictions, templates)
    assert threaded.plans.equals(candidates.plans)
    assert threaded.templates.equals(candidates.templates)
    # filled a block of queries at a time (here 3 of the 12): the same frame as in one block
    with patch.object(candidates_module, "CANDIDATE_BLOCK", 3):
        blocked = build_candidates(queue, predictions, templates)
    assert blocked.plans.equals(candidates.plans)


def _full_grid(n: int, models: list[str], seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A queue of ``n`` queries of one task and random predictions of every (query, LLM) pair, query by query."""
    rng = np.random.default_rng(seed)
    queue = pl.DataFrame({"query_id": [f"q{i:02d}" for i in range(n)], "tenant": "x", "task": "t", "priority": 1.0})
    pairs = [(q, m) for q in queue["query_id"] for m in models]
    predictions = pl.DataFrame(
        {
            "query_id": [q for q, _ in pairs],
            "model": [m for _, m in pairs],
            "p_correct": rng.uniform(0.3, 0.95, len(pairs)),
            "cost_usd": rng.uniform(0.5, 5.0, len(pairs)),
            "cost_high_usd": rng.uniform(5.0, 9.0, len(pairs)),
        }
    )
    return queue, predictions


def test_candidates_from_a_full_grid_equal_the_scattered_ones() -> None:
    """Predictions of every (query, LLM) pair query by query in name order (what ``pipeline.predict`` makes)
    are reshaped into the per-LLM matrices instead of scattered into them: the same candidates as the same
    predictions in another order (which take the scatter)."""
    models = ["m1", "m2", "m3"]
    queue, predictions = _full_grid(30, models, seed=5)
    templates = PlanTemplates(templates=[Template("t", "vote", models, [], [0.0, 1.0], [], 0.8, 5.0, 1_000, {}, n_labels=3)])
    grid = build_candidates(queue, predictions, templates)
    shuffled = build_candidates(queue, predictions.sample(fraction=1.0, shuffle=True, seed=1), templates)
    assert grid.plans.height == 30 * 4
    assert grid.plans.equals(shuffled.plans)


def test_plan_rows_equal_the_searched_and_joined_ones() -> None:
    """``plan_rows`` finds the chosen rows through an inverse of the (dense) option ids and skips the join
    when nothing is deferred: the same rows as a binary search and a left join, with deferrals (the join
    runs) or without, and over sparse ids (a candidate set thinned by ``keep``)."""
    from batchplan.optimizer import Problem, solve
    from batchplan.optimizer.constraints import Budget
    from batchplan.plans.planning import chosen_rows, fallbacks, plan_rows

    queue, predictions = _full_grid(40, ["m1", "m2", "m3", "m4"], seed=3)
    full = build_candidates(queue, predictions)
    thinned = full.keep(pl.col("option") % 3 != 1)  # option ids with gaps, still ascending
    for candidates, budget, deferrable in ((full, 1e9, False), (full, 30.0, True), (thinned, 60.0, True)):
        problem = Problem(candidates.options(), "max_value", [Budget(limit=budget)], deferrable=deferrable)
        solution = solve(problem)
        rows = np.searchsorted(candidates.plans["option"].to_numpy(), solution.chosen["option"].to_numpy())
        assert chosen_rows(candidates, solution).tolist() == rows.tolist()
        chosen = candidates.named(
            candidates.plans[rows].select("query", "template", "expected_cost_usd", "expected_accuracy", "reserve_cost_usd")
        ).with_columns(fallbacks(candidates, solution, rows))
        joined = candidates.queries.select("query", "query_id").join(chosen, on="query", how="left", maintain_order="left")
        plan = plan_rows(candidates, solution)
        assert plan.height == queue.height
        assert (plan["kind"] == "defer").any() == deferrable
        assert plan["query_id"].to_list() == joined["query_id"].to_list()
        assert plan.filter(pl.col("kind") != "defer").select("expected_cost_usd", "models", "fallback_models").equals(
            joined.drop_nulls("kind").select("expected_cost_usd", "models", "fallback_models")
        )


def test_candidate_cost_formulas() -> None:
    queue, predictions = two_queries([1.0, 2.0, 10.0, 1.5, 2.5, 12.0], [2.0, 3.0, 15.0, 2.0, 3.0, 20.0])
    identity = [0.0, 1.0]  # calibration that leaves the structural estimate as it is
    templates = PlanTemplates(
        templates=[
            Template("t", "vote", ["a", "b", "c"], [], identity, [], 0.8, 5.0, 10_000, {}, n_labels=3),
            # escalation: sigmoid(0) = 0.5 whatever the members say
            Template(
                "t",
                "agreement",
                ["a", "b", "c"],
                [],
                identity,
                [[1.0, 0.0], [0.0, 0.0]],
                0.8,
                5.0,
                10_000,
                {},
                n_labels=3,
            ),
        ]
    )
    candidates = build_candidates(queue, predictions, templates)
    rows = {(r["query_id"], r["kind"]): r for r in named_candidates(candidates).iter_rows(named=True)}
    assert rows[("q1", "vote")]["expected_cost_usd"] == pytest.approx(13.0)
    assert rows[("q1", "agreement")]["expected_cost_usd"] == pytest.approx(1.0 + 2.0 + 0.5 * 10.0)
    assert rows[("q2", "agreement")]["reserve_cost_usd"] == pytest.approx(25.0)  # the whole escalation path
    # vote of 0.6, 0.7, 0.9 with 3 labels: two or three right, or one right winning a three-way tie
    p1, p2, p3 = 0.6, 0.7, 0.9
    two_or_more = p1 * p2 + p1 * p3 + p2 * p3 - 2 * p1 * p2 * p3
    one = p1 * (1 - p2) * (1 - p3) + p2 * (1 - p1) * (1 - p3) + p3 * (1 - p1) * (1 - p2)
    expected_vote = two_or_more + one * 0.5 / 3  # the two wrong answers differ with chance 1 - 1/(3-1)
    assert rows[("q1", "vote")]["expected_accuracy"] == pytest.approx(
        expected_vote - np.sqrt(0.8 * 0.2 / 10_000), abs=1e-6
    )
    agreement = p1 * p2 + (1 - p1 * p2 - (1 - p1) * (1 - p2) * 0.5) * p3
    assert rows[("q1", "agreement")]["expected_accuracy"] == pytest.approx(
        agreement - np.sqrt(0.8 * 0.2 / 10_000), abs=1e-6
    )
    assert candidates.plans["option"].to_list() == list(range(candidates.plans.height))


def test_calibration_is_chosen_by_held_out_log_loss() -> None:
    rng = np.random.default_rng(4)
    p = rng.uniform(0.3, 0.95, size=(4_000, 2))  # a cascade's two members
    fold = np.arange(len(p)) % 2
    # the truth follows the members' logits with slopes far from the structural one: logistic wins
    y = (rng.random(len(p)) < sigmoid(0.2 + 2.0 * logit(p[:, 0]) - 1.0 * logit(p[:, 1]))).astype(float)
    assert choose_calibration("cascade", p, 4, y, fold) == "logistic"
    # the truth is the best member shifted by a constant: the one-number offset is enough
    y = (rng.random(len(p)) < sigmoid(logit(p.max(axis=1)) + 0.3)).astype(float)
    assert choose_calibration("cascade", p[:1000], 4, y[:1000], fold[:1000]) == "offset"


def _validated(offered: list[float]) -> PlanTemplates:
    grid = (0.1, 0.2, 0.3, 0.5, 1.0)
    return PlanTemplates(
        validation={"t": {"gain_by_budget": {str(f): 0.01 if f in offered else -0.01 for f in grid},
                          "offered_budgets": offered}}
    )  # fmt: skip


def test_templates_are_offered_only_between_validated_budgets() -> None:
    templates = _validated([0.1, 0.2])
    assert templates.offered("t", 0.15)
    assert templates.offered("t", 0.05)  # below the grid: its first point decides
    assert not templates.offered("t", 0.25)  # 0.3 did not pass
    assert not templates.offered("t", 3.0)  # beyond the grid: its last point decides
    assert templates.offered("t", None)  # no budget (minimum cost for a target): no reason to withhold
    assert templates.offered("other task", 0.25)  # fitted without validation


def test_budget_share_and_withheld_templates() -> None:
    queue, predictions = two_queries([1.0, 2.0, 10.0, 1.0, 2.0, 30.0], [2.0, 3.0, 15.0, 2.0, 3.0, 40.0])
    vote = Template("t", "vote", ["a", "b", "c"], [], [0.0, 1.0], [], 0.8, 5.0, 10_000, {}, n_labels=3)
    templates = _validated([0.1, 0.2])
    templates.templates = [vote]
    candidates = build_candidates(queue, predictions, templates)
    assert budget_share(candidates, 8.0) == pytest.approx(0.2)  # best single model: c, 40 for both
    kept, none_withheld = offer_templates(candidates, templates, 6.0)
    assert set(named_candidates(kept)["kind"]) == {"single", "vote"}
    assert none_withheld == []
    withheld, tasks = offer_templates(candidates, templates, 12.0)
    assert set(named_candidates(withheld)["kind"]) == {"single"}
    assert tasks == ["t"]
    assert withheld.plans.columns == candidates.plans.columns


def test_upper_hull() -> None:
    costs = np.array([1.0, 2.0, 3.0, 2.0, 4.0])
    accs = np.array([0.5, 0.7, 0.75, 0.6, 0.9])
    hull_c, hull_a = upper_hull(costs, accs)
    assert hull_c.tolist() == [1.0, 2.0, 4.0]
    assert hull_a.tolist() == [0.5, 0.7, 0.9]


# ------------------------------------------------------------------ the per-label error bound, end to end


@pytest.fixture(scope="module")
def known_confusions() -> tuple[History, PlanTemplates]:
    # m3 is much worse on true label C: only plans that outvote it can meet a tight bound on C.
    c3 = confusion(0.9)
    c3[2] = [0.25, 0.25, 0.5]
    confusions = {"m1": confusion(0.75), "m2": confusion(0.7), "m3": c3, "m4": confusion(0.8)}
    history = sample_history(confusions, 3_000, seed=5, prior=np.array([0.4, 0.3, 0.3]), split_test=0.3)
    templates = fit_plan_templates(
        history.split("train"), lambda h: train_predictor(h, name="prior"), max_per_task=12, slack=1.0
    )
    return history, templates


def _replay(history: History, plan: pl.DataFrame, tmp_path: Path) -> pl.DataFrame:
    queue = history.as_queue("test")
    results = dispatch(
        plan.filter(pl.col("kind") != "defer"),
        queue,
        get_backend("replay", history=history),
        budget_usd=1e9,
        out_uri=str(tmp_path / "run"),
        storage=Storage(),
    )
    return score_results(results, Truth.from_history(history)).join(
        history.queries.select("query_id", "gold"), on="query_id"
    )


def _candidates(history: History, templates: PlanTemplates, queue: pl.DataFrame) -> Candidates:
    """Candidates for ``queue`` over the (query, model) pairs ``history`` recorded, as a replay backend offers."""
    predictor = train_predictor(history.split("train"), name="prior")
    predictions = predictor.predict(
        queue, history.outcomes.join(queue.select("query_id"), on="query_id").select("query_id", "model"), None
    )
    return build_candidates(queue, predictions, templates)


def _plan(history: History, templates: PlanTemplates, request: PlanRequest) -> pl.DataFrame:
    return plan_batch(_candidates(history, templates, history.as_queue("test")), request, templates).plan


@pytest.mark.parametrize("mode", ["per_query", "aggregate"])
def test_per_label_error_bound_is_met(
    known_confusions: tuple[History, PlanTemplates], mode: str, tmp_path: Path
) -> None:
    history, templates = known_confusions
    alpha = 0.15  # binds: only plans that outvote m3 meet it on C
    plan = _plan(history, templates, PlanRequest(budget_usd=1e9, label_error_max={"*": alpha}, label_error_mode=mode))
    scored = _replay(history, plan, tmp_path)
    for label in LABELS:
        rows = scored.filter(pl.col("gold") == label)
        error = 1 - rows["correct"].mean()
        tolerance = 3 * np.sqrt(alpha * (1 - alpha) / rows.height)
        assert error <= alpha + tolerance, (mode, label, error)
    if mode == "per_query":
        # without the bound the most accurate plan leans on m3, which errs on C half the time
        unbounded = _replay(history, _plan(history, templates, PlanRequest(budget_usd=1e9)), tmp_path / "free")
        assert (
            unbounded.filter(pl.col("gold") == "C")["correct"].mean()
            < scored.filter(pl.col("gold") == "C")["correct"].mean()
        )


def test_an_unreachable_error_bound_names_the_task(known_confusions: tuple[History, PlanTemplates]) -> None:
    history, templates = known_confusions
    with pytest.raises(InfeasibleError, match="no plan meeting the per-label error bound") as raised:
        _plan(history, templates, PlanRequest(budget_usd=1e9, label_error_max={"t": 0.01}))
    assert raised.value.constraint == "label_error_max"
    assert "t" in raised.value.suggestion


def test_a_constraint_naming_what_the_batch_lacks_is_refused_with_the_known_names(
    known_confusions: tuple[History, PlanTemplates],
) -> None:
    history, templates = known_confusions
    typos = PlanRequest(
        budget_usd=1e6,
        tenant_budgets_usd={"synthetik": 1.0},
        model_max_calls={"m9": 10},
        task_accuracy_floors={"tt": 0.5},
        allowed_models={"synthetic": ["m1", "m7"]},
        label_error_max={"T": 0.2},
    )
    with pytest.raises(ContractError) as raised:
        _plan(history, templates, typos)
    message = str(raised.value)
    assert "\n" not in message
    for expected in (
        "tenant budget: tenant 'synthetik' is not in this batch (tenants, closest first: 'synthetic')",
        "max calls: model 'm9' is not in this batch (models, closest first: 'm1', 'm2', 'm3', 'm4')",
        "task floor: task 'tt' is not in this batch (tasks, closest first: 't')",
        "allowed models of 'synthetic': model 'm7' is not in this batch",
        "label error bound: task 'T' is not in this batch",
        "--allow-unused-constraints",
    ):
        assert expected in message, message
    # a nightly config may name idle tenants: with the opt-in it plans, and says what bound nothing
    idle = PlanRequest(budget_usd=1e6, tenant_budgets_usd={"acme": 1.0}, allow_unused_constraints=True)
    queue = history.as_queue("test")
    outcome = plan_batch(_candidates(history, templates, queue), idle, templates)
    assert outcome.plan.height == queue.height
    assert outcome.unused_constraints == ["tenant budget: tenant 'acme' is not in this batch"]
    assert outcome.diagnostics["unused_constraints"] == outcome.unused_constraints


def test_queries_no_offered_model_can_answer_fail_with_the_reason_and_the_rest_run(
    known_confusions: tuple[History, PlanTemplates], tmp_path: Path
) -> None:
    from batchplan.app.pipeline import Execution, execute

    history, templates = known_confusions
    queue = history.as_queue("test")
    lost = queue["query_id"].head(3)
    # a replay history with no outcome for three of the queued queries
    replay = History(
        history.queries, history.outcomes.filter(~pl.col("query_id").is_in(lost.implode())), history.prices
    )
    outcome = plan_batch(_candidates(replay, templates, queue), PlanRequest(budget_usd=1e6), templates)
    assert outcome.plan["query_id"].to_list() == queue["query_id"].to_list()  # queue order, every query
    assert outcome.plan.filter(pl.col("query_id").is_in(lost.implode()))["kind"].to_list() == ["unanswerable"] * 3
    results = execute(
        outcome.plan,
        queue,
        get_backend("replay", history=replay),
        Execution(budget_usd=1e6, out_uri=str(tmp_path / "run"), storage=Storage()),
    )
    failed = results.filter(pl.col("status") == "failed")
    assert sorted(failed["query_id"].to_list()) == sorted(lost.to_list())
    assert set(failed["error"].to_list()) == {
        "no LLM the backend offers can answer this query: the replay history has no outcome for it"
    }
    assert (results.filter(~pl.col("query_id").is_in(lost.implode()))["status"] == "done").all()
    unknown = queue.with_columns(pl.format("new-{}", "query_id").alias("query_id"))  # none has an outcome
    with pytest.raises(ContractError, match=r"none of the \d+ queries can be answered"):
        plan_batch(_candidates(history, templates, unknown), PlanRequest(budget_usd=1e6), templates)


def test_rounds_refuse_what_only_the_single_shot_plan_holds() -> None:
    from batchplan.plans.planning import check_rounds_request

    flags = {"model_max_calls": "--max-calls", "rounds": "--rounds", "round_planner": "--round-planner"}
    check_rounds_request(PlanRequest(budget_usd=1.0, tenant_budgets_usd={"a": 0.5}, allowed_models={"a": ["m1"]}))
    # the posterior planner re-plans under capacities and floors; the plan continuation holds the floors
    held = PlanRequest(budget_usd=1.0, model_max_calls={"m1": 3}, task_accuracy_floors={"t": 0.5})
    check_rounds_request(held, "posterior")
    check_rounds_request(PlanRequest(budget_usd=1.0, task_accuracy_floors={"t": 0.5}), "plan")
    with pytest.raises(ContractError) as refused:
        check_rounds_request(held, "plan")
    assert refused.value.worded(flags) == (
        "--max-calls cannot be held by a multi-round run with --round-planner plan: use --round-planner posterior, "
        "set --rounds 1 (the single-shot plan holds it), or drop it"
    )
    with pytest.raises(ContractError) as refused:
        check_rounds_request(PlanRequest(budget_usd=1.0, label_error_max={"*": 0.2}), "posterior")
    assert refused.value.worded(flags).startswith(
        "label_error_max cannot be held by a multi-round run with --round-planner posterior: set --rounds 1"
    )


def test_round_planners_see_only_the_llms_a_tenant_may_use() -> None:
    from batchplan.plans.planning import allowed_predictions

    queue = pl.DataFrame({"query_id": ["q1", "q2"], "tenant": ["eu", "us"]})
    predictions = pl.DataFrame(
        {"query_id": ["q1", "q1", "q2", "q2"], "model": ["m1", "m2", "m1", "m2"], "p_correct": [0.5] * 4}
    )
    kept = allowed_predictions(predictions, queue, {"eu": ["m2"]})
    assert kept.columns == predictions.columns
    assert sorted(kept.select("query_id", "model").iter_rows()) == [("q1", "m2"), ("q2", "m1"), ("q2", "m2")]
    assert allowed_predictions(predictions, queue, {}) is predictions
