"""8BITMIME (RFC 6152): 8-bit bodies go only to servers that consent, else 7-bit.

The re-encoding itself (:func:`downgrade`), then what aiosmtpd servers with and
without 8BITMIME received, byte for byte.
"""

from __future__ import annotations

import email
import logging
from email.message import EmailMessage, Message
from email.policy import SMTP, default
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom_async import (
    Config,
    Limits,
    RecipientState,
    RelayConfig,
    RetryPolicy,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._downgrade import THREAD_OCTETS, NotDowngradableError, downgrade
from mailstrom_async._message import prepare
from mailstrom_async._smtp import SMTPConnection
from mailstrom_async._store import MemoryStore
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers
from tests.wire import TIMEOUTS, plain_settings

DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED
FROM = "sender@example.test"
NO_8BITMIME = frozenset({"8BITMIME"})
LATIN1 = "Grüße aus Köln, ça va ?\n".encode("latin-1")
BINARY = bytes(range(256)) * 4


def head(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 4]


def eight_bit_message(size: int = 0) -> bytes:
    """A multipart message with a UTF-8 text part, a Latin-1 text part and a binary
    attachment, all 8-bit, rendered as prepare() renders it."""
    msg = EmailMessage()
    msg["From"] = FROM
    msg["To"] = "rcpt@example.test"
    msg["Subject"] = (
        "a fairly long subject line that the email package would fold, if it refolded headers"
    )
    text = "Grüße aus Köln.\n" + "Zeile mit Umlauten: äöü ß\n" * (size // 27)
    msg.set_content(text, cte="8bit")
    latin = EmailMessage()
    latin["Content-Type"] = 'text/plain; charset="latin-1"'
    latin["Content-Transfer-Encoding"] = "8bit"
    latin.set_payload(LATIN1.decode("ascii", "surrogateescape"))
    msg.make_mixed()
    msg.attach(latin)
    binary = EmailMessage()
    binary["Content-Type"] = "application/octet-stream"
    binary["Content-Transfer-Encoding"] = "binary"
    binary.set_payload(
        BINARY.replace(b"\r", b"")
        .replace(b"\n", b"")
        .decode("ascii", "surrogateescape")
    )
    msg.attach(binary)
    data = prepare(msg).data
    assert not data.isascii()
    return data


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    """Each leaf part's content type and decoded content (line ends as LF)."""
    parsed = email.message_from_bytes(data, policy=default)
    return [
        (
            part.get_content_type(),
            cast("bytes", part.get_payload(decode=True)).replace(b"\r\n", b"\n"),
        )
        for part in parsed.walk()
        if not part.is_multipart()
    ]


def encodings(data: bytes) -> list[str | None]:
    parsed = email.message_from_bytes(data, policy=default)
    return [part.get("Content-Transfer-Encoding") for part in parsed.walk()]


# -- the re-encoding ----------------------------------------------------------------


def test_downgrade_reencodes_every_8bit_part() -> None:
    """Text parts become quoted-printable, others base64; the content, the top
    header section and every line length stay within the rules."""
    data = eight_bit_message()
    out = downgrade(data)
    assert out.isascii()
    assert head(out) == head(data)  # byte-identical, long Subject unfolded
    assert leaves(out) == leaves(data)
    assert encodings(out) == [None, "quoted-printable", "quoted-printable", "base64"]
    assert max(map(len, out.split(b"\r\n"))) <= 78
    assert b"\n" not in out.replace(b"\r\n", b"")  # CRLF only


def test_downgrade_keeps_7bit_parts_as_they_are() -> None:
    """A part that is already 7-bit is written back byte for byte."""
    msg = EmailMessage()
    msg["From"] = FROM
    msg.set_content("plain ASCII text\n")
    msg.add_attachment("Grüße\n", cte="8bit")
    data = prepare(msg, rcpt_to=["r@example.test"], mail_from=FROM).data
    out = downgrade(data)
    assert b"plain ASCII text\r\n" in out
    assert b"Gr=C3=BC=C3=9Fe" in out
    assert leaves(out) == leaves(data)


def test_downgrade_single_part_message() -> None:
    """A single-part message gets its own Content-Transfer-Encoding replaced."""
    raw = (
        b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=latin-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\nSubject:   spaced\r\n\r\n" + LATIN1
    )
    out = downgrade(raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))
    assert out.startswith(
        b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=latin-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\nSubject: spaced\r\n\r\n"
    )
    assert leaves(out) == [("text/plain", LATIN1)]


def test_downgrade_adds_a_missing_transfer_encoding() -> None:
    """A MIME part without Content-Transfer-Encoding (7bit by default, though it
    is not) gets one."""
    raw = b"From: a@example.test\r\nContent-Type: text/plain\r\n\r\n" + LATIN1.replace(
        b"\n", b"\r\n"
    )
    out = downgrade(raw)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in head(out)
    assert leaves(out) == [("text/plain", LATIN1)]


def test_downgrade_marks_8bit_containers_7bit() -> None:
    """A multipart or message/rfc822 part declared 8bit is 7bit afterwards, and
    the attached message's 8-bit body is re-encoded too."""
    inner = b"From: b@example.test\r\nContent-Type: text/plain; charset=utf-8\r\n"
    inner += b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Grüße\r\n".encode()
    raw = (
        b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"--b1\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + inner + b"\r\n--b1--\r\n"
    )
    out = downgrade(raw)
    assert out.isascii()
    assert encodings(out) == ["7bit", "7bit", "quoted-printable"]
    assert leaves(out) == [("text/plain", "Grüße\n".encode())]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            b"From: a@example.test\r\nSubject: hi\r\n\r\n" + LATIN1,
            "not MIME",
        ),
        (
            "From: a@example.test\r\nSubject: Grüße\r\nMIME-Version: 1.0\r\n\r\nhi\r\n".encode(),
            "header section has 8-bit octets",
        ),
        (
            b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain\r\n"
            + "Content-Description: Grüße\r\n\r\nhi\r\n--b1--\r\n".encode(),
            "MIME part's header has 8-bit octets",
        ),
    ],
)
def test_downgrade_refuses(raw: bytes, reason: str) -> None:
    """What has no 7-bit form is refused, with the reason."""
    with pytest.raises(NotDowngradableError, match=reason):
        downgrade(raw)


