"""A damaged SQLite file is refused at open with a StoreError that says what to do.

Real files, really damaged: page 1 kept and the rest overwritten with random bytes,
cut short, or not SQLite at all; both a small file (SQLite's full
``PRAGMA quick_check``) and one over ``QUICK_CHECK_MAX_BYTES`` (the probe of every
b-tree's ends). Each is opened through
``SQLiteStore.open()`` and through ``async with Deliverer(...)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aiosqlite
import anyio
import pytest

from mailstrom_async import Config, RelayConfig, StoreError
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._models import RecipientState, RecipientStatus
from mailstrom_async._store import SQLiteStore
from mailstrom_async._store._sql import INTEGRITY_PROBES
from mailstrom_async._store._sqlite import QUICK_CHECK_MAX_BYTES
from mailstrom_async.testing._store_contract import T0, at, new_message
from tests.smtpd import free_port

PAGE = 4096
#: Message data that makes a file larger than the full check's limit in a few rows.
BIG = b"x" * (1 << 20)


async def make_store(path: Path, *, large: bool) -> None:
    """A store with messages and statuses in every b-tree; over the full check's
    limit when *large*."""
    count = QUICK_CHECK_MAX_BYTES // len(BIG) + 2 if large else 40
    data = BIG if large else b"Subject: hi\r\n\r\n" + b"hello\r\n" * 100
    async with SQLiteStore(path, synchronous="OFF") as store:
        await store.add_many(
            [
                new_message(f"m{i}", f"r{i}@x.example", key=f"k{i}", data=data)
                for i in range(count)
            ]
        )
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=count // 2)
        await store.record(
            "m0",
            [
                RecipientStatus(
                    address="r0@x.example",
                    state=RecipientState.DEFERRED,
                    attempts=1,
                    code=451,
                    message="later",
                    raw_message=b"sp\xe4ter",
                    last_attempt_at=T0,
                    next_attempt_at=at(300),
                )
            ],
            worker="w",
        )
    assert not await anyio.Path(f"{path}-wal").exists()  # closed cleanly
    size = (await anyio.Path(path).stat()).st_size
    assert (size > QUICK_CHECK_MAX_BYTES) is large


def garbage_after_page_one(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(PAGE)
        f.write(os.urandom(size - PAGE))


def cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2 // PAGE * PAGE)


def not_sqlite(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 1000)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage after page 1": garbage_after_page_one,
    "cut in half": cut_in_half,
    "not SQLite": not_sqlite,
}


def assert_refusal(error: StoreError, path: Path, kind: str) -> None:
    """The message names the file, says what is wrong and what to do."""
    text = str(error)
    assert repr(str(path)) in text
    assert "\n" not in text
    if kind == "not SQLite":
        assert "is not a SQLite database" in text
        assert "restore the file from a backup" in text
    else:
        assert "is damaged" in text
        assert "restore it from a backup" in text
        assert re.search(r"sqlite3 '.*' \.recover \| sqlite3 NEW_FILE", text)


def config() -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host="127.0.0.1", port=free_port(), tls="none"),
    )


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_damaged_file_is_refused_at_open(
    tmp_path: Path, kind: str, large: bool
) -> None:
    """SQLiteStore.open() and Deliverer.__aenter__ raise a StoreError that names the
    file and the way out; the store stays closed."""
    path = tmp_path / "q.db"
    await make_store(path, large=large)
    await anyio.to_thread.run_sync(DAMAGE[kind], path)
    store = SQLiteStore(path)
    try:
        with pytest.raises(StoreError) as info:
            await store.open()
        assert_refusal(info.value, path, kind)
        with pytest.raises(StoreError, match="not open"):
            await store.status("m0")
    finally:
        await store.aclose()  # had it opened, its thread would outlive the test
    with pytest.raises(StoreError) as info:
        async with Deliverer(config(), store=SQLiteStore(path)):
            pytest.fail("a Deliverer started on a damaged store")
    assert_refusal(info.value, path, kind)


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
async def test_sound_file_opens(tmp_path: Path, large: bool) -> None:
    """An undamaged file opens, both checks find nothing, and its data is there."""
    path = tmp_path / "q.db"
    await make_store(path, large=large)
    async with SQLiteStore(path) as store:
        [r] = (await store.status("m0")).recipients
        assert r.raw_message == b"sp\xe4ter"
    async with Deliverer(config(), store=SQLiteStore(path), mode="submit") as d:
        assert (await d.status("m1")).recipients[0].state is RecipientState.QUEUED


async def test_large_file_cut_where_no_probe_reads(tmp_path: Path) -> None:
    """A large file that lost only its last pages (free ones, which no b-tree
    reaches) is still refused: it is shorter than its header says."""
    path = tmp_path / "q.db"
    await make_store(path, large=True)
    async with SQLiteStore(path) as store:
        # The last message's data fills the file's last pages; purging it puts
        # them on the free list.
        n = QUICK_CHECK_MAX_BYTES // len(BIG) + 1
        delivered = RecipientStatus(
            address=f"r{n}@x.example",
            state=RecipientState.DELIVERED,
            attempts=1,
            last_attempt_at=T0,
        )
        await store.record(f"m{n}", [delivered], worker="w")
        assert await store.purge(finished_before=T0 + timedelta(seconds=1)) == 1
    size = (await anyio.Path(path).stat()).st_size
    await anyio.to_thread.run_sync(os.truncate, path, size - 16 * PAGE)
    store = SQLiteStore(path)
    try:
        with pytest.raises(StoreError) as info:
            await store.open()
    finally:
        await store.aclose()
    assert_refusal(info.value, path, "cut")


def garbage_in_the_middle(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2 // PAGE * PAGE)
        f.write(os.urandom(4 * PAGE))


async def test_damage_deep_inside_is_reported_when_reached(tmp_path: Path) -> None:
    """Damage in the middle of a large file, where the probe does not read, opens;
    the query that reaches it raises the same StoreError with the way out."""
    path = tmp_path / "q.db"
    await make_store(path, large=True)
    await anyio.to_thread.run_sync(garbage_in_the_middle, path)
    async with SQLiteStore(path) as store:
        with pytest.raises(StoreError) as info:
            await store.claim_due(
                now=at(999), worker="w2", lease_until=at(999), limit=99
            )
    assert_refusal(info.value, path, "deep")


async def test_pending_log_is_no_false_alarm(tmp_path: Path) -> None:
    """While another connection holds the file with pages still in the
    write-ahead log, a large store opens: no false alarm."""
    path = tmp_path / "q.db"
    await make_store(path, large=True)
    async with SQLiteStore(path) as writer:
        await writer.add(new_message("extra", data=BIG * 2))
        assert (await anyio.Path(f"{path}-wal").stat()).st_size > 0
        async with SQLiteStore(path) as reader:
            assert (await reader.status("extra")).message_id == "extra"


async def test_every_b_tree_has_a_probe_that_reads_it(tmp_path: Path) -> None:
    """Each probe's query plan searches its own b-tree, and every table and index
    of the schema has a probe (a migration that adds an index must add one)."""
    path = tmp_path / "q.db"
    async with SQLiteStore(path):
        pass
    async with aiosqlite.connect(path) as raw:
        names = {
            row[0]
            for row in await raw.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')"
            )
        }
        probed = {name for name, _ in INTEGRITY_PROBES}
        # Step 3 dropped recipients_due, step 7 recipients_claimable; a file
        # not migrated yet still has them, and the check runs before migrations.
        assert probed - names == {"recipients_due", "recipients_claimable"}
        assert names <= probed
        for name, query in INTEGRITY_PROBES:
            if name not in names:
                continue
            plan = await raw.execute_fetchall(f"EXPLAIN QUERY PLAN {query}")
            detail = " ".join(str(row[-1]) for row in plan)
            if name in ("messages", "recipients"):
                assert f"SEARCH {name} USING INTEGER PRIMARY KEY" in detail, detail
            elif name == "history":  # WITHOUT ROWID: its primary key is the table
                assert f"SEARCH {name} USING PRIMARY KEY" in detail, detail
            else:
                assert f"INDEX {name}" in detail, detail
            assert "SCAN" not in detail.replace("SCAN CONSTANT ROW", ""), detail
