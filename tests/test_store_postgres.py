"""PostgresStore's own promises, on a throwaway cluster (tests/postgres.py): the
schema version, its errors, concurrent claimers and producers; and deliveries
through it end to end to aiosmtpd. The store contract runs in test_store.py."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from mailstrom_async import (
    Deliverer,
    RecipientState,
    StoreError,
)
from mailstrom_async._store import JobRecord, PostgresStore
from mailstrom_async._store import _postgres_sql as sql
from mailstrom_async._store._postgres import redact
from mailstrom_async.testing._store_common import T0, at, attempted, new_message
from tests.smtpd import FaultHandler, SMTPDServers, free_port
from tests.test_deliverer import email, relay_config
from tests.test_store import check_priorities_after_migration

if TYPE_CHECKING:
    from tests.postgres import PostgresCluster

# Without asyncpg this module skips; TESTS_REQUIRE_POSTGRES=1 makes the store
# contract on PostgreSQL (test_store.py) fail instead.
asyncpg = pytest.importorskip("asyncpg")


async def schema_versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT version FROM {sql.SCHEMA_TABLE}")  # noqa: S608
    finally:
        await conn.close()
    return [row[0] for row in rows]


async def schema_with_one_message(conn: Any, *, version: int) -> None:
    """The schema as *version* left it (its migrations and version row) and
    one message, m1, without recipients."""
    for step in sql.MIGRATIONS[:version]:
        for statement in step:
            await conn.execute(statement)
    await conn.execute(f"CREATE TABLE {sql.SCHEMA_TABLE} (version integer NOT NULL)")
    await conn.execute(f"INSERT INTO {sql.SCHEMA_TABLE} VALUES ($1)", version)  # noqa: S608
    await conn.execute(
        "INSERT INTO messages (id, mail_from, data, smtputf8, submitted_at)"
        " VALUES ('m1', 'a@example.org', '\\x00', false, $1)",
        T0,
    )


async def test_open_creates_the_schema_once(postgres_dsn: str) -> None:
    """open() writes the current version; stores opening at once migrate once,
    and reopening keeps the data."""
    stores = [PostgresStore(postgres_dsn) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.open)
    assert await schema_versions(postgres_dsn) == [sql.SCHEMA_VERSION]
    await stores[0].add(new_message("m1"))
    for store in stores:
        await store.aclose()
    async with PostgresStore(postgres_dsn) as again:
        assert (await again.status("m1")).message_id == "m1"
    assert await schema_versions(postgres_dsn) == [sql.SCHEMA_VERSION]


async def test_newer_schema_is_refused(postgres_dsn: str) -> None:
    """A database written by a newer mailstrom_async is a clear StoreError."""
    async with PostgresStore(postgres_dsn):
        pass
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"UPDATE {sql.SCHEMA_TABLE} SET version = 99")  # noqa: S608
    finally:
        await conn.close()
    store = PostgresStore(postgres_dsn)
    with pytest.raises(StoreError, match=r"schema version 99, newer .*upgrade"):
        await store.open()
    assert "closed" in repr(store)


async def test_version_one_migrates_keeping_its_leases(postgres_dsn: str) -> None:
    """A version 1 database (before lease tokens) keeps its rows and leases: a
    row leased then has no token, so a record fenced by a token leaves it alone
    and one without writes it; a new claim leases it under a token."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            await schema_with_one_message(conn, version=1)
            await conn.execute(
                "INSERT INTO recipients (message_id, position, seq, address, domain,"
                " state, next_attempt_at, lease_owner, lease_until)"
                " SELECT 'm1', 0, seq, 'a@x.example', 'x.example', 'queued', $1,"
                " 'old', $2 FROM messages WHERE id = 'm1'",
                T0,
                at(10),
            )
    finally:
        await conn.close()
    async with PostgresStore(postgres_dsn) as store:
        assert await schema_versions(postgres_dsn) == [sql.SCHEMA_VERSION]
        assert (await store.lease_owners())["old"].lease_until == at(10)
        deferred = attempted("a@x.example", RecipientState.DEFERRED, next_at=at(20))
        lost = await store.record("m1", [deferred], worker="old", lease="guess")
        assert lost == ["a@x.example"]
        assert await store.record("m1", [deferred], worker="old") == []
        assert (await store.status("m1")).recipients == (deferred,)
        [job] = await store.claim_due(
            now=at(20), worker="new", lease_until=at(80), limit=1
        )
        assert job.lease is not None
        done = attempted("a@x.example", RecipientState.DELIVERED, when=at(21))
        assert await store.record("m1", [done], worker="new", lease=job.lease) == []
        assert (await store.status("m1")).recipients == (done,)


