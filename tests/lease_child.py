"""A worker that the lease tests pause: ``python -m tests.lease_child DSN PORT``.

It runs a delivering Deliverer on the PostgreSQL database *DSN* against the
loopback relay on *PORT*, with a lease of one second, and writes to stdout
``ready`` once it runs, then ``lost MESSAGE_ID RECIPIENTS`` for each
``lease lost; outcome dropped`` record it logs (flushed at once). It stops when
its stdin is closed.
"""

from __future__ import annotations

import logging
import sys

import anyio

from mailstrom_async import Config, Deliverer, RelayConfig, Timeouts
from mailstrom_async._store import PostgresStore

#: Long enough that a worker paused after its final dot still reads the reply.
TIMEOUTS = Timeouts(connect=10, command=10, data_start=10, data_end=50)


class _Say(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "lease lost; outcome dropped":
            fields = record.__dict__
            print("lost", fields["message_id"], fields["recipients"], flush=True)


async def main(dsn: str, port: int) -> None:
    logging.getLogger("mailstrom_async.deliverer").addHandler(_Say())
    config = Config(
        helo_name="worker.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        timeouts=TIMEOUTS,
        lease_duration=1.0,
        poll_interval=0.05,
    )
    async with Deliverer(config, store=PostgresStore(dsn), mode="deliver"):
        print("ready", flush=True)
        stdin = anyio.wrap_file(sys.stdin)
        while await stdin.readline():
            pass


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
