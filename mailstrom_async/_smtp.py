"""One SMTP session over aiosmtplib: connect, EHLO, TLS policy, AUTH, transactions.

The only aiosmtplib importer: its (and socket/TLS) errors become
:class:`TransientDeliveryError` subclasses, ``from`` the original. TLS modes:
``implicit``/``starttls`` (relay) and ``required`` (MX) must get TLS or raise
:class:`TLSRequiredError`; ``none`` never tries it. ``required`` verifies only if
``ssl_context`` does (``None``: encrypt-only, Postfix's ``encrypt``).
``opportunistic`` (MX, RFC 7435) uses STARTTLS when offered; a 454 to STARTTLS
goes on in plain text, and a TLS handshake that fails for another reason than the
certificate goes on in plain text on a new connection.

Verification (``required``/``opportunistic`` with a verifying context): the
handshake is verified; when only the certificate fails (untrusted chain, wrong
name, expired), the session is made again on a new connection, encrypted and not
verified (``tls_verified=False``), and the host is remembered in the route's
:class:`TLSMemory` for :data:`UNVERIFIED_TTL`: its next sessions make one
unverified handshake on one connection. (The stdlib cannot verify a chain after a
handshake that did not: Python before 3.13 cannot even read the chain, and none
has an X.509 verifier, so remembering is the portable way to one handshake.)
Every failure while opening (5xx greeting, refused AUTH included) is transient: MX
delivery tries the next host, and a misconfigured relay defers mail, never loses it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import aiosmtplib
import anyio
import anyio.to_thread
import attrs
from aiosmtplib.protocol import SMTPProtocol

from mailstrom_async._classify import (
    RecipientOutcome,
    classify_data,
    classify_rcpt,
    make_reply,
    outcomes_from_error,
)
from mailstrom_async._config import DEFAULT_TIMEOUTS, RelayTLS, Timeouts
from mailstrom_async._downgrade import (
    THREAD_OCTETS,
    NotDowngradableError,
    downgrade,
    is_8bit,
)
from mailstrom_async._exceptions import (
    ConfigError,
    ConnectError,
    DeliveryError,
    DeliveryTimeoutError,
    ProtocolError,
    TemporaryRejectionError,
    TLSRequiredError,
    TransientDeliveryError,
)
from mailstrom_async._models import RecipientState, SMTPReply
from mailstrom_async._render import crlf_only

if TYPE_CHECKING:
    from mailstrom_async._config import Config

__all__ = [
    "UNVERIFIED_TTL",
    "ConnectionSettings",
    "SMTPConnection",
    "TLSMemory",
    "TLSMode",
    "make_ssl_context",
    "mx_settings",
    "relay_settings",
]

_log = logging.getLogger("mailstrom_async.smtp")
_FAILED = RecipientState.FAILED

#: Deadline for the polite QUIT of :meth:`SMTPConnection.aclose`, in seconds.
_QUIT_TIMEOUT = 2.0

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f<>]")


class TLSMode(enum.StrEnum):
    """How a connection uses TLS (see the module docstring)."""

    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"


def _to_tls_mode(value: str) -> TLSMode:
    return TLSMode(str(value))


@attrs.frozen(kw_only=True)
class ConnectionSettings:
    """Where and how to open an SMTP session. The password never appears in reprs."""

    host: str
    """Host name to connect to (and to verify the certificate against)."""
    port: int
    tls: TLSMode = attrs.field(converter=_to_tls_mode)
    """A :class:`TLSMode` (``RelayTLS`` and ``MXTLSPolicy`` values are accepted)."""
    ssl_context: ssl.SSLContext | None = None
    """Client context built once by the caller (:func:`make_ssl_context`); needed
    for ``implicit``/``starttls``; for ``required``/``opportunistic``, ``None``
    means encrypt without verifying."""
    helo_name: str
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    server_hostname: str | None = None
    """Name for SNI and certificate checks when it differs from ``host``."""

    def __attrs_post_init__(self) -> None:
        if self.ssl_context is None and self.tls in (
            TLSMode.IMPLICIT,
            TLSMode.STARTTLS,
        ):
            msg = f"tls={self.tls.value!r} needs an ssl_context (see make_ssl_context)"
            raise ConfigError(msg, "ssl_context")
        if (self.username is None) != (self.password is None):
            msg = "username and password must be given together"
            raise ConfigError(msg, "password")

    @property
    def tls_name(self) -> str:
        """The name used for SNI and certificate verification."""
        return self.server_hostname or self.host


def make_ssl_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """A new client TLS context: verifying (system CAs, or only *ca_file*) or not.

    Reads CA files from disk: call it once at startup, not per connection.

    Raises:
        ConfigError: *ca_file* cannot be read or holds no certificates.
    """
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        msg = f"cannot load CA certificates from {ca_file!r}: {exc}"
        raise ConfigError(msg, "ca_file") from exc


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    # Encrypt-only, for opportunistic/required MX TLS; shared, never handed out.
    return make_ssl_context(False)


def _verifies(ctx: ssl.SSLContext) -> bool:
    return ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def relay_settings(
    config: Config, helo_name: str, ssl_context: ssl.SSLContext | None = None
) -> ConnectionSettings:
    """Settings for the relay in *config*; builds the TLS context if none is given."""
    relay = config.relay
    if relay is None:
        msg = "the configuration has no relay"
        raise ConfigError(msg, "relay")
    if ssl_context is None and relay.tls is not RelayTLS.NONE:
        ssl_context = make_ssl_context(relay.verify, relay.ca_file)
    return ConnectionSettings(
        host=relay.host,
        port=relay.port,
        tls=relay.tls,
        ssl_context=ssl_context,
        helo_name=helo_name,
        username=relay.username,
        password=relay.password,
        timeouts=config.timeouts,
    )


def mx_settings(
    config: Config, host: str, helo_name: str, ssl_context: ssl.SSLContext | None
) -> ConnectionSettings:
    """Settings for the MX host *host* as ``config.mx`` says."""
    return ConnectionSettings(
        host=host,
        port=config.mx.port,
        tls=config.mx.tls,
        ssl_context=ssl_context,
        helo_name=helo_name,
        timeouts=config.timeouts,
    )


class _TLSFallbackError(Exception):
    """The STARTTLS handshake failed (``required``/``opportunistic``): :meth:`open`
    decides whether a new connection tries again, or raises ``error``."""

    def __init__(self, error: TransientDeliveryError, *, unverifiable: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.unverifiable = unverifiable
        """Only the certificate failed (chain, name or dates)."""


#: How long a host whose certificate did not verify is remembered, in seconds.
UNVERIFIED_TTL = 3600.0
_MAX_REMEMBERED = 10_000

#: (name verified against, address connected to, port)
_TLSKey = tuple[str, str, int]


class TLSMemory:
    """The hosts whose certificate did not verify, each for *ttl* seconds.

    A remembered host's sessions go straight to an encrypted, unverified
    handshake: one TCP connection instead of a verified handshake that fails and
    a second connection. When the entry expires, the next session tries to
    verify again (a host may have fixed its certificate). Bounded: past
    10,000 hosts the oldest entry is forgotten. *clock* is
    ``anyio.current_time`` unless a test passes its own.
    """

    def __init__(
        self,
        ttl: float = UNVERIFIED_TTL,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._until: dict[_TLSKey, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def unverifiable(self, key: _TLSKey) -> bool:
        """True while *key*'s certificate is remembered as not verifying."""
        until = self._until.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[key]
        return False

    def remember(self, key: _TLSKey) -> None:
        """*key*'s certificate did not verify (now)."""
        self._until.pop(key, None)
        while len(self._until) >= _MAX_REMEMBERED:
            del self._until[next(iter(self._until))]  # the oldest
        self._until[key] = self._clock() + self._ttl


