"""Per-destination delivery lanes: connections, transactions, and their outcomes.

A *lane* is one destination (the relay, or later one recipient domain). It has a
queue of claimed jobs and up to ``Limits.connections_per_destination`` worker
coroutines, each owning one SMTP connection that it reuses across messages until
the connection goes idle, fails or is poisoned by a timeout or a cancellation.

Every attempt ends in one ``Store.record`` call that is shielded from cancellation,
so an attempt's outcome is either fully recorded or not at all (then the lease
expires and the recipients are tried again: at-least-once, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import attrs
from anyio.abc import TaskGroup

from mailstrom_async._classify import RecipientOutcome, outcome_from_error
from mailstrom_async._exceptions import (
    ConnectError,
    DeliveryError,
    DeliveryExpiredError,
    ProtocolError,
    StoreError,
    TransientDeliveryError,
)
from mailstrom_async._models import (
    DeliveryEvent,
    RecipientState,
    RecipientStatus,
)
from mailstrom_async._retry import backoff_delay, decide_retry
from mailstrom_async._routes import NoAddressLeftError
from mailstrom_async._statistics import AttemptCounters, DestinationStatistics

if TYPE_CHECKING:
    from mailstrom_async._config import Config
    from mailstrom_async._events import EventBroker
    from mailstrom_async._store import Job, Store
    from mailstrom_async._telemetry import AttemptTelemetry, Telemetry
    from mailstrom_async._transport import Connection, Transport

__all__ = ["Lanes"]

logger = logging.getLogger("mailstrom_async.deliverer")

# Cleanup and status writes that must survive cancellation get this long.
_SHIELDED_DEADLINE = 10.0
# RFC 5321 §4.5.3.1.10: recipients refused with "too many recipients" are sent
# again at once in a new transaction; bound the rounds so a broken server that
# refuses every second RCPT cannot keep us in a loop.
_MAX_ROUNDS = 20


@attrs.define
class _Lane:
    key: str
    queue: asyncio.Queue[Job] = attrs.field(factory=asyncio.Queue)
    workers: int = 0
    idle: int = 0
    failures: int = 0
    backoff_until: datetime | None = None


@attrs.define
class _Progress:
    """How far an attempt got: its connection and the batch in flight."""

    conn: Connection | None
    batch: Sequence[str] = ()


@attrs.frozen
class _Where:
    """Where an attempt went and how."""

    host: str | None
    ip: str | None = None
    tls: bool | None = None
    tls_verified: bool | None = None


class Lanes:
    """All destination lanes of one Deliverer, and the delivery of one job."""

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
        on_recorded: Callable[[str], None],
        on_job_done: Callable[[], None],
        telemetry: Telemetry | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._broker = broker
        self._worker_id = worker_id
        self._clock = clock
        self._rng = rng
        self._route = route
        self._on_recorded = on_recorded
        self._on_job_done = on_job_done
        self._lanes: dict[str, _Lane] = {}
        self._limiter = anyio.CapacityLimiter(config.limits.max_connections)
        self._in_flight = 0
        self._stopping = False
        self._idle_event = anyio.Event()
        self._idle_event.set()
        self._telemetry = telemetry
        # Counters since start, for statistics(): integer increments only.
        self._attempts = 0
        self._delivered = self._deferred = self._failed = 0

    def _stop_requested(self) -> bool:
        return self._stopping

    @property
    def is_stopping(self) -> bool:
        """True once stop() was called."""
        return self._stopping

    @property
    def in_flight(self) -> int:
        """Jobs being delivered right now."""
        return self._in_flight

    def counters(self) -> AttemptCounters:
        """What this Deliverer recorded since it started."""
        return AttemptCounters(
            attempts=self._attempts,
            delivered=self._delivered,
            deferred=self._deferred,
            failed=self._failed,
        )

    def destinations(self) -> dict[str, DestinationStatistics]:
        """A snapshot of every active lane."""
        return {
            key: DestinationStatistics(
                workers=lane.workers,
                idle_workers=lane.idle,
                queued=lane.queue.qsize(),
                consecutive_failures=lane.failures,
                backoff_until=lane.backoff_until,
            )
            for key, lane in self._lanes.items()
        }

    def dispatch(self, job: Job, key: str, tg: TaskGroup) -> None:
        """Queue *job* on the lane for *key*, starting a worker if all are busy."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        lane.queue.put_nowait(job)
        limit = self._config.limits.connections_per_destination
        if lane.idle < lane.queue.qsize() and lane.workers < limit:
            lane.workers += 1
            tg.start_soon(self._run_worker, lane, name=f"mailstrom lane {key}")

    def forgive(self, keys: Collection[str] | None = None) -> None:
        """Forget the backoff of these destinations (of all with None): an
        operator asked to retry now, so their next job connects at once."""
        for key, lane in self._lanes.items():
            if keys is None or key in keys:
                lane.failures = 0
                lane.backoff_until = None

    def discard(self, message_id: str) -> int:
        """Drop the waiting (not in-flight) jobs of a cancelled message; return
        how many were dropped."""
        dropped = 0
        for lane in self._lanes.values():
            kept = []
            while not lane.queue.empty():
                job = lane.queue.get_nowait()
                if job.message_id == message_id:
                    dropped += 1
                else:
                    kept.append(job)
            for job in kept:
                lane.queue.put_nowait(job)
        return dropped

    def stop(self) -> list[Job]:
        """Stop taking jobs; return those still waiting so they can be released."""
        self._stopping = True
        waiting: list[Job] = []
        for lane in self._lanes.values():
            while not lane.queue.empty():
                waiting.append(lane.queue.get_nowait())
        return waiting

    async def wait_idle(self) -> None:
        """Wait until no job is being delivered."""
        while self._in_flight:
            await self._idle_event.wait()

    async def _run_worker(self, lane: _Lane) -> None:
        conn: Connection | None = None
        try:
            async with self._limiter:
                while not self.is_stopping:
                    lane.idle += 1
                    job: Job | None = None
                    with anyio.move_on_after(self._config.limits.idle_timeout):
                        job = await lane.queue.get()
                    lane.idle -= 1
                    if job is None:
                        break  # idle for too long: close the connection, end
                    if self._stop_requested():  # stop() came while we waited
                        await self.release(job)
                        break
                    self._in_flight += 1
                    self._idle_event = anyio.Event()
                    try:
                        conn = await self._deliver(lane, job, conn)
                    finally:
                        self._in_flight -= 1
                        if not self._in_flight:
                            self._idle_event.set()
                        self._on_job_done()
        finally:
            lane.workers -= 1
            backing_off = lane.backoff_until and lane.backoff_until > self._clock()
            if lane.workers == 0 and lane.queue.empty() and not backing_off:
                self._lanes.pop(lane.key, None)  # reap: memory follows active lanes
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

    async def release(self, job: Job) -> None:
        """Give *job*'s recipients back to the store, unattempted; never raises a
        StoreError (the lease then simply expires) and survives cancellation."""
        addresses = [r.address for r in job.recipients]
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_SHIELDED_DEADLINE),
            contextlib.suppress(StoreError),  # then the lease simply expires
        ):
            await self._store.release(job.message_id, addresses, worker=self._worker_id)

    async def _deliver(
        self, lane: _Lane, job: Job, conn: Connection | None
    ) -> Connection | None:
        now = self._clock()
        if lane.backoff_until is not None and now < lane.backoff_until:
            logger.debug(
                "destination backed off, job postponed",
                extra={
                    "message_id": job.message_id,
                    "destination": lane.key,
                    "recipients": len(job.recipients),
                    "backoff_until": lane.backoff_until.isoformat(),
                },
            )
            await self._postpone(job, lane.backoff_until)
            return conn
        progress = _Progress(conn=conn)
        span: AttemptTelemetry | None = None
        if self._telemetry is not None:
            span = self._telemetry.start_attempt(
                message_id=job.message_id,
                destination=lane.key,
                recipients=len(job.recipients),
            )
        try:
            conn, outcomes = await self._attempt(lane, job, progress)
        except BaseException as exc:
            if span is not None:
                span.abort(exc)
            # Cancelled (shutdown past its grace) or crashed mid-attempt: give the
            # recipients back so the next run retries them at once, flagged when
            # the server may already have the message.
            current = progress.conn
            if current is not None:
                if current.final_dot_unconfirmed:
                    await self._flag_possible_duplicates(job, progress.batch)
                current.close_now()
            await self.release(job)
            raise
        try:
            statuses = await self._record(lane, job, outcomes)
        except StoreError as exc:
            if span is not None:
                span.abort(exc)
            # The lease expires and the recipients are tried again: at-least-once.
            logger.error(
                "could not record a delivery attempt; it will be retried",
                extra={
                    "message_id": job.message_id,
                    "destination": lane.key,
                    "error": str(exc),
                },
            )
        except BaseException as exc:
            if span is not None:
                span.abort(exc)
            raise
        else:
            if span is not None:
                span.finish(statuses)
        return conn

    async def _flag_possible_duplicates(self, job: Job, batch: Sequence[str]) -> None:
        now = self._clock()
        statuses = [
            attrs.evolve(r, possible_duplicate=True, next_attempt_at=now)
            for r in job.recipients
            if r.address in batch
        ]
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_SHIELDED_DEADLINE),
            contextlib.suppress(StoreError),
        ):
            await self._store.record(job.message_id, statuses, worker=self._worker_id)

    async def _attempt(
        self, lane: _Lane, job: Job, progress: _Progress
    ) -> tuple[Connection | None, dict[str, tuple[RecipientOutcome, _Where]]]:
        results: dict[str, tuple[RecipientOutcome, _Where]] = {}
        pending = [r.address for r in job.recipients]
        per_transaction = self._config.limits.max_recipients_per_transaction
        rounds = 0
        while pending and rounds < _MAX_ROUNDS:
            rounds += 1
            batch, pending = pending[:per_transaction], pending[per_transaction:]
            progress.batch = batch
            outcomes, where = await self._transaction(lane, job, batch, progress)
            for outcome in outcomes:
                results[outcome.address] = (outcome, where)
                if outcome.retry_now:
                    pending.append(outcome.address)
        return progress.conn, results

    async def _transaction(
        self,
        lane: _Lane,
        job: Job,
        batch: Sequence[str],
        progress: _Progress,
    ) -> tuple[list[RecipientOutcome], _Where]:
        """One transaction for *batch*; ``progress.conn`` is the connection.

        A pooled connection the server dropped while idle gets one fresh try, not
        counted as an attempt. For MX hosts, a transient failure on an open
        connection (421, timeout or hang-up before DATA: nothing was delivered)
        moves on to the next address in the same attempt (RFC 5321 §5.1).
        """
        where = _Where(host=None)
        failed: set[str] = set()  # addresses that failed in this attempt
        last_error: DeliveryError | None = None
        refreshed = False
        while True:
            conn = progress.conn
            reused = conn is not None and conn.is_usable
            if conn is not None and not conn.is_usable:
                await conn.aclose()
                progress.conn = conn = None
            opened = conn is not None
            try:
                if conn is None:
                    conn = await self._route.connect(lane.key, skip=frozenset(failed))
                    progress.conn = conn
                    opened = True
                where = _Where(conn.host, conn.ip, conn.tls, conn.tls_verified)
                outcomes = await conn.send(
                    job.mail_from, batch, job.data, smtputf8=job.smtputf8
                )
            except NoAddressLeftError:
                if last_error is None:  # pragma: no cover - skip was empty
                    raise
                exc: DeliveryError = last_error
            except DeliveryError as error:
                exc = error
                if conn is not None:
                    await conn.aclose()
                    progress.conn = conn = None
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
                lane.failures = 0
                lane.backoff_until = None
                return outcomes, where
            where = attrs.evolve(
                where, host=where.host or exc.host, ip=where.ip or exc.ip
            )
            if isinstance(exc, TransientDeliveryError):
                self._lane_failed(lane)
            logger.info(
                "delivery attempt failed",
                extra={
                    "message_id": job.message_id,
                    "destination": lane.key,
                    "host": where.host,
                    "ip": where.ip,
                    "code": exc.reply.code if exc.reply else None,
                    "enhanced_code": exc.reply.enhanced_code if exc.reply else None,
                    "recipients": len(batch),
                    "error": str(exc),
                },
            )
            return [outcome_from_error(a, exc) for a in batch], where

    def _lane_failed(self, lane: _Lane) -> None:
        # RFC 1123 §5.3.1.1 / Exim: a destination that just failed is backed off as
        # a whole, so new mail for a dead host waits instead of reconnecting.
        lane.failures += 1
        delay = backoff_delay(self._config.retry, lane.failures, self._rng)
        lane.backoff_until = self._clock() + timedelta(seconds=delay)

    async def _postpone(self, job: Job, until: datetime) -> None:
        statuses = [attrs.evolve(r, next_attempt_at=until) for r in job.recipients]
        with anyio.CancelScope(shield=True), anyio.move_on_after(_SHIELDED_DEADLINE):
            await self._store.record(job.message_id, statuses, worker=self._worker_id)

    async def _record(
        self,
        lane: _Lane,
        job: Job,
        results: dict[str, tuple[RecipientOutcome, _Where]],
    ) -> list[RecipientStatus]:
        now = self._clock()
        statuses = [
            self._next_status(r, *results[r.address], now=now, job=job, lane=lane)
            for r in job.recipients
        ]
        with anyio.CancelScope(shield=True), anyio.move_on_after(_SHIELDED_DEADLINE):
            await self._store.record(job.message_id, statuses, worker=self._worker_id)
        self._attempts += 1
        for new in statuses:
            if new.state is RecipientState.DELIVERED:
                self._delivered += 1
            elif new.state is RecipientState.DEFERRED:
                self._deferred += 1
            else:  # an attempt leaves no recipient QUEUED
                self._failed += 1
        if logger.isEnabledFor(logging.INFO):
            _log_outcomes(job.message_id, lane.key, statuses)
        for old, new in zip(job.recipients, statuses, strict=True):
            self._broker.publish(
                DeliveryEvent(
                    message_id=job.message_id,
                    recipient=new,
                    previous_state=old.state,
                    at=now,
                )
            )
        self._on_recorded(job.message_id)
        return statuses

    def _next_status(
        self,
        old: RecipientStatus,
        outcome: RecipientOutcome,
        where: _Where,
        *,
        now: datetime,
        job: Job,
        lane: _Lane,
    ) -> RecipientStatus:
        reply = outcome.reply
        new = attrs.evolve(
            old,
            state=outcome.state,
            attempts=old.attempts + 1,
            code=reply.code if reply else None,
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
            self._config.retry,
            attempts=new.attempts,
            queued_at=job.submitted_at,
            now=now,
            rng=self._rng,
            not_before=lane.backoff_until,
        )
        if decision.next_attempt_at is not None:
            return attrs.evolve(new, next_attempt_at=decision.next_attempt_at)
        last = str(reply) if reply else "no reply"
        return attrs.evolve(
            new,
            state=RecipientState.FAILED,
            enhanced_code=DeliveryExpiredError.default_enhanced_code,
            message=f"{decision.reason}; last reply: {last}",
        )


# recipient domain, state, code, enhanced code, attempt, host, ip
_OutcomeKey = tuple[
    str, RecipientState, int | None, str | None, int, str | None, str | None
]


def _log_outcomes(
    message_id: str, destination: str, statuses: Sequence[RecipientStatus]
) -> None:
    """One INFO record per recipient domain and outcome of a recorded attempt.

    INFO records never name a recipient, nor quote the reply text (a server may
    quote the address); DEBUG adds one record per recipient with its address.
    """
    groups: dict[_OutcomeKey, int] = {}
    for s in statuses:
        key = (s.domain, s.state, s.code, s.enhanced_code, s.attempts, s.host, s.ip)
        groups[key] = groups.get(key, 0) + 1
    for (domain, state, code, enhanced, attempt, host, ip), count in groups.items():
        logger.info(
            "attempt recorded: %d recipient(s) %s",
            count,
            state.value,
            extra={
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
            },
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
