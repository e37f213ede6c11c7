"""``queue``: the waiting mail, as Postfix's ``mailq`` and ``qshape`` show it.

- ``queue``: each message that still has waiting recipients (id, size, arrival,
  sender), then each of those recipients with its state and last reply, and a
  totals line, like ``mailq``.
- ``queue --shape``: waiting recipients counted by domain and age bucket, like
  ``qshape`` (counted by the store, in SQL: no message is loaded).
- ``queue --summary``: recipients counted by state and domain (what ``queue``
  printed before it listed messages).
- ``queue --list``: the older one-line-per-message listing, deprecated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli._common import (
    EXIT_OK,
    PROG,
    add_store_options,
    age,
    load_config,
    open_store,
    opened,
    print_json,
    recipient_json,
    reply_text,
    state_text,
    status_json,
    table,
    timestamp,
    utcnow,
)
from mailstrom_async._domain import domain_key
from mailstrom_async._models import RecipientState

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._models import MessageStatus, RecipientStatus
    from mailstrom_async._store import QueueShape, QueueSummary, Store

__all__ = ["SHAPE_MINUTES", "add_parser"]

_STATES = [s.value for s in RecipientState]
_WAITING = (RecipientState.QUEUED, RecipientState.DEFERRED)

#: qshape's age buckets: the upper end of each, in minutes; the last bucket
#: holds what is older than the last of these.
SHAPE_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the queue subcommand."""
    p = sub.add_parser(
        "queue",
        help="list waiting mail (like mailq); --shape counts it by domain and age "
        "(like qshape); --summary counts by state",
        description="List each message that still has recipients waiting, oldest "
        "first, like mailq: its id, size in bytes, arrival time (UTC) and sender, "
        "then each waiting recipient with its state ('(held)' when on hold), "
        "attempts and last reply (code, enhanced code, text; 'local:' for an "
        "outcome decided here), and a totals line. --shape counts waiting "
        "recipients by domain and by the age of their message in minutes, "
        "busiest domains first under a TOTAL row, like qshape. --summary counts "
        "every recipient by state and by domain. --state, --domain and --held "
        "choose the recipients (for the listing and --shape); --limit shows at "
        "most so many messages (with --shape: domains).",
        epilog="examples:\n  mailstrom-async queue\n"
        "  mailstrom-async queue --domain example.org --limit 20\n"
        "  mailstrom-async queue --state deferred --json\n"
        "  mailstrom-async queue --shape\n"
        "  mailstrom-async queue --shape --state deferred --limit 10\n"
        "  mailstrom-async queue --summary",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--shape",
        action="store_true",
        help="count waiting recipients by domain and age (like qshape)",
    )
    mode.add_argument(
        "--summary",
        action="store_true",
        help="count every recipient by state and domain, and the held ones",
    )
    mode.add_argument(
        "--list",
        action="store_true",
        help="deprecated: the older one-line-per-message listing",
    )
    p.add_argument(
        "--state",
        action="append",
        choices=_STATES,
        help="only recipients in this state (repeatable; default: queued and deferred)",
    )
    p.add_argument("--domain", help="only recipients of this domain")
    p.add_argument("--held", action="store_true", help="only recipients on hold")
    p.add_argument(
        "--limit",
        type=_positive_int,
        help="at most this many messages (with --shape: the busiest domains)",
    )
    add_store_options(p)
    p.set_defaults(handler=_queue, parser=p)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"must be a whole number of at least 1, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _queue(args: argparse.Namespace) -> int:
    filtered = args.state or args.domain or args.limit or args.held
    if args.summary and filtered:
        args.parser.error(
            "--state, --domain, --held and --limit do not go with --summary"
        )
    load_config(args)  # the same checks as every command, even if unused here
    store = open_store(args, create=False)
    states = tuple(RecipientState(s) for s in args.state or ()) or _WAITING
    held = True if args.held else None
    if args.summary:
        _print_summary(anyio.run(_summary, store), as_json=args.json)
    elif args.shape:
        shape = anyio.run(_shape, store, states, args.domain, held)
        _print_shape(shape, limit=args.limit, as_json=args.json)
    else:
        if args.list:
            _deprecated(as_json=args.json)
        messages, sizes = anyio.run(
            _listing, store, states, args.domain, args.limit, held
        )
        if args.list:
            _print_old_list(messages, as_json=args.json)
        else:
            wanted = _Wanted(states, args.domain, held)
            _print_listing(
                messages, sizes, wanted, filtered=bool(filtered), as_json=args.json
            )
    return EXIT_OK


