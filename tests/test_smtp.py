"""SMTPConnection against real servers on loopback: aiosmtpd, a byte-level server, smtp-sink."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio
import pytest
import trustme

from mailstrom_async._config import Config, RelayConfig, Timeouts
from mailstrom_async._exceptions import (
    ConfigError,
    ConnectError,
    DeliveryTimeoutError,
    ProtocolError,
    TemporaryRejectionError,
    TLSRequiredError,
)
from mailstrom_async._models import RecipientState
from mailstrom_async._smtp import (
    ConnectionSettings,
    SMTPConnection,
    TLSMemory,
    TLSMode,
    _dot_stuffed,
    _encode_body,
    make_ssl_context,
    mx_settings,
    relay_settings,
)
from tests.smtpd import (  # noqa: F401 - fixtures
    Conversation,
    FaultHandler,
    ScriptServers,
    SinkServers,
    SMTPDServers,
    free_port,
    mini_esmtp,
    running_script_server,
    script_server_fixture,
    smtp_sink_fixture,
    smtpd_fixture,
)

if TYPE_CHECKING:
    from mailstrom_async._classify import RecipientOutcome

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED

SLOW = Timeouts(connect=10, command=10, data_start=10, data_end=10)
QUICK = 0.1  # a deadline that a stalled server is sure to miss
FROM = "sender@example.test"
MESSAGE = b"From: sender@example.test\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n"


@pytest.fixture(scope="module")
def client_context(tls_ca_file: str) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA."""
    return make_ssl_context(True, tls_ca_file)


@pytest.fixture(scope="module")
def untrusted_server_context() -> ssl.SSLContext:
    """A server certificate for 127.0.0.1 from a CA nobody trusts."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


def settings(
    port: int,
    *,
    tls: str = "none",
    ssl_context: ssl.SSLContext | None = None,
    timeouts: Timeouts = SLOW,
    host: str = "127.0.0.1",
    username: str | None = None,
    password: str | None = None,
    server_hostname: str | None = None,
) -> ConnectionSettings:
    return ConnectionSettings(
        host=host,
        port=port,
        tls=tls,
        ssl_context=ssl_context,
        helo_name="client.example.test",
        timeouts=timeouts,
        username=username,
        password=password,
        server_hostname=server_hostname,
    )


def states(outcomes: list[RecipientOutcome]) -> list[tuple[str, RecipientState]]:
    return [(o.address, o.state) for o in outcomes]


@pytest.fixture
def caplog_smtp(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="mailstrom_async.smtp"):
        yield caplog


# -- transactions ----------------------------------------------------------------


async def test_delivered(smtpd: SMTPDServers) -> None:
    """A plain session delivers to every recipient and the server gets the bytes."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    try:
        outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
    finally:
        await conn.aclose()
    assert states(outcomes) == [("a@x.test", DELIVERED), ("b@x.test", DELIVERED)]
    assert outcomes[0].reply is not None
    assert (outcomes[0].reply.code, outcomes[0].reply.enhanced_code) == (250, "2.0.0")
    await server.handler.received.wait_for(1)
    (msg,) = server.messages
    assert (msg.mail_from, msg.rcpt_tos) == (FROM, ["a@x.test", "b@x.test"])
    assert msg.content == MESSAGE
    assert f"SIZE={len(MESSAGE)}" in msg.mail_options
    assert (conn.host, conn.ip, conn.port) == ("127.0.0.1", "127.0.0.1", server.port)
    assert (conn.tls, conn.tls_verified, conn.is_usable) == (False, False, False)
    assert conn.supports_smtputf8
    assert not conn.supports_pipelining
    await server.disconnections.wait_for(1)
    await conn.aclose()  # idempotent


async def test_one_recipient_rejected_others_delivered(smtpd: SMTPDServers) -> None:
    """RCPT 550 fails only that recipient; the others are delivered."""
    handler = FaultHandler(rcpt_replies={"b@X.TEST": "550 5.1.1 no such user"})
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test", "c@x.test"], MESSAGE)
    await conn.aclose()
    assert states(outcomes) == [
        ("a@x.test", DELIVERED),
        ("b@x.test", FAILED),
        ("c@x.test", DELIVERED),
    ]
    assert outcomes[1].reply is not None
    assert outcomes[1].reply.enhanced_code == "5.1.1"
    assert server.messages[0].rcpt_tos == ["a@x.test", "c@x.test"]


async def test_rcpt_too_many_recipients_retries_now(smtpd: SMTPDServers) -> None:
    """RCPT 452 4.5.3 defers that recipient with retry_now."""
    handler = FaultHandler(rcpt_replies={"b@x.test": "452 4.5.3 Too many recipients"})
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
    await conn.aclose()
    assert states(outcomes) == [("a@x.test", DELIVERED), ("b@x.test", DEFERRED)]
    assert [o.retry_now for o in outcomes] == [False, True]


