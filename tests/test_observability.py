"""Observability against real deliveries on loopback: logs, statistics(), telemetry."""

from __future__ import annotations

import ast
import base64
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

import mailstrom_async
from mailstrom_async import (
    AttemptCounters,
    Config,
    ConfigError,
    Deliverer,
    DelivererClosedError,
    DestinationStatistics,
    Email,
    EventStream,
    MemoryStore,
    MXConfig,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    SQLiteStore,
    Statistics,
    Telemetry,
    Timeouts,
)
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers, free_port

if TYPE_CHECKING:
    from tests.dns_server import DNSServer

TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)
# Deferred recipients stay deferred for the length of a test: counts stay exact.
SLOW_RETRY = RetryPolicy(initial_delay=3600, jitter=0, max_delay=3600)
PASSWORD = "pw-7f3a91c2e5-secret"
BODY_MARKER = "body-marker-5d0c6b1e88a4"

OK = "ok@example.com"
BUSY = "busy@example.org"
GONE = "gone@example.net"
FAULTS = {BUSY: "451 4.2.1 mailbox busy", GONE: "550 5.1.1 no such user here"}
STATES = (RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED)


def relay_config(
    server: SMTPDServer | None = None,
    *,
    port: int | None = None,
    username: str | None = None,
    password: str | None = None,
    shutdown_grace: float = 10.0,
) -> Config:
    """A relay on loopback: *server*'s, or *port* (where nothing may listen)."""
    if port is None:
        port = server.port if server is not None else 25
    relay = RelayConfig(
        host="127.0.0.1", port=port, tls="none", username=username, password=password
    )
    return Config(
        helo_name="client.test",
        relay=relay,
        retry=SLOW_RETRY,
        timeouts=TIMEOUTS,
        shutdown_grace=shutdown_grace,
    )


def email(*to: str, text: str = "Hello there.\n") -> Email:
    return Email(sender="sender@example.com", to=list(to), subject="hi", text=text)


async def outcomes(events: EventStream, count: int) -> None:
    """Wait until *count* attempt outcomes were published."""
    seen = 0
    async for event in events:
        if event.previous_state is not None:
            seen += 1
            if seen == count:
                return


