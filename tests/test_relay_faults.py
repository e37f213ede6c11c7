"""The Deliverer against faulty relays on loopback: every fault ends in a truthful status.

Real servers only: aiosmtpd with a fault-injecting handler, a byte-level scripted
server, and Postfix's smtp-sink. Each test drives the whole engine (store, scheduler,
lanes, SMTP) through ``Deliverer`` and checks what every recipient ends up as.
"""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import aiosmtpd.smtp
import anyio
import pytest
from aiosmtpd.smtp import Envelope, Session

from mailstrom_async import (
    Config,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    Timeouts,
)
from mailstrom_async._deliverer import Deliverer, SubmitHandle
from mailstrom_async._message import Email
from mailstrom_async._store import MemoryStore, SQLiteStore
from tests.smtpd import (  # noqa: F401 - fixtures
    Conversation,
    FaultHandler,
    ScriptServers,
    SinkServers,
    SMTPDServer,
    SMTPDServers,
    script_server_fixture,
    smtp_sink_fixture,
    smtpd_fixture,
)

if TYPE_CHECKING:
    from mailstrom_async._events import EventStream
    from mailstrom_async._models import DeliveryEvent, MessageStatus

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED

#: Retries come quickly: a test that expects a retry gets it in milliseconds.
FAST_RETRY = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5)
#: Retries come much later than any test runs: a DEFERRED recipient stays DEFERRED.
NO_RETRY_SOON = RetryPolicy(initial_delay=600, jitter=0)
TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)
#: Every command deadline short enough that a stalled server is sure to miss it.
QUICK = Timeouts(connect=5, command=0.2, data_start=0.2, data_end=0.2)
#: Shutdown cancels an in-flight transaction almost at once.
GRACE = 0.05
#: Upper bound for anything a test waits on; never reached when the engine works.
DEADLINE = 15

SENDER = "sender@example.com"
RCPT = "rcpt@example.org"


def relay_config(
    port: int,
    *,
    tls: str = "none",
    ca_file: str | None = None,
    username: str | None = None,
    password: str | None = None,
    **overrides: object,
) -> Config:
    """A Config that relays everything through 127.0.0.1:*port*."""
    relay = RelayConfig(
        host="127.0.0.1",
        port=port,
        tls=tls,
        ca_file=ca_file,
        username=username,
        password=password,
    )
    options: dict[str, object] = {
        "helo_name": "client.test",
        "relay": relay,
        "retry": FAST_RETRY,
        "timeouts": TIMEOUTS,
    }
    options.update(overrides)
    return Config(**options)  # type: ignore[arg-type]


def email(*to: str) -> Email:
    return Email(sender=SENDER, to=list(to) or [RCPT], subject="hi", text="Hello.\n")


async def attempted(stream: EventStream, count: int = 1) -> list[DeliveryEvent]:
    """The next *count* events that report an attempt (not a queueing)."""
    events: list[DeliveryEvent] = []
    with anyio.fail_after(DEADLINE):
        async for event in stream:
            if event.previous_state is not None:
                events.append(event)
                if len(events) == count:
                    break
    assert len(events) == count, "the event stream ended early"
    return events


async def done(handle: SubmitHandle) -> MessageStatus:
    """Await *handle*, bounded by the test deadline."""
    with anyio.fail_after(DEADLINE):
        return await handle


async def deferred_once(config: Config, *recipients: str) -> MessageStatus:
    """Submit one message, wait for its first attempt to defer it, return its status.

    Use with ``retry=NO_RETRY_SOON``: a deferred recipient then stays DEFERRED.
    """
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email(*recipients))
        events = await attempted(stream, len(recipients) or 1)
        status = await handle.status()
    assert [e.state for e in events] == [DEFERRED] * len(events)
    return status


def assert_deferred(status: MessageStatus, code: int | None = None) -> None:
    """Every recipient is DEFERRED after exactly one attempt, with a retry time."""
    for r in status:
        assert r.state is DEFERRED, r
        assert r.attempts == 1
        assert r.next_attempt_at is not None
        assert r.last_attempt_at is not None
        assert r.next_attempt_at > r.last_attempt_at
        if code is not None:
            assert r.code == code, r


# -- RCPT --------------------------------------------------------------------------


