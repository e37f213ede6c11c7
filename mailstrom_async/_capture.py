"""What the outbox and the capture server share: captured messages and scripted replies.

A *script* is a list of rules, each saying how a recipient address (or every
address of a domain) is answered at ``RCPT TO``: deferred (4xx), failed (5xx),
or with the connection closed (421). Rules are tried in the order they were
added; the first one that matches and has uses left answers, and uses one up.
Addresses no rule matches are accepted.
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Literal

import attrs

from mailstrom_async._address import recipient_key
from mailstrom_async._config import RetryPolicy
from mailstrom_async._models import SMTPReply

__all__ = ["FAST_RETRY", "OutboxMessage", "Script", "Scripted", "capture"]

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_PARSER = BytesParser(policy=policy.default)

RuleKind = Literal["defer", "fail", "disconnect"]
_CODES: dict[RuleKind, range] = {
    "defer": range(400, 500),
    "fail": range(500, 600),
    "disconnect": range(421, 422),
}


@attrs.frozen(kw_only=True)
class OutboxMessage:
    """One message as a server received it: its envelope, bytes, and parsed form.

    ``rcpt_to`` holds the recipients accepted in that transaction: a recipient
    that was deferred and accepted later arrives in a message of its own, just
    as a real server would see it.
    """

    message_id: str | None
    """The ``Message-ID`` without angle brackets (the Deliverer's id for it)."""
    mail_from: str
    """The envelope sender (``MAIL FROM``)."""
    rcpt_to: tuple[str, ...]
    """The envelope recipients accepted (``RCPT TO``), in order."""
    data: bytes = attrs.field(repr=False)
    """The message as it was sent."""
    message: EmailMessage = attrs.field(repr=False, eq=False)
    """``data`` parsed with the ``email.policy.default`` policy."""

    @property
    def subject(self) -> str | None:
        """The ``Subject`` header, decoded; None if there is none."""
        value = self.message["Subject"]
        return None if value is None else str(value)

    @property
    def to(self) -> tuple[str, ...]:
        """The addresses in the ``To`` header (the envelope's are ``rcpt_to``)."""
        return _addresses(self.message, "To")

    @property
    def cc(self) -> tuple[str, ...]:
        """The addresses in the ``Cc`` header."""
        return _addresses(self.message, "Cc")

    @property
    def text(self) -> str | None:
        """The plain text body, decoded, with Unix line endings; None if there is
        none."""
        return _body(self.message, "plain")

    @property
    def html(self) -> str | None:
        """The HTML body, decoded, with Unix line endings; None if there is none."""
        return _body(self.message, "html")


def _addresses(message: EmailMessage, name: str) -> tuple[str, ...]:
    header = message[name]
    if header is None:
        return ()
    return tuple(a.addr_spec for a in header.addresses)


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    content: str = part.get_content()  # a text/plain or text/html part: str
    return content.replace("\r\n", "\n")


def capture(mail_from: str, rcpt_to: tuple[str, ...], data: bytes) -> OutboxMessage:
    """An :class:`OutboxMessage` for what a server received."""
    message = _PARSER.parsebytes(data)
    header = message["Message-ID"]
    message_id = str(header).strip().strip("<>") if header is not None else None
    return OutboxMessage(
        message_id=message_id or None,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        data=data,
        message=message,
    )


@attrs.define
class _Rule:
    kind: RuleKind
    # The recipient key of an address, ("", domain key) for "@domain", or None
    # for any address.
    pattern: tuple[str, str] | None
    reply: SMTPReply
    remaining: int | None

    def matches(self, address: str) -> bool:
        if self.pattern is None:
            return True
        local, domain = recipient_key(address)
        if not self.pattern[0]:
            return domain == self.pattern[1]
        return (local, domain) == self.pattern


def _pattern(address: str | None, kind: RuleKind) -> tuple[str, str] | None:
    if address is None and kind == "disconnect":
        return None
    if not isinstance(address, str) or "@" not in address or "\n" in address:
        msg = (
            f"{kind}() needs a recipient address ('ada@example.org') or a domain "
            f"('@example.org'), not {address!r}"
        )
        raise ValueError(msg)
    # One rule with the library: the local part exactly, the domain in any case.
    return recipient_key(address.strip())


def _reply(
    kind: RuleKind, code: int, enhanced_code: str | None, text: str
) -> SMTPReply:
    codes = _CODES[kind]
    if code not in codes:
        expected = "421" if kind == "disconnect" else f"from {codes[0]} to {codes[-1]}"
        msg = f"{kind}() needs a reply code {expected}, not {code!r}"
        raise ValueError(msg)
    if kind == "defer" and code == 421:
        msg = "defer() cannot use 421, which closes the connection: use disconnect()"
        raise ValueError(msg)
    if enhanced_code is not None and not (
        _ENHANCED.fullmatch(enhanced_code) and enhanced_code[0] == str(code)[0]
    ):
        msg = (
            f"{kind}() needs an RFC 3463 enhanced code of class {str(code)[0]} "
            f"('{str(code)[0]}.1.1'), or None, not {enhanced_code!r}"
        )
        raise ValueError(msg)
    if "\r" in text or "\n" in text:
        msg = f"{kind}() needs a reply text on one line, not {text!r}"
        raise ValueError(msg)
    return SMTPReply(code=code, text=text, enhanced_code=enhanced_code)


def _times(kind: RuleKind, times: int | None) -> int | None:
    if times is not None and times < 1:
        msg = f"{kind}() needs times >= 1, or None for every time, not {times!r}"
        raise ValueError(msg)
    return times


class Script:
    """Scripted replies to ``RCPT TO``, shared by the outbox and the capture server."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []

    def add(
        self,
        kind: RuleKind,
        address: str | None,
        *,
        code: int,
        enhanced_code: str | None,
        text: str,
        times: int | None,
    ) -> None:
        """Add a rule after the existing ones.

        Raises:
            ValueError: an argument is out of range (the message says which).
        """
        self._rules.append(
            _Rule(
                kind=kind,
                pattern=_pattern(address, kind),
                reply=_reply(kind, code, enhanced_code, text),
                remaining=_times(kind, times),
            )
        )

    def clear(self) -> None:
        """Forget every rule: all addresses are accepted again."""
        self._rules.clear()

    def answer(self, address: str) -> tuple[RuleKind, SMTPReply] | None:
        """The scripted answer to ``RCPT TO:<address>``, using up one use of its
        rule; None accepts the address."""
        for rule in self._rules:
            if rule.remaining != 0 and rule.matches(address):
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule.kind, rule.reply
        return None


class Scripted:
    """The scripting methods of :class:`Outbox` and :class:`CaptureServer`.

    Rules answer ``RCPT TO`` for one address (``"ada@example.org"``: its local
    part exactly as written, its domain in any case or in Unicode, as the library
    compares recipients) or every address of a domain (``"@example.org"``). They are tried in the
    order they were added; the first that matches and has uses left answers
    and uses one up, so ``defer(a, times=2)`` then ``fail(a)`` defers twice,
    then fails. Addresses that no rule matches are accepted. The replies go
    through the same classification, retry policy, statuses and events as
    those of any SMTP server.
    """

    def __init__(self) -> None:
        self._script = Script()

    def defer(
        self,
        address: str,
        *,
        code: int = 451,
        enhanced_code: str | None = "4.3.0",
        text: str = "try again later",
        times: int | None = 1,
    ) -> None:
        """Defer *address* (a 4xx reply) *times* times, then accept it.

        With ``times=None`` it is deferred every time, until the retry policy
        gives up and the recipient FAILS with 5.4.7.

        Raises:
            ValueError: *code* is not 4xx (421: use :meth:`disconnect`), the
                enhanced code is not of class 4, or *times* is below 1.
        """
        self._script.add(
            "defer",
            address,
            code=code,
            enhanced_code=enhanced_code,
            text=text,
            times=times,
        )

    def fail(
        self,
        address: str,
        *,
        code: int = 550,
        enhanced_code: str | None = "5.1.1",
        text: str = "no such user",
        times: int | None = None,
    ) -> None:
        """Refuse *address* permanently (a 5xx reply): the recipient FAILS.

        With *times* a number, the rule is used up after that many refusals
        (useful when several messages go to the same address).

        Raises:
            ValueError: *code* is not 5xx, the enhanced code is not of class 5,
                or *times* is below 1.
        """
        self._script.add(
            "fail",
            address,
            code=code,
            enhanced_code=enhanced_code,
            text=text,
            times=times,
        )

    def disconnect(
        self,
        address: str | None = None,
        *,
        enhanced_code: str | None = "4.4.2",
        text: str = "closing connection",
        times: int | None = 1,
    ) -> None:
        """Answer ``RCPT TO`` for *address* (any address with None) with 421 and
        drop the connection, as a server shutting down does.

        Nothing of that transaction is delivered: all its recipients are
        DEFERRED, and the destination is backed off briefly as after any
        connection failure.

        Raises:
            ValueError: the enhanced code is not of class 4, or *times* is below 1.
        """
        self._script.add(
            "disconnect",
            address,
            code=421,
            enhanced_code=enhanced_code,
            text=text,
            times=times,
        )

    def clear_script(self) -> None:
        """Forget every scripted reply: all addresses are accepted again."""
        self._script.clear()


#: A retry policy for tests: deferred recipients are tried again after 10 ms,
#: 20 ms, 40 ms, 50 ms, and FAILED (5.4.7) after the fifth attempt.
FAST_RETRY = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5)
