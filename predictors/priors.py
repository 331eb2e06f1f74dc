"""Per-(model, task) accuracy priors, answer confusions, and the descriptor-nearest known models that a
model without history borrows from (cold start)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

NO_ANSWER = "<none>"


@dataclass
class Priors:
    """Smoothed accuracy per (model, task) (toward the model's), per model (toward the global mean) and per
    task, from a training history."""

    model_task: pl.DataFrame  # model, task, n, acc
    model: pl.DataFrame  # model, n, acc
    task: pl.DataFrame  # task, n, acc
    global_acc: float
    strength: float = 20.0  # pseudo-count pulling a cell toward its model's mean

    @classmethod
    def fit(cls, rows: pl.DataFrame, strength: float = 20.0) -> Priors:
        """``rows``: model, task, correct (one row per outcome), optionally ``weight`` (a silver outcome
        counts less than a gold one in each accuracy; ``n`` stays the number of rows)."""
        if "weight" not in rows.columns:
            rows = rows.with_columns(pl.lit(1.0).alias("weight"))
        y = pl.col("correct").cast(pl.Float64) * pl.col("weight")
        w = pl.col("weight").sum().alias("w")
        total = float(rows["weight"].sum())
        global_acc = float(rows.select(y.sum()).item() / total) if total > 0 else 0.5
        model = (
            rows.group_by("model")
            .agg(pl.len().alias("n"), w, y.sum().alias("k"))
            .with_columns(((pl.col("k") + strength * global_acc) / (pl.col("w") + strength)).alias("acc"))
            .select("model", "n", "acc")
            .sort("model")
        )
        task = rows.group_by("task").agg(pl.len().alias("n"), (y.sum() / w).alias("acc")).sort("task")
        model_task = (
            rows.group_by("model", "task")
            .agg(pl.len().alias("n"), w, y.sum().alias("k"))
            .join(model.select("model", pl.col("acc").alias("m_acc")), on="model")
            .with_columns(((pl.col("k") + strength * pl.col("m_acc")) / (pl.col("w") + strength)).alias("acc"))
            .select("model", "task", "n", "acc")
            .sort("model", "task")
        )
        return cls(model_task=model_task, model=model, task=task, global_acc=global_acc, strength=strength)

    def to_state(self) -> dict[str, Any]:
        return {
            "model_task": self.model_task.to_dicts(),
            "model": self.model.to_dicts(),
            "task": self.task.to_dicts(),
            "global_acc": self.global_acc,
            "strength": self.strength,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Priors:
        def frame(rows: list[dict[str, Any]], schema: dict[str, Any]) -> pl.DataFrame:
            return pl.DataFrame(rows, schema=schema)

        return cls(
            model_task=frame(
                state["model_task"], {"model": pl.String, "task": pl.String, "n": pl.UInt32, "acc": pl.Float64}
            ),
            model=frame(state["model"], {"model": pl.String, "n": pl.UInt32, "acc": pl.Float64}),
            task=frame(state["task"], {"task": pl.String, "n": pl.UInt32, "acc": pl.Float64}),
            global_acc=state["global_acc"],
            strength=state["strength"],
        )

    def lookup(self, pairs: pl.DataFrame, neighbors: dict[str, list[tuple[str, float]]]) -> np.ndarray:
        """Prior accuracy for each (model, task) row of ``pairs``; unknown models borrow from ``neighbors``
        (weighted known models), unknown tasks fall back to the model's mean, then the global mean."""
        known = pairs.select("model", "task").join(
            self.model_task.select("model", "task", "acc"), on=["model", "task"], how="left", maintain_order="left"
        )
        known = known.join(
            self.model.select("model", pl.col("acc").alias("m_acc")), on="model", how="left", maintain_order="left"
        )
        known = known.join(
            self.task.select("task", pl.col("acc").alias("t_acc")), on="task", how="left", maintain_order="left"
        )
        out = known.select(pl.coalesce("acc", "m_acc")).to_series().to_numpy().astype(np.float64)
        missing = np.isnan(out)
        if missing.any():
            sub = known.with_row_index("_i").filter(pl.Series(missing))
            cell = {(r["model"], r["task"]): r["acc"] for r in self.model_task.iter_rows(named=True)}
            model_acc = dict(zip(self.model["model"].to_list(), self.model["acc"].to_list(), strict=True))
            cache: dict[tuple[str, str], float] = {}
            for i, model, task, t_acc in zip(sub["_i"], sub["model"], sub["task"], sub["t_acc"], strict=True):
                key = (model, task)
                if key not in cache:
                    num = den = 0.0
                    for other, w in neighbors.get(model, []):
                        value = cell.get((other, task), model_acc.get(other) if t_acc is None else None)
                        if value is not None:
                            num += w * value
                            den += w
                    cache[key] = num / den if den > 0 else (t_acc if t_acc is not None else self.global_acc)
                out[i] = cache[key]
        return out


def nearest_models(
    descriptors: pl.DataFrame, known: list[str], targets: list[str], k: int = 3
) -> dict[str, list[tuple[str, float]]]:
    """For each target model, the ``k`` known models closest in (log price, log cost per char, log size,
    family), with weights 1/(distance + 0.25) normalized to sum 1."""
    rows = {r["model"]: r for r in descriptors.iter_rows(named=True)}
    numeric = ("log_price_in", "log_price_out", "log_cost_per_kchar", "log_size_b")
    out: dict[str, list[tuple[str, float]]] = {}
    for target in targets:
        t = rows.get(target)
        if t is None:
            out[target] = [(m, 1.0 / len(known)) for m in known] if known else []
            continue
        scored = []
        for model in known:
            r = rows.get(model)
            if r is None or model == target:
                continue
            diffs = [abs(t[c] - r[c]) for c in numeric if _finite(t[c]) and _finite(r[c])]
            dist = (sum(diffs) / len(diffs)) if diffs else 1.0
            dist += 0.0 if t["family"] == r["family"] else 0.5
            scored.append((dist, model))
        scored.sort()
        top = scored[:k]
        weights = [1.0 / (d + 0.25) for d, _ in top]
        total = sum(weights) or 1.0
        out[target] = [(m, w / total) for (_, m), w in zip(top, weights, strict=True)]
    return out


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, float) and math.isfinite(x)