async def test_all_recipients_rejected_sends_no_data(smtpd: SMTPDServers) -> None:
    """With no recipient accepted no DATA is sent, and the next send starts clean."""
    handler = FaultHandler(
        rcpt_replies={"a@x.test": "450 4.2.1 busy", "b@x.test": "550 5.1.1 unknown"}
    )
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", DEFERRED), ("b@x.test", FAILED)]
    assert server.messages == []
    assert states(await conn.send(FROM, ["c@x.test"], MESSAGE)) == [
        ("c@x.test", DELIVERED)
    ]
    await conn.aclose()
    assert handler.rsets == 1


@pytest.mark.parametrize(
    ("reply", "state"), [("451 4.3.0 later", DEFERRED), ("554 5.6.0 no", FAILED)]
)
async def test_data_reply_decides_for_all(
    smtpd: SMTPDServers, reply: str, state: RecipientState
) -> None:
    """A 4xx/5xx after the final dot defers/fails every accepted recipient."""
    server = await smtpd.start(FaultHandler(data_reply=reply))
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", state), ("b@x.test", state)]
    assert not any(o.possible_duplicate for o in outcomes)
    assert conn.is_usable
    await conn.aclose()


@pytest.mark.parametrize(
    ("reply", "state"), [("451 4.3.2 later", DEFERRED), ("550 5.7.1 no", FAILED)]
)
async def test_mail_from_rejected(
    smtpd: SMTPDServers, reply: str, state: RecipientState
) -> None:
    """MAIL FROM 4xx/5xx decides for every recipient; the connection stays usable."""
    handler = FaultHandler(mail_reply=reply)
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", state), ("b@x.test", state)]
    assert conn.is_usable
    handler.mail_reply = None
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()


async def test_connection_reused_for_two_transactions(smtpd: SMTPDServers) -> None:
    """A second send on the same connection needs no RSET after a completed
    transaction (RFC 5321 §4.1.1.4), and both messages arrive."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    first = await conn.send(FROM, ["a@x.test"], b"Subject: 1\r\n\r\none\r\n")
    second = await conn.send(FROM, ["b@x.test"], b"Subject: 2\r\n\r\ntwo\r\n")
    await conn.aclose()
    assert states(first + second) == [("a@x.test", DELIVERED), ("b@x.test", DELIVERED)]
    assert [m.rcpt_tos for m in server.messages] == [["a@x.test"], ["b@x.test"]]
    assert server.connections.value == 1
    assert server.handler.rsets == 0
    assert conn.transactions == 2


async def test_empty_recipient_list_sends_nothing(smtpd: SMTPDServers) -> None:
    """send() with no recipients returns no outcomes and starts no transaction."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    assert await conn.send(FROM, [], MESSAGE) == []
    assert conn.transactions == 0
    await conn.aclose()


async def test_unsendable_addresses_fail_without_being_sent(
    smtpd: SMTPDServers,
) -> None:
    """Addresses that cannot go on a command line fail with 553 and are never sent."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b c@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", DELIVERED), ("b c@x.test", FAILED)]
    assert outcomes[1].reply is not None
    assert outcomes[1].reply.enhanced_code == "5.1.3"
    bad_sender = await conn.send("x<y@x.test", ["a@x.test"], MESSAGE)
    assert states(bad_sender) == [("a@x.test", FAILED)]
    await conn.aclose()
    assert len(server.messages) == 1


async def test_send_on_closed_connection_raises(smtpd: SMTPDServers) -> None:
    """A closed connection refuses to send with a transient error."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    conn.close_now()
    with pytest.raises(ProtocolError, match="closed"):
        await conn.send(FROM, ["a@x.test"], MESSAGE)


# -- SMTPUTF8 -----------------------------------------------------------------------


async def test_smtputf8_message_to_server_without_it_fails(smtpd: SMTPDServers) -> None:
    """An SMTPUTF8 message fails 5.6.7 for every recipient when the server lacks it."""
    server = await smtpd.start(smtputf8=False)
    conn = await SMTPConnection.open(settings(server.port))
    assert not conn.supports_smtputf8
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE, smtputf8=True)
    await conn.aclose()
    assert states(outcomes) == [("a@x.test", FAILED), ("b@x.test", FAILED)]
    assert outcomes[0].reply is not None
    assert (outcomes[0].reply.code, outcomes[0].reply.enhanced_code) == (550, "5.6.7")
    assert server.messages == []
    assert conn.transactions == 0


