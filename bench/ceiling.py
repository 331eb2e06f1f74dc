"""Hindsight ceilings of run-time cascades: what uniform and per-task 2- and 3-stage cascades reach on a test
split when their LLMs and thresholds are chosen WITH the test queries' gold.

**These are unreachable upper bounds, not results.** A gold-free method (templates fitted on the history, the
round planner) must pick its thresholds without the batch's labels; the table says how far the run-time
signals themselves (an LLM's logprob, agreement between two answers) can carry a cascade at each budget, so a
result below the bar that is also near its ceiling is the data's limit, not the planner's.

Plans, each replayed exactly on the recorded outcomes of the test split:

- ``single``: one LLM for every query;
- ``2-stage``: LLM a for every query, LLM b where a's logprob is below a threshold (b's answer kept);
- ``3-stage``: then LLM c where b's logprob is below a second threshold (c's answer kept);
- ``vote``: a -> b as above, then a third opinion c where a's and b's answers differ (after ``normalize``:
  open answers agree only when their text does) and b's logprob is below a second threshold; the answer two
  of the three share is kept, else b's.

``uniform``: one plan (LLMs and thresholds) for the whole test split; ``per task``: each task its own plan,
the budget split among tasks at best (the frontiers merged). Thresholds: quantiles of the logprobs (a grid of
``GRID`` for the first, ``GRID3`` for the second). Budgets are shares of the best single model's recorded cost
on the test queries (``demo.best_single_cost``, as in bench/quality.py).

    uv run --no-sync python -m bench.ceiling [--datasets cascades_open] [--fractions 0.1,0.2,0.3,0.5,1.0]
        [--shifted]  # cascades with whole subjects held out (bench/quality.py's cascades_shifted)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from batchplan.app.demo import best_single_cost
from batchplan.core.history import History, load_history, with_holdout
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage
from batchplan.plans.posterior import normalize
from bench.quality import subject_holdout

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 1.0)
GRID = 41  # first-stage thresholds
GRID3 = 11  # second-stage thresholds of 3-stage plans and votes
KINDS = ("single", "2-stage", "3-stage", "vote")


@dataclass
class Joint:
    """The test queries' recorded outcomes, dense [n, M]: verdict, logprob, cost and answer id (equal = same)."""

    models: list[str]
    task: np.ndarray
    correct: np.ndarray
    logprob: np.ndarray
    cost: np.ndarray
    answer: np.ndarray

    def rows(self, mask: np.ndarray) -> Joint:
        return Joint(self.models, self.task[mask], self.correct[mask], self.logprob[mask], self.cost[mask],
                     self.answer[mask])  # fmt: skip


def joint(test: History) -> Joint:
    """Only queries every LLM answered a recorded row for (a replayed plan must find each call it makes)."""
    outcomes = test.outcomes.join(test.queries.select("query_id", "task"), on="query_id").with_columns(
        normalize(pl.col("answer")).rank("dense").over("query_id").fill_null(-1).cast(pl.Int64).alias("_code"),
        pl.col("logprob").fill_nan(None).fill_null(0.0),
    )
    models = sorted(outcomes["model"].unique().to_list())

    def pivot(column: str) -> pl.DataFrame:
        return outcomes.pivot(index=["query_id", "task"], on="model", values=column).sort("query_id").drop_nulls()

    frames = {c: pivot(c) for c in ("correct", "logprob", "cost_usd", "_code")}
    ids = set.intersection(*(set(f["query_id"].to_list()) for f in frames.values()))
    frames = {c: f.filter(pl.col("query_id").is_in(list(ids))) for c, f in frames.items()}
    dense = {c: f.select(models).to_numpy() for c, f in frames.items()}
    # a null answer (-1) never agrees with another: give each its own id
    answer = np.where(dense["_code"] < 0, -1 - np.arange(len(models))[None], dense["_code"])
    return Joint(models, frames["correct"]["task"].to_numpy().astype(str), dense["correct"].astype(float),
                 dense["logprob"].astype(float), dense["cost_usd"].astype(float), answer)  # fmt: skip


def _thresholds(logprob: np.ndarray, k: int) -> np.ndarray:
    return np.r_[np.quantile(logprob, np.linspace(0, 1, k)), np.inf]


