"""Inspecting and steering the queue: status, retry, cancel, purge (and show
and queue, from :mod:`._show` and :mod:`._listing`)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli import _listing, _show
from mailstrom_async._cli._common import (
    EXIT_OK,
    CLIError,
    add_store_options,
    age,
    duration,
    load_config,
    message_id,
    one_target,
    open_store,
    opened,
    print_json,
    status_json,
    table,
    timestamp,
    utcnow,
)
from mailstrom_async._cli._history import add_history_flag, history_json, print_history
from mailstrom_async._models import RecipientState

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._models import AttemptRecord, MessageStatus
    from mailstrom_async._store import Store

__all__ = ["add_parsers"]

_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the status, show, queue, retry, cancel and purge subcommands."""
    p = sub.add_parser(
        "status",
        help="show every recipient of one message",
        description="Show each recipient of a message: state, attempts, the last "
        "reply (code, enhanced code, text), the host tried, and the last and "
        "next attempt times (UTC). An outcome decided here, not by a server "
        "(a refused connection, a DNS answer, the retry lifetime run out) shows "
        "'local' as its code. A recipient on hold shows '(held)' after its "
        "state: it is not tried until 'release'. With --history, every kept "
        "attempt of each recipient follows, oldest first.",
        epilog="examples:\n  mailstrom-async status 1732712345.abc@example.com\n"
        "  mailstrom-async status --json ID | jq .recipients\n"
        "  mailstrom-async status --history ID",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "message_id",
        metavar="ID",
        type=message_id,
        help="the id printed by 'send' (<> around it, as in a Message-ID header, are fine)",
    )
    add_history_flag(p)
    add_store_options(p)
    p.set_defaults(handler=_status)

    _show.add_parser(sub)
    _listing.add_parser(sub)

    p = sub.add_parser(
        "retry",
        help="make deferred mail due now (one message, one domain, or all)",
        description="Make waiting recipients due now, like 'postqueue -f': those "
        "of one message, of one domain, or all of them. Recipients in flight are "
        "left alone. A running worker picks them up at its next poll.",
        epilog="examples:\n  mailstrom-async retry ID\n"
        "  mailstrom-async retry --domain example.org\n  mailstrom-async retry --all",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "message_id", metavar="ID", type=message_id, nargs="?", help="one message"
    )
    p.add_argument("--domain", help="every message to this recipient domain")
    p.add_argument("--all", action="store_true", help="every waiting recipient")
    add_store_options(p)
    p.set_defaults(handler=_retry, parser=p)

    p = sub.add_parser(
        "cancel",
        help="give up a message: its waiting recipients become failed",
        description="Give up every recipient of a message that is still waiting: "
        "each becomes FAILED with the reason 'cancelled by operator'. A recipient "
        "already in an SMTP transaction may still be delivered.",
        epilog="example:\n  mailstrom-async cancel ID",
        formatter_class=_FORMATTER,
    )
    p.add_argument("message_id", metavar="ID", type=message_id)
    add_store_options(p)
    p.set_defaults(handler=_cancel)

    p = sub.add_parser(
        "purge",
        help="delete finished messages older than a duration",
        description="Delete messages whose recipients are all delivered or failed "
        "and whose last attempt is older than DURATION. Waiting mail is never "
        "deleted. --dry-run lists what would be deleted and deletes nothing. "
        "When stdin is a terminal, purge says how many messages it will delete "
        "and asks first, unless --yes is given; when it is not (cron, scripts, "
        "pipes) it deletes without asking, like 'postsuper -d'.",
        epilog="examples:\n  mailstrom-async purge --older-than 7d --dry-run\n"
        "  mailstrom-async purge --older-than 7d\n"
        "  mailstrom-async purge --older-than 1d12h --yes",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "--older-than",
        metavar="DURATION",
        type=duration,
        required=True,
        help="e.g. 7d, 12h, 30m, 3600s, 1w, 1d12h",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the messages that would be deleted; delete nothing",
    )
    p.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation on a terminal",
    )
    add_store_options(p)
    p.set_defaults(handler=_purge)


def _prepare(args: argparse.Namespace) -> Store:
    load_config(args)  # the same checks as every command, even if unused here
    return open_store(args, create=False)


