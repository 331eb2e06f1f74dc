"""The hard budget: reserve a call's high-side cost before sending it, settle the billed cost after.

Invariant: ``spent + reserved <= budget`` at every instant, where every in-flight call holds a reservation
at least as large as what it can be billed. So realized spend never passes the budget, whatever the
concurrency and the retries. Amounts are kept as integer pico-dollars (cost rounded up, budget rounded
down) so that float rounding can never let the sum creep past the budget.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

_SCALE = 10**12  # pico-dollars


def _up(usd: float) -> int:
    return math.ceil(max(usd, 0.0) * _SCALE)


@dataclass(slots=True)
class Reservation:
    amount: int  # pico-dollars
    settled: bool = False

    @property
    def usd(self) -> float:
        return self.amount / _SCALE


class BudgetGuard:
    """Shared by every worker of one dispatch (one event loop)."""

    def __init__(self, budget_usd: float, spent_usd: float = 0.0) -> None:
        if budget_usd < 0 or math.isnan(budget_usd):
            raise ValueError(f"budget_usd must be >= 0, got {budget_usd}")
        self._budget = math.floor(budget_usd * _SCALE)
        self._spent = _up(spent_usd)
        self._reserved = 0
        self._changed = asyncio.Condition()
        self.overruns = 0  # settlements that came in above their reservation

    @property
    def budget_usd(self) -> float:
        return self._budget / _SCALE

    @property
    def spent_usd(self) -> float:
        return self._spent / _SCALE

    @property
    def reserved_usd(self) -> float:
        return self._reserved / _SCALE

    async def reserve(self, usd: float) -> Reservation | None:
        """Reserve ``usd``; waits while in-flight reservations might still free room; None = refused.

        Refused means the call cannot fit even if every in-flight call settled at zero: the caller defers.
        """
        amount = _up(usd)
        async with self._changed:
            while True:
                if self._spent + amount > self._budget:
                    return None
                if self._spent + self._reserved + amount <= self._budget:
                    self._reserved += amount
                    return Reservation(amount)
                await self._changed.wait()

    def try_reserve(self, usd: float) -> Reservation | None:
        """Reserve without waiting (None if it does not fit right now)."""
        amount = _up(usd)
        if self._spent + self._reserved + amount > self._budget:
            return None
        self._reserved += amount
        return Reservation(amount)

    async def settle(self, reservation: Reservation, charged_usd: float) -> None:
        """Turn a reservation into spend: ``charged_usd`` is what the call was billed (or may have been)."""
        async with self._changed:
            self.settle_now(reservation, charged_usd)
            self._changed.notify_all()

    def settle_now(self, reservation: Reservation, charged_usd: float) -> None:
        """``settle`` without waking waiters: for a guard no coroutine waits on (a batch job's lines, held
        across a job that answers hours later and settled from its output file)."""
        if reservation.settled:
            raise RuntimeError("reservation settled twice")
        reservation.settled = True
        charged = _up(charged_usd)
        if charged > reservation.amount:
            self.overruns += 1
        self._reserved -= reservation.amount
        self._spent += charged

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0.0)


async def hold(
    guards: Sequence[tuple[str, BudgetGuard]], usd: float, *, wait: bool = True
) -> tuple[list[tuple[BudgetGuard, Reservation]], tuple[str, BudgetGuard] | None]:
    """Reserve ``usd`` in every guard (a tenant's budget and the total) or in none: (held, None), or ([],
    (name, guard)) naming the guard that refused. ``wait``: wait while in-flight reservations might still
    free room (``reserve``); without it, take only what fits now (``try_reserve``: a batch job holds its
    reservations until the provider finishes, so nothing would free room while it waits)."""
    held: list[tuple[BudgetGuard, Reservation]] = []
    for name, guard in guards:
        reservation = await guard.reserve(usd) if wait else guard.try_reserve(usd)
        if reservation is None:
            for other, taken in held:
                await other.release(taken)
            return [], (name, guard)
        held.append((guard, reservation))
    return held, None
