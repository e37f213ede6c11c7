"""The store contract against MemoryStore and SQLiteStore, and SQLite's own promises."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._models import (
    AttemptRecord,
    MessageStatus,
    RecipientState,
    RecipientStatus,
)
from mailstrom_async._store import (
    Job,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    Store,
    _postgres,
    _sqlite,
)
from mailstrom_async._store import _sql as sql
from mailstrom_async._store._sql import MIGRATIONS, SCHEMA_VERSION
from mailstrom_async._text import clean, wire_bytes
from mailstrom_async.testing._store_contract import (
    T0,
    StoreContract,
    at,
    attempted,
    claimed_addresses,
    new_message,
)
from tests.postgres import PostgresCluster, fresh_database
from tests.strategies import any_text


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, PostgresCluster | None]:
    """The backend to test, and for PostgreSQL the session's cluster (started
    here, outside the event loop, on first use)."""
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        cluster.migrated_template()  # made here, outside the event loop
        return request.param, cluster
    return request.param, None


class TestStoreContract(StoreContract):
    @pytest.fixture
    async def store(
        self, store_kind: tuple[str, PostgresCluster | None], tmp_path: Path
    ) -> AsyncIterator[Store]:
        kind, cluster = store_kind
        if cluster is not None:
            async with (
                fresh_database(cluster, migrated=True) as dsn,
                PostgresStore(dsn) as backend,
            ):
                yield backend
            return
        sqlite_or_memory = (
            MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
        )
        async with sqlite_or_memory:
            yield sqlite_or_memory


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_async_context_manager(kind: str, tmp_path: Path) -> None:
    """``async with`` opens a store, returns it, and closes it on the way out."""
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    assert "closed" in repr(store)
    async with store as entered:
        assert entered is store
        assert "open" in repr(store)
        await store.add(new_message("m1"))
    assert "closed" in repr(store)
    with pytest.raises(StoreError, match="not open"):
        await store.status("m1")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


async def pragma(store: SQLiteStore, name: str) -> object:
    assert store._db is not None
    [(value,)] = await store._db.execute_fetchall(f"PRAGMA {name}")
    return value


async def test_persists_across_reopen(db_path: Path) -> None:
    """Messages, statuses and leases survive closing and reopening the file."""
    async with SQLiteStore(db_path) as store:
        await store.add(new_message("m1", "a@x.example", "b@x.example", key="k"))
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        await store.record(
            "m1", [attempted("a@x.example", RecipientState.DELIVERED)], worker="w"
        )
        before = await store.status("m1")
    async with SQLiteStore(str(db_path)) as store:
        assert await store.status("m1") == before
        assert await store.next_due_at() == at(60)
        assert await store.add(new_message("m2", key="k")) == ("m1", False)


async def test_durability_pragmas(db_path: Path) -> None:
    """The store runs in WAL mode with synchronous=FULL, foreign keys and a busy timeout."""
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "journal_mode") == "wal"
        assert await pragma(store, "synchronous") == 2  # FULL
        assert await pragma(store, "foreign_keys") == 1
        busy = await pragma(store, "busy_timeout")
        assert isinstance(busy, int)
        assert busy >= 1000
        assert await pragma(store, "user_version") == SCHEMA_VERSION
    async with SQLiteStore(db_path, synchronous="normal") as store:
        assert await pragma(store, "synchronous") == 1


async def test_works_without_wal(caplog: pytest.LogCaptureFixture) -> None:
    """Where SQLite refuses WAL (an in-memory database) the store warns and works."""
    async with SQLiteStore(":memory:") as store:
        await store.add(new_message("m1"))
        assert (await store.status("m1")).message_id == "m1"
    [record] = [r for r in caplog.records if r.name == "mailstrom_async.store"]
    assert record.levelname == "WARNING"
    assert record.__dict__["journal_mode"] == "memory"


def test_synchronous_is_checked() -> None:
    """An unknown synchronous mode raises ValueError (it is spliced into a PRAGMA)."""
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore("x.db", synchronous="FULL; DROP TABLE messages")


async def test_migrates_from_version_zero(db_path: Path) -> None:
    """An existing database at schema version 0 gets the current schema on open."""
    async with aiosqlite.connect(db_path) as raw:
        await raw.execute("CREATE TABLE unrelated (x)")
        await raw.commit()
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "user_version") == SCHEMA_VERSION
        await store.add(new_message("m1"))
        assert (await store.status("m1")).message_id == "m1"


async def test_migrates_version_two_keeping_its_rows(db_path: Path) -> None:
    """A version 2 database (before raw_message) keeps its rows when migrated, and
    then stores a reply's exact bytes."""
    async with aiosqlite.connect(db_path) as raw:
        for step in MIGRATIONS[:2]:
            for statement in step:
                await raw.execute(statement)
        await raw.execute(
            "INSERT INTO messages VALUES ('m1', 's@x.example', x'00', 0, 0.0, NULL)"
        )
        await raw.execute(
            "INSERT INTO recipients (message_id, position, address, domain, state,"
            " message, next_attempt_at) VALUES ('m1', 0, 'a@x.example', 'x.example',"
            " 'deferred', 'later', 60.0)"
        )
        await raw.execute("PRAGMA user_version = 2")
        await raw.commit()
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "user_version") == SCHEMA_VERSION
        [r] = (await store.status("m1")).recipients
        assert (r.message, r.raw_message) == ("later", None)
        failed = attrs.evolve(
            r, state=RecipientState.FAILED, message="\\xff", raw_message=b"\xff"
        )
        await store.record("m1", [failed], worker="w")
        assert (await store.status("m1")).recipients == (failed,)