def _status(args: argparse.Namespace) -> int:
    store = _prepare(args)

    async def run() -> tuple[MessageStatus, list[AttemptRecord] | None]:
        async with opened(store):
            status = await store.status(args.message_id)
            history = await store.history(args.message_id) if args.history else None
            return status, history

    status, history = anyio.run(run)
    if args.json:
        entry = status_json(status)
        if history is not None:
            entry["history"] = history_json(history)
        print_json(entry)
        return EXIT_OK
    now = utcnow()
    submitted = timestamp(status.submitted_at)
    print(f"message    {status.message_id}")
    print(f"from       {status.mail_from or '<>'}")
    print(f"submitted  {submitted} ({age(status.submitted_at, now)} ago)")
    print()
    print(
        table(
            [
                "RECIPIENT",
                "STATE",
                "TRIES",
                "CODE",
                "ENHANCED",
                "HOST",
                "LAST",
                "NEXT",
                "TEXT",
            ],
            [
                (
                    r.address,
                    f"{r.state.value} (held)" if r.held else r.state.value,
                    r.attempts,
                    "local" if r.is_local else r.code,
                    r.enhanced_code,
                    r.host,
                    timestamp(r.last_attempt_at),
                    timestamp(r.next_attempt_at),
                    r.message,
                )
                for r in status
            ],
        )
    )
    held = sum(r.held for r in status)
    if held:
        print()
        print(
            f"{held} recipient(s) on hold: not tried until "
            f"'mailstrom-async release {status.message_id}'"
        )
    if history is not None:
        print_history(status, history)
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    one_target(args)
    store = _prepare(args)

    async def run() -> int:
        async with opened(store):
            return await store.retry_now(
                now=utcnow(), message_id=args.message_id, domain=args.domain
            )

    count = anyio.run(run)
    if args.json:
        print_json({"due_now": count})
    else:
        print(f"{count} recipient(s) made due now")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    store = _prepare(args)

    async def run() -> int:
        async with opened(store):
            return await store.cancel(args.message_id)

    count = anyio.run(run)
    if args.json:
        print_json({"message_id": args.message_id, "cancelled": count})
    else:
        print(f"cancelled {count} recipient(s) of {args.message_id}")
    return EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    store = _prepare(args)
    try:
        cutoff = utcnow() - args.older_than
    except OverflowError:  # older than year 1: nothing is
        cutoff = datetime.min.replace(tzinfo=UTC)
    ask = not args.yes and not args.dry_run and sys.stdin.isatty()
    if args.dry_run or ask:
        candidates = anyio.run(_purgeable, store, cutoff)
        if args.dry_run:
            _print_purgeable(candidates, cutoff, as_json=args.json)
            return EXIT_OK
        if candidates and not _confirm(
            f"delete {len(candidates)} finished message(s) older than "
            f"{timestamp(cutoff)}? [y/N] "
        ):
            msg = "not confirmed: nothing was deleted (give --yes to skip the question)"
            raise CLIError(msg)
        # A fresh store object: the first one is closed and cannot be reopened.
        store = _prepare(args)

    async def run() -> int:
        async with opened(store):
            return await store.purge(finished_before=cutoff)

    count = anyio.run(run)
    if args.json:
        print_json({"purged": count, "finished_before": cutoff.isoformat()})
    else:
        print(f"purged {count} finished message(s) older than {timestamp(cutoff)}")
    return EXIT_OK


async def _purgeable(store: Store, cutoff: datetime) -> list[MessageStatus]:
    """The messages ``purge`` would delete now: every recipient final, and the
    last attempt (or the submission, if none) before *cutoff*."""
    async with opened(store):
        finished = await store.messages(
            states=(RecipientState.DELIVERED, RecipientState.FAILED)
        )
    return [m for m in finished if m.is_done and _finished_at(m) < cutoff]


def _finished_at(status: MessageStatus) -> datetime:
    return max(r.last_attempt_at or status.submitted_at for r in status)


def _print_purgeable(
    messages: list[MessageStatus], cutoff: datetime, *, as_json: bool
) -> None:
    if as_json:
        print_json(
            {
                "dry_run": True,
                "would_purge": len(messages),
                "finished_before": cutoff.isoformat(),
                "message_ids": [m.message_id for m in messages],
            }
        )
        return
    if messages:
        print(
            table(
                ["ID", "FINISHED", "FROM", "RECIPIENTS"],
                [
                    (
                        m.message_id,
                        timestamp(_finished_at(m)),
                        m.mail_from or "<>",
                        len(m.recipients),
                    )
                    for m in messages
                ],
            )
        )
    print(
        f"would purge {len(messages)} finished message(s) older than "
        f"{timestamp(cutoff)} (dry run: nothing deleted)"
    )


def _confirm(question: str) -> bool:
    """Ask *question* on stderr and read the answer from stdin (a terminal):
    yes for ``y`` or ``yes``; no for anything else, or end of input."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")
