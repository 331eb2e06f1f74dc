"""Predictor names (train by name) and versioned artifacts through Storage (local or s3://).

``Predictor.save`` (in ``model``, below this module and ``training``) writes a version; this module lists
and loads them. An artifact is ``root/<version>/``: ``booster_<name>.txt`` (LightGBM text models), ``state.json`` (tables
the predictor needs: priors, cost model, confusions, vocabularies, catalog), ``arrays.npz`` (text encoder
matrices) and ``metadata.json`` (features, training-data fingerprint, models covered with their history
sizes, validation metrics, created time), written last: a version without it is incomplete and ignored.
Versions sort by creation time: ``<UTC yyyymmddThhmmss>-<fingerprint[:8]>``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from batchplan.core.catalog import PriceCatalog
from batchplan.core.errors import ContractError, unknown_name
from batchplan.core.history import History
from batchplan.core.storage import Storage, StorageError, join
from batchplan.predictors.calibration import Calibrator
from batchplan.predictors.cost import CostModel
from batchplan.predictors.features import DESCRIPTOR_SCHEMA, TextEncoder, Vocabulary
from batchplan.predictors.live import LiveCorrection
from batchplan.predictors.model import FORMAT_VERSION, Predictor
from batchplan.predictors.pairmodel import PairModel
from batchplan.predictors.priors import Priors
from batchplan.predictors.retrieval import Retriever
from batchplan.predictors.training import fit_predictor

_REGISTRY: dict[str, tuple[Callable[..., Predictor], str]] = {}


def register(name: str, description: str) -> Callable[[Callable[..., Predictor]], Callable[..., Predictor]]:
    def wrap(fn: Callable[..., Predictor]) -> Callable[..., Predictor]:
        _REGISTRY[name] = (fn, description)
        return fn

    return wrap


@register("lightgbm", "per-query LightGBM difficulty + retrieval (kNN) + per-model logistic, out-of-fold calibrated")
def _train_lightgbm(history: History, seed: int = 0, **params: Any) -> Predictor:
    return fit_predictor(history, name="lightgbm", seed=seed, **params)


@register("prior", "per-(model, task) smoothed accuracy from history (baseline); descriptor neighbours for new models")
def _train_prior(history: History, seed: int = 0, **params: Any) -> Predictor:
    return fit_predictor(history, name="prior", seed=seed, **params)


def available_predictors() -> dict[str, str]:
    """Registered predictor names and what each is."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def train_predictor(history: History, name: str = "lightgbm", seed: int = 0, **params: Any) -> Predictor:
    if name not in _REGISTRY:
        raise unknown_name("predictor", name, _REGISTRY, field="predictor")
    return _REGISTRY[name][0](history, seed=seed, **params)


# ---------------------------------------------------------------------- artifacts


def list_versions(storage: Storage, root_uri: str) -> list[str]:
    """Complete versions under ``root_uri`` (those with metadata.json), oldest first."""
    prefix = root_uri.rstrip("/") + "/"
    versions = set()
    for uri in storage.list(root_uri):
        rest = uri[len(prefix) :] if uri.startswith(prefix) else uri
        parts = rest.split("/")
        if len(parts) == 2 and parts[1] == "metadata.json":
            versions.add(parts[0])
    return sorted(versions)


def load(storage: Storage, root_uri: str, version: str | None = None) -> Predictor:
    versions = list_versions(storage, root_uri)
    if not versions:
        raise StorageError(f"no predictor versions under {root_uri}: train one with `batchplan train --out {root_uri}`")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ContractError(
            f"no predictor version {version!r} under {root_uri}; the versions there, newest first: "
            f"{', '.join(reversed(versions))}",
            fields=("predictor_version",),
        )
    base = join(root_uri, version)
    state = json.loads(storage.read_text(join(base, "state.json")))
    metadata = json.loads(storage.read_text(join(base, "metadata.json")))
    if state.get("format") != FORMAT_VERSION:
        raise StorageError(f"{base}: artifact format {state.get('format')} != {FORMAT_VERSION}")
    with np.load(io.BytesIO(storage.read_bytes(join(base, "arrays.npz")))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    boosters = {n: lgb.Booster(model_str=storage.read_text(join(base, f"booster_{n}.txt"))) for n in state["boosters"]}
    descriptors = pl.DataFrame(
        state["descriptors"],
        schema=DESCRIPTOR_SCHEMA,
    )
    confusions = pl.DataFrame(
        state["confusions"],
        schema={"task": pl.String, "model": pl.String, "gold": pl.String, "answer": pl.String, "p": pl.Float64},
    )
    catalog = PriceCatalog(
        prices=pl.DataFrame(
            state["catalog"]["prices"],
            schema={"model": pl.String, "usd_per_mtok_in": pl.Float64, "usd_per_mtok_out": pl.Float64},
        ),
        billed=pl.DataFrame(state["catalog"]["billed"], schema={"model": pl.String, "mean_cost_usd": pl.Float64}),
    )
    return Predictor(
        name=state["name"],
        seed=state["seed"],
        options=state["options"],
        encoder=TextEncoder.from_state(state["text"], arrays),
        tasks=Vocabulary(state["tasks"]),
        subjects=Vocabulary(state["subjects"]),
        model_vocab=Vocabulary(state["models"]),
        families=Vocabulary(state["families"]),
        descriptors=descriptors,
        priors=Priors.from_state(state["priors"]),
        cost=CostModel.from_state(state["cost"]),
        confusions=confusions,
        catalog=catalog,
        calibrator=Calibrator.from_state(state["calibrator"]),
        retriever=Retriever.from_state(state["retriever"], arrays) if state.get("retriever") else None,
        pair_model=PairModel.from_state(state["pair_model"]) if state.get("pair_model") else None,
        boosters=boosters,
        feature_names=state["feature_names"],
        metadata=metadata,
        live=LiveCorrection.from_state(state.get("live_correction")),
    )
