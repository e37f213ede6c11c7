"""Deliverer.follow(): one message's status, then each change, until it is done."""

from __future__ import annotations

import gc
import signal
from contextlib import aclosing
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import (
    Config,
    Deliverer,
    DelivererClosedError,
    Email,
    MemoryStore,
    MessageStatus,
    RecipientState,
    RelayConfig,
    SQLiteStore,
    StatusStream,
    UnknownMessageError,
)
from tests.smtpd import FaultHandler

if TYPE_CHECKING:
    from tests.smtpd import SMTPDServer, SMTPDServers

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED
# Streams that would re-read the store only after an hour: whatever they report
# within a test came from a change this process made, or from the close.
NO_POLL = 3600.0


def email(*to: str) -> Email:
    return Email(sender="sender@example.com", to=list(to), subject="s", text="t\n")


def relay(server: SMTPDServer, *, poll_interval: float = NO_POLL) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        poll_interval=poll_interval,
    )


def states(status: MessageStatus) -> list[RecipientState]:
    return [r.state for r in status.recipients]


async def test_follow_gives_the_status_then_each_change_until_done(
    smtpd: SMTPDServers,
) -> None:
    """Queued first; delivered only once the server accepts; then the end."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    async with Deliverer(relay(server), store=MemoryStore()) as deliverer:
        handle = await deliverer.submit(email("ada@example.org", "bob@example.net"))
        with anyio.fail_after(30):
            async with deliverer.follow(handle.message_id) as statuses:
                first = await anext(statuses)
                assert states(first) == [QUEUED, QUEUED]
                assert not first.is_done
                await handler.stalled.wait()  # in flight: nothing has changed
                handler.release.set()
                rest = [status async for status in statuses]
        assert [states(s) for s in rest] == [[DELIVERED, DELIVERED]]
        assert rest[-1] == await deliverer.status(handle.message_id)
        assert [status async for status in statuses] == []  # ended for good
        assert deliverer._watchers._follows == {}  # it stopped watching


async def test_follow_a_done_message_gives_one_status(smtpd: SMTPDServers) -> None:
    """A message done before it is followed: its final status, and the end."""
    server = await smtpd.start(FaultHandler())
    async with Deliverer(relay(server), store=MemoryStore()) as deliverer:
        handle = await deliverer.submit(email("ada@example.org"))
        with anyio.fail_after(30):
            final = await handle
            assert [s async for s in deliverer.follow(handle.message_id)] == [final]


async def test_follow_an_unknown_message_raises() -> None:
    """An unknown id raises UnknownMessageError when awaited, entered or iterated."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as deliverer:
        with pytest.raises(UnknownMessageError, match=r"nope@example\.com"):
            await deliverer.follow("nope@example.com")
        with pytest.raises(UnknownMessageError):
            async with deliverer.follow("nope@example.com"):
                pass
        with pytest.raises(UnknownMessageError):
            async for _ in deliverer.follow("nope@example.com"):
                pass
        assert deliverer._watchers._follows == {}
    with pytest.raises(DelivererClosedError, match="closed"):
        deliverer.follow("nope@example.com")


async def test_awaiting_the_stream_reads_the_first_status() -> None:
    """``await follow()`` reads the status then; iterating gives it first."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as deliverer:
        handle = await deliverer.submit(email("ada@example.org"))
        stream = await deliverer.follow(handle.message_id)
        assert isinstance(stream, StatusStream)
        assert await stream is stream  # awaiting again reads nothing more
        assert repr(stream) == f"<StatusStream {handle.message_id!r}>"
        await deliverer.cancel(handle.message_id)
        async with aclosing(stream):
            [first, last] = [s async for s in stream]
    assert states(first) == [QUEUED]
    assert states(last) == [FAILED]


async def test_changes_while_the_consumer_is_busy_come_as_one_status() -> None:
    """Two changes between two reads: one status, the latest, which ends it."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as deliverer:
        handle = await deliverer.submit(email("ada@example.org", "bob@example.net"))
        message_id = handle.message_id
        async with deliverer.follow(message_id) as statuses:
            first = await anext(statuses)
            # Held (no wake-up of its own), then cancelled: both land before the
            # stream reads again.
            await deliverer.hold(message_id=message_id)
            await deliverer.cancel(message_id)
            rest = [status async for status in statuses]
    assert states(first) == [QUEUED, QUEUED]
    assert [states(s) for s in rest] == [[FAILED, FAILED]]
    assert rest[0].is_done


