"""The :class:`Email` builder.

Every address is parsed once, here; the address headers are written from the
parsed mailboxes (:func:`~mailstrom_async._headers.fold_addresses`) and the
groups are handed on to :func:`prepare` with the message
(:func:`build_with_groups`), so nothing is parsed twice. Pure and synchronous:
no I/O.
"""

from __future__ import annotations

import base64
import mimetypes
import re
from collections.abc import Iterable, Mapping
from email.headerregistry import Group
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP, SMTPUTF8
from pathlib import PurePath
from types import MappingProxyType
from typing import cast

import attrs

from mailstrom_async._address import check_text, header_address, parse_mailbox
from mailstrom_async._exceptions import InvalidMessageError
from mailstrom_async._headers import (
    address_groups,
    addresses,
    check_name,
    fold_addresses,
    pre_encode_unstructured,
    set_policy,
)

__all__ = ["Attachment", "Email", "build_with_groups", "str_tuple"]

# Bodies are written 7-bit clean (quoted-printable or base64), so no 8BITMIME needed.
_BUILD_POLICY = SMTP.clone(cte_type="7bit")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 2045 token
_CONTENT_ID = re.compile(r"[!-;=?-~]+")  # printable ASCII without "<", ">"
# The address fields of an Email: header name, key of the groups, attribute.
_ADDRESS_FIELDS = (
    ("From", "from", "sender"),
    ("To", "to", "to"),
    ("Cc", "cc", "cc"),
    ("Bcc", "bcc", "bcc"),
    ("Reply-To", "reply-to", "reply_to"),
)
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
        return build_with_groups(self)[0]

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
                b"",
                maintype,
                subtype,
                filename=a.filename,
                disposition="inline",
                cid=cid,
            )
            _set_base64(html_part, a.content)
        for a in mixed:
            maintype, subtype, disposition, cid = _attachment_options(a)
            message.add_attachment(
                b"",
                maintype,
                subtype,
                filename=a.filename,
                disposition=disposition,
                cid=cid,
            )
            _set_base64(message, a.content)


def build_with_groups(
    email: Email,
) -> tuple[EmailMessage, dict[str, tuple[Group, ...]]]:
    """:meth:`Email.build`, with the parsed groups of every address header.

    The keys are lower-cased header names, as in
    :func:`~mailstrom_async._headers.address_groups`.
    """
    if not (email.to or email.cc or email.bcc):
        msg = "an Email needs at least one recipient in to, cc or bcc"
        raise InvalidMessageError(msg)
    known: dict[str, tuple[Group, ...]] = {}
    for _, key, field in _ADDRESS_FIELDS:
        values = getattr(email, field)
        if values:
            known[key] = tuple(
                Group(None, (header_address(parse_mailbox(v)),))
                for v in ((values,) if isinstance(values, str) else values)
            )
    # Raw UTF-8 display names only where the shown headers need SMTPUTF8 anyway:
    # prepare() strips Bcc and writes ASCII headers when only a Bcc needs it.
    shown = [key for key in known if key != "bcc"]
    utf8 = any(not a.username.isascii() for a in addresses(known, *shown))
    message = EmailMessage(policy=_BUILD_POLICY)
    for name, key, _ in _ADDRESS_FIELDS:
        if key in known:
            message.set_raw(name, fold_addresses(name, known[key], utf8=utf8))
    fields: list[tuple[str, str]] = [("Subject", email.subject)]
    if email.list_unsubscribe is not None:
        value = email.list_unsubscribe.strip()
        fields.append(("List-Unsubscribe", value if "<" in value else f"<{value}>"))
    if email.precedence is not None:
        fields.append(("Precedence", email.precedence))
    for name, value in email.headers.items():
        if name.lower() in _RESERVED:
            field = _RESERVED[name.lower()]
            msg = f"set the {name!r} header with {field}, not headers="
            raise InvalidMessageError(msg)
        fields.append((name, value))
    for name, value in fields:
        check_name(name)
        check_text(value, f"the {name} header")
        try:
            message[name] = value
        except Exception as exc:  # the stdlib parsers fail in assorted ways
            msg = f"the {name!r} header cannot be set to {value!r}: {exc}"
            raise InvalidMessageError(msg) from exc
    try:
        email._set_body(message)
    except InvalidMessageError:
        raise
    except (UnicodeError, ValueError, TypeError) as exc:
        msg = f"the Email's body or attachments cannot be encoded: {exc}"
        raise InvalidMessageError(msg) from exc
    pre_encode_unstructured(message)
    groups = address_groups(message, known)
    utf8 = any(not a.username.isascii() for a in addresses(groups, *groups))
    set_policy(message, SMTPUTF8 if utf8 else SMTP)
    return message, groups


def _set_base64(container: MIMEPart, content: bytes) -> None:
    """Give the part just attached to *container* *content* in base64.

    What ``add_attachment(content, ...)`` writes (lines of 76 characters), but
    joined a slice at a time: the email package joins one string per line in
    one call, which on 25 MB holds the GIL for a tenth of a second.
    """
    part = cast("list[MIMEPart]", container.get_payload())[-1]
    step = 57 * 16_384  # 57 octets make one line of 76 characters
    part.set_payload(
        "".join(
            base64.encodebytes(content[i : i + step]).decode("ascii")
            for i in range(0, len(content), step)
        )
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
