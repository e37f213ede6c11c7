"""The fast path of :func:`prepare`: simple :class:`Email`\\ s straight to bytes.

An Email with text and/or HTML, no attachments, ASCII local parts and ordinary
header fields is written here without the ``email`` package's object model:
the same bytes that :meth:`Email.build` plus the generator would write (a
property test compares the two over generated messages), in a tenth of the
time. The rules copied from the email package (CPython 3.11's
``contentmanager._encode_text``, ``_header_value_parser._refold_parse_tree``
for unstructured values, the generator's multipart layout) are each taken
only as far as their plain cases go: anything else, and anything invalid,
makes :func:`render_email` return None, and :func:`prepare` takes the stdlib
path, which raises the documented error. The fast path never raises for an
Email the stdlib path refuses, and never guesses.

Pure and synchronous: no I/O.
"""

from __future__ import annotations

import binascii
import random
import re
import sys
from email import quoprimime
from email.header import Header
from email.headerregistry import Group, HeaderRegistry
from typing import NamedTuple

from mailstrom_async._address import check_text, header_address, parse_mailbox
from mailstrom_async._builder import _ADDRESS_FIELDS, _RESERVED, Email
from mailstrom_async._exceptions import InvalidMessageError
from mailstrom_async._headers import check_name, fold_addresses

__all__ = ["FastRender", "message_id_line", "render_email"]

_WIDTH = 78  # email.policy.SMTP's max_line_length
#: Bodies longer than this (characters) take the stdlib path, which works in
#: slices (see _render): one C call over them here would hold the GIL long.
_MAX_BODY = 1 << 20
#: Names the email package parses as structured fields: left to it.
_STRUCTURED = frozenset(HeaderRegistry().registry)
#: Printable ASCII, spaces and tabs: an unstructured value written as it is.
_PLAIN = re.compile(r"[\t -~]*")
_TOKENS = re.compile(r"[ \t]+|[^ \t]+")
#: What make_msgid() writes for a host-name domain.
_PLAIN_ID = re.compile(r"<[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+>")
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))  # as email.generator's _fmt


class FastRender(NamedTuple):
    """An Email rendered but for its ``Message-ID`` and ``Date`` fields."""

    groups: dict[str, tuple[Group, ...]]
    """Parsed address headers, lower-cased name -> groups (Bcc included)."""
    head: bytes
    """The header fields before ``Message-ID`` and ``Date``, each with CRLF."""
    body: bytes
    """Everything after the blank line."""


def render_email(email: Email) -> FastRender | None:
    """*email* rendered as :func:`prepare` renders it, or None for the stdlib path."""
    try:
        return _render(email)
    except (InvalidMessageError, TypeError, AttributeError, UnicodeError):
        return None  # the stdlib path raises the documented error for it


def _render(email: Email) -> FastRender | None:
    if email.attachments or not (email.to or email.cc or email.bcc):
        return None
    groups: dict[str, tuple[Group, ...]] = {}
    for _, key, field in _ADDRESS_FIELDS:
        values = getattr(email, field)
        if values:
            if isinstance(values, str):
                values = (values,)
            groups[key] = tuple(
                Group(None, (header_address(parse_mailbox(v)),)) for v in values
            )
    if any(
        not a.username.isascii()
        for gs in groups.values()
        for g in gs
        for a in g.addresses
    ):
        return None  # SMTPUTF8: raw UTF-8 names, another policy
    out = [
        f"{name}: {fold_addresses(name, groups[key], utf8=False)}\r\n"
        for name, key, _ in _ADDRESS_FIELDS
        if key in groups and key != "bcc"
    ]
    fields = _fields(email)
    if fields is None:
        return None
    for name, value in fields:
        folded = _unstructured(name, value)
        if folded is None:
            return None
        out.append(folded)
    body = _body(email)
    if body is None:
        return None
    out.append(body[0])
    return FastRender(groups, "".join(out).encode("ascii"), body[1])


def _fields(email: Email) -> list[tuple[str, str]] | None:
    """The unstructured fields of *email* in build order, or None."""
    fields = [("Subject", email.subject)]
    if email.list_unsubscribe is not None:
        value = email.list_unsubscribe.strip()
        fields.append(("List-Unsubscribe", value if "<" in value else f"<{value}>"))
    if email.precedence is not None:
        fields.append(("Precedence", email.precedence))
    for name, value in email.headers.items():
        key = name.lower()
        if key in _RESERVED or key in _STRUCTURED or key.startswith("content-"):
            return None  # refused, parsed, or moved by the MIME structure
        fields.append((name, value))
    for name, value in fields:
        if len(name) > 60:
            return None
        check_name(name)
        check_text(value, f"the {name} header")
    return fields


