"""The books of the kill cycles: what was acknowledged, stored, accepted, recovered.

:func:`books` turns what the harness (:mod:`tests.kill_cycles`) saw into a
:class:`Report`; :meth:`Report.problems` is the verdict and :meth:`Report.summary`
the soak's printout. Times are unix times (the children and the server share the
host's clock).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.crash import Row

__all__ = ["Acceptance", "Cycle", "Key", "Report", "books"]

Key = tuple[str, str]  # (message id, recipient address)


@dataclass(frozen=True)
class Acceptance:
    """One 250 the server gave after a final dot."""

    key: Key
    cycle: int
    """The cycle whose child sent it (the number of cycles: the recovery run)."""
    at: float
    """Unix time of the 250."""
    stalled: bool


@dataclass
class Cycle:
    """One child's life: how it was killed, when, and what it left."""

    kind: str
    started_at: float = 0.0
    killed_at: float = 0.0
    acked: list[str] = field(default_factory=list)
    unfinished: set[Key] = field(default_factory=set)
    """Recipients not DELIVERED/FAILED in the file right after the kill."""


@dataclass
class Report:
    """What the kill cycles did and what they found; :meth:`problems` is the verdict."""

    seed: int
    cycles: list[Cycle]
    acked: list[str]
    stored: int
    lost: list[str]
    stuck: list[str]
    never_accepted: list[str]
    accepted: int
    stalled: int
    duplicates: dict[Key, list[Acceptance]]
    flagged: int
    """Recipients with extra copies whose message the store flags possible_duplicate."""
    flagged_total: int
    unexplained: dict[Key, list[Acceptance]]
    reply_lost: int
    killed_before_commit: list[float]
    """For each such extra copy: seconds from the server's 250 to the kill."""
    in_flight_at_last_kill: int
    dead_owners: int
    earliest_lease_end: float | None
    recovery: dict[str, float] | None
    recovery_error: str | None
    first_redelivery: dict[int, float | None]
    """Per restart (cycle index, or len(cycles) for the recovery run) that found
    unfinished mail: seconds from its start to the first 250 of such mail."""
    commit_windows: list[float]
    """Per delivery: seconds from the server's 250 to the DELIVERED event."""
    problems_found: list[str] = field(default_factory=list)

    @property
    def last_kill(self) -> float:
        return self.cycles[-1].killed_at

    def problems(self) -> list[str]:
        """Everything that breaks the promise; empty when the engine keeps it."""
        found = list(self.problems_found)
        if self.lost:
            found.append(f"{len(self.lost)} acknowledged ids lost: {self.lost[:5]}")
        if self.never_accepted:
            found.append(
                f"{len(self.never_accepted)} acknowledged ids never reached the "
                f"server: {self.never_accepted[:5]}"
            )
        if self.stuck:
            found.append(
                f"{len(self.stuck)} acknowledged ids not DELIVERED or FAILED after "
                f"the recovery run: {self.stuck[:5]}"
            )
        for key, copies in list(self.unexplained.items())[:5]:
            where = [(a.cycle, round(a.at - self.last_kill, 3)) for a in copies]
            found.append(
                f"{key} accepted {len(copies)} times, more than one of them after its "
                f"outcome was committed (cycle, time from the last kill): {where}"
            )
        if not self.in_flight_at_last_kill:
            found.append("nothing was in flight at the last kill: nothing to recover")
        if self.earliest_lease_end is None:
            found.append("the last child left no unexpired lease: reclaim not shown")
        elif self.recovery is not None:
            done = self.recovery["done"]
            if done >= self.earliest_lease_end:
                found.append(
                    f"the recovery ended {done - self.last_kill:.1f} s after the last "
                    f"kill, not before the dead owners' earliest lease end "
                    f"({self.earliest_lease_end - self.last_kill:.1f} s): the leases "
                    "expired, they were not reclaimed"
                )
        if self.recovery_error:
            found.append(self.recovery_error)
        return found

    def summary(self) -> str:
        kinds = Counter(c.kind for c in self.cycles)
        extra = sum(len(v) - 1 for v in self.duplicates.values())
        lines = [
            f"seed                {self.seed}",
            f"cycles              {len(self.cycles)} "
            f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
            f"acked               {len(self.acked)} "
            f"(stored {self.stored}; {self.stored - len(self.acked)} stored unacked)",
            f"lost                {len(self.lost)}",
            f"never accepted      {len(self.never_accepted)}",
            f"stuck               {len(self.stuck)}",
            f"accepted (250s)     {self.accepted} ({self.stalled} after a stall)",
            f"duplicates          {len(self.duplicates)} recipients, {extra} extra "
            f"copies ({self.reply_lost} reply lost in a stall, "
            f"{len(self.killed_before_commit)} killed between 250 and commit; "
            f"{len(self.unexplained)} unexplained); flagged possible_duplicate: "
            f"{self.flagged} of them ({self.flagged_total} messages in all)",
            f"in flight at kill   {self.in_flight_at_last_kill} recipients, "
            f"{self.dead_owners} dead lease owners",
        ]
        if self.killed_before_commit:
            gaps = self.killed_before_commit
            lines.append(
                f"  250 -> kill gap   median {_ms(statistics.median(gaps))}, "
                f"max {_ms(max(gaps))} (the outcome was not committed yet)"
            )
        if self.earliest_lease_end is not None:
            lines.append(
                "earliest lease end  "
                f"{self.earliest_lease_end - self.last_kill:.1f} s after the last kill"
            )
        if self.recovery is not None:
            r = self.recovery
            lines.append(
                f"recovery            {r['done'] - r['spawned']:.2f} s from the "
                f"restart ({r['done'] - r['ready']:.2f} s from the Deliverer "
                f"open; {r['done'] - self.last_kill:.2f} s after the last kill)"
            )
        else:
            lines.append(f"recovery            FAILED: {self.recovery_error}")
        final = self.first_redelivery.get(len(self.cycles))
        lines.append(
            "  first redelivery  "
            + (f"{final:.2f} s after the restart" if final is not None else "none")
        )
        per_cycle = [
            v for k, v in self.first_redelivery.items() if k < len(self.cycles)
        ]
        seen = [v for v in per_cycle if v is not None]
        lines.append(
            f"per restart         {len(per_cycle)} restarts found unfinished mail; "
            f"{len(seen)} re-sent some before their own kill"
            + (
                f", first after median {statistics.median(seen):.2f} s, "
                f"max {max(seen):.2f} s"
                if seen
                else ""
            )
        )
        if self.commit_windows:
            w = sorted(self.commit_windows)
            lines.append(
                f"duplicate window    250 -> committed (DELIVERED event): median "
                f"{_ms(statistics.median(w))}, p99 {_ms(w[int(len(w) * 0.99)])}, "
                f"max {_ms(w[-1])} over {len(w)} deliveries"
            )
        problems = self.problems()
        lines.append(f"verdict             {'OK' if not problems else 'FAILED'}")
        lines.extend(f"  - {p}" for p in problems)
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def books(
    *,
    seed: int,
    runs: list[Cycle],
    acked: list[str],
    final: dict[str, tuple[bool, bool]],
    stored: int,
    accepted: list[Acceptance],
    events: list[list[tuple[str, str, float]]],
    leases: list[Row],
    earliest: float | None,
    recovery: dict[str, float] | None,
    recovery_error: str | None,
    problems: list[str],
) -> Report:
    """Close the books.

    *final* maps each acked id the store knows to (done, flagged
    possible_duplicate); *events* are each run's DELIVERED events, in run order;
    *leases* are the unfinished rows still leased right after the last kill.
    """
    by_key: dict[Key, list[Acceptance]] = defaultdict(list)
    for a in accepted:
        by_key[a.key].append(a)
    accepted_ids = {k[0] for k in by_key}
    if len(set(acked)) != len(acked):
        problems.append("an id was acknowledged twice")
    duplicates = {k: v for k, v in by_key.items() if len(v) > 1}
    unexplained, reply_lost, before_commit = _explain(duplicates, runs)
    spawned = recovery["spawned"] if recovery is not None else None
    return Report(
        seed=seed,
        cycles=runs,
        acked=acked,
        stored=stored,
        lost=[i for i in acked if i not in final],
        stuck=[i for i in acked if i in final and not final[i][0]],
        never_accepted=[i for i in acked if i not in accepted_ids],
        accepted=len(accepted),
        stalled=sum(1 for a in accepted if a.stalled),
        duplicates=duplicates,
        flagged=sum(1 for k in duplicates if final.get(k[0], (False, False))[1]),
        flagged_total=sum(1 for _, flagged in final.values() if flagged),
        unexplained=unexplained,
        reply_lost=reply_lost,
        killed_before_commit=before_commit,
        in_flight_at_last_kill=len(runs[-1].unfinished),
        dead_owners=len({r.lease_owner for r in leases}),
        earliest_lease_end=earliest,
        recovery=recovery,
        recovery_error=recovery_error,
        first_redelivery=_first_redelivery(runs, accepted, spawned),
        commit_windows=_commit_windows(events, by_key),
        problems_found=problems,
    )