async def test_non_ascii_address_uses_smtputf8(smtpd: SMTPDServers) -> None:
    """A non-ASCII address goes out with the SMTPUTF8 and BODY=8BITMIME parameters."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    body = "Subject: ü\r\n\r\nGrüße\r\n".encode()
    outcomes = await conn.send(FROM, ["jürgen@bücher.test"], body)
    await conn.aclose()
    assert states(outcomes) == [("jürgen@bücher.test", DELIVERED)]
    (msg,) = server.messages
    assert msg.rcpt_tos == ["jürgen@bücher.test"]
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(msg.mail_options)
    assert msg.content == body


# -- faults and timeouts ----------------------------------------------------------


async def test_disconnect_after_dot_is_possible_duplicate(smtpd: SMTPDServers) -> None:
    """A connection lost after the final dot defers with possible_duplicate."""
    server = await smtpd.start(FaultHandler(drop_after_dot=True))
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", DEFERRED), ("b@x.test", DEFERRED)]
    assert all(o.possible_duplicate for o in outcomes)
    assert not conn.is_usable
    assert len(server.messages) == 1


async def test_timeout_after_dot_is_possible_duplicate(smtpd: SMTPDServers) -> None:
    """No reply to the final dot within data_end defers with possible_duplicate."""
    server = await smtpd.start(FaultHandler(stall_at="DATA"))
    timeouts = Timeouts(connect=10, command=10, data_start=10, data_end=QUICK)
    conn = await SMTPConnection.open(settings(server.port, timeouts=timeouts))
    outcomes = await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", DEFERRED)]
    assert outcomes[0].possible_duplicate
    assert outcomes[0].reply is not None
    assert outcomes[0].reply.enhanced_code == "4.4.2"
    assert not conn.is_usable
    await server.disconnections.wait_for(1)


async def test_timeout_waiting_for_354_is_not_a_duplicate(
    script_server: ScriptServers,
) -> None:
    """No reply to DATA within data_start defers without possible_duplicate."""

    async def script(conv: Conversation) -> None:
        await mini_esmtp(conv, stall_at="DATA")

    server = await script_server.start(script)
    timeouts = Timeouts(connect=10, command=10, data_start=QUICK, data_end=10)
    conn = await SMTPConnection.open(settings(server.port, timeouts=timeouts))
    outcomes = await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", DEFERRED)]
    assert not outcomes[0].possible_duplicate
    assert not conn.is_usable
    await server.disconnections.wait_for(1)


async def test_timeout_at_rcpt_raises_and_closes(smtpd: SMTPDServers) -> None:
    """No reply to RCPT raises DeliveryTimeoutError and closes the connection."""
    server = await smtpd.start(FaultHandler(stall_at="RCPT"))
    timeouts = Timeouts(connect=10, command=QUICK)
    conn = await SMTPConnection.open(settings(server.port, timeouts=timeouts))
    with pytest.raises(DeliveryTimeoutError, match="RCPT"):
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert not conn.is_usable
    await server.disconnections.wait_for(1)


async def test_timeout_at_greeting(script_server: ScriptServers) -> None:
    """A server that never greets times out the connect, and the socket is closed."""
    server = await script_server.start(Conversation.wait_closed)
    with pytest.raises(DeliveryTimeoutError):
        await SMTPConnection.open(
            settings(server.port, timeouts=Timeouts(connect=QUICK))
        )
    await server.disconnections.wait_for(1)


async def test_timeout_at_ehlo(smtpd: SMTPDServers) -> None:
    """No reply to EHLO within the command timeout fails the open."""
    server = await smtpd.start(FaultHandler(stall_at="EHLO"))
    with pytest.raises(DeliveryTimeoutError, match="EHLO"):
        await SMTPConnection.open(
            settings(server.port, timeouts=Timeouts(command=QUICK))
        )
    await server.disconnections.wait_for(1)


async def test_cancelled_send_closes_connection(smtpd: SMTPDServers) -> None:
    """Cancelling a send mid-transaction closes the connection without QUIT."""
    handler = FaultHandler(stall_at="RCPT")
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    with anyio.move_on_after(QUICK) as scope:
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert scope.cancelled_caught
    assert handler.stalled.is_set()
    assert not conn.is_usable
    assert not conn.final_dot_unconfirmed
    await server.disconnections.wait_for(1)
    await conn.aclose()


async def test_cancelled_after_dot_is_flagged(smtpd: SMTPDServers) -> None:
    """A send cancelled while waiting for the reply to the final dot says so."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    with anyio.move_on_after(QUICK):
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert handler.stalled.is_set()
    assert conn.final_dot_unconfirmed
    assert not conn.is_usable
    await server.disconnections.wait_for(1)


async def test_cancelled_open_closes_connection(smtpd: SMTPDServers) -> None:
    """Cancelling an open mid-handshake closes the socket."""
    server = await smtpd.start(FaultHandler(stall_at="EHLO"))
    with anyio.move_on_after(QUICK) as scope:
        await SMTPConnection.open(settings(server.port))
    assert scope.cancelled_caught
    await server.disconnections.wait_for(1)


@pytest.mark.parametrize("stage", ["MAIL", "RCPT"])
async def test_421_before_data_raises(smtpd: SMTPDServers, stage: str) -> None:
    """A 421 to MAIL or RCPT raises TemporaryRejectionError and closes the connection."""
    reply = "421 4.7.0 closing"
    handler = FaultHandler(
        mail_reply=reply if stage == "MAIL" else None,
        rcpt_replies={"a@x.test": reply} if stage == "RCPT" else {},
    )
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    with pytest.raises(TemporaryRejectionError) as info:
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert info.value.reply is not None
    assert info.value.reply.code == 421
    assert not conn.is_usable