async def test_rcpt_550_fails_that_recipient_only(smtpd: SMTPDServers) -> None:
    """A 550 to one RCPT fails that recipient; the others are delivered."""
    handler = FaultHandler(rcpt_replies={"bad@example.org": "550 5.1.1 no such user"})
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        handle = await d.submit(
            email("a@example.org", "bad@example.org", "c@example.org")
        )
        status = await done(handle)
    bad = status.recipient("bad@example.org")
    assert bad.state is FAILED
    assert (bad.code, bad.enhanced_code) == (550, "5.1.1")
    assert bad.message == "no such user"
    assert bad.attempts == 1
    for address in ("a@example.org", "c@example.org"):
        ok = status.recipient(address)
        assert ok.state is DELIVERED
        assert ok.attempts == 1
        assert ok.code == 250
    [received] = server.messages
    assert received.rcpt_tos == ["a@example.org", "c@example.org"]


async def test_rcpt_451_defers_then_delivers(smtpd: SMTPDServers) -> None:
    """A 451 to one RCPT defers that recipient; the retry delivers it on attempt 2."""
    handler = FaultHandler(rcpt_replies={"slow@example.org": "451 4.3.0 try later"})
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email("ok@example.org", "slow@example.org"))
        first = {e.address: e.recipient for e in await attempted(stream, 2)}
        handler.rcpt_replies.clear()  # before the retry: it comes after a timer
        status = await done(handle)
    assert first["slow@example.org"].state is DEFERRED
    assert first["slow@example.org"].code == 451
    assert first["ok@example.org"].state is DELIVERED
    slow = status.recipient("slow@example.org")
    assert slow.state is DELIVERED
    assert slow.attempts == 2
    assert slow.code == 250
    assert slow.first_attempt_at == first["slow@example.org"].first_attempt_at
    assert status.recipient("ok@example.org").attempts == 1
    assert [m.rcpt_tos for m in server.messages] == [
        ["ok@example.org"],
        ["slow@example.org"],
    ]


async def test_always_451_fails_after_max_attempts(smtpd: SMTPDServers) -> None:
    """A recipient deferred on every attempt is FAILED 5.4.7 once attempts run out."""
    handler = FaultHandler(rcpt_replies={RCPT: "451 4.3.0 try later"})
    server = await smtpd.start(handler)
    retry = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=2)
    config = relay_config(server.port, retry=retry)
    async with Deliverer(config, store=MemoryStore()) as d:
        status = await done(await d.submit(email(RCPT)))
    [r] = status
    assert r.state is FAILED
    assert r.enhanced_code == "5.4.7"
    assert r.attempts == 2
    assert r.code is None  # given up here; the last reply is quoted
    assert r.message is not None
    assert "2 attempts" in r.message
    assert "last reply: 451 4.3.0 try later" in r.message
    assert r.next_attempt_at is None
    assert server.messages == []


async def test_lifetime_expiry_fails_with_5_4_7(smtpd: SMTPDServers) -> None:
    """A recipient still deferred at the end of the retry lifetime is FAILED 5.4.7."""
    handler = FaultHandler(rcpt_replies={RCPT: "450 4.2.1 mailbox busy"})
    server = await smtpd.start(handler)
    retry = RetryPolicy(initial_delay=0.02, jitter=0, max_delay=0.05, lifetime=0.3)
    config = relay_config(server.port, retry=retry)
    async with Deliverer(config, store=MemoryStore()) as d:
        status = await done(await d.submit(email(RCPT)))
    [r] = status
    assert r.state is FAILED
    assert r.enhanced_code == "5.4.7"
    assert r.code is None
    assert r.is_local
    assert r.message is not None
    assert "lifetime" in r.message
    assert r.attempts >= 2
    assert r.next_attempt_at is None
    assert server.messages == []


class TwoRecipientsHandler(FaultHandler):
    """Accepts at most two recipients per transaction (RFC 5321 §4.5.3.1.10)."""

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= 2:
            return "452 4.5.3 Too many recipients"
        return await super().handle_RCPT(
            server, session, envelope, address, rcpt_options
        )


async def test_too_many_recipients_splits_transactions(smtpd: SMTPDServers) -> None:
    """452 4.5.3 sends the refused recipients at once in new transactions, one attempt."""
    server = await smtpd.start(TwoRecipientsHandler())
    recipients = [f"r{n}@example.org" for n in range(5)]
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        status = await done(await d.submit(email(*recipients)))
    for r in status:
        assert r.state is DELIVERED, r
        assert r.attempts == 1
        assert r.code == 250
    assert [m.rcpt_tos for m in server.messages] == [
        recipients[0:2],
        recipients[2:4],
        recipients[4:5],
    ]
    assert server.connections.value == 1


# -- DATA ----------------------------------------------------------------------


