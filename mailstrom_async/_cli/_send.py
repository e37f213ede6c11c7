"""``mailstrom-async send``: build or read a message and submit it to the store."""

from __future__ import annotations

import argparse
import json
import sys
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._builder import Attachment, Email
from mailstrom_async._cli._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PENDING,
    PROG,
    CLIError,
    add_store_options,
    load_config,
    open_store,
    positive_seconds,
    print_error,
    print_json,
    status_json,
    table,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import PreparedMessage, prepare
from mailstrom_async._models import RecipientState
from mailstrom_async._store import MAX_PRIORITY, MIN_PRIORITY
from mailstrom_async._store._common import check_priority

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._config import Config
    from mailstrom_async._events import EventStream
    from mailstrom_async._models import MessageStatus
    from mailstrom_async._store import Store

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  mailstrom-async send --from me@example.com --to you@example.org \\
      --subject Hello --body 'Hi there.' --attach report.pdf
  mailstrom-async send message.eml
  mailstrom-async send --priority -10 --from me@example.com --to you@example.org \\
      --subject 'Reset your password' --body-file reset.txt
  cat message.eml | mailstrom-async send - --to only-this@example.org
  mailstrom-async send --wait 60 --from me@example.com --to you@example.org \\
      --subject Test --body-file body.txt

Without --wait the message is stored for a worker ('mailstrom-async worker') and
its id is printed. With --wait this process delivers it too (configure the relay
or MX delivery with --config or MAILSTROM_* variables): it prints the id as soon
as the message is stored (with --json, as a JSON line on stderr), then each
recipient's outcome. Ctrl-C stops waiting: the message stays queued under that
id for a worker, and the exit code is 130.

exit codes:
  0  stored; with --wait: every recipient delivered
  1  error (bad input, unreadable file, invalid message, store or config problem)
  2  usage error
  3  with --wait: at least one recipient failed
  4  with --wait: still pending when the time ran out (it stays queued)
  130  with --wait: interrupted (Ctrl-C); a stored message stays queued
"""


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the send subcommand."""
    p = sub.add_parser(
        "send",
        help="submit a message to the store (and optionally wait for delivery)",
        description="Build a message from flags, or read an .eml file (or - for "
        "stdin), validate it and store it durably in the queue.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "eml",
        metavar="FILE",
        nargs="?",
        help="an RFC 5322 message (.eml), or - for stdin; its envelope comes "
        "from its headers unless --from/--to are given",
    )
    p.add_argument("--from", dest="sender", metavar="ADDRESS", help="the sender")
    p.add_argument(
        "--to", action="append", default=[], metavar="ADDRESS", help="repeatable"
    )
    p.add_argument(
        "--cc", action="append", default=[], metavar="ADDRESS", help="repeatable"
    )
    p.add_argument(
        "--bcc", action="append", default=[], metavar="ADDRESS", help="repeatable"
    )
    p.add_argument("--subject", default="")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="TEXT", help="the plain-text body")
    body.add_argument("--body-file", metavar="FILE", help="read the body (UTF-8)")
    p.add_argument(
        "--attach", action="append", default=[], metavar="FILE", help="repeatable"
    )
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="store nothing if a message with this key was submitted before",
    )
    p.add_argument(
        "--priority",
        metavar="N",
        type=_priority,
        default=0,
        help=f"delivery order among due mail, like nice: lower goes first "
        f"({MIN_PRIORITY} to {MAX_PRIORITY}, default 0)",
    )
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        nargs="?",
        type=positive_seconds,
        const=float("inf"),
        help="deliver from this process and wait for the outcome, at most SECONDS "
        "if given (with a FILE, put FILE first)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --wait: a progress line on stderr as recipients are tried "
        "(default: when stderr is a terminal and --json is not given)",
    )
    add_store_options(p)
    p.set_defaults(handler=_send, parser=p)


def _priority(text: str) -> int:
    try:
        return check_priority(int(text))
    except ValueError:
        msg = f"must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, not {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _read(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        msg = f"cannot read {what} {path!r}: {exc.strerror or exc}"
        raise CLIError(msg) from None


