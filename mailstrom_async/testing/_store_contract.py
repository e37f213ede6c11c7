"""The store contract as a reusable test suite: what every Store must do.

To check a store, subclass :class:`StoreContract` in a test module and give it a
``store`` fixture that yields an open, empty store::

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def store(self) -> AsyncIterator[Store]:
            async with MyStore(...) as store:
                yield store

Every test passes explicit times; none sleeps or reads the clock.
"""

from __future__ import annotations

from datetime import UTC, timedelta, timezone

import anyio
import pytest

from mailstrom_async._exceptions import StoreError, UnknownMessageError
from mailstrom_async._models import MessageStatus, RecipientState, RecipientStatus
from mailstrom_async._store import LeaseInfo, NewMessage, Store
from mailstrom_async._watchers import merged
from mailstrom_async.testing._batch_contract import BatchContract
from mailstrom_async.testing._history_contract import HistoryContract
from mailstrom_async.testing._hold_contract import HoldContract
from mailstrom_async.testing._inspect_contract import InspectContract
from mailstrom_async.testing._lease_contract import LeaseContract
from mailstrom_async.testing._priority_contract import PriorityContract
from mailstrom_async.testing._store_common import (
    T0,
    at,
    attempted,
    claimed_addresses,
    new_message,
)

__all__ = ["T0", "StoreContract", "at", "attempted", "claimed_addresses", "new_message"]

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


_MANY = 20_000


