"""Rules shared by every store, so that all of them behave exactly alike.

Input checks (aware datetimes, claim arguments, statuses that could never come due),
normalisation to UTC and to valid Unicode, address matching by
:func:`~mailstrom_async._domain.recipient_key` (the local part exactly, the domain
case-insensitively), and
the one rule of
:meth:`~mailstrom_async._store._base.Store.record` that is not a plain overwrite: a
recipient that is final (``DELIVERED``/``FAILED``) is never moved back to an
unfinished state, so a worker that reports late cannot undo another's outcome.

Valid Unicode: every text a store is given passes :func:`~mailstrom_async._text.clean`
on the way in (:func:`check_new_message`, :func:`check_statuses`, :func:`matching`),
so that no string, whatever path it came by (a lone surrogate from a server's
bytes, say), can make a database write fail: sqlite3 refuses to encode a lone
surrogate. Such a string is stored in its display form (``\\xNN``); a status
``message`` keeps its exact bytes in ``raw_message``.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import logging
import math
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import attrs

from mailstrom_async._domain import domain_key, recipient_key
from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus
from mailstrom_async._store._base import MAX_PRIORITY, MIN_PRIORITY, LeaseInfo
from mailstrom_async._text import clean, is_clean, wire_bytes

if TYPE_CHECKING:
    from mailstrom_async._store._base import NewMessage

__all__ = [
    "CANCELLED",
    "UNFINISHED",
    "add_lease",
    "address_index",
    "bucket_of",
    "cancelled",
    "check_bounds",
    "check_claim",
    "check_history",
    "check_hold",
    "check_limit",
    "check_list_limit",
    "check_new_message",
    "check_priority",
    "check_statuses",
    "check_unhold",
    "kept_token",
    "logger",
    "matching",
    "new_lease_token",
    "should_replace",
    "takes_lease",
    "trimmed_history",
    "utc",
    "utc_or_none",
]

logger = logging.getLogger("mailstrom_async.store")

#: States in which a recipient still waits for delivery.
UNFINISHED = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED})


def utc(value: datetime, what: str) -> datetime:
    """Return *value* in UTC; a naive datetime is a bug and raises ValueError."""
    if value.tzinfo is None or value.utcoffset() is None:
        msg = f"{what} must be a timezone-aware datetime, got {value!r}"
        raise ValueError(msg)
    return value.astimezone(UTC)


def utc_or_none(value: datetime | None, what: str) -> datetime | None:
    """Like :func:`utc`, passing ``None`` through."""
    return None if value is None else utc(value, what)


def new_lease_token() -> str:
    """A fresh lease token: 64 random bits, in hex."""
    return secrets.token_hex(8)


def check_claim(
    claim_for: str | None, lease_until: datetime | None, lease: str | None = None
) -> tuple[str, datetime, str] | None:
    """Validate ``add()``'s claim arguments: both or neither, and a lease token
    only with them; return the owner, the lease end and the token (a fresh one
    when none is given)."""
    if claim_for is None and lease_until is None:
        if lease is not None:
            msg = (
                "lease is the token of a claim: give it with claim_for and lease_until"
            )
            raise ValueError(msg)
        return None
    if claim_for is None or lease_until is None:
        msg = "claim_for and lease_until must be given together"
        raise ValueError(msg)
    token = new_lease_token() if lease is None else lease
    return claim_for, utc(lease_until, "lease_until"), token


def takes_lease(store: object) -> bool:
    """Whether *store*'s ``add_many`` takes a lease token (``lease=``), as the
    contract's stores do: a store written for the older contract may not."""
    method = getattr(store, "add_many", None)
    if method is None:
        return False
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin, say
        return False
    return any(
        p.name == "lease" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def kept_token(owner: str | None, token: str | None, worker: str, fresh: str) -> str:
    """The lease token of a row that *worker* claims under *fresh*: its own
    token if *worker* held it already (the lease ran out and nobody else took
    it), else *fresh*. The SQL stores' claims say the same in SQL."""
    return token if owner == worker and token is not None else fresh


def _clean_or_none(value: str | None) -> str | None:
    return None if value is None else clean(value)


def check_priority(priority: object, what: str = "priority") -> int:
    """A message priority: an int (not a bool) from MIN_PRIORITY to MAX_PRIORITY.

    Raises:
        ValueError: it is not.
    """
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        msg = (
            f"{what} must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}"
            f" (lower is claimed first), got {priority!r}"
        )
        raise ValueError(msg)
    return priority


def check_new_message(message: NewMessage) -> NewMessage:
    """Return *message* with ``submitted_at`` in UTC and its text valid Unicode.

    Raises:
        ValueError: its priority is out of range.
    """
    check_priority(message.priority)
    recipients = message.recipients
    if not "".join(recipients).isascii():  # one C-level pass in the common case
        recipients = tuple(clean(r) for r in recipients)
    return attrs.evolve(
        message,
        submitted_at=utc(message.submitted_at, "submitted_at"),
        mail_from=clean(message.mail_from),
        recipients=recipients,
        idempotency_key=_clean_or_none(message.idempotency_key),
    )


def check_limit(limit: int) -> None:
    """``claim_due()`` needs room for at least one job."""
    if limit < 1:
        msg = f"limit must be at least 1, got {limit}"
        raise ValueError(msg)


def check_list_limit(limit: int | None) -> None:
    """``messages()`` takes no limit, or a positive one."""
    if limit is not None and limit < 1:
        msg = f"limit must be at least 1, got {limit}"
        raise ValueError(msg)


def check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    """``shape()`` needs age bounds that are positive and increasing."""
    values = tuple(float(b) for b in bounds)
    if (
        not values
        or values[0] <= 0
        or any(b >= c for b, c in itertools.pairwise(values))
        or not all(math.isfinite(b) for b in values)
    ):
        msg = f"bounds must be positive, finite and increasing, got {list(bounds)!r}"
        raise ValueError(msg)
    return values


def bucket_of(age: float, bounds: Sequence[float]) -> int:
    """The index of the age bucket *age* (seconds) falls in: the number of
    bounds it has reached."""
    return bisect.bisect_right(bounds, age)


#: The reason given to a recipient that an operator cancelled.
CANCELLED = "cancelled by operator"


def cancelled(status: RecipientStatus) -> RecipientStatus:
    """*status* given up by an operator: FAILED, attempts and times unchanged."""
    return attrs.evolve(
        status,
        state=RecipientState.FAILED,
        code=None,
        enhanced_code=None,
        message=CANCELLED,
        raw_message=None,
        next_attempt_at=None,
        held=False,
    )


def check_hold(message_id: str | None, domain: str | None) -> str | None:
    """Validate ``hold()``'s target; return the domain's key (A-label, lower case).

    A hold needs a target, so that a slip (a missing argument) cannot hold the
    whole queue without a word.
    """
    if message_id is None and domain is None:
        msg = "hold() needs a message_id, a domain or both"
        raise ValueError(msg)
    return None if domain is None else domain_key(domain)


def check_unhold(
    message_id: str | None, domain: str | None, *, everything: bool
) -> str | None:
    """Validate ``unhold()``'s target; return the domain's key (A-label, lower case).

    Releasing every held recipient must be asked for explicitly (``all=True``),
    and then with no narrower target that would contradict it.
    """
    if everything and (message_id is not None or domain is not None):
        msg = "unhold(all=True) releases every held recipient: give no message_id or domain with it"
        raise ValueError(msg)
    if not everything and message_id is None and domain is None:
        msg = "unhold() needs a message_id, a domain or both, or all=True"
        raise ValueError(msg)
    return None if domain is None else domain_key(domain)


def _safe_message(
    status: RecipientStatus | AttemptRecord,
) -> tuple[str | None, bytes | None]:
    message, raw = status.message, status.raw_message
    if message is None or is_clean(message):
        return message, (None if raw is None else bytes(raw))
    return clean(message), (wire_bytes(message) if raw is None else bytes(raw))


def check_statuses(statuses: Iterable[RecipientStatus]) -> list[RecipientStatus]:
    """Return *statuses* with every datetime in UTC and all text valid Unicode.

    A ``message`` that is not valid Unicode becomes its display form, its exact
    bytes ``raw_message`` (unless the status has them already).
    An unfinished status without ``next_attempt_at`` would never come due again, so it
    is refused (ValueError) before anything is written.
    """
    result = []
    for status in statuses:
        if status.state in UNFINISHED and status.next_attempt_at is None:
            msg = (
                f"{status.state.value} status of {status.address!r} "
                "needs next_attempt_at"
            )
            raise ValueError(msg)
        message, raw_message = _safe_message(status)
        result.append(
            attrs.evolve(
                status,
                address=clean(status.address),
                enhanced_code=_clean_or_none(status.enhanced_code),
                message=message,
                raw_message=raw_message,
                host=_clean_or_none(status.host),
                ip=_clean_or_none(status.ip),
                first_attempt_at=utc_or_none(
                    status.first_attempt_at, "first_attempt_at"
                ),
                last_attempt_at=utc_or_none(status.last_attempt_at, "last_attempt_at"),
                next_attempt_at=utc_or_none(status.next_attempt_at, "next_attempt_at"),
            )
        )
    return result


def check_history(history: Iterable[AttemptRecord], limit: int) -> list[AttemptRecord]:
    """Return *history* with its times in UTC and its text valid Unicode (as
    :func:`check_statuses` does a status's), or ``[]`` when *limit* is 0.

    Raises ValueError for a negative *limit*, a naive ``started_at``, an attempt
    number below 1 or a duration that is negative or not finite.
    """
    if limit < 0:
        msg = f"history_limit must be an integer >= 0, got {limit!r}"
        raise ValueError(msg)
    if limit == 0:
        return []
    result = []
    for record in history:
        if record.attempt < 1:
            msg = f"attempt numbers start at 1, got {record.attempt!r}"
            raise ValueError(msg)
        if not 0 <= record.duration < float("inf"):
            msg = f"duration must be a number of seconds >= 0, got {record.duration!r}"
            raise ValueError(msg)
        if _is_plain(record):  # the usual case: nothing to change, no copy
            result.append(record)
            continue
        message, raw_message = _safe_message(record)
        result.append(
            attrs.evolve(
                record,
                address=clean(record.address),
                started_at=utc(record.started_at, "started_at"),
                enhanced_code=_clean_or_none(record.enhanced_code),
                message=message,
                raw_message=raw_message,
                host=_clean_or_none(record.host),
                ip=_clean_or_none(record.ip),
            )
        )
    return result


def _is_plain(record: AttemptRecord) -> bool:
    """*record* is in UTC already and all of its text is valid Unicode."""
    texts = (
        record.address,
        record.enhanced_code,
        record.message,
        record.host,
        record.ip,
    )
    return (
        record.started_at.tzinfo is UTC
        and (record.raw_message is None or type(record.raw_message) is bytes)
        and all(t is None or is_clean(t) for t in texts)
    )


def trimmed_history(
    kept: list[AttemptRecord], limit: int, added: int
) -> list[AttemptRecord]:
    """One recipient's *kept* attempts within *limit* once attempt number
    *added* has been added: the first one kept and those numbered above
    ``added - (limit - 1)`` (with a limit of 1: ``added`` and above). Nothing
    goes while *added* is at most *limit*, so the usual write trims nothing.
    The SQL stores delete by the same rule."""
    if added <= limit:
        return kept
    if limit == 1:
        return [r for r in kept if r.attempt >= added]
    first = min(r.attempt for r in kept)
    cutoff = added - (limit - 1)
    return [r for r in kept if r.attempt == first or r.attempt > cutoff]


def address_index(addresses: Iterable[str]) -> dict[tuple[str, str], list[int]]:
    """The indexes of *addresses* by recipient key (all of a duplicate's): the
    local part as it is, the domain case-insensitively.

    Built once per call, so that matching m statuses against n recipients is
    O(n + m), not O(n * m): one message may have 100,000 recipients.
    """
    index: dict[tuple[str, str], list[int]] = {}
    for i, address in enumerate(addresses):
        index.setdefault(recipient_key(clean(address)), []).append(i)
    return index


def matching(index: dict[tuple[str, str], list[int]], address: str) -> list[int]:
    """Indexes of the addresses in *index* that are *address*: the same local part,
    the same domain in any case (and as stored: in valid Unicode)."""
    return index.get(recipient_key(clean(address)), [])


def should_replace(stored: RecipientState, new: RecipientState) -> bool:
    """Whether a recorded status may replace a stored one: finality is sticky."""
    return not (stored.is_final and not new.is_final)


def add_lease(info: LeaseInfo | None, lease_until: datetime) -> LeaseInfo:
    """*info* with one more leased recipient, leased until *lease_until*."""
    if info is None:
        return LeaseInfo(recipients=1, lease_until=lease_until)
    return LeaseInfo(
        recipients=info.recipients + 1, lease_until=max(info.lease_until, lease_until)
    )