def _message(args: argparse.Namespace, config: Config) -> PreparedMessage:
    """The prepared message the options describe (validated: nothing stored yet)."""
    rcpt_to = args.to + args.cc + args.bcc
    if args.eml is not None:
        built = [
            flag
            for flag, given in (
                ("--cc", args.cc),
                ("--bcc", args.bcc),
                ("--subject", args.subject),
                ("--body", args.body),
                ("--body-file", args.body_file),
                ("--attach", args.attach),
            )
            if given
        ]
        if built:
            args.parser.error(f"{', '.join(built)} cannot be used with a FILE")
        data = _read(args.eml, "message file")
        if args.sender is not None and args.to:
            return prepare(data, mail_from=args.sender, rcpt_to=args.to, config=config)
        message = BytesParser(_class=EmailMessage, policy=SMTP).parsebytes(data)
        return prepare(
            message, mail_from=args.sender, rcpt_to=args.to or None, config=config
        )
    if args.sender is None or not rcpt_to:
        args.parser.error("give --from and at least one --to/--cc/--bcc, or a FILE")
    text = args.body
    if args.body_file is not None:
        raw = _read(args.body_file, "body file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            msg = f"body file {args.body_file!r} is not UTF-8 text"
            raise CLIError(msg) from None
    attachments = [
        Attachment(filename=Path(path).name, content=_read(path, "attachment"))
        for path in args.attach
    ]
    email = Email(
        sender=args.sender,
        to=args.to,
        cc=args.cc,
        bcc=args.bcc,
        subject=args.subject,
        text=text if text is not None else "",
        attachments=attachments,
    )
    return prepare(email, config=config)


def _send(args: argparse.Namespace) -> int:
    config = load_config(args)
    prepared = _message(args, config)
    store = open_store(args, create=True)
    if args.wait is None:
        message_id, created = anyio.run(_submit, args, config, store, prepared)
        if args.json:
            print_json({"message_id": message_id, "created": created})
        else:
            print(message_id)
        return EXIT_OK
    stored: list[str] = []
    try:
        status = anyio.run(_submit_and_wait, args, config, store, prepared, stored)
    except KeyboardInterrupt:
        if not stored:
            raise
        _print_interrupted(stored[0], as_json=args.json)
        return EXIT_INTERRUPTED
    _print_outcome(status, as_json=args.json)
    if not status.is_done:
        return EXIT_PENDING
    if status.by_state(RecipientState.FAILED):
        return EXIT_FAILED
    return EXIT_OK


async def _submit(
    args: argparse.Namespace,
    config: Config,
    store: Store,
    prepared: PreparedMessage,
) -> tuple[str, bool]:
    async with Deliverer(config, store=store, mode="submit") as deliverer:
        handle = await deliverer.submit(
            prepared, idempotency_key=args.idempotency_key, priority=args.priority
        )
    return handle.message_id, handle.created


async def _submit_and_wait(
    args: argparse.Namespace,
    config: Config,
    store: Store,
    prepared: PreparedMessage,
    stored: list[str],
) -> MessageStatus:
    """Submit and deliver; the id goes into *stored* (and out) once it is stored."""
    progress = args.progress
    if progress is None:
        progress = sys.stderr.isatty() and not args.json
    async with Deliverer(config, store=store, mode="both") as deliverer:
        async with deliverer.events() as events, anyio.create_task_group() as tg:
            handle = await deliverer.submit(
                prepared, idempotency_key=args.idempotency_key, priority=args.priority
            )
            stored.append(handle.message_id)
            if args.json:
                line = json.dumps({"message_id": handle.message_id, "stored": True})
                print(line, file=sys.stderr, flush=True)
            else:
                print(handle.message_id, flush=True)
            if progress:
                tg.start_soon(_show_progress, events, handle.message_id, prepared)
            with anyio.move_on_after(args.wait):
                await handle
            tg.cancel_scope.cancel()
        if progress:
            sys.stderr.write("\n")
        return await deliverer.status(handle.message_id)


async def _show_progress(
    events: EventStream, message_id: str, prepared: PreparedMessage
) -> None:
    """One line on stderr, rewritten as each recipient changes state."""
    states = dict.fromkeys(prepared.rcpt_to, RecipientState.QUEUED)
    async for event in events:
        if event.message_id != message_id:
            continue
        states[event.recipient.address] = event.state
        done = sum(s.is_final for s in states.values())
        counts = ", ".join(
            f"{n} {state.value}"
            for state in RecipientState
            if (n := sum(s is state for s in states.values()))
        )
        sys.stderr.write(f"\r{done}/{len(states)} recipients final ({counts})")
        sys.stderr.flush()


def _print_interrupted(message_id: str, *, as_json: bool) -> None:
    text = (
        f"interrupted: message {message_id} stays queued for a worker "
        f"(see 'mailstrom-async status {message_id}')"
    )
    if as_json:
        print_error(text, EXIT_INTERRUPTED, as_json=True, message_id=message_id)
    else:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _print_outcome(status: MessageStatus, *, as_json: bool) -> None:
    """The outcome table (the id was printed when the message was stored)."""
    if as_json:
        print_json(status_json(status))
        return
    print(
        table(
            ["RECIPIENT", "STATE", "CODE", "ENHANCED", "TEXT"],
            [
                (
                    r.address,
                    r.state.value,
                    "local" if r.is_local else r.code,
                    r.enhanced_code,
                    r.message,
                )
                for r in status
            ],
        )
    )
    if not status.is_done:
        print("still pending: it stays queued for a worker")
