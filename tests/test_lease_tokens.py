"""Outcomes are fenced by lease tokens: a worker that lost its lease while it
was sending records nothing over the worker that took the recipients after it,
and a lease that merely ran out (nobody took it) still takes its outcome.

Two Deliverers share one SQLite file, each relaying to its own aiosmtpd server
on loopback. The first worker's clock runs an hour behind, so every lease it
takes has run out for the second as soon as it is taken: the second claims the
recipient while the first is stalled after its final dot, deterministically,
with no waiting for a lease to expire.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import attrs
import pytest

from mailstrom_async import (
    AttemptRecord,
    Deliverer,
    DeliveryEvent,
    Email,
    Limits,
    MemoryStore,
    MessageStatus,
    RecipientState,
    RecipientStatus,
    SQLiteStore,
    SubmitHandle,
    Timeouts,
)
from mailstrom_async._store import Job, NewMessage
from tests.smtpd import FaultHandler, SMTPDServers, smtpd_fixture  # noqa: F401
from tests.test_engine_resilience import LogEvent
from tests.test_relay_faults import DEADLINE, SENDER, done, relay_config

DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED

# The stalled worker must not give up on its final dot before the test lets the
# server answer.
PATIENT = Timeouts(connect=5, command=5, data_start=5, data_end=45)


@pytest.fixture
def lease_lost() -> Iterator[LogEvent]:
    handler = LogEvent("lease lost")
    logger = logging.getLogger("mailstrom_async.deliverer")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def email(to: str) -> Email:
    return Email(sender=SENDER, to=[to], subject="hi", text="Hello.\n")


def an_hour_behind() -> datetime:
    return datetime.now(UTC) - timedelta(hours=1)


class StatusSpy(SQLiteStore):
    """A SQLiteStore that tells when a status has been read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read = anyio.Event()

    async def status(self, message_id: str) -> MessageStatus:
        status = await super().status(message_id)
        self.read.set()
        return status


async def test_a_worker_that_lost_its_lease_records_nothing(
    smtpd: SMTPDServers, tmp_path: Path, lease_lost: LogEvent
) -> None:
    """Worker A is stalled after its final dot; worker B claims the recipient
    (A's lease has run out for B), delivers it and records DELIVERED; then A's
    server refuses the message, and A's FAILED is dropped: the status stays B's,
    A says so once at WARNING, publishes no event for it and resolves no handle
    with it. A's attempt is in the history all the same."""
    slow = FaultHandler(
        stall_at="DATA", data_reply="550 5.7.1 refused at the slow relay"
    )
    server_a = await smtpd.start(slow)
    server_b = await smtpd.start(FaultHandler())
    path = tmp_path / "queue.sqlite3"
    # A reads the store only when told to (no polling): its handle can then
    # only resolve from what A itself records, or from an operator's call.
    config_a = relay_config(server_a.port, timeouts=PATIENT, poll_interval=3600)
    store_a = StatusSpy(path)
    resolved: list[RecipientState] = []
    a_done = anyio.Event()
    a = Deliverer(config_a, store=store_a, clock=an_hour_behind)
    async with a, anyio.create_task_group() as tg:
        events = a.events()
        handle = await a.submit(email("rcpt@example.org"))
        with anyio.fail_after(DEADLINE):
            await slow.stalled.wait()
        [owner] = await a.leases()

        async def wait_for_a() -> None:
            status = await handle
            resolved.append(status.recipients[0].state)
            a_done.set()

        tg.start_soon(wait_for_a)
        with anyio.fail_after(DEADLINE):
            await store_a.read.wait()  # A's handle knows the status: QUEUED
        async with Deliverer(
            relay_config(server_b.port), store=SQLiteStore(path), mode="deliver"
        ) as b:
            by_b = await done(SubmitHandle(b, handle.message_id, created=False))
        assert by_b.recipients[0].state is DELIVERED
        slow.release.set()
        with anyio.fail_after(DEADLINE):
            await lease_lost.seen.wait()
        await anyio.wait_all_tasks_blocked()  # a woken handle would resolve now
        assert resolved == []  # A's dropped FAILED resolved nothing
        # An operator's call makes A read the store: the handle sees B's outcome.
        assert await a.cancel(handle.message_id) == 0
        with anyio.fail_after(DEADLINE):
            await a_done.wait()
        status = await a.status(handle.message_id)
        history = await a.history(handle.message_id)
    assert resolved == [DELIVERED]
    assert status.recipients == by_b.recipients
    assert sorted(h.code or 0 for h in history) == [250, 550]
    assert len(server_a.messages) == len(server_b.messages) == 1
    [record] = lease_lost.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "lease lost; outcome dropped"
    assert record.__dict__["message_id"] == handle.message_id
    assert record.__dict__["recipients"] == 1
    assert record.__dict__["worker"] == owner.owner
    # The stream ended with A: it holds every event A published.
    seen: list[DeliveryEvent] = [event async for event in events]
    assert [e.state for e in seen if e.message_id == handle.message_id] == [
        RecipientState.QUEUED
    ]


