"""Tests for mailstrom_async._models: replies, states and statuses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from mailstrom_async import (
    DeliveryEvent,
    MessageStatus,
    RecipientState,
    RecipientStatus,
    SMTPReply,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _status(*recipients: RecipientStatus) -> MessageStatus:
    return MessageStatus(message_id="m1", recipients=recipients, submitted_at=NOW)


# RecipientState


@pytest.mark.parametrize(
    ("state", "final"),
    [
        (RecipientState.QUEUED, False),
        (RecipientState.DEFERRED, False),
        (RecipientState.DELIVERED, True),
        (RecipientState.FAILED, True),
    ],
)
def test_recipient_state_is_final(state: RecipientState, final: bool) -> None:
    """Only DELIVERED and FAILED are final states."""
    assert state.is_final is final


def test_recipient_state_values() -> None:
    """States have stable lower-case string values (they are stored and logged)."""
    assert {s.name: s.value for s in RecipientState} == {
        "QUEUED": "queued",
        "DEFERRED": "deferred",
        "DELIVERED": "delivered",
        "FAILED": "failed",
    }


# SMTPReply


@pytest.mark.parametrize(
    ("code", "positive", "transient", "permanent"),
    [
        (199, False, False, False),
        (200, True, False, False),
        (250, True, False, False),
        (354, True, False, False),
        (399, True, False, False),
        (400, False, True, False),
        (452, False, True, False),
        (499, False, True, False),
        (500, False, False, True),
        (550, False, False, True),
        (599, False, False, True),
        (600, False, False, False),
    ],
)
def test_smtp_reply_classes(
    code: int, positive: bool, transient: bool, permanent: bool
) -> None:
    """2xx/3xx are positive, 4xx transient, 5xx permanent, anything else none of them."""
    reply = SMTPReply(code)
    assert reply.is_positive is positive
    assert reply.is_transient is transient
    assert reply.is_permanent is permanent


def test_smtp_reply_defaults() -> None:
    """A reply built from a code alone has empty text and no enhanced code."""
    reply = SMTPReply(250)
    assert reply.text == ""
    assert reply.enhanced_code is None


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (SMTPReply(250), "250"),
        (SMTPReply(250, "OK"), "250 OK"),
        (SMTPReply(550, enhanced_code="5.1.1"), "550 5.1.1"),
        (SMTPReply(550, "no such user", "5.1.1"), "550 5.1.1 no such user"),
        (SMTPReply(421, "", ""), "421"),
    ],
)
def test_smtp_reply_str(reply: SMTPReply, text: str) -> None:
    """str() joins code, enhanced code and text with spaces, leaving out empty parts."""
    assert str(reply) == text


def test_smtp_reply_equality() -> None:
    """Replies compare by value."""
    assert SMTPReply(250, "OK", "2.0.0") == SMTPReply(250, "OK", "2.0.0")
    assert SMTPReply(250, "OK") != SMTPReply(250, "Ok")


def test_smtp_reply_text_is_always_valid_unicode() -> None:
    """Text with surrogate-escaped bytes becomes its display form, the bytes kept."""
    reply = SMTPReply(550, "Empf\udce4nger unbekannt", "5.1.1")
    assert reply.text == "Empf\\xe4nger unbekannt"
    assert reply.raw_text == b"Empf\xe4nger unbekannt"
    assert str(reply) == "550 5.1.1 Empf\\xe4nger unbekannt"
    assert SMTPReply(250, "OK").raw_text is None
    assert SMTPReply(250, "schön").raw_text is None


def test_smtp_reply_keeps_given_raw_text() -> None:
    """Given raw_text is kept as is; the text is still made valid Unicode."""
    reply = SMTPReply(550, "x\udcff", raw_text=b"x\xff")
    assert (reply.text, reply.raw_text) == ("x\\xff", b"x\xff")
    assert SMTPReply(550, "x\\xff", raw_text=b"x\xff") == reply


def test_smtp_reply_long_text_is_cut() -> None:
    """A reply text over 4 KiB is cut; the text says so, raw_text has what is kept."""
    reply = SMTPReply(550, "x" * 5000)
    assert reply.raw_text == b"x" * 4096
    assert reply.text == "x" * 4096 + " [truncated, 904 more bytes]"


# RecipientStatus


def test_recipient_status_message_bytes() -> None:
    """message_bytes is raw_message when kept, else the message in UTF-8."""
    kept = RecipientStatus(
        address="a@example.com", message="Empf\\xe4nger", raw_message=b"Empf\xe4nger"
    )
    assert kept.message_bytes == b"Empf\xe4nger"
    plain = RecipientStatus(address="a@example.com", message="Empfänger")
    assert plain.message_bytes == "Empfänger".encode()
    assert RecipientStatus(address="a@example.com").message_bytes is None


def test_recipient_status_defaults() -> None:
    """A new recipient status is QUEUED with no attempts and nothing known yet."""
    r = RecipientStatus(address="a@example.com")
    assert r.state is RecipientState.QUEUED
    assert r.attempts == 0
    assert r.code is None
    assert r.enhanced_code is None
    assert r.message is None
    assert r.raw_message is None
    assert r.host is None
    assert r.ip is None
    assert r.tls is None
    assert r.tls_verified is None
    assert r.first_attempt_at is None
    assert r.last_attempt_at is None
    assert r.next_attempt_at is None
    assert r.possible_duplicate is False


def test_recipient_status_is_keyword_only() -> None:
    """RecipientStatus takes keyword arguments only."""
    with pytest.raises(TypeError):
        RecipientStatus("a@example.com")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("user@Example.COM", "example.com"),
        ('"odd@quoted"@Example.org', "example.org"),
        ("user@[127.0.0.1]", "[127.0.0.1]"),
        ("nodomain", "nodomain"),
    ],
)
def test_recipient_status_domain(address: str, domain: str) -> None:
    """domain is the lower-cased part after the last '@'."""
    assert RecipientStatus(address=address).domain == domain


@pytest.mark.parametrize("state", list(RecipientState))
def test_recipient_status_is_final_follows_state(state: RecipientState) -> None:
    """RecipientStatus.is_final is its state's is_final."""
    assert RecipientStatus(address="a@b.c", state=state).is_final is state.is_final


