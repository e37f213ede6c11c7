"""Many worker processes over one PostgreSQL queue, with real processes (#13).

Workers and submit-only producers are child processes (tests/pg_child.py) on one
database of a throwaway cluster (tests/postgres.py), delivering to an aiosmtpd
server in the test's own loop that counts every recipient of every copy it
accepted (tests/pg_fleet.py). Each test ends with every recipient DELIVERED in
the store and accepted exactly once, or more often only when the store flags it
``possible_duplicate``: through a worker SIGKILLed mid-DATA, PostgreSQL
restarted under the workers, and their connections terminated by an operator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs
import pytest

from mailstrom_async import (
    Deliverer,
    Email,
    PostgresStore,
    RecipientState,
    SubmitHandle,
)
from mailstrom_async._owner import OwnerId
from mailstrom_async.testing._store_common import new_message
from tests.crash import DEADLINE
from tests.pg_child import RECIPIENTS, config_for, message
from tests.pg_fleet import CountingHandler, Fleet, exactly_once, finish, stop
from tests.postgres import fresh_database, running_cluster
from tests.smtpd import FaultHandler

if TYPE_CHECKING:
    from mailstrom_async import MessageStatus
    from tests.postgres import PostgresCluster
    from tests.smtpd import SMTPDServers

pytest.importorskip("asyncpg")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(name="dsn")
async def dsn_fixture(postgres_cluster: PostgresCluster) -> AsyncIterator[str]:
    """A database of the session's cluster, with the schema made already."""
    async with fresh_database(postgres_cluster, migrated=True) as dsn:
        yield dsn


@contextlib.asynccontextmanager
async def fleet(dsn: str, port: int, directory: Path) -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        yield Fleet(stack, dsn, port, directory)


async def statuses_of(dsn: str, ids: list[str]) -> dict[str, MessageStatus]:
    async with PostgresStore(dsn) as store:
        found = await store.statuses(ids)
    assert set(found) == set(ids)
    return found


@contextlib.asynccontextmanager
async def producer(dsn: str, port: int) -> AsyncIterator[Deliverer]:
    """A submit-only Deliverer of the test process on *dsn*."""
    async with Deliverer(
        config_for("parent", port), store=PostgresStore(dsn), mode="submit"
    ) as d:
        yield d


async def submit(d: Deliverer, count: int, tag: str) -> list[SubmitHandle]:
    handles: list[SubmitHandle] = []
    for start in range(0, count, 100):
        batch = [message(tag, n) for n in range(start, min(count, start + 100))]
        handles.extend(await d.submit_many(batch))
    return handles


async def wait_all(handles: list[SubmitHandle]) -> None:
    with anyio.fail_after(3 * DEADLINE):
        for handle in handles:
            await handle


def report(name: str, started: float, recipients: int, duplicates: object) -> None:
    """What the test measured (shown with ``pytest -s``)."""
    took = time.monotonic() - started
    print(f"\n{name}: {recipients} recipients in {took:.1f} s, duplicates {duplicates}")


