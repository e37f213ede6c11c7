"""Loopback SMTP servers for tests, all on 127.0.0.x and ephemeral ports.

Three kinds, each as an async context manager and as a pytest fixture (a factory
whose servers are closed at teardown):

* :func:`running_smtpd` / fixture ``smtpd``: aiosmtpd in the test's own event loop,
  with a :class:`FaultHandler` that injects faults per test (replies per RCPT
  address, MAIL and final-dot replies, 421-and-close, dropping the connection after
  the final dot, stalling at a stage) and records what it received. STARTTLS and
  implicit TLS, AUTH, SMTPUTF8 on/off are options of ``start()``; the handler's
  ``hide_extensions`` takes keywords (8BITMIME) out of the EHLO reply.
* :func:`running_script_server` / fixture ``script_server``: a byte-level server
  that runs a script per connection (:class:`Conversation`), for what aiosmtpd
  cannot say: 421/554 greetings, garbage banners, no greeting at all, 454 to
  STARTTLS, a broken TLS handshake. :func:`mini_esmtp` is a configurable script.
* :func:`running_smtp_sink` / fixture ``smtp_sink``: Postfix's ``smtp-sink``
  (skipped when not installed). Verified flags: ``-r CMD`` soft-rejects CMD with
  ``450 4.3.0`` (``-b`` sets that reply), ``-f CMD`` hard-rejects with
  ``500 5.3.0`` (``-B``), ``-q CMD`` disconnects after CMD without replying,
  ``-Q CMD`` replies ``421 4.0.0`` and disconnects; CMD may be CONNECT (the
  greeting), HELO, EHLO, MAIL, RCPT, DATA, ``.`` (the final dot), RSET, QUIT.
  ``-r``/``-f`` also turn off PIPELINING. No STARTTLS, no SMTPUTF8.

Callbacks run by asyncio (connection_lost) set ``asyncio.Event`` s; awaiting them
from anyio code on the asyncio backend is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
from asyncio import sslproto
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtpd.smtp
import anyio
import anyio.abc
import pytest
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async._address import recipient_key

__all__ = [
    "SMTP_SINK",
    "Conversation",
    "FaultHandler",
    "Received",
    "SMTPDServer",
    "SMTPDServers",
    "ScriptServer",
    "ScriptServers",
    "SinkServer",
    "SinkServers",
    "WaitableCount",
    "free_port",
    "mini_esmtp",
    "running_script_server",
    "running_smtp_sink",
    "running_smtpd",
    "script_server_fixture",
    "smtp_sink_fixture",
    "smtpd_fixture",
]

SMTP_SINK = "/usr/sbin/smtp-sink"
LOCALHOST = "127.0.0.1"
#: A TLS 1.2 record holding a fatal handshake_failure alert.
TLS_HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"


class WaitableCount:
    """A count that tasks can wait on (``await c.wait_for(n)``); bumped from callbacks."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.value += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, count: int) -> None:
        while self.value < count:
            await self._changed.wait()


# -- aiosmtpd ---------------------------------------------------------------------


