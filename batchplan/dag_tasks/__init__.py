"""What the DAGs in ``dags/`` call: each task is one function here over plain values (URIs, numbers,
dicts), so the DAG files stay thin and every step can be tested without Airflow.

- ``common``: the S3 connection -> Storage, the bucket layout, the validated DAG params (``RunParams``),
  the queue's day and URIs, the day's claim, the promoted predictor version;
- ``stages``: ingest -> predict -> plan (sharded, budget shares) -> dispatch -> merge -> report, the stages
  the nightly and backfill DAGs share, and the report lookup for the UI plugin;
- ``run_tasks``: the tasks the nightly and backfill DAGs share (predict -> plan -> dispatch -> rounds ->
  merge -> report), added by one factory, with the DAGs' common settings and their Assets;
- ``backfill``: the backfill's day range and its day-by-day claims;
- ``retrain``: the training history, train, evaluate and promote;
- ``seed``: ``python -m batchplan.dag_tasks.seed``, a replayable queue for local try-outs.

Nothing here is imported by the library below it; only ``dags/`` imports this package.
"""
