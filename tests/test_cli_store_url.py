"""The command on PostgreSQL and through store URLs (issue 13): ``--store URL`` and
``MAILSTROM_STORE=URL`` for every command, end to end against a throwaway
PostgreSQL (tests/postgres.py) and a loopback SMTP server in the test's own loop;
``migrate`` and ``migrate --check`` on empty, older, current and newer schemas of
both SQLite and PostgreSQL; and bad store URLs, whose password is never printed.

In-process commands run main() in a worker thread (``cli.in_thread``), so that
this loop keeps serving SMTP and PostgreSQL fixtures; ``worker`` runs as a child
process.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import anyio
import anyio.to_thread
import pytest
from anyio.abc import Process

from mailstrom_async import PostgresStore, SQLiteStore
from mailstrom_async._store import _postgres_sql, _sql
from tests.cli_support import (  # noqa: F401 - fixtures
    CLI,
    child_env,
    clean_env,
    cli_fixture,
    started,
)
from tests.postgres import fresh_database
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers, free_port

if TYPE_CHECKING:
    from tests.postgres import PostgresCluster

asyncpg = pytest.importorskip("asyncpg")

SECRET = "s3cr3t-Pa55"
SEND = ["send", "--from", "me@example.com", "--subject", "Hi", "--body", "x"]


def with_password(dsn: str) -> str:
    """*dsn* with a password (the test cluster trusts loopback: it is ignored),
    so that every test can check it is never printed."""
    assert "://postgres@" in dsn
    return dsn.replace("://postgres@", f"://postgres:{SECRET}@", 1)


@pytest.fixture(name="pg_url")
async def pg_url_fixture(postgres_cluster: PostgresCluster) -> AsyncIterator[str]:
    """The URL, with a password, of a new empty database (dropped after)."""
    async with fresh_database(postgres_cluster) as dsn:
        yield with_password(dsn)


async def run(cli: CLI, *args: str) -> tuple[int, str, str]:
    """A command in a worker thread: exit code, stdout, stderr; no output of any
    command shows the password."""
    code, out, err = await anyio.to_thread.run_sync(lambda: cli(*args))
    assert SECRET not in out + err
    return code, out, err


async def ok(cli: CLI, *args: str) -> str:
    code, out, err = await run(cli, *args)
    assert code == 0, err
    return out


async def ok_json(cli: CLI, *args: str) -> Any:
    return json.loads(await ok(cli, *args, "--json"))


async def error(cli: CLI, *args: str, code: int = 1) -> str:
    """A failing command: its one error line, without the prefix."""
    got, out, err = await run(cli, *args)
    assert got == code, (out, err)
    [line] = err.splitlines()
    assert line.startswith("mailstrom-async: error: "), err
    return line.removeprefix("mailstrom-async: error: ")


def relay_settings(server: SMTPDServer) -> dict[str, str]:
    return {
        "MAILSTROM_HELO_NAME": "client.test",
        "MAILSTROM_RELAY__HOST": server.host,
        "MAILSTROM_RELAY__PORT": str(server.port),
        "MAILSTROM_RELAY__TLS": "none",
        "MAILSTROM_TIMEOUTS__CONNECT": "5",
        "MAILSTROM_POLL_INTERVAL": "0.1",
    }


async def read_stderr(process: Process) -> str:
    assert process.stderr is not None
    return b"".join([chunk async for chunk in process.stderr]).decode()


async def pg_version(url: str) -> int:
    return await PostgresStore(url).schema_version()


# -- the queue commands on PostgreSQL ---------------------------------------------


async def test_queue_commands_and_worker_on_postgres(
    cli: CLI,
    pg_url: str,
    smtpd: SMTPDServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """send (submit only), queue, status, show, hold, release, retry, then a
    worker process delivers both messages, and status, leases and purge see the
    outcome: all with --store postgresql://..., and the password never shown."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    for name, value in relay_settings(server).items():
        monkeypatch.setenv(name, value)
    store = ["--store", pg_url]

    # A read-only command does not create the queue in an empty database.
    assert "no queue in the PostgreSQL database" in await error(
        cli, "status", "x@example.com", *store
    )
    assert "'mailstrom-async migrate'" in await error(cli, "queue", *store)
    assert await pg_version(pg_url) == 0

    first = (await ok(cli, *SEND, "--to", "a@example.org", *store)).strip()
    second = (await ok(cli, *SEND, "--to", "b@example.net", *store)).strip()
    assert await pg_version(pg_url) == PostgresStore.SCHEMA_VERSION
    listed = await ok_json(cli, "queue", *store)
    assert {m["message_id"] for m in listed["messages"]} == {first, second}
    assert listed["totals"]["recipients"] == 2
    summary = await ok_json(cli, "queue", "--summary", *store)
    assert summary["by_state"]["queued"] == 2
    status = await ok_json(cli, "status", first, *store)
    assert status["recipients"][0]["state"] == "queued"
    assert "Subject: Hi" in await ok(cli, "show", f"<{first}>", *store)

    assert (await ok_json(cli, "hold", "--domain", "example.net", *store))["held"] == 1
    assert (await ok_json(cli, "status", second, *store))["held"] is True
    assert (await ok_json(cli, "release", "--all", *store))["released"] == 1
    assert (await ok_json(cli, "retry", "--all", *store))["due_now"] == 0
    assert (await ok_json(cli, "leases", *store))["owners"] == []
    assert "no message with id" in await error(
        cli, "cancel", "nope@example.com", *store
    )

    env = child_env(MAILSTROM_STORE=pg_url, **relay_settings(server))
    async with started("worker", env=env) as worker:
        with anyio.fail_after(30):
            await handler.received.wait_for(2)
        worker.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            err = await read_stderr(worker)
            code = await worker.wait()
    assert code == 0, err
    assert "Traceback" not in err
    assert SECRET not in err
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
        "a@example.org",
        "b@example.net",
    ]
    for message_id in (first, second):
        [recipient] = (await ok_json(cli, "status", message_id, *store))["recipients"]
        assert recipient["state"] == "delivered"
        assert recipient["code"] == 250
    assert (await ok_json(cli, "queue", *store))["messages"] == []
    purged = await ok_json(cli, "purge", "--older-than", "0s", "--yes", *store)
    assert purged["purged"] == 2
    assert "no message with id" in await error(cli, "status", first, *store)


