"""Training a Predictor from an outcome history (see model.py for the scoring structure).

Leakage control: retrieval features of training queries are leave-one-out; the stage-1 difficulty score
that stage 2 learns from is out-of-fold (k folds grouped by query); the calibrator is chosen and fitted on
out-of-fold stage-2 scores, which also give the validation metrics stored in the artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import SILVER
from batchplan.core.errors import ContractError
from batchplan.core.history import History, stable_fold
from batchplan.core.numerics import logit, sigmoid
from batchplan.predictors.calibration import Calibrator, choose_calibrator
from batchplan.predictors.cost import CostModel
from batchplan.predictors.features import STAT_COLUMNS, TextEncoder, Vocabulary, describe_models, text_of
from batchplan.predictors.live import LiveCorrection
from batchplan.predictors.metrics import auc, brier, ece, log_loss
from batchplan.predictors.model import PAIR_FEATURES, PARALLEL_ROWS, Predictor, prepare_queries
from batchplan.predictors.pairmodel import PairModel
from batchplan.predictors.priors import Priors, fit_confusions
from batchplan.predictors.retrieval import Retriever
from batchplan.predictors.tokens import TokenModel

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 100,
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
DEFAULT_OPTIONS: dict[str, Any] = {
    "folds": 4,
    "max_rounds": 300,
    "early_stopping": 30,
    "text_dim": 32,
    "text_features": 16,
    "pair_text_features": 8,
    "max_terms": 8192,
    "text_tail": 400,
    "knn_mode": "cluster",
    "knn_k": 20,
    "knn_cluster_size": 10,
    "knn_probes": 3,
    "shrinkage": 30.0,
}


def training_rows(history: History) -> pl.DataFrame:
    q = prepare_queries(history.queries).select("query_id", "task", "subject")
    gold = history.queries.select("query_id", "gold")
    return (
        history.outcomes.filter(pl.col("correct").is_not_null())
        .join(q, on="query_id", how="inner")
        .join(gold, on="query_id", how="left")
        .sort("query_id", "model")
    )


def row_weights(rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(weight, gold) per training row: a run's outcomes carry ``weight`` (gold 1, silver less) and
    ``label_source``; a history's rows are gold, weight 1. Silver rows teach the fits at their weight and are
    left out of every metric and of the calibration, which must be fitted against the truth."""
    weight = (
        rows["weight"].cast(pl.Float64).fill_null(1.0).to_numpy()
        if "weight" in rows.columns
        else np.ones(rows.height)
    )
    gold = (
        (rows["label_source"].fill_null("") != SILVER).to_numpy()
        if "label_source" in rows.columns
        else np.ones(rows.height, dtype=bool)
    )
    return weight, gold


def fingerprint(rows: pl.DataFrame) -> str:
    digest = hashlib.sha256()
    digest.update(rows.select("query_id", "model", pl.col("correct").cast(pl.Int8), "cost_usd").write_csv().encode())
    return digest.hexdigest()


