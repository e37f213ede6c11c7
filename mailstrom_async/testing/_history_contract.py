"""The store contract for attempt histories (``Store.record(history=...)``,
``Store.history``).

A part of :class:`~mailstrom_async.testing.StoreContract`, which inherits these
tests; kept in a module of its own so that each file reads as one subject.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import attrs
import pytest

from mailstrom_async._exceptions import UnknownMessageError
from mailstrom_async._models import AttemptRecord, RecipientState, RecipientStatus
from mailstrom_async.testing._store_common import T0, at, new_message

if TYPE_CHECKING:
    from datetime import datetime

    from mailstrom_async._store import Store

__all__ = ["HistoryContract"]

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


def _attempt(
    address: str, n: int, state: RecipientState, *, started: datetime | None = None
) -> AttemptRecord:
    """Attempt *n* of *address*, started *n* minutes after T0, lasting 1.25 s."""
    return AttemptRecord(
        address=address,
        attempt=n,
        started_at=started or at(60 * n),
        duration=1.25,
        state=state,
        code=250 if state is DELIVERED else 451,
        enhanced_code="2.0.0" if state is DELIVERED else "4.7.1",
        message="ok" if state is DELIVERED else f"try later ({n})",
        host="mx.x.example",
        ip="192.0.2.1",
        tls=True,
        tls_verified=False,
    )


def _status(record: AttemptRecord) -> RecipientStatus:
    """The recipient's status after *record*."""
    unfinished = record.state in (QUEUED, DEFERRED)
    return RecipientStatus(
        address=record.address,
        state=record.state,
        attempts=record.attempt,
        code=record.code,
        last_attempt_at=record.finished_at,
        next_attempt_at=at(60 * record.attempt + 30) if unfinished else None,
    )


async def _record(
    store: Store, message_id: str, *records: AttemptRecord, limit: int = 20
) -> None:
    await store.record(
        message_id,
        [_status(r) for r in records],
        worker="w",
        history=records,
        history_limit=limit,
    )


