"""Reply parsing and the DESIGN §3 classification table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom_async._classify import (
    RecipientOutcome,
    classify_data,
    classify_rcpt,
    is_throttle_signal,
    make_reply,
    outcome_from_error,
    outcomes_from_error,
    parse_enhanced_code,
)
from mailstrom_async._exceptions import (
    ConnectError,
    DeliveryError,
    DeliveryTimeoutError,
    NoMailServerError,
    PermanentRejectionError,
    TemporaryRejectionError,
)
from mailstrom_async._models import RecipientState, SMTPReply

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.1.1 No such user", ("5.1.1", "No such user")),
        ("  4.2.2   mailbox full ", ("4.2.2", "mailbox full")),
        ("2.0.0", ("2.0.0", "")),
        ("OK", (None, "OK")),
        ("", (None, "")),
        ("5.1.1x not a code", (None, "5.1.1x not a code")),
        ("3.1.1 wrong class", (None, "3.1.1 wrong class")),
        ("5.1234.1 too long", (None, "5.1234.1 too long")),
        ("5.7.1 first\n5.7.1 second", ("5.7.1", "first\nsecond")),
        ("5.7.1 first\nsecond\n4.0.0 third", ("5.7.1", "first\nsecond\n4.0.0 third")),
    ],
)
def test_parse_enhanced_code(text: str, expected: tuple[str | None, str]) -> None:
    """An RFC 3463 code is split off the front of every line that repeats it."""
    assert parse_enhanced_code(text) == expected


@given(
    st.sampled_from("245"),
    st.integers(0, 999),
    st.integers(0, 999),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
def test_parse_enhanced_code_round_trip(
    cls: str, subject: int, detail: int, rest: str
) -> None:
    """Any well-formed code followed by text comes back apart, text stripped."""
    code = f"{cls}.{subject}.{detail}"
    assert parse_enhanced_code(f"{code} {rest}") == (code, rest.strip())


def test_make_reply_keeps_code_enhanced_code_and_text() -> None:
    """make_reply builds an SMTPReply with the enhanced code parsed out."""
    assert make_reply(550, "5.1.1 nobody here") == SMTPReply(
        code=550, text="nobody here", enhanced_code="5.1.1"
    )
    assert make_reply(250, "OK") == SMTPReply(code=250, text="OK")


def test_make_reply_keeps_the_exact_bytes_of_text_that_is_not_utf8() -> None:
    """Text as aiosmtplib decodes it (surrogateescape) becomes valid display text,
    and raw_text is the exact bytes after the codes, across lines."""
    wire = b"5.1.1 Empf\xe4nger\n5.1.1 unbekannt \xff"
    reply = make_reply(550, wire.decode("utf-8", "surrogateescape"))
    assert reply.enhanced_code == "5.1.1"
    assert reply.text == "Empf\\xe4nger\nunbekannt \\xff"
    assert reply.raw_text == b"Empf\xe4nger\nunbekannt \xff"


@given(
    st.sampled_from([b"", b"5.1.1 ", b" 4.2.0\t"]),
    st.binary(max_size=200).filter(lambda b: b"\n" not in b),
)
def test_make_reply_text_is_valid_unicode(code: bytes, text: bytes) -> None:
    """Whatever bytes a one-line reply holds, its text is valid Unicode and its
    exact bytes are the reply's bytes after the enhanced code, stripped."""
    reply = make_reply(550, (code + text).decode("utf-8", "surrogateescape"))
    reply.text.encode("utf-8")
    exact = reply.raw_text if reply.raw_text is not None else reply.text.encode()
    expected = (code + text).strip(b" \t\r")
    if reply.enhanced_code is not None:
        expected = expected[len(reply.enhanced_code) :].strip(b" \t\r")
    assert exact == expected


@pytest.mark.parametrize("code", [250, 251, 252])
def test_rcpt_2xx_is_accepted(code: int) -> None:
    """A 2xx reply to RCPT means the recipient was accepted: no outcome yet."""
    assert classify_rcpt("a@example.test", make_reply(code, "OK")) is None


