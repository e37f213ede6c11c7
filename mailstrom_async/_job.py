"""One job's life: from claimed recipients to recorded outcomes, inside one boundary.

A *job* is one message, one destination and the recipients this process leases
for it. :meth:`JobRunner.run` takes it through its whole life, top to bottom:

1. postpone it while its destination is backed off (never past the retry
   lifetime: a job at the end of its lifetime is tried at once);
2. for each batch of at most ``max_recipients_per_transaction`` recipients, one
   SMTP transaction, whose outcomes are recorded at once (so a job of 100,000
   recipients that dies half-way never sends the first half again);
3. whatever the job raises, except cancellation, stops at **one boundary** in
   :meth:`JobRunner.run`: it is logged at ERROR with its traceback, the
   recipients without a recorded outcome are DEFERRED with a local reason under
   the ordinary backoff (or keep the outcome that was known and could not be
   written), and their lease ends. The lane, the other lanes and the caller go on.

Cancellation (the Deliverer closing past its grace) gives the recipients back
unattempted, flagged ``possible_duplicate`` where the server may already have the
message, and is re-raised.

Every write and release is fenced by the job's lease token (``Job.lease``): when
the store reports recipients whose lease another worker has taken since (this
process was paused or cut off past the lease), their outcomes are dropped, said
once at WARNING ("lease lost; outcome dropped"), never published nor counted,
and the job stops: its recipients not yet tried are given back, not sent.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import attrs

from mailstrom_async._classify import RecipientOutcome, outcome_from_error
from mailstrom_async._domain import recipient_key
from mailstrom_async._exceptions import (
    ConnectError,
    DeliveryError,
    ProtocolError,
    StoreError,
    TransientDeliveryError,
    UnknownMessageError,
)
from mailstrom_async._lane import Lane, Tally
from mailstrom_async._models import AttemptRecord, DeliveryEvent, RecipientStatus
from mailstrom_async._outcomes import (
    Where,
    attempt_record,
    locally_deferred,
    log_outcomes,
    next_status,
    reason,
)
from mailstrom_async._recorder import Recorder
from mailstrom_async._reuse import PooledConnection
from mailstrom_async._routes import NoAddressLeftError

if TYPE_CHECKING:
    from mailstrom_async._config import Config
    from mailstrom_async._events import EventBroker
    from mailstrom_async._store import Job, Store
    from mailstrom_async._telemetry import AttemptTelemetry, Telemetry
    from mailstrom_async._transport import Connection, Transport

__all__ = ["JobRunner"]

logger = logging.getLogger("mailstrom_async.deliverer")

# Cleanup and status writes that must survive cancellation get this long.
_SHIELDED_DEADLINE = 10.0
# RFC 5321 §4.5.3.1.10: recipients refused with "too many recipients" are sent
# again at once in a new transaction; bound how often one recipient is, so that
# a broken server that refuses every second RCPT cannot keep us in a loop.
_MAX_RETRY_NOW = 20
# Outcomes are written after each transaction, but a job of many transactions
# writes them every few, so that it makes at most about this many writes: each
# write reads the message's rows, and a write per transaction would make a job of
# 100,000 recipients quadratic. A crash mid-job re-sends at most that share.
_MAX_WRITES_PER_JOB = 20
# A known outcome that the store failed to write is written again, waiting a
# little longer each time (0.05 s, 0.1 s, 0.2 s, ...), until the job's lease is
# about to run out (at least a third of the lease); then the job gives it up to
# the boundary.
_RECORD_FIRST_WAIT = 0.05
# ... and at most this long between two tries, so that a database back from a
# restart gets the outcome within a second.
_RECORD_LONGEST_WAIT = 1.0


@attrs.define
class _Progress:
    """How far a job got: its connection, the batch in flight, what is known."""

    pooled: PooledConnection | None
    job: Job
    batch: Sequence[str] = ()
    # The outcomes in the store, and their addresses.
    recorded: list[RecipientStatus] = attrs.field(factory=list)
    done: set[str] = attrs.field(factory=set)
    # Outcomes decided but not (yet) written, by address, and their attempts'
    # history entries (written with them, in the same store call).
    unwritten: dict[str, RecipientStatus] = attrs.field(factory=dict)
    attempts: dict[str, AttemptRecord] = attrs.field(factory=dict)
    # When the transaction in flight began: wall clock and monotonic clock.
    started_at: datetime | None = None
    started: float = 0.0
    # Why an attempt failed here without a server's reply (refused connection,
    # timeout, TLS), by address: logged with the outcome, then forgotten.
    errors: dict[str, str] = attrs.field(factory=dict)
    # The job's recipients as claimed, by address.
    claimed: dict[str, RecipientStatus] = attrs.field(init=False)
    # Set when a write found recipients of this job leased by another worker.
    lost: bool = False

    def __attrs_post_init__(self) -> None:
        self.claimed = {r.address: r for r in self.job.recipients}

    @property
    def conn(self) -> Connection | None:
        return None if self.pooled is None else self.pooled.conn

    def begin(self, now: datetime) -> None:
        """A transaction (one attempt of its batch) begins."""
        self.started_at, self.started = now, anyio.current_time()

    def attempt(
        self, status: RecipientStatus, outcome: RecipientOutcome | None, now: datetime
    ) -> AttemptRecord:
        """The history entry of the attempt in flight that made *status*."""
        if self.started_at is None:  # failed before a transaction began
            started_at, duration = now, 0.0
        else:
            started_at = self.started_at
            duration = anyio.current_time() - self.started
        return attempt_record(
            status,
            None if outcome is None else outcome.reply,
            started_at=started_at,
            duration=duration,
        )


class JobRunner:
    """Runs jobs, one at a time per caller, each inside the job boundary."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        broker: EventBroker,
        worker_id: str,
        clock: Callable[[], datetime],
        rng: random.Random,
        route: Transport,
        on_recorded: Callable[[str, Sequence[RecipientStatus]], None],
        telemetry: Telemetry | None = None,
        lease_end: Callable[[str], datetime | None] = lambda _: None,
    ) -> None:
        self._config = config
        self._store = store
        # Outcomes of jobs that finish together go in one transaction.
        self._recorder = Recorder(
            store,
            worker=worker_id,
            history_limit=config.limits.history_per_recipient,
        )
        self._broker = broker
        self._worker_id = worker_id
        self._clock = clock
        self._rng = rng
        self._route = route
        self._on_recorded = on_recorded
        self._telemetry = telemetry
        # Until when a held message's lease is known to last (LeaseKeeper).
        self._lease_end = lease_end
        self.tally = Tally()

    # -- the boundary ----------------------------------------------------------

    async def run(
        self, lane: Lane, job: Job, pooled: PooledConnection | None
    ) -> PooledConnection | None:
        """Deliver *job* over *pooled* (or a new connection); return the
        connection to reuse. Nothing but cancellation escapes."""
        progress = _Progress(pooled=pooled, job=job)
        span: AttemptTelemetry | None = None
        if self._telemetry is not None:
            span = self._telemetry.start_attempt(
                message_id=job.message_id,
                destination=lane.key,
                recipients=len(job.recipients),
            )
        try:
            await self._deliver(lane, job, progress)
        except UnknownMessageError:
            # Cancelled and purged while in flight: nothing is left to record.
            logger.info(
                "message was removed while in flight; its outcome is dropped",
                extra={"message_id": job.message_id, "destination": lane.key},
            )
            if span is not None:
                span.finish(progress.recorded)
        except Exception as exc:  # the job boundary: contained here, and only here
            if span is not None:
                span.abort(exc)
            logger.exception(
                "delivery job failed; its recipients are deferred",
                extra={
                    "message_id": job.message_id,
                    "destination": lane.key,
                    "recipients": len(job.recipients),
                    "error": reason(exc),
                },
            )
            try:
                await self.contain(job, exc, progress=progress)
            finally:
                # Whatever state the exchange was left in, it is not reused.
                self._drop_connection(progress)
        except BaseException as exc:  # cancelled: shutdown past its grace
            if span is not None:
                span.abort(exc)
            await self._abandon(job, progress)
            raise
        else:
            if span is not None:
                span.finish(progress.recorded)
        return progress.pooled

    async def contain(
        self, job: Job, error: BaseException, *, progress: _Progress | None = None
    ) -> None:
        """Settle a job that failed with *error*: every recipient without a
        recorded outcome is written DEFERRED with a local reason (or with the
        outcome that was known but not written), ending its lease. Never raises
        but for cancellation; if even that write fails, the lease (no longer
        renewed) runs out and the recipients are tried again then."""
        progress = progress or _Progress(pooled=None, job=job)
        now = self._clock()
        why = f"local error: {reason(error)}"
        flagged = self._maybe_delivered(progress)
        statuses, attempts = [], []
        for r in job.recipients:
            if r.address in progress.done:
                continue
            known = progress.unwritten.get(r.address)
            if known is None:
                known = locally_deferred(
                    r,
                    why,
                    now=now,
                    submitted_at=job.submitted_at,
                    policy=self._config.retry,
                    rng=self._rng,
                    duplicate=r.address in flagged,
                )
                attempts.append(progress.attempt(known, None, now))
            elif r.address in progress.attempts:
                attempts.append(progress.attempts[r.address])
            statuses.append(known)
        if not statuses:
            return
        try:
            lost = await self._write(job, statuses, attempts, patience=0.0)
        except UnknownMessageError:
            return
        except Exception as exc:
            logger.error(
                "could not record the failed job either; its lease runs out by itself",
                extra={"message_id": job.message_id, "error": reason(exc)},
            )
            return
        self._publish(progress, _kept(statuses, lost), now)

    async def release(self, job: Job, addresses: Sequence[str] | None = None) -> None:
        """Give *job*'s recipients (or those of *addresses*) back to the store,
        unattempted; never raises (the lease then simply expires) and survives
        cancellation."""
        if addresses is None:
            addresses = [r.address for r in job.recipients]
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_SHIELDED_DEADLINE),
            contextlib.suppress(Exception),  # then the lease simply expires
        ):
            await self._store.release(
                job.message_id, addresses, worker=self._worker_id, **_fence(job)
            )

    async def _abandon(self, job: Job, progress: _Progress) -> None:
        """Cancelled mid-job: write the outcomes known but not yet written, flag
        what the server may have, give the rest back."""
        flagged = self._maybe_delivered(progress)
        self._drop_connection(progress)
        now = self._clock()
        statuses = list(progress.unwritten.values())
        statuses.extend(
            attrs.evolve(r, possible_duplicate=True, next_attempt_at=now)
            for r in job.recipients
            if r.address in flagged and r.address not in progress.done
        )
        if statuses:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(_SHIELDED_DEADLINE),
                contextlib.suppress(Exception),
            ):
                lost = await self._store.record(
                    job.message_id,
                    statuses,
                    worker=self._worker_id,
                    history=list(progress.attempts.values()),
                    history_limit=self._config.limits.history_per_recipient,
                    **_fence(job),
                )
                if lost:
                    self._lease_lost(job, lost)
        await self.release(job)

    @staticmethod
    def _maybe_delivered(progress: _Progress) -> frozenset[str]:
        """The batch that the server may have taken: the final dot went out and
        no reply was read."""
        conn = progress.conn
        if conn is not None and conn.final_dot_unconfirmed:
            return frozenset(progress.batch)
        return frozenset()

    @staticmethod
    def _drop_connection(progress: _Progress) -> None:
        # A connection whose exchange was interrupted is never reused.
        if progress.pooled is not None:
            progress.pooled.conn.close_now()
            progress.pooled = None

    # -- the job's life ----------------------------------------------------------

    async def _deliver(self, lane: Lane, job: Job, progress: _Progress) -> None:
        now = self._clock()
        if lane.backoff_until is not None and lane.is_backing_off(now):
            until = min(lane.backoff_until, self._expires_at(job))
            if until > now:
                await self._postpone(lane, job, until)
                return
            # At the end of its lifetime: the last attempt is made now.
        pending = [r.address for r in job.recipients]
        retried: dict[str, int] = {}
        per_transaction = self._config.limits.max_recipients_per_transaction
        transactions = -(-len(pending) // per_transaction)
        every = -(-transactions // _MAX_WRITES_PER_JOB)
        unwritten = 0  # transactions decided since the last write
        while pending:
            if self._lease_running_out(job):
                await self._give_up_lease(lane, job, progress, pending)
                return
            batch, pending = pending[:per_transaction], pending[per_transaction:]
            progress.batch = batch
            progress.begin(self._clock())
            outcomes, where = await self._transaction(lane, job, batch, progress)
            settled = []
            for outcome in outcomes:
                count = retried.get(outcome.address, 0)
                if outcome.retry_now and count < _MAX_RETRY_NOW:
                    retried[outcome.address] = count + 1
                    pending.append(outcome.address)
                else:
                    settled.append(outcome)
            progress.batch = ()
            self._decide(lane, job, settled, where, progress)
            unwritten += 1
            if unwritten >= every or not pending:
                await self._record(lane, job, progress)
                unwritten = 0
                if progress.lost and pending:
                    # Another worker has this job's recipients: sending the
                    # rest would send them twice. What is still ours goes back.
                    await self.release(job, pending)
                    progress.done.update(pending)
                    return

    def _lease_left(self, job: Job) -> float | None:
        """Seconds left on *job*'s lease as this process knows it (None: unknown)."""
        end = self._lease_end(job.message_id)
        return None if end is None else (end - self._clock()).total_seconds()

    def _lease_running_out(self, job: Job) -> bool:
        """True when the lease has not been renewed for two thirds of its
        duration: renewals fail (the store is lost), so a transaction started
        now might not be recorded before another worker takes the recipients."""
        left = self._lease_left(job)
        return left is not None and left < self._config.lease_duration / 3

    async def _give_up_lease(
        self, lane: Lane, job: Job, progress: _Progress, pending: Sequence[str]
    ) -> None:
        """Start no transaction on a lease running out: write what is known,
        then give the rest back unattempted (if the store is still lost, the
        lease runs out by itself and another worker, or this one, claims it)."""
        logger.warning(
            "the lease of a job was not renewed in time; its recipients are "
            "given back unattempted",
            extra={
                "message_id": job.message_id,
                "destination": lane.key,
                "recipients": len(pending),
                "lease_left": self._lease_left(job),
            },
        )
        await self._record(lane, job, progress)
        left = set(pending)
        rest = tuple(r for r in job.recipients if r.address in left)
        await self.release(attrs.evolve(job, recipients=rest))

    async def _postpone(self, lane: Lane, job: Job, until: datetime) -> None:
        logger.debug(
            "destination backed off, job postponed",
            extra={
                "message_id": job.message_id,
                "destination": lane.key,
                "recipients": len(job.recipients),
                "backoff_until": until.isoformat(),
            },
        )
        statuses = [attrs.evolve(r, next_attempt_at=until) for r in job.recipients]
        await self._write(job, statuses)  # a lost lease: nothing to drop here

    def _expires_at(self, job: Job) -> datetime:
        return job.submitted_at + timedelta(seconds=self._config.retry.lifetime)

    async def _transaction(
        self,
        lane: Lane,
        job: Job,
        batch: Sequence[str],
        progress: _Progress,
    ) -> tuple[list[RecipientOutcome], Where]:
        """One transaction for *batch*; ``progress.conn`` is the connection.

        A pooled connection past its reuse limits, or on which a recipient of
        *batch* was deferred, is closed first (see :mod:`._reuse`). One the
        server dropped while idle gets one fresh try, not counted as an
        attempt. For MX hosts, a transient failure on an open
        connection (421, timeout or hang-up before DATA: nothing was delivered)
        moves on to the next address in the same attempt (RFC 5321 §5.1).
        """
        where = Where(host=None)
        failed: set[str] = set()  # addresses that failed in this attempt
        last_error: DeliveryError | None = None
        refreshed = False
        while True:
            pooled = await self._reusable(lane, progress, batch)
            conn = None if pooled is None else pooled.conn
            reused = opened = conn is not None
            try:
                if pooled is None:
                    conn = await self._route.connect(lane.key, skip=frozenset(failed))
                    pooled = PooledConnection(conn, opened_at=self._clock())
                    progress.pooled = pooled
                    opened = True
                conn = pooled.conn
                where = Where(conn.host, conn.ip, conn.tls, conn.tls_verified)
                outcomes = await conn.send(
                    job.mail_from, batch, job.data, smtputf8=job.smtputf8
                )
                pooled.note(job.message_id, outcomes)
            except NoAddressLeftError:
                if last_error is None:  # pragma: no cover - skip was empty
                    raise
                exc: DeliveryError = last_error
            except DeliveryError as error:
                exc = error
                if conn is not None:
                    await conn.aclose()
                    progress.pooled = conn = None
                stale = isinstance(exc, ProtocolError | ConnectError)
                if reused and stale and not refreshed:
                    refreshed = True
                    continue
                if (
                    opened
                    and self._route.fails_over
                    and isinstance(exc, TransientDeliveryError)
                    and where.ip is not None
                ):
                    failed.add(where.ip)
                    last_error = exc
                    continue
            else:
                lane.succeeded()
                return outcomes, where
            where = attrs.evolve(
                where, host=where.host or exc.host, ip=where.ip or exc.ip
            )
            if isinstance(exc, TransientDeliveryError):
                lane.failed(self._config, self._rng, self._clock())
            if exc.reply is None:  # our own words, not a server's: safe at INFO
                progress.errors.update(dict.fromkeys(batch, reason(exc)))
            # The outcome line (INFO) says the rest; this adds the server's text.
            logger.debug(
                "delivery attempt failed",
                extra={
                    "message_id": job.message_id,
                    "destination": lane.key,
                    "host": where.host,
                    "ip": where.ip,
                    "code": None
                    if exc.reply is None or exc.reply.local
                    else exc.reply.code,
                    "enhanced_code": exc.reply.enhanced_code if exc.reply else None,
                    "recipients": len(batch),
                    "error": str(exc),
                },
            )
            return [outcome_from_error(a, exc) for a in batch], where

    async def _reusable(
        self, lane: Lane, progress: _Progress, batch: Sequence[str]
    ) -> PooledConnection | None:
        """``progress.pooled`` if it may carry *batch*'s transaction; else it is
        closed (politely if it still can) and None is returned."""
        pooled = progress.pooled
        if pooled is None:
            return None
        why = None
        if pooled.conn.is_usable:
            why = pooled.retire_reason(
                progress.job.message_id, batch, self._clock(), self._config.limits
            )
            if why is None:
                return pooled
            logger.debug(
                "connection retired, opening a new one",
                extra={
                    "destination": lane.key,
                    "host": pooled.conn.host,
                    "ip": pooled.conn.ip,
                    "transactions": pooled.transactions,
                    "reason": why,
                },
            )
        await pooled.conn.aclose()
        progress.pooled = None
        return None

    def _decide(
        self,
        lane: Lane,
        job: Job,
        outcomes: Sequence[RecipientOutcome],
        where: Where,
        progress: _Progress,
    ) -> None:
        """One transaction's outcomes become the recipients' next statuses, to be
        written by the next :meth:`_record`."""
        self.tally.attempts += 1
        now = self._clock()
        old = progress.claimed
        for o in outcomes:
            status = next_status(
                old[o.address],
                o,
                where,
                now=now,
                submitted_at=job.submitted_at,
                policy=self._config.retry,
                rng=self._rng,
                not_before=lane.backoff_until,
            )
            progress.unwritten[o.address] = status
            progress.attempts[o.address] = progress.attempt(status, o, now)
        progress.started_at = None

    async def _record(self, lane: Lane, job: Job, progress: _Progress) -> None:
        """Write the outcomes decided so far; then count, log and publish them."""
        decided = list(progress.unwritten.values())
        if not decided:
            return
        lost = await self._write(job, decided, list(progress.attempts.values()))
        progress.unwritten.clear()
        progress.attempts.clear()
        progress.done.update(s.address for s in decided)
        progress.lost = progress.lost or bool(lost)
        # Only what was written is counted, logged, published and resolves
        # handles: a dropped outcome is not the recipient's status.
        statuses = _kept(decided, lost)
        if not statuses:
            progress.errors.clear()
            return
        progress.recorded.extend(statuses)
        self.tally.count(statuses)
        if logger.isEnabledFor(logging.INFO):
            log_outcomes(job.message_id, lane.key, statuses, errors=progress.errors)
        progress.errors.clear()
        self._publish(progress, statuses, self._clock())

    async def _write(
        self,
        job: Job,
        statuses: Sequence[RecipientStatus],
        history: Sequence[AttemptRecord] = (),
        *,
        patience: float | None = None,
    ) -> list[str]:
        """``Store.record`` (the statuses and their attempts' *history*, one
        transaction, fenced by the job's lease token) shielded from
        cancellation, written again after a failure, a little later each
        time, for *patience* seconds (default: until the job's lease, as last
        claimed or renewed, is about to run out, at least a third of the lease;
        0: one more try); the last failure is raised. A known outcome is kept
        for as long as the lease holds, so a database that comes back within it
        (a restart) loses none. Returns the addresses the store did not write
        because another worker has their lease now (said once at WARNING).

        Writing the same statuses and attempts twice is harmless (the store
        keeps an attempt once, and ending a lease keeps its token), so a store
        that wrote and then failed to say so loses nothing either. A message
        that is gone (UnknownMessageError) is not retried.
        """
        if patience is None:
            patience = self._config.lease_duration / 3
            left = self._lease_left(job)
            if left is not None:
                # Stop a little before the end: past it, another worker may
                # have claimed the recipients.
                patience = max(patience, left - min(1.0, patience / 2))
        wait = _RECORD_FIRST_WAIT
        give_up_at = anyio.current_time() + patience
        attempt = 0
        while True:
            attempt += 1
            try:
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(_SHIELDED_DEADLINE) as scope:
                        lost = await self._recorder.record(
                            job.message_id, statuses, history=history, lease=job.lease
                        )
                    if scope.cancelled_caught:
                        msg = f"the store did not record in {_SHIELDED_DEADLINE:g} s"
                        raise StoreError(msg)
            except UnknownMessageError:
                raise
            except Exception as exc:
                left = give_up_at - anyio.current_time()
                if attempt > 1 and left <= 0:
                    raise
                logger.warning(
                    "could not record an outcome; trying again",
                    extra={
                        "message_id": job.message_id,
                        "try": attempt,
                        "error": reason(exc),
                    },
                )
                await anyio.sleep(max(0.0, min(wait, left)))
                wait = min(wait * 2, _RECORD_LONGEST_WAIT)
            else:
                if lost:  # None from a store of the older contract
                    self._lease_lost(job, lost)
                return list(lost or ())

    def _lease_lost(self, job: Job, lost: Sequence[str]) -> None:
        logger.warning(
            "lease lost; outcome dropped",
            extra={
                "message_id": job.message_id,
                "recipients": len(lost),
                "worker": self._worker_id,
            },
        )

    def _publish(
        self, progress: _Progress, statuses: Sequence[RecipientStatus], now: datetime
    ) -> None:
        job, old = progress.job, progress.claimed
        for new in statuses:
            self._broker.publish(
                DeliveryEvent(
                    message_id=job.message_id,
                    recipient=new,
                    previous_state=old[new.address].state,
                    at=now,
                )
            )
        self._on_recorded(job.message_id, statuses)


def _fence(job: Job) -> dict[str, str]:
    """The lease keyword for a store call about *job*: none when its store
    issues no lease tokens (a store of the older contract may not take it)."""
    return {} if job.lease is None else {"lease": job.lease}


def _kept(
    statuses: Sequence[RecipientStatus], lost: Collection[str]
) -> list[RecipientStatus]:
    """*statuses* without those of the *lost* addresses."""
    if not lost:
        return list(statuses)
    gone = {recipient_key(a) for a in lost}
    return [s for s in statuses if recipient_key(s.address) not in gone]
