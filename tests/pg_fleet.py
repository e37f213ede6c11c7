"""Many processes over one PostgreSQL queue, and a server that counts deliveries.

:class:`Fleet` starts ``tests/pg_child.py`` processes (workers and submit-only
producers; the child's docstring says what each writes) and stops them;
:class:`CountingHandler` is an aiosmtpd handler that counts, per message id and
recipient, every copy it accepted (answered 250 after DATA) and which process
sent it, and can stall the DATA of one process until that process dies.
:func:`exactly_once` holds the counts against the statuses in the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async import RecipientState
from tests.crash import DEADLINE, Child, spawned
from tests.smtpd import FaultHandler, WaitableCount

if TYPE_CHECKING:
    import aiosmtpd.smtp
    from aiosmtpd.smtp import Envelope, Session

    from mailstrom_async import MessageStatus

__all__ = ["CHILD", "CountingHandler", "Fleet", "exactly_once"]

CHILD = "tests.pg_child"
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>\r\n]+)>", re.MULTILINE | re.IGNORECASE)


@dataclass
class CountingHandler(FaultHandler):
    """Accepts every message and counts each recipient of each copy accepted.

    ``stall_client`` is a HELO name: DATA from that client is read to the final
    dot and then never answered (``stalled`` is set; the copy is not counted,
    as the server never accepted it), until the client hangs up or dies.
    """

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Accepted copies per ``(message id, recipient)``."""
    senders: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    """Which clients (HELO names) delivered each ``(message id, recipient)``."""
    accepted: WaitableCount = field(default_factory=WaitableCount)
    """Recipients accepted, copies included (``await .wait_for(n)``)."""
    stall_client: str | None = None
    stalled_copies: list[str] = field(default_factory=list)
    """Message ids whose DATA was stalled and never answered."""

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: aiosmtpd.smtp.SMTP, session: Session, envelope: Envelope
    ) -> str:
        assert isinstance(envelope.original_content, bytes)
        found = _MESSAGE_ID.search(envelope.original_content)
        assert found is not None, envelope.original_content[:500]
        message_id = found.group(1).decode()
        client = str(session.host_name)
        if client == self.stall_client:
            self.stalled_copies.append(message_id)
            self.stalled.set()
            await self.release.wait()  # connection_lost cancels this task
        for rcpt in envelope.rcpt_tos:
            key = (message_id, rcpt)
            self.counts[key] += 1
            self.senders.setdefault(key, []).append(client)
        for _ in envelope.rcpt_tos:
            self.accepted.bump()
        return "250 2.0.0 OK"

    def by_client(self) -> Counter[str]:
        """Accepted recipients per client."""
        return Counter(c for clients in self.senders.values() for c in clients)


def exactly_once(
    handler: CountingHandler, statuses: Mapping[str, MessageStatus]
) -> list[tuple[str, str]]:
    """Check that every recipient of *statuses* is DELIVERED and was accepted
    once, or more only when flagged ``possible_duplicate``; return the flagged
    duplicates. Nothing else may have been accepted."""
    expected = {
        (message_id, r.address): r
        for message_id, status in statuses.items()
        for r in status.recipients
    }
    assert set(handler.counts) == set(expected), (
        f"never accepted: {sorted(set(expected) - set(handler.counts))[:10]}; "
        f"unknown: {sorted(set(handler.counts) - set(expected))[:10]}"
    )
    not_delivered = [
        k for k, r in expected.items() if r.state is not RecipientState.DELIVERED
    ]
    assert not_delivered == [], [(k, expected[k]) for k in not_delivered[:5]]
    duplicates = [k for k, n in handler.counts.items() if n > 1]
    unflagged = [k for k in duplicates if not expected[k].possible_duplicate]
    assert unflagged == [], [(k, handler.senders[k]) for k in unflagged[:10]]
    return duplicates


class Fleet:
    """The child processes of one test, killed (if still running) on the way out."""

    def __init__(
        self, stack: contextlib.AsyncExitStack, dsn: str, port: int, directory: Path
    ) -> None:
        self._stack = stack
        self.dsn = dsn
        self.port = port
        self.directory = directory

    async def start(
        self,
        role: str,
        name: str,
        count: int = 0,
        *,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start ``tests.pg_child ROLE`` as *name* (its HELO name is ``name.test``)."""
        return await self._stack.enter_async_context(
            _running(role, self.dsn, self.port, self.directory / name, count, env)
        )

    async def workers(
        self, count: int, *, env: Mapping[str, str] | None = None
    ) -> list[Child]:
        """Start *count* workers ``w0``, ``w1``, ...; return once each is open."""
        children = [await self.start("worker", f"w{i}", env=env) for i in range(count)]
        for child in children:
            await wait_ready(child)
        return children


async def wait_ready(child: Child) -> None:
    """Wait until the worker *child* says on its stdout that it is open; fail
    with its stderr if it exits first."""
    assert child.process.stdout is not None
    stdout = BufferedByteReceiveStream(child.process.stdout)
    with anyio.fail_after(DEADLINE):
        try:
            line = await stdout.receive_until(b"\n", 100)
        except anyio.IncompleteRead:
            await child.process.wait()
            await child.check_alive()
            raise
    assert line == b"ready"


async def stop(child: Child) -> None:
    """SIGTERM *child* and check that it left its Deliverer cleanly."""
    await child.check_alive()
    child.process.send_signal(signal.SIGTERM)
    with anyio.fail_after(DEADLINE):
        await child.process.wait()
    if child.process.returncode != 0:
        pytest.fail(
            f"{child.prefix.name} exited with {child.process.returncode}:\n"
            f"{await child.stderr()}"
        )


async def finish(child: Child) -> None:
    """Wait for *child* to end by itself, successfully (a producer: when all
    its messages are done)."""
    with anyio.fail_after(3 * DEADLINE):
        await child.process.wait()
    if child.process.returncode != 0:
        pytest.fail(
            f"{child.prefix.name} exited with {child.process.returncode}:\n"
            f"{await child.stderr()}"
        )


@contextlib.asynccontextmanager
async def _running(
    role: str,
    dsn: str,
    port: int,
    prefix: Path,
    count: int,
    env: Mapping[str, str] | None,
) -> AsyncIterator[Child]:
    argv = ["-m", CHILD, role, dsn, str(port), str(prefix), str(count)]
    full_env = None if env is None else {**os.environ, **env}
    async with spawned(argv, prefix, full_env, stdout=subprocess.PIPE) as child:
        yield child
