"""The command next to Postfix's (issue 12): --version, ids with or without <>,
purge --dry-run and its question on a terminal, sink --defer/--reject, JSON
errors, send --wait interrupted, and the worker's log lines.

In-process tests call main() (sync tests: main() calls anyio.run()); everything
that needs a terminal, a signal or a loopback server in the test's own event
loop runs ``python -m mailstrom_async`` as a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async._cli._run import sink_policy
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from mailstrom_async._models import RecipientState
from mailstrom_async._store import MemoryStore
from tests.cli_support import (  # noqa: F401 - fixtures
    CLI,
    COMMAND,
    child_env,
    clean_env,
    cli_fixture,
    sink_relay_config,
    started,
)
from tests.smtpd import FaultHandler, SMTPDServers

SEND = ["send", "--from", "me@example.com", "--subject", "Hi", "--body", "x"]


# -- --version -------------------------------------------------------------------


def test_version(cli: CLI) -> None:
    """--version prints the installed distribution's version, exit code 0."""
    assert cli.ok("--version") == f"mailstrom-async {version('mailstrom-async')}\n"


# -- message ids -------------------------------------------------------------------


def test_every_command_takes_an_id_with_or_without_angle_brackets(cli: CLI) -> None:
    """status, show, retry, hold, release and cancel accept the id as 'send' printed
    it, as it appears in a Message-ID header, and with whitespace around it."""
    message_id = cli.ok(*SEND, "--to", "you@example.org").strip()
    forms = [
        message_id,
        f"<{message_id}>",
        f"  <{message_id}> ",
        f" < {message_id} >\n",
    ]
    for form in forms:
        out = cli.ok("status", "--json", form)
        assert json.loads(out)["message_id"] == message_id
        assert cli.ok("retry", form) == "0 recipient(s) made due now\n"
        out = cli.ok("show", "--json", form)
        assert json.loads(out)["message_id"] == message_id
    assert cli.ok("hold", f"<{message_id}>") == f"held 1 recipient(s) of {message_id}\n"
    assert (
        cli.ok("release", f" <{message_id}>")
        == f"released 1 recipient(s) of {message_id}\n"
    )
    assert (
        cli.ok("cancel", f"<{message_id}>")
        == f"cancelled 1 recipient(s) of {message_id}\n"
    )


@pytest.mark.parametrize("bad", ["", "  ", "<>", "< >", "a b@example.org", "<a<b>"])
def test_what_is_not_an_id_is_a_usage_error(cli: CLI, bad: str) -> None:
    """An empty id, or one with spaces or stray brackets, is a usage error
    (exit code 2) before any store is opened."""
    code, out, err = cli("status", bad)
    assert code == 2, (out, err)
    assert err == (
        f"mailstrom-async: error: argument ID: not a message id: {bad!r} (give it "
        "as 'send' printed it, with or without the <> of a Message-ID header) "
        "(see 'mailstrom-async status --help')\n"
    )


# -- purge --dry-run and the question on a terminal ---------------------------------


def _finished_messages(cli: CLI, count: int) -> list[str]:
    """*count* messages whose recipients are all final (cancelled: FAILED)."""
    ids = [cli.ok(*SEND, "--to", f"r{n}@example.org").strip() for n in range(count)]
    for message_id in ids:
        cli.ok("cancel", message_id)
    return ids


def test_purge_dry_run_lists_and_deletes_nothing(cli: CLI) -> None:
    """--dry-run lists what purge would delete (waiting mail is not listed),
    with --json too, and deletes nothing; purge then deletes exactly those."""
    finished = _finished_messages(cli, 2)
    waiting = cli.ok(*SEND, "--to", "wait@example.org").strip()
    out = cli.ok("purge", "--older-than", "0s", "--dry-run")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "FINISHED", "FROM", "RECIPIENTS"]
    assert [line.split()[0] for line in lines[1:-1]] == finished
    assert lines[-1].startswith("would purge 2 finished message(s) older than ")
    assert lines[-1].endswith("(dry run: nothing deleted)")
    data = json.loads(cli.ok("purge", "--older-than", "0s", "--dry-run", "--json"))
    assert data["dry_run"] is True
    assert data["would_purge"] == 2
    assert data["message_ids"] == finished
    for message_id in [*finished, waiting]:  # all still there
        cli.ok("status", message_id)
    assert json.loads(cli.ok("purge", "--older-than", "0s", "--json"))["purged"] == 2
    assert cli("status", finished[0])[0] == 1
    cli.ok("status", waiting)
    out = cli.ok("purge", "--older-than", "0s", "--dry-run")
    assert out.startswith("would purge 0 finished message(s)")


