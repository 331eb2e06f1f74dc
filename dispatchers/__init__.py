"""Dispatchers: run a plan against a backend under a hard budget, exactly once, resumably.

dispatchers/ knows plans and results, not predictors::

    from dispatchers import get_backend, dispatch
    backend = get_backend("replay", history=history)
    results = dispatch(plan, queue, backend, budget_usd=5.0, out_uri="runs/nightly")

Backends are chosen by name (``available_backends()``): ``replay``, ``openai`` (any OpenAI-compatible
chat completions endpoint), ``bedrock`` (AWS Bedrock Converse).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchplan.errors import unknown_name

if TYPE_CHECKING:
    from dispatchers.base import Backend, CallRequest, CallResult, parse_answer
    from dispatchers.budget import BudgetGuard
    from dispatchers.executor import FALLBACK_COLUMN
    from dispatchers.ledger import read_manifest, read_results
    from dispatchers.limits import ModelLimits, RetryPolicy
    from dispatchers.run import adispatch, dispatch

# Imported on first use, so that naming the backends (``available_backends``: the CLI checks --backend with
# it before anything heavy is loaded) does not import polars and the executor.
_LAZY = {
    "Backend": "dispatchers.base",
    "CallRequest": "dispatchers.base",
    "CallResult": "dispatchers.base",
    "parse_answer": "dispatchers.base",
    "BudgetGuard": "dispatchers.budget",
    "FALLBACK_COLUMN": "dispatchers.executor",
    "read_manifest": "dispatchers.ledger",
    "read_results": "dispatchers.ledger",
    "ModelLimits": "dispatchers.limits",
    "RetryPolicy": "dispatchers.limits",
    "adispatch": "dispatchers.run",
    "dispatch": "dispatchers.run",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dispatchers' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


_REGISTRY: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Make ``get_backend(name, **kwargs)`` build ``factory(**kwargs)``."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def check_backend(name: str) -> None:
    """Raise a ContractError naming the known backends (closest first) unless ``name`` is one of them."""
    if name not in _REGISTRY:
        raise unknown_name("backend", name, _REGISTRY, field="backend")


def get_backend(name: str, **kwargs: Any) -> Backend:
    """Build a backend by name; keyword arguments go to its constructor."""
    check_backend(name)
    return _REGISTRY[name](**kwargs)


def _replay(**kwargs: Any) -> Backend:
    from dispatchers.replay import ReplayBackend

    return ReplayBackend(**kwargs)


def _openai(**kwargs: Any) -> Backend:
    from dispatchers.openai import OpenAIBackend

    return OpenAIBackend(**kwargs)


def _bedrock(**kwargs: Any) -> Backend:
    from dispatchers.bedrock import BedrockBackend

    return BedrockBackend(**kwargs)


register_backend("replay", _replay)
register_backend("openai", _openai)
register_backend("bedrock", _bedrock)

__all__ = [
    "FALLBACK_COLUMN",
    "Backend",
    "BudgetGuard",
    "CallRequest",
    "CallResult",
    "ModelLimits",
    "RetryPolicy",
    "adispatch",
    "available_backends",
    "check_backend",
    "dispatch",
    "get_backend",
    "parse_answer",
    "read_manifest",
    "read_results",
    "register_backend",
]