async def _summary(store: Store) -> QueueSummary:
    async with opened(store):
        return await store.summary()


async def _shape(
    store: Store,
    states: tuple[RecipientState, ...],
    domain: str | None,
    held: bool | None,
) -> QueueShape:
    async with opened(store):
        return await store.shape(
            now=utcnow(),
            bounds=[60.0 * m for m in SHAPE_MINUTES],
            states=states,
            domain=domain,
            held=held,
        )


async def _listing(
    store: Store,
    states: tuple[RecipientState, ...],
    domain: str | None,
    limit: int | None,
    held: bool | None,
) -> tuple[list[MessageStatus], dict[str, int]]:
    async with opened(store):
        messages = await store.messages(
            states=states, domain=domain, limit=limit, held=held
        )
        sizes = await store.message_sizes([m.message_id for m in messages])
    return messages, sizes


def _deprecated(*, as_json: bool) -> None:
    text = (
        "'queue --list' is deprecated and will be removed: 'queue' lists the "
        "waiting messages now, with sizes and last replies"
    )
    if as_json:
        print(json.dumps({"warning": text}), file=sys.stderr, flush=True)
    else:
        print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


class _Wanted:
    """Which recipients of a listed message are shown: those the filters chose."""

    def __init__(
        self, states: tuple[RecipientState, ...], domain: str | None, held: bool | None
    ) -> None:
        self.states = frozenset(states)
        self.domain = None if domain is None else domain_key(domain)
        self.held = held

    def __call__(self, r: RecipientStatus) -> bool:
        return (
            r.state in self.states
            and (self.domain is None or r.domain == self.domain)
            and (self.held is None or r.held == self.held)
        )


