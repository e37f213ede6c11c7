"""Text from the wire, made safe to keep: valid Unicode to show, exact bytes kept.

aiosmtplib decodes a reply as UTF-8 with ``surrogateescape``: each byte that is not
UTF-8 (``550 Empf\\xe4nger unbekannt`` from a Latin-1 server) becomes a lone
surrogate, U+DC80 to U+DCFF, which no strict UTF-8 encoder accepts (sqlite3, a
log file, JSON). Here such text becomes its *display form*: the bytes decoded
with ``backslashreplace``, so an invalid byte shows as ``\\xe4`` and the text is
valid Unicode; the exact bytes are kept beside it whenever they differ from the
display form.

A reply is also bounded: a hostile server can send thousands of continuation
lines (aiosmtplib accepts up to 32 KiB). Only the first :data:`MAX_REPLY_BYTES`
bytes of a reply's text are kept, cut at a character boundary, and the display
form then ends with ``" [truncated, N more bytes]"``.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import re

__all__ = ["MAX_REPLY_BYTES", "clean", "is_clean", "reply_text", "wire_bytes"]

#: The most bytes of one reply's text that are kept (display and raw).
MAX_REPLY_BYTES = 4096

# Surrogates that surrogateescape did not make (it makes U+DC80..U+DCFF only).
_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _backslashed(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def is_clean(text: str) -> bool:
    """True if *text* is valid Unicode: it encodes to UTF-8 (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def wire_bytes(text: str) -> bytes:
    """The bytes behind *text*: UTF-8, with surrogate escapes turned back into bytes.

    A lone surrogate that ``surrogateescape`` cannot have made (U+D800 to U+DC7F,
    U+DD00 to U+DFFF) becomes its ``\\uXXXX`` escape.
    """
    if is_clean(text):
        return text.encode("utf-8")
    text = _OTHER_SURROGATES.sub(_backslashed, text)
    return text.encode("utf-8", "surrogateescape")


def clean(text: str) -> str:
    """*text* as valid Unicode: itself if it is, else its display form.

    >>> clean("Empf\\udce4nger")
    'Empf\\\\xe4nger'
    """
    if is_clean(text):
        return text
    return wire_bytes(text).decode("utf-8", "backslashreplace")


def reply_text(text: str, limit: int = MAX_REPLY_BYTES) -> tuple[str, bytes | None]:
    """The display form of a reply's *text*, and its exact bytes if they differ.

    The bytes are ``None`` when the text is valid UTF-8 of at most *limit* bytes
    (the display form is then the text itself). Longer text is cut to *limit*
    bytes at a character boundary; the bytes kept are then returned, and the
    display form says how many were cut.
    """
    if len(text) <= limit and text.isascii():  # the common case, at no cost
        return text, None
    raw = wire_bytes(text)
    if len(raw) <= limit:
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            return raw.decode("utf-8", "backslashreplace"), raw
    cut = limit
    # Back up over continuation bytes (at most 3), not to split a character.
    while cut > limit - 3 and cut > 0 and (raw[cut] & 0xC0) == 0x80:
        cut -= 1
    kept = raw[:cut]
    shown = kept.decode("utf-8", "backslashreplace")
    return f"{shown} [truncated, {len(raw) - cut} more bytes]", kept
