"""The :class:`Email` builder, and header checks shared with :func:`prepare`.

Pure and synchronous: no I/O.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable, Mapping
from email.header import Header
from email.headerregistry import Address, Group, UnstructuredHeader
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP, SMTPUTF8, EmailPolicy
from pathlib import PurePath
from types import MappingProxyType
from typing import Any

import attrs

from mailstrom_async._address import (
    check_text,
    header_address,
    parse_address_header,
    parse_mailbox,
)
from mailstrom_async._exceptions import InvalidMessageError

__all__ = [
    "LINE_BREAK",
    "Attachment",
    "Email",
    "address_groups",
    "addresses",
    "check_field",
    "pre_encode_unstructured",
    "set_policy",
    "str_tuple",
]

# Bodies are written 7-bit clean (quoted-printable or base64), so no 8BITMIME needed.
_BUILD_POLICY = SMTP.clone(cte_type="7bit")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §3.6.8 ftext
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 2045 token
_CONTENT_ID = re.compile(r"[!-;=?-~]+")  # printable ASCII without "<", ">"
LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc")
# RFC 5322 §3.6: fields that may appear at most once.
_SINGLETONS = frozenset({*_ADDRESS_HEADERS, "date", "message-id", "subject"})
# Email.headers must not set what a field or the MIME structure sets.
_RESERVED = {
    "from": "sender",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
    "list-unsubscribe": "list_unsubscribe",
    "precedence": "precedence",
    "mime-version": "build()",
    "content-type": "build()",
    "content-transfer-encoding": "build()",
}


def _guess_type(filename: str) -> str:
    # mimetypes.types_map is the built-in table unless mimetypes.init() has run;
    # guess_type() would read /etc/mime.types on first use (blocking I/O).
    suffix = PurePath(filename).suffix.lower()
    return mimetypes.types_map.get(suffix, "application/octet-stream")


@attrs.frozen(kw_only=True)
class Attachment:
    """A file attached to an :class:`Email`.

    ``content_type`` defaults to a guess from the file name's extension. With
    ``content_id`` set and the Email having HTML, the file is placed next to the
    HTML (``multipart/related``) so it can be shown as ``<img src="cid:ID">``;
    ``content_id`` is the ``ID`` part, with or without angle brackets.
    """

    filename: str
    content: bytes = attrs.field(repr=False)
    content_type: str = attrs.field(
        default=attrs.Factory(lambda self: _guess_type(self.filename), takes_self=True)
    )
    inline: bool = False
    """``Content-Disposition: inline`` rather than ``attachment``."""
    content_id: str | None = None


_AttachmentLike = Attachment | tuple[str, bytes] | tuple[str, bytes, str]


def str_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A tuple of strings; a single string is one item, ``None`` none."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _attachments(value: Iterable[_AttachmentLike]) -> tuple[Attachment, ...]:
    result = []
    for item in value:
        if isinstance(item, Attachment):
            result.append(item)
        elif len(item) == 3:
            result.append(
                Attachment(filename=item[0], content=item[1], content_type=item[2])
            )
        else:
            result.append(Attachment(filename=item[0], content=item[1]))
    return tuple(result)


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class Email:
    """A message to build: addresses, subject, text and/or HTML, attachments.

    Address fields take ``"addr@example.com"`` or ``"Name <addr@example.com>"``,
    one mailbox per entry (a single string is one entry). Nothing is checked until
    :meth:`build` (or :func:`prepare`) runs. Attachments may be given as
    :class:`Attachment` or as ``(filename, content)`` or
    ``(filename, content, content_type)`` tuples.
    """

    sender: str
    """The author (``From``)."""
    to: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    cc: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    bcc: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    """Envelope recipients that no other recipient sees."""
    reply_to: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    subject: str = ""
    text: str | None = attrs.field(default=None, repr=False)
    html: str | None = attrs.field(default=None, repr=False)
    attachments: tuple[Attachment, ...] = attrs.field(
        default=(), converter=_attachments
    )
    headers: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_mapping, hash=False
    )
    """Extra header fields, e.g. ``{"X-Campaign": "spring"}``."""
    list_unsubscribe: str | None = None
    """``List-Unsubscribe`` (RFC 2369): URIs, angle brackets added if missing."""
    precedence: str | None = None
    """``Precedence``, e.g. ``"bulk"``, which asks auto-responders to stay quiet."""

    def build(self) -> EmailMessage:
        """Return the message as an ``EmailMessage`` (policy ``SMTP``/``SMTPUTF8``).

        Text and HTML become ``multipart/alternative``, images with a content ID
        ``multipart/related`` with the HTML, other attachments ``multipart/mixed``.
        ``Bcc`` is kept in the result (``prepare`` removes it from the bytes); no
        ``Message-ID`` or ``Date`` is added (``prepare`` does that). An empty body
        is allowed.

        Raises:
            InvalidAddressError: an address is invalid.
            InvalidMessageError: no recipients, a CR, LF or NUL in a header value,
                a bad header name, or a bad attachment.
        """
        if not (self.to or self.cc or self.bcc):
            msg = "an Email needs at least one recipient in to, cc or bcc"
            raise InvalidMessageError(msg)
        message = EmailMessage(policy=_BUILD_POLICY)
        message["From"] = header_address(parse_mailbox(self.sender))
        for name, values in (
            ("To", self.to),
            ("Cc", self.cc),
            ("Bcc", self.bcc),
            ("Reply-To", self.reply_to),
        ):
            if values:
                message[name] = [header_address(parse_mailbox(v)) for v in values]
        fields: list[tuple[str, str]] = [("Subject", self.subject)]
        if self.list_unsubscribe is not None:
            value = self.list_unsubscribe.strip()
            fields.append(("List-Unsubscribe", value if "<" in value else f"<{value}>"))
        if self.precedence is not None:
            fields.append(("Precedence", self.precedence))
        for name, value in self.headers.items():
            if name.lower() in _RESERVED:
                field = _RESERVED[name.lower()]
                msg = f"set the {name!r} header with {field}, not headers="
                raise InvalidMessageError(msg)
            fields.append((name, value))
        for name, value in fields:
            _check_name(name)
            check_text(value, f"the {name} header")
            try:
                message[name] = value
            except Exception as exc:  # the stdlib parsers fail in assorted ways
                msg = f"the {name!r} header cannot be set to {value!r}: {exc}"
                raise InvalidMessageError(msg) from exc
        try:
            self._set_body(message)
        except InvalidMessageError:
            raise
        except (UnicodeError, ValueError, TypeError) as exc:
            msg = f"the Email's body or attachments cannot be encoded: {exc}"
            raise InvalidMessageError(msg) from exc
        pre_encode_unstructured(message)
        groups = address_groups(message)
        utf8 = any(not a.username.isascii() for a in addresses(groups, *groups))
        set_policy(message, SMTPUTF8 if utf8 else SMTP)
        return message

    def _set_body(self, message: EmailMessage) -> None:
        with_html = self.html is not None
        related = [a for a in self.attachments if with_html and a.content_id]
        mixed = [a for a in self.attachments if not (with_html and a.content_id)]
        html_part: MIMEPart = message
        if self.text is not None:
            message.set_content(self.text, cte=_text_cte(self.text))
            if self.html is not None:
                message.add_alternative(
                    self.html, subtype="html", cte=_text_cte(self.html)
                )
                html_part = list(message.iter_parts())[1]
        elif self.html is not None:
            message.set_content(self.html, subtype="html", cte=_text_cte(self.html))
        for a in related:  # shown within the HTML, so always inline
            maintype, subtype, _, cid = _attachment_options(a)
            html_part.add_related(
                a.content,
                maintype,
                subtype,
                filename=a.filename,
                disposition="inline",
                cid=cid,
            )
        for a in mixed:
            maintype, subtype, disposition, cid = _attachment_options(a)
            message.add_attachment(
                a.content,
                maintype,
                subtype,
                filename=a.filename,
                disposition=disposition,
                cid=cid,
            )


def _text_cte(text: str) -> str | None:
    # A NUL may not appear raw in a 7bit body (RFC 2045 §2.7); else the default.
    return "quoted-printable" if "\x00" in text else None


def _attachment_options(a: Attachment) -> tuple[str, str, str, str | None]:
    """Check an attachment; return its maintype, subtype, disposition and cid."""
    check_text(a.filename, "an attachment's filename")
    maintype, _, subtype = a.content_type.partition("/")
    if not (_TOKEN.fullmatch(maintype) and _TOKEN.fullmatch(subtype)):
        msg = f"content_type must be 'type/subtype', not {a.content_type!r}"
        raise InvalidMessageError(msg)
    if maintype.lower() == "multipart":
        msg = f"an attachment cannot be {a.content_type!r}"
        raise InvalidMessageError(msg)
    cid = None
    if a.content_id is not None:
        cid = a.content_id.removeprefix("<").removesuffix(">")
        if not _CONTENT_ID.fullmatch(cid):
            msg = f"content_id must be printable ASCII, no spaces: {a.content_id!r}"
            raise InvalidMessageError(msg)
        cid = f"<{cid}>"
    return maintype, subtype, "inline" if a.inline else "attachment", cid


def _check_name(name: str) -> None:
    if not _FIELD_NAME.fullmatch(name):
        msg = (
            f"a header name must be printable ASCII without ':' or spaces, not {name!r}"
        )
        raise InvalidMessageError(msg)


def check_field(name: str, value: str) -> None:
    """Check a header field's name and (unfolded or folded) value."""
    _check_name(name)
    # A line break is only allowed as folding: followed by a space or tab and text.
    first, *rest = LINE_BREAK.split(value)
    for line in rest:
        if line[:1] not in (" ", "\t") or not line.strip(" \t"):
            msg = f"the {name} header must not contain CR or LF, not {value!r}"
            raise InvalidMessageError(msg)
    check_text(first + "".join(rest), f"the {name} header")


