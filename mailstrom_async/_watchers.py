"""What ``await handle`` and ``Deliverer.follow()`` wait on.

A handle's waiters share one event per message, dropped once set; a follower
keeps its own :class:`Watch` for as long as it follows, so that a change made
while its consumer is busy is not missed.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from mailstrom_async._models import MessageStatus

__all__ = ["Watch", "Watchers"]


class Watch:
    """One follower's flag: set when its message may have changed, or when
    following ends (``ended``)."""

    def __init__(self, *, ended: bool = False) -> None:
        self._event = anyio.Event()
        self.ended = ended

    def clear(self) -> None:
        """Forget the changes seen so far (call before reading the status)."""
        if self._event.is_set():
            self._event = anyio.Event()

    def set(self, *, end: bool = False) -> None:
        self.ended = self.ended or end
        self._event.set()

    async def wait(self, poll_interval: float) -> None:
        """Wait for a change, the end, or *poll_interval* seconds."""
        with anyio.move_on_after(poll_interval):
            await self._event.wait()


class Watchers:
    """Wakes the waiters of a message when its status may have changed."""

    def __init__(self) -> None:
        # message id -> (the event its waiters wait on, how many wait)
        self._events: dict[str, tuple[anyio.Event, int]] = {}
        # message id -> its followers' watches (weak: a follower dropped without
        # being closed goes away by itself)
        self._follows: dict[str, weakref.WeakSet[Watch]] = {}
        self._follows_ended = False

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
        watches = self._follows.get(message_id)
        if watches is not None:
            if not watches:  # its followers were dropped unclosed
                del self._follows[message_id]
            for watch in list(watches):
                watch.set()

    def close(self) -> None:
        """Wake every waiter and end every follower (the Deliverer closed)."""
        for event, _ in self._events.values():
            event.set()
        self.end_follows()

    def follow(self, message_id: str) -> Watch:
        """A watch on *message_id* until :meth:`unfollow` (or until dropped)."""
        watch = Watch(ended=self._follows_ended)
        self._follows.setdefault(message_id, weakref.WeakSet()).add(watch)
        return watch

    def unfollow(self, message_id: str, watch: Watch) -> None:
        watches = self._follows.get(message_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._follows[message_id]

    def end_follows(self) -> None:
        """End every follower, and every later one after its first status."""
        self._follows_ended = True
        for watches in list(self._follows.values()):
            for watch in list(watches):
                watch.set(end=True)

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
