"""Shared helpers: test messages, statistics, memory readings, the event loop."""

from __future__ import annotations

import gc
import importlib.util
import math
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Protocol, TypeVar

import anyio

__all__ = [
    "BODY_SIZE",
    "HELO",
    "MX_ZONE",
    "SENDER",
    "CpuClock",
    "Row",
    "Target",
    "make_messages",
    "median",
    "mx_domain",
    "out",
    "percentile",
    "raw_message",
    "recipient",
    "run_async",
    "settle",
    "uvloop_available",
    "vm_status_kib",
]

#: Payload size of every benchmark message, as ``smtp-source -l 2048`` sends.
BODY_SIZE = 2048
HELO = "bench.mailstrom.test"
SENDER = "bench@sender.mailstrom.test"
#: The DNS zone of the direct-MX scenario, served by :mod:`bench.mx`.
MX_ZONE = "mx.bench.test"

_T = TypeVar("_T")


def out(text: str = "") -> None:
    """Write a line to stdout (the library's lint rules ban print())."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def body() -> str:
    line = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\n"
    repeats = math.ceil(BODY_SIZE / len(line))
    return (line * repeats)[: BODY_SIZE - 1] + "\n"


def mx_domain(index: int) -> str:
    """The *index*-th recipient domain of the direct-MX scenario."""
    return f"d{index}.{MX_ZONE}"


def recipient(
    index: int, token: str, *, soft: bool = False, domain: str = "rcpt.mailstrom.test"
) -> str:
    """The address of the *index*-th recipient of run *token*.

    Addresses whose local part starts with ``soft-`` are refused with a 450 on
    their first RCPT by the soft-rejecting sink (see :mod:`bench.softsink`).
    """
    prefix = "soft-" if soft else "rcpt-"
    return f"{prefix}{token}-{index}@{domain}"


def make_messages(
    count: int, token: str, *, soft_every: int = 0, domains: int = 0
) -> list[EmailMessage]:
    """*count* ~2 KB single-recipient messages, each with its own Message-ID.

    With *soft_every* = k > 0, every k-th recipient is a ``soft-`` address.
    With *domains* = d > 0, recipients are spread over d :func:`mx_domain` domains.
    Message-ID and Date are set here, so neither the raw baselines nor the
    library spend time generating them inside the timed part.
    """
    text = body()
    date = format_datetime(datetime.now(UTC))
    messages = []
    for i in range(count):
        soft = soft_every > 0 and i % soft_every == soft_every - 1
        domain = mx_domain(i % domains) if domains else "rcpt.mailstrom.test"
        msg = EmailMessage()
        msg["From"] = SENDER
        msg["To"] = recipient(i, token, soft=soft, domain=domain)
        msg["Subject"] = f"benchmark message {i}"
        msg["Date"] = date
        msg["Message-ID"] = f"<{token}.{i}@sender.mailstrom.test>"
        msg.set_content(text)
        messages.append(msg)
    return messages


def settle() -> None:
    """Collect garbage, then exempt everything alive from future collections.

    Called once the test messages are built, before the clock starts: a few
    thousand ``EmailMessage`` objects are millions of Python objects, and the
    cyclic GC would otherwise keep walking them during the timed part.
    """
    gc.collect()
    gc.freeze()


def raw_message(
    index: int, token: str, *, domain: str = "rcpt.mailstrom.test"
) -> bytes:
    """One rendered ~2 KB message (CRLF line endings), as the store keeps them."""
    text = body().replace("\n", "\r\n")
    headers = (
        f"From: {SENDER}\r\n"
        f"To: {recipient(index, token, domain=domain)}\r\n"
        f"Subject: benchmark message {index}\r\n"
        f"Message-ID: <{token}.{index}@sender.mailstrom.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    )
    return headers.encode("ascii") + text.encode("ascii")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def vm_status_kib() -> dict[str, int]:
    """``VmHWM`` (peak RSS) and ``VmRSS`` of this process, in KiB."""
    fields: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0])
    return fields


class ClockWindow(Protocol):
    """What else runs between a measurement's clock start and stop (the
    profiler of ``python -m bench._child NAME PARAMS PROF``)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


#: Set by the child when it profiles: the clocked part of the run, only.
WINDOW: ClockWindow | None = None


class CpuClock:
    """Wall and CPU time (all threads of this process) between start() and stop().

    When the child profiles, :data:`WINDOW` is started and stopped with it, so
    that the profile covers what the clock measures and nothing else.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self._cpu = 0.0
        self.wall = 0.0
        self.cpu = 0.0

    @staticmethod
    def process_cpu() -> float:
        """CPU seconds of every thread of this process so far."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        if WINDOW is not None:
            WINDOW.start()
        self.started = time.perf_counter()
        self._cpu = self.process_cpu()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self.started
        self.cpu = self.process_cpu() - self._cpu
        if WINDOW is not None:
            WINDOW.stop()


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def run_async(
    fn: Callable[..., Awaitable[_T]], *args: Any, loop: str = "asyncio"
) -> _T:
    """Run *fn* on the default asyncio loop, or on uvloop with ``loop="uvloop"``."""
    options = {"use_uvloop": True} if loop == "uvloop" else {}
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)


@dataclass
class Row:
    key: str
    label: str
    value: str
    ratio: str = ""
    target: str = ""
    result: str = ""


@dataclass
class Target:
    name: str
    value: float
    target: str
    passed: bool | None  # None: not measured (skipped)
    note: str = ""
