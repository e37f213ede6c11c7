"""8-bit bodies made 7-bit for servers without 8BITMIME (RFC 6152 §3).

:func:`downgrade` re-encodes every MIME leaf part that holds 8-bit octets: text
parts to quoted-printable, the others to base64, with each part's
``Content-Transfer-Encoding`` header replaced in place (multipart and
``message/rfc822`` containers marked ``8bit`` become ``7bit``). Everything else
is written back as it came: header fields keep their text and folding (only the
space after a field's colon is made one space), boundaries, preambles and
epilogues are kept, and the decoded content of every part is unchanged. What
cannot be re-encoded raises :class:`NotDowngradableError`: 8-bit octets in a
header section (they need SMTPUTF8), or in the body of a message that is not
MIME (no ``MIME-Version``, ``Content-Type`` or ``Content-Transfer-Encoding``
field, so nothing says how its octets could be re-encoded).

Pure and synchronous: no I/O. The parse is linear but slow in Python (about a
second for 25 MB): :data:`THREAD_OCTETS` says when a caller should run it in a
worker thread; the encoding works in slices, so that a worker thread never holds
the GIL for long.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from typing import cast

from mailstrom_async._render import render

__all__ = ["THREAD_OCTETS", "NotDowngradableError", "downgrade", "is_8bit"]

#: Messages longer than this are better downgraded in a worker thread (the same
#: threshold as the submit path's, in :mod:`mailstrom_async._intake`).
THREAD_OCTETS = 64 * 1024

# Parse and write back without refolding any header the message came with; the
# generator writes 7-bit only (every 8-bit part has been re-encoded by then).
_PARSE = EmailPolicy(linesep="\r\n", refold_source="none")
_WRITE = _PARSE.clone(cte_type="7bit")
_MIME_FIELD = re.compile(
    rb"(?:^|\r\n)(?:mime-version|content-type|content-transfer-encoding)[ \t]*:",
    re.IGNORECASE,
)
_CTE = "Content-Transfer-Encoding"
_SLICE = 1 << 20  # octets encoded per call: about a millisecond each
_B64_SLICE = 57 * (_SLICE // 57)  # whole 76-character base64 lines


class NotDowngradableError(Exception):
    """The message has 8-bit octets that cannot be re-encoded; ``str()`` says why."""


def is_8bit(data: bytes) -> bool:
    """Whether *data* holds an octet over 127 (cheap: one C pass)."""
    return not data.isascii()


def _head(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end == -1 else data[: end + 2]


def downgrade(data: bytes) -> bytes:
    """*data* (a CRLF message with 8-bit octets) with its 8-bit parts re-encoded.

    Raises:
        NotDowngradableError: 8-bit octets in a header section, or in the body of
            a message that is not MIME.
    """
    head = _head(data)
    if is_8bit(head):
        msg = "its header section has 8-bit octets, which need SMTPUTF8"
        raise NotDowngradableError(msg)
    if _MIME_FIELD.search(head) is None:
        msg = (
            "its body has 8-bit octets and it is not MIME (no MIME-Version, "
            "Content-Type or Content-Transfer-Encoding), so it cannot be re-encoded"
        )
        raise NotDowngradableError(msg)
    message = BytesParser(policy=_PARSE).parsebytes(data)
    for part in message.walk():
        if any(not value.isascii() for _, value in part.raw_items()):
            msg = "a MIME part's header has 8-bit octets, which need SMTPUTF8"
            raise NotDowngradableError(msg)
        if part.is_multipart():
            if _encoding(part) in ("8bit", "binary"):
                _set_encoding(part, "7bit")
            continue
        payload = vars(part).get("_payload")
        if isinstance(payload, str) and not payload.isascii():
            _reencode(part)
    out = render(message, _WRITE)
    if is_8bit(out):  # pragma: no cover - defensive: every 8-bit part was handled
        msg = "it still has 8-bit octets after re-encoding"
        raise NotDowngradableError(msg)
    return out


def _encoding(part: Message) -> str:
    return str(part.get(_CTE, "7bit")).strip().lower()


def _set_encoding(part: Message, cte: str) -> None:
    if _CTE in part:
        part.replace_header(_CTE, cte)
    else:
        part[_CTE] = cte


def _reencode(part: Message) -> None:
    """Re-encode one 8-bit leaf part: text as quoted-printable, else base64."""
    raw = cast("bytes", part.get_payload(decode=True))
    if part.get_content_maintype() == "text":
        body, cte = _quoted_printable(raw), "quoted-printable"
    else:
        body, cte = _base64(raw), "base64"
    part.set_payload(body)
    _set_encoding(part, cte)


def _quoted_printable(raw: bytes) -> str:
    """*raw* as quoted-printable; its line breaks stay line breaks."""
    raw = raw.replace(b"\r\n", b"\n")
    pieces = []
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start + _SLICE)
        end = len(raw) if end == -1 else end + 1  # a slice ends with its line
        pieces.append(binascii.b2a_qp(raw[start:end]))
        start = end
    return b"".join(pieces).decode("ascii")


def _base64(raw: bytes) -> str:
    """*raw* in base64, 76 characters a line."""
    return "".join(
        base64.encodebytes(raw[i : i + _B64_SLICE]).decode("ascii")
        for i in range(0, len(raw), _B64_SLICE)
    )
