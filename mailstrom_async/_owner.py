"""Who holds a lease: owner ids that say which process on which host, and whether
that process still lives.

A lease owner id names the host, the boot of its kernel, the PID namespace, the
process id and the process's start time, and a random token that tells two
Deliverers of one process apart::

    mailstrom:v1/web-1/5f0c…/4026531836/4242/1234567/9a8b7c6d

On the same host (same host name, boot id and PID namespace) a starting
Deliverer can tell for sure that such a process is gone: no process has that pid
any more, or the one that has it started at another time (the pid was reused).
Owners on other hosts, or whose facts this machine cannot read, are taken to be
alive: their leases expire by themselves.

Plain synchronous reads of ``/proc``: this process's own facts are read once at
import; :func:`check` reads another process's, so async callers run it in a
worker thread.
"""

from __future__ import annotations

import enum
import os
import secrets
import socket
from pathlib import Path

import attrs

__all__ = ["Liveness", "OwnerId", "check", "current_owner", "liveness"]

_PREFIX = "mailstrom:v1"
_UNKNOWN = "-"


class Liveness(enum.Enum):
    """What this host can tell of a lease owner's process."""

    ALIVE = "alive"
    """The process runs on this host."""
    DEAD = "dead"
    """The process ran on this host and is gone (or the host rebooted since)."""
    UNKNOWN = "unknown"
    """Another host, or facts this host cannot check: the lease expires by itself."""


@attrs.frozen(kw_only=True)
class OwnerId:
    """The parts of a lease owner id."""

    host: str
    boot_id: str
    pid_namespace: str
    pid: int
    start_time: str
    token: str

    def __str__(self) -> str:
        parts = (
            self.host,
            self.boot_id,
            self.pid_namespace,
            str(self.pid),
            self.start_time,
            self.token,
        )
        return "/".join((_PREFIX, *parts))

    @classmethod
    def parse(cls, text: str) -> OwnerId | None:
        """The parts of *text*, or None when it is not an owner id of this form
        (an older or hand-made one)."""
        prefix, _, rest = text.partition("/")
        fields = rest.split("/")
        if prefix != _PREFIX or len(fields) != 6 or not fields[3].isdigit():
            return None
        host, boot_id, namespace, pid, start, token = fields
        return cls(
            host=host,
            boot_id=boot_id,
            pid_namespace=namespace,
            pid=int(pid),
            start_time=start,
            token=token,
        )


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id") or _UNKNOWN


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return _UNKNOWN


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat``
    field 22), or None when there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else _UNKNOWN


def _host() -> str:
    return socket.gethostname().replace("/", "_") or _UNKNOWN


def _this_process() -> OwnerId:
    pid = os.getpid()
    return OwnerId(
        host=_host(),
        boot_id=_boot_id(),
        pid_namespace=_pid_namespace(),
        pid=pid,
        start_time=_start_time(pid) or _UNKNOWN,
        token="",
    )


# Read once, when the package is imported (not on a running event loop), and
# again only in a forked child.
_SELF = _this_process()


def current_owner() -> OwnerId:
    """A new owner id for a Deliverer of this process."""
    global _SELF
    if _SELF.pid != os.getpid():
        _SELF = _this_process()
    return attrs.evolve(_SELF, token=secrets.token_hex(4))


def liveness(owner: str, *, here: OwnerId | None = None) -> Liveness:
    """Whether the process behind the owner id *owner* still runs, as far as this
    host can tell (*here* is this process's own id, for tests)."""
    return check(owner, here=here)[0]


def check(owner: str, *, here: OwnerId | None = None) -> tuple[Liveness, str]:
    """:func:`liveness`, with a few words on why."""
    me = here or current_owner()
    other = OwnerId.parse(owner)
    if other is None:
        return Liveness.UNKNOWN, "not an owner id this version can read"
    if other.host != me.host:
        return Liveness.UNKNOWN, f"it runs on another host, {other.host!r}"
    if _UNKNOWN in (me.boot_id, other.boot_id):
        return Liveness.UNKNOWN, "this host's boot id cannot be read"
    if other.boot_id != me.boot_id:
        return Liveness.DEAD, "this host has rebooted since it started"
    if other.pid_namespace != me.pid_namespace:
        return Liveness.UNKNOWN, "it runs in another PID namespace (container)"
    if _UNKNOWN in (me.pid_namespace, other.start_time):
        return Liveness.UNKNOWN, "its process start time is unknown"
    if other.pid == os.getpid() and other.start_time == me.start_time:
        return Liveness.ALIVE, "it is this process"
    started = _start_time(other.pid)
    if started is None:
        return Liveness.DEAD, f"no process {other.pid} runs on this host"
    if started != other.start_time:
        return Liveness.DEAD, f"process {other.pid} is another process now"
    return Liveness.ALIVE, f"process {other.pid} runs on this host"
