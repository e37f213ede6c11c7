"""PostgresStore: the queue in a PostgreSQL database, through an asyncpg pool.

This is the only module that imports asyncpg, and it does so when a store is
made, so that the package imports without it: asyncpg comes with the
``postgres`` extra (``pip install 'mailstrom-async[postgres]'``). Every asyncpg
or connection error becomes :class:`~mailstrom_async.StoreError` (the original
is ``__cause__``); the DSN's password never appears in a message or a log.

Every call that changes state is one transaction on one pooled connection, and
runs shielded from cancellation once started (as the SQLite store's writes do):
a cancelled caller never leaves half a write, and an outcome sent to the server
is awaited. Several processes on several machines may share one database:
claims lock the rows they take with ``FOR UPDATE SKIP LOCKED`` so that two
claims never take the same recipient and never wait for each other; ``record``
and ``release`` lock the message's rows and, given the claim's lease token,
touch only the rows still leased under it.

The schema version is the one row of table ``mailstrom_schema``; the migrations
in :mod:`._postgres_sql` are applied in order, in one transaction under an
advisory lock (processes that open at once migrate once), by
:meth:`PostgresStore.open`, which refuses a database written by a newer
mailstrom_async.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

from mailstrom_async._domain import domain_key
from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._models import (
    AttemptRecord,
    MessageStatus,
    RecipientState,
    RecipientStatus,
)
from mailstrom_async._store import _postgres_sql as sql
from mailstrom_async._store._base import (
    DEFAULT_HISTORY_LIMIT,
    Job,
    JobRecord,
    LeaseInfo,
    NewMessage,
    QueueShape,
    QueueSummary,
    StoreChange,
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
    utc,
)
from mailstrom_async._store._pg_changes import NOTIFY, ChangeFeed
from mailstrom_async._store._record_plan import (
    Checked,
    Plan,
    Stored,
    check_records,
    plan_records,
)

if TYPE_CHECKING:
    from types import ModuleType, TracebackType
    from typing import Self

    import asyncpg.pool
    from anyio.abc import TaskStatus

    _Connection = asyncpg.pool.PoolConnectionProxy[Any]
    # The messages a write changed; None: any may have.
    _Changed = Collection[str] | None

__all__ = ["PostgresStore"]

_T = TypeVar("_T")

_COMMAND_TIMEOUT = 60.0
_IDEMPOTENCY_CONSTRAINT = "messages_idempotency_key_key"
_PURGE_STEP = 1_000  # messages a purge looks at per statement
_ADD_TRIES = 3  # a concurrent add of the same idempotency key: try again, then fail


def _import_asyncpg() -> ModuleType:
    try:
        import asyncpg
    except ImportError as exc:
        msg = (
            "PostgresStore needs asyncpg; install the 'postgres' extra: "
            "pip install 'mailstrom-async[postgres]'"
        )
        raise StoreError(msg) from exc
    return asyncpg


def redact(dsn: str) -> str:
    """*dsn* without its password (``postgresql://user:***@host/db``)."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "<unparsable DSN>"
    if password is None and "password" not in parts.query.lower():
        return dsn
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostinfo}"
    query = "&".join(
        "password=***" if item.lower().startswith("password=") else item
        for item in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class PostgresStore:
    """A :class:`~mailstrom_async.Store` in a PostgreSQL database (asyncpg).

    Several processes, on several machines, may use one database at once: the
    database hands out each due recipient to one worker at a time.

    Args:
        dsn: a libpq connection URI, ``postgresql://user:password@host:port/db``
            (asyncpg reads the same ``PG*`` environment variables as libpq for
            what it leaves out).
        min_size: connections the pool keeps open.
        max_size: connections the pool opens at most.
        command_timeout: seconds one statement may take before the call fails
            with StoreError.

    Raises:
        StoreError: asyncpg is not installed (the ``postgres`` extra).
        ValueError: a pool size or the timeout is out of range.
    """

    #: The schema version this mailstrom_async writes: :meth:`open` migrates
    #: an older database to it, and refuses a newer one.
    SCHEMA_VERSION: ClassVar[int] = sql.SCHEMA_VERSION

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = _COMMAND_TIMEOUT,
    ) -> None:
        if not dsn:
            msg = f"dsn must be a non-empty PostgreSQL connection URI, got {dsn!r}"
            raise ValueError(msg)
        if not 0 <= min_size <= max_size or max_size < 1:
            msg = (
                "pool sizes must satisfy 0 <= min_size <= max_size and max_size >= 1,"
                f" got min_size={min_size!r}, max_size={max_size!r}"
            )
            raise ValueError(msg)
        if not 0 < command_timeout < float("inf"):
            msg = f"command_timeout must be a number of seconds > 0, got {command_timeout!r}"
            raise ValueError(msg)
        self._asyncpg = _import_asyncpg()
        self._dsn = dsn
        self._name = redact(dsn)
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: asyncpg.pool.Pool[Any] | None = None
        self._lock = anyio.Lock()  # open() and aclose()
        self._feed = ChangeFeed(self._asyncpg, dsn, self._name)
        pg = self._asyncpg
        self._asyncpg_errors: tuple[type[BaseException], ...] = (
            pg.PostgresError,
            pg.InterfaceError,
            # A connection terminated by the server while idle in the pool can
            # fail its next statement with this (checked with asyncpg 0.32.0:
            # "cannot switch to state 11; another operation (2) is in progress").
            pg.InternalClientError,
            OSError,
            TimeoutError,
        )
        # Due rows per claimed message, as claims found them (scan bounds).
        self._rows_per_message = 1.0

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return f"<PostgresStore {self._name!r} {state}>"

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
        """Connect the pool, then create or migrate the schema; idempotent.

        Raises:
            StoreError: the database cannot be reached, or its schema is newer
                than this version of mailstrom_async knows.
        """
        async with self._lock:
            if self._pool is not None:
                return
            with self._translate():
                pool = await self._asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    command_timeout=self._command_timeout,
                    server_settings={"application_name": "mailstrom_async"},
                    reset=_keep_session,
                )
            try:
                with self._translate():
                    async with pool.acquire() as conn, conn.transaction():
                        await self._migrate(conn)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await pool.close()
                raise
            self._pool = pool

    async def schema_version(self) -> int:
        """The schema version found in the database: 0 for a database that
        holds no queue yet, :attr:`SCHEMA_VERSION` once :meth:`open` has
        migrated it, more for one written by a newer mailstrom_async.

        It migrates nothing: on a closed store it reads the version on a
        connection of its own, closed before it returns, so that a deploy can
        ask whether :meth:`open` would migrate (``mailstrom-async migrate
        --check``).

        Raises:
            StoreError: the database cannot be reached or read.
        """
        if self._pool is not None:
            return await self._reading(_schema_version)
        with self._translate():
            conn = await self._asyncpg.connect(
                self._dsn,
                command_timeout=self._command_timeout,
                server_settings={"application_name": "mailstrom_async"},
            )
            try:
                return await _schema_version(conn)
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _migrate(self, conn: _Connection) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", sql.MIGRATION_LOCK)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {sql.SCHEMA_TABLE} (version integer NOT NULL)"
        )
        version = await conn.fetchval(f"SELECT max(version) FROM {sql.SCHEMA_TABLE}")  # noqa: S608
        version = 0 if version is None else int(version)
        if version > sql.SCHEMA_VERSION:
            msg = (
                f"PostgreSQL store {self._name!r} has schema version {version}, newer "
                f"than this mailstrom_async knows ({sql.SCHEMA_VERSION}); upgrade it"
            )
            raise StoreError(msg)
        if version == sql.SCHEMA_VERSION:
            return
        for step in sql.MIGRATIONS[version:]:
            for statement in step:
                await conn.execute(statement)
        await conn.execute(f"DELETE FROM {sql.SCHEMA_TABLE}")  # noqa: S608
        await conn.execute(
            f"INSERT INTO {sql.SCHEMA_TABLE} (version) VALUES ($1)",  # noqa: S608
            sql.SCHEMA_VERSION,
        )
        logger.info(
            "migrated PostgreSQL store schema",
            extra={
                "store": self._name,
                "from_version": version,
                "to_version": sql.SCHEMA_VERSION,
            },
        )

    async def aclose(self) -> None:
        """Close the pool; idempotent."""
        async with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                with anyio.CancelScope(shield=True), self._translate():
                    await pool.close()

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except self._asyncpg_errors as exc:
            msg = f"PostgreSQL store {self._name!r} failed: {exc}"
            raise StoreError(msg) from exc

    def _open_pool(self) -> asyncpg.pool.Pool[Any]:
        if self._pool is None:
            msg = "the store is not open: call open() or use 'async with'"
            raise StoreError(msg)
        return self._pool

    async def _reading(self, read: Callable[[_Connection], Awaitable[_T]]) -> _T:
        """``read(conn)`` on a pooled connection (each statement sees committed
        data). A connection that the server closed while it sat in the pool
        (``pg_terminate_backend``, a restart) is found out only when used: then
        the read is made again on another, up to once per pooled connection.
        Reads change nothing, so making one again is always safe."""
        pool = self._open_pool()
        for attempt in range(self._max_size + 1):
            try:
                with self._translate():
                    async with pool.acquire() as conn:
                        return await read(conn)
            except StoreError as exc:
                if attempt == self._max_size or not self._lost(exc.__cause__):
                    raise
                logger.debug(
                    "pooled connection lost; read made again on another",
                    extra={"store": self._name, "error": repr(exc.__cause__)},
                )
        raise AssertionError  # pragma: no cover - the loop returns or raises

    async def _query(self, method: str, statement: str, *args: Any) -> Any:
        """One read statement, ``conn.<method>(statement, *args)``, as
        :meth:`_reading` makes it."""

        async def read(conn: _Connection) -> Any:
            return await getattr(conn, method)(statement, *args)

        return await self._reading(read)

    def _lost(self, exc: BaseException | None) -> bool:
        """Whether *exc* says the connection was gone before or while a
        statement was sent (not that the statement was refused)."""
        pg = self._asyncpg
        if isinstance(
            exc,
            pg.ConnectionDoesNotExistError
            | pg.AdminShutdownError  # 57P01: terminated by an administrator
            | pg.InternalClientError
            | ConnectionError,
        ):
            return True
        return isinstance(exc, pg.InterfaceError) and "closed" in str(exc)

    async def _begin(self, pool: asyncpg.pool.Pool[Any]) -> tuple[_Connection, Any]:
        """A pooled connection with a transaction started. A connection the
        server closed while it sat in the pool fails its ``BEGIN``, before
        anything is written: then it is let go and another is tried, up to
        once per pooled connection."""
        for attempt in range(self._max_size + 1):
            conn = await pool.acquire()
            transaction = conn.transaction()
            try:
                # As ``async with``, so that asyncpg knows the transaction is
                # managed (its end is awaited in _write).
                await transaction.__aenter__()
            except BaseException as exc:
                await pool.release(conn)
                if attempt == self._max_size or not self._lost(exc):
                    raise
                logger.debug(
                    "pooled connection lost; transaction started on another",
                    extra={"store": self._name, "error": repr(exc)},
                )
                continue
            return conn, transaction
        raise AssertionError  # pragma: no cover - the loop returns or raises

    @contextlib.asynccontextmanager
    async def _write(
        self, *, due: bool = False, changed: _Changed = ()
    ) -> AsyncIterator[_Connection]:
        """A pooled connection inside one transaction, shielded from cancellation:
        committed when the block ends, rolled back if it raises.

        Once committed, the change is published to the other processes: *due*
        when new work may be due, *changed* the messages whose statuses changed
        (None: any may have). Through the change feed when a Deliverer watches
        (debounced, on its own connection), else at once on this connection.
        """
        pool = self._open_pool()
        with anyio.CancelScope(shield=True), self._translate():
            conn, transaction = await self._begin(pool)
            try:
                try:
                    yield conn
                except BaseException as exc:
                    await transaction.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
                await transaction.__aexit__(None, None, None)
                ids = None if changed is None else frozenset(changed)
                if (due or ids is None or ids) and not self._feed.publish(due, ids):
                    await self._notify(conn, due, ids)
            finally:
                await pool.release(conn)

    @contextlib.asynccontextmanager
    async def _statement(self) -> AsyncIterator[_Connection]:
        """A pooled connection for writes of one statement each, outside a
        transaction block (each statement commits on its own: no ``BEGIN`` and
        ``COMMIT`` round trips), shielded from cancellation like
        :meth:`_write`. Nothing is published: the caller's statements change
        no status and make nothing due."""
        pool = self._open_pool()
        with anyio.CancelScope(shield=True), self._translate():
            async with pool.acquire() as conn:
                yield conn

    async def _notify(
        self, conn: _Connection, due: bool, ids: frozenset[str] | None
    ) -> None:
        """Notify the others of a committed change, when no feed runs. The
        write has committed: a failure here is logged, never raised (the others
        see the change at their next poll)."""
        pg = self._asyncpg
        try:
            await conn.execute(NOTIFY, self._feed.payloads(due, ids))
        except (pg.PostgresError, pg.InterfaceError, OSError, TimeoutError) as exc:
            logger.warning(
                "could not notify other processes of a change",
                extra={"store": self._name, "error": repr(exc)},
            )

    async def watch_changes(
        self,
        on_change: Callable[[StoreChange], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Tell *on_change* what other processes commit, at once
        (``LISTEN/NOTIFY`` on a connection of its own, reconnected with backoff
        when lost), until cancelled; see
        :meth:`ChangeWatchingStore.watch_changes`. While it runs, this store's
        own changes are sent on that connection too, debounced: each write
        adds to a buffer after its commit, and what gathered meanwhile goes in
        one statement."""
        await self._feed.run(on_change, task_status=task_status)

    async def _check_exists(self, conn: _Connection, message_id: str) -> None:
        if await conn.fetchval(sql.MESSAGE_EXISTS, message_id) is None:
            raise UnknownMessageError(message_id)

    # -- adding --------------------------------------------------------------

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
        """Store several messages in one transaction; see :meth:`Store.add_many`.

        Two producers adding the same idempotency key at once: one stores it,
        the other's transaction fails on the unique index and is run again,
        finding the first message.
        """
        checked = [check_new_message(m) for m in messages]
        claim = check_claim(claim_for, lease_until, lease)
        owner, until, token = claim if claim is not None else (None, None, None)
        wanted = sorted({m.idempotency_key for m in checked if m.idempotency_key})
        self._open_pool()
        attempt = 1
        while True:
            try:
                async with self._write(due=owner is None) as conn:
                    return await self._add(conn, checked, wanted, (owner, until, token))
            except StoreError as exc:
                cause = exc.__cause__
                retry = (
                    isinstance(cause, self._asyncpg.UniqueViolationError)
                    and cause.constraint_name == _IDEMPOTENCY_CONSTRAINT
                    and attempt < _ADD_TRIES
                )
                if not retry:
                    raise
                attempt += 1

    async def _add(
        self,
        conn: _Connection,
        checked: Sequence[NewMessage],
        wanted: list[str],
        claim: tuple[str | None, datetime | None, str | None],
    ) -> list[tuple[str, bool]]:
        known: dict[str, str] = {}
        if wanted:
            known = dict(await conn.fetch(sql.KNOWN_KEYS, wanted))
        results: list[tuple[str, bool]] = []
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
        rcpt: tuple[list[Any], ...] = ([], [], [], [])
        levels: list[int] = []
        for m in checked:
            key = m.idempotency_key
            if key is not None and key in known:
                results.append((known[key], False))
                continue
            if key is not None:
                known[key] = m.message_id
            results.append((m.message_id, True))
            for column, value in zip(
                columns,
                (m.message_id, m.mail_from, m.data, m.smtputf8, m.submitted_at, key),
                strict=True,
            ):
                column.append(value)
            for position, address in enumerate(m.recipients):
                rcpt[0].append(m.message_id)
                rcpt[1].append(position)
                rcpt[2].append(address)
                rcpt[3].append(domain_key(address.rpartition("@")[2]))
                levels.append(m.priority)
        if columns[0]:
            await conn.execute(sql.INSERT_MESSAGES, *columns)
            await conn.execute(sql.INSERT_RECIPIENTS, *rcpt, *claim, levels)
        return results

    # -- reading -------------------------------------------------------------

    async def status(self, message_id: str) -> MessageStatus:
        """Return the message's status; see :meth:`Store.status`."""
        rows = await self._query("fetch", sql.STATUS_QUERY, message_id)
        if not rows:
            raise UnknownMessageError(message_id)
        return MessageStatus(
            message_id=message_id,
            recipients=tuple(
                _status(row, 2) for row in rows if row["address"] is not None
            ),
            submitted_at=rows[0]["submitted_at"],
            mail_from=rows[0]["mail_from"],
        )

    async def statuses(self, message_ids: Collection[str]) -> dict[str, MessageStatus]:
        """The statuses of stored messages, in one query; see :meth:`Store.statuses`."""
        rows = await self._query("fetch", sql.STATUSES_QUERY, list(message_ids))
        found: dict[str, MessageStatus] = {}
        for message_id, group in itertools.groupby(rows, key=itemgetter("id")):
            grouped = list(group)
            found[message_id] = MessageStatus(
                message_id=message_id,
                recipients=tuple(
                    _status(row, 3) for row in grouped if row["address"] is not None
                ),
                submitted_at=grouped[0]["submitted_at"],
                mail_from=grouped[0]["mail_from"],
            )
        return found

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
        values = sorted(RecipientState(s).value for s in wanted)
        lowered = None if domain is None else domain_key(domain)
        rows = await self._query(
            "fetch", sql.LIST_MESSAGES, values, lowered, held, limit
        )
        found: dict[str, tuple[Any, list[RecipientStatus]]] = {}
        for row in rows:
            entry = found.setdefault(row["id"], (row, []))
            entry[1].append(_status(row, 3))
        return [
            MessageStatus(
                message_id=mid,
                recipients=tuple(recipients),
                submitted_at=first["submitted_at"],
                mail_from=first["mail_from"],
            )
            for mid, (first, recipients) in found.items()
        ]

    async def message_data(self, message_id: str) -> bytes:
        """The stored bytes of a message; see :meth:`Store.message_data`."""
        data = await self._query("fetchval", sql.MESSAGE_DATA, message_id)
        if data is None:
            raise UnknownMessageError(message_id)
        return bytes(data)

    async def message_sizes(self, message_ids: Collection[str]) -> dict[str, int]:
        """The sizes of stored messages; see :meth:`Store.message_sizes`."""
        rows = await self._query("fetch", sql.MESSAGE_SIZES, list(message_ids))
        return {row[0]: row[1] for row in rows}

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
        at = utc(now, "now")
        limits = check_bounds(bounds)
        wanted = UNFINISHED if states is None else states
        values = sorted(RecipientState(s).value for s in wanted)
        lowered = None if domain is None else domain_key(domain)
        rows = await self._query(
            "fetch", sql.SHAPE, at, values, lowered, held, list(limits)
        )
        counts: dict[str, list[int]] = {}
        for name, bucket, count in rows:
            counts.setdefault(name, [0] * (len(limits) + 1))[bucket] += count
        return QueueShape(
            bounds=limits, by_domain={d: tuple(c) for d, c in counts.items()}
        )

    async def history(self, message_id: str) -> list[AttemptRecord]:
        """The kept attempts of a message's recipients; see :meth:`Store.history`."""
        rows = await self._query("fetch", sql.HISTORY_QUERY, message_id)
        if (
            not rows
            and await self._query("fetchval", sql.MESSAGE_EXISTS, message_id) is None
        ):
            raise UnknownMessageError(message_id)
        return [_attempt(row) for row in rows]

    async def lease_owners(self) -> dict[str, LeaseInfo]:
        """Who holds leases on unfinished recipients; see :meth:`Store.lease_owners`."""
        rows = await self._query("fetch", sql.LEASE_OWNERS)
        return {
            owner: LeaseInfo(recipients=count, lease_until=until)
            for owner, count, until in rows
        }

    async def next_due_at(self) -> datetime | None:
        """When the next unfinished recipient comes due; see :meth:`Store.next_due_at`."""
        row = await self._query("fetchrow", sql.NEXT_DUE)
        times = [t for t in (row[0], row[1]) if t is not None] if row else []
        return min(times) if times else None

    async def summary(self) -> QueueSummary:
        """Count recipients by state and by (state, domain)."""
        rows = await self._query("fetch", sql.SUMMARY)
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

    # -- claims and outcomes -------------------------------------------------

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        """Lease due recipients of up to *limit* messages; see :meth:`Store.claim_due`.

        One statement (:data:`._postgres_sql.CLAIM`), committed on its own,
        per claim. The due rows it looks at are bounded by what the claims so
        far found per message (a message's due rows, 1 when each message has
        one recipient); it runs again only when that bound, not the queue, ran
        out before *limit* messages were found, with the bound doubled. A
        repeat that fails keeps what the first statements leased: those jobs
        are returned and the failure logged.
        """
        at = utc(now, "now")
        until = utc(lease_until, "lease_until")
        check_limit(limit)
        token = new_lease_token()
        rows: list[Any] = []
        seen: set[str] = set()
        scan = self._scan_bound(limit)
        async with self._statement() as conn:
            while len(seen) < limit:
                try:
                    found = await conn.fetch(
                        sql.CLAIM, at, worker, until, limit - len(seen), scan, token
                    )
                except self._asyncpg_errors as exc:
                    if not rows:
                        raise
                    logger.warning(
                        "claim stopped short",
                        extra={
                            "worker": worker,
                            "messages": len(seen),
                            "store": self._name,
                            "error": repr(exc),
                        },
                    )
                    break
                fresh = {row["id"] for row in found} - seen
                rows.extend(found)
                seen |= fresh
                if fresh:
                    self._learn_rows_per_message(len(found) / len(fresh))
                if not fresh or found[0]["scanned"] < scan:
                    break
                scan *= 2
        if not rows:
            return []
        # One job per message and lease token (a row this worker held already
        # keeps its token).
        jobs: dict[tuple[str, str], tuple[Any, list[Any]]] = {}
        data: dict[str, bytes] = {}
        for row in rows:
            jobs.setdefault((row["id"], row["lease_token"]), (row, []))[1].append(row)
            if row["data"] is not None:
                data[row["id"]] = bytes(row["data"])

        def first_due(entry: tuple[Any, list[Any]]) -> tuple[int, datetime, int]:
            first, mine = entry
            due = min(r["next_attempt_at"] for r in mine)
            return first["priority"], due, first["seq"]

        logger.debug(
            "claimed",
            extra={"worker": worker, "messages": len(seen), "store": self._name},
        )
        return [
            Job(
                message_id=mid,
                mail_from=first["mail_from"],
                recipients=tuple(
                    _status(r, 8) for r in sorted(mine, key=lambda r: r["position"])
                ),
                data=data[mid],
                smtputf8=first["smtputf8"],
                submitted_at=first["submitted_at"],
                lease=lease,
                priority=first["priority"],
            )
            for (mid, lease), (first, mine) in sorted(
                jobs.items(), key=lambda e: first_due(e[1])
            )
        ]

    def _scan_bound(self, limit: int) -> int:
        """How many due rows a claim of *limit* messages looks at first: the
        rows those messages are expected to have, with a quarter to spare."""
        ratio = self._rows_per_message
        if ratio <= 1.0:
            return limit
        return math.ceil(limit * ratio * 1.25)

    def _learn_rows_per_message(self, ratio: float) -> None:
        """Fold what one claim found into the running estimate."""
        self._rows_per_message += (ratio - self._rows_per_message) * 0.25

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
        checked = Checked(
            message_id,
            check_statuses(statuses),
            check_history(history, history_limit),
            lease,
        )
        [lost] = await self._record(
            [checked], worker=worker, history_limit=history_limit
        )
        return lost

    async def record_many(
        self,
        records: Sequence[JobRecord],
        *,
        worker: str,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> list[list[str]]:
        """Record each of *records* as :meth:`record` does, in one transaction
        of a few statements whatever their number: usually two, the row locks
        and one statement for the statuses, their lease ends and attempts; see
        :meth:`BatchRecordingStore.record_many`."""
        checked = check_records(records, history_limit)
        if not checked:
            return []
        return await self._record(checked, worker=worker, history_limit=history_limit)

    async def _record(
        self, records: Sequence[Checked], *, worker: str, history_limit: int
    ) -> list[list[str]]:
        """Lock every row of the records' messages (in one stable order, so that
        two batches never deadlock), decide in Python, write in one statement
        per kind."""
        ids = sorted({r.message_id for r in records})
        async with self._write(changed=ids) as conn:
            rows: dict[str, list[Stored]] = {mid: [] for mid in ids}
            for row in await conn.fetch(sql.LOCK_RECORDED, ids):
                rows[row[0]].append(Stored(*row[1:]))
            if any(not stored for stored in rows.values()):
                await self._check_all_exist(conn, records, rows)
            plan = plan_records(
                rows, records, worker=worker, history_limit=history_limit
            )
            for statement, args in self._write_plan(plan):
                await conn.execute(statement, *args)
            if plan.trims:
                trim = (
                    sql.TRIM_HISTORY_TO_LATEST
                    if history_limit == 1
                    else sql.TRIM_HISTORY
                )
                cut = 0 if history_limit == 1 else history_limit - 1
                await conn.execute(
                    trim,
                    *_columns(
                        [
                            (mid, pos, top - cut)
                            for (mid, pos), top in sorted(plan.trims.items())
                        ],
                        3,
                    ),
                )
        return plan.lost

    @staticmethod
    def _write_plan(plan: Plan) -> Iterator[tuple[str, list[list[Any]]]]:
        """The statements that write *plan*'s statuses, lease ends and attempts:
        one when there are statuses (the usual record), two at most."""
        statuses = [
            (
                mid,
                position,
                *_status_values(status),
                kept,
                (mid, position) in plan.unlease,
            )
            for (mid, position), (status, kept) in sorted(plan.statuses.items())
        ]
        unlease = sorted(plan.unlease.difference(plan.statuses))
        history = [(mid, pos, *_attempt_values(a)) for mid, pos, a in plan.history]
        if statuses and history:
            yield (
                sql.RECORD_WITH_HISTORY,
                [*_columns(statuses, 18), *_columns(history, 14)],
            )
        elif statuses:
            yield sql.RECORD_MANY, _columns(statuses, 18)
        elif history:
            yield sql.INSERT_HISTORY, _columns(history, 14)
        if unlease:
            yield sql.UNLEASE_MANY, _columns(unlease, 2)

    async def _check_all_exist(
        self,
        conn: _Connection,
        records: Sequence[Checked],
        rows: Mapping[str, Sequence[Stored]],
    ) -> None:
        """Raise UnknownMessageError for the first record whose message is not
        stored (a message without rows may still be stored)."""
        empty = [mid for mid, stored in rows.items() if not stored]
        found = {row[0] for row in await conn.fetch(sql.MESSAGES_EXISTING, empty)}
        for record in records:
            if not rows[record.message_id] and record.message_id not in found:
                raise UnknownMessageError(record.message_id)

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
        column, holder = (3, worker) if lease is None else (4, lease)
        async with self._write(due=True) as conn:
            stored = await conn.fetch(sql.LOCK_RECIPIENTS, message_id)
            leased = [row for row in stored if row[column] == holder]
            index = address_index(row[1] for row in leased)
            positions = {
                leased[i][0] for address in addresses for i in matching(index, address)
            }
            if positions:
                unlease = sql.UNLEASE_OWN if lease is None else sql.UNLEASE_FENCED
                await conn.execute(unlease, message_id, sorted(positions), holder)

    async def renew_leases(
        self,
        *,
        worker: str,
        lease_until: datetime,
        message_ids: Collection[str] | None = None,
    ) -> int:
        """Extend *worker*'s leases; see :meth:`Store.renew_leases`."""
        until = utc(lease_until, "lease_until")
        async with self._write() as conn:
            if message_ids is None:
                result = await conn.execute(sql.RENEW_ALL, until, worker)
            else:
                result = await conn.execute(
                    sql.RENEW_SOME, until, worker, sorted(message_ids)
                )
        return _count(result)

    async def release_owner(self, owner: str) -> int:
        """End every lease of *owner*; see :meth:`Store.release_owner`."""
        async with self._write(due=True) as conn:
            return _count(await conn.execute(sql.RELEASE_OWNER, owner))

    async def purge(self, *, finished_before: datetime) -> int:
        """Delete finished messages older than *finished_before*; return how many.

        The messages are walked in the order they were added, at most
        :data:`_PURGE_STEP` at a time, each step one statement committed on its
        own, so that a large purge never holds its locks for long.
        """
        before = utc(finished_before, "finished_before")
        count = 0
        after = 0
        async with self._statement() as conn:
            while True:  # a statement per step, each committed on its own
                row = await conn.fetchrow(sql.PURGE, before, after, _PURGE_STEP)
                last, deleted = (None, 0) if row is None else (row[0], int(row[1]))
                count += deleted
                if last is None:
                    break
                after = last
        if count:
            logger.info("purged", extra={"store": self._name, "messages": count})
        return count

    # -- operators -----------------------------------------------------------

    async def retry_now(
        self,
        *,
        now: datetime,
        message_id: str | None = None,
        domain: str | None = None,
    ) -> int:
        """Make waiting recipients due at *now*; see :meth:`Store.retry_now`."""
        at = utc(now, "now")
        lowered = None if domain is None else domain_key(domain)
        async with self._write(due=True, changed=_one(message_id)) as conn:
            if message_id is not None:
                await self._check_exists(conn, message_id)
            return _count(await conn.execute(sql.RETRY_NOW, at, message_id, lowered))

    async def cancel(self, message_id: str) -> int:
        """Fail every unfinished recipient of a message; see :meth:`Store.cancel`."""
        async with self._write(changed=(message_id,)) as conn:
            await self._check_exists(conn, message_id)
            return _count(await conn.execute(sql.CANCEL, message_id, CANCELLED))

    async def hold(
        self, *, message_id: str | None = None, domain: str | None = None
    ) -> int:
        """Hold unfinished recipients; see :meth:`Store.hold`."""
        lowered = check_hold(message_id, domain)
        async with self._write(changed=_one(message_id)) as conn:
            if message_id is None:
                return _count(await conn.execute(sql.HOLD_DOMAIN, lowered))
            await self._check_exists(conn, message_id)
            return _count(await conn.execute(sql.HOLD_MESSAGE, message_id, lowered))

    async def unhold(
        self,
        *,
        message_id: str | None = None,
        domain: str | None = None,
        all: bool = False,
    ) -> int:
        """Release held recipients; see :meth:`Store.unhold`."""
        lowered = check_unhold(message_id, domain, everything=all)
        async with self._write(due=True, changed=_one(message_id)) as conn:
            if message_id is not None:
                await self._check_exists(conn, message_id)
                result = await conn.execute(sql.UNHOLD_MESSAGE, message_id, lowered)
            elif lowered is not None:
                result = await conn.execute(sql.UNHOLD_DOMAIN, lowered)
            else:
                result = await conn.execute(sql.UNHOLD_ALL)
        return _count(result)


async def _keep_session(conn: Any) -> None:
    """The pool's reset of a released connection: nothing more than asyncpg
    does anyway (roll back an open transaction, drop listeners). This store
    sets no session state on pooled connections (no ``SET``, ``LISTEN``,
    cursors or session advisory locks; the change feed listens on a connection
    of its own), so asyncpg's default reset query (``RESET ALL``, ``UNLISTEN
    *``, ...) would only cost every release a round trip."""


async def _schema_version(conn: Any) -> int:
    """The version in the schema table, 0 without the table."""
    if await conn.fetchval("SELECT to_regclass($1)", sql.SCHEMA_TABLE) is None:
        return 0
    version = await conn.fetchval(f"SELECT max(version) FROM {sql.SCHEMA_TABLE}")  # noqa: S608
    return 0 if version is None else int(version)


def _one(message_id: str | None) -> tuple[str] | None:
    """The messages an operation on one message, or on all (None), changed."""
    return None if message_id is None else (message_id,)


def _utf8(text: str | None) -> bytes | None:
    """A reply text as stored: UTF-8 bytes (checked text is valid Unicode)."""
    return None if text is None else text.encode()


def _text(data: bytes | None) -> str | None:
    return None if data is None else bytes(data).decode()


def _count(result: str) -> int:
    """The row count of a command tag such as ``UPDATE 3``."""
    return int(result.rpartition(" ")[2])


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into *width* column lists (for ``unnest``)."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _status(row: Any, start: int) -> RecipientStatus:
    """A status from the 16 columns of *row* from index *start* on."""
    (address, state, attempts, code, enhanced_code, message, raw_message, host, ip,
     tls, tls_verified, first, last, nxt, duplicate, held) = row[start : start + 16]  # fmt: skip
    return RecipientStatus(
        address=address,
        state=RecipientState(state),
        attempts=attempts,
        code=code,
        enhanced_code=enhanced_code,
        message=_text(message),
        raw_message=None if raw_message is None else bytes(raw_message),
        host=host,
        ip=ip,
        tls=tls,
        tls_verified=tls_verified,
        first_attempt_at=first,
        last_attempt_at=last,
        next_attempt_at=nxt,
        possible_duplicate=duplicate,
        held=held,
    )


def _status_values(s: RecipientStatus) -> tuple[Any, ...]:
    """``state, attempts, ..., possible_duplicate`` of *s* (checked already)."""
    return (
        s.state.value,
        s.attempts,
        s.code,
        s.enhanced_code,
        _utf8(s.message),
        s.raw_message,
        s.host,
        s.ip,
        s.tls,
        s.tls_verified,
        s.first_attempt_at,
        s.last_attempt_at,
        s.next_attempt_at,
        s.possible_duplicate,
    )


def _attempt(row: Any) -> AttemptRecord:
    (address, attempt, started, duration, state, code, enhanced_code, message,
     raw_message, host, ip, tls, tls_verified) = row  # fmt: skip
    return AttemptRecord(
        address=address,
        attempt=attempt,
        started_at=started,
        duration=duration,
        state=RecipientState(state),
        code=code,
        enhanced_code=enhanced_code,
        message=_text(message),
        raw_message=None if raw_message is None else bytes(raw_message),
        host=host,
        ip=ip,
        tls=tls,
        tls_verified=tls_verified,
    )


def _attempt_values(r: AttemptRecord) -> tuple[Any, ...]:
    """``attempt, started_at, ..., tls_verified`` of *r* (checked already)."""
    return (
        r.attempt,
        r.started_at,
        r.duration,
        r.state.value,
        r.code,
        r.enhanced_code,
        _utf8(r.message),
        r.raw_message,
        r.host,
        r.ip,
        r.tls,
        r.tls_verified,
    )
