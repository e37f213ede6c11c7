"""PostgreSQL ``LISTEN/NOTIFY`` for :class:`PostgresStore`: what one process
commits wakes the others at once, instead of at their next poll.

A store's writes publish a :class:`~mailstrom_async.StoreChange` once they have
committed: new work may be due (a submission, a released lease, an operator's
retry or unhold) and/or these messages' statuses changed. While a Deliverer
runs :meth:`ChangeFeed.run` (through ``PostgresStore.watch_changes``), the
changes are debounced: a write only adds its change to a buffer, and one
dedicated connection sends what gathered, a few ``NOTIFY`` payloads in one
statement, while it also ``LISTEN``\\ s for the other processes' changes. A store
that no Deliverer watches (a command-line operation) notifies on its pooled
connection right after the commit instead.

A notification that is lost (the dedicated connection dropped, a payload that
could not be sent) costs only latency: on reconnecting the feed reports "new
work may be due, any message may have changed", and the Deliverer's poll
(``Config.poll_interval``) stays on as the fallback.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import anyio

from mailstrom_async._store._base import StoreChange

if TYPE_CHECKING:
    from types import ModuleType

    from anyio.abc import TaskStatus

__all__ = ["CHANNEL", "FEED_APPLICATION", "NOTIFY", "ChangeFeed", "decode", "encode"]

logger = logging.getLogger("mailstrom_async.store")

CHANNEL = "mailstrom_async"
"""The ``NOTIFY`` channel (one per database, like the queue's tables)."""
FEED_APPLICATION = "mailstrom_async feed"
"""The ``application_name`` of a feed's dedicated connection."""

# PostgreSQL refuses payloads of 8,000 bytes or more; keep well under.
_MAX_PAYLOAD = 7_000
# When more ids than this change at once, say "any message" instead.
_MAX_IDS = 2_000
_RECONNECT_FIRST = 0.1  # seconds before the first reconnection attempt
_RECONNECT_MAX = 5.0
NOTIFY = (
    "SELECT pg_notify('mailstrom_async', payload) FROM unnest($1::text[]) AS payload"
)
"""Sends payloads (a text array) in one statement."""

OnChange = Callable[[StoreChange], None]


def encode(origin: str, due: bool, message_ids: Collection[str] | None) -> list[str]:
    """The payloads of one change: JSON objects under PostgreSQL's size limit,
    the ids spread over as many as needed (``"m": null``: any message)."""
    if message_ids is not None and len(message_ids) > _MAX_IDS:
        message_ids = None
    if message_ids is None:
        return [json.dumps({"o": origin, "d": due, "m": None})]
    payloads: list[str] = []
    batch: list[str] = []
    size = 0
    for message_id in message_ids:
        cost = len(json.dumps(message_id)) + 1
        if batch and size + cost > _MAX_PAYLOAD:
            payloads.append(json.dumps({"o": origin, "d": due, "m": batch}))
            batch, size = [], 0
        batch.append(message_id)
        size += cost
    payloads.append(json.dumps({"o": origin, "d": due, "m": batch}))
    return payloads


def decode(payload: str) -> tuple[str, StoreChange] | None:
    """The origin and change of one payload; None when it is not one of ours
    (another program may use the channel): it is ignored, never an error."""
    try:
        data = json.loads(payload)
        origin, due, ids = data["o"], data["d"], data["m"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(origin, str) or not isinstance(due, bool):
        return None
    if ids is not None and not (
        isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    ):
        return None
    return origin, StoreChange(
        due=due, message_ids=None if ids is None else frozenset(ids)
    )


class ChangeFeed:
    """One store's side of ``LISTEN/NOTIFY``: a buffer of changes to send, and
    the dedicated connection that sends them and listens for the others'."""

    def __init__(self, asyncpg: ModuleType, dsn: str, name: str) -> None:
        self._asyncpg = asyncpg
        self._dsn = dsn
        self._name = name  # the DSN without its password, for logs
        # Tells this store's own notifications from the other processes'.
        self.origin = secrets.token_hex(8)
        self.running = False
        self._due = False
        self._ids: set[str] = set()
        self._any = False  # an unknown set of messages changed
        self._pending = anyio.Event()
        self.sent = 0  # payloads sent by the feed (for tests and the bench)
        self.connections = 0  # connections it has listened on
        self._connections_changed = anyio.Event()

    # -- the writer's side ----------------------------------------------------

    def publish(self, due: bool, message_ids: Collection[str] | None) -> bool:
        """Add a committed change to the buffer; False when no feed runs (the
        caller then notifies on its own connection)."""
        if not self.running:
            return False
        self._due = self._due or due
        if message_ids is None:
            self._any = True
        elif not self._any:
            self._ids.update(message_ids)
        self._pending.set()
        return True

    def payloads(self, due: bool, message_ids: Collection[str] | None) -> list[str]:
        return encode(self.origin, due, message_ids)

    def _take(self) -> tuple[bool, list[str]]:
        """Empty the buffer: whether it said "due", and its payloads."""
        due, ids = self._due, None if self._any else self._ids
        self._due, self._ids, self._any = False, set(), False
        self._pending = anyio.Event()
        if not due and ids is not None and not ids:
            return due, []
        return due, encode(self.origin, due, ids)

    def _restore(self, due: bool) -> None:
        """What was taken could not be sent: make sure the others still hear of
        it, as "any message" (the ids are not worth keeping apart)."""
        self._due = self._due or due
        self._any = True
        self._pending.set()

    # -- the dedicated connection ---------------------------------------------

    async def run(
        self,
        on_change: OnChange,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and send until cancelled, reconnecting with backoff when the
        connection is lost; *on_change* gets the other processes' changes.
        ``task_status.started()`` once listening, or once the first attempt
        failed (the poll covers the time until it succeeds)."""
        delay = _RECONNECT_FIRST
        started = False
        self.running = True
        try:
            while True:
                conn = await self._connect()
                if conn is None:
                    if not started:
                        started = True
                        task_status.started()
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    continue
                delay = _RECONNECT_FIRST
                try:
                    await self._serve(conn, on_change, task_status, started)
                finally:
                    started = True
                    with anyio.CancelScope(shield=True):
                        await _close(conn)
        finally:
            self.running = False

    async def wait_connected(self, count: int) -> None:
        """Wait until the feed has listened on *count* connections in all (for
        tests: a reconnection after a lost connection)."""
        while self.connections < count:
            await self._connections_changed.wait()

    async def _connect(self) -> Any:
        """The dedicated connection, or None (logged) when it cannot be made."""
        pg = self._asyncpg
        try:
            return await pg.connect(
                self._dsn, server_settings={"application_name": FEED_APPLICATION}
            )
        except (OSError, TimeoutError, pg.PostgresError, pg.InterfaceError) as exc:
            logger.warning(
                "cannot connect for notifications; retrying",
                extra={"store": self._name, "error": repr(exc)},
            )
            return None

    async def _serve(
        self,
        conn: Any,
        on_change: OnChange,
        task_status: TaskStatus[None],
        started: bool,
    ) -> None:
        """Listen on *conn* and send the buffer, until *conn* is lost."""
        lost = anyio.Event()

        def listener(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            decoded = decode(payload)
            if decoded is not None and decoded[0] != self.origin:
                on_change(decoded[1])

        conn.add_termination_listener(lambda _conn: lost.set())
        pg = self._asyncpg
        errors = (OSError, TimeoutError, pg.PostgresError, pg.InterfaceError)
        try:
            await conn.add_listener(CHANNEL, listener)
        except errors as exc:
            logger.warning(
                "notifications lost their connection; reconnecting",
                extra={"store": self._name, "error": repr(exc)},
            )
            return
        self.connections += 1
        self._connections_changed.set()
        self._connections_changed = anyio.Event()
        if started:
            logger.info("notifications reconnected", extra={"store": self._name})
            # Whatever was committed while deaf: look at everything.
            on_change(StoreChange(due=True, message_ids=None))
        else:
            task_status.started()
        async with anyio.create_task_group() as tg:

            async def watch_lost() -> None:
                await lost.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_lost)
            while not lost.is_set():
                await self._pending.wait()
                due, payloads = self._take()
                if not payloads:
                    continue
                sent = False
                try:
                    await conn.execute(NOTIFY, payloads)
                    sent = True
                except errors as exc:
                    logger.warning(
                        "notifications lost their connection; reconnecting",
                        extra={"store": self._name, "error": repr(exc)},
                    )
                    break
                finally:
                    if not sent:  # failed, or cancelled: sent after reconnecting
                        self._restore(due)
                self.sent += len(payloads)
            tg.cancel_scope.cancel()


async def _close(conn: Any) -> None:
    try:
        with anyio.fail_after(2):
            await conn.close()
    except Exception:
        conn.terminate()
