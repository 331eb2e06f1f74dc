"""What ``batchplan train`` stores: a predictor version plus the plan templates and the round posterior fitted
with it.

Stored together under the predictor registry's version directory (``<root>/<version>/templates.json`` and
``posterior.json``, ``output_caps.json``, ``round_choice.json`` beside the predictor's files), so ``plan``/``run`` load the latest or a named version as
one unit. A version trained before the posterior existed loads with ``posterior`` None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog

from batchplan.core.history import History, without_silver
from batchplan.core.layout import CURRENT_FILE
from batchplan.core.request import DEFAULT_RUN_ROUNDS
from batchplan.core.storage import Storage, join
from batchplan.dispatchers.limits import OutputCaps
from batchplan.plans.audit import AuditFit, fit_audit
from batchplan.plans.per_task import RoundChoice
from batchplan.plans.posterior import Posterior, fit_posterior
from batchplan.plans.templates import CROSS_FIT_FOLDS, PlanTemplates, cross_fit_predictions, fit_plan_templates
from batchplan.predictors import Predictor, load_predictor, train_predictor

log = structlog.get_logger("batchplan.train")
TEMPLATES_FILE = "templates.json"
# The templates' file before the glossary named them (batchplan/core/contracts.py): still read for versions trained
# before the rename, for one release.
OLD_TEMPLATES_FILE = "plans.json"
POSTERIOR_FILE = "posterior.json"
AUDIT_FILE = "audit.json"  # the audits' reference plans and agreement rates (batchplan.plans.audit)
OUTPUT_CAPS_FILE = "output_caps.json"
ROUND_CHOICE_FILE = "round_choice.json"  # which round planner each task gets, by replay (batchplan.app.round_choice)


@dataclass(frozen=True)
class Trained:
    predictor: Predictor
    templates: PlanTemplates
    posterior: Posterior | None = None  # for runs in rounds (batchplan.plans.round_planner); None: trained without
    audit: AuditFit | None = None  # for audited runs (batchplan.plans.audit); None: trained before audits
    # max_tokens of open tasks' calls per (task, LLM), from the history's answer lengths; None: trained without
    output_caps: OutputCaps | None = None
    # the per_task round planner's choice per task and budget level; None: trained without (the fixed rule)
    round_choice: RoundChoice | None = None


def train(
    history: History,
    *,
    predictor: str = "lightgbm",
    seed: int = 0,
    templates: bool = True,
    folds: int = CROSS_FIT_FOLDS,
    round_choice: bool = True,
    rounds: int = DEFAULT_RUN_ROUNDS,
) -> Trained:
    """Train the predictor on ``history`` and, unless ``templates`` is off, fit vote/cascade templates and the
    round posterior on it (both on the same out-of-fold predictions) and, unless ``round_choice`` is off, the
    per_task planner's choice by replaying both round planners on the same folds for ``rounds`` rounds
    (``RoundChoice``; the run's default, or the round count of the runs it is for)."""
    fitted = train_predictor(history, name=predictor, seed=seed)
    fitted_templates, posterior, choice = PlanTemplates(), None, None
    # templates and the posterior replay the history as the truth: a silver verdict there would count as gold
    history = without_silver(history)
    if templates:
        trainer = lambda part: train_predictor(part, name=predictor, seed=seed)  # noqa: E731
        oof = cross_fit_predictions(history, trainer, folds=folds, seed=seed)
        fitted_templates = fit_plan_templates(history, trainer, folds=folds, seed=seed, oof=oof)
        posterior = fit_posterior(history, oof, seed=seed)
        if round_choice:
            from batchplan.app.round_choice import fit_round_choice

            choice = fit_round_choice(
                history, oof, trainer, folds=folds, seed=seed, posterior=posterior, rounds=rounds
            )
    caps = learn_output_caps(history)
    log.info(
        "train",
        predictor=predictor,
        output_caps=len(caps.caps),
        queries=history.queries.height,
        models=len(history.models),
        templates=len(fitted_templates.templates),
        posterior=posterior is not None,
        round_choice=choice is not None,
    )
    return Trained(
        fitted, fitted_templates, posterior, audit=fit_audit(history), output_caps=caps, round_choice=choice
    )


def learn_output_caps(history: History) -> OutputCaps:
    """``OutputCaps`` from every recorded answer of the history (its outcomes with their query's task, labels)."""
    return OutputCaps.learn(history.outcomes.join(history.queries.select("query_id", "task", "labels"), on="query_id"))


def save(trained: Trained, storage: Storage, root_uri: str, version: str | None = None) -> str:
    uri = trained.predictor.save(storage, root_uri, version=version)
    storage.write_text(join(uri, TEMPLATES_FILE), trained.templates.to_json())
    if trained.posterior is not None:
        storage.write_text(join(uri, POSTERIOR_FILE), trained.posterior.to_json())
    if trained.audit is not None:
        storage.write_text(join(uri, AUDIT_FILE), trained.audit.to_json())
    if trained.output_caps is not None:
        storage.write_text(join(uri, OUTPUT_CAPS_FILE), trained.output_caps.to_json())
    if trained.round_choice is not None:
        storage.write_text(join(uri, ROUND_CHOICE_FILE), trained.round_choice.to_json())
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
    version = str(predictor.metadata["version"])
    return Trained(
        predictor,
        load_templates(storage, root_uri, version),
        load_posterior(storage, root_uri, version),
        load_audit(storage, root_uri, version),
        load_output_caps(storage, root_uri, version),
        load_round_choice(storage, root_uri, version),
    )


def load_audit(storage: Storage, root_uri: str, version: str) -> AuditFit | None:
    """The audits' reference plans and agreement rates of one version (None for a version trained before)."""
    uri = join(root_uri, version, AUDIT_FILE)
    return AuditFit.from_json(storage.read_text(uri)) if storage.exists(uri) else None


def load_templates(storage: Storage, root_uri: str, version: str) -> PlanTemplates:
    """The plan templates of one version (none for a version trained without them)."""
    for name in (TEMPLATES_FILE, OLD_TEMPLATES_FILE):
        uri = join(root_uri, version, name)
        if storage.exists(uri):
            return PlanTemplates.from_json(storage.read_text(uri))
    return PlanTemplates()


def load_posterior(storage: Storage, root_uri: str, version: str) -> Posterior | None:
    """The round posterior of one version (None for a version trained without one)."""
    uri = join(root_uri, version, POSTERIOR_FILE)
    return Posterior.from_json(storage.read_text(uri)) if storage.exists(uri) else None


def load_output_caps(storage: Storage, root_uri: str, version: str) -> OutputCaps | None:
    """The open tasks' max_tokens of one version (None for a version trained without them: flat 1024)."""
    uri = join(root_uri, version, OUTPUT_CAPS_FILE)
    return OutputCaps.from_json(storage.read_text(uri)) if storage.exists(uri) else None


def load_round_choice(storage: Storage, root_uri: str, version: str) -> RoundChoice | None:
    """The per_task planner's replayed choice of one version (None for a version trained before it)."""
    uri = join(root_uri, version, ROUND_CHOICE_FILE)
    return RoundChoice.from_json(storage.read_text(uri)) if storage.exists(uri) else None