async def test_refuses_newer_schema(db_path: Path) -> None:
    """A database written by a newer schema raises StoreError and stays untouched."""
    async with aiosqlite.connect(db_path) as raw:
        await raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(db_path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.status("m1")
    async with aiosqlite.connect(db_path) as raw:
        [(version,)] = await raw.execute_fetchall("PRAGMA user_version")
        assert version == SCHEMA_VERSION + 1
        assert list(await raw.execute_fetchall("SELECT name FROM sqlite_master")) == []


async def test_backend_errors_become_store_errors(tmp_path: Path) -> None:
    """A backend failure raises StoreError with the sqlite3 error as its cause."""
    store = SQLiteStore(tmp_path / "missing" / "queue.db")
    with pytest.raises(StoreError) as info:
        await store.open()
    assert isinstance(info.value.__cause__, aiosqlite.Error)
    await store.aclose()


async def test_failed_add_leaves_nothing(db_path: Path) -> None:
    """An add() that fails half-way (disk full while writing recipients) stores nothing."""
    async with SQLiteStore(db_path) as store:
        await store.add(new_message("m0"))
        assert store._db is not None
        pages = await pragma(store, "page_count")
        await store._db.execute(f"PRAGMA max_page_count = {pages}")
        many = [f"recipient-{i}@x.example" for i in range(2000)]
        with pytest.raises(StoreError) as info:
            await store.add(new_message("m1", *many))
        assert isinstance(info.value.__cause__, aiosqlite.Error)
        with pytest.raises(UnknownMessageError):
            await store.status("m1")
        await store._db.execute("PRAGMA max_page_count = 1073741823")
        assert await store.add(new_message("m1", *many)) == ("m1", True)
        assert len((await store.status("m1")).recipients) == len(many)


async def test_two_connections_never_share_a_recipient(db_path: Path) -> None:
    """Workers on two connections to one file claim every recipient exactly once."""
    async with SQLiteStore(db_path) as one, SQLiteStore(db_path) as two:
        for i in range(60):
            await one.add(new_message(f"m{i}", "a@x.example", "b@y.example"))
        claimed: list[tuple[str, str]] = []

        async def worker(store: SQLiteStore, name: str) -> None:
            while jobs := await store.claim_due(
                now=at(1), worker=name, lease_until=at(600), limit=3
            ):
                claimed.extend(claimed_addresses(jobs))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(worker, one, f"one-{n}")
                tg.start_soon(worker, two, f"two-{n}")
    assert len(claimed) == len(set(claimed)) == 120


async def test_expired_lease_claimed_by_other_connection(db_path: Path) -> None:
    """A lease held through one connection expires and is claimed through another."""
    async with SQLiteStore(db_path) as one, SQLiteStore(db_path) as two:
        await one.add(new_message("m1"))
        assert await one.claim_due(now=T0, worker="dead", lease_until=at(30), limit=1)
        assert (
            await two.claim_due(now=at(29), worker="b", lease_until=at(90), limit=1)
            == []
        )
        assert await two.next_due_at() == at(30)
        jobs = await two.claim_due(now=at(30), worker="b", lease_until=at(90), limit=1)
        assert claimed_addresses(jobs) == [("m1", "rcpt@example.com")]


# -- MemoryStore and SQLiteStore agree on random operation sequences ----------------

_ADDRESSES = ["a@x.example", "B@x.example", "c@y.example"]
_WORKERS = ["w1", "w2"]
_times = st.integers(0, 12).map(at)
_FINAL = [RecipientState.DELIVERED, RecipientState.FAILED]
_UNFINISHED = [RecipientState.QUEUED, RecipientState.DEFERRED]


@st.composite
def _statuses(draw: st.DrawFn) -> list[RecipientStatus]:
    result = []
    for address in draw(st.lists(st.sampled_from(_ADDRESSES), max_size=3)):
        when = draw(_times)
        final = draw(st.booleans())
        result.append(
            RecipientStatus(
                address=address.upper() if draw(st.booleans()) else address,
                state=draw(st.sampled_from(_FINAL if final else _UNFINISHED)),
                attempts=draw(st.integers(0, 3)),
                code=draw(st.sampled_from([None, 250, 451, 550])),
                tls=draw(st.sampled_from([None, False, True])),
                last_attempt_at=when,
                next_attempt_at=None if final else draw(_times),
            )
        )
    return result


_mids = st.sampled_from(["m0", "m1", "m2"])
# Lease tokens by the order the stores issued them ("L1" is the first claim's),
# "add" for the one adds take, or None: no token.
_leases = st.sampled_from([None, "L1", "L2", "L3", "add"])


class _Leases:
    """One store's lease tokens under names both stores share: "L1" for the
    token of its first claim, and so on."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {"add": "add"}
        self.tokens: dict[str, str] = {"add": "add"}

    def name(self, job: Job) -> Job:
        if job.lease is None:
            return job
        name = self.names.get(job.lease)
        if name is None:
            name = self.names[job.lease] = f"L{len(self.names)}"
            self.tokens[name] = job.lease
        return attrs.evolve(job, lease=name)

    def token(self, name: str | None) -> str | None:
        return None if name is None else self.tokens.get(name, name)


_operations = st.one_of(
    st.tuples(
        st.just("add"),
        _mids,
        st.lists(st.sampled_from(_ADDRESSES), max_size=3, unique=True),
        _times,
        st.sampled_from([None, "k1", "k2"]),
        st.one_of(st.none(), st.tuples(st.sampled_from(_WORKERS), _times)),
    ),
    st.tuples(
        st.just("claim"),
        _times,
        st.sampled_from(_WORKERS),
        st.integers(0, 12),
        st.integers(1, 3),
    ),
    st.tuples(
        st.just("record"), _mids, _statuses(), st.sampled_from(_WORKERS), _leases
    ),
    st.tuples(
        st.just("release"),
        _mids,
        st.lists(st.sampled_from(_ADDRESSES), max_size=3),
        st.sampled_from(_WORKERS),
        _leases,
    ),
    st.tuples(st.just("purge"), _times),
    st.tuples(
        st.just("hold"),
        st.one_of(st.none(), _mids),
        st.sampled_from([None, "x.example", "Y.example"]),
    ),
    st.tuples(
        st.just("unhold"),
        st.one_of(st.none(), _mids),
        st.sampled_from([None, "x.example", "Y.example"]),
        st.booleans(),
    ),
    st.tuples(st.just("status"), _mids),
    st.tuples(
        st.just("retry_now"),
        _times,
        st.one_of(st.none(), _mids),
        st.sampled_from([None, "x.example"]),
    ),
    st.tuples(st.just("cancel"), _mids),
    st.tuples(
        st.just("renew"),
        st.sampled_from(_WORKERS),
        _times,
        st.one_of(st.none(), st.lists(_mids, max_size=2)),
    ),
    st.tuples(st.just("release_owner"), st.sampled_from(_WORKERS)),
    st.just(("views",)),
)


async def _apply(store: Store, op: tuple[Any, ...], leases: _Leases) -> object:
    """Run *op* on *store*; return its result, or the type of the exception raised."""
    try:
        match op:
            case ("add", mid, rcpts, t, key, claim):
                message = new_message(mid, submitted_at=t, key=key)
                message = attrs.evolve(message, recipients=tuple(rcpts))
                if claim is None:
                    return await store.add(message)
                worker, until = claim
                return await store.add(
                    message, claim_for=worker, lease_until=until, lease="add"
                )
            case ("claim", now, worker, lease_seconds, limit):
                jobs = await store.claim_due(
                    now=now,
                    worker=worker,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    limit=limit,
                )
                return [leases.name(job) for job in jobs]
            case ("record", mid, statuses, worker, lease):
                # Each status's attempt, kept 2 per recipient at most: the
                # bound is reached at once (attempt numbers 1 to 3).
                history = [
                    AttemptRecord(
                        address=s.address,
                        attempt=max(s.attempts, 1),
                        started_at=s.last_attempt_at or T0,
                        state=s.state,
                        code=s.code,
                        tls=s.tls,
                    )
                    for s in statuses
                ]
                return await store.record(
                    mid,
                    statuses,
                    worker=worker,
                    lease=leases.token(lease),
                    history=history,
                    history_limit=2,
                )
            case ("release", mid, addresses, worker, lease):
                await store.release(
                    mid, addresses, worker=worker, lease=leases.token(lease)
                )
                return None
            case ("purge", t):
                return await store.purge(finished_before=t)
            case ("hold", mid, domain):
                return await store.hold(message_id=mid, domain=domain)
            case ("unhold", mid, domain, everything):
                return await store.unhold(message_id=mid, domain=domain, all=everything)
            case ("status", mid):
                return await store.status(mid), await store.history(mid)
            case ("retry_now", now, mid, domain):
                return await store.retry_now(now=now, message_id=mid, domain=domain)
            case ("cancel", mid):
                return await store.cancel(mid)
            case ("renew", worker, until, mids):
                return await store.renew_leases(
                    worker=worker, lease_until=until, message_ids=mids
                )
            case ("release_owner", worker):
                return await store.release_owner(worker)
            case _:
                return (await store.next_due_at(), await store.summary())
    except (StoreError, UnknownMessageError, ValueError) as exc:
        return type(exc)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_operations, max_size=30))
def test_memory_and_sqlite_agree(ops: list[tuple[Any, ...]]) -> None:
    """Any sequence of operations gives the same results from both stores."""

    async def main() -> None:
        async with MemoryStore() as memory, SQLiteStore(":memory:") as lite:
            ours, theirs = _Leases(), _Leases()
            for op in [*ops, ("views",)]:
                assert await _apply(memory, op, ours) == await _apply(
                    lite, op, theirs
                ), op

    anyio.run(main)


async def test_concurrent_writes_share_commits_and_fail_alone(tmp_path: Path) -> None:
    """Concurrent adds are all durable after they return; a failing one (a duplicate
    id) in the same group commit undoes only itself."""
    path = tmp_path / "q.db"
    outcomes: dict[str, str] = {}
    async with SQLiteStore(path) as store:
        await store.add(new_message("dup", "a@x.example"))

        async def add(mid: str) -> None:
            try:
                await store.add(new_message(mid, "a@x.example", "b@x.example"))
            except StoreError:
                outcomes[mid] = "error"
            else:
                outcomes[mid] = "ok"

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(add, "dup" if n == 100 else f"m{n}")
    assert outcomes.pop("dup") == "error"
    assert set(outcomes.values()) == {"ok"}
    async with SQLiteStore(path) as reopened:
        for mid in outcomes:
            assert len((await reopened.status(mid)).recipients) == 2
        assert len((await reopened.status("dup")).recipients) == 1


async def test_lease_renewal_uses_an_index(tmp_path: Path) -> None:
    """Renewing a worker's leases searches an index, not the whole table."""
    async with SQLiteStore(tmp_path / "q.db") as store:
        await store.open()
    async with aiosqlite.connect(tmp_path / "q.db") as raw:
        plan = await raw.execute_fetchall(
            "EXPLAIN QUERY PLAN UPDATE recipients SET lease_until = 1"
            " WHERE lease_owner = 'w'"
        )
    detail = " ".join(str(row[-1]) for row in plan)
    assert "recipients_lease_owner" in detail, detail


async def test_claims_skip_held_rows_through_an_index(tmp_path: Path) -> None:
    """Claims, next_due_at() and retry_now() walk the index of claimable rows
    (unfinished, not held); unhold() by domain or of all walks the held rows."""
    async with SQLiteStore(tmp_path / "q.db") as store:
        await store.open()
    statements = {
        sql.SCAN_DUE: {"now": 1.0, "priority": 0},
        sql.NEXT_PRIORITY: {"after": 0},
        sql.NEXT_DUE: {},
        sql.RETRY_NOW: {"now": 1.0, "message_id": None, "domain": None},
        sql.UNHOLD_DOMAIN: {"domain": "x.example"},
        sql.UNHOLD_ALL: {},
    }
    plans = []
    async with aiosqlite.connect(tmp_path / "q.db") as raw:
        for statement, params in statements.items():
            rows = await raw.execute_fetchall(f"EXPLAIN QUERY PLAN {statement}", params)
            plans.append(" ".join(str(row[-1]) for row in rows))
    scan, next_priority, next_due, retry, unhold_domain, unhold_all = plans
    index = "USING INDEX recipients_claim_order"
    assert f"{index} (priority=? AND next_attempt_at<?)" in scan, scan
    assert f"{index} (priority>?)" in next_priority, next_priority
    assert f"{index} (priority=?)" in next_due, next_due
    assert index in retry, retry
    assert "USING INDEX recipients_held (domain=?)" in unhold_domain, unhold_domain
    assert "USING INDEX recipients_held" in unhold_all, unhold_all


def _held_step() -> int:
    """The migration step that adds the held column (steps get renumbered)."""
    [step] = [
        n
        for n, statements in enumerate(MIGRATIONS)
        if any("ADD COLUMN held" in s for s in statements)
    ]
    return step


async def test_migration_adds_held_to_existing_rows(db_path: Path) -> None:
    """A database from before holds opens with every recipient not held and the
    old due index replaced; its waiting mail is claimed and can be held."""
    step = _held_step()
    async with aiosqlite.connect(db_path) as raw:
        for statements in MIGRATIONS[:step]:
            for statement in statements:
                await raw.execute(statement)
        await raw.execute(
            "INSERT INTO messages VALUES ('m1', 'a@example.org', x'00', 0, ?, NULL)",
            (T0.timestamp(),),
        )
        await raw.executemany(
            "INSERT INTO recipients (message_id, position, address, domain, state,"
            " next_attempt_at) VALUES ('m1', ?, ?, ?, ?, ?)",
            [
                (0, "a@x.example", "x.example", "deferred", at(5).timestamp()),
                (1, "b@y.example", "y.example", "delivered", None),
            ],
        )
        await raw.execute(f"PRAGMA user_version = {step}")
        await raw.commit()
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "user_version") == SCHEMA_VERSION
        status = await store.status("m1")
        assert [(r.state, r.held) for r in status] == [
            (RecipientState.DEFERRED, False),
            (RecipientState.DELIVERED, False),
        ]
        assert await store.next_due_at() == at(5)
        assert await store.hold(domain="x.example") == 1
        assert await store.next_due_at() is None
        assert await store.unhold(all=True) == 1
        jobs = await store.claim_due(now=at(5), worker="w", lease_until=at(9), limit=1)
        assert claimed_addresses(jobs) == [("m1", "a@x.example")]
        assert store._db is not None
        indexes = await store._db.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
        )
    names = {name for (name,) in indexes}
    assert {"recipients_claim_order", "recipients_held"} <= names
    assert not {"recipients_due", "recipients_claimable"} & names


