"""SQLiteStore: the embedded default store, on one SQLite file through aiosqlite.

This is the only module that imports aiosqlite. It turns every ``sqlite3.Error``
into :class:`~mailstrom_async.StoreError` (the original is ``__cause__``).

Durability and sharing: WAL journal, ``synchronous=FULL`` by default (a commit is
fsync'd before the call returns), ``busy_timeout`` so that several processes can
share the file, foreign keys on. Every call that changes state is one
``BEGIN IMMEDIATE`` transaction, so two processes' claims serialise and a failed
call leaves nothing half-written. One connection per store; an anyio lock keeps
one call at a time on it.

Times are stored as float seconds since the epoch (UTC); microseconds round-trip
exactly for any date in the next centuries.

The schema version lives in ``PRAGMA user_version``; the migrations in :mod:`._sql` are applied
in order, in one transaction, by :meth:`SQLiteStore.open`, which refuses a database
written by a newer mailstrom_async.
"""

from __future__ import annotations

import json
import os
import sqlite3  # noqa: TID251 - only for sqlite3.Error
import threading
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiosqlite
import anyio
import attrs

from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._models import MessageStatus, RecipientState, RecipientStatus
from mailstrom_async._store import _sql as sql
from mailstrom_async._store._base import Job, NewMessage, QueueSummary
from mailstrom_async._store._common import (
    CANCELLED,
    UNFINISHED,
    check_claim,
    check_limit,
    check_list_limit,
    check_new_message,
    check_statuses,
    logger,
    matching,
    should_replace,
    utc,
)

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["SQLiteStore"]

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another process's transaction
_MAX_PARAMS = 500  # bound parameters per IN (...) query, well under SQLite's limit
_MAX_BATCH = 512  # calls sharing one commit at most, so a batch always ends


@attrs.define
class _Batch:
    """Writes sharing one transaction, and the commit they wait for."""

    done: anyio.Event = attrs.field(factory=anyio.Event)
    members: int = 0
    error: BaseException | None = None


