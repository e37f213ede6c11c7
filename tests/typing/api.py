"""Type-checked, never executed: pins the public types for mypy (stamina's idea).

Every function here is only ever read by mypy. ``assert_type`` fails the type check
when an inferred type drifts; a ``# type: ignore[code]`` line fails it (as an unused
ignore, under ``strict``) when something that must be rejected starts being accepted.
"""

from __future__ import annotations

import io
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import assert_type

import mailstrom_async as m
import mailstrom_async.testing as t


def config_types() -> None:
    config = m.Config.from_mapping({"relay": {"host": "smtp.example.com"}})
    assert_type(config, m.Config)
    assert_type(m.Config.from_toml("mailstrom.toml"), m.Config)
    assert_type(config.helo_name, str | None)
    assert_type(config.message_id_domain, str | None)
    assert_type(config.relay, m.RelayConfig | None)
    assert_type(config.mx, m.MXConfig)
    assert_type(config.retry, m.RetryPolicy)
    assert_type(config.timeouts, m.Timeouts)
    assert_type(config.limits, m.Limits)
    assert_type(config.shutdown_grace, float)
    assert_type(config.lease_duration, float)
    assert_type(config.poll_interval, float)

    config.helo_name = "x"  # type: ignore[misc]  # frozen


def relay_types() -> None:
    relay = m.RelayConfig(host="smtp.example.com", username="u", password="p")
    assert_type(relay.host, str)
    assert_type(relay.tls, m.RelayTLS)
    assert_type(relay.port, int)
    assert_type(relay.username, str | None)
    assert_type(relay.password, str | None)
    assert_type(relay.verify, bool)
    assert_type(relay.ca_file, str | None)
    m.Config(relay=relay)

    m.RelayConfig()  # type: ignore[call-arg]  # host is required
    m.RelayConfig("smtp.example.com")  # type: ignore[call-arg]  # keyword-only


def mx_types() -> None:
    mx = m.MXConfig(nameservers=["127.0.0.1:5353"], port=2525, tls="required")
    assert_type(mx.nameservers, tuple[str, ...])
    assert_type(mx.port, int)
    assert_type(mx.allow_local, bool)
    assert_type(mx.tls, m.MXTLSPolicy)
    assert_type(mx.max_addresses, int)


def retry_types() -> None:
    policy = m.RetryPolicy(initial_delay=1, max_attempts=3)
    assert_type(policy, m.RetryPolicy)
    assert_type(m.RetryPolicy.mailstrom_compatible(), m.RetryPolicy)
    assert_type(m.DEFAULT_RETRY_POLICY, m.RetryPolicy)
    assert_type(policy.initial_delay, float)
    assert_type(policy.factor, float)
    assert_type(policy.jitter, float)
    assert_type(policy.max_delay, float)
    assert_type(policy.lifetime, float)
    assert_type(policy.max_attempts, int | None)


def timeouts_types() -> None:
    timeouts = m.Timeouts(connect=5)
    assert_type(m.DEFAULT_TIMEOUTS, m.Timeouts)
    assert_type(timeouts.connect, float)
    assert_type(timeouts.command, float)
    assert_type(timeouts.data_start, float)
    assert_type(timeouts.data_end, float)
    assert_type(timeouts.dns, float)


def status_types(status: m.MessageStatus, at: datetime) -> None:
    assert_type(status.message_id, str)
    assert_type(status.recipients, tuple[m.RecipientStatus, ...])
    assert_type(status.submitted_at, datetime)
    assert_type(status.is_done, bool)
    assert_type(status.is_delivered, bool)
    assert_type(status.recipient("a@example.com"), m.RecipientStatus)
    assert_type(status.by_state(m.RecipientState.FAILED), tuple[m.RecipientStatus, ...])
    for recipient in status:
        assert_type(recipient, m.RecipientStatus)
        assert_type(recipient.state, m.RecipientState)
        assert_type(recipient.is_final, bool)
        assert_type(recipient.is_local, bool)
        assert_type(recipient.domain, str)
        assert_type(recipient.attempts, int)
        assert_type(recipient.code, int | None)
        assert_type(recipient.message, str | None)
        assert_type(recipient.raw_message, bytes | None)
        assert_type(recipient.message_bytes, bytes | None)
        assert_type(recipient.next_attempt_at, datetime | None)

    status.recipient(5)  # type: ignore[arg-type]


