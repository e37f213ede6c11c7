"""Web processes that only queue mail, and a worker process that delivers it.

Both open the same SQLite file. The web side never connects to an SMTP server,
so a slow or unreachable relay cannot hold up a request; the worker delivers
whatever any web process queued, within about ``Config.poll_interval``, and
carries on where it left off after a restart.

Run the worker next to the web processes, with the same settings and queue::

    MAIL_CONFIG=mailstrom.toml MAIL_QUEUE=/var/lib/app/mail.sqlite3 python worker.py
"""

import asyncio
import os
import signal

import anyio

from mailstrom_async import Config, Deliverer, SQLiteStore


def web_deliverer(config: Config, store_path: str) -> Deliverer:
    """The Deliverer of a web process: it stores mail and reads statuses only."""
    return Deliverer(config, store=SQLiteStore(store_path), mode="submit")


async def run_worker(config: Config, store_path: str) -> None:
    """Deliver what the web processes queue, until SIGINT or SIGTERM."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        store = SQLiteStore(store_path)
        async with Deliverer(config, store=store, mode="deliver"):
            print("worker: delivering", flush=True)
            async for signum in signals:
                print(f"worker: {signal.Signals(signum).name}, stopping", flush=True)
                # Leaving the block lets transactions in flight finish (for up
                # to Config.shutdown_grace seconds); the rest stays queued.
                break
    print("worker: stopped", flush=True)


if __name__ == "__main__":
    config = Config.from_toml(os.environ["MAIL_CONFIG"])
    asyncio.run(run_worker(config, os.environ["MAIL_QUEUE"]))