async def test_send_wait_delivers_through_postgres(
    cli: CLI,
    pg_url: str,
    smtpd: SMTPDServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """send --wait stores in PostgreSQL and delivers in the same process."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    for name, value in relay_settings(server).items():
        monkeypatch.setenv(name, value)
    out = await ok(
        cli, *SEND, "--to", "you@example.org", "--wait", "30", "--store", pg_url
    )
    message_id = out.splitlines()[0]
    assert "you@example.org  delivered  250" in out
    [received] = server.messages
    assert f"Message-ID: <{message_id}>".encode() in received.content


async def test_mailstrom_store_takes_a_url(
    cli: CLI, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAILSTROM_STORE may be a postgresql:// or sqlite:/// URL; --store wins
    over it."""
    monkeypatch.setenv("MAILSTROM_STORE", pg_url)
    in_pg = (await ok(cli, *SEND, "--to", "a@example.org")).strip()
    queued = await ok_json(cli, "queue")
    assert [m["message_id"] for m in queued["messages"]] == [in_pg]

    in_file = (
        await ok(cli, *SEND, "--to", "b@example.org", "--store", "q.sqlite3")
    ).strip()
    assert (tmp_path / "q.sqlite3").exists()
    queued = await ok_json(cli, "queue")  # still the environment's store
    assert [m["message_id"] for m in queued["messages"]] == [in_pg]

    monkeypatch.setenv("MAILSTROM_STORE", "sqlite:///q.sqlite3")
    queued = await ok_json(cli, "queue")
    assert [m["message_id"] for m in queued["messages"]] == [in_file]
    monkeypatch.setenv("MAILSTROM_STORE", f"sqlite:///{tmp_path / 'q.sqlite3'}")
    queued = await ok_json(cli, "queue")
    assert [m["message_id"] for m in queued["messages"]] == [in_file]


# -- bad store URLs -----------------------------------------------------------------

BAD_STORES = [
    (f"mysql://mail:{SECRET}@db/mail", "unknown store URL scheme 'mysql'"),
    (f"postgresql://mail:{SECRET}@db:port/mail", "its port is not a number"),
    (f"postgresql:mail:{SECRET}@db/mail", "write postgresql://user:password@host"),
    (f"postgresql://mail:{SECRET}@[::1/mail", "its host cannot be parsed"),
    ("sqlite://q.db", "a SQLite URL has no host"),
    ("sqlite:///q.db?mode=ro", "it takes no ?query or #fragment"),
    ("memory:", "the memory: store keeps a queue in one process only"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_STORES)
@pytest.mark.parametrize(
    "command", [[*SEND, "--to", "a@example.org"], ["queue"], ["migrate"]]
)
async def test_bad_store_urls_are_one_line_errors(
    cli: CLI, url: str, expected: str, command: list[str], tmp_path: Path
) -> None:
    """A bad --store is exit code 1 and one line, never with the password; with
    --json one JSON object. Nothing is created."""
    line = await error(cli, *command, "--store", url)
    assert expected in line
    code, out, err = await run(cli, *command, "--store", url, "--json")
    assert (code, out) == (1, "")
    assert expected in json.loads(err)["error"]
    assert [p async for p in anyio.Path(tmp_path).iterdir()] == []


async def test_bad_mailstrom_store_is_an_error(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSTROM_STORE", f"redis://:{SECRET}@cache/0")
    assert "unknown store URL scheme 'redis'" in await error(cli, "queue")
    assert "unknown store URL scheme 'redis'" in await error(cli, "worker")


async def test_a_sqlite_url_naming_a_directory_is_an_error(
    cli: CLI, tmp_path: Path
) -> None:
    (tmp_path / "dir").mkdir()
    line = await error(cli, "queue", "--store", "sqlite:///dir")
    assert line == "store 'dir' is a directory, not a SQLite file"


async def test_unreachable_postgres_is_one_line_without_the_password(
    cli: CLI,
) -> None:
    """Every kind of command, against a port where nothing listens: exit code 1,
    one line naming the masked URL."""
    port = free_port("127.0.0.1")
    url = f"postgresql://mail:{SECRET}@127.0.0.1:{port}/mail?sslmode=disable"
    for command in (
        ["queue"],
        ["status", "x@example.com"],
        ["migrate"],
        ["migrate", "--check"],
    ):
        line = await error(cli, *command, "--store", url)
        assert (
            f"'postgresql://mail:***@127.0.0.1:{port}/mail?sslmode=disable' failed"
            in line
        )
    # migrate --check: an error is not "pending": nothing on stdout.
    code, out, _ = await run(cli, "migrate", "--check", "--store", url)
    assert (code, out) == (1, "")


async def test_help_names_the_url_forms(cli: CLI) -> None:
    for command in ("worker", "send", "status", "queue", "purge", "hold", "migrate"):
        out = await ok(cli, command, "--help")
        assert "--store PATH|URL" in out
        assert "postgresql://USER:PASSWORD@HOST:PORT/DB" in " ".join(out.split())
    top = " ".join((await ok(cli, "--help")).split())
    assert "migrate" in top
    assert "postgresql://USER:PASSWORD@HOST:PORT/DB" in top


# -- migrate ---------------------------------------------------------------------

Backend = tuple[str, int, Callable[[int], Any], Callable[[], Any]]


@pytest.fixture(name="backend", params=["sqlite", "postgres"])
async def backend_fixture(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    """(store URL, the version the code writes, set_version(n) which writes a
    schema of version n (after the real migrations up to n), read_version())."""
    if request.param == "sqlite":
        path = tmp_path / "q.sqlite3"

        async def set_sqlite(version: int) -> None:
            async with aiosqlite.connect(path) as db:
                for step in _sql.MIGRATIONS[:version]:
                    for statement in step:
                        await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {version}")
                await db.commit()

        async def read_sqlite() -> int:
            return await SQLiteStore(path).schema_version()

        yield f"sqlite:///{path}", _sql.SCHEMA_VERSION, set_sqlite, read_sqlite
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    async with fresh_database(cluster) as dsn:
        url = with_password(dsn)

        async def set_postgres(version: int) -> None:
            conn = await asyncpg.connect(dsn)
            try:
                table = _postgres_sql.SCHEMA_TABLE
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (version integer)"
                )
                for step in _postgres_sql.MIGRATIONS[:version]:
                    for statement in step:
                        await conn.execute(statement)
                await conn.execute(f"DELETE FROM {table}")  # noqa: S608
                await conn.execute(f"INSERT INTO {table} VALUES ($1)", version)  # noqa: S608
            finally:
                await conn.close()

        async def read_postgres() -> int:
            return await pg_version(url)

        yield url, _postgres_sql.SCHEMA_VERSION, set_postgres, read_postgres


async def test_migrate_an_empty_store(cli: CLI, backend: Backend) -> None:
    """--check says every migration is pending (exit 1) and applies none; migrate
    applies them all and says from which version to which; then --check is 0."""
    url, known, _, version = backend
    code, out, err = await run(cli, "migrate", "--check", "--store", url)
    assert (code, err) == (1, "")
    assert (
        f"schema version 0, this mailstrom_async writes {known}: {known} migration(s) pending"
        in out
    )
    checked = json.loads(
        (await run(cli, "migrate", "--check", "--json", "--store", url))[1]
    )
    assert checked["version"] == 0
    assert checked["code_version"] == known
    assert checked["pending"] == known
    assert checked["up_to_date"] is False
    assert await version() == 0  # nothing applied (no SQLite file made)
    if url.startswith("sqlite"):
        assert not await anyio.Path(url.removeprefix("sqlite:///")).exists()

    out = await ok(cli, "migrate", "--store", url)
    assert out.startswith("migrated ")
    assert out.endswith(f" from schema version 0 to {known}\n")
    assert await version() == known
    assert (await ok(cli, "migrate", "--check", "--store", url)).endswith(
        f"schema version {known} is current\n"
    )


async def test_migrate_an_older_store_to_the_current_version(
    cli: CLI, backend: Backend
) -> None:
    """A store of version 1 gets the migrations after it, once."""
    url, known, set_version, version = backend
    if known < 2:
        pytest.skip("this store has one migration: there is no older schema yet")
    await set_version(1)
    code, out, _ = await run(cli, "migrate", "--check", "--store", url)
    assert code == 1
    assert (
        f"schema version 1, this mailstrom_async writes {known}: {known - 1} migration(s) pending"
        in out
    )
    migrated = await ok_json(cli, "migrate", "--store", url)
    assert migrated["from_version"] == 1
    assert migrated["to_version"] == known
    assert migrated["migrated"] is True
    assert migrated["backend"] == ("sqlite" if url.startswith("sqlite") else "postgres")
    assert SECRET not in migrated["store"]
    assert await version() == known


async def test_migrate_a_current_store_does_nothing(cli: CLI, backend: Backend) -> None:
    url, known, set_version, _ = backend
    await set_version(known)
    out = await ok(cli, "migrate", "--store", url)
    assert out.endswith(f": schema version {known} is current: nothing to migrate\n")
    migrated = await ok_json(cli, "migrate", "--store", url)
    assert (migrated["from_version"], migrated["to_version"]) == (known, known)
    assert migrated["migrated"] is False
    checked = await ok_json(cli, "migrate", "--check", "--store", url)
    assert (checked["pending"], checked["up_to_date"]) == (0, True)


async def test_migrate_a_newer_store_is_refused(cli: CLI, backend: Backend) -> None:
    """A store written by a newer mailstrom_async: exit code 5 with and without
    --check, a message that says to upgrade, and nothing changed."""
    url, known, set_version, version = backend
    await set_version(known)
    await set_version_newer(url, known + 1)
    for check in ([], ["--check"]):
        line = await error(cli, "migrate", *check, "--store", url, code=5)
        assert (
            f"has schema version {known + 1}, newer than this mailstrom_async knows ({known})"
            in line
        )
        assert "upgrade mailstrom-async" in line
        code, out, err = await run(cli, "migrate", *check, "--store", url, "--json")
        assert (code, out) == (5, "")
        entry = json.loads(err)
        assert entry["exit_code"] == 5
        assert (entry["version"], entry["code_version"]) == (known + 1, known)
    assert await version() == known + 1
    # Every other command refuses it too, as open() does (exit code 1).
    assert "newer than this mailstrom_async knows" in await error(
        cli, "send", *SEND[1:], "--to", "a@example.org", "--store", url
    )


async def set_version_newer(url: str, version: int) -> None:
    """Write *version* into the store's schema marker, as a newer release would."""
    if url.startswith("sqlite"):
        async with aiosqlite.connect(url.removeprefix("sqlite:///")) as db:
            await db.execute(f"PRAGMA user_version = {version}")
            await db.commit()
        return
    conn = await asyncpg.connect(url)
    try:
        update = f"UPDATE {_postgres_sql.SCHEMA_TABLE} SET version = $1"  # noqa: S608
        await conn.execute(update, version)
    finally:
        await conn.close()


async def test_migrate_usage_errors(cli: CLI) -> None:
    assert "unrecognized arguments: --bogus" in await error(
        cli, "migrate", "--bogus", code=2
    )
    out = " ".join((await ok(cli, "migrate", "--help")).split())
    assert "exit codes:" in out
    assert "1 --check: migrations are pending" in out
    assert "5 the store was written by a newer mailstrom_async" in out
