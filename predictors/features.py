"""Query and model features, computed with polars and numpy, once per query and once per model.

Per query: text statistics, a TF-IDF (word uni+bigram) vector reduced by a randomized SVD fitted on the
training queries (stored with the artifact: vocabulary, idf, components), task, subject, number of labels.
Per model: descriptors (list prices, billed cost per prompt character, family and size parsed from the
name) that let a model with little or no history borrow from similar ones.
Pair rows are built by gathering the query and model rows, so scoring N queries x M models costs one
feature pass over N queries.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

STAT_COLUMNS = ("n_chars", "digit_share", "n_labels")
STATS_TAIL = 400  # digit share is measured on the prompt's tail (the part that differs between queries)
EMBED_SLICE_ROWS = 50_000  # texts the encoder tokenizes at once: bounds the token frames, feeds every core


# Per-model descriptors that let a model with little history borrow from similar ones.
DESCRIPTOR_SCHEMA = pl.Schema(
    {
        "model": pl.String(),
        "log_price_in": pl.Float64(),
        "log_price_out": pl.Float64(),
        "log_cost_per_kchar": pl.Float64(),
        "log_size_b": pl.Float64(),
        "family": pl.String(),
    }
)


def text_of(queries: pl.DataFrame) -> pl.Series:
    """The text the text features read: the prompt (system prompts are shared per task)."""
    return queries["prompt"].fill_null("")


def text_stats(queries: pl.DataFrame) -> pl.DataFrame:
    prompt = pl.col("prompt").fill_null("")
    n_chars = prompt.str.len_chars().cast(pl.Float32)
    return queries.select(
        n_chars.alias("n_chars"),
        (
            prompt.str.tail(STATS_TAIL).str.count_matches(r"[0-9]").cast(pl.Float32)
            / (pl.min_horizontal(n_chars, pl.lit(STATS_TAIL, dtype=pl.Float32)) + 1)
        ).alias("digit_share"),
        pl.col("labels").list.len().fill_null(0).cast(pl.Float32).alias("n_labels"),
    )


def _token_rows(texts: pl.Series, tail: int) -> pl.DataFrame:
    """(row, term): lower-cased whitespace tokens of the last ``tail`` characters of each text (the part
    that differs between queries: few-shot prefixes and instructions are shared and carry no signal)."""
    return (
        pl.DataFrame({"text": texts.fill_null("")})
        .with_row_index("row")
        .select(
            "row",
            pl.col("text")
            .str.tail(tail)
            .str.to_lowercase()
            .str.replace_all("\n", " ", literal=True)
            .str.split(" ")
            .alias("term"),
        )
        .explode("term")
    )


def _distinct(values: pl.Series) -> tuple[pl.Series, np.ndarray | None]:
    """(the distinct values, each row's index into them), or (``values``, None) when none repeats. Exact:
    polars groups by value (a hash table with equality checks), not by a hash alone."""
    if not values.hash().is_duplicated().any():  # distinct hashes are distinct values: no grouping to do
        return values, None
    groups = pl.DataFrame({"v": values}).with_row_index("row").group_by("v").agg(pl.col("row"))
    if groups.height == len(values):
        return values, None
    inverse = np.empty(len(values), dtype=np.int64)
    inverse[groups["row"].explode().to_numpy()] = np.repeat(
        np.arange(groups.height, dtype=np.int64), groups["row"].list.len().to_numpy()
    )
    return groups["v"], inverse


@dataclass
class TextEncoder:
    """TF-IDF over a fixed vocabulary (stable across library versions), reduced by SVD to ``dim`` dims."""

    vocab: list[str] = field(default_factory=list)
    idf: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    components: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    tail: int = 400

    @property
    def dim(self) -> int:
        return int(self.components.shape[1]) if self.components.ndim == 2 else 0

    @classmethod
    def fit(
        cls, texts: pl.Series, *, max_terms: int = 8192, dim: int = 32, min_df: int = 2, tail: int = 400, seed: int = 0
    ) -> TextEncoder:
        n_docs = len(texts)
        df = (
            _token_rows(texts, tail)
            .filter(pl.col("term").str.len_bytes() > 0)
            .unique()
            .group_by("term")
            .len("df")
            .filter(pl.col("df") >= min(min_df, max(n_docs, 1)))
            .sort(["df", "term"], descending=[True, False])
            .head(max_terms)
            .sort("term")
        )
        vocab = df["term"].to_list()
        idf = (np.log((1 + n_docs) / (1 + df["df"].to_numpy())) + 1).astype(np.float32)
        encoder = cls(vocab=vocab, idf=idf, components=np.zeros((len(vocab), 0), dtype=np.float32), tail=tail)
        if not vocab:
            return encoder
        x = encoder.tfidf(texts)
        encoder.components = _randomized_svd_components(x, min(dim, max(1, min(x.shape) - 1)), seed)
        return encoder

    def _terms(self) -> pl.Enum:
        """The vocabulary as an enum: a term's physical code is its index."""
        if not hasattr(self, "_enum"):
            self._enum = pl.Enum(self.vocab)
        return self._enum

    def tfidf(self, texts: pl.Series, normalize: bool = True) -> sp.csr_matrix:
        """Term counts x idf per text (csr). Tokens arrive in row order, so the matrix is built directly
        (duplicate (row, term) entries are left in: sparse products sum them). ``normalize`` merges them
        and scales rows to unit norm (for fitting; ``transform`` normalizes after projecting, which gives
        the same embedding, so it skips this)."""
        # terms outside the vocabulary cast to null; the enum's physical code is the vocabulary index
        terms = (
            _token_rows(texts, self.tail)
            .select("row", pl.col("term").cast(self._terms(), strict=False).to_physical().alias("col"))
            .drop_nulls("col")
        )
        rows = terms["row"].to_numpy()  # ascending: row boundaries by binary search, not a count per token
        cols = terms["col"].to_numpy().astype(np.int32)
        indptr = np.searchsorted(rows, np.arange(len(texts) + 1, dtype=rows.dtype)).astype(np.int64)
        x = sp.csr_matrix((self.idf[cols], cols, indptr), shape=(len(texts), len(self.vocab)))
        if normalize:
            x.sum_duplicates()
            row_of = np.repeat(np.arange(len(texts)), np.diff(x.indptr))
            norms = np.sqrt(np.bincount(row_of, weights=x.data.astype(np.float64) ** 2, minlength=len(texts)))
            x.data = (x.data / np.maximum(norms[row_of], 1e-12)).astype(np.float32)
        return x

    def transform(self, texts: pl.Series, slice_rows: int = EMBED_SLICE_ROWS) -> np.ndarray:
        """Unit-norm embeddings (n x dim), float32; zeros for texts with no known term.

        Tokenized once per distinct tail (the only part read): a batch that repeats prompts (the same
        question for many tenants, a benchmark resampling a history) pays for the distinct ones. A row's
        embedding depends on its own text only, so each row gets the bits it would get alone (``slice_rows`` at
        a time, on as many threads as polars has)."""
        if not self.vocab or self.dim == 0:
            return np.zeros((len(texts), 0), dtype=np.float32)
        tails, inverse = _distinct(texts.fill_null("").str.tail(self.tail))
        self._terms()  # made once, before the threads share it
        emb = np.empty((len(tails), self.dim), dtype=np.float32)

        def embed(start: int) -> None:
            part = np.asarray(self.tfidf(tails.slice(start, slice_rows), normalize=False) @ self.components, dtype=np.float32)
            part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
            emb[start : start + len(part)] = part

        # slices of rows on every core: tokenizing runs one thread per polars call, and a row's embedding
        # depends on that row alone, so the bits are the same however the rows are sliced
        starts = range(0, len(tails), slice_rows)
        if len(starts) == 1:
            embed(0)
        else:
            with ThreadPoolExecutor(max(1, min(len(starts), pl.thread_pool_size()))) as pool:
                list(pool.map(embed, starts))
        return emb if inverse is None else emb[inverse]

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"vocab": self.vocab, "tail": self.tail}, {"text_idf": self.idf, "text_components": self.components}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TextEncoder:
        return cls(
            vocab=list(meta["vocab"]),
            idf=arrays["text_idf"],
            components=arrays["text_components"],
            tail=int(meta["tail"]),
        )


