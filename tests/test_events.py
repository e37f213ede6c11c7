"""Tests for mailstrom_async._events: fan-out of delivery events to subscribers."""

from __future__ import annotations

import gc
import inspect
from datetime import UTC, datetime

import anyio
import anyio.lowlevel
import pytest

from mailstrom_async import DeliveryEvent, RecipientState, RecipientStatus
from mailstrom_async._events import EventBroker, EventStream

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def _event(n: int) -> DeliveryEvent:
    return DeliveryEvent(
        message_id=f"m{n}",
        recipient=RecipientStatus(address=f"r{n}@example.com"),
        previous_state=None,
        at=T0,
    )


def _ids(events: list[DeliveryEvent]) -> list[str]:
    return [e.message_id for e in events]


async def _read_all(stream: EventStream) -> list[DeliveryEvent]:
    return [event async for event in stream]


async def test_subscriber_receives_events_in_order() -> None:
    """A subscriber gets every event published after it subscribed, in order."""
    broker = EventBroker()
    broker.publish(_event(0))  # before anyone subscribed: nobody gets it
    received: list[DeliveryEvent] = []
    subscribed = anyio.Event()

    async def reader() -> None:
        stream = broker.subscribe()
        subscribed.set()
        received.extend(await _read_all(stream))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await subscribed.wait()
        for n in range(1, 6):
            broker.publish(_event(n))
        broker.close()

    assert _ids(received) == ["m1", "m2", "m3", "m4", "m5"]
    assert all(e.missed == 0 for e in received)


async def test_reader_waiting_is_woken_by_publish() -> None:
    """A reader blocked on an empty stream wakes up for each published event."""
    broker = EventBroker()
    stream = broker.subscribe()
    got_first = anyio.Event()
    received: list[DeliveryEvent] = []

    async def reader() -> None:
        async for event in stream:
            received.append(event)
            got_first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.lowlevel.checkpoint()  # let the reader block on the empty stream
        broker.publish(_event(1))
        await got_first.wait()
        broker.publish(_event(2))
        broker.close()

    assert _ids(received) == ["m1", "m2"]


async def test_several_subscribers_each_get_every_event() -> None:
    """Every subscriber receives every event, independently of the others."""
    broker = EventBroker()
    results: dict[int, list[DeliveryEvent]] = {}
    ready = [anyio.Event() for _ in range(3)]

    async def reader(i: int) -> None:
        stream = broker.subscribe()
        ready[i].set()
        results[i] = await _read_all(stream)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(reader, i)
        for event in ready:
            await event.wait()
        assert broker.subscriber_count == 3
        for n in range(4):
            broker.publish(_event(n))
        broker.close()

    assert {i: _ids(r) for i, r in results.items()} == {
        i: ["m0", "m1", "m2", "m3"] for i in range(3)
    }


async def test_slow_subscriber_gets_newest_and_missed_count() -> None:
    """A subscriber whose buffer overflowed gets the newest events, the first with missed set."""
    broker = EventBroker(max_buffer=3)
    stream = broker.subscribe()
    for n in range(5):
        broker.publish(_event(n))
    broker.close()
    events = await _read_all(stream)
    assert _ids(events) == ["m2", "m3", "m4"]
    assert [e.missed for e in events] == [2, 0, 0]


async def test_missed_count_resets_and_accumulates_again() -> None:
    """After reporting a gap, missed counts only the events lost since then."""
    broker = EventBroker(max_buffer=2)
    stream = broker.subscribe()
    for n in range(4):  # m0, m1 lost
        broker.publish(_event(n))
    first = await stream.__anext__()
    assert (first.message_id, first.missed) == ("m2", 2)
    for n in range(4, 7):  # buffer [m3] + m4, m5, m6: m3, m4 lost
        broker.publish(_event(n))
    broker.close()
    rest = await _read_all(stream)
    assert [(e.message_id, e.missed) for e in rest] == [("m5", 2), ("m6", 0)]


async def test_slow_subscriber_does_not_affect_fast_one() -> None:
    """One subscriber overflowing its buffer does not drop events for another."""
    broker = EventBroker(max_buffer=2)
    slow = broker.subscribe()
    fast = broker.subscribe()
    broker.publish(_event(0))
    assert (await fast.__anext__()).missed == 0
    broker.publish(_event(1))
    assert (await fast.__anext__()).message_id == "m1"
    broker.publish(_event(2))
    broker.close()
    assert [(e.message_id, e.missed) for e in await _read_all(fast)] == [("m2", 0)]
    assert [(e.message_id, e.missed) for e in await _read_all(slow)] == [
        ("m1", 1),
        ("m2", 0),
    ]


