"""The jobs this process holds, and their leases.

A lease lives only with its work. :class:`LeaseKeeper` knows which messages this
process holds jobs of (claimed, waiting for a connection, or in a transaction)
and renews the leases of those, and only those, every third of the lease: a job
that ends, however it ends, is no longer renewed, so a lease the job could not
hand back (the store failed) runs out within one lease duration instead of
being kept alive for as long as the process lives.

Leases of dead owners on this host (the owner id says which process on which
host, see :mod:`._owner`) are released as soon as they are seen: when the
Deliverer starts and at each renewal round, so a crashed process's mail goes out
again at once instead of a lease later. Owners on other hosts expire by lease.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import attrs

from mailstrom_async._exceptions import LiveLeaseError
from mailstrom_async._owner import Liveness, OwnerId, check, liveness

if TYPE_CHECKING:
    from mailstrom_async._store import Job, LeaseInfo, Store

__all__ = [
    "FailureLog",
    "LeaseKeeper",
    "LeaseOwner",
    "describe_owners",
    "lease_owner_info",
    "release_dead_owner",
    "release_dead_owners",
]

logger = logging.getLogger("mailstrom_async.deliverer")


@attrs.frozen(kw_only=True)
class LeaseOwner:
    """A worker that holds leases, as ``Deliverer.leases()`` reports it.

    ``liveness`` says whether its process still runs, as far as this host can
    tell (``UNKNOWN`` for another host: its leases run out by themselves);
    ``liveness_reason`` says why in a few words.
    """

    owner: str
    recipients: int
    lease_until: datetime | None
    host: str | None
    pid: int | None
    liveness: Liveness
    liveness_reason: str

    @property
    def is_dead(self) -> bool:
        """True when this host knows the owner's process is gone."""
        return self.liveness is Liveness.DEAD


def _dead(owners: list[str]) -> list[str]:
    """The owners among *owners* whose process is gone (reads ``/proc``)."""
    return [owner for owner in owners if liveness(owner) is Liveness.DEAD]


def lease_owner_info(owner: str, info: LeaseInfo | None) -> LeaseOwner:
    """What is known of *owner*, holding what *info* says (reads ``/proc``: run
    it in a worker thread)."""
    parsed = OwnerId.parse(owner)
    state, reason = check(owner)
    return LeaseOwner(
        owner=owner,
        recipients=info.recipients if info is not None else 0,
        lease_until=info.lease_until if info is not None else None,
        host=parsed.host if parsed is not None else None,
        pid=parsed.pid if parsed is not None else None,
        liveness=state,
        liveness_reason=reason,
    )


async def describe_owners(store: Store) -> list[LeaseOwner]:
    """Every lease owner in *store*, with what this host can tell of it."""
    owners = await store.lease_owners()

    def describe() -> list[LeaseOwner]:
        return [lease_owner_info(owner, info) for owner, info in owners.items()]

    return await anyio.to_thread.run_sync(describe)


async def release_dead_owners(store: Store, *, keep: str | None = None) -> int:
    """Release the leases of every owner in *store* (but *keep*) whose process
    this host knows is gone; return how many recipients were released."""
    owners = await store.lease_owners()
    others = [owner for owner in owners if owner != keep]
    dead = await anyio.to_thread.run_sync(_dead, others) if others else []
    released = 0
    for owner in dead:
        count = await store.release_owner(owner)
        released += count
        _log_released(owner, count, owners[owner].lease_until)
    return released


def _log_released(owner: str, count: int, lease_until: datetime | None) -> None:
    logger.warning(
        "released the leases of a worker that is gone",
        extra={
            "owner": owner,
            "recipients": count,
            "lease_until": None if lease_until is None else lease_until.isoformat(),
        },
    )


async def release_dead_owner(store: Store, owner: str) -> int:
    """Release every lease of *owner*, known to be gone; return how many.

    Raises:
        LiveLeaseError: *owner* runs, or this host cannot tell that it is gone.
    """
    info = await anyio.to_thread.run_sync(lease_owner_info, owner, None)
    if info.liveness is not Liveness.DEAD:
        msg = (
            f"lease owner {owner!r} is {info.liveness.value} here "
            f"({info.liveness_reason}); its leases are not broken, they "
            "run out by themselves if it has stopped"
        )
        raise LiveLeaseError(msg)
    count = await store.release_owner(owner)
    _log_released(owner, count, None)
    return count


@attrs.define
class FailureLog:
    """Says at ERROR that something keeps failing, less and less often.

    The first failure is logged at once; while failures go on, the next one is
    logged after 2, 4, 8 ... seconds (at most every ``longest`` seconds), with
    how many were not logged in between. The first success after failures is
    logged at INFO.
    """

    what: str
    clock: Callable[[], float] = anyio.current_time
    longest: float = 300.0
    failures: int = 0
    _next_log: float = 0.0
    _interval: float = 1.0
    _quiet: int = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = self.clock()
        if self.failures > 1 and now < self._next_log:
            self._quiet += 1
            return
        logger.error(
            "%s",
            self.what,
            extra={
                "error": f"{type(exc).__name__}: {exc}",
                "failures": self.failures,
                "not_logged": self._quiet,
            },
        )
        self._interval = (
            1.0 if self.failures == 1 else min(self._interval * 2, self.longest)
        )
        self._next_log = now + self._interval
        self._quiet = 0

    def succeeded(self) -> None:
        if self.failures:
            logger.info(
                "store works again",
                extra={"after": self.what, "failures": self.failures},
            )
        self.failures = 0
        self._quiet = 0


