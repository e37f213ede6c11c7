"""Kill cycles: SIGKILL a delivering process again and again, then check the books.

One harness for the test suite (20 cycles) and for ``nox -s soak`` (200; run
this module as a script: ``python -m tests.kill_cycles --cycles N``).

Each cycle starts ``python -m tests.crash_child cycle`` on the same SQLite file
with the DEFAULT configuration (only the relay and the store are set): a
Deliverer in mode "both" submitting in a loop and acknowledging each id. The parent SIGKILLs it
at a moment picked by a seeded plan, one of

* ``random``: a random delay after the start (some land during start-up);
* ``mid-data``: as soon as the server holds a message of this child after its
  final dot and stalls before its 250;
* ``after-250``: right after the server wrote its 250 for the child's n-th
  message, before the child can commit that outcome (the duplicate window).

The last cycle is always ``mid-data``, so something is in flight at the end. A
last process (``recover``, mode "deliver", default configuration) then runs
until every acknowledged message is done.

The server is aiosmtpd in the parent's loop (:class:`KillServerHandler`). It
counts each 250 after the dot per (Message-ID, recipient), and for a fraction of
messages it stalls 0.2-1 s before that 250. A stalled message counts as accepted
when the stall ends even if its client is dead by then: a real MTA queues the
message before it replies (Postfix commits the queue file, then says 250), so a
lost reply is a message the server has.

The books (:class:`tests.kill_books.Report`): nothing acknowledged is lost (every acked id is in
the store after its cycle's kill, ends DELIVERED or FAILED, and the server
accepted it); each extra copy the server accepted is explained by the documented
window, i.e. it came from a killed child whose store did not record it as done
when that child died; and the recovery after the last kill ends before the
earliest lease the dead children left in the file would have expired, which
only a reclaim of the dead owners' leases can do (a logical bound, not a speed
limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from mailstrom_async._store import SQLiteStore
from tests.crash import (
    DEADLINE,
    Child,
    Row,
    message_id_of,
    read_recipients,
    running_child,
)
from tests.kill_books import Acceptance, Cycle, Key, Report, books
from tests.smtpd import FaultHandler, running_smtpd

__all__ = [
    "KIND_AFTER_250",
    "KIND_MID_DATA",
    "KIND_RANDOM",
    "KillServerHandler",
    "main",
    "plan",
    "run_kill_cycles",
]

KIND_RANDOM = "random"
KIND_MID_DATA = "mid-data"
KIND_AFTER_250 = "after-250"
#: A random kill lands this long after the child's start (start-up takes ~0.4 s).
RANDOM_KILL = (0.05, 1.2)
#: The after-250 kill hits the child's n-th 250 for n in this range.
NTH_250 = (1, 8)
#: When the recovery run is stopped if it has not finished: a guard against a
#: hang (today's 900 s lease), never reached when the engine reclaims at once.
RECOVERY_GUARD = 20.0


@dataclass
class KillServerHandler(FaultHandler):
    """Accepts everything, stalls some messages before the 250, kills on cue."""

    rng: random.Random = field(default_factory=random.Random)
    stall_fraction: float = 0.2
    stall_range: tuple[float, float] = (0.2, 1.0)
    cycle: int = 0
    """The cycle of the child that connects from now on."""
    accepted: list[Acceptance] = field(default_factory=list)
    _cycle_of: weakref.WeakKeyDictionary[Any, int] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _armed: tuple[str, int, Callable[[], None]] | None = None
    _pending: int = 0
    _settled: asyncio.Event = field(default_factory=asyncio.Event)

    def arm(self, kind: str, fire: Callable[[], None], *, nth: int = 1) -> None:
        """Call *fire* (once) at the moment *kind* names, for the current cycle."""
        self._armed = (kind, nth, fire)

    def disarm(self) -> None:
        self._armed = None

    async def settled(self) -> None:
        """Wait until no stalled message is waiting for its 250."""
        if self._pending:
            self._settled.clear()
            await self._settled.wait()

    def _due(self, kind: str, cycle: int) -> Callable[[], None] | None:
        """The kill to make now, if this *kind* of moment is the armed one."""
        if self._armed is None or cycle != self.cycle or self._armed[0] != kind:
            return None
        _, nth, fire = self._armed
        if nth > 1:
            self._armed = (kind, nth - 1, fire)
            return None
        self._armed = None
        return fire

    def _accept(self, keys: list[Key], cycle: int, done: asyncio.Future[None]) -> None:
        now = time.time()
        self.accepted.extend(Acceptance(k, cycle, now, stalled=True) for k in keys)
        self._pending -= 1
        if not self._pending:
            self._settled.set()
        if not done.done():  # the handler is gone if its client died meanwhile
            done.set_result(None)

    async def handle_EHLO(  # noqa: N802 - aiosmtpd hook name
        self,
        server: Any,
        session: Any,
        envelope: Any,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self._cycle_of[session] = self.cycle
        return await super().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        cycle = self._cycle_of.get(session, -1)
        mid = message_id_of(envelope.original_content)
        keys = [(mid, rcpt) for rcpt in envelope.rcpt_tos]
        if self.rng.random() < self.stall_fraction:
            if (fire := self._due(KIND_MID_DATA, cycle)) is not None:
                fire()
            # Not a sleep of this handler's: the 250 is due even if
            # connection_lost cancels the handler (see the module docstring).
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            self._pending += 1
            delay = self.rng.uniform(*self.stall_range)
            loop.call_later(delay, self._accept, keys, cycle, done)
            await done
        else:
            now = time.time()
            self.accepted.extend(Acceptance(k, cycle, now, stalled=False) for k in keys)
        reply = "250 2.0.0 OK"
        if (fire := self._due(KIND_AFTER_250, cycle)) is not None:
            await server.push(reply)  # the 250 is on the wire: kill before the commit
            fire()
            await self.release.wait()  # connection_lost cancels this task
        return reply


def plan(cycles: int, rng: random.Random) -> list[str]:
    """The kill kinds, a fair mix in a random order, ending with ``mid-data``."""
    kinds = [KIND_RANDOM, KIND_MID_DATA, KIND_AFTER_250] * math.ceil(cycles / 3)
    rng.shuffle(kinds)
    return [*kinds[: cycles - 1], KIND_MID_DATA][-cycles:]


def _child_env(lease_duration: float | None) -> dict[str, str] | None:
    if lease_duration is None:
        return None
    return {**os.environ, "CRASH_LEASE_DURATION": repr(lease_duration)}


async def _one_cycle(
    cycle: Cycle,
    index: int,
    *,
    db: Path,
    port: int,
    handler: KillServerHandler,
    rng: random.Random,
    env: dict[str, str] | None,
) -> Child:
    handler.cycle = index
    fired = anyio.Event()
    cycle.started_at = time.time()
    async with running_child(
        "cycle", db, port, name=f"cycle-{index:03d}", env=env
    ) as child:

        def fire() -> None:
            cycle.killed_at = time.time()
            child.kill_now()
            fired.set()

        if cycle.kind == KIND_RANDOM:
            await anyio.sleep(rng.uniform(*RANDOM_KILL))
            await child.check_alive()
            fire()
        else:
            handler.arm(cycle.kind, fire, nth=rng.randint(*NTH_250))
            with anyio.move_on_after(DEADLINE):
                await fired.wait()
            handler.disarm()
            if not fired.is_set():
                await child.check_alive()
                msg = f"cycle {index}: the {cycle.kind} moment never came"
                raise AssertionError(msg)
    if child.process.returncode != -signal.SIGKILL:
        await child.check_alive()
    return child


async def run_kill_cycles(
    directory: Path,
    *,
    cycles: int,
    seed: int,
    lease_duration: float | None = None,
    stall_fraction: float = 0.2,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run *cycles* kill cycles and a recovery in *directory*; see the module doc.

    ``lease_duration`` (None: the default configuration) is for checking the
    harness locally only.
    """
    rng = random.Random(seed)
    handler = KillServerHandler(
        rng=random.Random(seed + 1), stall_fraction=stall_fraction
    )
    db = directory / "queue.sqlite3"
    env = _child_env(lease_duration)
    runs = [Cycle(kind) for kind in plan(cycles, rng)]
    problems: list[str] = []
    acked: list[str] = []
    children: list[Child] = []
    rows: dict[Key, Row] = {}
    async with running_smtpd(handler) as server:
        for index, cycle in enumerate(runs):
            child = await _one_cycle(
                cycle, index, db=db, port=server.port, handler=handler, rng=rng, env=env
            )
            children.append(child)
            cycle.acked = await child.acked()
            acked.extend(cycle.acked)
            rows = await read_recipients(db)
            stored = {k[0] for k in rows}
            missing = [i for i in cycle.acked if i not in stored]
            if missing:
                problems.append(
                    f"cycle {index} ({cycle.kind}): {len(missing)} acked ids not in "
                    f"the store after the kill: {missing[:5]}"
                )
            cycle.unfinished = {k for k, r in rows.items() if not r.is_final}
            if progress is not None:
                progress(
                    f"cycle {index:3d} {cycle.kind:9s} acked {len(cycle.acked):4d}"
                    f" unfinished {len(cycle.unfinished):4d}"
                )
        last_kill = runs[-1].killed_at
        leases = [
            r
            for r in rows.values()
            if not r.is_final
            and r.lease_owner is not None
            and r.lease_until is not None
            and r.lease_until > last_kill
        ]
        earliest = min((r.lease_until for r in leases if r.lease_until), default=None)

        handler.cycle = len(runs)
        recovery, recovery_error = await _recover(
            db, server.port, acked, env=env, children=children
        )
        if recovery_error and earliest is not None:
            recovery_error += (
                f"; the dead owners' leases end {earliest - last_kill:.0f} s after "
                "the last kill"
            )
        await handler.settled()  # the 250s of stalls whose clients died

    final = await _final_states(db, acked)
    return books(
        seed=seed,
        runs=runs,
        acked=acked,
        final=final,
        stored=len({k[0] for k in (await read_recipients(db))}),
        accepted=handler.accepted,
        events=[await c.delivered_events() for c in children],
        leases=leases,
        earliest=earliest,
        recovery=recovery,
        recovery_error=recovery_error,
        problems=problems,
    )


