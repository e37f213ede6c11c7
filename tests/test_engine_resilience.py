"""The engine keeps its promise whatever one job meets: contained, recorded, never stuck.

Each test is one finding of the "unstoppable engine" review, reproduced against a
real aiosmtpd server on loopback and a real store; faults in the store come from a
store subclass that fails on purpose, the way a full disk or a bug would.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import attrs
import pytest

from mailstrom_async import (
    AttemptRecord,
    Deliverer,
    Email,
    LiveLeaseError,
    Liveness,
    MemoryStore,
    RecipientState,
    RecipientStatus,
    RetryPolicy,
    SQLiteStore,
    StoreError,
    SubmitHandle,
)
from mailstrom_async._owner import _start_time, current_owner, liveness
from mailstrom_async._store import JobRecord, NewMessage, Store
from tests.smtpd import FaultHandler, SMTPDServers, smtpd_fixture  # noqa: F401
from tests.test_relay_faults import DEADLINE, SENDER, done, relay_config

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED


class LogEvent(logging.Handler):
    """Sets an event when a record whose message starts with *text* is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = anyio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.text):
            self.records.append(record)
            self.seen.set()


@pytest.fixture
def job_failures() -> Iterator[LogEvent]:
    handler = LogEvent("delivery job failed")
    logger = logging.getLogger("mailstrom_async.deliverer")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class RecordFails(MemoryStore):
    """A MemoryStore whose ``record`` fails for chosen messages until healed."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()
        self.failures = 0

    async def record(
        self,
        message_id: str,
        statuses: Sequence[RecipientStatus],
        *,
        worker: str,
        lease: str | None = None,
        history: Sequence[AttemptRecord] = (),
        history_limit: int = 20,
    ) -> list[str]:
        if message_id in self.failing:
            self.failures += 1
            msg = "disk full (injected)"
            raise StoreError(msg)
        return await super().record(
            message_id,
            statuses,
            worker=worker,
            lease=lease,
            history=history,
            history_limit=history_limit,
        )

    async def record_many(
        self, records: Sequence[JobRecord], *, worker: str, history_limit: int = 20
    ) -> list[list[str]]:
        """The Deliverer's path (group commit): fails as ``record`` does."""
        if any(r.message_id in self.failing for r in records):
            self.failures += 1
            msg = "disk full (injected)"
            raise StoreError(msg)
        return await super().record_many(
            records, worker=worker, history_limit=history_limit
        )


def email(*to: str) -> Email:
    return Email(sender=SENDER, to=list(to), subject="hi", text="Hello.\n")


# -- finding 2: any number of recipients -------------------------------------------


async def test_2001_recipients_for_one_destination_each_sent_once(
    smtpd: SMTPDServers,
) -> None:
    """2,001 recipients (more than 20 transactions of the default 100) are all
    delivered, each exactly once, and the Deliverer goes on."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    recipients = [f"r{i}@example.org" for i in range(2001)]
    async with Deliverer(relay_config(server.port), store=MemoryStore()) as d:
        handle = await d.submit(email(*recipients))
        # A hang guard, not a timing: 2,001 recipients take 7 s on a busy
        # 2-core machine, more than the usual DEADLINE under a heavier load.
        with anyio.fail_after(50):
            status = await handle
    assert all(r.state is DELIVERED for r in status), status.by_state(DEFERRED)[:3]
    sent = [a for m in server.messages for a in m.rcpt_tos]
    assert sorted(sent) == sorted(recipients)
    assert len(server.messages) == 21


async def test_each_transaction_is_recorded_as_it_ends(smtpd: SMTPDServers) -> None:
    """A job of several transactions records each one: when the third fails,
    the first four recipients stay DELIVERED and are never sent again."""
    handler = FaultHandler(rcpt_replies={"r4@example.org": "421 4.3.2 going down"})
    server = await smtpd.start(handler)
    recipients = [f"r{i}@example.org" for i in range(6)]
    config = relay_config(server.port)
    config = attrs.evolve(
        config, limits=attrs.evolve(config.limits, max_recipients_per_transaction=2)
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email(*recipients))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.state is DEFERRED:
                    break
        handler.rcpt_replies.clear()
        status = await done(handle)
    assert all(r.state is DELIVERED for r in status)
    sent = [a for m in server.messages for a in m.rcpt_tos]
    assert sorted(sent) == sorted(recipients)  # nobody twice
    assert [status.recipient(a).attempts for a in recipients] == [1, 1, 1, 1, 2, 2]


# -- finding 3: exceptions inside a job are contained -------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_message_purged_while_in_flight(
    smtpd: SMTPDServers, tmp_path: Path, kind: str
) -> None:
    """A message cancelled and purged during its transaction: the outcome is
    dropped quietly and the Deliverer delivers the next message."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q")
    async with Deliverer(relay_config(server.port), store=store) as d:
        first = await d.submit(email("a@example.org"))
        with anyio.fail_after(DEADLINE):
            await handler.stalled.wait()
        assert await d.cancel(first.message_id) == 1
        later = datetime.now(UTC) + timedelta(days=1)
        assert await store.purge(finished_before=later) == 1
        handler.stall_at = None
        handler.release.set()
        second = await done(await d.submit(email("b@example.org")))
    assert second.is_delivered
    assert [m.rcpt_tos for m in server.messages] == [
        ["a@example.org"],
        ["b@example.org"],
    ]


