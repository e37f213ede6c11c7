"""kill -9 with real processes: nothing acknowledged is ever lost (DESIGN §5, crash).

A child Python process runs a Deliverer on a SQLite file and is SIGKILLed; the
parent then reopens the same file and checks that every message the child had
acknowledged is there and ends DELIVERED (duplicates allowed, losses never).
"""

from __future__ import annotations

import contextlib
import email
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import Config, RecipientState, RelayConfig, RetryPolicy, Timeouts
from mailstrom_async._deliverer import Deliverer, SubmitHandle
from mailstrom_async._store import SQLiteStore
from tests.smtpd import FaultHandler, Received, SMTPDServers, smtpd_fixture  # noqa: F401

if TYPE_CHECKING:
    from anyio.abc import Process

    from mailstrom_async._models import MessageStatus

ROOT = Path(__file__).resolve().parent.parent
#: Upper bound for anything a test waits on; never reached when the engine works.
DEADLINE = 20

#: The child: ``child.py ROLE DB ACK PORT ERRORS``. ROLE ``submit`` submits forever
#: with a submit-only Deliverer; ROLE ``deliver`` submits one message with a
#: delivering Deliverer (lease 1 s) and waits for it. Each id returned by submit()
#: is appended to ACK (flushed and fsync'd) before the next submit.
CHILD = """\
import os
import sys

import anyio

from mailstrom_async import Config, RelayConfig, Timeouts
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from mailstrom_async._store import SQLiteStore

role, db, ack, port, errors = sys.argv[1:]
os.dup2(os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)


async def main() -> None:
    config = Config(
        helo_name="child.test",
        relay=RelayConfig(host="127.0.0.1", port=int(port), tls="none"),
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=60),
        lease_duration=1.0,
    )
    mode = "submit" if role == "submit" else "both"
    with open(ack, "a") as acks:
        async with Deliverer(config, store=SQLiteStore(db), mode=mode) as d:
            n = 0
            while True:
                handle = await d.submit(
                    Email(
                        sender="sender@example.com",
                        to=[f"r{n}@example.org"],
                        subject=f"message {n}",
                        text="Hello.\\n",
                    )
                )
                acks.write(handle.message_id + "\\n")
                acks.flush()
                os.fsync(acks.fileno())
                n += 1
                if role == "deliver":
                    await handle
                    raise SystemExit("the stalled message was delivered")


anyio.run(main)
"""


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


class Child:
    """A child process running :data:`CHILD`, and the files it writes."""

    def __init__(self, process: Process, ack: Path, errors: Path) -> None:
        self.process = process
        self.ack = ack
        self.errors = errors

    async def acked(self) -> list[str]:
        """The ids acknowledged so far (a last line cut short by the kill is not one)."""
        path = anyio.Path(self.ack)
        if not await path.exists():
            return []
        return (await path.read_text()).split("\n")[:-1]

    async def stderr(self) -> str:
        path = anyio.Path(self.errors)
        return await path.read_text() if await path.exists() else ""

    async def wait_acked(self, count: int) -> None:
        """Wait until the child has acknowledged *count* ids (an external process)."""
        with anyio.fail_after(DEADLINE):
            while len(await self.acked()) < count:
                if self.process.returncode is not None:
                    pytest.fail(
                        f"the child exited with {self.process.returncode}:\n"
                        f"{await self.stderr()}"
                    )
                await anyio.sleep(0.002)

    async def kill(self) -> None:
        """SIGKILL the child and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with anyio.CancelScope(shield=True):
            await self.process.wait()


@contextlib.asynccontextmanager
async def running_child(
    script: Path, role: str, db: Path, port: int
) -> AsyncIterator[Child]:
    """Run the child; it is SIGKILLed on the way out whatever happens."""
    ack = db.with_suffix(".ack")
    errors = db.with_suffix(".stderr")
    process = await anyio.open_process(
        [sys.executable, str(script), role, str(db), str(ack), str(port), str(errors)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    child = Child(process, ack, errors)
    try:
        yield child
    finally:
        await child.kill()


def relay_config(port: int) -> Config:
    return Config(
        helo_name="parent.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        retry=RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5),
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=5),
        poll_interval=0.2,
    )


def message_id(received: Received) -> str:
    header = email.message_from_bytes(received.content)["Message-ID"]
    return str(header).strip().strip("<>")


async def final_statuses(d: Deliverer, ids: list[str]) -> list[MessageStatus]:
    with anyio.fail_after(DEADLINE):
        return [await SubmitHandle(d, i, created=False) for i in ids]


@pytest.mark.parametrize("kill_after", [1, 7, 30])
async def test_killed_producer_loses_no_acked_message(
    smtpd: SMTPDServers, tmp_path: Path, child_script: Path, kill_after: int
) -> None:
    """Every id a SIGKILLed submit-only process acknowledged is stored and then delivered."""
    server = await smtpd.start()
    db = tmp_path / "queue.sqlite3"
    async with running_child(child_script, "submit", db, server.port) as child:
        await child.wait_acked(kill_after)
        await child.kill()
    assert child.process.returncode == -signal.SIGKILL
    acked = await child.acked()
    assert len(acked) >= kill_after
    assert len(set(acked)) == len(acked)

    # Every acknowledged message is in the store as the child left it.
    async with SQLiteStore(db) as store:
        for mid in acked:
            [r] = await store.status(mid)
            assert r.state is RecipientState.QUEUED
            assert r.attempts == 0
    assert server.messages == []  # the child only submitted

    async with Deliverer(relay_config(server.port), store=SQLiteStore(db)) as d:
        statuses = await final_statuses(d, acked)
    assert all(s.is_delivered for s in statuses)
    delivered = Counter(message_id(m) for m in server.messages)
    assert set(acked) <= set(delivered)
    # Nothing was in flight when the child died: each message went out once.
    assert all(count == 1 for count in delivered.values())


async def test_worker_killed_mid_data_resends_after_lease(
    smtpd: SMTPDServers, tmp_path: Path, child_script: Path
) -> None:
    """A worker SIGKILLed after its final dot leaves a lease that expires; the next run re-sends."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    db = tmp_path / "queue.sqlite3"
    async with running_child(child_script, "deliver", db, server.port) as child:
        with anyio.move_on_after(DEADLINE):
            await handler.stalled.wait()  # the server holds the whole message
        if not handler.stalled.is_set():
            pytest.fail(f"the child never reached DATA:\n{await child.stderr()}")
        await child.kill()
    assert child.process.returncode == -signal.SIGKILL
    [acked] = await child.acked()
    handler.stall_at = None
    with anyio.fail_after(DEADLINE):
        await server.disconnections.wait_for(1)

    async with SQLiteStore(db) as store:
        [r] = await store.status(acked)
    assert r.state is RecipientState.QUEUED  # the child recorded no outcome

    async with Deliverer(relay_config(server.port), store=SQLiteStore(db)) as d:
        [status] = await final_statuses(d, [acked])
    [r] = status
    assert r.state is RecipientState.DELIVERED
    assert r.attempts == 1  # the killed attempt was never recorded
    # At least once: the server got the message again after the restart (the
    # killed worker's copy counts), never zero times; and nothing else.
    received = [message_id(m) for m in server.messages]
    assert set(received) == {acked}
    assert len(received) >= 2
    assert server.messages[-1].reply == "250 2.0.0 OK"
