"""Watch a Deliverer at work: JSON logs, statistics(), OpenTelemetry spans and metrics.

Run it against any SMTP server that listens without TLS, for example the one in
Python's aiosmtpd package, with the OpenTelemetry SDK installed::

    pip install 'mailstrom-async[otel]' opentelemetry-sdk aiosmtpd
    python -m aiosmtpd -n -l 127.0.0.1:8025 &
    python observability.py 127.0.0.1 8025
"""

import asyncio
import json
import logging
import sys
from typing import TextIO

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    MemoryStore,
    RelayConfig,
    Statistics,
    Telemetry,
)

# The structured fields of mailstrom_async's delivery records (see the table).
FIELDS = (
    "message_id",
    "recipient_domain",
    "destination",
    "host",
    "ip",
    "code",
    "enhanced_code",
    "attempt",
    "state",
)


class JSONFormatter(logging.Formatter):
    """One JSON object per record: its message and the structured fields it has."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "logger": record.name,
            "level": record.levelname,
            "message": record.getMessage(),
        }
        data.update({f: getattr(record, f) for f in FIELDS if hasattr(record, f)})
        return json.dumps(data)


def setup_logging(stream: TextIO) -> logging.Handler:
    """Send every mailstrom_async record at INFO and above to *stream*, as JSON."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("mailstrom_async")  # the parent of all its loggers
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def make_telemetry(exporter: SpanExporter, reader: MetricReader) -> Telemetry:
    """Spans to *exporter*, metrics to *reader*, through providers of our own.

    An application that configures OpenTelemetry globally (set_tracer_provider,
    set_meter_provider) passes ``telemetry=True`` to the Deliverer instead.
    """
    tracer_provider = TracerProvider()
    # SimpleSpanProcessor exports each span at once; use BatchSpanProcessor with
    # a network exporter (OTLP) in production.
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])
    return Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)


async def main(relay_host: str, relay_port: int, telemetry: Telemetry) -> Statistics:
    config = Config(relay=RelayConfig(host=relay_host, port=relay_port, tls="none"))
    async with Deliverer(config, store=MemoryStore(), telemetry=telemetry) as d:
        for to in ("ada@example.org", "grace@example.net"):
            email = Email(sender="shop@example.com", to=[to], subject="Hi", text="Hi\n")
            await (await d.submit(email))  # wait until it is delivered or failed
        stats = await d.statistics()
    print(
        f"store: {stats.queued} queued, {stats.deferred} deferred, "
        f"{stats.delivered} delivered, {stats.failed} failed"
    )
    since = stats.since_start
    print(
        f"this process: {since.attempts} attempts, {since.delivered} delivered, "
        f"{since.deferred} deferred, {since.failed} failed"
    )
    for destination, lane in stats.destinations.items():
        print(f"{destination}: {lane.workers} workers, {lane.queued} jobs waiting")
    return stats


if __name__ == "__main__":
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8025
    setup_logging(sys.stderr)
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
    asyncio.run(main(host, port, make_telemetry(ConsoleSpanExporter(), reader)))
    reader.shutdown()  # exports the metrics one last time
