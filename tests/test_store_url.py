"""store_from_url(): the URL forms, every error (never with a password in it),
stores opened through a URL on a real PostgreSQL and SQLite file, and the stores'
schema_version()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiosqlite
import pytest

from mailstrom_async import (
    ConfigError,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    StoreError,
    store_from_url,
)
from mailstrom_async._store import _postgres_sql, _sql
from mailstrom_async._store._url import parse_store_url
from mailstrom_async.testing._store_common import new_message

SECRET = "s3cr3t-Pa55"


# -- the forms -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://mail:{SECRET}@db.internal:5432/mail",
        f"postgres://mail:{SECRET}@db.internal/mail",
        f"PostgreSQL://mail:{SECRET}@db.internal/mail?sslmode=require",
        "postgresql://",  # libpq's defaults and PG* variables
    ],
)
def test_postgresql_urls_make_a_postgres_store(url: str) -> None:
    """Both schemes (any case) give a PostgresStore with that DSN; its repr masks
    the password."""
    pytest.importorskip("asyncpg")
    store = store_from_url(url)
    assert isinstance(store, PostgresStore)
    assert SECRET not in repr(store)
    location = parse_store_url(url)
    assert location.kind == "postgres"
    assert location.target == url
    assert SECRET not in location.display
    assert SECRET not in repr(location)
    if SECRET in url:
        assert ":***@db.internal" in location.display


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///queue.sqlite3", "queue.sqlite3"),
        ("sqlite:///var/q.db", "var/q.db"),
        ("sqlite:////var/lib/app/q.db", "/var/lib/app/q.db"),
        ("SQLITE:////srv/q.db", "/srv/q.db"),
        ("queue.sqlite3", "queue.sqlite3"),
        ("/var/lib/app/q.db", "/var/lib/app/q.db"),
        ("./queue:1.sqlite3", "./queue:1.sqlite3"),
        ("q:1.db", "q:1.db"),  # one letter before a colon is no scheme
    ],
)
def test_sqlite_urls_and_paths_make_a_sqlite_store(url: str, path: str) -> None:
    """sqlite:/// is relative, sqlite://// absolute, and a plain path is a file."""
    store = store_from_url(url)
    assert isinstance(store, SQLiteStore)
    assert repr(store) == f"<SQLiteStore {path!r} closed>"
    assert parse_store_url(url).target == path


def test_a_path_object_is_a_sqlite_file(tmp_path: Path) -> None:
    store = store_from_url(tmp_path / "q.sqlite3")
    assert repr(store) == f"<SQLiteStore {str(tmp_path / 'q.sqlite3')!r} closed>"


def test_memory_url_makes_a_memory_store() -> None:
    assert isinstance(store_from_url("memory:"), MemoryStore)
    assert isinstance(store_from_url("MEMORY:"), MemoryStore)
    assert parse_store_url("memory:").display == "memory:"


def test_options_reach_the_store() -> None:
    """Keyword options go to the store's constructor, which checks them."""
    with pytest.raises(ValueError, match="synchronous must be one of"):
        store_from_url("sqlite:///q.db", synchronous="sometimes")
    with pytest.raises(ValueError, match="busy_timeout must be"):
        store_from_url("q.db", busy_timeout=-1)
    pytest.importorskip("asyncpg")
    with pytest.raises(ValueError, match="pool sizes must satisfy"):
        store_from_url(f"postgresql://u:{SECRET}@h/db", min_size=5, max_size=2)


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("q.db", {"max_size": 3}, "SQLiteStore (for 'q.db') does not take 'max_size'"),
        ("memory:", {"busy_timeout": 1}, "MemoryStore (for 'memory:') does not take"),
        (
            f"postgresql://u:{SECRET}@h/db",
            {"busy_timeout": 1, "synchronous": "FULL"},
            "PostgresStore (for 'postgresql://u:***@h/db') does not take "
            "'busy_timeout', 'synchronous'; it takes min_size, max_size, command_timeout",
        ),
    ],
)
def test_an_option_the_store_does_not_take_is_a_type_error(
    url: str, options: dict[str, object], expected: str
) -> None:
    """It names the store, the options it does not take and those it does."""
    if url.startswith("postgresql"):
        pytest.importorskip("asyncpg")
    with pytest.raises(TypeError) as info:
        store_from_url(url, **options)
    assert expected in str(info.value)
    assert SECRET not in str(info.value)