def _reply(exc: aiosmtplib.SMTPResponseException) -> SMTPReply:
    return make_reply(exc.code, exc.message)


def _local_reply(code: int, enhanced: str, text: str) -> SMTPReply:
    """A refusal decided here, not by the server: *code* only classifies it
    (4xx/5xx), it is never shown (see :attr:`SMTPReply.local`)."""
    return SMTPReply(code=code, enhanced_code=enhanced, text=text, local=True)


def _os_reason(exc: OSError) -> str:
    """What went wrong, said once: ``"connection refused"``, not asyncio's
    ``"[Errno 111] Connect call failed ('127.0.0.1', 25)"``."""
    if isinstance(exc.errno, int) and exc.errno > 0:
        text = os.strerror(exc.errno)  # asyncio puts its own words in strerror
        return text[:1].lower() + text[1:] if text[1:2].islower() else text
    return exc.strerror or str(exc) or type(exc).__name__  # gaierror: its own


def _tls_reason(exc: ssl.SSLError) -> str:
    """A TLS failure without OpenSSL's ``[SSL: ...]`` and ``(_ssl.c:1006)``."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc)


def _connect_reason(exc: BaseException) -> str:
    """The cause of a failed connect, whatever aiosmtplib wrapped around it."""
    cause = exc.__cause__ if isinstance(exc, aiosmtplib.SMTPConnectError) else exc
    if isinstance(cause, aiosmtplib.SMTPServerDisconnected):
        return "the server closed the connection before its greeting"
    if isinstance(cause, OSError):
        return _os_reason(cause)
    return str(exc)


def _outcome(
    address: str, reply: SMTPReply | None, state: RecipientState = _FAILED
) -> RecipientOutcome:
    return RecipientOutcome(address=address, state=state, reply=reply)


def _sendable(address: str) -> bool:
    """True if *address* can go on a MAIL/RCPT line as ``<address>``, unambiguously.

    Addresses are written exactly as given (never re-quoted or rewritten), so
    only what would break the command line is refused: control characters,
    spaces (they separate parameters) and angle brackets.
    """
    return _UNSENDABLE.search(address) is None


def _encode_body(data: bytes) -> bytes:
    """CRLF line endings, a final CRLF (no dot-stuffing yet)."""
    if not crlf_only(data):
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end == -1 else data[:end]


def _try_downgrade(data: bytes) -> bytes | str:
    """:func:`downgrade` *data*; the reason as a string if it cannot be."""
    try:
        return _encode_body(downgrade(data))
    except NotDowngradableError as exc:
        return str(exc)


def _dot_stuffed(body: bytes) -> bytes:
    """RFC 5321 §4.5.2: double a dot that starts a line."""
    if body.startswith(b".") or b"\n." in body:
        return _LEADING_DOT.sub(b"..", body)
    return body


#: Bounds of one reply line and of one whole (multiline) reply, as aiosmtplib's.
_MAX_REPLY_LINE = 8192
_MAX_REPLY = 4 * _MAX_REPLY_LINE

_Response = aiosmtplib.SMTPResponse


class _Replies(asyncio.Protocol):
    """The replies to pipelined commands (RFC 2920), read one by one, in order.

    aiosmtplib's ``SMTPProtocol`` holds one reply at a time: it parses one reply
    per ``data_received`` and drops data that arrives while a parsed reply waits
    to be read, so the replies to a group of commands would be lost or stuck in
    its buffer. While a pipelined transaction runs, this protocol stands in for
    it on the transport (:meth:`attach`, ``transport.set_protocol``): it keeps
    every byte, parses every complete reply, and passes connection loss and
    flow control on to the ``SMTPProtocol``, which gets the transport back at
    the end. Replies that came before the connection was lost are still read;
    then the loss (or a garbled reply) is raised.
    """

    def __init__(self, inner: SMTPProtocol) -> None:
        self._inner = inner
        self._buffer = bytearray()
        self._replies: collections.deque[_Response] = collections.deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.BaseTransport | None = None

    @property
    def inner(self) -> SMTPProtocol:
        """The aiosmtplib protocol stood in for (it writes the commands)."""
        return self._inner

    @classmethod
    def attach(cls, inner: SMTPProtocol) -> _Replies:
        """Stand in for *inner* on its transport, until :meth:`detach`."""
        transport = inner.transport
        if transport is None or transport.is_closing():
            msg = "Connection lost"
            raise aiosmtplib.SMTPServerDisconnected(msg)
        replies = cls(inner)
        replies._transport = transport
        transport.set_protocol(replies)
        return replies

    def detach(self) -> None:
        """Give the transport back to the aiosmtplib protocol."""
        transport = self._transport
        if transport is not None and transport.get_protocol() is self:
            transport.set_protocol(self._inner)
        self._transport = None

    # -- asyncio.Protocol -----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._error = exc
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        self._inner.connection_lost(exc)  # aiosmtplib closes its client

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- reading --------------------------------------------------------------

    async def read_response(self, timeout: float | None) -> _Response:  # noqa: ASYNC109 - SMTPProtocol's signature
        """The next reply; raises the loss or garble that stopped the replies, or
        ``SMTPReadTimeoutError`` when none is complete within *timeout*."""
        if self._replies:  # there already (a pipelined group's replies come
            return self._replies.popleft()  # together): no timer to set
        try:
            with anyio.fail_after(timeout):
                while not self._replies:
                    if self._error is not None:
                        raise self._error
                    waiter = self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await waiter
                    finally:
                        self._waiter = None
        except TimeoutError as exc:
            if isinstance(exc, aiosmtplib.SMTPException):
                raise  # an SMTPReadTimeoutError of the transport's own
            msg = "Timed out waiting for server response"
            raise aiosmtplib.SMTPReadTimeoutError(msg) from exc
        return self._replies.popleft()

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _parse(self) -> None:
        """Move every complete reply out of the buffer (RFC 5321 §4.2)."""
        buffer, start = self._buffer, 0
        while True:
            offset, texts, code = start, [], -1
            complete = False
            while (end := buffer.find(b"\n", offset)) != -1:
                line = bytes(buffer[offset : end + 1])
                offset = end + 1
                if len(line) > _MAX_REPLY_LINE:
                    msg = "Response too long"
                    raise aiosmtplib.SMTPResponseException(-1, msg)
                if not line[:3].isdigit():
                    text = line.decode("utf-8", "replace").rstrip()
                    msg = f"Malformed SMTP response line: {text}"
                    raise aiosmtplib.SMTPResponseException(-1, msg)
                code = int(line[:3])
                texts.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    complete = True
                    break
            if not complete:
                break
            message = b"\n".join(texts).decode("utf-8", "surrogateescape")
            self._replies.append(_Response(code, message))
            start = offset
        del buffer[:start]
        if len(buffer) > _MAX_REPLY:
            msg = "Response too long"
            raise aiosmtplib.SMTPResponseException(-1, msg)


_NO_LOCK = contextlib.nullcontext()


@attrs.define
class _Group:
    """One pipelined group of commands and the replies to it, as far as they came."""

    stages: list[str]
    """The commands' verbs, in order (``RSET``, ``MAIL``, ``RCPT``..., ``DATA``)."""
    replies: list[_Response] = attrs.Factory(list)
    lost: aiosmtplib.SMTPException | OSError | None = None
    """What stopped the replies before the last one came."""

    @classmethod
    def of(cls, commands: list[bytes]) -> _Group:
        return cls([c.split(b" ", 1)[0].decode("ascii") for c in commands])

    @property
    def reset(self) -> bool:
        return self.stages[0] == "RSET"

    @property
    def data_code(self) -> int | None:
        """The reply code to DATA, the last command (``None``: it never came)."""
        if len(self.replies) == len(self.stages) and self.stages[-1] == "DATA":
            return self.replies[-1].code
        return None

    async def read(self, replies: _Replies, timeouts: Timeouts) -> None:
        """Read one reply per command; stop at the first loss, garble or timeout."""
        for stage in self.stages:
            timeout = timeouts.data_start if stage == "DATA" else timeouts.command
            try:
                self.replies.append(await replies.read_response(timeout))
            except (aiosmtplib.SMTPException, OSError) as exc:
                self.lost = exc
                return


