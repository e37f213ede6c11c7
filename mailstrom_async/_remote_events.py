"""``Deliverer.events()`` in a submit-only process: the state changes that
other processes (the workers) make to the messages this process submitted.

A submit-only Deliverer delivers nothing itself, so without this its event
stream would stop at "queued". With a store that tells of other processes'
changes (:class:`~mailstrom_async.ChangeWatchingStore`: PostgreSQL's
``LISTEN/NOTIFY``), :class:`RemoteEvents` keeps the state this process last
knew of each recipient of the messages it published events for (its own
submissions, its own operations), reads the notified messages' statuses in one
query for all that came in meanwhile, and publishes an event for each
recipient whose state changed, with the state it knew as ``previous_state``.

A message is forgotten once all its recipients are final, and at most
``limit`` messages are remembered (the oldest go first). Reads are made only
while somebody follows ``events()``; a change made while nobody did is
reported, when one next is, against the state last known.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._domain import recipient_key
from mailstrom_async._models import DeliveryEvent, RecipientState

if TYPE_CHECKING:
    from mailstrom_async._events import EventBroker
    from mailstrom_async._models import MessageStatus

__all__ = ["RemoteEvents"]

logger = logging.getLogger("mailstrom_async.deliverer")

ReadMany = Callable[[Collection[str]], Awaitable[dict[str, "MessageStatus"]]]

_LIMIT = 100_000


class RemoteEvents:
    """Publishes the changes other processes make, read when notified."""

    def __init__(
        self,
        broker: EventBroker,
        read: ReadMany,
        clock: Callable[[], datetime],
        *,
        limit: int = _LIMIT,
    ) -> None:
        self._broker = broker
        self._read = read
        self._clock = clock
        self._limit = limit
        # message id -> recipient key -> the state last known (oldest first)
        self._known: dict[str, dict[tuple[str, str], RecipientState]] = {}
        self._stale: set[str] = set()
        self._stale_all = False
        self._poked = anyio.Event()
        broker.tap = self.seen

    def seen(self, event: DeliveryEvent) -> None:
        """This process published *event*: remember the recipient's state."""
        states = self._known.get(event.message_id)
        if states is None:
            if len(self._known) >= self._limit:
                del self._known[next(iter(self._known))]
            states = self._known[event.message_id] = {}
        states[recipient_key(event.recipient.address)] = event.state

    def stale(self, message_ids: Collection[str] | None) -> None:
        """Other processes changed these messages (None: any may have)."""
        if message_ids is None:
            self._stale_all = True
        else:
            self._stale.update(i for i in message_ids if i in self._known)
        if self._stale_all or self._stale:
            self._poked.set()

    async def run(self) -> None:
        """Read and publish what was notified, until cancelled; a failed read
        is logged and its messages read again at the next notification."""
        while True:
            await self._poked.wait()
            self._poked = anyio.Event()
            if not self._broker.subscriber_count:
                self._stale, self._stale_all = set(), False
                continue
            ids = list(self._known) if self._stale_all else list(self._stale)
            self._stale, self._stale_all = set(), False
            ids = [i for i in ids if i in self._known]
            if not ids:
                continue
            try:
                found = await self._read(ids)
            except Exception as exc:  # contained: read again when next notified
                self._stale.update(ids)
                logger.warning(
                    "could not read the statuses of notified messages",
                    extra={"messages": len(ids), "error": repr(exc)},
                )
                continue
            for message_id, status in found.items():
                self._publish(message_id, status)

    def _publish(self, message_id: str, status: MessageStatus) -> None:
        states = self._known.get(message_id)
        if states is None:
            return
        for recipient in status.recipients:
            key = recipient_key(recipient.address)
            before = states.get(key)
            if before is recipient.state:
                continue
            states[key] = recipient.state
            self._broker.publish(
                DeliveryEvent(
                    message_id=message_id,
                    recipient=recipient,
                    previous_state=before,
                    at=self._clock(),  # when this process learned of it
                )
            )
        if status.is_done:
            del self._known[message_id]