# -- logging -----------------------------------------------------------------------


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of every mailstrom_async logger, at DEBUG."""
    with caplog.at_level(logging.DEBUG, logger="mailstrom_async"):
        yield caplog


def render(record: logging.LogRecord) -> str:
    """Everything a handler or formatter could show of *record*."""
    return f"{record.getMessage()}\n{record.__dict__!r}"


async def test_no_password_or_body_in_any_log_record(
    smtpd: SMTPDServers, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """Real deliveries with AUTH and every outcome log neither secret nor body."""
    handler = FaultHandler(credentials=("mailer", PASSWORD), rcpt_replies=FAULTS)
    server = await smtpd.start(handler, auth_require_tls=False)
    config = relay_config(server, username="mailer", password=PASSWORD)
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    async with Deliverer(config, store=store) as d:
        events = d.events()
        for _ in range(2):  # the second reuses the connection
            await d.submit(email(OK, BUSY, GONE, text=f"Secret {BODY_MARKER}.\n"))
            await outcomes(events, 3)
        await events.aclose()
    assert handler.logins == ["mailer"]
    assert all(BODY_MARKER.encode() in m.content for m in server.messages)
    plain = base64.b64encode(f"\0mailer\0{PASSWORD}".encode()).decode()
    secrets = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode(), plain]
    names = {r.name for r in logs.records}
    assert {"mailstrom_async.deliverer", "mailstrom_async.smtp"} <= names
    assert "mailstrom_async.store" in names
    for record in logs.records:
        if not record.name.startswith("mailstrom_async"):
            continue  # aiosmtpd's own
        text = render(record)
        for secret in secrets:
            assert secret not in text, record
        assert BODY_MARKER not in text, record


async def test_one_info_record_per_domain_and_outcome(
    smtpd: SMTPDServers, logs: pytest.LogCaptureFixture
) -> None:
    """Each recorded attempt logs its outcome per recipient domain, at INFO,
    with the documented fields and without any recipient address."""
    server = await smtpd.start(FaultHandler(rcpt_replies=FAULTS))
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        events = d.events()
        handle = await d.submit(email(OK, BUSY, GONE, "ok2@example.com"))
        await outcomes(events, 4)
        await events.aclose()
    records = [r for r in logs.records if r.name == "mailstrom_async.deliverer"]
    recorded = [r for r in records if r.getMessage().startswith("attempt recorded")]
    found = {
        (
            r.recipient_domain,  # type: ignore[attr-defined]
            r.state,  # type: ignore[attr-defined]
            r.code,  # type: ignore[attr-defined]
            r.enhanced_code,  # type: ignore[attr-defined]
            r.recipients,  # type: ignore[attr-defined]
        )
        for r in recorded
    }
    assert found == {
        ("example.com", "delivered", 250, "2.0.0", 2),
        ("example.org", "deferred", 451, "4.2.1", 1),
        ("example.net", "failed", 550, "5.1.1", 1),
    }
    assert len(recorded) == 3
    for r in recorded:
        assert r.levelno == logging.INFO
        assert r.message_id == handle.message_id  # type: ignore[attr-defined]
        assert r.destination == "relay"  # type: ignore[attr-defined]
        assert (r.host, r.ip) == ("127.0.0.1", "127.0.0.1")  # type: ignore[attr-defined]
        assert r.attempt == 1  # type: ignore[attr-defined]
    addresses = [OK, BUSY, GONE, "ok2@example.com"]
    for record in logs.records:
        if record.levelno >= logging.INFO:
            assert not any(a in render(record) for a in addresses), record
    # DEBUG, by design, names each recipient: one record per recipient outcome.
    debug = [r for r in records if r.getMessage() == "recipient outcome"]
    assert sorted(r.recipient for r in debug) == sorted(addresses)  # type: ignore[attr-defined]


async def test_failed_connection_logs_destination_and_host(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A refused connection is one INFO line, its outcome, with its destination,
    host and why; DEBUG adds the failed attempt's own record."""
    port = free_port()
    async with Deliverer(relay_config(port=port), store=MemoryStore()) as d:
        events = d.events()
        handle = await d.submit(email(OK))
        await outcomes(events, 1)
        await events.aclose()
    [failed] = [r for r in logs.records if r.getMessage() == "delivery attempt failed"]
    assert failed.levelno == logging.DEBUG
    assert failed.code is None  # type: ignore[attr-defined]
    delivery = [
        r
        for r in logs.records
        if r.levelno >= logging.INFO
        and getattr(r, "message_id", None) == handle.message_id
    ]
    [recorded] = delivery
    assert recorded.getMessage() == "attempt recorded: 1 recipient(s) deferred"
    assert recorded.levelno == logging.INFO
    assert recorded.state == "deferred"  # type: ignore[attr-defined]
    assert recorded.destination == "relay"  # type: ignore[attr-defined]
    assert recorded.host == "127.0.0.1"  # type: ignore[attr-defined]
    assert recorded.code is None  # type: ignore[attr-defined]  # local: no server reply
    assert recorded.error.startswith("ConnectError: ")  # type: ignore[attr-defined]
    assert str(port) in recorded.error  # type: ignore[attr-defined]


LOGGERS = {
    "mailstrom_async.deliverer",
    "mailstrom_async.smtp",
    "mailstrom_async.dns",
    "mailstrom_async.store",
    "mailstrom_async.cli",
}


def test_logger_names_are_the_documented_five() -> None:
    """Every logger of the package has one of the stable, documented names (the
    command configures the package's root logger, which nothing logs to)."""
    package = Path(mailstrom_async.__file__).parent
    used: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
            ):
                [arg] = node.args
                assert isinstance(arg, ast.Constant), f"{path}: getLogger({arg})"
                assert isinstance(arg.value, str), path
                used.add(arg.value)
    assert used - {"mailstrom_async"} == LOGGERS
    page = (package.parent / "docs" / "observability.md").read_text()
    assert set(re.findall(r"^\| `(mailstrom_async\.\w+)` \|", page, re.M)) == LOGGERS


