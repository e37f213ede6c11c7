"""MemoryStore: the store contract in plain dicts, for tests and throwaway queues.

Nothing survives the process. Every method checkpoints once and then runs without
awaiting, so each call is atomic with respect to other tasks, just as each call of a
database store is one transaction. Values are immutable attrs instances, so they are
shared, never copied.

Claims never scan the queue. Four heaps index the unfinished messages, each entry
tagged with its message's version at the time it was pushed; a message is re-indexed
(its version bumped, new entries pushed) by ``_touch`` whenever anything that decides
when it can be claimed changes, and entries of an older version are skipped when
popped:

- ``_ready``: messages with claimable, unleased recipients, by when the first of
  them comes due (the earliest ``next_attempt_at``, then submission): a claim
  moves the entries that are due into ``_due``, until the next one is not;
- ``_due``: those moved, by claim order (priority, then that due time, then
  submission): a claim pops them in turn. Priority cannot lead ``_ready`` itself:
  an urgent message not yet due would then hide the due ones behind it;
- ``_leased``: messages with leased recipients, by when the first lease ends (or the
  recipient comes due, if later): a claim first moves the messages whose leases
  ended into ``_ready``;
- ``_waiting``: every message with claimable recipients, by when the first comes
  due, counting a lease at its end: ``next_due_at``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio.lowlevel
import attrs

from mailstrom_async._domain import domain_key
from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._models import (
    AttemptRecord,
    MessageStatus,
    RecipientState,
    RecipientStatus,
)
from mailstrom_async._store._base import (
    DEFAULT_HISTORY_LIMIT,
    Job,
    JobRecord,
    LeaseInfo,
    NewMessage,
    QueueShape,
    QueueSummary,
)
from mailstrom_async._store._common import (
    UNFINISHED,
    add_lease,
    address_index,
    bucket_of,
    cancelled,
    check_bounds,
    check_claim,
    check_history,
    check_hold,
    check_limit,
    check_list_limit,
    check_new_message,
    check_statuses,
    check_unhold,
    kept_token,
    logger,
    matching,
    new_lease_token,
    should_replace,
    trimmed_history,
    utc,
)
from mailstrom_async._store._record_plan import check_records

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["MemoryStore"]

_NEVER = datetime.max.replace(tzinfo=UTC)


@attrs.define
class _Recipient:
    status: RecipientStatus
    seq: int
    lease_owner: str | None = None
    lease_until: datetime | None = None
    # Changed only by a claim: kept when the lease ends (see Store.record).
    lease_token: str | None = None
    # Kept attempts by (attempt, started_at): the SQL primary key's order.
    history: list[AttemptRecord] = attrs.field(factory=list)

    def add_attempt(self, record: AttemptRecord) -> None:
        key = (record.attempt, record.started_at)
        if any((r.attempt, r.started_at) == key for r in self.history):
            return  # a retried write of the same attempt
        # The stored address, as the SQL store's join gives it.
        self.history.append(attrs.evolve(record, address=self.status.address))
        self.history.sort(key=lambda r: (r.attempt, r.started_at))

    def due_at(self) -> datetime | None:
        """When this recipient can next be claimed; None once it is final, and
        while it is held."""
        nxt = self.status.next_attempt_at
        if self.status.state not in UNFINISHED or nxt is None or self.status.held:
            return None
        if self.lease_until is not None:
            return max(nxt, self.lease_until)
        return nxt

    def order(self) -> tuple[datetime, int]:
        """Claim order: due time, then submission."""
        return self.status.next_attempt_at or _NEVER, self.seq

    def release(self, worker: str, lease: str | None = None) -> None:
        """End the lease if *worker* holds it (with *lease*: if its token is
        *lease*, whoever the owner)."""
        holds = (
            self.lease_owner == worker if lease is None else self.lease_token == lease
        )
        if holds:
            self.lease_owner = self.lease_until = None


@attrs.define
class _Message:
    message: NewMessage
    recipients: list[_Recipient]
    # Set anew by MemoryStore._touch: heap entries of another version are stale.
    version: int = 0

    def addresses(self) -> list[str]:
        return [r.status.address for r in self.recipients]

    def is_done(self) -> bool:
        return all(r.status.is_final for r in self.recipients)

    def finished_at(self) -> datetime:
        submitted = self.message.submitted_at
        return max(
            (r.status.last_attempt_at or submitted for r in self.recipients),
            default=submitted,
        )


class MemoryStore:
    """A :class:`~mailstrom_async.Store` kept in memory."""

    def __init__(self) -> None:
        self._open = False
        self._messages: dict[str, _Message] = {}
        self._keys: dict[str, str] = {}
        # Ids of messages with unfinished recipients, in submission order.
        self._unfinished: dict[str, None] = {}
        self._seq = itertools.count()
        # Message versions, unique in the store (an id can be reused after a purge).
        self._versions = itertools.count(1)
        # The indexes of the module docstring: (due, seq, version, id),
        # (priority, due, seq, version, id), (lease end, version, id) and
        # (due, version, id).
        self._ready: list[tuple[datetime, int, int, str]] = []
        self._due: list[tuple[int, datetime, int, int, str]] = []
        self._leased: list[tuple[datetime, int, str]] = []
        self._waiting: list[tuple[datetime, int, str]] = []
        # Heap entries popped by claims and next_due_at, for tests of their cost.
        self._examined = 0

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<MemoryStore {state} messages={len(self._messages)}>"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Get ready; idempotent. The contents survive ``aclose()`` and ``open()``."""
        await anyio.lowlevel.checkpoint()
        self._open = True

    async def aclose(self) -> None:
        """Refuse further use until opened again; idempotent."""
        await anyio.lowlevel.checkpoint()
        self._open = False

    async def _enter(self) -> None:
        await anyio.lowlevel.checkpoint()
        if not self._open:
            msg = "the store is not open: call open() or use 'async with'"
            raise StoreError(msg)

    def _get(self, message_id: str) -> _Message:
        try:
            return self._messages[message_id]
        except KeyError:
            raise UnknownMessageError(message_id) from None

    async def add(
        self,
        message: NewMessage,
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
        lease: str | None = None,
    ) -> tuple[str, bool]:
        """Store *message*; see :meth:`Store.add`."""
        [result] = await self.add_many(
            [message], claim_for=claim_for, lease_until=lease_until, lease=lease
        )
        return result

    async def add_many(
        self,
        messages: Sequence[NewMessage],
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
        lease: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Store several messages at once; see :meth:`Store.add_many`."""
        checked = [check_new_message(m) for m in messages]
        claim = check_claim(claim_for, lease_until, lease)
        # Built before the atomic part, a slice at a time, so that a message of
        # 100,000 recipients does not stop the event loop for all of them at once.
        built = [await _recipients(m, claim) for m in checked]
        await self._enter()
        keys: dict[str, str] = {}
        new_ids: set[str] = set()
        plan: list[tuple[NewMessage, str | None]] = []  # (message, existing id)
        for message in checked:
            key = message.idempotency_key
            existing = None if key is None else self._keys.get(key, keys.get(key))
            if existing is None:
                mid = message.message_id
                if mid in self._messages or mid in new_ids:
                    msg = f"a message with id {mid!r} is already stored"
                    raise StoreError(msg)
                new_ids.add(mid)
                if key is not None:
                    keys[key] = mid
            plan.append((message, existing))
        results = []
        for (message, existing), recipients in zip(plan, built, strict=True):
            if existing is not None:
                results.append((existing, False))
            else:
                self._insert(message, recipients)
                results.append((message.message_id, True))
        return results

    def _insert(self, message: NewMessage, recipients: list[_Recipient]) -> None:
        for r in recipients:  # claim order among equal due times: submission
            r.seq = next(self._seq)
        self._messages[message.message_id] = _Message(message, recipients)
        if message.idempotency_key is not None:
            self._keys[message.idempotency_key] = message.message_id
        if recipients:
            self._unfinished[message.message_id] = None
            self._touch(message.message_id, self._messages[message.message_id])

    def _touch(
        self, message_id: str, stored: _Message, now: datetime | None = None
    ) -> None:
        """Index the message anew after a change to when it can be claimed.

        A lease that ended at or before *now* counts as no lease: the recipient is
        claimable again, in claim order.
        """
        version = stored.version = next(self._versions)
        ready: tuple[datetime, int] | None = None
        leased: datetime | None = None
        waiting: datetime | None = None
        for r in stored.recipients:
            due = r.due_at()
            if due is None:
                continue
            if waiting is None or due < waiting:
                waiting = due
            until = r.lease_until
            if until is not None and (now is None or until > now):
                if leased is None or due < leased:
                    leased = due
            elif ready is None or r.order() < ready:
                ready = r.order()
        if ready is not None:
            heapq.heappush(self._ready, (*ready, version, message_id))
        if leased is not None:
            heapq.heappush(self._leased, (leased, version, message_id))
        if waiting is not None:
            heapq.heappush(self._waiting, (waiting, version, message_id))
        entries = len(self._ready) + len(self._due) + len(self._leased)
        if entries + len(self._waiting) > _REINDEX_AT + 6 * len(self._unfinished):
            self._reindex()

    def _reindex(self) -> None:
        """Rebuild the indexes from the unfinished messages, dropping stale entries."""
        self._ready.clear()
        self._due.clear()
        self._leased.clear()
        self._waiting.clear()
        for message_id in self._unfinished:
            self._touch(message_id, self._messages[message_id])

    def _current(self, version: int, message_id: str) -> _Message | None:
        """The message of a heap entry, or None if the entry is stale."""
        self._examined += 1
        stored = self._messages.get(message_id)
        if stored is None or stored.version != version:
            return None
        return stored

    async def status(self, message_id: str) -> MessageStatus:
        """Return the message's status; see :meth:`Store.status`."""
        await self._enter()
        return _status(self._get(message_id))

    async def statuses(self, message_ids: Collection[str]) -> dict[str, MessageStatus]:
        """The statuses of stored messages; see :meth:`Store.statuses`."""
        await self._enter()
        found = self._messages
        return {mid: _status(found[mid]) for mid in message_ids if mid in found}

    async def messages(
        self,
        *,
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        limit: int | None = None,
        held: bool | None = None,
    ) -> list[MessageStatus]:
        """List messages by recipient state, domain and hold; see :meth:`Store.messages`."""
        check_list_limit(limit)
        wanted = UNFINISHED if states is None else frozenset(states)
        lowered = None if domain is None else domain_key(domain)
        await self._enter()
        found = [
            stored
            for stored in self._messages.values()
            if any(
                r.status.state in wanted
                and (lowered is None or r.status.domain == lowered)
                and (held is None or r.status.held == held)
                for r in stored.recipients
            )
        ]
        # Stable: messages submitted at the same instant stay in insertion order.
        found.sort(key=lambda stored: stored.message.submitted_at)
        return [_status(stored) for stored in found[:limit]]

    async def message_data(self, message_id: str) -> bytes:
        """The stored bytes of a message; see :meth:`Store.message_data`."""
        await self._enter()
        return self._get(message_id).message.data

    async def message_sizes(self, message_ids: Collection[str]) -> dict[str, int]:
        """The sizes of stored messages; see :meth:`Store.message_sizes`."""
        await self._enter()
        return {
            mid: len(self._messages[mid].message.data)
            for mid in message_ids
            if mid in self._messages
        }

    async def shape(
        self,
        *,
        now: datetime,
        bounds: Sequence[float],
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        held: bool | None = None,
    ) -> QueueShape:
        """Count recipients by domain and age; see :meth:`Store.shape`."""
        now = utc(now, "now")
        limits = check_bounds(bounds)
        wanted = UNFINISHED if states is None else frozenset(states)
        lowered = None if domain is None else domain_key(domain)
        await self._enter()
        counts: dict[str, list[int]] = {}
        for stored in self._messages.values():
            age = (now - stored.message.submitted_at).total_seconds()
            bucket = bucket_of(age, limits)
            for r in stored.recipients:
                s = r.status
                if (
                    s.state in wanted
                    and (lowered is None or s.domain == lowered)
                    and (held is None or s.held == held)
                ):
                    row = counts.setdefault(s.domain, [0] * (len(limits) + 1))
                    row[bucket] += 1
        return QueueShape(
            bounds=limits, by_domain={d: tuple(c) for d, c in counts.items()}
        )

    async def retry_now(
        self,
        *,
        now: datetime,
        message_id: str | None = None,
        domain: str | None = None,
    ) -> int:
        """Make waiting recipients due at *now*; see :meth:`Store.retry_now`."""
        now = utc(now, "now")
        lowered = None if domain is None else domain_key(domain)
        await self._enter()
        ids = list(self._unfinished) if message_id is None else [message_id]
        if message_id is not None:
            self._get(message_id)
        changed = 0
        for mid in ids:
            stored = self._messages[mid]
            before = changed
            for r in stored.recipients:
                nxt = r.status.next_attempt_at
                if (
                    r.status.state in UNFINISHED
                    and not r.status.held
                    and nxt is not None
                    and nxt > now
                    and (r.lease_until is None or r.lease_until <= now)
                    and (lowered is None or r.status.domain == lowered)
                ):
                    r.status = attrs.evolve(r.status, next_attempt_at=now)
                    changed += 1
            if changed != before:
                self._touch(mid, stored)
        return changed

    async def cancel(self, message_id: str) -> int:
        """Fail every unfinished recipient of a message; see :meth:`Store.cancel`."""
        await self._enter()
        stored = self._get(message_id)
        count = 0
        for r in stored.recipients:
            if r.status.state in UNFINISHED:
                r.status = cancelled(r.status)
                r.lease_owner = r.lease_until = None
                count += 1
        self._unfinished.pop(message_id, None)
        stored.version = next(self._versions)  # nothing left to claim: unindexed
        return count

    async def hold(
        self, *, message_id: str | None = None, domain: str | None = None
    ) -> int:
        """Hold unfinished recipients; see :meth:`Store.hold`."""
        lowered = check_hold(message_id, domain)
        await self._enter()
        return self._set_held(True, message_id, lowered)

    async def unhold(
        self,
        *,
        message_id: str | None = None,
        domain: str | None = None,
        all: bool = False,
    ) -> int:
        """Release held recipients; see :meth:`Store.unhold`."""
        lowered = check_unhold(message_id, domain, everything=all)
        await self._enter()
        return self._set_held(False, message_id, lowered)

    def _set_held(self, held: bool, message_id: str | None, domain: str | None) -> int:
        """Set the flag of the unfinished recipients that match; count changes."""
        if message_id is not None:
            self._get(message_id)
        ids = list(self._unfinished) if message_id is None else [message_id]
        changed = 0
        for mid in ids:
            stored = self._messages[mid]
            before = changed
            for r in stored.recipients:
                if (
                    r.status.state in UNFINISHED
                    and r.status.held != held
                    and (domain is None or r.status.domain == domain)
                ):
                    r.status = attrs.evolve(r.status, held=held)
                    changed += 1
            if changed != before:
                self._touch(mid, stored)
        return changed

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        """Lease due recipients of up to *limit* messages; see :meth:`Store.claim_due`."""
        now = utc(now, "now")
        lease_until = utc(lease_until, "lease_until")
        check_limit(limit)
        await self._enter()
        # Leases that ended by now make their recipients claimable, in claim order.
        leased = self._leased
        while leased and leased[0][0] <= now:
            _, version, message_id = heapq.heappop(leased)
            if (stored := self._current(version, message_id)) is not None:
                self._touch(message_id, stored, now)
        # What came due joins the claim order.
        ready, queue = self._ready, self._due
        while ready and ready[0][0] <= now:
            due_at, seq, version, message_id = heapq.heappop(ready)
            if (stored := self._current(version, message_id)) is not None:
                entry = (stored.message.priority, due_at, seq, version, message_id)
                heapq.heappush(queue, entry)
        jobs: list[Job] = []
        fresh = new_lease_token()
        messages = 0
        early: list[tuple[datetime, int, int, str]] = []
        while queue and messages < limit:
            priority, due_at, seq, version, message_id = heapq.heappop(queue)
            if (stored := self._current(version, message_id)) is None:
                continue
            if due_at > now:  # moved by a claim at a later *now*: not due yet
                early.append((due_at, seq, version, message_id))
                continue
            due = [r for r in stored.recipients if _is_due(r, now)]
            # One job per lease token, in envelope order of their first rows.
            by_token: dict[str, list[RecipientStatus]] = {}
            for r in due:
                token = kept_token(r.lease_owner, r.lease_token, worker, fresh)
                r.lease_owner, r.lease_until, r.lease_token = worker, lease_until, token
                by_token.setdefault(token, []).append(r.status)
            self._touch(message_id, stored)
            if not due:  # pragma: no cover - an entry's first recipient is due
                continue
            message = stored.message
            jobs.extend(
                Job(
                    message_id=message_id,
                    mail_from=message.mail_from,
                    recipients=tuple(statuses),
                    data=message.data,
                    smtputf8=message.smtputf8,
                    submitted_at=message.submitted_at,
                    lease=token,
                    priority=priority,
                )
                for token, statuses in by_token.items()
            )
            messages += 1
        for waiting in early:
            heapq.heappush(ready, waiting)
        if jobs:
            logger.debug(
                "claimed",
                extra={"worker": worker, "messages": messages, "store": "memory"},
            )
        return jobs

    async def record(
        self,
        message_id: str,
        statuses: Sequence[RecipientStatus],
        *,
        worker: str,
        lease: str | None = None,
        history: Sequence[AttemptRecord] = (),
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> list[str]:
        """Write new statuses and their attempts and end their leases, fenced by
        *lease*; see :meth:`Store.record`."""
        statuses = check_statuses(statuses)
        attempts = check_history(history, history_limit)
        await self._enter()
        stored = self._get(message_id)
        return self._apply(
            message_id, stored, statuses, attempts, worker, lease, history_limit
        )

    async def record_many(
        self,
        records: Sequence[JobRecord],
        *,
        worker: str,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> list[list[str]]:
        """Record each of *records* as :meth:`record` does, all or nothing; see
        :meth:`BatchRecordingStore.record_many`."""
        # Everything that can fail is checked before anything is applied.
        checked = check_records(records, history_limit)
        await self._enter()
        messages = [self._get(message_id) for message_id, *_ in checked]
        return [
            self._apply(mid, stored, statuses, attempts, worker, lease, history_limit)
            for (mid, statuses, attempts, lease), stored in zip(
                checked, messages, strict=True
            )
        ]

    def _apply(
        self,
        message_id: str,
        stored: _Message,
        statuses: Sequence[RecipientStatus],
        attempts: Sequence[AttemptRecord],
        worker: str,
        lease: str | None,
        history_limit: int,
    ) -> list[str]:
        """One ``record()``, checked already: it cannot fail."""
        index = address_index(stored.addresses())
        # All inserted, then trimmed in turn: as the SQL store does.
        matched = [(i, r) for r in attempts for i in matching(index, r.address)]
        for i, record in matched:
            stored.recipients[i].add_attempt(record)
        for i, record in matched:
            r = stored.recipients[i]
            r.history = trimmed_history(r.history, history_limit, record.attempt)
        lost: dict[str, None] = {}
        for status in statuses:
            for i in matching(index, status.address):
                r = stored.recipients[i]
                if lease is not None and r.lease_token != lease:
                    lost[status.address] = None  # claimed by another since
                    continue
                if should_replace(r.status.state, status.state):
                    # The hold is the store's: kept while unfinished.
                    r.status = attrs.evolve(
                        status,
                        address=r.status.address,
                        held=r.status.held and not status.is_final,
                    )
                r.release(worker, lease)
        if stored.is_done():
            self._unfinished.pop(message_id, None)
            stored.version = next(self._versions)  # unindexed
        else:
            self._touch(message_id, stored)
        return list(lost)

    async def history(self, message_id: str) -> list[AttemptRecord]:
        """The kept attempts of a message's recipients; see :meth:`Store.history`."""
        await self._enter()
        stored = self._get(message_id)
        kept = [
            (record.started_at, position, record.attempt, record)
            for position, r in enumerate(stored.recipients)
            for record in r.history
        ]
        kept.sort(key=lambda entry: entry[:3])
        return [entry[3] for entry in kept]

    async def release(
        self,
        message_id: str,
        addresses: Sequence[str],
        *,
        worker: str,
        lease: str | None = None,
    ) -> None:
        """End *worker*'s lease on these recipients (fenced by *lease*); unknown
        ids and addresses are ignored."""
        await self._enter()
        stored = self._messages.get(message_id)
        if stored is None:
            return
        index = address_index(stored.addresses())
        for address in addresses:
            for i in matching(index, address):
                stored.recipients[i].release(worker, lease)
        if message_id in self._unfinished:
            self._touch(message_id, stored)

    async def renew_leases(
        self,
        *,
        worker: str,
        lease_until: datetime,
        message_ids: Collection[str] | None = None,
    ) -> int:
        """Extend *worker*'s leases; see :meth:`Store.renew_leases`."""
        await self._enter()
        lease_until = utc(lease_until, "lease_until")
        ids = self._unfinished if message_ids is None else message_ids
        renewed = 0
        for message_id in ids:
            stored = self._messages.get(message_id)
            if stored is None:
                continue
            before = renewed
            for r in stored.recipients:
                if r.lease_owner == worker and r.status.state in UNFINISHED:
                    r.lease_until = lease_until
                    renewed += 1
            if renewed != before:
                self._touch(message_id, stored)
        return renewed

    async def lease_owners(self) -> dict[str, LeaseInfo]:
        """Who holds leases on unfinished recipients; see :meth:`Store.lease_owners`."""
        await self._enter()
        owners: dict[str, LeaseInfo] = {}
        for message_id in self._unfinished:
            for r in self._messages[message_id].recipients:
                if r.lease_owner is None or r.lease_until is None:
                    continue
                owners[r.lease_owner] = add_lease(
                    owners.get(r.lease_owner), r.lease_until
                )
        return owners

    async def release_owner(self, owner: str) -> int:
        """End every lease of *owner*; see :meth:`Store.release_owner`."""
        await self._enter()
        released = 0
        for message_id in self._unfinished:
            stored = self._messages[message_id]
            before = released
            for r in stored.recipients:
                if r.lease_owner == owner:
                    r.release(owner)
                    released += 1
            if released != before:
                self._touch(message_id, stored)
        return released

    async def next_due_at(self) -> datetime | None:
        """When the next unfinished recipient comes due; see :meth:`Store.next_due_at`."""
        await self._enter()
        waiting = self._waiting
        while waiting:
            due, version, message_id = waiting[0]
            if self._current(version, message_id) is not None:
                return due
            heapq.heappop(waiting)
        return None

    async def summary(self) -> QueueSummary:
        """Count recipients by state and by (state, domain)."""
        await self._enter()
        by_state = dict.fromkeys(RecipientState, 0)
        by_domain: dict[tuple[RecipientState, str], int] = {}
        held: dict[str, int] = {}
        for stored in self._messages.values():
            for r in stored.recipients:
                state = r.status.state
                by_state[state] += 1
                key = (state, r.status.domain)
                by_domain[key] = by_domain.get(key, 0) + 1
                if r.status.held:
                    held[r.status.domain] = held.get(r.status.domain, 0) + 1
        return QueueSummary(
            by_state=by_state,
            by_domain=by_domain,
            held=sum(held.values()),
            held_by_domain=held,
        )

    async def purge(self, *, finished_before: datetime) -> int:
        """Delete finished messages older than *finished_before*; return how many."""
        finished_before = utc(finished_before, "finished_before")
        await self._enter()
        doomed = [
            message_id
            for message_id, stored in self._messages.items()
            if message_id not in self._unfinished
            and stored.is_done()
            and stored.finished_at() < finished_before
        ]
        for message_id in doomed:
            key = self._messages.pop(message_id).message.idempotency_key
            if key is not None:
                del self._keys[key]
        return len(doomed)


_SLICE = 2_000  # recipients built between two checkpoints
_REINDEX_AT = 10_000  # stale index entries tolerated beyond a few per message


async def _recipients(
    message: NewMessage, claim: tuple[str, datetime, str] | None
) -> list[_Recipient]:
    """The new message's recipients, QUEUED and due at once, leased if claimed."""
    owner, until, token = claim if claim is not None else (None, None, None)
    due = message.submitted_at
    result: list[_Recipient] = []
    addresses = message.recipients
    for start in range(0, len(addresses), _SLICE):
        if start:
            await anyio.lowlevel.checkpoint()
        result.extend(
            _Recipient(
                RecipientStatus(address=a, next_attempt_at=due), 0, owner, until, token
            )
            for a in addresses[start : start + _SLICE]
        )
    return result


def _status(stored: _Message) -> MessageStatus:
    return MessageStatus(
        message_id=stored.message.message_id,
        recipients=tuple(r.status for r in stored.recipients),
        submitted_at=stored.message.submitted_at,
        mail_from=stored.message.mail_from,
    )


def _is_due(r: _Recipient, now: datetime) -> bool:
    due = r.due_at()
    return due is not None and due <= now
