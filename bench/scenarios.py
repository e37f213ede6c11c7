"""The library scenarios, each run in a child process by :mod:`bench._child`.

All use a relay configuration pointing at a loopback sink, ``helo_name`` set (no
DNS lookup) and ``Limits(connections_per_destination=10)``, like the raw pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3  # noqa: TID251 - bulk-filling a deep queue, outside the library
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import anyio

from bench._common import (
    HELO,
    SENDER,
    CpuClock,
    body,
    make_messages,
    percentile,
    raw_message,
    recipient,
    settle,
    vm_status_kib,
)
from bench._procs import LOOPBACK, read_child_result
from mailstrom_async import (
    Config,
    Deliverer,
    DeliveryEvent,
    Email,
    EventStream,
    Limits,
    MemoryStore,
    MessageStatus,
    NewMessage,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    SQLiteStore,
    Store,
    SubmitHandle,
    prepare,
)

__all__ = [
    "BENCH_RETRY",
    "app_like",
    "deep_fill",
    "deep_start",
    "submit_latency",
    "throughput",
]

#: The retry policy of the soft-reject scenario: retries within a fraction of a
#: second, so a run measures the retry path, not the wait.
BENCH_RETRY = RetryPolicy(initial_delay=0.05, jitter=0.1, max_delay=0.2)


def relay_config(port: int, *, fast_retry: bool = False) -> Config:
    return Config(
        helo_name=HELO,
        relay=RelayConfig(host=LOOPBACK, port=port, tls="none"),
        limits=Limits(connections_per_destination=10),
        retry=BENCH_RETRY if fast_retry else RetryPolicy(),
    )


def _store(params: dict[str, Any]) -> tuple[Store, Path | None]:
    if params["store"] == "memory":
        return MemoryStore(), None
    path = Path(params["tmpdir"]) / f"queue-{params['token']}.sqlite3"
    return SQLiteStore(path), path


def _remove_db(path: Path | None) -> int:
    """Delete a SQLite file and its WAL companions; return the main file's size."""
    if path is None:
        return 0
    size = path.stat().st_size if path.exists() else 0
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return size


class _Follower:
    """Drains a Deliverer's event stream, as an application's subscriber would."""

    def __init__(self, stream: EventStream, expected: int) -> None:
        self.stream = stream
        self.expected = expected
        self.by_state: Counter[str] = Counter()
        self.missed = 0
        self.first_delivered: float | None = None
        self.all_delivered: float | None = None
        self.delivering = anyio.Event()

    async def run(self) -> None:
        async for event in self.stream:
            self._seen(event)

    def _seen(self, event: DeliveryEvent) -> None:
        state = event.recipient.state
        self.by_state[state.name] += 1
        self.missed += event.missed
        if state is RecipientState.DELIVERED:
            delivered = self.by_state[state.name]
            if delivered == 1:
                self.first_delivered = time.perf_counter()
                self.delivering.set()
            if delivered == self.expected:
                self.all_delivered = time.perf_counter()


def _final_states(statuses: Sequence[MessageStatus]) -> tuple[Counter[str], int]:
    states: Counter[str] = Counter()
    attempts = 0
    for status in statuses:
        for r in status.recipients:
            states[r.state.name] += 1
            attempts += r.attempts
    return states, attempts


async def throughput(params: dict[str, Any]) -> dict[str, Any]:
    """Scenarios 1, 2 and 6: submit N messages, then await every handle.

    The clock runs from the first submit to the moment the last handle resolved
    (every recipient final). One subscriber drains ``events()`` throughout.
    """
    count: int = params["messages"]
    producers: int = params.get("producers", 1)
    messages = make_messages(
        count, params["token"], soft_every=params.get("soft_every", 0)
    )
    config = relay_config(params["port"], fast_retry=params.get("fast_retry", False))
    store, path = _store(params)
    settle()
    clock = CpuClock()
    results: list[MessageStatus] = []

    async def producer(mine: list[EmailMessage]) -> None:
        handles: list[SubmitHandle] = [await deliverer.submit(m) for m in mine]
        results.extend([await h for h in handles])

    async with Deliverer(config, store=store) as deliverer:
        follower = _Follower(deliverer.events(), count)
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.run)
            clock.start()
            async with anyio.create_task_group() as ptg:
                for i in range(producers):
                    ptg.start_soon(producer, messages[i::producers])
            clock.stop()
            await follower.stream.aclose()
    db_bytes = _remove_db(path)
    states, attempts = _final_states(results)
    last = follower.all_delivered
    return {
        "messages": count,
        "producers": producers,
        "store": params["store"],
        "seconds": clock.wall,
        "msgs_per_s": count / clock.wall,
        "cpu_ms_per_msg": 1000 * clock.cpu / count,
        "events_msgs_per_s": count / (last - clock.started) if last else None,
        "final_states": dict(states),
        "all_delivered": states["DELIVERED"] == count,
        "attempts": attempts,
        "events": dict(follower.by_state),
        "events_missed": follower.missed,
        "db_bytes": db_bytes,
    }


async def app_like(params: dict[str, Any]) -> dict[str, Any]:
    """The app-like run: *tasks* concurrent tasks (a web app's requests), each
    building an ``Email``, submitting it and awaiting its handle, then taking
    the next message. Durable (SQLite, ``synchronous=FULL``) and tracked.

    The clock runs from the first submit to the last handle resolved.
    """
    count: int = params["messages"]
    tasks: int = params.get("tasks", 200)
    token: str = params["token"]
    text = body()
    config = relay_config(params["port"])
    store, path = _store(params)
    numbers = iter(range(count))
    results: list[MessageStatus] = []
    settle()
    clock = CpuClock()

    async def request() -> None:
        for i in numbers:
            email = Email(
                sender=SENDER,
                to=[recipient(i, token)],
                subject=f"benchmark message {i}",
                text=text,
            )
            handle = await deliverer.submit(email)
            results.append(await handle)

    async with Deliverer(config, store=store) as deliverer:
        clock.start()
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(request)
        clock.stop()
    db_bytes = _remove_db(path)
    states, attempts = _final_states(results)
    return {
        "messages": count,
        "tasks": tasks,
        "store": params["store"],
        "seconds": clock.wall,
        "msgs_per_s": count / clock.wall,
        "cpu_ms_per_msg": 1000 * clock.cpu / count,
        "final_states": dict(states),
        "all_delivered": states["DELIVERED"] == count,
        "attempts": attempts,
        "db_bytes": db_bytes,
    }


async def submit_latency(params: dict[str, Any]) -> dict[str, Any]:
    """Scenario 3: many producers calling ``submit`` at once while delivering.

    ``input`` is what each call hands over: ``"email"`` (an ``EmailMessage``),
    ``"bytes"`` (pre-rendered bytes with an explicit envelope) or ``"prepared"``
    (a :class:`~mailstrom_async.PreparedMessage` made before the clock starts,
    so only the durable part is timed). With ``batch`` > 0 each producer calls
    ``submit_many`` with that many messages at a time instead. With ``split``, the
    producers' Deliverer only submits (``mode="submit"``) and a worker process
    (``mode="deliver"``) delivers from the same SQLite file meanwhile: the
    deployment the docs recommend when submit latency matters.

    Every call is timed on its own (a batch's latency is each of its messages'
    latency); the rate is the number of messages over the time from the first
    call to the last return. Every call commits before it returns (SQLite,
    ``synchronous=FULL``), so each message is durable.
    """
    count: int = params["messages"]
    producers: int = params["producers"]
    token: str = params["token"]
    kind: str = params.get("input", "email")
    batch: int = params.get("batch", 0)
    config = relay_config(params["port"])
    rcpts = [recipient(i, token) for i in range(count)]
    items: list[Any]
    if kind == "bytes":
        items = [raw_message(i, token) for i in range(count)]
    elif kind == "prepared":
        items = [prepare(m, config=config) for m in make_messages(count, token)]
    else:
        items = list(make_messages(count, token))
    store, path = _store(params)
    settle()
    latencies: list[float] = []
    clock = CpuClock()

    async def producer(mine: list[int]) -> None:
        if batch:
            for first in range(0, len(mine), batch):
                chunk = [items[i] for i in mine[first : first + batch]]
                start = time.perf_counter()
                await deliverer.submit_many(chunk)
                latencies.extend([time.perf_counter() - start] * len(chunk))
            return
        for i in mine:
            start = time.perf_counter()
            if kind == "bytes":
                await deliverer.submit(items[i], mail_from=SENDER, rcpt_to=[rcpts[i]])
            else:
                await deliverer.submit(items[i])
            latencies.append(time.perf_counter() - start)

    split: bool = params.get("split", False)
    delivered = 0
    if split:
        # A backlog as large as the run keeps the worker delivering throughout:
        # the clock starts once it has delivered its first message.
        backlog = [prepare(m, config=config) for m in make_messages(count, "b" + token)]
        async with _worker_process(params, path) as worker:
            async with Deliverer(config, store=store, mode="submit") as deliverer:
                await deliverer.submit_many(backlog)
                await worker.wait_for(b"delivering\n")
                before = (await deliverer.statistics()).delivered
                clock.start()
                async with anyio.create_task_group() as ptg:
                    for p in range(producers):
                        ptg.start_soon(producer, list(range(p, count, producers)))
                clock.stop()
                delivered = (await deliverer.statistics()).delivered - before
            await worker.stop()
    else:
        async with Deliverer(config, store=store) as deliverer:
            follower = _Follower(deliverer.events(), count)
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower.run)
                clock.start()
                async with anyio.create_task_group() as ptg:
                    for p in range(producers):
                        ptg.start_soon(producer, list(range(p, count, producers)))
                clock.stop()
                await follower.stream.aclose()
        delivered = follower.by_state["DELIVERED"]
    _remove_db(path)
    latencies.sort()
    return {
        "messages": count,
        "producers": producers,
        "input": kind,
        "batch": batch,
        "seconds": clock.wall,
        "submits_per_s": count / clock.wall,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1],
        "split": split,
        "delivered_while_submitting": delivered,
        "cpu_ms_per_submit": 1000 * clock.cpu / count,
    }


class _Worker:
    """A deliver-only Deliverer in a process of its own (``deliver_worker``)."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self._rest = b""

    async def wait_for(self, line: bytes) -> None:
        """Read the worker's output until *line*."""
        if self.process.stdout is None:  # pragma: no cover - opened with a pipe
            msg = "the worker has no stdout"
            raise RuntimeError(msg)
        with anyio.fail_after(60):
            while line not in self._rest:
                chunk = await self.process.stdout.receive()
                self._rest += chunk

    async def stop(self) -> int:
        """SIGTERM the worker; return how many recipients it delivered."""
        self.process.terminate()
        output = self._rest
        if self.process.stdout is not None:
            async for chunk in self.process.stdout:
                output += chunk
        await self.process.wait()
        result = read_child_result(output)
        if result is not None:
            return int(result["delivered"])
        msg = f"the worker gave no result: {output[-500:]!r}"
        raise RuntimeError(msg)


@contextlib.asynccontextmanager
async def _worker_process(
    params: dict[str, Any], path: Path | None, *, dsn: str | None = None
) -> AsyncIterator[_Worker]:
    """A ``deliver_worker`` child on the SQLite file *path* or, with *dsn*, on
    PostgreSQL."""
    if path is None and dsn is None:
        msg = "a worker process needs the SQLite or the PostgreSQL store"
        raise ValueError(msg)
    args: dict[str, Any] = {"port": params["port"]}
    if dsn is not None:
        args["dsn"] = dsn
    else:
        args["path"] = str(path)
    command = [sys.executable, "-m", "bench._child", "deliver_worker", json.dumps(args)]
    process = await anyio.open_process(command, stdin=subprocess.DEVNULL)
    worker = _Worker(process)
    try:
        await worker.wait_for(b"ready\n")
        yield worker
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


async def _say_when_delivering(events: EventStream) -> None:
    async for event in events:
        if event.state.value == "delivered":
            sys.stdout.write("delivering\n")
            sys.stdout.flush()
            return


async def deliver_worker(params: dict[str, Any]) -> dict[str, Any]:
    """A deliver-only Deliverer over *path* (or PostgreSQL's *dsn*) until
    SIGTERM; the other half of scenario 3's split variant and the workers of
    the PostgreSQL scenario."""
    config = relay_config(params["port"])
    store: Store
    if "dsn" in params:
        from mailstrom_async import PostgresStore

        store = PostgresStore(params["dsn"])
    else:
        store = SQLiteStore(params["path"])
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with Deliverer(config, store=store, mode="deliver") as deliverer:
            async with deliverer.events() as events, anyio.create_task_group() as tg:
                tg.start_soon(_say_when_delivering, events)
                sys.stdout.write("ready\n")
                sys.stdout.flush()
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()
            stats = await deliverer.statistics()
    return {"delivered": stats.since_start.delivered}


# -- scenario 4: a deep queue -------------------------------------------------


def _bulk_insert(path: str, count: int, token: str, start: float) -> None:
    """Copy the rows ``SQLiteStore.add`` wrote for message 0 into *count* - 1 more.

    The first message went in through the library, so the rows have exactly
    its layout; only identity, address and times change. ``synchronous=OFF``
    and 10,000 rows per transaction make a million messages take a minute or
    two instead of the better part of an hour.
    """
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        cur = db.execute("SELECT * FROM messages")
        msg_cols = [d[0] for d in cur.description]
        msg_row = list(cur.fetchone())
        cur = db.execute("SELECT * FROM recipients")
        rcpt_cols = [d[0] for d in cur.description]
        rcpt_row = list(cur.fetchone())
        m = {c: i for i, c in enumerate(msg_cols)}
        r = {c: i for i, c in enumerate(rcpt_cols)}
        # Column names come from the database itself, never from outside.
        insert_msg, insert_rcpt = (
            f"INSERT INTO {table} ({', '.join(cols)})"  # noqa: S608
            f" VALUES ({', '.join('?' * len(cols))})"
            for table, cols in (("messages", msg_cols), ("recipients", rcpt_cols))
        )
        chunk = 10_000
        for first in range(1, count, chunk):
            msgs, rcpts = [], []
            for i in range(first, min(first + chunk, count)):
                when = start + i * 1e-6
                address = recipient(i, token)
                row = list(msg_row)
                row[m["id"]] = f"{token}.{i}@sender.mailstrom.test"
                row[m["data"]] = raw_message(i, token)
                row[m["submitted_at"]] = when
                msgs.append(row)
                row = list(rcpt_row)
                row[r["message_id"]] = f"{token}.{i}@sender.mailstrom.test"
                row[r["address"]] = address
                row[r["domain"]] = address.rpartition("@")[2]
                row[r["next_attempt_at"]] = when
                rcpts.append(row)
            db.execute("BEGIN")
            db.executemany(insert_msg, msgs)
            db.executemany(insert_rcpt, rcpts)
            db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _new_message(i: int, token: str, at: datetime) -> NewMessage:
    return NewMessage(
        message_id=f"{token}.{i}@sender.mailstrom.test",
        mail_from=SENDER,
        recipients=(recipient(i, token),),
        data=raw_message(i, token),
        submitted_at=at,
    )


async def deep_fill(params: dict[str, Any]) -> dict[str, Any]:
    """Fill a SQLite store with M queued messages (``synchronous=OFF``).

    ``method="api"``: every message through ``SQLiteStore.add`` (one transaction
    each). ``method="sql"``: the first through ``add``, the rest copied from its
    rows in bulk (see :func:`_bulk_insert`). Either way the result is checked by
    reopening the store normally and reading the last message's status.
    """
    path = Path(params["path"])
    count: int = params["count"]
    token: str = params["token"]
    method: str = params["method"]
    _remove_db(path)
    start = time.perf_counter()
    now = datetime.now(UTC) - timedelta(minutes=1)
    store = SQLiteStore(path, synchronous="OFF")
    async with store:
        await store.add(_new_message(0, token, now))
        if method == "api":
            for i in range(1, count):
                await store.add(_new_message(i, token, now + timedelta(microseconds=i)))
    if method == "sql":
        await anyio.to_thread.run_sync(
            _bulk_insert, str(path), count, token, now.timestamp()
        )
    seconds = time.perf_counter() - start
    async with SQLiteStore(path) as check:
        status = await check.status(f"{token}.{count - 1}@sender.mailstrom.test")
    if status.recipients[0].state is not RecipientState.QUEUED:
        msg = f"the filled queue is wrong: {status!r}"
        raise AssertionError(msg)
    return {
        "count": count,
        "method": method,
        "seconds": seconds,
        "msgs_per_s": count / seconds,
        "db_bytes": (await anyio.Path(path).stat()).st_size,
    }


async def deep_start(params: dict[str, Any]) -> dict[str, Any]:
    """Open a Deliverer on a deep queue in a fresh process and start delivering.

    Measures the time from creating the Deliverer to the first DELIVERED event,
    keeps delivering for ``deliver_seconds`` and then reads this process's peak
    RSS (``VmHWM``) - the whole process, interpreter and imports included.
    """
    before = vm_status_kib()
    spawned_at: float = params["spawned_at"]
    config = relay_config(params["port"])
    start = time.perf_counter()
    store = SQLiteStore(params["path"])
    async with Deliverer(config, store=store) as deliverer:
        follower = _Follower(deliverer.events(), -1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.run)
            with anyio.fail_after(60):
                await follower.delivering.wait()
            first_at_wall = time.time()
            await anyio.sleep(params["deliver_seconds"])
            await follower.stream.aclose()
        during = vm_status_kib()
    after = vm_status_kib()
    assert follower.first_delivered is not None  # noqa: S101
    return {
        "first_delivery_s": follower.first_delivered - start,
        "first_delivery_from_spawn_s": first_at_wall - spawned_at,
        "delivered": follower.by_state["DELIVERED"],
        "deliver_seconds": params["deliver_seconds"],
        "rss_before_mib": before["VmRSS"] / 1024,
        "rss_open_mib": during["VmRSS"] / 1024,
        "peak_rss_mib": after["VmHWM"] / 1024,
        "pid": os.getpid(),
    }