def _randomized_svd_components(
    x: sp.csr_matrix, k: int, seed: int, oversample: int = 10, n_iter: int = 3
) -> np.ndarray:
    """Right singular vectors (terms x k) of ``x`` by a seeded randomized range finder (Halko et al.)."""
    rng = np.random.default_rng(seed)
    n_terms = x.shape[1]
    omega = rng.standard_normal((n_terms, k + oversample)).astype(np.float64)
    y = x @ omega
    q, _ = np.linalg.qr(y)
    for _ in range(n_iter):
        z, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ z)
    b = (x.T @ q).T  # (k+p) x terms
    _, _, vt = np.linalg.svd(b, full_matrices=False)
    comps = vt[:k].T
    # fix signs so that runs are identical whatever the LAPACK build returns
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    return (comps * np.where(signs == 0, 1, signs)).astype(np.float32)


@dataclass
class Vocabulary:
    """String -> integer code for LightGBM categorical features; unknown -> NaN (missing)."""

    values: list[str]

    def codes(self, series: pl.Series) -> np.ndarray:
        mapping = pl.DataFrame(
            {"v": self.values, "code": np.arange(len(self.values), dtype=np.float32)},
            schema={"v": pl.String, "code": pl.Float32},
        )
        frame = pl.DataFrame({"v": series.cast(pl.String)}).join(mapping, on="v", how="left", maintain_order="left")
        return frame["code"].fill_null(float("nan")).to_numpy().astype(np.float32)