async def test_version_two_migrates_to_priorities(postgres_dsn: str) -> None:
    """A version 2 database (before priorities) keeps its rows, leases and
    tokens: every row gets priority 0 and the claim index is rebuilt on
    (priority, next_attempt_at, seq) with its WHERE; its waiting mail is
    claimed after mail of a lower priority submitted later, before mail of a
    higher one, and a lease it held is still fenced by its token."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            await schema_with_one_message(conn, version=2)
            await conn.execute(
                "INSERT INTO recipients (message_id, position, seq, address, domain,"
                " state, next_attempt_at, lease_owner, lease_until, lease_token)"
                " SELECT 'm1', p, seq, a, 'x.example', 'queued', $1, o, u, t"
                " FROM messages, (VALUES (0, 'a@x.example', NULL, NULL, NULL),"
                "   (1, 'b@x.example', 'old', $2::timestamptz, 'tok'))"
                "   AS v (p, a, o, u, t)"
                " WHERE id = 'm1'",
                T0,
                at(10),
            )
    finally:
        await conn.close()
    async with PostgresStore(postgres_dsn) as store:
        assert await schema_versions(postgres_dsn) == [sql.SCHEMA_VERSION] == [3]
        conn = await asyncpg.connect(postgres_dsn)
        try:
            rows = await conn.fetch(
                "SELECT address, priority FROM recipients ORDER BY position"
            )
            index = await conn.fetchval(
                "SELECT pg_get_indexdef('recipients_claimable'::regclass)"
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [("a@x.example", 0), ("b@x.example", 0)]
        assert "(priority, next_attempt_at, seq)" in index
        assert "WHERE ((state = ANY" in index
        assert "(NOT held)" in index
        await check_priorities_after_migration(store, token="tok")


async def test_unreachable_server_is_a_store_error(
    postgres_cluster: PostgresCluster,
) -> None:
    """No server at the address: open() raises StoreError, without the password."""
    port = free_port("127.0.0.1")
    dsn = f"postgresql://u:s3cret@127.0.0.1:{port}/q?sslmode=disable"
    with pytest.raises(StoreError, match="failed") as info:
        await PostgresStore(dsn).open()
    assert "s3cret" not in str(info.value)


async def test_closed_store_and_context_manager(postgres_dsn: str) -> None:
    """``async with`` opens and closes; a closed store refuses use."""
    store = PostgresStore(postgres_dsn)
    assert "closed" in repr(store)
    async with store as entered:
        assert entered is store
        assert "open" in repr(store)
    with pytest.raises(StoreError, match="not open"):
        await store.status("m1")


def test_password_is_never_shown() -> None:
    """repr() and errors name the DSN without its password."""
    assert (
        redact("postgresql://mail:s3cret@db.example:5432/q")
        == "postgresql://mail:***@db.example:5432/q"
    )
    assert (
        redact("postgresql://db/q?user=mail&password=s3cret&sslmode=require")
        == "postgresql://db/q?user=mail&password=***&sslmode=require"
    )
    assert redact("postgresql://mail@db/q") == "postgresql://mail@db/q"
    assert redact("postgresql://[::1/q") == "<unparsable DSN>"
    store = PostgresStore("postgresql://mail:s3cret@db.example/q")
    assert "s3cret" not in repr(store)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dsn": ""}, "non-empty"),
        ({"dsn": "postgresql://x/q", "min_size": 5, "max_size": 2}, "pool sizes"),
        ({"dsn": "postgresql://x/q", "max_size": 0, "min_size": 0}, "pool sizes"),
        ({"dsn": "postgresql://x/q", "command_timeout": 0}, "command_timeout"),
        (
            {"dsn": "postgresql://x/q", "command_timeout": float("nan")},
            "command_timeout",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    """Bad settings raise ValueError before anything connects."""
    with pytest.raises(ValueError, match=match):
        PostgresStore(**kwargs)  # type: ignore[arg-type]


def test_missing_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without asyncpg, making a store says which extra to install."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(
        StoreError, match=r"'postgres' extra.*mailstrom-async\[postgres\]"
    ):
        PostgresStore("postgresql://x/q")


async def test_concurrent_claims_never_share_a_recipient(postgres_dsn: str) -> None:
    """Four stores (four pools) claiming at once take every due recipient once:
    FOR UPDATE SKIP LOCKED, no claim waits for another."""
    async with PostgresStore(postgres_dsn) as setup:
        await setup.add_many(
            [
                new_message(f"m{i}", f"a{i}@x.example", f"b{i}@x.example")
                for i in range(200)
            ]
        )
    claimed: dict[str, list[tuple[str, str]]] = {}

    async def worker(name: str) -> None:
        async with PostgresStore(postgres_dsn, max_size=2) as store:
            mine = claimed.setdefault(name, [])
            while True:
                jobs = await store.claim_due(
                    now=T0, worker=name, lease_until=at(60), limit=7
                )
                if not jobs:
                    return
                mine.extend(
                    (j.message_id, r.address) for j in jobs for r in j.recipients
                )

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(worker, f"w{n}")
    every = [pair for pairs in claimed.values() for pair in pairs]
    assert len(every) == 400
    assert len(set(every)) == 400


async def test_batches_in_opposite_orders_never_deadlock(postgres_dsn: str) -> None:
    """Two stores recording batches of the same messages at once, one in the
    opposite order of the other, both commit every batch: record_many() locks
    the rows in one order (message id, position), whatever the records' order,
    so neither waits for the other in a circle (which PostgreSQL would break by
    failing one with a deadlock error)."""
    ids = [f"m{i:03}" for i in range(100)]
    rcpts = [f"r{i}@x.example" for i in range(20)]  # rows enough to overlap
    async with PostgresStore(postgres_dsn) as setup:
        await setup.add_many([new_message(mid, *rcpts) for mid in ids])
    done: list[int] = []

    async def recorder(order: list[str], n: int) -> None:
        async with PostgresStore(postgres_dsn, max_size=1) as store:
            for round_ in range(20):
                statuses = tuple(
                    attempted(
                        rcpt,
                        RecipientState.DEFERRED,
                        when=at(round_),
                        next_at=at(60 + round_),
                    )
                    for rcpt in rcpts
                )
                records = [
                    JobRecord(message_id=mid, statuses=statuses) for mid in order
                ]
                assert await store.record_many(records, worker=f"w{n}") == [
                    [] for _ in order
                ]
                done.append(n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(recorder, ids, 0)
        tg.start_soon(recorder, ids[::-1], 1)
    assert sorted(done) == [0] * 20 + [1] * 20


async def test_claim_finds_more_messages_past_a_large_one(postgres_dsn: str) -> None:
    """A message with more due rows than one scan looks at is claimed whole, and
    the claim goes on to the next messages up to its limit."""
    async with PostgresStore(postgres_dsn) as store:
        big = [f"r{i}@x.example" for i in range(300)]
        await store.add(new_message("big", *big))
        await store.add(new_message("small1", submitted_at=at(1)))
        await store.add(new_message("small2", submitted_at=at(2)))
        jobs = await store.claim_due(now=at(5), worker="w", lease_until=at(60), limit=2)
        assert [j.message_id for j in jobs] == ["big", "small1"]
        assert [r.address for r in jobs[0].recipients] == big


async def test_claim_keeps_what_it_leased_when_going_on_fails(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim that must look again (its first look found fewer messages than
    its limit) commits each look on its own: when a later look fails, the rows
    the first leased are returned as jobs (not left leased to nobody for a
    whole lease) and the shortfall is logged; the rows the failed look would
    have leased stay claimable."""
    async with PostgresStore(postgres_dsn) as store:
        await store.add(new_message("big", "a@x.example", "b@x.example", "c@x.example"))
        await store.add(new_message("next", submitted_at=at(1)))
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(
                """CREATE FUNCTION refuse_next() RETURNS trigger AS $$
                BEGIN
                  IF NEW.message_id = 'next' AND NEW.lease_owner IS NOT NULL THEN
                    RAISE EXCEPTION 'refused by the test';
                  END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql"""
            )
            await conn.execute(
                """CREATE TRIGGER refuse_next BEFORE UPDATE ON recipients
                FOR EACH ROW EXECUTE FUNCTION refuse_next()"""
            )
            with caplog.at_level("WARNING", logger="mailstrom_async.store"):
                jobs = await store.claim_due(
                    now=at(5), worker="w", lease_until=at(60), limit=2
                )
            await conn.execute("DROP TRIGGER refuse_next ON recipients")
        finally:
            await conn.close()
        assert [j.message_id for j in jobs] == ["big"]
        assert len(jobs[0].recipients) == 3
        assert any(r.message == "claim stopped short" for r in caplog.records)
        assert (await store.lease_owners())["w"].recipients == 3
        again = await store.claim_due(
            now=at(5), worker="w2", lease_until=at(60), limit=2
        )
        assert [j.message_id for j in again] == ["next"]


