"""Immutable value types shared by every layer: replies, states and statuses.

It imports only the leaves :mod:`._text` (what a server's bytes become) and
:mod:`._domain` (how recipient addresses compare).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from datetime import datetime, timedelta

import attrs

from mailstrom_async._domain import domain_key, recipient_key
from mailstrom_async._text import clean, reply_text, wire_bytes

__all__ = [
    "AttemptRecord",
    "DeliveryEvent",
    "MessageStatus",
    "RecipientState",
    "RecipientStatus",
    "SMTPReply",
]


class RecipientState(enum.Enum):
    """Where one recipient of a message stands.

    A recipient starts ``QUEUED``, may pass through ``DEFERRED`` any number of times,
    and always ends ``DELIVERED`` or ``FAILED``.
    """

    QUEUED = "queued"
    """Accepted and stored, not tried yet."""
    DEFERRED = "deferred"
    """Tried, failed temporarily; retried at ``next_attempt_at``."""
    DELIVERED = "delivered"
    """A server accepted it (2xx after DATA)."""
    FAILED = "failed"
    """Failed permanently, or given up after the retry policy ran out."""

    @property
    def is_final(self) -> bool:
        """True for ``DELIVERED`` and ``FAILED``, the states a recipient never leaves."""
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


@attrs.frozen
class SMTPReply:
    """One SMTP reply: code, RFC 3463 enhanced status code (if any) and text.

    ``text`` is always valid Unicode, whatever bytes the server sent: a byte that
    is not UTF-8 shows as ``\\xNN`` (Python's ``backslashreplace``), and only the
    first 4 KiB of a long reply are kept (the text then ends with
    ``" [truncated, N more bytes]"``). ``raw_text`` holds the exact bytes kept
    when they differ from ``text`` (``None`` when the text is valid UTF-8 and
    whole). Text built with lone surrogates (what aiosmtplib makes of invalid
    bytes) is turned into this form when the reply is made.

    ``local`` is True for a reply that no server sent: an outcome decided here
    (a refused connection, a timeout, TLS that was required and not had, DNS
    that says the domain takes no mail, a refusal before a command was sent).
    Its ``code`` only classifies it (4xx transient, 5xx permanent); it is never
    shown: ``str()`` gives the enhanced code and the text, and a
    :class:`RecipientStatus` records ``code=None``.
    """

    code: int
    text: str = ""
    enhanced_code: str | None = None
    raw_text: bytes | None = None
    local: bool = False

    def __attrs_post_init__(self) -> None:
        if self.raw_text is None:
            text, raw = reply_text(self.text)
        else:
            text, raw = clean(self.text), self.raw_text
        if raw is not self.raw_text or text is not self.text:
            # The normalised form, set once while the instance is being built.
            object.__setattr__(self, "text", text)
            object.__setattr__(self, "raw_text", raw)

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """True for 4xx replies."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """True for 5xx replies."""
        return 500 <= self.code < 600

    def __str__(self) -> str:
        parts = [] if self.local else [str(self.code)]
        if self.enhanced_code:
            parts.append(self.enhanced_code)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@attrs.frozen(kw_only=True)
class RecipientStatus:
    """The state of one recipient of one message, with what its last attempt said.

    ``code``, ``enhanced_code`` and ``message`` hold the last reply; ``host`` and
    ``ip`` say where the last attempt went and ``tls``/``tls_verified`` how. An
    outcome decided here rather than by a server's reply (a refused connection, a
    timeout, a DNS answer, TLS required and not had, the retry lifetime run out,
    a cancel) has ``code=None``, an RFC 3463 ``enhanced_code`` and a short reason
    in ``message``: :attr:`is_local` is then True.

    ``held`` is True while an operator holds the recipient (``Deliverer.hold``):
    it keeps its state (``QUEUED`` or ``DEFERRED``) and its ``next_attempt_at``,
    but no attempt is made until it is released. Only unfinished recipients are
    held; the store owns the flag (it ignores the one in a recorded status).
    ``message`` is the reply's display text (:attr:`SMTPReply.text`: valid
    Unicode, at most 4 KiB of the server's bytes); ``raw_message`` keeps the
    exact bytes of that reply text when they differ from it (bytes that are not
    UTF-8, or a cut reply), else ``None``. :attr:`message_bytes` gives the exact
    bytes either way. A recipient that ran out of retries has a local
    ``message`` that quotes the last reply, and ``raw_message`` still holds
    that reply's exact bytes.
    """

    address: str
    state: RecipientState = RecipientState.QUEUED
    attempts: int = 0
    code: int | None = None
    enhanced_code: str | None = None
    message: str | None = None
    raw_message: bytes | None = None
    host: str | None = None
    ip: str | None = None
    tls: bool | None = None
    tls_verified: bool | None = None
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    possible_duplicate: bool = False
    held: bool = False

    @property
    def is_final(self) -> bool:
        """True once the recipient is ``DELIVERED`` or ``FAILED``."""
        return self.state.is_final

    @property
    def is_local(self) -> bool:
        """True when the last outcome was decided here, not by a server's reply:
        no reply ``code``, and a ``message`` that says why."""
        return self.code is None and self.message is not None

    @property
    def domain(self) -> str:
        """The domain part of the address, lower-cased (an internationalised one
        in its A-label form)."""
        return domain_key(self.address.rpartition("@")[2])

    @property
    def message_bytes(self) -> bytes | None:
        """``raw_message`` when it is kept, else ``message`` in UTF-8 (``None``
        without either): the exact bytes the server sent, either way."""
        if self.raw_message is not None:
            return self.raw_message
        return None if self.message is None else wire_bytes(self.message)


@attrs.frozen(kw_only=True)
class AttemptRecord:
    """One delivery attempt of one recipient, as its history keeps it.

    ``attempt`` is the recipient's attempt number (its ``attempts`` count after
    this attempt: 1 for the first). ``started_at`` is when the attempt began
    (UTC) and ``duration`` how long it took in seconds, measured on a monotonic
    clock; :attr:`finished_at` is their sum. ``host``, ``ip``, ``tls`` and
    ``tls_verified`` say where it went and how (the host that gave the outcome,
    when several MX hosts were tried in one attempt). ``state`` is the
    recipient's state right after it.

    ``code``, ``enhanced_code`` and ``message`` are what this attempt got: the
    server's reply, or for an outcome decided here (a refused connection, a
    timeout, TLS required and not had) no ``code``, an RFC 3463
    ``enhanced_code`` and a short reason (:attr:`is_local`). Unlike
    :class:`RecipientStatus`, an attempt after which the retry lifetime ran out
    keeps the reply it got (``state`` says FAILED). ``message`` is valid Unicode
    and ``raw_message`` keeps the exact bytes when they differ, as in
    :class:`RecipientStatus`.
    """

    address: str
    attempt: int
    started_at: datetime
    duration: float = 0.0
    state: RecipientState
    code: int | None = None
    enhanced_code: str | None = None
    message: str | None = None
    raw_message: bytes | None = None
    host: str | None = None
    ip: str | None = None
    tls: bool | None = None
    tls_verified: bool | None = None

    @property
    def finished_at(self) -> datetime:
        """The end of the attempt, ``started_at`` plus ``duration``."""
        return self.started_at + timedelta(seconds=self.duration)

    @property
    def is_local(self) -> bool:
        """True when the outcome was decided here, not by a server's reply."""
        return self.code is None and self.message is not None

    @property
    def message_bytes(self) -> bytes | None:
        """The exact bytes of the reply text (see :attr:`RecipientStatus.message_bytes`)."""
        if self.raw_message is not None:
            return self.raw_message
        return None if self.message is None else wire_bytes(self.message)


