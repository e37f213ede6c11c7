"""Which store a URL names: :func:`store_from_url`, for configuration and the CLI.

The forms (the scheme is case-insensitive)::

    postgresql://user:password@host:port/db   PostgresStore (also postgres://)
    sqlite:///relative/path.sqlite3           SQLiteStore, relative to the cwd
    sqlite:////absolute/path.sqlite3          SQLiteStore, absolute
    relative/path.sqlite3, /absolute/path     SQLiteStore (no scheme: a file path)
    memory:                                   MemoryStore (this process only)

A valid PostgreSQL URL is shown (``StoreLocation.display``, the store's repr, the
CLI's lines) with its password masked, by the same
:func:`~mailstrom_async._store._postgres.redact` that PostgresStore uses; an
error about a malformed URL never quotes it.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import attrs

from mailstrom_async._exceptions import ConfigError
from mailstrom_async._store._memory import MemoryStore
from mailstrom_async._store._postgres import PostgresStore, redact
from mailstrom_async._store._sqlite import SQLiteStore

if TYPE_CHECKING:
    from mailstrom_async._store._base import Store

__all__ = ["StoreLocation", "parse_store_url", "store_from_url"]

StoreKind = Literal["postgres", "sqlite", "memory"]

_FORMS = (
    "postgresql://USER:PASSWORD@HOST:PORT/DB, sqlite:///relative/path, "
    "sqlite:////absolute/path, a file path, or memory:"
)
# A scheme as RFC 3986 spells it; one letter is a Windows drive (C:\...), a path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
_CLASSES: dict[StoreKind, type[Any]] = {
    "postgres": PostgresStore,
    "sqlite": SQLiteStore,
    "memory": MemoryStore,
}


@attrs.frozen
class StoreLocation:
    """A parsed store URL: the kind of store and what its constructor takes.

    ``target`` is the DSN for PostgreSQL (with its password: never print it; print
    ``display``), the file path for SQLite, and empty for memory.
    """

    kind: StoreKind
    target: str = attrs.field(repr=False)
    display: str


def parse_store_url(url: str | os.PathLike[str]) -> StoreLocation:
    """The store *url* names; see :func:`store_from_url` for the forms.

    Raises:
        ConfigError: the URL is empty, malformed, or has an unknown scheme. The
            message names the scheme and says what is wrong, but never quotes
            the URL: a malformed one cannot be trusted to show where its
            password is.
    """
    text = os.fspath(url)
    if not text.strip():
        msg = f"empty store URL: give {_FORMS}"
        raise ConfigError(msg)
    match = _SCHEME.match(text)
    if match is None:  # no scheme: a file path
        return StoreLocation("sqlite", text, text)
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme in _POSTGRES_SCHEMES:
        return _postgres(text, scheme, rest)
    if scheme == "sqlite":
        return _sqlite(rest)
    if scheme == "memory":
        if rest:
            msg = "malformed memory store URL: it is just 'memory:', with nothing after it"
            raise ConfigError(msg)
        return StoreLocation("memory", "", "memory:")
    msg = (
        f"unknown store URL scheme {scheme!r}: give {_FORMS} (for a file whose "
        f"name has a colon, put a directory in front: ./{match.group(1)}:...)"
    )
    raise ConfigError(msg)


def _postgres(text: str, scheme: str, rest: str) -> StoreLocation:
    what = f"malformed PostgreSQL store URL ({scheme}://...)"
    if not rest.startswith("//"):
        msg = f"{what}: write {scheme}://user:password@host:5432/db"
        raise ConfigError(msg)
    try:
        parts = urlsplit(text)
    except ValueError:
        msg = f"{what}: its host cannot be parsed (an IPv6 address goes in [...])"
        raise ConfigError(msg) from None
    try:
        parts.port  # noqa: B018 - reading the port raises on a bad one
    except ValueError:
        msg = (
            f"{what}: its port is not a number from 0 to 65535 (a '/', '@' or ':' "
            "in the user name or password must be percent-encoded: %2F, %40, %3A)"
        )
        raise ConfigError(msg) from None
    return StoreLocation("postgres", text, redact(text))


def _sqlite(rest: str) -> StoreLocation:
    what = "malformed SQLite store URL"
    if not rest.startswith("///"):
        msg = (
            f"{what}: write sqlite:///relative/path or sqlite:////absolute/path "
            "(a SQLite URL has no host)"
        )
        raise ConfigError(msg)
    path = rest[3:]
    if "?" in path or "#" in path:
        msg = (
            f"{what}: it takes no ?query or #fragment (give options as keyword "
            "arguments)"
        )
        raise ConfigError(msg)
    if not path or path.endswith("/"):
        msg = f"{what}: it names no file: write sqlite:///path/to/queue.sqlite3"
        raise ConfigError(msg)
    return StoreLocation("sqlite", path, path)


def store_from_url(url: str | os.PathLike[str], **options: Any) -> Store:
    """The store that *url* names, not opened yet.

    - ``postgresql://user:password@host:5432/db`` (or ``postgres://...``): a
      :class:`PostgresStore` with that DSN (it needs the ``postgres`` extra).
    - ``sqlite:///relative/path.sqlite3``: a :class:`SQLiteStore` on that file,
      relative to the current directory; ``sqlite:////var/lib/app/q.sqlite3``
      (four slashes): an absolute path.
    - A plain file path, ``queue.sqlite3`` or ``/var/lib/app/q.sqlite3`` (or a
      :class:`~pathlib.Path`): a :class:`SQLiteStore` on that file.
    - ``memory:``: a :class:`MemoryStore`. Its queue lives in this process only
      and is lost when the process ends: for tests and trials, never for a
      queue that several processes share.

    The scheme is case-insensitive. A file whose name has a colon is written
    with a directory in front: ``./queue:1.sqlite3``. A SQLite URL takes no
    host, query or fragment.

    Args:
        url: the store's URL or file path.
        options: keyword arguments for the store's constructor, e.g.
            ``busy_timeout=`` for SQLite, ``max_size=`` for PostgreSQL.

    Raises:
        ConfigError: *url* is empty, malformed, or has an unknown scheme. No
            message shows the URL's password.
        TypeError: an option that the chosen store does not take.
        StoreError: a PostgreSQL URL without asyncpg installed (the message
            names the extra: ``pip install 'mailstrom-async[postgres]'``).
        ValueError: an option's value is out of range.
    """
    location = parse_store_url(url)
    _check_options(location, options)
    if location.kind == "memory":
        return MemoryStore()
    store: Store = _CLASSES[location.kind](location.target, **options)
    return store


def _check_options(location: StoreLocation, options: dict[str, Any]) -> None:
    """A TypeError naming the options that the store of *location* does not
    take, and those it does (its keyword-only parameters)."""
    cls = _CLASSES[location.kind]
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        msg = (
            f"{cls.__name__} (for {location.display!r}) does not take "
            f"{', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(accepted) if accepted else 'no options'}"
        )
        raise TypeError(msg)