async def test_write_cancelled_before_its_batch_ran_stores_nothing(
    tmp_path: Path,
) -> None:
    """A write still waiting for the connection when it is cancelled never runs,
    and the write queued behind it is unaffected."""
    outcome: dict[str, bool] = {}

    async def add(mid: str, scope: anyio.CancelScope) -> None:
        with scope:
            await store.add(new_message(mid, "a@x.example"))
            outcome[mid] = True

    async with SQLiteStore(tmp_path / "q.db") as store:
        gone, kept = anyio.CancelScope(), anyio.CancelScope()
        # Hold the connection as a running batch does, so both adds queue up.
        await store._write_lock.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(add, "gone", gone)
            tg.start_soon(add, "kept", kept)
            await anyio.wait_all_tasks_blocked()
            gone.cancel()
            await anyio.wait_all_tasks_blocked()
            store._write_lock.release()
        assert outcome == {"kept": True}
        with pytest.raises(UnknownMessageError):
            await store.status("gone")
        assert len((await store.status("kept")).recipients) == 1


async def test_busy_timeout_bounds_the_wait_for_a_lock(db_path: Path) -> None:
    """With a short busy_timeout, a file locked by another connection makes a
    write fail quickly with StoreError naming the lock; a bad value is refused."""
    async with SQLiteStore(db_path, busy_timeout=0.05) as store:
        assert await pragma(store, "busy_timeout") == 50
        async with aiosqlite.connect(db_path, isolation_level=None) as other:
            await other.execute("BEGIN EXCLUSIVE")
            with anyio.fail_after(10), pytest.raises(StoreError, match="locked"):
                await store.add(new_message("m1"))
            await other.execute("ROLLBACK")
        await store.add(new_message("m1"))
    with pytest.raises(ValueError, match="busy_timeout"):
        SQLiteStore(db_path, busy_timeout=-1)


