"""batchplan: plan and run a whole batch of LLM queries under one global budget.

Layers, top to bottom; a layer imports only from the layers below it, and siblings on one line are independent
(``lint-imports`` checks both in CI: the contracts are in pyproject.toml):

    batchplan.dag_tasks       what the Airflow DAGs (dags/) call
    batchplan.app             the application: ingest, pipeline, round runner, report, CLI, demo, artifacts
    batchplan.plans           candidates, templates, planning, posterior, round planner  | batchplan.dispatchers
    batchplan.optimizer       (knows nothing of LLMs)                                    | batchplan.predictors
    batchplan.core            the ground floor: contracts (and the glossary), storage, settings, catalog, history, layout

``optimizer/``, ``predictors/`` and ``dispatchers/`` sit at the top of the repository, where the client's layout
wants them; ``batchplan/optimizer`` and its two siblings are symbolic links to them, so that they install (and are
imported) as ``batchplan.optimizer`` and so on, never as generic top-level names that could clash with another
package in a user's environment.
"""
