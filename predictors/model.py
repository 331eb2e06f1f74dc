"""The predictor: per (query, model) calibrated P(correct), expected and p90 cost, answer confusions.

Scoring is split so that almost all work is per query, not per pair:
  per query  text stats + TF-IDF/SVD embedding, retrieval accuracies of every known model on the k most
             similar training queries, and a LightGBM "difficulty" score d(q) (stage 1, one evaluation per
             query: trained on all pairs with the models' priors as init scores, so it learns what makes a
             query easier or harder than the prior says);
  per pair   z = [1, logit prior(model, task), d(q), retrieval lift of the model, mean lift, similarity,
             text dims] and logit = beta_model . z (stage 2, per-model logistic shrunk to a global fit),
             then the calibrator (Platt or isotonic, chosen out-of-fold). One dot product per pair.
Models without history borrow priors, retrieval columns and betas from their descriptor neighbours.
"""

from __future__ import annotations

import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import DEFAULT_TASK, PREDICTION_SCHEMA
from batchplan.core.numerics import logit, logit32, sigmoid
from batchplan.core.storage import Storage, join
from batchplan.predictors.calibration import Calibrator
from batchplan.predictors.cost import CostModel, query_chars
from batchplan.predictors.features import STAT_COLUMNS, TextEncoder, Vocabulary, describe_models, text_of, text_stats
from batchplan.predictors.live import LiveCorrection
from batchplan.predictors.pairmodel import PairModel
from batchplan.predictors.priors import Priors, nearest_models
from batchplan.predictors.retrieval import Retriever
from batchplan.predictors.tokens import TokenModel, length_bucket

PARALLEL_ROWS = 200_000
PARALLEL_QUERIES = 20_000
PAIR_FEATURES = ("intercept", "prior_logit", "difficulty", "knn_lift", "knn_lift_mean", "knn_sim")


