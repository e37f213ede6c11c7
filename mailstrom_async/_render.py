"""Byte-level work on whole messages, in slices that never hold the GIL for long.

:func:`prepare` runs in a worker thread for big messages so that the event loop
keeps running; but one C call over 25 MB (a regular expression, a split into
lines, a join of half a million pieces) holds the GIL, and so stops the loop,
for a tenth of a second or more. Everything here works through a message in
slices of :data:`_SLICE` characters instead, with the same result as the one
call it replaces. :func:`render` writes big MIME bodies itself rather than
through the email package's generator, which splits each body into lines with
one regular expression call and writes them one at a time.

Pure and synchronous: no I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from email.message import Message
from email.policy import EmailPolicy
from typing import Any

__all__ = ["crlf_only", "has_long_line", "long_line", "render", "to_crlf"]

_SLICE = 1 << 20  # characters (or octets) per slice: about a millisecond each
#: Bodies longer than this are written by :func:`render` itself.
_SPLICE = 1 << 16


def crlf_only(data: bytes) -> bool:
    """True when every CR and LF in *data* is part of a CRLF pair."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf and data.count(b"\n") == crlf


def _slices(data: bytes) -> Iterator[bytes]:
    """*data* in slices; a slice never ends between the CR and LF of a pair."""
    start = 0
    while start < len(data):
        end = min(start + _SLICE, len(data))
        if data[end - 1 : end + 1] == b"\r\n":
            end += 1
        yield data[start:end]
        start = end


def to_crlf(data: bytes) -> bytes:
    """*data* with every CRLF, bare CR and bare LF as CRLF (RFC 5321 §2.3.8)."""
    if crlf_only(data):
        return data
    return b"".join(
        s.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        for s in _slices(data)
    )


def long_line(data: bytes, limit: int) -> bytes | None:
    """The first CRLF-separated line of *data* longer than *limit*, else None."""
    carry = b""
    for piece in _slices(data):
        lines = (carry + piece).split(b"\r\n")
        carry = lines.pop()
        for line in lines:
            if len(line) > limit:
                return line
        if len(carry) > limit:
            return carry
    return carry if len(carry) > limit else None


def has_long_line(text: str, limit: int) -> bool:
    """Whether a line of *text* (CRLF, CR or LF line ends) is over *limit* octets.

    Octets of UTF-8, lone surrogates (undecodable bytes) counting one each.
    """
    ascii_only = text.isascii()
    carry = ""
    for start in range(0, len(text), _SLICE):
        lines = (carry + text[start : start + _SLICE]).replace("\r", "\n").split("\n")
        carry = lines.pop()
        if len(carry) > limit or any(_too_long(x, limit, ascii_only) for x in lines):
            return True
    return _too_long(carry, limit, ascii_only)


def _too_long(line: str, limit: int, ascii_only: bool) -> bool:
    if len(line) > limit:
        return True
    # A character is at most 4 octets of UTF-8: only longer lines need encoding.
    if ascii_only or 4 * len(line) <= limit:
        return False
    return len(line.encode("utf-8", "surrogateescape")) > limit


def render(message: Message, policy: EmailPolicy[Any]) -> bytes:
    """``message.as_bytes(policy=policy)``, with the big bodies written here.

    Each body over :data:`_SPLICE` characters is swapped for a short random
    token, the message rendered, and each token replaced by the body as the
    generator would write it (every line end CRLF; ASCII, lone surrogates as
    the bytes they stand for). A boundary the generator chose is checked against
    those bodies, which it did not see; on any doubt the message is rendered the
    ordinary way.
    """
    big = [
        part
        for part in message.walk()
        if not part.is_multipart()
        and isinstance(payload := vars(part).get("_payload"), str)
        and len(payload) > _SPLICE
    ]
    if not big:
        return message.as_bytes(policy=policy)
    bodies: list[tuple[bytes, str]] = []
    for part in big:
        marker = f"mailstrom-body-{secrets.token_hex(16)}"
        bodies.append((marker.encode("ascii"), vars(part)["_payload"]))
        part.set_payload(marker)
    try:
        head = message.as_bytes(policy=policy)
    finally:
        for part, (_, body) in zip(big, bodies, strict=True):
            part.set_payload(body)
    boundaries = [
        "--" + b
        for part in message.walk()
        if part.is_multipart() and (b := part.get_boundary()) is not None
    ]
    pieces: list[bytes] = []
    rest = head
    for token, body in bodies:
        before, found, rest = rest.partition(token)
        if not found or token in rest or any(b in body for b in boundaries):
            return message.as_bytes(policy=policy)  # pragma: no cover - 2**-128
        pieces.append(before)
        pieces.append(_body_bytes(body))
    pieces.append(rest)
    return b"".join(pieces)


def _body_bytes(body: str) -> bytes:
    """*body* as the email package's BytesGenerator writes it, in slices."""
    out = []
    carry = b""
    for start in range(0, len(body), _SLICE):
        chunk = carry + body[start : start + _SLICE].encode("ascii", "surrogateescape")
        carry = b""
        if chunk.endswith(b"\r"):  # its LF may open the next slice
            chunk, carry = chunk[:-1], b"\r"
        out.append(to_crlf(chunk))
    if carry:
        out.append(b"\r\n")
    return b"".join(out)