async def test_store_error_while_postponing_is_contained(
    smtpd: SMTPDServers, job_failures: LogEvent
) -> None:
    """A store failure while a job waits out its destination's backoff is
    contained: logged with its traceback, the Deliverer goes on, and once the
    store works again the message is delivered."""
    handler = FaultHandler(rcpt_replies={"a@example.org": "421 4.3.2 busy"})
    server = await smtpd.start(handler)
    store = RecordFails()
    retry = RetryPolicy(initial_delay=0.3, jitter=0, max_delay=0.3)
    config = relay_config(server.port, retry=retry, lease_duration=0.6)
    async with Deliverer(config, store=store) as d:
        stream = d.events()
        first = await d.submit(email("a@example.org"))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.state is DEFERRED:
                    break  # the destination is now backed off for 0.3 s
        second = await d.submit(email("b@example.org"))
        store.failing.add(second.message_id)
        with anyio.fail_after(DEADLINE):
            await job_failures.seen.wait()
        store.failing.clear()
        handler.rcpt_replies.clear()
        statuses = [await done(first), await done(second)]
    assert all(s.is_delivered for s in statuses)
    [record] = job_failures.records[:1]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.__dict__["message_id"] == second.message_id


# -- finding 4: a job that cannot record lets its lease go --------------------------


