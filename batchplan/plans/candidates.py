"""Plan candidates: the one place that knows how a plan's cost and accuracy follow from per-model predictions.

A candidate is something the optimizer may choose for a query: one model, a vote, a cascade or an agreement
cascade (see ``plan_simulation`` for their semantics and ``plan_templates`` for how templates are chosen
and fitted). The optimizer sees only the generic options table built here (query index, value, cost,
accuracy, groups).

Candidates are arrays: each carries a template id (an integer into the batch's templates table, where a
single model is a template of one member) and its numbers; the members' names are joined only where a person
reads them (the chosen plan rows). At 1M queries x 11 LLMs that is ~16M candidates in a few hundred MB.

For a template with members m_1..m_k on query q, with the predictor's P(correct) p_i and cost c_i:
- expected accuracy = the template's calibrated estimate (``plan_estimates.estimate``, on the members'
  P(correct)), less one standard error of its training accuracy (a lower
  confidence bound: see ``Template.standard_error``);
- expected cost = sum_i P(m_i is called) c_i, with P(called) = 1 for a vote's members and for the first
  member(s) of a cascade, and the fitted escalation model for the later ones;
- reserve (what the dispatcher holds before calling) = sum_i of the members' high-side costs: the whole
  escalation path is reserved up front;
- spend variance = sum_i P(called) sd_i^2 + P(called)(1 - P(called)) c_i^2 (sd_i from the call's p90).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl

from batchplan.plans.estimates import Template, estimate
from batchplan.plans.templates import PlanTemplates

PARALLEL_CANDIDATES = 1_000_000  # candidates from which two threads fill them (below, threads mostly wait)
CANDIDATE_BLOCK = 16_384  # queries filled at a time: a block's candidates (~16 per query) fit in cache
P90_Z = 1.2816  # a call's high-side cost is its p90: sd ~ (p90 - mean) / z_0.9
TEMPLATES_SCHEMA = pl.Schema(
    [
        ("template", pl.Int32),
        ("kind", pl.String),
        ("models", pl.List(pl.String)),
        ("thresholds", pl.List(pl.Float64)),  # as PLAN_SCHEMA's
        ("task", pl.String),  # null: a single model, offered for every task
        ("members", pl.List(pl.Int32)),  # LLM indices into Candidates.llms
    ]
)


@dataclass(frozen=True)
class Candidates:
    """``plans``: one row per candidate, sorted by (query, template): ``query`` (dense index), ``option``
    (unique id, ascending), ``template`` (id into ``templates``), expected_cost_usd, expected_accuracy,
    reserve_cost_usd and ``cost_var`` (variance of the plan's spend, for the chance-constrained budget).
    ``templates``: TEMPLATES_SCHEMA, one row per id (= row index); ids follow (kind, models), so a query's
    candidates come in the order of their names.
    ``queries``: query_id, query (dense index = row index), tenant, task, priority.
    ``llms``: the LLM names, by index."""

    plans: pl.DataFrame
    queries: pl.DataFrame
    templates: pl.DataFrame
    llms: tuple[str, ...]

    def keep(self, mask: np.ndarray | pl.Series | pl.Expr) -> Candidates:
        """The candidates where ``mask`` holds (option ids kept: they stay unique and ascending)."""
        return dataclasses.replace(self, plans=self.plans.filter(mask))

    def is_single(self) -> np.ndarray:
        """Per candidate: whether it calls one model once."""
        return (self.templates["kind"] == "single").to_numpy()[self.plans["template"].to_numpy()]

    def codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """A string query attribute as integer codes per query, and the sorted labels they index."""
        labels = sorted(self.queries[column].unique().to_list())
        return self.queries[column].cast(pl.Enum(labels)).to_physical().to_numpy().astype(np.int64), labels

    def calls(self) -> np.ndarray:
        """(templates, llms): how many times each template may call each LLM."""
        out = np.zeros((self.templates.height, len(self.llms)), dtype=np.int64)
        members = self.templates.select(pl.col("template"), pl.col("members")).explode("members").drop_nulls()
        np.add.at(out, (members["template"].to_numpy(), members["members"].to_numpy()), 1)
        return out

    def per_candidate(self, column: str) -> pl.Series:
        """A query attribute repeated over the candidates (string columns as categorical codes, not strings)."""
        values = self.queries[column]
        if values.dtype == pl.String:
            values = values.cast(pl.Categorical)
        return values.gather(self.plans["query"]).alias(column)

    def named(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` (with a ``template`` column) plus the template's kind, member names and thresholds, row by
        row (ids are row positions in ``templates``: a gather, not a join)."""
        names = self.templates.select("kind", "models", "thresholds")[frame["template"].to_numpy()]
        return frame.hstack(names.get_columns())

    def options(self, extra_columns: tuple[str, ...] = (), groups: Sequence[str] = ("tenant", "task")) -> pl.DataFrame:
        """The optimizer's options table: query, option, value (priority x accuracy), cost, accuracy, the
        query attributes ``groups`` (what group constraints count by) and ``extra_columns``."""
        priority = self.queries["priority"].cast(pl.Float64).gather(self.plans["query"])
        return self.plans.select(
            "query",
            "option",
            (priority * self.plans["expected_accuracy"]).alias("value"),
            pl.col("expected_cost_usd").alias("cost"),
            pl.col("expected_accuracy").alias("accuracy"),
            *(self.per_candidate(g) for g in groups),
            *extra_columns,
        )


class _Entry(NamedTuple):
    kind: str
    models: list[str]
    thresholds: list[float] | None
    task: str | None
    members: list[int]
    template: Template | None  # None: a single model


class _Wide(NamedTuple):
    """Per (query, LLM) matrices of the predictions; NaN where the pair is not offered."""

    present: np.ndarray
    p: np.ndarray
    cost: np.ndarray
    high: np.ndarray  # the call's high-side cost, at least its expected cost
    sd: np.ndarray


def _with_query(queries: pl.DataFrame, predictions: pl.DataFrame) -> pl.DataFrame:
    """``predictions`` with each row's query index. Predictions grouped by query in queue order (as
    ``pipeline.predict`` makes them) get it from the runs of equal ids, a cheap pass; any other order from a
    join on the id (hashing 10M+ strings costs seconds at 1M queries)."""
    runs = predictions["query_id"].rle()  # (len, value) per run: the values are the runs' ids, no gather
    if len(runs) == queries.height and runs.struct.field("value").equals(queries["query_id"]):
        lengths = runs.struct.field("len").to_numpy()
        return predictions.with_columns(pl.Series("query", np.repeat(np.arange(len(runs), dtype=np.int64), lengths)))
    return predictions.join(queries.select("query_id", "query"), on="query_id")


def _wide(queries: pl.DataFrame, predictions: pl.DataFrame, llms: list[str]) -> _Wide:
    pairs = _with_query(queries, predictions).select(
        "query",
        pl.col("model").cast(pl.Enum(llms)).to_physical().alias("m"),
        "p_correct",
        "cost_usd",
        "cost_high_usd",
    )
    shape = (queries.height, len(llms))
    rows, cols = pairs["query"].to_numpy(), pairs["m"].to_numpy()
    # every query offered every LLM, query by query in name order (as ``pipeline.predict`` makes them): the
    # pairs are already the row-major grid, so a reshape replaces the fill and the scatter
    dense = pairs.height == shape[0] * shape[1] and bool(
        (rows.reshape(shape) == np.arange(shape[0])[:, None]).all()
        and (cols.reshape(shape) == np.arange(shape[1], dtype=cols.dtype)).all()
    )

    def spread(values: np.ndarray, fill: float | bool) -> np.ndarray:
        if dense:
            return np.asfortranarray(values.reshape(shape))
        # written row-major (predictions come query by query: sequential writes), then made column-major (one
        # LLM's column contiguous, as the per-template gathers read them) by one blocked copy: scattering
        # straight into column-major arrays strides by n per pair and missed the cache on every write
        out = np.full(shape, fill, dtype=values.dtype)
        out[rows, cols] = values
        return np.asfortranarray(out)

    present = spread(np.ones(len(rows), dtype=bool), False)
    cost_pairs = pairs["cost_usd"].to_numpy()
    p = spread(pairs["p_correct"].to_numpy(), np.nan)
    cost = spread(cost_pairs, np.nan)
    high = spread(np.maximum(pairs["cost_high_usd"].fill_null(0.0).to_numpy(), cost_pairs), np.nan)
    return _Wide(present, p, cost, high, (high - cost) / P90_Z)


def build_candidates(
    queue: pl.DataFrame,
    predictions: pl.DataFrame,
    templates: PlanTemplates | None = None,
    kinds: Sequence[str] | None = None,
) -> Candidates:
    """One candidate per (query, offered model) (call that model once), plus every fitted vote/cascade
    template whose members the backend offers for the query; ``kinds`` limits the plan kinds."""
    queries = queue.select("query_id", "tenant", "task", "priority").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("query")
    )
    llms = sorted(predictions["model"].unique().to_list())
    index = {m: j for j, m in enumerate(llms)}
    entries: list[_Entry] = []
    if kinds is None or "single" in kinds:
        entries += [_Entry("single", [m], None, None, [j], None) for j, m in enumerate(llms)]
    for fitted in templates.templates if templates is not None else []:
        if (kinds is None or fitted.kind in kinds) and all(m in index for m in fitted.models):
            members = [index[m] for m in fitted.models]
            entries.append(_Entry(fitted.kind, list(fitted.models), fitted.thresholds or None, fitted.task, members, fitted))
    # ids in (kind, models) order, ties (a cascade's threshold variants) in fitting order
    entries = [entries[i] for i in sorted(range(len(entries)), key=lambda i: (entries[i].kind, entries[i].models, i))]
    table = pl.DataFrame(
        {
            "template": np.arange(len(entries), dtype=np.int32),
            "kind": [e.kind for e in entries],
            "models": [e.models for e in entries],
            "thresholds": [e.thresholds for e in entries],
            "task": [e.task for e in entries],
            "members": [e.members for e in entries],
        },
        schema=TEMPLATES_SCHEMA,
    )
    wide = _wide(queries, predictions, llms)
    tasks = sorted(queries["task"].unique().to_list())
    task_of = queries["task"].cast(pl.Enum(tasks)).to_physical().to_numpy()
    eligible = [np.zeros(queries.height, dtype=bool) for _ in entries]
    for t, e in enumerate(entries):
        if e.template is None:
            eligible[t] = wide.present[:, e.members[0]]
        elif e.task in tasks:
            eligible[t] = (task_of == tasks.index(e.task)) & np.isfinite(wide.p[:, e.members]).all(axis=1)
    # candidate (q, t) sits at row starts[q] + (eligible templates of q before t): (query, template) order, no sort
    counts = np.zeros(queries.height, dtype=np.int64)
    for mask in eligible:
        counts += mask
    starts = np.zeros(queries.height, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    total = int(counts.sum())
    template_id = np.empty(total, dtype=np.int32)
    out = {c: np.empty(total) for c in ("expected_cost_usd", "expected_accuracy", "reserve_cost_usd", "cost_var")}
    places: list[tuple[np.ndarray, np.ndarray]] = []
    for mask in eligible:
        rows = np.flatnonzero(mask)
        places.append((rows, starts[rows]))
        starts[rows] += 1  # the next eligible template of these queries goes one row further
    # work block by block of queries, every template within a block: the writes land in one block's stretch
    # of the output (cache-resident) instead of striding over all of it per template, and the temporaries
    # stay small enough to reuse the heap (at 1M queries x 23 templates, whole-batch temporaries cost
    # seconds of page faults); results are the same element by element
    edges = np.arange(0, queries.height + CANDIDATE_BLOCK, CANDIDATE_BLOCK)
    cuts = [np.searchsorted(rows, edges) for rows, _ in places]

    def fill(b: int) -> None:
        for t, e in enumerate(entries):
            lo, hi = cuts[t][b], cuts[t][b + 1]
            if lo == hi:
                continue
            rows, at = places[t][0][lo:hi], places[t][1][lo:hi]
            template_id[at] = t
            values = _single(wide, rows, e.members[0]) if e.template is None else _template(wide, rows, e)
            for column, v in zip(out, values, strict=True):
                out[column][at] = v

    # blocks write disjoint rows: on big batches two threads fill them (numpy releases the GIL)
    blocks = range(len(edges) - 1)
    if total >= PARALLEL_CANDIDATES:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(fill, blocks))
    else:
        for b in blocks:
            fill(b)
    plans = pl.DataFrame(
        {
            "query": np.repeat(np.arange(queries.height, dtype=np.int64), counts),
            "option": np.arange(total, dtype=np.int64),
            "template": template_id,
            **out,
        }
    )
    return Candidates(plans=plans, queries=queries, templates=table, llms=tuple(llms))


def _single(wide: _Wide, rows: np.ndarray, m: int) -> tuple[np.ndarray, ...]:
    """(expected cost, accuracy, reserve, spend variance) of calling LLM ``m`` once."""
    return wide.cost[rows, m], wide.p[rows, m], wide.high[rows, m], wide.sd[rows, m] ** 2


def _template(wide: _Wide, rows: np.ndarray, entry: _Entry) -> tuple[np.ndarray, ...]:
    """(expected cost, accuracy, reserve, spend variance) of a vote or cascade on ``rows``."""
    assert entry.template is not None
    idx = np.array(entry.members)
    accuracy, called = estimate(entry.template, wide.p[np.ix_(rows, idx)])
    member_cost = wide.cost[np.ix_(rows, idx)]
    member_sd = wide.sd[np.ix_(rows, idx)]
    # spend of a plan: each call's own uncertainty, plus whether the later members are called at all
    variance = (called * member_sd**2 + called * (1 - called) * member_cost**2).sum(axis=1)
    return (member_cost * called).sum(axis=1), accuracy, wide.high[np.ix_(rows, idx)].sum(axis=1), variance
