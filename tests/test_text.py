"""What a server's bytes become: valid Unicode to show, the exact bytes kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom_async._text import (
    MAX_REPLY_BYTES,
    clean,
    is_clean,
    reply_text,
    wire_bytes,
)
from tests.strategies import any_text


def from_wire(raw: bytes) -> str:
    """What aiosmtplib makes of bytes off the wire."""
    return raw.decode("utf-8", "surrogateescape")


@given(st.binary(max_size=300))
def test_wire_bytes_inverts_surrogateescape(raw: bytes) -> None:
    """The bytes behind aiosmtplib's text are exactly the bytes it read."""
    assert wire_bytes(from_wire(raw)) == raw


@given(any_text(max_size=100))
def test_clean_is_valid_unicode_and_idempotent(text: str) -> None:
    """Any str, lone surrogates included, becomes valid Unicode; valid text stays."""
    shown = clean(text)
    shown.encode("utf-8")
    assert is_clean(shown)
    assert clean(shown) == shown
    if is_clean(text):
        assert shown is text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Empf\udce4nger", "Empf\\xe4nger"),
        ("ok \udcff\udcfe", "ok \\xff\\xfe"),
        ("odd \ud800 one", "odd \\ud800 one"),
        ("Empfänger", "Empfänger"),
        ("nul\x00", "nul\x00"),
    ],
)
def test_clean_examples(text: str, expected: str) -> None:
    """Escaped bytes show as \\xNN, other lone surrogates as \\uXXXX."""
    assert clean(text) == expected


@given(st.binary(max_size=2 * MAX_REPLY_BYTES))
def test_reply_text_keeps_exact_bytes(raw: bytes) -> None:
    """The display form is valid Unicode; the bytes come back exactly (up to the cap),
    and are kept only when the display form is not them."""
    shown, kept = reply_text(from_wire(raw))
    shown.encode("utf-8")
    exact = raw if kept is None else kept
    if kept is None:
        assert shown.encode("utf-8") == raw
    else:
        assert shown.encode("utf-8") != kept
    assert raw.startswith(exact)
    if len(raw) <= MAX_REPLY_BYTES:
        assert exact == raw
        assert shown == raw.decode("utf-8", "backslashreplace")
    else:
        assert MAX_REPLY_BYTES - 3 <= len(exact) <= MAX_REPLY_BYTES
        assert shown.endswith(f" [truncated, {len(raw) - len(exact)} more bytes]")


def test_reply_text_cuts_at_a_character_boundary() -> None:
    """A long reply is cut before a character that would not fit whole."""
    text = "a" * (MAX_REPLY_BYTES - 1) + "ä" + "b" * 10
    shown, kept = reply_text(text)
    assert kept == b"a" * (MAX_REPLY_BYTES - 1)
    assert shown == "a" * (MAX_REPLY_BYTES - 1) + " [truncated, 12 more bytes]"


def test_reply_text_of_plain_text_is_itself() -> None:
    """Valid UTF-8 within the cap is its own display form, with no copy kept."""
    assert reply_text("Empfänger unbekannt") == ("Empfänger unbekannt", None)
    text = "x" * MAX_REPLY_BYTES
    shown, kept = reply_text(text)
    assert shown is text
    assert kept is None
