"""Tests for mailstrom_async._retry: backoff delays and retry decisions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom_async import RetryPolicy
from mailstrom_async._retry import RetryDecision, backoff_delay, decide_retry

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NO_JITTER = RetryPolicy(jitter=0.0)


def _rng() -> random.Random:
    return random.Random(1234)


# backoff_delay


def test_backoff_grows_by_factor() -> None:
    """Without jitter, each delay is the previous one times factor."""
    policy = RetryPolicy(initial_delay=10, factor=3, jitter=0, max_delay=10_000)
    delays = [backoff_delay(policy, n, _rng()) for n in range(1, 6)]
    assert delays == [10.0, 30.0, 90.0, 270.0, 810.0]


def test_backoff_default_policy_schedule() -> None:
    """The default policy (without jitter) waits 5, 10, 20, 40 min, then 1 h."""
    delays = [backoff_delay(NO_JITTER, n, _rng()) for n in range(1, 7)]
    assert delays == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]


def test_backoff_caps_at_max_delay() -> None:
    """Delays never exceed max_delay."""
    policy = RetryPolicy(initial_delay=10, factor=2, jitter=0, max_delay=50)
    assert [backoff_delay(policy, n, _rng()) for n in range(1, 6)] == [
        10.0,
        20.0,
        40.0,
        50.0,
        50.0,
    ]


def test_backoff_initial_delay_above_max_is_capped() -> None:
    """An initial delay above max_delay is capped from the first retry."""
    policy = RetryPolicy(initial_delay=100, jitter=0, max_delay=30)
    assert backoff_delay(policy, 1, _rng()) == 30.0


@pytest.mark.parametrize("attempts", [0, -3])
def test_backoff_attempts_below_one_count_as_one(attempts: int) -> None:
    """Attempt numbers below 1 get the first delay."""
    assert backoff_delay(NO_JITTER, attempts, _rng()) == 300.0


@pytest.mark.parametrize("attempts", [2_000, 10**6, 10**12])
def test_backoff_factor_overflow_caps(attempts: int) -> None:
    """A factor power too big for a float gives max_delay instead of raising."""
    assert backoff_delay(NO_JITTER, attempts, _rng()) == NO_JITTER.max_delay


def test_backoff_zero_initial_delay_stays_zero_on_overflow() -> None:
    """A zero initial delay stays zero even when factor ** attempts overflows."""
    policy = RetryPolicy(initial_delay=0, jitter=0)
    assert backoff_delay(policy, 1, _rng()) == 0.0
    assert backoff_delay(policy, 10**6, _rng()) == 0.0


def test_backoff_factor_one_is_constant() -> None:
    """A factor of 1 gives the same delay every time, however many attempts."""
    policy = RetryPolicy(initial_delay=42, factor=1, jitter=0)
    assert {backoff_delay(policy, n, _rng()) for n in (1, 2, 50, 10**9)} == {42.0}


def test_backoff_jitter_within_bounds() -> None:
    """Jittered delays stay within ± jitter of the base delay, and vary."""
    policy = RetryPolicy(initial_delay=100, factor=2, jitter=0.25, max_delay=10_000)
    rng = random.Random(7)
    delays = [backoff_delay(policy, 3, rng) for _ in range(500)]
    assert all(300.0 <= d <= 500.0 for d in delays)
    assert len(set(delays)) > 100
    assert min(delays) < 330 < 470 < max(delays)  # both sides of the range are used


def test_backoff_jitter_never_exceeds_max_delay() -> None:
    """Jitter on a capped delay only ever shortens it, never goes over max_delay."""
    policy = RetryPolicy(initial_delay=100, jitter=0.5, max_delay=100)
    rng = random.Random(3)
    delays = [backoff_delay(policy, 5, rng) for _ in range(500)]
    assert all(50.0 <= d <= 100.0 for d in delays)
    assert max(delays) == 100.0  # the upper half is clamped to max_delay


def test_backoff_full_jitter_never_negative() -> None:
    """With jitter 1 the delay can reach 0 but never goes negative."""
    policy = RetryPolicy(initial_delay=10, jitter=1.0, max_delay=10)
    rng = random.Random(11)
    delays = [backoff_delay(policy, 1, rng) for _ in range(500)]
    assert all(0.0 <= d <= 10.0 for d in delays)


def test_backoff_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same jittered delays."""
    a = [backoff_delay(RetryPolicy(), n, random.Random(5)) for n in range(1, 6)]
    b = [backoff_delay(RetryPolicy(), n, random.Random(5)) for n in range(1, 6)]
    assert a == b


