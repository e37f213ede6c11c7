"""Owner ids say which process on which host holds a lease, and whether it lives."""

from __future__ import annotations

import logging
import os
import sys

import anyio
import attrs
import pytest

from mailstrom_async import Liveness
from mailstrom_async._leases import FailureLog
from mailstrom_async._owner import OwnerId, current_owner, liveness


def test_owner_id_round_trips() -> None:
    """An owner id parses back into the parts it was made of."""
    me = current_owner()
    assert OwnerId.parse(str(me)) == me
    assert me.pid == os.getpid()
    assert str(me).startswith("mailstrom:v1/")


@pytest.mark.parametrize(
    "text", ["", "host:123:abcd", "mailstrom:v1/a/b/c/notapid/e/f", "mailstrom:v1/a"]
)
def test_foreign_owner_ids_are_unknown(text: str) -> None:
    """An id of another form (an older version, hand-made) is never judged dead."""
    assert OwnerId.parse(text) is None
    assert liveness(text) is Liveness.UNKNOWN


def test_this_process_is_alive() -> None:
    """Another Deliverer of this very process is alive."""
    assert liveness(str(current_owner())) is Liveness.ALIVE


async def test_an_exited_process_is_dead_and_a_reused_pid_too() -> None:
    """A pid with no process is dead; so is a live pid whose start time differs
    (the pid was reused), while the same pid with its own start time lives."""
    async with await anyio.open_process([sys.executable, "-c", "pass"]) as child:
        await child.wait()
    gone = attrs.evolve(current_owner(), pid=child.pid)
    me = current_owner()
    reused = attrs.evolve(me, start_time=str(int(me.start_time) + 1))
    # liveness() reads /proc: off the event loop, as the engine calls it.
    assert await anyio.to_thread.run_sync(liveness, str(gone)) is Liveness.DEAD
    assert await anyio.to_thread.run_sync(liveness, str(reused)) is Liveness.DEAD


def test_other_hosts_and_namespaces_are_unknown_and_a_reboot_is_dead() -> None:
    """Another host or PID namespace cannot be checked; a new boot id means the
    owner's process died with the old boot."""
    me = current_owner()
    assert liveness(str(attrs.evolve(me, host="elsewhere")), here=me) is (
        Liveness.UNKNOWN
    )
    other_ns = attrs.evolve(me, pid_namespace="1", pid=1)
    assert liveness(str(other_ns), here=me) is Liveness.UNKNOWN
    rebooted = attrs.evolve(me, boot_id="00000000-old-boot")
    assert liveness(str(rebooted), here=me) is Liveness.DEAD


def test_failure_log_says_so_less_and_less_often(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store that keeps failing is reported at ERROR at growing intervals (1,
    2, 4 ... s), each record counting the failures it did not log, and its
    recovery once at INFO."""
    tenths = [0]
    log = FailureLog("could not claim due work", clock=lambda: tenths[0] / 10)
    caplog.set_level(logging.INFO, "mailstrom_async.deliverer")
    for _ in range(200):  # one failure every 0.1 s for 20 s
        log.failed(OSError("disk I/O error"))
        tenths[0] += 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # At about 0, 1, 3, 7 and 15 s: five records for 200 failures.
    assert len(errors) == 5
    assert [r.__dict__["failures"] for r in errors] == [1, 11, 31, 71, 151]
    assert sum(r.__dict__["not_logged"] for r in errors) == 151 - 5
    log.succeeded()
    [info] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert info.getMessage() == "store works again"
    assert info.__dict__["failures"] == 200
