"""Message priorities end to end (issue 13): submit(priority=) and
submit_many(priorities=) are checked before anything is stored, and a backlog
goes out over one connection lowest priority first, each priority in
submission order. The claim order itself is the store contract's
(mailstrom_async/testing/_priority_contract.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Deliverer,
    Limits,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    Store,
)
from tests.postgres import PostgresCluster, fresh_database
from tests.test_deliverer import email, relay_config

if TYPE_CHECKING:
    from pathlib import Path

    from tests.smtpd import SMTPDServers

# The backlog: (recipient, priority) in submission order.
BACKLOG = [
    ("n0@example.org", 0),
    ("n1@example.org", 0),
    ("u0@example.org", -1),
    ("n2@example.org", 0),
    ("u1@example.org", -1),
    ("n3@example.org", 0),
    ("n4@example.org", 0),
    ("u2@example.org", -1),
    ("n5@example.org", 0),
]

StoreMaker = Callable[[], contextlib.AbstractAsyncContextManager[Callable[[], Store]]]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    """Where a submitting Deliverer and then a delivering one keep the queue:
    a context manager that gives a function making a store of it (a
    MemoryStore keeps what it holds across aclose() and open())."""
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        cluster.migrated_template()  # made here, outside the event loop

        @contextlib.asynccontextmanager
        async def postgres() -> AsyncIterator[Callable[[], Store]]:
            async with fresh_database(cluster, migrated=True) as dsn:
                yield lambda: PostgresStore(dsn)

        return postgres
    memory = MemoryStore()

    @contextlib.asynccontextmanager
    async def local() -> AsyncIterator[Callable[[], Store]]:
        if request.param == "memory":
            yield lambda: memory
        else:
            yield lambda: SQLiteStore(tmp_path / "queue.sqlite3")

        return

    return local


async def test_backlog_goes_out_lowest_priority_first(
    smtpd: SMTPDServers, shared_store: StoreMaker
) -> None:
    """A backlog stored before delivery starts (by a submit-only Deliverer,
    one message at a time and in a batch) arrives over one connection with
    the priority -1 messages first, then the priority 0 ones, each in
    submission order."""
    server = await smtpd.start()
    config = relay_config(
        server, limits=Limits(connections_per_destination=1, max_connections=1)
    )
    async with shared_store() as make:
        async with Deliverer(config, store=make(), mode="submit") as web:
            for address, priority in BACKLOG[:4]:
                await web.submit(email(address), priority=priority)
            rest = BACKLOG[4:]
            await web.submit_many(
                [email(address) for address, _ in rest],
                priorities=[priority for _, priority in rest],
            )
        assert server.connections.value == 0
        async with Deliverer(config, store=make(), mode="deliver"):
            with anyio.fail_after(20):
                await server.handler.received.wait_for(len(BACKLOG))
    arrived = [m.rcpt_tos[0] for m in server.messages]
    urgent = [a for a, p in BACKLOG if p == -1]
    normal = [a for a, p in BACKLOG if p == 0]
    assert arrived == urgent + normal
    assert server.connections.value == 1


@pytest.mark.parametrize("priority", [MIN_PRIORITY - 1, MAX_PRIORITY + 1, True, 1.0])
async def test_submit_refuses_a_bad_priority(
    smtpd: SMTPDServers, priority: object
) -> None:
    """A priority that is not an integer from -1000 to 1000 is a ValueError
    at submit(), and nothing is stored."""
    server = await smtpd.start()
    store = MemoryStore()
    async with Deliverer(relay_config(server), store=store, mode="submit") as d:
        with pytest.raises(ValueError, match=r"priority must be an integer from -1000"):
            await d.submit(email(), priority=priority)  # type: ignore[arg-type]
        assert (await d.statistics()).queued == 0
        for edge in (MIN_PRIORITY, MAX_PRIORITY):
            assert (await d.submit(email(), priority=edge)).created
        assert (await d.statistics()).queued == 2


async def test_submit_many_checks_priorities_before_storing(
    smtpd: SMTPDServers,
) -> None:
    """submit_many() wants one priority per message, each in range; otherwise
    it raises ValueError and stores none of the batch."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=MemoryStore(), mode="submit") as d:
        batch = [email("a@example.org"), email("b@example.org")]
        with pytest.raises(ValueError, match="got 1 priorities for 2 messages"):
            await d.submit_many(batch, priorities=[0])
        with pytest.raises(ValueError, match=r"priorities\[1\] must be an integer"):
            await d.submit_many(batch, priorities=[0, 1001])
        assert (await d.statistics()).queued == 0
        handles = await d.submit_many(batch, priorities=[3, -3])
        assert (await d.statistics()).queued == 2
        assert [h.created for h in handles] == [True, True]