# decide_retry


def test_decide_schedules_after_backoff() -> None:
    """A deferred recipient is retried backoff_delay seconds from now."""
    d = decide_retry(NO_JITTER, attempts=2, queued_at=T0, now=T0, rng=_rng())
    assert d == RetryDecision(T0 + timedelta(seconds=600))
    assert not d.give_up


def test_decide_gives_up_at_max_attempts() -> None:
    """Once attempts reaches max_attempts the recipient is given up."""
    policy = RetryPolicy(jitter=0, max_attempts=3)
    assert not decide_retry(
        policy, attempts=2, queued_at=T0, now=T0, rng=_rng()
    ).give_up
    for attempts in (3, 4):
        d = decide_retry(policy, attempts=attempts, queued_at=T0, now=T0, rng=_rng())
        assert d.give_up
        assert d.next_attempt_at is None
        assert str(attempts) in d.reason


@pytest.mark.parametrize("after", [timedelta(0), timedelta(seconds=1)])
def test_decide_gives_up_when_lifetime_over(after: timedelta) -> None:
    """At or after queued_at + lifetime the recipient is given up."""
    policy = RetryPolicy(lifetime=3600)
    now = T0 + timedelta(seconds=3600) + after
    d = decide_retry(policy, attempts=1, queued_at=T0, now=now, rng=_rng())
    assert d.give_up
    assert "lifetime" in d.reason


def test_decide_last_attempt_at_lifetime_end() -> None:
    """When the next retry would fall after the lifetime, it is moved to the lifetime's end."""
    policy = RetryPolicy(jitter=0, initial_delay=600, lifetime=3600)
    now = T0 + timedelta(seconds=3500)
    d = decide_retry(policy, attempts=1, queued_at=T0, now=now, rng=_rng())
    assert d.next_attempt_at == T0 + timedelta(seconds=3600)
    assert not d.give_up


def test_decide_honours_not_before() -> None:
    """not_before later than the backoff pushes the next attempt to not_before."""
    later = T0 + timedelta(hours=1)
    d = decide_retry(
        NO_JITTER, attempts=1, queued_at=T0, now=T0, rng=_rng(), not_before=later
    )
    assert d.next_attempt_at == later


def test_decide_not_before_never_pulls_earlier() -> None:
    """not_before earlier than the backoff changes nothing."""
    d = decide_retry(
        NO_JITTER, attempts=1, queued_at=T0, now=T0, rng=_rng(), not_before=T0
    )
    assert d.next_attempt_at == T0 + timedelta(seconds=300)


def test_decide_not_before_capped_by_lifetime() -> None:
    """not_before beyond the lifetime is capped at the lifetime's end."""
    policy = RetryPolicy(lifetime=3600)
    d = decide_retry(
        policy,
        attempts=1,
        queued_at=T0,
        now=T0,
        rng=_rng(),
        not_before=T0 + timedelta(days=2),
    )
    assert d.next_attempt_at == T0 + timedelta(seconds=3600)


def test_decide_zero_wait_policy_retries_now() -> None:
    """A zero-wait policy schedules the retry immediately."""
    policy = RetryPolicy(initial_delay=0, max_delay=0, jitter=0)
    d = decide_retry(policy, attempts=5, queued_at=T0, now=T0, rng=_rng())
    assert d.next_attempt_at == T0


def test_retry_decision_give_up_property() -> None:
    """RetryDecision.give_up is true exactly when there is no next attempt."""
    assert RetryDecision(None).give_up
    assert not RetryDecision(T0).give_up
    assert RetryDecision(T0).reason == ""