def text_and_blob(text: str, blob: bytes, blob_cte: str) -> bytes:
    """A multipart/mixed message: *text* as 8bit, then *blob* (no CR or LF) as an
    application/octet-stream part with Content-Transfer-Encoding *blob_cte*."""
    msg = EmailMessage()
    msg["From"] = FROM
    msg.set_content(text, cte="8bit")
    part = EmailMessage()
    part["Content-Type"] = "application/octet-stream"
    part["Content-Transfer-Encoding"] = blob_cte
    part.set_payload(blob.decode("ascii", "surrogateescape"))
    msg.make_mixed()
    msg.attach(part)
    return msg.as_bytes(policy=SMTP)


def test_downgrade_big_parts_in_slices() -> None:
    """Parts bigger than one encoding slice (1 MiB) decode back exactly."""
    blob = bytes(range(128, 256)) * 9000  # 1.1 MB, no CR or LF
    data = text_and_blob(("äöü " * 40 + "\n") * 7000, blob, "binary")
    out = downgrade(data)
    assert out.isascii()
    assert leaves(out) == leaves(data)
    assert max(map(len, out.split(b"\r\n"))) <= 78


@given(
    text=st.text(
        st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\n\t "),
        max_size=300,
    ),
    blob=st.binary(max_size=300),
)
def test_downgrade_round_trip(text: str, blob: bytes) -> None:
    """Any text and binary content decodes back unchanged after re-encoding."""
    blob = blob.replace(b"\r", b"").replace(b"\n", b"") + b"\xff"
    data = text_and_blob(text + "ä", blob, "8bit")
    out = downgrade(data)
    assert out.isascii()
    assert leaves(out) == leaves(data)


# -- on the wire --------------------------------------------------------------------


async def start(
    smtpd: SMTPDServers, *, eight_bit: bool, utf8: bool = False
) -> SMTPDServer:
    handler = FaultHandler(hide_extensions=frozenset() if eight_bit else NO_8BITMIME)
    return await smtpd.start(handler, smtputf8=utf8)


async def test_8bit_body_with_8bitmime_says_so(smtpd: SMTPDServers) -> None:
    """A server that offers 8BITMIME gets the 8-bit body as is, with
    BODY=8BITMIME on the MAIL command."""
    server = await start(smtpd, eight_bit=True)
    data = eight_bit_message()
    conn = await SMTPConnection.open(plain_settings(server))
    outcomes = await conn.send(FROM, ["r@example.test"], data)
    await conn.aclose()
    assert [o.state for o in outcomes] == [DELIVERED]
    [received] = server.messages
    assert "BODY=8BITMIME" in received.mail_options
    assert received.content == data


async def test_7bit_body_does_not_ask_for_8bitmime(smtpd: SMTPDServers) -> None:
    server = await start(smtpd, eight_bit=True)
    conn = await SMTPConnection.open(plain_settings(server))
    await conn.send(FROM, ["r@example.test"], b"From: a@example.test\r\n\r\nhi\r\n")
    await conn.aclose()
    [received] = server.messages
    assert not any(o.startswith("BODY=") for o in received.mail_options)


