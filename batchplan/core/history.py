"""Outcome histories: load, validate, split, and generate synthetic ones shaped like the real data.

A history is what past runs (or other teams) recorded: per query, what each model answered, whether it
was right and what it cost. It trains the predictor and drives the replay dispatcher.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import structlog

from batchplan.core.contracts import (
    HISTORY_QUERIES_SCHEMA,
    MODELS_SCHEMA,
    OUTCOMES_SCHEMA,
    SILVER,
    ContractError,
    conform,
)
from batchplan.core.numerics import sigmoid
from batchplan.core.storage import Storage, join

log = structlog.get_logger("batchplan.core.history")


@dataclass(frozen=True)
class History:
    queries: pl.DataFrame  # HISTORY_QUERIES_SCHEMA
    outcomes: pl.DataFrame  # OUTCOMES_SCHEMA
    prices: pl.DataFrame  # MODELS_SCHEMA; may lack models (then cost comes from billed means)

    @property
    def models(self) -> list[str]:
        return sorted(self.outcomes["model"].unique().to_list())

    @property
    def datasets(self) -> list[str]:
        return sorted(self.queries["dataset"].unique().to_list())

    def subset(self, query_ids: pl.Series | Sequence[str]) -> History:
        ids = pl.Series("query_id", query_ids, dtype=pl.String)
        return History(
            queries=self.queries.filter(pl.col("query_id").is_in(ids.implode())),
            outcomes=self.outcomes.filter(pl.col("query_id").is_in(ids.implode())),
            prices=self.prices,
        )

    def split(self, name: str) -> History:
        return self.subset(self.queries.filter(pl.col("split") == name)["query_id"])

    def as_queue(self, split: str | None = None) -> pl.DataFrame:
        """The history's queries as a queue (QUEUE_SCHEMA), tenant = data set: how the demo, the
        benchmarks and cross-fitting replay real data."""
        queries = self.queries if split is None else self.queries.filter(pl.col("split") == split)
        return queries.select(
            "query_id",
            "prompt",
            "system_prompt",
            "labels",
            pl.col("task").fill_null("default"),
            pl.col("dataset").alias("tenant"),
            pl.lit(1.0).alias("priority"),
        )


def load_history(dirs: str | Sequence[str], storage: Storage | None = None) -> History:
    """Load and concatenate one or more history directories (local or s3://)."""
    storage = storage or Storage()
    paths = [dirs] if isinstance(dirs, str) else list(dirs)
    if not paths:
        raise ContractError("no history directory given")
    parts = [_load_one(p, storage) for p in paths]
    _warn_price_conflicts([(path, h.prices) for path, h in zip(paths, parts, strict=True)])
    return combine_histories(parts)


def combine_histories(parts: Sequence[History]) -> History:
    """One history from several: the first occurrence of a query, of a (query, model) outcome and of a
    model's prices wins. Columns some parts lack (a run's ``weight``, ``label_source``) are null in the rest."""
    return History(
        queries=pl.concat([h.queries for h in parts], how="diagonal_relaxed").unique(
            "query_id", keep="first", maintain_order=True
        ),
        outcomes=pl.concat([h.outcomes for h in parts], how="diagonal_relaxed").unique(
            ["query_id", "model"], keep="first", maintain_order=True
        ),
        prices=pl.concat([h.prices for h in parts], how="diagonal_relaxed").unique(
            "model", keep="first", maintain_order=True
        ),
    )


def without_silver(history: History) -> History:
    """The history with no silver outcome (an audit's reference answer, not a label): what may be replayed
    as the truth (templates, the round posterior), where a silver verdict would count as gold."""
    if "label_source" not in history.outcomes.columns:
        return history
    kept = history.outcomes.filter(pl.col("label_source").fill_null("") != SILVER)
    return History(queries=history.queries, outcomes=kept, prices=history.prices)


def _warn_price_conflicts(prices: list[tuple[str, pl.DataFrame]]) -> None:
    """Histories may list one model at different prices (sources priced at different dates, e.g. gpt-4o at its
    launch price and after a cut): the first is kept for cost estimates from token counts, so say which, in one
    line, rather than pick silently. Replay bills each query's recorded cost whatever the list says."""
    listed = pl.concat(
        [frame.with_columns(pl.lit(path.rstrip("/").rsplit("/", 1)[-1]).alias("history")) for path, frame in prices]
    ).filter(pl.col("usd_per_mtok_in").is_not_null() | pl.col("usd_per_mtok_out").is_not_null())
    by_price = listed.group_by("model", "usd_per_mtok_in", "usd_per_mtok_out", maintain_order=True).agg("history")
    for (model,), group in by_price.group_by("model", maintain_order=True):
        if group.height < 2:
            continue
        listed_at = [(f"${_price(pin)}/${_price(pout)}", ", ".join(hs)) for _, pin, pout, hs in group.iter_rows()]
        where = "; ".join(f"{price} in {histories}" for price, histories in listed_at)
        message = (
            f"{model} is listed at {group.height} prices per Mtok in/out ({where}): cost estimates from token "
            f"counts use {listed_at[0][0]}; replay bills each query's recorded cost"
        )
        if message not in _SAID:  # a job loads the same histories more than once (train, replay): say it once
            _SAID.add(message)
            log.warning(message, code="history.price_conflict")


_SAID: set[str] = set()


def _price(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _load_one(path: str, storage: Storage) -> History:
    queries_uri, outcomes_uri, models_uri = (
        join(path, f) for f in ("queries.parquet", "outcomes.parquet", "models.csv")
    )
    for uri in (queries_uri, outcomes_uri):
        if not storage.exists(uri):
            raise ContractError(
                f"history {path!r}: {uri.rsplit('/', 1)[-1]} is missing (expected queries.parquet + outcomes.parquet [+ models.csv])"
            )
    queries = conform(
        storage.read_frame(queries_uri), HISTORY_QUERIES_SCHEMA, name=queries_uri, required=("query_id", "prompt")
    )
    outcomes = conform(
        storage.read_frame(outcomes_uri),
        OUTCOMES_SCHEMA,
        name=outcomes_uri,
        required=("query_id", "model", "correct", "cost_usd"),
    )
    prices = (
        conform(storage.read_frame(models_uri), MODELS_SCHEMA, name=models_uri, required=("model",))
        if storage.exists(models_uri)
        else pl.DataFrame(schema=MODELS_SCHEMA)
    )
    queries = queries.with_columns(
        pl.col("dataset").fill_null(path.rstrip("/").rsplit("/", 1)[-1]),
        pl.col("task").fill_null("default"),
        pl.col("split").fill_null("train"),
    )
    return History(queries=queries, outcomes=outcomes, prices=prices)


def history_dirs(root: str | Path) -> list[str]:
    """The outcome histories under ``root``: each sub-directory holding a ``queries.parquet`` (sorted; none
    if ``root`` is not a directory)."""
    path = Path(root)
    return sorted(str(p.parent) for p in path.glob("*/queries.parquet")) if path.is_dir() else []


def stable_fold(keys: Iterable[str], folds: int, seed: int = 0, salt: str = "") -> np.ndarray:
    """Each key's fold in [0, folds): crc32 of ``"<seed>:<salt><key>"``. crc32, not polars' or Python's hash,
    so a split never moves between library versions, processes or machines.

    Another ``salt`` or ``seed`` does not give an independent split: crc32 is affine, so for keys of one
    length a different prefix XORs every key's crc32 with one constant. With a power-of-two ``folds`` that only
    renumbers the same folds (per key length): the predictor's 4 folds (no salt) and the templates' 4
    cross-fit folds (``"cf:"``) are one partition, so a predictor trained inside a cross-fit fold finds one of
    its own folds empty (``predictors/training.py`` skips it; ``round_choice`` relies on the same). With other
    counts (the posterior's 5 folds, ``with_holdout``'s 10,000 buckets) the folds differ, though not as
    independent draws would."""
    return np.fromiter((zlib.crc32(f"{seed}:{salt}{k}".encode()) % folds for k in keys), dtype=np.int64)


def with_holdout(history: History, fraction: float = 0.3, seed: int = 0, start: float = 0.0) -> History:
    """Give every data set that has no test split one, carved from its train split by a stable hash of query_id:
    the queries whose hash bucket (uniform in [0, 1)) falls in [start, start + fraction)."""
    has_test = history.queries.group_by("dataset").agg((pl.col("split") == "test").any().alias("has_test"))
    bucket = pl.Series(stable_fold(history.queries["query_id"].to_list(), 10_000, seed) / 10_000)
    queries = (
        history.queries.with_columns(bucket.alias("_bucket"))
        .join(has_test, on="dataset")
        .with_columns(
            pl.when(
                ~pl.col("has_test")
                & (pl.col("split") == "train")
                & pl.col("_bucket").is_between(start, start + fraction, closed="left")
            )
            .then(pl.lit("test"))
            .otherwise(pl.col("split"))
            .alias("split")
        )
        .drop("has_test", "_bucket")
    )
    return History(queries=queries, outcomes=history.outcomes, prices=history.prices)


def cross_validation_fold(history: History, folds: int, fold: int, seed: int = 0) -> History:
    """Fold ``fold`` of ``folds`` as the test split of every data set without one: the folds partition those
    queries. The width is end - start, not 1 / folds: 0.4 + 0.2 != 0.6 in floating point, and a query on a
    boundary would land in two folds."""
    start, end = fold / folds, (fold + 1) / folds
    return with_holdout(history, end - start, seed, start=start)


def synthetic_history(
    n_queries: int = 2_000,
    n_models: int = 10,
    *,
    n_tasks: int = 3,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> History:
    """A history shaped like ``../shared/data``: costs spanning ~100x, accuracy rising with cost, per-query
    difficulty and per-(task, model) skill so that different models are right on different queries.

    Used where the real data is absent and for scale tests; never presented as real.
    """
    rng = np.random.default_rng(seed)
    models = [f"synth-{i:02d}" for i in range(n_models)]
    price_in = np.geomspace(0.05, 5.0, n_models)  # USD per Mtok: 100x span
    price_out = price_in * 3
    skill = np.linspace(-0.3, 2.2, n_models)  # dearer models are better on average
    task_names = [f"task{t}" for t in range(n_tasks)]
    task_skill = rng.normal(0, 0.6, size=(n_tasks, n_models))
    labels_by_task = [["A", "B", "C", "D"][: 2 + (t % 3)] for t in range(n_tasks)]

    task = rng.integers(0, n_tasks, n_queries)
    difficulty = rng.normal(0, 1.2, n_queries)
    length = rng.lognormal(5.0, 0.6, n_queries).astype(np.int64) + 20
    words = np.array(
        ["invoice", "refund", "legal", "router", "error", "account", "shipping", "medical", "code", "policy"]
    )
    query_ids = [f"syn-{i:07d}" for i in range(n_queries)]
    prompts = [
        " ".join(rng.choice(words, size=3 + (length[i] // 40)))
        + f" #{i} difficulty-hint {'hard' if difficulty[i] > 1 else 'easy'}"
        for i in range(n_queries)
    ]
    gold = [labels_by_task[t][rng.integers(0, len(labels_by_task[t]))] for t in task]
    queries = pl.DataFrame(
        {
            "query_id": query_ids,
            "dataset": "synthetic",
            "task": [task_names[t] for t in task],
            "split": np.where(rng.random(n_queries) < test_fraction, "test", "train"),
            "subject": None,
            "system_prompt": None,
            "prompt": prompts,
            "labels": [labels_by_task[t] for t in task],
            "gold": gold,
        },
        schema=HISTORY_QUERIES_SCHEMA,
    )
    logit = skill[None, :] + task_skill[task] - difficulty[:, None] + rng.normal(0, 0.7, (n_queries, n_models))
    p = sigmoid(logit)
    correct = rng.random((n_queries, n_models)) < p
    tokens_in = (length[:, None] // 4 + rng.integers(0, 5, (n_queries, n_models))).astype(np.int64)
    tokens_out = rng.integers(1, 4, (n_queries, n_models)).astype(np.int64)
    cost = (tokens_in * price_in[None, :] + tokens_out * price_out[None, :]) / 1e6
    answers: list[str] = []
    for i in range(n_queries):
        labels = labels_by_task[task[i]]
        wrong = [lab for lab in labels if lab != gold[i]]
        answers.extend(gold[i] if correct[i, j] else wrong[rng.integers(0, len(wrong))] for j in range(n_models))
    outcomes = pl.DataFrame(
        {
            "query_id": np.repeat(query_ids, n_models),
            "model": np.tile(models, n_queries),
            "answer": answers,
            "correct": correct.ravel(),
            "cost_usd": cost.ravel(),
            "tokens_in": tokens_in.ravel(),
            "tokens_out": tokens_out.ravel(),
            "latency_ms": None,
            "logprob": np.log(np.clip(np.where(correct, p, 1 - p) * 0.9 + 0.05, 1e-6, 1)).ravel(),
        },
        schema=OUTCOMES_SCHEMA,
    )
    prices = pl.DataFrame(
        {"model": models, "usd_per_mtok_in": price_in, "usd_per_mtok_out": price_out}, schema=MODELS_SCHEMA
    )
    return History(queries=queries, outcomes=outcomes, prices=prices)