@attrs.frozen(kw_only=True)
class MessageStatus:
    """The status of a whole message: its recipients' statuses, in envelope order."""

    message_id: str
    recipients: tuple[RecipientStatus, ...]
    submitted_at: datetime
    mail_from: str = ""

    @property
    def is_done(self) -> bool:
        """True when every recipient is ``DELIVERED`` or ``FAILED``."""
        return all(r.is_final for r in self.recipients)

    @property
    def is_delivered(self) -> bool:
        """True when every recipient is ``DELIVERED``."""
        return all(r.state is RecipientState.DELIVERED for r in self.recipients)

    def __iter__(self) -> Iterator[RecipientStatus]:
        return iter(self.recipients)

    def recipient(self, address: str) -> RecipientStatus:
        """Return the status of *address*: the local part compared exactly, the
        domain case-insensitively (and by its A-label), as every layer compares
        recipients.

        Raises:
            KeyError: *address* is not a recipient of this message.
        """
        wanted = recipient_key(address)
        for r in self.recipients:
            if recipient_key(r.address) == wanted:
                return r
        raise KeyError(address)

    def by_state(self, state: RecipientState) -> tuple[RecipientStatus, ...]:
        """Return the recipients currently in *state*."""
        return tuple(r for r in self.recipients if r.state is state)


@attrs.frozen(kw_only=True)
class DeliveryEvent:
    """A recipient changed state (or was queued): what ``Deliverer.events()`` yields.

    ``recipient`` is the recipient's full status right after the change;
    ``previous_state`` is ``None`` for the first event of a recipient (its queueing).
    ``missed`` is how many events this subscriber lost just before this one because
    it fell behind (its buffer was full); when it is not 0, re-read what you need
    with ``Deliverer.status()``.
    """

    message_id: str
    recipient: RecipientStatus
    previous_state: RecipientState | None
    at: datetime
    missed: int = 0

    @property
    def state(self) -> RecipientState:
        """The recipient's new state."""
        return self.recipient.state

    @property
    def address(self) -> str:
        """The recipient's address."""
        return self.recipient.address