# -- no str can make a write fail ----------------------------------------------------


@st.composite
def _nasty_status(draw: st.DrawFn) -> RecipientStatus:
    final = draw(st.booleans())
    return RecipientStatus(
        address=draw(any_text(12)) + "@x.example",
        state=RecipientState.FAILED if final else RecipientState.DEFERRED,
        attempts=1,
        code=draw(st.sampled_from([None, 451, 550])),
        enhanced_code=draw(st.one_of(st.none(), any_text(8))),
        message=draw(st.one_of(st.none(), any_text())),
        raw_message=draw(st.one_of(st.none(), st.binary(max_size=40))),
        host=draw(st.one_of(st.none(), any_text())),
        ip=draw(st.one_of(st.none(), any_text())),
        last_attempt_at=T0,
        next_attempt_at=None if final else at(60),
    )


def _check_stored(back: MessageStatus, mail_from: str, status: RecipientStatus) -> None:
    """*back* holds what was written: each str itself, or its display form when it
    is not valid Unicode, and a message's exact bytes."""
    assert back.mail_from == clean(mail_from)
    [r] = back.recipients
    assert r.address == clean(status.address)
    assert r.state is status.state
    for name in ("enhanced_code", "message", "host", "ip"):
        sent = getattr(status, name)
        assert getattr(r, name) == (None if sent is None else clean(sent)), name
    if status.raw_message is not None:
        assert r.raw_message == status.raw_message
    elif status.message is not None:
        assert r.message_bytes == wire_bytes(status.message)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(
    mail_from=any_text(),
    key=st.one_of(st.none(), any_text()),
    status=_nasty_status(),
)
def test_any_text_round_trips_through_sqlite(
    tmp_path_factory: pytest.TempPathFactory,
    mail_from: str,
    key: str | None,
    status: RecipientStatus,
) -> None:
    """Any str in a message or a status (lone surrogates, NUL, ...) is written by a
    real SQLiteStore (and a MemoryStore) without an exception and read back as
    itself, or its display form when it is not valid Unicode; a message's exact
    bytes are kept, and the idempotency key still finds its message."""
    path = tmp_path_factory.mktemp("any") / "q.db"
    message = attrs.evolve(
        new_message("m1", status.address, key=key), mail_from=mail_from
    )
    again = attrs.evolve(message, message_id="m2")
    expected = ("m1", False) if key is not None else ("m2", True)

    async def main() -> None:
        async with MemoryStore() as memory:
            await memory.add(message)
            await memory.record("m1", [status], worker="w")
            _check_stored(await memory.status("m1"), mail_from, status)
            assert await memory.add(again) == expected
        async with SQLiteStore(path, synchronous="OFF") as store:
            await store.add(message)
            await store.record("m1", [status], worker="w")
        async with SQLiteStore(path, synchronous="OFF") as store:
            _check_stored(await store.status("m1"), mail_from, status)
            assert await store.add(again) == expected

    anyio.run(main)