class LeaseKeeper:
    """Counts the jobs this process holds per message, and keeps their leases."""

    def __init__(
        self,
        *,
        store: Store,
        owner: str,
        clock: Callable[[], datetime],
        lease_duration: float,
    ) -> None:
        self._store = store
        self._owner = owner
        self._clock = clock
        self._lease = timedelta(seconds=lease_duration)
        # Per message, how many held jobs name each recipient address.
        self._held: dict[str, Counter[str]] = {}
        # Per held message, until when its lease is known to last: from its
        # claim, pushed on by each renewal that succeeded. A store that fails
        # moves it no more, so a worker that lost the database sees its leases
        # run out and stops starting transactions it could not record.
        self._until: dict[str, datetime] = {}
        self._jobs = 0
        self._renewals = FailureLog("could not renew leases")
        # Recipients a claim returned while a job here still held them, by
        # message: that claim's lease on them is given back once the job that
        # held them is over (release_reclaimed), so that the next claim takes
        # them with their status as that job left it.
        self._reclaimed: dict[str, list[Job]] = {}
        self._to_release: list[Job] = []

    @property
    def jobs(self) -> int:
        """How many jobs this process holds."""
        return self._jobs

    def lease_until(self) -> datetime:
        """When a lease taken now ends."""
        return self._clock() + self._lease

    def new_part(self, job: Job) -> Job | None:
        """*job* without the recipients that a job held here already covers, or
        None when it covers them all.

        A claim can return recipients this process still works on: their lease
        ran out because renewing it failed, and the claim took it again for the
        same owner. Two jobs for one recipient would deliver it twice.
        """
        held = self._held.get(job.message_id)
        if not held:
            return job
        fresh = tuple(r for r in job.recipients if r.address not in held)
        overlap = tuple(r for r in job.recipients if r.address in held)
        # The job that holds them may have recorded them already (their lease
        # ended, and the claim took a new one a moment before the job was
        # over): their new lease must not be left to run out.
        self._reclaimed.setdefault(job.message_id, []).append(
            attrs.evolve(job, recipients=overlap)
        )
        if not fresh:
            return None
        return (
            attrs.evolve(job, recipients=fresh)
            if len(fresh) < len(job.recipients)
            else job
        )

    def hold(self, job: Job) -> None:
        """*job* is now in this process's hands."""
        held = self._held.setdefault(job.message_id, Counter())
        held.update(r.address for r in job.recipients)
        # Claimed a moment ago (by a claim or a submit that took the lease).
        self._until.setdefault(job.message_id, self.lease_until())
        self._jobs += 1

    def lease_end(self, message_id: str) -> datetime | None:
        """Until when the lease of a held message is known to last (None: not
        held): it was claimed or last renewed a lease duration before that."""
        return self._until.get(message_id)

    def drop(self, job: Job) -> None:
        """*job* is over, however it ended."""
        held = self._held.get(job.message_id)
        if held is not None:
            held.subtract(r.address for r in job.recipients)
            for address in [a for a, n in held.items() if n <= 0]:
                del held[address]
            if not held:
                del self._held[job.message_id]
                self._until.pop(job.message_id, None)
        self._jobs -= 1
        parts = self._reclaimed.pop(job.message_id, None)
        if parts:
            still: Counter[str] = held or Counter()
            kept = []
            for part in parts:  # free once no job here holds its recipients
                if any(r.address in still for r in part.recipients):
                    kept.append(part)
                else:
                    self._to_release.append(part)
            if kept:
                self._reclaimed[job.message_id] = kept

    async def release_reclaimed(self) -> None:
        """Give back the leases of recipients claimed again while a job here
        held them, now that it is over; never raises (a lease not given back
        simply runs out). Runs before each claim."""
        parts, self._to_release = self._to_release, []
        for part in parts:
            fence = {} if part.lease is None else {"lease": part.lease}
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._store.release(
                    part.message_id,
                    [r.address for r in part.recipients],
                    worker=self._owner,
                    **fence,
                )

    async def run(self) -> None:
        """Renew the held jobs' leases, and reclaim dead owners', until cancelled."""
        interval = self._lease.total_seconds() / 3
        while True:
            await anyio.sleep(interval)
            await self.renew()
            await self.reclaim_dead()

    async def renew(self) -> None:
        """Extend the leases of the jobs held now; never raises."""
        if not self._held:
            return
        message_ids = list(self._held)
        until = self.lease_until()
        try:
            await self._store.renew_leases(
                worker=self._owner, lease_until=until, message_ids=message_ids
            )
        except Exception as exc:
            self._renewals.failed(exc)
        else:
            self._renewals.succeeded()
            for message_id in message_ids:
                if message_id in self._until:
                    self._until[message_id] = max(self._until[message_id], until)

    async def reclaim_dead(self) -> int:
        """Release the leases of owners on this host whose process is gone;
        return how many recipients were released. Never raises: a store that
        fails leaves the leases to expire by themselves."""
        try:
            return await release_dead_owners(self._store, keep=self._owner)
        except Exception as exc:
            logger.error(
                "could not reclaim the leases of dead workers; they expire by lease",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            return 0
