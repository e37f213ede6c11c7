"""A fast loopback SMTP sink that soft-rejects some recipients once.

``python -m bench.softsink PORT`` listens on 127.0.0.1:PORT. A recipient whose
local part starts with ``soft-`` gets ``450 4.2.1`` on its first RCPT and is
accepted on every later one (the sink remembers addresses); every other
recipient is accepted at once. Messages are discarded. It speaks just enough
ESMTP for aiosmtplib (EHLO, HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), works on
raw bytes with no per-line allocation beyond splitting, and handles pipelined
commands. It runs in a process of its own so that its CPU is not the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

__all__ = ["SoftRejectSink", "main"]

_EHLO = (
    b"250-bench.softsink\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250-SMTPUTF8\r\n250 PIPELINING\r\n"
)
_END_OF_DATA = b"\r\n.\r\n"
_START_DATA = b"354 go ahead\r\n"


class _Session(asyncio.Protocol):
    def __init__(self, seen: set[bytes], counters: dict[str, int]) -> None:
        self._seen = seen
        self._counters = counters
        self._buffer = b""
        self._in_data = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101
        self._transport = transport
        transport.write(b"220 bench.softsink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data
        replies: list[bytes] = []
        while buf:
            if self._in_data:
                # The CRLF ending the DATA line was put back in front of the
                # body, so even an empty message ends with "\r\n.\r\n".
                end = buf.find(_END_OF_DATA)
                if end < 0:
                    # Keep only what could be the start of the terminator.
                    buf = buf[-4:]
                    break
                buf = buf[end + len(_END_OF_DATA) :]
                self._in_data = False
                self._counters["messages"] += 1
                replies.append(b"250 2.0.0 queued\r\n")
                continue
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            line, buf = buf[:line_end], buf[line_end + 2 :]
            reply = self._command(line)
            replies.append(reply)
            if reply is _START_DATA:
                # DATA's 354 prepared; the terminator search needs the CRLF that
                # ended the DATA line as the start of "\r\n.\r\n".
                buf = b"\r\n" + buf
        self._buffer = buf
        if replies and self._transport is not None:
            self._transport.write(b"".join(replies))
            if replies[-1].startswith(b"221"):
                self._transport.close()

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"RCPT":
            start, end = line.find(b"<"), line.find(b">")
            address = line[start + 1 : end].lower() if 0 <= start < end else b""
            if address.startswith(b"soft-") and address not in self._seen:
                self._seen.add(address)
                self._counters["soft_rejects"] += 1
                return b"450 4.2.1 try again later\r\n"
            return b"250 2.1.5 ok\r\n"
        if verb == b"MAIL":
            return b"250 2.1.0 ok\r\n"
        if verb == b"DATA":
            self._in_data = True
            return _START_DATA
        if verb == b"EHLO":
            return _EHLO
        if verb in (b"HELO", b"RSET", b"NOOP"):
            return b"250 ok\r\n"
        if verb == b"QUIT":
            return b"221 bye\r\n"
        return b"502 5.5.2 command not recognised\r\n"


class SoftRejectSink:
    """The sink; ``await serve(port)`` runs until cancelled."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.counters = {"messages": 0, "soft_rejects": 0}

    async def serve(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Session(self.seen, self.counters),
            "127.0.0.1",
            port,
            backlog=1000,
            reuse_address=True,
        )
        async with server:
            await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    sink = SoftRejectSink()

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await sink.serve(port)

    asyncio.run(run())


if __name__ == "__main__":
    main()