async def schema_with_one_message(raw: aiosqlite.Connection, *, version: int) -> None:
    """The schema as at *version*, with message m1 (its recipients are the
    caller's)."""
    for statements in MIGRATIONS[:version]:
        for statement in statements:
            await raw.execute(statement)
    await raw.execute(
        "INSERT INTO messages VALUES ('m1', 'a@example.org', x'00', 0, ?, NULL)",
        (T0.timestamp(),),
    )


async def test_migration_from_version_four_adds_an_empty_history(
    db_path: Path,
) -> None:
    """A version 4 file (before histories) opens with its rows kept and an empty
    history for every message; an attempt recorded then is kept (the first
    attempt the history sees counts as its first), and a purge takes it along."""
    async with aiosqlite.connect(db_path) as raw:
        await schema_with_one_message(raw, version=4)
        await raw.execute(
            "INSERT INTO recipients (message_id, position, address, domain, state,"
            " attempts, code, message, raw_message, next_attempt_at)"
            " VALUES ('m1', 0, 'a@x.example', 'x.example', 'deferred', 3, 451,"
            " 'later', x'ff', ?)",
            (at(5).timestamp(),),
        )
        await raw.execute("PRAGMA user_version = 4")
        await raw.commit()
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "user_version") == SCHEMA_VERSION
        [r] = (await store.status("m1")).recipients
        assert (r.attempts, r.code, r.raw_message) == (3, 451, b"\xff")
        assert await store.history("m1") == []
        records = [
            AttemptRecord(
                address="a@x.example",
                attempt=n,
                started_at=at(10 * n),
                duration=0.5,
                state=RecipientState.DEFERRED,
                code=451,
                message="later",
            )
            for n in range(4, 8)
        ]
        for record in records:
            status = attrs.evolve(
                r, attempts=record.attempt, next_attempt_at=at(10 * record.attempt + 5)
            )
            await store.record(
                "m1", [status], worker="w", history=[record], history_limit=3
            )
        # Attempt 4 is the first kept: it stays; then the latest two.
        assert [h.attempt for h in await store.history("m1")] == [4, 6, 7]
        final = attrs.evolve(r, state=RecipientState.FAILED, next_attempt_at=None)
        await store.record("m1", [final], worker="w")
        assert await store.purge(finished_before=at(10_000)) == 1
        assert store._db is not None
        rows = await store._db.execute_fetchall("SELECT COUNT(*) FROM history")
    assert list(rows) == [(0,)]