async def test_claim_fails_whole_when_its_first_look_fails(
    postgres_dsn: str,
) -> None:
    """A claim whose only look fails leased nothing: StoreError, and the rows
    stay claimable."""
    async with PostgresStore(postgres_dsn) as store:
        await store.add(new_message("m1"))
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute("ALTER TABLE recipients ADD CHECK (lease_owner <> 'w')")
            with pytest.raises(StoreError, match="check constraint"):
                await store.claim_due(
                    now=at(5), worker="w", lease_until=at(60), limit=2
                )
        finally:
            await conn.close()
        assert await store.lease_owners() == {}
        jobs = await store.claim_due(
            now=at(5), worker="w2", lease_until=at(60), limit=2
        )
        assert [j.message_id for j in jobs] == ["m1"]


async def test_same_idempotency_key_from_two_producers(postgres_dsn: str) -> None:
    """Two producers adding one key at once store one message; both get its id."""
    async with PostgresStore(postgres_dsn) as one, PostgresStore(postgres_dsn) as two:
        for round_ in range(10):
            results: list[tuple[str, bool]] = []

            async def add(
                store: PostgresStore,
                mid: str,
                key: str = f"k{round_}",
                results: list[tuple[str, bool]] = results,
            ) -> None:
                results.append(await store.add(new_message(mid, key=key)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(add, one, f"a{round_}")
                tg.start_soon(add, two, f"b{round_}")
            assert sorted(created for _, created in results) == [False, True]
            assert len({mid for mid, _ in results}) == 1


async def test_deliverer_on_postgres_defers_then_delivers(
    smtpd: SMTPDServers, postgres_dsn: str
) -> None:
    """A Deliverer on PostgresStore delivers to aiosmtpd, retrying a deferral."""
    handler = FaultHandler(rcpt_replies={"busy@example.org": "451 4.2.1 busy"})
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server), store=PostgresStore(postgres_dsn)) as d:
        events = d.events()
        handle = await d.submit(email("busy@example.org", "ok@example.org"))
        async for event in events:
            if event.state is RecipientState.DEFERRED:
                assert event.address == "busy@example.org"
                handler.rcpt_replies.clear()
            if event.address == "busy@example.org" and event.state.is_final:
                break
        await events.aclose()
        with anyio.fail_after(10):
            status = await handle
    assert status.is_delivered
    busy = status.recipient("busy@example.org")
    assert busy.attempts == 2
    assert busy.code == 250
    assert status.recipient("ok@example.org").attempts == 1
    delivered = sorted(r for m in server.messages for r in m.rcpt_tos)
    assert delivered == ["busy@example.org", "ok@example.org"]
    async with PostgresStore(postgres_dsn) as store:
        history = await store.history(handle.message_id)
    assert [(h.address, h.state) for h in history if h.address.startswith("busy")] == [
        ("busy@example.org", RecipientState.DEFERRED),
        ("busy@example.org", RecipientState.DELIVERED),
    ]


async def test_submit_only_and_worker_share_a_database(
    smtpd: SMTPDServers, postgres_dsn: str
) -> None:
    """A submit-only Deliverer and a delivering one on one database: the
    worker delivers, and ``await handle`` in the submit-only one completes."""
    server = await smtpd.start()
    config = relay_config(server, poll_interval=0.05)
    async with (
        Deliverer(config, store=PostgresStore(postgres_dsn), mode="deliver"),
        Deliverer(config, store=PostgresStore(postgres_dsn), mode="submit") as web,
    ):
        handles = [await web.submit(email(f"r{n}@example.org")) for n in range(3)]
        with anyio.fail_after(10):
            statuses = [await h for h in handles]
    assert all(s.is_delivered for s in statuses)
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "r0@example.org",
        "r1@example.org",
        "r2@example.org",
    ]
