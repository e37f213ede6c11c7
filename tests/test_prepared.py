"""A PreparedMessage is checked however it is made: by hand, or by attrs.evolve.

What prepare() checks while rendering, a hand-made PreparedMessage is checked for
as it is constructed, and submit() stores nothing that fails (the server sees
nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import pytest

from mailstrom_async import (
    Config,
    InvalidAddressError,
    InvalidMessageError,
    Limits,
    PreparedMessage,
    RelayConfig,
    Timeouts,
    prepare,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._store import MemoryStore

if TYPE_CHECKING:
    from tests.smtpd import SMTPDServers

HEAD = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\n"
DATA = HEAD + b"Hello.\r\n"
GOOD: dict[str, object] = {
    "message_id": "<1@example.test>",
    "mail_from": "a@example.test",
    "rcpt_to": ("b@example.test",),
    "data": DATA,
}


def made(**changes: object) -> PreparedMessage:
    return PreparedMessage(**(GOOD | changes))  # type: ignore[arg-type]


def test_a_good_hand_made_message_is_accepted() -> None:
    prepared = made()
    assert prepared.data == DATA
    assert prepared.smtputf8 is False


def test_folded_header_fields_are_accepted() -> None:
    data = b"Subject: a long\r\n subject\r\nfrom: a@example.test\r\n\r\nhi\r\n"
    assert made(data=data).data == data


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (
            {"data": HEAD + b"x" * 1200 + b"\r\n"},
            InvalidMessageError,
            "longer than 998",
        ),
        ({"data": HEAD + b"nul \x00 here\r\n"}, InvalidMessageError, "NUL"),
        ({"data": b"\r\nno header section\r\n"}, InvalidMessageError, "no From"),
        ({"data": b"Subject: hi\r\n\r\nbody\r\n"}, InvalidMessageError, "no From"),
        (
            {"data": b"From: a@example.test\r\nnot a field\r\n\r\nbody\r\n"},
            InvalidMessageError,
            "header line 2 is not a field",
        ),
        (
            {"data": b"From: a@example.test\r\nSubject: \xe9\r\n\r\nbody\r\n"},
            InvalidMessageError,
            "not UTF-8",
        ),
        ({"rcpt_to": ()}, InvalidMessageError, "no recipients"),
        ({"rcpt_to": ("bad address@example.test",)}, InvalidAddressError, "invalid"),
        (
            {"rcpt_to": ("b@example.test", "b@EXAMPLE.test")},
            InvalidAddressError,
            "twice",
        ),
        (
            {"rcpt_to": ("b@example.test\r\nRCPT TO:<x@evil.test>",)},
            InvalidAddressError,
            "must not contain",
        ),
        ({"rcpt_to": ("Bob <b@example.test>",)}, InvalidAddressError, "envelope form"),
        ({"rcpt_to": ("b@bücher.test",)}, InvalidAddressError, "xn--bcher-kva"),
        ({"mail_from": "not an address"}, InvalidAddressError, "invalid"),
        (
            {"message_id": "no-brackets@example.test"},
            InvalidMessageError,
            "message_id must be",
        ),
        ({"message_id": "<a@b> <c@d>"}, InvalidMessageError, "message_id must be"),
    ],
)
def test_a_bad_hand_made_message_is_refused(
    changes: dict[str, object], error: type[Exception], match: str
) -> None:
    """Each thing prepare() would refuse is refused at construction, clearly."""
    with pytest.raises(error, match=match):
        made(**changes)


def test_evolve_is_checked_too() -> None:
    """attrs.evolve from a message prepare() made is checked like a new one."""
    prepared = prepare(DATA, mail_from="a@example.test", rcpt_to=["b@x.test"])
    with pytest.raises(InvalidMessageError, match="longer than 998"):
        attrs.evolve(prepared, data=HEAD + b"y" * 1200 + b"\r\n")
    with pytest.raises(InvalidAddressError):
        attrs.evolve(prepared, rcpt_to=("not an address",))
    assert attrs.evolve(prepared, rcpt_to=("c@x.test",)).rcpt_to == ("c@x.test",)


def test_line_endings_are_normalised_as_prepare_does() -> None:
    """A bare LF or CR becomes CRLF, and a final CRLF is added."""
    prepared = made(data=b"From: a@example.test\n\nline one\rline two")
    assert prepared.data == b"From: a@example.test\r\n\r\nline one\r\nline two\r\n"
    as_bytearray = made(data=bytearray(DATA))
    assert as_bytearray.data == DATA
    assert type(as_bytearray.data) is bytes


def test_data_must_be_bytes() -> None:
    with pytest.raises(TypeError, match="data must be bytes, not str"):
        made(data="From: a@example.test\r\n\r\nhi\r\n")


def test_utf8_header_section_sets_smtputf8() -> None:
    """A UTF-8 header section needs SMTPUTF8: the flag is set to say so."""
    prepared = made(data="From: jörg@example.test\r\n\r\nhi\r\n".encode())
    assert prepared.smtputf8 is True


def test_null_reverse_path_is_allowed() -> None:
    assert made(mail_from="").mail_from == ""


async def test_submit_refuses_a_long_line_and_stores_nothing(
    smtpd: SMTPDServers,
) -> None:
    """A PreparedMessage with a 1,200-octet line never reaches the store or the
    wire: it cannot be made, and a message over the Deliverer's size limit that
    prepare() made under another config is refused at submit."""
    server = await smtpd.start()
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=5),
        limits=Limits(max_message_size=200),
    )
    big = prepare(
        HEAD + b"z" * 300 + b"\r\n", mail_from="a@example.test", rcpt_to=["b@x.test"]
    )
    store = MemoryStore()
    async with Deliverer(config, store=store) as d:
        with pytest.raises(InvalidMessageError, match="longer than 998"):
            await d.submit(made(data=HEAD + b"x" * 1200 + b"\r\n"))
        with pytest.raises(InvalidMessageError, match="max_message_size"):
            await d.submit(big)
        with pytest.raises(InvalidMessageError, match="message #1 of the batch"):
            await d.submit_many([made(), big])
        summary = await store.summary()
        assert sum(summary.by_state.values()) == 0
    assert server.connections.value == 0
