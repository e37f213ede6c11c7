"""A small SMTP server that captures what it receives, for demos and development.

It speaks enough ESMTP for a client to deliver (EHLO/HELO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT, with 8BITMIME, SMTPUTF8 and PIPELINING advertised), keeps every message
in memory, and lets a *policy* choose the reply to each RCPT, which is how the demo
shows a deferral and a permanent failure. It binds to loopback only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import attrs

__all__ = ["CapturedMessage", "RcptPolicy", "SinkServer"]

# Replies a policy may return for a RCPT: None accepts.
RcptPolicy = Callable[[str], str | None]

_MAX_LINE = 4096


@attrs.frozen
class CapturedMessage:
    """One message the sink accepted."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes = attrs.field(repr=False)


def _accept_all(address: str) -> str | None:
    return None


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else arg.strip()


class SinkServer:
    """An in-process SMTP sink on 127.0.0.1; ``async with SinkServer() as s``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        policy: RcptPolicy = _accept_all,
        greeting: str = "220 mailstrom-async sink ready",
    ) -> None:
        self.host = host
        self.port = port
        self.policy = policy
        self.greeting = greeting  # a 4xx/5xx greeting refuses every session
        self.messages: list[CapturedMessage] = []
        self.sessions = 0
        self.received = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> SinkServer:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=_MAX_LINE * 16
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        self.sessions += 1

        async def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        mail_from: str | None = None
        rcpt_to: list[str] = []
        try:
            await reply(self.greeting)
            if not self.greeting.startswith("220"):
                return
            while line := await reader.readline():
                verb, _, arg = line.decode("utf-8", "replace").strip().partition(" ")
                verb = verb.upper()
                if verb == "EHLO":
                    await reply(
                        "250-mailstrom-async sink\r\n250-8BITMIME\r\n"
                        "250-SMTPUTF8\r\n250-PIPELINING\r\n250 SIZE 104857600"
                    )
                elif verb == "HELO":
                    await reply("250 mailstrom-async sink")
                elif verb == "MAIL":
                    mail_from, rcpt_to = _address(arg), []
                    await reply("250 2.1.0 OK")
                elif verb == "RCPT":
                    if mail_from is None:
                        await reply("503 5.5.1 MAIL first")
                        continue
                    address = _address(arg)
                    refusal = self.policy(address)
                    if refusal is None:
                        rcpt_to.append(address)
                        await reply("250 2.1.5 OK")
                    else:
                        await reply(refusal)
                elif verb == "DATA":
                    if not rcpt_to or mail_from is None:
                        await reply("503 5.5.1 RCPT first")
                        continue
                    await reply("354 End data with <CR><LF>.<CR><LF>")
                    data = await self._read_data(reader)
                    self.messages.append(
                        CapturedMessage(mail_from, tuple(rcpt_to), data)
                    )
                    self.received.set()
                    mail_from, rcpt_to = None, []
                    await reply("250 2.0.0 OK queued")
                elif verb == "RSET":
                    mail_from, rcpt_to = None, []
                    await reply("250 2.0.0 OK")
                elif verb == "NOOP":
                    await reply("250 2.0.0 OK")
                elif verb == "QUIT":
                    await reply("221 2.0.0 Bye")
                    break
                else:
                    await reply("502 5.5.2 Command not recognised")
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\n")
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 §4.5.2 dot-stuffing
            lines.append(line)
