"""``mailstrom-async worker --processes N``: N delivering processes on one
store, under one supervisor.

The supervisor delivers nothing itself: it starts N ``worker`` processes (the
same command line with ``--processes 1``; they inherit its environment, stdout
and stderr), starts again any that exits on its own (after 1 s, doubling up to
30 s while a process keeps dying within 10 s of its start, so a worker that
cannot start does not spin), and on SIGINT or SIGTERM sends SIGTERM to every
worker and waits for them: each stops as a single worker does (transactions in
flight get ``shutdown_grace`` seconds). A second signal kills them. The store
coordinates the workers (leases), so any store that several processes can
share works: a SQLite file on one machine, or PostgreSQL.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli._common import EXIT_OK

if TYPE_CHECKING:
    from anyio.abc import Process

__all__ = ["supervise"]

logger = logging.getLogger("mailstrom_async.cli")

_FIRST_DELAY = 1.0  # seconds before starting a worker that exited again
_LONGEST_DELAY = 30.0
_HEALTHY_AFTER = 10.0  # a worker that ran this long resets the delay


class _Slot:
    """One of the N workers: its current process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: Process | None = None


async def supervise(argv: Sequence[str], processes: int) -> int:
    """Run *processes* workers of ``mailstrom-async *argv*`` until a signal."""
    command = [sys.executable, "-m", "mailstrom_async", *argv, "--processes", "1"]
    slots = [_Slot(n) for n in range(1, processes + 1)]
    stopping = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            for slot in slots:
                tg.start_soon(_keep_running, slot, command, stopping)
            async for signum in signals:
                name = signal.Signals(signum).name
                if not stopping.is_set():
                    logger.info("stopping the workers", extra={"signal": name})
                    stopping.set()
                    _signal_all(slots, signal.SIGTERM)
                    tg.start_soon(_cancel_when_stopped, tg, slots)
                else:
                    logger.warning("killing the workers", extra={"signal": name})
                    _signal_all(slots, signal.SIGKILL)
    logger.info("workers stopped", extra={"processes": processes})
    return EXIT_OK


def _signal_all(slots: Sequence[_Slot], signum: signal.Signals) -> None:
    for slot in slots:
        process = slot.process
        if process is not None and process.returncode is None:
            process.send_signal(signum)


async def _cancel_when_stopped(tg: anyio.abc.TaskGroup, slots: Sequence[_Slot]) -> None:
    """Once every worker has exited, end the supervisor (its signal loop)."""
    for slot in slots:
        if slot.process is not None:
            await slot.process.wait()
    tg.cancel_scope.cancel()


async def _keep_running(slot: _Slot, command: list[str], stopping: anyio.Event) -> None:
    delay = _FIRST_DELAY
    while not stopping.is_set():
        started = anyio.current_time()
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=None, stderr=None
        )
        slot.process = process
        logger.info(
            "worker started", extra={"worker_slot": slot.number, "pid": process.pid}
        )
        code = await process.wait()
        if stopping.is_set():
            return
        ran = anyio.current_time() - started
        delay = _FIRST_DELAY if ran >= _HEALTHY_AFTER else delay
        logger.warning(
            "worker exited; starting it again",
            extra={
                "worker_slot": slot.number,
                "pid": process.pid,
                "exit_code": code,
                "delay": delay,
            },
        )
        with anyio.move_on_after(delay):
            await stopping.wait()
        delay = min(delay * 2, _LONGEST_DELAY)