def _many_addresses() -> list[str]:
    """20,000 addresses over 7 domains; every 1,000th also once more with its
    domain in upper case (the same recipient key)."""
    addresses = [f"r{i}@x{i % 7}.example" for i in range(_MANY)]
    for i in range(0, _MANY, 1000):
        addresses.insert(i + i // 1000 + 1, f"r{i}@X{i % 7}.EXAMPLE")
    return addresses


@pytest.mark.anyio
class StoreContract(
    BatchContract,
    HoldContract,
    HistoryContract,
    InspectContract,
    LeaseContract,
    PriorityContract,
):
    """The contract suite; subclasses provide a ``store`` fixture (open, empty).

    Subclass it in a test module (its name starting with ``Test``) and give the
    subclass a ``store`` fixture that yields an open, empty store and closes it
    afterwards. The tests are async and marked for anyio's pytest plugin.
    """

    # -- lifecycle ---------------------------------------------------------------

    async def test_implements_protocol(self, store: Store) -> None:
        """A store satisfies the runtime-checkable Store protocol."""
        assert isinstance(store, Store)

    async def test_reopen_keeps_data(self, store: Store) -> None:
        """aclose() and open() are idempotent, and reopening keeps what was stored."""
        await store.add(new_message("m1"))
        await store.aclose()
        await store.aclose()
        await store.open()
        await store.open()
        assert (await store.status("m1")).message_id == "m1"

    async def test_closed_store_refuses_use(self, store: Store) -> None:
        """A closed store raises StoreError instead of reading or writing."""
        await store.aclose()
        with pytest.raises(StoreError, match="not open"):
            await store.status("m1")
        with pytest.raises(StoreError, match="not open"):
            await store.add(new_message("m1"))
        await store.open()
        with pytest.raises(UnknownMessageError):
            await store.status("m1")

    # -- add and status ----------------------------------------------------------

    async def test_add_then_status(self, store: Store) -> None:
        """A new message's recipients are QUEUED, due at submission, in envelope order."""
        message = new_message("m1", "b@Example.COM", "a@example.net", "c@example.com")
        assert await store.add(message) == ("m1", True)
        status = await store.status("m1")
        assert status.message_id == "m1"
        assert status.mail_from == "sender@example.org"
        assert status.submitted_at == T0
        assert status.submitted_at.utcoffset() == timedelta(0)
        assert [r.address for r in status] == list(message.recipients)
        for r in status:
            assert r == RecipientStatus(address=r.address, next_attempt_at=T0)
        assert not status.is_done

    async def test_times_come_back_in_utc(self, store: Store) -> None:
        """A submission time in another zone is the same instant, returned in UTC."""
        local = T0.astimezone(timezone(timedelta(hours=5, minutes=30)))
        await store.add(new_message("m1", submitted_at=local))
        status = await store.status("m1")
        assert status.submitted_at == T0
        assert status.submitted_at.tzinfo == UTC
        assert status.recipients[0].next_attempt_at == T0

    async def test_naive_datetimes_are_refused(self, store: Store) -> None:
        """A naive datetime is a bug and raises ValueError before anything is stored."""
        naive = T0.replace(tzinfo=None)
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.add(new_message("m1", submitted_at=naive))
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.claim_due(now=naive, worker="w", lease_until=at(60), limit=1)
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.purge(finished_before=naive)
        with pytest.raises(UnknownMessageError):
            await store.status("m1")

    async def test_status_of_unknown_message(self, store: Store) -> None:
        """status() of an unknown id raises UnknownMessageError naming the id."""
        with pytest.raises(UnknownMessageError) as info:
            await store.status("nope")
        assert info.value.message_id == "nope"

    async def test_statuses_of_many_messages(self, store: Store) -> None:
        """statuses() gives what status() gives for each known id, in one call,
        and leaves unknown ids out."""
        await store.add(new_message("m1", "a@example.com", "b@example.net"))
        await store.add(new_message("m2", "c@example.com"))
        await store.add(new_message("m3"))
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=3)
        done = RecipientStatus(
            address="c@example.com", state=DELIVERED, attempts=1, code=250
        )
        await store.record("m2", [done], worker="w")
        found = await store.statuses(["m2", "nope", "m1", "m2"])
        assert found == {
            "m1": await store.status("m1"),
            "m2": await store.status("m2"),
        }
        assert found["m2"].is_done
        assert not found["m1"].is_done
        assert await store.statuses([]) == {}

    async def test_recorded_statuses_read_back_as_merged(self, store: Store) -> None:
        """What a handle resolves with, the status it read merged with what this
        process then recorded, is what the store gives back: times in UTC, text
        made valid Unicode, a final state never undone, a hold kept only when
        the recorded status keeps it."""
        await store.add(new_message("m1", "a@x.example", "B@x.example", "c@x.example"))
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        await store.hold(message_id="m1")
        before = await store.status("m1")
        zone = timezone(timedelta(hours=-3))
        recorded = [
            RecipientStatus(
                address="a@x.example",
                state=DEFERRED,
                attempts=1,
                code=451,
                message="bad \udce4 byte",
                last_attempt_at=at(1).astimezone(zone),
                next_attempt_at=at(300).astimezone(zone),
                held=True,
            ),
            RecipientStatus(address="b@X.EXAMPLE", state=FAILED, attempts=1, code=550),
        ]
        await store.record("m1", recorded, worker="w")
        after = await store.status("m1")
        assert merged(before, recorded) == after
        late = [RecipientStatus(address="b@x.example", next_attempt_at=at(9))]
        await store.record("m1", late, worker="w")
        assert merged(after, late) == await store.status("m1") == after

    async def test_idempotency_key_returns_first_message(self, store: Store) -> None:
        """Adding with a known idempotency key writes nothing and returns the first id."""
        assert await store.add(new_message("m1", key="k")) == ("m1", True)
        second = new_message("m2", "other@example.com", key="k")
        assert await store.add(second, claim_for="w", lease_until=at(60)) == (
            "m1",
            False,
        )
        with pytest.raises(UnknownMessageError):
            await store.status("m2")
        jobs = await store.claim_due(now=T0, worker="w2", lease_until=at(60), limit=10)
        assert claimed_addresses(jobs) == [("m1", "rcpt@example.com")]

    async def test_distinct_or_missing_keys_do_not_collide(self, store: Store) -> None:
        """Messages without a key, or with different keys, are all stored."""
        assert await store.add(new_message("m1")) == ("m1", True)
        assert await store.add(new_message("m2")) == ("m2", True)
        assert await store.add(new_message("m3", key="a")) == ("m3", True)
        assert await store.add(new_message("m4", key="b")) == ("m4", True)

    async def test_duplicate_message_id(self, store: Store) -> None:
        """Adding a second message with a stored id raises StoreError and changes nothing."""
        await store.add(new_message("m1", "a@example.com"))
        with pytest.raises(StoreError):
            await store.add(
                new_message("m1", "b@example.com", "c@example.com", key="k")
            )
        status = await store.status("m1")
        assert [r.address for r in status] == ["a@example.com"]
        assert await store.add(new_message("m2", key="k")) == ("m2", True)

    async def test_data_round_trip(self, store: Store) -> None:
        """The message bytes and SMTPUTF8 flag come back unchanged in a job."""
        data = bytes(range(256)) * 3
        await store.add(new_message("m1", "ü@exämple.com", data=data, smtputf8=True))
        [job] = await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        assert job.data == data
        assert job.smtputf8 is True
        assert job.mail_from == "sender@example.org"
        assert job.submitted_at == T0
        assert [r.address for r in job.recipients] == ["ü@exämple.com"]

    async def test_add_many(self, store: Store) -> None:
        """add_many() stores a batch in order, honouring idempotency keys seen
        before and within the batch, and can lease the new recipients."""
        await store.add(new_message("old", key="k1"))
        results = await store.add_many(
            [
                new_message("a", "x@x.example", key="k2"),
                new_message("b", key="k1"),
                new_message("c", key="k2"),
                new_message("d"),
            ],
            claim_for="w",
            lease_until=at(60),
        )
        assert results == [("a", True), ("old", False), ("a", False), ("d", True)]
        assert [r.address for r in await store.status("a")] == ["x@x.example"]
        for missing in ("b", "c"):
            with pytest.raises(UnknownMessageError):
                await store.status(missing)
        # The batch's new recipients are leased to "w"; only the old one is free.
        jobs = await store.claim_due(now=T0, worker="v", lease_until=at(60), limit=9)
        assert claimed_addresses(jobs) == [("old", "rcpt@example.com")]

    async def test_add_many_is_all_or_nothing(self, store: Store) -> None:
        """A batch with a taken message id stores nothing at all."""
        await store.add(new_message("taken"))
        with pytest.raises(StoreError):
            await store.add_many([new_message("fresh"), new_message("taken")])
        with pytest.raises(UnknownMessageError):
            await store.status("fresh")
        with pytest.raises(StoreError):
            await store.add_many([new_message("twice"), new_message("twice")])
        with pytest.raises(UnknownMessageError):
            await store.status("twice")

    async def test_cancelled_add_is_all_or_nothing(self, store: Store) -> None:
        """An add() cancelled at any point stores all recipients or nothing, and the
        store stays usable."""
        recipients = [f"r{i}@example.com" for i in range(200)]
        for delay in range(12):
            mid = f"m{delay}"
            async with anyio.create_task_group() as tg:

                async def add(mid: str = mid) -> None:
                    await store.add(new_message(mid, *recipients))

                tg.start_soon(add)
                for _ in range(delay):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            try:
                status = await store.status(mid)
            except UnknownMessageError:
                continue
            assert len(status.recipients) == len(recipients)
        await store.add(new_message("after"))
        assert (await store.status("after")).message_id == "after"

    # -- claims ------------------------------------------------------------------

    async def test_claim_only_due(self, store: Store) -> None:
        """Only recipients whose next attempt is at or before *now* are claimed."""
        await store.add(new_message("early"))
        await store.add(new_message("late", submitted_at=at(10)))
        jobs = await store.claim_due(
            now=at(5), worker="w", lease_until=at(60), limit=10
        )
        assert [j.message_id for j in jobs] == ["early"]
        jobs = await store.claim_due(
            now=at(10), worker="w", lease_until=at(60), limit=10
        )
        assert [j.message_id for j in jobs] == ["late"]

    async def test_claim_skips_leased(self, store: Store) -> None:
        """A leased recipient is not claimed again while its lease lasts."""
        await store.add(new_message("m1"))
        first = await store.claim_due(now=T0, worker="a", lease_until=at(60), limit=10)
        assert claimed_addresses(first) == [("m1", "rcpt@example.com")]
        again = await store.claim_due(
            now=at(1), worker="b", lease_until=at(60), limit=10
        )
        assert again == []

    async def test_claim_limit_and_order(self, store: Store) -> None:
        """Claims return at most *limit* messages, oldest due first."""
        for i in (3, 1, 4, 0, 2):
            await store.add(new_message(f"m{i}", submitted_at=at(i)))
        jobs = await store.claim_due(now=at(9), worker="w", lease_until=at(60), limit=2)
        assert [j.message_id for j in jobs] == ["m0", "m1"]
        jobs = await store.claim_due(now=at(9), worker="w", lease_until=at(60), limit=2)
        assert [j.message_id for j in jobs] == ["m2", "m3"]
        jobs = await store.claim_due(now=at(9), worker="w", lease_until=at(60), limit=2)
        assert [j.message_id for j in jobs] == ["m4"]

    async def test_claim_ties_in_submission_order(self, store: Store) -> None:
        """Messages due at the same instant are claimed in the order they were added."""
        for mid in ("c", "a", "b"):
            await store.add(new_message(mid))
        jobs = await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=3)
        assert [j.message_id for j in jobs] == ["c", "a", "b"]

    async def test_claim_groups_recipients(self, store: Store) -> None:
        """One job carries all of a message's due recipients, in envelope order."""
        rcpts = [f"r{i}@d{i % 2}.example" for i in range(7)]
        await store.add(new_message("m1", *rcpts))
        await store.add(new_message("m2"))
        jobs = await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        assert [j.message_id for j in jobs] == ["m1"]
        assert [r.address for r in jobs[0].recipients] == rcpts
        assert all(r.state is QUEUED for r in jobs[0].recipients)

    async def test_claim_only_due_recipients_of_a_message(self, store: Store) -> None:
        """A job holds only the due recipients; done and later ones stay behind."""
        await store.add(new_message("m1", "a@x.example", "b@x.example", "c@x.example"))
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        await store.record(
            "m1",
            [
                attempted("a@x.example", DELIVERED),
                attempted("b@x.example", DEFERRED, next_at=at(100)),
                attempted("c@x.example", DEFERRED, next_at=at(10)),
            ],
            worker="w",
        )
        [job] = await store.claim_due(
            now=at(50), worker="w", lease_until=at(60), limit=5
        )
        [recipient] = job.recipients
        assert recipient == attempted("c@x.example", DEFERRED, next_at=at(10))

    async def test_lease_expiry(self, store: Store) -> None:
        """A lease ending at or before *now* no longer protects a recipient."""
        await store.add(new_message("m1"))
        await store.claim_due(now=T0, worker="a", lease_until=at(60), limit=1)
        assert (
            await store.claim_due(
                now=at(59.999), worker="b", lease_until=at(120), limit=1
            )
            == []
        )
        jobs = await store.claim_due(
            now=at(60), worker="b", lease_until=at(120), limit=1
        )
        assert claimed_addresses(jobs) == [("m1", "rcpt@example.com")]

    async def test_claim_limit_must_be_positive(self, store: Store) -> None:
        """A claim for fewer than one message is a bug and raises ValueError."""
        with pytest.raises(ValueError, match="limit"):
            await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=0)

    async def test_claim_for_on_add(self, store: Store) -> None:
        """add(claim_for=...) leases the new recipients to that worker at once."""
        await store.add(
            new_message("m1", "a@x.example", "b@x.example"),
            claim_for="submitter",
            lease_until=at(30),
        )
        assert (
            await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=5) == []
        )
        assert await store.next_due_at() == at(30)
        await store.record(
            "m1", [attempted("a@x.example", DELIVERED)], worker="submitter"
        )
        await store.release("m1", ["b@X.example"], worker="submitter")
        jobs = await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=5)
        assert claimed_addresses(jobs) == [("m1", "b@x.example")]

    async def test_claim_for_needs_lease_until(self, store: Store) -> None:
        """claim_for and lease_until come together, or add() raises ValueError."""
        with pytest.raises(ValueError, match="together"):
            await store.add(new_message("m1"), claim_for="w")
        with pytest.raises(ValueError, match="together"):
            await store.add(new_message("m1"), lease_until=at(5))
        with pytest.raises(UnknownMessageError):
            await store.status("m1")

    # -- record and release ------------------------------------------------------

    async def test_record_round_trip_and_clears_lease(self, store: Store) -> None:
        """Every recorded field comes back exactly, and the worker's lease ends."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        deferred = RecipientStatus(
            address="a@x.example",
            state=DEFERRED,
            attempts=3,
            code=451,
            enhanced_code="4.7.1",
            message="greylisted, try again later ✓",
            host="mx1.x.example",
            ip="2001:db8::1",
            tls=True,
            tls_verified=False,
            first_attempt_at=at(-600.000001),
            last_attempt_at=at(1.5),
            next_attempt_at=at(300),
            possible_duplicate=True,
        )
        delivered = RecipientStatus(
            address="b@x.example",
            state=DELIVERED,
            attempts=1,
            code=250,
            tls=False,
            tls_verified=None,
            first_attempt_at=at(1),
            last_attempt_at=at(1),
        )
        await store.record("m1", [deferred, delivered], worker="w")
        status = await store.status("m1")
        assert status.recipients == (deferred, delivered)
        assert status.recipients[0].first_attempt_at == at(-600.000001)
        assert await store.next_due_at() == at(300)
        assert (
            await store.claim_due(now=at(299), worker="w", lease_until=at(999), limit=1)
            == []
        )
        [job] = await store.claim_due(
            now=at(300), worker="w2", lease_until=at(999), limit=1
        )
        assert job.recipients == (deferred,)

    async def test_raw_message_round_trip(self, store: Store) -> None:
        """``raw_message`` comes back byte for byte (every byte value, NUL too) from
        status(), claim_due() and messages(); a later status without it clears it,
        and so does cancel()."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        every_byte = bytes(range(256)) * 16  # 4 KiB, the most a reply keeps
        deferred = RecipientStatus(
            address="a@x.example",
            state=DEFERRED,
            attempts=1,
            code=451,
            enhanced_code="4.3.0",
            message=every_byte.decode("utf-8", "backslashreplace"),
            raw_message=every_byte,
            last_attempt_at=T0,
            next_attempt_at=at(300),
        )
        failed = RecipientStatus(
            address="b@x.example",
            state=FAILED,
            attempts=1,
            code=550,
            enhanced_code="5.1.1",
            message="Empf\\xe4nger unbekannt",
            raw_message=b"Empf\xe4nger unbekannt",
            last_attempt_at=T0,
        )
        await store.record("m1", [deferred, failed], worker="w")
        status = await store.status("m1")
        assert status.recipients == (deferred, failed)
        assert [r.message_bytes for r in status] == [
            every_byte,
            b"Empf\xe4nger unbekannt",
        ]
        [listed] = await store.messages()
        assert listed.recipients == (deferred, failed)
        [job] = await store.claim_due(
            now=at(300), worker="w", lease_until=at(360), limit=1
        )
        assert job.recipients == (deferred,)
        plain = RecipientStatus(
            address="a@x.example",
            state=DEFERRED,
            attempts=2,
            code=451,
            message="try again later",
            last_attempt_at=at(300),
            next_attempt_at=at(600),
        )
        await store.record("m1", [plain], worker="w")
        again = (await store.status("m1")).recipient("a@x.example")
        assert again.raw_message is None
        assert again.message_bytes == b"try again later"
        await store.record("m1", [deferred], worker="w")
        assert await store.cancel("m1") == 1
        cancelled = (await store.status("m1")).recipient("a@x.example")
        assert cancelled.message == "cancelled by operator"
        assert cancelled.raw_message is None

    async def test_record_matches_domain_case_insensitively(self, store: Store) -> None:
        """A status matches its recipient whatever the case of the domain; the
        stored address is kept."""
        await store.add(new_message("m1", "Alice@Example.COM"))
        await store.record("m1", [attempted("Alice@example.com", FAILED)], worker="w")
        [r] = (await store.status("m1")).recipients
        assert r.address == "Alice@Example.COM"
        assert r.state is FAILED
        assert (await store.status("m1")).is_done

    async def test_record_matches_local_part_exactly(self, store: Store) -> None:
        """Local parts are case-sensitive (RFC 5321 §2.4): a status for
        ``Bob@x.example`` never touches ``bob@x.example``, whatever the order the
        statuses come in, and a status for a local part in another case is ignored."""
        await store.add(
            new_message("m1", "Bob@x.example", "bob@x.example", "carol@x.example")
        )
        await store.record(
            "m1",
            [
                attempted("Bob@X.EXAMPLE", FAILED),
                attempted("bob@x.example", DELIVERED),
                attempted("CAROL@x.example", DELIVERED),
            ],
            worker="w",
        )
        status = await store.status("m1")
        assert [(r.address, r.state) for r in status] == [
            ("Bob@x.example", FAILED),
            ("bob@x.example", DELIVERED),
            ("carol@x.example", QUEUED),
        ]
        assert status.recipient("Bob@x.example").state is FAILED
        assert status.recipient("bob@X.Example").state is DELIVERED
        with pytest.raises(KeyError):
            status.recipient("BOB@x.example")

    async def test_domain_lookups_take_any_case_and_idn(self, store: Store) -> None:
        """hold(), messages() and summary() find a domain in any case, and an
        internationalised one by its Unicode form too (stored: its A-label)."""
        await store.add(new_message("m1", "a@xn--fa-hia.example", "b@Other.example"))
        assert await store.hold(domain="FAß.example") == 1
        assert await store.hold(domain="other.EXAMPLE") == 1
        [listed] = await store.messages(domain="Faß.Example", held=True)
        assert listed.message_id == "m1"
        summary = await store.summary()
        assert summary.by_domain == {
            (QUEUED, "xn--fa-hia.example"): 1,
            (QUEUED, "other.example"): 1,
        }

    async def test_release_matches_local_part_exactly(self, store: Store) -> None:
        """release() ends the lease of the recipient named (domain in any case),
        never of one whose local part differs only in case."""
        await store.add(new_message("m1", "Bob@x.example", "bob@x.example"))
        await store.claim_due(now=T0, worker="w", lease_until=at(60), limit=1)
        await store.release("m1", ["Bob@X.example"], worker="w")
        jobs = await store.claim_due(now=T0, worker="v", lease_until=at(60), limit=1)
        assert claimed_addresses(jobs) == [("m1", "Bob@x.example")]

    async def test_record_ignores_unknown_addresses(self, store: Store) -> None:
        """Statuses for addresses the message does not have are ignored."""
        await store.add(new_message("m1"))
        await store.record("m1", [attempted("x@else.example", DELIVERED)], worker="w")
        [r] = (await store.status("m1")).recipients
        assert r.state is QUEUED
        assert await store.add(new_message("m2")) == ("m2", True)

    async def test_record_unknown_message(self, store: Store) -> None:
        """record() for an unknown message raises UnknownMessageError."""
        with pytest.raises(UnknownMessageError):
            await store.record("nope", [attempted("a@x.example", FAILED)], worker="w")

    async def test_record_needs_next_attempt_for_unfinished(self, store: Store) -> None:
        """An unfinished status without next_attempt_at raises ValueError, writing nothing."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        with pytest.raises(ValueError, match="next_attempt_at"):
            await store.record(
                "m1",
                [
                    attempted("a@x.example", DELIVERED),
                    attempted("b@x.example", DEFERRED),
                ],
                worker="w",
            )
        assert all(r.state is QUEUED for r in await store.status("m1"))

    async def test_late_record_keeps_the_new_lease(self, store: Store) -> None:
        """A worker whose lease expired still writes its result, but not another's lease."""
        await store.add(new_message("m1"))
        await store.claim_due(now=T0, worker="a", lease_until=at(10), limit=1)
        await store.claim_due(now=at(10), worker="b", lease_until=at(70), limit=1)
        late = attempted("rcpt@example.com", DEFERRED, when=at(11), next_at=at(11))
        await store.record("m1", [late], worker="a")
        assert (await store.status("m1")).recipients == (late,)
        assert await store.next_due_at() == at(70)
        assert (
            await store.claim_due(now=at(69), worker="c", lease_until=at(99), limit=1)
            == []
        )

    async def test_final_state_is_never_undone(self, store: Store) -> None:
        """A final status is kept when a later record says unfinished; final replaces final."""
        await store.add(new_message("m1"))
        delivered = attempted("rcpt@example.com", DELIVERED, when=at(1))
        await store.record("m1", [delivered], worker="b")
        late = attempted("rcpt@example.com", DEFERRED, when=at(2), next_at=at(3))
        await store.record("m1", [late], worker="a")
        assert (await store.status("m1")).recipients == (delivered,)
        failed = attempted("rcpt@example.com", FAILED, when=at(4))
        await store.record("m1", [failed], worker="a")
        assert (await store.status("m1")).recipients == (failed,)
        assert await store.next_due_at() is None

    async def test_release(self, store: Store) -> None:
        """release() ends only the named worker's lease on the named recipients."""
        await store.add(new_message("m1", "a@x.example", "b@x.example"))
        await store.claim_due(now=T0, worker="a", lease_until=at(60), limit=1)
        await store.release("m1", ["a@x.example", "b@x.example"], worker="other")
        await store.release("m1", ["nobody@x.example"], worker="a")
        assert (
            await store.claim_due(now=T0, worker="b", lease_until=at(60), limit=1) == []
        )
        await store.release("m1", ["a@X.EXAMPLE"], worker="a")
        jobs = await store.claim_due(now=T0, worker="b", lease_until=at(60), limit=1)
        assert claimed_addresses(jobs) == [("m1", "a@x.example")]
        status = await store.status("m1")
        assert all(r.state is QUEUED and r.attempts == 0 for r in status)

    async def test_renew_leases(self, store: Store) -> None:
        """renew_leases() extends only the named worker's live leases."""
        await store.add(
            new_message("m1", "a@x.example"), claim_for="w", lease_until=at(10)
        )
        await store.add(
            new_message("m2", "b@x.example"), claim_for="v", lease_until=at(10)
        )
        await store.add(
            new_message("m3", "c@x.example"), claim_for="w", lease_until=at(10)
        )
        await store.release("m3", ["c@x.example"], worker="w")
        assert await store.renew_leases(worker="w", lease_until=at(100)) == 1
        jobs = await store.claim_due(
            now=at(50), worker="x", lease_until=at(60), limit=5
        )
        assert claimed_addresses(jobs) == [("m2", "b@x.example"), ("m3", "c@x.example")]
        assert await store.renew_leases(worker="nobody", lease_until=at(100)) == 0

    async def test_renew_leases_of_some_messages(self, store: Store) -> None:
        """renew_leases(message_ids=...) extends the worker's leases on those
        messages only; the others run out."""
        for mid, address in (("m1", "a@x.example"), ("m2", "b@x.example")):
            await store.add(
                new_message(mid, address), claim_for="w", lease_until=at(10)
            )
        renewed = await store.renew_leases(
            worker="w", lease_until=at(100), message_ids=["m2", "unknown"]
        )
        assert renewed == 1
        jobs = await store.claim_due(
            now=at(50), worker="x", lease_until=at(60), limit=5
        )
        assert claimed_addresses(jobs) == [("m1", "a@x.example")]
        assert (
            await store.renew_leases(worker="w", lease_until=at(200), message_ids=[])
            == 0
        )

    async def test_lease_owners(self, store: Store) -> None:
        """lease_owners() counts each owner's leased unfinished recipients, with
        its latest lease end, expired leases included."""
        assert await store.lease_owners() == {}
        await store.add(
            new_message("m1", "a@x.example", "b@x.example"),
            claim_for="w",
            lease_until=at(10),
        )
        await store.add(
            new_message("m2", "c@x.example"), claim_for="w", lease_until=at(30)
        )
        await store.add(
            new_message("m3", "d@x.example"), claim_for="v", lease_until=at(5)
        )
        await store.record("m1", [attempted("b@x.example", DELIVERED)], worker="w")
        owners = await store.lease_owners()
        assert owners == {
            "w": LeaseInfo(recipients=2, lease_until=at(30)),
            "v": LeaseInfo(recipients=1, lease_until=at(5)),
        }

    async def test_release_owner(self, store: Store) -> None:
        """release_owner() ends every lease of one owner at once, and nobody
        else's; the recipients are claimable again, unattempted."""
        await store.add(
            new_message("m1", "a@x.example", "b@x.example"),
            claim_for="dead",
            lease_until=at(3600),
        )
        await store.add(
            new_message("m2", "c@x.example"), claim_for="alive", lease_until=at(3600)
        )
        assert await store.release_owner("dead") == 2
        assert await store.release_owner("dead") == 0
        jobs = await store.claim_due(now=T0, worker="x", lease_until=at(60), limit=5)
        assert claimed_addresses(jobs) == [("m1", "a@x.example"), ("m1", "b@x.example")]
        assert all(r.attempts == 0 for job in jobs for r in job.recipients)
        assert set(await store.lease_owners()) == {"alive", "x"}

    async def test_release_unknown_message(self, store: Store) -> None:
        """release() of an unknown message does nothing."""
        await store.release("nope", ["a@x.example"], worker="w")

    # -- one message with very many recipients ----------------------------------
    # Correctness at a size where matching each status against every recipient
    # would be quadratic: 20,000 recipients, 20 of them twice (in other case).

    async def test_many_recipients_claim_and_status(self, store: Store) -> None:
        """A claim hands out every due recipient of a big message, in order."""
        addresses = _many_addresses()
        await store.add(new_message("big", *addresses))
        await store.add(new_message("small", "s@x.example", submitted_at=at(1)))
        [job] = await store.claim_due(
            now=at(1), worker="a", lease_until=at(60), limit=1
        )
        assert job.message_id == "big"
        assert [r.address for r in job.recipients] == addresses
        status = await store.status("big")
        assert [r.address for r in status] == addresses
        assert all(r.state is QUEUED for r in status)
        [job] = await store.claim_due(
            now=at(1), worker="b", lease_until=at(60), limit=5
        )
        assert job.message_id == "small"

    async def test_many_recipients_record_and_release(self, store: Store) -> None:
        """record() and release() on 20,000 recipients touch exactly the rows named.

        Matching ignores the case of the domain (not of the local part) and
        takes every duplicate; a final state stays
        final; only the calling worker's leases end.
        """
        addresses = _many_addresses()
        n = _MANY
        await store.add(new_message("big", *addresses))
        await store.claim_due(now=T0, worker="a", lease_until=at(60), limit=1)
        # Worker a: every even recipient delivered (its domain in upper case), and the
        # odd ones of the first half released.
        delivered = [
            attempted(f"r{i}@X{i % 7}.EXAMPLE", DELIVERED) for i in range(0, n, 2)
        ]
        await store.record("big", delivered, worker="a")
        await store.release(
            "big", [f"r{i}@x{i % 7}.example" for i in range(1, n // 2, 2)], worker="a"
        )
        status = await store.status("big")
        assert [r.address for r in status] == addresses
        for r in status:
            i = int(r.address[1:].partition("@")[0])
            assert r.state is (DELIVERED if i % 2 == 0 else QUEUED), r
        # The released ones, and only they, can be claimed by another worker.
        [job] = await store.claim_due(now=T0, worker="b", lease_until=at(60), limit=1)
        released = [f"r{i}@x{i % 7}.example" for i in range(1, n // 2, 2)]
        assert [r.address for r in job.recipients] == released
        # A late DEFERRED never undoes DELIVERED; b recording a's recipients
        # writes their status but leaves a's lease in place.
        late = [
            attempted(f"r{i}@x{i % 7}.example", DEFERRED, next_at=T0) for i in range(n)
        ]
        await store.record("big", late, worker="b")
        status = await store.status("big")
        for r in status:
            i = int(r.address[1:].partition("@")[0])
            assert r.state is (DELIVERED if i % 2 == 0 else DEFERRED), r
        # b's own leases ended with its record; a's (the second half) did not.
        [job] = await store.claim_due(now=T0, worker="c", lease_until=at(99), limit=1)
        assert [r.address for r in job.recipients] == released
        [job] = await store.claim_due(
            now=at(60), worker="d", lease_until=at(120), limit=1
        )
        assert [r.address for r in job.recipients] == [
            f"r{i}@x{i % 7}.example" for i in range(n // 2 + 1, n, 2)
        ]

    # -- queue views -------------------------------------------------------------

    async def test_next_due_at(self, store: Store) -> None:
        """next_due_at() is the earliest due time, counting a lease at its end."""
        assert await store.next_due_at() is None
        await store.add(new_message("m1", submitted_at=at(20)))
        await store.add(new_message("m2", submitted_at=at(10)))
        assert await store.next_due_at() == at(10)
        await store.claim_due(now=at(10), worker="w", lease_until=at(15), limit=1)
        assert await store.next_due_at() == at(15)
        await store.claim_due(now=at(20), worker="w", lease_until=at(25), limit=5)
        assert await store.next_due_at() == at(25)
        await store.record("m1", [attempted("rcpt@example.com", DELIVERED)], worker="w")
        assert await store.next_due_at() == at(25)
        await store.record("m2", [attempted("rcpt@example.com", FAILED)], worker="w")
        assert await store.next_due_at() is None

    async def test_next_due_at_lease_before_next_attempt(self, store: Store) -> None:
        """A lease ending before the next attempt does not make a recipient due early."""
        await store.add(new_message("m1", submitted_at=at(100)))
        await store.add(new_message("m2"), claim_for="w", lease_until=at(50))
        await store.record(
            "m2",
            [attempted("rcpt@example.com", DEFERRED, next_at=at(200))],
            worker="other",
        )
        assert await store.next_due_at() == at(100)

    async def test_summary(self, store: Store) -> None:
        """summary() counts every recipient by state and by (state, lower-cased domain)."""
        empty = await store.summary()
        assert empty.by_state == dict.fromkeys(RecipientState, 0)
        assert empty.by_domain == {}
        await store.add(new_message("m1", "a@X.example", "b@x.example", "c@y.example"))
        await store.add(new_message("m2", "d@y.example"))
        await store.record(
            "m1",
            [
                attempted("a@x.example", DELIVERED),
                attempted("c@y.example", DEFERRED, next_at=at(5)),
            ],
            worker="w",
        )
        await store.record("m2", [attempted("d@y.example", FAILED)], worker="w")
        summary = await store.summary()
        assert summary.by_state == {QUEUED: 1, DEFERRED: 1, DELIVERED: 1, FAILED: 1}
        assert summary.by_domain == {
            (DELIVERED, "x.example"): 1,
            (QUEUED, "x.example"): 1,
            (DEFERRED, "y.example"): 1,
            (FAILED, "y.example"): 1,
        }

    async def test_purge(self, store: Store) -> None:
        """purge() deletes finished messages whose last attempt is before the cut-off."""
        await store.add(new_message("old", "a@x.example", "b@x.example", key="k1"))
        await store.record(
            "old",
            [
                attempted("a@x.example", DELIVERED, when=at(5)),
                attempted("b@x.example", FAILED, when=at(9)),
            ],
            worker="w",
        )
        await store.add(new_message("recent"))
        await store.record(
            "recent",
            [attempted("rcpt@example.com", DELIVERED, when=at(20))],
            worker="w",
        )
        await store.add(new_message("open", "a@x.example", "b@x.example"))
        await store.record("open", [attempted("a@x.example", DELIVERED)], worker="w")
        never_tried = RecipientStatus(address="rcpt@example.com", state=FAILED)
        await store.add(new_message("rejected", submitted_at=at(1)))
        await store.record("rejected", [never_tried], worker="w")

        assert await store.purge(finished_before=at(9)) == 1  # only "rejected"
        assert await store.purge(finished_before=at(10)) == 1  # "old"
        assert await store.purge(finished_before=at(10)) == 0
        for gone in ("old", "rejected"):
            with pytest.raises(UnknownMessageError):
                await store.status(gone)
        assert (await store.status("recent")).is_done
        assert not (await store.status("open")).is_done
        assert await store.add(new_message("again", key="k1")) == ("again", True)
        summary = await store.summary()
        assert sum(summary.by_state.values()) == 4

    # -- queue operations --------------------------------------------------------

    async def test_messages_lists_unfinished_oldest_first(self, store: Store) -> None:
        """messages() lists messages with a QUEUED or DEFERRED recipient, oldest
        submitted first, each with all its recipients."""
        await store.add(new_message("late", "a@x.example", submitted_at=at(2)))
        await store.add(new_message("done", "b@y.example", submitted_at=at(0)))
        await store.add(
            new_message("early", "c@y.example", "d@X.example", submitted_at=at(1))
        )
        await store.record("done", [attempted("b@y.example", DELIVERED)], worker="w")
        await store.record(
            "early", [attempted("c@y.example", DEFERRED, next_at=at(9))], worker="w"
        )
        listed = await store.messages()
        assert [m.message_id for m in listed] == ["early", "late"]
        early = listed[0]
        assert early == await store.status("early")
        assert [r.state for r in early] == [DEFERRED, QUEUED]
        assert early.submitted_at == at(1)
        assert early.mail_from == "sender@example.org"

    async def test_messages_filters(self, store: Store) -> None:
        """messages() filters by state and by domain (case-insensitively), and
        stops at *limit*; ties in submission time keep the order of adding."""
        await store.add(new_message("m1", "a@x.example", "b@y.example"))
        await store.add(new_message("m2", "c@Y.example"))
        await store.add(new_message("m3", "d@z.example"))
        await store.record("m1", [attempted("a@x.example", FAILED)], worker="w")

        def ids(found: list[MessageStatus]) -> list[str]:
            return [m.message_id for m in found]

        assert ids(await store.messages()) == ["m1", "m2", "m3"]
        assert ids(await store.messages(domain="y.EXAMPLE")) == ["m1", "m2"]
        assert ids(await store.messages(domain="x.example")) == []
        assert ids(await store.messages(states=[FAILED])) == ["m1"]
        assert ids(await store.messages(states={FAILED}, domain="x.example")) == ["m1"]
        assert ids(await store.messages(states=[DELIVERED])) == []
        assert ids(await store.messages(states=[])) == []
        assert ids(await store.messages(limit=2)) == ["m1", "m2"]
        assert ids(await store.messages(domain="y.example", limit=1)) == ["m1"]
        with pytest.raises(ValueError, match="limit"):
            await store.messages(limit=0)

    async def test_retry_now(self, store: Store) -> None:
        """retry_now() makes waiting recipients due at *now* and counts them;
        recipients already due are neither changed nor counted."""
        await store.add(new_message("m1", "a@x.example", "b@y.example"))
        await store.add(new_message("m2", "c@x.example", submitted_at=at(500)))
        await store.record(
            "m1",
            [
                attempted("a@x.example", DEFERRED, next_at=at(300)),
                attempted("b@y.example", DEFERRED, next_at=at(5)),
            ],
            worker="w",
        )
        assert await store.retry_now(now=at(10)) == 2  # a@x and m2's c@x
        status = await store.status("m1")
        assert status.recipient("a@x.example").next_attempt_at == at(10)
        assert status.recipient("b@y.example").next_attempt_at == at(5)
        assert status.recipient("a@x.example").attempts == 1
        m2 = await store.status("m2")
        assert m2.recipients[0].next_attempt_at == at(10)
        jobs = await store.claim_due(
            now=at(10), worker="w", lease_until=at(60), limit=9
        )
        assert sorted(claimed_addresses(jobs)) == [
            ("m1", "a@x.example"),
            ("m1", "b@y.example"),
            ("m2", "c@x.example"),
        ]
        assert await store.retry_now(now=at(10)) == 0

    async def test_retry_now_filters(self, store: Store) -> None:
        """retry_now() narrows to one message and/or one domain (case-insensitive)."""
        for mid in ("m1", "m2"):
            await store.add(
                new_message(mid, "a@x.example", "b@Y.example", submitted_at=at(100))
            )
        assert await store.retry_now(now=at(1), domain="Y.EXAMPLE") == 2
        assert await store.retry_now(now=at(1), message_id="m1") == 1
        assert (
            await store.retry_now(now=at(0), message_id="m2", domain="x.example") == 1
        )
        m2 = await store.status("m2")
        assert [r.next_attempt_at for r in m2] == [at(0), at(1)]
        assert await store.retry_now(now=at(0), domain="nowhere.example") == 0
        with pytest.raises(UnknownMessageError) as info:
            await store.retry_now(now=at(0), message_id="nope")
        assert info.value.message_id == "nope"

    async def test_retry_now_skips_recipients_in_flight(self, store: Store) -> None:
        """A recipient leased at *now* is in flight and left alone; one whose lease
        has expired (its worker died) is made due like any other."""
        await store.add(new_message("m1"), claim_for="w", lease_until=at(50))
        await store.record(
            "m1",
            [attempted("rcpt@example.com", DEFERRED, next_at=at(300))],
            worker="other",  # w's lease stays
        )
        assert await store.retry_now(now=at(10)) == 0
        assert (await store.status("m1")).recipients[0].next_attempt_at == at(300)
        assert await store.retry_now(now=at(50)) == 1
        assert (await store.status("m1")).recipients[0].next_attempt_at == at(50)

    async def test_cancel(self, store: Store) -> None:
        """cancel() fails every unfinished recipient with a clear reason, keeping
        attempts and attempt times; finished recipients are untouched."""
        await store.add(
            new_message("m1", "a@x.example", "b@x.example", "c@x.example", key="k")
        )
        await store.record(
            "m1",
            [
                attempted("a@x.example", DELIVERED),
                attempted("b@x.example", DEFERRED, when=at(1), next_at=at(300)),
            ],
            worker="w",
        )
        assert await store.cancel("m1") == 2
        status = await store.status("m1")
        assert status.is_done
        delivered, deferred, queued = status.recipients
        assert delivered.state is DELIVERED
        assert deferred.state is FAILED
        assert deferred.message == "cancelled by operator"
        assert deferred.code is None
        assert deferred.enhanced_code is None
        assert deferred.attempts == 1
        assert deferred.last_attempt_at == at(1)
        assert deferred.next_attempt_at is None
        assert queued.state is FAILED
        assert queued.attempts == 0
        assert queued.message == "cancelled by operator"
        assert await store.cancel("m1") == 0
        assert (
            await store.claim_due(now=at(999), worker="w", lease_until=at(999), limit=9)
            == []
        )
        assert await store.next_due_at() is None
        assert await store.messages() == []
        assert [m.message_id for m in await store.messages(states=[FAILED])] == ["m1"]
        assert await store.purge(finished_before=at(2)) == 1

    async def test_cancel_unknown_message(self, store: Store) -> None:
        """cancel() of an unknown id raises UnknownMessageError naming it."""
        with pytest.raises(UnknownMessageError) as info:
            await store.cancel("nope")
        assert info.value.message_id == "nope"

    async def test_cancel_in_flight(self, store: Store) -> None:
        """A recipient in flight is cancelled too; its worker's late DEFERRED is
        ignored, but a late DELIVERED replaces FAILED: a server accepted it."""
        await store.add(
            new_message("m1", "a@x.example", "b@x.example"),
            claim_for="w",
            lease_until=at(60),
        )
        assert await store.cancel("m1") == 2
        assert await store.renew_leases(worker="w", lease_until=at(120)) == 0
        await store.record(
            "m1",
            [
                attempted("a@x.example", DELIVERED, when=at(3)),
                attempted("b@x.example", DEFERRED, when=at(3), next_at=at(300)),
            ],
            worker="w",
        )
        a, b = (await store.status("m1")).recipients
        assert a.state is DELIVERED
        assert a.last_attempt_at == at(3)
        assert b.state is FAILED
        assert b.message == "cancelled by operator"

    async def test_message_without_recipients(self, store: Store) -> None:
        """A message without recipients is done at once and purged by its submission time."""
        empty = NewMessage(
            message_id="m1", mail_from="", recipients=(), data=b"x", submitted_at=at(5)
        )
        await store.add(empty)
        status = await store.status("m1")
        assert status.recipients == ()
        assert status.is_done
        assert (
            await store.claim_due(now=at(9), worker="w", lease_until=at(60), limit=1)
            == []
        )
        assert await store.next_due_at() is None
        await store.record("m1", [attempted("a@x.example", FAILED)], worker="w")
        assert await store.purge(finished_before=at(5)) == 0
        assert await store.purge(finished_before=at(6)) == 1
