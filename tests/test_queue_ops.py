"""Deliverer.retry_now() and Deliverer.cancel() against aiosmtpd on loopback."""

from __future__ import annotations

import anyio
import pytest

from mailstrom_async import (
    Config,
    DelivererClosedError,
    Limits,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    Timeouts,
    UnknownMessageError,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from mailstrom_async._store import MemoryStore
from tests.smtpd import FaultHandler, SMTPDServers

# The first retry would come an hour later: only retry_now() makes it sooner.
SLOW_RETRY = RetryPolicy(initial_delay=3600, jitter=0, max_delay=3600)
TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)


def email(*to: str) -> Email:
    return Email(
        sender="sender@example.com",
        to=list(to) or ["rcpt@example.org"],
        subject="hello",
        text="Hello there.\n",
    )


async def test_retry_now_forgives_backoff_and_delivers(smtpd: SMTPDServers) -> None:
    """After a 421 the relay is backed off for an hour; retry_now() makes the
    deferred recipient due and forgets the backoff, so it is delivered at once."""
    handler = FaultHandler(mail_reply="421 4.3.2 try later")
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        retry=SLOW_RETRY,
        timeouts=TIMEOUTS,
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email("busy@example.org"))
        with anyio.fail_after(10):
            async for event in stream:
                if event.state is RecipientState.DEFERRED:
                    break
        handler.mail_reply = None
        assert await d.retry_now(domain="other.example") == 0
        assert (
            await d.retry_now(message_id=handle.message_id, domain="EXAMPLE.org") == 1
        )
        with anyio.fail_after(10):
            status = await handle
        assert await d.retry_now() == 0
    assert status.is_delivered
    assert status.recipients[0].attempts == 2
    assert len(server.messages) == 1


async def test_retry_now_of_unknown_message() -> None:
    """retry_now() of an unknown id raises UnknownMessageError."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as d:
        with pytest.raises(UnknownMessageError):
            await d.retry_now(message_id="nope@example.com")
        assert await d.retry_now() == 0


async def test_cancel_fails_waiting_recipients_and_wakes_waiters() -> None:
    """cancel() fails the unfinished recipients, publishes their "failed" events,
    and resolves the handle."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as d:
        stream = d.events()
        handle = await d.submit(email("a@example.org", "b@example.net"))
        async with anyio.create_task_group() as tg:
            done: list[object] = []

            async def wait() -> None:
                done.append(await handle)

            tg.start_soon(wait)
            assert await d.cancel(handle.message_id) == 2
        assert await d.cancel(handle.message_id) == 0
        with pytest.raises(UnknownMessageError):
            await d.cancel("nope@example.com")
        status = await d.status(handle.message_id)
    assert done == [status]
    assert [r.state for r in status] == [RecipientState.FAILED] * 2
    assert {r.message for r in status} == {"cancelled by operator"}
    events = [(e.address, e.previous_state, e.state) async for e in stream]
    assert events[2:] == [
        ("a@example.org", RecipientState.QUEUED, RecipientState.FAILED),
        ("b@example.net", RecipientState.QUEUED, RecipientState.FAILED),
    ]


async def test_queue_operations_need_an_open_deliverer() -> None:
    """retry_now() and cancel() outside the 'async with' block raise."""
    d = Deliverer(Config(), store=MemoryStore(), mode="submit")
    with pytest.raises(DelivererClosedError):
        await d.retry_now()
    with pytest.raises(DelivererClosedError):
        await d.cancel("x@example.com")


async def test_cancel_drops_jobs_waiting_for_a_connection(smtpd: SMTPDServers) -> None:
    """A cancelled message whose job waits for a connection in this Deliverer
    is never sent; the message in the transaction goes on and is delivered."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        timeouts=TIMEOUTS,
        limits=Limits(connections_per_destination=1),
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        first = await d.submit(email("a@example.org"))
        with anyio.fail_after(10):
            await handler.stalled.wait()  # first is in its transaction
        second = await d.submit(email("b@example.org"))
        assert await d.cancel(second.message_id) == 1
        handler.release.set()
        with anyio.fail_after(10):
            delivered = await first
            cancelled = await second
    assert delivered.is_delivered
    assert [r.message for r in cancelled] == ["cancelled by operator"]
    assert [m.rcpt_tos for m in server.messages] == [["a@example.org"]]
