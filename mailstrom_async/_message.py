"""Check and render messages for SMTP, with the stdlib ``email`` package.

:func:`prepare` turns an :class:`Email`, an ``EmailMessage`` or raw bytes into a
:class:`PreparedMessage`: the envelope and the exact CRLF bytes to send, with
``Message-ID`` and ``Date`` added when missing and ``Bcc`` removed. Anything that
cannot be sent safely raises :class:`~mailstrom_async.InvalidMessageError` here,
before anything is stored. Pure and synchronous: no I/O.
"""

from __future__ import annotations

import base64
import copy
import quopri
import re
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from email.headerregistry import Address, Group
from email.message import EmailMessage, Message
from email.parser import Parser
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import cast

import attrs

from mailstrom_async._address import (
    ascii_domain,
    check_text,
    envelope_address,
    header_address,
    parse_address,
    recipient_key,
)
from mailstrom_async._builder import Attachment, Email, build_with_groups, str_tuple
from mailstrom_async._config import Config
from mailstrom_async._exceptions import InvalidAddressError, InvalidMessageError
from mailstrom_async._fastrender import message_id_line, render_email
from mailstrom_async._headers import (
    LINE_BREAK,
    RENDER_SMTP,
    RENDER_SMTPUTF8,
    address_groups,
    addresses,
    fold_addresses,
    pre_encode_unstructured,
    replace_raw,
    set_policy,
)
from mailstrom_async._render import crlf_only, has_long_line, long_line, render, to_crlf

__all__ = [
    "Attachment",
    "Email",
    "PreparedMessage",
    "check_size",
    "envelope_address",
    "parse_address",
    "prepare",
]

_DEFAULT_CONFIG = Config()
_MAX_LINE = 998  # octets, without the CRLF (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6)
_FIELD_LINE = re.compile(rb"[!-9;-~]+:")
_MSG_ID = re.compile(r"<[^<>\s]+>")


def _author(groups: dict[str, tuple[Group, ...]]) -> Address:
    """Return the mailbox responsible for sending: Sender if present, else From."""
    authors = addresses(groups, "from")
    if not authors:
        msg = "the message has no From address (RFC 5322 §3.6.2)"
        raise InvalidMessageError(msg)
    if "sender" in groups:
        senders = addresses(groups, "sender")
        if len(senders) != 1:
            msg = f"the Sender header must be exactly one mailbox, not {len(senders)}"
            raise InvalidMessageError(msg)
        return senders[0]
    if len(authors) > 1:
        msg = "a From header with several mailboxes needs a Sender (RFC 5322 §3.6.2)"
        raise InvalidMessageError(msg)
    return authors[0]


def _wire(address: Address) -> str:
    return f"{address.username}@{ascii_domain(address.domain)}"


def _envelope(
    groups: dict[str, tuple[Group, ...]],
    mail_from: str | None,
    rcpt_to: str | Iterable[str] | None,
) -> tuple[str, tuple[str, ...]]:
    """Return MAIL FROM and the deduplicated RCPT TO list, in A-label form."""
    author = _author(groups)
    if mail_from is None:
        sender = _wire(author)
    elif mail_from.strip() in ("", "<>"):
        sender = ""  # the null reverse-path (RFC 5321 §4.5.5)
    else:
        check_text(mail_from, "mail_from", address=True)
        sender = envelope_address(mail_from)
    if rcpt_to is None:
        candidates = [_wire(a) for a in addresses(groups, "to", "cc", "bcc")]
    else:
        candidates = []
        for value in str_tuple(rcpt_to):
            check_text(value, "rcpt_to", address=True)
            candidates.append(envelope_address(value))
    # RFC 5321 §2.4: local parts are case-sensitive, domains are not.
    seen: set[tuple[str, str]] = set()
    recipients: list[str] = []
    for r in candidates:
        key = recipient_key(r)
        if key not in seen:
            seen.add(key)
            recipients.append(r)
    if not recipients:
        msg = "the message has no recipients (no To, Cc or Bcc, and no rcpt_to)"
        raise InvalidMessageError(msg)
    return sender, tuple(recipients)


