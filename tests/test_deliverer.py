"""The Deliverer end to end against aiosmtpd on loopback: intake, status, events."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mailstrom_async import (
    Config,
    DelivererClosedError,
    InvalidAddressError,
    InvalidMessageError,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    Timeouts,
    UnknownMessageError,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email, prepare
from mailstrom_async._store import MemoryStore, SQLiteStore, Store
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers

FAST_RETRY = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5)
TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)


def relay_config(server: SMTPDServer, **overrides: object) -> Config:
    options: dict[str, object] = {
        "helo_name": "client.test",
        "relay": RelayConfig(host=server.host, port=server.port, tls="none"),
        "retry": FAST_RETRY,
        "timeouts": TIMEOUTS,
    }
    options.update(overrides)
    return Config(**options)  # type: ignore[arg-type]


def email(*to: str, bcc: tuple[str, ...] = ()) -> Email:
    return Email(
        sender="Sender <sender@example.com>",
        to=list(to) or ["rcpt@example.org"],
        bcc=list(bcc),
        subject="hello",
        text="Hello there.\n",
    )


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "queue.sqlite3")


async def test_submit_then_await_delivers(smtpd: SMTPDServers, store: Store) -> None:
    """A submitted message is delivered and its handle resolves to DELIVERED."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=store) as d:
        handle = await d.submit(email("one@example.org", "two@example.net"))
        status = await handle
    assert handle.created
    assert status.is_done
    assert status.is_delivered
    assert [r.address for r in status] == ["one@example.org", "two@example.net"]
    for r in status:
        assert r.state is RecipientState.DELIVERED
        assert r.attempts == 1
        assert r.code == 250
        assert r.host == "127.0.0.1"
        assert r.tls is False
        assert r.last_attempt_at is not None
        assert r.next_attempt_at is None
    [received] = server.messages
    assert received.rcpt_tos == ["one@example.org", "two@example.net"]
    assert received.mail_from == "sender@example.com"
    assert f"Message-ID: <{handle.message_id}>".encode() in received.content


async def test_bcc_is_delivered_but_not_shown(smtpd: SMTPDServers) -> None:
    """Bcc recipients get the message, and the message does not name them."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        status = await (
            await d.submit(email("to@example.org", bcc=("hidden@example.net",)))
        )
    assert status.is_delivered
    [received] = server.messages
    assert received.rcpt_tos == ["to@example.org", "hidden@example.net"]
    assert b"hidden@example.net" not in received.content


async def test_submit_returns_before_smtp(smtpd: SMTPDServers, tmp_path: Path) -> None:
    """submit returns while the server is stalled, with the message already durable."""
    handler = FaultHandler(stall_at="MAIL")
    server = await smtpd.start(handler)
    path = tmp_path / "queue.sqlite3"
    async with Deliverer(relay_config(server), store=SQLiteStore(path)) as d:
        handle = await d.submit(email())
        await handler.stalled.wait()  # the delivery is under way, stuck at MAIL
        # Another connection to the same file sees the committed message.
        async with SQLiteStore(path) as other:
            seen = await other.status(handle.message_id)
        assert seen.recipients[0].state is RecipientState.QUEUED
        assert not server.messages
        handler.stall_at = None
        handler.release.set()
        status = await handle
    assert status.is_delivered


async def test_events_follow_each_recipient(smtpd: SMTPDServers) -> None:
    """Every subscriber sees queued, then deferred, then delivered, in order."""
    handler = FaultHandler(rcpt_replies={"busy@example.org": "451 4.2.1 busy"})
    server = await smtpd.start(handler)
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        first, second = d.events(), d.events()
        handle = await d.submit(email("busy@example.org"))
        seen: list[tuple[RecipientState | None, RecipientState]] = []
        async for event in first:
            assert event.message_id == handle.message_id
            assert event.address == "busy@example.org"
            seen.append((event.previous_state, event.state))
            if event.state is RecipientState.DEFERRED:
                assert event.recipient.code == 451
                assert event.recipient.enhanced_code == "4.2.1"
                assert event.recipient.next_attempt_at is not None
                handler.rcpt_replies.clear()
            if event.state.is_final:
                break
        await first.aclose()
        status = await handle
        replay = []
        async for event in second:
            replay.append((event.previous_state, event.state))
            if event.state.is_final:
                break
    assert seen == [
        (None, RecipientState.QUEUED),
        (RecipientState.QUEUED, RecipientState.DEFERRED),
        (RecipientState.DEFERRED, RecipientState.DELIVERED),
    ]
    assert replay == seen
    assert status.recipient("busy@example.org").attempts == 2


async def test_status_any_time_and_unknown_id(smtpd: SMTPDServers) -> None:
    """status() answers for a known id and raises UnknownMessageError otherwise."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        handle = await d.submit(email())
        assert (await d.status(handle.message_id)).message_id == handle.message_id
        await handle
        assert (await handle.status()).is_delivered
        with pytest.raises(UnknownMessageError) as info:
            await d.status("nope@example.com")
    assert info.value.message_id == "nope@example.com"


async def test_idempotency_key_sends_once(smtpd: SMTPDServers) -> None:
    """A repeated submit with the same idempotency key returns the first message."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        first = await d.submit(email(), idempotency_key="order-42")
        second = await d.submit(email(), idempotency_key="order-42")
        await first
        await second
    assert second.message_id == first.message_id
    assert (first.created, second.created) == (True, False)
    assert len(server.messages) == 1


async def test_duplicate_message_id_is_refused(smtpd: SMTPDServers) -> None:
    """Submitting a message whose Message-ID is already stored is a clear error."""
    server = await smtpd.start()
    message = email().build()
    message["Message-ID"] = "<fixed@example.com>"
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        await (await d.submit(message))
        with pytest.raises(InvalidMessageError, match="already in the store"):
            await d.submit(message)
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            Email(sender="a@example.com", to=["no-at-sign"], text="x"),
            InvalidAddressError,
        ),
        (
            Email(sender="a@example.com", subject="x\r\nBcc: v@example.org"),
            InvalidMessageError,
        ),
        (Email(sender="a@example.com"), InvalidMessageError),
    ],
    ids=["bad-address", "header-injection", "no-recipients"],
)
async def test_bad_input_stores_nothing(
    smtpd: SMTPDServers, store: Store, message: Email, error: type[Exception]
) -> None:
    """Invalid input raises at submit and leaves nothing in the store."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=store) as d:
        with pytest.raises(error):
            await d.submit(message)
        summary = await store.summary()
    assert sum(summary.by_state.values()) == 0
    assert server.connections.value == 0


async def test_closed_deliverer_refuses_work(smtpd: SMTPDServers) -> None:
    """submit and status after close, and a second entry, raise DelivererClosedError."""
    server = await smtpd.start()
    d = Deliverer(relay_config(server), store=MemoryStore())
    with pytest.raises(DelivererClosedError):
        await d.submit(email())
    async with d:
        pass
    assert d.is_closed
    with pytest.raises(DelivererClosedError):
        await d.submit(email())
    with pytest.raises(DelivererClosedError):
        await d.status("x@example.com")
    with pytest.raises(DelivererClosedError):
        async with d:
            pass


async def test_events_end_when_deliverer_closes(smtpd: SMTPDServers) -> None:
    """An events() stream ends once the Deliverer has closed."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        stream = d.events()
        await (await d.submit(email()))
    received = [event.state async for event in stream]
    assert received == [RecipientState.QUEUED, RecipientState.DELIVERED]


async def test_restart_resumes_unfinished_work(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Messages accepted by a submit-only process are delivered by the next run."""
    server = await smtpd.start()
    path = tmp_path / "queue.sqlite3"
    config = relay_config(server)
    async with Deliverer(config, store=SQLiteStore(path), mode="submit") as producer:
        ids = [(await producer.submit(email())).message_id for _ in range(3)]
    assert server.connections.value == 0
    async with Deliverer(config, store=SQLiteStore(path)) as worker:
        statuses = [await worker._wait_done(i) for i in ids]
    assert all(s.is_delivered for s in statuses)
    assert len(server.messages) == 3


