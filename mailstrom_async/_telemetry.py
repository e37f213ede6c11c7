"""Optional OpenTelemetry spans and metrics, one span per delivery attempt.

The only OpenTelemetry importer, and it imports the API lazily: the package works
without it, and a Deliverer without telemetry never calls in here (the engine
checks for ``None``, so the hot path costs nothing when telemetry is off).

The engine calls one small interface: :meth:`Telemetry.start_attempt` when an
attempt begins, then :meth:`AttemptTelemetry.finish` with the statuses it recorded
or :meth:`AttemptTelemetry.abort` when it was cut short.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mailstrom_async._exceptions import ConfigError
from mailstrom_async._models import RecipientState

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

    from mailstrom_async._models import RecipientStatus

__all__ = ["AttemptTelemetry", "Telemetry"]

#: The instrumentation scope of every span and instrument.
SCOPE = "mailstrom_async"
SPAN_NAME = "mailstrom.attempt"
RECIPIENTS_COUNTER = "mailstrom.recipients"
DURATION_HISTOGRAM = "mailstrom.attempt.duration"

_STATES = (RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED)


class Telemetry:
    """OpenTelemetry spans and metrics for delivery attempts.

    Pass ``Deliverer(..., telemetry=Telemetry())`` (or ``telemetry=True``) to turn
    it on. Without providers it uses the global ones that the application
    configured with the OpenTelemetry SDK (a no-op until it does). Each delivery
    attempt (one message at one destination) gets a ``mailstrom.attempt`` span;
    the ``mailstrom.recipients`` counter counts recipients by the state an attempt
    left them in, and the ``mailstrom.attempt.duration`` histogram times attempts
    (seconds). See the observability page for every attribute.

    Raises:
        ConfigError: the OpenTelemetry API is not installed (install the
            ``otel`` extra: ``pip install 'mailstrom-async[otel]'``).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        try:
            from opentelemetry import metrics, trace
            from opentelemetry.context import Context
        except ImportError as exc:
            msg = (
                "telemetry needs the OpenTelemetry API; install the 'otel' extra: "
                "pip install 'mailstrom-async[otel]'"
            )
            raise ConfigError(msg, "telemetry") from exc
        self._trace = trace
        self._root = Context()
        self._tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        self._recipients = meter.create_counter(
            RECIPIENTS_COUNTER,
            unit="{recipient}",
            description="Recipients by the state a delivery attempt left them in.",
        )
        self._duration = meter.create_histogram(
            DURATION_HISTOGRAM,
            unit="s",
            description="Duration of delivery attempts, connection included.",
        )

    def __repr__(self) -> str:
        return "<Telemetry>"

    def start_attempt(
        self, *, message_id: str, destination: str, recipients: int
    ) -> AttemptTelemetry:
        """Start the span of one attempt to deliver *recipients* recipients."""
        # A root span: workers run in the context the Deliverer was entered in,
        # and an attempt is not part of whatever span was current then.
        span = self._tracer.start_span(
            SPAN_NAME,
            context=self._root,
            kind=self._trace.SpanKind.CLIENT,
            attributes={
                "mailstrom.message_id": message_id,
                "mailstrom.destination": destination,
                "mailstrom.recipients": recipients,
            },
        )
        return AttemptTelemetry(self, span)


class AttemptTelemetry:
    """The span and timer of one attempt in progress."""

    __slots__ = ("_owner", "_span", "_started")

    def __init__(self, owner: Telemetry, span: Span) -> None:
        self._owner = owner
        self._span = span
        self._started = time.perf_counter()

    def finish(self, statuses: Sequence[RecipientStatus]) -> None:
        """End the attempt with the statuses it recorded.

        The span's status is ERROR when a recipient was not delivered (deferred or
        failed), as an HTTP client span is for a 4xx or 5xx reply.
        """
        owner, span = self._owner, self._span
        counts = dict.fromkeys(_STATES, 0)
        worst: RecipientStatus | None = None
        where: RecipientStatus | None = None
        for status in statuses:
            counts[status.state] = counts.get(status.state, 0) + 1
            if status.code is not None and (
                worst is None or status.code > (worst.code or 0)
            ):
                worst = status
            if where is None and status.host is not None:
                where = status
        for state in _STATES:
            span.set_attribute(f"mailstrom.{state.value}", counts[state])
            if counts[state]:
                owner._recipients.add(counts[state], {"mailstrom.state": state.value})
        if where is not None and where.host is not None:
            span.set_attribute("server.address", where.host)
            if where.ip is not None:
                span.set_attribute("network.peer.address", where.ip)
        if worst is not None and worst.code is not None:
            span.set_attribute("mailstrom.smtp.code", worst.code)
            if worst.enhanced_code is not None:
                span.set_attribute("mailstrom.smtp.enhanced_code", worst.enhanced_code)
        else:  # no server reply: an outcome decided here, with no code to show
            local = next((s for s in statuses if s.is_local), None)
            if local is not None:
                span.set_attribute("mailstrom.local", True)
                if local.enhanced_code is not None:
                    span.set_attribute(
                        "mailstrom.smtp.enhanced_code", local.enhanced_code
                    )
        present = [s for s in _STATES if counts[s]]
        outcome = present[0].value if len(present) == 1 else "mixed"
        if counts[RecipientState.DEFERRED] or counts[RecipientState.FAILED]:
            # Never the reply text: it may name a recipient.
            code = f", highest reply code {worst.code}" if worst else ""
            description = (
                f"not delivered: {counts[RecipientState.DEFERRED]} deferred, "
                f"{counts[RecipientState.FAILED]} failed{code}"
            )
            span.set_status(owner._trace.StatusCode.ERROR, description)
        self._end(outcome)

    def abort(self, error: BaseException) -> None:
        """End an attempt that was cut short (cancelled, crashed, not recorded)."""
        kind = type(error).__qualname__
        self._span.set_attribute("error.type", kind)
        self._span.set_status(
            self._owner._trace.StatusCode.ERROR, f"attempt interrupted: {kind}"
        )
        self._end("interrupted")

    def _end(self, outcome: str) -> None:
        self._span.set_attribute("mailstrom.outcome", outcome)
        self._span.end()
        self._owner._duration.record(
            time.perf_counter() - self._started, {"mailstrom.outcome": outcome}
        )
