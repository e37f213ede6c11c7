"""Chaos: accepted mail ends DELIVERED or FAILED whatever the server and the store do.

The promise under test (issue "Unstoppable engine"): nothing a server or the store
does stops the Deliverer; a message that ``submit`` accepted is never lost and
never stuck. Each example runs a Deliverer (relay mode) against a
:class:`~tests.hostile_smtp.HostileSMTP` and a
:class:`~tests.chaos_store.FaultyStore` around a MemoryStore or a SQLiteStore:

1. faults on: several concurrent submitters submit N messages (several recipients
   each, some of which the server rejects), one by one or in batches, while the
   engine delivers; then the store makes a number of further calls;
2. faults off (both calm);
3. two more messages are submitted, then every handle is awaited, and every
   message that the store holds (a submit that failed may still have written it)
   must be done, within a liveness bound (:data:`LIVENESS`, a bound on "stuck",
   not a timing assertion).

Then, checked and reported together (with the seed, so that an example is
reproducible): the Deliverer did not crash; ``submit`` returned a handle or raised
an injected fault or a StoreError; every message is done; every DELIVERED
recipient was accepted by the server; none was accepted twice unless it is
flagged ``possible_duplicate`` or a store fault erased what the engine knew: a
DELIVERED outcome (the window between the server's 250 and the commit, DESIGN
§6) or the flag itself. A reply lost after the final dot (the other window) is
no excuse on its own: the engine saw it and must flag the recipient.

Budget: :data:`EXAMPLES` examples of :data:`MESSAGES` messages per store in CI;
``CHAOS_EXAMPLES`` / ``CHAOS_MESSAGES`` raise them locally. Faults come from
seeded random streams (one per store method, one per server connection), but
which call meets which fate also depends on timing: a seed reproduces the same
kind of run, not always the same bug.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aiosmtplib
import anyio
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from mailstrom_async import (
    Config,
    Limits,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    StoreError,
    Timeouts,
    prepare,
)
from mailstrom_async._deliverer import Deliverer, SubmitHandle
from mailstrom_async._exceptions import UnknownMessageError
from mailstrom_async._store import MemoryStore, NewMessage, SQLiteStore, Store
from tests.chaos_store import (
    ALL_KINDS,
    FaultyStore,
    InjectedFault,
    InjectedStoreError,
    When,
)
from tests.hostile_smtp import HostileSMTP, message_id_of, running_hostile_smtp

if TYPE_CHECKING:
    from mailstrom_async._models import MessageStatus

DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED

#: Examples per store kind (plus the explicit ones), and messages per example.
EXAMPLES = int(os.environ.get("CHAOS_EXAMPLES", "2"))
MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "120"))
#: Once calm, everything must be done within this many seconds: the bound that
#: turns "stuck" into a failure. Never reached by a working engine (a lease
#: lasts 1 s, retries come within 0.1 s).
LIVENESS = float(os.environ.get("CHAOS_LIVENESS", "15"))
#: The fault phase ends when every accepted recipient is final, or the store
#: made this many calls per message past the last submit, or after this many
#: seconds, whichever comes first.
FAULT_CALLS_PER_MESSAGE = 2
FAULT_PHASE_CAP = 1.0
#: Explicit examples (below) run first; a failing example is run again.
EXPLICIT = 5
#: For pytest-timeout: every example of a stuck engine may take LIVENESS.
TIMEOUT = max(60.0, (EXPLICIT + EXAMPLES + 1) * (LIVENESS + 5))

SENDER = "sender@chaos.test"
#: Examples share a tmp_path (and may share a seed): each gets its own file.
_RUNS = itertools.count()
CHAOS_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # A seed does not shrink: replay the failing one instead of searching.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """asyncio without its debug mode, for this module only.

    In debug mode asyncio records a stack trace for every callback it
    schedules; under pytest that is most of the time of a run with thousands of
    SMTP round trips. The rest of the suite keeps debug mode on.
    """
    return ("asyncio", {"debug": False})


probabilities = st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])


def chaos_config(port: int) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        # Quick retries, and no give-up during a run: once calm, every
        # recipient that was not refused for good gets DELIVERED.
        retry=RetryPolicy(initial_delay=0.01, jitter=0.2, max_delay=0.1),
        # A stall costs a timeout; the server's delays stay far below it. The
        # lease outlasts a job of a few stalls, so a job whose renewals fail
        # (store faults) keeps its recipients to itself.
        timeouts=Timeouts(connect=0.3, command=0.3, data_start=0.3, data_end=0.3),
        limits=Limits(connections_per_destination=8),
        lease_duration=1.0,
        poll_interval=0.05,
        shutdown_grace=1.0,
    )


def raw_message(message_id: str, recipients: list[str]) -> bytes:
    return (
        f"From: {SENDER}\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: chaos {message_id}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "\r\n"
        "Hello.\r\n"
        ".a line that starts with a dot\r\n"
    ).encode()


@dataclass
class Plan:
    """The messages of one example: Message-ID -> recipients, and batching."""

    messages: dict[str, list[str]]
    batches: list[list[str]]

    @classmethod
    def make(cls, rng: random.Random, count: int, tag: str) -> Plan:
        messages: dict[str, list[str]] = {}
        for n in range(count):
            recipients = [
                f"r{n}.{k}@dest{k % 2}.test" for k in range(rng.randint(1, 4))
            ]
            if rng.random() < 0.3:  # the server refuses these for good
                recipients.insert(
                    rng.randint(0, len(recipients)), f"reject{n}@dest0.test"
                )
            messages[f"m{n}.{tag}@chaos.test"] = recipients
        ids = list(messages)
        batches: list[list[str]] = []
        while ids:
            size = 1 if rng.random() < 0.7 else rng.randint(2, 5)
            batches.append(ids[:size])
            ids = ids[size:]
        return cls(messages, batches)


@dataclass
class Run:
    """What one example observed."""

    label: str
    accepted: dict[str, SubmitHandle] = field(default_factory=dict)
    refused: dict[str, BaseException] = field(default_factory=dict)
    """Message-ID -> what submit raised."""
    final: dict[str, MessageStatus] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    errors_logged: Counter[str] = field(default_factory=Counter)

    def violate(self, text: str) -> None:
        self.violations.append(text)


class _ErrorLog(logging.Handler):
    """Counts the engine's ERROR records by message and exception type."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.ERROR)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        detail = getattr(record, "error", None)
        if record.exc_info and record.exc_info[1] is not None:
            detail = type(record.exc_info[1]).__name__
        text = re.sub(r"#\d+", "#n", f"{record.getMessage()} [{detail}]")
        self.counts[text[:160]] += 1


