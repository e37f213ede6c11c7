"""The retry scheduler: finds due work in the store and hands it to the lanes.

The store is the single source of truth for what is due: deferred recipients,
messages submitted by other processes, and everything left over from a previous
run (including recipients whose worker died and whose lease expired). The
scheduler sleeps until the earliest due time, the poll interval, or a wake-up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._leases import FailureLog

if TYPE_CHECKING:
    from mailstrom_async._store import Job, Store

__all__ = ["Scheduler"]

logger = logging.getLogger("mailstrom_async.deliverer")

_MIN_WAIT = 0.005


class Scheduler:
    """Claims due jobs from the store while there is room for them in memory."""

    def __init__(
        self,
        *,
        store: Store,
        worker_id: str,
        clock: Callable[[], datetime],
        lease_duration: float,
        poll_interval: float,
        room: Callable[[], int],
        feed: Callable[[Job], None],
        before_claim: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._clock = clock
        self._lease = timedelta(seconds=lease_duration)
        self._poll_interval = poll_interval
        self._room = room
        self._feed = feed
        self._before_claim = before_claim
        self._wakeup = anyio.Event()
        self._failures = FailureLog("could not claim due work")
        self._claiming = anyio.Lock()

    def wake(self) -> None:
        """Look at the store again now (new work, a retry time, or free room)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Claim and feed due work until cancelled."""
        while True:
            self._wakeup = anyio.Event()
            delay = self._poll_interval  # with no room: woken when room frees up
            room = self._room()
            if room > 0:
                try:
                    if await self._claim(room) == room:
                        self._failures.succeeded()
                        continue  # maybe more is due; the room check throttles us
                    delay = await self._until_next_due()
                except Exception as exc:
                    # A busy or failing store: try again at the next poll, never
                    # give up; said at ERROR less and less often while it lasts.
                    self._failures.failed(exc)
                else:
                    self._failures.succeeded()
            with anyio.move_on_after(delay):
                await self._wakeup.wait()

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Inside, no claim is under way: every job claimed so far has been fed,
        and the next claim waits until the block ends.

        An operator's hold runs here, so that no job it holds is claimed before
        the hold and fed only after the hold looked for such jobs.
        """
        async with self._claiming:
            yield

    async def _claim(self, room: int) -> int:
        if self._before_claim is not None:
            await self._before_claim()
        async with self._claiming:
            now = self._clock()
            jobs = await self._store.claim_due(
                now=now,
                worker=self._worker_id,
                lease_until=now + self._lease,
                limit=room,
            )
            for job in jobs:
                self._feed(job)
        return len(jobs)

    async def _until_next_due(self) -> float:
        due = await self._store.next_due_at()
        if due is None:
            return self._poll_interval
        wait = (due - self._clock()).total_seconds()
        # Due now yet not claimed (a lease ending this very instant): look again
        # shortly rather than spin.
        return min(max(wait, _MIN_WAIT), self._poll_interval)