async def test_421_after_dot_defers_and_closes(smtpd: SMTPDServers) -> None:
    """A 421 after the final dot defers the recipients and closes the connection."""
    server = await smtpd.start(FaultHandler(data_reply="421 4.3.2 shutting down"))
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", DEFERRED)]
    assert not outcomes[0].possible_duplicate
    assert not conn.is_usable


@pytest.mark.parametrize(
    ("reply", "state", "usable"),
    [
        ("554 5.5.1 no valid recipients", FAILED, True),
        ("451 4.3.0 later", DEFERRED, True),
        ("421 4.3.0 bye", DEFERRED, False),
        ("250 2.0.0 what?", DEFERRED, False),
    ],
)
async def test_data_command_refused(
    script_server: ScriptServers, reply: str, state: RecipientState, usable: bool
) -> None:
    """A reply other than 354 to DATA decides by its code; 421 or nonsense also closes."""

    async def script(conv: Conversation) -> None:
        await mini_esmtp(conv, replies={"DATA": reply})

    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    outcomes = await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert states(outcomes) == [("a@x.test", state)]
    assert outcomes[0].reply is not None
    assert outcomes[0].reply.code == int(reply[:3])
    assert conn.is_usable is usable
    await conn.aclose()


async def test_connect_refused() -> None:
    """Nothing listening on the port raises ConnectError."""
    with pytest.raises(ConnectError):
        await SMTPConnection.open(settings(free_port()))


@pytest.mark.parametrize(
    ("greeting", "code"),
    [("421 4.3.2 too busy", 421), ("554 5.7.1 no mail from you", 554)],
)
async def test_rejecting_greeting_is_transient(
    script_server: ScriptServers, greeting: str, code: int
) -> None:
    """A 421 or 554 greeting raises TemporaryRejectionError carrying the reply."""

    async def script(conv: Conversation) -> None:
        await conv.send(greeting)
        await conv.wait_closed()

    server = await script_server.start(script)
    with pytest.raises(TemporaryRejectionError) as info:
        await SMTPConnection.open(settings(server.port))
    assert info.value.reply is not None
    assert info.value.reply.code == code
    await server.disconnections.wait_for(1)


async def test_garbage_banner_is_protocol_error() -> None:
    """A banner that is not an SMTP reply raises ProtocolError."""

    async def script(conv: Conversation) -> None:
        await conv.send("SSH-2.0-OpenSSH_9.2")
        await conv.wait_closed()

    async with running_script_server(script) as server:  # the fixture-free way
        with pytest.raises(ProtocolError, match="garbled"):
            await SMTPConnection.open(settings(server.port))


async def test_hang_up_after_greeting_is_protocol_error(
    script_server: ScriptServers,
) -> None:
    """A server that hangs up right after its greeting raises ProtocolError."""

    async def script(conv: Conversation) -> None:
        await conv.send("220 hello")
        await conv.readline()

    server = await script_server.start(script)
    with pytest.raises(ProtocolError, match="closed the connection"):
        await SMTPConnection.open(settings(server.port))


async def test_helo_fallback(script_server: ScriptServers) -> None:
    """A server refusing EHLO is greeted with HELO and still takes mail."""

    async def script(conv: Conversation) -> None:
        await mini_esmtp(conv, replies={"EHLO": "502 5.5.2 what?"})

    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()
    assert any(line.startswith("HELO client.example.test") for line in server.lines)
    assert server.messages == [MESSAGE]


async def test_rset_refused_raises(script_server: ScriptServers) -> None:
    """A refused RSET after an aborted transaction raises and closes the connection."""

    async def script(conv: Conversation) -> None:
        await mini_esmtp(conv, replies={"RSET": "503 5.5.1 no", "RCPT": "550 5.1.1 no"})

    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", FAILED)
    ]
    with pytest.raises(TemporaryRejectionError, match="RSET"):
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert not conn.is_usable


# -- TLS ----------------------------------------------------------------------------