async def history_types(deliverer: m.Deliverer, store: m.Store) -> None:
    history = await deliverer.history("id@example.com")
    assert_type(history, tuple[m.AttemptRecord, ...])
    assert_type(await store.history("id@example.com"), list[m.AttemptRecord])
    for record in history:
        assert_type(record.address, str)
        assert_type(record.attempt, int)
        assert_type(record.started_at, datetime)
        assert_type(record.finished_at, datetime)
        assert_type(record.duration, float)
        assert_type(record.state, m.RecipientState)
        assert_type(record.code, int | None)
        assert_type(record.enhanced_code, str | None)
        assert_type(record.message, str | None)
        assert_type(record.raw_message, bytes | None)
        assert_type(record.message_bytes, bytes | None)
        assert_type(record.is_local, bool)
        assert_type(record.host, str | None)
        assert_type(record.ip, str | None)
        assert_type(record.tls, bool | None)
        assert_type(record.tls_verified, bool | None)
    assert_type(m.Limits().history_per_recipient, int)
    await store.record("id", [], worker="w", history=history, history_limit=5)
    await deliverer.history(5)  # type: ignore[arg-type]


async def priority_types(
    deliverer: m.Deliverer, store: m.Store, job: m.Job, mail: m.Email
) -> None:
    handle = await deliverer.submit(mail, priority=-10)
    assert_type(handle, m.SubmitHandle)
    await deliverer.submit(mail, idempotency_key="k", priority=m.MIN_PRIORITY)
    handles = await deliverer.submit_many([mail], priorities=[m.MAX_PRIORITY])
    assert_type(handles, list[m.SubmitHandle])
    await deliverer.submit_many([mail], idempotency_keys=["k"], priorities=(0,))
    assert_type(m.MIN_PRIORITY, int)
    assert_type(m.MAX_PRIORITY, int)
    assert_type(job.priority, int)
    new = m.NewMessage(
        message_id="id",
        mail_from="a@example.org",
        recipients=("b@example.org",),
        data=b"",
        submitted_at=datetime.now(UTC),
        priority=5,
    )
    assert_type(new.priority, int)
    await store.add(new)
    await deliverer.submit(mail, priority="high")  # type: ignore[arg-type]
    await deliverer.submit_many([mail], priorities=[1.5])  # type: ignore[list-item]


async def lease_types(store: m.Store, job: m.Job) -> None:
    assert_type(job.lease, str | None)
    lost = await store.record("id", [], worker="w", lease=job.lease)
    assert_type(lost, list[str])
    await store.release("id", ["a@example.org"], worker="w", lease="token")
    await store.add_many([], claim_for="w", lease_until=datetime.now(UTC), lease="t")
    await store.record("id", [], worker="w", lease=5)  # type: ignore[arg-type]


def event_types(event: m.DeliveryEvent) -> None:
    assert_type(event.message_id, str)
    assert_type(event.recipient, m.RecipientStatus)
    assert_type(event.previous_state, m.RecipientState | None)
    assert_type(event.at, datetime)
    assert_type(event.missed, int)
    assert_type(event.state, m.RecipientState)
    assert_type(event.address, str)
    assert_type(m.RecipientState.DEFERRED.is_final, bool)


def reply_types(reply: m.SMTPReply) -> None:
    assert_type(reply.code, int)
    assert_type(reply.text, str)
    assert_type(reply.enhanced_code, str | None)
    assert_type(reply.raw_text, bytes | None)
    assert_type(reply.local, bool)
    assert_type(reply.is_positive, bool)
    assert_type(reply.is_transient, bool)
    assert_type(reply.is_permanent, bool)


def exception_types() -> None:
    try:
        m.Config.from_mapping({})
    except m.ConfigError as exc:
        assert_type(exc.key, str | None)
    except m.InvalidAddressError as exc:
        assert_type(exc.address, str)
    except m.UnknownMessageError as exc:
        assert_type(exc.message_id, str)
    except m.DeliveryError as exc:
        assert_type(exc.reply, m.SMTPReply | None)
        assert_type(exc.host, str | None)
        assert_type(exc.default_enhanced_code, str)


def version_type() -> None:
    assert_type(m.__version__, str)


async def statistics_types(deliverer: m.Deliverer) -> None:
    stats = await deliverer.statistics()
    assert_type(stats, m.Statistics)
    assert_type(stats.queued, int)
    assert_type(stats.in_flight, int)
    assert_type(stats.jobs_in_memory, int)
    assert_type(stats.since_start, m.AttemptCounters)
    assert_type(stats.since_start.attempts, int)
    for destination, lane in stats.destinations.items():
        assert_type(destination, str)
        assert_type(lane, m.DestinationStatistics)
        assert_type(lane.backoff_until, datetime | None)
        assert_type(lane.consecutive_failures, int)
    stats.queued = 1  # type: ignore[misc]