@contextlib.asynccontextmanager
async def on_a_terminal(*args: str, env: dict[str, str]) -> AsyncIterator[TTYChild]:
    """``mailstrom-async *args`` with a pseudo-terminal as its stdin."""
    controller, terminal = pty.openpty()
    try:
        process = await anyio.open_process(
            [*COMMAND, *args], stdin=terminal, env=env, cwd=env["PWD_FOR_TEST"]
        )
    finally:
        os.close(terminal)
    async with process:
        try:
            yield TTYChild(process, controller)
        except BaseException:
            process.kill()
            raise
        finally:
            os.close(controller)


class TTYChild:
    def __init__(self, process: Process, controller: int) -> None:
        assert process.stderr is not None
        self.process = process
        self.controller = controller
        self.stderr = BufferedByteReceiveStream(process.stderr)

    async def question(self) -> str:
        """The question on stderr (it ends in '? [y/N] ', without a newline)."""
        with anyio.fail_after(30):
            text = await self.stderr.receive_until(b"[y/N] ", 10000)
        return text.decode() + "[y/N] "

    async def answer(self, text: str) -> None:
        await anyio.to_thread.run_sync(os.write, self.controller, text.encode())

    async def finish(self) -> tuple[int, str, str]:
        assert self.process.stdout is not None
        with anyio.fail_after(30):
            out = b"".join([chunk async for chunk in self.process.stdout])
            err = b"".join([chunk async for chunk in self.stderr.receive_stream])
            code = await self.process.wait()
        return code, out.decode(), err.decode()


async def _store_with_waiting(tmp_path: Path, count: int) -> dict[str, str]:
    """The environment of a store in *tmp_path* with *count* waiting messages."""
    env = child_env(
        MAILSTROM_STORE=str(tmp_path / "q.sqlite3"), PWD_FOR_TEST=str(tmp_path)
    )
    for n in range(count):
        await anyio.run_process([*COMMAND, *SEND, "--to", f"r{n}@x.test"], env=env)
    return env


async def _purgeable(env: dict[str, str]) -> int:
    result = await anyio.run_process(
        [*COMMAND, "purge", "--older-than", "0s", "--dry-run", "--json"], env=env
    )
    count: int = json.loads(result.stdout)["would_purge"]
    return count


async def _cancel_all(env: dict[str, str]) -> None:
    listed = await anyio.run_process([*COMMAND, "queue", "--json"], env=env)
    for message in json.loads(listed.stdout)["messages"]:
        await anyio.run_process([*COMMAND, "cancel", message["message_id"]], env=env)


@pytest.mark.parametrize(
    ("answer", "code", "left"), [("y\n", 0, 0), ("YES\n", 0, 0), ("n\n", 1, 2)]
)
async def test_purge_asks_on_a_terminal(
    tmp_path: Path,
    answer: str,
    code: int,
    left: int,
) -> None:
    """On a terminal, purge says how many it will delete and deletes only after
    a yes; anything else deletes nothing, exit code 1, with one error line."""
    env = await _store_with_waiting(tmp_path, 2)
    await _cancel_all(env)
    async with on_a_terminal("purge", "--older-than", "0s", env=env) as child:
        question = await child.question()
        assert question.startswith("delete 2 finished message(s) older than ")
        assert question.endswith("? [y/N] ")
        assert await _purgeable(env) == 2  # nothing deleted before the answer
        await child.answer(answer)
        got, out, err = await child.finish()
    assert got == code, (out, err)
    if code == 0:
        assert out.startswith("purged 2 finished message(s) older than "), out
        assert err == ""
    else:
        assert out == ""
        assert err == (
            "mailstrom-async: error: not confirmed: nothing was deleted "
            "(give --yes to skip the question)\n"
        )
    assert await _purgeable(env) == left


