"""The operator's queue operations: retry now, cancel, hold, release, leases.

What :class:`~mailstrom_async.Deliverer`'s ``retry_now``, ``cancel``, ``hold``,
``release``, ``leases`` and ``release_leases`` do; they are documented there.
Each changes the store first, then what this process holds in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import attrs

from mailstrom_async._domain import domain_key
from mailstrom_async._leases import describe_owners, release_dead_owner
from mailstrom_async._models import DeliveryEvent

if TYPE_CHECKING:
    from mailstrom_async._dispatch import Dispatcher
    from mailstrom_async._events import EventBroker
    from mailstrom_async._leases import LeaseKeeper, LeaseOwner
    from mailstrom_async._store import Job, Store
    from mailstrom_async._watchers import Watchers

__all__ = ["QueueOperations"]

logger = logging.getLogger("mailstrom_async.deliverer")


@attrs.define(kw_only=True)
class QueueOperations:
    """Changes to the queue that an operator asks for, in the store and here."""

    _store: Store
    _mode: str
    _clock: Callable[[], datetime]
    _broker: EventBroker
    _keeper: LeaseKeeper
    _dispatcher: Dispatcher
    _watchers: Watchers

    def _wake(self) -> None:
        """Have the scheduler look at the store now, if this process delivers."""
        if self._mode != "submit":
            self._dispatcher.scheduler.wake()

    async def retry_now(self, *, message_id: str | None, domain: str | None) -> int:
        keys: set[str] | None = None
        route = self._dispatcher.route
        if route is not None and message_id is not None:
            status = await self._store.status(message_id)
            keys = {
                route.destination(r.address)
                for r in status
                if not r.is_final and (domain is None or r.domain == domain_key(domain))
            }
        elif route is not None and domain is not None:
            keys = {route.destination(f"postmaster@{domain}")}
        count = await self._store.retry_now(
            now=self._clock(), message_id=message_id, domain=domain
        )
        if self._dispatcher.lanes is not None:
            self._dispatcher.lanes.forgive(keys)
        self._wake()
        logger.info(
            "retry now",
            extra={"message_id": message_id, "domain": domain, "recipients": count},
        )
        return count

    async def cancel(self, message_id: str) -> int:
        before = await self._store.status(message_id)
        count = await self._store.cancel(message_id)
        # Jobs of the message that this process claimed and that still wait for
        # a connection are dropped; one already in a transaction goes on.
        dropped = self._dispatcher.take_waiting(
            lambda job: job.message_id == message_id
        )
        for job in dropped:
            self._keeper.drop(job)
        if dropped:
            self._dispatcher.scheduler.wake()
        after = await self._store.status(message_id)
        now = self._clock()
        for old, new in zip(before, after, strict=True):
            if old.state is not new.state:
                self._broker.publish(
                    DeliveryEvent(
                        message_id=message_id,
                        recipient=new,
                        previous_state=old.state,
                        at=now,
                    )
                )
        self._watchers.changed(message_id)
        logger.info("cancelled", extra={"message_id": message_id, "recipients": count})
        return count

    async def leases(self) -> list[LeaseOwner]:
        return await describe_owners(self._store)

    async def release_leases(self, owner: str | None) -> int:
        if owner is None:
            count = await self._keeper.reclaim_dead()
        else:
            count = await release_dead_owner(self._store, owner)
        if count:
            self._wake()
        return count

    async def hold(self, *, message_id: str | None, domain: str | None) -> int:
        lowered = None if domain is None else domain_key(domain)

        def wanted(job: Job) -> bool:
            return (message_id is None or job.message_id == message_id) and (
                lowered is None or any(r.domain == lowered for r in job.recipients)
            )

        # Shielded: a job taken out and not given back would keep its lease
        # (renewed while this process runs) after the mail is released.
        # Paused: a claim that raced the hold has fed its jobs before we look.
        with anyio.CancelScope(shield=True):
            async with self._dispatcher.scheduler.paused():
                count = await self._store.hold(message_id=message_id, domain=domain)
                taken = self._dispatcher.take_waiting(wanted)
            # Whole jobs go back: their recipients that are not held (of
            # another domain, through a relay) are claimed again at once.
            await self._dispatcher.give_back(taken)
        logger.info(
            "held",
            extra={
                "message_id": message_id,
                "domain": domain,
                "recipients": count,
                "jobs_given_back": len(taken),
            },
        )
        return count

    async def release(
        self, *, message_id: str | None, domain: str | None, all: bool
    ) -> int:
        count = await self._store.unhold(message_id=message_id, domain=domain, all=all)
        self._wake()
        logger.info(
            "released",
            extra={
                "message_id": message_id,
                "domain": domain,
                "all": all,
                "recipients": count,
            },
        )
        return count
