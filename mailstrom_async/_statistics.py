"""What ``Deliverer.statistics()`` returns: a snapshot of the queue and the engine.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import attrs

__all__ = ["AttemptCounters", "DestinationStatistics", "Statistics"]


@attrs.frozen(kw_only=True)
class AttemptCounters:
    """What one Deliverer recorded since it started (this process only).

    ``attempts`` counts delivery attempts: one per try of a message at one
    destination, however many recipients (and transactions) it took. The other
    fields count recipients by the state that attempt left them in; a recipient
    given up on (past the retry lifetime) counts as ``failed``.
    """

    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0


@attrs.frozen(kw_only=True)
class DestinationStatistics:
    """One active destination lane (the relay, or one recipient domain)."""

    workers: int
    """Worker coroutines of the lane; each owns at most one SMTP connection."""
    idle_workers: int
    """Of those, how many wait for a job (their connection, if any, is idle)."""
    queued: int
    """Jobs claimed for this destination that wait for a worker."""
    consecutive_failures: int
    """Attempts in a row that failed to reach the destination (0 after a success)."""
    backoff_until: datetime | None
    """While the destination is backed off, new jobs for it wait until then."""


@attrs.frozen(kw_only=True)
class Statistics:
    """A snapshot of a Deliverer: the store's counts and this process's work.

    ``queued``, ``deferred``, ``delivered`` and ``failed`` count recipients in the
    store in each state (every process sharing the store included, and finished
    recipients until they are purged). The rest describes this Deliverer only.
    """

    queued: int
    deferred: int
    delivered: int
    failed: int
    in_flight: int
    """Jobs (a message at one destination) this Deliverer is delivering now."""
    jobs_in_memory: int
    """Jobs this Deliverer holds: in flight, or claimed and waiting for a worker
    (bounded by ``Limits.max_jobs_in_memory``)."""
    since_start: AttemptCounters
    """What this Deliverer recorded since it started."""
    destinations: Mapping[str, DestinationStatistics]
    """The active lanes by destination (a lane is reaped when it is idle)."""
    held: int = 0
    """Unfinished recipients in the store that an operator holds (counted in
    ``queued`` or ``deferred`` too)."""