def fit_predictor(history: History, name: str = "lightgbm", seed: int = 0, **params: Any) -> Predictor:
    started = time.time()
    options = {**DEFAULT_OPTIONS, **{k: params.pop(k) for k in list(params) if k in DEFAULT_OPTIONS}}
    lgb_params = {**DEFAULT_PARAMS, **params, "seed": seed}
    options["num_threads"] = lgb_params["num_threads"]
    rows = training_rows(history)
    if rows.height == 0:
        raise ContractError("the history has no outcomes for its queries: nothing to train on")
    if not row_weights(rows)[1].any():
        raise ContractError("the history has only silver (audited) outcomes: training needs gold ones to score on")
    if "num_threads" not in params and rows.height < PARALLEL_ROWS:
        lgb_params["num_threads"] = 1
    train_q = prepare_queries(
        history.queries.filter(pl.col("query_id").is_in(rows["query_id"].unique().implode()))
    ).sort("query_id")
    catalog = PriceCatalog.from_history(history.prices, history.outcomes)
    cost = CostModel.fit(train_q, rows, catalog.prices)
    models = sorted(rows["model"].unique().to_list())
    descriptors = describe_models(models, catalog.prices, cost.cost_per_kchar)
    learned = name != "prior"
    encoder = (
        TextEncoder.fit(
            text_of(train_q),
            max_terms=int(options["max_terms"]),
            dim=int(options["text_dim"]),
            tail=int(options["text_tail"]),
            seed=seed,
        )
        if learned
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
        priors=Priors.fit(rows.select("model", "task", "correct", pl.lit(row_weights(rows)[0]).alias("weight"))),
        cost=cost,
        confusions=fit_confusions(rows.select("task", "model", "gold", "answer")),
        catalog=catalog,
        calibrator=Calibrator("identity", {}),
    )
    validation: dict[str, Any] = {}
    if learned:
        validation = _fit_stages(predictor, train_q, rows, models, lgb_params, options, seed)
        validation["tokens_out"] = _fit_tokens(predictor, train_q, rows, catalog, seed)
    else:  # the prior baseline's P is its (task, LLM) prior: the live rows' drift is measured against it
        w, gold = row_weights(rows)
        p = predictor.priors.lookup(rows.select("model", "task"), {})
        predictor.live = fit_live_correction(rows, rows["correct"].cast(pl.Float64).to_numpy(), p, w, gold)
    counts = (
        rows.group_by("model").agg(pl.len().alias("rows"), pl.col("query_id").n_unique().alias("queries")).sort("model")
    )
    silver_rows = int((~row_weights(rows)[1]).sum())
    predictor.metadata = {
        "name": name,
        "seed": seed,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.time() - started, 2),
        "features": predictor.feature_names,
        "training_data": {
            "fingerprint": fingerprint(rows),
            "rows": rows.height,
            "queries": train_q.height,
            "datasets": sorted(history.queries["dataset"].drop_nulls().unique().to_list()),
            "tasks": predictor.tasks.values,
            "silver_rows": silver_rows,  # audited, not labelled: weighted down, in no metric
        },
        "models": {r["model"]: {"rows": r["rows"], "queries": r["queries"]} for r in counts.iter_rows(named=True)},
        "lightgbm_params": lgb_params if learned else {},
        "options": options,
        "validation": validation,
        # the live runs' drift per (task, LLM): offset (logit), weighted rows, mean P before, live accuracy
        "live_correction": predictor.live.to_state(),
        "versions": {"lightgbm": lgb.__version__, "polars": pl.__version__, "numpy": np.__version__},
    }
    return predictor