def _message_id(message: Message) -> str:
    """The unfolded Message-ID, checked (``""`` if absent or empty)."""
    for key, value in message.raw_items():
        if key.lower() == "message-id":
            message_id = LINE_BREAK.sub("", str(value)).strip()
            if message_id and not _MSG_ID.fullmatch(message_id):
                msg = f"Message-ID must be '<id@domain>' (RFC 5322 §3.6.4), not {message_id!r}"
                raise InvalidMessageError(msg)
            return message_id
    return ""


def _new_message_id(groups: dict[str, tuple[Group, ...]], config: Config) -> str:
    domain = config.message_id_domain or ascii_domain(_author(groups).domain)
    check_text(domain, "message_id_domain")
    return make_msgid(domain=domain)


# prepare() checks what it makes while making it; a PreparedMessage made any
# other way (by hand, or by attrs.evolve from one prepare() made) is checked as it
# is constructed. Set only around the construction in _finish().
_MADE_BY_PREPARE: ContextVar[bool] = ContextVar("made_by_prepare", default=False)


@attrs.frozen(kw_only=True)
class PreparedMessage:
    """A message ready for SMTP: envelope plus the exact bytes for ``DATA``.

    Envelope addresses use A-label domains; ``mail_from`` is ``""`` for the null
    reverse-path. ``data`` has CRLF line endings and no line over 998 octets.
    ``smtputf8`` says the message itself needs the server's SMTPUTF8 extension
    (its header section has UTF-8); an address with a non-ASCII local part needs
    it too, for that address only.

    Made by :func:`prepare`, or by hand (or ``attrs.evolve``), in which case it is
    checked as it is constructed, as :func:`prepare` checks what it makes: a
    ``message_id`` in angle brackets; envelope addresses that are valid and
    written as :func:`prepare` writes them (no display name, A-label domains);
    at least one recipient, none twice; ``data`` with a header section that has
    a ``From`` field, no NUL and no line over 998 octets. A bare CR or LF in
    ``data`` becomes CRLF, and a final CRLF is added when missing, as
    :func:`prepare` does for raw bytes.

    Raises:
        InvalidAddressError: an envelope address is invalid, or not in envelope
            form.
        InvalidMessageError: anything else above.
    """

    message_id: str
    """The ``Message-ID`` header value, with its angle brackets."""
    mail_from: str
    rcpt_to: tuple[str, ...] = attrs.field(converter=str_tuple)
    data: bytes = attrs.field(repr=False)
    smtputf8: bool = False

    def __attrs_post_init__(self) -> None:
        if not _MADE_BY_PREPARE.get():
            _check_prepared(self)

    @property
    def size(self) -> int:
        """The length of ``data`` in octets."""
        return len(self.data)

    @property
    def has_8bit_data(self) -> bool:
        """True when ``data`` is not pure ASCII (send with ``BODY=8BITMIME``)."""
        return not self.data.isascii()