# ---------------------------------------------------------------- model descriptors

FAMILIES = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4",
    "gpt-3.5",
    "claude-instant",
    "claude",
    "code-llama",
    "llama",
    "qwen",
    "mixtral",
    "mistral",
    "phi",
    "gemini",
    "yi",
    "wizardlm",
    "deepseek",
    "gemma",
    "command",
)


def parse_family(model: str) -> str:
    name = model.lower().rsplit("/", 1)[-1]
    for family in FAMILIES:
        if family in name:
            return family
    match = re.match(r"[a-z]+", name)
    return match.group(0) if match else "unknown"


def parse_size_b(model: str) -> float:
    """Parameter count in billions from names like 'llama3.1-70b', 'mixtral-8x7b', 'Yi-34B'; NaN if absent."""
    name = model.lower()
    moe = re.search(r"(\d+)x(\d+(?:\.\d+)?)b(?![a-z])", name)
    if moe:
        return float(moe.group(1)) * float(moe.group(2))
    dense = re.findall(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)b(?![a-z])", name.replace("_", "-"))
    if not dense:
        dense = re.findall(r"(\d+(?:\.\d+)?)b(?![a-z])", name)
    return float(dense[-1]) if dense else float("nan")


def _log10(value: float | None) -> float:
    return math.log10(value) if value is not None and value > 0 and math.isfinite(value) else float("nan")


def describe_models(models: list[str], prices: pl.DataFrame, cost_per_kchar: dict[str, float]) -> pl.DataFrame:
    """One row per model: log list prices (catalog), log billed cost per 1k prompt characters (history),
    log size, family. Missing values are NaN (LightGBM's missing)."""
    price = {r["model"]: r for r in prices.iter_rows(named=True)}
    rows = []
    for model in models:
        p = price.get(model, {})
        rows.append(
            {
                "model": model,
                "log_price_in": _log10(p.get("usd_per_mtok_in")),
                "log_price_out": _log10(p.get("usd_per_mtok_out")),
                "log_cost_per_kchar": _log10(cost_per_kchar.get(model)),
                "log_size_b": _log10(parse_size_b(model)),
                "family": parse_family(model),
            }
        )
    return pl.DataFrame(
        rows,
        schema=DESCRIPTOR_SCHEMA,
    ).with_columns(pl.col(pl.Float64).fill_nan(None).fill_null(float("nan")))
