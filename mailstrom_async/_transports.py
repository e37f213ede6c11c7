"""The transports chosen by name: ``Config.transport`` or ``MAILSTROM_TRANSPORT``.

==========  ==========================================================================
``smtp``    the relay, or the recipients' MX hosts (:mod:`._routes`; not built here)
``console`` each message written to standard output (or a stream), nothing sent
``outbox``  each message captured by the process-wide :class:`Outbox` (for tests)
``null``    each message discarded
==========  ==========================================================================

``console`` and ``null`` deliver every recipient with a local outcome (a
:class:`SMTPReply` with ``local=True``: the status records no reply code, and
the attempt's host is ``"console"`` or ``"null"``). ``outbox`` answers as the
testing kit's :class:`Outbox` does, scripted replies included. Whichever it is,
the message goes through the store, the statuses and the events as always.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import TextIO

import anyio
import anyio.lowlevel
import anyio.to_thread

from mailstrom_async._classify import RecipientOutcome, classify_data
from mailstrom_async._config import TRANSPORTS, Config, TransportName
from mailstrom_async._exceptions import (
    ConfigError,
    ProtocolError,
    TransientDeliveryError,
)
from mailstrom_async._models import SMTPReply
from mailstrom_async._outbox import Outbox, shared_outbox

__all__ = [
    "ENV_TRANSPORT",
    "ConsoleTransport",
    "LocalConnection",
    "NullTransport",
    "local_transport",
    "resolve_transport",
]

#: The environment variable that picks the transport when the Config does not.
ENV_TRANSPORT = "MAILSTROM_TRANSPORT"


def resolve_transport(
    config: Config, environ: Mapping[str, str]
) -> tuple[TransportName, str, str | None]:
    """The transport a Deliverer uses: ``config.transport`` if set, else
    ``$MAILSTROM_TRANSPORT`` if set and not empty, else ``"smtp"``.

    Returns ``(name, source, overridden)``: *source* is ``"config"``, the
    variable's name (also when the Config holds the variable's value, as
    :meth:`Config.from_env` makes it), or ``"default"``; *overridden* is the
    variable's value when the Config's value differs from it and wins.

    Raises:
        ConfigError: the variable holds a name that is not a transport (unless
            the Config's value makes it moot).
    """
    raw = environ.get(ENV_TRANSPORT, "").strip()
    if config.transport is not None:
        if raw == config.transport:
            return config.transport, ENV_TRANSPORT, None
        return config.transport, "config", raw or None
    if not raw:
        return "smtp", "default", None
    for name in TRANSPORTS:
        if raw == name:
            return name, ENV_TRANSPORT, None
    allowed = ", ".join(map(repr, TRANSPORTS))
    msg = f"{ENV_TRANSPORT} must be one of {allowed}, not {raw!r}"
    raise ConfigError(msg, "transport")


def local_transport(name: TransportName) -> ConsoleTransport | NullTransport | Outbox:
    """The transport for a name other than ``"smtp"``.

    Raises:
        ValueError: *name* is ``"smtp"`` (built from the relay or MX settings).
    """
    if name == "console":
        return ConsoleTransport()
    if name == "null":
        return NullTransport()
    if name == "outbox":
        return shared_outbox()
    msg = f"the {name!r} transport is not a local one"
    raise ValueError(msg)


class LocalConnection:
    """A connection of a :class:`ConsoleTransport` or a :class:`NullTransport`:
    every transaction hands the message to *deliver* and delivers every
    recipient with a local reply (the Connection protocol)."""

    ip: str | None = None
    tls = False
    tls_verified = False
    final_dot_unconfirmed = False

    def __init__(
        self,
        host: str,
        reply: SMTPReply,
        deliver: Callable[[str, Sequence[str], bytes], object] | None = None,
    ) -> None:
        self.host = host
        self._reply = reply
        self._deliver = deliver
        self._closed = False

    def __repr__(self) -> str:
        return f"<LocalConnection {self.host!r}>"

    @property
    def is_usable(self) -> bool:
        """False once closed."""
        return not self._closed

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
    ) -> list[RecipientOutcome]:
        """Hand the message over; every recipient is DELIVERED.

        Raises:
            ProtocolError: the connection is closed.
            TransientDeliveryError: the message could not be written (every
                recipient is DEFERRED and tried again later).
        """
        if self._closed:
            msg = f"the connection to the {self.host} transport is closed"
            raise ProtocolError(msg, host=self.host)
        if self._deliver is None:
            await anyio.lowlevel.checkpoint()
        else:
            deliver = self._deliver
            try:
                # A write to a terminal or a full pipe may block: not on the loop.
                await anyio.to_thread.run_sync(deliver, mail_from, rcpt_to, data)
            except (OSError, ValueError) as exc:  # ValueError: a closed stream
                msg = f"cannot write the message to the {self.host}: {exc}"
                raise TransientDeliveryError(msg, host=self.host) from exc
        return classify_data(rcpt_to, self._reply)

    async def aclose(self) -> None:
        """Close the connection."""
        await anyio.lowlevel.checkpoint()
        self._closed = True

    def close_now(self) -> None:
        """Close the connection at once."""
        self._closed = True


class _LocalTransport:
    """One destination for every recipient, never a failover."""

    #: The host name attempts record, and the destination of every recipient.
    name: str

    @property
    def fails_over(self) -> bool:
        """Always False: there is only one place to go."""
        return False

    def destination(self, address: str) -> str:
        """The transport's name: one destination for every recipient."""
        return self.name

    async def aclose(self) -> None:
        """Nothing to release."""
        await anyio.lowlevel.checkpoint()


_NULL_REPLY = SMTPReply(
    code=250,
    text="discarded by the null transport, not sent",
    enhanced_code="2.0.0",
    local=True,
)
_CONSOLE_REPLY = SMTPReply(
    code=250,
    text="written to the console by the console transport, not sent",
    enhanced_code="2.0.0",
    local=True,
)


class NullTransport(_LocalTransport):
    """A transport that discards every message: ``Config(transport="null")``.

    Every recipient is DELIVERED with a local outcome (no reply code, the reason
    ``"discarded by the null transport, not sent"``, host ``"null"``). The
    message is still stored, and its statuses and events are as for any other
    delivery.
    """

    name = "null"

    def __repr__(self) -> str:
        return "<NullTransport>"

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> LocalConnection:
        """A new connection (it always succeeds)."""
        await anyio.lowlevel.checkpoint()
        return LocalConnection(self.name, _NULL_REPLY)


class ConsoleTransport(_LocalTransport):
    """A transport that writes every message to a text stream instead of sending
    it: ``Config(transport="console")``, or ``Deliverer(transport=
    ConsoleTransport(stream=...))`` for another stream.

    Each message is written once per transaction, laid out as it went on the
    wire (header fields, blank line, body; each part of a multipart message
    after its boundary line) but decoded for reading: encoded words in header
    fields (RFC 2047) are decoded, and so are text parts sent in
    quoted-printable or base64 (their ``Content-Transfer-Encoding`` field still
    says how they went); other parts, such as attachments, are shown as sent.
    Lines end in ``\\n``. The message comes between a line naming the
    envelope (``MAIL FROM`` and ``RCPT TO``) and an end line. With
    ``stream=None``, the default, it goes to ``sys.stdout`` as it is at the
    time of the write (so pytest's ``capsys`` sees it). Writes run in a worker thread, one message at a time.

    Every recipient is DELIVERED with a local outcome (no reply code, host
    ``"console"``). A write that fails (a closed stream, a broken pipe) defers
    the recipients, to be tried again as after any transient failure.
    """

    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        # Several connections may write at once: one message at a time.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = "sys.stdout" if self._stream is None else repr(self._stream)
        return f"<ConsoleTransport stream={where}>"

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> LocalConnection:
        """A new connection (it always succeeds)."""
        await anyio.lowlevel.checkpoint()
        return LocalConnection(self.name, _CONSOLE_REPLY, self._write)

    def _write(self, mail_from: str, rcpt_to: Sequence[str], data: bytes) -> None:
        text = console_text(mail_from, rcpt_to, data)
        with self._lock:
            stream = self._stream if self._stream is not None else sys.stdout
            stream.write(text)
            stream.flush()


_RULE = "-" * 72


def console_text(mail_from: str, rcpt_to: Sequence[str], data: bytes) -> str:
    """What :class:`ConsoleTransport` writes for one message."""
    body = readable(data)
    if not body.endswith("\n"):
        body += "\n"
    envelope = f"MAIL FROM:<{mail_from}> RCPT TO:" + ",".join(f"<{r}>" for r in rcpt_to)
    return f"{_RULE}\n{envelope}\n{_RULE}\n{body}{_RULE}\n"


_PARSER = BytesParser(policy=policy.default)


def readable(data: bytes) -> str:
    """*data* laid out as sent, for a person: header fields with their encoded
    words decoded (RFC 2047), text parts decoded from quoted-printable or
    base64 (other parts as sent), ``\n`` line ends. A message the parser
    cannot take apart is shown as its bytes, decoded as UTF-8."""
    try:
        return _part_text(_PARSER.parsebytes(data))
    except Exception:
        return data.decode("utf-8", "backslashreplace").replace("\r\n", "\n")


def _part_text(part: Message) -> str:
    lines = [f"{name}: {value}" for name, value in part.items()]
    head = "\n".join(lines) + "\n\n"
    if part.is_multipart():
        boundary = part.get_boundary()
        subparts = [sub for sub in part.get_payload() if isinstance(sub, Message)]
        inner = "".join(f"--{boundary}\n{_part_text(sub)}" for sub in subparts)
        return f"{head}{inner}--{boundary}--\n"
    if part.get_content_maintype() == "text" and isinstance(part, EmailMessage):
        text = str(part.get_content())
    else:
        raw = part.get_payload(decode=False)
        text = raw if isinstance(raw, str) else str(raw)
    text = text.replace("\r\n", "\n")
    return head + (text if text.endswith("\n") or not text else text + "\n")
