"""PostgreSQL LISTEN/NOTIFY: what one store commits wakes the Deliverers on
other stores of the same database at once, on a real cluster (tests/postgres.py).

Every Deliverer here polls once an hour (``poll_interval=3600``): a handle that
resolves, a follower that sees a change or an idle worker that claims within the
test's deadline was woken by a notification, never by its poll.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import (
    ChangeWatchingStore,
    Deliverer,
    DeliveryEvent,
    MemoryStore,
    MessageStatus,
    RecipientState,
    RecipientStatus,
    RetryPolicy,
    SQLiteStore,
    StoreChange,
)
from mailstrom_async._events import EventBroker
from mailstrom_async._remote_events import RemoteEvents
from mailstrom_async._store import PostgresStore
from mailstrom_async._store._pg_changes import (
    CHANNEL,
    FEED_APPLICATION,
    ChangeFeed,
    decode,
    encode,
)
from mailstrom_async.testing._store_common import new_message
from tests.smtpd import FaultHandler, SMTPDServers
from tests.test_deliverer import email, relay_config

if TYPE_CHECKING:
    from collections.abc import Collection
    from pathlib import Path

    from mailstrom_async import Config
    from tests.smtpd import SMTPDServer

asyncpg = pytest.importorskip("asyncpg")

HOUR = 3600.0


def hourly(server: SMTPDServer) -> Config:
    """Settings that poll once an hour: only a notification wakes in time."""
    return relay_config(server, poll_interval=HOUR)


async def terminate_feeds(dsn: str) -> int:
    """Kill every feed connection to *dsn*'s database (pg_terminate_backend);
    return how many."""
    conn = await asyncpg.connect(dsn)
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            FEED_APPLICATION,
        )
    finally:
        await conn.close()
    return len(killed)


# -- the payloads ---------------------------------------------------------------


def test_payloads_stay_under_the_limit_and_carry_every_id() -> None:
    ids = [f"<{n:05d}.{'x' * 60}@example.com>" for n in range(1_500)]
    payloads = encode("me", True, ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)  # PostgreSQL's limit
    seen: set[str] = set()
    for payload in payloads:
        decoded = decode(payload)
        assert decoded is not None
        origin, change = decoded
        assert origin == "me"
        assert change.due is True
        assert change.message_ids is not None
        seen |= change.message_ids
    assert seen == set(ids)


def test_too_many_ids_become_any_message() -> None:
    [payload] = encode("me", False, [f"m{n}" for n in range(5_000)])
    assert decode(payload) == ("me", StoreChange(due=False, message_ids=None))


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[]",
        json.dumps({"o": "x"}),
        json.dumps({"o": 1, "d": True, "m": None}),
        json.dumps({"o": "x", "d": "yes", "m": None}),
        json.dumps({"o": "x", "d": True, "m": [1, 2]}),
        json.dumps({"o": "x", "d": True, "m": "id"}),
    ],
)
def test_foreign_payloads_are_ignored(payload: str) -> None:
    """Another program may NOTIFY on the channel: its payloads are not ours."""
    assert decode(payload) is None


def test_only_postgres_store_watches_changes(tmp_path: Path) -> None:
    assert isinstance(PostgresStore("postgresql://127.0.0.1/x"), ChangeWatchingStore)
    assert not isinstance(MemoryStore(), ChangeWatchingStore)
    assert not isinstance(SQLiteStore(tmp_path / "q.sqlite3"), ChangeWatchingStore)


# -- the feed -------------------------------------------------------------------


async def test_a_burst_of_changes_goes_out_in_few_payloads(postgres_dsn: str) -> None:
    """Changes published while the feed is busy gather into one statement;
    another store's listener gets every id, and the feed never hears itself."""
    heard: list[StoreChange] = []
    mine: list[StoreChange] = []
    got_all = anyio.Event()
    ids = [f"<{n}@example.com>" for n in range(600)]

    def on_other(change: StoreChange) -> None:
        heard.append(change)
        seen = set().union(*(c.message_ids or () for c in heard))
        if seen >= set(ids):
            got_all.set()

    async with (
        PostgresStore(postgres_dsn) as sender,
        PostgresStore(postgres_dsn) as listener,
        anyio.create_task_group() as tg,
    ):
        await tg.start(listener.watch_changes, on_other)
        await tg.start(sender.watch_changes, mine.append)
        feed: ChangeFeed = sender._feed
        for message_id in ids:  # no await in between: one batch
            assert feed.publish(False, [message_id])
        with anyio.fail_after(20):
            await got_all.wait()
        tg.cancel_scope.cancel()
    # One callback per payload: the 600 changes went out as a few payloads.
    assert len(heard) == len(encode(feed.origin, False, ids)) < len(ids)
    assert all(c.due is False for c in heard)
    assert mine == []


