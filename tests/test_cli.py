"""The mailstrom-async command: in-process through main(), and as real processes.

In-process tests are sync tests because main() calls anyio.run(); long-running
subcommands (worker, sink) and everything that needs a loopback server in the
test's own event loop run ``python -m mailstrom_async`` as a subprocess.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
import anyio
import attrs
import pytest

from mailstrom_async._cli import _reason
from mailstrom_async._cli._common import CLIError, age, duration
from mailstrom_async._deliverer import DEFAULT_STORE_PATH
from mailstrom_async._models import RecipientState, RecipientStatus
from mailstrom_async._store import SQLiteStore
from tests.cli_support import CLI, child_env, clean_env, cli_fixture  # noqa: F401 - fixtures

SUBCOMMANDS = [
    "send",
    "worker",
    "status",
    "queue",
    "show",
    "retry",
    "cancel",
    "purge",
    "leases",
    "hold",
    "release",
    "sink",
    "demo",
]


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "mailstrom_async", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=5)


def defer(store_path: Path, message_id: str, address: str, *, hours: float) -> None:
    """Record a deferred attempt for *address*, next attempt *hours* from now."""

    async def record() -> None:
        async with SQLiteStore(store_path) as store:
            status = await store.status(message_id)
            old = status.recipient(address)
            await store.record(
                message_id,
                [
                    RecipientStatus(
                        address=address,
                        state=RecipientState.DEFERRED,
                        attempts=1,
                        code=451,
                        enhanced_code="4.2.1",
                        message="busy",
                        host="mx.example.org",
                        last_attempt_at=old.next_attempt_at,
                        next_attempt_at=status.submitted_at + timedelta(hours=hours),
                    )
                ],
                worker="test",
            )

    anyio.run(record)


# -- help --------------------------------------------------------------------------


def test_help_lists_every_subcommand() -> None:
    """--help names every subcommand, the default store and the exit codes."""
    result = run("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in result.stdout
    assert DEFAULT_STORE_PATH in result.stdout
    assert "MAILSTROM_STORE" in result.stdout
    assert "3 a recipient failed" in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(cli: CLI, command: str) -> None:
    """Every subcommand's --help exits 0 with a usage line and examples."""
    out = cli.ok(command, "--help")
    assert out.startswith(f"usage: mailstrom-async {command}")
    if command != "demo":
        assert "example" in out
    if command in {
        "send",
        "worker",
        "status",
        "queue",
        "show",
        "retry",
        "cancel",
        "purge",
        "hold",
        "release",
    }:
        assert "--store" in out
        assert "MAILSTROM_STORE" in out


def test_no_command_is_a_usage_error(cli: CLI) -> None:
    """Without a subcommand: one line and exit code 2."""
    line = cli.error(code=2)
    assert "COMMAND" in line


# -- send, status ----------------------------------------------------------------


def test_send_then_status(cli: CLI, tmp_path: Path) -> None:
    """send stores the message in the default store and prints its id; status
    shows every recipient queued; --json gives the same as data."""
    message_id = cli.send("--to", "a@example.org", "--cc", "b@Other.example")
    assert (tmp_path / DEFAULT_STORE_PATH).exists()
    out = cli.ok("status", message_id)
    assert f"message    {message_id}" in out
    assert "from       me@example.com" in out
    assert "submitted  " in out
    rows = [line.split() for line in out.splitlines() if "@" in line][2:]
    assert [r[:3] for r in rows] == [
        ["a@example.org", "queued", "0"],
        ["b@Other.example", "queued", "0"],
    ]
    out = cli.ok("status", "--json", message_id)
    data = json.loads(out)
    assert data["message_id"] == message_id
    assert data["done"] is False
    assert [(r["address"], r["state"]) for r in data["recipients"]] == [
        ("a@example.org", "queued"),
        ("b@Other.example", "queued"),
    ]


