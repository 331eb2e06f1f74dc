"""An infeasible request, in the user's words.

The optimizer knows rows and numbers (``InfeasibleError.constraint`` names the rows at fault, ``suggestion``
the smallest change that makes each feasible); this module turns them back into what the user asked
(``PlanRequest`` fields, which are also the DAG params; the CLI words them as flags) and the fix, e.g.

    budget_usd 0.0001 cannot answer all 952 queries: at least $0.0794 is needed, or pass allow_deferral
"""

from __future__ import annotations

import math
import re
from typing import Any

import polars as pl

from batchplan.core.errors import UserError
from batchplan.core.request import PlanRequest
from batchplan.optimizer import InfeasibleError


class RequestInfeasible(UserError, InfeasibleError):
    """No plan meets the request; the message says which part of it and the fix. Keeps the optimizer's
    ``constraint`` and ``suggestion`` for programs."""

    def __init__(
        self, constraint: str | list[str], message: str, suggestion: dict[str, Any], fields: tuple[str, ...]
    ) -> None:
        InfeasibleError.__init__(self, constraint, message, suggestion)
        self.fields = fields


def _significant(value: float, digits: int, upward: bool) -> float:
    if not value > 0 or math.isinf(value):
        return value
    scale = 10 ** (math.floor(math.log10(value)) - digits + 1)
    steps = value / scale
    # the 1e-9 keeps a value already on the grid (up to float noise) where it is
    return float((math.ceil(steps - 1e-9) if upward else math.floor(steps + 1e-9)) * scale)


def up(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits: a suggested minimum that is enough."""
    return _significant(value, digits, upward=True)


def down(value: float, digits: int = 3) -> float:
    """``value`` rounded down to ``digits`` significant digits: a suggested maximum that is reachable."""
    return _significant(value, digits, upward=False)


def usd(value: float) -> str:
    """Dollars as a user would type them: 0.00001, 2.5, 12 (never 1e-05)."""
    return f"{value:.8f}".rstrip("0").rstrip(".") if value < 1e6 else f"{value:.0f}"


_ROW = re.compile(r"^(?P<family>[^\[]+)(?:\[(?P<key>.*)\])?$")


def _value(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _row(row: str, request: PlanRequest) -> tuple[str, str, str]:
    """(field, what the user asked, group key) for an optimizer row name (as ``define_constraints`` names them)."""
    match = _ROW.match(row)
    family, key = (match["family"], match["key"]) if match else (row, None)
    if family == "budget":
        return "budget_usd", f"budget_usd {usd(request.budget_usd or 0.0)}", ""
    if family == "tenant_budget" and key is not None:
        limit = request.tenant_budgets_usd.get(key)
        return "tenant_budgets_usd", f"tenant_budgets_usd {key}={'?' if limit is None else usd(limit)}", key
    if family == "capacity" and key is not None:
        return "model_max_calls", f"model_max_calls {key}={request.model_max_calls.get(key, '?')}", key
    if family == "task_floor" and key is not None:
        return "task_accuracy_floors", f"task_accuracy_floors {key}={_value(request.task_accuracy_floors.get(key))}", key
    if family == "accuracy_target":
        return "accuracy_target", f"accuracy_target {_value(request.accuracy_target)}", ""
    if family == "label_error" and key is not None:
        return "label_error_max", f"label_error_max for task:label {key}", key
    return "", row, key or ""


def _queries(queries: pl.DataFrame, column: str | None, key: str) -> int:
    return queries.height if column is None else int((queries[column] == key).sum())


def _sentence(row: str, fix: dict[str, Any], request: PlanRequest, queries: pl.DataFrame) -> tuple[str, str]:
    """(field, sentence) for one row that cannot hold on its own."""
    field, asked, key = _row(row, request)
    deferral = "" if request.allow_deferral else ", or pass allow_deferral"
    if "min_budget" in fix:
        if field == "tenant_budgets_usd":
            n = _queries(queries, "tenant", key)
            return field, f"{asked} cannot answer all {n} of its queries: at least ${usd(up(fix['min_budget']))} is needed{deferral}"
        return field, f"{asked} cannot answer all {queries.height} queries: at least ${usd(up(fix['min_budget']))} is needed{deferral}"
    if "missing_capacity" in fix:
        need = math.ceil(fix["min_capacity"] - 1e-9)
        if field == "label_error_max":
            return field, f"{asked}: no mix of plans keeps its error under the bound; loosen it, or use label_error_mode aggregate"
        return field, f"{asked} cannot answer all {queries.height} queries: at least {need} calls are needed{deferral}"
    if "max_accuracy" in fix:
        best = down(fix["max_accuracy"])
        if field == "task_accuracy_floors":
            n = _queries(queries, "task", key)
            return field, f"{asked} cannot be reached: the best plans give its {n} queries {best:g} expected accuracy"
        return field, f"{asked} cannot be reached: the best plans give the {queries.height} queries {best:g} expected accuracy"
    return field, f"{asked} cannot hold"


def word(error: InfeasibleError, request: PlanRequest, queries: pl.DataFrame) -> RequestInfeasible:
    """The optimizer's infeasibility as a sentence naming what the user asked and the fix."""
    rows = [error.constraint] if isinstance(error.constraint, str) else list(error.constraint)
    fixes: dict[str, dict[str, Any]] = (
        {rows[0]: error.suggestion} if len(rows) == 1 else {r: error.suggestion.get(r, {}) for r in rows}
    )
    sentences: list[str] = []
    fields: list[str] = [] if request.allow_deferral else ["allow_deferral"]
    joint = error.suggestion.get("rows") if isinstance(error.suggestion.get("rows"), dict) else None
    if joint is not None or all(not fix for fix in fixes.values()):
        # each row could hold alone, not all together; a budget row's slack says how far it would have to move
        moves, spent = [], True
        for row in rows:
            field, asked, _ = _row(row, request)
            fields.append(field)
            limit = (joint or {}).get(row, {}).get("feasible_limit")
            if limit is not None and field in ("budget_usd", "tenant_budgets_usd"):
                asked = f"{asked} (with the rest unchanged: at least ${usd(up(limit))})"
            spent = spent and field in ("budget_usd", "tenant_budgets_usd", "model_max_calls")
            moves.append(asked)
        deferral = ", or pass allow_deferral" if spent and not request.allow_deferral else ""
        sentences.append(
            f"{' and '.join(moves)} cannot all hold over these {queries.height} queries: loosen one of them{deferral}"
        )
    else:
        for row, fix in fixes.items():
            field, sentence = _sentence(row, fix, request, queries)
            fields.append(field)
            sentences.append(sentence)
    return RequestInfeasible(error.constraint, "; ".join(sentences), error.suggestion, tuple(f for f in fields if f))