def _check_prepared(prepared: PreparedMessage) -> None:
    """Check a PreparedMessage that :func:`prepare` did not make; normalise its
    line endings."""
    message_id = prepared.message_id
    if not _MSG_ID.fullmatch(message_id):
        msg = f"message_id must be '<id@domain>' (RFC 5322 §3.6.4), not {message_id!r}"
        raise InvalidMessageError(msg)
    if prepared.mail_from != "":
        _check_envelope(prepared.mail_from, "mail_from")
    if not prepared.rcpt_to:
        msg = "the message has no recipients (rcpt_to is empty)"
        raise InvalidMessageError(msg)
    seen: set[tuple[str, str]] = set()
    for address in prepared.rcpt_to:
        _check_envelope(address, "rcpt_to")
        key = recipient_key(address)
        if key in seen:
            msg = f"rcpt_to has {address!r} twice"
            raise InvalidAddressError(msg, address)
        seen.add(key)
    given: object = prepared.data
    if isinstance(given, bytearray | memoryview):
        given = bytes(given)
    if not isinstance(given, bytes):
        msg = f"data must be bytes, not {type(given).__name__}"
        raise TypeError(msg)
    data = to_crlf(given)  # RFC 5321 §2.3.8, as prepare() does for raw bytes
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data is not prepared.data:
        object.__setattr__(prepared, "data", data)
    head = _check_bytes(data)
    has_from = False
    for number, line in enumerate(head.split(b"\r\n") if head else (), start=1):
        if line[:1] in (b" ", b"\t") and number > 1:
            continue
        if not _FIELD_LINE.match(line):
            msg = (
                f"header line {number} is not a field or a continuation: {line[:60]!r}"
            )
            raise InvalidMessageError(msg)
        has_from = has_from or line[:5].lower() == b"from:"
    if not has_from:
        msg = "the message has no From header field (RFC 5322 §3.6.2)"
        raise InvalidMessageError(msg)
    if not prepared.smtputf8 and not head.isascii():
        object.__setattr__(prepared, "smtputf8", True)


def _check_envelope(address: str, what: str) -> None:
    check_text(address, what, address=True)
    wire = envelope_address(address)
    if wire != address:
        msg = (
            f"{what} address {address!r} is not in envelope form; write it as "
            f"{wire!r} (what prepare() and envelope_address() make)"
        )
        raise InvalidAddressError(msg, address)


def prepare(
    message: Email | EmailMessage | bytes,
    *,
    mail_from: str | None = None,
    rcpt_to: str | Sequence[str] | None = None,
    config: Config | None = None,
) -> PreparedMessage:
    """Check *message* and render it for SMTP.

    The envelope defaults to the Sender (else the single From) address and the
    To, Cc and Bcc addresses; *mail_from* (``""`` for a null reverse-path) and
    *rcpt_to* override them and are required for raw bytes. Recipients are
    deduplicated (domain compared case-insensitively) in first-seen order. A
    ``Message-ID`` (domain: ``config.message_id_domain``, else the sender's) and a
    ``Date`` are added when missing; ``Bcc`` is removed from the bytes. An
    ``EmailMessage`` is copied, never changed; parts with lines too long for SMTP
    are re-encoded (quoted-printable or base64). Raw bytes are kept as they are
    apart from line endings (bare CR or LF become CRLF) and those header changes.

    Raises:
        InvalidAddressError: an address in a header or in the envelope is invalid.
        InvalidMessageError: missing From, no recipients, CR/LF/NUL in a header or
            envelope address, a header that cannot be encoded, a line over 998
            octets that cannot be re-encoded, or a message over
            ``config.limits.max_message_size``.
    """
    return _prepare(message, mail_from, rcpt_to, config, fast=True)