class RenewalFails(MemoryStore):
    """A MemoryStore that never renews a lease, and tells when a claim hands
    out a recipient of a watched message."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: str | None = None
        self.reclaimed = anyio.Event()

    async def renew_leases(self, **kwargs: object) -> int:
        msg = "renewal refused (injected)"
        raise OSError(msg)

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        jobs = await super().claim_due(
            now=now, worker=worker, lease_until=lease_until, limit=limit
        )
        if any(job.message_id == self.watched for job in jobs):
            self.reclaimed.set()
        return jobs


async def test_a_lease_taken_again_by_its_own_worker_keeps_the_outcome(
    smtpd: SMTPDServers, lease_lost: LogEvent
) -> None:
    """When renewing fails, the lease of a job in flight runs out and the same
    Deliverer's next claim takes the recipient again; that claim keeps the
    token, so the job in flight records its outcome: nothing is dropped and the
    message is sent once."""
    stalled = FaultHandler(stall_at="DATA")
    server = await smtpd.start(stalled)
    store = RenewalFails()
    config = relay_config(
        server.port, timeouts=PATIENT, lease_duration=0.3, poll_interval=0.05
    )
    async with Deliverer(config, store=store) as d:
        handle = await d.submit(email("rcpt@example.org"))
        store.watched = handle.message_id
        with anyio.fail_after(DEADLINE):
            await stalled.stalled.wait()
            await store.reclaimed.wait()
        stalled.release.set()
        status = await done(handle)
    assert status.is_delivered
    assert len(server.messages) == 1
    assert lease_lost.records == []


def test_job_lease_is_carried_by_parts() -> None:
    """A job split by destination keeps its lease token (attrs.evolve)."""
    job = Job(
        message_id="m",
        mail_from="a@example.org",
        recipients=(),
        data=b"",
        smtputf8=False,
        submitted_at=datetime.now(UTC),
        lease="t",
    )
    assert attrs.evolve(job, recipients=()).lease == "t"


class OlderContract(MemoryStore):
    """A store written before lease tokens: no ``lease`` keyword anywhere, jobs
    without a token, ``record`` returning None."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def add_many(  # type: ignore[override]
        self,
        messages: Sequence[NewMessage],
        *,
        claim_for: str | None = None,
        lease_until: datetime | None = None,
    ) -> list[tuple[str, bool]]:
        self.calls.append("add_many")
        return await super().add_many(
            messages, claim_for=claim_for, lease_until=lease_until
        )

    async def claim_due(
        self, *, now: datetime, worker: str, lease_until: datetime, limit: int
    ) -> list[Job]:
        jobs = await super().claim_due(
            now=now, worker=worker, lease_until=lease_until, limit=limit
        )
        return [attrs.evolve(job, lease=None) for job in jobs]

    # An older store has no record_many either: one record() per job.
    record_many = None  # type: ignore[assignment]

    async def record(  # type: ignore[override]
        self,
        message_id: str,
        statuses: Sequence[RecipientStatus],
        *,
        worker: str,
        history: Sequence[AttemptRecord] = (),
        history_limit: int = 20,
    ) -> None:
        self.calls.append("record")
        await super().record(
            message_id,
            statuses,
            worker=worker,
            history=history,
            history_limit=history_limit,
        )

    async def release(  # type: ignore[override]
        self, message_id: str, addresses: Sequence[str], *, worker: str
    ) -> None:
        self.calls.append("release")
        await super().release(message_id, addresses, worker=worker)


async def test_a_store_of_the_older_contract_still_delivers(
    smtpd: SMTPDServers, lease_lost: LogEvent
) -> None:
    """A store that takes no lease token is called as before: mail submitted to
    it (claimed at submission) and mail it hands out by claims is delivered."""
    server = await smtpd.start(FaultHandler())
    store = OlderContract()
    config = relay_config(server.port, limits=Limits(max_jobs_in_memory=1))
    async with Deliverer(config, store=store) as d:  # type: ignore[arg-type]
        handles = [await d.submit(email(f"r{i}@example.org")) for i in range(3)]
        statuses = [await done(h) for h in handles]
    assert all(s.is_delivered for s in statuses)
    assert {"add_many", "record"} <= set(store.calls)
    assert lease_lost.records == []
