"""Connection reuse has limits (issue 11, item 10): by count, by age, and never
for the retry of a recipient that the connection deferred.

Each test drives the whole engine through a ``Deliverer`` relaying to an aiosmtpd
server on loopback that counts the TCP connections it accepts. Time is the
Deliverer's injected clock: tests move it, nothing sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiosmtpd.smtp
import anyio
from aiosmtpd.smtp import Envelope, Session

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    Limits,
    MemoryStore,
    MessageStatus,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    SubmitHandle,
    Timeouts,
)
from tests.smtpd import FaultHandler, SMTPDServers

DELIVERED = RecipientState.DELIVERED
DEADLINE = 10
FAST_RETRY = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5)
TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)
GREY = "grey@example.org"
OK = "ok@example.org"


def relay_config(port: int, **limits: object) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        retry=FAST_RETRY,
        timeouts=TIMEOUTS,
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


def email(*to: str) -> Email:
    return Email(sender="s@example.com", to=list(to), subject="x", text="y\n")


async def done(handle: SubmitHandle) -> MessageStatus:
    with anyio.fail_after(DEADLINE):
        return await handle


@dataclass
class GreylistFirstConnection(FaultHandler):
    """Answers 451 to RCPT of ``GREY`` on the first connection only, as a server
    that reloaded (its new configuration is seen by new connections)."""

    first: aiosmtpd.smtp.SMTP | None = None
    greylisted: int = 0

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.first = self.first or server
        if address == GREY and server is self.first:
            self.greylisted += 1
            return "451 4.7.1 greylisted, try again later"
        return await super().handle_RCPT(
            server, session, envelope, address, rcpt_options
        )


async def test_retry_of_a_deferred_recipient_uses_a_new_connection(
    smtpd: SMTPDServers,
) -> None:
    """A recipient greylisted on a pooled connection is retried on a fresh one
    (and delivered), while its co-recipient went on the first connection."""
    handler = GreylistFirstConnection()
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        status = await done(await d.submit(email(GREY, OK)))
    grey, ok = status.recipient(GREY), status.recipient(OK)
    assert (grey.state, grey.attempts) == (DELIVERED, 2)
    assert (ok.state, ok.attempts) == (DELIVERED, 1)
    assert handler.greylisted == 1
    assert server.connections.value == 2
    assert [m.rcpt_tos for m in server.messages] == [[OK], [GREY]]


async def test_transactions_per_connection_are_capped(smtpd: SMTPDServers) -> None:
    """Five transactions with at most two per connection take three connections."""
    server = await smtpd.start()
    config = relay_config(
        server.port, connection_reuse_count=2, max_recipients_per_transaction=1
    )
    to = [f"u{i}@example.org" for i in range(5)]
    async with Deliverer(config, store=MemoryStore()) as d:
        status = await done(await d.submit(email(*to)))
    assert all(r.state is DELIVERED for r in status)
    assert [m.rcpt_tos for m in server.messages] == [[a] for a in to]
    assert server.connections.value == 3


async def test_messages_per_connection_are_capped(smtpd: SMTPDServers) -> None:
    """With one transaction per connection, each message has its own connection."""
    server = await smtpd.start()
    config = relay_config(server.port, connection_reuse_count=1)
    async with Deliverer(config, store=MemoryStore()) as d:
        for i in range(3):
            status = await done(await d.submit(email(f"u{i}@example.org")))
            assert status.is_delivered
    assert server.connections.value == 3


async def test_connection_older_than_the_reuse_time_is_replaced(
    smtpd: SMTPDServers,
) -> None:
    """A pooled connection is reused within connection_reuse_time, and replaced
    by a new one past it (the Deliverer's clock moves; nothing sleeps)."""
    server = await smtpd.start()
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    config = relay_config(server.port, connection_reuse_time=300.0)
    async with Deliverer(config, store=MemoryStore(), clock=lambda: now[0]) as d:
        await done(await d.submit(email("a@example.org")))
        now[0] += timedelta(seconds=299)
        await done(await d.submit(email("b@example.org")))
        assert server.connections.value == 1  # still young: reused
        now[0] += timedelta(seconds=1)
        await done(await d.submit(email("c@example.org")))
    assert server.connections.value == 2
    assert [m.rcpt_tos for m in server.messages] == [
        ["a@example.org"],
        ["b@example.org"],
        ["c@example.org"],
    ]