def plans(j: Joint, kind: str) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """Every plan of ``kind`` on ``j``'s rows: (total costs [T], queries right [T], label) per LLM tuple."""
    m = range(len(j.models))
    c, k, lp, a = j.correct, j.cost, j.logprob, j.answer
    if kind == "single":
        for x in m:
            yield np.array([k[:, x].sum()]), np.array([c[:, x].sum()]), j.models[x]
        return
    for x, y in itertools.permutations(m, 2):
        # e1 [T1, n]: the queries the first threshold escalates to y
        e1 = lp[None, :, x] < _thresholds(lp[:, x], GRID)[:, None]
        base_cost = k[:, x].sum() + e1 @ k[:, y]
        if kind == "2-stage":
            yield base_cost, e1 @ c[:, y] + (~e1) @ c[:, x], f"{j.models[x]} > {j.models[y]}"
            continue
        for z in (z for z in m if z not in (x, y)):
            unsure = lp[None, :, y] < _thresholds(lp[:, y], GRID3)[:, None]  # [T2, n]
            if kind == "3-stage":
                final = c[:, z]
            else:
                unsure = unsure & (a[None, :, x] != a[None, :, y])
                final = np.where(a[:, z] == a[:, x], c[:, x], c[:, y])
            e2 = e1[:, None, :] & unsure[None]  # [T1, T2, n]
            cost = base_cost[:, None] + e2 @ k[:, z]
            right = (e1 @ c[:, y] + (~e1) @ c[:, x])[:, None] + e2 @ (final - c[:, y])
            sep = " > " if kind == "3-stage" else " > vote "
            yield cost.ravel(), right.ravel(), f"{j.models[x]} > {j.models[y]}{sep}{j.models[z]}"


def frontier(points: list[tuple[np.ndarray, np.ndarray, str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The (cost, right) Pareto frontier of every plan's points: cost ascending, right strictly rising."""
    cost = np.concatenate([p[0] for p in points])
    right = np.concatenate([p[1] for p in points])
    label = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(points)])
    order = np.lexsort((-right, cost))
    cost, right, label = cost[order], right[order], label[order]
    keep = right > np.maximum.accumulate(np.r_[-np.inf, right[:-1]])
    return cost[keep], right[keep], [points[i][2] for i in label[keep]]


def merged(fronts: list[tuple[np.ndarray, np.ndarray, list[str]]]) -> tuple[np.ndarray, np.ndarray]:
    """Per task frontiers merged: the best sum of right answers at each total cost (every task one plan)."""
    cost, right = np.zeros(1), np.zeros(1)
    for c, r, _ in fronts:
        both_c, both_r = (cost[:, None] + c[None]).ravel(), (right[:, None] + r[None]).ravel()
        cost, right, _ = frontier([(both_c, both_r, "")])
    return cost, right


def at_budget(cost: np.ndarray, right: np.ndarray, budget: float) -> tuple[float, int]:
    """The most queries right within ``budget`` and the index of that point (nan, -1: nothing fits)."""
    fits = np.flatnonzero(cost <= budget + 1e-12)
    return (float(right[fits[-1]]), int(fits[-1])) if len(fits) else (float("nan"), -1)


def ceilings(test: History, reference_cost: float, fractions: tuple[float, ...]) -> list[dict]:
    """One row per budget: per kind, the uniform and per-task hindsight accuracy (and the uniform plan)."""
    j = joint(test)
    n = len(j.task)
    tasks = sorted(set(j.task.tolist()))
    rows = [{"budget_pct": round(100 * f), "budget_usd": f * reference_cost, "queries": n} for f in fractions]
    for kind in KINDS:
        cost, right, labels = frontier(list(plans(j, kind)))
        per_task = merged([frontier(list(plans(j.rows(j.task == t), kind))) for t in tasks])
        for row in rows:
            best, at = at_budget(cost, right, row["budget_usd"])
            row[f"uniform_{kind}"] = best / n
            row[f"uniform_{kind}_plan"] = labels[at] if at >= 0 else ""
            row[f"per_task_{kind}"] = at_budget(*per_task, row["budget_usd"])[0] / n
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=get_settings().data_dir)
    parser.add_argument("--datasets", default="cascades_open")
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--shifted", action="store_true", help="cascades with whole subjects held out")
    args = parser.parse_args(argv)
    settings = get_settings()
    fractions = tuple(float(f) for f in args.fractions.split(","))
    for name in args.datasets.split(","):
        history = load_history(str(Path(args.data_dir) / name), Storage())
        if args.shifted:
            history, name = subject_holdout(history, seed=settings.seed), f"{name}_shifted"
        elif not (history.queries["split"] == "test").any():
            history = with_holdout(history, settings.holdout_fraction, settings.seed)
        test = history.split("test")
        reference_cost, reference = best_single_cost(history, history.as_queue("test"))
        rows = ceilings(test, reference_cost, fractions)
        print(f"{name}: HINDSIGHT CEILINGS (plans chosen with the test split's gold: unreachable upper bounds),")
        print(f"  accuracy % at a share of the best single model's cost ({reference}, ${reference_cost:.4f})")
        shares = [pl.col(f"{s}_{k}").mul(100).round(1).alias(f"{s} {k}") for k in KINDS for s in ("uniform", "per_task")]
        table = pl.DataFrame(rows).select("budget_pct", *shares)
        with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=250, tbl_hide_dataframe_shape=True):
            print(table)
        for row in rows:
            plans_ = "; ".join(f"{k}: {row[f'uniform_{k}_plan']}" for k in KINDS[1:])
            print(f"  uniform plans @ {row['budget_pct']}%: {plans_}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