async def test_workers_and_producers_deliver_each_recipient_once(
    dsn: str, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """3 worker processes and 2 submit-only processes over one queue: every
    recipient delivered once, each message DELIVERED in the store, and each
    producer's ``await handle`` completed by workers in other processes."""
    per_producer = 200
    handler = CountingHandler()
    server = await smtpd.start(handler)
    started = time.monotonic()
    async with fleet(dsn, server.port, tmp_path) as f:
        workers = await f.workers(3)
        producers = [await f.start("submit", f"s{i}", per_producer) for i in range(2)]
        for child in producers:
            await finish(child)
        reports = [
            json.loads(await anyio.Path(c.prefix.with_suffix(".report")).read_text())
            for c in producers
        ]
        for child in workers:
            await stop(child)
    for r in reports:
        assert r == {
            "submitted": per_producer,
            "delivered": per_producer,
            "not_delivered": [],
        }
    ids = [i for c in producers for i in await c.acked()]
    assert len(set(ids)) == 2 * per_producer
    duplicates = exactly_once(handler, await statuses_of(dsn, ids))
    total = 2 * per_producer * RECIPIENTS
    # Every worker took a share; no producer delivered anything.
    by_client = handler.by_client()
    assert set(by_client) == {"w0.test", "w1.test", "w2.test"}
    assert sum(by_client.values()) == total + len(duplicates)
    report("3 workers + 2 producers", started, total, duplicates)


async def test_worker_killed_mid_data_is_covered_by_the_others(
    dsn: str, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A worker SIGKILLed while the server holds its DATA unanswered: the
    recipients it leased are delivered by the other workers, none lost, none
    twice (the killed copies were never accepted)."""
    count = 200
    handler = CountingHandler(stall_client="w0.test")
    server = await smtpd.start(handler)
    started = time.monotonic()
    async with fleet(dsn, server.port, tmp_path) as f, producer(dsn, server.port) as d:
        lease = {"PG_CHILD_LEASE": "2"}
        # w0 alone first, so that it claims work; the others once it is stalled.
        [w0] = await f.workers(1, env=lease)
        handles = await submit(d, count, "kill")
        with anyio.fail_after(DEADLINE):
            await handler.stalled.wait()
        others = [await f.start("worker", f"w{i}", env=lease) for i in (1, 2)]
        owners = await d.store.lease_owners()
        mine = [
            info.recipients
            for owner, info in owners.items()
            if (parsed := OwnerId.parse(owner)) is not None
            and parsed.pid == w0.process.pid
        ]
        await w0.kill()
        assert w0.process.returncode == -signal.SIGKILL
        assert mine
        assert mine[0] >= RECIPIENTS  # it held at least the stalled message
        await wait_all(handles)
        for child in others:
            await stop(child)
    ids = [h.message_id for h in handles]
    duplicates = exactly_once(handler, await statuses_of(dsn, ids))
    assert duplicates == []
    assert handler.stalled_copies
    for message_id in handler.stalled_copies:
        senders = {
            c for (m, _), cs in handler.senders.items() if m == message_id for c in cs
        }
        assert senders <= {"w1.test", "w2.test"}
        assert senders
    report("SIGKILL mid-DATA", started, count * RECIPIENTS, duplicates)


async def test_postgres_restarted_under_the_workers(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """PostgreSQL stopped at once (as by a crash) and started again mid-run:
    the workers reconnect and go on; every recipient delivered, once."""
    count = 300
    handler = CountingHandler()
    server = await smtpd.start(handler)
    with running_cluster(durable=True) as cluster:
        async with fresh_database(cluster, migrated=True) as dsn:
            started = time.monotonic()
            async with fleet(dsn, server.port, tmp_path) as f:
                workers = await f.workers(3)
                async with producer(dsn, server.port) as d:
                    handles = await submit(d, count, "restart")
                    with anyio.fail_after(DEADLINE):
                        await handler.accepted.wait_for(count * RECIPIENTS // 3)
                    await anyio.to_thread.run_sync(cluster.restart)
                    await wait_all(handles)
                for child in workers:
                    await stop(child)
            ids = [h.message_id for h in handles]
            duplicates = exactly_once(handler, await statuses_of(dsn, ids))
    report("PostgreSQL restarted", started, count * RECIPIENTS, duplicates)


async def test_connections_terminated_under_the_workers(
    dsn: str, postgres_cluster: PostgresCluster, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Every connection of the workers to the database terminated (by
    ``pg_terminate_backend`` from an admin connection), three times while they
    work: they reconnect and go on; every recipient delivered, once."""
    import asyncpg

    count = 300
    total = count * RECIPIENTS
    handler = CountingHandler()
    server = await smtpd.start(handler)
    started = time.monotonic()
    database = dsn.rpartition("/")[2].partition("?")[0]
    admin = await asyncpg.connect(postgres_cluster.dsn())
    terminated = 0
    try:
        async with fleet(dsn, server.port, tmp_path) as f:
            workers = await f.workers(3)
            async with producer(dsn, server.port) as d:
                handles = await submit(d, count, "terminate")
                for share in (1, 2, 3):
                    with anyio.fail_after(DEADLINE):
                        await handler.accepted.wait_for(total * share // 4)
                    terminated += len(
                        await admin.fetch(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = $1 AND pid <> pg_backend_pid()",
                            database,
                        )
                    )
                await wait_all(handles)
            for child in workers:
                await stop(child)
    finally:
        await admin.close()
    assert terminated >= 3
    ids = [h.message_id for h in handles]
    duplicates = exactly_once(handler, await statuses_of(dsn, ids))
    report("pg_terminate_backend x3", started, total, duplicates)


# -- the fixes these runs called for, each on its own ---------------------------


class LogSeen(logging.Handler):
    """Sets ``seen`` when a record of ``mailstrom_async.deliverer`` matches."""

    def __init__(self, wanted: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__(logging.DEBUG)
        self.wanted = wanted
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.wanted(record):
            self.seen.set()


@contextlib.contextmanager
def watching_log(wanted: Callable[[logging.LogRecord], bool]) -> Iterator[LogSeen]:
    handler = LogSeen(wanted)
    logger = logging.getLogger("mailstrom_async.deliverer")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def one_email(tag: str) -> Email:
    return Email(
        sender="sender@example.com",
        to=[f"{tag}@example.org"],
        subject=tag,
        text="Hi.\n",
    )


async def test_terminated_pool_connections_fail_no_call(
    dsn: str, postgres_cluster: PostgresCluster
) -> None:
    """Connections terminated under an open pool (``pg_terminate_backend`` while
    they sit idle): the next read and the next write each find a dead
    connection, and are made on a fresh one instead of failing (a read is made
    again; a write's ``BEGIN`` fails before anything is written, and the
    transaction starts on another connection)."""
    import asyncpg

    database = dsn.rpartition("/")[2].partition("?")[0]
    admin = await asyncpg.connect(postgres_cluster.dsn())

    async def terminate() -> int:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()"
            " AND application_name = 'mailstrom_async'",
            database,
        )
        return len(rows)

    terminated = 0
    try:
        async with PostgresStore(dsn, min_size=2, max_size=2) as store:
            await store.add(new_message("m1"))
            for round_ in range(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(2):  # both connections in use, then idle
                        tg.start_soon(store.status, "m1")
                terminated += await terminate()
                assert (await store.status("m1")).message_id == "m1"
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(store.status, "m1")
                terminated += await terminate()
                mid = f"w{round_}"
                assert await store.add(new_message(mid)) == (mid, True)
    finally:
        await admin.close()
    assert terminated >= 20  # every round terminated live pool connections


async def test_await_handle_survives_a_lost_database(
    smtpd: SMTPDServers,
) -> None:
    """A submit-only process awaiting a handle while PostgreSQL is down goes on
    waiting (its status read fails, is logged and made again) and completes
    once the database is back and a worker delivers."""
    server = await smtpd.start()
    config = config_for("parent", server.port)
    with running_cluster(durable=True) as cluster:
        async with (
            fresh_database(cluster, migrated=True) as dsn,
            Deliverer(config, store=PostgresStore(dsn), mode="submit") as web,
        ):
            handle = await web.submit(one_email("web"))
            await anyio.to_thread.run_sync(cluster.stop)
            failed = watching_log(
                lambda r: r.getMessage().startswith(
                    "could not read the status of an awaited message"
                )
            )
            result: list[MessageStatus] = []
            done = anyio.Event()

            async def wait() -> None:
                result.append(await handle)
                done.set()

            with failed as log:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait)
                    with anyio.fail_after(DEADLINE):
                        await log.seen.wait()
                    await anyio.to_thread.run_sync(cluster.start)
                    async with Deliverer(
                        config, store=PostgresStore(dsn), mode="deliver"
                    ):
                        # the worker stays until the web process has it
                        with anyio.fail_after(DEADLINE):
                            await done.wait()
    [status] = result
    assert status.is_delivered
    assert len(server.messages) == 1


async def test_outcome_kept_while_the_database_is_down_within_the_lease(
    smtpd: SMTPDServers,
) -> None:
    """The server accepts a message while PostgreSQL is down for longer than a
    third of the lease: the worker keeps the outcome and writes it once the
    database is back (the lease still holds), so nothing is sent twice."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    config = attrs.evolve(config_for("solo", server.port), lease_duration=9.0)
    with running_cluster(durable=True) as cluster:
        async with fresh_database(cluster, migrated=True) as dsn:
            # Tries 1..8 of the write span 3.55 s, past a third of the lease;
            # before the fix the job gave up at 3 s.
            gave_up = watching_log(
                lambda r: (
                    getattr(r, "try", 0) >= 8
                    or r.getMessage().startswith("could not record the failed job")
                )
            )
            with gave_up as log:
                async with Deliverer(config, store=PostgresStore(dsn)) as d:
                    handle = await d.submit(one_email("solo"))
                    with anyio.fail_after(DEADLINE):
                        await handler.stalled.wait()
                    await anyio.to_thread.run_sync(cluster.stop)
                    handler.stall_at = None
                    handler.release.set()  # 250: the server has it
                    with anyio.fail_after(DEADLINE):
                        await log.seen.wait()
                    await anyio.to_thread.run_sync(cluster.start)
                    with anyio.fail_after(DEADLINE):
                        status = await handle
    [r] = status
    assert r.state is RecipientState.DELIVERED
    assert r.attempts == 1
    assert len(server.messages) == 1