@pytest.mark.anyio
class HistoryContract:
    """Attempt histories: written with the outcome, bounded, read back in order."""

    async def test_history_round_trip_in_time_order(self, store: Store) -> None:
        """Every field of an attempt comes back exactly, in UTC, and a message's
        attempts come oldest first: by start time, then envelope order."""
        await store.add(new_message("m1", "b@x.example", "a@y.example"))
        assert await store.history("m1") == []
        first = _attempt("b@x.example", 1, DEFERRED)
        local = AttemptRecord(
            address="a@y.example",
            attempt=1,
            started_at=first.started_at,
            duration=0.0,
            state=DEFERRED,
            enhanced_code="4.4.1",
            message="connection refused",
        )
        raw = AttemptRecord(
            address="b@x.example",
            attempt=2,
            started_at=at(120.000001),
            duration=30.5,
            state=DELIVERED,
            code=250,
            message="Empf\\xe4nger ok",
            raw_message=b"Empf\xe4nger ok",
        )
        await _record(store, "m1", first, local)
        await _record(store, "m1", raw)
        history = await store.history("m1")
        assert history == [first, local, raw]
        assert [r.started_at.utcoffset() for r in history] == [at(0).utcoffset()] * 3
        assert history[1].is_local
        assert not history[0].is_local
        assert history[2].message_bytes == b"Empf\xe4nger ok"
        assert history[2].finished_at == at(150.500001)

    async def test_history_is_written_with_the_status(self, store: Store) -> None:
        """A record() that fails (an unfinished status without a next attempt)
        writes neither the statuses nor the attempts."""
        await store.add(new_message("m1", "a@x.example"))
        record = _attempt("a@x.example", 1, DEFERRED)
        broken = attrs.evolve(_status(record), next_attempt_at=None)
        with pytest.raises(ValueError, match="next_attempt_at"):
            await store.record("m1", [broken], worker="w", history=[record])
        assert await store.history("m1") == []
        assert (await store.status("m1")).recipients[0].attempts == 0

    async def test_history_of_unknown_message(self, store: Store) -> None:
        """history() of an id the store does not have raises UnknownMessageError."""
        with pytest.raises(UnknownMessageError):
            await store.history("nope")

    async def test_history_matches_addresses_like_statuses(self, store: Store) -> None:
        """An attempt matches its recipient by address (the domain in any case),
        comes back with the stored address, and an unknown address is ignored."""
        await store.add(new_message("m1", "Alice@Example.COM"))
        mixed = _attempt("Alice@example.com", 1, DELIVERED)
        stray = _attempt("bob@example.com", 1, DELIVERED)
        await store.record("m1", [_status(mixed)], worker="w", history=[mixed, stray])
        assert await store.history("m1") == [
            attrs.evolve(mixed, address="Alice@Example.COM")
        ]

    async def test_history_kept_when_a_final_state_is_not_undone(
        self, store: Store
    ) -> None:
        """An attempt made while the recipient was cancelled is kept in its
        history, though its unfinished status does not replace FAILED."""
        await store.add(new_message("m1", "a@x.example"))
        assert await store.cancel("m1") == 1
        late = _attempt("a@x.example", 1, DEFERRED)
        await _record(store, "m1", late)
        assert (await store.status("m1")).recipients[0].state is FAILED
        assert await store.history("m1") == [late]

    async def test_retried_write_keeps_an_attempt_once(self, store: Store) -> None:
        """The same attempt written twice (a write retried after an error) is one
        entry; the same number started at another time (another worker whose
        lease ran out) is another."""
        await store.add(new_message("m1", "a@x.example"))
        record = _attempt("a@x.example", 1, DEFERRED)
        await _record(store, "m1", record)
        await _record(store, "m1", record)
        other = attrs.evolve(record, started_at=at(61))
        await _record(store, "m1", other)
        assert await store.history("m1") == [record, other]

    async def test_history_is_bounded_first_and_latest(self, store: Store) -> None:
        """With a limit of 4, a recipient keeps its first attempt and its latest
        three; another recipient's history is untouched."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        for n in range(1, 10):
            await _record(store, "m1", _attempt("a@x.example", n, DEFERRED), limit=4)
        await _record(store, "m1", _attempt("b@x.example", 1, DEFERRED), limit=4)
        history = await store.history("m1")
        assert [(r.address, r.attempt) for r in history] == [
            ("a@x.example", 1),
            ("b@x.example", 1),
            ("a@x.example", 7),
            ("a@x.example", 8),
            ("a@x.example", 9),
        ]
        # Attempts up to the limit are all kept.
        for n in range(2, 5):
            await _record(store, "m1", _attempt("b@x.example", n, DEFERRED), limit=4)
        kept = [r.attempt for r in await store.history("m1") if r.address[0] == "b"]
        assert kept == [1, 2, 3, 4]

    async def test_history_limit_one_and_zero(self, store: Store) -> None:
        """A limit of 1 keeps only the latest attempt; 0 writes no history (the
        statuses are written all the same); a negative limit is refused."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        for n in (1, 2, 3):
            await _record(store, "m1", _attempt("a@x.example", n, DEFERRED), limit=1)
        assert [r.attempt for r in await store.history("m1")] == [3]
        await _record(store, "m1", _attempt("b@x.example", 1, DELIVERED), limit=0)
        assert [r.address for r in await store.history("m1")] == ["a@x.example"]
        assert (await store.status("m1")).recipients[1].state is DELIVERED
        with pytest.raises(ValueError, match="history_limit"):
            await _record(store, "m1", _attempt("a@x.example", 4, DEFERRED), limit=-1)

    async def test_history_refuses_bad_attempts(self, store: Store) -> None:
        """A naive start time, an attempt number below 1 and a negative duration
        are bugs: ValueError, and nothing is written."""
        await store.add(new_message("m1", "a@x.example"))
        good = _attempt("a@x.example", 1, DEFERRED)
        bad = [
            attrs.evolve(good, started_at=T0.replace(tzinfo=None)),
            attrs.evolve(good, attempt=0),
            attrs.evolve(good, duration=-1.0),
        ]
        for record in bad:
            with pytest.raises(ValueError, match=r"started_at|attempt|duration"):
                await _record(store, "m1", record)
        assert await store.history("m1") == []
        assert (await store.status("m1")).recipients[0].attempts == 0

    async def test_history_text_is_valid_unicode(self, store: Store) -> None:
        """Reply text with a lone surrogate (what aiosmtplib makes of a bad byte)
        is stored in its display form, its exact bytes in raw_message."""
        await store.add(new_message("m1", "a@x.example"))
        record = attrs.evolve(
            _attempt("a@x.example", 1, DEFERRED), message="sp\udce4ter"
        )
        await _record(store, "m1", record)
        [back] = await store.history("m1")
        assert back.message == "sp\\xe4ter"
        assert back.raw_message == b"sp\xe4ter"

    async def test_purge_deletes_history(self, store: Store) -> None:
        """Purging a message deletes its history with it; a message kept keeps
        its own."""
        await store.add(new_message("old", "a@x.example"))
        await store.add(new_message("new", "a@x.example"))
        await _record(store, "old", _attempt("a@x.example", 1, DELIVERED))
        late = _attempt("a@x.example", 1, DELIVERED, started=at(10_000))
        await _record(store, "new", late)
        assert await store.purge(finished_before=at(5_000)) == 1
        with pytest.raises(UnknownMessageError):
            await store.history("old")
        assert await store.history("new") == [late]
        # The id can be used again, with an empty history.
        await store.add(new_message("old", "a@x.example"))
        assert await store.history("old") == []

    async def test_concurrent_records_keep_every_attempt(self, store: Store) -> None:
        """Records of many messages written at once (one commit for several, in
        a SQL store) each keep their attempts."""
        ids = [f"m{i}" for i in range(20)]
        for mid in ids:
            await store.add(new_message(mid, "a@x.example"))
        async with anyio.create_task_group() as tg:
            for mid in ids:
                tg.start_soon(
                    _record, store, mid, _attempt("a@x.example", 1, DELIVERED)
                )
        for mid in ids:
            assert [r.attempt for r in await store.history(mid)] == [1]