class SQLiteStore:
    """A :class:`~mailstrom_async.Store` in one SQLite database file.

    Args:
        path: the database file; created (with its schema) when missing.
        synchronous: SQLite's ``PRAGMA synchronous``: ``"FULL"`` (the default)
            makes every commit durable against power loss; ``"NORMAL"`` is faster
            and may lose the last commits (never corrupt the file) on power loss.
        busy_timeout: how many seconds a call waits for another connection's
            transaction (another process holding the file) before it fails with
            StoreError ("database is locked").
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = _BUSY_TIMEOUT,
    ) -> None:
        mode = synchronous.upper()
        if mode not in _SYNCHRONOUS:
            msg = f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            raise ValueError(msg)
        if not busy_timeout >= 0:
            msg = f"busy_timeout must be a number of seconds >= 0, got {busy_timeout!r}"
            raise ValueError(msg)
        self._busy_timeout = busy_timeout
        self._path = os.fspath(path)
        self._synchronous = mode
        self._db: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()
        self._batch: _Batch | None = None

    def __repr__(self) -> str:
        state = "open" if self._db is not None else "closed"
        return f"<SQLiteStore {self._path!r} {state}>"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect, then create or migrate the schema; idempotent.

        Raises:
            StoreError: the file cannot be opened, or its schema is newer than this
                version of mailstrom_async knows.
        """
        async with self._lock:
            if self._db is not None:
                return
            connection = aiosqlite.connect(
                self._path, timeout=self._busy_timeout, isolation_level=None
            )
            try:
                with self._translate():
                    db = await connection
            except BaseException:
                # On a failed connect aiosqlite stops its worker thread, which
                # then reports to this event loop: wait for it, so that it never
                # reports to a loop that has closed in the meantime.
                thread = getattr(connection, "_thread", None)
                if isinstance(thread, threading.Thread) and thread.is_alive():
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(thread.join, 5.0)
                raise
            try:
                with self._translate():
                    await self._setup(db)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await db.close()
                raise
            self._db = db

    async def _setup(self, db: aiosqlite.Connection) -> None:
        (mode,), *_ = await db.execute_fetchall("PRAGMA journal_mode = WAL")
        if mode != "wal":
            logger.warning(
                "SQLite refused WAL journal mode; concurrent readers will wait",
                extra={"path": self._path, "journal_mode": mode},
            )
        await db.execute(f"PRAGMA synchronous = {self._synchronous}")
        await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        await db.execute("PRAGMA foreign_keys = ON")
        async with _transaction(db):
            (version,), *_ = await db.execute_fetchall("PRAGMA user_version")
            if version > sql.SCHEMA_VERSION:
                msg = (
                    f"SQLite store {self._path!r} has schema version {version}, newer "
                    f"than this mailstrom_async knows ({sql.SCHEMA_VERSION}); upgrade it"
                )
                raise StoreError(msg)
            for step in sql.MIGRATIONS[version:]:
                for statement in step:
                    await db.execute(statement)
            if version < sql.SCHEMA_VERSION:
                await db.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
                logger.info(
                    "migrated SQLite store schema",
                    extra={
                        "path": self._path,
                        "from_version": version,
                        "to_version": sql.SCHEMA_VERSION,
                    },
                )

    async def aclose(self) -> None:
        """Close the connection; idempotent."""
        async with self._lock:
            await self._commit()  # a batch whose last member saw us waiting
            db, self._db = self._db, None
            if db is not None:
                with anyio.CancelScope(shield=True), self._translate():
                    await db.close()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            msg = f"SQLite store {self._path!r} failed: {exc}"
            raise StoreError(msg) from exc

    @asynccontextmanager
    async def _use(self, *, write: bool) -> AsyncIterator[aiosqlite.Connection]:
        """Hold the connection for one call; a write is durable when this returns.

        Group commit: writers that arrive while another holds the connection
        share one ``BEGIN IMMEDIATE`` transaction, each joining call inside its own
        savepoint (so one call's failure undoes only that call), and one ``COMMIT`` (one
        fsync) makes them all durable. The holder that finds nobody waiting
        commits; the others wait for that commit before they return.
        """
        await self._lock.acquire()
        batch: _Batch | None = None
        try:
            if self._db is None:
                msg = "the store is not open: call open() or use 'async with'"
                raise StoreError(msg)
            db = self._db
            if not write:
                with self._translate():
                    yield db
                return
            # Shielded: a BEGIN or SAVEPOINT cancelled in flight still runs in
            # aiosqlite's thread, and the connection must know where it is.
            with anyio.CancelScope(shield=True), self._translate():
                first = self._batch is None
                if first:
                    await db.execute("BEGIN IMMEDIATE")
                    self._batch = _Batch()
                batch = self._batch
                if batch is None:  # pragma: no cover - set just above
                    msg = "unreachable"
                    raise AssertionError(msg)
                batch.members += 1
                # The call that began the transaction needs no savepoint: it has
                # held the connection since BEGIN, so a ROLLBACK undoes only it.
                # That keeps an uncontended write as cheap as a plain transaction.
                if not first:
                    await db.execute("SAVEPOINT call")
            try:
                with self._translate():
                    yield db
            except BaseException:
                with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
                    if first:
                        self._batch = None
                        await db.execute("ROLLBACK")
                    else:
                        await db.execute("ROLLBACK TO call")
                        await db.execute("RELEASE call")
                raise
            if not first:
                with anyio.CancelScope(shield=True), self._translate():
                    await db.execute("RELEASE call")
        finally:
            await self._unlock()
        if batch is not None:
            await batch.done.wait()
            if batch.error is not None:
                msg = f"SQLite store {self._path!r} failed to commit: {batch.error}"
                raise StoreError(msg) from batch.error

    async def _unlock(self) -> None:
        """Release the connection, committing the open batch if nobody waits."""
        try:
            batch = self._batch
            if batch is not None and (
                self._lock.statistics().tasks_waiting == 0
                or batch.members >= _MAX_BATCH
            ):
                await self._commit()
        finally:
            self._lock.release()

    async def _commit(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None or self._db is None:
            return
        db = self._db
        with anyio.CancelScope(shield=True):
            try:
                await db.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                batch.error = exc
            finally:
                batch.done.set()

    async def add(
        self,
        message: NewMessage,
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
    ) -> tuple[str, bool]:
        """Store *message* in one transaction; see :meth:`Store.add`."""
        [result] = await self.add_many(
            [message], claim_for=claim_for, lease_until=lease_until
        )
        return result

    async def add_many(
        self,
        messages: Sequence[NewMessage],
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
    ) -> list[tuple[str, bool]]:
        """Store several messages in one transaction; see :meth:`Store.add_many`."""
        checked = [check_new_message(m) for m in messages]
        claim = check_claim(claim_for, lease_until)
        owner, until = (
            (claim[0], sql.to_ts(claim[1])) if claim is not None else (None, None)
        )
        wanted = sorted({m.idempotency_key for m in checked} - {None})  # type: ignore[type-var]
        async with self._use(write=True) as db:
            known: dict[str, str] = {}
            for start in range(0, len(wanted), _MAX_PARAMS):
                chunk = wanted[start : start + _MAX_PARAMS]
                marks = ", ".join("?" * len(chunk))  # placeholders only, no data
                query = f"SELECT idempotency_key, id FROM messages WHERE idempotency_key IN ({marks})"  # noqa: S608
                rows = await db.execute_fetchall(query, chunk)
                known.update((str(k), str(i)) for k, i in rows)
            results: list[tuple[str, bool]] = []
            message_rows: list[tuple[Any, ...]] = []
            recipient_rows: list[tuple[Any, ...]] = []
            for m in checked:
                key = m.idempotency_key
                if key is not None and key in known:
                    results.append((known[key], False))
                    continue
                if key is not None:
                    known[key] = m.message_id
                results.append((m.message_id, True))
                submitted = sql.to_ts(m.submitted_at)
                message_rows.append(
                    (m.message_id, m.mail_from, m.data, m.smtputf8, submitted, key)
                )
                recipient_rows.extend(
                    (m.message_id, n, a, sql.domain(a), submitted, owner, until)
                    for n, a in enumerate(m.recipients)
                )
            await db.executemany(
                "INSERT INTO messages (id, mail_from, data, smtputf8, submitted_at,"
                " idempotency_key) VALUES (?, ?, ?, ?, ?, ?)",
                message_rows,
            )
            await db.executemany(
                "INSERT INTO recipients (message_id, position, address, domain, state,"
                " next_attempt_at, lease_owner, lease_until)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                recipient_rows,
            )
        return results

    async def status(self, message_id: str) -> MessageStatus:
        """Return the message's status; see :meth:`Store.status`."""
        async with self._use(write=False) as db:
            rows = list(await db.execute_fetchall(sql.STATUS_QUERY, (message_id,)))
        if not rows:
            raise UnknownMessageError(message_id)
        mail_from, submitted_at = rows[0][0], rows[0][1]
        return MessageStatus(
            message_id=message_id,
            recipients=tuple(
                sql.status_from_row(row[2:]) for row in rows if row[2] is not None
            ),
            submitted_at=sql.from_ts(submitted_at),
            mail_from=mail_from,
        )

    async def messages(
        self,
        *,
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        limit: int | None = None,
    ) -> list[MessageStatus]:
        """List messages by recipient state and domain; see :meth:`Store.messages`."""
        check_list_limit(limit)
        wanted = UNFINISHED if states is None else states
        params = {
            "states": json.dumps(sorted(RecipientState(s).value for s in wanted)),
            "domain": None if domain is None else domain.lower(),
            "limit": -1 if limit is None else limit,
        }
        async with self._use(write=False) as db:
            rows = await db.execute_fetchall(sql.LIST_MESSAGES, params)
        found: dict[str, tuple[Any, list[RecipientStatus]]] = {}
        for row in rows:
            entry = found.setdefault(row[0], (row, []))
            entry[1].append(sql.status_from_row(row[3:]))
        return [
            MessageStatus(
                message_id=mid,
                recipients=tuple(recipients),
                submitted_at=sql.from_ts(first[2]),
                mail_from=first[1],
            )
            for mid, (first, recipients) in found.items()
        ]

    async def retry_now(
        self,
        *,
        now: datetime,
        message_id: str | None = None,
        domain: str | None = None,
    ) -> int:
        """Make waiting recipients due at *now*; see :meth:`Store.retry_now`."""
        params = {
            "now": sql.to_ts(utc(now, "now")),
            "message_id": message_id,
            "domain": None if domain is None else domain.lower(),
        }
        async with self._use(write=True) as db:
            if message_id is not None:
                await self._check_exists(db, message_id)
            cursor = await db.execute(sql.RETRY_NOW, params)
            return cursor.rowcount

    async def cancel(self, message_id: str) -> int:
        """Fail every unfinished recipient of a message; see :meth:`Store.cancel`."""
        async with self._use(write=True) as db:
            await self._check_exists(db, message_id)
            cursor = await db.execute(
                sql.CANCEL, {"message_id": message_id, "reason": CANCELLED}
            )
            return cursor.rowcount

    @staticmethod
    async def _check_exists(db: aiosqlite.Connection, message_id: str) -> None:
        rows = await db.execute_fetchall(
            "SELECT 1 FROM messages WHERE id = ?", (message_id,)
        )
        if not list(rows):
            raise UnknownMessageError(message_id)

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        """Lease due recipients of up to *limit* messages; see :meth:`Store.claim_due`."""
        params: dict[str, Any] = {
            "now": sql.to_ts(utc(now, "now")),
            "worker": worker,
            "until": sql.to_ts(utc(lease_until, "lease_until")),
        }
        check_limit(limit)
        async with self._use(write=True) as db:
            # Walk due rows in claim order until *limit* distinct messages are seen.
            chosen: dict[str, None] = {}
            cursor = await db.execute(sql.SCAN_DUE, params)
            try:
                while len(chosen) < limit:
                    rows = await cursor.fetchmany(min(max(4 * limit, 64), 1024))
                    if not rows:
                        break
                    for (mid,) in rows:
                        chosen[mid] = None
                        if len(chosen) == limit:
                            break
            finally:
                await cursor.close()
            if not chosen:
                return []
            ids = json.dumps(list(chosen))
            claimed = list(await db.execute_fetchall(sql.CLAIM, {**params, "ids": ids}))
            messages = {
                row[0]: row
                for row in await db.execute_fetchall(sql.JOB_MESSAGES, (ids,))
            }
        order = {mid: i for i, mid in enumerate(chosen)}
        claimed.sort(key=lambda row: (order[row[0]], row[1]))
        by_message: dict[str, list[RecipientStatus]] = {mid: [] for mid in chosen}
        for row in claimed:
            by_message[row[0]].append(sql.status_from_row(row[2:]))
        logger.debug(
            "claimed",
            extra={"worker": worker, "messages": len(chosen), "path": self._path},
        )
        return [
            Job(
                message_id=mid,
                mail_from=messages[mid][1],
                recipients=tuple(recipients),
                data=messages[mid][2],
                smtputf8=bool(messages[mid][3]),
                submitted_at=sql.from_ts(messages[mid][4]),
            )
            for mid, recipients in by_message.items()
        ]

    async def record(
        self, message_id: str, statuses: Sequence[RecipientStatus], *, worker: str
    ) -> None:
        """Write new statuses and end *worker*'s leases; see :meth:`Store.record`."""
        statuses = check_statuses(statuses)
        async with self._use(write=True) as db:
            stored = list(
                await db.execute_fetchall(
                    "SELECT position, address, state, lease_owner FROM recipients"
                    " WHERE message_id = ? ORDER BY position",
                    (message_id,),
                )
            )
            if not stored and not list(
                await db.execute_fetchall(
                    "SELECT 1 FROM messages WHERE id = ?", (message_id,)
                )
            ):
                raise UnknownMessageError(message_id)
            addresses = [row[1] for row in stored]
            states = [RecipientState(row[2]) for row in stored]
            updates, unlease = [], set()
            for status in statuses:
                for i in matching(addresses, status.address):
                    position = stored[i][0]
                    if should_replace(states[i], status.state):
                        states[i] = status.state
                        updates.append(
                            (*sql.status_params(status), message_id, position)
                        )
                    if stored[i][3] == worker:
                        unlease.add(position)
            if updates:
                await db.executemany(sql.RECORD, updates)
            if unlease:
                await db.executemany(
                    sql.UNLEASE, [(message_id, p) for p in sorted(unlease)]
                )

    async def release(
        self, message_id: str, addresses: Sequence[str], *, worker: str
    ) -> None:
        """End *worker*'s lease on these recipients; unknown ids and addresses are ignored."""
        async with self._use(write=True) as db:
            leased = list(
                await db.execute_fetchall(
                    "SELECT position, address FROM recipients"
                    " WHERE message_id = ? AND lease_owner = ?",
                    (message_id, worker),
                )
            )
            leased_addresses = [row[1] for row in leased]
            positions = {
                leased[i][0]
                for address in addresses
                for i in matching(leased_addresses, address)
            }
            if positions:
                await db.executemany(
                    sql.UNLEASE, [(message_id, p) for p in sorted(positions)]
                )

    async def renew_leases(self, *, worker: str, lease_until: datetime) -> int:
        """Extend every lease *worker* holds; see :meth:`Store.renew_leases`."""
        until = sql.to_ts(utc(lease_until, "lease_until"))
        async with self._use(write=True) as db:
            cursor = await db.execute(
                "UPDATE recipients SET lease_until = ? WHERE lease_owner = ?",
                (until, worker),
            )
            return cursor.rowcount

    async def next_due_at(self) -> datetime | None:
        """When the next unfinished recipient comes due; see :meth:`Store.next_due_at`."""
        async with self._use(write=False) as db:
            ((unleased, leased),) = await db.execute_fetchall(sql.NEXT_DUE)
        times = [t for t in (unleased, leased) if t is not None]
        return sql.from_ts(min(times)) if times else None

    async def summary(self) -> QueueSummary:
        """Count recipients by state and by (state, domain)."""
        async with self._use(write=False) as db:
            rows = await db.execute_fetchall(
                "SELECT state, domain, COUNT(*) FROM recipients GROUP BY state, domain"
            )
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[tuple[RecipientState, str], int] = {}
        for state_value, domain, count in rows:
            state = RecipientState(state_value)
            by_state[state] += count
            by_domain[state, domain] = count
        return QueueSummary(by_state=by_state, by_domain=by_domain)

    async def purge(self, *, finished_before: datetime) -> int:
        """Delete finished messages older than *finished_before*; return how many."""
        before = sql.to_ts(utc(finished_before, "finished_before"))
        async with self._use(write=True) as db:
            cursor = await db.execute(sql.PURGE, (before,))
            count = cursor.rowcount
        if count:
            logger.info("purged", extra={"path": self._path, "messages": count})
        return count


@asynccontextmanager
async def _transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: committed on success, else rolled back.

    Commit and rollback are shielded: once a commit is sent its outcome is awaited,
    and a cancelled call never leaves the connection inside a transaction.
    """
    try:
        await db.execute("BEGIN IMMEDIATE")
        yield db
        with anyio.CancelScope(shield=True):
            await db.execute("COMMIT")
    except BaseException:
        # Suppressed: BEGIN failed, or a failed COMMIT already ended the transaction.
        with anyio.CancelScope(shield=True), suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise
