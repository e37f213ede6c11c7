"""Send a note to each address given, wait for the outcomes, and print them.

A script that runs and exits: it opens a Deliverer, submits, waits for every
recipient to be final (or for ``--wait`` seconds), and closes the Deliverer.
Whatever is not final by then stays in the queue file, and goes out the next
time a Deliverer opens that file (this script, or a worker)::

    python script.py --config mailstrom.toml --store queue.sqlite3 \
        ada@example.org bob@example.net

Exit status: 0 when every recipient was delivered, 1 when one failed, 2 for a
bad command line or configuration, 3 when some were still waiting at the end.
"""

import argparse
import asyncio
import sys

from mailstrom_async import (
    Config,
    ConfigError,
    Deliverer,
    Email,
    InvalidMessageError,
    MessageStatus,
    SQLiteStore,
)


async def send_notes(
    config: Config, store_path: str, recipients: list[str], wait: float
) -> list[MessageStatus]:
    """Submit a message to each recipient; their statuses after at most *wait* s."""
    async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
        handles = await deliverer.submit_many(
            Email(
                sender="Reports <reports@example.com>",
                to=[address],
                subject="Your weekly report",
                text="Hello,\n\nyour report is ready.\n",
            )
            for address in recipients
        )
        try:
            async with asyncio.timeout(wait):
                return [await handle for handle in handles]
        except TimeoutError:  # stop waiting: tell what we know so far
            return [await handle.status() for handle in handles]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--config", required=True, help="TOML settings file")
    parser.add_argument("--store", default="queue.sqlite3", help="SQLite queue file")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds (60)")
    parser.add_argument("recipients", nargs="+", metavar="ADDRESS")
    args = parser.parse_args()
    try:
        config = Config.from_toml(args.config)
        statuses = asyncio.run(
            send_notes(config, args.store, args.recipients, args.wait)
        )
    except (ConfigError, InvalidMessageError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    for status in statuses:
        for r in status.recipients:
            print(f"{r.address}: {r.state.value} ({r.code} {r.message})")
    if not all(status.is_done for status in statuses):
        return 3
    return 0 if all(status.is_delivered for status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