@dataclass
class QueryBlock:
    """Everything computed once per query."""

    core: np.ndarray  # stage-1 booster input (n, F1) float32
    emb: np.ndarray  # (n, d)
    knn_acc: np.ndarray  # (n, M_known) retrieval accuracy per known model
    prior: np.ndarray  # (n, M_known) prior accuracy per known model for the query's task
    task_code: np.ndarray  # (n,) int, -1 = task unseen in training
    chars: np.ndarray  # (n,) prompt + system characters
    has_labels: np.ndarray  # (n,) bool
    task: pl.Series  # (n,) task names


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
    retriever: Retriever | None = None
    pair_model: PairModel | None = None
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)
    feature_names: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    live: LiveCorrection = field(default_factory=LiveCorrection)  # per (task, LLM) drift from live labels

    @property
    def models(self) -> list[str]:
        """Models with training history."""
        return list(self.model_vocab.values)

    @property
    def threads(self) -> int:
        """Thread cap (LightGBM); see ``threads_for``."""
        return int(self.options.get("num_threads", 2))

    def threads_for(self, rows: int) -> int:
        """1 thread below PARALLEL_ROWS rows: on a shared 2-core machine OpenMP threads mostly wait on
        each other for small inputs (measured: training on 2k rows 1.07 s with 2 threads, 0.16 s with 1)."""
        return self.threads if rows >= PARALLEL_ROWS else 1

    # ------------------------------------------------------------------ per query
    def prior_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(prior accuracy, has-history mask), shape (n_tasks + 1, M_known); last row = unseen task."""
        n_t, n_m = len(self.tasks.values), len(self.models)
        acc = np.full((n_t + 1, n_m), np.nan, dtype=np.float64)
        has = np.zeros((n_t + 1, n_m), dtype=bool)
        t_index = {t: i for i, t in enumerate(self.tasks.values)}
        m_index = {m: i for i, m in enumerate(self.models)}
        for r in self.priors.model_task.iter_rows(named=True):
            if r["task"] in t_index and r["model"] in m_index:
                acc[t_index[r["task"]], m_index[r["model"]]] = r["acc"]
                has[t_index[r["task"]], m_index[r["model"]]] = True
        model_acc = dict(zip(self.priors.model["model"].to_list(), self.priors.model["acc"].to_list(), strict=True))
        fallback = np.array([model_acc.get(m, self.priors.global_acc) for m in self.models])
        acc = np.where(np.isnan(acc), fallback[None, :], acc)
        return acc, has

    def query_block(
        self, q: pl.DataFrame, query_fold: np.ndarray | None = None, train_fold: np.ndarray | None = None
    ) -> QueryBlock:
        stats = text_stats(q).to_numpy().astype(np.float32)
        emb = self.encoder.transform(text_of(q)) if self.encoder.dim else np.zeros((q.height, 0), dtype=np.float32)
        task_code = self.tasks.codes(q["task"])
        tci = np.where(np.isnan(task_code), -1, task_code).astype(np.int64)
        prior_acc, has = self.prior_matrix()
        prior = prior_acc[tci]  # row -1 = unseen-task fallback
        if self.retriever is not None:
            knn_acc, knn_sim = self.retriever.query(emb, tci, prior, query_fold, train_fold)
        else:
            knn_acc, knn_sim = prior.astype(np.float32), np.zeros(q.height, dtype=np.float32)
        lift = logit32(knn_acc)
        lift -= logit32(prior_acc)[tci]  # per task, then gathered: the same values as logit32(prior)
        mask = has[tci]
        lift_mean = np.where(mask.any(axis=1), (lift * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1), 0.0)
        n_text = min(int(self.options.get("text_features", 16)), emb.shape[1])
        core = np.hstack(
            [
                stats,
                emb[:, :n_text],
                task_code[:, None],
                self.subjects.codes(q["subject"])[:, None],
                lift_mean[:, None].astype(np.float32),
                knn_sim[:, None],
            ]
        ).astype(np.float32)
        return QueryBlock(
            core=core,
            emb=emb,
            knn_acc=knn_acc,
            prior=prior,
            task_code=tci,
            chars=query_chars(q).to_numpy(),
            has_labels=(q["labels"].list.len().fill_null(0) > 0).to_numpy(),
            task=q["task"],
        )

    def _query_block_parallel(self, q: pl.DataFrame) -> tuple[QueryBlock, np.ndarray]:
        """``query_block`` and the difficulty d(q) on ``threads`` slices at once for large batches (polars,
        numpy, scipy and LightGBM release the GIL; a row's d(q) does not depend on the others), concatenated
        in order, the arrays side by side."""
        parts = self.threads if q.height >= PARALLEL_QUERIES else 1
        if parts <= 1:
            block = self.query_block(q)
            return block, self.difficulty(block)
        bounds = np.linspace(0, q.height, parts + 1).astype(int)
        slices = [q.slice(int(a), int(b - a)) for a, b in pairwise(bounds)]

        def run(part: pl.DataFrame) -> tuple[QueryBlock, np.ndarray]:
            block = self.query_block(part)
            return block, self.difficulty(block)

        names = ("core", "emb", "knn_acc", "prior", "task_code", "chars", "has_labels")
        with ThreadPoolExecutor(max_workers=parts) as pool:
            done = list(pool.map(run, slices))
            blocks = [b for b, _ in done]
            arrays = {n: pool.submit(np.concatenate, [getattr(b, n) for b in blocks]) for n in names}
            d = np.concatenate([x for _, x in done])
            task = pl.concat([b.task for b in blocks])
            parts_out = {n: f.result() for n, f in arrays.items()}
        return QueryBlock(**parts_out, task=task), d

    def difficulty(self, block: QueryBlock) -> np.ndarray:
        booster = self.boosters.get("query")
        if booster is None:
            return np.zeros(block.core.shape[0])
        return np.asarray(
            booster.predict(block.core, raw_score=True, num_threads=self.threads_for(block.core.shape[0])),
            dtype=np.float64,
        )

    # ------------------------------------------------------------------ per pair
    def pair_features(
        self, block: QueryBlock, d: np.ndarray, qi: np.ndarray, prior_logit: np.ndarray, knn_acc: np.ndarray
    ) -> np.ndarray:
        """Stage-2 inputs z (n_pairs, J); ``prior_logit`` and ``knn_acc`` are already per pair."""
        n_text2 = int(self.options.get("pair_text_features", 8))
        n_text2 = min(n_text2, block.emb.shape[1])
        z = np.empty((len(qi), len(PAIR_FEATURES) + n_text2), dtype=np.float64)
        z[:, 0] = 1.0
        z[:, 1] = prior_logit
        z[:, 2] = d[qi]
        z[:, 3] = logit(knn_acc) - prior_logit
        z[:, 4] = block.core[qi, -2]
        z[:, 5] = block.core[qi, -1]
        if n_text2:
            z[:, len(PAIR_FEATURES) :] = block.emb[qi, :n_text2]
        return z

    def predict(self, queries: pl.DataFrame, pairs: pl.DataFrame, catalog: PriceCatalog | None = None) -> pl.DataFrame:
        """PREDICTION_SCHEMA columns (query_id, model, p_correct, cost_usd, cost_high_usd) for ``pairs`` in
        order, plus p_raw, tokens_in, tokens_out, tokens_out_p90, cost_source, known_model."""
        catalog = catalog or self.catalog
        if pairs.height == 0:
            return pl.DataFrame(schema=PREDICTION_SCHEMA)
        q = prepare_queries(queries)
        index = pairs.select("query_id", "model")
        qi_fast = _rows_in_order(index["query_id"], q["query_id"])
        if qi_fast is not None:
            qi = qi_fast
        else:
            index = index.join(
                q.select("query_id").with_row_index("qi"), on="query_id", how="left", maintain_order="left"
            )
            if index["qi"].null_count():
                missing = index.filter(pl.col("qi").is_null())["query_id"].head(3).to_list()
                raise ValueError(f"pairs name query_ids absent from queries, e.g. {missing}")
            qi = index["qi"].to_numpy().astype(np.int64)
        call_models = sorted(index["model"].unique().to_list())
        mi = index["model"].cast(pl.Enum(call_models)).to_physical().to_numpy().astype(np.int64)
        known_index = {m: i for i, m in enumerate(self.models)}
        unknown = [m for m in call_models if m not in known_index]
        neighbors = self._neighbors(unknown, catalog)
        block, d = self._query_block_parallel(q)
        # per (query task, call model) priors; unseen models borrow from neighbours
        weights = np.zeros((len(self.models), len(call_models)))
        for j, model in enumerate(call_models):
            if model in known_index:
                weights[known_index[model], j] = 1.0
            else:
                for other, w in neighbors.get(model, []):
                    weights[known_index[other], j] += w
        covered = weights.sum(axis=0) > 0
        weights[:, covered] /= weights[:, covered].sum(axis=0)
        tasks_u = block.task.unique().sort().to_list()
        task_inv = (block.task.rank("dense") - 1).to_numpy().astype(np.int64)
        cross = pl.DataFrame(
            {"model": [m for m in call_models for _ in tasks_u], "task": tasks_u * len(call_models)},
            schema={"model": pl.String, "task": pl.String},
        )
        prior_call = self.priors.lookup(cross, neighbors).reshape(len(call_models), len(tasks_u)).T  # (T_u, C)
        tq = task_inv[qi]  # task code of each pair
        known = np.array([m in known_index for m in call_models], dtype=bool)[mi]

        live = self.live.matrix(tasks_u, call_models)

        def scores() -> tuple[np.ndarray, np.ndarray]:
            if self.pair_model is None:  # the prior baseline: corrected by the live labels all the same
                prior_pair = prior_call[tq, mi]
                return (prior_pair if live is None else self.live.apply(prior_pair, live[tq, mi])), prior_pair
            raw = sigmoid(self._pair_logits(block, d, qi, mi, tq, prior_call, weights, covered, call_models, neighbors))
            p = self.calibrator(raw)
            # the live runs' drift correction last: what tonight's labels say overrides the history's level
            return (p if live is None else self.live.apply(p, live[tq, mi])), raw

        # P(correct) and cost are independent: on big batches they run side by side (numpy releases the GIL)
        pool = ThreadPoolExecutor(max_workers=1) if self.threads_for(len(qi)) > 1 else None
        pending = pool.submit(scores) if pool is not None else None
        tokens_out = None
        token_model = TokenModel.from_boosters(self.boosters)
        if token_model.fitted:
            # per query: (task, n_labels, length bucket) -> dense code; table over (call model, code)
            n_labels = np.minimum(block.core[:, STAT_COLUMNS.index("n_labels")].astype(np.int64), 63)
            bucket = np.clip(np.round(length_bucket(block.chars) * 4), 0, 255).astype(np.int64)
            uniq, qk = np.unique((task_inv * 64 + n_labels) * 256 + bucket, return_inverse=True)
            qk = qk.ravel()
            n_k = len(uniq)
            x = self.token_features(
                [m for m in call_models for _ in range(n_k)],
                [tasks_u[int(k) // 256 // 64] for k in uniq] * len(call_models),
                np.tile((uniq // 256 % 64).astype(np.float32), len(call_models)),
                np.tile(np.exp2((uniq % 256) / 4.0), len(call_models)),
                catalog,
            )
            mean, _p50, p90 = token_model.predict(x, self.threads_for(x.shape[0]))
            flat = mi * n_k + qk[qi]
            tokens_out = (mean[flat], p90[flat])
        cost = self.cost.predict_coded(
            call_models, tasks_u, mi, tq, block.chars[qi], block.has_labels[qi], catalog, tokens_out
        )
        if pending is not None and pool is not None:
            p, raw = pending.result()
            pool.shutdown()
        else:
            p, raw = scores()
        return pl.DataFrame(
            {
                "query_id": index["query_id"],
                "model": index["model"],
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

    def _pair_logits(
        self,
        block: QueryBlock,
        d: np.ndarray,
        qi: np.ndarray,
        mi: np.ndarray,
        tq: np.ndarray,
        prior_call: np.ndarray,
        weights: np.ndarray,
        covered: np.ndarray,
        call_models: list[str],
        neighbors: dict[str, list[tuple[str, float]]],
    ) -> np.ndarray:
        """beta_model . z(q, model) for every pair, without materializing z: the query-only columns of z
        are multiplied by every call model's betas once per query (n_q x C), then gathered per pair."""
        assert self.pair_model is not None
        betas = self.pair_model.beta_for(call_models, neighbors)  # (C, J)
        n_text2 = betas.shape[1] - len(PAIR_FEATURES)
        zq = np.column_stack([d, block.core[:, -2], block.core[:, -1], block.emb[:, :n_text2]]).astype(np.float32)
        q_cols = [2, 4, 5, *range(len(PAIR_FEATURES), betas.shape[1])]
        q_part = zq @ betas[:, q_cols].T.astype(np.float32)  # (n_q, C)
        prior_logit = logit(prior_call)  # (T_u, C)
        knn_call = (block.knn_acc @ weights.astype(np.float32)).astype(np.float32)  # (n_q, C)
        flat = qi * len(call_models) + mi
        knn_pair = knn_call.ravel()[flat]
        pair_tm = tq * len(call_models) + mi
        prior_pair_logit = prior_logit.astype(np.float32).ravel()[pair_tm]
        if not covered.all():
            uncovered = ~covered[mi]
            knn_pair[uncovered] = prior_call[tq[uncovered], mi[uncovered]]
        # same float32 operations in the same order as q + b0 + b1 * prior_logit + b3 * lift, in place; the
        # per-(task, model) products b1 * prior_logit come from a (T_u, C) table
        b = betas.astype(np.float32)
        lift = logit32(knn_pair)
        lift -= prior_pair_logit
        lift *= b[:, 3][mi]
        out = q_part.ravel()[flat]
        out += b[:, 0][mi]
        out += (b[:, 1][None, :] * prior_logit.astype(np.float32)).ravel()[pair_tm]
        out += lift
        return out.astype(np.float64)

    def token_features(
        self, models: list[str], tasks: list[str], n_labels: np.ndarray, chars: np.ndarray, catalog: PriceCatalog
    ) -> np.ndarray:
        """Rows of TOKEN_FEATURES for the token-quantile boosters (one per (model, task, n_labels, chars))."""
        names = sorted(set(models))
        unknown = [m for m in names if m not in set(self.models)]
        desc = (
            self.descriptors
            if not unknown
            else pl.concat([self.descriptors, describe_models(unknown, catalog.prices, {})])
        )
        rows = pl.DataFrame({"model": models}, schema={"model": pl.String}).join(
            desc, on="model", how="left", maintain_order="left"
        )
        return np.column_stack(
            [
                self.model_vocab.codes(rows["model"]),
                self.families.codes(rows["family"]),
                *(rows[c].fill_null(float("nan")).to_numpy() for c in ("log_price_in", "log_price_out", "log_size_b")),
                self.tasks.codes(pl.Series(tasks, dtype=pl.String)),
                n_labels,
                length_bucket(np.asarray(chars, dtype=np.float64)),
            ]
        ).astype(np.float32)

    def _neighbors(self, unknown: list[str], catalog: PriceCatalog) -> dict[str, list[tuple[str, float]]]:
        if not unknown:
            return {}
        desc = pl.concat([self.descriptors, describe_models(unknown, catalog.prices, {})])
        return nearest_models(desc, self.models, unknown)

    # ------------------------------------------------------------------ answers, persistence
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

    def save(self, storage: Storage, root_uri: str, version: str | None = None) -> str:
        """Write this predictor as ``root_uri/<version>/``; returns that URI (``registry.load`` reads it)."""
        return save(self, storage, root_uri, version)


def _rows_in_order(pair_ids: pl.Series, query_ids: pl.Series) -> np.ndarray | None:
    """Row of each pair's query when the pairs list the queries in their order, each query's pairs together
    (how batches are built): runs of equal ids, compared with the queries' ids, instead of a join; None
    otherwise (then the caller joins)."""
    if pair_ids.null_count() or query_ids.null_count() or pair_ids.dtype != query_ids.dtype:
        return None
    runs = pair_ids.rle()
    values = runs.struct.field("value")
    if len(values) != len(query_ids) or not values.equals(query_ids.rename(values.name)):
        return None
    if query_ids.n_unique() != len(query_ids):
        return None
    return np.repeat(np.arange(len(query_ids), dtype=np.int64), runs.struct.field("len").to_numpy())


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


__all__ = ["PAIR_FEATURES", "STAT_COLUMNS", "CostModel", "Predictor", "QueryBlock", "prepare_queries"]


# ---------------------------------------------------------------------- artifacts (read by registry.load)

FORMAT_VERSION = 2


def save(predictor: Predictor, storage: Storage, root_uri: str, version: str | None = None) -> str:
    fp = str(predictor.metadata.get("training_data", {}).get("fingerprint", "0" * 8))
    version = version or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{fp[:8]}"
    base = join(root_uri, version)
    text_meta, arrays = predictor.encoder.to_state()
    knn_meta: dict[str, Any] | None = None
    if predictor.retriever is not None:
        knn_meta, knn_arrays = predictor.retriever.to_state()
        arrays = {**arrays, **knn_arrays}
    for name, booster in sorted(predictor.boosters.items()):
        storage.write_text(join(base, f"booster_{name}.txt"), booster.model_to_string())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    storage.write_bytes(join(base, "arrays.npz"), buffer.getvalue())
    state = {
        "format": FORMAT_VERSION,
        "name": predictor.name,
        "seed": predictor.seed,
        "options": predictor.options,
        "text": text_meta,
        "tasks": predictor.tasks.values,
        "subjects": predictor.subjects.values,
        "models": predictor.model_vocab.values,
        "families": predictor.families.values,
        "descriptors": predictor.descriptors.to_dicts(),
        "priors": predictor.priors.to_state(),
        "cost": predictor.cost.to_state(),
        "confusions": predictor.confusions.to_dicts(),
        "catalog": {"prices": predictor.catalog.prices.to_dicts(), "billed": predictor.catalog.billed.to_dicts()},
        "calibrator": predictor.calibrator.to_state(),
        "retriever": knn_meta,
        "pair_model": predictor.pair_model.to_state() if predictor.pair_model is not None else None,
        "boosters": sorted(predictor.boosters),
        "feature_names": predictor.feature_names,
        "live_correction": predictor.live.to_state(),
    }
    storage.write_text(join(base, "state.json"), json.dumps(_strict(state), default=_json_default, allow_nan=False))
    metadata = {**predictor.metadata, "version": version, "format": FORMAT_VERSION}
    storage.write_text(
        join(base, "metadata.json"),
        json.dumps(_strict(metadata), indent=2, default=_json_default, allow_nan=False),
    )
    predictor.metadata = metadata
    return base


def _strict(value: Any) -> Any:
    """Standard JSON: NaN and infinities become null (readers restore NaN where a number is required)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