def fit_confusions(rows: pl.DataFrame, alpha: float = 0.5) -> pl.DataFrame:
    """P(answer | gold) per (task, model) for label tasks, Dirichlet-smoothed over the labels seen for the
    task plus NO_ANSWER (unparseable). ``rows``: task, model, gold, answer."""
    labeled = rows.filter(pl.col("gold").is_not_null()).with_columns(pl.col("answer").fill_null(NO_ANSWER))
    if labeled.height == 0:
        return pl.DataFrame(
            schema={"task": pl.String, "model": pl.String, "gold": pl.String, "answer": pl.String, "p": pl.Float64}
        )
    answers = (
        pl.concat([labeled.select("task", pl.col("gold").alias("answer")), labeled.select("task", "answer")])
        .unique()
        .vstack(labeled.select("task").unique().with_columns(pl.lit(NO_ANSWER).alias("answer")))
        .unique()
    )
    cells = labeled.select("task", "model", "gold").unique().join(answers, on="task")
    counts = labeled.group_by("task", "model", "gold", "answer").len("n")
    return (
        cells.join(counts, on=["task", "model", "gold", "answer"], how="left")
        .with_columns(pl.col("n").fill_null(0).cast(pl.Float64) + alpha)
        .with_columns((pl.col("n") / pl.col("n").sum().over("task", "model", "gold")).alias("p"))
        .select("task", "model", "gold", "answer", "p")
        .sort("task", "model", "gold", "answer")
    )
