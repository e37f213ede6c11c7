"""The store contract: what every persistence backend must do.

A store holds messages and their recipients' statuses. Every method that changes
state is one transaction. Times are timezone-aware datetimes (a naive one raises
ValueError); the store returns them in UTC. A store that is not open raises
StoreError.

Work is handed out by *claims*: :meth:`Store.claim_due` marks due recipients as
leased by one worker until a deadline, so two workers (even in two processes) never
deliver the same recipient at once; a worker that dies simply lets its lease expire.

Every claim leases its rows under a *lease token* (:attr:`Job.lease`), stored
beside the owner and the lease end: a fresh random string, except for rows the
claiming worker held already (its own lease ran out and nobody else took them),
which keep theirs. Only a claim changes a row's token; recording, releasing and
renewing keep it. :meth:`Store.record` and :meth:`Store.release` given a token
(``lease=``) touch only the recipients whose token is still that one, so a
worker that lost its lease (paused past it, cut off) cannot overwrite the
outcome of the worker that claimed its recipients after it. A lease that ran
out but was not claimed again keeps its token: the late outcome is kept.

An operator can *hold* unfinished recipients (:meth:`Store.hold`, like Postfix's
``postsuper -h``): a held recipient keeps its state and ``next_attempt_at`` but
is never claimed until :meth:`Store.unhold` releases it. The flag is the store's
own: :meth:`Store.record` keeps it for an unfinished outcome and clears it for a
final one, whatever the recorded status says.

Each recipient keeps a bounded *history* of its attempts
(:class:`~mailstrom_async.AttemptRecord`): :meth:`Store.record` writes the
attempts it is given in the same transaction as the statuses, so an outcome is
never stored without its history nor the other way round; :meth:`Store.history`
reads them back; purging a message deletes its history.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio
import attrs

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from mailstrom_async._models import (
        AttemptRecord,
        MessageStatus,
        RecipientState,
        RecipientStatus,
    )

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "BatchRecordingStore",
    "ChangeWatchingStore",
    "Job",
    "JobRecord",
    "LeaseInfo",
    "NewMessage",
    "QueueShape",
    "QueueSummary",
    "Store",
    "StoreChange",
]

#: Attempts kept per recipient when :meth:`Store.record` is not told otherwise
#: (``Limits.history_per_recipient``'s default).
DEFAULT_HISTORY_LIMIT = 20

#: The lowest (most urgent) and highest (least urgent) message priorities.
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000


@attrs.frozen(kw_only=True)
class NewMessage:
    """A prepared message as handed to :meth:`Store.add`.

    ``priority`` orders claims among due recipients, like Unix ``nice``: lower
    values are claimed first (:meth:`Store.claim_due`); from
    :data:`~mailstrom_async.MIN_PRIORITY` to :data:`~mailstrom_async.MAX_PRIORITY`, 0 by default.
    """

    message_id: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes = attrs.field(repr=False)
    smtputf8: bool = False
    submitted_at: datetime
    idempotency_key: str | None = None
    priority: int = 0


@attrs.frozen(kw_only=True)
class Job:
    """Claimed work: one message and those of its recipients this worker now leases.

    ``lease`` is the token the recipients are leased under: pass it to
    :meth:`Store.record` and :meth:`Store.release` so that they write only while
    the lease is still this job's. ``None`` from a store that issues no tokens.
    ``priority`` is the message's (:attr:`NewMessage.priority`).
    """

    message_id: str
    mail_from: str
    recipients: tuple[RecipientStatus, ...]
    data: bytes = attrs.field(repr=False)
    smtputf8: bool
    submitted_at: datetime
    lease: str | None = None
    priority: int = 0


@attrs.frozen(kw_only=True)
class QueueSummary:
    """Recipient counts by state, and by (state, domain); and how many are held.

    Held recipients are QUEUED or DEFERRED and are counted in those states too;
    ``held`` counts them all, ``held_by_domain`` by lower-cased domain (only the
    domains that have some).
    """

    by_state: dict[RecipientState, int]
    by_domain: dict[tuple[RecipientState, str], int]
    held: int = 0
    held_by_domain: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class QueueShape:
    """Recipients counted by lower-cased domain and by the age of their message,
    like Postfix's ``qshape``.

    ``bounds`` are the upper ends of the age buckets, in seconds, increasing;
    each value of ``by_domain`` has ``len(bounds) + 1`` counts: the first of
    messages younger than ``bounds[0]``, the *i*-th of those at least
    ``bounds[i - 1]`` and younger than ``bounds[i]``, the last of those at least
    ``bounds[-1]`` old. Only the domains that have some recipient appear.
    """

    bounds: tuple[float, ...]
    by_domain: dict[str, tuple[int, ...]]

    def total(self) -> tuple[int, ...]:
        """The counts of every domain added up, bucket by bucket."""
        return tuple(
            sum(column) for column in zip(*self.by_domain.values(), strict=True)
        ) or (0,) * (len(self.bounds) + 1)


@attrs.frozen(kw_only=True)
class LeaseInfo:
    """What one lease owner holds: how many unfinished recipients, and until when
    the last of those leases runs."""

    recipients: int
    lease_until: datetime


@attrs.frozen(kw_only=True)
class JobRecord:
    """One job's outcome, for :meth:`BatchRecordingStore.record_many`: what
    :meth:`Store.record` takes for one message."""

    message_id: str
    statuses: tuple[RecipientStatus, ...]
    lease: str | None = None
    history: tuple[AttemptRecord, ...] = ()


@runtime_checkable
class BatchRecordingStore(Protocol):
    """A store that writes the outcomes of many jobs in one transaction: the
    Deliverer then gathers what its jobs report while the previous batch
    commits, one commit for many messages instead of one each. A store without
    this method is given one :meth:`Store.record` per job."""

    async def record_many(
        self,
        records: Sequence[JobRecord],
        *,
        worker: str,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> list[list[str]]:
        """Do what :meth:`Store.record` does for each of *records*, in order, in
        one transaction: all are written or none. Returns, for each record, the
        addresses not written because their lease was lost (as ``record``
        does). A message may appear in several records.

        Raises:
            UnknownMessageError: a record's message is not stored (nothing is
                written).
            ValueError: as :meth:`Store.record` (nothing is written).
        """
        ...


@attrs.frozen(kw_only=True)
class StoreChange:
    """What another process committed, as a store that can tell reports it to
    :meth:`ChangeWatchingStore.watch_changes`.

    ``due``: new work may be due now (a message submitted, a lease released,
    an operator's retry or unhold), so an idle worker should claim.
    ``message_ids``: the messages whose statuses changed; None when any
    message may have (read every one you wait on).
    """

    due: bool = False
    message_ids: frozenset[str] | None = frozenset()


@runtime_checkable
class ChangeWatchingStore(Protocol):
    """A store that tells a Deliverer at once what other processes commit
    (:class:`PostgresStore`, with ``LISTEN/NOTIFY``): handles, followers and
    idle workers then wake when the change is committed, not at their next
    poll. A store without this method is polled (``Config.poll_interval``)."""

    async def watch_changes(
        self,
        on_change: Callable[[StoreChange], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call *on_change* for each change other processes commit, until
        cancelled; never raise for a lost connection (reconnect, and report
        ``StoreChange(due=True, message_ids=None)`` once back, since changes may
        have been missed). *on_change* is called on the event loop and must not
        block. ``task_status.started()`` once listening (or once the first
        attempt to listen failed): the Deliverer starts it with
        ``TaskGroup.start``, so that what others commit after it has entered
        reaches it."""
        ...


@runtime_checkable
class Store(Protocol):
    """An async persistence backend for messages and recipient statuses."""

    async def open(self) -> None:
        """Create or migrate the schema and get ready; idempotent."""

    async def aclose(self) -> None:
        """Release resources; idempotent."""

    async def add(
        self,
        message: NewMessage,
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
        lease: str | None = None,
    ) -> tuple[str, bool]:
        """Store *message* with every recipient QUEUED and due at ``submitted_at``.

        Committed durably before it returns. With an ``idempotency_key`` that the
        store already holds, nothing is written and the first message's id is
        returned with ``False``; otherwise ``(message.message_id, True)``.
        With ``claim_for``, the new recipients are leased by that worker until
        ``lease_until`` in the same transaction (the submitting process delivers
        them itself, without a round trip through :meth:`claim_due`), under the
        lease token *lease*: the caller picks it (an unguessable string such as
        ``secrets.token_hex(8)``, new for each call) so that it can record with
        it; without, the store issues a fresh one.

        Raises:
            StoreError: the backend failed, or ``message_id`` is already stored;
                nothing was stored.
            ValueError: ``claim_for`` and ``lease_until`` do not come together,
                or *lease* comes without them.
        """
        ...

    async def add_many(
        self,
        messages: Sequence[NewMessage],
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
        lease: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Store several messages in ONE transaction, as :meth:`add` does each
        (claimed, all of them under one lease token).

        All or nothing: when one cannot be stored (a duplicate id), none is. An
        idempotency key seen earlier, or earlier in the same batch, yields the
        first message's id with ``False``. Results are in the order given.

        Raises:
            StoreError: the backend failed or an id is taken; nothing was stored.
        """
        ...

    async def status(self, message_id: str) -> MessageStatus:
        """Return the message's current status.

        Raises:
            UnknownMessageError: no such message.
        """
        ...

    async def statuses(self, message_ids: Collection[str]) -> dict[str, MessageStatus]:
        """Return the status of each stored message among *message_ids*, read in
        one query (what the handles awaited in a submit-only process poll with).

        Ids the store does not hold are left out of the result.
        """
        ...

    async def message_data(self, message_id: str) -> bytes:
        """Return the message as it was stored: the exact bytes handed to
        :meth:`add` in ``NewMessage.data``.

        Raises:
            UnknownMessageError: no such message.
        """
        ...

    async def message_sizes(self, message_ids: Collection[str]) -> dict[str, int]:
        """Return the size in bytes of each stored message among *message_ids*
        (the length of its data), without reading the data into memory.

        Ids the store does not hold are left out of the result.
        """
        ...

    async def shape(
        self,
        *,
        now: datetime,
        bounds: Sequence[float],
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        held: bool | None = None,
    ) -> QueueShape:
        """Count recipients in one of *states* (default: QUEUED and DEFERRED) by
        lower-cased domain and by their message's age at *now* (``now -
        submitted_at``, in seconds), bucketed by *bounds* as
        :class:`QueueShape` says; of *domain* only if given (case-insensitive),
        and if *held* is given, only held (True) or not held (False) ones.
        A message submitted after *now* counts as age 0.

        The counting is the store's (SQL ``GROUP BY``): no message is loaded.

        Raises:
            ValueError: *bounds* is empty, or not positive and increasing.
        """
        ...

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        """Lease and return up to *limit* messages' due recipients.

        A recipient is due when it is QUEUED or DEFERRED, not held,
        ``next_attempt_at <= now``, and it is not leased (or its lease ended at or
        before *now*). Claim order: by the message's ``priority`` (lowest
        first), then oldest due first (by ``next_attempt_at``), ties in the
        order messages were added; the jobs are returned in that order.
        Priority only orders due recipients: a recipient not yet due is never
        claimed, whatever its priority. Each job holds all of its message's due recipients
        that share one lease token, in envelope order: the claim leases them
        under a fresh token (:attr:`Job.lease`), except those *worker* held
        already (its lease ran out and nobody took it), which keep their token
        and so come as a job of their own. *limit* counts messages.

        Raises:
            ValueError: *limit* is less than 1.
        """
        ...

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
        """Write the new statuses of some recipients of one message, ending their
        lease, and add *history* to their attempt histories, in one transaction;
        return the addresses (as given) not written because the lease was lost.

        Each status replaces the stored one for the same address (the local part
        compared exactly, the domain case-insensitively: ``recipient_key``),
        except that a final state (DELIVERED/FAILED) is never replaced by an
        unfinished one. A status's ``held`` is ignored: a held recipient stays
        held when the new status is unfinished, and stops being held when it is
        final. Unknown addresses are ignored.

        With a lease token (*lease*, the claim's :attr:`Job.lease`), only the
        recipients whose stored token is still *lease* are written and their
        lease ends; a recipient that another worker has claimed since (its token
        changed) is left exactly as it is, and its address is returned. Without
        (None), each status is written whoever holds the lease, only *worker*'s
        own leases end, and the result is always empty.

        Each attempt of *history* is added to its recipient's history (matched
        by address as statuses are; unknown addresses are ignored), even when
        its status does not replace a final one, and even when the lease was
        lost and its status is not written: the attempt was made. An
        attempt already kept (the same recipient, ``attempt`` and
        ``started_at``: a write that is retried) is not added twice. Then each
        such recipient keeps at most *history_limit* attempts: the first one
        kept and those numbered above ``latest - (history_limit - 1)``; with 1,
        only the latest; with 0, *history* is not written at all.

        Raises:
            UnknownMessageError: no such message.
            ValueError: an unfinished status has no ``next_attempt_at``, or
                *history_limit* is negative.
        """
        ...

    async def history(self, message_id: str) -> list[AttemptRecord]:
        """The kept attempts of every recipient of a message, oldest first (by
        ``started_at``, then envelope order, then attempt number).

        Raises:
            UnknownMessageError: no such message.
        """
        ...

    async def release(
        self,
        message_id: str,
        addresses: Sequence[str],
        *,
        worker: str,
        lease: str | None = None,
    ) -> None:
        """End *worker*'s lease on these recipients without recording an attempt.

        With a lease token (*lease*), only the recipients whose stored token is
        still *lease* are released. Unknown messages and addresses, and other
        workers' leases, are ignored.
        """
        ...

    async def renew_leases(
        self,
        *,
        worker: str,
        lease_until: datetime,
        message_ids: Collection[str] | None = None,
    ) -> int:
        """Extend *worker*'s leases on unfinished recipients to *lease_until*;
        return how many.

        With *message_ids*, only the leases on those messages' recipients: a
        worker renews just the jobs it is still working on, so the lease of a
        job it gave up ends by itself. Without, every lease *worker* holds.
        A dead worker stops calling this and its leases expire. Lease tokens
        stay as they are.
        """
        ...

    async def lease_owners(self) -> dict[str, LeaseInfo]:
        """Every owner holding a lease on an unfinished recipient (expired or
        not), with how many such recipients it holds and its latest lease end."""
        ...

    async def release_owner(self, owner: str) -> int:
        """End every lease *owner* holds, as if it had released each; return how
        many recipients were released. Their due times stay as they were."""
        ...

    async def next_due_at(self) -> datetime | None:
        """The earliest ``next_attempt_at`` of any unfinished recipient not held,
        or None.

        Leased recipients count at their lease end, so an expired lease is found.
        """
        ...

    async def summary(self) -> QueueSummary:
        """Count recipients by state (every state, 0 included) and by (state,
        lower-cased domain) for the pairs that occur; count the held ones in
        total and by domain."""
        ...

    async def purge(self, *, finished_before: datetime) -> int:
        """Delete messages whose recipients are all final and whose last attempt is
        before *finished_before*, with their histories; return how many messages
        were deleted.

        Recipients never attempted count at the message's ``submitted_at``.
        """
        ...

    async def messages(
        self,
        *,
        states: Collection[RecipientState] | None = None,
        domain: str | None = None,
        limit: int | None = None,
        held: bool | None = None,
    ) -> list[MessageStatus]:
        """List messages with at least one recipient in one of *states* (default:
        the unfinished ones, QUEUED and DEFERRED), of *domain* if given (compared
        case-insensitively) and, if *held* is given, held (True) or not held
        (False); oldest submitted first, at most *limit* of them.

        Each message comes with all its recipients, whatever their state.

        Raises:
            ValueError: *limit* is less than 1.
        """
        ...

    async def retry_now(
        self,
        *,
        now: datetime,
        message_id: str | None = None,
        domain: str | None = None,
    ) -> int:
        """Make unfinished recipients due at *now*; return how many were changed.

        Touches QUEUED and DEFERRED recipients whose ``next_attempt_at`` is later
        than *now*, of *message_id* and of *domain* (case-insensitive) when given,
        and never one leased at *now* (in flight: its worker records the outcome)
        nor one held (it waits for :meth:`unhold`). Recipients already due are
        left as they are and not counted.

        Raises:
            UnknownMessageError: *message_id* is given and no such message exists.
        """
        ...

    async def cancel(self, message_id: str) -> int:
        """Give up every unfinished recipient of a message; return how many.

        Each QUEUED or DEFERRED recipient becomes FAILED with the reason
        ``"cancelled by operator"``, no reply code and no next attempt; its
        attempts and attempt times stay as they were, its lease ends and it is
        no longer held. A recipient in flight is cancelled too: if its worker then
        records DELIVERED, that replaces FAILED (a server accepted it: the truth
        wins); any unfinished outcome it records is ignored, as for every final
        state.

        Raises:
            UnknownMessageError: no such message.
        """
        ...

    async def hold(
        self, *, message_id: str | None = None, domain: str | None = None
    ) -> int:
        """Hold the unfinished recipients of *message_id* and/or of *domain*
        (case-insensitive); return how many were not held before.

        Every QUEUED or DEFERRED recipient that matches and is not held yet is
        held: never claimed, not counted by :meth:`next_due_at`, skipped by
        :meth:`retry_now`, until :meth:`unhold`. Its state, attempts and
        ``next_attempt_at`` stay as they are. A recipient leased at the time (in
        flight) is held too and keeps its lease: its worker records the outcome,
        and if that outcome is unfinished the recipient stays held. Only mail
        waiting now is held: recipients added later are not.

        Raises:
            ValueError: neither *message_id* nor *domain* is given.
            UnknownMessageError: *message_id* is given and no such message exists.
        """
        ...

    async def unhold(
        self,
        *,
        message_id: str | None = None,
        domain: str | None = None,
        all: bool = False,
    ) -> int:
        """Release the held recipients of *message_id* and/or of *domain*
        (case-insensitive), or with ``all=True`` every held recipient; return how
        many were released.

        A released recipient is due again at its ``next_attempt_at``, which the
        hold left unchanged: at once if that time has passed, and then in claim
        order by that time (it has waited longest).

        Raises:
            ValueError: no target is given, or ``all=True`` comes with one.
            UnknownMessageError: *message_id* is given and no such message exists.
        """
        ...
