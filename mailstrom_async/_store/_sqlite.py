"""SQLiteStore: the embedded default store, on one SQLite file through aiosqlite.

This is the only module that imports aiosqlite. It turns every ``sqlite3.Error``
into :class:`~mailstrom_async.StoreError` (the original is ``__cause__``).

Durability and sharing: WAL journal, ``synchronous=FULL`` by default (a commit is
fsync'd before the call returns), ``busy_timeout`` so that several processes can
share the file, foreign keys on. Every call that changes state is one
``BEGIN IMMEDIATE`` transaction, so two processes' claims serialise and a failed
call leaves nothing half-written. One connection per store, on aiosqlite's thread;
each store call runs there as one function (one thread hop), and concurrent writes
are committed together (group commit: one transaction, one fsync, a savepoint each).

Times are stored as float seconds since the epoch (UTC); microseconds round-trip
exactly for any date in the next centuries.

The schema version lives in ``PRAGMA user_version``; the migrations in :mod:`._sql` are applied
in order, in one transaction, by :meth:`SQLiteStore.open`, which refuses a database
written by a newer mailstrom_async.

A damaged file is refused at open, so that a Deliverer fails to start with a clear
reason instead of failing every poll. Files up to :data:`QUICK_CHECK_MAX_BYTES`
get SQLite's ``PRAGMA quick_check``, which reads every page (8 MiB: about 10 ms
from the page cache, 0.15 s from a cold disk); a larger one gets a probe that
costs milliseconds whatever the size (``quick_check`` of 4.3 GB holding 1,000,000
recipients takes 5 s warm, 79 s cold): the first and last entries of every table
and index (:data:`._sql.INTEGRITY_PROBES`), the paths the store's own queries
walk first. SQLite itself refuses a file shorter than its header says. Damage
deep inside a large file is found when a query reaches it; a corruption error
at any time raises the same clear StoreError.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3  # noqa: TID251 - only for sqlite3.Error
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import aiosqlite
import anyio
import attrs

from mailstrom_async._domain import domain_key
from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._models import (
    AttemptRecord,
    MessageStatus,
    RecipientState,
    RecipientStatus,
)
from mailstrom_async._store import _sql as sql
from mailstrom_async._store._base import (
    DEFAULT_HISTORY_LIMIT,
    MIN_PRIORITY,
    Job,
    JobRecord,
    LeaseInfo,
    NewMessage,
    QueueShape,
    QueueSummary,
)
from mailstrom_async._store._common import (
    CANCELLED,
    UNFINISHED,
    address_index,
    check_bounds,
    check_claim,
    check_history,
    check_hold,
    check_limit,
    check_list_limit,
    check_new_message,
    check_statuses,
    check_unhold,
    logger,
    matching,
    new_lease_token,
    should_replace,
    utc,
)
from mailstrom_async._store._record_plan import check_records

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["QUICK_CHECK_MAX_BYTES", "SQLiteStore"]

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another process's transaction
_MAX_PARAMS = 500  # bound parameters per IN (...) query, well under SQLite's limit
_MAX_BATCH = 512  # calls sharing one commit at most, so a batch always ends
_PURGE_STEP = 1_000  # messages a purge looks at per transaction

#: Files up to this size are checked in full at open (``PRAGMA quick_check``).
QUICK_CHECK_MAX_BYTES = 8 * 1024 * 1024
# The error codes that say the file is damaged, not merely busy or unreadable.
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


T = TypeVar("T")
Work = Callable[[sqlite3.Connection], Any]


@attrs.define(eq=False)
class _Write:
    """One call's write, waiting for the batch that runs and commits it."""

    work: Work
    result: Any = None
    error: BaseException | None = None
    done: bool = False


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

    #: The schema version this mailstrom_async writes: :meth:`open` migrates
    #: an older file to it, and refuses a newer one.
    SCHEMA_VERSION: ClassVar[int] = sql.SCHEMA_VERSION

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
        self._lock = anyio.Lock()  # open() and aclose()
        self._write_lock = anyio.Lock()
        self._queue: list[_Write] = []

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
        """Connect, check the file, then create or migrate the schema; idempotent.

        The check is cheap: a file up to 8 MiB gets SQLite's full
        ``PRAGMA quick_check``; a larger one has the first and last entries of
        every table and index read (milliseconds, whatever its size).

        Raises:
            StoreError: the file cannot be opened, is damaged (the message says
                how to recover it) or is not a SQLite database, or its schema is
                newer than this version of mailstrom_async knows.
        """
        async with self._lock:
            if self._db is not None:
                return
            db = await self._connect()
            try:
                with self._translate():
                    await self._setup(db)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await db.close()
                raise
            self._db = db

    async def _connect(self) -> aiosqlite.Connection:
        connection = aiosqlite.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None
        )
        try:
            with self._translate():
                return await connection
        except BaseException:
            # On a failed connect aiosqlite stops its worker thread, which
            # then reports to this event loop: wait for it, so that it never
            # reports to a loop that has closed in the meantime.
            thread = getattr(connection, "_thread", None)
            if isinstance(thread, threading.Thread) and thread.is_alive():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(thread.join, 5.0)
            raise

    async def schema_version(self) -> int:
        """The schema version found in the file: 0 for a file that does not
        exist yet or holds no queue, :attr:`SCHEMA_VERSION` once :meth:`open`
        has migrated it, more for a file written by a newer mailstrom_async.

        It migrates nothing: on a closed store it reads the version on a
        connection of its own (and creates no file), so that a deploy can ask
        whether :meth:`open` would migrate (``mailstrom-async migrate --check``).

        Raises:
            StoreError: the file cannot be read, or is not a SQLite database.
        """
        if self._db is not None:
            return await self._read(_user_version)
        if not await anyio.Path(self._path).exists():
            return 0
        db = await self._connect()
        try:
            with self._translate():
                (version,), *_ = await db.execute_fetchall("PRAGMA user_version")
        finally:
            with anyio.CancelScope(shield=True), self._translate():
                await db.close()
        return int(version)

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
        damage = await _on_thread(db, _find_damage)
        if damage is not None:
            raise self._damaged(*damage)
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
        async with self._lock, self._write_lock:
            if self._queue:  # writes that queued behind the last batch
                await self._run_queued()
            db, self._db = self._db, None
            if db is not None:
                with anyio.CancelScope(shield=True), self._translate():
                    await db.close()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            if _error_code(exc) in _DAMAGED:
                raise self._damaged(str(exc), _error_code(exc)) from exc
            msg = f"SQLite store {self._path!r} failed: {exc}"
            raise StoreError(msg) from exc

    def _damaged(self, detail: str, code: int | None = None) -> StoreError:
        path = self._path
        if code == sqlite3.SQLITE_NOTADB:
            msg = (
                f"SQLite store {path!r} is not a SQLite database ({detail}); "
                "check the path, or restore the file from a backup"
            )
        else:
            msg = (
                f"SQLite store {path!r} is damaged ({detail}); stop every process "
                "using it, then restore it from a backup, or recover what it holds "
                f"with: sqlite3 {path!r} .recover | sqlite3 NEW_FILE, and use NEW_FILE"
            )
        return StoreError(msg)

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            msg = "the store is not open: call open() or use 'async with'"
            raise StoreError(msg)
        return self._db

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run *work* on the connection's thread: one hop, whatever it reads."""
        db = self._connection()
        with self._translate():
            return cast("T", await _on_thread(db, work))

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run *work* in a transaction; durable (committed) when this returns.

        Group commit: calls that arrive while a batch is being written queue up;
        the next one to get the write lock runs every queued call in ONE hop to
        aiosqlite's thread: ``BEGIN IMMEDIATE``, each call inside its own
        savepoint (so one call's failure undoes only that call), one ``COMMIT``
        (one fsync). A call that the batch ran finds itself done and returns.
        """
        self._connection()
        write = _Write(work)
        self._queue.append(write)
        try:
            async with self._write_lock:
                if not write.done:
                    await self._run_queued()
        except BaseException:
            if not write.done and write in self._queue:
                self._queue.remove(write)  # never started: nothing was written
            raise
        if write.error is not None:
            with self._translate():
                raise write.error
        return cast("T", write.result)

    async def _run_queued(self) -> None:
        """Write and commit the queued calls (the caller holds the write lock)."""
        batch = self._queue[:_MAX_BATCH]
        del self._queue[:_MAX_BATCH]
        db = self._connection()
        # Shielded: the batch runs on the thread whatever happens here, and its
        # members learn their outcome only through this call.
        with anyio.CancelScope(shield=True):
            try:
                await _on_thread(db, _run_batch, batch)
            except BaseException as exc:  # the thread or connection is gone
                for write in batch:
                    if write.error is None:
                        write.error = exc
            for write in batch:
                write.done = True

    async def add(
        self,
        message: NewMessage,
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
        lease: str | None = None,
    ) -> tuple[str, bool]:
        """Store *message* in one transaction; see :meth:`Store.add`."""
        [result] = await self.add_many(
            [message], claim_for=claim_for, lease_until=lease_until, lease=lease
        )
        return result

    async def add_many(
        self,
        messages: Sequence[NewMessage],
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
        lease: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Store several messages in one transaction; see :meth:`Store.add_many`."""
        checked = [check_new_message(m) for m in messages]
        claim = check_claim(claim_for, lease_until, lease)
        owner, until, token = (
            (claim[0], sql.to_ts(claim[1]), claim[2])
            if claim is not None
            else (None, None, None)
        )
        wanted = sorted({m.idempotency_key for m in checked} - {None})  # type: ignore[type-var]

        def work(conn: sqlite3.Connection) -> list[tuple[str, bool]]:
            known: dict[str, str] = {}
            for start in range(0, len(wanted), _MAX_PARAMS):
                chunk = wanted[start : start + _MAX_PARAMS]
                marks = ", ".join("?" * len(chunk))  # placeholders only, no data
                query = f"SELECT idempotency_key, id FROM messages WHERE idempotency_key IN ({marks})"  # noqa: S608
                known.update((str(k), str(i)) for k, i in conn.execute(query, chunk))
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
                mid = m.message_id
                submitted = sql.to_ts(m.submitted_at)
                message_rows.append(
                    (m.message_id, m.mail_from, m.data, m.smtputf8, submitted, key)
                )
                level = m.priority
                recipient_rows.extend(
                    (mid, n, a, sql.domain(a), submitted, owner, until, token, level)
                    for n, a in enumerate(m.recipients)
                )
            conn.executemany(sql.INSERT_MESSAGE, message_rows)
            conn.executemany(sql.INSERT_RECIPIENT, recipient_rows)
            return results

        return await self._write(work)

    async def status(self, message_id: str) -> MessageStatus:
        """Return the message's status; see :meth:`Store.status`."""

        def work(conn: sqlite3.Connection) -> MessageStatus | None:
            rows = conn.execute(sql.STATUS_QUERY, (message_id,)).fetchall()
            if not rows:
                return None
            # Converted here, on the connection's thread: 100,000 recipients
            # would take the event loop half a second.
            return MessageStatus(
                message_id=message_id,
                recipients=tuple(
                    sql.status_from_row(row[2:]) for row in rows if row[2] is not None
                ),
                submitted_at=sql.from_ts(rows[0][1]),
                mail_from=rows[0][0],
            )

        status = await self._read(work)
        if status is None:
            raise UnknownMessageError(message_id)
        return status

    async def statuses(self, message_ids: Collection[str]) -> dict[str, MessageStatus]:
        """The statuses of stored messages, in one query; see :meth:`Store.statuses`."""
        ids = json.dumps(list(message_ids))

        def work(conn: sqlite3.Connection) -> dict[str, MessageStatus]:
            found: dict[str, MessageStatus] = {}
            rows = conn.execute(sql.STATUSES_QUERY, (ids,)).fetchall()
            for message_id, group in itertools.groupby(rows, key=itemgetter(0)):
                grouped = list(group)
                found[message_id] = MessageStatus(
                    message_id=message_id,
                    recipients=tuple(
                        sql.status_from_row(row[3:])
                        for row in grouped
                        if row[3] is not None
                    ),
                    submitted_at=sql.from_ts(grouped[0][2]),
                    mail_from=grouped[0][1],
                )
            return found

        return await self._read(work)

    async def messages(
        self,
        *,
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        limit: int | None = None,
        held: bool | None = None,
    ) -> list[MessageStatus]:
        """List messages by recipient state, domain and hold; see :meth:`Store.messages`."""
        check_list_limit(limit)
        wanted = UNFINISHED if states is None else states
        params = {
            "states": json.dumps(sorted(RecipientState(s).value for s in wanted)),
            "domain": None if domain is None else domain_key(domain),
            "limit": -1 if limit is None else limit,
            "held": None if held is None else int(held),
        }

        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql.LIST_MESSAGES, params).fetchall()

        rows = await self._read(work)
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

    async def message_data(self, message_id: str) -> bytes:
        """The stored bytes of a message; see :meth:`Store.message_data`."""

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(sql.MESSAGE_DATA, (message_id,)).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._read(work)
        if data is None:
            raise UnknownMessageError(message_id)
        return data

    async def message_sizes(self, message_ids: Collection[str]) -> dict[str, int]:
        """The sizes of stored messages; see :meth:`Store.message_sizes`."""
        ids = json.dumps(list(message_ids))

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute(sql.MESSAGE_SIZES, (ids,)).fetchall())

        return await self._read(work)

    async def shape(
        self,
        *,
        now: datetime,
        bounds: Sequence[float],
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        held: bool | None = None,
    ) -> QueueShape:
        """Count recipients by domain and age in SQL; see :meth:`Store.shape`."""
        at = sql.to_ts(utc(now, "now"))
        limits = check_bounds(bounds)
        wanted = UNFINISHED if states is None else states
        params: dict[str, Any] = {
            "now": at,
            "states": json.dumps(sorted(RecipientState(s).value for s in wanted)),
            "domain": None if domain is None else domain_key(domain),
            "held": None if held is None else int(held),
        }
        params.update({f"b{i}": b for i, b in enumerate(limits)})
        query = sql.shape_query(len(limits))

        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(query, params).fetchall()

        counts: dict[str, list[int]] = {}
        for name, bucket, count in await self._read(work):
            counts.setdefault(name, [0] * (len(limits) + 1))[bucket] += count
        return QueueShape(
            bounds=limits, by_domain={d: tuple(c) for d, c in counts.items()}
        )

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
            "domain": None if domain is None else domain_key(domain),
        }

        def work(conn: sqlite3.Connection) -> int:
            if message_id is not None:
                _check_exists(conn, message_id)
            return conn.execute(sql.RETRY_NOW, params).rowcount

        return await self._write(work)

    async def cancel(self, message_id: str) -> int:
        """Fail every unfinished recipient of a message; see :meth:`Store.cancel`."""

        def work(conn: sqlite3.Connection) -> int:
            _check_exists(conn, message_id)
            params = {"message_id": message_id, "reason": CANCELLED}
            return conn.execute(sql.CANCEL, params).rowcount

        return await self._write(work)

    async def hold(
        self, *, message_id: str | None = None, domain: str | None = None
    ) -> int:
        """Hold unfinished recipients; see :meth:`Store.hold`."""
        lowered = check_hold(message_id, domain)
        params = {"message_id": message_id, "domain": lowered}

        def work(conn: sqlite3.Connection) -> int:
            if message_id is None:
                return conn.execute(sql.HOLD_DOMAIN, params).rowcount
            _check_exists(conn, message_id)
            return conn.execute(sql.HOLD_MESSAGE, params).rowcount

        return await self._write(work)

    async def unhold(
        self,
        *,
        message_id: str | None = None,
        domain: str | None = None,
        all: bool = False,
    ) -> int:
        """Release held recipients; see :meth:`Store.unhold`."""
        lowered = check_unhold(message_id, domain, everything=all)
        params = {"message_id": message_id, "domain": lowered}

        def work(conn: sqlite3.Connection) -> int:
            if message_id is not None:
                _check_exists(conn, message_id)
                return conn.execute(sql.UNHOLD_MESSAGE, params).rowcount
            if lowered is not None:
                return conn.execute(sql.UNHOLD_DOMAIN, params).rowcount
            return conn.execute(sql.UNHOLD_ALL).rowcount

        return await self._write(work)

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        """Lease due recipients of up to *limit* messages; see :meth:`Store.claim_due`."""
        params: dict[str, Any] = {
            "now": sql.to_ts(utc(now, "now")),
            "worker": worker,
            "until": sql.to_ts(utc(lease_until, "lease_until")),
            "token": new_lease_token(),
        }
        check_limit(limit)

        def work(
            conn: sqlite3.Connection,
        ) -> tuple[dict[str, None], list[Any], dict[str, Any]]:
            # Walk due rows in claim order until *limit* distinct messages are
            # seen: priority by priority, each one's due rows by due time.
            chosen: dict[str, None] = {}
            after = MIN_PRIORITY - 1
            while len(chosen) < limit:
                (level,) = conn.execute(sql.NEXT_PRIORITY, {"after": after}).fetchone()
                if level is None:
                    break
                after = level
                cursor = conn.execute(sql.SCAN_DUE, {**params, "priority": level})
                try:
                    while len(chosen) < limit:
                        rows = cursor.fetchmany(min(max(4 * limit, 64), 1024))
                        if not rows:
                            break
                        for (mid,) in rows:
                            chosen[mid] = None
                            if len(chosen) == limit:
                                break
                finally:
                    cursor.close()
            if not chosen:
                return chosen, [], {}
            ids = json.dumps(list(chosen))
            claimed = conn.execute(sql.CLAIM, {**params, "ids": ids}).fetchall()
            messages = {row[0]: row for row in conn.execute(sql.JOB_MESSAGES, (ids,))}
            return chosen, claimed, messages

        chosen, claimed, messages = await self._write(work)
        if not chosen:
            return []
        order = {mid: i for i, mid in enumerate(chosen)}
        claimed.sort(key=lambda row: (order[row[0]], row[1]))
        # One job per message and lease token (a row this worker held already
        # keeps its token), in envelope order of their first rows.
        by_lease: dict[tuple[str, str], list[RecipientStatus]] = {}
        priorities: dict[str, int] = {}
        for row in claimed:
            by_lease.setdefault((row[0], row[18]), []).append(
                sql.status_from_row(row[2:18])
            )
            priorities[row[0]] = row[19]
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
                lease=token,
                priority=priorities[mid],
            )
            for (mid, token), recipients in by_lease.items()
        ]

    async def record(
        self,
        message_id: str,
        statuses: Sequence[RecipientStatus],
        *,
        worker: str,
        lease: str | None = None,
        history: Sequence[AttemptRecord] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> list[str]:
        """Write new statuses and their attempts and end their leases, fenced by
        *lease*; see :meth:`Store.record`."""
        statuses = check_statuses(statuses)
        attempts = check_history(history, history_limit)

        def work(conn: sqlite3.Connection) -> list[str]:
            return _record(
                conn, message_id, statuses, attempts, worker, lease, history_limit
            )

        return await self._write(work)

    async def record_many(
        self,
        records: Sequence[JobRecord],
        *,
        worker: str,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> list[list[str]]:
        """Record each of *records* as :meth:`record` does, in one transaction
        (one commit); see :meth:`BatchRecordingStore.record_many`."""
        checked = check_records(records, history_limit)
        if not checked:
            return []

        def work(conn: sqlite3.Connection) -> list[list[str]]:
            # Each in turn, so a message recorded twice sees its first record;
            # an unknown message raises and the whole batch is rolled back.
            return [
                _record(conn, mid, statuses, attempts, worker, lease, history_limit)
                for mid, statuses, attempts, lease in checked
            ]

        return await self._write(work)

    async def history(self, message_id: str) -> list[AttemptRecord]:
        """The kept attempts of a message's recipients; see :meth:`Store.history`."""

        def work(conn: sqlite3.Connection) -> list[Any]:
            rows = conn.execute(sql.HISTORY_QUERY, (message_id,)).fetchall()
            if not rows:
                _check_exists(conn, message_id)
            return rows

        return [sql.history_from_row(row) for row in await self._read(work)]

    async def release(
        self,
        message_id: str,
        addresses: Sequence[str],
        *,
        worker: str,
        lease: str | None = None,
    ) -> None:
        """End *worker*'s lease on these recipients (fenced by *lease*); unknown
        ids and addresses are ignored."""
        query, holder = (
            (sql.LEASED_BY, worker) if lease is None else (sql.LEASED_UNDER, lease)
        )

        def work(conn: sqlite3.Connection) -> None:
            leased = conn.execute(query, (message_id, holder)).fetchall()
            index = address_index(row[1] for row in leased)
            positions = {
                leased[i][0] for address in addresses for i in matching(index, address)
            }
            if positions:
                conn.executemany(
                    sql.UNLEASE, [(message_id, p) for p in sorted(positions)]
                )

        await self._write(work)

    async def renew_leases(
        self,
        *,
        worker: str,
        lease_until: datetime,
        message_ids: Collection[str] | None = None,
    ) -> int:
        """Extend *worker*'s leases; see :meth:`Store.renew_leases`."""
        until = sql.to_ts(utc(lease_until, "lease_until"))
        ids = None if message_ids is None else json.dumps(sorted(message_ids))

        def work(conn: sqlite3.Connection) -> int:
            if ids is None:
                return conn.execute(sql.RENEW_ALL, (until, worker)).rowcount
            return conn.execute(sql.RENEW_SOME, (until, worker, ids)).rowcount

        return await self._write(work)

    async def lease_owners(self) -> dict[str, LeaseInfo]:
        """Who holds leases on unfinished recipients; see :meth:`Store.lease_owners`."""

        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql.LEASE_OWNERS).fetchall()

        return {
            owner: LeaseInfo(recipients=count, lease_until=sql.from_ts(until))
            for owner, count, until in await self._read(work)
        }

    async def release_owner(self, owner: str) -> int:
        """End every lease of *owner*; see :meth:`Store.release_owner`."""

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute(sql.RELEASE_OWNER, (owner,)).rowcount

        return await self._write(work)

    async def next_due_at(self) -> datetime | None:
        """When the next unfinished recipient comes due; see :meth:`Store.next_due_at`."""

        def work(conn: sqlite3.Connection) -> tuple[float | None, float | None]:
            return cast(
                "tuple[float | None, float | None]",
                conn.execute(sql.NEXT_DUE).fetchone(),
            )

        times = [t for t in await self._read(work) if t is not None]
        return sql.from_ts(min(times)) if times else None

    async def summary(self) -> QueueSummary:
        """Count recipients by state and by (state, domain)."""

        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(
                "SELECT state, domain, COUNT(*), SUM(held) FROM recipients"
                " GROUP BY state, domain"
            ).fetchall()

        rows = await self._read(work)
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[tuple[RecipientState, str], int] = {}
        held: dict[str, int] = {}
        for state_value, domain, count, held_count in rows:
            state = RecipientState(state_value)
            by_state[state] += count
            by_domain[state, domain] = count
            if held_count:
                held[domain] = held.get(domain, 0) + held_count
        return QueueSummary(
            by_state=by_state,
            by_domain=by_domain,
            held=sum(held.values()),
            held_by_domain=held,
        )

    async def purge(self, *, finished_before: datetime) -> int:
        """Delete finished messages older than *finished_before*; return how many.

        The messages are walked in the order they were added, at most
        :data:`_PURGE_STEP` at a time, each step in a transaction of its own,
        so that a large purge never holds the write lock for long.
        """
        before = sql.to_ts(utc(finished_before, "finished_before"))

        after = 0
        count = 0

        def step(conn: sqlite3.Connection) -> tuple[int | None, int]:
            (bound,) = conn.execute(sql.PURGE_BOUND, (after, _PURGE_STEP)).fetchone()
            if bound is None:
                return None, 0
            return bound, conn.execute(sql.PURGE, (after, bound, before)).rowcount

        while True:  # a transaction per step: other writers go between them
            bound, deleted = await self._write(step)
            count += deleted
            if bound is None:
                break
            after = bound
        if count:
            logger.info("purged", extra={"path": self._path, "messages": count})
        return count


def _on_thread(
    db: aiosqlite.Connection, fn: Callable[..., T], *args: Any
) -> Awaitable[T]:
    """Run ``fn(sqlite3_connection, *args)`` on *db*'s own thread, in one hop.

    aiosqlite hops to its thread once per statement, cursor fetch and commit;
    ``Connection._execute`` is the primitive behind all of those (the same since
    aiosqlite 0.1; every store test goes through it), and running a whole store
    call through it costs one hop instead of four to fifteen.
    """
    execute = cast("Callable[[Callable[[], T]], Awaitable[T]]", db._execute)
    return execute(lambda: fn(db._conn, *args))


def _user_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def _error_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # the primary code


def _find_damage(conn: sqlite3.Connection) -> tuple[str, int] | None:
    """On the connection's thread: what is wrong with the file and its SQLite
    error code, or None.

    See the module docstring. A corruption error raised while checking is
    returned as the finding; any other error is raised.
    """
    try:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        if pages * page_size <= QUICK_CHECK_MAX_BYTES:
            rows = conn.execute("PRAGMA quick_check(3)").fetchall()
            lines = (line for row in rows for line in str(row[0]).splitlines())
            problems = [x for x in lines if x != "ok" and not x.startswith("***")]
            found = "; ".join(problems) or None
        else:
            _probe(conn)
            found = None
    except sqlite3.DatabaseError as exc:
        code = _error_code(exc)
        if code in _DAMAGED:
            return str(exc), code
        raise
    return None if found is None else (found, sqlite3.SQLITE_CORRUPT)


def _probe(conn: sqlite3.Connection) -> None:
    """Read both ends of every b-tree the file has, in one read snapshot."""
    conn.execute("BEGIN")
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        for name, query in sql.INTEGRITY_PROBES:
            if name in names:
                conn.execute(query).fetchall()
    finally:
        conn.execute("COMMIT")


def _record(
    conn: sqlite3.Connection,
    message_id: str,
    statuses: Sequence[RecipientStatus],
    attempts: Sequence[AttemptRecord],
    worker: str,
    lease: str | None,
    history_limit: int,
) -> list[str]:
    """One ``record()`` (checked already) inside the caller's transaction: the
    addresses not written because the lease was lost."""
    stored = conn.execute(
        "SELECT position, address, state, lease_owner, lease_token"
        " FROM recipients WHERE message_id = ? ORDER BY position",
        (message_id,),
    ).fetchall()
    if not stored:
        _check_exists(conn, message_id)
    index = address_index(row[1] for row in stored)
    states = [RecipientState(row[2]) for row in stored]
    updates, unlease = [], set()
    lost: dict[str, None] = {}
    for status in statuses:
        for i in matching(index, status.address):
            position = stored[i][0]
            if lease is not None and stored[i][4] != lease:
                lost[status.address] = None  # claimed by another since
                continue
            if should_replace(states[i], status.state):
                states[i] = status.state
                keep_held = not status.is_final  # the hold is the store's
                updates.append(
                    (
                        *sql.status_params(status),
                        keep_held,
                        message_id,
                        position,
                    )
                )
            if lease is not None or stored[i][3] == worker:
                unlease.add(position)
    if updates:
        conn.executemany(sql.RECORD, updates)
    if unlease:
        conn.executemany(sql.UNLEASE, [(message_id, p) for p in sorted(unlease)])
    if attempts:
        _write_history(conn, message_id, stored, index, attempts, history_limit)
    return list(lost)


def _write_history(
    conn: sqlite3.Connection,
    message_id: str,
    stored: Sequence[Any],
    index: dict[tuple[str, str], list[int]],
    attempts: Sequence[AttemptRecord],
    limit: int,
) -> None:
    """Inside ``record()``'s transaction: insert *attempts* (one executemany)
    and trim the recipients whose new attempt is numbered above *limit*."""
    rows, trims = [], []
    for record in attempts:
        for i in matching(index, record.address):
            position = stored[i][0]
            rows.append(sql.history_params(message_id, position, record))
            if record.attempt > limit:
                trims.append(
                    {
                        "message_id": message_id,
                        "position": position,
                        "added": record.attempt,
                        "cutoff": record.attempt - (limit - 1),
                    }
                )
    if rows:
        conn.executemany(sql.INSERT_HISTORY, rows)
    if trims:
        trim = sql.TRIM_HISTORY_TO_LATEST if limit == 1 else sql.TRIM_HISTORY
        conn.executemany(trim, trims)


def _check_exists(conn: sqlite3.Connection, message_id: str) -> None:
    query = "SELECT 1 FROM messages WHERE id = ?"
    if conn.execute(query, (message_id,)).fetchone() is None:
        raise UnknownMessageError(message_id)


def _run_batch(conn: sqlite3.Connection, batch: Sequence[_Write]) -> None:
    """On the connection's thread: run *batch* in one transaction and commit it.

    A lone call needs no savepoint: a failure rolls back the whole transaction,
    which holds only that call.
    """
    alone = len(batch) == 1
    conn.execute("BEGIN IMMEDIATE")
    try:
        for write in batch:
            if not alone:
                conn.execute("SAVEPOINT call")
            try:
                write.result = write.work(conn)
            except Exception as exc:
                write.error = exc
                if not alone:
                    conn.execute("ROLLBACK TO call")
            if not alone:
                conn.execute("RELEASE call")
        if alone and batch[0].error is not None:
            conn.execute("ROLLBACK")
            return
        conn.execute("COMMIT")
    except BaseException as exc:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        for write in batch:
            if write.error is None:
                write.error = exc
        if not isinstance(exc, Exception):
            raise


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
