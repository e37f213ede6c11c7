"""The Deliverer: accepts messages durably and delivers them in the background."""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
)
from datetime import UTC, datetime
from email.message import EmailMessage
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus

from mailstrom_async._config import Config, TransportName
from mailstrom_async._dispatch import Dispatcher
from mailstrom_async._events import EventBroker, EventStream
from mailstrom_async._exceptions import (
    ConfigError,
    DelivererClosedError,
)
from mailstrom_async._follow import StatusStream, chain_signals
from mailstrom_async._intake import Intake, prepare_batch, prepare_one
from mailstrom_async._job import JobRunner
from mailstrom_async._leases import LeaseKeeper, LeaseOwner
from mailstrom_async._models import AttemptRecord, MessageStatus, RecipientState
from mailstrom_async._operations import QueueOperations
from mailstrom_async._owner import current_owner
from mailstrom_async._remote_events import RemoteEvents
from mailstrom_async._routes import network_route
from mailstrom_async._statistics import AttemptCounters, Statistics
from mailstrom_async._store import ChangeWatchingStore, SQLiteStore, Store, StoreChange
from mailstrom_async._store._common import check_priority
from mailstrom_async._telemetry import Telemetry
from mailstrom_async._transports import (
    ENV_TRANSPORT,
    local_transport,
    resolve_transport,
)
from mailstrom_async._watchers import Watchers
from mailstrom_async._worker import Lanes

if TYPE_CHECKING:
    from mailstrom_async._message import Email, PreparedMessage
    from mailstrom_async._transport import Transport

__all__ = ["DEFAULT_STORE_PATH", "Deliverer", "DelivererMode", "SubmitHandle"]

logger = logging.getLogger("mailstrom_async.deliverer")

#: Where ``Deliverer(config)`` keeps its queue when no store is given.
DEFAULT_STORE_PATH = "mailstrom-queue.sqlite3"

DelivererMode = Literal["both", "submit", "deliver"]
_MODES = ("both", "submit", "deliver")


