"""Per-(query, model) predictions: calibrated P(correct), expected and high-side cost, answer confusions.

Knows nothing about the optimizer::

    predictor = train_predictor(history, name="lightgbm", seed=0)
    preds = predictor.predict(queries, pairs, catalog=None)   # PREDICTION_SCHEMA (+ diagnostics)
    uri = predictor.save(storage, root_uri)                   # root_uri/<version>/
    predictor = load_predictor(storage, root_uri, version=None)
"""

from __future__ import annotations

from batchplan.predictors.model import Predictor
from batchplan.predictors.registry import available_predictors, list_versions, train_predictor
from batchplan.predictors.registry import load as load_predictor

__all__ = ["Predictor", "available_predictors", "list_versions", "load_predictor", "train_predictor"]
