"""Holding and releasing mail: the hold and release subcommands (``postsuper -h/-H``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli._common import (
    EXIT_OK,
    add_store_options,
    load_config,
    message_id,
    one_target,
    open_store,
    opened,
    print_json,
)
from mailstrom_async._domain import domain_key

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._store import Store

__all__ = ["add_parsers"]

_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the hold and release subcommands."""
    p = sub.add_parser(
        "hold",
        help="put waiting mail on hold: one message, or one domain",
        description="Put the waiting (queued and deferred) recipients of one "
        "message, or of one domain in every message, on hold, like 'postsuper -h': "
        "no attempt is made until 'release'. They keep their state and next "
        "attempt time; 'status' and 'queue' show them as held; 'cancel' still "
        "fails them. Only mail waiting now is held, not mail submitted later. "
        "Held mail does not expire, but its retry lifetime keeps counting from "
        "submission. A worker that already claimed some of it (in an SMTP "
        "transaction, or waiting in its memory for a connection) may still send "
        "that.",
        epilog="examples:\n  mailstrom-async hold ID\n"
        "  mailstrom-async hold --domain example.org --json",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "message_id", metavar="ID", type=message_id, nargs="?", help="one message"
    )
    p.add_argument("--domain", help="every message's recipients of this domain")
    add_store_options(p)
    p.set_defaults(handler=_hold, parser=p)

    p = sub.add_parser(
        "release",
        help="release held mail: one message, one domain, or all",
        description="Release held recipients, like 'postsuper -H': those of one "
        "message, of one domain, or all of them. Each is due again at the next "
        "attempt time it had, at once if that has passed; a running worker picks "
        "them up at its next poll.",
        epilog="examples:\n  mailstrom-async release ID\n"
        "  mailstrom-async release --domain example.org\n"
        "  mailstrom-async release --all",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "message_id", metavar="ID", type=message_id, nargs="?", help="one message"
    )
    p.add_argument("--domain", help="every held recipient of this domain")
    p.add_argument("--all", action="store_true", help="every held recipient")
    add_store_options(p)
    p.set_defaults(handler=_release, parser=p)


def _store(args: argparse.Namespace) -> Store:
    load_config(args)  # the same checks as every command, even if unused here
    return open_store(args, create=False)


def _target(args: argparse.Namespace) -> str:
    if args.message_id is not None:
        return f"of {args.message_id}"
    if args.domain is not None:
        return f"of domain {domain_key(args.domain)}"
    return "in the queue"


def _hold(args: argparse.Namespace) -> int:
    one_target(args, allow_all=False)
    store = _store(args)

    async def run() -> int:
        async with opened(store):
            return await store.hold(message_id=args.message_id, domain=args.domain)

    count = anyio.run(run)
    if args.json:
        print_json(
            {"held": count, "message_id": args.message_id, "domain": args.domain}
        )
    else:
        print(f"held {count} recipient(s) {_target(args)}")
    return EXIT_OK


def _release(args: argparse.Namespace) -> int:
    one_target(args)
    store = _store(args)

    async def run() -> int:
        async with opened(store):
            return await store.unhold(
                message_id=args.message_id, domain=args.domain, all=args.all
            )

    count = anyio.run(run)
    if args.json:
        print_json(
            {
                "released": count,
                "message_id": args.message_id,
                "domain": args.domain,
                "all": args.all,
            }
        )
    else:
        print(f"released {count} recipient(s) {_target(args)}")
    return EXIT_OK
