"""One destination's lane state, and the counts of what was recorded."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import attrs

from mailstrom_async._models import RecipientState, RecipientStatus
from mailstrom_async._retry import backoff_delay

if TYPE_CHECKING:
    from mailstrom_async._config import Config
    from mailstrom_async._store import Job

__all__ = ["Lane", "Tally"]


@attrs.define
class Lane:
    """One destination: its queue of jobs, its workers and its backoff."""

    key: str
    queue: asyncio.Queue[Job] = attrs.field(factory=asyncio.Queue)
    workers: int = 0
    idle: int = 0
    failures: int = 0
    backoff_until: datetime | None = None

    def is_backing_off(self, now: datetime) -> bool:
        """True while the destination waits out a failure."""
        return self.backoff_until is not None and now < self.backoff_until

    def succeeded(self) -> None:
        """A transaction got through: forget the failures."""
        self.failures = 0
        self.backoff_until = None

    def failed(self, config: Config, rng: random.Random, now: datetime) -> None:
        """A transient failure: back the whole destination off.

        RFC 1123 §5.3.1.1 / Exim: new mail for a dead host waits instead of
        reconnecting at once.
        """
        self.failures += 1
        delay = backoff_delay(config.retry, self.failures, rng)
        self.backoff_until = now + timedelta(seconds=delay)


@attrs.define
class Tally:
    """What this Deliverer recorded since it started: integer increments only."""

    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0

    def count(self, statuses: Sequence[RecipientStatus]) -> None:
        for new in statuses:
            if new.state is RecipientState.DELIVERED:
                self.delivered += 1
            elif new.state is RecipientState.DEFERRED:
                self.deferred += 1
            else:  # an attempt leaves no recipient QUEUED
                self.failed += 1