@dataclass
class Received:
    """One message whose body the server read to the final dot."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    reply: str | None
    """What the server answered to the final dot (``None``: it hung up)."""


@dataclass
class FaultHandler:
    """aiosmtpd handler: replies as configured, records what it received.

    Replies are full reply lines (``"550 5.1.1 no such user"``). A reply starting
    with 421 is sent and then the connection is closed, as real servers do.
    ``stall_at`` is one of ``"EHLO"``, ``"MAIL"``, ``"RCPT"``, ``"DATA"`` (after the
    final dot, before replying), ``"RSET"``: the server then waits until the client
    hangs up (or teardown); ``stalled`` is set when that happens. Attributes may be
    changed between transactions.
    """

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    """Reply per recipient address: the local part compared exactly, the domain
    case-insensitively (the library's ``recipient_key``), as a real server whose
    mailboxes are case-sensitive does."""
    data_reply: str | None = None
    """Reply to the final dot (default ``250 2.0.0 OK``)."""
    drop_after_dot: bool = False
    """Read the whole message, then close the connection without replying."""
    stall_at: str | None = None
    hide_extensions: frozenset[str] = frozenset()
    """EHLO keywords not advertised, such as ``frozenset({"8BITMIME"})``."""
    pipelining: bool = False
    """Advertise PIPELINING (aiosmtpd does not, though it reads commands in order
    and so answers a pipelined group correctly)."""
    credentials: tuple[str, str] | None = None
    """The only login/password the authenticator accepts."""
    messages: list[Received] = field(default_factory=list)
    received: WaitableCount = field(default_factory=WaitableCount)
    """How many messages arrived (``await handler.received.wait_for(n)``)."""
    rsets: int = 0
    logins: list[str] = field(default_factory=list)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def _stall(self, stage: str) -> None:
        if self.stall_at == stage:
            self.stalled.set()
            await self.release.wait()

    async def _reply_and_close(self, server: aiosmtpd.smtp.SMTP, reply: str) -> str:
        await server.push(reply)
        assert server.transport is not None
        server.transport.close()
        await self.release.wait()  # connection_lost cancels this task
        return reply  # pragma: no cover - only reached at teardown

    async def handle_EHLO(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        await self._stall("EHLO")
        session.host_name = hostname
        if self.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return [r for r in responses if r[4:].split(" ")[0] not in self.hide_extensions]

    async def handle_MAIL(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        await self._stall("MAIL")
        if self.mail_reply is not None:
            if self.mail_reply.startswith("421"):
                return await self._reply_and_close(server, self.mail_reply)
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        await self._stall("RCPT")
        replies = {recipient_key(k): v for k, v in self.rcpt_replies.items()}
        reply = replies.get(recipient_key(address))
        if reply is not None:
            if reply.startswith("421"):
                return await self._reply_and_close(server, reply)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: aiosmtpd.smtp.SMTP, session: Session, envelope: Envelope
    ) -> str:
        reply = None if self.drop_after_dot else self.data_reply or "250 2.0.0 OK"
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                mail_options=list(envelope.mail_options),
                reply=reply,
            )
        )
        self.received.bump()
        await self._stall("DATA")
        if reply is None:
            assert server.transport is not None
            server.transport.close()
            await self.release.wait()  # connection_lost cancels this task
        elif reply.startswith("421"):
            return await self._reply_and_close(server, reply)
        return reply or ""

    async def handle_RSET(  # noqa: N802 - aiosmtpd hook name
        self, server: aiosmtpd.smtp.SMTP, session: Session, envelope: Envelope
    ) -> str:
        await self._stall("RSET")
        self.rsets += 1
        return "250 2.0.0 OK"

    def authenticate(
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.credentials is not None:
            login = auth_data.login.decode()
            if (login, auth_data.password.decode()) == self.credentials:
                self.logins.append(login)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class _RecordingSMTP(aiosmtpd.smtp.SMTP):
    def __init__(self, owner: SMTPDServer, **kwargs: Any) -> None:
        super().__init__(owner.handler, **kwargs)
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._owner.protocols.get(id(self)) is None
        super().connection_made(transport)
        if first:  # not the second call made by STARTTLS
            self._owner.protocols[id(self)] = self
            self._owner.connections.bump()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._owner.disconnections.bump()


@dataclass
class SMTPDServer:
    """A running aiosmtpd server: ``host``, ``port``, its ``handler``."""

    handler: FaultHandler
    host: str = LOCALHOST
    port: int = 0
    protocols: dict[int, _RecordingSMTP] = field(default_factory=dict)
    connections: WaitableCount = field(default_factory=WaitableCount)
    """Connections accepted so far (``.value``; ``await .wait_for(n)``)."""
    disconnections: WaitableCount = field(default_factory=WaitableCount)
    """Connections closed so far, by either side."""

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


@contextlib.asynccontextmanager
async def running_smtpd(
    handler: FaultHandler | None = None,
    *,
    host: str = LOCALHOST,
    port: int = 0,
    starttls_context: ssl.SSLContext | None = None,
    implicit_tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    smtputf8: bool = True,
    auth_require_tls: bool = True,
) -> AsyncIterator[SMTPDServer]:
    """Run aiosmtpd on *host*, an ephemeral port, in the current event loop.

    ``starttls_context`` offers STARTTLS with that server context;
    ``implicit_tls_context`` speaks TLS from the first byte instead. AUTH (PLAIN,
    LOGIN) is offered over TLS, or always with ``auth_require_tls=False``; it accepts
    ``handler.credentials`` only.
    """
    server = SMTPDServer(handler=handler or FaultHandler(), host=host)
    loop = asyncio.get_running_loop()

    def factory() -> _RecordingSMTP:
        return _RecordingSMTP(
            server,
            hostname="smtpd.test",
            ident="aiosmtpd-test",
            enable_SMTPUTF8=smtputf8,
            tls_context=starttls_context,
            require_starttls=require_starttls,
            auth_require_tls=auth_require_tls,
            authenticator=server.handler.authenticate,
            loop=loop,
        )

    def tls_factory() -> asyncio.BaseProtocol:
        # What create_server(ssl=...) does, minus the handshake waiter that reports
        # every failed handshake to the loop's exception handler in debug mode.
        assert implicit_tls_context is not None
        return sslproto.SSLProtocol(
            loop,
            factory(),
            implicit_tls_context,
            None,  # type: ignore[arg-type]  # no waiter, see above
            server_side=True,
        )

    listener = await loop.create_server(
        factory if implicit_tls_context is None else tls_factory, host, port
    )
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        server.handler.release.set()
        protocols = list(server.protocols.values())
        for protocol in protocols:
            transport = protocol.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
        await listener.wait_closed()
        tasks = [p._handler_coroutine for p in protocols if p._handler_coroutine]
        if tasks:
            await asyncio.wait(tasks)


class SMTPDServers:
    """``await smtpd.start(handler, **options)`` -> :class:`SMTPDServer`."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    async def start(
        self, handler: FaultHandler | None = None, **options: Any
    ) -> SMTPDServer:
        return await self._stack.enter_async_context(running_smtpd(handler, **options))