async def test_follow_ends_when_the_deliverer_closes(smtpd: SMTPDServers) -> None:
    """A message waiting for a retry: the stream ends at the close, not done."""
    handler = FaultHandler(rcpt_replies={"ada@example.org": "451 4.3.0 try later"})
    server = await smtpd.start(handler)
    seen: list[MessageStatus] = []
    deferred = anyio.Event()
    with anyio.fail_after(30):
        # The task group outlives the Deliverer: consume() returns when
        # leaving the Deliverer's block closes it.
        async with (
            anyio.create_task_group() as tg,
            Deliverer(relay(server), store=MemoryStore()) as deliverer,
        ):
            handle = await deliverer.submit(email("ada@example.org"))
            statuses = await deliverer.follow(handle.message_id)

            async def consume() -> None:
                async for status in statuses:
                    seen.append(status)
                    if status.recipients[0].state is DEFERRED:
                        deferred.set()

            tg.start_soon(consume)
            await deferred.wait()
    assert seen[-1].recipients[0].state is DEFERRED
    assert seen[-1].recipients[0].code == 451
    assert not seen[-1].is_done


async def test_stop_following_ends_streams_and_keeps_the_deliverer_open() -> None:
    """stop_following(): open streams end; later ones give one status and end."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as deliverer:
        handle = await deliverer.submit(email("ada@example.org"))
        seen: list[MessageStatus] = []
        statuses = await deliverer.follow(handle.message_id)
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                seen.extend([status async for status in statuses])

            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()  # the first is read; it waits
            deliverer.stop_following()
        assert [states(s) for s in seen] == [[QUEUED]]
        later = [s async for s in deliverer.follow(handle.message_id)]
        assert [states(s) for s in later] == [[QUEUED]]
        assert not deliverer.is_closed
        assert states(await deliverer.status(handle.message_id)) == [QUEUED]


async def test_follow_in_a_submit_only_process_reads_the_store(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Submit-only: another process (here another Deliverer on the same file)
    delivers; the stream learns it by reading the store every poll_interval."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    path = str(tmp_path / "queue.sqlite3")
    config = relay(server, poll_interval=0.05)
    async with Deliverer(config, store=SQLiteStore(path), mode="submit") as web:
        handle = await web.submit(email("ada@example.org"))
        with anyio.fail_after(30):
            async with web.follow(handle.message_id) as statuses:
                assert states(await anext(statuses)) == [QUEUED]
                async with Deliverer(config, store=SQLiteStore(path), mode="deliver"):
                    await handler.stalled.wait()
                    handler.release.set()
                    rest = [status async for status in statuses]
    assert [states(s) for s in rest] == [[DELIVERED]]


async def test_a_stream_dropped_unclosed_stops_watching() -> None:
    """A stream nobody closed goes away with its last reference."""
    async with Deliverer(Config(), store=MemoryStore(), mode="submit") as deliverer:
        handle = await deliverer.submit(email("ada@example.org"))
        stream = await deliverer.follow(handle.message_id)
        assert len(deliverer._watchers._follows[handle.message_id]) == 1
        del stream
        gc.collect()
        await deliverer.cancel(handle.message_id)  # its wake-up finds nobody
        assert deliverer._watchers._follows == {}


async def test_stop_following_on_a_signal_then_the_previous_handler() -> None:
    """The signal ends the streams, then reaches the handler set before; leaving
    the block puts that handler back."""
    received: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    before = signal.signal(signal.SIGUSR1, previous)
    try:
        async with Deliverer(Config(), store=MemoryStore(), mode="submit") as d:
            handle = await d.submit(email("ada@example.org"))
            with d.stop_following_on(signal.SIGUSR1):
                assert signal.getsignal(signal.SIGUSR1) is not previous
                async with d.follow(handle.message_id) as statuses:
                    assert states(await anext(statuses)) == [QUEUED]
                    signal.raise_signal(signal.SIGUSR1)
                    with anyio.fail_after(10):
                        assert [s async for s in statuses] == []
            assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert received == [signal.SIGUSR1]


async def test_stop_following_on_outside_the_main_thread_does_nothing() -> None:
    """Signal handlers can be set only in the main thread: elsewhere, no-op."""
    before = signal.getsignal(signal.SIGINT)

    async def in_thread() -> None:
        async with Deliverer(Config(), store=MemoryStore(), mode="submit") as d:
            with d.stop_following_on():
                assert signal.getsignal(signal.SIGINT) is before

    await anyio.to_thread.run_sync(anyio.run, in_thread)
