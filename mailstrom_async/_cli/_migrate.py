"""Applying the store's schema migrations ahead of a deploy: the migrate subcommand."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli._common import (
    EXIT_OK,
    add_store_options,
    load_config,
    open_store,
    opened,
    print_error,
    print_json,
    store_location,
)
from mailstrom_async._store import PostgresStore, SQLiteStore

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser

__all__ = ["EXIT_MIGRATIONS_PENDING", "EXIT_NEWER_SCHEMA", "add_parser"]

#: ``migrate --check``: migrations are pending (also every command's error code).
EXIT_MIGRATIONS_PENDING = 1
#: ``migrate``: the store's schema is newer than this mailstrom_async knows.
EXIT_NEWER_SCHEMA = 5

_EPILOG = f"""\
exit codes:
  0  the schema is current (after migrating, or with --check: nothing to do)
  {EXIT_MIGRATIONS_PENDING}  --check: migrations are pending (and, as for every command, an
     error: the store cannot be reached or read; the message on stderr says so)
  2  a usage error
  {EXIT_NEWER_SCHEMA}  the store was written by a newer mailstrom_async than this one:
     upgrade it before using the store (nothing is changed)

examples:
  mailstrom-async migrate --store postgresql://mail:secret@db.internal/mail
  mailstrom-async migrate --check --json
  MAILSTROM_STORE=/var/lib/app/mail.sqlite3 mailstrom-async migrate
"""


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the migrate subcommand."""
    p = sub.add_parser(
        "migrate",
        help="create or upgrade the store's schema (ahead of a deploy)",
        description="Apply the store's pending schema migrations, as a worker or "
        "any command does when it opens the store, and say from which version to "
        "which: so that a deploy can migrate once, before its new workers start. "
        "A missing SQLite file, or an empty PostgreSQL database, gets the whole "
        "schema. With --check, apply nothing: only say whether migrations are "
        "pending (exit code 1) or the schema is current (0).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="apply nothing; exit 0 when the schema is current, 1 when migrations "
        "are pending",
    )
    add_store_options(p)
    p.set_defaults(handler=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    load_config(args)  # the same checks as every command
    location = store_location(args)
    store = open_store(args, create=True)
    if not isinstance(store, SQLiteStore | PostgresStore):
        msg = "unreachable"
        raise AssertionError(msg)
    known = store.SCHEMA_VERSION
    found = anyio.run(store.schema_version)
    fields: dict[str, str | int] = {
        "store": location.display,
        "backend": location.kind,
    }
    if found > known:
        msg = (
            f"the store {location.display!r} has schema version {found}, newer than "
            f"this mailstrom_async knows ({known}): upgrade mailstrom-async before "
            "using this store (nothing was changed)"
        )
        print_error(
            msg,
            EXIT_NEWER_SCHEMA,
            as_json=args.json,
            version=found,
            code_version=known,
            **fields,
        )
        return EXIT_NEWER_SCHEMA
    if args.check:
        return _report_check(found, known, fields, as_json=args.json)

    async def run() -> int:
        async with opened(store):
            return await store.schema_version()

    now = anyio.run(run)
    if args.json:
        print_json(
            {
                **fields,
                "from_version": found,
                "to_version": now,
                "migrated": found != now,
            }
        )
    elif found == now:
        print(
            f"{location.display}: schema version {now} is current: nothing to migrate"
        )
    else:
        print(f"migrated {location.display} from schema version {found} to {now}")
    return EXIT_OK


def _report_check(
    found: int, known: int, fields: dict[str, str | int], *, as_json: bool
) -> int:
    pending = known - found
    if as_json:
        print_json(
            {
                **fields,
                "version": found,
                "code_version": known,
                "pending": pending,
                "up_to_date": pending == 0,
            }
        )
    elif pending == 0:
        print(f"{fields['store']}: schema version {found} is current")
    else:
        print(
            f"{fields['store']}: schema version {found}, this mailstrom_async "
            f"writes {known}: {pending} migration(s) pending (run 'mailstrom-async "
            "migrate')"
        )
    return EXIT_OK if pending == 0 else EXIT_MIGRATIONS_PENDING
