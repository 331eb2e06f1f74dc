"""Local try-outs: drop a replayable queue for one day into the bucket (``python -m batchplan.dag_tasks.seed``)."""

from __future__ import annotations

from collections.abc import Sequence

from batchplan.core.layout import Layout, day
from batchplan.core.storage import Storage
from batchplan.dag_tasks.common import CONN_ID, history_dirs, layout, storage_from_connection


def seed_queue(
    storage: Storage, lay: Layout, the_day: str, queries: int, *, offset: int = 0, seed: int = 7
) -> list[str]:
    """Drop queue parts for ``the_day`` made of held-out queries of the bundled histories (replayable)."""
    from batchplan.core.history import load_history, with_holdout

    history = with_holdout(load_history(history_dirs(), storage))
    queue = history.as_queue("test").sample(fraction=1.0, shuffle=True, seed=seed).slice(offset, queries)
    half = queue.height // 2
    parts = [f"{lay.queue(the_day)}part-0.parquet", f"{lay.queue(the_day)}part-1.jsonl"]
    storage.write_frame(queue.head(half), parts[0])
    storage.write_frame(queue.tail(queue.height - half), parts[1])
    return parts


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m batchplan.dag_tasks.seed seed --day 2026-03-02 --queries 450``: create the bucket of
    the ``batchplan_s3`` connection if needed and drop a replayable queue for that day (local try-outs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m batchplan.dag_tasks.seed")
    parser.add_argument("command", choices=["seed"])
    parser.add_argument("--day", required=True, help="YYYY-MM-DD")
    parser.add_argument("--queries", type=int, default=450)
    parser.add_argument("--offset", type=int, default=0, help="skip this many queries (disjoint days)")
    args = parser.parse_args(argv)
    lay = layout()
    if lay.bucket:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(aws_conn_id=CONN_ID)
        if not hook.check_for_bucket(lay.bucket):
            hook.create_bucket(bucket_name=lay.bucket)
    storage = storage_from_connection() if lay.bucket else Storage()
    for part in seed_queue(storage, lay, day(args.day), args.queries, offset=args.offset):
        print(part)


if __name__ == "__main__":
    main()
