"""The anchors: Postfix's ``smtp-source`` and raw aiosmtplib, no persistence.

``smtp_source`` runs in the harness (it is a C program; the wall clock around it
is the measurement). The raw aiosmtplib baselines run in a child process like the
library scenarios, on the same ~2 KB ``EmailMessage`` objects, built before the
clock starts.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import time
from collections.abc import Callable, Coroutine
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import aiosmtplib
import anyio

from bench._common import (
    BODY_SIZE,
    HELO,
    SENDER,
    CpuClock,
    body,
    make_messages,
    recipient,
    settle,
)
from bench._procs import LOOPBACK

__all__ = ["raw_pool", "raw_pool_building", "raw_single", "smtp_source"]

SMTP_SOURCE = "/usr/sbin/smtp-source"


def smtp_source(port: int, messages: int, sessions: int = 10) -> dict[str, Any]:
    """``smtp-source -d -s 10 -m N -l 2048``: 10 reused connections, C client."""
    exe = shutil.which("smtp-source") or SMTP_SOURCE
    args = [
        exe,
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(BODY_SIZE),
        f"{LOOPBACK}:{port}",
    ]
    start = time.perf_counter()
    subprocess.run(  # noqa: S603 - fixed argv
        args, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    return {"messages": messages, "seconds": wall, "msgs_per_s": messages / wall}


async def raw_pool(params: dict[str, Any]) -> dict[str, Any]:
    """N ``send_message`` calls over a pool of reused aiosmtplib connections.

    Each connection is one ``aiosmtplib.SMTP`` in its own task of an anyio task
    group, pulling messages from a shared queue; the clock runs from before the
    first connect to after the last reply.
    """
    port: int = params["port"]
    count: int = params["messages"]
    connections: int = params.get("connections", 10)
    queue = collections.deque(make_messages(count, params["token"]))
    settle()
    clock = CpuClock()

    async def sender() -> None:
        smtp = aiosmtplib.SMTP(hostname=LOOPBACK, port=port, local_hostname=HELO)
        await smtp.connect()
        try:
            while queue:
                await smtp.send_message(queue.popleft())
        finally:
            await smtp.quit()

    return await _pool(sender, connections, count, clock)


async def _pool(
    sender: Callable[[], Coroutine[Any, Any, None]],
    connections: int,
    count: int,
    clock: CpuClock,
) -> dict[str, Any]:
    """Run *connections* senders at once, timed by *clock*: the pool's result."""
    clock.start()
    async with anyio.create_task_group() as tg:
        for _ in range(connections):
            tg.start_soon(sender)
    clock.stop()
    return {
        "messages": count,
        "connections": connections,
        "seconds": clock.wall,
        "msgs_per_s": count / clock.wall,
        "cpu_ms_per_msg": 1000 * clock.cpu / count,
    }


async def raw_pool_building(params: dict[str, Any]) -> dict[str, Any]:
    """The app-like baseline: a pool of 10 aiosmtplib connections, each building
    an ``EmailMessage`` (From, To, Subject, Date, Message-ID, a text body) for
    every message it sends, as an application that sends itself would. Nothing
    is stored or tracked; a failed send would be lost."""
    port: int = params["port"]
    count: int = params["messages"]
    connections: int = params.get("connections", 10)
    token: str = params["token"]
    text = body()
    numbers = iter(range(count))
    settle()
    clock = CpuClock()

    async def sender() -> None:
        smtp = aiosmtplib.SMTP(hostname=LOOPBACK, port=port, local_hostname=HELO)
        await smtp.connect()
        try:
            for i in numbers:
                msg = EmailMessage()
                msg["From"] = SENDER
                msg["To"] = recipient(i, token)
                msg["Subject"] = f"benchmark message {i}"
                msg["Date"] = formatdate(localtime=False)
                msg["Message-ID"] = make_msgid(domain="sender.mailstrom.test")
                msg.set_content(text)
                await smtp.send_message(msg)
        finally:
            await smtp.quit()

    return await _pool(sender, connections, count, clock)


async def raw_single(params: dict[str, Any]) -> dict[str, Any]:
    """N sequential ``send_message`` calls over one aiosmtplib connection."""
    port: int = params["port"]
    count: int = params["messages"]
    messages = make_messages(count, params["token"])
    settle()
    clock = CpuClock()
    clock.start()
    smtp = aiosmtplib.SMTP(hostname=LOOPBACK, port=port, local_hostname=HELO)
    await smtp.connect()
    for message in messages:
        await smtp.send_message(message)
    await smtp.quit()
    clock.stop()
    return {
        "messages": count,
        "seconds": clock.wall,
        "msgs_per_s": count / clock.wall,
        "cpu_ms_per_msg": 1000 * clock.cpu / count,
    }
