"""CaptureServer: a real SMTP server on loopback that captures what it receives."""

from __future__ import annotations

import asyncio
from typing import Any, Self

import attrs

from mailstrom_async._capture import (
    FAST_RETRY,
    OutboxMessage,
    Scripted,
    capture,
)
from mailstrom_async._config import Config, RelayConfig, Timeouts
from mailstrom_async._sink import SinkServer

__all__ = ["CaptureServer"]

_TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)


class CaptureServer(Scripted):
    """An SMTP server on a loopback port that keeps every message it receives.

    Use it as ``async with CaptureServer() as server:`` (or through the
    ``smtp_server`` fixture) and point a Deliverer at it with
    :meth:`relay_config`. Unlike :class:`Outbox`, the mail goes through a real
    SMTP conversation over TCP (ESMTP, PIPELINING, SMTPUTF8; no TLS). The same
    rules (:meth:`defer`, :meth:`fail`, :meth:`disconnect`) script its replies
    to ``RCPT TO``.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self._sink = SinkServer(host=host, port=port, policy=self._answer)
        self._parsed: list[OutboxMessage] = []
        self._running = False

    def __repr__(self) -> str:
        return (
            f"<CaptureServer {self.host}:{self.port} "
            f"messages={len(self._sink.messages)}>"
        )

    async def __aenter__(self) -> Self:
        await self._sink.__aenter__()
        self._running = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._running = False
        await self._sink.__aexit__(*exc_info)

    def _answer(self, address: str) -> str | None:
        answer = self._script.answer(address)
        return None if answer is None else str(answer[1])

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._sink.host

    @property
    def port(self) -> int:
        """The port the server listens on (chosen by the system when 0 was given)."""
        return self._sink.port

    @property
    def sessions(self) -> int:
        """How many SMTP connections the server has accepted."""
        return self._sink.sessions

    @property
    def messages(self) -> list[OutboxMessage]:
        """Every message received since the server started or was cleared."""
        received = self._sink.messages
        for raw in received[len(self._parsed) :]:
            self._parsed.append(capture(raw.mail_from, raw.rcpt_to, raw.data))
        return list(self._parsed)

    def clear(self) -> None:
        """Forget the messages received so far (the scripted replies stay)."""
        self._sink.messages.clear()
        self._parsed.clear()

    async def wait_for(self, count: int = 1) -> list[OutboxMessage]:
        """Wait until the server holds at least *count* messages; return them all.

        It waits for as long as it takes: put a deadline around it, such as
        ``with anyio.fail_after(5):``. It returns as soon as the messages
        arrive, a moment before the Deliverer records their recipients'
        statuses: to check those, await the handle that ``submit()`` returned.

        Raises:
            ValueError: *count* is below 1.
        """
        if count < 1:
            msg = f"wait_for() needs a count >= 1, not {count!r}"
            raise ValueError(msg)
        received: asyncio.Event = self._sink.received
        while len(self._sink.messages) < count:
            received.clear()  # set again by the next message; no await in between
            await received.wait()
        return self.messages

    def relay_config(self, **changes: Any) -> Config:
        """A :class:`~mailstrom_async.Config` that relays to this server.

        Plain SMTP (``tls="none"``), :data:`FAST_RETRY`, 5-second timeouts and
        ``helo_name="localhost"``; *changes* replace any field of the Config.

        Raises:
            RuntimeError: the server is not running (its port is not known yet).
            ConfigError: a changed value is invalid.
            TypeError: a change names no field of Config.
        """
        if not self._running:
            msg = "relay_config() needs the server running: 'async with' it first"
            raise RuntimeError(msg)
        config = Config(
            helo_name="localhost",
            relay=RelayConfig(host=self.host, port=self.port, tls="none"),
            retry=FAST_RETRY,
            timeouts=_TIMEOUTS,
        )
        return attrs.evolve(config, **changes)
