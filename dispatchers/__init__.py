"""Dispatchers: run a plan against a backend under a hard budget, exactly once, resumably.

dispatchers/ knows plans and results, not predictors::

    from batchplan.dispatchers import get_backend, dispatch
    backend = get_backend("replay", history=history)
    results = dispatch(plan, queue, backend, budget_usd=5.0, out_uri="runs/nightly")

Backends are chosen by name (``available_backends()``): ``replay``, ``openai`` (any OpenAI-compatible
chat completions endpoint), ``bedrock`` (AWS Bedrock Converse).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchplan.core.errors import ContractError, unknown_name

if TYPE_CHECKING:
    from batchplan.dispatchers.base import Backend, CallRequest, CallResult, parse_answer
    from batchplan.dispatchers.budget import BudgetGuard
    from batchplan.dispatchers.executor import FALLBACK_COLUMN, ROUND_CALLS
    from batchplan.dispatchers.ledger import call_events, ledger_events, read_manifest, read_results, spend_by_model
    from batchplan.dispatchers.limits import ModelLimits, OutputCaps, RetryPolicy
    from batchplan.dispatchers.run import DispatchOptions, adispatch, dispatch

# Imported on first use, so that naming the backends (``available_backends``: the CLI checks --backend with
# it before anything heavy is loaded) does not import polars and the executor.
_LAZY = {
    "Backend": "batchplan.dispatchers.base",
    "CallRequest": "batchplan.dispatchers.base",
    "CallResult": "batchplan.dispatchers.base",
    "parse_answer": "batchplan.dispatchers.base",
    "BudgetGuard": "batchplan.dispatchers.budget",
    "FALLBACK_COLUMN": "batchplan.dispatchers.executor",
    "ROUND_CALLS": "batchplan.dispatchers.executor",
    "call_events": "batchplan.dispatchers.ledger",
    "ledger_events": "batchplan.dispatchers.ledger",
    "read_manifest": "batchplan.dispatchers.ledger",
    "read_results": "batchplan.dispatchers.ledger",
    "spend_by_model": "batchplan.dispatchers.ledger",
    "ModelLimits": "batchplan.dispatchers.limits",
    "RetryPolicy": "batchplan.dispatchers.limits",
    "DispatchOptions": "batchplan.dispatchers.run",
    "OutputCaps": "batchplan.dispatchers.limits",
    "adispatch": "batchplan.dispatchers.run",
    "dispatch": "batchplan.dispatchers.run",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dispatchers' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


_REGISTRY: dict[str, Callable[..., Backend]] = {}
# Per backend, the settings it cannot do without; each need is a group of names, any one of which will do.
_NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {}
# What each needed setting is, for the one-line error that names it.
NEEDED = {
    "catalog": "its price list (a models.csv with model, usd_per_mtok_in, usd_per_mtok_out): it bills usage x "
    "price and reserves each call's bound before sending",
    "base_url": "its endpoint (e.g. http://127.0.0.1:8000/v1), or an Airflow connection with a host",
    "history": "the recorded outcomes it answers from (directories with queries.parquet and outcomes.parquet)",
}


def register_backend(name: str, factory: Callable[..., Backend], needs: tuple[tuple[str, ...], ...] = ()) -> None:
    """Make ``get_backend(name, **kwargs)`` build ``factory(**kwargs)``; ``needs``: the keyword arguments it
    cannot do without (each a group of names, any one of which will do)."""
    _REGISTRY[name] = factory
    _NEEDS[name] = needs


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def missing_setting(backend: str, setting: str) -> ContractError:
    """'the openai backend needs base_url, its endpoint (...)': the error naming the setting (a front end
    words it as its own flag)."""
    return ContractError(f"the {backend} backend needs {setting}, {NEEDED[setting]}", fields=(setting,))


def check_backend(name: str, **settings: Any) -> None:
    """Raise a ContractError unless ``name`` is a known backend (else naming the known ones, closest first)
    and ``settings`` hold what it needs. Light: the CLI checks its flags with it before the heavy imports."""
    if name not in _REGISTRY:
        raise unknown_name("backend", name, _REGISTRY, field="backend")
    for group in _NEEDS[name]:
        if all(settings.get(setting) is None for setting in group):
            raise missing_setting(name, group[0])


def get_backend(name: str, **kwargs: Any) -> Backend:
    """Build a backend by name; keyword arguments go to its constructor."""
    check_backend(name, **kwargs)
    return _REGISTRY[name](**kwargs)


def _replay(**kwargs: Any) -> Backend:
    from batchplan.dispatchers.replay import ReplayBackend

    return ReplayBackend(**kwargs)


def _openai(**kwargs: Any) -> Backend:
    from batchplan.dispatchers.openai import OpenAIBackend

    return OpenAIBackend(**kwargs)


def _bedrock(**kwargs: Any) -> Backend:
    from batchplan.dispatchers.bedrock import BedrockBackend

    return BedrockBackend(**kwargs)


register_backend("replay", _replay, needs=(("history",),))
register_backend("openai", _openai, needs=(("catalog",), ("base_url", "airflow_conn_id")))
register_backend("bedrock", _bedrock, needs=(("catalog",),))

__all__ = [
    "FALLBACK_COLUMN",
    "ROUND_CALLS",
    "Backend",
    "BudgetGuard",
    "CallRequest",
    "CallResult",
    "DispatchOptions",
    "ModelLimits",
    "OutputCaps",
    "RetryPolicy",
    "adispatch",
    "available_backends",
    "call_events",
    "check_backend",
    "dispatch",
    "get_backend",
    "ledger_events",
    "missing_setting",
    "parse_answer",
    "read_manifest",
    "read_results",
    "register_backend",
    "spend_by_model",
]
