"""The ``mailstrom-async`` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from mailstrom_async._demo import mx_demo, relay_demo
from mailstrom_async._exceptions import MailstromError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailstrom-async",
        description="Durable asyncio email delivery: run the demo, inspect the queue.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="deliver on loopback with the SQLite store, and show every outcome",
        description=(
            "Start an SMTP server on 127.0.0.1, submit a batch through a Deliverer "
            "with the SQLite store, show progress, and print every recipient's "
            "outcome: delivered, deferred then delivered, and failed. With --mx, "
            "deliver straight to MX hosts instead: a DNS server on 127.0.0.1 and "
            "two MX hosts on 127.0.0.2 (refusing) and 127.0.0.3."
        ),
    )
    demo.add_argument(
        "--messages", type=int, default=5, help="how many messages (default 5)"
    )
    demo.add_argument(
        "--store", type=Path, help="SQLite file (default: a temporary one)"
    )
    demo.add_argument(
        "--mx", action="store_true", help="direct delivery to MX hosts, no relay"
    )
    return parser


def _demo(args: argparse.Namespace, store: Path) -> int:
    if args.mx:
        return anyio.run(mx_demo, store)
    return anyio.run(relay_demo, store, args.messages)


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
                return _demo(args, args.store)
            with tempfile.TemporaryDirectory() as tmp:
                return _demo(args, Path(tmp) / "demo.sqlite3")
    except MailstromError as exc:
        print(f"mailstrom-async: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    msg = "unreachable"
    raise AssertionError(msg)