async def test_starttls_verified(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """STARTTLS with a trusted certificate is used and verified."""
    server = await smtpd.start(
        starttls_context=tls_server_context, require_starttls=True
    )
    conn = await SMTPConnection.open(
        settings(server.port, tls="starttls", ssl_context=client_context)
    )
    assert (conn.tls, conn.tls_verified) == (True, True)
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()


async def test_starttls_untrusted_certificate_fails(
    smtpd: SMTPDServers,
    untrusted_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """A certificate from an untrusted CA raises TLSRequiredError under STARTTLS."""
    server = await smtpd.start(starttls_context=untrusted_server_context)
    with pytest.raises(TLSRequiredError, match="certificate verify failed"):
        await SMTPConnection.open(
            settings(server.port, tls="starttls", ssl_context=client_context)
        )
    await server.disconnections.wait_for(1)


async def test_starttls_hostname_mismatch_fails(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """A certificate for another name raises TLSRequiredError."""
    server = await smtpd.start(starttls_context=tls_server_context)
    with pytest.raises(TLSRequiredError, match=r"mismatch|match"):
        await SMTPConnection.open(
            settings(
                server.port,
                tls="starttls",
                ssl_context=client_context,
                server_hostname="mx.elsewhere.test",
            )
        )


async def test_starttls_not_offered_fails_when_required(smtpd: SMTPDServers) -> None:
    """Required TLS against a server without STARTTLS raises TLSRequiredError."""
    server = await smtpd.start()
    with pytest.raises(TLSRequiredError, match="does not offer STARTTLS"):
        await SMTPConnection.open(settings(server.port, tls="required"))


async def test_starttls_454(script_server: ScriptServers) -> None:
    """454 to STARTTLS: required TLS fails, opportunistic TLS goes on in plain text."""

    async def script(conv: Conversation) -> None:
        await mini_esmtp(conv, replies={"STARTTLS": "454 4.7.0 TLS not available"})

    server = await script_server.start(script)
    with pytest.raises(TLSRequiredError) as info:
        await SMTPConnection.open(settings(server.port, tls="required"))
    assert info.value.reply is not None
    assert info.value.reply.code == 454
    conn = await SMTPConnection.open(settings(server.port, tls="opportunistic"))
    assert not conn.tls
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()


async def test_opportunistic_unverifiable_certificate_encrypts(
    smtpd: SMTPDServers,
    untrusted_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Opportunistic TLS with an untrusted certificate still encrypts, unverified."""
    server = await smtpd.start(starttls_context=untrusted_server_context)
    conn = await SMTPConnection.open(
        settings(server.port, tls="opportunistic", ssl_context=client_context)
    )
    assert (conn.tls, conn.tls_verified) == (True, False)
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()
    assert server.connections.value == 2  # verified try, then encrypt-only


@pytest.mark.parametrize("tls", ["opportunistic", "required"])
async def test_unverifiable_certificate_is_remembered(
    smtpd: SMTPDServers,
    untrusted_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    tls: str,
) -> None:
    """Once a host's certificate did not verify, its next sessions make one
    unverified handshake on one TCP connection, encrypted (issue 11, item 9)."""
    server = await smtpd.start(starttls_context=untrusted_server_context)
    memory = TLSMemory()
    options = settings(server.port, tls=tls, ssl_context=client_context)
    first = await SMTPConnection.open(options, tls_memory=memory)
    await first.aclose()
    assert server.connections.value == 2  # verified (failed), then unverified
    for session in range(2, 5):
        conn = await SMTPConnection.open(options, tls_memory=memory)
        assert (conn.tls, conn.tls_verified) == (True, False)
        assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
            ("a@x.test", DELIVERED)
        ]
        await conn.aclose()
        assert server.connections.value == session + 1  # one more per session
    assert len(memory) == 1


async def test_remembered_certificate_is_verified_again_after_the_ttl(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """A host remembered as unverifiable is verified again once its entry
    expires: a fixed certificate is noticed (the clock is the test's)."""
    server = await smtpd.start(starttls_context=tls_server_context)
    now = [0.0]
    memory = TLSMemory(ttl=60, clock=lambda: now[0])
    memory.remember(("127.0.0.1", "127.0.0.1", server.port))
    options = settings(server.port, tls="opportunistic", ssl_context=client_context)
    conn = await SMTPConnection.open(options, tls_memory=memory)
    assert (conn.tls, conn.tls_verified) == (True, False)  # not even tried
    await conn.aclose()
    now[0] = 60.0
    conn = await SMTPConnection.open(options, tls_memory=memory)
    assert (conn.tls, conn.tls_verified) == (True, True)
    await conn.aclose()
    assert server.connections.value == 2
    assert len(memory) == 0


async def test_relay_starttls_never_uses_the_memory(
    smtpd: SMTPDServers,
    untrusted_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """A relay that demands verification fails on a bad certificate, even for a
    host that a memory holds as unverifiable: never downgraded."""
    server = await smtpd.start(starttls_context=untrusted_server_context)
    memory = TLSMemory()
    memory.remember(("127.0.0.1", "127.0.0.1", server.port))
    with pytest.raises(TLSRequiredError, match="certificate verify failed"):
        await SMTPConnection.open(
            settings(server.port, tls="starttls", ssl_context=client_context),
            tls_memory=memory,
        )
    assert server.connections.value == 1


def test_tls_memory_is_bounded() -> None:
    """The memory forgets its oldest host past 10,000."""
    memory = TLSMemory(clock=lambda: 0.0)
    for i in range(10_001):
        memory.remember((f"h{i}.test", "127.0.0.1", 25))
    assert len(memory) == 10_000
    assert not memory.unverifiable(("h0.test", "127.0.0.1", 25))
    assert memory.unverifiable(("h10000.test", "127.0.0.1", 25))


async def test_opportunistic_trusted_certificate_is_verified(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Opportunistic TLS with a trusted certificate records it as verified."""
    server = await smtpd.start(starttls_context=tls_server_context)
    conn = await SMTPConnection.open(
        settings(server.port, tls=TLSMode.OPPORTUNISTIC, ssl_context=client_context)
    )
    assert (conn.tls, conn.tls_verified) == (True, True)
    await conn.aclose()


async def test_opportunistic_broken_handshake_falls_back_to_plain(
    script_server: ScriptServers,
) -> None:
    """A failed TLS handshake under opportunistic TLS is retried in plain text."""

    async def garbage_after_starttls(conv: Conversation) -> None:
        await conv.send("220 bytes.test ESMTP")
        while (line := await conv.readline()) is not None:
            if line.startswith("EHLO"):
                await conv.send("250-bytes.test", "250 STARTTLS")
            elif line == "STARTTLS":
                await conv.send("220 2.0.0 go ahead")
                await conv.fail_tls_handshake()
                return

    async def plain(conv: Conversation) -> None:
        await mini_esmtp(conv)

    async def dispatch(conv: Conversation) -> None:
        await (garbage_after_starttls if conv.index == 0 else plain)(conv)

    server = await script_server.start(dispatch)
    conn = await SMTPConnection.open(settings(server.port, tls="opportunistic"))
    assert not conn.tls
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()
    assert server.connections.value == 2
    assert server.lines.count("STARTTLS") == 1


async def test_required_broken_handshake_fails(script_server: ScriptServers) -> None:
    """A failed TLS handshake under required TLS raises TLSRequiredError."""

    async def script(conv: Conversation) -> None:
        await conv.send("220 bytes.test ESMTP")
        await conv.readline()
        await conv.send("250-bytes.test", "250 STARTTLS")
        await conv.readline()
        await conv.send("220 2.0.0 go ahead")
        await conv.fail_tls_handshake()

    server = await script_server.start(script)
    with pytest.raises(TLSRequiredError, match="handshake"):
        await SMTPConnection.open(settings(server.port, tls="required"))


@pytest.mark.parametrize("ip", [None, "127.0.0.1"])
async def test_implicit_tls(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    ip: str | None,
) -> None:
    """Implicit TLS is verified against the host name, also when an address is given."""
    server = await smtpd.start(implicit_tls_context=tls_server_context)
    host = "127.0.0.1" if ip is None else "localhost"
    conn = await SMTPConnection.open(
        settings(server.port, tls="implicit", ssl_context=client_context, host=host),
        ip=ip,
    )
    assert (conn.tls, conn.tls_verified, conn.ip) == (True, True, "127.0.0.1")
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()


async def test_implicit_tls_untrusted_certificate_fails(
    smtpd: SMTPDServers,
    untrusted_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Implicit TLS with an untrusted certificate raises TLSRequiredError."""
    server = await smtpd.start(implicit_tls_context=untrusted_server_context)
    with pytest.raises(TLSRequiredError, match="certificate verify failed"):
        await SMTPConnection.open(
            settings(server.port, tls="implicit", ssl_context=client_context),
            ip="127.0.0.1",
        )


async def test_implicit_tls_connect_refused() -> None:
    """Implicit TLS to a closed port raises ConnectError."""
    ctx = make_ssl_context(False)
    with pytest.raises(ConnectError):
        await SMTPConnection.open(
            settings(free_port(), tls="implicit", ssl_context=ctx, host="localhost"),
            ip="127.0.0.1",
        )


# -- AUTH ---------------------------------------------------------------------------


async def test_auth_success(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog_smtp: pytest.LogCaptureFixture,
) -> None:
    """Good credentials log in over STARTTLS; the password is never logged."""
    handler = FaultHandler(credentials=("user", "s3cret-pw"))
    server = await smtpd.start(handler, starttls_context=tls_server_context)
    conn_settings = settings(
        server.port,
        tls="starttls",
        ssl_context=client_context,
        username="user",
        password="s3cret-pw",
    )
    assert "s3cret-pw" not in repr(conn_settings)
    conn = await SMTPConnection.open(conn_settings)
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await conn.aclose()
    assert handler.logins == ["user"]
    assert caplog_smtp.records
    assert "s3cret-pw" not in caplog_smtp.text


async def test_auth_failure_is_transient(
    smtpd: SMTPDServers,
    tls_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """Refused credentials (535) raise TemporaryRejectionError, so mail defers."""
    handler = FaultHandler(credentials=("user", "right"))
    server = await smtpd.start(handler, starttls_context=tls_server_context)
    with pytest.raises(TemporaryRejectionError) as info:
        await SMTPConnection.open(
            settings(
                server.port,
                tls="starttls",
                ssl_context=client_context,
                username="user",
                password="wrong",
            )
        )
    assert info.value.reply is not None
    assert info.value.reply.code == 535
    assert handler.logins == []


async def test_auth_not_offered_is_transient(smtpd: SMTPDServers) -> None:
    """Credentials for a server that offers no AUTH raise TemporaryRejectionError."""
    server = await smtpd.start()  # AUTH only over TLS, and this is plain
    with pytest.raises(TemporaryRejectionError, match="does not offer AUTH"):
        await SMTPConnection.open(settings(server.port, username="u", password="p"))


# -- settings -----------------------------------------------------------------------


def test_settings_validation() -> None:
    """Mandatory TLS needs a context; username and password come together."""
    with pytest.raises(ConfigError, match="ssl_context"):
        settings(25, tls="starttls")
    with pytest.raises(ConfigError, match="together"):
        settings(25, username="u")
    with pytest.raises(ValueError, match="bogus"):
        settings(25, tls="bogus")


def test_relay_and_mx_settings(tls_ca_file: str) -> None:
    """Settings come from the relay and MX configuration."""
    config = Config(
        relay=RelayConfig(
            host="relay.test",
            tls="implicit",
            username="u",
            password="p",
            ca_file=tls_ca_file,
        ),
        timeouts=SLOW,
    )
    relay = relay_settings(config, "me.test")
    assert (relay.host, relay.port, relay.tls, relay.username) == (
        "relay.test",
        465,
        TLSMode.IMPLICIT,
        "u",
    )
    assert relay.ssl_context is not None
    assert relay.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert relay.timeouts == SLOW
    plain = relay_settings(
        Config(relay=RelayConfig(host="127.0.0.1", tls="none")), "me.test"
    )
    assert (plain.tls, plain.ssl_context, plain.port) == (TLSMode.NONE, None, 25)
    with pytest.raises(ConfigError, match="no relay"):
        relay_settings(Config(), "me.test")
    mx = mx_settings(Config(), "mx.test", "me.test", None)
    assert (mx.host, mx.port, mx.tls) == ("mx.test", 25, TLSMode.OPPORTUNISTIC)
    assert not make_ssl_context(False).check_hostname
    with pytest.raises(ConfigError, match="cannot load CA"):
        make_ssl_context(True, "/nonexistent/ca.pem")


# -- Postfix smtp-sink ---------------------------------------------------------------


async def sink_send(
    smtp_sink: SinkServers,
    *flags: str,
    rcpts: tuple[str, ...] = ("a@x.test", "b@x.test"),
) -> tuple[SMTPConnection, list[RecipientOutcome]]:
    sink = await smtp_sink.start(*flags)
    conn = await SMTPConnection.open(settings(sink.port))
    return conn, await conn.send(FROM, list(rcpts), MESSAGE)


async def test_sink_delivers(smtp_sink: SinkServers) -> None:
    """smtp-sink accepts the message for every recipient over PIPELINING-capable ESMTP."""
    conn, outcomes = await sink_send(smtp_sink)
    assert conn.supports_pipelining
    assert states(outcomes) == [("a@x.test", DELIVERED), ("b@x.test", DELIVERED)]
    assert states(await conn.send(FROM, ["c@x.test"], MESSAGE)) == [
        ("c@x.test", DELIVERED)
    ]
    await conn.aclose()


async def test_sink_soft_rejects_rcpt(smtp_sink: SinkServers) -> None:
    """smtp-sink -r RCPT defers every recipient with 450 4.3.0 and no DATA is sent."""
    conn, outcomes = await sink_send(smtp_sink, "-r", "RCPT")
    await conn.aclose()
    assert states(outcomes) == [("a@x.test", DEFERRED), ("b@x.test", DEFERRED)]
    assert outcomes[0].reply is not None
    assert (outcomes[0].reply.code, outcomes[0].reply.enhanced_code) == (450, "4.3.0")


async def test_sink_too_many_recipients(smtp_sink: SinkServers) -> None:
    """smtp-sink -b '452 4.5.3 ...' -r RCPT asks for an immediate retry."""
    conn, outcomes = await sink_send(
        smtp_sink, "-b", "452 4.5.3 Error: too many recipients", "-r", "RCPT"
    )
    await conn.aclose()
    assert [(o.state, o.retry_now) for o in outcomes] == [(DEFERRED, True)] * 2


@pytest.mark.parametrize(
    ("flag", "state", "code"), [("-f", FAILED, 500), ("-r", DEFERRED, 450)]
)
async def test_sink_rejects_after_dot(
    smtp_sink: SinkServers, flag: str, state: RecipientState, code: int
) -> None:
    """smtp-sink -f . / -r . reject after the final dot: FAILED / DEFERRED."""
    conn, outcomes = await sink_send(smtp_sink, flag, ".")
    await conn.aclose()
    assert states(outcomes) == [("a@x.test", state), ("b@x.test", state)]
    assert outcomes[0].reply is not None
    assert outcomes[0].reply.code == code


async def test_sink_disconnect_after_dot(smtp_sink: SinkServers) -> None:
    """smtp-sink -q . hangs up after the final dot: DEFERRED, possible duplicate."""
    conn, outcomes = await sink_send(smtp_sink, "-q", ".")
    assert states(outcomes) == [("a@x.test", DEFERRED), ("b@x.test", DEFERRED)]
    assert all(o.possible_duplicate for o in outcomes)
    assert not conn.is_usable


async def test_sink_421_at_mail(smtp_sink: SinkServers) -> None:
    """smtp-sink -Q MAIL answers 421 and hangs up: the send raises, the connection closes."""
    sink = await smtp_sink.start("-Q", "MAIL")
    conn = await SMTPConnection.open(settings(sink.port))
    with pytest.raises(TemporaryRejectionError) as info:
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.enhanced_code) == (421, "4.0.0")
    assert not conn.is_usable


async def test_sink_421_greeting(smtp_sink: SinkServers) -> None:
    """smtp-sink -Q CONNECT greets with 421: the open raises TemporaryRejectionError."""
    sink = await smtp_sink.start("-Q", "CONNECT")
    with pytest.raises(TemporaryRejectionError, match="421"):
        await SMTPConnection.open(settings(sink.port))


# -- edges ----------------------------------------------------------------------------


async def test_control_characters_in_address_are_not_sent(smtpd: SMTPDServers) -> None:
    """An address with a control character fails 553 5.1.3 without reaching the server."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port))
    assert "usable=True" in repr(conn)
    before = conn.last_used
    outcomes = await conn.send(FROM, ["a\x01b@x.test", "c@x.test"], MESSAGE)
    await conn.aclose()
    assert states(outcomes) == [("a\x01b@x.test", FAILED), ("c@x.test", DELIVERED)]
    assert conn.last_used >= before
    assert server.messages[0].rcpt_tos == ["c@x.test"]


async def test_timeout_at_mail_raises_and_closes(smtpd: SMTPDServers) -> None:
    """No reply to MAIL raises DeliveryTimeoutError and closes the connection."""
    server = await smtpd.start(FaultHandler(stall_at="MAIL"))
    conn = await SMTPConnection.open(
        settings(server.port, timeouts=Timeouts(command=QUICK))
    )
    with pytest.raises(DeliveryTimeoutError, match="MAIL"):
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert not conn.is_usable
    await server.disconnections.wait_for(1)


async def test_421_to_ehlo(script_server: ScriptServers) -> None:
    """A 421 to EHLO raises TemporaryRejectionError without trying HELO."""

    async def script(conv: Conversation) -> None:
        await mini_esmtp(conv, replies={"EHLO": "421 4.7.0 go away"})

    server = await script_server.start(script)
    with pytest.raises(TemporaryRejectionError, match="421"):
        await SMTPConnection.open(settings(server.port))
    assert not any(line.startswith("HELO") for line in server.lines)


async def test_opportunistic_without_starttls_is_plain(smtpd: SMTPDServers) -> None:
    """Opportunistic TLS against a server without STARTTLS delivers in plain text."""
    server = await smtpd.start()
    conn = await SMTPConnection.open(settings(server.port, tls="opportunistic"))
    assert (conn.tls, conn.tls_verified) == (False, False)
    await conn.aclose()


@pytest.mark.parametrize(
    ("verb", "tls", "user"), [("STARTTLS", "required", None), ("AUTH", "none", "u")]
)
async def test_hang_up_during_setup_is_protocol_error(
    script_server: ScriptServers, verb: str, tls: str, user: str | None
) -> None:
    """A server hanging up on STARTTLS or AUTH raises ProtocolError."""

    async def hang_up(conv: Conversation) -> None:
        await conv.send("220 bytes.test ESMTP")
        await conv.readline()
        await conv.send("250-bytes.test", "250-STARTTLS", "250 AUTH PLAIN LOGIN")
        await conv.readline()

    server = await script_server.start(hang_up)
    with pytest.raises(ProtocolError, match=verb):
        await SMTPConnection.open(
            settings(server.port, tls=tls, username=user, password=user)
        )


async def test_server_dropping_idle_connection(script_server: ScriptServers) -> None:
    """A connection the server dropped while idle fails the next send, transiently."""

    async def drop_after_message(conv: Conversation) -> None:
        await conv.send("220 bytes.test ESMTP")
        while (line := await conv.readline()) is not None:
            if line.startswith("EHLO"):
                await conv.send("250 bytes.test")
            elif line == "DATA":
                await conv.send("354 go")
                await conv.read_data()
                await conv.send("250 2.0.0 ok")
                return  # hang up
            else:
                await conv.send("250 2.0.0 ok")

    server = await script_server.start(drop_after_message)
    conn = await SMTPConnection.open(settings(server.port))
    assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
        ("a@x.test", DELIVERED)
    ]
    await server.disconnections.wait_for(1)
    with pytest.raises(ProtocolError):
        await conn.send(FROM, ["a@x.test"], MESSAGE)
    assert not conn.is_usable
    await conn.aclose()
    assert "QUIT" not in server.lines
    assert len(server.messages) == 0  # drop_after_message does not record


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),  # already CRLF: unchanged
        (b"a\nb", b"a\r\nb\r\n"),  # bare LF, no final line break
        (b"a\rb\r\n", b"a\r\nb\r\n"),  # bare CR
        (b".a\r\nb\r\n.\r\n..c\r\n", b"..a\r\nb\r\n..\r\n...c\r\n"),
        (b"no dots. at all\r\n", b"no dots. at all\r\n"),
    ],
)
def test_body_encoding(data: bytes, wire: bytes) -> None:
    """Line endings become CRLF and a leading dot is doubled (RFC 5321 §4.5.2)."""
    assert _dot_stuffed(_encode_body(data)) == wire
