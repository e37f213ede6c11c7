"""The process the crash tests SIGKILL: ``python -m tests.crash_child ROLE DB PORT PREFIX``.

It runs a Deliverer on the SQLite file *DB* against the loopback relay on *PORT*
and writes next to *PREFIX*: ``PREFIX.ack`` (each id ``submit()`` returned, one a
line, flushed and fsync'd before the next submit: an id is acknowledged only once
it is there) and ``PREFIX.events`` (``id address unix-time`` of each DELIVERED
event this process saw, i.e. right after it committed that outcome; not fsync'd,
a measurement only). Its stderr is ``PREFIX.stderr`` (opened by the parent).
Roles:

``submit``
    A submit-only Deliverer (short timeouts, lease 1 s) submitting forever.
``deliver``
    A delivering Deliverer (lease 1 s) that submits one message and waits for it.
``cycle``
    The kill cycles' process: the DEFAULT configuration (only the relay and the
    store are set), mode "both", submitting forever with at most
    :data:`OUTSTANDING` of its own messages not yet done.
``recover``
    The last process of the kill cycles: the default configuration, mode
    "deliver", submitting nothing; it waits until every id in ``PREFIX.todo`` is
    done and writes ``{"ready": t, "done": t, "count": n}`` (unix times) to
    ``PREFIX.report``.

``CRASH_LEASE_DURATION`` in the environment overrides ``lease_duration`` for
``cycle`` and ``recover`` (a local check of the harness only; tests never set it).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import IO

import anyio

from mailstrom_async import (
    Config,
    Deliverer,
    DelivererMode,
    RecipientState,
    RelayConfig,
    SubmitHandle,
    Timeouts,
)
from mailstrom_async._message import Email
from mailstrom_async._store import SQLiteStore

#: Own messages a ``cycle`` process lets be in flight before it awaits the oldest:
#: the queue stays about as deep as the relay is fast, whatever the cycle length.
OUTSTANDING = 8


def config_for(role: str, port: int) -> Config:
    relay = RelayConfig(host="127.0.0.1", port=port, tls="none")
    if role in ("submit", "deliver"):
        return Config(
            helo_name="child.test",
            relay=relay,
            timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=60),
            lease_duration=1.0,
        )
    lease = os.environ.get("CRASH_LEASE_DURATION")
    if lease:
        return Config(relay=relay, lease_duration=float(lease))
    return Config(relay=relay)


def message(tag: str, n: int) -> Email:
    return Email(
        sender="sender@example.com",
        to=[f"r{n}-{tag}@example.org"],
        subject=f"message {n} of {tag}",
        text="Hello.\n",
    )


def acknowledge(acks: IO[str], message_id: str) -> None:
    acks.write(message_id + "\n")
    acks.flush()
    os.fsync(acks.fileno())


async def log_deliveries(d: Deliverer, path: Path) -> None:
    with path.open("a", buffering=1) as out:  # one write() per line
        async for event in d.events():
            if event.state is RecipientState.DELIVERED:
                out.write(f"{event.message_id} {event.address} {time.time()!r}\n")


async def submit_forever(d: Deliverer, role: str, tag: str, acks: IO[str]) -> None:
    outstanding: collections.deque[SubmitHandle] = collections.deque()
    n = 0
    while True:
        handle = await d.submit(message(tag, n))
        acknowledge(acks, handle.message_id)
        n += 1
        if role == "deliver":  # the server stalls: a delivered message is a failure
            await handle
            raise SystemExit("the stalled message was delivered")
        if role == "cycle":
            outstanding.append(handle)
            if len(outstanding) > OUTSTANDING:
                await outstanding.popleft()


async def main(role: str, db: str, port: int, prefix: Path) -> None:
    config = config_for(role, port)
    modes: dict[str, DelivererMode] = {"submit": "submit", "recover": "deliver"}
    mode = modes.get(role, "both")
    async with Deliverer(config, store=SQLiteStore(db), mode=mode) as d:
        ready = time.time()
        async with anyio.create_task_group() as tg:
            if mode != "submit":
                tg.start_soon(log_deliveries, d, prefix.with_suffix(".events"))
            if role == "recover":
                todo = prefix.with_suffix(".todo").read_text().split()
                for message_id in todo:
                    await SubmitHandle(d, message_id, created=False)
                report = {"ready": ready, "done": time.time(), "count": len(todo)}
                prefix.with_suffix(".report").write_text(json.dumps(report))
            else:
                with prefix.with_suffix(".ack").open("a") as acks:
                    await submit_forever(d, role, prefix.name, acks)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    role, db, port, prefix = sys.argv[1:]
    anyio.run(main, role, db, int(port), Path(prefix))
