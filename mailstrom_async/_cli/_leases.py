"""Who holds the queue's leases, and releasing those of a worker that is gone."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._cli._common import (
    EXIT_OK,
    add_store_options,
    load_config,
    open_store,
    opened,
    print_json,
    table,
    timestamp,
)
from mailstrom_async._leases import (
    describe_owners,
    release_dead_owner,
    release_dead_owners,
)

if TYPE_CHECKING:
    from mailstrom_async._cli._common import Parser
    from mailstrom_async._leases import LeaseOwner

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the leases subcommand."""
    p = sub.add_parser(
        "leases",
        help="list the workers holding mail, or release a dead one's",
        description="List the workers that hold leases on waiting recipients, "
        "with how many, until when, and whether each still runs as far as this "
        "host can tell. A Deliverer that starts releases by itself the leases of "
        "workers of this host that are gone; --release does it now for one "
        "worker, --release-dead for every dead worker of this host. A live "
        "worker's leases, or those of a worker on another host (they run out by "
        "themselves, one lease duration after it stopped), are never broken.",
        epilog="examples:\n  mailstrom-async leases\n"
        "  mailstrom-async leases --release-dead\n"
        "  mailstrom-async leases --release 'mailstrom:v1/web-1/...'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--release", metavar="OWNER", help="release this owner's leases")
    what.add_argument(
        "--release-dead",
        action="store_true",
        help="release the leases of every owner of this host that is gone",
    )
    add_store_options(p)
    p.set_defaults(handler=_leases)


def _owner_json(owner: LeaseOwner) -> dict[str, object]:
    return {
        "owner": owner.owner,
        "recipients": owner.recipients,
        "lease_until": None
        if owner.lease_until is None
        else owner.lease_until.isoformat(),
        "host": owner.host,
        "pid": owner.pid,
        "liveness": owner.liveness.value,
        "reason": owner.liveness_reason,
    }


def _leases(args: argparse.Namespace) -> int:
    load_config(args)  # the same checks as every command
    store = open_store(args, create=False)

    async def run() -> tuple[list[LeaseOwner], int | None]:
        async with opened(store):
            released: int | None = None
            if args.release is not None:
                released = await release_dead_owner(store, args.release)
            elif args.release_dead:
                released = await release_dead_owners(store)
            return await describe_owners(store), released

    owners, released = anyio.run(run)
    if args.json:
        result: dict[str, object] = {"owners": [_owner_json(o) for o in owners]}
        if released is not None:
            result["released"] = released
        print_json(result)
        return EXIT_OK
    if released is not None:
        print(f"released {released} recipient(s)")
    if not owners:
        print("no leases held")
        return EXIT_OK
    print(
        table(
            ["OWNER", "RECIPIENTS", "UNTIL", "STATE", "WHY"],
            [
                (
                    o.owner,
                    o.recipients,
                    timestamp(o.lease_until),
                    o.liveness.value,
                    o.liveness_reason,
                )
                for o in owners
            ],
        )
    )
    return EXIT_OK
