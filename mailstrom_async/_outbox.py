"""Outbox: a transport that keeps every message in memory and never touches the network."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel

from mailstrom_async._capture import OutboxMessage, Scripted, capture
from mailstrom_async._classify import RecipientOutcome, classify_data, classify_rcpt
from mailstrom_async._exceptions import ProtocolError, TemporaryRejectionError
from mailstrom_async._models import SMTPReply

__all__ = ["Outbox", "OutboxConnection", "reset_shared_outbox", "shared_outbox"]

#: The host name that attempts through an outbox record.
OUTBOX_HOST = "outbox"
_ACCEPTED = SMTPReply(code=250, text="OK queued", enhanced_code="2.0.0")


class Outbox(Scripted):
    """A transport that captures every message instead of sending it.

    Give it to a Deliverer, ``Deliverer(config, transport=outbox)``, and every
    message the Deliverer delivers lands in :attr:`messages`. Nothing touches
    the network: no DNS, no sockets, no TLS. Recipients are accepted unless a
    rule says otherwise (:meth:`defer`, :meth:`fail`, :meth:`disconnect`), and
    the replies take the same path through the Deliverer as a real server's:
    statuses, retries and events. Attempts record ``host="outbox"``, no IP and
    no TLS.

    An outbox may serve several Deliverers, one after the other or at once; it
    keeps its messages when a Deliverer closes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._messages: list[OutboxMessage] = []
        self._waiters: list[anyio.Event] = []
        self._connections = 0

    def __repr__(self) -> str:
        return f"<Outbox messages={len(self._messages)}>"

    @property
    def messages(self) -> list[OutboxMessage]:
        """Every message received since the outbox was made or cleared, in order."""
        return list(self._messages)

    @property
    def connections(self) -> int:
        """How many connections the Deliverer opened to the outbox."""
        return self._connections

    def clear(self) -> None:
        """Forget the messages received so far (the scripted replies stay)."""
        self._messages.clear()

    async def wait_for(self, count: int = 1) -> list[OutboxMessage]:
        """Wait until the outbox holds at least *count* messages; return them all.

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
        while len(self._messages) < count:
            event = anyio.Event()
            self._waiters.append(event)
            await event.wait()
        return self.messages

    def _reset(self) -> None:
        """As new: no messages, no scripted replies, no connections counted."""
        self._messages.clear()
        self._waiters.clear()
        self._script.clear()
        self._connections = 0

    def _received(self, message: OutboxMessage) -> None:
        self._messages.append(message)
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    # -- the Transport protocol ----------------------------------------------

    @property
    def fails_over(self) -> bool:
        """Always False, as the outbox has a single address."""
        return False

    def destination(self, address: str) -> str:
        """``"outbox"``: one destination for every recipient."""
        return OUTBOX_HOST

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> OutboxConnection:
        """A new connection to the outbox (it always succeeds)."""
        await anyio.lowlevel.checkpoint()
        self._connections += 1
        return OutboxConnection(self)

    async def aclose(self) -> None:
        """Nothing to release: the outbox keeps its messages and stays usable."""
        await anyio.lowlevel.checkpoint()


class OutboxConnection:
    """A connection to an :class:`Outbox` (the Connection protocol)."""

    host = OUTBOX_HOST
    ip: str | None = None
    tls = False
    tls_verified = False
    final_dot_unconfirmed = False

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._closed = False

    @property
    def is_usable(self) -> bool:
        """False once closed, or dropped by a scripted disconnect."""
        return not self._closed

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
    ) -> list[RecipientOutcome]:
        """One transaction: each recipient as the script says, then the message
        captured for those accepted.

        Raises:
            TemporaryRejectionError: a scripted disconnect (421); the connection
                is closed.
            ProtocolError: the connection is closed.
        """
        await anyio.lowlevel.checkpoint()
        if self._closed:
            msg = "the connection to the outbox is closed"
            raise ProtocolError(msg, host=OUTBOX_HOST)
        outcomes: dict[str, RecipientOutcome] = {}
        accepted: list[str] = []
        for address in rcpt_to:
            answer = self._outbox._script.answer(address)
            if answer is None:
                accepted.append(address)
                continue
            kind, reply = answer
            if kind == "disconnect":
                self._closed = True
                msg = f"the outbox answered {reply} during RCPT"
                raise TemporaryRejectionError(msg, reply=reply, host=OUTBOX_HOST)
            outcome = classify_rcpt(address, reply)
            if outcome is None:  # pragma: no cover - rules only hold 4xx and 5xx
                msg = "unreachable"
                raise AssertionError(msg)
            outcomes[address] = outcome
        if accepted:
            self._outbox._received(capture(mail_from, tuple(accepted), data))
            outcomes.update((o.address, o) for o in classify_data(accepted, _ACCEPTED))
        return [outcomes[address] for address in rcpt_to]

    async def aclose(self) -> None:
        """Close the connection."""
        await anyio.lowlevel.checkpoint()
        self._closed = True

    def close_now(self) -> None:
        """Close the connection at once."""
        self._closed = True


_SHARED = Outbox()


def shared_outbox() -> Outbox:
    """The process-wide :class:`Outbox`: where every Deliverer that runs with
    ``Config(transport="outbox")`` or ``MAILSTROM_TRANSPORT=outbox`` delivers.

    It is the ``outbox`` fixture of the pytest plugin, which empties it (its
    messages and its scripted replies) before and after each test; elsewhere,
    call its :meth:`~Outbox.clear` and :meth:`~Outbox.clear_script` yourself.
    It keeps every message for the life of the process: it is for tests.
    """
    return _SHARED


def reset_shared_outbox() -> None:
    """Empty the process-wide outbox: no messages, no scripted replies."""
    _SHARED._reset()