# Properties

policies = st.builds(
    RetryPolicy,
    initial_delay=st.floats(0, 86_400),
    factor=st.floats(1, 10),
    jitter=st.floats(0, 1),
    max_delay=st.floats(0, 86_400),
    lifetime=st.floats(0, 30 * 86_400),
    max_attempts=st.none() | st.integers(1, 100),
)
attempt_counts = st.integers(-5, 10_000)
seeds = st.integers(0, 2**32)


@given(policy=policies, attempts=attempt_counts, seed=seeds)
def test_property_delay_within_bounds(
    policy: RetryPolicy, attempts: int, seed: int
) -> None:
    """For any policy and attempt count, 0 <= delay <= max_delay."""
    delay = backoff_delay(policy, attempts, random.Random(seed))
    assert 0.0 <= delay <= policy.max_delay


@given(policy=policies, attempts=st.integers(1, 10_000), seed=seeds)
def test_property_jitter_relative_bound(
    policy: RetryPolicy, attempts: int, seed: int
) -> None:
    """A jittered delay is within ± jitter of the unjittered one (before capping)."""
    plain = RetryPolicy(
        initial_delay=policy.initial_delay,
        factor=policy.factor,
        jitter=0,
        max_delay=policy.max_delay,
    )
    base = backoff_delay(plain, attempts, random.Random(seed))
    delay = backoff_delay(policy, attempts, random.Random(seed))
    slack = 1e-9 * max(base, 1.0)
    assert base * (1 - policy.jitter) - slack <= delay
    assert delay <= min(policy.max_delay, base * (1 + policy.jitter)) + slack


@given(
    policy=policies,
    attempts=st.integers(1, 10_000),
    seed=seeds,
    elapsed=st.floats(0, 40 * 86_400),
    not_before=st.none() | st.floats(-86_400, 60 * 86_400),
)
def test_property_next_attempt_within_now_and_lifetime(
    policy: RetryPolicy,
    attempts: int,
    seed: int,
    elapsed: float,
    not_before: float | None,
) -> None:
    """next_attempt_at is never before now and never after queued_at + lifetime."""
    now = T0 + timedelta(seconds=elapsed)
    nb = None if not_before is None else now + timedelta(seconds=not_before)
    d = decide_retry(
        policy,
        attempts=attempts,
        queued_at=T0,
        now=now,
        rng=random.Random(seed),
        not_before=nb,
    )
    expires_at = T0 + timedelta(seconds=policy.lifetime)
    if d.next_attempt_at is None:
        assert now >= expires_at or (
            policy.max_attempts is not None and attempts >= policy.max_attempts
        )
    else:
        assert now <= d.next_attempt_at <= expires_at
        if nb is not None:
            assert d.next_attempt_at >= min(nb, expires_at)


@given(policy=policies, attempts=st.integers(1, 10_000), seed=seeds)
def test_property_gives_up_exactly_when_budget_spent(
    policy: RetryPolicy, attempts: int, seed: int
) -> None:
    """Within the lifetime, the recipient is given up iff attempts >= max_attempts."""
    d = decide_retry(
        policy, attempts=attempts, queued_at=T0, now=T0, rng=random.Random(seed)
    )
    budget_spent = policy.max_attempts is not None and attempts >= policy.max_attempts
    # A lifetime under a microsecond has already ended at queued_at.
    expired = T0 + timedelta(seconds=policy.lifetime) <= T0
    assert d.give_up is (budget_spent or expired)


@given(
    policy=policies.map(
        lambda p: RetryPolicy(
            initial_delay=p.initial_delay,
            factor=p.factor,
            jitter=0,
            max_delay=p.max_delay,
        )
    ),
    attempts=st.integers(-5, 5_000),
)
def test_property_monotone_without_jitter(policy: RetryPolicy, attempts: int) -> None:
    """Without jitter, the delay never shrinks as attempts grow."""
    rng = random.Random(0)
    assert backoff_delay(policy, attempts, rng) <= backoff_delay(
        policy, attempts + 1, rng
    )
