"""Dispatchers: run a plan against a backend under a hard budget, exactly once, resumably.

dispatchers/ knows plans and results, not predictors::

    from dispatchers import get_backend, dispatch
    backend = get_backend("replay", history=history)
    results = dispatch(plan, queue, backend, budget_usd=5.0, out_uri="runs/nightly")

Backends are chosen by name (``available_backends()``): ``replay``, ``openai`` (any OpenAI-compatible
chat completions endpoint), ``bedrock`` (AWS Bedrock Converse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatchers.base import Backend, CallRequest, CallResult, parse_answer
from dispatchers.budget import BudgetGuard
from dispatchers.executor import FALLBACK_COLUMN, ROUND_CALLS
from dispatchers.ledger import ledger_events, read_manifest, read_results
from dispatchers.limits import ModelLimits, RetryPolicy
from dispatchers.run import adispatch, dispatch

_REGISTRY: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Make ``get_backend(name, **kwargs)`` build ``factory(**kwargs)``."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, **kwargs: Any) -> Backend:
    """Build a backend by name; keyword arguments go to its constructor."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose one of {available_backends()}") from None
    return factory(**kwargs)


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
    "ROUND_CALLS",
    "Backend",
    "BudgetGuard",
    "CallRequest",
    "CallResult",
    "ModelLimits",
    "RetryPolicy",
    "adispatch",
    "available_backends",
    "dispatch",
    "get_backend",
    "ledger_events",
    "parse_answer",
    "read_manifest",
    "read_results",
    "register_backend",
]
