"""The predictor: per (query, model) calibrated P(correct), expected and p90 cost, answer confusions.

Training (``fit_predictor``): query features once per query, model descriptors once per model, pair rows
by gathering both; LightGBM binary classifier trained in k folds grouped by query (out-of-fold scores pick
and fit the calibrator and give the validation metrics), then once on all rows with the mean best round.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from batchplan.catalog import PriceCatalog
from batchplan.contracts import DEFAULT_TASK, PREDICTION_SCHEMA
from batchplan.history import History
from batchplan.storage import Storage
from predictors.calibration import Calibrator, choose_calibrator
from predictors.cost import CostModel, query_chars
from predictors.features import (
    STAT_COLUMNS,
    TextEncoder,
    Vocabulary,
    describe_models,
    text_of,
    text_stats,
)
from predictors.metrics import auc, brier, ece
from predictors.priors import Priors, fit_confusions, nearest_models

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "max_cat_to_onehot": 8,
    "cat_smooth": 10.0,
    "num_threads": 2,
    "verbose": -1,
    "deterministic": True,
    "force_row_wise": True,
}
TRAIN_OPTIONS = ("folds", "max_rounds", "early_stopping", "text_dim", "text_features", "max_terms")


@dataclass
class Predictor:
    """A trained predictor. ``predict`` returns PREDICTION_SCHEMA columns plus diagnostics."""

    name: str
    seed: int
    options: dict[str, Any]
    encoder: TextEncoder
    tasks: Vocabulary
    subjects: Vocabulary
    model_vocab: Vocabulary
    families: Vocabulary
    descriptors: pl.DataFrame  # known models' descriptors (as trained)
    priors: Priors
    cost: CostModel
    confusions: pl.DataFrame  # task, model, gold, answer, p
    catalog: PriceCatalog
    calibrator: Calibrator
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Models with training history."""
        return list(self.model_vocab.values)

    # ------------------------------------------------------------------ features
    def _query_matrix(self, q: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(query features n x F_q float32, chars per query)."""
        stats = text_stats(q).to_numpy().astype(np.float32)
        n_text = int(self.options.get("text_features", 16))
        parts = [stats]
        if n_text and self.encoder.dim:
            parts.append(self.encoder.transform(text_of(q))[:, :n_text])
        parts.append(self.tasks.codes(q["task"])[:, None])
        parts.append(self.subjects.codes(q["subject"])[:, None])
        return np.hstack(parts).astype(np.float32), query_chars(q).to_numpy()

    def _model_matrix(
        self, models: list[str], catalog: PriceCatalog
    ) -> tuple[np.ndarray, dict[str, list[tuple[str, float]]]]:
        known = set(self.model_vocab.values)
        unknown = [m for m in models if m not in known]
        desc = self.descriptors.filter(pl.col("model").is_in(models))
        if unknown:
            desc = pl.concat([desc, describe_models(unknown, catalog.prices, {})])
        desc = pl.DataFrame({"model": models}).join(desc, on="model", how="left", maintain_order="left")
        neighbors = nearest_models(
            pl.concat([self.descriptors, desc.filter(pl.col("model").is_in(unknown))]), self.models, unknown
        )
        mat = np.column_stack(
            [
                self.model_vocab.codes(desc["model"]),
                self.families.codes(desc["family"]),
                *(
                    desc[c].fill_null(float("nan")).to_numpy().astype(np.float32)
                    for c in ("log_price_in", "log_price_out", "log_cost_per_kchar", "log_size_b")
                ),
            ]
        ).astype(np.float32)
        return mat, neighbors

    def design(
        self, queries: pl.DataFrame, pairs: pl.DataFrame, catalog: PriceCatalog | None = None
    ) -> tuple[np.ndarray, pl.DataFrame]:
        """Feature matrix for ``pairs`` (in order) and the per-pair frame (model, task, chars, has_labels,
        prior, known)."""
        catalog = catalog or self.catalog
        q = prepare_queries(queries)
        index = pairs.select("query_id", "model").join(
            q.select("query_id").with_row_index("qi"), on="query_id", how="left", maintain_order="left"
        )
        if index["qi"].null_count():
            missing = index.filter(pl.col("qi").is_null())["query_id"].head(3).to_list()
            raise ValueError(f"pairs name query_ids absent from queries, e.g. {missing}")
        models = sorted(index["model"].unique().to_list())
        mi = (
            index.select("model")
            .join(
                pl.DataFrame({"model": models, "mi": np.arange(len(models), dtype=np.uint32)}),
                on="model",
                how="left",
                maintain_order="left",
            )["mi"]
            .to_numpy()
        )
        qi = index["qi"].to_numpy()
        qmat, chars = self._query_matrix(q)
        mmat, neighbors = self._model_matrix(models, catalog)
        tasks = q["task"].to_numpy()[qi]
        has_labels = (q["labels"].list.len().fill_null(0) > 0).to_numpy()[qi]
        pair_frame = pl.DataFrame(
            {"model": index["model"], "task": tasks, "chars": chars[qi], "has_labels": has_labels},
            schema={"model": pl.String, "task": pl.String, "chars": pl.Float64, "has_labels": pl.Boolean},
        )
        prior = self.priors.lookup(pair_frame, neighbors)
        known = np.isin(np.asarray(models, dtype=object), np.asarray(self.models, dtype=object))[mi]
        x = np.empty((len(qi), qmat.shape[1] + mmat.shape[1] + 1), dtype=np.float32)
        x[:, : qmat.shape[1]] = qmat[qi]
        x[:, qmat.shape[1] : -1] = mmat[mi]
        x[:, -1] = prior
        return x, pair_frame.with_columns(pl.Series("prior", prior), pl.Series("known", known))

    # ------------------------------------------------------------------ scoring
    def predict(self, queries: pl.DataFrame, pairs: pl.DataFrame, catalog: PriceCatalog | None = None) -> pl.DataFrame:
        """PREDICTION_SCHEMA columns (query_id, model, p_correct, cost_usd, cost_high_usd) for ``pairs`` in
        order, plus p_raw, tokens_in, tokens_out, tokens_out_p90, cost_source, known_model."""
        catalog = catalog or self.catalog
        if pairs.height == 0:
            return pl.DataFrame(schema=PREDICTION_SCHEMA)
        x, pf = self.design(queries, pairs, catalog)
        known = pf["known"].to_numpy()
        prior = pf["prior"].to_numpy()
        if "correct" in self.boosters:
            raw = self.boosters["correct"].predict(x, num_threads=int(self.options.get("num_threads", 2)))
            p = self.calibrator(np.asarray(raw, dtype=np.float64))
            p = np.where(known, p, prior)
            raw = np.where(known, raw, prior)
        else:
            raw = p = prior
        cost = self.cost.predict(pf, catalog)
        return pl.DataFrame(
            {
                "query_id": pairs["query_id"].cast(pl.String),
                "model": pairs["model"].cast(pl.String),
                "p_correct": np.asarray(p, dtype=np.float64),
                "cost_usd": cost["cost_usd"],
                "cost_high_usd": cost["cost_high_usd"],
            },
            schema=PREDICTION_SCHEMA,
        ).with_columns(
            pl.Series("p_raw", np.asarray(raw, dtype=np.float64)),
            cost["tokens_in"],
            cost["tokens_out"],
            cost["tokens_out_p90"],
            cost["cost_source"],
            pl.Series("known_model", known),
        )

    def save(self, storage: Storage, root_uri: str, version: str | None = None) -> str:
        """Write this predictor as ``root_uri/<version>/``; returns that URI."""
        from predictors.registry import save

        return save(self, storage, root_uri, version)

    def confusion(self, task: str, model: str) -> pl.DataFrame:
        """P(answer | gold) for one (task, model): gold, answer, p. A model without history on the task gets
        the pooled confusion of the models that have it; empty for open tasks."""
        rows = self.confusions.filter((pl.col("task") == task) & (pl.col("model") == model))
        if rows.height:
            return rows.select("gold", "answer", "p")
        pooled = self.confusions.filter(pl.col("task") == task)
        if pooled.height == 0:
            return pl.DataFrame(schema={"gold": pl.String, "answer": pl.String, "p": pl.Float64})
        return (
            pooled.group_by("gold", "answer")
            .agg(pl.col("p").mean())
            .with_columns((pl.col("p") / pl.col("p").sum().over("gold")).alias("p"))
            .sort("gold", "answer")
        )


def prepare_queries(queries: pl.DataFrame) -> pl.DataFrame:
    """The columns the features read, with defaults (task -> 'default'; subject optional)."""
    cols: dict[str, pl.DataType] = {
        "query_id": pl.String(),
        "prompt": pl.String(),
        "system_prompt": pl.String(),
        "labels": pl.List(pl.String),
        "task": pl.String(),
        "subject": pl.String(),
    }
    exprs = [pl.col(c).cast(t) if c in queries.columns else pl.lit(None, dtype=t).alias(c) for c, t in cols.items()]
    return queries.select(exprs).with_columns(pl.col("task").fill_null(DEFAULT_TASK))


def training_rows(history: History) -> pl.DataFrame:
    q = prepare_queries(history.queries).select("query_id", "task", "subject")
    gold = history.queries.select("query_id", "gold")
    return (
        history.outcomes.filter(pl.col("correct").is_not_null())
        .join(q, on="query_id", how="inner")
        .join(gold, on="query_id", how="left")
        .sort("query_id", "model")
    )


def fingerprint(rows: pl.DataFrame) -> str:
    digest = hashlib.sha256()
    digest.update(rows.select("query_id", "model", pl.col("correct").cast(pl.Int8), "cost_usd").write_csv().encode())
    return digest.hexdigest()


def fit_predictor(history: History, name: str = "lightgbm", seed: int = 0, **params: Any) -> Predictor:
    started = time.time()
    options = {
        "folds": 4,
        "max_rounds": 400,
        "early_stopping": 30,
        "text_dim": 32,
        "text_features": 16,
        "max_terms": 8192,
    }
    options.update({k: params.pop(k) for k in list(params) if k in TRAIN_OPTIONS})
    lgb_params = {**DEFAULT_PARAMS, **params, "seed": seed}
    options["num_threads"] = lgb_params["num_threads"]
    rows = training_rows(history)
    if rows.height == 0:
        raise ValueError("the history has no outcomes for its queries: nothing to train on")
    train_q = prepare_queries(history.queries.filter(pl.col("query_id").is_in(rows["query_id"].unique().implode())))
    catalog = PriceCatalog.from_history(history.prices, history.outcomes)
    cost = CostModel.fit(train_q, rows)
    models = sorted(rows["model"].unique().to_list())
    descriptors = describe_models(models, catalog.prices, cost.cost_per_kchar)
    encoder = (
        TextEncoder.fit(text_of(train_q), max_terms=int(options["max_terms"]), dim=int(options["text_dim"]), seed=seed)
        if name != "prior"
        else TextEncoder()
    )
    subjects = train_q["subject"].drop_nulls().value_counts().filter(pl.col("count") >= 5)["subject"].sort().to_list()
    predictor = Predictor(
        name=name,
        seed=seed,
        options=options,
        encoder=encoder,
        tasks=Vocabulary(sorted(train_q["task"].unique().to_list())),
        subjects=Vocabulary(subjects),
        model_vocab=Vocabulary(models),
        families=Vocabulary(sorted(descriptors["family"].unique().to_list())),
        descriptors=descriptors,
        priors=Priors.fit(rows.select("model", "task", "correct")),
        cost=cost,
        confusions=fit_confusions(rows.select("task", "model", "gold", "answer")),
        catalog=catalog,
        calibrator=Calibrator("identity", {}),
    )
    n_stats = len(STAT_COLUMNS)
    n_text = min(int(options["text_features"]), encoder.dim)
    predictor.feature_names = [
        *STAT_COLUMNS,
        *(f"text_{i}" for i in range(n_text)),
        "task",
        "subject",
        "model",
        "family",
        "log_price_in",
        "log_price_out",
        "log_cost_per_kchar",
        "log_size_b",
        "prior_acc",
    ]
    categorical = [n_stats + n_text, n_stats + n_text + 1, n_stats + n_text + 2, n_stats + n_text + 3]
    y = rows["correct"].cast(pl.Float64).to_numpy()
    validation: dict[str, Any] = {}
    if name == "lightgbm":
        x, _ = predictor.design(train_q, rows.select("query_id", "model"), catalog)
        fold = _query_folds(rows["query_id"], int(options["folds"]), seed)
        oof = np.zeros(len(y))
        best_rounds = []
        for k in range(int(options["folds"])):
            tr, va = fold != k, fold == k
            dtrain = lgb.Dataset(
                x[tr], y[tr], feature_name=predictor.feature_names, categorical_feature=categorical, free_raw_data=True
            )
            dvalid = lgb.Dataset(x[va], y[va], reference=dtrain)
            booster = lgb.train(
                lgb_params,
                dtrain,
                num_boost_round=int(options["max_rounds"]),
                valid_sets=[dvalid],
                callbacks=[lgb.early_stopping(int(options["early_stopping"]), verbose=False)],
            )
            best_rounds.append(booster.best_iteration or int(options["max_rounds"]))
            oof[va] = booster.predict(x[va], num_iteration=booster.best_iteration)
        rounds = max(10, int(np.mean(best_rounds) * 1.1))
        dall = lgb.Dataset(x, y, feature_name=predictor.feature_names, categorical_feature=categorical)
        predictor.boosters["correct"] = lgb.train(lgb_params, dall, num_boost_round=rounds)
        predictor.calibrator, cal_scores = choose_calibrator(oof, y, seed=seed)
        calibrated = predictor.calibrator(oof)
        validation = {
            "kind": f"{options['folds']}-fold out-of-fold, grouped by query",
            "rounds": rounds,
            "fold_best_rounds": best_rounds,
            "calibration_log_loss": cal_scores,
            "calibrator": predictor.calibrator.kind,
            "overall": _scores(y, oof, calibrated),
            "per_model": {
                m: _scores(y[mask], oof[mask], calibrated[mask])
                for m in models
                for mask in [(rows["model"] == m).to_numpy()]
            },
        }
    counts = (
        rows.group_by("model").agg(pl.len().alias("rows"), pl.col("query_id").n_unique().alias("queries")).sort("model")
    )
    predictor.metadata = {
        "name": name,
        "seed": seed,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.time() - started, 2),
        "features": predictor.feature_names,
        "categorical_features": [predictor.feature_names[i] for i in categorical] if name == "lightgbm" else [],
        "training_data": {
            "fingerprint": fingerprint(rows),
            "rows": rows.height,
            "queries": train_q.height,
            "datasets": sorted(history.queries["dataset"].drop_nulls().unique().to_list()),
            "tasks": predictor.tasks.values,
        },
        "models": {r["model"]: {"rows": r["rows"], "queries": r["queries"]} for r in counts.iter_rows(named=True)},
        "lightgbm_params": lgb_params if name == "lightgbm" else {},
        "options": options,
        "validation": validation,
        "versions": {"lightgbm": lgb.__version__, "polars": pl.__version__, "numpy": np.__version__},
    }
    return predictor


def _query_folds(query_ids: pl.Series, folds: int, seed: int) -> np.ndarray:
    """Fold per row, constant within a query, by a stable hash of (seed, query_id)."""
    unique = query_ids.unique().sort()
    fold = np.array([zlib.crc32(f"{seed}:{q}".encode()) % folds for q in unique.to_list()], dtype=np.int64)
    return (
        pl.DataFrame({"query_id": query_ids})
        .join(pl.DataFrame({"query_id": unique, "fold": fold}), on="query_id", how="left", maintain_order="left")[
            "fold"
        ]
        .to_numpy()
    )


def _scores(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray) -> dict[str, float]:
    return {
        "n": len(y),
        "accuracy": float(np.mean(y)) if len(y) else float("nan"),
        "auc": round(auc(y, calibrated), 4),
        "brier": round(brier(y, calibrated), 4),
        "ece": round(ece(y, calibrated), 4),
        "ece_raw": round(ece(y, raw), 4),
    }