async def test_direct_mx_delivery_is_observable(
    smtpd: SMTPDServers, dns_server: DNSServer, logs: pytest.LogCaptureFixture
) -> None:
    """Direct MX delivery: one lane per domain in logs, statistics and spans; the
    DNS logger has its say; no body and no recipient address at INFO."""
    port = free_port("127.0.0.2")
    await smtpd.start(host="127.0.0.2", port=port)  # nothing on 127.0.0.3
    zone = dns_server.zone
    for domain, host, ip in (
        ("a.test", "mx1.a.test", "127.0.0.2"),
        ("b.test", "mx1.b.test", "127.0.0.3"),
    ):
        zone.add_mx(domain, 10, host)
        zone.add_a(host, ip)
    mx = MXConfig(nameservers=[dns_server.nameserver], port=port, allow_local=True)
    config = Config(
        helo_name="client.test", relay=None, mx=mx, retry=SLOW_RETRY, timeouts=TIMEOUTS
    )
    otel = Otel()
    async with Deliverer(config, store=MemoryStore(), telemetry=otel.telemetry) as d:
        events = d.events()
        to = ("x@a.test", "y@b.test")
        handle = await d.submit(email(*to, text=f"Hi {BODY_MARKER}\n"))
        await outcomes(events, 2)
        await events.aclose()
        await anyio.wait_all_tasks_blocked()
        stats = await d.statistics()
    assert (stats.delivered, stats.deferred) == (1, 1)
    assert stats.since_start == AttemptCounters(attempts=2, delivered=1, deferred=1)
    assert set(stats.destinations) == {"a.test", "b.test"}
    assert stats.destinations["a.test"].consecutive_failures == 0
    assert stats.destinations["b.test"].consecutive_failures == 1
    recorded = {
        r.recipient_domain: r  # type: ignore[attr-defined]
        for r in logs.records
        if r.getMessage().startswith("attempt recorded")
    }
    assert set(recorded) == {"a.test", "b.test"}
    for domain, host, ip, state in (
        ("a.test", "mx1.a.test", "127.0.0.2", "delivered"),
        ("b.test", "mx1.b.test", "127.0.0.3", "deferred"),
    ):
        r = recorded[domain]
        assert r.message_id == handle.message_id  # type: ignore[attr-defined]
        assert r.destination == domain  # type: ignore[attr-defined]
        assert (r.host, r.ip, r.state) == (host, ip, state)  # type: ignore[attr-defined]
    assert any(r.name == "mailstrom_async.dns" for r in logs.records)
    for record in logs.records:
        text = render(record)
        assert BODY_MARKER not in text, record
        if record.levelno >= logging.INFO:
            assert not any(a in text for a in to), record
    spans = {s.attributes["mailstrom.destination"]: s for s in otel.finished()}  # type: ignore[index]
    assert set(spans) == {"a.test", "b.test"}
    a, b = spans["a.test"].attributes, spans["b.test"].attributes
    assert a is not None
    assert b is not None
    assert (a["server.address"], a["network.peer.address"]) == (
        "mx1.a.test",
        "127.0.0.2",
    )
    assert (a["mailstrom.outcome"], b["mailstrom.outcome"]) == ("delivered", "deferred")
    # Refused: no server reply, so no code; the engine's own 4.4.1, marked local.
    assert "mailstrom.smtp.code" not in b
    assert (b["mailstrom.local"], b["mailstrom.smtp.enhanced_code"]) == (True, "4.4.1")
    assert spans["b.test"].status.status_code is StatusCode.ERROR
    otel.tracer_provider.shutdown()
    otel.meter_provider.shutdown()


# -- statistics ----------------------------------------------------------------------