def pre_encode_unstructured(message: Message) -> None:
    """Encode non-ASCII unstructured header values as RFC 2047 words ourselves.

    CPython gh-144156 (not fixed in 3.11): the folder can drop the space between
    two encoded words. ``email.header.Header`` encodes the spaces inside the words.
    """
    items = list(message.raw_items())
    if not any(_is_non_ascii_unstructured(v) for _, v in items):
        return
    for name in {n for n, _ in items}:
        del message[name]
    for name, value in items:
        if _is_non_ascii_unstructured(value):
            value = Header(str(value), "utf-8", header_name=name).encode(linesep="\r\n")
        message.set_raw(name, value)


def _is_non_ascii_unstructured(value: object) -> bool:
    return isinstance(value, UnstructuredHeader) and not str(value).isascii()


def set_policy(message: Message, policy: EmailPolicy[Any]) -> None:
    """Give *message* and all its parts *policy*."""
    for part in message.walk():
        part.policy = policy


def address_groups(message: Message) -> dict[str, tuple[Group, ...]]:
    """Check every header; parse the address headers (lower-cased name -> groups)."""
    counts: dict[str, int] = {}
    groups: dict[str, tuple[Group, ...]] = {}
    for part in message.walk():
        for name, value in part.raw_items():
            check_field(name, str(value))
    for name, value in message.raw_items():
        key = name.lower()
        counts[key] = counts.get(key, 0) + 1
        if key in _SINGLETONS and counts[key] > 1:
            msg = f"the {name} header may appear only once (RFC 5322 §3.6)"
            raise InvalidMessageError(msg)
        if key in _ADDRESS_HEADERS:
            groups[key] = parse_address_header(name, LINE_BREAK.sub("", str(value)))
    return groups


def addresses(groups: dict[str, tuple[Group, ...]], *keys: str) -> list[Address]:
    return [a for k in keys for g in groups.get(k, ()) for a in g.addresses]