def _fit_stages(
    predictor: Predictor,
    train_q: pl.DataFrame,
    rows: pl.DataFrame,
    models: list[str],
    lgb_params: dict[str, Any],
    options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    qi = (
        rows.select("query_id")
        .join(train_q.select("query_id").with_row_index("qi"), on="query_id", maintain_order="left")["qi"]
        .to_numpy()
        .astype(np.int64)
    )
    mi = (
        rows.select("model")
        .join(pl.DataFrame({"model": models, "mi": np.arange(len(models))}), on="model", maintain_order="left")["mi"]
        .to_numpy()
    )
    y = rows["correct"].cast(pl.Float64).to_numpy()
    w, gold = row_weights(rows)
    n_q, n_m = train_q.height, len(models)
    ysum = np.zeros((n_q, n_m), dtype=np.float32)
    ycnt = np.zeros((n_q, n_m), dtype=np.float32)
    ysum[qi, mi] = y * w  # the neighbours' accuracy counts a silver verdict at its weight too
    ycnt[qi, mi] = w
    emb = predictor.encoder.transform(text_of(train_q))
    task_code = predictor.tasks.codes(train_q["task"]).astype(np.int64)
    predictor.retriever = Retriever.build(
        emb,
        task_code.astype(np.int32),
        ysum,
        ycnt,
        mode=str(options["knn_mode"]),
        k=int(options["knn_k"]),
        cluster_size=int(options["knn_cluster_size"]),
        probes=int(options["knn_probes"]),
        seed=seed,
    )
    folds = int(options["folds"])
    fold_q = stable_fold(train_q["query_id"].to_list(), folds, seed)
    block = predictor.query_block(train_q, query_fold=fold_q, train_fold=fold_q)
    n_text = min(int(options["text_features"]), emb.shape[1])
    stage1_names = [*STAT_COLUMNS, *(f"text_{i}" for i in range(n_text)), "task", "subject", "knn_lift_mean", "knn_sim"]
    categorical = [len(STAT_COLUMNS) + n_text, len(STAT_COLUMNS) + n_text + 1]
    prior_rows = block.prior[qi, mi]
    init = logit(prior_rows)
    x_rows = block.core[qi]
    fold = fold_q[qi]
    d_oof = np.zeros(n_q)
    best_rounds = []
    for k in range(folds):
        tr, va = fold != k, fold == k
        if not tr.any() or not va.any():
            continue
        dtrain = lgb.Dataset(
            x_rows[tr],
            y[tr],
            weight=w[tr],
            init_score=init[tr],
            feature_name=stage1_names,
            categorical_feature=categorical,
        )
        dvalid = lgb.Dataset(x_rows[va], y[va], weight=w[va], init_score=init[va], reference=dtrain)
        booster = lgb.train(
            lgb_params,
            dtrain,
            num_boost_round=int(options["max_rounds"]),
            valid_sets=[dvalid],
            callbacks=[lgb.early_stopping(int(options["early_stopping"]), verbose=False)],
        )
        best_rounds.append(int(booster.best_iteration or options["max_rounds"]))
        in_fold = fold_q == k
        d_oof[in_fold] = booster.predict(block.core[in_fold], raw_score=True, num_iteration=booster.best_iteration)
    rounds = max(5, int(np.mean(best_rounds) * 1.1)) if best_rounds else 30
    dall = lgb.Dataset(
        x_rows, y, weight=w, init_score=init, feature_name=stage1_names, categorical_feature=categorical
    )
    predictor.boosters["query"] = lgb.train(lgb_params, dall, num_boost_round=rounds)
    # stage 2 on out-of-fold difficulty
    knn_rows = block.knn_acc[qi, mi]
    z = predictor.pair_features(block, d_oof, qi, init, knn_rows)
    n_text2 = z.shape[1] - len(PAIR_FEATURES)
    pair_names = [*PAIR_FEATURES, *(f"text_{i}" for i in range(n_text2))]
    # shrinkage toward the global fit, and text columns on/off, chosen by out-of-fold log loss
    grid = [(float(lam), tp) for lam in _as_list(options["shrinkage"]) for tp in (None, 1e6)]
    best: tuple[float, tuple[float, float | None], np.ndarray] | None = None
    stage2_scores: dict[str, float] = {}
    for lam, text_penalty in grid:
        oof_c = np.zeros(len(y))
        for k in range(folds):
            tr, va = fold != k, fold == k
            if not tr.any() or not va.any():
                oof_c[va] = sigmoid(init[va])
                continue
            part = PairModel.fit(
                z[tr], y[tr], mi[tr], models, pair_names, lam=lam, text_penalty=text_penalty, weights=w[tr]
            )
            oof_c[va] = sigmoid(np.einsum("ij,ij->i", z[va], part.betas[mi[va]]))
        score = log_loss(y[gold], oof_c[gold])
        stage2_scores[f"lam={lam:g},text={'off' if text_penalty else 'on'}"] = round(score, 6)
        if best is None or score < best[0] - 1e-9:
            best = (score, (lam, text_penalty), oof_c)
    assert best is not None
    (lam, text_penalty), oof = best[1], best[2]
    predictor.pair_model = PairModel.fit(z, y, mi, models, pair_names, lam=lam, text_penalty=text_penalty, weights=w)
    predictor.calibrator, cal_scores = choose_calibrator(oof[gold], y[gold], seed=seed)
    calibrated = predictor.calibrator(oof)
    predictor.live = fit_live_correction(rows, y, calibrated, w, gold)
    # the validation metrics below are over gold rows only: a silver verdict is no truth to score against
    y, oof, calibrated, prior_rows, mi = y[gold], oof[gold], calibrated[gold], prior_rows[gold], mi[gold]
    predictor.feature_names = {"query": stage1_names, "pair": pair_names}
    prior_only = prior_rows
    return {
        "kind": f"{folds}-fold out-of-fold, grouped by query",
        "stage1_rounds": rounds,
        "fold_best_rounds": best_rounds,
        "calibration_log_loss": cal_scores,
        "calibrator": predictor.calibrator.kind,
        "stage2_log_loss": stage2_scores,
        "stage2_choice": {"shrinkage": lam, "text": text_penalty is None},
        "overall": _scores(y, oof, calibrated, prior_only),
        "per_model": {
            m: _scores(y[mi == j], oof[mi == j], calibrated[mi == j], prior_only[mi == j]) for j, m in enumerate(models)
        },
    }


def fit_live_correction(
    rows: pl.DataFrame, y: np.ndarray, p_oof: np.ndarray, w: np.ndarray, gold: np.ndarray
) -> LiveCorrection:
    """The per (task, LLM) drift offsets (``batchplan.predictors.live``) on the rows of live runs (those
    with a ``label_source``; a bundled history's rows have none), against their out-of-fold P(correct)."""
    if "label_source" not in rows.columns:
        return LiveCorrection()
    live = rows["label_source"].is_not_null().to_numpy()
    return LiveCorrection.fit(
        rows["task"].to_numpy()[live], rows["model"].to_numpy()[live], y[live], p_oof[live], w[live], gold[live],
        query=rows["query_id"].to_numpy()[live],
    )


def refit_live_correction(predictor: Predictor, live: History) -> LiveCorrection:
    """The live correction fitted again on ``live`` (the labelled outcomes of past runs, ``app.outcomes.
    runs_history``), against ``predictor``'s own P(correct) for those rows with no live correction, without
    retraining anything else: how tonight's plan uses the labels that arrived since the promoted predictor
    was trained, including the newest ones a retrain keeps out of training to judge on (``app.promotion``).

    Where the predictor trained on a row its P there is in-sample (training's own fit uses out-of-fold P):
    it leans a little toward the row's verdict, so the offset is a little smaller than training's, never of
    the other sign. A history with no gold rows: an empty correction."""
    rows = training_rows(live)
    if rows.height == 0:
        return LiveCorrection()
    bare = dataclasses.replace(predictor, live=LiveCorrection())
    p = bare.predict(live.queries, rows.select("query_id", "model"))["p_correct"].to_numpy()
    w, gold = row_weights(rows)
    return fit_live_correction(rows, rows["correct"].cast(pl.Float64).to_numpy(), p, w, gold)


def _as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]