def test_status_shows_a_reply_that_is_not_utf8(cli: CLI, tmp_path: Path) -> None:
    """A reply with bytes that are not UTF-8 shows in its display form; --json
    also gives its exact bytes, base64-encoded."""
    message_id = cli.send("--to", "a@example.org")

    async def record() -> None:
        async with SQLiteStore(tmp_path / DEFAULT_STORE_PATH) as store:
            failed = RecipientStatus(
                address="a@example.org",
                state=RecipientState.FAILED,
                attempts=1,
                code=550,
                enhanced_code="5.1.1",
                message="Empf\\xe4nger unbekannt",
                raw_message=b"Empf\xe4nger unbekannt",
                last_attempt_at=datetime.now(UTC),
            )
            await store.record(message_id, [failed], worker="test")

    anyio.run(record)
    assert "Empf\\xe4nger unbekannt" in cli.ok("status", message_id)
    [r] = json.loads(cli.ok("status", "--json", message_id))["recipients"]
    assert r["message"] == "Empf\\xe4nger unbekannt"
    assert base64.b64decode(r["raw_message"]) == b"Empf\xe4nger unbekannt"


def test_status_marks_a_local_outcome(cli: CLI, tmp_path: Path) -> None:
    """An outcome decided here (no server reply) shows 'local' where a server's
    code would be, and --json says ``"local": true`` with a null code; a server's
    reply keeps its code."""
    message_id = cli.send("--to", "a@example.org", "--to", "b@example.org")

    async def record() -> None:
        async with SQLiteStore(tmp_path / DEFAULT_STORE_PATH) as store:
            now = datetime.now(UTC)
            refused = RecipientStatus(
                address="a@example.org",
                state=RecipientState.DEFERRED,
                attempts=1,
                enhanced_code="4.4.1",
                message="cannot connect to 127.0.0.1:30025: connection refused",
                last_attempt_at=now,
                next_attempt_at=now + timedelta(hours=1),
            )
            rejected = attrs.evolve(
                refused, address="b@example.org", code=451, message="busy"
            )
            await store.record(message_id, [refused, rejected], worker="test")

    anyio.run(record)
    rows = {
        line.split()[0]: line.split()
        for line in cli.ok("status", message_id).splitlines()
        if line.endswith(("refused", "busy"))
    }
    assert rows["a@example.org"][3:5] == ["local", "4.4.1"]
    assert rows["b@example.org"][3:5] == ["451", "4.4.1"]
    a, b = json.loads(cli.ok("status", "--json", message_id))["recipients"]
    assert (a["code"], a["enhanced_code"], a["local"]) == (None, "4.4.1", True)
    assert (b["code"], b["local"]) == (451, False)


def test_send_builds_body_attachments_and_bcc(cli: CLI, tmp_path: Path) -> None:
    """--body-file and --attach end up in the stored bytes; --bcc is an envelope
    recipient but not a header; --json reports the id; a repeated
    --idempotency-key stores nothing new."""
    (tmp_path / "body.txt").write_text("Grüße aus dem Test\n", encoding="utf-8")
    (tmp_path / "report.csv").write_bytes(b"a,b\n1,2\n")
    store = tmp_path / "q.sqlite3"
    args = [
        "send", "--store", str(store), "--json", "--from", "me@example.com",
        "--to", "a@example.org", "--bcc", "hidden@example.net", "--subject", "Report",
        "--body-file", "body.txt", "--attach", "report.csv",
        "--idempotency-key", "report-1",
    ]  # fmt: skip
    out = cli.ok(*args)
    first = json.loads(out)
    assert first["created"] is True
    out = cli.ok(*args)
    assert json.loads(out) == {"message_id": first["message_id"], "created": False}

    async def claim() -> tuple[bytes, list[str]]:
        async with SQLiteStore(store) as s:
            [job] = await s.claim_due(
                now=soon(), worker="t", lease_until=soon(), limit=5
            )
            return job.data, [r.address for r in job.recipients]

    data, recipients = anyio.run(claim)
    assert recipients == ["a@example.org", "hidden@example.net"]
    assert b"hidden@example.net" not in data
    assert b"Subject: Report" in data
    assert b'filename="report.csv"' in data


def test_send_priority_orders_the_claim(cli: CLI, tmp_path: Path) -> None:
    """--priority N is stored with the message: a worker claims the message
    sent with --priority -5 before one sent earlier without (0); a priority out
    of range, or not a number, is a usage error and stores nothing."""
    store = str(tmp_path / "q.sqlite3")
    first = cli.send("--to", "a@example.org", "--store", store)
    urgent = cli.send("--to", "b@example.org", "--priority", "-5", "--store", store)
    for bad in ("1001", "-1001", "high", "1.5"):
        line = cli.error(*SEND, "--priority", bad, "--store", store, code=2)
        assert "argument --priority: must be an integer from -1000 to 1000" in line

    async def claim() -> list[tuple[str, int]]:
        async with SQLiteStore(store) as s:
            jobs = await s.claim_due(
                now=soon(), worker="t", lease_until=soon(), limit=5
            )
            return [(job.message_id, job.priority) for job in jobs]

    assert anyio.run(claim) == [(urgent, -5), (first, 0)]