async def test_data_451_defers_every_recipient(smtpd: SMTPDServers) -> None:
    """A 451 after the final dot defers every accepted recipient."""
    handler = FaultHandler(data_reply="451 4.3.0 queue full")
    server = await smtpd.start(handler)
    config = relay_config(server.port, retry=NO_RETRY_SOON)
    status = await deferred_once(config, "a@example.org", "b@example.org")
    assert_deferred(status, 451)
    assert all(r.enhanced_code == "4.3.0" for r in status)
    assert not any(r.possible_duplicate for r in status)
    assert len(server.messages) == 1


async def test_data_554_fails_every_recipient(smtpd: SMTPDServers) -> None:
    """A 554 after the final dot fails every accepted recipient."""
    handler = FaultHandler(data_reply="554 5.6.0 content rejected")
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        status = await done(await d.submit(email("a@example.org", "b@example.org")))
    for r in status:
        assert r.state is FAILED
        assert (r.code, r.enhanced_code) == (554, "5.6.0")
        assert r.message == "content rejected"
        assert r.attempts == 1
    assert len(server.messages) == 1


async def test_drop_after_dot_flags_possible_duplicate(smtpd: SMTPDServers) -> None:
    """A connection lost after the final dot defers with possible_duplicate, kept after delivery."""
    handler = FaultHandler(drop_after_dot=True)
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email(RCPT))
        [first] = await attempted(stream)
        handler.drop_after_dot = False  # before the retry: it comes after a timer
        status = await done(handle)
    assert first.state is DEFERRED
    assert first.recipient.possible_duplicate
    [r] = status
    assert r.state is DELIVERED
    assert r.attempts == 2
    assert r.possible_duplicate
    assert [m.reply for m in server.messages] == [None, "250 2.0.0 OK"]
    assert server.connections.value == 2


async def test_mail_421_defers(smtpd: SMTPDServers) -> None:
    """A 421 to MAIL FROM (the server closes) defers the recipients."""
    handler = FaultHandler(mail_reply="421 4.3.2 shutting down")
    server = await smtpd.start(handler)
    config = relay_config(server.port, retry=NO_RETRY_SOON)
    status = await deferred_once(config, "a@example.org", "b@example.org")
    assert_deferred(status, 421)
    assert server.messages == []
    with anyio.fail_after(DEADLINE):
        await server.disconnections.wait_for(1)  # the server hung up after its 421
    assert server.connections.value == 1


# -- timeouts ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["EHLO", "MAIL", "RCPT", "DATA"])
async def test_stalled_server_times_out(smtpd: SMTPDServers, stage: str) -> None:
    """A server that stops answering at a stage defers with 4.4.2 and is hung up on."""
    handler = FaultHandler(stall_at=stage)
    server = await smtpd.start(handler)
    config = relay_config(server.port, retry=NO_RETRY_SOON, timeouts=QUICK)
    status = await deferred_once(config, RCPT)
    assert_deferred(status)
    [r] = status
    assert r.enhanced_code == "4.4.2"
    assert r.message is not None
    assert "timed out" in r.message
    assert handler.stalled.is_set()
    with anyio.fail_after(DEADLINE):
        await server.disconnections.wait_for(1)
    # Only a stall after the final dot may have left the message with the server.
    assert r.possible_duplicate is (stage == "DATA")
    assert len(server.messages) == (1 if stage == "DATA" else 0)


# -- TLS and AUTH ----------------------------------------------------------------


async def test_starttls_relay(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext, tls_ca_file: str
) -> None:
    """A STARTTLS relay with a trusted certificate delivers, and TLS is recorded."""
    server = await smtpd.start(starttls_context=tls_server_context)
    config = relay_config(server.port, tls="starttls", ca_file=tls_ca_file)
    async with Deliverer(config, store=MemoryStore()) as d:
        status = await done(await d.submit(email(RCPT)))
    [r] = status
    assert r.state is DELIVERED
    assert r.tls is True
    assert r.tls_verified is True
    assert len(server.messages) == 1


async def test_untrusted_certificate_defers(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext
) -> None:
    """A relay certificate that does not verify defers with the TLS reason, sends nothing."""
    server = await smtpd.start(starttls_context=tls_server_context)
    # No ca_file: the system CAs do not know the test CA.
    config = relay_config(server.port, tls="starttls", retry=NO_RETRY_SOON)
    status = await deferred_once(config, RCPT)
    assert_deferred(status)
    [r] = status
    assert r.message is not None
    assert "TLS" in r.message
    assert "certificate" in r.message.lower()
    assert not r.tls
    assert server.messages == []


