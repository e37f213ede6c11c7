"""Send one email through a local SMTP relay and print what happened to it.

Run it against any SMTP server that listens without TLS, for example the one in
Python's aiosmtpd package::

    python -m aiosmtpd -n -l 127.0.0.1:8025 &
    python quickstart.py 127.0.0.1 8025
"""

import asyncio
import sys

from mailstrom_async import Config, Deliverer, Email, RelayConfig, SQLiteStore


async def main(relay_host: str, relay_port: int, store_path: str) -> None:
    config = Config(
        # tls="none" is for a relay on this machine only; use "starttls" (587)
        # or "implicit" (465) with a username and password for a real one.
        relay=RelayConfig(host=relay_host, port=relay_port, tls="none"),
    )
    email = Email(
        sender="Shop <shop@example.com>",
        to=["ada@example.org"],
        subject="Your order has shipped",
        text="Hello Ada,\n\nyour order is on its way.\n",
    )
    async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
        # Stored (and fsync'd) before submit() returns; delivery runs in the
        # background while this coroutine is free to do other work.
        handle = await deliverer.submit(email)
        print(f"queued {handle.message_id}")
        # Wait until every recipient is DELIVERED or FAILED.
        await handle
        # Look the message up by its id, as a later request would.
        status = await deliverer.status(handle.message_id)
    for r in status.recipients:
        # One line per recipient, such as "ada@example.org: delivered (250 OK)".
        print(f"{r.address}: {r.state.value} ({r.code} {r.message})")


if __name__ == "__main__":
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8025
    asyncio.run(main(host, port, "quickstart.sqlite3"))
