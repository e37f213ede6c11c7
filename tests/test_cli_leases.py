"""mailstrom-async leases: who holds the queue's mail, and releasing a dead worker's."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs
import pytest

from mailstrom_async._owner import current_owner
from mailstrom_async._store import NewMessage, SQLiteStore
from tests.cli_support import clean_env, cli_fixture  # noqa: F401 - fixtures

if TYPE_CHECKING:
    from tests.cli_support import CLI


def dead_owner() -> str:
    """The owner id of a process of this host that has exited."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as child:
        assert child.wait() == 0
    return str(attrs.evolve(current_owner(), pid=child.pid, start_time="1"))


def leased(path: Path, *owners: str) -> None:
    async def fill() -> None:
        now = datetime.now(UTC)
        async with SQLiteStore(path) as store:
            for n, owner in enumerate(owners):
                await store.add(
                    NewMessage(
                        message_id=f"m{n}@example.com",
                        mail_from="a@example.com",
                        recipients=(f"r{n}@example.org",),
                        data=b"Subject: x\r\n\r\nx\r\n",
                        submitted_at=now,
                    ),
                    claim_for=owner,
                    lease_until=now + timedelta(hours=1),
                )

    anyio.run(fill)


def test_leases_lists_and_releases_only_dead_owners(cli: CLI, tmp_path: Path) -> None:
    """leases shows every owner with its state; --release refuses a live or a
    foreign owner with one line; --release-dead frees only the dead one's mail."""
    path = tmp_path / "q.sqlite3"
    dead = dead_owner()
    alive = str(current_owner())  # this very process
    foreign = str(attrs.evolve(current_owner(), host="elsewhere"))
    leased(path, dead, alive, foreign)
    store = ["--store", str(path)]
    listing = json.loads(cli.ok("leases", "--json", *store))
    states = {o["owner"]: o["liveness"] for o in listing["owners"]}
    assert states == {dead: "dead", alive: "alive", foreign: "unknown"}
    assert all(o["recipients"] == 1 for o in listing["owners"])
    text = cli.ok("leases", *store)
    assert "dead" in text
    assert "elsewhere" in text
    for owner in (alive, foreign):
        code, out, err = cli("leases", "--release", owner, *store)
        assert code == 1
        assert "its leases are not broken" in err
        assert err.count("\n") == 1
    out = cli.ok("leases", "--release-dead", "--json", *store)
    result = json.loads(out)
    assert result["released"] == 1
    assert {o["owner"] for o in result["owners"]} == {alive, foreign}
    assert cli.ok("leases", "--release-dead", *store).startswith(
        "released 0 recipient(s)"
    )


def test_leases_of_an_empty_queue(cli: CLI, tmp_path: Path) -> None:
    """With no leases held, leases says so."""
    path = tmp_path / "q.sqlite3"
    leased(path)
    assert cli.ok("leases", "--store", str(path)) == "no leases held\n"


@pytest.mark.parametrize("flags", [["--release", "x", "--release-dead"]])
def test_leases_usage_errors(cli: CLI, tmp_path: Path, flags: list[str]) -> None:
    """--release and --release-dead together are a usage error."""
    path = tmp_path / "q.sqlite3"
    leased(path)
    code, _, err = cli("leases", *flags, "--store", str(path))
    assert code == 2
    assert "not allowed with" in err
