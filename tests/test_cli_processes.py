"""The long-running parts of mailstrom-async as real processes: worker, sink,
and send --wait, against loopback SMTP servers in the test's own event loop."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async import Config, RelayConfig, SQLiteStore
from mailstrom_async._cli import main
from mailstrom_async._cli._run import _describe
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from mailstrom_async._models import RecipientState
from mailstrom_async._sink import CapturedMessage
from mailstrom_async._store import MemoryStore
from tests.cli_support import (  # noqa: F401 - fixture
    COMMAND,
    child_env,
    clean_env,
    sink_relay_config,
    started,
)
from tests.smtpd import FaultHandler, SMTPDServer, SMTPDServers


def relay_env(server: SMTPDServer, store: Path, **settings: str) -> dict[str, str]:
    """Settings for a process that delivers to *server*, with *store* as default."""
    return child_env(
        MAILSTROM_STORE=str(store),
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_RELAY__HOST=server.host,
        MAILSTROM_RELAY__PORT=str(server.port),
        MAILSTROM_RELAY__TLS="none",
        MAILSTROM_TIMEOUTS__CONNECT="5",
        MAILSTROM_POLL_INTERVAL="0.1",
        **settings,
    )


async def read_all(process: Process) -> tuple[str, str]:
    assert process.stdout is not None
    assert process.stderr is not None
    out = b"".join([chunk async for chunk in process.stdout])
    err = b"".join([chunk async for chunk in process.stderr])
    return out.decode(), err.decode()


async def test_worker_delivers_and_stops_cleanly(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A message stored by 'send' (submit only) is delivered by 'worker'; SIGTERM
    stops the worker with exit code 0, and 'status' then says DELIVERED."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    env = relay_env(server, tmp_path / "q.sqlite3")
    sent = await anyio.run_process(
        [
            *COMMAND,
            "send",
            "--from",
            "me@example.com",
            "--to",
            "you@example.org",
            "--subject",
            "Hi",
            "--body",
            "Hello.",
        ],
        env=env,
    )
    message_id = sent.stdout.decode().strip()
    assert handler.received.value == 0  # submit only: nothing delivered yet
    async with started("worker", env=env) as worker:
        with anyio.fail_after(30):
            await handler.received.wait_for(1)
        worker.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            _, err = await read_all(worker)
            code = await worker.wait()
    assert code == 0, err
    assert (
        f"deliverer started; mail goes through the relay 127.0.0.1:{server.port}" in err
    )
    assert "stopping signal=SIGTERM" in err
    # One line per outcome: the Deliverer's, not a second one from the command.
    [outcome] = [line for line in err.splitlines() if message_id in line]
    assert (
        f"INFO mailstrom_async.deliverer: attempt recorded: 1 recipient(s) delivered "
        f"message_id={message_id} recipient_domain=example.org destination=relay"
        in outcome
    )
    assert "code=250" in outcome
    assert "attempt=1" in outcome
    assert "Traceback" not in err
    [received] = server.messages
    assert received.rcpt_tos == ["you@example.org"]
    assert f"Message-ID: <{message_id}>".encode() in received.content
    status = await anyio.run_process(
        [*COMMAND, "status", "--json", message_id], env=env
    )
    [recipient] = json.loads(status.stdout)["recipients"]
    assert recipient["state"] == "delivered"
    assert recipient["code"] == 250


async def test_worker_leaves_mail_held_by_the_cli(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Mail held with 'hold' is not sent by a running 'worker' while mail
    submitted after it is (one connection, oldest first); after 'release' the
    worker sends it at its next poll."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    env = relay_env(
        server,
        tmp_path / "q.sqlite3",
        MAILSTROM_LIMITS__CONNECTIONS_PER_DESTINATION="1",
    )

    async def cli(*args: str) -> str:
        result = await anyio.run_process([*COMMAND, *args], env=env)
        return result.stdout.decode().strip()

    send = ["send", "--from", "me@example.com", "--subject", "Hi", "--body", "x"]
    held = await cli(*send, "--to", "held@example.org")
    other = await cli(*send, "--to", "other@example.org")
    assert await cli("hold", held) == f"held 1 recipient(s) of {held}"
    async with started("worker", env=env) as worker:
        with anyio.fail_after(30):
            await handler.received.wait_for(1)
        assert [m.rcpt_tos for m in server.messages] == [["other@example.org"]]
        [recipient] = json.loads(await cli("status", "--json", held))["recipients"]
        assert (recipient["state"], recipient["held"]) == ("queued", True)
        assert await cli("release", held) == f"released 1 recipient(s) of {held}"
        with anyio.fail_after(30):
            await handler.received.wait_for(2)
        worker.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            _, err = await read_all(worker)
            code = await worker.wait()
    assert code == 0, err
    assert [m.rcpt_tos for m in server.messages] == [
        ["other@example.org"],
        ["held@example.org"],
    ]
    assert json.loads(await cli("status", "--json", other))["done"] is True


@pytest.mark.parametrize(
    ("replies", "wait", "code", "states"),
    [
        ({}, "30", 0, {"a@example.org": "delivered", "b@example.org": "delivered"}),
        (
            {"b@example.org": "550 5.1.1 no such user"},
            "30",
            3,
            {"a@example.org": "delivered", "b@example.org": "failed"},
        ),
        (
            {"b@example.org": "451 4.2.1 mailbox busy"},
            "1",
            4,
            {"a@example.org": "delivered", "b@example.org": "deferred"},
        ),
    ],
)
async def test_send_wait_reports_outcomes(
    smtpd: SMTPDServers,
    tmp_path: Path,
    replies: dict[str, str],
    wait: str,
    code: int,
    states: dict[str, str],
) -> None:
    """send --wait delivers from its own process and prints each recipient's
    outcome; the exit code says all delivered (0), some failed (3) or still
    pending when the time ran out (4). --progress shows recipients becoming final
    on stderr."""
    server = await smtpd.start(FaultHandler(rcpt_replies=replies))
    env = relay_env(
        server, tmp_path / "q.sqlite3", MAILSTROM_RETRY__INITIAL_DELAY="3600"
    )
    result = await anyio.run_process(
        [
            *COMMAND,
            "send",
            "--wait",
            wait,
            "--progress",
            "--from",
            "me@example.com",
            "--to",
            "a@example.org",
            "--to",
            "b@example.org",
            "--subject",
            "Hi",
        ],
        env=env,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == code, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert {a: row[0] for a, row in rows.items() if "@" in a} == states
    if code == 3:
        assert rows["b@example.org"][1:4] == ["550", "5.1.1", "no"]
    if code == 4:
        assert "still pending: it stays queued for a worker" in out
    final = sum(state in ("delivered", "failed") for state in states.values())
    progress = result.stderr.decode().split("\r")[-1]
    assert progress.startswith(f"{final}/2 recipients final ("), result.stderr


async def test_sink_prints_and_saves(tmp_path: Path) -> None:
    """sink prints a line per message and saves it as .eml; SIGTERM stops it
    with exit code 0."""
    outbox = tmp_path / "outbox"
    async with started(
        "sink", "--port", "0", "--save-dir", str(outbox), env=child_env()
    ) as sink:
        assert sink.stdout is not None
        reader = BufferedByteReceiveStream(sink.stdout)
        config = await sink_relay_config(reader)
        async with Deliverer(config, store=MemoryStore()) as deliverer:
            handle = await deliverer.submit(
                Email(
                    sender="me@example.com",
                    to=["a@example.org", "b@example.org"],
                    subject="Grüße",
                    text="Hello.\n",
                )
            )
            with anyio.fail_after(30):
                status = await handle
        assert status.is_delivered
        with anyio.fail_after(30):
            line = (await reader.receive_until(b"\n", 4000)).decode()
        sink.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await sink.wait() == 0
    [saved] = outbox.iterdir()
    assert line.startswith(
        "me@example.com -> a@example.org, b@example.org  subject='Grüße'  "
    )
    size = saved.stat().st_size
    assert line.endswith(f"  {size} bytes  saved {saved}")
    assert f"Message-ID: <{handle.message_id}>".encode() in saved.read_bytes()
    assert status.recipient("a@example.org").state is RecipientState.DELIVERED


def test_sink_json_lines() -> None:
    """With --json each message is one JSON object."""
    message = CapturedMessage(
        "me@example.com",
        ("a@example.org",),
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nx\r\n",
    )
    assert json.loads(_describe(message, None, as_json=True)) == {
        "mail_from": "me@example.com",
        "rcpt_to": ["a@example.org"],
        "subject": "Grüße",
        "size": len(message.data),
        "saved": None,
    }


def test_sink_bad_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A port in use, a bad port and a --save-dir that is a file are each one
    error line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["sink", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"mailstrom-async: error: cannot listen on 127.0.0.1:{port}"
        )
        assert err.count("\n") == 1
    assert main(["sink", "--port", "70000"]) == 2
    assert "not a port number (0 to 65535): '70000'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["sink", "--save-dir", str(tmp_path / "file")]) == 1
    assert "cannot use --save-dir" in capsys.readouterr().err


def test_worker_bad_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A worker whose store is a directory stops at once with one error line."""
    assert main(["worker", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"mailstrom-async: error: store {str(tmp_path)!r} is a directory, not a SQLite file\n"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is not None, reason="uvloop is installed"
)
def test_worker_loop_uvloop_needs_uvloop(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--loop uvloop without uvloop installed is one error line, before any store
    file is created."""
    store = tmp_path / "q.sqlite3"
    assert main(["worker", "--loop", "uvloop", "--store", str(store)]) == 1
    assert capsys.readouterr().err == (
        "mailstrom-async: error: --loop uvloop: uvloop is not installed "
        "(pip install 'mailstrom-async[uvloop]')\n"
    )
    assert not store.exists()


async def test_worker_json_logs_and_sigint(tmp_path: Path) -> None:
    """worker --json logs one JSON object per line; SIGINT stops an idle worker
    cleanly with exit code 0."""
    env = child_env(
        MAILSTROM_STORE=str(tmp_path / "q.sqlite3"),
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_RELAY__HOST="127.0.0.1",
        MAILSTROM_RELAY__TLS="none",
    )
    async with started("worker", "--json", env=env) as worker:
        assert worker.stderr is not None
        reader = BufferedByteReceiveStream(worker.stderr)
        with anyio.fail_after(30):
            migrated = json.loads(await reader.receive_until(b"\n", 10000))
            ready = json.loads(await reader.receive_until(b"\n", 10000))
        worker.send_signal(signal.SIGINT)
        assert migrated["message"] == "migrated SQLite store schema"
        assert migrated["to_version"] >= 1
        assert ready["message"] == (
            "deliverer started; mail goes through the relay 127.0.0.1:25"
        )
        assert (ready["delivery"], ready["relay_port"]) == ("relay", 25)
        assert ready["level"] == "INFO"
        assert ready["logger"] == "mailstrom_async.deliverer"
        assert ready["mode"] == "deliver"
        with anyio.fail_after(30):
            rest = b"".join([chunk async for chunk in reader.receive_stream])
            assert await worker.wait() == 0
    lines = [json.loads(line) for line in rest.decode().splitlines()]
    assert {"stopping", "deliverer stopped"} <= {line["message"] for line in lines}
    assert {"signal": "SIGINT"}.items() <= lines[0].items()


async def test_worker_processes_supervises_restarts_and_stops(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """worker --processes 2: two delivering processes on one SQLite file; one
    killed with SIGKILL is started again; SIGTERM stops them all, exit code 0."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    db = tmp_path / "q.sqlite3"
    env = relay_env(server, db)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        poll_interval=0.05,
    )

    async def deliver(count: int, tag: str) -> None:
        async with Deliverer(config, store=SQLiteStore(db), mode="submit") as web:
            handles = [
                await web.submit(
                    Email(sender="me@example.com", to=[f"{tag}{n}@example.org"])
                )
                for n in range(count)
            ]
            for handle in handles:
                assert (await handle).is_delivered

    async with started("worker", "--processes", "2", "--json", env=env) as sup:
        assert sup.stderr is not None
        reader = BufferedByteReceiveStream(sup.stderr)
        lines: list[dict[str, object]] = []

        async def line_where(**wanted: object) -> dict[str, object]:
            while True:
                line: dict[str, object] = json.loads(
                    await reader.receive_until(b"\n", 100_000)
                )
                lines.append(line)
                if wanted.items() <= line.items():
                    return line

        with anyio.fail_after(60):
            first = await line_where(message="worker started", worker_slot=1)
            second = await line_where(message="worker started", worker_slot=2)
            await deliver(10, "a")
            os.kill(int(str(first["pid"])), signal.SIGKILL)
            exited = await line_where(message="worker exited; starting it again")
            again = await line_where(message="worker started", worker_slot=1)
            await deliver(5, "b")
            sup.send_signal(signal.SIGTERM)
            await line_where(message="workers stopped")
            rest = b"".join([chunk async for chunk in reader.receive_stream])
            code = await sup.wait()
    assert code == 0, rest
    assert (exited["pid"], exited["exit_code"]) == (first["pid"], -signal.SIGKILL)
    assert again["pid"] not in (first["pid"], second["pid"])
    assert handler.received.value == 15
    assert sorted(a for m in server.messages for a in m.rcpt_tos) == sorted(
        [f"a{n}@example.org" for n in range(10)]
        + [f"b{n}@example.org" for n in range(5)]
    )
    for pid in (second["pid"], again["pid"]):
        with pytest.raises(ProcessLookupError):
            os.kill(int(str(pid)), 0)  # stopped and reaped by the supervisor


def test_worker_processes_must_be_a_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--processes", "0"]) == 2
    assert "not a number of processes (1 to 256): '0'" in capsys.readouterr().err
