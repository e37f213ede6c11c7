"""Long-running subcommands: ``worker``, ``sink``, and ``demo``."""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import fnmatch
import importlib.util
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli._common import (
    EXIT_OK,
    CLIError,
    add_store_options,
    load_config,
    open_store,
    setup_logging,
)
from mailstrom_async._cli._supervisor import supervise
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._demo import mx_demo, relay_demo
from mailstrom_async._sink import SinkServer

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._config import Config
    from mailstrom_async._sink import CapturedMessage, RcptPolicy
    from mailstrom_async._store import Store

__all__ = ["add_parsers"]

logger = logging.getLogger("mailstrom_async.cli")

_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the worker, sink and demo subcommands."""
    p = sub.add_parser(
        "worker",
        help="deliver what is in the store until SIGINT/SIGTERM",
        description="Run a deliver-only Deliverer over the store: deliver due "
        "mail, retry deferred mail, and pick up what other processes submit. "
        "SIGINT or SIGTERM stops it cleanly: transactions in flight get "
        "shutdown_grace seconds, and everything unfinished stays queued. Log "
        "lines go to stderr.",
        epilog="examples:\n  MAILSTROM_RELAY__HOST=smtp.example.com "
        "MAILSTROM_RELAY__USERNAME=app MAILSTROM_RELAY__PASSWORD=... \\\n"
        "      mailstrom-async worker --store /var/lib/app/mail.sqlite3\n"
        "  mailstrom-async worker --config mailstrom.toml -v",
        formatter_class=_FORMATTER,
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log debug lines as well"
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when it is installed (the uvloop extra), else "
        "asyncio (default auto)",
    )
    p.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N",
        help="run N delivering processes on the store under one supervisor, "
        "which starts again one that dies and stops them all on SIGINT/SIGTERM "
        "(default 1: this process delivers)",
    )
    # --json (from the store options) makes each log line a JSON object.
    add_store_options(p)
    p.set_defaults(handler=_worker)

    p = sub.add_parser(
        "sink",
        help="a local SMTP server that prints (and saves) what it receives",
        description="Accept every message over SMTP, print one line per message "
        "(sender, recipients, subject, size) and optionally save each as an .eml "
        "file, for development. --defer and --reject refuse the recipients that "
        "match a pattern, so that a deferral or a bounce can be tried without "
        "writing code. Stops cleanly on SIGINT/SIGTERM. It is part of "
        "mailstrom-async: no extra dependency.",
        epilog="examples:\n  mailstrom-async sink\n"
        "  mailstrom-async sink --port 2526 --save-dir ./outbox --json\n"
        "  mailstrom-async sink --defer 'busy@*' --reject '*@gone.example.org'\n"
        "then point a Deliverer at it: MAILSTROM_RELAY__HOST=127.0.0.1 "
        "MAILSTROM_RELAY__PORT=2525 MAILSTROM_RELAY__TLS=none\n\n"
        "PATTERN is a shell-style pattern (*, ?, [seq]) matched against the whole "
        "recipient address, ignoring case. A recipient that matches a --reject "
        "pattern gets '550 5.1.1', else one that matches a --defer pattern gets "
        "'450 4.2.1'; the others are accepted.",
        formatter_class=_FORMATTER,
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    p.add_argument(
        "--port", type=_port, default=2525, help="default 2525; 0 picks a free one"
    )
    p.add_argument("--save-dir", metavar="DIR", help="write each message to DIR")
    p.add_argument(
        "--defer",
        action="append",
        default=[],
        metavar="PATTERN",
        type=_pattern,
        help="answer 450 4.2.1 (try again later) to matching recipients (repeatable)",
    )
    p.add_argument(
        "--reject",
        action="append",
        default=[],
        metavar="PATTERN",
        type=_pattern,
        help="answer 550 5.1.1 (no such user) to matching recipients (repeatable)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per message on stdout, and nothing else there "
        "(the listening line goes to stderr)",
    )
    p.set_defaults(handler=_sink)

    p = sub.add_parser(
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
    p.add_argument(
        "--messages", type=int, default=5, help="how many messages (default 5)"
    )
    p.add_argument("--store", type=Path, help="SQLite file (default: a temporary one)")
    p.add_argument(
        "--mx", action="store_true", help="direct delivery to MX hosts, no relay"
    )
    p.set_defaults(handler=_demo, parser=p)


def _pattern(text: str) -> str:
    if not text.strip():
        msg = "an empty pattern: give e.g. '*@example.org' or 'busy@*'"
        raise argparse.ArgumentTypeError(msg)
    return text.strip().lower()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 65536:
        msg = f"not a port number (0 to 65535): {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# -- worker --------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    options = _loop_options(args.loop)
    config = load_config(args)
    store = open_store(args, create=True)
    setup_logging(verbose=args.verbose, as_json=args.json)
    if args.processes > 1:  # the settings and the store are checked above
        return anyio.run(supervise, args.argv, args.processes)
    return anyio.run(_run_worker, config, store, backend_options=options)


def _processes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_PROCESSES:
        msg = f"not a number of processes (1 to {_MAX_PROCESSES}): {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


_MAX_PROCESSES = 256


def _loop_options(choice: str) -> dict[str, bool]:
    """anyio's asyncio options for ``--loop``: uvloop if asked for or installed."""
    if choice == "asyncio":
        return {}
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        msg = "--loop uvloop: uvloop is not installed (pip install 'mailstrom-async[uvloop]')"
        raise CLIError(msg)
    return {"use_uvloop": installed}


