"""The capture SMTP server behind the demo, spoken to byte by byte."""

from __future__ import annotations

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async._sink import SinkServer


async def talk(port: int, *commands: bytes) -> list[bytes]:
    """Send each command and collect the reply lines (the greeting first)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        reader = BufferedByteReceiveStream(stream)

        async def reply() -> bytes:
            lines = [await reader.receive_until(b"\r\n", 4096)]
            while lines[-1][3:4] == b"-":
                lines.append(await reader.receive_until(b"\r\n", 4096))
            return b"\n".join(lines)

        replies = [await reply()]
        for command in commands:
            await stream.send(command + b"\r\n")
            replies.append(await reply())
        return replies


async def test_sink_captures_a_transaction() -> None:
    """The sink records envelope and body, undoing dot-stuffing."""
    async with SinkServer() as sink:
        replies = await talk(
            sink.port,
            b"EHLO client.test",
            b"MAIL FROM:<a@example.com>",
            b"RCPT TO:<b@example.org>",
            b"DATA",
            b"Subject: x\r\n\r\n..leading dot\r\n.",
            b"QUIT",
        )
    assert replies[0].startswith(b"220 ")
    assert b"250-SMTPUTF8" in replies[1]
    assert replies[-2] == b"250 2.0.0 OK queued"
    assert replies[-1].startswith(b"221")
    [message] = sink.messages
    assert message.mail_from == "a@example.com"
    assert message.rcpt_to == ("b@example.org",)
    assert message.data == b"Subject: x\r\n\r\n.leading dot\r\n"


async def test_sink_policy_and_sequence_errors() -> None:
    """The policy refuses recipients; commands out of order get 503; unknown 502."""
    async with SinkServer(
        policy=lambda a: "550 5.1.1 nope" if "x@" in a else None
    ) as sink:
        replies = await talk(
            sink.port,
            b"HELO client.test",
            b"RCPT TO:<b@example.org>",
            b"DATA",
            b"MAIL FROM:<a@example.com>",
            b"RCPT TO:<x@example.org>",
            b"DATA",
            b"RSET",
            b"NOOP",
            b"VRFY a",
        )
    assert replies[1:] == [
        b"250 mailstrom-async sink",
        b"503 5.5.1 MAIL first",
        b"503 5.5.1 RCPT first",
        b"250 2.1.0 OK",
        b"550 5.1.1 nope",
        b"503 5.5.1 RCPT first",
        b"250 2.0.0 OK",
        b"250 2.0.0 OK",
        b"502 5.5.2 Command not recognised",
    ]
    assert sink.messages == []
