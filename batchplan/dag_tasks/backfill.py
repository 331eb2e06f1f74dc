"""The backfill DAG's own steps: the range of days it covers, and claiming those days one by one."""

from __future__ import annotations

from datetime import date, timedelta

from batchplan.core.contracts import ContractError
from batchplan.core.layout import Layout, day
from batchplan.core.storage import Storage
from batchplan.dag_tasks.common import QueueClaimed, claim_queue, log

MAX_BACKFILL_DAYS = 92


def backfill_days(start: str, end: str) -> list[str]:
    first, last = date.fromisoformat(day(start)), date.fromisoformat(day(end))
    if last < first:
        raise ContractError(f"end_date {last} is before start_date {first}")
    n = (last - first).days + 1
    if n > MAX_BACKFILL_DAYS:
        raise ContractError(f"a backfill covers at most {MAX_BACKFILL_DAYS} days, got {n}: split the range")
    return [(first + timedelta(days=i)).isoformat() for i in range(n)]


def claim_days(storage: Storage, lay: Layout, days: list[str], owner: str) -> dict[str, list[str]]:
    """Claim every day that has queue parts; days already taken by another run (a nightly) are skipped."""
    taken, skipped, empty = [], [], []
    for the_day in days:
        if not any(True for _ in storage.list(lay.queue(the_day))):
            empty.append(the_day)
            continue
        try:
            claim_queue(storage, lay, the_day, owner)
            taken.append(the_day)
        except QueueClaimed as error:
            log.warning("backfill.day_skipped", day=the_day, reason=str(error))
            skipped.append(the_day)
    if not taken:
        raise ContractError(f"nothing to backfill in {days[0]}..{days[-1]}: empty {empty}, claimed elsewhere {skipped}")
    return {"days": taken, "skipped": skipped, "empty": empty}
