"""A worker process paused past its lease (SIGSTOP) records nothing over the
worker that took its recipients meanwhile, on a real PostgreSQL.

The child (``tests/lease_child.py``) claims the message and sends it to a relay
that holds its reply after the final dot; the test stops the child there, a
Deliverer of its own claims the recipient once the child's lease has run out and
delivers it through another relay; then the first relay refuses, the child is
continued, and its late FAILED must be dropped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

from mailstrom_async import Deliverer, Email, RecipientState, SubmitHandle
from mailstrom_async._store import PostgresStore
from tests.smtpd import FaultHandler, SMTPDServers, smtpd_fixture  # noqa: F401
from tests.test_relay_faults import DEADLINE, SENDER, done, relay_config

pytest.importorskip("asyncpg")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")

ROOT = Path(__file__).resolve().parent.parent


class Lines:
    """The lines a child writes to its stdout."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        self._text = TextReceiveStream(process.stdout)
        self._buffer = ""

    async def next(self) -> str:
        with anyio.fail_after(DEADLINE):
            while "\n" not in self._buffer:
                self._buffer += await self._text.receive()
        line, self._buffer = self._buffer.split("\n", 1)
        return line


@asynccontextmanager
async def paused_worker(
    dsn: str, port: int, stderr: Path
) -> AsyncIterator[tuple[anyio.abc.Process, Lines]]:
    with stderr.open("wb") as errors:
        process = await anyio.open_process(
            [sys.executable, "-m", "tests.lease_child", dsn, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            cwd=ROOT,
        )
    try:
        yield process, Lines(process)
    finally:
        if process.returncode is None:
            process.kill()  # a stopped process dies of SIGKILL too
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


async def test_a_worker_paused_past_its_lease_records_nothing(
    postgres_dsn: str, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """SIGSTOP after the final dot, past the lease; another worker delivers;
    SIGCONT: the paused worker's refusal is dropped, with its warning, and the
    status stays the other worker's."""
    slow = FaultHandler(
        stall_at="DATA", data_reply="550 5.7.1 refused at the slow relay"
    )
    server_a = await smtpd.start(slow)
    server_b = await smtpd.start(FaultHandler())
    async with Deliverer(
        relay_config(server_b.port), store=PostgresStore(postgres_dsn), mode="submit"
    ) as producer:
        handle = await producer.submit(
            Email(sender=SENDER, to=["rcpt@example.org"], subject="hi", text="Hi.\n")
        )
    stderr = tmp_path / "child.stderr"
    async with paused_worker(postgres_dsn, server_a.port, stderr) as (child, lines):
        assert await lines.next() == "ready", stderr.read_text()
        with anyio.fail_after(DEADLINE):
            await slow.stalled.wait()
        os.kill(child.pid, signal.SIGSTOP)
        try:
            config = relay_config(server_b.port, poll_interval=0.05)
            async with Deliverer(
                config, store=PostgresStore(postgres_dsn), mode="deliver"
            ) as other:
                by_other = await done(
                    SubmitHandle(other, handle.message_id, created=False)
                )
            assert by_other.recipients[0].state is RecipientState.DELIVERED
            slow.release.set()  # the paused worker's relay refuses
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert await lines.next() == f"lost {handle.message_id} 1", stderr.read_text()
        assert child.stdin is not None
        await child.stdin.aclose()
        with anyio.fail_after(DEADLINE):
            assert await child.wait() == 0, stderr.read_text()
    async with PostgresStore(postgres_dsn) as store:
        status = await store.status(handle.message_id)
        history = await store.history(handle.message_id)
    assert status.recipients == by_other.recipients
    assert sorted(h.code or 0 for h in history) == [250, 550]
    assert len(server_a.messages) == len(server_b.messages) == 1