def _prepare(
    message: Email | EmailMessage | bytes,
    mail_from: str | None,
    rcpt_to: str | Sequence[str] | None,
    config: Config | None,
    *,
    fast: bool,
) -> PreparedMessage:
    """:func:`prepare`; *fast* False keeps an Email off the fast path (tests)."""
    config = _DEFAULT_CONFIG if config is None else config
    if fast and isinstance(message, Email):
        prepared = _prepare_fast(message, mail_from, rcpt_to, config)
        if prepared is not None:
            return prepared
    if isinstance(message, Email):
        built: Message
        built, groups = build_with_groups(message)
    elif isinstance(message, Message):
        built = _copy_tree(message)
        set_policy(built, SMTP)
        groups = address_groups(built)
    elif isinstance(message, bytes | bytearray | memoryview):
        return _prepare_bytes(bytes(message), mail_from, rcpt_to, config)
    else:
        kind = type(message).__name__  # type: ignore[unreachable]
        msg = f"prepare() takes an Email, an EmailMessage or bytes, not {kind}"
        raise TypeError(msg)
    sender, recipients = _envelope(groups, mail_from, rcpt_to)
    shown = [key for key in groups if key != "bcc"]
    utf8_headers = any(not a.username.isascii() for a in addresses(groups, *shown))
    for key, gs in groups.items():
        name = next(n for n in built if n.lower() == key)
        if key == "bcc":
            del built[name]
            continue
        if any(not a.domain.isascii() for g in gs for a in g.addresses):
            ascii_groups = tuple(map(_with_ascii_domains, gs))
            if ascii_groups != gs:
                value = fold_addresses(name, ascii_groups, utf8=utf8_headers)
                replace_raw(built, name, value)
    message_id = _message_id(built)
    if not message_id:
        del built["Message-ID"]
        message_id = _new_message_id(groups, config)
        built["Message-ID"] = message_id
    if "Date" not in built:
        built["Date"] = format_datetime(datetime.now(UTC))
    pre_encode_unstructured(built)
    _reencode_long_lines(built)
    try:
        data = render(built, RENDER_SMTPUTF8 if utf8_headers else RENDER_SMTP)
    except Exception as exc:  # the email package fails in many ways on bad input
        msg = f"the message cannot be rendered: {exc}"
        raise InvalidMessageError(msg) from exc
    return _finish(message_id, sender, recipients, data, config)


def _prepare_fast(
    email: Email,
    mail_from: str | None,
    rcpt_to: str | Sequence[str] | None,
    config: Config,
) -> PreparedMessage | None:
    """:func:`prepare` of a simple Email without the email package (see
    :mod:`._fastrender`); None where the stdlib path must do it."""
    fast = render_email(email)
    if fast is None:
        return None
    sender, recipients = _envelope(fast.groups, mail_from, rcpt_to)
    message_id = _new_message_id(fast.groups, config)
    id_line = message_id_line(message_id)
    if id_line is None:
        return None
    date = format_datetime(datetime.now(UTC)).encode("ascii")
    data = b"".join((fast.head, id_line, b"Date: ", date, b"\r\n\r\n", fast.body))
    return _finish(message_id, sender, recipients, data, config)


def _copy_tree(message: Message) -> Message:
    """Copy *message* and its parts, sharing what never changes in place.

    ``prepare`` edits the copy's header lists, payloads and policies only; header
    values and string payloads are immutable, so a structural copy is as safe as
    ``copy.deepcopy`` and about twenty times cheaper.
    """
    clone = copy.copy(message)
    fields = vars(clone)
    fields["_headers"] = list(fields["_headers"])
    fields["defects"] = list(fields.get("defects", ()))
    payload = fields.get("_payload")
    if isinstance(payload, list):
        fields["_payload"] = [_copy_tree(part) for part in payload]
    return clone


def _with_ascii_domains(group: Group) -> Group:
    return Group(group.display_name, tuple(header_address(a) for a in group.addresses))


def _reencode_long_lines(message: Message) -> None:
    """Re-encode leaf parts that hold a NUL or a line too long for SMTP."""
    for part in message.walk():
        payload = part.get_payload()
        if part.is_multipart() or not isinstance(payload, str):
            continue
        if "\x00" not in payload and not has_long_line(payload, _MAX_LINE):
            continue
        raw = cast("bytes", part.get_payload(decode=True))
        if part.get_content_maintype() == "text":
            raw = raw.replace(b"\r\n", b"\n")
            body, cte = quopri.encodestring(raw).decode("ascii"), "quoted-printable"
        else:
            body, cte = base64.encodebytes(raw).decode("ascii"), "base64"
        del part["Content-Transfer-Encoding"]
        part.set_payload(body)
        part["Content-Transfer-Encoding"] = cte


