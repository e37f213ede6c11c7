"""PostgreSQL scenarios (issue 13): the store's own ceiling, and how soon a
worker's outcome reaches a handle awaited in another Deliverer.

The harness starts a throwaway cluster (Debian's PostgreSQL, ``initdb`` and
``pg_ctl`` as the ``postgres`` user, on 127.0.0.1) with the server's durable
defaults (``fsync`` and ``synchronous_commit`` on), since the figures are meant
for a real deployment; it is stopped when the run ends.

- ``store_ceiling``: claims and records with no SMTP, the work a worker asks of
  the store per recipient: ``tasks`` concurrent claimers, each claiming up to
  ``claim`` messages at a time and recording each one DELIVERED, in a
  transaction of its own or, with ``batched``, the claim's outcomes in one
  ``record_many()`` (what the Deliverer's recorder does when jobs finish
  together). Run on PostgreSQL and, as the reference, on SQLite.
- ``notify_latency``: a submit-only Deliverer on one store awaits a handle; a
  second store, as a worker's would (its change feed running), claims the
  message and records it delivered. The latency is from the moment ``record``
  returns to the moment ``await handle`` does, one message at a time; the
  Deliverer polls hourly, so only ``LISTEN/NOTIFY`` can wake it.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import median
from typing import Any

import anyio
import attrs

from bench._common import body, out
from bench._procs import free_port

__all__ = [
    "TARGET_CEILING",
    "TARGET_NOTIFY_P99_MS",
    "TARGET_TWO_WORKERS",
    "cluster",
    "notify_latency",
    "pg_available",
    "pg_workers",
    "store_ceiling",
]

TARGET_CEILING = 5_000.0  # recipients claimed and recorded per second
TARGET_NOTIFY_P99_MS = 100.0
TARGET_TWO_WORKERS = 1.6  # 2 worker processes against 1
_OWNER = "postgres"


def _bin_dir() -> Path | None:
    dirs = sorted(Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return dirs[-1] if dirs else None


def pg_available() -> str | None:
    """None when the PostgreSQL scenarios can run, else why not."""
    if _bin_dir() is None:
        return "PostgreSQL is not installed (Debian package 'postgresql')"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (the 'postgres' extra)"
    return None


def _as_owner(*argv: str) -> None:
    command = list(argv)
    if os.geteuid() == 0:
        command = ["runuser", "-u", _OWNER, "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=120)  # noqa: S603


@contextmanager
def cluster() -> Iterator[str]:
    """A running throwaway cluster in a new temporary directory (that the
    ``postgres`` user can reach): the DSN of its ``bench`` database; stopped
    (``-m immediate``) and removed on the way out."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        msg = "PostgreSQL is not installed: call pg_available() first"
        raise RuntimeError(msg)
    home = Path(tempfile.mkdtemp(prefix="mailstrom-bench-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam(_OWNER)
        os.chown(home, owner.pw_uid, owner.pw_gid)
    data, port = home / "data", free_port()
    _as_owner(str(bin_dir / "initdb"), "-D", str(data), "-U", _OWNER,
              "--auth=trust", "-E", "UTF8", "--locale=C")  # fmt: skip
    settings = (
        f"-c listen_addresses=127.0.0.1 -p {port} "
        f"-c unix_socket_directories={home} -c max_connections=100"
    )
    _as_owner(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"),
              "-o", settings, "-w", "start")  # fmt: skip
    try:
        _as_owner(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                  "-U", _OWNER, "bench")  # fmt: skip
        out(f"PostgreSQL {bin_dir.parent.name} on 127.0.0.1:{port} (durable defaults)")
        yield f"postgresql://{_OWNER}@127.0.0.1:{port}/bench?sslmode=disable"
    finally:
        _as_owner(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


def _store(params: dict[str, Any], **options: Any) -> Any:
    from mailstrom_async import PostgresStore, SQLiteStore

    if params["store"] == "postgres":
        return PostgresStore(params["dsn"], **options)
    path = Path(params["tmpdir"]) / f"ceiling-{params['token']}.sqlite3"
    return SQLiteStore(path)


async def _admin(params: dict[str, Any], statement: str) -> None:
    """Run *statement* on PostgreSQL's bench database (nothing on SQLite)."""
    if params["store"] == "postgres":
        import asyncpg

        conn = await asyncpg.connect(params["dsn"])
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


async def _reset(params: dict[str, Any]) -> None:
    """An empty queue for this run (PostgreSQL's database is shared by runs)."""
    await _admin(params, "TRUNCATE messages CASCADE")


async def _analyze(params: dict[str, Any]) -> None:
    """Fresh planner statistics, as a running deployment has (autovacuum): on a
    table filled since its last ANALYZE, the planner takes it for empty and the
    claim statement scans every due row (measured: 17 ms instead of 5 ms per
    claim of 10 with 2,000 queued)."""
    await _admin(params, "ANALYZE")


def _messages(params: dict[str, Any], count: int) -> list[Any]:
    from mailstrom_async import NewMessage

    at = datetime.now(UTC) - timedelta(seconds=1)
    data = b"Subject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"
    return [
        NewMessage(
            message_id=f"<{params['token']}.{i}@bench.test>",
            mail_from="sender@bench.test",
            recipients=(f"r{i}@bench.test",),
            data=data,
            submitted_at=at,
        )
        for i in range(count)
    ]


async def store_ceiling(params: dict[str, Any]) -> dict[str, Any]:
    """Claims and records per second, no SMTP (see the module's docstring)."""
    from mailstrom_async import JobRecord, RecipientState, RecipientStatus

    n, tasks, claim = params["messages"], params["tasks"], params["claim"]
    batched = bool(params.get("batched"))
    store = _store(params, max_size=tasks + 1)
    async with store:
        await _reset(params)
        batch = _messages(params, n)
        for i in range(0, n, 500):
            await store.add_many(batch[i : i + 500])
        await _analyze(params)
        done = 0
        transactions = 0

        async def worker(w: int) -> None:
            nonlocal done, transactions
            name = f"bench-{w}"
            while True:
                now = datetime.now(UTC)
                jobs = await store.claim_due(
                    now=now, worker=name, lease_until=now + timedelta(minutes=5),
                    limit=claim,
                )  # fmt: skip
                transactions += 1
                if not jobs:
                    return
                outcomes = [
                    JobRecord(
                        message_id=job.message_id,
                        statuses=tuple(
                            RecipientStatus(
                                address=r.address,
                                state=RecipientState.DELIVERED,
                                attempts=1,
                                code=250,
                                last_attempt_at=now,
                                first_attempt_at=now,
                            )
                            for r in job.recipients
                        ),
                        lease=job.lease,
                    )
                    for job in jobs
                ]
                if batched:  # as the Deliverer's recorder does for jobs done together
                    await store.record_many(outcomes, worker=name)
                    transactions += 1
                else:
                    for o in outcomes:
                        await store.record(
                            o.message_id, o.statuses, worker=name, lease=o.lease
                        )
                        transactions += 1
                done += sum(len(o.statuses) for o in outcomes)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for w in range(tasks):
                tg.start_soon(worker, w)
        seconds = time.perf_counter() - start
        summary = await store.summary()
    delivered = summary.by_state.get(RecipientState.DELIVERED, 0)
    return {
        "recipients": done,
        "delivered": delivered,
        "seconds": seconds,
        "recipients_per_s": done / seconds,
        "transactions_per_s": transactions / seconds,
        "msgs_per_s": done / seconds,
    }


async def notify_latency(params: dict[str, Any]) -> dict[str, Any]:
    """From a worker's ``record`` to ``await handle`` in a submit-only
    Deliverer on another store (see the module's docstring)."""
    from mailstrom_async import (
        Config,
        Deliverer,
        PostgresStore,
        RecipientState,
        RecipientStatus,
    )

    samples: list[float] = []
    config = Config(helo_name="bench.test", poll_interval=3600.0)
    worker = PostgresStore(params["dsn"])
    async with worker, anyio.create_task_group() as tg:
        await _reset(params)
        await tg.start(worker.watch_changes, lambda change: None)
        web_store = PostgresStore(params["dsn"])
        async with Deliverer(config, store=web_store, mode="submit") as web:
            for i in range(params["samples"]):
                handle = await web.submit(
                    b"From: sender@bench.test\r\nSubject: x\r\n\r\nx\r\n",
                    mail_from="sender@bench.test",
                    rcpt_to=[f"r{i}@bench.test"],
                )
                waiting = anyio.Event()
                resolved: list[float] = []

                async def wait(
                    h: Any = handle, w: anyio.Event = waiting, r: list[float] = resolved
                ) -> None:
                    w.set()
                    await h
                    r.append(time.perf_counter())

                async with anyio.create_task_group() as inner:
                    inner.start_soon(wait)
                    await waiting.wait()
                    now = datetime.now(UTC)
                    [job] = await worker.claim_due(
                        now=now,
                        worker="bench",
                        lease_until=now + timedelta(60),
                        limit=1,
                    )
                    status = RecipientStatus(
                        address=job.recipients[0].address,
                        state=RecipientState.DELIVERED,
                        attempts=1,
                        code=250,
                    )
                    await worker.record(job.message_id, [status], worker="bench")
                    recorded = time.perf_counter()
                samples.append(resolved[0] - recorded)
        tg.cancel_scope.cancel()
    samples.sort()
    p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
    return {
        "samples": len(samples),
        "p50_ms": median(samples) * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": samples[-1] * 1000,
    }


async def pg_workers(params: dict[str, Any]) -> dict[str, Any]:
    """Delivered messages per second with ``workers`` worker processes on one
    queue (PostgreSQL, or with ``store="sqlite"`` one SQLite file), to
    smtp-sink: the workers start idle, then a submit-only Deliverer submits
    ``messages`` prepared messages in one ``submit_many`` and awaits every
    handle; timed from the submission to the last handle resolved."""
    from bench.scenarios import _worker_process, relay_config
    from mailstrom_async import Deliverer, Email, PostgresStore, SQLiteStore, prepare

    n, count = params["messages"], params["workers"]
    postgres = params["store"] == "postgres"
    path = Path(params["tmpdir"]) / f"workers-{params['token']}.sqlite3"
    config = relay_config(params["port"])
    if not postgres:  # no notifications: poll often, as a SQLite deployment would
        config = attrs.evolve(config, poll_interval=0.05)
    store = PostgresStore(params["dsn"]) if postgres else SQLiteStore(path)
    if postgres:
        await _reset(params)
    else:
        async with store:  # the schema, before the workers open it
            pass
        store = SQLiteStore(path)
    prepared = [
        prepare(
            Email(
                sender="sender@bench.test",
                to=[f"r{i}@bench.test"],
                subject=f"bench {i}",
                text=body(),
            ),
            config=config,
        )
        for i in range(n)
    ]
    dsn = params["dsn"] if postgres else None
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(_worker_process(params, path, dsn=dsn))
            for _ in range(count)
        ]
        async with Deliverer(config, store=store, mode="submit") as web:
            busy_before = _machine_cpu()
            start = time.perf_counter()
            handles = await web.submit_many(prepared)
            for handle in handles:
                await handle
            seconds = time.perf_counter() - start
            busy_after = _machine_cpu()
        delivered = [await w.stop() for w in workers]
    busy, total = (a - b for a, b in zip(busy_after, busy_before, strict=True))
    return {
        "messages": n,
        "workers": count,
        "seconds": seconds,
        "msgs_per_s": n / seconds,
        "delivered_by_worker": delivered,
        # Of every CPU of the machine: how busy it was during the run (what a
        # second worker can add on this machine is bounded by what is left).
        "machine_cpu_busy": busy / total if total else math.nan,
    }


def _machine_cpu() -> tuple[int, int]:
    """Busy and total CPU ticks of the whole machine so far (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is counted in user time already
    return total - idle, total
