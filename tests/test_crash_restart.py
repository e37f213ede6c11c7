"""kill -9 with real processes: nothing acknowledged is ever lost (DESIGN §5, crash).

A child Python process (tests/crash_child.py) runs a Deliverer on a SQLite file
and is SIGKILLed; the parent then reopens the same file and checks that every
message the child had acknowledged is there and ends DELIVERED (duplicates
allowed, losses never). The kill cycles (tests/kill_cycles.py) do it again and
again with the default configuration and check the recovery after the last kill.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import Config, RecipientState, RelayConfig, RetryPolicy, Timeouts
from mailstrom_async._deliverer import Deliverer, SubmitHandle
from mailstrom_async._store import SQLiteStore
from tests.crash import DEADLINE, message_id_of, running_child
from tests.kill_cycles import run_kill_cycles
from tests.smtpd import FaultHandler, Received, SMTPDServers, smtpd_fixture  # noqa: F401

if TYPE_CHECKING:
    from mailstrom_async._models import MessageStatus
    from tests.kill_books import Report


def relay_config(port: int) -> Config:
    return Config(
        helo_name="parent.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        retry=RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5),
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=5),
        poll_interval=0.2,
    )


def message_id(received: Received) -> str:
    return message_id_of(received.content)


async def final_statuses(d: Deliverer, ids: list[str]) -> list[MessageStatus]:
    with anyio.fail_after(DEADLINE):
        return [await SubmitHandle(d, i, created=False) for i in ids]


@pytest.mark.parametrize("kill_after", [1, 7, 30])
async def test_killed_producer_loses_no_acked_message(
    smtpd: SMTPDServers, tmp_path: Path, kill_after: int
) -> None:
    """Every id a SIGKILLed submit-only process acknowledged is stored and then delivered."""
    server = await smtpd.start()
    db = tmp_path / "queue.sqlite3"
    async with running_child("submit", db, server.port) as child:
        await child.wait_acked(kill_after)
        await child.kill()
    assert child.process.returncode == -signal.SIGKILL
    acked = await child.acked()
    assert len(acked) >= kill_after
    assert len(set(acked)) == len(acked)

    # Every acknowledged message is in the store as the child left it.
    async with SQLiteStore(db) as store:
        for mid in acked:
            [r] = await store.status(mid)
            assert r.state is RecipientState.QUEUED
            assert r.attempts == 0
    assert server.messages == []  # the child only submitted

    async with Deliverer(relay_config(server.port), store=SQLiteStore(db)) as d:
        statuses = await final_statuses(d, acked)
    assert all(s.is_delivered for s in statuses)
    delivered = Counter(message_id(m) for m in server.messages)
    assert set(acked) <= set(delivered)
    # Nothing was in flight when the child died: each message went out once.
    assert all(count == 1 for count in delivered.values())


async def test_worker_killed_mid_data_resends_after_lease(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A worker SIGKILLed after its final dot leaves a lease that expires; the next run re-sends."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    db = tmp_path / "queue.sqlite3"
    async with running_child("deliver", db, server.port) as child:
        with anyio.move_on_after(DEADLINE):
            await handler.stalled.wait()  # the server holds the whole message
        if not handler.stalled.is_set():
            pytest.fail(f"the child never reached DATA:\n{await child.stderr()}")
        await child.kill()
    assert child.process.returncode == -signal.SIGKILL
    [acked] = await child.acked()
    handler.stall_at = None
    with anyio.fail_after(DEADLINE):
        await server.disconnections.wait_for(1)

    async with SQLiteStore(db) as store:
        [r] = await store.status(acked)
    assert r.state is RecipientState.QUEUED  # the child recorded no outcome

    async with Deliverer(relay_config(server.port), store=SQLiteStore(db)) as d:
        [status] = await final_statuses(d, [acked])
    [r] = status
    assert r.state is RecipientState.DELIVERED
    assert r.attempts == 1  # the killed attempt was never recorded
    # At least once: the server got the message again after the restart (the
    # killed worker's copy counts), never zero times; and nothing else.
    received = [message_id(m) for m in server.messages]
    assert set(received) == {acked}
    assert len(received) >= 2
    assert server.messages[-1].reply == "250 2.0.0 OK"


#: The kill plan's seed; ``nox -s soak -- --cycles 20 --seed 5321`` replays it.
KILL_CYCLES_SEED = 5321


@pytest.fixture(scope="module")
async def kill_cycles(tmp_path_factory: pytest.TempPathFactory) -> Report:
    """20 SIGKILLs of a delivering process on one SQLite file, default configuration,
    then a recovery run (see tests/kill_cycles.py); shared by the tests below."""
    directory = tmp_path_factory.mktemp("kill-cycles")
    return await run_kill_cycles(directory, cycles=20, seed=KILL_CYCLES_SEED)


@pytest.mark.timeout(120)
async def test_kill_cycles_lose_no_acked_message(kill_cycles: Report) -> None:
    """Every acked id is in the store after every kill, and every extra copy the
    server got came from a child killed before it could commit that outcome."""
    report = kill_cycles
    assert {c.kind for c in report.cycles} == {"random", "mid-data", "after-250"}
    assert report.acked
    assert report.problems_found == [], report.summary()
    assert report.lost == [], report.summary()
    assert report.unexplained == {}, report.summary()
    # The last kill left work in flight, leased by a dead owner: something to recover.
    assert report.in_flight_at_last_kill > 0, report.summary()
    assert report.earliest_lease_end is not None, report.summary()


@pytest.mark.timeout(120)
async def test_kill_cycles_recover_before_dead_leases_expire(
    kill_cycles: Report,
) -> None:
    """After the last kill, a restarted process finishes every acked message before
    the earliest lease the dead children left would have ended: it reclaimed them."""
    report = kill_cycles
    assert report.problems() == [], report.summary()
    assert report.recovery is not None
    assert report.earliest_lease_end is not None
    assert report.recovery["done"] < report.earliest_lease_end