def _prepare_bytes(
    raw: bytes,
    mail_from: str | None,
    rcpt_to: str | Sequence[str] | None,
    config: Config,
) -> PreparedMessage:
    if mail_from is None or rcpt_to is None:
        msg = "raw bytes need an explicit envelope: pass mail_from= and rcpt_to="
        raise InvalidMessageError(msg)
    data = to_crlf(raw)  # RFC 5321 §2.3.8: no bare CR or LF
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    # The body is a view: copying 25 MB holds the GIL (see _render).
    body: bytes | memoryview
    if data.startswith(b"\r\n"):
        head, body = b"", memoryview(data)[2:]
    else:
        end = data.find(b"\r\n\r\n")
        if end == -1:  # headers only, no body
            head, body = data[:-2], b""
        else:
            head, body = data[:end], memoryview(data)[end + 4 :]
    fields: list[list[bytes]] = []
    for number, line in enumerate(head.split(b"\r\n") if head else (), start=1):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD_LINE.match(line):
            fields.append([line])
        else:
            msg = (
                f"header line {number} is not a field or a continuation: {line[:60]!r}"
            )
            raise InvalidMessageError(msg)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        msg = "the header section has 8-bit bytes that are not UTF-8 (RFC 6532)"
        raise InvalidMessageError(msg) from None
    headers = Parser(policy=SMTP).parsestr(text + "\r\n\r\n", headersonly=True)
    groups = address_groups(headers)
    sender, recipients = _envelope(groups, mail_from, rcpt_to)
    drop = {b"bcc"}
    added = b""
    message_id = _message_id(headers)
    if not message_id:
        drop.add(b"message-id")  # an empty one
        message_id = _new_message_id(groups, config)
        added += b"Message-ID: " + message_id.encode("ascii") + b"\r\n"
    if "Date" not in headers:
        added += (
            b"Date: " + format_datetime(datetime.now(UTC)).encode("ascii") + b"\r\n"
        )
    kept = b"".join(
        line + b"\r\n"
        for field in fields
        if field[0].partition(b":")[0].lower() not in drop
        for line in field
    )
    data = b"".join((added, kept, b"\r\n", body))
    return _finish(message_id, sender, recipients, data, config)


def _finish(
    message_id: str,
    sender: str,
    recipients: tuple[str, ...],
    data: bytes,
    config: Config,
) -> PreparedMessage:
    """Check the final bytes and wrap them up with the envelope."""
    if not crlf_only(data):  # pragma: no cover
        msg = "the message contains a bare CR or LF"  # defensive: normalised above
        raise InvalidMessageError(msg)
    head = _check_bytes(data)
    check_size(len(data), config)
    token = _MADE_BY_PREPARE.set(True)
    try:
        return PreparedMessage(
            message_id=message_id,
            mail_from=sender,
            rcpt_to=recipients,
            data=data,
            smtputf8=not head.isascii(),
        )
    finally:
        _MADE_BY_PREPARE.reset(token)


def _check_bytes(data: bytes) -> bytes:
    """Check CRLF message bytes: no NUL, no line over 998 octets, a header section
    that is ASCII or UTF-8; return the header section (without its blank line)."""
    if b"\x00" in data:
        msg = "the message contains a NUL octet, which SMTP cannot carry"
        raise InvalidMessageError(msg)
    if len(data) > _MAX_LINE and (line := long_line(data, _MAX_LINE)) is not None:
        snippet = line[:40]
        msg = (
            f"a line starting {snippet!r} is longer than {_MAX_LINE} octets and cannot "
            "be re-encoded (RFC 5322 §2.1.1)"
        )
        raise InvalidMessageError(msg)
    if data.startswith(b"\r\n"):
        head = b""
    else:
        end = data.find(b"\r\n\r\n")
        head = data[:-2] if end == -1 else data[:end]
    if not head.isascii():
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            msg = "the header section has 8-bit bytes that are not UTF-8 (RFC 6532)"
            raise InvalidMessageError(msg) from None
    return head


def check_size(size: int, config: Config) -> None:
    """Refuse a message of *size* octets over ``config.limits.max_message_size``."""
    if size > config.limits.max_message_size:
        msg = (
            f"the message is {size} octets; the limit "
            f"(limits.max_message_size) is {config.limits.max_message_size}"
        )
        raise InvalidMessageError(msg)
