"""Expected and high-side (p90) cost of a call, per (query, model).

Where the serving catalog lists token prices: tokens_in = prompt characters x a chars->tokens ratio
calibrated per model on the history (1/4 when unknown), tokens_out = predicted (mean and p90), x prices.
Where it does not (routerbench has no models.csv): a per-(model, task) linear fit of billed cost on prompt
characters learned from the history, its p90 from the residual ratios. A model with neither gets the
median known cost per character, flagged ``cost_source = "cold"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from batchplan.core.catalog import PriceCatalog

DEFAULT_CHARS_PER_TOKEN_RATIO = 0.25
COST_SOURCES = ("tokens", "billed", "billed_mean", "cold")
LABEL_TOKENS_OUT = (1.0, 1.0, 2.0)  # mean, p50, p90 for label tasks with no recorded usage
OPEN_TOKENS_OUT = (200.0, 150.0, 500.0)


def query_chars(queries: pl.DataFrame) -> pl.Series:
    return queries.select(
        (pl.col("prompt").fill_null("").str.len_chars() + pl.col("system_prompt").fill_null("").str.len_chars() + 1)
        .cast(pl.Float64)
        .alias("chars")
    ).to_series()


@dataclass
class CostModel:
    # tokens_in per prompt char, keyed "model\ttask" and "model\t*" (any task)
    token_ratio: dict[str, float] = field(default_factory=dict)
    token_ratio_p90: dict[str, float] = field(default_factory=dict)  # p90 / median of the per-row ratio
    global_ratio: float = DEFAULT_CHARS_PER_TOKEN_RATIO
    tokens_out: list[dict[str, Any]] = field(default_factory=list)  # model, task, mean, p50, p90
    billed: list[dict[str, Any]] = field(default_factory=list)  # model, task, a, b, high_ratio, n
    cost_per_kchar: dict[str, float] = field(default_factory=dict)
    # billed / list-price estimate, median per "model\ttask": corrects tokenizer and price-sheet mismatches
    # (e.g. one model name priced differently by two sources); 1 where unknown
    price_factor: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, queries: pl.DataFrame, outcomes: pl.DataFrame, prices: pl.DataFrame | None = None) -> CostModel:
        q = queries.select("query_id", pl.col("task").fill_null("default"), query_chars(queries))
        rows = outcomes.join(q, on="query_id", how="inner")
        known_in = rows.filter(pl.col("tokens_in").is_not_null() & (pl.col("tokens_in") > 0))
        ratio = known_in.with_columns((pl.col("tokens_in") / pl.col("chars")).alias("r"))
        per_model = ratio.group_by("model", "task").agg(
            pl.col("r").median().alias("median"), (pl.col("r").quantile(0.9) / pl.col("r").median()).alias("p90")
        )
        per_model = pl.concat(
            [
                per_model,
                ratio.group_by("model").agg(
                    pl.lit("*").alias("task"),
                    pl.col("r").median().alias("median"),
                    (pl.col("r").quantile(0.9) / pl.col("r").median()).alias("p90"),
                ),
            ]
        ).with_columns(pl.concat_str("model", "task", separator="\t").alias("key"))
        global_ratio = float(ratio["r"].median()) if ratio.height else DEFAULT_CHARS_PER_TOKEN_RATIO  # type: ignore[arg-type]
        tokens_out = (
            rows.filter(pl.col("tokens_out").is_not_null())
            .group_by("model", "task")
            .agg(
                pl.col("tokens_out").mean().alias("mean"),
                pl.col("tokens_out").quantile(0.5).alias("p50"),
                pl.col("tokens_out").quantile(0.9).alias("p90"),
            )
            .sort("model", "task")
        )
        billed = []
        for (model, task), group in rows.filter(pl.col("cost_usd").is_not_null()).group_by("model", "task"):
            x = group["chars"].to_numpy()
            y = group["cost_usd"].to_numpy()
            a, b = _nonneg_line(x, y)
            pred = np.maximum(a + b * x, 1e-12)
            billed.append(
                {
                    "model": model,
                    "task": task,
                    "a": a,
                    "b": b,
                    "high_ratio": float(np.quantile(y / pred, 0.9)),
                    "n": len(y),
                }
            )
        per_kchar = rows.group_by("model").agg((pl.col("cost_usd").sum() / pl.col("chars").sum() * 1000).alias("c"))
        model = cls(
            token_ratio=dict(zip(per_model["key"].to_list(), per_model["median"].to_list(), strict=True)),
            token_ratio_p90=dict(zip(per_model["key"].to_list(), per_model["p90"].to_list(), strict=True)),
            global_ratio=global_ratio,
            tokens_out=tokens_out.to_dicts(),
            billed=sorted(billed, key=lambda r: (r["model"], r["task"])),
            cost_per_kchar=dict(zip(per_kchar["model"].to_list(), per_kchar["c"].to_list(), strict=True)),
        )
        if prices is not None and prices.height:
            model.price_factor = model._fit_price_factor(rows, prices)
        return model

    def _fit_price_factor(self, rows: pl.DataFrame, prices: pl.DataFrame) -> dict[str, float]:
        catalog = PriceCatalog(
            prices=prices, billed=pl.DataFrame(schema={"model": pl.String, "mean_cost_usd": pl.Float64})
        )
        priced = rows.filter(pl.col("cost_usd").is_not_null() & (pl.col("cost_usd") > 0))
        if priced.height == 0:
            return {}
        est = self.predict(priced.select("model", "task", "chars", pl.lit(True).alias("has_labels")), catalog)
        ratios = (
            priced.select("model", "task", "cost_usd")
            .with_columns(est["cost_usd"].alias("est"), est["cost_source"].cast(pl.String).alias("src"))
            .filter((pl.col("src") == "tokens") & (pl.col("est") > 0))
            .group_by("model", "task")
            .agg((pl.col("cost_usd") / pl.col("est")).median().clip(0.2, 5.0).alias("f"))
            .sort("model", "task")
        )
        return {f"{m}\t{t}": float(f) for m, t, f in ratios.iter_rows()}

    def to_state(self) -> dict[str, Any]:
        return {
            "token_ratio": self.token_ratio,
            "token_ratio_p90": self.token_ratio_p90,
            "global_ratio": self.global_ratio,
            "tokens_out": self.tokens_out,
            "billed": self.billed,
            "cost_per_kchar": self.cost_per_kchar,
            "price_factor": self.price_factor,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CostModel:
        return cls(**state)

    def predict(self, pairs: pl.DataFrame, catalog: PriceCatalog) -> pl.DataFrame:
        """``pairs``: model, task, chars, has_labels (one row per pair, in order). Returns cost_usd,
        cost_high_usd, tokens_in, tokens_out, tokens_out_p90, cost_source, aligned with ``pairs``."""
        models = sorted(pairs["model"].unique().to_list())
        tasks = sorted(pairs["task"].unique().to_list())
        mi = pairs.select(pl.col("model").rank("dense") - 1).to_series().to_numpy()
        ti = pairs.select(pl.col("task").rank("dense") - 1).to_series().to_numpy()
        return self.predict_coded(
            models, tasks, mi, ti, pairs["chars"].to_numpy(), pairs["has_labels"].to_numpy(), catalog
        )

    def predict_coded(
        self,
        models: list[str],
        tasks: list[str],
        mi: np.ndarray,
        ti: np.ndarray,
        chars: np.ndarray,
        has_labels: np.ndarray,
        catalog: PriceCatalog,
        tokens_out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> pl.DataFrame:
        """As ``predict``, with pairs given as codes into ``models`` and ``tasks``. Every path is linear in
        the prompt length, so coefficients are computed once per distinct (model, task, has_labels)."""
        # dense table over every (model, task, has_labels): index = (model * T + task) * 2 + has_labels
        n_t = len(tasks)
        code = (np.asarray(mi, dtype=np.int64) * n_t + np.asarray(ti, dtype=np.int64)) * 2 + has_labels.astype(np.int64)
        combos = pl.DataFrame(
            {
                "model": [m for m in models for _ in range(2 * n_t)],
                "task": [t for _ in models for t in tasks for _ in range(2)],
                "has_labels": [bool(h) for _ in models for _ in tasks for h in range(2)],
            },
            schema={"model": pl.String, "task": pl.String, "has_labels": pl.Boolean},
        )
        coef = self.coefficients(combos, catalog)

        def col(name: str) -> np.ndarray:
            return coef[name].to_numpy()[code]

        out_mean, out_p90 = (col("tokens_out"), col("tokens_out_p90")) if tokens_out is None else tokens_out
        out_p90 = np.maximum(out_p90, out_mean)
        price_out = col("price_out")
        # a + b x chars + price_out x tokens, evaluated in place (same operations, fewer per-pair temporaries)
        cost = col("b")
        cost *= chars
        cost += col("a")
        cost += price_out * out_mean
        high = col("b_high")
        high *= chars
        high += col("a_high")
        price_out *= out_p90
        high += price_out
        np.maximum(high, cost, out=high)
        tokens_in = col("ratio")
        tokens_in *= chars
        return pl.DataFrame(
            {
                "cost_usd": cost,
                "cost_high_usd": high,
                "tokens_in": tokens_in,
                "tokens_out": out_mean,
                "tokens_out_p90": out_p90,
                "cost_source": coef["cost_source"].cast(pl.Enum(COST_SOURCES)).gather(code),
            },
            schema={
                "cost_usd": pl.Float64,
                "cost_high_usd": pl.Float64,
                "tokens_in": pl.Float64,
                "tokens_out": pl.Float64,
                "tokens_out_p90": pl.Float64,
                "cost_source": pl.Enum(COST_SOURCES),
            },
        )

    def coefficients(self, combos: pl.DataFrame, catalog: PriceCatalog) -> pl.DataFrame:
        """Per (model, task, has_labels): cost = a + b x chars + price_out x tokens_out, high = a_high +
        b_high x chars + price_out x tokens_out_p90 (price_out > 0 on the token path only), tokens_in =
        ratio x chars, tokens_out mean/p90 from the table, cost_source (tokens | billed | billed_mean | cold)."""
        f = combos.with_row_index("_i")
        for table, on in self._lookup_tables(catalog):
            f = f.join(table, on=on, how="left")
        f = f.sort("_i")
        default_mean = pl.when(pl.col("has_labels")).then(LABEL_TOKENS_OUT[0]).otherwise(OPEN_TOKENS_OUT[0])
        default_p90 = pl.when(pl.col("has_labels")).then(LABEL_TOKENS_OUT[2]).otherwise(OPEN_TOKENS_OUT[2])
        per_kchar = float(np.median(list(self.cost_per_kchar.values()))) if self.cost_per_kchar else 1e-3
        f = f.with_columns(
            pl.coalesce("ratio", "ratio_m", pl.lit(self.global_ratio)).alias("ratio"),
            pl.coalesce("mean", "mean_t", default_mean).alias("tokens_out"),
            pl.coalesce("p90", "p90_t", default_p90).alias("tokens_out_p90"),
            pl.coalesce("ratio_hi", "ratio_hi_m", pl.lit(1.1)).alias("ratio_hi"),
            pl.coalesce("a", "a_m").alias("a_fit"),
            pl.coalesce("b", "b_m").alias("b_fit"),
            pl.coalesce("high_ratio", "high_ratio_m", pl.lit(1.25)).alias("high_fit"),
        )
        has_price = pl.col("usd_per_mtok_in").is_not_null() & pl.col("usd_per_mtok_out").is_not_null()
        f = f.with_columns(
            pl.when(has_price)
            .then(pl.lit("tokens"))
            .when(pl.col("a_fit").is_not_null())
            .then(pl.lit("billed"))
            .when(pl.col("billed_mean").is_not_null())
            .then(pl.lit("billed_mean"))
            .otherwise(pl.lit("cold"))
            .alias("cost_source")
        )
        f = f.with_columns(
            (pl.col("usd_per_mtok_in") * pl.col("price_factor").fill_null(1.0)).alias("usd_per_mtok_in"),
            (pl.col("usd_per_mtok_out") * pl.col("price_factor").fill_null(1.0)).alias("usd_per_mtok_out"),
        )
        return _by_source(f, per_kchar)

    def _lookup_tables(self, catalog: PriceCatalog) -> list[tuple[pl.DataFrame, str | list[str]]]:
        """What ``coefficients`` looks each combination up in, with the join keys, in join order: prices,
        price factors, token ratios (per task, then per model), output tokens (per task and model, then per
        task), billed fits (per task and model, then per model), the catalog's billed means."""
        prices = catalog.prices.select("model", "usd_per_mtok_in", "usd_per_mtok_out").unique("model")
        keys = [k.split("\t", 1) for k in self.token_ratio]
        ratio_all = pl.DataFrame(
            {
                "model": [k[0] for k in keys],
                "task": [k[1] for k in keys],
                "ratio": list(self.token_ratio.values()),
                "ratio_hi": [self.token_ratio_p90.get(k, 1.1) for k in self.token_ratio],
            },
            schema={"model": pl.String, "task": pl.String, "ratio": pl.Float64, "ratio_hi": pl.Float64},
        )
        ratio = ratio_all.filter(pl.col("task") != "*")
        ratio_m = ratio_all.filter(pl.col("task") == "*").select(
            "model", pl.col("ratio").alias("ratio_m"), pl.col("ratio_hi").alias("ratio_hi_m")
        )
        out_schema = {"model": pl.String, "task": pl.String, "mean": pl.Float64, "p50": pl.Float64, "p90": pl.Float64}
        tok_out = pl.DataFrame(self.tokens_out, schema=out_schema)
        tok_out_task = tok_out.group_by("task").agg(pl.col("mean", "p50", "p90").mean().name.suffix("_t"))
        billed = pl.DataFrame(
            self.billed,
            schema={
                "model": pl.String,
                "task": pl.String,
                "a": pl.Float64,
                "b": pl.Float64,
                "high_ratio": pl.Float64,
                "n": pl.Int64,
            },
        )
        billed_model = billed.group_by("model").agg(
            (pl.col("a") * pl.col("n")).sum().truediv(pl.col("n").sum()).alias("a_m"),
            (pl.col("b") * pl.col("n")).sum().truediv(pl.col("n").sum()).alias("b_m"),
            pl.col("high_ratio").max().alias("high_ratio_m"),
        )
        catalog_billed = catalog.billed.select("model", pl.col("mean_cost_usd").alias("billed_mean")).unique("model")
        factor_keys = [k.split("\t", 1) for k in self.price_factor]
        factor = pl.DataFrame(
            {
                "model": [k[0] for k in factor_keys],
                "task": [k[1] for k in factor_keys],
                "price_factor": list(self.price_factor.values()),
            },
            schema={"model": pl.String, "task": pl.String, "price_factor": pl.Float64},
        )
        return [
            (prices, "model"),
            (factor, ["model", "task"]),
            (ratio, ["model", "task"]),
            (ratio_m, "model"),
            (tok_out, ["model", "task"]),
            (tok_out_task, "task"),
            (billed.drop("n"), ["model", "task"]),
            (billed_model, "model"),
            (catalog_billed, "model"),
        ]