async def test_statistics_count_real_deliveries(smtpd: SMTPDServers) -> None:
    """statistics() reports the store's counts, what is in flight, and counters."""
    handler = FaultHandler(rcpt_replies=FAULTS, stall_at="MAIL")
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        empty = await d.statistics()
        assert empty == Statistics(
            queued=0,
            deferred=0,
            delivered=0,
            failed=0,
            in_flight=0,
            jobs_in_memory=0,
            since_start=AttemptCounters(),
            destinations={},
        )
        events = d.events()
        await d.submit(email(OK, BUSY, GONE))
        await handler.stalled.wait()  # the attempt is under way, stuck at MAIL
        busy = await d.statistics()
        assert (busy.queued, busy.in_flight, busy.jobs_in_memory) == (3, 1, 1)
        assert busy.since_start == AttemptCounters()
        assert busy.destinations == {
            "relay": DestinationStatistics(
                workers=1,
                idle_workers=0,
                queued=0,
                consecutive_failures=0,
                backoff_until=None,
            )
        }
        handler.stall_at = None
        handler.release.set()
        await outcomes(events, 3)
        await d.submit(email(OK, "two@example.com"))
        await outcomes(events, 2)
        await events.aclose()
        await anyio.wait_all_tasks_blocked()  # the worker has gone back to idle
        done = await d.statistics()
    assert (done.queued, done.deferred, done.delivered, done.failed) == (0, 1, 3, 1)
    assert (done.in_flight, done.jobs_in_memory) == (0, 0)
    assert done.since_start == AttemptCounters(
        attempts=2, delivered=3, deferred=1, failed=1
    )
    lane = done.destinations["relay"]
    assert (lane.workers, lane.idle_workers, lane.queued) == (1, 1, 0)