async def test_a_lost_feed_reconnects_and_says_look_at_everything(
    postgres_dsn: str,
) -> None:
    """pg_terminate_backend on the feed's connection: it reconnects, reports
    "anything may have changed" (what was missed is unknown), and hears
    changes again."""
    changes: list[StoreChange] = []
    changed = anyio.Event()

    def on_change(change: StoreChange) -> None:
        changes.append(change)
        changed.set()

    async with (
        PostgresStore(postgres_dsn) as store,
        PostgresStore(postgres_dsn) as other,
        anyio.create_task_group() as tg,
    ):
        await tg.start(store.watch_changes, on_change)
        feed: ChangeFeed = store._feed
        assert await terminate_feeds(postgres_dsn) == 1
        with anyio.fail_after(20):
            await feed.wait_connected(2)
            await changed.wait()
        assert changes == [StoreChange(due=True, message_ids=None)]
        changed = anyio.Event()
        # `other` runs no feed: it notifies on its own connection after commit.
        [(message_id, _)] = await other.add_many([new_message("m0", "a@example.org")])
        with anyio.fail_after(20):
            await changed.wait()
        assert changes[1:] == [StoreChange(due=True, message_ids=frozenset())]
        changed = anyio.Event()
        assert await other.cancel(message_id) == 1
        with anyio.fail_after(20):
            await changed.wait()
        assert changes[2:] == [StoreChange(message_ids=frozenset({message_id}))]
        tg.cancel_scope.cancel()


async def test_notifications_from_another_program_are_ignored(
    postgres_dsn: str,
) -> None:
    changes: list[StoreChange] = []
    changed = anyio.Event()

    def on_change(change: StoreChange) -> None:
        changes.append(change)
        changed.set()

    async with PostgresStore(postgres_dsn) as store, anyio.create_task_group() as tg:
        await tg.start(store.watch_changes, on_change)
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"NOTIFY {CHANNEL}, 'hello'")
            # Then one of ours, to know the first one has been handled.
            await conn.execute(
                "SELECT pg_notify($1, $2)", CHANNEL, encode("x", True, None)[0]
            )
        finally:
            await conn.close()
        with anyio.fail_after(20):
            await changed.wait()
        tg.cancel_scope.cancel()
    assert changes == [StoreChange(due=True, message_ids=None)]


# -- Deliverers on other stores --------------------------------------------------


async def test_an_idle_worker_and_a_waiting_handle_wake_at_once(
    smtpd: SMTPDServers, postgres_dsn: str
) -> None:
    """A submit-only Deliverer and a worker, each on a store of its own, both
    polling hourly: the submission wakes the idle worker, and the worker's
    outcome resolves ``await handle`` and the follower in the other one."""
    server = await smtpd.start()
    config = hourly(server)
    async with (
        Deliverer(config, store=PostgresStore(postgres_dsn), mode="deliver"),
        Deliverer(config, store=PostgresStore(postgres_dsn), mode="submit") as web,
    ):
        handles = [await web.submit(email(f"r{n}@example.org")) for n in range(5)]
        follower = web.follow(handles[0].message_id)
        with anyio.fail_after(20):
            statuses = [await h for h in handles]
            seen = [s.recipients[0].state async for s in follower]
    assert all(s.is_delivered for s in statuses)
    assert seen[-1] is RecipientState.DELIVERED
    assert len(server.messages) == 5


