"""Predictor names (train by name) and versioned artifacts through Storage (local or s3://).

An artifact is ``root/<version>/``: ``booster_<name>.txt`` (LightGBM text models), ``state.json`` (tables
the predictor needs: priors, cost model, confusions, vocabularies, catalog), ``arrays.npz`` (text encoder
matrices) and ``metadata.json`` (features, training-data fingerprint, models covered with their history
sizes, validation metrics, created time), written last: a version without it is incomplete and ignored.
Versions sort by creation time: ``<UTC yyyymmddThhmmss>-<fingerprint[:8]>``.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from batchplan.catalog import PriceCatalog
from batchplan.errors import ContractError, unknown_name
from batchplan.history import History
from batchplan.storage import Storage, StorageError, join
from predictors.calibration import Calibrator
from predictors.cost import CostModel
from predictors.features import DESCRIPTOR_SCHEMA, TextEncoder, Vocabulary
from predictors.model import Predictor
from predictors.pairmodel import PairModel
from predictors.priors import Priors
from predictors.retrieval import Retriever
from predictors.training import fit_predictor

FORMAT_VERSION = 2

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
    }
    storage.write_text(join(base, "state.json"), json.dumps(_strict(state), default=_json_default, allow_nan=False))
    metadata = {**predictor.metadata, "version": version, "format": FORMAT_VERSION}
    storage.write_text(
        join(base, "metadata.json"),
        json.dumps(_strict(metadata), indent=2, default=_json_default, allow_nan=False),
    )
    predictor.metadata = metadata
    return base


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
            f"no model_version {version!r} under {root_uri}; the versions there, newest first: "
            f"{', '.join(reversed(versions))}",
            fields=("model_version",),
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
    )


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
