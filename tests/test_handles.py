"""``await handle`` without polling, against aiosmtpd on loopback.

In a process that delivers, a handle resolves from the statuses this process
has just recorded: one store read per awaited message, whatever the time its
delivery takes. In a submit-only process, one query per ``poll_interval``
reads the statuses of every awaited message, however many handles wait.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from pathlib import Path

import aiosmtpd.smtp
import anyio
import pytest
from aiosmtpd.smtp import Envelope, Session

from mailstrom_async import (
    Config,
    DelivererClosedError,
    MessageStatus,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    Timeouts,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from mailstrom_async._store import MemoryStore, SQLiteStore, Store
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers

NEVER = 3600.0  # a poll_interval no test lives to see
FAST_RETRY = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5)
TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)


def relay_config(server: SMTPDServer, *, poll_interval: float) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        retry=FAST_RETRY,
        timeouts=TIMEOUTS,
        poll_interval=poll_interval,
    )


def email(*to: str) -> Email:
    return Email(
        sender="Sender <sender@example.com>",
        to=list(to) or ["rcpt@example.org"],
        subject="hello",
        text="Hello there.\n",
    )


class DeferTwice(FaultHandler):
    """Answers the first two RCPTs of each address that starts with ``later``
    with 451, then as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.deferred: Counter[str] = Counter()

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.startswith("later") and self.deferred[address] < 2:
            self.deferred[address] += 1
            return "451 4.7.1 greylisted, come back later"
        return await super().handle_RCPT(
            server, session, envelope, address, rcpt_options
        )


class CountingSQLiteStore(SQLiteStore):
    """A real SQLite store that counts the status reads made of it."""

    def __init__(self, path: Path, *, reads: int = 0) -> None:
        super().__init__(path)
        self.calls: Counter[str] = Counter()
        self.polled: list[int] = []  # how many ids each statuses() call asked for
        self._reads = reads
        self.read_enough = anyio.Event()  # set after *reads* status() calls

    async def status(self, message_id: str) -> MessageStatus:
        self.calls["status"] += 1
        status = await super().status(message_id)
        if self.calls["status"] == self._reads:
            self.read_enough.set()
        return status

    async def statuses(self, message_ids: Collection[str]) -> dict[str, MessageStatus]:
        self.calls["statuses"] += 1
        self.polled.append(len(message_ids))
        return await super().statuses(message_ids)


class CountingMemoryStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def status(self, message_id: str) -> MessageStatus:
        self.calls["status"] += 1
        return await super().status(message_id)

    async def statuses(self, message_ids: Collection[str]) -> dict[str, MessageStatus]:
        self.calls["statuses"] += 1
        return await super().statuses(message_ids)


@pytest.fixture(params=["memory", "sqlite"])
def counting_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> CountingMemoryStore | CountingSQLiteStore:
    if request.param == "memory":
        return CountingMemoryStore()
    return CountingSQLiteStore(tmp_path / "queue.sqlite3")


async def test_handles_resolve_from_what_this_process_recorded(
    smtpd: SMTPDServers, counting_store: CountingMemoryStore | CountingSQLiteStore
) -> None:
    """Handles awaited while this process delivers read the store once each and
    resolve when the last outcome is recorded, with the status the store holds:
    with no poll in the test's lifetime, a handle that waited for a read would
    hang here."""
    server = await smtpd.start(DeferTwice())
    store = counting_store
    async with Deliverer(relay_config(server, poll_interval=NEVER), store=store) as d:
        handles = [
            await d.submit(email(f"r{n}@example.org", f"later{n}@example.org"))
            for n in range(20)
        ]
        results: dict[str, MessageStatus] = {}

        async def wait(handle: object) -> None:
            status = await handle  # type: ignore[misc]
            results[status.message_id] = status

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for handle in handles:
                    tg.start_soon(wait, handle)
        reads = store.calls["status"]
        assert reads == len(handles)  # the first read of each, nothing more
        assert store.calls["statuses"] == 0
        for handle in handles:
            status = results[handle.message_id]
            assert status.is_delivered
            assert status == await d.status(handle.message_id)
    # The deferred recipients took three attempts: each handle still read once.
    assert [
        results[h.message_id].recipient(f"later{n}@example.org").attempts
        for n, h in enumerate(handles)
    ] == [3] * len(handles)


async def test_handle_waits_for_the_last_of_several_records(
    smtpd: SMTPDServers, counting_store: CountingMemoryStore | CountingSQLiteStore
) -> None:
    """A message whose recipients end in separate records (one delivered at
    once, one after a retry) resolves only once the last is recorded."""
    server = await smtpd.start(DeferTwice())
    store = counting_store
    async with Deliverer(relay_config(server, poll_interval=NEVER), store=store) as d:
        handle = await d.submit(email("a@example.org", "later@example.org"))
        with anyio.fail_after(30):
            status = await handle
        assert [r.state for r in status] == [RecipientState.DELIVERED] * 2
        assert status.recipient("a@example.org").attempts == 1
        assert status.recipient("later@example.org").attempts == 3
        assert store.calls["status"] == 1
        assert status == await d.status(handle.message_id)


async def test_submit_only_handles_share_one_poll(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """In a submit-only process, a worker elsewhere delivers; the handles learn
    it from one statuses() query per interval, never from reads of their own."""
    server = await smtpd.start()
    path = tmp_path / "queue.sqlite3"
    config = relay_config(server, poll_interval=0.05)
    web_store = CountingSQLiteStore(path, reads=40)
    statuses: list[MessageStatus] = []
    all_done = anyio.Event()

    async def wait(handle: object) -> None:
        statuses.append(await handle)  # type: ignore[misc]
        if len(statuses) == 40:
            all_done.set()

    async with Deliverer(config, store=web_store, mode="submit") as web:
        handles = [await web.submit(email(f"r{n}@example.org")) for n in range(40)]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for handle in handles:
                    tg.start_soon(wait, handle)
                await web_store.read_enough.wait()  # every handle waits
                async with Deliverer(config, store=SQLiteStore(path), mode="deliver"):
                    await all_done.wait()
        assert len(statuses) == len(handles)
        assert all(s.is_delivered for s in statuses)
        assert web_store.calls["status"] == len(handles)
        assert web_store.calls["statuses"] >= 1
        # A poll asked for every handle still waiting, in one query.
        assert max(web_store.polled) == len(handles)


async def test_handle_raises_when_the_deliverer_closes(smtpd: SMTPDServers) -> None:
    """A handle awaited when its Deliverer closes before the message is done
    raises DelivererClosedError instead of waiting for ever."""
    handler = FaultHandler(stall_at="MAIL")
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        timeouts=TIMEOUTS,
        poll_interval=NEVER,
        shutdown_grace=0,
    )
    store: Store = MemoryStore()
    outcome: list[BaseException] = []
    async with anyio.create_task_group() as tg, Deliverer(config, store=store) as d:
        handle = await d.submit(email())

        async def wait() -> None:
            try:
                await handle
            except DelivererClosedError as exc:
                outcome.append(exc)

        tg.start_soon(wait)
        await handler.stalled.wait()
    assert len(outcome) == 1