@contextlib.contextmanager
def counting_errors(counts: Counter[str]) -> Iterator[None]:
    logger = logging.getLogger("mailstrom_async")
    handler = _ErrorLog(counts)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def describe(exc: BaseException) -> str:
    """An exception (group) as its leaf exceptions, each with where it was raised."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "mailstrom_async" in f.filename or "tests" in Path(f.filename).parts
    ]
    where = " <- ".join(
        f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:])
    )
    return f"{type(exc).__name__}: {str(exc)[:200]} at {where}"


def _submit_error_is_clear(exc: BaseException) -> bool:
    # An injected fault surfacing as itself, or the store's failure as a StoreError.
    return isinstance(exc, InjectedFault | StoreError)


async def _submit_batch(d: Deliverer, plan: Plan, batch: list[str], run: Run) -> None:
    try:
        if len(batch) == 1:
            [mid] = batch
            rcpts = plan.messages[mid]
            handles = [
                await d.submit(raw_message(mid, rcpts), mail_from=SENDER, rcpt_to=rcpts)
            ]
        else:
            prepared = [
                prepare(
                    raw_message(m, plan.messages[m]),
                    mail_from=SENDER,
                    rcpt_to=plan.messages[m],
                )
                for m in batch
            ]
            handles = await d.submit_many(prepared)
    except Exception as exc:
        for mid in batch:
            run.refused[mid] = exc
        if not _submit_error_is_clear(exc):
            run.violate(f"submit of {batch} raised an unclear error: {describe(exc)}")
        return
    for mid, handle in zip(batch, handles, strict=True):
        if handle.message_id != mid:
            run.violate(f"submit of {mid} returned a handle for {handle.message_id}")
        run.accepted[mid] = handle


async def _await_done(d: Deliverer, inner: Store, run: Run) -> None:
    """Await every accepted handle, then every message the store holds."""
    for mid, handle in run.accepted.items():
        try:
            run.final[mid] = await handle
        except Exception as exc:
            run.violate(f"awaiting accepted {mid} raised {describe(exc)}")
            return
    # A submit that failed may have written its message (a fault after add):
    # it was never acknowledged, but it must not be stuck in the queue either.
    for status in await inner.messages():
        try:
            run.final[status.message_id] = await SubmitHandle(
                d, status.message_id, created=False
            )
        except Exception as exc:
            run.violate(f"awaiting stored {status.message_id} raised {describe(exc)}")
            return


async def _report_stuck(inner: Store, run: Run) -> None:
    stuck = await inner.messages()
    lines = []
    for status in stuck[:5]:
        open_ = [r for r in status if not r.is_final]
        lines.append(
            f"{status.message_id}: "
            + ", ".join(
                f"{r.address} {r.state.value} attempts={r.attempts} "
                f"next={r.next_attempt_at}"
                for r in open_
            )
        )
    accepted_stuck = sum(1 for s in stuck if s.message_id in run.accepted)
    run.violate(
        f"stuck: {len(stuck)} messages ({accepted_stuck} accepted) not done "
        f"{LIVENESS} s after faults stopped; e.g. " + " | ".join(lines)
    )


async def _snapshot(inner: Store, ids: Iterable[str]) -> dict[str, MessageStatus]:
    """The status of every stored message among *ids*, read after the Deliverer
    closed the store (it keeps its contents), whatever state it was left in."""
    statuses: dict[str, MessageStatus] = {}
    await inner.open()
    try:
        for mid in ids:
            with contextlib.suppress(UnknownMessageError):
                statuses[mid] = await inner.status(mid)
    finally:
        await inner.aclose()
    return statuses


def _check_outcomes(
    run: Run,
    plan: Plan,
    server: HostileSMTP,
    faulty: FaultyStore,
    stored: dict[str, MessageStatus],
) -> None:
    """What the server got against what the store says (*stored*: every message
    it holds, done or not)."""
    for (mid, rcpt), count in server.accepted.items():
        if mid not in plan.messages:
            run.violate(f"the server accepted a message nobody submitted: {mid} {rcpt}")
        if rcpt.startswith("reject"):
            run.violate(f"harness: the server accepted a rejected address {rcpt}")
        if count < 2:
            continue
        status = stored.get(mid)
        flagged = status is not None and status.recipient(rcpt).possible_duplicate
        forgotten = (mid, rcpt) in faulty.lost_deliveries | faulty.lost_flags
        if not (flagged or forgotten):
            lost = (
                "a reply after the dot was lost"
                if (mid, rcpt) in server.unconfirmed
                else "no reply was lost"
            )
            state = status.recipient(rcpt).state.value if status else "not stored"
            run.violate(
                f"{mid} {rcpt} ({state}) accepted {count} times by the server, not "
                f"flagged possible_duplicate ({lost}), and the store forgot no "
                "outcome of it"
            )
    for mid, status in stored.items():
        for r in status:
            key = (mid, r.address.lower())
            if r.state is DELIVERED and server.accepted[key] < 1:
                run.violate(
                    f"{mid} {r.address} is DELIVERED but the server never accepted "
                    f"it (code {r.code}, {r.message!r:.80})"
                )
    for mid, status in run.final.items():
        for r in status:
            if not r.is_final:
                run.violate(f"{mid} {r.address} awaited, yet {r.state.value}")


def _check_calm_run(run: Run, plan: Plan, server: HostileSMTP) -> None:
    """Without any fault, everything is accepted and delivered exactly once."""
    if run.refused:
        run.violate(f"calm run, yet submit raised for {sorted(run.refused)[:3]}")
    for mid, rcpts in plan.messages.items():
        status = run.final.get(mid)
        if status is None:
            continue
        for address in rcpts:
            r = status.recipient(address)
            want = FAILED if address.startswith("reject") else DELIVERED
            count = server.accepted[(mid, address.lower())]
            if (
                r.state is not want
                or r.possible_duplicate
                or count != (want is DELIVERED)
            ):
                run.violate(
                    f"calm run: {mid} {address} ended {r.state.value} "
                    f"(duplicate flag {r.possible_duplicate}), accepted {count} times"
                )


async def run_chaos(
    store_kind: str,
    seed: int,
    store_p: float,
    server_p: float,
    tmp_path: Path,
    messages: int = MESSAGES,
    kinds: Sequence[type[InjectedFault]] = ALL_KINDS,
) -> Run:
    """One example: faults, calm, then wait for everything; returns what it saw."""
    label = f"store={store_kind!r}, seed={seed}, store_p={store_p}, server_p={server_p}"
    run = Run(label=label)
    rng = random.Random(seed)
    tag = f"{seed:x}.{rng.getrandbits(32):x}"
    inner: Store = (
        MemoryStore()
        if store_kind == "memory"
        else SQLiteStore(tmp_path / f"{tag}.{next(_RUNS)}.db")
    )
    faulty = FaultyStore(inner, rng=rng, probability=store_p, kinds=kinds)
    plan = Plan.make(rng, messages, tag)
    after_calm = Plan.make(rng, 2, f"{tag}.calm")
    async with running_hostile_smtp(seed=seed, probability=server_p) as server:
        with counting_errors(run.errors_logged):
            try:
                async with Deliverer(
                    chaos_config(server.port), store=faulty.store, rng=rng
                ) as d:
                    await _faults_then_calm(d, plan, after_calm, faulty, server, run)
                    with anyio.move_on_after(LIVENESS) as liveness:
                        await _await_done(d, inner, run)
                    if liveness.cancelled_caught:
                        await _report_stuck(inner, run)
            except Exception as exc:
                run.violate(f"the Deliverer crashed: {describe(exc)}")
        plan.messages.update(after_calm.messages)
        stored = await _snapshot(inner, plan.messages)
        _check_outcomes(run, plan, server, faulty, stored)
        if store_p == 0 and server_p == 0:
            _check_calm_run(run, plan, server)
    if run.violations:
        run.violations.append(
            f"[context] {len(run.accepted)} accepted, {len(run.refused)} refused; "
            f"store faults: {faulty.report()}; server: {server.report()}; "
            f"errors logged: {dict(run.errors_logged.most_common(8))}"
        )
    return run


async def _faults_then_calm(
    d: Deliverer,
    plan: Plan,
    after_calm: Plan,
    faulty: FaultyStore,
    server: HostileSMTP,
    run: Run,
) -> None:
    batches = iter(plan.batches)

    async def submitter() -> None:
        for batch in batches:  # shared: four submitters take turns
            await _submit_batch(d, plan, batch, run)

    async with d.events() as events:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(submitter)
        # Faults go on for a while: until every accepted recipient is final,
        # or the store (called by the scheduler, the lanes, the lease renewer)
        # made so many more calls, or the cap.
        expected = {
            (mid, address.lower())
            for mid in run.accepted
            for address in plan.messages[mid]
        }
        calls = faulty.calls.value + FAULT_CALLS_PER_MESSAGE * len(plan.messages)
        with anyio.move_on_after(FAULT_PHASE_CAP):
            async with anyio.create_task_group() as tg:

                async def storm_over() -> None:
                    await faulty.calls.wait_for(calls)
                    tg.cancel_scope.cancel()

                tg.start_soon(storm_over)
                async for event in events:
                    if event.recipient.is_final:
                        expected.discard((event.message_id, event.address.lower()))
                        if not expected:
                            break
                tg.cancel_scope.cancel()
    faulty.calm()
    server.calm()
    # The engine still takes mail once the storm is over.
    for batch in after_calm.batches:
        await _submit_batch(d, after_calm, batch, run)
        for mid in batch:
            if mid in run.refused:
                run.violate(f"submit after calm raised {describe(run.refused[mid])}")


def assert_no_violations(run: Run) -> None:
    assert not run.violations, f"{run.label}:\n  " + "\n  ".join(run.violations)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
@CHAOS_SETTINGS
@given(seed=seeds, store_p=probabilities, server_p=probabilities)
@example(seed=0, store_p=0.0, server_p=0.0)
@example(seed=1, store_p=0.0, server_p=0.3)
@example(seed=2, store_p=0.3, server_p=0.0)
@example(seed=3, store_p=0.2, server_p=0.2)
# An engine that releases a lease after a record that failed (but was written)
# releases the newer claim of the same recipients: sent twice (sqlite, ~1 in 4).
@example(seed=13982, store_p=0.2, server_p=0.2)
async def test_accepted_mail_ends_delivered_or_failed_under_faults(
    store_kind: str, seed: int, store_p: float, server_p: float, tmp_path: Path
) -> None:
    """Store and server faults, then calm: every accepted message is done, every
    DELIVERED recipient was accepted, duplicates only where the protocol allows."""
    run = await run_chaos(store_kind, seed, store_p, server_p, tmp_path)
    assert_no_violations(run)


# -- the harness itself ------------------------------------------------------------


async def test_hostile_server_when_calm_is_a_correct_server() -> None:
    """Raw aiosmtplib against the calm server: delivered, counted once, the
    rejected address refused with 550, RSET/NOOP/QUIT answered."""
    async with running_hostile_smtp(seed=7, probability=1.0) as server:
        server.calm()
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=server.port, timeout=5
        ) as client:
            for n in range(3):
                data = raw_message(f"calm{n}@chaos.test", ["a@x.test"])
                errors, reply = await client.sendmail(
                    SENDER, ["a@x.test", "b@x.test", "reject@x.test"], data
                )
                assert reply.startswith("2.0.0")
                assert set(errors) == {"reject@x.test"}
                assert errors["reject@x.test"].code == 550
            assert (await client.noop()).code == 250
            assert (await client.rset()).code == 250
            assert "8bitmime" in client.esmtp_extensions
    assert server.accepted == Counter(
        {
            (f"calm{n}@chaos.test", r): 1
            for n in range(3)
            for r in ("a@x.test", "b@x.test")
        }
    )
    assert server.unconfirmed == set()
    assert server.faults == Counter()
    assert server.transactions == 3


async def test_hostile_server_books_every_acceptance() -> None:
    """Raw aiosmtplib against the raging server: faults of many kinds happen;
    every sendmail that succeeded was counted as accepted, and every acceptance
    the client did not see is booked as unconfirmed."""
    seen_ok: Counter[tuple[str, str]] = Counter()
    errors: Counter[str] = Counter()
    async with running_hostile_smtp(
        seed=11, probability=0.3, max_delay=0.002
    ) as server:
        for n in range(80):
            mid = f"raw{n}@chaos.test"
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=server.port, timeout=0.2
                ) as client:
                    refused, _ = await client.sendmail(
                        SENDER, ["a@x.test"], raw_message(mid, ["a@x.test"])
                    )
                    if not refused:
                        seen_ok[(mid, "a@x.test")] += 1
            except aiosmtplib.SMTPDataError as exc:
                if 200 <= exc.code < 300:  # a 251 after the dot: aiosmtplib wants 250
                    seen_ok[(mid, "a@x.test")] += 1
                errors[type(exc).__name__] += 1
            except (aiosmtplib.SMTPException, OSError) as exc:
                errors[type(exc).__name__] += 1
    assert len(errors) >= 3, errors  # refusals, garbage, disconnects, timeouts
    kinds = {k.split("/")[1] for k in server.faults}
    assert {"code", "text", "hangup", "garbage", "delay"} <= kinds, server.faults
    assert any(k.startswith("dot/") for k in server.faults), server.faults
    for key in seen_ok:
        assert server.accepted[key] == 1, key
    for key in server.accepted:
        assert key in seen_ok or key in server.unconfirmed, key
    assert message_id_of(raw_message("x@y.test", ["a@x.test"])) == "x@y.test"


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
async def test_faulty_store_faults_before_and_after(
    store_kind: str, tmp_path: Path
) -> None:
    """With probability 1 every call faults, before (nothing written) or after
    (written); every kind occurs; calm() passes through; it is a Store."""
    inner: Store = (
        MemoryStore() if store_kind == "memory" else SQLiteStore(tmp_path / "q.db")
    )
    faulty = FaultyStore(inner, rng=random.Random(5), probability=1.0)
    assert isinstance(faulty, Store)
    await faulty.open()  # passes through
    try:
        written = 0
        seen: set[tuple[When, type[InjectedFault]]] = set()
        for n in range(60):
            mid = f"f{n}"
            with pytest.raises(InjectedFault) as info:
                await faulty.add(new_message(mid))
            fault = faulty.faults[-1]
            assert isinstance(info.value, fault.kind)
            seen.add((fault.when, fault.kind))
            try:
                await inner.status(mid)
            except UnknownMessageError:
                assert fault.when is When.BEFORE
            else:
                assert fault.when is When.AFTER
                written += 1
        assert {(w, k) for w in When for k in ALL_KINDS} == seen
        assert 0 < written < 60
        assert isinstance(faulty.faults[0].kind("x"), StoreError) == (
            faulty.faults[0].kind is InjectedStoreError
        )
        faulty.calm()
        await faulty.add(new_message("calm"))
        assert (await faulty.status("calm")).message_id == "calm"
        assert faulty.per_method["add"] == 61
    finally:
        await faulty.aclose()


def new_message(message_id: str) -> NewMessage:
    return NewMessage(
        message_id=message_id,
        mail_from=SENDER,
        recipients=("a@x.test",),
        data=raw_message(message_id, ["a@x.test"]),
        submitted_at=datetime.now(UTC),
    )
