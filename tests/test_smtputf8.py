"""SMTPUTF8 per recipient (RFC 6531), against aiosmtpd with and without it.

On a server without SMTPUTF8, only what needs it fails (5.6.7): a recipient
with a non-ASCII local part fails alone and its ASCII co-recipients are
delivered in a transaction without SMTPUTF8; a message with UTF-8 header fields,
or a non-ASCII sender, fails for every recipient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailstrom_async import Config, RecipientState, RelayConfig, RetryPolicy
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email, prepare
from mailstrom_async._smtp import SMTPConnection
from mailstrom_async._store import MemoryStore
from tests.wire import TIMEOUTS, plain_settings

if TYPE_CHECKING:
    from mailstrom_async._classify import RecipientOutcome
    from mailstrom_async._models import MessageStatus
    from tests.smtpd import SMTPDServer, SMTPDServers

DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED
FROM = "sender@example.test"
ASCII_MESSAGE = b"From: sender@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
UTF8_MESSAGE = "From: sender@example.test\r\nSubject: Grüße\r\n\r\nHello.\r\n".encode()


async def send(
    server: SMTPDServer,
    rcpts: list[str],
    data: bytes = ASCII_MESSAGE,
    *,
    mail_from: str = FROM,
    smtputf8: bool = False,
) -> tuple[list[RecipientOutcome], int]:
    """One send on a new connection: the outcomes and the MAIL commands sent."""
    conn = await SMTPConnection.open(plain_settings(server))
    try:
        outcomes = await conn.send(mail_from, rcpts, data, smtputf8=smtputf8)
    finally:
        await conn.aclose()
    return outcomes, conn.transactions


def refused_5_6_7(outcome: RecipientOutcome, says: str) -> None:
    assert outcome.state is FAILED
    assert outcome.reply is not None
    assert outcome.reply.enhanced_code == "5.6.7"
    assert "SMTPUTF8" in outcome.reply.text
    assert says in outcome.reply.text


# -- one connection ---------------------------------------------------------------


async def test_utf8_recipient_fails_alone_without_smtputf8(smtpd: SMTPDServers) -> None:
    """An ASCII message: only the non-ASCII recipient fails; the others are
    delivered, in order, in one transaction without SMTPUTF8."""
    server = await smtpd.start(smtputf8=False)
    rcpts = ["a@x.test", "jörg@x.test", "b@x.test"]
    outcomes, transactions = await send(server, rcpts)
    assert [(o.address, o.state) for o in outcomes] == [
        ("a@x.test", DELIVERED),
        ("jörg@x.test", FAILED),
        ("b@x.test", DELIVERED),
    ]
    refused_5_6_7(outcomes[1], "which this address needs")
    assert transactions == 1
    [received] = server.messages
    assert received.rcpt_tos == ["a@x.test", "b@x.test"]
    assert "SMTPUTF8" not in received.mail_options
    assert received.content == ASCII_MESSAGE


async def test_only_utf8_recipients_send_nothing(smtpd: SMTPDServers) -> None:
    """When every recipient needs SMTPUTF8, no transaction is started."""
    server = await smtpd.start(smtputf8=False)
    outcomes, transactions = await send(server, ["jörg@x.test", "zoë@x.test"])
    for outcome in outcomes:
        refused_5_6_7(outcome, "which this address needs")
    assert transactions == 0
    assert server.messages == []


async def test_utf8_headers_fail_every_recipient(smtpd: SMTPDServers) -> None:
    """UTF-8 in the header section needs SMTPUTF8 for the whole message, whatever
    the flag says: every recipient fails, with a reason that says so."""
    server = await smtpd.start(smtputf8=False)
    outcomes, transactions = await send(server, ["a@x.test", "b@x.test"], UTF8_MESSAGE)
    for outcome in outcomes:
        refused_5_6_7(outcome, "which this message needs")
    assert transactions == 0
    assert server.messages == []


async def test_utf8_sender_fails_every_recipient(smtpd: SMTPDServers) -> None:
    """A non-ASCII MAIL FROM fails every recipient, naming the sender."""
    server = await smtpd.start(smtputf8=False)
    outcomes, transactions = await send(
        server, ["a@x.test", "b@x.test"], mail_from="bünce@example.test"
    )
    for outcome in outcomes:
        refused_5_6_7(outcome, "the sender address bünce@example.test needs")
    assert transactions == 0


async def test_mixed_recipients_with_smtputf8_in_one_transaction(
    smtpd: SMTPDServers,
) -> None:
    """A server with SMTPUTF8 takes every recipient in one SMTPUTF8 transaction."""
    server = await smtpd.start(smtputf8=True)
    outcomes, transactions = await send(server, ["a@x.test", "jörg@x.test"])
    assert [o.state for o in outcomes] == [DELIVERED, DELIVERED]
    assert transactions == 1
    [received] = server.messages
    assert received.rcpt_tos == ["a@x.test", "jörg@x.test"]
    assert "SMTPUTF8" in received.mail_options


async def test_ascii_message_without_utf8_addresses_does_not_ask(
    smtpd: SMTPDServers,
) -> None:
    """Nothing that needs SMTPUTF8: the MAIL command does not ask for it."""
    server = await smtpd.start(smtputf8=True)
    outcomes, _ = await send(server, ["a@x.test"])
    assert [o.state for o in outcomes] == [DELIVERED]
    [received] = server.messages
    assert "SMTPUTF8" not in received.mail_options


# -- end to end -----------------------------------------------------------------


async def deliver(server: SMTPDServer, message: Email) -> MessageStatus:
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        retry=RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05),
        timeouts=TIMEOUTS,
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        return await (await d.submit(message))


async def test_utf8_bcc_does_not_fail_its_co_recipients(smtpd: SMTPDServers) -> None:
    """A Bcc recipient with a non-ASCII local part, on a server without SMTPUTF8,
    fails 5.6.7 alone; the To and Cc recipients are delivered."""
    server = await smtpd.start(smtputf8=False)
    message = Email(
        sender="sender@example.test",
        to=["to@example.test"],
        cc=["cc@example.test"],
        bcc=["jörg@example.test"],
        subject="hello",
        text="Hello.\n",
    )
    assert not prepare(message).smtputf8  # the message itself is ASCII
    status = await deliver(server, message)
    assert [(r.address, r.state) for r in status] == [
        ("to@example.test", DELIVERED),
        ("cc@example.test", DELIVERED),
        ("jörg@example.test", FAILED),
    ]
    bcc = status.recipient("jörg@example.test")
    assert bcc.enhanced_code == "5.6.7"
    assert bcc.message is not None
    assert "which this address needs" in bcc.message
    [received] = server.messages
    assert received.rcpt_tos == ["to@example.test", "cc@example.test"]
    assert "SMTPUTF8" not in received.mail_options
    assert received.content.isascii()


async def test_utf8_to_header_fails_everyone(smtpd: SMTPDServers) -> None:
    """A non-ASCII local part in To is written into the headers: the message needs
    SMTPUTF8, and every recipient fails with a reason that says so."""
    server = await smtpd.start(smtputf8=False)
    message = Email(
        sender="sender@example.test",
        to=["jörg@example.test", "ann@example.test"],
        subject="hello",
        text="Hello.\n",
    )
    assert prepare(message).smtputf8
    status = await deliver(server, message)
    for r in status:
        assert r.state is FAILED
        assert r.enhanced_code == "5.6.7"
        assert r.message is not None
        assert "which this message needs" in r.message
    assert server.messages == []
