"""Real processes to SIGKILL, and what they leave behind (DESIGN §5, crash).

:func:`running_child` starts ``tests/crash_child.py`` (its docstring lists the
roles and the files a child writes); :class:`Child` reads its acknowledgements
and kills it; :func:`read_recipients` reads the rows a dead child left in the
SQLite file, leases included, which no Store method shows.
"""

from __future__ import annotations

import contextlib
import email
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite
import anyio
import pytest

if TYPE_CHECKING:
    from anyio.abc import Process

__all__ = [
    "CHILD",
    "DEADLINE",
    "ROOT",
    "Child",
    "Row",
    "message_id_of",
    "read_recipients",
    "running_child",
]

ROOT = Path(__file__).resolve().parent.parent
#: The child, run as a module from the repository root: a script's own folder
#: would come first on sys.path, and tests/typing would shadow the stdlib.
CHILD = "tests.crash_child"
#: Upper bound for anything a test waits on; never reached when the engine works.
DEADLINE = 20


class Child:
    """A child process running :data:`CHILD`, and the files it writes."""

    def __init__(self, process: Process, prefix: Path) -> None:
        self.process = process
        self.prefix = prefix
        self.ack = prefix.with_suffix(".ack")
        self.errors = prefix.with_suffix(".stderr")
        self.events = prefix.with_suffix(".events")
        self._killed = False

    async def acked(self) -> list[str]:
        """The ids acknowledged so far (a last line cut short by the kill is not one)."""
        return (await _read_lines(self.ack))[0]

    async def delivered_events(self) -> list[tuple[str, str, float]]:
        """``(id, address, unix time)`` of each DELIVERED event the child logged."""
        lines = (await _read_lines(self.events))[0]
        return [(i, a, float(t)) for i, a, t in (line.split() for line in lines)]

    async def stderr(self) -> str:
        path = anyio.Path(self.errors)
        return await path.read_text() if await path.exists() else ""

    async def wait_acked(self, count: int) -> None:
        """Wait until the child has acknowledged *count* ids (an external process)."""
        with anyio.fail_after(DEADLINE):
            while len(await self.acked()) < count:
                await self.check_alive()
                await anyio.sleep(0.002)

    async def check_alive(self) -> None:
        """Fail with the child's stderr if it exited by itself."""
        if self.process.returncode is not None:
            pytest.fail(
                f"the child exited with {self.process.returncode}:\n"
                f"{await self.stderr()}"
            )

    def kill_now(self) -> None:
        """Send SIGKILL without waiting (safe from any callback of the loop).

        Only once: on Python 3.11 ``Popen.send_signal`` first polls, which may
        reap the dead child before asyncio's watcher does, and the watcher then
        reports exit status 255 instead of -SIGKILL.
        """
        if self._killed or self.process.returncode is not None:
            return
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.kill_now()
        with anyio.CancelScope(shield=True):
            await self.process.wait()


async def _read_lines(path: Path) -> tuple[list[str], str]:
    """Complete lines of *path* and the unterminated rest ('' if none)."""
    apath = anyio.Path(path)
    if not await apath.exists():
        return [], ""
    *lines, rest = (await apath.read_text()).split("\n")
    return lines, rest


@contextlib.asynccontextmanager
async def running_child(
    role: str,
    db: Path,
    port: int,
    *,
    name: str = "child",
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Child]:
    """Run the child with files ``<db dir>/<name>.*``; SIGKILLed on the way out."""
    prefix = db.parent / name
    argv = ["-m", CHILD, role, str(db), str(port), str(prefix)]
    async with spawned(argv, prefix, env) as child:
        yield child


@contextlib.asynccontextmanager
async def spawned(
    argv: list[str],
    prefix: Path,
    env: Mapping[str, str] | None,
    *,
    stdout: int = subprocess.DEVNULL,
) -> AsyncIterator[Child]:
    """``python *argv*`` with its stderr in ``<prefix>.stderr`` (and its stdout
    a pipe with ``stdout=subprocess.PIPE``), as a :class:`Child` with files
    ``<prefix>.*``; SIGKILLed on the way out."""
    errors = await anyio.to_thread.run_sync(_create, prefix.with_suffix(".stderr"))
    try:
        process = await anyio.open_process(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=errors,
            cwd=ROOT,
            env=env,
        )
    finally:
        os.close(errors)
    child = Child(process, prefix)
    try:
        yield child
    finally:
        await child.kill()


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def message_id_of(content: bytes) -> str:
    """The Message-ID of a received message, without its angle brackets."""
    header = email.message_from_bytes(content)["Message-ID"]
    return str(header).strip().strip("<>")


@dataclass(frozen=True)
class Row:
    """One recipient row as the SQLite file holds it."""

    message_id: str
    address: str
    state: str
    lease_owner: str | None
    lease_until: float | None
    """Unix time."""
    possible_duplicate: bool

    @property
    def is_final(self) -> bool:
        return self.state in ("delivered", "failed")


async def read_recipients(db: Path) -> dict[tuple[str, str], Row]:
    """Every recipient row, by ``(message id, address)``: the raw file, read-only."""
    if not await anyio.Path(db).exists():
        return {}
    async with aiosqlite.connect(f"file:{db}?mode=ro", uri=True) as conn:
        cursor = await conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'recipients'"
        )
        if await cursor.fetchone() is None:  # killed before the schema was made
            return {}
        cursor = await conn.execute(
            "SELECT message_id, address, state, lease_owner, lease_until,"
            " possible_duplicate FROM recipients"
        )
        rows = await cursor.fetchall()
    return {(r[0], r[1]): Row(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows}