def _by_source(f: pl.DataFrame, per_kchar: float) -> pl.DataFrame:
    """The coefficients of each combination from its cost source: the token path, the billed fit, the
    catalog's billed mean, or the cold default of ``per_kchar``."""
    src = pl.col("cost_source")
    return f.select(
        pl.when(src == "tokens")
        .then(0.0)
        .when(src == "billed")
        .then(pl.col("a_fit"))
        .when(src == "billed_mean")
        .then(pl.col("billed_mean"))
        .otherwise(0.0)
        .alias("a"),
        pl.when(src == "tokens")
        .then(pl.col("ratio") * pl.col("usd_per_mtok_in") / 1e6)
        .when(src == "billed")
        .then(pl.col("b_fit"))
        .when(src == "billed_mean")
        .then(0.0)
        .otherwise(per_kchar / 1000)
        .alias("b"),
        pl.when(src == "tokens")
        .then(0.0)
        .when(src == "billed")
        .then(pl.col("a_fit") * pl.col("high_fit"))
        .when(src == "billed_mean")
        .then(pl.col("billed_mean") * 1.5)
        .otherwise(0.0)
        .alias("a_high"),
        pl.when(src == "tokens")
        .then(pl.col("ratio") * pl.col("ratio_hi") * pl.col("usd_per_mtok_in") / 1e6)
        .when(src == "billed")
        .then(pl.col("b_fit") * pl.col("high_fit"))
        .when(src == "billed_mean")
        .then(0.0)
        .otherwise(2 * per_kchar / 1000)
        .alias("b_high"),
        pl.when(src == "tokens").then(pl.col("usd_per_mtok_out") / 1e6).otherwise(0.0).alias("price_out"),
        "ratio",
        "tokens_out",
        "tokens_out_p90",
        "cost_source",
    )


def _nonneg_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = a + b x with a, b >= 0 (falls back to a proportional or constant fit)."""
    if len(x) >= 3 and np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
        if a >= 0 and b >= 0:
            return float(a), float(b)
    prop = float(np.dot(x, y) / max(np.dot(x, x), 1e-12))
    const = float(np.mean(y))
    err_prop = float(np.mean((y - prop * x) ** 2))
    err_const = float(np.mean((y - const) ** 2))
    return (0.0, max(prop, 0.0)) if err_prop <= err_const else (max(const, 0.0), 0.0)