async def test_purge_yes_or_no_terminal_does_not_ask(
    tmp_path: Path,
) -> None:
    """--yes on a terminal, and any run whose stdin is not a terminal (cron, a
    pipe), deletes without asking, as before; nothing to delete asks nothing."""
    env = await _store_with_waiting(tmp_path, 2)
    async with on_a_terminal("purge", "--older-than", "0s", env=env) as child:
        code, out, err = await child.finish()  # nothing finished yet: no question
    assert (code, err) == (0, "")
    assert out.startswith("purged 0 finished message(s)")
    await _cancel_all(env)
    async with on_a_terminal("purge", "--older-than", "0s", "--yes", env=env) as child:
        code, out, err = await child.finish()
    assert (code, err) == (0, "")
    assert out.startswith("purged 2 finished message(s)")
    (tmp_path / "more").mkdir()
    env = await _store_with_waiting(tmp_path / "more", 1)
    await _cancel_all(env)
    result = await anyio.run_process(
        [*COMMAND, "purge", "--older-than", "0s"], env=env, stdin=None, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout.decode().startswith("purged 1 finished message(s)")


# -- sink --defer / --reject / --json ------------------------------------------------


def test_sink_policy_matches_patterns_ignoring_case() -> None:
    """--reject wins over --defer; patterns are matched against the whole
    address, ignoring case; everything else is accepted."""
    policy = sink_policy(defer=["busy@*", "*@slow.test"], reject=["*@gone.test"])
    assert policy("ok@example.org") is None
    assert policy("Busy@Example.org") == (
        "450 4.2.1 mailbox busy, try again later (sink --defer)"
    )
    assert policy("x@SLOW.test") is not None
    assert policy("busy@gone.test") == "550 5.1.1 mailbox unavailable (sink --reject)"
    assert policy("notbusy@example.org") is None  # the whole address, not a part


def test_sink_empty_pattern_is_a_usage_error(cli: CLI) -> None:
    code, _, err = cli("sink", "--defer", " ")
    assert code == 2
    assert "argument --defer: an empty pattern" in err


async def test_sink_defers_and_rejects_matching_recipients(tmp_path: Path) -> None:
    """sink --defer/--reject answer 4xx/5xx to matching recipients, so a
    Deliverer sees a deferral and a failure; with --json stdout holds only JSON
    lines (the listening line is on stderr)."""
    async with started(
        "sink",
        "--port",
        "0",
        "--json",
        "--defer",
        "busy@*",
        "--reject",
        "*@gone.example.org",
        env=child_env(),
    ) as sink:
        assert sink.stdout is not None
        assert sink.stderr is not None
        stderr = BufferedByteReceiveStream(sink.stderr)
        config = await sink_relay_config(stderr)
        to = ["ok@example.org", "busy@example.org", "x@gone.example.org"]
        async with Deliverer(config, store=MemoryStore()) as deliverer:
            handle = await deliverer.submit(
                Email(sender="me@example.com", to=to, subject="S", text="x\n")
            )
            events = deliverer.events()
            with anyio.fail_after(30):
                seen = 0
                async for event in events:
                    if event.state is not RecipientState.QUEUED:
                        seen += 1
                    if seen == 3:
                        break
            await events.aclose()
            status = await deliverer.status(handle.message_id)
        sink.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            out = b"".join([chunk async for chunk in sink.stdout])
            rest = b"".join([chunk async for chunk in stderr.receive_stream])
            assert await sink.wait() == 0
    ok, busy, gone = (status.recipient(a) for a in to)
    assert ok.state is RecipientState.DELIVERED
    assert (busy.state, busy.code, busy.enhanced_code) == (
        RecipientState.DEFERRED,
        450,
        "4.2.1",
    )
    assert (gone.state, gone.code, gone.enhanced_code) == (
        RecipientState.FAILED,
        550,
        "5.1.1",
    )
    [line] = out.decode().splitlines()  # nothing but JSON on stdout
    assert json.loads(line)["rcpt_to"] == ["ok@example.org"]
    assert rest == b""


# -- --json errors -------------------------------------------------------------------


def test_json_errors_for_every_command_with_json(cli: CLI, tmp_path: Path) -> None:
    """Every command that takes --json reports its errors as one JSON object on
    stderr, with the exit code: errors found by the handler (1), usage errors
    found by the parser or the handler (2)."""
    missing = str(tmp_path / "missing.sqlite3")
    no_store = f"no store at {missing!r}"
    for command in (
        ["status", "x@example.org"],
        ["queue"],
        ["queue", "--shape"],
        ["queue", "--summary"],
        ["show", "x@example.org"],
        ["retry", "--all"],
        ["cancel", "x@example.org"],
        ["purge", "--older-than", "1d"],
        ["hold", "--domain", "example.org"],
        ["release", "--all"],
        ["leases"],
    ):
        error = cli.json_error(*command, "--store", missing, "--json", code=1)
        assert str(error["error"]).startswith(no_store), (command, error)
    error = cli.json_error("send", "--json", "--from", "me@example.com", code=2)
    assert error["error"] == (
        "give --from and at least one --to/--cc/--bcc, or a FILE "
        "(see 'mailstrom-async send --help')"
    )
    error = cli.json_error("worker", "--json", "--store", str(tmp_path), code=1)
    assert "is a directory, not a SQLite file" in str(error["error"])
    error = cli.json_error(
        "sink", "--json", "--save-dir", missing, "--port", "x", code=2
    )
    assert str(error["error"]).startswith("argument --port: not a port number")
    # Usage errors from the parser, and from a handler, wherever --json stands.
    error = cli.json_error("queue", "--json", "--bogus", code=2)
    assert str(error["error"]).startswith("unrecognized arguments: --bogus")
    error = cli.json_error("status", "--json", "<>", code=2)
    assert str(error["error"]).startswith("argument ID: not a message id: '<>'")
    cli.ok(*SEND, "--to", "you@example.org")
    error = cli.json_error("retry", "--json", code=2)
    assert error["error"] == (
        "give exactly one of ID, --domain DOMAIN or --all "
        "(see 'mailstrom-async retry --help')"
    )
    error = cli.json_error("status", "nope@example.org", "--json", code=1)
    assert "no message with id 'nope@example.org'" in str(error["error"])


def test_errors_without_json_stay_text(cli: CLI) -> None:
    """Without --json (or with --json only after '--'), errors stay one text line."""
    code, _, err = cli("queue", "--bogus")
    assert code == 2
    assert err.startswith("mailstrom-async: error: unrecognized arguments: --bogus")
    code, _, err = cli("send", "--", "--json")  # a FILE named --json
    assert code == 1
    assert err == (
        "mailstrom-async: error: cannot read message file '--json': "
        "No such file or directory\n"
    )


# -- send --wait, interrupted ----------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
async def test_send_wait_interrupted_keeps_the_message_queued(
    smtpd: SMTPDServers, tmp_path: Path, as_json: bool
) -> None:
    """send --wait prints the id once the message is stored (with --json, as a
    JSON line on stderr); Ctrl-C then says the message stays queued under that
    id, exit code 130, and the message is in the store, still queued."""
    handler = FaultHandler(stall_at="MAIL")  # never answers: the wait goes on
    server = await smtpd.start(handler)
    env = child_env(
        MAILSTROM_STORE=str(tmp_path / "q.sqlite3"),
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_RELAY__HOST=server.host,
        MAILSTROM_RELAY__PORT=str(server.port),
        MAILSTROM_RELAY__TLS="none",
        MAILSTROM_SHUTDOWN_GRACE="0",
    )
    flags = ["--json"] if as_json else []
    args = [*SEND, "--wait", "--no-progress", *flags, "--to", "you@example.org"]
    async with started(*args, env=env, foreground=True) as process:
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            stdout = BufferedByteReceiveStream(process.stdout)
            stderr = BufferedByteReceiveStream(process.stderr)
            with anyio.fail_after(30):
                if as_json:
                    first = json.loads(await stderr.receive_until(b"\n", 4000))
                    assert first["stored"] is True
                    message_id = first["message_id"]
                else:
                    message_id = (await stdout.receive_until(b"\n", 4000)).decode()
                await handler.stalled.wait()  # in the SMTP exchange now
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                out = b"".join([chunk async for chunk in stdout.receive_stream])
                err = b"".join([chunk async for chunk in stderr.receive_stream])
                code = await process.wait()
        finally:
            handler.release.set()
    text = (
        f"interrupted: message {message_id} stays queued for a worker "
        f"(see 'mailstrom-async status {message_id}')"
    )
    assert code == 130, err
    assert out == b""
    if as_json:
        assert json.loads(err) == {
            "error": text,
            "exit_code": 130,
            "message_id": message_id,
        }
    else:
        assert err.decode() == f"mailstrom-async: {text}\n"
    status = await anyio.run_process(
        [*COMMAND, "status", "--json", message_id], env=env
    )
    data = json.loads(status.stdout)
    assert data["done"] is False
    [recipient] = data["recipients"]
    assert recipient["state"] == "queued"
    assert handler.messages == []


# -- the worker's log lines ----------------------------------------------------------


async def test_worker_without_relay_warns_once_that_mail_goes_direct(
    tmp_path: Path,
) -> None:
    """With no relay configured, the worker's start line is a WARNING saying
    mail goes direct to the recipients' MX hosts, once."""
    env = child_env(
        MAILSTROM_STORE=str(tmp_path / "q.sqlite3"),
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_MX__NAMESERVERS="127.0.0.1:9",  # never asked: the queue is empty
    )
    async with started("worker", env=env) as worker:
        assert worker.stderr is not None
        stderr = BufferedByteReceiveStream(worker.stderr)
        with anyio.fail_after(30):
            while b"deliverer started" not in (
                line := await stderr.receive_until(b"\n", 10000)
            ):
                pass
        worker.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            rest = b"".join([chunk async for chunk in stderr.receive_stream])
            assert await worker.wait() == 0
    started_line = line.decode()
    assert (
        " WARNING mailstrom_async.deliverer: deliverer started; no relay "
        "configured: mail goes direct to recipients' MX hosts " in started_line
    )
    assert "delivery=mx" in started_line
    assert "WARNING" not in rest.decode()
