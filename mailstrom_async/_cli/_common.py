"""What every subcommand shares: options, the store and config, output helpers.

Errors meant for the person at the terminal are :class:`CLIError` (or a
:class:`~mailstrom_async.MailstromError`); ``main()`` prints each as one line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import attrs

from mailstrom_async._config import Config, read_toml
from mailstrom_async._deliverer import DEFAULT_STORE_PATH
from mailstrom_async._models import MessageStatus, RecipientStatus
from mailstrom_async._store import PostgresStore, SQLiteStore
from mailstrom_async._store._url import parse_store_url

if TYPE_CHECKING:
    from mailstrom_async._store import Store
    from mailstrom_async._store._url import StoreLocation

__all__ = [
    "DEFAULT_STORE_PATH",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PENDING",
    "EXIT_USAGE",
    "PROG",
    "CLIError",
    "Parser",
    "UsageError",
    "add_store_options",
    "age",
    "duration",
    "load_config",
    "message_id",
    "non_negative_seconds",
    "one_target",
    "open_store",
    "opened",
    "plain_value",
    "positive_seconds",
    "print_error",
    "print_json",
    "recipient_json",
    "reply_text",
    "setup_logging",
    "state_text",
    "status_json",
    "store_location",
    "table",
    "timestamp",
    "utcnow",
]

PROG = "mailstrom-async"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_PENDING = 4
EXIT_INTERRUPTED = 130

#: How long a command waits for a store another process holds, by default.
DEFAULT_LOCK_TIMEOUT = 10.0


class CLIError(Exception):
    """A bad input or a failure, told in one line; exit code 1."""


class UsageError(Exception):
    """A usage error (unknown option, bad or missing argument); exit code 2.

    ``main()`` prints it like every other error: one line, or JSON with --json.
    """


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are :class:`UsageError`, which
    ``main()`` prints as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        msg = f"{message} (see '{self.prog} --help')"
        raise UsageError(msg)


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- options -------------------------------------------------------------------

STORE_HELP = (
    "the queue: a SQLite file (PATH or sqlite:///PATH), or a PostgreSQL "
    "database (postgresql://USER:PASSWORD@HOST:PORT/DB); default: "
    f"$MAILSTROM_STORE, else ./{DEFAULT_STORE_PATH} in the current directory"
)


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """--store, --config, --lock-timeout and --json, shared by queue commands."""
    group = parser.add_argument_group("store and configuration")
    group.add_argument("--store", metavar="PATH|URL", help=STORE_HELP)
    group.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML configuration file (default: $MAILSTROM_CONFIG); "
        "MAILSTROM_* variables override its settings",
    )
    group.add_argument(
        "--lock-timeout",
        metavar="SECONDS",
        type=non_negative_seconds,
        default=DEFAULT_LOCK_TIMEOUT,
        help="how long to wait for a SQLite store that another process holds "
        f"(default {DEFAULT_LOCK_TIMEOUT:g})",
    )
    group.add_argument(
        "--json", action="store_true", help="print JSON for scripts instead of text"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number of seconds: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value != value or value == float("inf"):
        msg = f"not a finite number of seconds: {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def non_negative_seconds(text: str) -> float:
    value = _seconds(text)
    if value < 0:
        msg = f"must be 0 or more seconds, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        msg = f"must be more than 0 seconds, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``3600s``, ``1d12h``, or plain seconds."""
    compact = text.strip().lower()
    try:
        if compact and all(c.isdigit() or c == "." for c in compact):
            return timedelta(seconds=float(compact))
        parts = _DURATION.findall(compact)
        if parts and "".join(n + u for n, u in parts) == compact:
            return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
    except (ValueError, OverflowError):
        pass
    msg = f"invalid duration {text!r}: use e.g. 7d, 12h, 30m or 3600s"
    raise argparse.ArgumentTypeError(msg)


def message_id(text: str) -> str:
    """A message id as the queue knows it, from the way a person may give it.

    The id is accepted as ``send`` printed it (``abc@example.com``) or as it
    appears in a ``Message-ID`` header (``<abc@example.com>``), with surrounding
    whitespace. Every command that takes an id uses this (as the argparse
    ``type``), so all of them accept the same forms.
    """
    value = text.strip()
    if len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        value = value[1:-1].strip()
    if not value or "<" in value or ">" in value or any(c.isspace() for c in value):
        msg = (
            f"not a message id: {text!r} (give it as 'send' printed it, "
            "with or without the <> of a Message-ID header)"
        )
        raise argparse.ArgumentTypeError(msg)
    return value


# -- store and config -----------------------------------------------------------


def one_target(args: argparse.Namespace, *, allow_all: bool = True) -> None:
    """Refuse (a usage error) unless exactly one of ID, --domain (and --all)
    names what a queue command acts on."""
    given = [args.message_id is not None, args.domain is not None]
    if allow_all:
        given.append(bool(args.all))
    if sum(given) != 1:
        what = "ID, --domain DOMAIN or --all" if allow_all else "ID or --domain DOMAIN"
        args.parser.error(f"give exactly one of {what}")


