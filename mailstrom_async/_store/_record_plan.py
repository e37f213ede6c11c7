"""What a batch of records writes, decided from the rows it locked: pure.

:meth:`PostgresStore.record_many <mailstrom_async.PostgresStore.record_many>`
locks every recipient row of the batch's messages in one statement, asks
:func:`plan_records` what to write, then writes it in a constant number of
statements: one row per recipient for the statuses and for the ended leases,
one per attempt for the history, one per recipient for trimming it.

The records are taken in order, as that many ``Store.record`` calls would take
them: a message recorded twice is seen by its second record as the first left
it (a final state stays final, an ended lease stays ended). Several writes to
one recipient collapse into one: the last status that replaced the stored one
(held if it keeps the hold: after a final state only a final one replaces it),
and the history trimmed against its highest new attempt (what trimming in turn leaves when a recipient's
attempts are numbered upward, as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import attrs

from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus
from mailstrom_async._store._common import (
    address_index,
    check_history,
    check_statuses,
    matching,
    should_replace,
)

if TYPE_CHECKING:
    from mailstrom_async._store._base import JobRecord

__all__ = ["Checked", "Plan", "Stored", "check_records", "plan_records"]


class Stored(NamedTuple):
    """A locked recipient row, as the plan needs it."""

    position: int
    address: str
    state: str
    lease_owner: str | None
    lease_token: str | None


class Checked(NamedTuple):
    """One record, its statuses and history checked (``check_statuses``,
    ``check_history``)."""

    message_id: str
    statuses: Sequence[RecipientStatus]
    attempts: Sequence[AttemptRecord]
    lease: str | None


def check_records(records: Sequence[JobRecord], history_limit: int) -> list[Checked]:
    """*records* checked as ``Store.record`` checks its arguments, before any
    is written (ValueError)."""
    return [
        Checked(
            r.message_id,
            check_statuses(r.statuses),
            check_history(r.history, history_limit),
            r.lease,
        )
        for r in records
    ]


@attrs.define
class Plan:
    """What to write. Keys are ``(message_id, position)``."""

    lost: list[list[str]] = attrs.field(factory=list)
    #: The status to write and whether it keeps the hold.
    statuses: dict[tuple[str, int], tuple[RecipientStatus, bool]] = attrs.field(
        factory=dict
    )
    unlease: set[tuple[str, int]] = attrs.field(factory=set)
    history: list[tuple[str, int, AttemptRecord]] = attrs.field(factory=list)
    #: The highest new attempt number of each recipient above the limit.
    trims: dict[tuple[str, int], int] = attrs.field(factory=dict)


def plan_records(
    rows: Mapping[str, Sequence[Stored]],
    records: Sequence[Checked],
    *,
    worker: str,
    history_limit: int,
) -> Plan:
    """Decide, as ``Store.record`` would for each of *records* in turn, what to
    write; *rows* holds every record's message's rows in position order."""
    plan = Plan()
    indexes = {
        mid: address_index(row.address for row in stored)
        for mid, stored in rows.items()
    }
    states = {
        mid: [RecipientState(row.state) for row in stored]
        for mid, stored in rows.items()
    }
    owners = {mid: [row.lease_owner for row in stored] for mid, stored in rows.items()}
    for record in records:
        mid, lease = record.message_id, record.lease
        stored, index = rows[mid], indexes[mid]
        lost: dict[str, None] = {}
        for status in record.statuses:
            for i in matching(index, status.address):
                key = (mid, stored[i].position)
                if lease is not None and stored[i].lease_token != lease:
                    lost[status.address] = None  # claimed by another since
                    continue
                if should_replace(states[mid][i], status.state):
                    states[mid][i] = status.state
                    # The hold is the store's: kept only while unfinished.
                    plan.statuses[key] = (status, not status.is_final)
                if lease is not None or owners[mid][i] == worker:
                    plan.unlease.add(key)
                    owners[mid][i] = None
        plan.lost.append(list(lost))
        for attempt in record.attempts:
            for i in matching(index, attempt.address):
                key = (mid, stored[i].position)
                plan.history.append((mid, key[1], attempt))
                if attempt.attempt > history_limit:
                    plan.trims[key] = max(plan.trims.get(key, 0), attempt.attempt)
    return plan
