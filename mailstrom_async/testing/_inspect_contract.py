"""The store contract for reading the queue as an operator does: a message's
stored bytes and size (``Store.message_data``/``message_sizes``) and the queue's
shape by domain and age (``Store.shape``).

A part of :class:`~mailstrom_async.testing.StoreContract`, which inherits these
tests; kept in a module of its own so that each file reads as one subject.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from mailstrom_async._exceptions import UnknownMessageError
from mailstrom_async._models import RecipientState
from mailstrom_async.testing._store_common import T0, at, attempted, new_message

if TYPE_CHECKING:
    from mailstrom_async._store import Store

__all__ = ["InspectContract"]

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED

#: Postfix qshape's buckets, in seconds: 5, 10, 20, ... 1280 minutes.
_BOUNDS = [60.0 * m for m in (5, 10, 20, 40, 80, 160, 320, 640, 1280)]


@pytest.mark.anyio
class InspectContract:
    """Reading stored bytes, sizes and the queue's shape: part of StoreContract."""

    async def test_message_data_is_the_exact_bytes(self, store: Store) -> None:
        """message_data() returns exactly the bytes that were added."""
        data = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n\x00\xff bytes\r\n"
        await store.add(new_message("m1", data=data))
        assert await store.message_data("m1") == data

    async def test_message_data_of_an_unknown_id(self, store: Store) -> None:
        """message_data() of an id the store does not hold raises UnknownMessageError."""
        with pytest.raises(UnknownMessageError):
            await store.message_data("nope")

    async def test_message_sizes(self, store: Store) -> None:
        """message_sizes() gives each known message's length; unknown ids are left out."""
        await store.add(new_message("m1", data=b"x" * 10))
        await store.add(new_message("m2", data=b"y" * 70_000))
        sizes = await store.message_sizes(["m2", "nope", "m1"])
        assert sizes == {"m1": 10, "m2": 70_000}
        assert await store.message_sizes([]) == {}

    async def test_shape_counts_by_domain_and_age(self, store: Store) -> None:
        """shape() counts waiting recipients by lower-cased domain and by the age of
        their message: a bound is the first age of the next bucket."""
        # Whole seconds, so that the edge is exact in a store that keeps floats.
        now = T0.replace(microsecond=0) + timedelta(days=3)
        ages = {"young": 0, "edge": 300, "mid": 299 * 60, "old": 2 * 86400}
        for mid, age in ages.items():
            await store.add(
                new_message(
                    mid,
                    "a@example.org",
                    "b@EXAMPLE.org",
                    "c@other.example",
                    submitted_at=now - timedelta(seconds=age),
                )
            )
        await store.add(new_message("future", "d@other.example", submitted_at=at(9e6)))
        # A delivered recipient does not count; a deferred one does.
        await store.record("old", [attempted("a@example.org", DELIVERED)], worker="w")
        await store.record(
            "mid",
            [attempted("c@other.example", DEFERRED, next_at=now)],
            worker="w",
        )
        shape = await store.shape(now=now, bounds=_BOUNDS)
        assert shape.bounds == tuple(_BOUNDS)
        #                          5  10 20 40 80 160 320 640 1280 1280+
        assert shape.by_domain == {
            "example.org": (2, 2, 0, 0, 0, 0, 2, 0, 0, 1),
            "other.example": (2, 1, 0, 0, 0, 0, 1, 0, 0, 1),
        }
        assert shape.total() == (4, 3, 0, 0, 0, 0, 3, 0, 0, 2)

    async def test_shape_filters(self, store: Store) -> None:
        """shape() counts the states asked for, of one domain, held or not."""
        await store.add(new_message("m1", "a@example.org", "b@other.example"))
        await store.add(new_message("m2", "c@example.org"))
        await store.record(
            "m1", [attempted("a@example.org", DEFERRED, next_at=at(60))], worker="w"
        )
        await store.record("m2", [attempted("c@example.org", FAILED)], worker="w")
        await store.hold(message_id="m1", domain="other.example")
        now = at(30)
        deferred = await store.shape(now=now, bounds=[60], states=[DEFERRED])
        assert deferred.by_domain == {"example.org": (1, 0)}
        failed = await store.shape(now=now, bounds=[60], states=[FAILED])
        assert failed.by_domain == {"example.org": (1, 0)}
        one = await store.shape(now=now, bounds=[60], domain="OTHER.example")
        assert one.by_domain == {"other.example": (1, 0)}
        held = await store.shape(now=now, bounds=[60], held=True)
        assert held.by_domain == {"other.example": (1, 0)}
        free = await store.shape(now=now, bounds=[60], held=False)
        assert free.by_domain == {"example.org": (1, 0)}
        nothing = await store.shape(now=now, bounds=[60], domain="none.example")
        assert nothing.by_domain == {}
        assert nothing.total() == (0, 0)

    async def test_shape_needs_increasing_positive_bounds(self, store: Store) -> None:
        """shape() refuses bounds that are empty, not positive, not increasing or
        not finite."""
        for bounds in (
            [],
            [0],
            [-5],
            [60, 60],
            [120, 60],
            [60, float("inf")],
            [float("nan")],
        ):
            with pytest.raises(ValueError, match="bounds must be positive"):
                await store.shape(now=T0, bounds=bounds)

    async def test_shape_needs_an_aware_now(self, store: Store) -> None:
        """shape() refuses a naive now, like every store method."""
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.shape(now=T0.replace(tzinfo=None), bounds=[60])