SEND = ("send", "--from", "me@example.com", "--to", "c@example.org", "--body", "x")


EML = (
    b"From: Me <me@example.com>\r\n"
    b"To: a@example.org, b@example.org\r\n"
    b"Bcc: c@example.net\r\n"
    b"Subject: from a file\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


def recipients(cli: CLI, message_id: str) -> list[str]:
    out = cli.ok("status", "--json", message_id)
    return [r["address"] for r in json.loads(out)["recipients"]]


def test_send_an_eml_file(cli: CLI, tmp_path: Path) -> None:
    """An .eml file's envelope comes from its headers (Bcc included), unless
    --to (and --from) are given."""
    (tmp_path / "m.eml").write_bytes(EML)
    out = cli.ok("send", "m.eml")
    assert recipients(cli, out.strip()) == [
        "a@example.org",
        "b@example.org",
        "c@example.net",
    ]
    out = cli.ok("send", "m.eml", "--to", "only@example.org")
    assert recipients(cli, out.strip()) == ["only@example.org"]
    (tmp_path / "n.eml").write_bytes(EML.replace(b"Subject", b"Message-ID: <n@x>\r\nS"))
    out = cli.ok("send", "n.eml", "--from", "bounce@example.com", "--to", "z@x.org")
    assert out.strip() == "n@x"
    assert recipients(cli, "n@x") == ["z@x.org"]


def test_send_from_stdin(tmp_path: Path) -> None:
    """'send -' reads the message from stdin."""
    store = str(tmp_path / "q.sqlite3")
    result = run("send", "-", "--store", store, input=EML.decode(), env=child_env())
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    status = run("status", message_id, "--store", store, env=child_env())
    assert "c@example.net" in status.stdout


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["missing.eml"], 1, "cannot read message file 'missing.eml': No such file"),
        (["--from", "me@example.com", "--to", "not an address"], 1, "not an address"),
        (["--to", "a@example.org"], 2, "give --from and at least one --to"),
        (["--from", "me@example.com"], 2, "give --from and at least one --to"),
        (["m.eml", "--subject", "x"], 2, "--subject cannot be used with a FILE"),
        (
            [
                "--from",
                "me@example.com",
                "--to",
                "a@example.org",
                "--attach",
                "nope.pdf",
            ],
            1,
            "cannot read attachment 'nope.pdf'",
        ),
        (
            ["--from", "me@example.com", "--to", "a@example.org", "--body-file", "bin"],
            1,
            "body file 'bin' is not UTF-8 text",
        ),
        (["bad.eml"], 1, "no recipients"),
        (["--wait", "0", "--from", "a@b.c", "--to", "d@e.f"], 2, "more than 0 seconds"),
        (["--wait", "soon", "--from", "a@b.c", "--to", "d@e.f"], 2, "not a number"),
    ],
)
def test_send_bad_input(
    cli: CLI, tmp_path: Path, args: list[str], code: int, text: str
) -> None:
    """Every bad input to send is one error line, and nothing is stored."""
    (tmp_path / "m.eml").write_bytes(EML)
    (tmp_path / "bad.eml").write_bytes(
        b"From: me@example.com\r\n\r\nno one to send to\r\n"
    )
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    line = cli.error("send", *args, code=code)
    assert text in line
    if (tmp_path / DEFAULT_STORE_PATH).exists():
        out = cli.ok("queue", "--summary", "--json")
        assert sum(json.loads(out)["by_state"].values()) == 0


def test_status_of_unknown_id(cli: CLI) -> None:
    """An unknown id is one line on stderr and exit code 1."""
    cli.send("--to", "a@example.org")
    line = cli.error("status", "nope@example.com")
    assert line == (
        "mailstrom-async: error: no message with id 'nope@example.com' in the store"
    )


