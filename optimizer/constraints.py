"""Constraint specs: small named pieces, each turning the options table into coupling rows.

Every spec produces one or more *rows* ``sum over chosen options of coef <= / >= rhs``, compiled into a
``RowFamily`` over the program's columns (see ``optimizer.compiled``).

| spec | rows | sense |
|---|---|---|
| ``Budget(limit)`` | total ``cost`` | <= |
| ``GroupBudget(group, limits)`` | ``cost`` per value of a group column (e.g. tenant) | <= |
| ``Capacity(column, limit, group=None)`` | any resource column (calls, tokens), globally or per group (model) | <= |
| ``AccuracyFloor(min_mean, group=None)`` | mean ``accuracy`` over all queries (or per group); a deferred query counts 0 | >= |
| ``Allowed(column)`` | not a row: drops options whose boolean column is false (data residency, allowed models) | |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from batchplan.optimizer.compiled import Compiled, RowFamily

__all__ = ["AccuracyFloor", "Allowed", "Budget", "Capacity", "Constraint", "GroupBudget", "RowFamily", "RowSpec", "constraint_name"]


def _group_ids(program: Compiled, column: str, keys: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Map a group column of the options table to row ids over program columns (deferral columns get -1).

    Works on integer codes (categorical physical codes, or codes of a one-off categorical cast) so a
    10M-row table costs one hash pass, not a string join.
    """
    values = program.column(column)
    if values.dtype not in (pl.Categorical,) and not isinstance(values.dtype, pl.Enum):
        values = values.cast(pl.String).cast(pl.Categorical)
    codes = values.to_physical()
    distinct = values.unique()
    labels_all = distinct.cast(pl.String).fill_null("<null>").to_list()
    uniques = sorted(labels_all) if keys is None else list(keys)
    position = {k: i for i, k in enumerate(uniques)}
    pair_codes = distinct.to_physical().fill_null(-1).to_numpy().astype(np.int64)
    pair_gid = np.array([position.get(lab, -1) for lab in labels_all], dtype=np.int32)
    order = np.argsort(pair_codes)
    sorted_codes = pair_codes[order]
    code_arr = codes.fill_null(-1).to_numpy().astype(np.int64, copy=False)
    gid = pair_gid[order][np.searchsorted(sorted_codes, code_arr)]
    return program.expand(gid, fill=-1).astype(np.int32, copy=False), uniques


@dataclass(frozen=True)
class Budget:
    """Total expected ``column`` (default: cost) of the chosen options <= ``limit``."""

    limit: float
    name: str = "budget"
    column: str = "cost"

    def rows(self, program: Compiled) -> RowFamily:
        coef = program.expand(program.column(self.column).to_numpy().astype(np.float64, copy=False), fill=0.0)
        return RowFamily(self.name, "budget", "<=", [self.name], np.array([float(self.limit)]), coef,
                         np.zeros(program.m, dtype=np.int32))


@dataclass(frozen=True)
class GroupBudget:
    """Per value of ``group`` (e.g. tenant): total ``column`` (cost) <= ``limits[value]``; other values free."""

    group: str
    limits: Mapping[str, float]
    name: str = "group_budget"
    column: str = "cost"

    def rows(self, program: Compiled) -> RowFamily:
        keys = [str(k) for k in self.limits]
        gid, labels = _group_ids(program, self.group, keys)
        coef = program.expand(program.column(self.column).to_numpy().astype(np.float64, copy=False), fill=0.0)
        names = [f"{self.name}[{k}]" for k in labels]
        rhs = np.array([float(self.limits[k]) for k in self.limits])
        return RowFamily(self.name, "group_budget", "<=", names, rhs, coef, gid)


@dataclass(frozen=True)
class Capacity:
    """A resource column (calls, tokens ...) summed over chosen options <= limit.

    ``limit`` a number: one global row. ``group`` set (e.g. "model") and ``limit`` a mapping: one row per
    listed group value (e.g. per-model tokens in the run's window); unlisted values are unconstrained.
    """

    column: str
    limit: float | Mapping[str, float]
    group: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or (f"capacity:{self.column}" if self.group is None else f"capacity:{self.column}:{self.group}")

    def rows(self, program: Compiled) -> RowFamily:
        coef = program.expand(program.column(self.column).to_numpy().astype(np.float64, copy=False), fill=0.0)
        if self.group is None:
            if isinstance(self.limit, Mapping):
                raise ValueError(f"{self.label}: a per-group limit mapping needs group=<column>")
            return RowFamily(self.label, "capacity", "<=", [self.label], np.array([float(self.limit)]), coef,
                             np.zeros(program.m, dtype=np.int32))
        if not isinstance(self.limit, Mapping):
            raise ValueError(f"{self.label}: group={self.group!r} needs limit as a mapping group value -> limit")
        keys = [str(k) for k in self.limit]
        gid, labels = _group_ids(program, self.group, keys)
        names = [f"{self.label}[{k}]" for k in labels]
        rhs = np.array([float(self.limit[k]) for k in self.limit])
        return RowFamily(self.label, "capacity", "<=", names, rhs, coef, gid)


@dataclass(frozen=True)
class AccuracyFloor:
    """Mean expected ``column`` (accuracy) >= ``min_mean``, over all queries or per value of ``group``.

    The mean is over every query of the group, deferred ones counting 0 (a deferred query answers nothing).
    ``group`` should be a query attribute (task, tenant). ``min_mean`` a mapping: floors only for listed values.
    """

    min_mean: float | Mapping[str, float]
    group: str | None = None
    name: str | None = None
    column: str = "accuracy"

    @property
    def label(self) -> str:
        return self.name or ("accuracy_floor" if self.group is None else f"accuracy_floor:{self.group}")

    def rows(self, program: Compiled) -> RowFamily:
        coef = program.expand(program.column(self.column).to_numpy().astype(np.float64, copy=False), fill=0.0)
        if self.group is None:
            if isinstance(self.min_mean, Mapping):
                raise ValueError(f"{self.label}: a per-group floor mapping needs group=<column>")
            rhs = np.array([float(self.min_mean) * program.n])
            return RowFamily(self.label, "accuracy_floor", ">=", [self.label], rhs, coef,
                             np.zeros(program.m, dtype=np.int32), np.array([float(program.n)]))
        if isinstance(self.min_mean, Mapping):
            floors = {str(k): float(v) for k, v in self.min_mean.items()}
            gid, labels = _group_ids(program, self.group, list(floors))
        else:
            gid, labels = _group_ids(program, self.group, None)
            floors = {k: float(self.min_mean) for k in labels}
        # queries per group: a query belongs to the group of its first real option
        first = program.starts[:-1][np.diff(program.starts) > 0]
        counts = np.bincount(gid[first][gid[first] >= 0], minlength=len(labels)).astype(np.float64)
        # deferral columns carry gid -1 already; per-query membership comes from real options
        rhs = np.array([floors[k] for k in labels]) * counts
        names = [f"{self.label}[{k}]" for k in labels]
        return RowFamily(self.label, "accuracy_floor", ">=", names, rhs, coef, gid, counts)


@dataclass(frozen=True)
class Allowed:
    """Keep only options whose boolean ``column`` is true (allowed-model lists per tenant or query)."""

    column: str = "allowed"
    name: str = "allowed"


RowSpec = Budget | GroupBudget | Capacity | AccuracyFloor  # the specs that compile into rows
Constraint = RowSpec | Allowed


def constraint_name(spec: Constraint) -> str:
    if isinstance(spec, Capacity | AccuracyFloor):
        return spec.label
    return spec.name
