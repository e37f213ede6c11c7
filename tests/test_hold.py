"""Deliverer.hold() and Deliverer.release() against aiosmtpd on loopback.

Mail is stored by a submit-only Deliverer and delivered by a second one over the
same store, so that what is held is decided before any delivery can start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import (
    Config,
    DelivererClosedError,
    Limits,
    MemoryStore,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    Timeouts,
    UnknownMessageError,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from mailstrom_async._scheduler import Scheduler
from mailstrom_async.testing._store_common import new_message
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers

if TYPE_CHECKING:
    from mailstrom_async._events import EventStream

TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)
# Retries come at once: a held recipient that is tried again shows up at once.
FAST_RETRY = RetryPolicy(initial_delay=0, max_delay=0, jitter=0)

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
QUEUED = RecipientState.QUEUED
FAILED = RecipientState.FAILED


def email(*to: str) -> Email:
    return Email(
        sender="sender@example.com",
        to=list(to) or ["rcpt@example.org"],
        subject="hello",
        text="Hello there.\n",
    )


def relay(server: SMTPDServer, **limits: int) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        timeouts=TIMEOUTS,
        retry=FAST_RETRY,
        limits=Limits(**limits),
    )


async def until_done(stream: EventStream, message_id: str, count: int = 1) -> None:
    """Wait until *count* recipients of the message have become final."""
    with anyio.fail_after(10):
        async for event in stream:
            if event.message_id == message_id and event.recipient.is_final:
                count -= 1
                if not count:
                    return


def sent(server: SMTPDServer) -> list[list[str]]:
    return [m.rcpt_tos for m in server.messages]


@pytest.fixture
async def server(smtpd: SMTPDServers) -> SMTPDServer:
    return await smtpd.start(FaultHandler())


async def test_held_message_waits_while_other_mail_goes(server: SMTPDServer) -> None:
    """A held message is not delivered while mail submitted after it is (one
    connection, oldest first: it would have gone first); released, it is."""
    store = MemoryStore()
    config = relay(server, connections_per_destination=1)
    async with Deliverer(config, store=store, mode="submit") as d:
        held = (await d.submit(email("held@example.org"))).message_id
        other = (await d.submit(email("other@example.org"))).message_id
        assert await d.hold(message_id=held) == 1
        assert await d.hold(message_id=held) == 0
    async with Deliverer(config, store=store) as d:
        stream = d.events()
        await until_done(stream, other)
        [r] = await d.status(held)
        assert (r.state, r.held, r.attempts) == (QUEUED, True, 0)
        assert sent(server) == [["other@example.org"]]
        assert (await d.statistics()).held == 1
        assert await d.retry_now() == 0  # held mail is not made due
        assert await d.release(message_id=held) == 1
        await until_done(stream, held)
        [r] = await d.status(held)
        stats = await d.statistics()
    assert (r.state, r.held) == (DELIVERED, False)
    assert sent(server) == [["other@example.org"], ["held@example.org"]]
    assert stats.jobs_in_memory == 0
    assert stats.held == 0


async def test_hold_domain(server: SMTPDServer) -> None:
    """A domain hold holds that domain's recipients in every message; the other
    recipients of the same message are delivered; release --domain sends the rest."""
    store = MemoryStore()
    config = relay(server)
    async with Deliverer(config, store=store, mode="submit") as d:
        mixed = (await d.submit(email("a@hold.example", "b@ok.example"))).message_id
        only = (await d.submit(email("c@HOLD.example"))).message_id
        assert await d.hold(domain="Hold.Example") == 2
    async with Deliverer(config, store=store) as d:
        stream = d.events()
        await until_done(stream, mixed)
        status = await d.status(mixed)
        assert [(r.state, r.held) for r in status] == [
            (QUEUED, True),
            (DELIVERED, False),
        ]
        assert [r.held for r in await d.status(only)] == [True]
        assert sent(server) == [["b@ok.example"]]
        assert await d.release(domain="hold.example") == 2
        await until_done(stream, only)
        if not (await d.status(mixed)).is_done:
            await until_done(stream, mixed)
    assert sorted(map(sorted, sent(server))) == [
        ["a@hold.example"],
        ["b@ok.example"],
        ["c@HOLD.example"],
    ]


async def test_held_message_can_be_cancelled(server: SMTPDServer) -> None:
    """cancel() of a held message fails its recipients, ends the hold and
    resolves the handle; nothing is sent."""
    async with Deliverer(relay(server), store=MemoryStore(), mode="submit") as d:
        handle = await d.submit(email("a@example.org", "b@example.org"))
        assert await d.hold(message_id=handle.message_id) == 2
        assert await d.cancel(handle.message_id) == 2
        with anyio.fail_after(10):
            status = await handle
        assert await d.release(message_id=handle.message_id) == 0
    assert [(r.state, r.held, r.message) for r in status] == [
        (FAILED, False, "cancelled by operator")
    ] * 2
    assert server.messages == []


async def test_hold_in_flight_keeps_the_transaction(smtpd: SMTPDServers) -> None:
    """A recipient held while in its SMTP transaction finishes it; deferred, it
    stays held and is not retried (with retries due at once) until released."""
    handler = FaultHandler(stall_at="RCPT", rcpt_replies={"a@example.org": "450 busy"})
    server = await smtpd.start(handler)
    async with Deliverer(relay(server), store=MemoryStore()) as d:
        stream = d.events()
        first = await d.submit(email("a@example.org"))
        with anyio.fail_after(10):
            await handler.stalled.wait()
        assert await d.hold(message_id=first.message_id) == 1
        handler.stall_at = None
        handler.release.set()
        with anyio.fail_after(10):
            async for event in stream:
                if event.message_id == first.message_id and event.previous_state:
                    assert event.state is DEFERRED
                    break
        [r] = await d.status(first.message_id)
        assert (r.state, r.held, r.attempts) == (DEFERRED, True, 1)
        handler.rcpt_replies.clear()
        later = await d.submit(email("b@example.org"))
        with anyio.fail_after(10):
            await later
        [r] = await d.status(first.message_id)
        assert (r.state, r.held, r.attempts) == (DEFERRED, True, 1)
        assert await d.release(message_id=first.message_id) == 1
        with anyio.fail_after(10):
            status = await first
    [r] = status
    assert (r.state, r.held, r.attempts) == (DELIVERED, False, 2)
    assert sent(server) == [["b@example.org"], ["a@example.org"]]


async def test_hold_gives_back_jobs_waiting_for_a_connection(
    smtpd: SMTPDServers,
) -> None:
    """A held message whose job waits for this Deliverer's only connection is
    given back unattempted (mail queued behind it goes first), and its lease
    ends, so that once released it is claimed and delivered."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    async with Deliverer(
        relay(server, connections_per_destination=1), store=MemoryStore()
    ) as d:
        first = await d.submit(email("a@example.org"))
        with anyio.fail_after(10):
            await handler.stalled.wait()  # first is in its transaction
        second = await d.submit(email("b@example.org"))
        assert await d.hold(domain="example.org") == 2
        third = await d.submit(email("c@example.org"))
        handler.stall_at = None
        handler.release.set()
        with anyio.fail_after(10):
            assert (await first).is_delivered  # held in flight: delivered
            await third
        [r] = await d.status(second.message_id)
        assert (r.state, r.held, r.attempts) == (QUEUED, True, 0)
        assert sent(server) == [["a@example.org"], ["c@example.org"]]
        assert await d.release(all=True) == 1
        with anyio.fail_after(10):
            assert (await second).is_delivered
        stats = await d.statistics()
    assert sent(server)[2:] == [["b@example.org"]]
    assert stats.jobs_in_memory == 0


