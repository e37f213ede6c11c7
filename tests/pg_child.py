"""A process over a shared PostgreSQL queue: ``python -m tests.pg_child ROLE DSN PORT PREFIX [COUNT]``.

It runs a Deliverer on ``PostgresStore(DSN)`` against the loopback relay on
*PORT*, saying ``EHLO <PREFIX's name>.test`` so that the server can tell the
processes apart, and writes next to *PREFIX* (its stderr is ``PREFIX.stderr``,
opened by the parent). Roles:

``worker``
    A deliver-only Deliverer. It says ``ready`` on stdout once it is open and
    runs until SIGTERM, then leaves its ``async with`` block (a clean exit is 0).
``submit``
    A submit-only Deliverer that submits *COUNT* messages of :data:`RECIPIENTS`
    recipients each, in batches of :data:`BATCH` (``submit_many``), appending
    each id to ``PREFIX.ack``; then it awaits every handle (delivered by the
    workers, in other processes) and writes ``PREFIX.report``:
    ``{"submitted": n, "delivered": n, "not_delivered": [...]}``.

``PG_CHILD_LEASE`` in the environment sets ``lease_duration`` (default 10 s).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import anyio

from mailstrom_async import (
    Config,
    Deliverer,
    DelivererMode,
    Email,
    Limits,
    PostgresStore,
    RelayConfig,
    RetryPolicy,
    Timeouts,
)

#: Recipients per message, and messages per ``submit_many`` batch.
RECIPIENTS = 3
BATCH = 50


def config_for(name: str, port: int) -> Config:
    return Config(
        helo_name=f"{name}.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        # Deferrals (a lost store, a refused connection) come back quickly.
        retry=RetryPolicy(initial_delay=0.05, jitter=0, max_delay=0.5),
        timeouts=Timeouts(connect=5, command=10, data_start=10, data_end=60),
        limits=Limits(connections_per_destination=4),
        lease_duration=float(os.environ.get("PG_CHILD_LEASE", "10")),
        poll_interval=0.1,
        shutdown_grace=5,
    )


def message(tag: str, n: int) -> Email:
    return Email(
        sender="sender@example.com",
        to=[f"r{n}-{k}-{tag}@example.org" for k in range(RECIPIENTS)],
        subject=f"message {n} of {tag}",
        text="Hello.\n",
    )


async def work() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def submit(d: Deliverer, prefix: Path, count: int) -> None:
    handles = []
    with prefix.with_suffix(".ack").open("a") as acks:
        for start in range(0, count, BATCH):
            batch = [
                message(prefix.name, n) for n in range(start, min(count, start + BATCH))
            ]
            for handle in await d.submit_many(batch):
                acks.write(handle.message_id + "\n")
                handles.append(handle)
            acks.flush()
    statuses = [await handle for handle in handles]
    report = {
        "submitted": len(handles),
        "delivered": sum(s.is_delivered for s in statuses),
        "not_delivered": [s.message_id for s in statuses if not s.is_delivered],
    }
    prefix.with_suffix(".report").write_text(json.dumps(report))


async def main(role: str, dsn: str, port: int, prefix: Path, count: int) -> None:
    modes: dict[str, DelivererMode] = {"worker": "deliver", "submit": "submit"}
    config = config_for(prefix.name, port)
    async with Deliverer(config, store=PostgresStore(dsn), mode=modes[role]) as d:
        if role == "worker":
            await work()
        else:
            await submit(d, prefix, count)


class _WithExtras(logging.Formatter):
    """The message, then the record's ``extra=`` fields (``key=value``)."""

    _standard = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v!r}" for k, v in vars(record).items() if k not in self._standard
        )
        return f"{super().format(record)} {extras}".rstrip()


if __name__ == "__main__":
    handler = logging.StreamHandler()
    handler.setFormatter(_WithExtras("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    role, dsn, port, prefix, *rest = sys.argv[1:]
    anyio.run(main, role, dsn, int(port), Path(prefix), int(rest[0]) if rest else 0)
