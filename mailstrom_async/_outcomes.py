"""What an attempt means for each recipient: the next status, and its log lines.

Pure and synchronous: the caller passes the clock reading, the retry policy and
the random source.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import attrs

from mailstrom_async._classify import RecipientOutcome
from mailstrom_async._exceptions import DeliveryExpiredError
from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus
from mailstrom_async._retry import decide_retry

if TYPE_CHECKING:
    from mailstrom_async._config import RetryPolicy
    from mailstrom_async._models import SMTPReply

__all__ = [
    "Where",
    "attempt_record",
    "locally_deferred",
    "log_outcomes",
    "next_status",
    "reason",
]

logger = logging.getLogger("mailstrom_async.deliverer")

# A local reason is a one-line summary of the exception, not a traceback.
_MAX_REASON = 300
#: RFC 3463 "other or undefined mail system status": this side failed.
_LOCAL_ERROR = "4.3.0"


@attrs.frozen
class Where:
    """Where an attempt went and how."""

    host: str | None
    ip: str | None = None
    tls: bool | None = None
    tls_verified: bool | None = None


def next_status(
    old: RecipientStatus,
    outcome: RecipientOutcome,
    where: Where,
    *,
    now: datetime,
    submitted_at: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    not_before: datetime | None = None,
) -> RecipientStatus:
    """*old* after an attempt at *now* that ended in *outcome*: a DEFERRED one
    gets its next attempt time from *policy* (never before *not_before*, never
    after the lifetime), or is FAILED 5.4.7 when the policy gives up."""
    reply = outcome.reply
    new = attrs.evolve(
        old,
        state=outcome.state,
        attempts=old.attempts + 1,
        code=reply.code if reply and not reply.local else None,
        enhanced_code=reply.enhanced_code if reply else None,
        message=reply.text if reply else None,
        raw_message=reply.raw_text if reply else None,
        host=where.host,
        ip=where.ip,
        tls=where.tls,
        tls_verified=where.tls_verified,
        first_attempt_at=old.first_attempt_at or now,
        last_attempt_at=now,
        next_attempt_at=None,
        possible_duplicate=old.possible_duplicate or outcome.possible_duplicate,
    )
    if outcome.state is not RecipientState.DEFERRED:
        return new
    decision = decide_retry(
        policy,
        attempts=new.attempts,
        queued_at=submitted_at,
        now=now,
        rng=rng,
        not_before=not_before,
    )
    if decision.next_attempt_at is not None:
        return attrs.evolve(new, next_attempt_at=decision.next_attempt_at)
    if reply is None:
        last = "no reply"
    else:
        last = f"last {'error' if reply.local else 'reply'}: {reply}"
    # Given up here: a local outcome, whatever the last reply was.
    return attrs.evolve(
        new,
        state=RecipientState.FAILED,
        code=None,
        enhanced_code=DeliveryExpiredError.default_enhanced_code,
        message=f"{decision.reason}; {last}",
    )


def locally_deferred(
    old: RecipientStatus,
    why: str,
    *,
    now: datetime,
    submitted_at: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    duplicate: bool,
) -> RecipientStatus:
    """*old* after an attempt that failed here, not at a server: DEFERRED under
    the ordinary backoff (so a failure that repeats ends FAILED at the end of
    the lifetime, never in a loop), with *why*, no reply code and the enhanced
    code 4.3.0 (a local mail system error, RFC 3463)."""
    outcome = RecipientOutcome(
        address=old.address,
        state=RecipientState.DEFERRED,
        reply=None,
        possible_duplicate=duplicate,
    )
    status = next_status(
        old,
        outcome,
        Where(old.host, old.ip),
        now=now,
        submitted_at=submitted_at,
        policy=policy,
        rng=rng,
    )
    if status.state is RecipientState.DEFERRED:
        return attrs.evolve(status, enhanced_code=_LOCAL_ERROR, message=why)
    return attrs.evolve(status, message=f"{status.message}; {why}")


def attempt_record(
    status: RecipientStatus,
    reply: SMTPReply | None,
    *,
    started_at: datetime,
    duration: float,
) -> AttemptRecord:
    """The history entry of the attempt that made *status*: where it went and
    the state after it from *status*; the code and text from *reply*, what the
    attempt got (kept even when the retry lifetime then ran out), or from
    *status* when the attempt failed here without a reply."""
    if reply is None:
        code, enhanced = status.code, status.enhanced_code
        text, raw = status.message, status.raw_message
    else:
        code = None if reply.local else reply.code
        enhanced, text, raw = reply.enhanced_code, reply.text, reply.raw_text
    return AttemptRecord(
        address=status.address,
        attempt=status.attempts,
        started_at=started_at,
        duration=max(0.0, duration),
        state=status.state,
        code=code,
        enhanced_code=enhanced,
        message=text,
        raw_message=raw,
        host=status.host,
        ip=status.ip,
        tls=status.tls,
        tls_verified=status.tls_verified,
    )


def reason(exc: BaseException) -> str:
    """A one-line summary of *exc*: its type and the first line of its text."""
    text = (
        f"{type(exc).__name__}: {exc}".splitlines()[0]
        if str(exc)
        else type(exc).__name__
    )
    return text[:_MAX_REASON]


# recipient domain, state, code, enhanced code, attempt, host, ip, local error
_OutcomeKey = tuple[
    str,
    RecipientState,
    int | None,
    str | None,
    int,
    str | None,
    str | None,
    str | None,
]


def log_outcomes(
    message_id: str,
    destination: str,
    statuses: Sequence[RecipientStatus],
    *,
    errors: Mapping[str, str] | None = None,
) -> None:
    """One INFO record per recipient domain and outcome of a recorded attempt:
    the one line an outcome gets at INFO.

    *errors* gives, by address, why an attempt failed here without a server's
    reply (a refused connection, a timeout, a TLS failure): it is the record's
    ``error``. INFO records never name a recipient, nor quote a server's reply
    text (a server may quote the address); DEBUG adds one record per recipient
    with its address.
    """
    errors = errors or {}
    groups: dict[_OutcomeKey, int] = {}
    for s in statuses:
        key = (
            s.domain,
            s.state,
            s.code,
            s.enhanced_code,
            s.attempts,
            s.host,
            s.ip,
            errors.get(s.address),
        )
        groups[key] = groups.get(key, 0) + 1
    for (
        domain,
        state,
        code,
        enhanced,
        attempt,
        host,
        ip,
        error,
    ), count in groups.items():
        extra = {
            "message_id": message_id,
            "recipient_domain": domain,
            "destination": destination,
            "host": host,
            "ip": ip,
            "code": code,
            "enhanced_code": enhanced,
            "attempt": attempt,
            "state": state.value,
            "recipients": count,
        }
        if error is not None:
            extra["error"] = error
        logger.info(
            "attempt recorded: %d recipient(s) %s", count, state.value, extra=extra
        )
    if logger.isEnabledFor(logging.DEBUG):
        for s in statuses:
            logger.debug(
                "recipient outcome",
                extra={
                    "message_id": message_id,
                    "recipient": s.address,
                    "recipient_domain": s.domain,
                    "destination": destination,
                    "host": s.host,
                    "ip": s.ip,
                    "code": s.code,
                    "enhanced_code": s.enhanced_code,
                    "reply": s.message,
                    "attempt": s.attempts,
                    "state": s.state.value,
                },
            )
