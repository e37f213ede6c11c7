"""The store contract for message priorities (``NewMessage.priority``).

A part of :class:`~mailstrom_async.testing.StoreContract`, which inherits these
tests; kept in a module of its own so that each file reads as one subject.

Claim order is ``priority`` (lowest first, like Unix ``nice``), then
``next_attempt_at``, then the order messages were added. Priority orders only
what is due: it never makes a recipient due earlier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailstrom_async._models import RecipientState
from mailstrom_async.testing._store_common import (
    T0,
    at,
    attempted,
    claimed_addresses,
    new_message,
)

if TYPE_CHECKING:
    from mailstrom_async._store import Job, Store

__all__ = ["PriorityContract"]

DEFERRED = RecipientState.DEFERRED


async def _claim(store: Store, now: float, limit: int) -> list[Job]:
    """Claim at T0 + *now*, with leases that outlast every test."""
    return await store.claim_due(
        now=at(now), worker="w", lease_until=at(10_000), limit=limit
    )


def _ids(jobs: list[Job]) -> list[str]:
    return [job.message_id for job in jobs]


class PriorityContract:
    """Claims take the lowest priority first; see :meth:`Store.claim_due`."""

    async def test_claim_takes_lower_priority_first(self, store: Store) -> None:
        """A message of a lower priority is claimed first, even when one of a
        higher priority was due earlier and added earlier."""
        await store.add(new_message("bulk", submitted_at=T0, priority=5))
        await store.add(new_message("urgent", submitted_at=at(3), priority=-5))
        assert _ids(await _claim(store, 5, limit=1)) == ["urgent"]
        assert _ids(await _claim(store, 5, limit=1)) == ["bulk"]

    async def test_claim_limit_one_walks_priorities_in_order(
        self, store: Store
    ) -> None:
        """Claims of one message over priorities 5, -5 and 0 (added in that
        order, due at once) return -5, then 0, then 5."""
        for mid, priority in (("p5", 5), ("m5", -5), ("p0", 0)):
            await store.add(new_message(mid, priority=priority))
        claimed: list[tuple[str, int]] = []
        for _ in range(4):
            claimed.extend(
                (j.message_id, j.priority) for j in await _claim(store, 0, 1)
            )
        assert claimed == [("m5", -5), ("p0", 0), ("p5", 5)]

    async def test_claim_returns_jobs_in_claim_order(self, store: Store) -> None:
        """One claim of several messages returns them in claim order: by
        priority, then due time, then submission; each job says its priority."""
        for mid, due, priority in (
            ("a", 4, 1),
            ("b", 1, 0),
            ("c", 0, 1),
            ("d", 3, -2),
            ("e", 2, 0),
        ):
            await store.add(new_message(mid, submitted_at=at(due), priority=priority))
        jobs = await _claim(store, 9, limit=5)
        assert [(j.message_id, j.priority) for j in jobs] == [
            ("d", -2),
            ("b", 0),
            ("e", 0),
            ("c", 1),
            ("a", 1),
        ]

    async def test_equal_priorities_keep_due_then_submission_order(
        self, store: Store
    ) -> None:
        """Among messages of one priority (not 0), the oldest due goes first and
        ties go in the order the messages were added."""
        for mid, due in (("x", 2), ("y", 1), ("z", 2), ("w", 1)):
            await store.add(new_message(mid, submitted_at=at(due), priority=7))
        claimed: list[str] = []
        for _ in range(4):
            claimed.extend(_ids(await _claim(store, 9, limit=1)))
        assert claimed == ["y", "w", "x", "z"]

    async def test_priority_never_makes_mail_due(self, store: Store) -> None:
        """A lower-priority message not yet due is not claimed, and does not
        keep a due message of a higher priority from being claimed."""
        await store.add(new_message("later", submitted_at=at(10), priority=-9))
        await store.add(new_message("now", submitted_at=T0, priority=9))
        assert _ids(await _claim(store, 5, limit=5)) == ["now"]
        assert await _claim(store, 9, limit=5) == []
        assert _ids(await _claim(store, 10, limit=5)) == ["later"]

    async def test_priority_is_kept_across_retries(self, store: Store) -> None:
        """A deferred recipient is claimed again at its message's priority:
        before due mail of a higher priority, once its retry is due."""
        await store.add(new_message("urgent", "a@x.example", priority=-1))
        [job] = await _claim(store, 0, limit=1)
        deferred = attempted("a@x.example", DEFERRED, next_at=at(20))
        await store.record("urgent", [deferred], worker="w", lease=job.lease)
        await store.add(new_message("normal", submitted_at=at(1)))
        await store.add(new_message("bulk", submitted_at=at(2), priority=3))
        jobs = await _claim(store, 30, limit=3)
        assert [(j.message_id, j.priority) for j in jobs] == [
            ("urgent", -1),
            ("normal", 0),
            ("bulk", 3),
        ]
        assert jobs[0].recipients == (deferred,)

    async def test_add_many_keeps_each_message_priority(self, store: Store) -> None:
        """Messages stored together keep their own priorities; all recipients of
        a message are claimed together at its priority."""
        await store.add_many(
            [
                new_message("low", "a@x.example", "b@y.example", priority=2),
                new_message("high", "c@x.example", priority=-2),
                new_message("mid", "d@x.example"),
            ]
        )
        jobs = await _claim(store, 0, limit=3)
        assert claimed_addresses(jobs) == [
            ("high", "c@x.example"),
            ("mid", "d@x.example"),
            ("low", "a@x.example"),
            ("low", "b@y.example"),
        ]
        assert [j.priority for j in jobs] == [-2, 0, 2]

    async def test_claim_for_on_add_keeps_priority(self, store: Store) -> None:
        """Mail claimed as it is added, whose lease then runs out, is claimed
        again in priority order."""
        await store.add(new_message("normal"))
        await store.add(
            new_message("urgent", priority=-3), claim_for="a", lease_until=at(5)
        )
        assert _ids(await _claim(store, 1, limit=5)) == ["normal"]
        jobs = await _claim(store, 5, limit=5)
        assert [(j.message_id, j.priority) for j in jobs] == [("urgent", -3)]