def _fit_tokens(
    predictor: Predictor, train_q: pl.DataFrame, rows: pl.DataFrame, catalog: PriceCatalog, seed: int
) -> dict[str, Any]:
    """Token-quantile boosters on the rows with recorded tokens_out; returns their in-sample p90 coverage."""
    known = rows.filter(pl.col("tokens_out").is_not_null())
    if known.height == 0:
        return {"rows": 0}
    q = train_q.select(
        "query_id",
        pl.col("labels").list.len().fill_null(0).cast(pl.Float32).alias("n_labels"),
        (pl.col("prompt").fill_null("").str.len_chars() + pl.col("system_prompt").fill_null("").str.len_chars() + 1)
        .cast(pl.Float64)
        .alias("chars"),
    )
    known = known.join(q, on="query_id", how="inner")
    x = predictor.token_features(
        known["model"].to_list(),
        known["task"].to_list(),
        known["n_labels"].to_numpy(),
        known["chars"].to_numpy(),
        catalog,
    )
    y = known["tokens_out"].cast(pl.Float64).to_numpy()
    model = TokenModel.fit(x, y, seed=seed, num_threads=predictor.threads_for(len(y)))
    if not model.fitted:
        return {"rows": known.height, "fitted": False}
    predictor.boosters.update({k: v for k, v in ((f"tokens_{n}", b) for n, b in model.boosters.items())})
    mean, _p50, p90 = model.predict(x, predictor.threads_for(len(y)))
    return {
        "rows": known.height,
        "fitted": True,
        "p90_cover_in_sample": round(float(np.mean(y <= p90 + 1e-9)), 4),
        "mean_abs_error": round(float(np.mean(np.abs(mean - y))), 4),
    }


def _scores(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, prior: np.ndarray) -> dict[str, float]:
    return {
        "n": len(y),
        "accuracy": round(float(np.mean(y)), 4) if len(y) else float("nan"),
        "auc": round(auc(y, calibrated), 4),
        "auc_prior": round(auc(y, prior), 4),
        "brier": round(brier(y, calibrated), 4),
        "brier_prior": round(brier(y, prior), 4),
        "ece": round(ece(y, calibrated), 4),
        "ece_raw": round(ece(y, raw), 4),
    }
