"""What ``batchplan train`` stores: a predictor version plus the plan templates fitted with it.

Stored together under the predictor registry's version directory (``<root>/<version>/templates.json`` beside
the predictor's files), so ``plan``/``run`` load the latest or a named version as one unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog

from batchplan.history import History
from batchplan.layout import CURRENT_FILE
from batchplan.plan_templates import CROSS_FIT_FOLDS, PlanTemplates, fit_plan_templates
from batchplan.storage import Storage, join
from predictors import Predictor, load_predictor, train_predictor

log = structlog.get_logger("batchplan.train")
TEMPLATES_FILE = "templates.json"
# The templates' file before the glossary named them (batchplan/contracts.py): still read for versions trained
# before the rename, for one release.
OLD_TEMPLATES_FILE = "plans.json"


@dataclass(frozen=True)
class Trained:
    predictor: Predictor
    templates: PlanTemplates


def train(
    history: History, *, predictor: str = "lightgbm", seed: int = 0, templates: bool = True, folds: int = CROSS_FIT_FOLDS
) -> Trained:
    """Train the predictor on ``history`` and, unless ``templates`` is off, fit vote/cascade templates on it."""
    fitted = train_predictor(history, name=predictor, seed=seed)
    fitted_templates = (
        fit_plan_templates(
            history, lambda part: train_predictor(part, name=predictor, seed=seed), folds=folds, seed=seed
        )
        if templates
        else PlanTemplates()
    )
    log.info(
        "train",
        predictor=predictor,
        queries=history.queries.height,
        models=len(history.models),
        templates=len(fitted_templates.templates),
    )
    return Trained(fitted, fitted_templates)


def save(trained: Trained, storage: Storage, root_uri: str, version: str | None = None) -> str:
    uri = trained.predictor.save(storage, root_uri, version=version)
    storage.write_text(join(uri, TEMPLATES_FILE), trained.templates.to_json())
    return uri


def resolve_version(storage: Storage, root_uri: str, version: str | None) -> str | None:
    """A named version as is; else the promoted one (``CURRENT.json``, written when a retrain wins);
    else None, meaning the newest."""
    if version is not None:
        return version
    pointer = join(root_uri, CURRENT_FILE)
    return str(json.loads(storage.read_text(pointer))["version"]) if storage.exists(pointer) else None


def load(storage: Storage, root_uri: str, version: str | None = None) -> Trained:
    predictor = load_predictor(storage, root_uri, version=resolve_version(storage, root_uri, version))
    return Trained(predictor, load_templates(storage, root_uri, str(predictor.metadata["version"])))


def load_templates(storage: Storage, root_uri: str, version: str) -> PlanTemplates:
    """The plan templates of one version (none for a version trained without them)."""
    for name in (TEMPLATES_FILE, OLD_TEMPLATES_FILE):
        uri = join(root_uri, version, name)
        if storage.exists(uri):
            return PlanTemplates.from_json(storage.read_text(uri))
    return PlanTemplates()
