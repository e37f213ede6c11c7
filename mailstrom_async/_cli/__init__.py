"""The ``mailstrom-async`` command: submit mail, run workers, operate the queue.

One module per family of subcommands: :mod:`._send` (send), :mod:`._queue`
(status, retry, cancel, purge; ``status --history`` in :mod:`._history`; and
:mod:`._show` for show, :mod:`._listing` for queue), :mod:`._hold` (hold, release),
:mod:`._leases` (leases), :mod:`._migrate` (migrate), :mod:`._run` (worker,
sink, demo); shared
options and output in :mod:`._common`. :func:`main` turns every error meant for
a person into one line on stderr and an exit code, never a traceback; with
``--json`` that line is a JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import version

from mailstrom_async._cli import _hold, _leases, _migrate, _queue, _run, _send
from mailstrom_async._cli._common import (
    DEFAULT_STORE_PATH,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CLIError,
    Parser,
    UsageError,
    print_error,
)
from mailstrom_async._exceptions import MailstromError

__all__ = ["main"]

_EPILOG = f"""\
Queue commands work on one store: --store PATH|URL, else $MAILSTROM_STORE,
else ./{DEFAULT_STORE_PATH}: a SQLite file (PATH, sqlite:///PATH) or a
PostgreSQL database (postgresql://USER:PASSWORD@HOST:PORT/DB). Delivery
settings come from --config FILE.toml (or $MAILSTROM_CONFIG) and MAILSTROM_*
variables, e.g. MAILSTROM_RELAY__HOST, MAILSTROM_RELAY__PORT,
MAILSTROM_LIMITS__MAX_CONNECTIONS.

examples:
  mailstrom-async send --from me@example.com --to you@example.org --subject Hi --body Hello
  mailstrom-async worker
  mailstrom-async queue
  mailstrom-async show --body ID
  mailstrom-async status ID
  mailstrom-async retry --domain example.org
  mailstrom-async hold --domain example.org
  mailstrom-async migrate --store postgresql://mail:secret@db.internal/mail

exit codes: 0 ok, 1 error (for migrate --check: migrations pending), 2 usage
error, 3 a recipient failed (send --wait), 4 still pending when send --wait
timed out, 5 the store's schema is newer than this mailstrom-async (migrate),
130 interrupted. Errors are one
line on stderr; with --json, one JSON object {{"error": ..., "exit_code": N}}.
Run 'mailstrom-async COMMAND --help' for each command's options.
"""


def _parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Durable asyncio email delivery: submit mail, run a worker, "
        "inspect and steer the queue, capture mail locally.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {version('mailstrom-async')}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _send.add_parser(sub)
    _run.add_parsers(sub)
    _queue.add_parsers(sub)
    _leases.add_parser(sub)
    _hold.add_parsers(sub)
    _migrate.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except UsageError as exc:
        print_error(str(exc), EXIT_USAGE, as_json=_wants_json(argv))
        return EXIT_USAGE
    args.argv = argv  # the command line, for a command that runs itself again
    as_json = bool(getattr(args, "json", False))
    try:
        code: int = args.handler(args)
    except UsageError as exc:  # a usage error found by a handler
        print_error(str(exc), EXIT_USAGE, as_json=as_json)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:
        reason = _reason(exc)
        if reason is None:
            raise
        print_error(reason, EXIT_ERROR, as_json=as_json)
        return EXIT_ERROR
    return code


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether a command line that could not be parsed asked for --json (so
    that its usage error is JSON too)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def _reason(exc: BaseException) -> str | None:
    """One line for an error meant for a person; None for a bug."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            reason = _reason(inner)
            if reason is not None:
                return reason
        return None
    if isinstance(exc, CLIError | MailstromError):
        text = " ".join(str(exc).split())
        if "database is locked" in text:
            text += " (another process holds the store; see --lock-timeout)"
        return text
    return None