async def test_submit_only_and_deliver_only_share_a_file(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A web process that only submits and a worker that only delivers share one file."""
    server = await smtpd.start()
    path = tmp_path / "queue.sqlite3"
    config = relay_config(server, poll_interval=0.05)
    async with (
        Deliverer(config, store=SQLiteStore(path), mode="deliver"),
        Deliverer(config, store=SQLiteStore(path), mode="submit") as web,
    ):
        handles = [await web.submit(email(f"r{n}@example.org")) for n in range(3)]
        with anyio.fail_after(10):
            statuses = [await h for h in handles]
    assert all(s.is_delivered for s in statuses)
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "r0@example.org",
        "r1@example.org",
        "r2@example.org",
    ]


async def test_error_in_block_is_not_wrapped(smtpd: SMTPDServers) -> None:
    """An exception raised inside the async with block comes out as itself."""
    server = await smtpd.start()
    with pytest.raises(KeyError, match="mine"):
        async with Deliverer(relay_config(server), store=MemoryStore()):
            raise KeyError("mine")


async def test_outer_cancellation_closes_cleanly(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A cancel scope around the block closes the Deliverer and keeps the message."""
    handler = FaultHandler(stall_at="MAIL")
    server = await smtpd.start(handler)
    path = tmp_path / "queue.sqlite3"
    config = relay_config(server, shutdown_grace=0)
    with anyio.CancelScope() as scope:
        async with Deliverer(config, store=SQLiteStore(path)) as d:
            handle = await d.submit(email())
            await handler.stalled.wait()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with SQLiteStore(path) as store:
        status = await store.status(handle.message_id)
    assert status.recipients[0].state is RecipientState.QUEUED
    assert status.recipients[0].attempts == 0


async def test_submit_many_stores_and_delivers_a_batch(
    smtpd: SMTPDServers, store: Store
) -> None:
    """submit_many stores a batch at once and every message is delivered."""
    server = await smtpd.start()
    async with Deliverer(relay_config(server), store=store) as d:
        handles = await d.submit_many(
            [email(f"r{n}@example.org") for n in range(20)],
            idempotency_keys=[f"k{n}" for n in range(20)],
        )
        again = await d.submit_many([email()], idempotency_keys=["k3"])
        statuses = [await h for h in handles]
    assert all(s.is_delivered for s in statuses)
    assert again[0].message_id == handles[3].message_id
    assert not again[0].created
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(
        f"r{n}@example.org" for n in range(20)
    )


async def test_submit_many_is_all_or_nothing(smtpd: SMTPDServers, store: Store) -> None:
    """One invalid message in a batch stores none, and the error names its place."""
    server = await smtpd.start()
    bad = Email(sender="a@example.com", to=["not an address"], text="x")
    async with Deliverer(relay_config(server), store=store) as d:
        with pytest.raises(InvalidAddressError) as info:
            await d.submit_many([email(), email(), bad])
        with pytest.raises(ValueError, match="2 idempotency keys for 1 messages"):
            await d.submit_many([email()], idempotency_keys=["a", "b"])
        summary = await store.summary()
    assert "message #2 of the batch" in "".join(info.value.__notes__)
    assert sum(summary.by_state.values()) == 0
    assert server.connections.value == 0


async def test_submit_accepts_a_prepared_message(smtpd: SMTPDServers) -> None:
    """A PreparedMessage from prepare() is submitted as it is."""
    server = await smtpd.start()
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: raw\r\n\r\nbody\r\n"
    prepared = prepare(raw, mail_from="bounce@example.com", rcpt_to=["c@example.net"])
    async with Deliverer(relay_config(server), store=MemoryStore()) as d:
        status = await (await d.submit(prepared))
    assert status.is_delivered
    [received] = server.messages
    assert (received.mail_from, received.rcpt_tos) == (
        "bounce@example.com",
        ["c@example.net"],
    )
    assert received.content.endswith(b"body\r\n")