def store_location(args: argparse.Namespace) -> StoreLocation:
    """Where the options put the queue: --store, else $MAILSTROM_STORE, else
    the default SQLite file (a path or a URL, as ``store_from_url()`` takes).

    Raises:
        ConfigError: a malformed URL or an unknown scheme.
    """
    given = args.store or os.environ.get("MAILSTROM_STORE") or DEFAULT_STORE_PATH
    location = parse_store_url(given)
    if location.kind == "memory":
        msg = (
            "the memory: store keeps a queue in one process only, and each "
            "command is a process of its own: give --store a SQLite file or a "
            "postgresql:// URL"
        )
        raise CLIError(msg)
    return location


def open_store(args: argparse.Namespace, *, create: bool) -> Store:
    """The store the options name (not opened yet).

    Commands that only read or change queued mail (*create* False) never create
    a queue: not a SQLite file, and not the schema in an empty PostgreSQL
    database (one connection is made to look for it).

    Raises:
        CLIError: a SQLite path is a directory, or there is no queue there and
            *create* is False; or the memory: store.
        ConfigError: a malformed URL or an unknown scheme.
        StoreError: a PostgreSQL URL without the postgres extra, or (*create*
            False) a database that cannot be reached.
    """
    location = store_location(args)
    if location.kind == "postgres":
        store = PostgresStore(location.target)
        if not create and anyio.run(store.schema_version) == 0:
            msg = (
                f"no queue in the PostgreSQL database {location.display!r}: "
                "check --store or MAILSTROM_STORE, or create it with "
                "'mailstrom-async migrate' (nothing was submitted to this one yet)"
            )
            raise CLIError(msg)
        return store
    path = Path(location.target)
    if path.is_dir():
        msg = f"store {str(path)!r} is a directory, not a SQLite file"
        raise CLIError(msg)
    if not create and not path.exists():
        msg = (
            f"no store at {str(path)!r}: give --store PATH|URL or set "
            "MAILSTROM_STORE (nothing was submitted to this one yet)"
        )
        raise CLIError(msg)
    return SQLiteStore(path, busy_timeout=args.lock_timeout)


@contextlib.asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    """``async with opened(store):`` opens *store* and closes it on the way out
    (the :class:`Store` protocol has ``open()`` and ``aclose()``, not ``async with``)."""
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


def load_config(args: argparse.Namespace) -> Config:
    """The Config from --config (or $MAILSTROM_CONFIG) and MAILSTROM_* variables.

    Raises:
        ConfigError: the file is unreadable or not TOML, or a setting is bad.
    """
    path = args.config or os.environ.get("MAILSTROM_CONFIG")
    base = read_toml(path) if path else None
    return Config.from_env(os.environ, base=base)


# -- output --------------------------------------------------------------------


def setup_logging(*, verbose: bool, as_json: bool = False) -> None:
    """Log lines to stderr with each record's structured ``extra`` fields, as
    ``key=value`` text or as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if as_json else _ExtraFormatter())
    root = logging.getLogger("mailstrom_async")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class _ExtraFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def timestamp(value: datetime | None) -> str:
    return (
        "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    )


def age(since: datetime, now: datetime) -> str:
    """A short age: ``45s``, ``12m``, ``3h20m``, ``2d4h``."""
    seconds = max(0, int((now - since).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    cells = [list(header)] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell if i == len(row) - 1 else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in cells
    )


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, bytes):  # raw_message: the exact bytes, for JSON
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "value"):  # an enum
        return value.value
    return value


def plain_value(value: Any) -> Any:
    """*value* for JSON: a datetime in ISO 8601 UTC, bytes in base64, an enum's value."""
    return _plain(value)


def recipient_json(status: RecipientStatus) -> dict[str, Any]:
    fields = attrs.fields(RecipientStatus)
    plain = {f.name: _plain(getattr(status, f.name)) for f in fields}
    # Decided here, not by a server (code is null): said outright.
    plain["local"] = status.is_local
    return plain


def status_json(status: MessageStatus) -> dict[str, Any]:
    return {
        "message_id": status.message_id,
        "mail_from": status.mail_from,
        "submitted_at": _plain(status.submitted_at),
        "done": status.is_done,
        "held": any(r.held for r in status),
        "recipients": [recipient_json(r) for r in status],
    }


def state_text(status: RecipientStatus) -> str:
    """A recipient's state, ``(held)`` after it when it is on hold."""
    return f"{status.state.value} (held)" if status.held else status.state.value


def reply_text(status: RecipientStatus) -> str:
    """A recipient's last reply in one line: ``451 4.2.1 mailbox busy``; an
    outcome decided here starts ``local:``; empty before any attempt."""
    text = " ".join((status.message or "").split())
    if status.is_local:
        return f"local: {text}" if text else "local"
    parts = [
        str(status.code) if status.code is not None else "",
        status.enhanced_code or "",
        text,
    ]
    return " ".join(p for p in parts if p)


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def print_error(
    text: str, code: int, *, as_json: bool, **fields: str | int | None
) -> None:
    """An error on stderr: ``mailstrom-async: error: TEXT``, or with *as_json*
    one JSON object ``{"error": TEXT, "exit_code": CODE, **fields}``."""
    if as_json:
        entry = {"error": text, "exit_code": code, **fields}
        print(json.dumps(entry, ensure_ascii=False), file=sys.stderr, flush=True)
    else:
        print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)