async def test_implicit_tls_relay(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext, tls_ca_file: str
) -> None:
    """An implicit-TLS relay (port 465 style) delivers, and TLS is recorded."""
    server = await smtpd.start(implicit_tls_context=tls_server_context)
    config = relay_config(server.port, tls="implicit", ca_file=tls_ca_file)
    async with Deliverer(config, store=MemoryStore()) as d:
        status = await done(await d.submit(email(RCPT)))
    [r] = status
    assert r.state is DELIVERED
    assert r.tls is True
    assert r.tls_verified is True
    assert len(server.messages) == 1


async def test_auth_success(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext, tls_ca_file: str
) -> None:
    """Relay credentials are sent over STARTTLS and the message is delivered."""
    handler = FaultHandler(credentials=("user", "s3cret"))
    server = await smtpd.start(handler, starttls_context=tls_server_context)
    config = relay_config(
        server.port,
        tls="starttls",
        ca_file=tls_ca_file,
        username="user",
        password="s3cret",
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        status = await done(await d.submit(email(RCPT)))
    assert status.is_delivered
    assert handler.logins == ["user"]
    assert len(server.messages) == 1


async def test_auth_failure_defers(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext, tls_ca_file: str
) -> None:
    """Refused relay credentials defer the mail (a configuration error loses nothing)."""
    handler = FaultHandler(credentials=("user", "s3cret"))
    server = await smtpd.start(handler, starttls_context=tls_server_context)
    config = relay_config(
        server.port,
        tls="starttls",
        ca_file=tls_ca_file,
        username="user",
        password="wrong",
        retry=NO_RETRY_SOON,
    )
    status = await deferred_once(config, RCPT)
    assert_deferred(status, 535)
    [r] = status
    assert r.message is not None
    assert "wrong" not in r.message
    assert handler.logins == []
    assert server.messages == []


# -- connections and the destination ----------------------------------------------


async def test_connection_is_reused(smtpd: SMTPDServers) -> None:
    """Messages sent one after another share one connection; after a completed
    transaction the next starts without an RSET."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        statuses = [
            await done(await d.submit(email(f"r{n}@example.org"))) for n in range(3)
        ]
        connections = server.connections.value
    assert all(s.is_delivered for s in statuses)
    assert connections == 1
    assert server.handler.rsets == 0
    assert len(server.messages) == 3


async def test_failed_destination_is_backed_off(script_server: ScriptServers) -> None:
    """After a failed connection, new mail for the destination waits for its backoff."""

    async def greet_421(conv: Conversation) -> None:
        await conv.send("421 4.3.2 service not available")

    server = await script_server.start(greet_421)
    retry = RetryPolicy(initial_delay=0.3, jitter=0, max_attempts=1)
    config = relay_config(server.port, retry=retry)
    async with Deliverer(config, store=MemoryStore()) as d:
        first = await done(await d.submit(email("a@example.org")))
        second = await done(await d.submit(email("b@example.org")))
    [a], [b] = first, second
    for r in (a, b):
        assert r.state is FAILED
        assert r.attempts == 1
        assert r.code is None  # out of attempts: decided here
        assert r.enhanced_code == "5.4.7"
        assert r.message is not None
        assert "last reply: 421 4.3.2 service not available" in r.message
    assert a.last_attempt_at is not None
    assert b.last_attempt_at is not None
    # A lower bound the semantics imply: the second waited for the backoff.
    assert b.last_attempt_at - a.last_attempt_at >= timedelta(seconds=0.3)
    assert server.connections.value == 2  # no reconnect while backing off


# -- Postfix smtp-sink -------------------------------------------------------------


async def test_sink_soft_rejects_rcpt(smtp_sink: SinkServers) -> None:
    """smtp-sink -r RCPT: 450 to RCPT defers."""
    sink = await smtp_sink.start("-r", "RCPT")
    status = await deferred_once(relay_config(sink.port, retry=NO_RETRY_SOON), RCPT)
    assert_deferred(status, 450)
    [r] = status
    assert r.enhanced_code == "4.3.0"
    assert not r.possible_duplicate


async def test_sink_hard_rejects_final_dot(smtp_sink: SinkServers) -> None:
    """smtp-sink -f .: a 5xx to the final dot fails the recipients."""
    sink = await smtp_sink.start("-f", ".")
    async with Deliverer(relay_config(sink.port), store=MemoryStore()) as d:
        status = await done(await d.submit(email("a@example.org", "b@example.org")))
    for r in status:
        assert r.state is FAILED
        assert (r.code, r.enhanced_code) == (500, "5.3.0")
        assert r.attempts == 1
        assert not r.possible_duplicate


async def test_sink_drops_after_dot(smtp_sink: SinkServers) -> None:
    """smtp-sink -q .: no reply to the final dot defers with possible_duplicate."""
    sink = await smtp_sink.start("-q", ".")
    status = await deferred_once(relay_config(sink.port, retry=NO_RETRY_SOON), RCPT)
    assert_deferred(status)
    [r] = status
    assert r.possible_duplicate


async def test_sink_421_to_mail(smtp_sink: SinkServers) -> None:
    """smtp-sink -Q MAIL: 421 to MAIL FROM defers."""
    sink = await smtp_sink.start("-Q", "MAIL")
    status = await deferred_once(relay_config(sink.port, retry=NO_RETRY_SOON), RCPT)
    assert_deferred(status, 421)
    [r] = status
    assert not r.possible_duplicate


# -- cancellation at shutdown ------------------------------------------------------


async def stalled_then_restarted(
    smtpd: SMTPDServers, tmp_path: Path, stage: str
) -> tuple[MessageStatus, MessageStatus, SMTPDServer, SMTPDServer]:
    """Leave a Deliverer while its transaction is stalled at *stage*, then restart.

    Returns the status as the store has it after shutdown, the final status after
    a restart against a healthy server, and both servers.
    """
    stalled = await smtpd.start(FaultHandler(stall_at=stage))
    path = tmp_path / "queue.sqlite3"
    config = relay_config(stalled.port, shutdown_grace=GRACE, timeouts=TIMEOUTS)
    async with Deliverer(config, store=SQLiteStore(path)) as d:
        handle = await d.submit(email(RCPT))
        with anyio.fail_after(DEADLINE):
            await stalled.handler.stalled.wait()
    # Leaving the context cancelled the stalled transaction and hung up.
    with anyio.fail_after(DEADLINE):
        await stalled.disconnections.wait_for(1)
    async with SQLiteStore(path) as store:
        after_shutdown = await store.status(handle.message_id)

    healthy = await smtpd.start()
    async with Deliverer(relay_config(healthy.port), store=SQLiteStore(path)) as d:
        final = await done(SubmitHandle(d, handle.message_id, created=False))
    return after_shutdown, final, stalled, healthy


@pytest.mark.parametrize("stage", ["MAIL", "RCPT"])
async def test_shutdown_cancels_before_data(
    smtpd: SMTPDServers, tmp_path: Path, stage: str
) -> None:
    """Shutdown during MAIL/RCPT gives the recipient back; a restart delivers it once."""
    after_shutdown, final, stalled, healthy = await stalled_then_restarted(
        smtpd, tmp_path, stage
    )
    [r] = after_shutdown
    assert r.state is QUEUED
    assert r.attempts == 0
    [r] = final
    assert r.state is DELIVERED
    assert not r.possible_duplicate
    assert stalled.messages == []
    assert len(healthy.messages) == 1


async def test_shutdown_cancels_after_final_dot(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Shutdown while waiting for the reply to the dot re-queues; a restart delivers."""
    after_shutdown, final, stalled, healthy = await stalled_then_restarted(
        smtpd, tmp_path, "DATA"
    )
    [r] = after_shutdown
    assert r.state is QUEUED
    [r] = final
    assert r.state is DELIVERED
    # The stalled server had the whole message: a duplicate, which is acceptable.
    assert len(stalled.messages) == 1
    assert len(healthy.messages) == 1


async def test_shutdown_after_final_dot_flags_possible_duplicate(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A transaction cancelled after the final dot is flagged possible_duplicate."""
    after_shutdown, final, _, _ = await stalled_then_restarted(smtpd, tmp_path, "DATA")
    assert after_shutdown.recipient(RCPT).possible_duplicate
    assert final.recipient(RCPT).possible_duplicate


# -- leases ------------------------------------------------------------------------


async def test_transaction_outliving_its_lease_is_not_sent_twice(
    smtpd: SMTPDServers,
) -> None:
    """A transaction that lasts longer than lease_duration is not claimed and sent again."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    lease = 0.3
    config = relay_config(
        server.port,
        lease_duration=lease,
        poll_interval=0.05,
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=30),
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        handle = await d.submit(email(RCPT))
        with anyio.fail_after(DEADLINE):
            await handler.stalled.wait()
        # A bounded wait for what must not happen: a second connection for the
        # same recipient after the lease has run out several times over.
        with anyio.move_on_after(4 * lease):
            await server.connections.wait_for(2)
        handler.release.set()
        status = await done(handle)
    [r] = status
    assert r.state is DELIVERED
    assert len(server.messages) == 1, "sent twice, and possible_duplicate is unset"