# MessageStatus

A = RecipientStatus(address="A@Example.com", state=RecipientState.DELIVERED)
B = RecipientStatus(address="b@example.org", state=RecipientState.FAILED)
C = RecipientStatus(address="c@example.net", state=RecipientState.DEFERRED)
D = RecipientStatus(address="d@example.net", state=RecipientState.DELIVERED)


@pytest.mark.parametrize(
    ("recipients", "done", "delivered"),
    [
        ((A, D), True, True),
        ((A, B), True, False),
        ((A, C), False, False),
        ((RecipientStatus(address="q@x.y"),), False, False),
        ((B,), True, False),
    ],
)
def test_message_status_is_done_and_is_delivered(
    recipients: tuple[RecipientStatus, ...], done: bool, delivered: bool
) -> None:
    """is_done needs every recipient final; is_delivered needs every one DELIVERED."""
    status = _status(*recipients)
    assert status.is_done is done
    assert status.is_delivered is delivered


def test_message_status_recipient_domain_in_any_case() -> None:
    """recipient() finds an address whatever the case of its domain on either side."""
    status = _status(A, B, C)
    assert status.recipient("A@example.COM") is A
    assert status.recipient("b@Example.ORG") is B


def test_message_status_recipient_local_part_exactly() -> None:
    """recipient() compares local parts exactly: ``Bob@`` and ``bob@`` are two
    recipients, and neither is found by the other's name."""
    bob_upper = RecipientStatus(address="Bob@x.test", state=RecipientState.FAILED)
    bob = RecipientStatus(address="bob@x.test", state=RecipientState.DELIVERED)
    status = _status(bob_upper, bob)
    assert status.recipient("Bob@X.TEST") is bob_upper
    assert status.recipient("bob@x.test") is bob
    with pytest.raises(KeyError):
        status.recipient("BOB@x.test")
    with pytest.raises(KeyError):
        status.recipient("a@example.com")


def test_message_status_recipient_idn_domain() -> None:
    """recipient() finds an A-label recipient by its Unicode domain too."""
    r = RecipientStatus(address="ada@xn--fa-hia.de", state=RecipientState.QUEUED)
    status = _status(r)
    assert status.recipient("ada@faß.de") is r
    assert status.recipient("ada@Faß.DE") is r
    assert r.domain == "xn--fa-hia.de"
    assert RecipientStatus(address="ada@Faß.DE").domain == "xn--fa-hia.de"


def test_message_status_recipient_unknown_raises_key_error() -> None:
    """recipient() raises KeyError naming the address when it is not a recipient."""
    status = _status(A, B)
    with pytest.raises(KeyError) as info:
        status.recipient("nobody@example.com")
    assert info.value.args == ("nobody@example.com",)


def test_message_status_by_state() -> None:
    """by_state() returns the recipients in that state, in envelope order."""
    status = _status(A, B, C, D)
    assert status.by_state(RecipientState.DELIVERED) == (A, D)
    assert status.by_state(RecipientState.FAILED) == (B,)
    assert status.by_state(RecipientState.DEFERRED) == (C,)
    assert status.by_state(RecipientState.QUEUED) == ()


def test_message_status_iterates_recipients_in_order() -> None:
    """Iterating a MessageStatus yields its recipients in envelope order."""
    status = _status(C, A, B)
    assert list(status) == [C, A, B]
    assert list(status) == [C, A, B]  # a fresh iterator each time


def test_message_status_mail_from_defaults_empty() -> None:
    """mail_from defaults to the empty (null) reverse path."""
    assert _status(A).mail_from == ""


# DeliveryEvent


def test_delivery_event_state_address_and_missed_default() -> None:
    """An event exposes its recipient's state and address, and missed defaults to 0."""
    event = DeliveryEvent(
        message_id="m1", recipient=C, previous_state=RecipientState.QUEUED, at=NOW
    )
    assert event.state is RecipientState.DEFERRED
    assert event.address == "c@example.net"
    assert event.missed == 0
    assert attrs.evolve(event, missed=3).missed == 3


# Immutability

FROZEN_CASES: list[tuple[Any, str, Any]] = [
    (SMTPReply(250, "OK"), "code", 550),
    (RecipientStatus(address="a@b.c"), "state", RecipientState.FAILED),
    (_status(A), "recipients", ()),
    (
        DeliveryEvent(message_id="m", recipient=A, previous_state=None, at=NOW),
        "missed",
        5,
    ),
]


@pytest.mark.parametrize(
    ("obj", "field", "value"), FROZEN_CASES, ids=lambda v: type(v).__name__
)
def test_models_are_frozen(obj: Any, field: str, value: Any) -> None:
    """Assigning to any model attribute raises FrozenInstanceError."""
    before = getattr(obj, field)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(obj, field, value)
    assert getattr(obj, field) == before


@pytest.mark.parametrize(
    "obj",
    [case[0] for case in FROZEN_CASES],
    ids=lambda v: type(v).__name__,
)
def test_models_are_hashable(obj: Any) -> None:
    """Frozen models are hashable, so they can be set members and dict keys."""
    assert hash(obj) == hash(attrs.evolve(obj))
