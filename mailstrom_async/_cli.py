"""The ``mailstrom-async`` command."""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from mailstrom_async._config import Config, RelayConfig, RetryPolicy, Timeouts
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._exceptions import MailstromError
from mailstrom_async._message import Email
from mailstrom_async._models import MessageStatus, RecipientState
from mailstrom_async._sink import SinkServer
from mailstrom_async._store import SQLiteStore

__all__ = ["main"]

# The demo's loopback server defers this recipient once, and refuses that one.
_DEMO_BUSY = "busy@example.org"
_DEMO_UNKNOWN = "nobody@example.com"


class _DemoPolicy:
    def __init__(self) -> None:
        self.deferred: collections.Counter[str] = collections.Counter()

    def __call__(self, address: str) -> str | None:
        if address == _DEMO_UNKNOWN:
            return "550 5.1.1 No such user here"
        if address == _DEMO_BUSY and not self.deferred[address]:
            self.deferred[address] += 1
            return "451 4.2.1 Mailbox busy, try again later"
        return None


async def _demo(store_path: Path, count: int) -> int:
    policy = _DemoPolicy()
    async with SinkServer(policy=policy) as sink:
        config = Config(
            helo_name="demo.localhost",
            relay=RelayConfig(host="127.0.0.1", port=sink.port, tls="none"),
            retry=RetryPolicy(initial_delay=0.5, factor=2, jitter=0.1, max_delay=5),
            timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=5),
        )
        print(f"SMTP server listening on 127.0.0.1:{sink.port}; queue in {store_path}")
        store = SQLiteStore(store_path)
        async with Deliverer(config, store=store) as deliverer:
            events = deliverer.events()
            handles = []
            for n in range(count):
                to = ["alice@example.com", "bob@example.net"]
                if n == 0:
                    to += [_DEMO_BUSY, _DEMO_UNKNOWN]
                email = Email(
                    sender="Demo <demo@example.com>",
                    to=to,
                    subject=f"mailstrom-async demo message {n + 1}",
                    text="Hello from mailstrom-async.\n",
                )
                handles.append(await deliverer.submit(email))
            print(f"submitted {len(handles)} messages; delivering...")
            done: set[tuple[str, str]] = set()
            total = 0
            for handle in handles:
                total += len((await handle.status()).recipients)
            async for event in events:
                line = f"  {event.state.value:<9} {event.address}"
                if event.state is RecipientState.DEFERRED:
                    line += f"  ({event.recipient.code} {event.recipient.message}; retrying)"
                elif event.state is RecipientState.FAILED:
                    line += f"  ({event.recipient.code} {event.recipient.message})"
                if event.state is not RecipientState.QUEUED:
                    print(line)
                if event.state.is_final:
                    done.add((event.message_id, event.address))
                    if len(done) == total:
                        break
            await events.aclose()
            statuses = [await h for h in handles]
    print()
    _print_table(statuses)
    delivered = sum(s.state is RecipientState.DELIVERED for m in statuses for s in m)
    failed = sum(s.state is RecipientState.FAILED for m in statuses for s in m)
    print(
        f"\n{delivered} delivered, {failed} failed; the server received {len(sink.messages)} transactions"
    )
    expected_failed = 1 if count else 0
    return (
        0 if failed == expected_failed and delivered == total - expected_failed else 1
    )


def _print_table(statuses: Sequence[MessageStatus]) -> None:
    for n, message in enumerate(statuses, 1):
        print(f"#{n}  {message.message_id}")
    print()
    rows = [("#", "recipient", "state", "attempts", "reply", "host", "text")]
    for n, message in enumerate(statuses, 1):
        for r in message:
            reply = " ".join(str(p) for p in (r.code, r.enhanced_code) if p is not None)
            rows.append(
                (
                    f"#{n}",
                    r.address,
                    r.state.value.upper(),
                    str(r.attempts),
                    reply,
                    r.host or "",
                    (r.message or "").splitlines()[0] if r.message else "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailstrom-async",
        description="Durable asyncio email delivery: run the demo, inspect the queue.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="deliver a batch to a loopback SMTP server with the SQLite store",
        description=(
            "Start an SMTP server on 127.0.0.1, submit a batch through a Deliverer "
            "with the SQLite store, show progress, and print every recipient's "
            "outcome: delivered, deferred then delivered, and failed."
        ),
    )
    demo.add_argument(
        "--messages", type=int, default=5, help="how many messages (default 5)"
    )
    demo.add_argument(
        "--store", type=Path, help="SQLite file (default: a temporary one)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            if args.messages < 1:
                print(
                    "mailstrom-async: error: --messages must be at least 1",
                    file=sys.stderr,
                )
                return 2
            if args.store is not None:
                return anyio.run(_demo, args.store, args.messages)
            with tempfile.TemporaryDirectory() as tmp:
                return anyio.run(_demo, Path(tmp) / "demo.sqlite3", args.messages)
    except MailstromError as exc:
        print(f"mailstrom-async: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    msg = "unreachable"
    raise AssertionError(msg)