async def test_hold_and_release_check_their_arguments() -> None:
    """hold() and release() need a target (ValueError), know no unknown id
    (UnknownMessageError), and work only while the Deliverer is open."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as d:
        with pytest.raises(ValueError, match="message_id, a domain"):
            await d.hold()
        with pytest.raises(ValueError, match="all=True"):
            await d.release()
        with pytest.raises(ValueError, match="all=True"):
            await d.release(all=True, domain="example.org")
        with pytest.raises(UnknownMessageError):
            await d.hold(message_id="nope@example.com")
        with pytest.raises(UnknownMessageError):
            await d.release(message_id="nope@example.com")
        assert await d.release(all=True) == 0
    with pytest.raises(DelivererClosedError):
        await d.hold(domain="example.org")
    with pytest.raises(DelivererClosedError):
        await d.release(all=True)


async def test_no_claim_runs_while_the_scheduler_is_paused() -> None:
    """Inside Scheduler.paused() no claim runs (a hold looks for claimed jobs
    there); due work is claimed and fed once the block ends."""
    fed: list[str] = []
    async with MemoryStore() as store:
        await store.add(new_message("m1"))
        scheduler = Scheduler(
            store=store,
            worker_id="w",
            clock=lambda: datetime(2031, 1, 1, tzinfo=UTC),
            lease_duration=60,
            poll_interval=60,
            room=lambda: 10,
            feed=lambda job: fed.append(job.message_id),
        )
        async with anyio.create_task_group() as tg:
            async with scheduler.paused():
                tg.start_soon(scheduler.run)
                await anyio.wait_all_tasks_blocked()
                assert fed == []
            with anyio.fail_after(10):
                while not fed:
                    await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert fed == ["m1"]
