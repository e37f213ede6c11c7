"""Tests for mailstrom_async._render: whole-message work in slices of 1 MiB.

Each helper is checked against the one-call way it replaces, on inputs whose
interesting bytes sit exactly at the slice boundaries.
"""

from __future__ import annotations

import copy
import re
from email.message import EmailMessage

import pytest

from mailstrom_async import _render
from mailstrom_async._headers import RENDER_SMTP

SLICE = 1 << 20


def reference_crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


@pytest.mark.parametrize(
    "tail",
    [b"\r\n", b"\r", b"\n", b"\n\r", b"\r\r\n", b"x"],
    ids=["crlf", "cr", "lf", "lf-cr", "cr-crlf", "none"],
)
@pytest.mark.parametrize("offset", [-2, -1, 0, 1])
def test_to_crlf_across_the_slice_boundary(tail: bytes, offset: int) -> None:
    """Line ends split by a slice boundary come out as the regex makes them."""
    data = b"a" * (SLICE + offset) + tail + b"b\rc\nd"
    assert _render.to_crlf(data) == reference_crlf(data)


def test_to_crlf_keeps_crlf_only_data_as_it_is() -> None:
    """Data that is CRLF-only already is returned unchanged (no copy)."""
    data = b"line\r\n" * 10
    assert _render.to_crlf(data) is data


@pytest.mark.parametrize("length", [998, 999])
@pytest.mark.parametrize("start", [SLICE - 500, SLICE - 2, SLICE])
def test_long_line_across_the_slice_boundary(length: int, start: int) -> None:
    """A line over the limit is found wherever the slices cut it."""
    data = b"x\r\n" * (start // 3) + b"y" * length + b"\r\nz\r\n"
    line = _render.long_line(data, 998)
    if length > 998:
        assert line == b"y" * length
    else:
        assert line is None


def test_long_line_without_any_line_end() -> None:
    """A message that is one line of 3 MiB is one long line."""
    line = _render.long_line(b"q" * (3 * SLICE), 998)
    assert line is not None
    assert line.startswith(b"q" * 998)


@pytest.mark.parametrize(
    ("line", "too_long"),
    [
        ("a" * 998, False),
        ("a" * 999, True),
        ("é" * 499, False),  # 998 octets
        ("é" * 500, True),
        ("\udce9" * 998, False),  # lone surrogates: one octet each
    ],
)
@pytest.mark.parametrize("start", [0, SLICE - 3])
def test_has_long_line_counts_octets(line: str, too_long: bool, start: int) -> None:
    """Lines are measured in octets of UTF-8, across a slice boundary too."""
    text = "x\n" * (start // 2) + line + "\r\nend\r"
    assert _render.has_long_line(text, 998) is too_long


def _message(body: str) -> EmailMessage:
    msg = EmailMessage(policy=RENDER_SMTP)
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg.set_content("intro\n")
    msg.add_attachment("", subtype="plain", cte="8bit")
    next(msg.iter_attachments()).set_payload(body)  # line ends as they are
    for n, part in enumerate(msg.walk()):
        if part.is_multipart():
            part.set_boundary(f"boundary-{n}")
    return msg


@pytest.mark.parametrize("size", [100, 2 * SLICE + 1])
def test_render_writes_bodies_as_the_generator_does(size: int) -> None:
    """A big body written by render() is byte for byte what the generator writes:
    every line end CRLF, one split by a slice boundary and a CR at the end too."""
    unit = "line\nnext\r\nbare\rend "
    body = (unit * (size // len(unit) + 1))[:size]
    if size > SLICE:
        body = body[: SLICE - 1] + "\r\n" + body[SLICE + 1 :] + "\udce9"
    msg = _message(body + "\r")
    expected = copy.deepcopy(msg).as_bytes(policy=RENDER_SMTP)
    assert _render.render(msg, RENDER_SMTP) == expected
    assert _render.render(msg, RENDER_SMTP) == expected  # the message is unchanged
