"""What ``await handle`` and ``Deliverer.follow()`` wait on.

The handles awaiting one message share a :class:`_Waited`: the message's latest
known status and an event set whenever that may have changed. The status is
read from the store once, when the first handle starts waiting; after that it
is kept current without reading the store:

- a delivery attempt of this process hands :meth:`Watchers.changed` the
  statuses it has just committed, which are merged in (so a handle resolves
  when this process records its message's last outcome, with no store read);
- for what other processes do (a worker, when this one only submits), one
  task, :meth:`Watchers.poll`, reads the statuses of every waited-on message in
  one query per ``Config.poll_interval``: its cost does not grow with the
  number of handles. A store that tells of other processes' changes
  (PostgreSQL's ``LISTEN/NOTIFY``) calls :meth:`Watchers.stale` with the
  changed messages, and the poll reads those at once, in one query for all
  that came in meanwhile.

A follower keeps its own :class:`Watch` for as long as it follows, so that a
change made while its consumer is busy is not missed.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING

import anyio
import attrs

from mailstrom_async._domain import recipient_key
from mailstrom_async._exceptions import StoreError
from mailstrom_async._store._common import check_statuses, should_replace

if TYPE_CHECKING:
    from mailstrom_async._models import MessageStatus, RecipientStatus

__all__ = ["Watch", "Watchers", "merged"]

logger = logging.getLogger("mailstrom_async.deliverer")

ReadOne = Callable[[str], Awaitable["MessageStatus"]]
ReadMany = Callable[[Collection[str]], Awaitable[dict[str, "MessageStatus"]]]


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


def merged(status: MessageStatus, recorded: Sequence[RecipientStatus]) -> MessageStatus:
    """*status* with *recorded* written over it as a store's ``record`` writes
    them: each matched by address, in the form the store keeps (UTC, valid
    Unicode), and a final state never replaced by an unfinished one."""
    new = {recipient_key(r.address): r for r in check_statuses(recorded)}
    recipients = []
    for old in status.recipients:
        r = new.get(recipient_key(old.address))
        if r is not None and should_replace(old.state, r.state):
            old = attrs.evolve(r, address=old.address, held=old.held and r.held)
        recipients.append(old)
    return attrs.evolve(status, recipients=tuple(recipients))


class _Waited:
    """What the handles awaiting one message share."""

    __slots__ = ("count", "event", "pending", "reading", "status", "version")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.count = 0  # how many handles wait
        # The latest status known; None until read (or when it must be re-read).
        self.status: MessageStatus | None = None
        # Bumped by each change, so that a poll read before it is not applied.
        self.version = 0
        self.reading = False  # a handle is reading the status now
        # Statuses recorded while it was being read, to merge into what it read.
        self.pending: list[Sequence[RecipientStatus]] = []

    def wake(self) -> None:
        event, self.event = self.event, anyio.Event()
        event.set()


class Watchers:
    """Keeps the status of awaited messages current and wakes their waiters."""

    def __init__(self, *, retry_interval: float = 1.0) -> None:
        # How long a handle waits before it reads again after a failed read.
        self._retry_interval = retry_interval
        self._waited: dict[str, _Waited] = {}
        # message id -> its followers' watches (weak: a follower dropped without
        # being closed goes away by itself)
        self._follows: dict[str, weakref.WeakSet[Watch]] = {}
        self._follows_ended = False
        self._closed = False
        # Messages another process changed, to read at once (see stale()).
        self._stale: set[str] = set()
        self._stale_all = False
        self._poked = anyio.Event()
        self.reads = 0  # store reads made for handles (the first read and polls)

    async def wait_done(self, message_id: str, read: ReadOne) -> MessageStatus:
        """Wait until the message is done and return its status.

        *read* reads one status from the store (and raises once the Deliverer
        is closed); it is called when the first handle starts waiting, after an
        operation such as ``cancel``, and once the watchers are closed. A read
        that fails with StoreError (a database restarting, a connection
        dropped) is logged and made again after the retry interval: the handle
        goes on waiting, as the poll does, until the watchers are closed.
        """
        waited = self._waited.get(message_id)
        if waited is None:
            waited = self._waited[message_id] = _Waited()
        waited.count += 1
        try:
            while True:
                event = waited.event
                status = waited.status
                if status is not None and status.is_done:
                    return status
                if (status is None or self._closed) and not waited.reading:
                    try:
                        await self._read(message_id, waited, read)
                    except StoreError as exc:
                        if self._closed:
                            raise
                        await self._read_failed(message_id, waited, exc)
                    continue
                await event.wait()
        finally:
            waited.count -= 1
            if not waited.count and self._waited.get(message_id) is waited:
                del self._waited[message_id]

    async def _read_failed(
        self, message_id: str, waited: _Waited, exc: StoreError
    ) -> None:
        logger.warning(
            "could not read the status of an awaited message; trying again",
            extra={"message_id": message_id, "error": repr(exc)},
        )
        event = waited.event  # set by close(), or by a change meanwhile
        with anyio.move_on_after(self._retry_interval):
            await event.wait()

    async def _read(self, message_id: str, waited: _Waited, read: ReadOne) -> None:
        waited.reading, version = True, waited.version
        waited.pending = []
        try:
            self.reads += 1
            status = await read(message_id)
        finally:
            waited.reading = False
            waited.wake()  # the others look again (and read, if this failed)
            if message_id in self._stale:  # changed while it was first read
                self._poked.set()
        if waited.version - version == len(waited.pending):
            # Only recorded statuses came meanwhile: what was read, plus them.
            for recorded in waited.pending:
                status = merged(status, recorded)
            waited.status = status
        # else an operation changed it meanwhile: read it again.
        waited.pending = []

    def changed(
        self, message_id: str, recorded: Sequence[RecipientStatus] | None = None
    ) -> None:
        """The message's status changed: *recorded* are the recipient statuses
        this process has just committed (None: something else changed, read it
        again). Wakes its handles and followers."""
        waited = self._waited.get(message_id)
        if waited is not None:
            waited.version += 1
            if recorded is None:
                waited.status = None
            else:
                if waited.status is not None:
                    waited.status = merged(waited.status, recorded)
                if waited.reading:
                    waited.pending.append(recorded)
            waited.wake()
        watches = self._follows.get(message_id)
        if watches is not None:
            if not watches:  # its followers were dropped unclosed
                del self._follows[message_id]
            for watch in list(watches):
                watch.set()

    def stale(self, message_ids: Collection[str] | None) -> None:
        """Another process changed these messages (None: any may have
        changed): their handles' statuses are read at once, by the poll, and
        their followers look again."""
        if message_ids is None:
            self._stale_all = True
            follows: Collection[str] = list(self._follows)
        else:
            self._stale.update(i for i in message_ids if i in self._waited)
            follows = [i for i in message_ids if i in self._follows]
        for message_id in follows:
            for watch in list(self._follows.get(message_id, ())):
                watch.set()
        if self._stale_all or self._stale:
            self._poked.set()

    async def poll(self, read: ReadMany, interval: float) -> None:
        """Every *interval* seconds, read the status of every awaited message
        that is not done in one query, for changes made by other processes;
        when :meth:`stale` is told of changes, read those messages at once.
        A failed read is logged and tried again at the next interval."""
        while True:
            with anyio.move_on_after(interval) as timer:
                await self._poked.wait()
            self._poked = anyio.Event()
            everything = timer.cancelled_caught or self._stale_all
            stale, self._stale, self._stale_all = self._stale, set(), False
            versions = {
                message_id: waited.version
                for message_id, waited in self._waited.items()
                if waited.status is not None
                and not waited.reading
                and (everything or message_id in stale)
            }
            # Those being read for the first time now: at the next round.
            self._stale.update(
                i for i in stale if i in self._waited and self._waited[i].reading
            )
            if not versions:
                continue
            try:
                self.reads += 1
                found = await read(list(versions))
            except Exception as exc:  # contained: read again at the next interval
                logger.warning(
                    "could not read the statuses of awaited messages",
                    extra={"messages": len(versions), "error": repr(exc)},
                )
                continue
            for message_id, version in versions.items():
                waited = self._waited.get(message_id)
                if waited is None or waited.version != version:
                    continue  # done, or changed since the read began
                status = found.get(message_id)  # None: gone (purged): re-read
                if status != waited.status:
                    waited.status = status
                    waited.version += 1
                    waited.wake()

    def close(self) -> None:
        """Wake every waiter and end every follower (the Deliverer closed):
        a handle whose message is not done reads once more, and raises."""
        self._closed = True
        for waited in self._waited.values():
            waited.wake()
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
