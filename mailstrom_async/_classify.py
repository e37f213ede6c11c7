"""SMTP replies and delivery errors -> per-recipient outcomes (DESIGN §3).

Pure and synchronous. The reply code is the authority; the RFC 3463 enhanced status
code is parsed off the reply text and kept for diagnostics (and to recognise
"too many recipients", RFC 5321 §4.5.3.1.10).

==============================================  ==================================
event                                           outcome
==============================================  ==================================
2xx after DATA                                  DELIVERED, every accepted recipient
RCPT 4xx                                        that recipient DEFERRED
RCPT 452/451 4.5.3, 552 5.5.3, "too many        that recipient DEFERRED with
recipients"                                     ``retry_now`` (new transaction)
RCPT 5xx                                        that recipient FAILED
DATA (or final dot) 4xx / 5xx                   accepted recipients DEFERRED/FAILED
a transient / permanent :class:`DeliveryError`  DEFERRED / FAILED
==============================================  ==================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from mailstrom_async._exceptions import DeliveryError, PermanentDeliveryError
from mailstrom_async._models import RecipientState, SMTPReply

__all__ = [
    "RecipientOutcome",
    "classify_data",
    "classify_rcpt",
    "is_throttle_signal",
    "make_reply",
    "outcome_from_error",
    "outcomes_from_error",
    "parse_enhanced_code",
]

# RFC 3463: class "." subject "." detail; class is 2, 4 or 5; subject 1-3 digits,
# detail 1-3 digits. It must be followed by whitespace or end the text.
_ENHANCED_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_TOO_MANY_RE = re.compile(r"too\s+many\s+recipients", re.IGNORECASE)
_BLANK = " \t\r\n"


def parse_enhanced_code(text: str) -> tuple[str | None, str]:
    """Split an RFC 3463 enhanced status code (``"5.1.1"``) off the front of *text*.

    Returns ``(code, rest)``; *code* is ``None`` when the text does not start with
    one. In a multi-line reply each line usually repeats the code: it is removed from
    every line that starts with the same code, and lines are joined with ``"\\n"``.
    Only ASCII spaces, tabs, CR and LF are stripped, so the rest keeps the server's
    bytes exactly (also when they are surrogate-escaped).

    >>> parse_enhanced_code("5.1.1 No such user")
    ('5.1.1', 'No such user')
    >>> parse_enhanced_code("OK")
    (None, 'OK')
    """
    lines = [line.strip(_BLANK) for line in text.strip(_BLANK).split("\n")]
    match = _ENHANCED_RE.match(lines[0]) if lines else None
    if match is None:
        return None, "\n".join(lines)
    code = match.group(0)
    rest = []
    for line in lines:
        if line.startswith(code) and _ENHANCED_RE.match(line):
            line = line[len(code) :].strip(_BLANK)
        rest.append(line)
    return code, "\n".join(rest).strip(_BLANK)


def make_reply(code: int, text: str) -> SMTPReply:
    """Build an :class:`SMTPReply` from a reply code and its text off the wire.

    *text* may carry lone surrogates (aiosmtplib's ``surrogateescape`` decoding of
    bytes that are not UTF-8): the reply's ``text`` is then the display form and
    ``raw_text`` the exact bytes (see :class:`SMTPReply`).
    """
    enhanced, rest = parse_enhanced_code(text)
    return SMTPReply(code=code, text=rest, enhanced_code=enhanced)


def _state_is_outcome(
    inst: RecipientOutcome, attribute: attrs.Attribute[RecipientState], value: object
) -> None:
    if value not in (
        RecipientState.DELIVERED,
        RecipientState.DEFERRED,
        RecipientState.FAILED,
    ):
        msg = f"an attempt outcome is DELIVERED, DEFERRED or FAILED, not {value!r}"
        raise ValueError(msg)


@attrs.frozen(kw_only=True)
class RecipientOutcome:
    """What one delivery attempt did for one recipient.

    ``reply`` is the reply that decided it (``None`` only when nothing was said, which
    the SMTP layer avoids by synthesising one). ``possible_duplicate`` is set when
    the connection was lost after the final dot, so the server may have taken the
    message. ``retry_now`` asks for the recipient to be sent again at once in a new
    transaction (the server limited the recipients per transaction).
    """

    address: str
    state: RecipientState = attrs.field(validator=_state_is_outcome)
    reply: SMTPReply | None
    possible_duplicate: bool = False
    retry_now: bool = False


def _is_too_many_recipients(reply: SMTPReply) -> bool:
    if reply.code not in (451, 452, 552):
        return False
    detail = reply.enhanced_code is not None and reply.enhanced_code[1:] == ".5.3"
    return detail or _TOO_MANY_RE.search(reply.text) is not None


def classify_rcpt(address: str, reply: SMTPReply) -> RecipientOutcome | None:
    """Classify the reply to ``RCPT TO``; ``None`` means accepted (2xx).

    452 4.5.3 / 552 5.5.3 / "too many recipients" is a deferral to retry at once in
    a new transaction (RFC 5321 §4.5.3.1.10 says clients must treat 552 so too).
    Anything that is neither 2xx nor 5xx (4xx, or a nonsense code) defers.
    """
    if 200 <= reply.code < 300:
        return None
    if _is_too_many_recipients(reply):
        return RecipientOutcome(
            address=address, state=RecipientState.DEFERRED, reply=reply, retry_now=True
        )
    state = RecipientState.FAILED if reply.is_permanent else RecipientState.DEFERRED
    return RecipientOutcome(address=address, state=state, reply=reply)


def classify_data(
    accepted_addresses: Iterable[str],
    reply: SMTPReply,
    *,
    possible_duplicate: bool = False,
) -> list[RecipientOutcome]:
    """Classify the reply to ``DATA`` or to the final dot for every accepted recipient.

    2xx delivers, 5xx fails, anything else (4xx, an unexpected 3xx) defers.
    """
    if 200 <= reply.code < 300:
        state = RecipientState.DELIVERED
    elif reply.is_permanent:
        state = RecipientState.FAILED
    else:
        state = RecipientState.DEFERRED
    return [
        RecipientOutcome(
            address=address,
            state=state,
            reply=reply,
            possible_duplicate=possible_duplicate,
        )
        for address in accepted_addresses
    ]


def is_throttle_signal(reply: SMTPReply | None) -> bool:
    """True for replies that ask the client to slow down: 421, or a 4.7.x code.

    For adaptive per-destination concurrency (DESIGN §6): greylisting, "too many
    connections", rate limits.
    """
    if reply is None:
        return False
    enhanced = reply.enhanced_code or ""
    return reply.code == 421 or (reply.is_transient and enhanced.startswith("4.7."))


def outcome_from_error(
    address: str, error: DeliveryError, *, possible_duplicate: bool = False
) -> RecipientOutcome:
    """Turn a failed attempt into an outcome: transient -> DEFERRED, permanent -> FAILED.

    The reply is the error's own (a server's, or a local one), or a local one
    made from the error (:attr:`SMTPReply.local`: the error class's
    ``default_enhanced_code`` and its message; its code 451 or 550 only
    classifies it) so that the recipient always records why.
    """
    permanent = isinstance(error, PermanentDeliveryError)
    reply = error.reply or SMTPReply(
        code=550 if permanent else 451,
        text=str(error),
        enhanced_code=error.default_enhanced_code,
        local=True,
    )
    return RecipientOutcome(
        address=address,
        state=RecipientState.FAILED if permanent else RecipientState.DEFERRED,
        reply=reply,
        possible_duplicate=possible_duplicate,
    )


def outcomes_from_error(
    addresses: Iterable[str], error: DeliveryError, *, possible_duplicate: bool = False
) -> list[RecipientOutcome]:
    """:func:`outcome_from_error` for each of *addresses*, in order."""
    return [
        outcome_from_error(a, error, possible_duplicate=possible_duplicate)
        for a in addresses
    ]
