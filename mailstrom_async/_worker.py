"""Per-destination delivery lanes: the pool that schedules jobs onto connections.

A *lane* is one destination (the relay, or one recipient domain). It has a
queue of claimed jobs and up to ``Limits.connections_per_destination`` worker
coroutines, each owning one SMTP connection that it reuses across messages until
the connection goes idle, reaches its reuse limits (:mod:`._reuse`), fails or
is poisoned by a timeout or a cancellation.
What happens to one job, from its first transaction to its recorded outcome,
and the boundary that contains its failures, is :mod:`._job`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from mailstrom_async._lane import Lane
from mailstrom_async._statistics import AttemptCounters, DestinationStatistics

if TYPE_CHECKING:
    from mailstrom_async._config import Config
    from mailstrom_async._job import JobRunner
    from mailstrom_async._reuse import PooledConnection
    from mailstrom_async._store import Job

__all__ = ["Lanes"]

logger = logging.getLogger("mailstrom_async.deliverer")


class Lanes:
    """All destination lanes of one Deliverer: which job runs on which connection."""

    def __init__(
        self,
        *,
        config: Config,
        clock: Callable[[], datetime],
        runner: JobRunner,
        on_job_done: Callable[[Job], None],
    ) -> None:
        self._config = config
        self._clock = clock
        self._runner = runner
        self._on_job_done = on_job_done
        self._lanes: dict[str, Lane] = {}
        self._limiter = anyio.CapacityLimiter(config.limits.max_connections)
        self._in_flight = 0
        self._stopping = False
        self._idle_event = anyio.Event()
        self._idle_event.set()

    def _stop_requested(self) -> bool:
        return self._stopping

    @property
    def is_stopping(self) -> bool:
        """True once stop() was called."""
        return self._stopping

    @property
    def in_flight(self) -> int:
        """Jobs being delivered right now."""
        return self._in_flight

    def counters(self) -> AttemptCounters:
        """What this Deliverer recorded since it started."""
        tally = self._runner.tally
        return AttemptCounters(
            attempts=tally.attempts,
            delivered=tally.delivered,
            deferred=tally.deferred,
            failed=tally.failed,
        )

    def destinations(self) -> dict[str, DestinationStatistics]:
        """A snapshot of every active lane."""
        return {
            key: DestinationStatistics(
                workers=lane.workers,
                idle_workers=lane.idle,
                queued=lane.queue.qsize(),
                consecutive_failures=lane.failures,
                backoff_until=lane.backoff_until,
            )
            for key, lane in self._lanes.items()
        }

    def dispatch(self, job: Job, key: str, tg: TaskGroup) -> None:
        """Queue *job* on the lane for *key*, starting a worker if all are busy."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(key)
        lane.queue.put_nowait(job)
        limit = self._config.limits.connections_per_destination
        if lane.idle < lane.queue.qsize() and lane.workers < limit:
            lane.workers += 1
            tg.start_soon(self._run_worker, lane, name=f"mailstrom lane {key}")

    def forgive(self, keys: Collection[str] | None = None) -> None:
        """Forget the backoff of these destinations (of all with None): an
        operator asked to retry now, so their next job connects at once."""
        for key, lane in self._lanes.items():
            if keys is None or key in keys:
                lane.succeeded()

    def take(self, wanted: Callable[[Job], bool]) -> list[Job]:
        """Take the waiting (not in-flight) jobs that *wanted* picks out of their
        lanes and return them; the others keep their places."""
        taken: list[Job] = []
        for lane in self._lanes.values():
            kept: list[Job] = []
            while not lane.queue.empty():
                job = lane.queue.get_nowait()
                (taken if wanted(job) else kept).append(job)
            for job in kept:
                lane.queue.put_nowait(job)
        return taken

    def stop(self) -> list[Job]:
        """Stop taking jobs; return those still waiting so they can be released."""
        self._stopping = True
        waiting: list[Job] = []
        for lane in self._lanes.values():
            while not lane.queue.empty():
                waiting.append(lane.queue.get_nowait())
        return waiting

    async def wait_idle(self) -> None:
        """Wait until no job is being delivered."""
        while self._in_flight:
            await self._idle_event.wait()

    async def _run_worker(self, lane: Lane) -> None:
        conn: PooledConnection | None = None
        try:
            async with self._limiter:
                while not self.is_stopping:
                    lane.idle += 1
                    job: Job | None = None
                    with anyio.move_on_after(self._config.limits.idle_timeout):
                        job = await lane.queue.get()
                    lane.idle -= 1
                    if job is None:
                        break  # idle for too long: close the connection, end
                    if self._stop_requested():  # stop() came while we waited
                        await self.release(job)
                        self._on_job_done(job)
                        break
                    self._in_flight += 1
                    self._idle_event = anyio.Event()
                    try:
                        conn = await self._runner.run(lane, job, conn)
                    finally:
                        self._in_flight -= 1
                        if not self._in_flight:
                            self._idle_event.set()
                        self._on_job_done(job)
        finally:
            lane.workers -= 1
            backing_off = lane.is_backing_off(self._clock())
            if lane.workers == 0 and lane.queue.empty() and not backing_off:
                self._lanes.pop(lane.key, None)  # reap: memory follows active lanes
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.conn.aclose()

    async def release(self, job: Job) -> None:
        """Give *job*'s recipients back to the store, unattempted; never raises."""
        await self._runner.release(job)

    async def contain(self, job: Job, error: BaseException) -> None:
        """Settle a job that failed before it reached a lane (see the job boundary)."""
        await self._runner.contain(job, error)