_NOT_SENT = {
    "console": "mail is written to standard output",
    "outbox": "mail is kept in the process-wide outbox (for tests)",
    "null": "mail is discarded",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SubmitHandle:
    """What ``submit`` returns: the message's id, and an awaitable for its outcome.

    ``await handle`` waits until every recipient is DELIVERED or FAILED and returns
    the final :class:`MessageStatus`. ``created`` is False when an idempotency key
    matched an earlier submission and this handle refers to that message.
    """

    def __init__(self, deliverer: Deliverer, message_id: str, *, created: bool) -> None:
        self._deliverer = deliverer
        self.message_id = message_id
        self.created = created

    def __repr__(self) -> str:
        return f"<SubmitHandle {self.message_id!r}>"

    def __await__(self) -> Generator[Any, None, MessageStatus]:
        return self.wait_done().__await__()

    async def status(self) -> MessageStatus:
        """The message's current status."""
        return await self._deliverer.status(self.message_id)

    async def wait_done(self) -> MessageStatus:
        """Wait until every recipient is DELIVERED or FAILED; return the status.

        Raises:
            DelivererClosedError: the Deliverer closed before the message was done.
        """
        return await self._deliverer._wait_done(self.message_id)


class Deliverer:
    """Accepts messages durably and delivers them in the background.

    Use it as an async context manager::

        async with Deliverer(config, store=SQLiteStore("queue.db")) as deliverer:
            handle = await deliverer.submit(email)
            status = await handle

    The Deliverer opens and closes the store. ``mode`` picks its job: ``"both"``
    (default) accepts and delivers; ``"submit"`` only accepts (a web process);
    ``"deliver"`` only delivers what is in the store (a worker process). Leaving
    the context stops intake, lets transactions in flight finish for up to
    ``config.shutdown_grace`` seconds, then cancels them; nothing accepted is lost.

    ``telemetry`` turns on OpenTelemetry spans and metrics per delivery attempt:
    ``True`` for the global providers, or a :class:`Telemetry` with its own (it
    needs the ``otel`` extra). :meth:`statistics` works without it.

    Where mail goes is ``config.transport``, else the ``MAILSTROM_TRANSPORT``
    environment variable as it is when the Deliverer starts, else ``"smtp"``
    (the relay or MX delivery that ``config`` describes); ``"console"``,
    ``"outbox"`` and ``"null"`` send nothing (see :class:`Config`). A
    *transport* object replaces all of these (no DNS, no TLS set-up):
    ``mailstrom_async.testing.Outbox`` is one, for tests.

    Raises:
        ConfigError: ``mode`` is not one of the three, or ``telemetry`` is asked
            for and the OpenTelemetry API is not installed; on entering,
            ``MAILSTROM_TRANSPORT`` names no transport.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: Store | None = None,
        mode: DelivererMode = "both",
        clock: Callable[[], datetime] = _utcnow,
        rng: random.Random | None = None,
        telemetry: Telemetry | bool = False,
        transport: Transport | None = None,
    ) -> None:
        if mode not in _MODES:
            msg = f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}"
            raise ConfigError(msg, "mode")
        self._config = config = config if config is not None else Config()
        self._store: Store = (
            store if store is not None else SQLiteStore(DEFAULT_STORE_PATH)
        )
        self._mode = mode
        self._clock = clock
        self._rng = rng or random.Random()
        # Who holds this Deliverer's leases: host, boot, process and start time,
        # so that a restarted process can tell a dead owner's leases at once.
        self._worker_id = str(current_owner())
        self._broker = EventBroker()
        # In a submit-only Deliverer on a store that tells of changes: events
        # for what the workers do.
        self._remote: RemoteEvents | None = None
        self._state: Literal["new", "opening", "open", "closing", "closed"] = "new"
        self._feeders = anyio.CancelScope()
        self._cm: AbstractAsyncContextManager[Self] | None = None
        self._watchers = Watchers(retry_interval=config.poll_interval)
        self._transport = transport
        # Resolved on entering: the config, else MAILSTROM_TRANSPORT, else smtp.
        self._transport_name: TransportName = "smtp"
        self._transport_source = "default"
        self._transport_overridden: str | None = None
        # Off by default (None: the engine never calls into OpenTelemetry);
        # True uses the global OpenTelemetry providers.
        self._telemetry: Telemetry | None = None
        if isinstance(telemetry, Telemetry):
            self._telemetry = telemetry
        elif telemetry:
            self._telemetry = Telemetry()
        self._keeper = LeaseKeeper(
            store=self._store,
            owner=self._worker_id,
            clock=clock,
            lease_duration=config.lease_duration,
        )
        self._dispatcher = Dispatcher(
            config=config,
            store=self._store,
            worker_id=self._worker_id,
            clock=clock,
            keeper=self._keeper,
        )
        self._operations = QueueOperations(
            store=self._store,
            mode=mode,
            clock=clock,
            broker=self._broker,
            keeper=self._keeper,
            dispatcher=self._dispatcher,
            watchers=self._watchers,
        )
        self._intake = Intake(
            store=self._store,
            mode=mode,
            worker_id=self._worker_id,
            clock=clock,
            broker=self._broker,
            keeper=self._keeper,
            dispatcher=self._dispatcher,
        )

    # -- lifecycle -----------------------------------------------------------

    @property
    def config(self) -> Config:
        """The configuration this Deliverer runs with."""
        return self._config

    @property
    def store(self) -> Store:
        """The store this Deliverer keeps its queue in."""
        return self._store

    @property
    def is_closed(self) -> bool:
        """True once the Deliverer has been closed (it cannot be reopened)."""
        return self._state == "closed"

    async def __aenter__(self) -> Self:
        if self._state != "new":
            msg = "a Deliverer can be entered only once; create a new one"
            raise DelivererClosedError(msg)
        self._cm = self._run()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._cm is None:
            msg = "this Deliverer was never entered"
            raise DelivererClosedError(msg)
        return await self._cm.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[Self]:
        self._state = "opening"
        body_error: BaseException | None = None
        try:
            if self._transport is None:
                # The environment as it is now, not when the Deliverer was made.
                (
                    self._transport_name,
                    self._transport_source,
                    self._transport_overridden,
                ) = resolve_transport(self._config, os.environ)
            await self._store.open()
            if self._mode != "submit":
                await self._prepare_route()
                # A process of this host that died left its leases: take them
                # back now, not a lease later.
                await self._keeper.reclaim_dead()
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    self._watchers.poll,
                    self._store.statuses,
                    self._config.poll_interval,
                    name="mailstrom handle poll",
                )
                if isinstance(self._store, ChangeWatchingStore):
                    if self._mode == "submit":
                        self._remote = RemoteEvents(
                            self._broker, self._store.statuses, self._clock
                        )
                        tg.start_soon(self._remote.run, name="mailstrom remote events")
                    await tg.start(
                        self._watch_changes, self._store, name="mailstrom changes"
                    )
                if self._mode != "submit":
                    tg.start_soon(self._run_feeders, tg, name="mailstrom feeders")
                self._state = "open"
                self._log_start()
                try:
                    yield self
                except BaseException as exc:
                    # Re-raised below, outside the task group, so that an error
                    # in the caller's block is not wrapped in an ExceptionGroup.
                    body_error = exc
                finally:
                    self._state = "closing"
                    with anyio.CancelScope(shield=True):
                        await self._drain()
                    tg.cancel_scope.cancel()
            if body_error is not None:
                raise body_error
        finally:
            self._state = "closed"
            self._broker.close()
            self._watchers.close()
            with anyio.CancelScope(shield=True):
                if self._dispatcher.route is not None:
                    await self._dispatcher.route.aclose()
                await self._store.aclose()
            logger.info("deliverer stopped", extra={"worker": self._worker_id})

    def _log_start(self) -> None:
        """The start line, saying where mail goes: through which relay, to a
        transport, or direct to the recipients' MX hosts, which is at WARNING so
        that a forgotten relay setting is noticed before mail leaves."""
        extra: dict[str, object] = {"worker": self._worker_id, "mode": self._mode}
        level = logging.INFO
        relay = self._config.relay
        if self._mode == "submit":
            where = "submit only, another process delivers"
            extra["delivery"] = None
        elif self._transport is not None:
            where = f"mail goes to the transport {type(self._transport).__name__}"
            extra["delivery"] = "transport"
        elif self._transport_name != "smtp":
            source = self._transport_source
            setting = (
                f"transport={self._transport_name!r} in the configuration"
                if source == "config"
                else f"{source}={self._transport_name}"
            )
            where = f"{setting}: {_NOT_SENT[self._transport_name]}, nothing is sent"
            extra.update(delivery=self._transport_name, transport_source=source)
            # So that nobody ships "null" (or "console") by accident.
            level = logging.WARNING
        elif relay is not None:
            host = f"[{relay.host}]" if ":" in relay.host else relay.host
            where = f"mail goes through the relay {host}:{relay.port}"
            extra.update(delivery="relay", relay_host=relay.host, relay_port=relay.port)
        else:
            where = "no relay configured: mail goes direct to recipients' MX hosts"
            extra["delivery"] = "mx"
            level = logging.WARNING
        logger.log(level, "deliverer started; %s", where, extra=extra)
        overridden = self._transport_overridden
        if overridden is not None and self._mode != "submit":
            # Someone meant this process to send nothing (or to print) and the
            # code says otherwise: say so before mail leaves.
            logger.warning(
                "%s=%r is ignored: the configuration says transport=%r",
                ENV_TRANSPORT,
                overridden,
                self._transport_name,
                extra={
                    "worker": self._worker_id,
                    "transport": self._transport_name,
                    "ignored": overridden,
                },
            )

    async def aclose(self) -> None:
        """Close the Deliverer, as leaving its ``async with`` block does."""
        if self._cm is not None and self._state in ("open", "closing"):
            await self.__aexit__(None, None, None)

    async def _prepare_route(self) -> None:
        config = self._config
        route: Transport
        if self._transport is not None:
            route = self._transport
        elif self._transport_name != "smtp":
            route = local_transport(self._transport_name)
        else:
            route = await network_route(config, self._rng)
        runner = JobRunner(
            config=config,
            store=self._store,
            broker=self._broker,
            worker_id=self._worker_id,
            clock=self._clock,
            rng=self._rng,
            route=route,
            on_recorded=self._watchers.changed,
            telemetry=self._telemetry,
            lease_end=self._keeper.lease_end,
        )
        lanes = Lanes(
            config=config,
            clock=self._clock,
            runner=runner,
            on_job_done=self._dispatcher.job_done,
        )
        self._dispatcher.attach(route, lanes)

    async def _run_feeders(self, workers: TaskGroup) -> None:
        dispatcher = self._dispatcher
        with self._feeders:
            async with anyio.create_task_group() as tg:
                tg.start_soon(dispatcher.scheduler.run, name="mailstrom scheduler")
                tg.start_soon(self._keeper.run, name="mailstrom leases")
                tg.start_soon(dispatcher.run, workers, name="mailstrom dispatcher")

    async def _watch_changes(
        self,
        store: ChangeWatchingStore,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Wake handles, followers and the scheduler when the store tells of
        another process's change; a feed that fails leaves the poll alone."""
        status = _Started(task_status)
        try:
            await store.watch_changes(self._on_store_change, task_status=status)
        except Exception as exc:  # contained: Config.poll_interval still applies
            logger.warning(
                "the store's change feed stopped; polling only",
                extra={"worker": self._worker_id, "error": repr(exc)},
            )
        status.started()  # if the store had not said so before it stopped

    def _on_store_change(self, change: StoreChange) -> None:
        if change.due and self._mode != "submit":
            self._dispatcher.scheduler.wake()
        if change.message_ids is None or change.message_ids:
            self._watchers.stale(change.message_ids)
            if self._remote is not None:
                self._remote.stale(change.message_ids)

    async def _drain(self) -> None:
        """Stop intake; give back queued jobs; let in-flight ones finish in time."""
        # The scheduler and dispatcher stop first, so nothing new is claimed; a
        # job a cancelled dispatcher was about to take stays in the ready queue.
        self._feeders.cancel()
        await self._dispatcher.drain()

    # -- intake --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            msg = (
                "Deliverer is closed; submit() and status() work only inside its "
                "'async with' block"
            )
            raise DelivererClosedError(msg)

    async def submit(
        self,
        message: Email | EmailMessage | bytes | PreparedMessage,
        *,
        mail_from: str | None = None,
        rcpt_to: list[str] | tuple[str, ...] | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> SubmitHandle:
        """Validate *message*, store it durably, and return a handle at once.

        The message is committed to the store before this returns; delivery happens
        in the background (never here). *message* is an :class:`Email`, a ready
        :class:`email.message.EmailMessage`, RFC 5322 bytes with an explicit
        envelope (*mail_from* and *rcpt_to*), or the result of :func:`prepare`
        (sent as it is). With an *idempotency_key* seen
        before, nothing is stored and the handle refers to the first message.

        *priority* orders delivery among mail that is due, like Unix ``nice``:
        lower values are claimed from the queue first (a password reset at
        -10 goes before a newsletter at 10), ties by due time, then in
        submission order; from :data:`~mailstrom_async.MIN_PRIORITY` to :data:`~mailstrom_async.MAX_PRIORITY`,
        0 by default. It never makes mail due earlier, nor changes its retries.

        Raises:
            InvalidMessageError: the message or an address is invalid (nothing
                was stored).
            ValueError: *priority* is not an integer in range (nothing was
                stored).
            DelivererClosedError: the Deliverer is not open.
            StoreError: the store could not commit the message.
        """
        self._check_open()
        check_priority(priority)
        prepared = await prepare_one(
            message, mail_from=mail_from, rcpt_to=rcpt_to, config=self._config
        )
        [handle] = await self._accept([prepared], [idempotency_key], [priority])
        return handle

    async def submit_many(
        self,
        messages: Iterable[Email | EmailMessage | PreparedMessage],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        priorities: Sequence[int] | None = None,
    ) -> list[SubmitHandle]:
        """Submit a batch: validated in full, then stored in ONE transaction.

        All or nothing: if any message is invalid, or the store fails, nothing
        is stored. Much faster than submitting one by one when a batch is at hand
        (one commit for all). Raw bytes need an envelope: pass them through
        :func:`prepare` first. *idempotency_keys*, if given, has one key (or
        None) per message; *priorities*, if given, one priority per message (as
        :meth:`submit` takes it; 0 for all when not given).

        Raises:
            InvalidMessageError: a message is invalid; its position in the batch
                is in the exception's notes. Nothing was stored.
            ValueError: *idempotency_keys* or *priorities* has not one entry per
                message, or a priority is out of range. Nothing was stored.
            DelivererClosedError: the Deliverer is not open.
            StoreError: the store could not commit the batch.
        """
        self._check_open()
        batch = list(messages)
        keys = list(idempotency_keys) if idempotency_keys is not None else None
        if keys is not None and len(keys) != len(batch):
            msg = f"got {len(keys)} idempotency keys for {len(batch)} messages"
            raise ValueError(msg)
        levels = list(priorities) if priorities is not None else [0] * len(batch)
        if len(levels) != len(batch):
            msg = f"got {len(levels)} priorities for {len(batch)} messages"
            raise ValueError(msg)
        for index, level in enumerate(levels):
            check_priority(level, f"priorities[{index}]")
        prepared = await prepare_batch(batch, config=self._config)
        return await self._accept(prepared, keys or [None] * len(prepared), levels)

    async def _accept(
        self,
        prepared: Sequence[PreparedMessage],
        keys: Sequence[str | None],
        priorities: Sequence[int],
    ) -> list[SubmitHandle]:
        results = await self._intake.accept(prepared, keys, priorities)
        return [SubmitHandle(self, i, created=created) for i, created in results]

    # -- status and events ---------------------------------------------------

    async def status(self, message_id: str) -> MessageStatus:
        """The current status of a message (of this run or an earlier one).

        Raises:
            UnknownMessageError: the store has no message with this id.
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return await self._store.status(message_id)

    async def history(self, message_id: str) -> tuple[AttemptRecord, ...]:
        """Every kept attempt of every recipient of a message (of this run or an
        earlier one, by any process sharing the store), oldest first: when it
        started, how long it took, the host and IP, TLS, the reply and the state
        after it. Each recipient keeps its first attempt and its latest ones,
        ``Limits.history_per_recipient`` in all. Works in every mode, since it
        reads the store.

        Raises:
            UnknownMessageError: the store has no message with this id.
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return tuple(await self._store.history(message_id))

    async def statistics(self) -> Statistics:
        """A snapshot of the queue (from the store) and of this Deliverer's work.

        Reads the store's summary (one query); everything else is counted as it
        happens, at no cost to delivery.

        Raises:
            DelivererClosedError: the Deliverer is not open.
            StoreError: the store could not be read.
        """
        self._check_open()
        summary = await self._store.summary()
        counts = summary.by_state
        lanes = self._dispatcher.lanes
        return Statistics(
            queued=counts.get(RecipientState.QUEUED, 0),
            deferred=counts.get(RecipientState.DEFERRED, 0),
            delivered=counts.get(RecipientState.DELIVERED, 0),
            failed=counts.get(RecipientState.FAILED, 0),
            in_flight=lanes.in_flight if lanes is not None else 0,
            jobs_in_memory=self._keeper.jobs,
            since_start=lanes.counters() if lanes is not None else AttemptCounters(),
            destinations=lanes.destinations() if lanes is not None else {},
            held=summary.held,
        )

    # -- queue operations ----------------------------------------------------

    async def retry_now(
        self, *, message_id: str | None = None, domain: str | None = None
    ) -> int:
        """Make waiting mail due now, like ``postqueue -f``; return how many
        recipients were made due.

        Without arguments every QUEUED or DEFERRED recipient waiting for a later
        attempt is due now; *message_id* and *domain* (case-insensitive) narrow
        that down. Recipients in flight are left alone. This Deliverer also
        forgets its backoff of the destinations concerned and looks at the store
        at once; a worker in another process picks the mail up at its next poll.

        Raises:
            UnknownMessageError: *message_id* is given and no such message exists.
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return await self._operations.retry_now(message_id=message_id, domain=domain)

    async def cancel(self, message_id: str) -> int:
        """Give up every unfinished recipient of a message; return how many.

        They become FAILED with the reason ``"cancelled by operator"`` and a
        "failed" event each; waiters on the message's handle wake up, and this
        Deliverer drops the message's jobs that wait for a connection. A
        recipient already in an SMTP transaction (here, or in a worker process
        that claimed it) may still be delivered: its status then says
        DELIVERED, because a server accepted it.

        Raises:
            UnknownMessageError: no such message.
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return await self._operations.cancel(message_id)

    async def leases(self) -> list[LeaseOwner]:
        """Who holds leases on unfinished recipients, and whether each owner's
        process still runs, as far as this host can tell.

        Raises:
            DelivererClosedError: the Deliverer is not open.
            StoreError: the store could not be read.
        """
        self._check_open()
        return await self._operations.leases()

    async def release_leases(self, owner: str | None = None) -> int:
        """Release the leases of a worker that is gone, so its mail is delivered
        now instead of when the leases run out; return how many recipients.

        Without *owner*, every owner on this host whose process is gone (what a
        starting Deliverer does by itself). With *owner*, that one; a live
        owner's leases are never broken, and neither are those of an owner this
        host cannot check (another host): they run out by themselves, at most
        ``Config.lease_duration`` after that worker stopped renewing them.

        Raises:
            LiveLeaseError: *owner* runs, or this host cannot tell that it is gone.
            DelivererClosedError: the Deliverer is not open.
            StoreError: the store failed.
        """
        self._check_open()
        return await self._operations.release_leases(owner)

    async def hold(
        self, *, message_id: str | None = None, domain: str | None = None
    ) -> int:
        """Hold waiting mail, like ``postsuper -h``: none of it is tried until
        :meth:`release`; return how many recipients were held.

        Holds the QUEUED and DEFERRED recipients of *message_id*, of *domain*
        (case-insensitive, in every message), or of both (that message's
        recipients of that domain). They keep their state and next attempt time
        and show ``held=True`` in :meth:`status`; :meth:`retry_now` skips them,
        :meth:`cancel` still fails them. Only mail waiting now is held: mail
        submitted later for the domain is not. Holding does not stop the retry
        lifetime, which counts from submission (as Postfix's queue lifetime
        does): nothing expires while held, as no attempt is made, but mail
        released after its lifetime is given up (FAILED 5.4.7) if its next
        attempt is deferred. No event is published: no state changes.

        Jobs of the held mail that this Deliverer claimed and that wait for a
        connection are given back unattempted. A recipient already in an SMTP
        transaction finishes it; if deferred, it stays held. A worker in another
        process delivers what it had claimed before the hold.

        Raises:
            ValueError: neither *message_id* nor *domain* is given (so that a
                slip cannot hold the whole queue).
            UnknownMessageError: *message_id* is given and no such message exists.
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return await self._operations.hold(message_id=message_id, domain=domain)

    async def release(
        self,
        *,
        message_id: str | None = None,
        domain: str | None = None,
        all: bool = False,
    ) -> int:
        """Release held mail, like ``postsuper -H``; return how many recipients
        were released.

        Releases the held recipients of *message_id*, of *domain*
        (case-insensitive), of both, or with ``all=True`` every held recipient.
        Each is due again at the next attempt time it had: at once if that has
        passed (it is then claimed before mail that came due later), else at
        that time. This Deliverer looks at the store at once; a worker in
        another process picks the mail up at its next poll.

        Raises:
            ValueError: no target is given, or ``all=True`` comes with one.
            UnknownMessageError: *message_id* is given and no such message exists.
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return await self._operations.release(
            message_id=message_id, domain=domain, all=all
        )

    def events(self) -> EventStream:
        """Follow every recipient state change from now on: ``async for e in ...``.

        Each subscriber gets every event; one that falls behind by more than its
        buffer loses the oldest and is told through ``DeliveryEvent.missed``.
        The stream ends when the Deliverer closes.

        The events are those of this process: its submissions, its deliveries
        and its operations. A submit-only Deliverer on a store that tells of
        other processes' changes (:class:`ChangeWatchingStore`: PostgreSQL's
        ``LISTEN/NOTIFY``) also gets the workers' changes to the messages it
        submitted, read when they are notified, with ``previous_state`` the
        state it last knew and ``at`` the time it learned of the change.
        """
        return self._broker.subscribe()

    def follow(self, message_id: str) -> StatusStream:
        """Follow one message: its status now, then each change, until it is done.

        ``async for status in deliverer.follow(message_id)`` gives the message's
        :class:`MessageStatus` as it stands, then a new one each time it changes,
        and ends after the first status that ``is_done`` (so a message already
        done gives one status). Changes that happen while the loop's body is busy
        come as one status, the latest; the final one is never skipped.

        It sees what every process does to the message, as it reads the store:
        changes made by this Deliverer (a delivery attempt, :meth:`cancel`) at
        once, and those of other processes (a worker, when this one runs with
        ``mode="submit"``; :meth:`hold` and :meth:`release`) within
        ``Config.poll_interval`` seconds, read by one query per interval while
        the message waits, or as soon as they commit with a store that tells
        of them (:class:`ChangeWatchingStore`: PostgreSQL's ``LISTEN/NOTIFY``). It also ends, with a status that is not done, when
        the Deliverer closes or :meth:`stop_following` is called.

        ``await deliverer.follow(message_id)`` (or ``async with``) reads the
        first status at once, so that an unknown id raises there, before, say,
        a response starts; iterating gives that status first.

        Raises:
            UnknownMessageError: no such message (when awaited, entered, or
                first iterated).
            DelivererClosedError: the Deliverer is not open.
        """
        self._check_open()
        return StatusStream(
            message_id,
            read=self._store.status,
            watchers=self._watchers,
            poll_interval=self._config.poll_interval,
        )

    def stop_following(self) -> None:
        """End every :meth:`follow` stream now, and later ones after their
        first status, without closing the Deliverer.

        For a server that shuts down: it waits for its open responses to end
        before it closes the Deliverer, and a response that follows a message
        waiting for a retry would not end by itself. aiohttp's
        ``app.on_shutdown`` is the place to call it; under uvicorn, see
        :meth:`stop_following_on`.
        """
        self._watchers.end_follows()

    def stop_following_on(self, *signals: int) -> AbstractContextManager[None]:
        """Within the ``with`` block, *signals* (default: SIGINT and SIGTERM)
        call :meth:`stop_following`, then go to the handler that was set before.

        A server such as uvicorn stops on these signals, but waits for open
        responses to end before it runs the application's shutdown::

            async with Deliverer(config) as deliverer:
                with deliverer.stop_following_on():
                    yield  # the lifespan: the server runs

        The server's own handler still gets the signal, and gets it back on
        leaving the block. Signal handlers can be set only in the main thread:
        in another thread this does nothing.
        """
        wanted = signals or (signal.SIGINT, signal.SIGTERM)
        return chain_signals(tuple(wanted), self.stop_following)

    async def _wait_done(self, message_id: str) -> MessageStatus:
        return await self._watchers.wait_done(message_id, self.status)


class _Started:
    """Passes a store's ``task_status.started()`` on once, however often it
    is called (a store that stops before saying it started is started too)."""

    def __init__(self, task_status: TaskStatus[None]) -> None:
        self._task_status = task_status
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._task_status.started(value)