async def test_an_operator_retry_from_a_plain_store_wakes_the_worker(
    smtpd: SMTPDServers, postgres_dsn: str
) -> None:
    """A recipient deferred for an hour; ``retry_now`` through a store that no
    Deliverer runs (as the command line does) notifies after its commit, and
    the idle worker delivers at once."""
    handler = FaultHandler(rcpt_replies={"busy@example.org": "451 4.2.1 busy"})
    server = await smtpd.start(handler)
    retry = RetryPolicy(initial_delay=HOUR, max_delay=HOUR, jitter=0.0)
    config = relay_config(server, poll_interval=HOUR, retry=retry)
    async with Deliverer(config, store=PostgresStore(postgres_dsn)) as worker:
        events = worker.events()
        handle = await worker.submit(email("busy@example.org"))
        async for event in events:
            if event.state is RecipientState.DEFERRED:
                break
        handler.rcpt_replies.clear()
        async with PostgresStore(postgres_dsn) as operator:
            assert await operator.retry_now(
                now=datetime.now(UTC), message_id=handle.message_id
            )
        with anyio.fail_after(20):
            status = await handle
        await events.aclose()
    assert status.is_delivered
    assert status.recipient("busy@example.org").attempts == 2


async def test_events_in_a_submit_only_process_show_the_workers_outcomes(
    smtpd: SMTPDServers, postgres_dsn: str
) -> None:
    """``events()`` in a submit-only Deliverer: its own "queued" events, then
    the worker's outcomes, each with the state it replaced."""
    handler = FaultHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user"})
    server = await smtpd.start(handler)
    config = hourly(server)
    async with (
        Deliverer(config, store=PostgresStore(postgres_dsn), mode="deliver"),
        Deliverer(config, store=PostgresStore(postgres_dsn), mode="submit") as web,
    ):
        events = web.events()
        handle = await web.submit(email("gone@example.org", "ok@example.org"))
        seen = []
        with anyio.fail_after(20):
            async for event in events:
                assert event.message_id == handle.message_id
                seen.append((event.address, event.previous_state, event.state))
                if len(seen) == 4:
                    break
            status = await handle
        await events.aclose()
    queued, failed, delivered = (
        RecipientState.QUEUED,
        RecipientState.FAILED,
        RecipientState.DELIVERED,
    )
    assert seen[:2] == [
        ("gone@example.org", None, queued),
        ("ok@example.org", None, queued),
    ]
    assert sorted(seen[2:]) == [
        ("gone@example.org", queued, failed),
        ("ok@example.org", queued, delivered),
    ]
    assert status.recipient("gone@example.org").code == 550


async def test_remote_events_remember_a_bounded_number_of_messages() -> None:
    """At most *limit* messages are remembered, the oldest forgotten first; a
    message whose recipients are all final is forgotten once reported."""
    broker = EventBroker()
    reads: list[list[str]] = []
    statuses: dict[str, MessageStatus] = {}

    async def read(ids: Collection[str]) -> dict[str, MessageStatus]:
        reads.append(sorted(ids))
        return {i: statuses[i] for i in ids}

    remote = RemoteEvents(broker, read, lambda: datetime.now(UTC), limit=2)
    stream = broker.subscribe()
    for n in range(3):
        broker.publish(
            DeliveryEvent(
                message_id=f"m{n}",
                recipient=RecipientStatus(address="a@example.org"),
                previous_state=None,
                at=datetime.now(UTC),
            )
        )
    done = RecipientStatus(address="a@example.org", state=RecipientState.DELIVERED)
    statuses["m2"] = MessageStatus(
        message_id="m2", recipients=(done,), submitted_at=datetime.now(UTC)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(remote.run)
        remote.stale(["m0", "m2"])  # m0 was forgotten: only m2 is read
        with anyio.fail_after(10):
            events = [await stream.__anext__() for _ in range(4)]
        remote.stale(["m2"])  # done and reported: forgotten too
        remote.stale(None)  # "any": the one left, m1
        statuses["m1"] = MessageStatus(
            message_id="m1", recipients=(done,), submitted_at=datetime.now(UTC)
        )
        with anyio.fail_after(10):
            events.append(await stream.__anext__())
        tg.cancel_scope.cancel()
    assert [(e.message_id, e.previous_state) for e in events[3:]] == [
        ("m2", RecipientState.QUEUED),
        ("m1", RecipientState.QUEUED),
    ]
    assert reads == [["m2"], ["m1"]]
