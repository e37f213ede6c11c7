"""Child processes of the harness: the sinks and one process per measurement.

Every process is registered the moment it starts and killed when the harness
leaves :func:`managed` (normal end, an exception, Ctrl-C, SIGTERM or SIGHUP).
Python children also get ``PR_SET_PDEATHSIG`` so that they die with the harness
even if it is killed outright. Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "ChildError",
    "free_port",
    "managed",
    "run_child",
    "start_smtp_sink",
    "start_soft_sink",
]

SMTP_SINK = "/usr/sbin/smtp-sink"
LOOPBACK = "127.0.0.1"
_CHILD_PREFIX = "BENCH-RESULT "

_procs: list[subprocess.Popen[bytes]] = []


class ChildError(RuntimeError):
    """A measurement process failed or timed out."""


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, **kwargs)  # noqa: S603 - fixed argv, no shell
    _procs.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ValueError):
        _procs.remove(proc)


def stop_all() -> None:
    while _procs:
        _stop(_procs[-1])


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def managed() -> Iterator[None]:
    """Kill every child process on the way out, however the harness ends."""
    previous = {
        sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        # A second Ctrl-C while cleaning up must not leave processes behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stop_all()
        finally:
            signal.signal(signal.SIGINT, old_int)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"{what} exited with status {proc.returncode} on port {port}"
            raise ChildError(msg)
        with socket.socket() as s:
            s.settimeout(0.5)
            try:
                s.connect((LOOPBACK, port))
            except OSError:
                time.sleep(0.05)
                continue
            return
    msg = f"{what} did not start listening on {LOOPBACK}:{port}"
    raise ChildError(msg)


def start_smtp_sink() -> int:
    """Start Postfix's ``smtp-sink`` on a free loopback port; return the port."""
    if not os.access(SMTP_SINK, os.X_OK):
        msg = f"{SMTP_SINK} not found: install Postfix (apt-get install postfix)"
        raise ChildError(msg)
    for _ in range(5):
        port = free_port()
        # -u: smtp-sink refuses to run as root without a user to switch to.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        proc = _spawn(
            [SMTP_SINK, *user, f"{LOOPBACK}:{port}", "1000"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_listening(port, proc, "smtp-sink")
        except ChildError:
            _stop(proc)
            continue
        return port
    msg = "could not start smtp-sink"
    raise ChildError(msg)


def start_soft_sink() -> int:
    """Start :mod:`bench.softsink` in its own process; return its port."""
    port = free_port()
    proc = _spawn(
        [sys.executable, "-m", "bench.softsink", str(port)],
        stdin=subprocess.DEVNULL,
        preexec_fn=_set_pdeathsig,  # the harness starts no threads
    )
    _wait_listening(port, proc, "bench.softsink")
    return port


def run_child(
    name: str, params: dict[str, Any], *, timeout: float, profile: Path | None = None
) -> dict[str, Any]:
    """Run measurement *name* in a fresh interpreter; return its result."""
    args = [sys.executable, "-m", "bench._child", name, json.dumps(params)]
    if profile is not None:
        args.append(str(profile))
    proc = _spawn(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=_set_pdeathsig,  # the harness starts no threads
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        msg = f"{name} took longer than {timeout:.0f} s"
        raise ChildError(msg) from None
    finally:
        with contextlib.suppress(ValueError):
            _procs.remove(proc)
    result = read_child_result(stdout)
    if result is None or proc.returncode != 0:
        msg = f"{name} failed (exit status {proc.returncode})"
        raise ChildError(msg)
    return result


def read_child_result(output: bytes) -> dict[str, Any] | None:
    """The result a child handed over with :func:`child_result`, if any."""
    for line in reversed(output.decode("utf-8", "replace").splitlines()):
        if line.startswith(_CHILD_PREFIX):
            result: dict[str, Any] = json.loads(line[len(_CHILD_PREFIX) :])
            return result
    return None


def child_result(result: dict[str, Any]) -> None:
    """Hand *result* to the harness (called in the child)."""
    sys.stdout.write(_CHILD_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
