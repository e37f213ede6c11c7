"""Helpers shared by the store contract's modules: a fixed clock and small builders.

Every contract test passes explicit times built from :data:`T0`; none sleeps or
reads the clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailstrom_async._models import RecipientState, RecipientStatus
from mailstrom_async._store import Job, NewMessage

__all__ = ["T0", "at", "attempted", "claimed_addresses", "new_message"]

T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """T0 plus *seconds*."""
    return T0 + timedelta(seconds=seconds)


def new_message(
    message_id: str,
    *recipients: str,
    submitted_at: datetime = T0,
    key: str | None = None,
    data: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    smtputf8: bool = False,
    priority: int = 0,
) -> NewMessage:
    """A message from sender@example.org to *recipients* (one default recipient)."""
    return NewMessage(
        message_id=message_id,
        mail_from="sender@example.org",
        recipients=recipients or ("rcpt@example.com",),
        data=data,
        smtputf8=smtputf8,
        submitted_at=submitted_at,
        idempotency_key=key,
        priority=priority,
    )


def attempted(
    address: str,
    state: RecipientState,
    *,
    when: datetime = T0,
    next_at: datetime | None = None,
) -> RecipientStatus:
    """The status after one attempt at *when* that ended in *state*."""
    return RecipientStatus(
        address=address,
        state=state,
        attempts=1,
        code=250 if state is RecipientState.DELIVERED else 451,
        first_attempt_at=when,
        last_attempt_at=when,
        next_attempt_at=next_at,
    )


def claimed_addresses(jobs: list[Job]) -> list[tuple[str, str]]:
    """(message id, address) of every recipient in *jobs*, in order."""
    return [(job.message_id, r.address) for job in jobs for r in job.recipients]