# -- errors --------------------------------------------------------------------

BAD_URLS = [
    ("", "empty store URL"),
    ("   ", "empty store URL"),
    (f"mysql://mail:{SECRET}@db/mail", "unknown store URL scheme 'mysql'"),
    (f"redis://:{SECRET}@cache:6379/0", "unknown store URL scheme 'redis'"),
    (f"file:///var/{SECRET}.db", "unknown store URL scheme 'file'"),
    ("queue:1.sqlite3", "put a directory in front: ./queue:..."),
    (f"postgresql:mail:{SECRET}@db/mail", "write postgresql://user:password@host"),
    (f"postgres:/mail:{SECRET}@db/mail", "write postgres://user:password@host"),
    (f"postgresql://mail:{SECRET}@db:notaport/mail", "its port is not a number"),
    (f"postgresql://mail:{SECRET}@db:99999/mail", "its port is not a number"),
    (f"postgresql://mail:pa/{SECRET}@db/mail", "must be percent-encoded"),
    (f"postgresql://mail:{SECRET}@[::1/mail", "its host cannot be parsed"),
    (f"postgresql://mail:{SECRET}@[{SECRET}]/mail", "its host cannot be parsed"),
    (f"sqlite://mail:{SECRET}@host/q.db", "a SQLite URL has no host"),
    ("sqlite://q.db", "a SQLite URL has no host"),
    ("sqlite:q.db", "write sqlite:///relative/path or sqlite:////absolute/path"),
    ("sqlite:///", "it names no file"),
    ("sqlite:///var/lib/", "it names no file"),
    (f"sqlite:///q.db?password={SECRET}", "it takes no ?query or #fragment"),
    ("sqlite:///q.db#x", "it takes no ?query or #fragment"),
    (f"memory:{SECRET}", "it is just 'memory:'"),
    ("memory://", "it is just 'memory:'"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_bad_urls_are_config_errors_without_the_password(
    url: str, expected: str
) -> None:
    """Each is a ConfigError that says what is wrong and never quotes the
    password (nor the rest of a URL that could not be parsed)."""
    with pytest.raises(ConfigError) as info:
        store_from_url(url)
    text = str(info.value)
    assert expected in text
    assert SECRET not in text
    assert SECRET not in repr(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


def test_unknown_scheme_lists_the_forms() -> None:
    with pytest.raises(ConfigError) as info:
        store_from_url("mongodb://db/q")
    assert "postgresql://USER:PASSWORD@HOST:PORT/DB" in str(info.value)
    assert "sqlite:///relative/path" in str(info.value)
    assert "memory:" in str(info.value)


def test_without_asyncpg_a_postgres_url_names_the_extra() -> None:
    """A process where asyncpg cannot be imported: a StoreError that names the
    postgres extra, and no password; SQLite URLs still work there."""
    script = (
        "import sys\n"
        "sys.modules['asyncpg'] = None  # import asyncpg raises ImportError\n"
        "from mailstrom_async import StoreError, store_from_url\n"
        "print(type(store_from_url('sqlite:///q.db')).__name__)\n"
        "try:\n"
        f"    store_from_url('postgresql://u:{SECRET}@h/db')\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "SQLiteStore"
    assert "mailstrom-async[postgres]" in lines[1]
    assert SECRET not in result.stdout + result.stderr


# -- real stores through a URL, and schema_version() ---------------------------


async def test_sqlite_urls_open_real_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///name is in the current directory, sqlite:////path where it says;
    both hold a queue, reopened through a plain path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "abs").mkdir()
    absolute = tmp_path / "abs" / "q.sqlite3"
    for url, path in [
        ("sqlite:///rel.sqlite3", tmp_path / "rel.sqlite3"),
        (f"sqlite:///{absolute}", absolute),  # absolute path: four slashes
    ]:
        store = store_from_url(url, busy_timeout=1)
        assert isinstance(store, SQLiteStore)
        assert await store.schema_version() == 0
        assert not path.exists()  # reading the version creates nothing
        async with store:
            await store.add(new_message("m1"))
            assert await store.schema_version() == SQLiteStore.SCHEMA_VERSION
        assert path.exists()
        again = store_from_url(str(path))
        assert isinstance(again, SQLiteStore)
        assert await again.schema_version() == _sql.SCHEMA_VERSION  # closed: reads
        await again.open()
        try:
            assert (await again.status("m1")).message_id == "m1"
        finally:
            await again.aclose()


async def test_sqlite_schema_version_reads_without_migrating(tmp_path: Path) -> None:
    """An empty file reads 0 and stays empty; a file of a newer mailstrom_async
    reads its version (open() refuses it); a file that is not SQLite is a
    StoreError."""
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    assert await SQLiteStore(empty).schema_version() == 0
    assert empty.read_bytes() == b""

    newer = tmp_path / "newer.sqlite3"
    async with SQLiteStore(newer):
        pass
    async with aiosqlite.connect(newer) as db:
        await db.execute("PRAGMA user_version = 99")
        await db.commit()
    assert await SQLiteStore(newer).schema_version() == 99
    with pytest.raises(StoreError, match="schema version 99, newer"):
        await SQLiteStore(newer).open()

    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(StoreError, match="is not a SQLite database"):
        await SQLiteStore(junk).schema_version()


async def test_postgres_url_opens_a_real_database(postgres_dsn: str) -> None:
    """postgresql:// and postgres:// name the same database; schema_version()
    is 0 before open() (which it does not do), current after, on the open pool
    and on a closed store."""
    store = store_from_url(postgres_dsn, max_size=2)
    assert isinstance(store, PostgresStore)
    assert await store.schema_version() == 0
    assert await store.schema_version() == 0  # still: reading migrates nothing
    async with store:
        assert await store.schema_version() == PostgresStore.SCHEMA_VERSION
        await store.add(new_message("m1"))
    other = "postgres://" + postgres_dsn.removeprefix("postgresql://")
    again = store_from_url(other)
    assert isinstance(again, PostgresStore)
    assert await again.schema_version() == _postgres_sql.SCHEMA_VERSION
    async with again:
        assert (await again.status("m1")).message_id == "m1"


async def test_postgres_schema_version_of_a_newer_database(postgres_dsn: str) -> None:
    """A database written by a newer mailstrom_async reads its version; open()
    refuses it."""
    import asyncpg

    async with PostgresStore(postgres_dsn):
        pass
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"UPDATE {_postgres_sql.SCHEMA_TABLE} SET version = 99")  # noqa: S608
    finally:
        await conn.close()
    store = PostgresStore(postgres_dsn)
    assert await store.schema_version() == 99
    with pytest.raises(StoreError, match="schema version 99, newer"):
        await store.open()


async def test_postgres_schema_version_of_an_unreachable_server() -> None:
    """No server: a StoreError, without the password."""
    pytest.importorskip("asyncpg")
    from tests.smtpd import free_port

    port = free_port("127.0.0.1")
    store = store_from_url(
        f"postgresql://u:{SECRET}@127.0.0.1:{port}/q?sslmode=disable"
    )
    assert isinstance(store, PostgresStore)
    with pytest.raises(StoreError, match="failed") as info:
        await store.schema_version()
    assert SECRET not in str(info.value)