# -- MemoryStore claims from its indexes, never by scanning the queue -------------


async def _claim_cost(waiting: int) -> tuple[int, list[str]]:
    """Heap entries a MemoryStore examines to claim 2 due messages from a queue
    that also holds *waiting* deferred ones, some of them leased, and what it claims."""
    store = MemoryStore()
    async with store:
        for i in range(waiting):
            await store.add(new_message(f"w{i}", submitted_at=T0))
        await store.claim_due(now=T0, worker="a", lease_until=at(30), limit=waiting)
        later = [RecipientStatus(address="rcpt@example.com", next_attempt_at=at(3600))]
        for i in range(waiting):
            if i % 2:  # deferred for an hour
                await store.record(f"w{i}", later, worker="a")
        # The others' leases renewed: still leased, and still not due.
        await store.renew_leases(worker="a", lease_until=at(600))
        # Entries left stale by the records and renewals above are dropped
        # once, by the first claim and next_due_at that meet them (amortized
        # over the writes that made them); measure the claims after that.
        warm = await store.claim_due(
            now=at(60), worker="b", lease_until=at(90), limit=2
        )
        assert warm == []
        await store.next_due_at()
        for i in range(3):
            await store.add(new_message(f"d{i}", submitted_at=at(i)))
        store._examined = 0
        jobs = await store.claim_due(
            now=at(60), worker="b", lease_until=at(90), limit=2
        )
        await store.next_due_at()
        return store._examined, [job.message_id for job in jobs]