def _tries(r: RecipientStatus) -> str:
    return (
        ""
        if not r.attempts
        else f"{r.attempts} {'try' if r.attempts == 1 else 'tries'}"
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _print_listing(
    messages: list[MessageStatus],
    sizes: dict[str, int],
    wanted: _Wanted,
    *,
    filtered: bool,
    as_json: bool,
) -> None:
    # A message purged between the two reads is gone: it is not listed.
    listed = [
        (m, [r for r in m if wanted(r)]) for m in messages if m.message_id in sizes
    ]
    total_bytes = sum(sizes[m.message_id] for m, _ in listed)
    by_state = Counter(r.state for _, rs in listed for r in rs)
    held = sum(r.held for _, rs in listed for r in rs)
    totals = {
        "messages": len(listed),
        "bytes": total_bytes,
        "recipients": by_state.total(),
        "by_state": {
            s.value: by_state[s] for s in RecipientState if s in wanted.states
        },
        "held": held,
    }
    if as_json:
        print_json(
            {
                "messages": [
                    {
                        **{
                            k: v for k, v in status_json(m).items() if k != "recipients"
                        },
                        "size": sizes[m.message_id],
                        "recipients": [recipient_json(r) for r in rs],
                    }
                    for m, rs in listed
                ],
                "totals": totals,
            }
        )
        return
    if not listed:
        print("no message matches" if filtered else "the queue is empty")
        return
    heads = table(
        ["ID", "SIZE", "ARRIVED", "SENDER"],
        [
            (
                m.message_id,
                sizes[m.message_id],
                timestamp(m.submitted_at),
                m.mail_from or "<>",
            )
            for m, _ in listed
        ],
    ).splitlines()
    print(heads[0])
    for line, (_, recipients) in zip(heads[1:], listed, strict=True):
        print(line)
        rows = table(
            ["", "", "", ""],
            [(r.address, state_text(r), _tries(r), reply_text(r)) for r in recipients],
        ).splitlines()[1:]
        for row in rows:
            print(f"    {row}")
        print()  # a blank line after each message, as mailq does
    counts = ", ".join(
        f"{by_state[s]} {s.value}" for s in RecipientState if s in wanted.states
    )
    print(
        f"-- {math.ceil(total_bytes / 1024)} Kbytes in {_plural(len(listed), 'message')}; "
        f"{_plural(by_state.total(), 'recipient')}: {counts}"
        + (f" ({held} held)" if held else "")
    )


def _print_shape(shape: QueueShape, *, limit: int | None, as_json: bool) -> None:
    rows = sorted(shape.by_domain.items(), key=lambda item: (-sum(item[1]), item[0]))
    rows = rows[:limit]
    total = shape.total()
    if as_json:
        print_json(
            {
                "bucket_minutes": list(SHAPE_MINUTES),
                "total": {"total": sum(total), "buckets": list(total)},
                "domains": [
                    {"domain": d, "total": sum(c), "buckets": list(c)} for d, c in rows
                ],
            }
        )
        return
    header = ["", "T", *(str(m) for m in SHAPE_MINUTES), f"{SHAPE_MINUTES[-1]}+"]
    cells = [header] + [
        [name, str(sum(counts)), *(str(c) for c in counts)]
        for name, counts in [("TOTAL", total), *rows]
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(
                cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )


def _print_old_list(messages: list[MessageStatus], *, as_json: bool) -> None:
    """The listing of ``queue --list`` (deprecated), exactly as before."""
    if as_json:
        print_json([status_json(m) for m in messages])
        return
    now = utcnow()
    print(
        table(
            ["ID", "AGE", "FROM", "RECIPIENTS"],
            [
                (
                    m.message_id,
                    age(m.submitted_at, now),
                    m.mail_from or "<>",
                    ", ".join(
                        f"{r.address} ({r.state.value}{', held' if r.held else ''})"
                        for r in m
                    ),
                )
                for m in messages
            ],
        )
    )
    held = sum(any(r.held for r in m) for m in messages)
    print(f"{len(messages)} message(s)" + (f", {held} with held mail" if held else ""))


def _print_summary(summary: QueueSummary, *, as_json: bool) -> None:
    """The counts of ``queue --summary`` (what ``queue`` printed before)."""
    domains: dict[str, Counter[RecipientState]] = {}
    for (state, domain), count in summary.by_domain.items():
        domains.setdefault(domain, Counter())[state] += count
    if as_json:
        print_json(
            {
                "by_state": {s.value: n for s, n in summary.by_state.items()},
                "by_domain": {
                    d: {s.value: c[s] for s in RecipientState}
                    for d, c in sorted(domains.items())
                },
                "held": summary.held,
                "held_by_domain": dict(sorted(summary.held_by_domain.items())),
            }
        )
        return
    order = sorted(
        domains.items(),
        key=lambda item: (
            -sum(item[1][s] for s in _WAITING),
            -item[1].total(),
            item[0],
        ),
    )
    states = list(RecipientState)
    print(
        table(
            ["DOMAIN", *(s.value.upper() for s in states), "TOTAL", "HELD"],
            [
                (
                    domain,
                    *(counts[s] for s in states),
                    counts.total(),
                    summary.held_by_domain.get(domain, 0),
                )
                for domain, counts in order
            ]
            + [
                (
                    "total",
                    *(summary.by_state[s] for s in states),
                    sum(summary.by_state.values()),
                    summary.held,
                )
            ],
        )
    )