async def _run_worker(config: Config, store: Store) -> int:
    # Each outcome is logged once, by the Deliverer ("attempt recorded: ..."), and
    # its start line says where mail goes; the command adds only its own lines.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Deliverer(config, store=store, mode="deliver"):
            async for signum in signals:
                name = signal.Signals(signum).name
                logger.info("stopping", extra={"signal": name})
                break
    return EXIT_OK


# -- sink ----------------------------------------------------------------------


def _sink(args: argparse.Namespace) -> int:
    save_dir = None
    if args.save_dir is not None:
        save_dir = Path(args.save_dir)
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot use --save-dir {args.save_dir!r}: {exc.strerror or exc}"
            raise CLIError(msg) from None
    policy = sink_policy(defer=args.defer, reject=args.reject)
    return anyio.run(_run_sink, args.host, args.port, save_dir, args.json, policy)


#: The replies of ``sink --reject`` and ``sink --defer``.
REJECT_REPLY = "550 5.1.1 mailbox unavailable (sink --reject)"
DEFER_REPLY = "450 4.2.1 mailbox busy, try again later (sink --defer)"


def sink_policy(*, defer: Sequence[str], reject: Sequence[str]) -> RcptPolicy:
    """The sink's RCPT policy: :data:`REJECT_REPLY` for an address matching a
    *reject* pattern, else :data:`DEFER_REPLY` for one matching a *defer*
    pattern, else accept. Patterns are :mod:`fnmatch` patterns, matched against
    the whole address, ignoring case (they come lower-cased)."""

    def policy(address: str) -> str | None:
        folded = address.lower()
        if any(fnmatch.fnmatchcase(folded, p) for p in reject):
            return REJECT_REPLY
        if any(fnmatch.fnmatchcase(folded, p) for p in defer):
            return DEFER_REPLY
        return None

    return policy


async def _run_sink(
    host: str, port: int, save_dir: Path | None, as_json: bool, policy: RcptPolicy
) -> int:
    try:
        server = SinkServer(host=host, port=port, policy=policy)
        await server.__aenter__()
    except OSError as exc:
        msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise CLIError(msg) from None
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            # With --json, stdout carries nothing but one JSON object a message.
            banner = sys.stderr if as_json else sys.stdout
            print(f"sink listening on {host}:{server.port}", file=banner, flush=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_print_messages, server, save_dir, as_json)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await server.__aexit__(None, None, None)
    return EXIT_OK


async def _print_messages(
    server: SinkServer, save_dir: Path | None, as_json: bool
) -> None:
    seen = 0
    while True:
        await server.received.wait()
        server.received.clear()
        for message in server.messages[seen:]:
            seen += 1
            saved = None
            if save_dir is not None:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
                saved = save_dir / f"{stamp}-{seen:05d}.eml"
                await anyio.Path(saved).write_bytes(message.data)
            print(_describe(message, saved, as_json=as_json), flush=True)


def _describe(message: CapturedMessage, saved: Path | None, *, as_json: bool) -> str:
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        message.data
    )
    subject = str(headers.get("Subject", ""))
    if as_json:
        return json.dumps(
            {
                "mail_from": message.mail_from,
                "rcpt_to": list(message.rcpt_to),
                "subject": subject,
                "size": len(message.data),
                "saved": None if saved is None else str(saved),
            },
            ensure_ascii=False,
        )
    line = (
        f"{message.mail_from or '<>'} -> {', '.join(message.rcpt_to)}"
        f"  subject={subject!r}  {len(message.data)} bytes"
    )
    return line if saved is None else f"{line}  saved {saved}"


# -- demo ----------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    if args.messages < 1:
        args.parser.error("--messages must be at least 1")
    if args.store is not None:
        return _run_demo(args, args.store)
    with tempfile.TemporaryDirectory() as tmp:
        return _run_demo(args, Path(tmp) / "demo.sqlite3")


def _run_demo(args: argparse.Namespace, store: Path) -> int:
    if args.mx:
        return anyio.run(mx_demo, store)
    return anyio.run(relay_demo, store, args.messages)