async def test_memory_claims_do_not_scan_waiting_messages() -> None:
    """The entries a claim examines do not grow with the messages not due."""
    few, claimed = await _claim_cost(100)
    many, again = await _claim_cost(2_000)
    assert claimed == again == ["d0", "d1"]
    assert few == many < 10  # a handful, whatever the backlog


async def test_migration_from_version_five_adds_lease_tokens(db_path: Path) -> None:
    """A version 5 file (before lease tokens) keeps its leases: a row leased
    then has no token, so a record fenced by a token leaves it alone while one
    without writes it as before; a claim then leases it under a token."""
    async with aiosqlite.connect(db_path) as raw:
        await schema_with_one_message(raw, version=5)
        await raw.execute(
            "INSERT INTO recipients (message_id, position, address, domain, state,"
            " next_attempt_at, lease_owner, lease_until)"
            " VALUES ('m1', 0, 'a@x.example', 'x.example', 'queued', ?, 'old', ?)",
            (T0.timestamp(), at(10).timestamp()),
        )
        await raw.execute("PRAGMA user_version = 5")
        await raw.commit()
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "user_version") == SCHEMA_VERSION
        assert (await store.lease_owners())["old"].lease_until == at(10)
        deferred = attempted("a@x.example", RecipientState.DEFERRED, next_at=at(20))
        lost = await store.record("m1", [deferred], worker="old", lease="guess")
        assert lost == ["a@x.example"]
        assert await store.record("m1", [deferred], worker="old") == []
        assert (await store.status("m1")).recipients == (deferred,)
        jobs = await store.claim_due(
            now=at(20), worker="new", lease_until=at(80), limit=1
        )
        [job] = jobs
        assert job.lease is not None
        done = attempted("a@x.example", RecipientState.DELIVERED, when=at(21))
        assert await store.record("m1", [done], worker="new", lease=job.lease) == []
        assert (await store.status("m1")).recipients == (done,)