def _unstructured(name: str, value: str) -> str | None:
    """The field *name*: *value* as the email package folds it, or None."""
    if "=?" in value:
        return None  # the parser would decode what looks like an encoded word
    if not value.isascii():
        # _headers.pre_encode_unstructured, then EmailPolicy._fold of a raw value
        encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
        lines = encoded.splitlines()
        if len(lines[0]) + len(name) + 2 > _WIDTH or any(
            len(x) > _WIDTH for x in lines[1:]
        ):
            return None  # it would be refolded
        return name + ": " + "\r\n".join(lines) + "\r\n"
    if not _PLAIN.fullmatch(value):
        return None
    if not value:
        return f"{name}:\r\n"
    # _refold_parse_tree over [label, " ", unstructured tokens].
    line = f"{name}: "
    if len(value) <= _WIDTH - len(line):
        return f"{line}{value}\r\n"
    if len(value) + 1 <= _WIDTH:  # the whole value on a line of its own
        return f"{name}:\r\n {value}\r\n"
    lines = [line]
    for token in _TOKENS.findall(value):
        if len(token) <= _WIDTH - len(lines[-1]):
            lines[-1] += token
            continue
        if len(token) + 1 > _WIDTH:
            return None  # the email package would write an encoded word
        last = lines[-1]
        stolen = last[-1] if last and last[-1] in " \t" else ""
        if stolen:
            lines[-1] = last[:-1]
        elif token[0] not in " \t":
            return None  # pragma: no cover - a word always follows blanks
        lines.append(stolen + token)
    return "\r\n".join(lines) + "\r\n"


def _body(email: Email) -> tuple[str, bytes] | None:
    """The MIME header fields and the body of *email*, or None."""
    text, html = email.text, email.html
    if text is None and html is None:
        return "", b""
    parts: list[tuple[str, bytes]] = []
    for content, subtype in ((text, "plain"), (html, "html")):
        if content is None:
            continue
        # (a value of another type raises TypeError: the stdlib path then)
        if len(content) > _MAX_BODY or "\x00" in content:
            return None
        cte, payload = _encode_text(content)
        fields = (
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n"
        )
        parts.append((fields, payload))
    if len(parts) == 1:
        fields, payload = parts[0]
        return fields + "MIME-Version: 1.0\r\n", payload
    (text_fields, text_body), (html_fields, html_body) = parts
    boundary = _boundary()
    dashes = b"--" + boundary.encode("ascii")
    if dashes in text_body or dashes in html_body:
        return None  # the generator would pick another one
    body = b"".join(
        (
            dashes + b"\r\n",
            text_fields.encode("ascii"),
            b"\r\n",
            text_body,
            b"\r\n" + dashes + b"\r\n",
            # add_alternative() makes the part an EmailMessage, which adds this
            html_fields.encode("ascii") + b"MIME-Version: 1.0\r\n",
            b"\r\n",
            html_body,
            b"\r\n" + dashes + b"--\r\n",
        )
    )
    head = (
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'
    )
    return head, body


def _boundary() -> str:
    """A boundary as ``email.generator.Generator._make_boundary`` draws one."""
    token = random.randrange(sys.maxsize)  # as the generator draws it
    return f"{'=' * 15}{token:0{_BOUNDARY_DIGITS}d}=="


def _encode_text(text: str) -> tuple[str, bytes]:
    """``contentmanager._encode_text(text, "utf-8", None, policy)`` under the
    builder's policy (78 columns, 7bit), as the generator writes it (CRLF)."""
    lines = text.encode("utf-8").splitlines()
    # The lines are ASCII exactly when the text is (line breaks are ASCII).
    if max(map(len, lines), default=0) <= _WIDTH and text.isascii():
        return "7bit", b"\r\n".join(lines) + b"\r\n"
    sniff = b"\r\n".join(lines[:10]) + b"\r\n"
    sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), _WIDTH)
    if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
        whole = b"\r\n".join(lines) + b"\r\n"
        step = _WIDTH // 4 * 3
        encoded = b"".join(
            binascii.b2a_base64(whole[i : i + step]) for i in range(0, len(whole), step)
        )
        return "base64", encoded.replace(b"\n", b"\r\n")
    if len(lines) <= 10:
        qp = sniff_qp
    else:
        qp = quoprimime.body_encode(b"\n".join(lines).decode("latin-1") + "\n", _WIDTH)
    return "quoted-printable", _crlf(qp)


def _crlf(text: str) -> bytes:
    """ASCII *text* with every line end (CRLF, CR, LF) written as CRLF."""
    data = text.encode("ascii")
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def message_id_line(message_id: str) -> bytes | None:
    """The ``Message-ID`` field for *message_id* as the email package writes it
    when it fits on the line; None otherwise (the email package's folding of a
    long msg-id depends on how it tokenises it: left to it)."""
    if not _PLAIN_ID.fullmatch(message_id):
        return None
    if len(message_id) > _WIDTH - len("Message-ID: "):
        return None
    return f"Message-ID: {message_id}\r\n".encode("ascii")
