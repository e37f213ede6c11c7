"""The store contract for holding and releasing mail (``Store.hold``/``unhold``).

A part of :class:`~mailstrom_async.testing.StoreContract`, which inherits these
tests; kept in a module of its own so that each file reads as one subject.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from mailstrom_async._exceptions import UnknownMessageError
from mailstrom_async._models import MessageStatus, RecipientState, RecipientStatus
from mailstrom_async.testing._store_common import (
    T0,
    at,
    attempted,
    claimed_addresses,
    new_message,
)

if TYPE_CHECKING:
    from mailstrom_async._store import Store

__all__ = ["HoldContract"]

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


async def _held(store: Store, message_id: str) -> list[bool]:
    return [r.held for r in await store.status(message_id)]


async def _claim(store: Store, now: float, worker: str = "w") -> list[tuple[str, str]]:
    """Claim everything due at T0 + *now*, with leases that outlast every test."""
    jobs = await store.claim_due(
        now=at(now), worker=worker, lease_until=at(now + 10**7), limit=99
    )
    return claimed_addresses(jobs)


@pytest.mark.anyio
class HoldContract:
    """Hold and release: the tests every store must pass, part of StoreContract."""

    async def test_hold_message(self, store: Store) -> None:
        """hold(message_id=...) holds every unfinished recipient of the message and
        counts them; finished ones, and other messages, are untouched; the held
        keep their state, attempts and next attempt time."""
        await store.add(
            new_message("m1", "a@x.example", "b@x.example", "c@y.example", key="k")
        )
        await store.add(new_message("m2", "d@x.example"))
        deferred = attempted("b@x.example", DEFERRED, next_at=at(30))
        await store.record(
            "m1", [attempted("a@x.example", DELIVERED), deferred], worker="w"
        )
        assert await store.hold(message_id="m1") == 2
        a, b, c = (await store.status("m1")).recipients
        assert a == attempted("a@x.example", DELIVERED)
        assert b == RecipientStatus(
            address="b@x.example",
            state=DEFERRED,
            attempts=1,
            code=451,
            first_attempt_at=T0,
            last_attempt_at=T0,
            next_attempt_at=at(30),
            held=True,
        )
        assert c == RecipientStatus(
            address="c@y.example", next_attempt_at=T0, held=True
        )
        assert await _held(store, "m2") == [False]
        assert await store.hold(message_id="m1") == 0  # already held

    async def test_held_recipients_are_never_claimed(self, store: Store) -> None:
        """Held recipients are not claimed however late it is, and next_due_at()
        does not count them; the rest of the queue goes on."""
        await store.add(new_message("m1", "a@x.example"))
        await store.add(new_message("m2", "b@x.example", submitted_at=at(50)))
        await store.hold(message_id="m1")
        assert await store.next_due_at() == at(50)
        assert await _claim(store, 10**6) == [("m2", "b@x.example")]
        await store.record("m2", [attempted("b@x.example", DELIVERED)], worker="w")
        assert await _claim(store, 2 * 10**6) == []
        assert await store.next_due_at() is None

    async def test_hold_needs_a_target(self, store: Store) -> None:
        """hold() without message_id or domain raises ValueError (a slip must not
        hold the whole queue); an unknown message raises UnknownMessageError;
        neither holds anything."""
        await store.add(new_message("m1"))
        with pytest.raises(ValueError, match="message_id, a domain"):
            await store.hold()
        with pytest.raises(UnknownMessageError) as info:
            await store.hold(message_id="nope", domain="example.com")
        assert info.value.message_id == "nope"
        assert await _held(store, "m1") == [False]

    async def test_hold_domain(self, store: Store) -> None:
        """hold(domain=...) holds that domain's unfinished recipients in every
        message, compared case-insensitively; with message_id too, only that
        message's; mail added afterwards is not held."""
        await store.add(new_message("m1", "a@X.example", "b@y.example"))
        await store.add(new_message("m2", "c@x.EXAMPLE"))
        await store.add(new_message("m3", "d@x.example", "e@y.example"))
        assert await store.hold(message_id="m3", domain="Y.example") == 1
        assert await _held(store, "m3") == [False, True]
        assert await store.hold(domain="x.Example") == 3
        assert await _held(store, "m1") == [True, False]
        assert await _held(store, "m2") == [True]
        assert await _held(store, "m3") == [True, True]
        assert await store.hold(domain="nowhere.example") == 0
        await store.add(new_message("late", "f@x.example"))
        assert await _claim(store, 1) == [
            ("m1", "b@y.example"),
            ("late", "f@x.example"),
        ]

    async def test_unhold_makes_due_at_the_time_they_had(self, store: Store) -> None:
        """A released recipient is due at its own next attempt time: at once if
        that has passed (claimed first: it waited longest), later if not."""
        await store.add(new_message("m1", "a@x.example"))
        await store.add(new_message("m2", "b@x.example", submitted_at=at(5)))
        await store.record(
            "m2", [attempted("b@x.example", DEFERRED, next_at=at(500))], worker="w"
        )
        await store.add(new_message("m3", "c@x.example", submitted_at=at(10)))
        await store.hold(domain="x.example")
        assert await store.next_due_at() is None
        assert await store.unhold(domain="X.EXAMPLE") == 3
        assert [r.held for m in ("m1", "m2", "m3") for r in await store.status(m)] == [
            False
        ] * 3
        assert (await store.status("m2")).recipients[0].next_attempt_at == at(500)
        assert await store.next_due_at() == T0
        assert await _claim(store, 100) == [
            ("m1", "a@x.example"),
            ("m3", "c@x.example"),
        ]
        assert await _claim(store, 499) == []
        assert await _claim(store, 500) == [("m2", "b@x.example")]
        assert await store.unhold(domain="x.example") == 0

    async def test_unhold_targets(self, store: Store) -> None:
        """unhold() by message, by domain, by both, or all=True; it counts only
        what was held."""
        for mid in ("m1", "m2", "m3"):
            await store.add(new_message(mid, "a@x.example", "b@y.example"))
            await store.hold(message_id=mid)
        assert await store.unhold(message_id="m1", domain="Y.example") == 1
        assert await _held(store, "m1") == [True, False]
        assert await store.unhold(message_id="m1") == 1
        assert await store.unhold(message_id="m1") == 0
        assert await store.unhold(domain="x.example") == 2
        assert await _held(store, "m2") == [False, True]
        assert await store.unhold(all=True) == 2
        assert [await _held(store, m) for m in ("m1", "m2", "m3")] == [[False] * 2] * 3
        assert await store.unhold(all=True) == 0

    async def test_unhold_needs_a_target(self, store: Store) -> None:
        """unhold() needs message_id, domain or all=True, and all=True with a
        target is refused: both ValueError; an unknown message raises
        UnknownMessageError; nothing is released."""
        await store.add(new_message("m1"))
        await store.hold(message_id="m1")
        with pytest.raises(ValueError, match="all=True"):
            await store.unhold()
        with pytest.raises(ValueError, match="all=True"):
            await store.unhold(all=True, message_id="m1")
        with pytest.raises(ValueError, match="all=True"):
            await store.unhold(all=True, domain="example.com")
        with pytest.raises(UnknownMessageError) as info:
            await store.unhold(message_id="nope")
        assert info.value.message_id == "nope"
        assert await _held(store, "m1") == [True]

    async def test_retry_now_skips_held(self, store: Store) -> None:
        """retry_now() neither changes nor counts held recipients."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.record(
            "m1",
            [
                attempted("a@x.example", DEFERRED, next_at=at(300)),
                attempted("b@x.example", DEFERRED, next_at=at(300)),
            ],
            worker="w",
        )
        await store.hold(message_id="m1", domain="x.example")
        await store.unhold(message_id="m1")
        await store.hold(domain="x.example")
        assert await store.retry_now(now=at(1)) == 0
        assert await store.retry_now(now=at(1), message_id="m1") == 0
        assert [r.next_attempt_at for r in await store.status("m1")] == [at(300)] * 2

    async def test_cancel_held(self, store: Store) -> None:
        """A held message can be cancelled: its recipients become FAILED and are no
        longer held."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.hold(message_id="m1")
        assert await store.cancel("m1") == 2
        status = await store.status("m1")
        assert [(r.state, r.held, r.message) for r in status] == [
            (FAILED, False, "cancelled by operator")
        ] * 2
        assert await store.unhold(all=True) == 0
        summary = await store.summary()
        assert summary.held == 0

    async def test_hold_in_flight(self, store: Store) -> None:
        """A recipient in flight is held and keeps its lease; an unfinished outcome
        keeps it held (whatever the recorded status says), a final one ends the
        hold; a lease given back or expired does not make it claimable."""
        await store.add(
            new_message("m1", "a@x.example", "b@x.example", "c@x.example"),
            claim_for="w",
            lease_until=at(60),
        )
        assert await store.hold(message_id="m1") == 3
        assert await store.renew_leases(worker="w", lease_until=at(90)) == 3
        late = attempted("b@x.example", DEFERRED, when=at(2), next_at=at(5))
        await store.record(
            "m1",
            [attempted("a@x.example", DELIVERED, when=at(2)), late],
            worker="w",
        )
        await store.release("m1", ["c@x.example"], worker="w")
        a, b, c = (await store.status("m1")).recipients
        assert (a.state, a.held) == (DELIVERED, False)
        assert b == RecipientStatus(
            address="b@x.example",
            state=DEFERRED,
            attempts=1,
            code=451,
            first_attempt_at=at(2),
            last_attempt_at=at(2),
            next_attempt_at=at(5),
            held=True,
        )
        assert (c.state, c.held) == (QUEUED, True)
        assert await _claim(store, 1000) == []
        assert await store.next_due_at() is None
        assert await store.unhold(message_id="m1") == 2
        assert await _claim(store, 1000) == [
            ("m1", "b@x.example"),
            ("m1", "c@x.example"),
        ]

    async def test_unhold_in_flight_keeps_the_lease(self, store: Store) -> None:
        """Releasing a recipient in flight does not end its worker's lease."""
        await store.add(new_message("m1"), claim_for="w", lease_until=at(60))
        await store.hold(message_id="m1")
        assert await store.unhold(message_id="m1") == 1
        assert await _claim(store, 59, worker="v") == []
        assert await store.next_due_at() == at(60)
        assert await _claim(store, 60, worker="v") == [("m1", "rcpt@example.com")]

    async def test_record_does_not_hold(self, store: Store) -> None:
        """A recorded status's own held flag is ignored: record() neither holds
        nor releases."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.hold(message_id="m1", domain="x.example")
        await store.unhold(message_id="m1", domain="x.example")
        await store.hold(message_id="m1")
        free = RecipientStatus(
            address="a@x.example", state=DEFERRED, next_attempt_at=T0
        )
        await store.add(new_message("m2", "c@x.example"))
        await store.record("m1", [free], worker="w")
        await store.record(
            "m2",
            [
                RecipientStatus(
                    address="c@x.example", state=DEFERRED, next_attempt_at=T0, held=True
                )
            ],
            worker="w",
        )
        assert await _held(store, "m1") == [True, True]
        assert await _held(store, "m2") == [False]
        assert await _claim(store, 1) == [("m2", "c@x.example")]

    async def test_held_in_views(self, store: Store) -> None:
        """summary() counts held recipients in their state and as held, in total
        and by domain; messages() lists held mail with the flag, and held=True or
        False picks messages by their recipients' hold."""
        await store.add(new_message("m1", "a@X.example", "b@y.example"))
        await store.add(new_message("m2", "c@x.example"))
        await store.add(new_message("m3", "d@z.example"))
        await store.record(
            "m2", [attempted("c@x.example", DEFERRED, next_at=at(9))], worker="w"
        )
        await store.hold(domain="x.example")
        summary = await store.summary()
        assert summary.by_state == {QUEUED: 3, DEFERRED: 1, DELIVERED: 0, FAILED: 0}
        assert summary.held == 2
        assert summary.held_by_domain == {"x.example": 2}
        listed = await store.messages()
        assert [m.message_id for m in listed] == ["m1", "m2", "m3"]
        assert listed[0] == await store.status("m1")
        assert [r.held for r in listed[0]] == [True, False]

        def ids(found: list[MessageStatus]) -> list[str]:
            return [m.message_id for m in found]

        assert ids(await store.messages(held=True)) == ["m1", "m2"]
        assert ids(await store.messages(held=False)) == ["m1", "m3"]
        assert ids(await store.messages(held=True, domain="y.example")) == []
        assert ids(await store.messages(held=True, states=[DEFERRED])) == ["m2"]
        assert ids(await store.messages(held=True, limit=1)) == ["m1"]

    async def test_held_mail_is_never_purged(self, store: Store) -> None:
        """Held mail is unfinished: purge() keeps it."""
        await store.add(new_message("m1"))
        await store.hold(message_id="m1")
        assert await store.purge(finished_before=at(10**6)) == 0
        assert await _held(store, "m1") == [True]