async def test_close_ends_iteration_after_buffered_events() -> None:
    """close() lets a subscriber read what is buffered, then ends its iteration."""
    broker = EventBroker()
    stream = broker.subscribe()
    broker.publish(_event(1))
    broker.publish(_event(2))
    broker.close()
    broker.publish(_event(3))  # after close: goes nowhere
    assert _ids(await _read_all(stream)) == ["m1", "m2"]
    assert broker.subscriber_count == 0
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_close_wakes_a_waiting_reader() -> None:
    """close() ends the iteration of a reader blocked on an empty stream."""
    broker = EventBroker()
    finished = anyio.Event()
    subscribed = anyio.Event()
    received: list[DeliveryEvent] = []

    async def reader() -> None:
        stream = broker.subscribe()
        subscribed.set()
        received.extend(await _read_all(stream))
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await subscribed.wait()
        await anyio.lowlevel.checkpoint()
        broker.close()
        await finished.wait()
    assert received == []


async def test_subscribe_after_close_yields_nothing() -> None:
    """A stream subscribed after close() ends at once and is not counted."""
    broker = EventBroker()
    broker.close()
    stream = broker.subscribe()
    assert broker.subscriber_count == 0
    broker.publish(_event(1))
    assert await _read_all(stream) == []


async def test_aclose_unsubscribes() -> None:
    """aclose() unsubscribes at once and drops buffered events."""
    broker = EventBroker()
    stream = broker.subscribe()
    other = broker.subscribe()
    assert broker.subscriber_count == 2
    broker.publish(_event(1))
    await stream.aclose()
    assert broker.subscriber_count == 1
    broker.publish(_event(2))
    assert await _read_all(stream) == []
    await stream.aclose()  # a second close is harmless
    assert broker.subscriber_count == 1
    broker.close()
    assert _ids(await _read_all(other)) == ["m1", "m2"]


async def test_aclose_after_broker_close_is_harmless() -> None:
    """aclose() on a stream whose broker already closed does nothing more."""
    broker = EventBroker()
    stream = broker.subscribe()
    broker.close()
    await stream.aclose()
    assert broker.subscriber_count == 0
    assert await _read_all(stream) == []


async def test_async_with_unsubscribes() -> None:
    """Leaving `async with stream` unsubscribes it, even when leaving early."""
    broker = EventBroker()
    for n in range(3):
        broker.publish(_event(n))  # nobody listening yet
    async with broker.subscribe() as stream:
        assert broker.subscriber_count == 1
        broker.publish(_event(10))
        broker.publish(_event(11))
        async for event in stream:
            assert event.message_id == "m10"
            break
    assert broker.subscriber_count == 0


async def test_aclose_wakes_a_reader_in_another_task() -> None:
    """aclose() from another task ends the iteration of a blocked reader."""
    broker = EventBroker()
    stream = broker.subscribe()
    finished = anyio.Event()

    async def reader() -> None:
        assert await _read_all(stream) == []
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.lowlevel.checkpoint()
        await stream.aclose()
        await finished.wait()
    assert broker.subscriber_count == 0


async def test_dropped_stream_is_unsubscribed_after_gc() -> None:
    """A stream dropped without closing is unsubscribed once garbage-collected."""
    broker = EventBroker()
    kept = broker.subscribe()
    stream: EventStream | None = broker.subscribe()
    assert broker.subscriber_count == 2
    del stream
    gc.collect()
    assert broker.subscriber_count == 1
    broker.publish(_event(1))  # publishing to the survivors still works
    broker.close()
    assert _ids(await _read_all(kept)) == ["m1"]


async def test_publish_never_blocks() -> None:
    """Publishing 10_000 events with nobody reading completes; the reader learns what it missed."""
    broker = EventBroker(max_buffer=100)
    assert not inspect.iscoroutinefunction(broker.publish)  # cannot await anything
    stream = broker.subscribe()
    for n in range(10_000):
        broker.publish(_event(n))
    broker.close()
    events = await _read_all(stream)
    assert len(events) == 100
    assert events[0].message_id == "m9900"
    assert events[0].missed == 9_900
    assert events[-1].message_id == "m9999"
    assert sum(e.missed for e in events) == 9_900


async def test_default_buffer_holds_ten_thousand() -> None:
    """With the default buffer, 10_000 unread events are all kept."""
    broker = EventBroker()
    stream = broker.subscribe()
    for n in range(10_001):
        broker.publish(_event(n))
    broker.close()
    events = await _read_all(stream)
    assert len(events) == 10_000
    assert events[0].missed == 1


async def test_event_with_state_is_delivered_unchanged() -> None:
    """Events reach subscribers as published (missed aside)."""
    broker = EventBroker()
    stream = broker.subscribe()
    event = DeliveryEvent(
        message_id="m",
        recipient=RecipientStatus(
            address="a@example.com", state=RecipientState.DELIVERED
        ),
        previous_state=RecipientState.DEFERRED,
        at=T0,
    )
    broker.publish(event)
    assert await stream.__anext__() is event


async def test_broker_unsubscribe_unknown_stream_is_harmless() -> None:
    """unsubscribe() of a stream the broker does not hold does nothing."""
    broker = EventBroker()
    other = EventBroker().subscribe()
    broker.unsubscribe(other)
    assert broker.subscriber_count == 0