async def test_8bit_body_without_8bitmime_is_reencoded(smtpd: SMTPDServers) -> None:
    """A server without 8BITMIME gets only 7-bit octets, without BODY=8BITMIME;
    every part decodes back to the original content."""
    server = await start(smtpd, eight_bit=False)
    data = eight_bit_message()
    conn = await SMTPConnection.open(plain_settings(server))
    outcomes = await conn.send(FROM, ["r@example.test", "s@example.test"], data)
    await conn.aclose()
    assert [o.state for o in outcomes] == [DELIVERED, DELIVERED]
    [received] = server.messages
    assert received.content.isascii()
    assert not any(o.startswith("BODY=") for o in received.mail_options)
    assert f"SIZE={len(received.content)}" in received.mail_options
    assert head(received.content) == head(data)
    assert leaves(received.content) == leaves(data)


async def test_big_8bit_body_reencoded_in_a_thread(smtpd: SMTPDServers) -> None:
    """A message over the thread threshold is re-encoded (off the event loop, as
    the blockbuster fixture would notice otherwise) and arrives 7-bit."""
    server = await start(smtpd, eight_bit=False)
    data = eight_bit_message(size=2 * THREAD_OCTETS)
    assert len(data) > THREAD_OCTETS
    conn = await SMTPConnection.open(plain_settings(server))
    outcomes = await conn.send(FROM, ["r@example.test"], data)
    await conn.aclose()
    assert [o.state for o in outcomes] == [DELIVERED]
    [received] = server.messages
    assert received.content.isascii()
    assert leaves(received.content) == leaves(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # Raw Latin-1 bytes in a message that is not MIME: no 7-bit form.
        (
            b"From: a@example.test\r\nSubject: hi\r\n\r\n"
            + LATIN1.replace(b"\n", b"\r\n"),
            "not MIME",
        ),
        # A part header with 8-bit octets: it would need SMTPUTF8.
        (
            b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\n"
            + "Content-Type: text/plain; name=Grüße\r\n\r\nhi\r\n--b1--\r\n".encode(),
            "header has 8-bit octets",
        ),
    ],
)
async def test_undowngradable_body_fails_5_6_3(
    smtpd: SMTPDServers, data: bytes, reason: str
) -> None:
    """What cannot be re-encoded is never sent to a server without 8BITMIME:
    every recipient FAILs 5.6.3 with the reason, and no MAIL is sent."""
    server = await start(smtpd, eight_bit=False)
    conn = await SMTPConnection.open(plain_settings(server))
    outcomes = await conn.send(FROM, ["r@example.test", "s@example.test"], data)
    await conn.aclose()
    for outcome in outcomes:
        assert outcome.state is FAILED
        assert outcome.reply is not None
        assert outcome.reply.enhanced_code == "5.6.3"
        assert "does not offer 8BITMIME" in outcome.reply.text
        assert reason in outcome.reply.text
    assert conn.transactions == 0
    assert server.messages == []


async def test_smtputf8_transaction_carries_8bit(smtpd: SMTPDServers) -> None:
    """SMTPUTF8 implies 8BITMIME (RFC 6531 §3.1): a UTF-8 message goes as is in
    an SMTPUTF8 transaction, with BODY=8BITMIME when offered."""
    server = await start(smtpd, eight_bit=True, utf8=True)
    data = "From: jörg@example.test\r\nSubject: Grüße\r\n\r\nGrüße\r\n".encode()
    conn = await SMTPConnection.open(plain_settings(server))
    outcomes = await conn.send("jörg@example.test", ["r@example.test"], data)
    await conn.aclose()
    assert [o.state for o in outcomes] == [DELIVERED]
    [received] = server.messages
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(received.mail_options)
    assert received.content == data


async def test_reencoded_once_per_job(
    smtpd: SMTPDServers, caplog: pytest.LogCaptureFixture
) -> None:
    """A job sent in several transactions (one recipient each) is re-encoded once,
    and every transaction carries the same 7-bit bytes."""
    server = await start(smtpd, eight_bit=False)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        retry=RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05),
        timeouts=TIMEOUTS,
        limits=Limits(max_recipients_per_transaction=1),
    )
    msg = cast("Message", email.message_from_bytes(eight_bit_message(), policy=SMTP))
    del msg["To"]
    msg["To"] = "a@example.test, b@example.test, c@example.test"
    with caplog.at_level(logging.DEBUG, logger="mailstrom_async.smtp"):
        async with Deliverer(config, store=MemoryStore()) as d:
            status = await (await d.submit(cast("EmailMessage", msg)))
    assert [r.state for r in status] == [DELIVERED] * 3
    assert len(server.messages) == 3
    assert {m.content for m in server.messages} == {server.messages[0].content}
    assert server.messages[0].content.isascii()
    reencoded = [r for r in caplog.records if "re-encoded" in r.getMessage()]
    assert len(reencoded) == 1
