"""Scenario 7: how long ``submit`` keeps the event loop from running anything else.

A probe task sleeps 1 ms in a loop and records the largest gap between when it
asked to wake and when it woke, while the main task submits one message at a
time: the largest single stall of the loop during (and just after) each submit.
Cases: 1, 1,000 and 10,000 recipients (To, Cc and Bcc), the same 10,000 as an
``EmailMessage`` and as raw bytes with an envelope, messages of 1 MB and 25 MB,
and ``submit_many`` of a batch. The Deliverer only submits (``mode="submit"``),
so that nothing but the submit path runs on the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import anyio

from bench._common import SENDER, Row, Target, recipient, settle
from bench.scenarios import _remove_db
from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    Limits,
    MemoryStore,
    RelayConfig,
    SQLiteStore,
    Store,
)

__all__ = ["TARGET_STALL_MS", "cases", "loop_lag", "report_rows", "report_targets"]

#: The largest single event-loop stall a submit may cause.
TARGET_STALL_MS = 50.0
_TICK = 0.001
_MIB = 2**20
_LINE = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\n"


def cases(quick: bool) -> list[str]:
    """The case names to run; ``--quick`` runs the small ones."""
    if quick:
        return ["email-1", "email-1k", "bytes-1k", "many-100x10", "attach-1m"]
    return [
        "email-1",
        "email-1k",
        "email-10k",
        "message-10k",
        "bytes-10k",
        "many-10x1k",
        "many-1000x1",
        "attach-1m",
        "attach-25m",
        "text-25m",
        "bytes-25m",
    ]


_LABELS = {
    "email-1": "submit Email, 1 recipient",
    "email-1k": "submit Email, 1,000 recipients (To/Cc/Bcc)",
    "email-10k": "submit Email, 10,000 recipients (To/Cc/Bcc)",
    "message-10k": "submit EmailMessage, 10,000 recipients",
    "bytes-1k": "submit bytes + envelope, 1,000 recipients",
    "bytes-10k": "submit bytes + envelope, 10,000 recipients",
    "many-100x10": "submit_many 100 Emails x 10 recipients",
    "many-10x1k": "submit_many 10 Emails x 1,000 recipients",
    "many-1000x1": "submit_many 1,000 Emails x 1 recipient",
    "attach-1m": "submit Email, 1 MB attachment",
    "attach-25m": "submit Email, 25 MB attachment",
    "text-25m": "submit EmailMessage, 25 MB text",
    "bytes-25m": "submit bytes + envelope, 25 MB",
}


def _count(text: str) -> int:
    """``"10"``, ``"1k"``, ``"10k"`` as a number."""
    return int(text.removesuffix("k")) * (1000 if text.endswith("k") else 1)


def _addresses(count: int, token: str) -> list[str]:
    # One in four with a display name, spread over 100 domains.
    return [
        f"Recipient {i} <{recipient(i, token, domain=f'd{i % 100}.mailstrom.test')}>"
        if i % 4 == 0
        else recipient(i, token, domain=f"d{i % 100}.mailstrom.test")
        for i in range(count)
    ]


def _email(count: int, token: str, **extra: Any) -> Email:
    rcpts = _addresses(count, token)
    half, three_quarters = max(1, count // 2), max(1, 3 * count // 4)
    return Email(
        sender=SENDER,
        to=rcpts[:half],
        cc=rcpts[half:three_quarters],
        bcc=rcpts[three_quarters:],
        subject=f"loop lag, {count} recipients",
        text=_LINE * 20,
        **extra,
    )


def _email_message(count: int, token: str, text: str) -> EmailMessage:
    rcpts = _addresses(count, token)
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ", ".join(rcpts[: max(1, count // 2)])
    if rcpts[count // 2 :]:
        msg["Cc"] = ", ".join(rcpts[count // 2 :])
    msg["Subject"] = f"loop lag, {count} recipients"
    msg.set_content(text)
    return msg


def _raw(count: int, token: str, body_bytes: int) -> tuple[bytes, list[str]]:
    shown = [recipient(i, token) for i in range(min(count, 50))]
    body = (_LINE.replace("\n", "\r\n") * (body_bytes // len(_LINE) + 1)).encode()
    head = (
        f"From: {SENDER}\r\nTo: "
        + ",\r\n ".join(shown)
        + f"\r\nSubject: loop lag, {count} recipients\r\n\r\n"
    )
    return head.encode() + body[:body_bytes], [
        recipient(i, token) for i in range(count)
    ]


Submit = Callable[[Deliverer], Awaitable[Any]]


def _make(case: str, token: str) -> Submit:
    """Build the case's message(s) now; return the call that submits them."""
    kind, _, size = case.partition("-")
    if kind == "email":
        email = _email(_count(size), token)
        return lambda d: d.submit(email)
    if kind == "message":
        message = _email_message(10_000, token, _LINE * 20)
        return lambda d: d.submit(message)
    if kind == "bytes":
        if size.endswith("m"):
            data, rcpts = _raw(1, token, 25 * _MIB)
        else:
            data, rcpts = _raw(_count(size), token, 2048)
        return lambda d: d.submit(data, mail_from=SENDER, rcpt_to=rcpts)
    if kind == "many":
        number, _, each = size.partition("x")
        batch = [_email(_count(each), f"{token}m{i}") for i in range(_count(number))]
        return lambda d: d.submit_many(batch)
    megabytes = int(size.removesuffix("m"))
    if kind == "text":
        text = _LINE * (megabytes * _MIB // len(_LINE))
        message = _email_message(1, token, text)
        return lambda d: d.submit(message)
    content = bytes(range(256)) * (megabytes * _MIB // 256)
    email = _email(1, token, attachments=[("data.bin", content)])
    return lambda d: d.submit(email)


class _Probe:
    """Sleeps 1 ms at a time and remembers the largest oversleep."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0
        self._waiting: list[tuple[int, anyio.Event]] = []

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await anyio.sleep(_TICK)
            self.worst = max(self.worst, time.perf_counter() - start - _TICK)
            self.ticks += 1
            for due, event in self._waiting:
                if self.ticks >= due:
                    event.set()
            self._waiting = [(d, e) for d, e in self._waiting if not e.is_set()]

    async def settle(self) -> None:
        """Wait until the probe has woken twice more, so a late stall counts."""
        event = anyio.Event()
        self._waiting.append((self.ticks + 2, event))
        await event.wait()


async def _measure(
    deliverer: Deliverer, probe: _Probe, submit: Submit, repetitions: int
) -> dict[str, float]:
    worst, took = 0.0, []
    for _ in range(repetitions):
        await probe.settle()
        probe.worst = 0.0
        start = time.perf_counter()
        await submit(deliverer)
        took.append(time.perf_counter() - start)
        await probe.settle()
        worst = max(worst, probe.worst)
    return {"stall_ms": 1000 * worst, "submit_ms": 1000 * max(took)}


async def loop_lag(params: dict[str, Any]) -> dict[str, Any]:
    """Scenario 7: the largest event-loop stall while submitting each case."""
    token: str = params["token"]
    repetitions: int = params.get("repetitions", 3)
    store: Store
    path: Path | None = None
    if params["store"] == "memory":
        store = MemoryStore()
    else:
        path = Path(params["tmpdir"]) / f"lag-{token}.sqlite3"
        store = SQLiteStore(path)
    config = Config(
        helo_name="bench.mailstrom.test",
        relay=RelayConfig(host="127.0.0.1", port=params["port"], tls="none"),
        limits=Limits(max_message_size=64 * _MIB),
    )
    results: dict[str, dict[str, float]] = {}
    async with Deliverer(config, store=store, mode="submit") as deliverer:
        probe = _Probe()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run)
            # The idle loop's own jitter, for reference.
            await probe.settle()
            probe.worst = 0.0
            await anyio.sleep(0.2)
            idle = 1000 * probe.worst
            for n, case in enumerate(params["cases"]):
                submit = _make(case, f"{token}c{n}")
                settle()
                results[case] = await _measure(deliverer, probe, submit, repetitions)
            tg.cancel_scope.cancel()
    _remove_db(path)
    return {"store": params["store"], "idle_stall_ms": idle, "cases": results}


def _worst(runs: list[dict[str, Any]], case: str, metric: str) -> float:
    values = [
        float(r["cases"][case][metric]) for r in runs if case in r.get("cases", {})
    ]
    if not values:
        return math.nan
    return max(values)


def report_rows(key: str, runs: list[dict[str, Any]]) -> list[Row]:
    """Table rows for scenario 7: the largest stall of each case over every run."""
    if not runs:
        return []
    store = runs[0]["store"]
    idle = max(r["idle_stall_ms"] for r in runs)
    rows = [Row(key, f"loop stall, idle loop ({store} store)", f"{idle:.1f} ms")]
    for case in runs[0]["cases"]:
        stall = _worst(runs, case, "stall_ms")
        took = _worst(runs, case, "submit_ms")
        ok = None if math.isnan(stall) else stall < TARGET_STALL_MS
        rows.append(
            Row(
                key,
                f"  {_LABELS[case]}",
                f"{stall:.1f} ms",
                f"took <= {took:,.0f} ms",
                f"< {TARGET_STALL_MS:g} ms",
                {True: "PASS", False: "FAIL", None: "skip"}[ok],
            )
        )
    return rows


def report_targets(key: str, runs: list[dict[str, Any]]) -> list[Target]:
    if not runs:
        return []
    targets = []
    for case in runs[0]["cases"]:
        stall = _worst(runs, case, "stall_ms")
        ok = None if math.isnan(stall) else stall < TARGET_STALL_MS
        targets.append(
            Target(
                f"scenario {key} loop stall ms ({_LABELS[case]})",
                stall,
                f"< {TARGET_STALL_MS:g}",
                ok,
                f"{runs[0]['store']} store, largest of every repetition",
            )
        )
    return targets
