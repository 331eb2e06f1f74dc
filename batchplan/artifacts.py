"""A trained batchplan model: a predictor version plus the plan templates fitted with it.

Stored together under the predictor registry's version directory (``<root>/<version>/plans.json`` beside
the predictor's files), so ``plan``/``run`` load the latest or a named version as one unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from batchplan.history import History
from batchplan.plan_templates import PlanTemplates, fit_plan_templates
from batchplan.storage import Storage, join
from predictors import Predictor, load_predictor, train_predictor

log = structlog.get_logger("batchplan.train")
PLANS_FILE = "plans.json"


@dataclass(frozen=True)
class Trained:
    predictor: Predictor
    templates: PlanTemplates


def train(
    history: History, *, predictor: str = "lightgbm", seed: int = 0, plans: bool = True, folds: int = 2
) -> Trained:
    """Train the predictor on ``history`` and, unless ``plans`` is off, fit vote/cascade templates on it."""
    model = train_predictor(history, name=predictor, seed=seed)
    templates = (
        fit_plan_templates(
            history, lambda part: train_predictor(part, name=predictor, seed=seed), folds=folds, seed=seed
        )
        if plans
        else PlanTemplates()
    )
    log.info(
        "train",
        predictor=predictor,
        queries=history.queries.height,
        models=len(history.models),
        templates=len(templates.templates),
    )
    return Trained(model, templates)


def save(trained: Trained, storage: Storage, root_uri: str) -> str:
    uri = trained.predictor.save(storage, root_uri)
    storage.write_text(join(uri, PLANS_FILE), trained.templates.to_json())
    return uri


def load(storage: Storage, root_uri: str, version: str | None = None) -> Trained:
    predictor = load_predictor(storage, root_uri, version=version)
    plans_uri = join(root_uri, str(predictor.metadata["version"]), PLANS_FILE)
    templates = PlanTemplates.from_json(storage.read_text(plans_uri)) if storage.exists(plans_uri) else PlanTemplates()
    return Trained(predictor, templates)