@pytest.fixture(name="smtpd")
async def smtpd_fixture() -> AsyncIterator[SMTPDServers]:
    """Factory of aiosmtpd servers, closed at teardown."""
    async with contextlib.AsyncExitStack() as stack:
        yield SMTPDServers(stack)


# -- byte-level scripted server ------------------------------------------------------


class Conversation:
    """One connection to a :class:`ScriptServer`, as seen by its script."""

    def __init__(
        self, stream: anyio.abc.SocketStream, server: ScriptServer, index: int
    ) -> None:
        self.stream = stream
        self.server = server
        self.index = index
        """0 for the first connection to the server, 1 for the next, ..."""
        self._receive = BufferedByteReceiveStream(stream)

    async def send(self, *lines: str | bytes) -> None:
        """Send each line followed by CRLF (a str in UTF-8, bytes as they are)."""
        await self.stream.send(b"".join(_wire(line) + b"\r\n" for line in lines))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def readline(self) -> str | None:
        """The next line without CRLF (recorded in ``server.lines``); None at EOF."""
        try:
            line = await self._receive.receive_until(b"\r\n", 65536)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            return None
        text = line.decode("utf-8", "replace")
        self.server.lines.append(text)
        return text

    async def read_data(self) -> bytes | None:
        """Read a DATA body up to the final dot (returned without it)."""
        lines: list[bytes] = []
        while True:
            try:
                line = await self._receive.receive_until(b"\r\n", 1 << 20)
            except (anyio.IncompleteRead, anyio.EndOfStream):
                return None
            if line == b".":
                return b"".join(x + b"\r\n" for x in lines)
            lines.append(line[1:] if line.startswith(b".") else line)

    async def receive_some(self) -> bytes:
        """Whatever bytes come next (such as a TLS ClientHello)."""
        return await self._receive.receive()

    async def fail_tls_handshake(self) -> None:
        """After a 220 to STARTTLS: take the ClientHello, answer with a fatal alert."""
        await self.receive_some()
        await self.send_raw(TLS_HANDSHAKE_FAILURE_ALERT)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Ignore input until the client hangs up."""
        while await self.readline() is not None:
            pass


Script = Callable[[Conversation], Awaitable[None]]


def _wire(line: str | bytes) -> bytes:
    return line.encode() if isinstance(line, str) else line


async def mini_esmtp(
    conv: Conversation,
    *,
    greeting: str | bytes = "220 bytes.test ESMTP",
    extensions: Sequence[str | bytes] = ("PIPELINING", "8BITMIME", "STARTTLS"),
    replies: Mapping[str, str | bytes] | None = None,
    stall_at: str | None = None,
) -> None:
    """A tiny ESMTP server: *replies* overrides the reply to a verb (``"STARTTLS"``).

    Greeting, extensions and replies are lines without CRLF: a str is sent in
    UTF-8, bytes as they are (for replies that are not UTF-8).
    A greeting or reply starting with 421 closes the connection after it is sent.
    ``stall_at`` a verb (or ``"DATA-END"``, after the final dot): no reply, wait for
    the client to hang up. Messages land in ``server.messages``.
    """
    replies = replies or {}
    await conv.send(greeting)
    if _wire(greeting).startswith(b"421"):
        return
    while (line := await conv.readline()) is not None:
        verb = line.split(" ", 1)[0].upper()
        if verb == stall_at:
            await conv.wait_closed()
            return
        if verb in replies:
            await conv.send(replies[verb])
            if _wire(replies[verb]).startswith(b"421"):
                return
        elif verb == "EHLO":
            ehlo = [b"bytes.test", *map(_wire, extensions)]
            await conv.send(*[b"250-" + x for x in ehlo[:-1]], b"250 " + ehlo[-1])
        elif verb == "DATA":
            await conv.send("354 go ahead")
            body = await conv.read_data()
            if body is None or stall_at == "DATA-END":
                await conv.wait_closed()
                return
            conv.server.messages.append(body)
            await conv.send("250 2.0.0 queued")
        elif verb == "QUIT":
            await conv.send("221 2.0.0 bye")
            return
        else:
            await conv.send("250 2.0.0 OK")


@dataclass
class ScriptServer:
    """A running scripted server; ``lines`` are all the lines clients sent."""

    script: Script
    host: str = LOCALHOST
    port: int = 0
    lines: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: WaitableCount = field(default_factory=WaitableCount)
    disconnections: WaitableCount = field(default_factory=WaitableCount)
    """Conversations whose script has ended (the socket is then closed)."""

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        index = self.connections.value
        self.connections.bump()
        try:
            async with stream:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await self.script(Conversation(stream, self, index))
        finally:
            self.disconnections.bump()

    async def serve(self, task_group: anyio.abc.TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self.port
        )
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610

        async def serve() -> None:
            async with listener:
                await listener.serve(self._handle, task_group)

        task_group.start_soon(serve)


@contextlib.asynccontextmanager
async def running_script_server(
    script: Script, *, host: str = LOCALHOST
) -> AsyncIterator[ScriptServer]:
    """Run *script* for every connection to a new server on *host*."""
    server = ScriptServer(script=script, host=host)
    async with anyio.create_task_group() as tg:
        await server.serve(tg)
        yield server
        tg.cancel_scope.cancel()


class ScriptServers:
    """``await script_server.start(script)`` -> :class:`ScriptServer`."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    async def start(
        self, script: Script, *, host: str = LOCALHOST, port: int = 0
    ) -> ScriptServer:
        server = ScriptServer(script=script, host=host, port=port)
        await server.serve(self._task_group)
        return server


