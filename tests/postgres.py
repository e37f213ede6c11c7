"""A throwaway PostgreSQL cluster for the tests, and a fresh database per test.

The cluster is Debian's PostgreSQL (``/usr/lib/postgresql/N/bin``): ``initdb`` and
``pg_ctl`` run as the ``postgres`` user (``runuser -u postgres --`` when the tests
run as root) into a temporary directory, listening on 127.0.0.1 and a free port,
with its unix socket in that directory too. One cluster serves the whole session
(fixture ``postgres_cluster``); each test that asks for ``postgres_dsn`` gets a
database of its own, made with ``CREATE DATABASE ... TEMPLATE`` (milliseconds),
dropped at teardown. The cluster is stopped with ``pg_ctl -m immediate``.

For speed the cluster runs with ``fsync=off``, ``synchronous_commit=off`` and
``full_page_writes=off``: a crash of the machine could lose or damage it, which
does not matter for a cluster thrown away at the end of the run. Trust
authentication on loopback only: nothing else can reach it.

When PostgreSQL (or asyncpg) is not installed, the tests that need it skip;
with ``TESTS_REQUIRE_POSTGRES=1`` (as in CI) they fail instead.

A test that stops or restarts PostgreSQL under its workers gets a cluster of its
own (:func:`running_cluster`, about a second to make) so that the session's
cluster, and the other tests' connections to it, are left alone.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.smtpd import free_port

__all__ = [
    "PostgresCluster",
    "find_postgres_bin",
    "fresh_database",
    "postgres_cluster_fixture",
    "postgres_dsn_fixture",
    "require_postgres",
    "running_cluster",
]

LOCALHOST = "127.0.0.1"
USER = "postgres"
_databases = itertools.count(1)


def find_postgres_bin() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/N/bin`` with initdb and pg_ctl."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        directory = Path(initdb).parent
        version = directory.parent.name
        if (directory / "pg_ctl").exists() and version.isdigit():
            found.append((int(version), directory))
    return max(found)[1] if found else None


def require_postgres() -> Path:
    """The PostgreSQL bin directory; skip the test (or fail, with
    ``TESTS_REQUIRE_POSTGRES=1``) when PostgreSQL or asyncpg is missing."""
    directory = find_postgres_bin()
    reason = ""
    if directory is None:
        reason = "PostgreSQL is not installed (Debian package 'postgresql')"
    else:
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            reason = "asyncpg is not installed (the 'postgres' extra)"
    if reason or directory is None:
        if os.environ.get("TESTS_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)  # CI installs both: missing is an error there
        pytest.skip(reason)
    return directory


@dataclass
class PostgresCluster:
    """A running throwaway cluster: connect as ``user`` to ``host:port``."""

    bin_dir: Path
    directory: Path
    host: str
    port: int
    user: str = USER
    durable: bool = False
    """Commits survive a crash of the server (``synchronous_commit=on``)."""
    _template: str = ""

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}?sslmode=disable"

    def migrated_template(self) -> str:
        """The name of a database with the current schema and no rows, made on
        first use (by ``PostgresStore.open()`` in a child process: this runs in
        fixtures, outside any event loop) and kept for the session."""
        if not self._template:
            name = "mailstrom_template"
            self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
            script = (
                "import asyncio, sys\n"
                "from mailstrom_async import PostgresStore\n"
                "async def main():\n"
                "    async with PostgresStore(sys.argv[1]):\n"
                "        pass\n"
                "asyncio.run(main())\n"
            )
            subprocess.run(
                [sys.executable, "-c", script, self.dsn(name)], check=True, timeout=60
            )
            self._template = name
        return self._template

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    def start(self) -> None:
        """Start the server (on its port) and wait until it accepts connections."""
        options = " ".join(
            [
                f"-c listen_addresses={self.host}",
                f"-p {self.port}",
                f"-c unix_socket_directories={self.directory}",
                "-c fsync=off",
                f"-c synchronous_commit={'on' if self.durable else 'off'}",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server at once, as a crash would (``-m immediate``): every
        connection drops; the next start runs crash recovery."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        """:meth:`stop`, then :meth:`start` again on the same port."""
        self.stop()
        self.start()

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program of this cluster as the cluster's owner."""
        argv = [str(self.bin_dir / command[0]), *command[1:]]
        return _run_as_postgres(argv)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run *sql* with psql and return its unaligned output."""
        result = self.run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", self.user,
            "-d", database, "-c", sql,
        )  # fmt: skip
        return result.stdout.strip()


def _run_as_postgres(
    argv: list[str], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        argv = ["runuser", "-u", USER, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@contextlib.contextmanager
def running_cluster(*, durable: bool = False) -> Iterator[PostgresCluster]:
    """A new cluster in a temporary directory, stopped and removed on the way
    out (skips, or fails, when PostgreSQL is missing; see require_postgres).

    With *durable*, a commit is in the WAL before it is acknowledged
    (``synchronous_commit=on``), so that it survives :meth:`PostgresCluster.stop`:
    without, an immediate stop forgets the last fraction of a second of commits,
    as PostgreSQL documents, and a test that crashes the server would see its
    outcomes come back undone. ``fsync`` stays off: the machine does not crash.
    """
    bin_dir = require_postgres()
    directory = Path(tempfile.mkdtemp(prefix="mailstrom-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(USER)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    port = free_port(LOCALHOST)
    cluster = PostgresCluster(bin_dir, directory, LOCALHOST, port, durable=durable)
    cluster.run(
        "initdb", "-D", str(cluster.data), "-U", USER, "--auth=trust", "-E", "UTF8",
        "--locale=C", "--no-sync",
    )  # fmt: skip
    cluster.start()
    try:
        yield cluster
    finally:
        _run_as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(cluster.data),
                "-m",
                "immediate",
                "stop",
            ],
            check=False,
        )
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="postgres_cluster", scope="session")
def postgres_cluster_fixture() -> Iterator[PostgresCluster]:
    """One cluster for the session, started on first use, stopped at the end."""
    with running_cluster() as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def fresh_database(
    cluster: PostgresCluster, *, migrated: bool = False
) -> AsyncIterator[str]:
    """A new database of *cluster*: its DSN; dropped on the way out.

    Empty, or with *migrated* a copy of a database that ``PostgresStore`` has
    opened once (the current schema, no rows), which saves each test the
    migration (about 0.1 s).
    """
    import asyncpg

    template = cluster.migrated_template() if migrated else "template0"
    name = f"test_{os.getpid()}_{next(_databases)}"
    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    yield cluster.dsn(name)
    # A new connection: the test may have restarted the server meanwhile.
    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(name="postgres_dsn")
async def postgres_dsn_fixture(
    postgres_cluster: PostgresCluster,
) -> AsyncIterator[str]:
    """The DSN of a new, empty database of the session's cluster (dropped after)."""
    async with fresh_database(postgres_cluster) as dsn:
        yield dsn
