"""Long-running subcommands: ``worker``, ``sink``, and ``demo``."""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import importlib.util
import json
import logging
import signal
import tempfile
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
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._demo import mx_demo, relay_demo
from mailstrom_async._sink import SinkServer

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._config import Config
    from mailstrom_async._events import EventStream
    from mailstrom_async._sink import CapturedMessage
    from mailstrom_async._store import SQLiteStore

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
    # --json (from the store options) makes each log line a JSON object.
    add_store_options(p)
    p.set_defaults(handler=_worker)

    p = sub.add_parser(
        "sink",
        help="a local SMTP server that prints (and saves) what it receives",
        description="Accept every message over SMTP, print one line per message "
        "(sender, recipients, subject, size) and optionally save each as an .eml "
        "file, for development. Stops cleanly on SIGINT/SIGTERM. It is part of "
        "mailstrom-async: no extra dependency.",
        epilog="examples:\n  mailstrom-async sink\n"
        "  mailstrom-async sink --port 2526 --save-dir ./outbox --json\n"
        "then point a Deliverer at it: MAILSTROM_RELAY__HOST=127.0.0.1 "
        "MAILSTROM_RELAY__PORT=2525 MAILSTROM_RELAY__TLS=none",
        formatter_class=_FORMATTER,
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    p.add_argument(
        "--port", type=_port, default=2525, help="default 2525; 0 picks a free one"
    )
    p.add_argument("--save-dir", metavar="DIR", help="write each message to DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
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
    return anyio.run(_run_worker, config, store, backend_options=options)


def _loop_options(choice: str) -> dict[str, bool]:
    """anyio's asyncio options for ``--loop``: uvloop if asked for or installed."""
    if choice == "asyncio":
        return {}
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        msg = "--loop uvloop: uvloop is not installed (pip install 'mailstrom-async[uvloop]')"
        raise CLIError(msg)
    return {"use_uvloop": installed}


async def _run_worker(config: Config, store: SQLiteStore) -> int:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # The task group outlives the Deliverer: the event stream ends once the
        # Deliverer has closed, after the events of the transactions that
        # finished during shutdown, and every one of them is logged.
        async with (
            anyio.create_task_group() as tg,
            Deliverer(config, store=store, mode="deliver") as deliverer,
        ):
            tg.start_soon(_log_events, deliverer.events())
            async for signum in signals:
                name = signal.Signals(signum).name
                logger.info("stopping", extra={"signal": name})
                break
    return EXIT_OK


async def _log_events(events: EventStream) -> None:
    async for event in events:
        r = event.recipient
        logger.info(
            event.state.value,
            extra={
                "message_id": event.message_id,
                "recipient_domain": r.domain,
                "attempt": r.attempts,
                "code": r.code,
                "enhanced_code": r.enhanced_code,
                "host": r.host,
            },
        )


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
    return anyio.run(_run_sink, args.host, args.port, save_dir, args.json)


async def _run_sink(host: str, port: int, save_dir: Path | None, as_json: bool) -> int:
    try:
        server = SinkServer(host=host, port=port)
        await server.__aenter__()
    except OSError as exc:
        msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise CLIError(msg) from None
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            print(f"sink listening on {host}:{server.port}", flush=True)
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
