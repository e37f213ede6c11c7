"""The store contract for batched records (``BatchRecordingStore.record_many``):
each record written as ``Store.record`` writes it, in order, all or nothing.

A part of :class:`~mailstrom_async.testing.StoreContract`, which inherits these
tests; kept in a module of its own so that each file reads as one subject. A
store without ``record_many`` (the capability is optional) skips them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from mailstrom_async._exceptions import UnknownMessageError
from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus
from mailstrom_async._store import BatchRecordingStore, JobRecord
from mailstrom_async.testing._store_common import T0, at, attempted, new_message

if TYPE_CHECKING:
    from mailstrom_async._store import Job, Store

__all__ = ["BatchContract"]

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


def _batching(store: Store) -> BatchRecordingStore:
    if not isinstance(store, BatchRecordingStore):
        pytest.skip("the store has no record_many()")
    return store


def _attempt(address: str, n: int, state: RecipientState) -> AttemptRecord:
    """Attempt *n* of *address*, started *n* minutes after T0."""
    return AttemptRecord(
        address=address,
        attempt=n,
        started_at=at(60 * n),
        duration=0.5,
        state=state,
        code=250 if state is DELIVERED else 451,
        message=f"reply {n}",
    )


def _lease(jobs: list[Job]) -> str:
    [token] = {job.lease for job in jobs}
    assert token is not None
    return token


async def _claim(store: Store, worker: str, limit: int) -> str:
    """Claim *limit* messages for *worker*; their one lease token."""
    jobs = await store.claim_due(
        now=T0, worker=worker, lease_until=at(600), limit=limit
    )
    assert len({job.message_id for job in jobs}) == limit
    return _lease(jobs)


async def _states(store: Store, message_id: str) -> list[RecipientState]:
    return [r.state for r in await store.status(message_id)]


_ADDRESSES = ("a@x.example", "b@x.example", "c@y.example")
# The same recipients as given by a caller that spells the domain otherwise.
_SPELLINGS = {
    "a@x.example": "a@X.EXAMPLE",
    "b@x.example": "b@x.example",
    "c@y.example": "c@Y.example",
}


def _random_batch(
    rng: random.Random, messages: int, counters: dict[tuple[int, str], int]
) -> list[tuple[int, tuple[RecipientStatus, ...], str, tuple[AttemptRecord, ...]]]:
    """Records as (message number, statuses, lease kind, history): a message
    may come twice; attempts are numbered upward per recipient, sometimes one
    is given again (a retried write)."""
    batch = []
    for _ in range(rng.randint(1, 6)):
        m = rng.randrange(messages)
        statuses, history = [], []
        for address in rng.sample(_ADDRESSES, rng.randint(0, 3)):
            spelled = _SPELLINGS[address] if rng.random() < 0.3 else address
            state = rng.choice((DEFERRED, DEFERRED, DELIVERED, FAILED))
            n = counters.get((m, address), 0)
            if n == 0 or rng.random() < 0.85:
                n = counters[m, address] = n + 1
            statuses.append(
                attempted(
                    spelled,
                    state,
                    when=at(60 * n),
                    next_at=at(60 * n + 30) if state is DEFERRED else None,
                )
            )
            if rng.random() < 0.8:
                history.append(_attempt(spelled, n, state))
        kind = rng.choice(("token", "token", "token", "stale", "none"))
        batch.append((m, tuple(statuses), kind, tuple(history)))
    return batch


async def _twins(store: Store, batching: BatchRecordingStore, seed: int) -> None:
    """Random batches, recorded with record_many() on one twin of each message
    and one record() at a time on the other; then both twins compared."""
    rng = random.Random(seed)
    messages = 3

    def mid(twin: str, m: int) -> str:
        return f"s{seed}{twin}{m}"

    for twin in "ab":
        for m in range(messages):
            await store.add(new_message(mid(twin, m), *_ADDRESSES))
    workers = {twin: f"w{twin}{seed}" for twin in "ab"}
    tokens = {twin: await _claim(store, workers[twin], messages) for twin in "ab"}
    held = rng.randrange(messages)
    for twin in "ab":
        await store.hold(message_id=mid(twin, held))
    limit = rng.choice((0, 1, 2, 3, 20))
    counters: dict[tuple[int, str], int] = {}

    def lease(twin: str, kind: str) -> str | None:
        return {"token": tokens[twin], "stale": "stale", "none": None}[kind]

    for _ in range(3):
        batch = _random_batch(rng, messages, counters)
        batched = await batching.record_many(
            [
                JobRecord(
                    message_id=mid("a", m),
                    statuses=statuses,
                    lease=lease("a", kind),
                    history=history,
                )
                for m, statuses, kind, history in batch
            ],
            worker=workers["a"],
            history_limit=limit,
        )
        in_turn = [
            await store.record(
                mid("b", m),
                statuses,
                worker=workers["b"],
                lease=lease("b", kind),
                history=history,
                history_limit=limit,
            )
            for m, statuses, kind, history in batch
        ]
        assert batched == in_turn
        for m in range(messages):
            a, b = await store.status(mid("a", m)), await store.status(mid("b", m))
            assert a.recipients == b.recipients
            assert await store.history(mid("a", m)) == await store.history(mid("b", m))
        owners = await store.lease_owners()
        leased = [owners.get(workers[twin]) for twin in "ab"]
        assert len({None if o is None else o.recipients for o in leased}) == 1


@pytest.mark.anyio
class BatchContract:
    """Batched records: the tests every store with ``record_many`` must pass,
    part of StoreContract."""

    async def test_record_many_of_nothing(self, store: Store) -> None:
        """An empty batch writes nothing and returns an empty list."""
        assert await _batching(store).record_many([], worker="w") == []

    async def test_record_many_is_records_in_turn(self, store: Store) -> None:
        """A batch leaves the store as one record() per record, in order,
        would: statuses, holds, leases, histories and lost addresses alike
        (random batches over twin messages: one twin batched, one not)."""
        batching = _batching(store)
        for seed in range(4):
            await _twins(store, batching, seed)

    async def test_record_many_returns_lost_addresses_per_record(
        self, store: Store
    ) -> None:
        """Each record's addresses not written because its lease was lost come
        back in its own list, as given; the others are written."""
        batching = _batching(store)
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.add(new_message("m2", "c@x.example"))
        old = await _claim(store, "a", 2)
        jobs = await store.claim_due(
            now=at(600), worker="b", lease_until=at(900), limit=1
        )
        assert [job.message_id for job in jobs] == ["m1"]
        lost = await batching.record_many(
            [
                JobRecord(
                    message_id="m1",
                    statuses=(attempted("a@X.EXAMPLE", DELIVERED, when=at(601)),),
                    lease=old,
                ),
                JobRecord(
                    message_id="m2",
                    statuses=(attempted("c@x.example", DELIVERED, when=at(601)),),
                    lease=old,
                ),
                JobRecord(
                    message_id="m1",
                    statuses=(attempted("b@x.example", FAILED, when=at(602)),),
                    lease=_lease(jobs),
                ),
            ],
            worker="a",
        )
        assert lost == [["a@X.EXAMPLE"], [], []]
        assert await _states(store, "m1") == [QUEUED, FAILED]
        assert await _states(store, "m2") == [DELIVERED]

    async def test_record_many_with_an_unknown_message_writes_nothing(
        self, store: Store
    ) -> None:
        """A record of a message the store does not hold fails the batch with
        UnknownMessageError, and no record of it is written, not even those
        before it."""
        batching = _batching(store)
        await store.add(new_message("m1"))
        token = await _claim(store, "w", 1)
        with pytest.raises(UnknownMessageError):
            await batching.record_many(
                [
                    JobRecord(
                        message_id="m1",
                        statuses=(attempted("rcpt@example.com", DELIVERED),),
                        lease=token,
                        history=(_attempt("rcpt@example.com", 1, DELIVERED),),
                    ),
                    JobRecord(
                        message_id="nope",
                        statuses=(attempted("rcpt@example.com", DELIVERED),),
                    ),
                ],
                worker="w",
            )
        assert await _states(store, "m1") == [QUEUED]
        assert await store.history("m1") == []
        # The lease is still held: the batch ended none.
        assert (await store.lease_owners())["w"].recipients == 1

    async def test_record_many_refuses_bad_input_and_writes_nothing(
        self, store: Store
    ) -> None:
        """An unfinished status without a next attempt anywhere in the batch,
        or a negative history limit, raises ValueError and writes nothing."""
        batching = _batching(store)
        await store.add(new_message("m1"))
        await store.add(new_message("m2"))
        good = JobRecord(
            message_id="m1",
            statuses=(attempted("rcpt@example.com", DELIVERED),),
            history=(_attempt("rcpt@example.com", 1, DELIVERED),),
        )
        bad = JobRecord(
            message_id="m2", statuses=(attempted("rcpt@example.com", DEFERRED),)
        )
        with pytest.raises(ValueError, match="next_attempt_at"):
            await batching.record_many([good, bad], worker="w")
        with pytest.raises(ValueError, match="history_limit"):
            await batching.record_many([good], worker="w", history_limit=-1)
        assert await _states(store, "m1") == [QUEUED]
        assert await _states(store, "m2") == [QUEUED]
        assert await store.history("m1") == []

    async def test_record_many_keeps_history_within_the_limit(
        self, store: Store
    ) -> None:
        """Each record's attempts join the history, trimmed to
        *history_limit* (the first kept, then the latest); with 0 none is
        written."""
        batching = _batching(store)
        await store.add(new_message("m1"))
        await store.add(new_message("m2"))
        address = "rcpt@example.com"
        records = [
            JobRecord(
                message_id=mid,
                statuses=(attempted(address, DEFERRED, next_at=at(60 * n + 30)),),
                history=(_attempt(address, n, DEFERRED),),
            )
            for n in (1, 2, 3, 4)
            for mid in ("m1", "m2")
        ]
        for part in (records[:4], records[4:]):
            lost = await batching.record_many(part, worker="w", history_limit=2)
            assert lost == [[], [], [], []]
        assert [h.attempt for h in await store.history("m1")] == [1, 4]
        assert [h.attempt for h in await store.history("m2")] == [1, 4]
        await store.add(new_message("m3"))
        await batching.record_many(
            [
                JobRecord(
                    message_id="m3",
                    statuses=(attempted(address, DELIVERED),),
                    history=(_attempt(address, 1, DELIVERED),),
                )
            ],
            worker="w",
            history_limit=0,
        )
        assert await _states(store, "m3") == [DELIVERED]
        assert await store.history("m3") == []

    async def test_record_many_of_one_message_twice(self, store: Store) -> None:
        """Two records of one message are taken in order: the second sees the
        first (a final state is not replaced by an unfinished one), and both
        attempts are kept."""
        batching = _batching(store)
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        token = await _claim(store, "w", 1)
        deferred = attempted("b@x.example", DEFERRED, when=at(60), next_at=at(90))
        lost = await batching.record_many(
            [
                JobRecord(
                    message_id="m1",
                    statuses=(attempted("a@x.example", DELIVERED, when=at(60)),),
                    lease=token,
                    history=(_attempt("a@x.example", 1, DELIVERED),),
                ),
                JobRecord(
                    message_id="m1",
                    statuses=(
                        attempted(
                            "a@x.example", DEFERRED, when=at(120), next_at=at(150)
                        ),
                        deferred,
                    ),
                    lease=token,
                    history=(
                        _attempt("a@x.example", 2, DEFERRED),
                        _attempt("b@x.example", 1, DEFERRED),
                    ),
                ),
            ],
            worker="w",
        )
        assert lost == [[], []]
        status = await store.status("m1")
        assert status.recipients[0] == attempted("a@x.example", DELIVERED, when=at(60))
        assert status.recipients[1] == deferred
        assert [(h.address, h.attempt) for h in await store.history("m1")] == [
            ("a@x.example", 1),
            ("b@x.example", 1),
            ("a@x.example", 2),
        ]
        assert await store.lease_owners() == {}
        assert await store.next_due_at() == at(90)
