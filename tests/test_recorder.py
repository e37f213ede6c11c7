"""Group commit (mailstrom_async/_recorder.py): outcomes that come in while a
batch is being written go in the next one; each call returns once its own
outcome is committed. Against real SQLite and memory stores."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import aiosqlite
import anyio
import pytest

from mailstrom_async import (
    MemoryStore,
    RecipientState,
    RecipientStatus,
    SQLiteStore,
    StoreError,
    UnknownMessageError,
)
from mailstrom_async._leases import LeaseKeeper
from mailstrom_async._recorder import Recorder
from mailstrom_async.testing._store_common import T0, new_message

if TYPE_CHECKING:
    from pathlib import Path

    from mailstrom_async import Job, Store

DELIVERED = RecipientState.DELIVERED


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryStore | SQLiteStore:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "q.sqlite3")


async def claimed(store: Store, count: int) -> list[Job]:
    await store.add_many(
        [new_message(f"m{n}", f"r{n}@example.org") for n in range(count)]
    )
    now = T0 + timedelta(seconds=1)  # new_message()'s messages are due at T0
    return await store.claim_due(
        now=now, worker="w", lease_until=now + timedelta(minutes=5), limit=count
    )


def delivered(job: Job) -> list[RecipientStatus]:
    return [
        RecipientStatus(address=r.address, state=DELIVERED, attempts=1, code=250)
        for r in job.recipients
    ]


async def record(recorder: Recorder, job: Job) -> list[str] | None:
    return await recorder.record(
        job.message_id, delivered(job), history=(), lease=job.lease
    )


async def test_outcomes_that_come_together_share_a_transaction(
    store: MemoryStore | SQLiteStore,
) -> None:
    """50 outcomes at once: the first is written alone (nothing waits for a
    batch to fill), the 49 that came meanwhile in one more transaction."""
    async with store:
        jobs = await claimed(store, 50)
        recorder = Recorder(store, worker="w", history_limit=20)
        results: list[list[str] | None] = []

        async def one(job: Job) -> None:
            results.append(await record(recorder, job))

        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(one, job)
        statuses = await store.statuses([j.message_id for j in jobs])
    assert results == [[]] * 50
    assert (recorder.batches, recorder.records) == (2, 50)
    assert all(s.is_delivered for s in statuses.values())
    assert len(statuses) == 50


async def test_a_lone_outcome_is_written_at_once(
    store: MemoryStore | SQLiteStore,
) -> None:
    async with store:
        [job] = await claimed(store, 1)
        recorder = Recorder(store, worker="w", history_limit=20)
        assert await record(recorder, job) == []
        assert (await store.status(job.message_id)).is_delivered
    assert (recorder.batches, recorder.records) == (1, 1)


async def test_one_unknown_message_does_not_fail_the_others(
    store: MemoryStore | SQLiteStore,
) -> None:
    """A batch with an outcome for a message the store does not hold is written
    again one outcome at a time: that one raises, the others are written."""
    async with store:
        jobs = await claimed(store, 6)
        recorder = Recorder(store, worker="w", history_limit=20)
        gone = RecipientStatus(address="x@example.org", state=DELIVERED, attempts=1)
        errors: list[BaseException] = []

        async def unknown() -> None:
            try:
                await recorder.record("nope", [gone], history=(), lease=None)
            except UnknownMessageError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(record, recorder, jobs[0])  # the leader's batch of one
            await anyio.wait_all_tasks_blocked()
            for job in jobs[1:3]:
                tg.start_soon(record, recorder, job)
            tg.start_soon(unknown)
            for job in jobs[3:]:
                tg.start_soon(record, recorder, job)
        statuses = await store.statuses([j.message_id for j in jobs])
    assert len(errors) == 1
    assert all(s.is_delivered for s in statuses.values())


async def test_a_failing_store_fails_each_call(tmp_path: Path) -> None:
    """A store that fails (here: closed) fails every outcome of the batch with
    its error, so that each job tries again on its own."""
    store = SQLiteStore(tmp_path / "q.sqlite3")
    async with store:
        jobs = await claimed(store, 5)
    recorder = Recorder(store, worker="w", history_limit=20)
    errors: list[BaseException] = []

    async def one(job: Job) -> None:
        try:
            await record(recorder, job)
        except StoreError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(one, job)
    assert len(errors) == 5


async def test_a_cancelled_wait_leaves_the_others_alone(tmp_path: Path) -> None:
    """A call cancelled while it waits for the next batch is not written and
    raises nothing else; the others are written, and the recorder goes on.
    Another connection holds the database's write lock meanwhile, so that the
    leader's batch is still being written when the wait is cancelled."""
    path = tmp_path / "q.sqlite3"
    store = SQLiteStore(path)
    async with store:
        jobs = await claimed(store, 4)
        recorder = Recorder(store, worker="w", history_limit=20)
        async with aiosqlite.connect(path, isolation_level=None) as blocker:
            await blocker.execute("BEGIN EXCLUSIVE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(record, recorder, jobs[0])  # leads; waits for the lock
                scope = anyio.CancelScope()

                async def cancelled() -> None:
                    with scope:
                        await record(recorder, jobs[1])

                tg.start_soon(cancelled)
                tg.start_soon(record, recorder, jobs[2])
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
                await anyio.wait_all_tasks_blocked()
                await blocker.execute("COMMIT")
        assert scope.cancelled_caught
        assert await record(recorder, jobs[3]) == []
        statuses = await store.statuses([j.message_id for j in jobs])
    assert statuses[jobs[1].message_id].recipients[0].state is RecipientState.QUEUED
    assert all(statuses[j.message_id].is_delivered for j in (jobs[0], jobs[2], jobs[3]))
    assert recorder.batches == 3  # jobs 0, then 2, then 3: never job 1


async def test_a_recipient_claimed_again_while_its_job_ends_is_given_back(
    store: MemoryStore | SQLiteStore,
) -> None:
    """Its job has recorded it (deferred, due at once) and is about to end when
    a claim takes it again: that claim is not used (the job still holds it),
    and its lease is given back once the job is over, so the next claim takes
    the recipient at once instead of after a lease. With group commit the
    window between a record and the end of its job is wider: this was a hang."""
    keeper = LeaseKeeper(
        store=store, owner="w", clock=lambda: T0 + timedelta(seconds=1),
        lease_duration=60,
    )  # fmt: skip
    async with store:
        [job] = await claimed(store, 1)
        keeper.hold(job)
        now = T0 + timedelta(seconds=1)
        deferred = RecipientStatus(
            address=job.recipients[0].address,
            state=RecipientState.DEFERRED,
            attempts=1,
            next_attempt_at=now,
        )
        assert (
            await store.record(job.message_id, [deferred], worker="w", lease=job.lease)
            == []
        )
        until = now + timedelta(minutes=1)
        [again] = await store.claim_due(now=now, worker="w", lease_until=until, limit=1)
        assert keeper.new_part(again) is None  # the job still holds it
        assert (
            await store.claim_due(now=now, worker="w", lease_until=until, limit=1) == []
        )
        keeper.drop(job)
        await keeper.release_reclaimed()
        [third] = await store.claim_due(now=now, worker="w", lease_until=until, limit=1)
    assert third.recipients[0].attempts == 1