def _explain(
    duplicates: dict[Key, list[Acceptance]], runs: list[Cycle]
) -> tuple[dict[Key, list[Acceptance]], int, list[float]]:
    """Sort the extra copies: (unexplained, reply lost, 250 -> kill gaps).

    A copy is in the documented window when its child was killed with the
    recipient still unfinished in the file: the outcome of that transaction was
    never committed. At most one copy of a recipient may be outside the window
    (the one whose outcome was committed); a second one means the engine sent a
    recipient again after it had recorded it as delivered.
    """
    unexplained: dict[Key, list[Acceptance]] = {}
    reply_lost = 0
    before_commit: list[float] = []
    for key, copies in duplicates.items():
        window = [
            a for a in copies if a.cycle < len(runs) and key in runs[a.cycle].unfinished
        ]
        if len(copies) - len(window) > 1:
            unexplained[key] = copies
            continue
        extra = sorted(window, key=lambda a: a.at)
        if len(window) == len(copies):
            extra = extra[1:]  # none committed (then it is stuck): all but one
        for a in extra:
            gap = runs[a.cycle].killed_at - a.at
            if gap <= 0:  # the 250 came after the kill: the child never read it
                reply_lost += 1
            else:
                before_commit.append(gap)
    return unexplained, reply_lost, before_commit


def _first_redelivery(
    runs: list[Cycle], accepted: list[Acceptance], recovery_spawned: float | None
) -> dict[int, float | None]:
    """Per restart that found unfinished mail: seconds to the first 250 of it."""
    first: dict[int, float | None] = {}
    for index in range(1, len(runs) + 1):
        leftovers = runs[index - 1].unfinished
        if not leftovers:
            continue
        start = runs[index].started_at if index < len(runs) else recovery_spawned
        times = [a.at for a in accepted if a.cycle == index and a.key in leftovers]
        first[index] = min(times) - start if times and start else None
    return first


def _commit_windows(
    events: list[list[tuple[str, str, float]]],
    by_key: dict[Key, list[Acceptance]],
) -> list[float]:
    """Per DELIVERED event: seconds since the server's 250 to that run's child."""
    windows: list[float] = []
    for run, run_events in enumerate(events):
        for mid, address, at in run_events:
            mine = [a.at for a in by_key.get((mid, address), []) if a.cycle == run]
            mine = [t for t in mine if t <= at]
            if mine:
                windows.append(at - max(mine))
    return windows
