"""From the store to the lanes: claimed jobs wait in memory, then go to a lane.

The scheduler claims due jobs (and ``submit`` hands over the ones it claimed);
each waits in the ready queue until the dispatcher routes it to the lane of its
destination, split in one job per destination if it has several. A job done, or
given back, frees its room, and the scheduler looks for more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import attrs
from anyio.abc import TaskGroup

from mailstrom_async._scheduler import Scheduler

if TYPE_CHECKING:
    from mailstrom_async._config import Config
    from mailstrom_async._leases import LeaseKeeper
    from mailstrom_async._models import RecipientStatus
    from mailstrom_async._store import Job, Store
    from mailstrom_async._transport import Transport
    from mailstrom_async._worker import Lanes

__all__ = ["Dispatcher"]

logger = logging.getLogger("mailstrom_async.deliverer")


class Dispatcher:
    """The jobs of one Deliverer between their claim and their lane.

    ``route`` and ``lanes`` are None until :meth:`attach` (and stay None in
    submit-only mode): jobs are then neither claimed nor dispatched.
    """

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        worker_id: str,
        clock: Callable[[], datetime],
        keeper: LeaseKeeper,
    ) -> None:
        self._config = config
        self._keeper = keeper
        self._ready: asyncio.Queue[Job] = asyncio.Queue()
        self.route: Transport | None = None
        self.lanes: Lanes | None = None
        self.scheduler = Scheduler(
            store=store,
            worker_id=worker_id,
            clock=clock,
            lease_duration=config.lease_duration,
            poll_interval=config.poll_interval,
            room=self.room,
            feed=self.feed,
            before_claim=keeper.release_reclaimed,
        )

    def attach(self, route: Transport, lanes: Lanes) -> None:
        """Deliver through *route*, on *lanes*."""
        self.route = route
        self.lanes = lanes

    def room(self) -> int:
        """How many more jobs this process may hold in memory."""
        return max(0, self._config.limits.max_jobs_in_memory - self._keeper.jobs)

    def feed(self, job: Job) -> None:
        """Queue a claimed *job* for its lane (its recipients not ours already)."""
        part = self._keeper.new_part(job)
        if part is None:
            return  # every recipient is in a job of ours already
        self._keeper.hold(part)
        self._ready.put_nowait(part)

    def job_done(self, job: Job) -> None:
        """*job* is finished or given back: its room is free."""
        self._keeper.drop(job)
        self.scheduler.wake()

    def take_waiting(self, wanted: Callable[[Job], bool]) -> list[Job]:
        """Take this process's jobs that *wanted* picks and that wait for a
        connection (in a lane, or not dispatched yet); the others keep their
        places. Jobs in a transaction go on."""
        taken = [] if self.lanes is None else self.lanes.take(wanted)
        return taken + self._take_ready(wanted)

    async def give_back(self, jobs: list[Job]) -> None:
        """Give *jobs* back to the store unattempted."""
        for job in jobs:
            if self.lanes is not None:
                await self.lanes.release(job)
            self.job_done(job)

    async def drain(self) -> None:
        """Give back the jobs that wait; let in-flight ones finish in time.

        The scheduler and :meth:`run` are stopped first, so nothing new comes in.
        """
        lanes = self.lanes
        if lanes is None:
            return
        await self.give_back(lanes.stop() + self._take_ready(lambda _: True))
        with anyio.move_on_after(self._config.shutdown_grace):
            await lanes.wait_idle()

    async def run(self, tg: TaskGroup) -> None:
        """Route each ready job to its lane, running in *tg*, until cancelled."""
        if self.route is None or self.lanes is None:  # pragma: no cover
            msg = "unreachable"
            raise AssertionError(msg)
        route, lanes = self.route, self.lanes
        while True:
            job = await self._ready.get()
            parts: dict[str, list[RecipientStatus]] = {}
            try:
                for r in job.recipients:
                    parts.setdefault(route.destination(r.address), []).append(r)
            except Exception as exc:  # the job boundary, before a lane has it
                logger.exception(
                    "could not route a delivery job; its recipients are deferred",
                    extra={"message_id": job.message_id, "error": str(exc)},
                )
                tg.start_soon(self._contain, job, exc)
                continue
            if len(parts) == 1:
                [key] = parts
                lanes.dispatch(job, key, tg)
                continue
            # One transaction per destination: split the job, each part a job
            # (held before the whole is dropped, so its lease end is kept).
            for key, recipients in parts.items():
                part = attrs.evolve(job, recipients=tuple(recipients))
                self._keeper.hold(part)
                lanes.dispatch(part, key, tg)
            self._keeper.drop(job)

    def _take_ready(self, wanted: Callable[[Job], bool]) -> list[Job]:
        """Take the jobs not dispatched yet that *wanted* picks, in order."""
        taken = []
        for _ in range(self._ready.qsize()):
            job = self._ready.get_nowait()
            if wanted(job):
                taken.append(job)
            else:
                self._ready.put_nowait(job)
        return taken

    async def _contain(self, job: Job, error: BaseException) -> None:
        try:
            if self.lanes is not None:
                await self.lanes.contain(job, error)
        finally:
            self.job_done(job)