async def test_unrecordable_outcome_is_retried_after_the_lease(
    smtpd: SMTPDServers, job_failures: LogEvent
) -> None:
    """When the store refuses an outcome for longer than the job waits, the job
    ends, its lease is no longer renewed, and the message is delivered again
    (and recorded) once the lease ran out: `await handle` does not hang."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    store = RecordFails()
    lease = 0.6
    config = relay_config(server.port, lease_duration=lease)
    async with Deliverer(config, store=store) as d:
        handle = await d.submit(email("a@example.org"))
        store.failing.add(handle.message_id)
        with anyio.fail_after(DEADLINE):
            await job_failures.seen.wait()
        # The job gave up: this process holds nothing, so nothing is renewed, and
        # only the lease running out can bring the message back (before, every
        # lease of the worker was renewed for as long as it lived: a hang).
        assert (await d.statistics()).jobs_in_memory == 0
        store.failing.clear()
        status = await done(handle)
    assert status.is_delivered
    # Sent twice: the first outcome could never be written (the documented window).
    assert len(server.messages) == 2


async def test_transient_record_failure_is_written_again(smtpd: SMTPDServers) -> None:
    """A store that fails a few times when an outcome is written loses nothing:
    the outcome is written again and the message is sent once."""

    class FailsThrice(MemoryStore):
        left = 3

        async def record(
            self,
            message_id: str,
            statuses: Sequence[RecipientStatus],
            *,
            worker: str,
            lease: str | None = None,
            history: Sequence[AttemptRecord] = (),
            history_limit: int = 20,
        ) -> list[str]:
            if self.left:
                self.left -= 1
                msg = "database is locked (injected)"
                raise StoreError(msg)
            return await super().record(
                message_id,
                statuses,
                worker=worker,
                lease=lease,
                history=history,
                history_limit=history_limit,
            )

        async def record_many(
            self, records: Sequence[JobRecord], *, worker: str, history_limit: int = 20
        ) -> list[list[str]]:
            if self.left:
                self.left -= 1
                msg = "database is locked (injected)"
                raise StoreError(msg)
            return await super().record_many(
                records, worker=worker, history_limit=history_limit
            )

    handler = FaultHandler()
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server.port), store=FailsThrice()) as d:
        status = await done(await d.submit(email("a@example.org")))
    assert status.is_delivered
    assert len(server.messages) == 1


# -- the job boundary, for a bug in a transport --------------------------------------


async def test_routing_bug_defers_the_job_and_the_deliverer_goes_on(
    smtpd: SMTPDServers,
) -> None:
    """A transport whose destination() raises for one address: that message is
    DEFERRED with a local reason and no reply code; other mail is delivered."""
    from mailstrom_async.testing import Outbox

    class Buggy(Outbox):
        def destination(self, address: str) -> str:
            if address.startswith("bug@"):
                msg = "routing table is broken"
                raise RuntimeError(msg)
            return super().destination(address)

    outbox = Buggy()
    config = relay_config(1, retry=RetryPolicy(initial_delay=600, jitter=0))
    async with Deliverer(config, store=MemoryStore(), transport=outbox) as d:
        stream = d.events()
        bad = await d.submit(email("bug@example.org"))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.previous_state is not None:
                    break
        good = await done(await d.submit(email("ok@example.org")))
        status = await d.status(bad.message_id)
        [attempt] = await d.history(bad.message_id)
    assert good.is_delivered
    [r] = status
    assert r.state is DEFERRED
    assert r.code is None
    assert r.message == "local error: RuntimeError: routing table is broken"
    assert r.attempts == 1
    assert r.next_attempt_at is not None
    # The job boundary's outcome has its history entry too: a local one.
    assert (attempt.attempt, attempt.state, attempt.code) == (1, DEFERRED, None)
    assert (attempt.enhanced_code, attempt.message) == ("4.3.0", r.message)
    assert attempt.is_local


# -- finding 6: the lifetime is never overrun ---------------------------------------


async def test_postponed_job_is_tried_at_the_end_of_its_lifetime(
    smtpd: SMTPDServers,
) -> None:
    """A job postponed behind a long destination backoff is due at the end of its
    lifetime, not later; its last attempt is made then."""
    handler = FaultHandler(rcpt_replies={"a@example.org": "421 4.3.2 busy"})
    server = await smtpd.start(handler)
    lifetime = 1.0
    retry = RetryPolicy(initial_delay=30, jitter=0, max_delay=30, lifetime=lifetime)
    async with Deliverer(
        relay_config(server.port, retry=retry), store=MemoryStore()
    ) as d:
        stream = d.events()
        first = await d.submit(email("a@example.org"))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.state is DEFERRED:
                    break  # backed off for 30 s, far past every lifetime here
        second = await d.submit(email("b@example.org"))
        end = (await d.status(second.message_id)).submitted_at + timedelta(
            seconds=lifetime
        )
        a, b = await done(first), await done(second)
    [ra], [rb] = a.recipients, b.recipients
    assert (ra.state, ra.enhanced_code, ra.attempts) == (FAILED, "5.4.7", 2)
    assert rb.state is DELIVERED
    assert rb.attempts == 1
    assert rb.last_attempt_at is not None
    assert end <= rb.last_attempt_at < end + timedelta(seconds=5)


# -- finding 5: a dead owner's leases are taken back at once ------------------------


async def _pid_of_exited() -> int:
    async with await anyio.open_process([sys.executable, "-c", "pass"]) as process:
        await process.wait()
        return process.pid


def owner_with(**changes: object) -> str:
    return str(attrs.evolve(current_owner(), **changes))  # type: ignore[arg-type]


async def leased_message(store: Store, owner: str, message_id: str) -> None:
    now = datetime.now(UTC)
    await store.add(
        NewMessage(
            message_id=message_id,
            mail_from=SENDER,
            recipients=("a@example.org",),
            data=b"Subject: hi\r\n\r\nHello.\r\n",
            submitted_at=now,
        ),
        claim_for=owner,
        lease_until=now + timedelta(hours=1),
    )


async def test_dead_local_owner_is_reclaimed_at_start(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Mail leased for an hour by a process of this host that is gone is
    delivered as soon as a Deliverer starts, not an hour later."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    path = tmp_path / "queue.sqlite3"
    dead = owner_with(pid=await _pid_of_exited(), start_time="1")
    assert liveness(dead) is Liveness.DEAD
    async with SQLiteStore(path) as store:
        await leased_message(store, dead, "m1@example.com")
    async with Deliverer(relay_config(server.port), store=SQLiteStore(path)) as d:
        status = await done(SubmitHandle(d, "m1@example.com", created=False))
    assert status.is_delivered


async def test_live_and_foreign_owners_leases_are_never_broken(
    smtpd: SMTPDServers,
) -> None:
    """A live local owner's and another host's leases survive a start and
    release_leases(); once the local owner is gone, release_leases() frees them."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    store = MemoryStore()
    script = "import sys; sys.stdin.read()"
    async with await anyio.open_process([sys.executable, "-c", script]) as child:
        started = await anyio.to_thread.run_sync(_start_time, child.pid)
        alive = owner_with(pid=child.pid, start_time=started)
        foreign = owner_with(host="elsewhere")
        await store.open()
        await leased_message(store, alive, "alive@example.com")
        await leased_message(store, foreign, "foreign@example.com")
        async with Deliverer(relay_config(server.port), store=store) as d:
            owners = {o.owner: o for o in await d.leases()}
            assert owners[alive].liveness is Liveness.ALIVE
            assert owners[foreign].liveness is Liveness.UNKNOWN
            assert owners[foreign].host == "elsewhere"
            for owner in (alive, foreign):
                with pytest.raises(LiveLeaseError, match="not broken"):
                    await d.release_leases(owner)
            assert await d.release_leases() == 0
            assert not server.messages
            assert child.stdin is not None
            await child.stdin.aclose()
            await child.wait()
            assert await d.release_leases(alive) == 1
            status = await done(SubmitHandle(d, "alive@example.com", created=False))
            assert status.is_delivered
            assert {o.owner for o in await d.leases()} == {foreign}