@pytest.mark.parametrize(
    ("code", "text", "state", "retry_now"),
    [
        (450, "4.2.1 mailbox busy", DEFERRED, False),
        (451, "4.3.0 try later", DEFERRED, False),
        (452, "4.2.2 mailbox full", DEFERRED, False),
        (452, "4.5.3 Too many recipients", DEFERRED, True),
        (452, "Too many recipients", DEFERRED, True),
        (451, "4.5.3 recipient limit", DEFERRED, True),
        (552, "5.5.3 Too many recipients", DEFERRED, True),
        (552, "too   many recipients for this message", DEFERRED, True),
        (552, "5.2.2 mailbox full", FAILED, False),
        (550, "5.1.1 no such user", FAILED, False),
        (554, "5.7.1 relay denied", FAILED, False),
        (553, "5.5.3 weird", FAILED, False),
        (354, "unexpected", DEFERRED, False),
    ],
)
def test_rcpt_rejections(
    code: int, text: str, state: RecipientState, retry_now: bool
) -> None:
    """RCPT 4xx defers, 5xx fails, and a recipient limit defers for an immediate retry."""
    reply = make_reply(code, text)
    outcome = classify_rcpt("a@example.test", reply)
    assert outcome == RecipientOutcome(
        address="a@example.test", state=state, reply=reply, retry_now=retry_now
    )


@pytest.mark.parametrize(
    ("code", "state"),
    [(250, DELIVERED), (451, DEFERRED), (554, FAILED), (354, DEFERRED)],
)
def test_data_reply_applies_to_every_accepted_recipient(
    code: int, state: RecipientState
) -> None:
    """The reply after DATA decides for every accepted recipient, in order."""
    reply = make_reply(code, "x")
    outcomes = classify_data(["a@x.test", "b@x.test"], reply)
    assert [(o.address, o.state, o.reply) for o in outcomes] == [
        ("a@x.test", state, reply),
        ("b@x.test", state, reply),
    ]
    assert not any(o.possible_duplicate or o.retry_now for o in outcomes)


def test_data_possible_duplicate_is_passed_on() -> None:
    """classify_data marks outcomes as possible duplicates when asked."""
    (outcome,) = classify_data(
        ["a@x.test"], make_reply(451, "x"), possible_duplicate=True
    )
    assert outcome.possible_duplicate


@pytest.mark.parametrize(
    ("error", "state", "code", "enhanced"),
    [
        (ConnectError("refused"), DEFERRED, 451, "4.4.1"),
        (DeliveryTimeoutError("slow"), DEFERRED, 451, "4.4.2"),
        (TemporaryRejectionError("no"), DEFERRED, 451, "4.0.0"),
        (NoMailServerError("nxdomain"), FAILED, 550, "5.1.2"),
        (DeliveryError("unclassified"), DEFERRED, 451, "4.0.0"),
    ],
)
def test_outcome_from_error_synthesises_a_reply(
    error: DeliveryError, state: RecipientState, code: int, enhanced: str
) -> None:
    """A transient error defers and a permanent one fails, with a reply saying why."""
    outcome = outcome_from_error("a@x.test", error)
    assert outcome.state is state
    assert outcome.reply == SMTPReply(
        code=code, text=str(error), enhanced_code=enhanced, local=True
    )
    assert str(outcome.reply) == f"{enhanced} {error}"  # no code a server never sent


def test_outcome_from_error_prefers_the_error_reply() -> None:
    """An error that carries the server's reply records that reply."""
    reply = make_reply(554, "5.7.1 go away")
    error = PermanentRejectionError("rejected", reply=reply)
    (outcome,) = outcomes_from_error(["a@x.test"], error, possible_duplicate=True)
    assert outcome == RecipientOutcome(
        address="a@x.test", state=FAILED, reply=reply, possible_duplicate=True
    )


def test_outcome_state_cannot_be_queued() -> None:
    """An attempt outcome is never QUEUED."""
    with pytest.raises(ValueError, match="DELIVERED, DEFERRED or FAILED"):
        RecipientOutcome(address="a@x.test", state=RecipientState.QUEUED, reply=None)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (make_reply(421, "4.7.0 too many connections"), True),
        (make_reply(421, "closing"), True),
        (make_reply(451, "4.7.1 greylisted, try again later"), True),
        (make_reply(450, "4.2.1 mailbox busy"), False),
        (make_reply(550, "5.7.1 relaying denied"), False),
        (None, False),
    ],
)
def test_throttle_signal(reply: SMTPReply | None, expected: bool) -> None:
    """421 and 4xx replies with a 4.7.x code ask the client to slow down."""
    assert is_throttle_signal(reply) is expected