def telemetry_types() -> None:
    m.Deliverer(telemetry=True)
    m.Deliverer(telemetry=m.Telemetry())
    m.Deliverer(telemetry="yes")  # type: ignore[arg-type]
    m.Telemetry(tracer_provider=None, meter_provider=None)
    m.Telemetry(tracer_provider=object())  # type: ignore[arg-type]


class _Dropped:
    """A user's connection that loses every message: it satisfies Connection."""

    host = "nowhere"
    ip: str | None = None
    tls = False
    tls_verified = False
    is_usable = True
    final_dot_unconfirmed = False

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
    ) -> list[m.RecipientOutcome]:
        reply = m.SMTPReply(code=250)
        return [
            m.RecipientOutcome(address=a, state=m.RecipientState.DELIVERED, reply=reply)
            for a in rcpt_to
        ]

    async def aclose(self) -> None: ...

    def close_now(self) -> None: ...


class _DropTransport:
    """A user's transport: it satisfies Transport."""

    fails_over = False

    def destination(self, address: str) -> str:
        return "nowhere"

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> _Dropped:
        return _Dropped()

    async def aclose(self) -> None: ...


async def transport_types(outbox: t.Outbox, server: t.CaptureServer) -> None:
    transport: m.Transport = outbox
    connection: m.Connection = await transport.connect("outbox")
    assert_type(
        await connection.send("a@x.test", ["b@x.test"], b"x"), list[m.RecipientOutcome]
    )
    m.Deliverer(m.Config(), transport=outbox)
    m.Deliverer(m.Config(), transport=_DropTransport())
    m.Deliverer(m.Config(), transport=server)  # type: ignore[arg-type]  # not a transport


async def testing_types(outbox: t.Outbox, server: t.CaptureServer) -> None:
    assert_type(outbox.messages, list[t.OutboxMessage])
    assert_type(await outbox.wait_for(2), list[t.OutboxMessage])
    assert_type(await server.wait_for(), list[t.OutboxMessage])
    message = outbox.messages[0]
    assert_type(message.message_id, str | None)
    assert_type(message.rcpt_to, tuple[str, ...])
    assert_type(message.data, bytes)
    assert_type(message.message, EmailMessage)
    assert_type(message.subject, str | None)
    assert_type(message.to, tuple[str, ...])
    assert_type(message.text, str | None)
    assert_type(server.relay_config(), m.Config)
    assert_type(t.FAST_RETRY, m.RetryPolicy)
    for scripted in (outbox, server):
        scripted.defer("a@x.test", code=450, times=None)
        scripted.fail("@x.test", times=2)
        scripted.disconnect()
        scripted.defer()  # type: ignore[call-arg]  # an address is required
        scripted.fail("a@x.test", 550)  # type: ignore[call-arg]  # keyword-only


def config_from_env_types() -> None:
    config = m.Config.from_env({"MAILSTROM_RELAY__HOST": "smtp.example.com"})
    assert_type(config, m.Config)
    m.Config.from_env({}, base={"helo_name": "a.example"})
    m.Config.from_env({}, {})  # type: ignore[call-arg]  # base is keyword-only


async def queue_operation_types(
    deliverer: m.Deliverer, store: m.Store, at: datetime
) -> None:
    assert_type(await deliverer.retry_now(), int)
    assert_type(await deliverer.retry_now(message_id="id", domain="example.org"), int)
    assert_type(await deliverer.cancel("id"), int)
    assert_type(await store.retry_now(now=at, domain="example.org"), int)
    assert_type(await store.cancel("id"), int)
    listed = await store.messages(states={m.RecipientState.DEFERRED}, limit=10)
    assert_type(listed, list[m.MessageStatus])
    m.SQLiteStore("q.sqlite3", busy_timeout=0.5)
    m.PostgresStore("postgresql://u@127.0.0.1/q", max_size=4, command_timeout=5.0)


async def store_url_types(sqlite: m.SQLiteStore, postgres: m.PostgresStore) -> None:
    assert_type(m.store_from_url("postgresql://u@127.0.0.1/q", max_size=4), m.Store)
    assert_type(m.store_from_url(Path("q.sqlite3"), busy_timeout=0.5), m.Store)
    m.store_from_url(b"q.sqlite3")  # type: ignore[arg-type]  # text, not bytes
    assert_type(await sqlite.schema_version(), int)
    assert_type(await postgres.schema_version(), int)
    assert_type(m.SQLiteStore.SCHEMA_VERSION, int)
    assert_type(m.PostgresStore.SCHEMA_VERSION, int)


