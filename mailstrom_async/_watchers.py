"""What ``await handle`` waits on: one event per message that someone awaits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from mailstrom_async._models import MessageStatus

__all__ = ["Watchers"]


class Watchers:
    """Wakes the waiters of a message when its status may have changed."""

    def __init__(self) -> None:
        # message id -> (the event its waiters wait on, how many wait)
        self._events: dict[str, tuple[anyio.Event, int]] = {}

    async def wait_done(
        self,
        message_id: str,
        status: Callable[[str], Awaitable[MessageStatus]],
        *,
        poll_interval: float,
    ) -> MessageStatus:
        """Read *status* until the message is done, after each change or poll."""
        while True:
            event = self._watch(message_id)
            try:
                current = await status(message_id)
                if current.is_done:
                    return current
                # Another process may deliver it (submit-only mode): poll too.
                with anyio.move_on_after(poll_interval):
                    await event.wait()
            finally:
                self._unwatch(message_id)

    def changed(self, message_id: str) -> None:
        """The message's status changed: wake its waiters."""
        entry = self._events.pop(message_id, None)
        if entry is not None:
            entry[0].set()

    def close(self) -> None:
        """Wake every waiter (the Deliverer closed)."""
        for event, _ in self._events.values():
            event.set()

    def _watch(self, message_id: str) -> anyio.Event:
        event, count = self._events.get(message_id, (anyio.Event(), 0))
        self._events[message_id] = (event, count + 1)
        return event

    def _unwatch(self, message_id: str) -> None:
        entry = self._events.get(message_id)
        if entry is not None:
            event, count = entry
            if count <= 1:
                del self._events[message_id]
            else:
                self._events[message_id] = (event, count - 1)