async def _recover(
    db: Path,
    port: int,
    acked: list[str],
    *,
    env: dict[str, str] | None,
    children: list[Child],
) -> tuple[dict[str, float] | None, str | None]:
    """Run a fresh process that only delivers until every acked id is done.

    Returns its timings (unix times: ``spawned``, ``ready`` when its Deliverer
    was open, ``done``) or why it did not finish.
    """
    await anyio.Path(db.parent / "recover.todo").write_text("\n".join(acked) + "\n")
    spawned = time.time()
    async with running_child("recover", db, port, name="recover", env=env) as child:
        children.append(child)
        with anyio.move_on_after(RECOVERY_GUARD):
            await child.process.wait()
        code = child.process.returncode
        if code is None:
            return (
                None,
                f"the recovery run had not finished {RECOVERY_GUARD:.0f} s after its start",
            )
        if code != 0:
            return None, f"the recovery run exited with {code}: {await child.stderr()}"
        report = await anyio.Path(child.prefix.with_suffix(".report")).read_text()
        return {"spawned": spawned, **json.loads(report)}, None


async def _final_states(db: Path, ids: Sequence[str]) -> dict[str, tuple[bool, bool]]:
    """Per id: (done, any recipient flagged possible_duplicate), read by the store."""
    out: dict[str, tuple[bool, bool]] = {}
    async with SQLiteStore(db) as store:
        for i in ids:
            try:
                status = await store.status(i)
            except LookupError:
                continue
            out[i] = (status.is_done, any(r.possible_duplicate for r in status))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.kill_cycles``: the soak; exit status 1 on any problem."""
    parser = argparse.ArgumentParser(
        prog="nox -s soak --", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=None,
        help="override lease_duration in the children (harness check only)",
    )
    parser.add_argument("--stall-fraction", type=float, default=0.2)
    parser.add_argument("--quiet", action="store_true", help="no line per cycle")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="keep the files here (default: a temp dir)",
    )
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    seed = (
        args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    )

    def say(line: str) -> None:
        print(line, flush=True)

    with contextlib.ExitStack() as stack:
        if args.dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-"))
            directory = Path(tmp)
        else:
            directory = args.dir
            directory.mkdir(parents=True, exist_ok=True)
        run = functools.partial(
            run_kill_cycles,
            directory,
            cycles=args.cycles,
            seed=seed,
            lease_duration=args.lease_duration,
            stall_fraction=args.stall_fraction,
            progress=None if args.quiet else say,
        )
        report = anyio.run(run)
    print(report.summary())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