def test_store_problems(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing store is never created by a query, a directory is refused, and
    $MAILSTROM_STORE names the default store."""
    assert "no store at 'mailstrom-queue.sqlite3'" in cli.error("queue")
    assert not (tmp_path / DEFAULT_STORE_PATH).exists()
    (tmp_path / "dir").mkdir()
    for command in (["queue"], ["send", "--from", "a@b.c", "--to", "d@e.f"]):
        line = cli.error(*command, "--store", "dir")
        assert "store 'dir' is a directory" in line
    monkeypatch.setenv("MAILSTROM_STORE", str(tmp_path / "env.sqlite3"))
    message_id = cli.send("--to", "a@example.org")
    assert (tmp_path / "env.sqlite3").exists()
    assert cli("status", message_id)[0] == 0
    monkeypatch.delenv("MAILSTROM_STORE")
    assert "no store at" in cli.error("status", message_id)


def test_store_that_is_not_sqlite(cli: CLI, tmp_path: Path) -> None:
    """A file that is not a SQLite database is one error line."""
    (tmp_path / "junk").write_bytes(b"this is not a database" * 100)
    line = cli.error("queue", "--store", "junk")
    assert "SQLite store 'junk' is not a SQLite database" in line


async def test_store_locked_by_another_process(tmp_path: Path) -> None:
    """A store held by another connection fails within --lock-timeout, in one
    line that says so."""
    store = tmp_path / "q.sqlite3"
    async with SQLiteStore(store):
        pass
    async with aiosqlite.connect(store, isolation_level=None) as other:
        await other.execute("BEGIN EXCLUSIVE")
        for command in (
            ["send", "--from", "a@b.c", "--to", "d@e.f"],
            ["retry", "--all"],
            ["worker"],
        ):
            result = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "mailstrom_async",
                    *command,
                    "--store",
                    str(store),
                    "--lock-timeout",
                    "0.2",
                ],
                check=False,
                env=child_env(),
            )
            err = result.stderr.decode()
            assert result.returncode == 1
            if command[0] == "worker":  # its log lines come first
                err = err.splitlines(keepends=True)[-1]
                assert "Traceback" not in result.stderr.decode()
            assert err.count("\n") == 1
            assert err.startswith("mailstrom-async: error: SQLite store")
            assert "database is locked (another process holds the store" in err
        await other.execute("ROLLBACK")


# -- configuration -----------------------------------------------------------------


def test_bad_configuration(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing or invalid config file, or a bad MAILSTROM_* value, is one line
    naming the file or the setting, for every command."""
    line = cli.error(
        "send", "--config", "nope.toml", "--from", "a@b.c", "--to", "d@e.f"
    )
    assert "cannot read config file 'nope.toml'" in line
    (tmp_path / "bad.toml").write_text("relay = [")
    line = cli.error("worker", "--config", "bad.toml")
    assert "config file 'bad.toml' is not valid TOML" in line
    (tmp_path / "wrong.toml").write_text("[relay]\nhost = 'r'\nport = 'smtp'\n")
    monkeypatch.setenv("MAILSTROM_CONFIG", "wrong.toml")
    assert "relay.port must be an integer" in cli.error("worker")
    monkeypatch.delenv("MAILSTROM_CONFIG")
    monkeypatch.setenv("MAILSTROM_LIMITS__MAX_CONNECTIONS", "many")
    line = cli.error("queue")
    assert line.endswith(
        "limits.max_connections must be an integer, not 'many' "
        "(from MAILSTROM_LIMITS__MAX_CONNECTIONS)"
    )
    monkeypatch.delenv("MAILSTROM_LIMITS__MAX_CONNECTIONS")
    monkeypatch.setenv("MAILSTROM_RELAY__HOSTNAME", "x")
    assert "unknown environment variable MAILSTROM_RELAY__HOSTNAME" in cli.error(
        "send", "--from", "a@b.c", "--to", "d@e.f"
    )


def test_config_file_and_environment_apply(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config settings are used (Message-IDs take message_id_domain), and
    MAILSTROM_* variables override them."""
    (tmp_path / "c.toml").write_text("[mailstrom]\nmessage_id_domain = 'file.test'\n")
    assert cli.send("--to", "a@example.org", "--config", "c.toml").endswith(
        "@file.test"
    )
    monkeypatch.setenv("MAILSTROM_MESSAGE_ID_DOMAIN", "env.test")
    assert cli.send("--to", "a@example.org", "--config", "c.toml").endswith("@env.test")


# -- queue, retry, cancel, purge ------------------------------------------------


def test_queue_counts_and_lists(cli: CLI, tmp_path: Path) -> None:
    """queue --summary counts recipients by state and domain; the deprecated
    --list still shows waiting messages with --state, --domain and --limit, and
    says it is deprecated; --json for scripts."""
    first = cli.send("--to", "a@example.org", "--to", "b@Other.example")
    second = cli.send("--to", "c@example.org")
    cancelled = cli.send("--to", "d@example.org")
    defer(tmp_path / DEFAULT_STORE_PATH, first, "a@example.org", hours=1)
    assert cli("cancel", cancelled)[0] == 0

    out = cli.ok("queue", "--summary")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["DOMAIN"] == [
        "QUEUED",
        "DEFERRED",
        "DELIVERED",
        "FAILED",
        "TOTAL",
        "HELD",
    ]
    assert rows["example.org"] == ["1", "1", "0", "1", "3", "0"]
    assert rows["other.example"] == ["1", "0", "0", "0", "1", "0"]
    assert rows["total"] == ["2", "1", "0", "1", "4", "0"]
    assert list(rows)[1] == "example.org"  # busiest first

    out = cli.ok("queue", "--summary", "--json")
    data = json.loads(out)
    assert data["by_state"] == {"queued": 2, "deferred": 1, "delivered": 0, "failed": 1}
    assert data["by_domain"]["other.example"]["queued"] == 1

    code, out, err = cli("queue", "--list")
    assert code == 0
    assert err == (
        "mailstrom-async: warning: 'queue --list' is deprecated and will be "
        "removed: 'queue' lists the waiting messages now, with sizes and last "
        "replies\n"
    )
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "AGE", "FROM", "RECIPIENTS"]
    assert [line.split()[0] for line in lines[1:-1]] == [first, second]
    assert "a@example.org (deferred), b@Other.example (queued)" in lines[1]
    assert lines[-1] == "2 message(s)"

    def listed(*args: str) -> list[str]:
        out = cli.ok("queue", "--list", "--json", *args)
        return [m["message_id"] for m in json.loads(out)]

    assert listed("--domain", "OTHER.example") == [first]
    assert listed("--state", "failed") == [cancelled]
    assert listed("--state", "deferred", "--state", "failed") == [first, cancelled]
    assert listed("--limit", "1") == [first]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (
            ["--summary", "--state", "queued"],
            "--state, --domain, --held and --limit do not go with --summary",
        ),
        (
            ["--summary", "--held"],
            "--state, --domain, --held and --limit do not go with --summary",
        ),
        (
            ["--shape", "--summary"],
            "argument --summary: not allowed with argument --shape",
        ),
        (["--list", "--shape"], "argument --shape: not allowed with argument --list"),
        (["--state", "lost"], "invalid choice: 'lost'"),
        (["--shape", "--limit", "0"], "at least 1, not '0'"),
        (["--list", "--state", "lost"], "invalid choice: 'lost'"),
        (["--list", "--limit", "0"], "at least 1, not '0'"),
    ],
)
def test_queue_bad_options(cli: CLI, args: list[str], text: str) -> None:
    """Bad queue options are one usage line, exit code 2."""
    cli.send("--to", "a@example.org")
    assert text in cli.error("queue", *args, code=2)


def test_retry(cli: CLI, tmp_path: Path) -> None:
    """retry ID / --domain / --all make deferred recipients due now and say how
    many; recipients already due are not counted."""
    store = tmp_path / DEFAULT_STORE_PATH
    first = cli.send("--to", "a@example.org", "--to", "b@other.example")
    second = cli.send("--to", "c@example.org")
    for message_id, address in (
        (first, "a@example.org"),
        (first, "b@other.example"),
        (second, "c@example.org"),
    ):
        defer(store, message_id, address, hours=1)
    assert cli("retry", "--domain", "OTHER.example") == (
        0,
        "1 recipient(s) made due now\n",
        "",
    )
    assert cli("retry", first)[1] == "1 recipient(s) made due now\n"
    out = cli.ok("retry", "--all", "--json")
    assert json.loads(out) == {"due_now": 1}
    assert cli("retry", "--all")[1] == "0 recipient(s) made due now\n"
    out = cli.ok("status", "--json", second)
    [c] = json.loads(out)["recipients"]
    assert c["state"] == "deferred"
    assert datetime.fromisoformat(c["next_attempt_at"]) <= datetime.now(UTC)


@pytest.mark.parametrize(
    "args",
    [[], ["ID", "--all"], ["--domain", "x.org", "--all"], ["ID", "--domain", "x"]],
)
def test_retry_needs_exactly_one_target(cli: CLI, args: list[str]) -> None:
    """retry takes exactly one of ID, --domain or --all."""
    line = cli.error("retry", *args, code=2)
    assert "give exactly one of ID, --domain DOMAIN or --all" in line


def test_retry_and_cancel_unknown_id(cli: CLI) -> None:
    """retry and cancel of an unknown id are one line, exit code 1."""
    cli.send("--to", "a@example.org")
    assert "no message with id 'nope'" in cli.error("retry", "nope")
    assert "no message with id 'nope'" in cli.error("cancel", "nope")


def test_hold_and_release(cli: CLI, tmp_path: Path) -> None:
    """hold ID / --domain hold waiting recipients and say how many; status,
    queue --summary and queue --list show them held; retry skips them; release ID /
    --domain / --all release them; --json for scripts."""
    store = tmp_path / DEFAULT_STORE_PATH
    first = cli.send("--to", "a@example.org", "--to", "b@other.example")
    second = cli.send("--to", "c@Example.org")
    free = cli.send("--to", "d@free.example")
    defer(store, second, "c@Example.org", hours=1)
    assert cli("hold", first) == (0, f"held 2 recipient(s) of {first}\n", "")
    assert cli.ok("hold", "--domain", "EXAMPLE.org") == (
        "held 1 recipient(s) of domain example.org\n"
    )
    assert json.loads(cli.ok("hold", first, "--json")) == {
        "held": 0,
        "message_id": first,
        "domain": None,
    }

    out = cli.ok("status", first)
    rows = [line.split() for line in out.splitlines() if line[1:2] == "@"]
    assert [r[:4] for r in rows] == [
        ["a@example.org", "queued", "(held)", "0"],
        ["b@other.example", "queued", "(held)", "0"],
    ]
    assert out.endswith(
        f"2 recipient(s) on hold: not tried until 'mailstrom-async release {first}'\n"
    )
    data = json.loads(cli.ok("status", "--json", second))
    assert data["held"] is True
    assert [(r["state"], r["held"]) for r in data["recipients"]] == [("deferred", True)]
    assert "on hold" not in cli.ok("status", free)

    out = cli.ok("queue", "--summary")
    counts = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert counts["example.org"] == ["1", "1", "0", "0", "2", "2"]
    assert counts["free.example"] == ["1", "0", "0", "0", "1", "0"]
    assert counts["total"] == ["3", "1", "0", "0", "4", "3"]
    data = json.loads(cli.ok("queue", "--summary", "--json"))
    assert data["held"] == 3
    assert data["held_by_domain"] == {"example.org": 2, "other.example": 1}

    lines = cli.ok("queue", "--list").splitlines()
    assert "a@example.org (queued, held), b@other.example (queued, held)" in lines[1]
    assert "c@Example.org (deferred, held)" in lines[2]
    assert "d@free.example (queued)" in lines[3]
    assert lines[-1] == "3 message(s), 2 with held mail"
    listed = json.loads(cli.ok("queue", "--list", "--held", "--json"))
    assert [m["message_id"] for m in listed] == [first, second]
    assert cli.ok("queue", "--list", "--held", "--domain", "free.example") == (
        "ID  AGE  FROM  RECIPIENTS\n0 message(s)\n"
    )

    assert cli.ok("retry", "--all") == "0 recipient(s) made due now\n"
    assert cli.ok("release", "--domain", "other.example") == (
        "released 1 recipient(s) of domain other.example\n"
    )
    assert cli.ok("release", first) == f"released 1 recipient(s) of {first}\n"
    assert json.loads(cli.ok("release", "--all", "--json")) == {
        "released": 1,
        "message_id": None,
        "domain": None,
        "all": True,
    }
    assert cli.ok("release", "--all") == "released 0 recipient(s) in the queue\n"
    assert json.loads(cli.ok("queue", "--summary", "--json"))["held"] == 0
    [c] = json.loads(cli.ok("status", "--json", second))["recipients"]
    assert (c["state"], c["held"]) == ("deferred", False)
    assert datetime.fromisoformat(c["next_attempt_at"]) > datetime.now(UTC)


@pytest.mark.parametrize(
    ("command", "args", "text"),
    [
        ("hold", [], "give exactly one of ID or --domain DOMAIN"),
        ("hold", ["ID", "--domain", "x.org"], "give exactly one of ID or --domain"),
        ("hold", ["--all"], "unrecognized arguments: --all"),
        ("release", [], "give exactly one of ID, --domain DOMAIN or --all"),
        ("release", ["ID", "--all"], "give exactly one of ID, --domain DOMAIN or"),
        ("release", ["--domain", "x.org", "--all"], "give exactly one of ID,"),
        ("release", ["ID", "--domain", "x"], "give exactly one of ID, --domain"),
    ],
)
def test_hold_and_release_need_exactly_one_target(
    cli: CLI, command: str, args: list[str], text: str
) -> None:
    """hold takes exactly one of ID or --domain, release one of ID, --domain or
    --all: a slip never holds or releases the whole queue."""
    cli.send("--to", "a@example.org")
    assert text in cli.error(command, *args, code=2)


def test_hold_and_release_unknown_id_or_store(cli: CLI) -> None:
    """hold and release of an unknown id, or without a store, are one line,
    exit code 1."""
    assert "no store at" in cli.error("hold", "--domain", "example.org")
    assert "no store at" in cli.error("release", "--all")
    cli.send("--to", "a@example.org")
    assert "no message with id 'nope'" in cli.error("hold", "nope")
    assert "no message with id 'nope'" in cli.error("release", "nope")


def test_cancel_then_purge(cli: CLI) -> None:
    """cancel fails the waiting recipients; purge deletes finished messages
    older than the duration, never waiting ones."""
    cancelled = cli.send("--to", "a@example.org", "--to", "b@example.org")
    waiting = cli.send("--to", "c@example.org")
    assert cli("cancel", cancelled)[1] == f"cancelled 2 recipient(s) of {cancelled}\n"
    out = cli.ok("cancel", "--json", cancelled)
    assert json.loads(out) == {"message_id": cancelled, "cancelled": 0}
    out = cli.ok("status", cancelled)
    assert out.count("failed") == 2
    assert out.count("cancelled by operator") == 2
    out = cli.ok("purge", "--older-than", "7d")
    assert out.startswith("purged 0 finished message(s) older than ")
    out = cli.ok("purge", "--older-than", "0s", "--json")
    assert json.loads(out)["purged"] == 1
    assert "no message with id" in cli.error("status", cancelled)
    assert cli("status", waiting)[0] == 0
    assert cli("purge", "--older-than", "3000000d")[1].startswith("purged 0 ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * 86400),
        ("12h", 12 * 3600),
        ("30m", 1800),
        ("3600s", 3600),
        ("1w", 7 * 86400),
        ("1d12h", 36 * 3600),
        ("1.5h", 5400),
        ("90", 90),
        (" 2D ", 2 * 86400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    """Durations take s/m/h/d/w units, combined, or plain seconds."""
    assert duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7x", "d", "7d-", "1d 2h", "-5s", "1e9999"])
def test_bad_durations(cli: CLI, text: str) -> None:
    """A bad duration is one usage line naming it, exit code 2."""
    line = cli.error("purge", f"--older-than={text}", code=2)
    assert f"invalid duration {text!r}: use e.g. 7d, 12h, 30m or 3600s" in line


# -- demo ----------------------------------------------------------------------------


def test_demo_delivers_defers_and_fails(tmp_path: Path) -> None:
    """The demo shows DELIVERED, DEFERRED-then-DELIVERED and FAILED recipients."""
    store = tmp_path / "demo.sqlite3"
    result = run("demo", "--messages", "2", "--store", str(store))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "deferred  busy@example.org  (451 Mailbox busy" in out
    assert "failed    nobody@example.com  (550 No such user here)" in out
    rows = [
        line.split()
        for line in out.splitlines()
        if "@example." in line and "  " in line
    ]
    table = {(r[1], r[2]) for r in rows if len(r) >= 4 and r[2].isupper()}
    assert ("busy@example.org", "DELIVERED") in table
    assert ("nobody@example.com", "FAILED") in table
    assert ("alice@example.com", "DELIVERED") in table
    assert "5 delivered, 1 failed" in out
    assert store.exists()


def test_demo_rejects_a_bad_count(cli: CLI) -> None:
    """A message count below one is one clear error line and exit code 2."""
    line = cli.error("demo", "--messages", "0", code=2)
    assert line.startswith("mailstrom-async: error: --messages must be at least 1")


def test_store_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    """An unusable store path is reported in one line, without a traceback."""
    result = run("demo", "--store", str(tmp_path / "missing" / "q.sqlite3"))
    assert result.returncode == 1
    assert result.stderr.startswith("mailstrom-async: error:")
    assert "Traceback" not in result.stderr


def test_mx_demo_walks_mx_hosts_and_dns_outcomes() -> None:
    """demo --mx delivers via the second MX when the first refuses, and fails
    null-MX and NXDOMAIN recipients without connecting."""
    result = run("demo", "--mx")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "delivered alice@example.com  (via mx2.example.com 127.0.0.3)" in out
    assert "failed    carol@nomail.example.org  (local " in out
    assert "failed    dave@no-such-domain.example  (local " in out
    assert "mx1.example.com (127.0.0.2) refused 1 session(s)" in out


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["queue", "--lock-timeout", "-1"], "must be 0 or more seconds, not '-1'"),
        (["queue", "--lock-timeout", "nan"], "not a finite number of seconds: 'nan'"),
        (["queue", "--lock-timeout", "soon"], "not a number of seconds: 'soon'"),
        (["queue", "--list", "--limit", "ten"], "at least 1, not 'ten'"),
        (["sink", "--port", "smtp"], "not a port number (0 to 65535): 'smtp'"),
        (["status"], "the following arguments are required: ID"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_numbers_and_names(cli: CLI, args: list[str], text: str) -> None:
    """Bad numbers, missing arguments and unknown commands are usage errors."""
    assert text in cli.error(*args, code=2)


def test_ages() -> None:
    """Ages are short: seconds, minutes, hours and minutes, days and hours."""
    now = datetime(2030, 1, 10, tzinfo=UTC)
    assert [
        age(now - timedelta(seconds=s), now)
        for s in (-5, 45, 150, 3 * 3600 + 20 * 60, 2 * 86400 + 4 * 3600 + 5)
    ] == ["0s", "45s", "2m", "3h20m", "2d4h"]


def test_errors_inside_exception_groups_are_one_line() -> None:
    """An error meant for a person is found inside (nested) exception groups;
    anything else is a bug and is not turned into a line."""
    group = BaseExceptionGroup(
        "tasks", [ValueError("bug"), ExceptionGroup("inner", [CLIError("bad\ninput")])]
    )
    assert _reason(group) == "bad input"
    assert _reason(ExceptionGroup("tasks", [ValueError("bug")])) is None
    assert _reason(ValueError("bug")) is None


# -- issue 11: IDNA 2008 domains and secrets in the CLI --------------------------------


def test_config_errors_about_the_password_never_show_it(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad relay password in the config file or the environment: the error line
    names the setting and the type, never the value."""
    (tmp_path / "c.toml").write_text(
        "[mailstrom.relay]\nhost = 'r'\nusername = 'u'\npassword = 91827364\n"
    )
    code, out, err = cli("queue", "--config", "c.toml")
    assert code == 1
    assert err == "mailstrom-async: error: relay.password must be a string, not int\n"
    assert "91827364" not in out + err
    secret = "hunter2-very-secret"
    monkeypatch.setenv("MAILSTROM_RELAY__HOST", "smtp.example.com")
    monkeypatch.setenv("MAILSTROM_RELAY__PASSWORD", secret)
    for command in (
        ["queue"],
        ["send", "--from", "a@b.example", "--to", "c@d.example"],
    ):
        code, out, err = cli(*command)
        assert code == 1
        assert "relay.username and relay.password must be set together" in err
        assert secret not in out + err
    monkeypatch.setenv("MAILSTROM_RELAY__USERNAME", "u")
    monkeypatch.setenv("MAILSTROM_RELAY__TLS", "none")
    code, out, err = cli("worker")
    assert code == 1
    assert "relay.tls is 'none' but credentials are set" in err
    assert secret not in out + err


def test_idn_domains_in_send_and_hold(cli: CLI) -> None:
    """send queues an IDN recipient under its IDNA 2008 A-label, refuses one IDNA
    2008 refuses naming the address, and hold --domain takes the Unicode form."""
    message_id = cli.send("--to", "a@faß.example")
    out = cli.ok("status", message_id)
    assert "a@xn--fa-hia.example" in out
    assert cli.ok("hold", "--domain", "FAß.example") == (
        "held 1 recipient(s) of domain xn--fa-hia.example\n"
    )
    line = cli.error(
        "send", "--from", "me@example.com", "--body", "x", "--to", "b@a\u200db.example"
    )
    assert "'b@a\\u200db.example'" in line
    assert "IDNA 2008" in line