@pytest.fixture(name="script_server")
async def script_server_fixture() -> AsyncIterator[ScriptServers]:
    """Factory of scripted byte-level servers, stopped at teardown."""
    async with anyio.create_task_group() as tg:
        yield ScriptServers(tg)
        tg.cancel_scope.cancel()


# -- Postfix smtp-sink ---------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class SinkServer:
    host: str
    port: int
    flags: tuple[str, ...]


@contextlib.asynccontextmanager
async def running_smtp_sink(
    *flags: str, host: str = LOCALHOST
) -> AsyncIterator[SinkServer]:
    """Run ``smtp-sink [flags] host:port 100``; skip the test if it is missing."""
    if not os.access(SMTP_SINK, os.X_OK):
        reason = f"{SMTP_SINK} is not installed (Debian package 'postfix')"
        if os.environ.get("TESTS_REQUIRE_SMTP_SINK"):
            pytest.fail(reason)  # CI installs it: a missing sink is an error there
        pytest.skip(reason)
    port = free_port(host)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    command = [SMTP_SINK, *user, *flags, f"{host}:{port}", "100"]
    async with await anyio.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as process:
        try:
            with anyio.fail_after(10):
                while True:  # smtp-sink says nothing when it is ready: try to connect
                    if process.returncode is not None:
                        pytest.fail(f"smtp-sink exited with {process.returncode}")
                    try:
                        stream = await anyio.connect_tcp(host, port)
                    except OSError:
                        await anyio.sleep(0.01)
                    else:
                        await stream.aclose()
                        break
            yield SinkServer(host=host, port=port, flags=flags)
        finally:
            process.kill()


class SinkServers:
    """``await smtp_sink.start("-r", "RCPT")`` -> :class:`SinkServer`."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    async def start(self, *flags: str, host: str = LOCALHOST) -> SinkServer:
        return await self._stack.enter_async_context(
            running_smtp_sink(*flags, host=host)
        )


@pytest.fixture(name="smtp_sink")
async def smtp_sink_fixture() -> AsyncIterator[SinkServers]:
    """Factory of smtp-sink processes, killed at teardown."""
    async with contextlib.AsyncExitStack() as stack:
        yield SinkServers(stack)