async def hold_types(deliverer: m.Deliverer, store: m.Store) -> None:
    assert_type(await deliverer.hold(message_id="id"), int)
    assert_type(await deliverer.hold(domain="example.org"), int)
    assert_type(await deliverer.release(message_id="id", domain="example.org"), int)
    assert_type(await deliverer.release(all=True), int)
    await deliverer.hold("id")  # type: ignore[call-arg]  # keyword-only
    assert_type(await store.hold(domain="example.org"), int)
    assert_type(await store.unhold(all=True), int)
    held = await store.messages(held=True)
    assert_type(held[0].recipients[0].held, bool)
    summary = await store.summary()
    assert_type(summary.held, int)
    assert_type(summary.held_by_domain, dict[str, int])


async def follow_types(deliverer: m.Deliverer) -> None:
    stream = deliverer.follow("id@example.com")
    assert_type(stream, m.StatusStream)
    assert_type(await stream, m.StatusStream)
    assert_type(stream.message_id, str)
    async with deliverer.follow("id@example.com") as entered:
        assert_type(entered, m.StatusStream)
        async for status in entered:
            assert_type(status, m.MessageStatus)
    assert_type(await anext(stream), m.MessageStatus)
    await stream.aclose()
    deliverer.stop_following()
    with deliverer.stop_following_on():
        pass
    with deliverer.stop_following_on(signal.SIGTERM):
        pass
    deliverer.follow()  # type: ignore[call-arg]  # the id is required


async def named_transport_types() -> None:
    config = m.Config(transport="console")
    assert_type(config.transport, m.TransportName | None)
    m.Config(transport="stdout")  # type: ignore[arg-type]  # not a transport name
    name: m.TransportName = "null"
    m.Config(transport=name)
    console: m.Transport = m.ConsoleTransport()
    m.Deliverer(m.Config(), transport=m.ConsoleTransport(stream=io.StringIO()))
    m.Deliverer(m.Config(), transport=m.NullTransport())
    connection: m.Connection = await console.connect("console")
    assert_type(t.sent_messages(), list[t.OutboxMessage])
    assert_type(t.shared_outbox(), t.Outbox)
    assert_type(await t.shared_outbox().wait_for(), list[t.OutboxMessage])
    del connection


async def inspect_types(store: m.Store, at: datetime) -> None:
    assert_type(await store.message_data("id"), bytes)
    assert_type(await store.message_sizes(["id"]), dict[str, int])
    shape = await store.shape(now=at, bounds=[300.0, 600.0], held=False)
    assert_type(shape, m.QueueShape)
    assert_type(shape.by_domain, dict[str, tuple[int, ...]])
    assert_type(shape.total(), tuple[int, ...])
    assert_type(shape.bounds, tuple[float, ...])


async def change_types() -> None:
    store = m.PostgresStore("postgresql://u@127.0.0.1/q")
    watching: m.ChangeWatchingStore = store
    seen: list[m.StoreChange] = []
    await watching.watch_changes(seen.append)
    change = m.StoreChange(due=True, message_ids=frozenset({"id"}))
    assert_type(change.due, bool)
    assert_type(change.message_ids, frozenset[str] | None)
    m.StoreChange(message_ids={"id"})  # type: ignore[arg-type]  # a frozenset
    bad: m.ChangeWatchingStore = m.MemoryStore()  # type: ignore[assignment]
    del bad


async def batch_types(status: m.RecipientStatus, attempt: m.AttemptRecord) -> None:
    record = m.JobRecord(
        message_id="id", statuses=(status,), lease="token", history=(attempt,)
    )
    assert_type(record.statuses, tuple[m.RecipientStatus, ...])
    assert_type(record.lease, str | None)
    memory: m.BatchRecordingStore = m.MemoryStore()
    sqlite: m.BatchRecordingStore = m.SQLiteStore("q.db")
    postgres: m.BatchRecordingStore = m.PostgresStore("postgresql://u@127.0.0.1/q")
    for batching in (memory, sqlite, postgres):
        lost = await batching.record_many([record], worker="w", history_limit=5)
        assert_type(lost, list[list[str]])
    m.JobRecord(message_id="id", statuses=[status])  # type: ignore[arg-type]  # a tuple