async def check_priorities_after_migration(store: Store, *, token: str) -> None:
    """What a store migrated to priorities keeps: m1's lease (owner "old", until
    at(10), token *token*, on b@x.example) and its waiting a@x.example, claimed
    at priority 0 after mail of priority -1 and before mail of priority 1
    submitted later; the old lease is still fenced by its token."""
    assert (await store.lease_owners())["old"].lease_until == at(10)
    await store.add(new_message("urgent", submitted_at=at(1), priority=-1))
    await store.add(new_message("bulk", submitted_at=at(1), priority=1))
    jobs = await store.claim_due(now=at(2), worker="w", lease_until=at(9), limit=3)
    assert [(j.message_id, j.priority) for j in jobs] == [
        ("urgent", -1),
        ("m1", 0),
        ("bulk", 1),
    ]
    assert [r.address for r in jobs[1].recipients] == ["a@x.example"]
    done = attempted("b@x.example", RecipientState.DELIVERED, when=at(3))
    assert await store.record("m1", [done], worker="old", lease=token) == []
    assert (await store.status("m1")).recipients[1] == done


async def test_migration_from_version_six_adds_priorities(db_path: Path) -> None:
    """A version 6 file (before priorities) keeps its rows and leases: every
    row has priority 0 and the claim index is rebuilt; its waiting mail is
    claimed after mail of a lower priority submitted later, before mail of a
    higher one, and a lease it held is still fenced by its token."""
    async with aiosqlite.connect(db_path) as raw:
        await schema_with_one_message(raw, version=6)
        await raw.executemany(
            "INSERT INTO recipients (message_id, position, address, domain, state,"
            " next_attempt_at, lease_owner, lease_until, lease_token)"
            " VALUES ('m1', ?, ?, 'x.example', 'queued', ?, ?, ?, ?)",
            [
                (0, "a@x.example", T0.timestamp(), None, None, None),
                (1, "b@x.example", T0.timestamp(), "old", at(10).timestamp(), "t"),
            ],
        )
        await raw.execute("PRAGMA user_version = 6")
        await raw.commit()
    async with SQLiteStore(db_path) as store:
        assert await pragma(store, "user_version") == SCHEMA_VERSION == 7
        assert store._db is not None
        rows = await store._db.execute_fetchall(
            "SELECT address, priority FROM recipients ORDER BY position"
        )
        assert [tuple(r) for r in rows] == [("a@x.example", 0), ("b@x.example", 0)]
        await check_priorities_after_migration(store, token="t")
        indexes = await store._db.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
        )
    names = {name for (name,) in indexes}
    assert "recipients_claim_order" in names
    assert "recipients_claimable" not in names


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_purge_walks_the_queue_in_steps(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A purge looks at a few messages per transaction: with steps of 3 over 11
    messages (4 steps, the last one short), it deletes exactly the finished old
    ones, in every step, and keeps those still waiting or finished too late."""
    monkeypatch.setattr(_sqlite, "_PURGE_STEP", 3)
    monkeypatch.setattr(_postgres, "_PURGE_STEP", 3)
    async with contextlib.AsyncExitStack() as stack:
        store: Store
        if kind == "postgres":
            cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
            dsn = await stack.enter_async_context(
                fresh_database(cluster, migrated=True)
            )
            store = await stack.enter_async_context(PostgresStore(dsn))
        else:
            store = await stack.enter_async_context(SQLiteStore(tmp_path / "q.db"))
        kept: list[str] = []
        gone: list[str] = []
        for i in range(11):
            mid = f"m{i:02}"
            await store.add(new_message(mid, submitted_at=at(i)))
            if i % 3 == 1:  # still waiting
                kept.append(mid)
                continue
            when = at(100 if i == 8 else 10)  # m08 finished after the cut-off
            await store.record(
                mid,
                [attempted("rcpt@example.com", RecipientState.DELIVERED, when=when)],
                worker="w",
            )
            (kept if i == 8 else gone).append(mid)
        assert await store.purge(finished_before=at(50)) == len(gone) == 6
        for mid in gone:
            with pytest.raises(UnknownMessageError):
                await store.status(mid)
        for mid in kept:
            assert (await store.status(mid)).message_id == mid
        assert await store.purge(finished_before=at(50)) == 0
