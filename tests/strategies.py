"""Hypothesis strategies for addresses and messages.

Everything generated here is *valid* for mailstrom_async: dot-atom local parts,
host names of two or more labels with an alphabetic top-level label. The one
exception is :func:`any_text`, the worst a str can hold.
"""

from __future__ import annotations

import string
from email.utils import formataddr

from hypothesis import strategies as st

from mailstrom_async._message import Email

__all__ = [
    "addresses",
    "any_text",
    "display_names",
    "domains",
    "emails",
    "header_texts",
    "local_parts",
    "utf8_addresses",
]

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"

_atoms = st.text(alphabet=ATEXT, min_size=1, max_size=12)
_labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
_tlds = st.from_regex(r"[a-z]{2,8}", fullmatch=True)


def local_parts() -> st.SearchStrategy[str]:
    """ASCII dot-atoms (RFC 5322 §3.2.3) of at most 64 octets."""
    return (
        st.lists(_atoms, min_size=1, max_size=4)
        .map(".".join)
        .filter(lambda s: len(s) <= 64)
    )


def domains() -> st.SearchStrategy[str]:
    """Host names: one to three labels plus an alphabetic top-level label."""
    return st.builds(
        lambda labels, tld: ".".join([*labels, tld]),
        st.lists(_labels, min_size=1, max_size=3),
        _tlds,
    )


def addresses() -> st.SearchStrategy[str]:
    """Bare ASCII addresses, ``local@domain``."""
    return st.builds(
        lambda local, domain: f"{local}@{domain}", local_parts(), domains()
    )


def utf8_addresses() -> st.SearchStrategy[str]:
    """Addresses whose local part has non-ASCII letters (they need SMTPUTF8)."""
    letters = st.characters(min_codepoint=0xC0, max_codepoint=0x24F, categories=["L"])
    utf8_local = st.text(alphabet=letters, min_size=1, max_size=10)
    return st.builds(lambda local, domain: f"{local}@{domain}", utf8_local, domains())


def header_texts(max_size: int = 80) -> st.SearchStrategy[str]:
    """Unstructured header text: any printable Unicode, single spaces between words.

    Leading, trailing and repeated whitespace is excluded: unfolding a header
    (RFC 5322 §2.2.3) does not keep it.
    """
    chars = st.characters(
        categories=["L", "M", "N", "P", "S"],
        exclude_characters="\x7f",
    )
    words = st.text(alphabet=chars, min_size=1, max_size=20)
    return (
        st.lists(words, max_size=8).map(" ".join).filter(lambda s: len(s) <= max_size)
    )


def display_names() -> st.SearchStrategy[str]:
    """Display names, possibly empty, possibly non-ASCII or full of specials."""
    return header_texts(max_size=40)


@st.composite
def emails(draw: st.DrawFn) -> Email:
    """An :class:`Email` with a sender, one to three recipients, subject and text."""
    sender = draw(addresses())
    name = draw(display_names())
    return Email(
        sender=formataddr((name, sender)),
        to=draw(st.lists(addresses(), min_size=1, max_size=3)),
        subject=draw(header_texts()),
        text=draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=300)),
    )


def any_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Any str at all, and often the worst: lone surrogates (those aiosmtplib makes of
    bytes that are not UTF-8, and others), NUL, controls, astral characters."""
    nasty = st.one_of(
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"]),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),
        st.sampled_from("\x00\r\n\t\x7f\\\U0001f4e7\ufeff"),
    )
    chars = st.one_of(st.characters(exclude_categories=()), nasty)
    return st.text(alphabet=chars, max_size=max_size)