def _reply_of(response: _Response) -> SMTPReply:
    return make_reply(response.code, response.message)


def _unsendable(address: str) -> RecipientOutcome:
    return _outcome(address, _local_reply(553, "5.1.3", "the address cannot be sent"))


def _mail_refused(rcpts: Sequence[str], reply: SMTPReply) -> list[RecipientOutcome]:
    """Every recipient's outcome when MAIL is refused with *reply* (not 421)."""
    state = _FAILED if reply.is_permanent else RecipientState.DEFERRED
    return [_outcome(a, reply, state) for a in rcpts]


class SMTPConnection:
    """One open SMTP session, owned by one task at a time. Build it with :meth:`open`.

    An exception or cancellation inside :meth:`open` or :meth:`send` closes the
    connection without QUIT; afterwards ``is_usable`` is False.
    """

    def __init__(self, settings: ConnectionSettings, ip: str | None) -> None:
        self._settings = settings
        self._ip = ip
        self._smtp = aiosmtplib.SMTP(
            local_hostname=settings.helo_name, timeout=settings.timeouts.command
        )
        self._sock: socket.socket | None = None
        self._closed = False
        self._tls = False
        self._tls_verified = False
        self._extensions: dict[str, str] = {}
        self._transactions = 0
        self._dot_unconfirmed = False
        # RFC 5321 §4.1.1.4: the reply to the final dot ends a transaction and the
        # server resets its state; only a transaction that ended earlier (MAIL or
        # every RCPT refused, DATA refused) needs an RSET before the next one.
        self._needs_reset = False
        self._last_used = anyio.current_time()
        # The last 7-bit re-encoding made: (the data, its result or why not).
        self._downgraded: tuple[bytes, bytes | str] | None = None

    def __repr__(self) -> str:
        return (
            f"<SMTPConnection {self.host}:{self.port} ip={self.ip} tls={self._tls} "
            f"usable={self.is_usable} transactions={self._transactions}>"
        )

    @property
    def host(self) -> str:
        return self._settings.host

    @property
    def ip(self) -> str | None:
        """The address connected to."""
        return self._ip

    @property
    def port(self) -> int:
        return self._settings.port

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def tls_verified(self) -> bool:
        """TLS is on, and the certificate chain and name were verified."""
        return self._tls_verified

    @property
    def transactions(self) -> int:
        """MAIL commands sent on this connection."""
        return self._transactions

    @property
    def last_used(self) -> float:
        """``anyio.current_time()`` at the end of the last open/send."""
        return self._last_used

    @property
    def final_dot_unconfirmed(self) -> bool:
        """The last send was cancelled after its final dot went out: the server may
        have the message (record ``possible_duplicate``)."""
        return self._dot_unconfirmed

    @property
    def supports_smtputf8(self) -> bool:
        return "smtputf8" in self._extensions

    @property
    def supports_pipelining(self) -> bool:
        return "pipelining" in self._extensions

    @property
    def is_usable(self) -> bool:
        """False once closed, poisoned by an error, or dropped by the server."""
        return not self._closed and self._smtp.is_connected

    def _extra(self, **fields: Any) -> dict[str, Any]:
        return {
            "host": self.host,
            "ip": self._ip,
            "port": self.port,
        } | fields

    # -- opening ---------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        settings: ConnectionSettings,
        *,
        ip: str | None = None,
        tls_memory: TLSMemory | None = None,
    ) -> SMTPConnection:
        """Connect to *ip* (or ``settings.host``): greeting, EHLO, TLS, AUTH.

        *tls_memory* remembers hosts whose certificate does not verify, so that
        their next sessions need one connection (see the module docstring).

        Raises:
            ConnectError: refused, unreachable or reset.
            DeliveryTimeoutError: the connect, greeting or a command timed out.
            TemporaryRejectionError: a 4xx/5xx greeting, EHLO/HELO refused, AUTH
                refused or not offered.
            TLSRequiredError: TLS is mandatory and was not had (not offered, 454,
                handshake or certificate failure).
            ProtocolError: garbled reply, or the server hung up.
        """
        key = (settings.tls_name, ip or settings.host, settings.port)
        remembered = tls_memory is not None and tls_memory.unverifiable(key)
        ctx = _first_context(settings, unverifiable=remembered)
        while True:
            conn = cls(settings, ip)
            try:
                await conn._setup(ctx)
            except _TLSFallbackError as exc:
                conn.close_now()
                plan = _fallback(settings, ctx, unverifiable=exc.unverifiable)
                if not plan:
                    error = exc.error
                    error.ip = error.ip or conn._ip
                    raise error from exc.__cause__
                if exc.unverifiable and tls_memory is not None:
                    tls_memory.remember(key)
                [ctx] = plan
                _log.info(
                    "TLS handshake failed, trying again on a new connection: %s",
                    exc,
                    extra=conn._extra(
                        fallback="plain" if ctx is None else "unverified"
                    ),
                )
                continue
            except BaseException as exc:
                conn.close_now()
                if isinstance(exc, DeliveryError) and exc.ip is None:
                    exc.ip = conn._ip  # where this attempt went, for the status
                raise
            return conn

    async def _setup(self, ctx: ssl.SSLContext | None) -> None:
        settings, smtp = self._settings, self._smtp
        implicit = settings.tls is TLSMode.IMPLICIT
        target = self._ip or settings.host
        direct = not implicit or target == settings.tls_name
        with self._mapped("connect"):
            if not direct:  # verify against the host name, connect to the address
                self._sock = await self._connect_socket(target)
            await smtp.connect(
                hostname=target if direct else settings.tls_name,
                port=settings.port if direct else None,
                sock=self._sock,
                use_tls=implicit,
                start_tls=False,
                tls_context=ctx,
                timeout=settings.timeouts.connect,
            )
            self._ip = smtp.get_transport_info("peername")[0]
        if implicit and ctx is not None:
            self._tls, self._tls_verified = True, _verifies(ctx)
        await self._hello()
        if ctx is not None and settings.tls in _STARTTLS_MODES:
            await self._starttls(ctx)
        if settings.username is not None and settings.password is not None:
            await self._login(settings.username, settings.password)
        self._last_used = anyio.current_time()
        _log.debug(
            "connected",
            extra=self._extra(tls=self._tls, tls_verified=self._tls_verified),
        )

    async def _connect_socket(self, ip: str) -> socket.socket:
        v6 = ipaddress.ip_address(ip).version == 6
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
        sock.setblocking(False)
        try:
            with anyio.fail_after(self._settings.timeouts.connect):
                await asyncio.get_running_loop().sock_connect(sock, (ip, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _hello(self) -> None:
        smtp = self._smtp
        with self._mapped("EHLO"):
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError as exc:
                if exc.code == 421 or not smtp.is_connected:
                    raise
                await smtp.helo()
        self._extensions = dict(smtp.esmtp_extensions)

    async def _starttls(self, ctx: ssl.SSLContext) -> None:
        settings, smtp = self._settings, self._smtp
        mandatory = settings.tls is not TLSMode.OPPORTUNISTIC
        if not smtp.supports_extension("starttls"):
            if mandatory:
                msg = f"{self.host} does not offer STARTTLS, and TLS is required"
                raise TLSRequiredError(msg, host=self.host)
            return
        try:
            await smtp.starttls(
                server_hostname=settings.tls_name,
                tls_context=ctx,
                timeout=settings.timeouts.connect,
            )
        except aiosmtplib.SMTPResponseException as exc:
            reply = _reply(exc)
            if mandatory or exc.code == 421 or not smtp.is_connected:
                msg = f"{self.host} refused STARTTLS: {reply}"
                raise TLSRequiredError(msg, reply=reply, host=self.host) from exc
            _log.info(
                "STARTTLS refused, continuing in plain text",
                extra=self._extra(reply=str(reply)),
            )
            return
        except ssl.SSLError as exc:
            error = self._error(exc, "STARTTLS")
            if settings.tls in _MX_TLS_MODES:  # open() may try again
                unverifiable = isinstance(exc, ssl.SSLCertVerificationError)
                raise _TLSFallbackError(error, unverifiable=unverifiable) from exc
            raise error from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._error(exc, "STARTTLS") from exc
        self._tls, self._tls_verified = True, _verifies(ctx)
        await self._hello()

    async def _login(self, username: str, password: str) -> None:
        smtp = self._smtp
        if not smtp.supports_extension("auth"):
            msg = f"{self.host} does not offer AUTH, and credentials are configured"
            raise TemporaryRejectionError(msg, host=self.host)
        try:
            await smtp.login(username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = _reply(exc)
            msg = f"{self.host} refused the credentials: {reply}"
            raise TemporaryRejectionError(msg, reply=reply, host=self.host) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._error(exc, "AUTH") from exc

    # -- errors ----------------------------------------------------------------

    @contextlib.contextmanager
    def _mapped(self, stage: str) -> Iterator[None]:
        try:
            yield
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._error(exc, stage) from exc

    def _error(self, exc: BaseException, stage: str) -> TransientDeliveryError:
        """Translate an aiosmtplib/socket/TLS error raised during *stage*."""
        host, where = self.host, f"{stage} with {self.host}:{self.port}"
        cause = exc.__cause__
        if isinstance(exc, TimeoutError):  # aiosmtplib's and the builtin
            msg = f"timed out during {where}"
            return DeliveryTimeoutError(msg, host=host)
        tls_error = exc if isinstance(exc, ssl.SSLError) else cause
        if isinstance(tls_error, ssl.SSLError):
            msg = f"TLS handshake failed during {where}: {_tls_reason(tls_error)}"
            return TLSRequiredError(msg, host=host)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            if exc.code < 0:  # aiosmtplib could not parse the reply
                msg = f"garbled reply during {where}: {exc.message}"
                return ProtocolError(msg, host=host)
            reply = _reply(exc)
            msg = f"{host} answered {reply} during {stage}"
            return TemporaryRejectionError(msg, reply=reply, host=host)
        if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
            msg = f"{host} closed the connection during {stage}"
            return ProtocolError(msg, host=host)
        if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
            msg = f"cannot connect to {self.host}:{self.port}: {_connect_reason(exc)}"
            return ConnectError(msg, host=host)
        msg = f"SMTP error during {where}: {exc}"
        return ProtocolError(msg, host=host)

    # -- transactions ----------------------------------------------------------

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
    ) -> list[RecipientOutcome]:
        """Run one mail transaction; return one outcome per *rcpt_to*, in order.

        *data* is the rendered message; it is sent as is (line endings normalised
        to CRLF, dot-stuffed), or re-encoded 7-bit (:mod:`._downgrade`) when it
        has 8-bit octets and the server offers neither 8BITMIME nor SMTPUTF8 (a
        message that cannot be re-encoded FAILs ``5.6.3``). SMTPUTF8 is used when
        the message needs it (*smtputf8*, or UTF-8 in its header section) or an
        address is not ASCII. On a server without SMTPUTF8, a message or a sender
        that needs it FAILs every recipient (``5.6.7``, nothing is sent); else
        only the recipients whose address needs it FAIL (``5.6.7``) and the others
        are sent to without it.

        Raises a :class:`TransientDeliveryError` (and closes the connection) when
        the session fails before the DATA command: lost or timed out during
        RSET/MAIL/RCPT, or a 421 there. From DATA on, failures are outcomes:
        lost before the final dot -> accepted recipients DEFERRED; lost or timed
        out after it -> DEFERRED with ``possible_duplicate``.
        """
        if not self.is_usable:
            msg = f"the connection to {self.host} is closed"
            raise ProtocolError(msg, host=self.host)
        rcpts = list(rcpt_to)
        self._dot_unconfirmed = False
        data = _encode_body(data)
        message_utf8 = smtputf8 or is_8bit(_header_section(data))
        refusal = None
        if not _sendable(mail_from):
            refusal = _local_reply(553, "5.1.7", "the sender address cannot be sent")
        elif not self.supports_smtputf8 and message_utf8:
            text = (
                f"{self.host} does not offer SMTPUTF8, which this message needs "
                "(it has UTF-8 header fields)"
            )
            refusal = _local_reply(550, "5.6.7", text)
        elif not self.supports_smtputf8 and not mail_from.isascii():
            text = (
                f"{self.host} does not offer SMTPUTF8, which the sender address "
                f"{mail_from} needs"
            )
            refusal = _local_reply(550, "5.6.7", text)
        if refusal is not None or not rcpts:
            return [_outcome(a, refusal) for a in rcpts]
        refused: dict[int, RecipientOutcome] = {}
        if self.supports_smtputf8:
            utf8 = message_utf8 or not mail_from.isascii()
            utf8 = utf8 or not all(r.isascii() for r in rcpts)
        else:
            utf8 = False
            text = f"{self.host} does not offer SMTPUTF8, which this address needs"
            refused = {
                i: _outcome(r, _local_reply(550, "5.6.7", text))
                for i, r in enumerate(rcpts)
                if not r.isascii()
            }
        sending = [r for i, r in enumerate(rcpts) if i not in refused]
        if not sending:
            return [refused[i] for i in range(len(rcpts))]
        try:
            body = await self._body(data, utf8)
            if isinstance(body, SMTPReply):
                outcomes = [_outcome(a, body) for a in sending]
            else:
                outcomes = await self._transaction(mail_from, sending, body, utf8)
        except BaseException as exc:
            self.close_now()
            if isinstance(exc, DeliveryError) and exc.ip is None:
                exc.ip = self._ip
            raise
        finally:
            self._last_used = anyio.current_time()
        if not refused:
            return outcomes
        sent = iter(outcomes)
        return [refused[i] if i in refused else next(sent) for i in range(len(rcpts))]

    async def _body(self, data: bytes, utf8: bool) -> bytes | SMTPReply:
        """*data* as this server may take it: as is when it is 7-bit or the server
        takes 8-bit (8BITMIME, or an SMTPUTF8 transaction, RFC 6531 §3.1), else
        re-encoded 7-bit; a local 5.6.3 refusal when it cannot be.

        The re-encoded message is kept for the next transaction with the same
        *data* (the next batch of the same job), and made in a worker thread
        when it is big.
        """
        if not is_8bit(data) or "8bitmime" in self._extensions or utf8:
            return data
        cached = self._downgraded
        if cached is None or cached[0] is not data:
            if len(data) > THREAD_OCTETS:
                result = await anyio.to_thread.run_sync(_try_downgrade, data)
            else:
                result = _try_downgrade(data)
            cached = self._downgraded = (data, result)
            _log.debug(
                "8-bit message re-encoded for a server without 8BITMIME"
                if isinstance(result, bytes)
                else "8-bit message cannot be re-encoded",
                extra=self._extra(size=len(data)),
            )
        result = cached[1]
        if isinstance(result, bytes):
            return result
        text = (
            f"{self.host} does not offer 8BITMIME, and the message cannot be "
            f"re-encoded in 7 bits: {result}"
        )
        return _local_reply(554, "5.6.3", text)

    def _mail_options(self, body: bytes, utf8: bool) -> list[str]:
        options = []
        if "size" in self._extensions:
            options.append(f"SIZE={len(body)}")
        if utf8:
            options.append("SMTPUTF8")
        if "8bitmime" in self._extensions and (utf8 or not body.isascii()):
            options.append("BODY=8BITMIME")
        return options

    async def _transaction(
        self, mail_from: str, rcpts: list[str], body: bytes, utf8: bool
    ) -> list[RecipientOutcome]:
        encoding = "utf-8" if utf8 else "ascii"
        mail = [
            b"MAIL",
            b"FROM:<" + mail_from.encode(encoding) + b">",
            *(o.encode("ascii") for o in self._mail_options(body, utf8)),
        ]
        if self.supports_pipelining:
            return await self._pipelined(mail, rcpts, body, encoding)
        smtp = self._smtp
        if self._needs_reset:
            with self._mapped("RSET"):
                await smtp.rset()
        self._transactions += 1
        self._needs_reset = True
        try:
            response = await smtp.execute_command(*mail)
            if response.code != 250:
                raise aiosmtplib.SMTPSenderRefused(
                    response.code, response.message, mail_from
                )
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 421:
                raise self._error(exc, "MAIL") from exc
            return _mail_refused(rcpts, _reply(exc))
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._error(exc, "MAIL") from exc

        outcomes: dict[int, RecipientOutcome] = {}
        accepted: list[int] = []
        for index, address in enumerate(rcpts):
            outcome = await self._rcpt(address, encoding)
            if outcome is None:
                accepted.append(index)
            else:
                outcomes[index] = outcome
        if accepted:
            addresses = [rcpts[i] for i in accepted]
            outcomes.update(
                zip(accepted, await self._data(addresses, body), strict=True)
            )
        _log.debug(
            "transaction done",
            extra=self._extra(recipients=len(rcpts), accepted=len(accepted)),
        )
        return [outcomes[i] for i in range(len(rcpts))]

    async def _rcpt(self, address: str, encoding: str) -> RecipientOutcome | None:
        if not _sendable(address):
            return _unsendable(address)
        try:
            reply = await self._smtp.execute_command(
                b"RCPT", b"TO:<" + address.encode(encoding) + b">"
            )
            if reply.code not in (250, 251):
                raise aiosmtplib.SMTPRecipientRefused(
                    reply.code, reply.message, address
                )
        except aiosmtplib.SMTPRecipientRefused as exc:
            if exc.code == 421:
                raise self._error(exc, "RCPT") from exc
            return classify_rcpt(address, _reply(exc))
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._error(exc, "RCPT") from exc
        return None

    async def _data(self, accepted: list[str], body: bytes) -> list[RecipientOutcome]:
        smtp, timeouts = self._smtp, self._settings.timeouts
        try:
            start = await smtp.execute_command(b"DATA", timeout=timeouts.data_start)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close_now()
            return outcomes_from_error(accepted, self._error(exc, "DATA"))
        return await self._message(accepted, body, start, smtp.protocol, None)

    # -- PIPELINING (RFC 2920) -------------------------------------------------

    async def _pipelined(
        self, mail: list[bytes], rcpts: list[str], body: bytes, encoding: str
    ) -> list[RecipientOutcome]:
        """One transaction with PIPELINING: [RSET,] MAIL, every RCPT and DATA in
        one write, then their replies read in order, each judged as the lock-step
        path judges it, so that the outcomes are the same. The whole transaction
        is read through :class:`_Replies`, under aiosmtplib's command lock."""
        protocol = self._smtp.protocol
        if protocol is None:
            error = aiosmtplib.SMTPServerDisconnected("Connection lost")
            raise self._error(error, "MAIL") from error
        commands = [b"RSET"] if self._needs_reset else []
        commands.append(b" ".join(mail))
        outcomes: dict[int, RecipientOutcome] = {}
        sent: list[int] = []  # the recipients given a RCPT command
        for index, address in enumerate(rcpts):
            if _sendable(address):
                sent.append(index)
                commands.append(b"RCPT TO:<" + address.encode(encoding) + b">")
            else:
                outcomes[index] = _unsendable(address)
        if sent:
            commands.append(b"DATA")
        lock = getattr(protocol, "_command_lock", None)
        async with lock if isinstance(lock, asyncio.Lock) else _NO_LOCK:
            with self._mapped("MAIL"):
                replies = _Replies.attach(protocol)
            try:
                with self._mapped("MAIL"):
                    protocol.write(b"\r\n".join(commands) + b"\r\n")
                self._transactions += 1
                self._needs_reset = True
                group = _Group.of(commands)
                await group.read(replies, self._settings.timeouts)
                accepted = await self._judge(group, rcpts, sent, outcomes, replies)
                if accepted:
                    addresses = [rcpts[i] for i in accepted]
                    results = await self._data_reply(group, addresses, body, replies)
                    outcomes.update(zip(accepted, results, strict=True))
            finally:
                replies.detach()
        _log.debug(
            "transaction done",
            extra=self._extra(
                recipients=len(rcpts), accepted=len(accepted), pipelined=True
            ),
        )
        return [outcomes[i] for i in range(len(rcpts))]

    def _group_reply(self, group: _Group, position: int) -> _Response:
        """The reply at *position* in *group*; else what stopped the replies, raised
        as the lock-step path raises it during that command."""
        if position < len(group.replies):
            return group.replies[position]
        lost = group.lost
        assert lost is not None  # noqa: S101 - read() stops only on an error
        raise self._error(lost, group.stages[position]) from lost

    async def _judge(
        self,
        group: _Group,
        rcpts: list[str],
        sent: list[int],
        outcomes: dict[int, RecipientOutcome],
        replies: _Replies,
    ) -> list[int]:
        """Judge the RSET, MAIL and RCPT replies of *group* in order, as lock-step
        does (filling *outcomes*); return the indexes of the accepted recipients.

        Raises as lock-step does: a refused RSET, a 421 to MAIL or RCPT, or a
        connection lost, garbled or timed out before the reply to the last RCPT."""
        position = 0
        if group.reset:
            reply = self._group_reply(group, 0)
            if reply.code != 250:
                error = aiosmtplib.SMTPResponseException(reply.code, reply.message)
                raise self._error(error, "RSET") from error
            position = 1
        reply = self._group_reply(group, position)
        if reply.code == 421:
            error = aiosmtplib.SMTPResponseException(reply.code, reply.message)
            raise self._error(error, "MAIL") from error
        if reply.code != 250:
            outcomes.update(enumerate(_mail_refused(rcpts, _reply_of(reply))))
            await self._end_empty(group, replies)
            return []
        accepted: list[int] = []
        for index in sent:
            position += 1
            reply = self._group_reply(group, position)
            if reply.code == 421:
                error = aiosmtplib.SMTPResponseException(reply.code, reply.message)
                raise self._error(error, "RCPT") from error
            outcome = None
            if reply.code not in (250, 251):  # a 252 is accepted, as in _rcpt
                outcome = classify_rcpt(rcpts[index], _reply_of(reply))
            if outcome is None:
                accepted.append(index)
            else:
                outcomes[index] = outcome
        if not accepted:
            await self._end_empty(group, replies)
        return accepted

    async def _end_empty(self, group: _Group, replies: _Replies) -> None:
        """No recipient was accepted (MAIL or every RCPT refused), and the DATA
        command may have gone with them: RFC 2920 §3.1, its reply must still be
        checked. A refusal (Postfix: ``554 5.5.1 Error: no valid recipients``,
        aiosmtpd: ``503``) ends the transaction; a 354 gets a lone dot, the empty
        message Postfix's client sends there, and its reply does not matter; no
        reply (lost, garbled, timed out) or a 421 closes the connection. The
        recipients' outcomes are already decided: nothing here changes them."""
        if group.stages[-1] != "DATA":
            return
        code = group.data_code
        if code == 354:
            try:
                replies.inner.write(b".\r\n")
                reply = await replies.read_response(self._settings.timeouts.data_end)
            except (aiosmtplib.SMTPException, OSError):
                code = None
            else:
                code = reply.code
            _log.debug(
                "DATA accepted with no recipient: sent a lone dot",
                extra=self._extra(reply_code=code),
            )
        if code is None or code == 421:
            self.close_now()

    async def _data_reply(
        self, group: _Group, accepted: list[str], body: bytes, replies: _Replies
    ) -> list[RecipientOutcome]:
        """The reply to the pipelined DATA, then the message, as :meth:`_data`."""
        position = len(group.stages) - 1
        try:
            start = self._group_reply(group, position)
        except TransientDeliveryError as error:
            self.close_now()
            return outcomes_from_error(accepted, error)
        return await self._message(accepted, body, start, self._smtp.protocol, replies)

    # -- the message -----------------------------------------------------------

    async def _message(
        self,
        accepted: list[str],
        body: bytes,
        start: _Response,
        protocol: SMTPProtocol | None,
        replies: _Replies | None,
    ) -> list[RecipientOutcome]:
        """After *start*, the reply to DATA: the message, the final dot and its
        reply (read from *replies* when pipelining, else from *protocol*)."""
        if start.code != 354:
            reply = _reply_of(start)
            if 400 <= start.code < 600 and start.code != 421:
                return classify_data(accepted, reply)
            self.close_now()  # 421, or nonsense such as a 250 to DATA
            msg = f"{self.host} answered {reply} to DATA"
            return outcomes_from_error(
                accepted, ProtocolError(msg, reply=reply, host=self.host)
            )
        try:
            if protocol is None:
                msg = "connection lost"
                raise aiosmtplib.SMTPServerDisconnected(msg)
            protocol.write(_dot_stuffed(body) + b".\r\n")
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close_now()
            return outcomes_from_error(accepted, self._error(exc, "DATA"))
        # From here on the server may have the whole message.
        self._dot_unconfirmed = True
        reader = protocol if replies is None else replies
        try:
            final = await reader.read_response(timeout=self._settings.timeouts.data_end)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.close_now()
            self._dot_unconfirmed = False  # reported as possible_duplicate instead
            error = self._error(exc, "the reply to the final dot")
            _log.warning("connection lost after the final dot", extra=self._extra())
            return outcomes_from_error(accepted, error, possible_duplicate=True)
        self._dot_unconfirmed = False
        self._needs_reset = False
        if final.code == 421:
            self.close_now()
        return classify_data(accepted, _reply_of(final))

    # -- closing ---------------------------------------------------------------

    async def aclose(self) -> None:
        """QUIT politely (short deadline, shielded from cancellation), then close."""
        if self._closed:
            return
        if self._smtp.is_connected:
            with (
                anyio.move_on_after(_QUIT_TIMEOUT, shield=True),
                contextlib.suppress(aiosmtplib.SMTPException, OSError),
            ):
                await self._smtp.quit(timeout=_QUIT_TIMEOUT)
        self.close_now()

    def close_now(self) -> None:
        """Close the connection at once, without QUIT. Idempotent."""
        self._closed = True
        self._downgraded = None
        transport = self._smtp.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        self._smtp.close()
        if self._sock is not None:
            self._sock.close()


_STARTTLS_MODES = (TLSMode.STARTTLS, TLSMode.REQUIRED, TLSMode.OPPORTUNISTIC)


_MX_TLS_MODES = (TLSMode.REQUIRED, TLSMode.OPPORTUNISTIC)


def _first_context(
    settings: ConnectionSettings, *, unverifiable: bool
) -> ssl.SSLContext | None:
    """The TLS context of a session's first connection (``None``: no TLS)."""
    ctx = settings.ssl_context
    if settings.tls is TLSMode.NONE:
        return None
    if settings.tls in _MX_TLS_MODES and (
        ctx is None or (unverifiable and _verifies(ctx))
    ):
        # Encrypt only: no context to verify with, or a host remembered as
        # having a certificate that does not verify.
        return _unverified_context()
    return ctx


def _fallback(
    settings: ConnectionSettings, ctx: ssl.SSLContext | None, *, unverifiable: bool
) -> list[ssl.SSLContext | None]:
    """What a new connection tries after a failed STARTTLS handshake with *ctx*:
    ``[context]``, ``[None]`` for plain text, or ``[]`` (nothing: fail).

    Only a certificate failure makes an unverified handshake worth trying (both
    MX modes, Postfix's "encrypt" level); any other handshake failure would fail
    the same way again, so opportunistic TLS goes on in plain text and required
    TLS fails. Relay modes never come here: they fail on a bad certificate.
    """
    if unverifiable and ctx is not None and _verifies(ctx):
        return [_unverified_context()]
    if settings.tls is TLSMode.OPPORTUNISTIC and ctx is not None:
        return [None]
    return []
