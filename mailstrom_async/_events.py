"""Fan-out of delivery events to any number of subscribers, and message waiters.

Publishing never blocks and never waits for a subscriber: each subscriber has a
bounded buffer, and one that falls behind loses its oldest events and is told how
many through ``DeliveryEvent.missed`` on the next event it reads.
"""

from __future__ import annotations

import weakref
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
import attrs

if TYPE_CHECKING:
    from collections.abc import Callable

    from mailstrom_async._models import DeliveryEvent

__all__ = ["EventBroker", "EventStream"]


class EventStream:
    """An async iterator over delivery events, from the moment it was created.

    Use it with ``async for``; it ends when the Deliverer closes. Leaving it early
    is fine; ``aclose()`` (or ``async with``) unsubscribes at once.
    """

    def __init__(self, broker: EventBroker, max_buffer: int) -> None:
        self._broker: EventBroker | None = broker
        self._buffer: deque[DeliveryEvent] = deque()
        self._max_buffer = max_buffer
        self._missed = 0
        self._wakeup = anyio.Event()

    def _push(self, event: DeliveryEvent) -> None:
        if len(self._buffer) >= self._max_buffer:
            self._buffer.popleft()
            self._missed += 1
        self._buffer.append(event)
        self._wakeup.set()

    def _end(self) -> None:
        self._broker = None
        self._wakeup.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> DeliveryEvent:
        while not self._buffer:
            if self._broker is None:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        event = self._buffer.popleft()
        if self._missed:
            event = attrs.evolve(event, missed=self._missed)
            self._missed = 0
        return event

    async def aclose(self) -> None:
        """Stop receiving events; buffered ones are dropped."""
        if self._broker is not None:
            self._broker.unsubscribe(self)
        self._buffer.clear()
        self._end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class EventBroker:
    """Publishes events to every live subscriber."""

    def __init__(self, *, max_buffer: int = 10_000) -> None:
        self._max_buffer = max_buffer
        # Weak: a stream its owner dropped without closing unsubscribes itself.
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        # What publish() walks: one call per recipient, so a message of 10,000
        # publishes 10,000 events at once; rebuilt when a subscriber comes or goes.
        self._targets: tuple[weakref.ref[EventStream], ...] = ()
        self._closed = False
        # Sees every event published (RemoteEvents, in a submit-only process).
        self.tap: Callable[[DeliveryEvent], None] | None = None

    def subscribe(self) -> EventStream:
        """A new stream that receives every event published from now on."""
        stream = EventStream(self, self._max_buffer)
        if self._closed:
            stream._end()
        else:
            self._streams.add(stream)
            self._refresh()
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        self._streams.discard(stream)
        self._refresh()

    def _refresh(self) -> None:
        self._targets = tuple(weakref.ref(s) for s in self._streams)

    @property
    def subscriber_count(self) -> int:
        return len(self._streams)

    def publish(self, event: DeliveryEvent) -> None:
        if self.tap is not None:
            self.tap(event)
        for target in self._targets:
            stream = target()
            if stream is not None:  # else dropped unclosed: gone at the next refresh
                stream._push(event)

    def close(self) -> None:
        """End every stream (after it has read what is buffered)."""
        self._closed = True
        for stream in list(self._streams):
            stream._end()
        self._streams.clear()
        self._targets = ()
