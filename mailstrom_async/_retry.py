"""When to try a deferred recipient again, and when to give up.

Pure and synchronous: the caller passes the clock reading and the random source.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from mailstrom_async._config import RetryPolicy

__all__ = ["RetryDecision", "backoff_delay", "decide_retry"]


def backoff_delay(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    """The wait, in seconds, after the *attempts*-th failed attempt (1-based).

    ``min(max_delay, initial_delay * factor ** (attempts - 1))``, then spread by
    ± ``jitter`` so that many recipients deferred together do not retry together.
    The jittered value never exceeds ``max_delay`` and is never negative.
    """
    n = max(attempts, 1)
    try:
        base = policy.initial_delay * policy.factor ** (n - 1)
    except OverflowError:  # factor ** (n - 1) is too big for a float
        base = policy.max_delay if policy.initial_delay else 0.0
    base = min(policy.max_delay, base)
    if policy.jitter:
        base *= 1 + rng.uniform(-policy.jitter, policy.jitter)
    return max(0.0, min(policy.max_delay, base))


@attrs.frozen
class RetryDecision:
    """Either retry at ``next_attempt_at``, or give up (``next_attempt_at is None``)."""

    next_attempt_at: datetime | None
    reason: str = ""

    @property
    def give_up(self) -> bool:
        """True when the recipient must now be FAILED (5.4.7)."""
        return self.next_attempt_at is None


def decide_retry(
    policy: RetryPolicy,
    *,
    attempts: int,
    queued_at: datetime,
    now: datetime,
    rng: random.Random,
    not_before: datetime | None = None,
) -> RetryDecision:
    """Decide what happens to a recipient that has just been deferred.

    *attempts* counts the attempt that just failed. The recipient is given up when
    the attempt budget is spent, or when the next attempt would fall after the end
    of its lifetime (``queued_at + lifetime``): a last attempt is scheduled right at
    the end of the lifetime rather than giving up early. *not_before* (e.g. a
    destination backoff) pushes the next attempt later, never earlier.
    """
    if policy.max_attempts is not None and attempts >= policy.max_attempts:
        return RetryDecision(None, f"gave up after {attempts} attempts")
    expires_at = queued_at + timedelta(seconds=policy.lifetime)
    if now >= expires_at:
        return RetryDecision(None, "gave up: retry lifetime ended")
    at = now + timedelta(seconds=backoff_delay(policy, attempts, rng))
    if not_before is not None and not_before > at:
        at = not_before
    return RetryDecision(min(at, expires_at))
