"""What the tests of the mailstrom-async command share (tests/test_cli*.py).

``clean_env`` is an autouse fixture: it applies only in a module that has it in
its namespace, so each CLI test module imports it
(``from tests.cli_support import clean_env  # noqa: F401``); likewise the
``cli`` fixture, imported by its function's name, ``cli_fixture``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async import Config, RelayConfig, Timeouts
from mailstrom_async._cli import main

COMMAND = [sys.executable, "-m", "mailstrom_async"]

# The command as a terminal's foreground job runs it: SIGINT at its default
# (Python's KeyboardInterrupt), whatever this process inherited. A shell script
# that starts the suite with `&` leaves SIGINT ignored (POSIX: an asynchronous
# list without job control), children inherit that, and Python then never turns
# SIGINT into KeyboardInterrupt: Ctrl-C cannot be tried in such a child.
FOREGROUND = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('mailstrom_async', run_name='__main__', alter_sys=True)",
]


def child_env(**settings: str) -> dict[str, str]:
    """This process's environment without MAILSTROM_* variables, plus *settings*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(settings)
    return env


@contextlib.asynccontextmanager
async def started(
    *args: str, env: dict[str, str], foreground: bool = False
) -> AsyncIterator[Process]:
    """``mailstrom-async *args`` as a child process, killed if the test fails;
    with *foreground*, with SIGINT at its default as after Ctrl-C in a terminal
    (``FOREGROUND``)."""
    command = FOREGROUND if foreground else COMMAND
    async with await anyio.open_process([*command, *args], env=env) as process:
        try:
            yield process
        except BaseException:
            process.kill()
            raise


async def sink_relay_config(output: BufferedByteReceiveStream) -> Config:
    """Settings that relay to a ``sink`` child process, from the line it prints
    first on *output* (where it listens)."""
    with anyio.fail_after(30):
        banner = (await output.receive_until(b"\n", 1000)).decode()
    assert banner.startswith("sink listening on 127.0.0.1:")
    port = int(banner.rpartition(":")[2])
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host="127.0.0.1", port=port, tls="none"),
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=5),
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MAILSTROM_* variable (CI sets some for the suite) reaches main(), and
    the cwd is a fresh folder."""
    for name in list(os.environ):
        if name.startswith("MAILSTROM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


class CLI:
    """Runs main() in this process and captures what it prints."""

    quiet = False
    """Whether a command that succeeds must print nothing on stderr."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def argv(self, args: tuple[str, ...]) -> list[str]:
        """The arguments main() gets for a command."""
        return list(args)

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """Run a command: exit code, stdout, stderr."""
        self.capsys.readouterr()
        code = main(self.argv(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *args: str) -> str:
        """Run a command that must succeed; return its stdout."""
        code, out, err = self(*args)
        assert code == 0, err
        if self.quiet:
            assert err == ""
        return out

    def json(self, *args: str) -> object:
        """Run a command that must succeed with --json; its parsed stdout."""
        return json.loads(self.ok(*args, "--json"))

    async def in_thread(self, *args: str) -> str:
        """ok(), from an async test whose loop must keep serving SMTP."""
        return await anyio.to_thread.run_sync(lambda: self.ok(*args))

    def error(self, *args: str, code: int = 1) -> str:
        """Run a failing command; return its one error line."""
        got, out, err = self(*args)
        assert got == code, (out, err)
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("mailstrom-async: error: "), err
        return lines[0]

    def json_error(self, *args: str, code: int) -> dict[str, object]:
        """Run a failing command with --json: stdout is empty, stderr one JSON
        object with the error and the exit code."""
        got, out, err = self(*args)
        assert got == code, (out, err)
        assert out == ""
        [line] = err.splitlines()
        error: dict[str, object] = json.loads(line)
        assert error["exit_code"] == code
        assert isinstance(error["error"], str)
        assert not error["error"].startswith("mailstrom-async:")
        return error

    def send(self, *args: str) -> str:
        """``send`` a one-line message with *args* (recipients, options); its id."""
        out = self.ok(
            "send", "--from", "me@example.com", "--subject", "Hi", "--body", "x", *args
        )
        return out.strip()


class StoreCLI(CLI):
    """A CLI whose every command gets ``--store <store>`` after its arguments, and
    whose successes print nothing on stderr."""

    quiet = True

    def __init__(self, capsys: pytest.CaptureFixture[str], store: Path) -> None:
        super().__init__(capsys)
        self.store = store

    def argv(self, args: tuple[str, ...]) -> list[str]:
        return [*args, "--store", str(self.store)]


@pytest.fixture(name="cli")
def cli_fixture(capsys: pytest.CaptureFixture[str]) -> CLI:
    """A CLI runner (imported as ``cli_fixture``, used as ``cli``)."""
    return CLI(capsys)