async def test_statistics_show_a_backed_off_destination(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A destination that cannot be reached is backed off, and statistics say so;
    a job postponed by the backoff is not an attempt."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    backoff_until = now + timedelta(seconds=SLOW_RETRY.initial_delay)
    config = relay_config(port=free_port())
    async with Deliverer(config, store=MemoryStore(), clock=lambda: now) as d:
        events = d.events()
        await d.submit(email(OK, "two@example.com"))
        await outcomes(events, 2)
        await events.aclose()
        await anyio.wait_all_tasks_blocked()
        stats = await d.statistics()
        later = await d.submit(email("three@example.com"))
        await anyio.wait_all_tasks_blocked()  # postponed at once, by the backoff
        postponed = await d.statistics()
    assert (stats.queued, stats.deferred, stats.delivered, stats.failed) == (0, 2, 0, 0)
    assert stats.since_start == AttemptCounters(attempts=1, deferred=2)
    assert stats.destinations["relay"] == DestinationStatistics(
        workers=1,
        idle_workers=1,
        queued=0,
        consecutive_failures=1,
        backoff_until=backoff_until,
    )
    assert (postponed.queued, postponed.deferred) == (1, 2)
    assert postponed.since_start == stats.since_start
    assert postponed.destinations == stats.destinations
    [record] = [r for r in logs.records if r.getMessage().startswith("destination b")]
    assert record.levelno == logging.DEBUG
    assert record.message_id == later.message_id  # type: ignore[attr-defined]
    assert record.destination == "relay"  # type: ignore[attr-defined]
    assert record.backoff_until == backoff_until.isoformat()  # type: ignore[attr-defined]


async def test_statistics_of_a_submit_only_deliverer(tmp_path: Path) -> None:
    """A submit-only Deliverer reports the store's counts and no work of its own."""
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    async with Deliverer(relay_config(), store=store, mode="submit") as d:
        await d.submit(email(OK, BUSY))
        stats = await d.statistics()
    assert (stats.queued, stats.in_flight, stats.jobs_in_memory) == (2, 0, 0)
    assert stats.since_start == AttemptCounters()
    assert stats.destinations == {}


async def test_statistics_needs_an_open_deliverer() -> None:
    """statistics() outside the 'async with' block is a clear error."""
    d = Deliverer(relay_config(), store=MemoryStore())
    with pytest.raises(DelivererClosedError, match="async with"):
        await d.statistics()


# -- OpenTelemetry -------------------------------------------------------------------


class Otel:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.spans.get_finished_spans()

    def points(self, name: str) -> dict[str, object]:
        """Data points of metric *name*, by the value of their one attribute."""
        data = self.reader.get_metrics_data()
        assert isinstance(data, MetricsData)
        found: dict[str, object] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "mailstrom_async"
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            [value] = point.attributes.values()  # type: ignore[union-attr]
                            found[str(value)] = point
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


async def test_one_span_and_metrics_per_attempt(
    smtpd: SMTPDServers, otel: Otel
) -> None:
    """Each attempt is a span with its outcome; metrics count recipients and time."""
    server = await smtpd.start(FaultHandler(rcpt_replies=FAULTS))
    async with Deliverer(
        relay_config(server), store=MemoryStore(), telemetry=otel.telemetry
    ) as d:
        events = d.events()
        mixed = await d.submit(email(OK, BUSY, GONE))
        await outcomes(events, 3)
        clean = await d.submit(email(OK))
        await outcomes(events, 1)
        await events.aclose()
    first, second = otel.finished()
    for span, handle in ((first, mixed), (second, clean)):
        assert span.name == "mailstrom.attempt"
        assert span.kind is SpanKind.CLIENT
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "mailstrom_async"
        assert span.attributes is not None
        assert span.attributes["mailstrom.message_id"] == handle.message_id
        assert span.attributes["mailstrom.destination"] == "relay"
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["network.peer.address"] == "127.0.0.1"
    assert first.attributes is not None
    assert second.attributes is not None
    assert dict(first.attributes) == {
        "mailstrom.message_id": mixed.message_id,
        "mailstrom.destination": "relay",
        "mailstrom.recipients": 3,
        "mailstrom.delivered": 1,
        "mailstrom.deferred": 1,
        "mailstrom.failed": 1,
        "mailstrom.smtp.code": 550,
        "mailstrom.smtp.enhanced_code": "5.1.1",
        "mailstrom.outcome": "mixed",
        "server.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1",
    }
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == (
        "not delivered: 1 deferred, 1 failed, highest reply code 550"
    )
    assert second.attributes["mailstrom.outcome"] == "delivered"
    assert second.attributes["mailstrom.smtp.code"] == 250
    assert second.attributes["mailstrom.delivered"] == 1
    assert second.status.status_code is StatusCode.UNSET
    recipients = otel.points("mailstrom.recipients")
    assert {k: p.value for k, p in recipients.items()} == {  # type: ignore[attr-defined]
        "delivered": 2,
        "deferred": 1,
        "failed": 1,
    }
    durations = otel.points("mailstrom.attempt.duration")
    assert {k: p.count for k, p in durations.items()} == {  # type: ignore[attr-defined]
        "mixed": 1,
        "delivered": 1,
    }
    for point in durations.values():
        assert point.sum > 0  # type: ignore[attr-defined]


async def test_attempt_spans_are_roots(smtpd: SMTPDServers, otel: Otel) -> None:
    """A Deliverer entered inside a span does not make its attempts children of it."""
    server = await smtpd.start()
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("app startup"):
        async with Deliverer(
            relay_config(server), store=MemoryStore(), telemetry=otel.telemetry
        ) as d:
            await (await d.submit(email(OK)))
    attempt, startup = otel.finished()
    assert (attempt.name, startup.name) == ("mailstrom.attempt", "app startup")
    assert attempt.parent is None
    assert attempt.context is not None
    assert startup.context is not None
    assert attempt.context.trace_id != startup.context.trace_id


async def test_an_interrupted_attempt_ends_its_span_with_an_error(
    smtpd: SMTPDServers, otel: Otel
) -> None:
    """An attempt cancelled at shutdown ends its span with ERROR and error.type."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    config = relay_config(server, shutdown_grace=0.0)
    async with Deliverer(config, store=MemoryStore(), telemetry=otel.telemetry) as d:
        await d.submit(email(OK))
        await handler.stalled.wait()
    [span] = otel.finished()
    assert span.attributes is not None
    assert span.attributes["mailstrom.outcome"] == "interrupted"
    assert span.attributes["error.type"] == "CancelledError"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "attempt interrupted: CancelledError"
    assert otel.points("mailstrom.recipients") == {}
    assert set(otel.points("mailstrom.attempt.duration")) == {"interrupted"}


async def test_telemetry_true_uses_the_global_providers(smtpd: SMTPDServers) -> None:
    """telemetry=True works with whatever global providers exist (here: none)."""
    server = await smtpd.start()
    config = relay_config(server)
    async with Deliverer(config, store=MemoryStore(), telemetry=True) as d:
        status = await (await d.submit(email(OK)))
    assert status.is_delivered


async def test_telemetry_without_opentelemetry_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking for telemetry without the OpenTelemetry API says what to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigError, match=r"mailstrom-async\[otel\]"):
        Deliverer(relay_config(), store=MemoryStore(), telemetry=True)
    with pytest.raises(ConfigError, match="OpenTelemetry API"):
        Telemetry()
    # Off (the default) never imports OpenTelemetry.
    Deliverer(relay_config(), store=MemoryStore())
