"""The store contract for lease tokens: ``record`` and ``release`` fenced by the
token of the claim that leased the recipients (``Job.lease``).

A part of :class:`~mailstrom_async.testing.StoreContract`, which inherits these
tests; kept in a module of its own so that each file reads as one subject.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus
from mailstrom_async.testing._store_common import (
    T0,
    at,
    attempted,
    claimed_addresses,
    new_message,
)

if TYPE_CHECKING:
    from mailstrom_async._store import Job, Store

__all__ = ["LeaseContract"]

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


def _token(jobs: list[Job]) -> str:
    """The one lease token of *jobs*."""
    tokens = {job.lease for job in jobs}
    assert len(tokens) == 1, tokens
    [token] = tokens
    assert isinstance(token, str)
    assert token
    return token


def _attempt(address: str, state: RecipientState, when: float) -> AttemptRecord:
    return AttemptRecord(
        address=address,
        attempt=1,
        started_at=at(when),
        duration=0.5,
        state=state,
        code=250 if state is DELIVERED else 550,
    )


async def _states(store: Store, message_id: str) -> list[RecipientState]:
    return [r.state for r in await store.status(message_id)]


@pytest.mark.anyio
class LeaseContract:
    """Lease tokens: the tests every store must pass, part of StoreContract."""

    async def test_each_claim_leases_under_a_new_token(self, store: Store) -> None:
        """A claim's jobs carry one token; a claim by another worker after the
        lease ran out leases the recipients under another."""
        await store.add(new_message("m1"))
        await store.add(new_message("m2"))
        first = await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=9)
        assert claimed_addresses(first) == [
            ("m1", "rcpt@example.com"),
            ("m2", "rcpt@example.com"),
        ]
        again = await store.claim_due(
            now=at(10), worker="b", lease_until=at(70), limit=9
        )
        assert len(again) == 2
        assert _token(again) != _token(first)

    async def test_stale_record_after_a_reclaim_writes_nothing(
        self, store: Store
    ) -> None:
        """A worker whose recipients another worker claimed after its lease ran
        out writes none of their statuses and takes none of their leases; the
        store returns their addresses (as given). The attempts are kept in the
        history: they were made. The new holder then records as usual."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        old = await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        new = await store.claim_due(now=at(10), worker="b", lease_until=at(70), limit=1)
        late = [
            attempted("a@X.EXAMPLE", DELIVERED, when=at(11)),
            attempted("b@x.example", FAILED, when=at(11)),
        ]
        lost = await store.record(
            "m1",
            late,
            worker="a",
            lease=_token(old),
            history=[_attempt("a@X.EXAMPLE", DELIVERED, 11)],
        )
        assert lost == ["a@X.EXAMPLE", "b@x.example"]
        assert await _states(store, "m1") == [QUEUED, QUEUED]
        assert [h.started_at for h in await store.history("m1")] == [at(11)]
        # b's lease is intact: nobody else can claim, it ends at b's lease end.
        assert await store.next_due_at() == at(70)
        assert (
            await store.claim_due(now=at(69), worker="c", lease_until=at(99), limit=1)
            == []
        )
        ours = [
            attempted("a@x.example", DEFERRED, when=at(12), next_at=at(40)),
            attempted("b@x.example", DELIVERED, when=at(12)),
        ]
        assert await store.record("m1", ours, worker="b", lease=_token(new)) == []
        assert (await store.status("m1")).recipients == tuple(ours)
        assert await store.next_due_at() == at(40)

    async def test_only_the_reclaimed_recipients_are_dropped(
        self, store: Store
    ) -> None:
        """Of one record, the recipients still under the token are written; the
        one another worker claimed meanwhile is not."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        old = await store.claim_due(now=T0, worker="a", lease_until=at(60), limit=1)
        await store.release("m1", ["b@x.example"], worker="a", lease=_token(old))
        other = await store.claim_due(now=T0, worker="b", lease_until=at(60), limit=1)
        assert claimed_addresses(other) == [("m1", "b@x.example")]
        delivered = attempted("a@x.example", DELIVERED)
        lost = await store.record(
            "m1",
            [delivered, attempted("b@x.example", FAILED)],
            worker="a",
            lease=_token(old),
        )
        assert lost == ["b@x.example"]
        assert (await store.status("m1")).recipients[0] == delivered
        assert await _states(store, "m1") == [DELIVERED, QUEUED]

    async def test_an_expired_lease_nobody_took_is_still_the_holders(
        self, store: Store
    ) -> None:
        """A lease that ran out without another claim keeps its token: the late
        outcome is written (no needless redelivery) and its lease ends."""
        await store.add(new_message("m1"))
        jobs = await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        late = attempted("rcpt@example.com", DEFERRED, when=at(20), next_at=at(30))
        assert await store.record("m1", [late], worker="a", lease=_token(jobs)) == []
        assert (await store.status("m1")).recipients == (late,)
        again = await store.claim_due(
            now=at(30), worker="b", lease_until=at(90), limit=1
        )
        assert claimed_addresses(again) == [("m1", "rcpt@example.com")]

    async def test_a_record_written_twice_is_written_twice(self, store: Store) -> None:
        """Ending a lease keeps its token: the same record sent again (a write
        that failed after it committed) is written again, not reported lost."""
        await store.add(new_message("m1"))
        jobs = await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        done = attempted("rcpt@example.com", DELIVERED, when=at(1))
        for _ in range(2):
            assert (
                await store.record("m1", [done], worker="a", lease=_token(jobs)) == []
            )
        assert (await store.status("m1")).recipients == (done,)

    async def test_release_with_a_stale_token_does_nothing(self, store: Store) -> None:
        """release() under a token another claim replaced leaves the new lease;
        under the current token it ends it."""
        await store.add(new_message("m1"))
        old = await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        new = await store.claim_due(now=at(10), worker="b", lease_until=at(70), limit=1)
        await store.release("m1", ["rcpt@example.com"], worker="a", lease=_token(old))
        await store.release("m1", ["rcpt@example.com"], worker="b", lease=_token(old))
        assert await store.next_due_at() == at(70)
        assert (
            await store.claim_due(now=at(11), worker="c", lease_until=at(99), limit=1)
            == []
        )
        await store.release("m1", ["rcpt@example.com"], worker="b", lease=_token(new))
        jobs = await store.claim_due(
            now=at(11), worker="c", lease_until=at(99), limit=1
        )
        assert claimed_addresses(jobs) == [("m1", "rcpt@example.com")]
        status = await store.status("m1")
        assert all(r.state is QUEUED and r.attempts == 0 for r in status)

    async def test_add_claims_under_the_callers_token(self, store: Store) -> None:
        """add(claim_for=..., lease=...) and add_many() lease the new recipients
        under the caller's token: records under it are written, under another
        they are not; a token without a claim is a ValueError."""
        await store.add(
            new_message("m1", "a@x.example"),
            claim_for="s",
            lease_until=at(30),
            lease="t-add",
        )
        await store.add_many(
            [new_message("m2"), new_message("m3")],
            claim_for="s",
            lease_until=at(30),
            lease="t-many",
        )
        delivered = attempted("a@x.example", DELIVERED)
        assert await store.record("m1", [delivered], worker="s", lease="t-many") == [
            "a@x.example"
        ]
        assert await store.record("m1", [delivered], worker="s", lease="t-add") == []
        assert await _states(store, "m1") == [DELIVERED]
        for mid in ("m2", "m3"):
            done = [attempted("rcpt@example.com", FAILED)]
            assert await store.record(mid, done, worker="s", lease="t-many") == []
            assert await _states(store, mid) == [FAILED]
        with pytest.raises(ValueError, match="claim_for"):
            await store.add(new_message("m4"), lease="t")
        # Without a token of the caller's, the store issues one: the claim holds.
        await store.add(new_message("m5"), claim_for="s", lease_until=at(30))
        assert await store.next_due_at() == at(30)

    async def test_renewal_keeps_the_token(self, store: Store) -> None:
        """renew_leases() extends a lease under the same token; a claim by the
        same worker after its own lease ran out keeps it too, so a job of that
        worker still in flight records."""
        await store.add(new_message("m1"))
        jobs = await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        token = _token(jobs)
        assert await store.renew_leases(worker="a", lease_until=at(100)) == 1
        assert (
            await store.claim_due(now=at(50), worker="b", lease_until=at(99), limit=1)
            == []
        )
        again = await store.claim_due(
            now=at(100), worker="a", lease_until=at(160), limit=1
        )
        assert _token(again) == token
        done = attempted("rcpt@example.com", DELIVERED, when=at(101))
        assert await store.record("m1", [done], worker="a", lease=token) == []
        assert await _states(store, "m1") == [DELIVERED]

    async def test_own_and_fresh_rows_come_as_two_jobs(self, store: Store) -> None:
        """A claim that takes rows its worker held already (kept token) and rows
        nobody held (new token) of one message returns one job per token, the
        message counted once against the limit."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.add(new_message("m2", submitted_at=at(1)))
        first = await store.claim_due(now=T0, worker="w", lease_until=at(10), limit=1)
        old = _token(first)
        deferred = attempted("b@x.example", DEFERRED, next_at=at(5))
        assert await store.record("m1", [deferred], worker="w", lease=old) == []
        jobs = await store.claim_due(
            now=at(10), worker="w", lease_until=at(70), limit=1
        )
        assert claimed_addresses(jobs) == [("m1", "a@x.example"), ("m1", "b@x.example")]
        assert [len(job.recipients) for job in jobs] == [1, 1]
        assert jobs[0].lease == old
        assert jobs[1].lease not in {None, old}
        assert all(job.data == first[0].data for job in jobs)

    async def test_a_cancelled_recipient_still_takes_the_truth(
        self, store: Store
    ) -> None:
        """Cancelling ends the lease but keeps its token: the worker in flight
        still records DELIVERED over FAILED (a server accepted it)."""
        await store.add(new_message("m1"))
        jobs = await store.claim_due(now=T0, worker="a", lease_until=at(60), limit=1)
        assert await store.cancel("m1") == 1
        done = attempted("rcpt@example.com", DELIVERED, when=at(1))
        assert await store.record("m1", [done], worker="a", lease=_token(jobs)) == []
        assert (await store.status("m1")).recipients == (done,)

    async def test_without_a_token_records_as_before(self, store: Store) -> None:
        """record() and release() without a token are fenced by nothing but the
        owner's leases, as before lease tokens, and return no address."""
        await store.add(new_message("m1"))
        await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        await store.claim_due(now=at(10), worker="b", lease_until=at(70), limit=1)
        late = attempted("rcpt@example.com", DEFERRED, when=at(11), next_at=at(11))
        assert await store.record("m1", [late], worker="a") == []
        assert (await store.status("m1")).recipients == (late,)
        await store.release("m1", ["rcpt@example.com"], worker="a")
        assert await store.next_due_at() == at(70)
        unknown: list[RecipientStatus] = [attempted("x@else.example", FAILED)]
        assert await store.record("m1", unknown, worker="a", lease="nope") == []
