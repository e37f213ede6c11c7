"""The transport chosen by name: ``Config.transport`` and ``MAILSTROM_TRANSPORT``
(issue 12, "a switch like Django's email backends").

Every test runs a real Deliverer over a MemoryStore or an SQLiteStore; console
output is read from the real ``sys.stdout`` (capsys) or a stream; the command
runs as a child process.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import anyio
import pytest

from mailstrom_async import (
    Config,
    ConfigError,
    ConsoleTransport,
    Deliverer,
    Email,
    MemoryStore,
    MessageStatus,
    NullTransport,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    SQLiteStore,
    Store,
)
from mailstrom_async.testing import (
    Outbox,
    OutboxMessage,
    sent_messages,
    shared_outbox,
)
from tests.cli_support import COMMAND, child_env

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
ALLOWED = "'smtp', 'console', 'outbox', 'null'"
DEADLINE = 10


@pytest.fixture(autouse=True)
def no_transport_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets MAILSTROM_TRANSPORT itself, if at all."""
    monkeypatch.delenv("MAILSTROM_TRANSPORT", raising=False)


def welcome(to: str = "ada@example.org") -> Email:
    return Email(
        sender="shop@example.com",
        to=[to],
        subject="Grüße from the shop",
        text="Hello Ada,\nyour account is ready.\n",
    )


async def deliver_one(
    config: Config | None = None, *, store: Store | None = None, **kwargs: object
) -> MessageStatus:
    """Submit one message through a new Deliverer and wait for its outcome."""
    async with Deliverer(
        config or Config(helo_name="localhost"),
        store=store or MemoryStore(),
        **kwargs,  # type: ignore[arg-type]
    ) as deliverer:
        handle = await deliverer.submit(welcome())
        with anyio.fail_after(DEADLINE):
            return await handle


# -- Config: the key, from every source ----------------------------------------------


def test_config_transport_defaults_to_none_and_takes_the_four_names() -> None:
    assert Config().transport is None
    for name in ("smtp", "console", "outbox", "null"):
        assert Config(transport=name).transport == name
        assert Config.from_mapping({"transport": name}).transport == name


@pytest.mark.parametrize("bad", ["mail", "Console", "", 1, ["smtp"]])
def test_config_refuses_a_transport_that_is_not_one_of_the_four(bad: object) -> None:
    with pytest.raises(ConfigError) as direct:
        Config(transport=bad)  # type: ignore[arg-type]
    assert direct.value.key == "transport"
    assert f"transport must be one of {ALLOWED}" in str(direct.value)
    assert repr(bad) in str(direct.value)
    with pytest.raises(ConfigError) as mapped:
        Config.from_mapping({"transport": bad})
    assert mapped.value.key == "transport"
    assert f"must be one of {ALLOWED}, not {bad!r}" in str(mapped.value)


def test_config_reads_the_transport_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "mailstrom.toml"
    path.write_text('[mailstrom]\ntransport = "console"\n')
    assert Config.from_toml(path).transport == "console"
    path.write_text('transport = "printer"\n')
    with pytest.raises(ConfigError, match=r"transport must be one of .*'printer'"):
        Config.from_toml(path)


def test_config_from_env_reads_mailstrom_transport() -> None:
    assert Config.from_env({"MAILSTROM_TRANSPORT": " null "}).transport == "null"
    assert Config.from_env({"MAILSTROM_TRANSPORT": ""}).transport is None
    # The variable wins over the file's value, as every MAILSTROM_* variable does.
    base = {"transport": "smtp"}
    assert Config.from_env({"MAILSTROM_TRANSPORT": "outbox"}, base=base).transport == (
        "outbox"
    )
    with pytest.raises(ConfigError) as exc:
        Config.from_env({"MAILSTROM_TRANSPORT": "konsole"})
    assert exc.value.key == "transport"
    assert str(exc.value) == (
        f"transport must be one of {ALLOWED}, not 'konsole' (from MAILSTROM_TRANSPORT)"
    )


# -- null and console ----------------------------------------------------------------


async def test_null_discards_and_delivers_with_a_local_outcome(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = await deliver_one(Config(helo_name="localhost", transport="null"))
    [recipient] = status.recipients
    assert recipient.state is DELIVERED
    assert recipient.code is None  # local: no server said 250
    assert recipient.enhanced_code == "2.0.0"
    assert recipient.message == "discarded by the null transport, not sent"
    assert recipient.host == "null"
    assert (recipient.ip, recipient.tls) == (None, False)
    assert capsys.readouterr().out == ""
    assert sent_messages() == []


async def test_console_prints_the_message_to_stdout_as_sent(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAILSTROM_TRANSPORT=console, no code change: the message is on stdout, as it
    went on the wire, between an envelope line and an end line."""
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "console")
    status = await deliver_one()
    [recipient] = status.recipients
    assert recipient.state is DELIVERED
    assert recipient.code is None
    assert recipient.host == "console"
    assert "written to the console" in (recipient.message or "")
    out = capsys.readouterr().out
    lines = out.splitlines()
    rule = "-" * 72
    assert lines[0] == rule
    assert lines[1] == "MAIL FROM:<shop@example.com> RCPT TO:<ada@example.org>"
    assert lines[2] == rule
    assert lines[-1] == rule
    assert "\r" not in out
    assert "To: ada@example.org" in lines
    assert f"Message-ID: <{status.message_id}>" in lines
    # Decoded for reading: the encoded word of the Subject, the text part.
    assert "Subject: Grüße from the shop" in lines
    assert "your account is ready." in lines
    assert out.count(rule) == 3


async def test_console_writes_to_a_chosen_stream_one_message_at_a_time() -> None:
    """ConsoleTransport(stream=...) writes there; several messages on several
    connections at once never interleave."""
    stream = io.StringIO()
    async with Deliverer(
        Config(helo_name="localhost"),
        store=MemoryStore(),
        transport=ConsoleTransport(stream=stream),
    ) as deliverer:
        handles = [
            await deliverer.submit(welcome(f"user{i}@example{i % 3}.org"))
            for i in range(12)
        ]
        with anyio.fail_after(DEADLINE):
            statuses = [await h for h in handles]
    assert all(s.recipients[0].state is DELIVERED for s in statuses)
    blocks = stream.getvalue().split("-" * 72 + "\n")
    # Each message: rule, envelope, rule, message, rule.
    assert blocks[0] == ""
    envelopes = blocks[1::3]
    assert sorted(envelopes) == sorted(
        f"MAIL FROM:<shop@example.com> RCPT TO:<user{i}@example{i % 3}.org>\n"
        for i in range(12)
    )
    for body in blocks[2::3]:
        assert body.startswith("From: shop@example.com\n")
        assert body.endswith("your account is ready.\n")


async def test_console_shows_raw_bytes_it_cannot_decode() -> None:
    """A part in an unknown charset cannot be decoded: the message is shown as
    its bytes (non-UTF-8 bytes escaped), and still delivered."""
    data = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: raw\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n"
    )
    stream = io.StringIO()
    async with Deliverer(
        Config(helo_name="localhost"),
        store=MemoryStore(),
        transport=ConsoleTransport(stream=stream),
    ) as deliverer:
        handle = await deliverer.submit(
            data, mail_from="a@example.com", rcpt_to=["b@example.org"]
        )
        with anyio.fail_after(DEADLINE):
            status = await handle
    assert status.recipients[0].state is DELIVERED
    out = stream.getvalue()
    assert "Content-Type: text/plain; charset=x-no-such-charset\n" in out
    assert "\ncaf\\xe9\n" in out


async def test_console_write_that_fails_defers_the_recipient() -> None:
    """A closed stream: the recipient is DEFERRED with the reason, not lost."""
    stream = io.StringIO()
    stream.close()
    async with Deliverer(
        Config(helo_name="localhost", retry=RetryPolicy(initial_delay=600, jitter=0)),
        store=MemoryStore(),
        transport=ConsoleTransport(stream=stream),
    ) as deliverer:
        async with deliverer.events() as events:
            handle = await deliverer.submit(welcome())
            with anyio.fail_after(DEADLINE):
                async for event in events:
                    if event.state is not RecipientState.QUEUED:
                        break
        status = await handle.status()
    [recipient] = status.recipients
    assert recipient.state is DEFERRED
    assert recipient.code is None
    assert recipient.message == (
        "cannot write the message to the console: I/O operation on closed file"
    )


async def test_the_store_still_keeps_the_message(tmp_path: Path) -> None:
    """Submit stays durable: the message and its final status are in the SQLite
    store after the Deliverer closed."""
    path = tmp_path / "queue.sqlite3"
    status = await deliver_one(
        Config(helo_name="localhost", transport="null"), store=SQLiteStore(path)
    )
    store = SQLiteStore(path)
    await store.open()
    try:
        stored = await store.status(status.message_id)
    finally:
        await store.aclose()
    assert stored.recipients[0].state is DELIVERED
    assert stored.recipients[0].host == "null"
    assert stored.recipients[0].attempts == 1


async def test_a_worker_in_deliver_mode_takes_the_transport_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit-only process stores; a worker with MAILSTROM_TRANSPORT=outbox
    delivers into the outbox."""
    path = tmp_path / "queue.sqlite3"
    async with Deliverer(Config(), store=SQLiteStore(path), mode="submit") as web:
        handle = await web.submit(welcome())
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "outbox")
    async with Deliverer(
        Config(poll_interval=0.05), store=SQLiteStore(path), mode="deliver"
    ):
        with anyio.fail_after(DEADLINE):
            [message] = await shared_outbox().wait_for(1)
    assert message.message_id == handle.message_id


# -- outbox --------------------------------------------------------------------------


async def test_outbox_by_config_is_read_with_no_plumbing() -> None:
    status = await deliver_one(Config(helo_name="localhost", transport="outbox"))
    [message] = sent_messages()
    assert message.message_id == status.message_id
    assert message.subject == "Grüße from the shop"
    assert message.rcpt_to == ("ada@example.org",)
    assert status.recipients[0].host == "outbox"
    assert status.recipients[0].state is DELIVERED


async def test_outbox_fixture_is_the_shared_outbox_and_is_scriptable(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``outbox`` fixture, sent_messages() and transport="outbox" are one
    place, so its scripted replies hold for the application's own Deliverer."""
    assert outbox is shared_outbox()
    assert outbox.messages == []
    outbox.fail("ada@example.org")
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "outbox")
    status = await deliver_one()
    assert status.recipients[0].state is RecipientState.FAILED
    assert status.recipients[0].code == 550
    assert sent_messages() == []
    outbox.clear_script()
    status = await deliver_one()
    assert [m.message_id for m in outbox.messages] == [status.message_id]


async def test_deliverer_fixture_and_the_app_land_in_the_same_outbox(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    first = await deliverer.submit(welcome("one@example.org"))
    second = await deliver_one(Config(helo_name="localhost", transport="outbox"))
    with anyio.fail_after(DEADLINE):
        await first
    assert {m.message_id for m in sent_messages()} == {
        first.message_id,
        second.message_id,
    }


def test_shared_outbox_is_empty_at_the_start_of_each_test_a() -> None:
    """With test _b (either order): what one test sent is gone in the next."""
    assert sent_messages() == []
    assert shared_outbox().connections == 0
    shared_outbox()._received(_captured())
    shared_outbox().defer("ada@example.org")


def test_shared_outbox_is_empty_at_the_start_of_each_test_b() -> None:
    test_shared_outbox_is_empty_at_the_start_of_each_test_a()


def _captured() -> OutboxMessage:
    from mailstrom_async._capture import capture

    return capture("a@example.com", ("b@example.org",), b"Subject: x\r\n\r\nx\r\n")


# -- precedence, bad values, the start line ------------------------------------------


async def test_config_value_wins_over_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "console")
    status = await deliver_one(Config(helo_name="localhost", transport="null"))
    assert status.recipients[0].host == "null"
    assert capsys.readouterr().out == ""


async def test_config_smtp_wins_over_the_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """transport="smtp" in the Config sends by SMTP whatever the variable says:
    here to a port where nothing listens, so the recipient is DEFERRED; a
    warning says the variable is ignored."""
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "null")
    caplog.set_level(logging.WARNING, logger="mailstrom_async.deliverer")
    config = Config(
        helo_name="localhost",
        transport="smtp",
        relay=RelayConfig(host="127.0.0.1", port=1, tls="none"),
        retry=RetryPolicy(initial_delay=600, jitter=0),
    )
    async with (
        Deliverer(config, store=MemoryStore()) as deliverer,
        deliverer.events() as events,
    ):
        await deliverer.submit(welcome())
        with anyio.fail_after(DEADLINE):
            async for event in events:
                if event.state is not RecipientState.QUEUED:
                    break
    assert event.state is DEFERRED
    assert event.recipient.host == "127.0.0.1"
    [ignored] = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert ignored.levelno == logging.WARNING
    assert ignored.getMessage() == (
        "MAILSTROM_TRANSPORT='null' is ignored: the configuration says transport='smtp'"
    )


async def test_an_explicit_transport_wins_over_config_and_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "console")
    own = Outbox()
    await deliver_one(Config(helo_name="localhost", transport="null"), transport=own)
    assert len(own.messages) == 1
    assert sent_messages() == []
    assert capsys.readouterr().out == ""


async def test_the_variable_is_read_when_the_deliverer_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deliverer = Deliverer(Config(helo_name="localhost"), store=MemoryStore())
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "outbox")
    async with deliverer:
        handle = await deliverer.submit(welcome())
        with anyio.fail_after(DEADLINE):
            await handle
    assert [m.message_id for m in sent_messages()] == [handle.message_id]


@pytest.mark.parametrize("mode", ["both", "submit", "deliver"])
async def test_a_bad_variable_stops_the_deliverer_at_start(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """In every mode, so that a typo shows in the web process too; nothing opens."""
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "consloe")
    deliverer = Deliverer(Config(), store=MemoryStore(), mode=mode)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as exc:
        async with deliverer:
            pytest.fail("entered")
    assert exc.value.key == "transport"
    assert (
        str(exc.value) == f"MAILSTROM_TRANSPORT must be one of {ALLOWED}, not 'consloe'"
    )
    assert deliverer.is_closed


async def start_line(
    caplog: pytest.LogCaptureFixture, config: Config
) -> logging.LogRecord:
    """The one "deliverer started" record of a Deliverer opened and closed."""
    with caplog.at_level(logging.INFO, logger="mailstrom_async.deliverer"):
        async with Deliverer(config, store=MemoryStore()):
            pass
    [start] = [
        r for r in caplog.records if r.getMessage().startswith("deliverer started")
    ]
    return start


@pytest.mark.parametrize(
    ("config", "variable", "expected"),
    [
        (
            Config(transport="null"),
            None,
            "deliverer started; transport='null' in the configuration: "
            "mail is discarded, nothing is sent",
        ),
        (
            Config(),
            "console",
            "deliverer started; MAILSTROM_TRANSPORT=console: "
            "mail is written to standard output, nothing is sent",
        ),
        (
            Config(),
            "outbox",
            "deliverer started; MAILSTROM_TRANSPORT=outbox: "
            "mail is kept in the process-wide outbox (for tests), nothing is sent",
        ),
    ],
)
async def test_the_start_line_warns_when_nothing_is_sent(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    config: Config,
    variable: str | None,
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if variable is not None:
        monkeypatch.setenv("MAILSTROM_TRANSPORT", variable)
    start = await start_line(caplog, config)
    assert start.levelno == logging.WARNING
    assert start.getMessage() == expected
    assert start.delivery == (config.transport or variable)  # type: ignore[attr-defined]
    assert start.transport_source == (  # type: ignore[attr-defined]
        "config" if variable is None else "MAILSTROM_TRANSPORT"
    )


async def test_the_start_line_of_smtp_is_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = Config(
        transport="smtp",
        relay=RelayConfig(host="relay.test", port=2525, tls="none"),
    )
    start = await start_line(caplog, config)
    assert start.levelno == logging.INFO
    assert start.getMessage() == (
        "deliverer started; mail goes through the relay relay.test:2525"
    )


def test_reprs() -> None:
    assert repr(ConsoleTransport()) == "<ConsoleTransport stream=sys.stdout>"
    assert repr(NullTransport()) == "<NullTransport>"


# -- the command ---------------------------------------------------------------------


async def test_cli_send_wait_prints_the_message_with_console(tmp_path: Path) -> None:
    """``MAILSTROM_TRANSPORT=console mailstrom-async send --wait``: the message on
    stdout, the recipient delivered (exit 0), the warning on stderr, and no
    network (no relay is configured: smtp would go to the MX hosts)."""
    env = child_env(
        MAILSTROM_TRANSPORT="console",
        MAILSTROM_STORE=str(tmp_path / "q.sqlite3"),
        MAILSTROM_HELO_NAME="client.test",
    )
    result = await anyio.run_process(
        [
            *COMMAND,
            "send",
            "--wait",
            "30",
            "--from",
            "me@example.com",
            "--to",
            "you@example.org",
            "--subject",
            "Console test",
            "--body",
            "Hello from the console.",
        ],
        env=env,
        check=False,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert "MAIL FROM:<me@example.com> RCPT TO:<you@example.org>" in out
    assert "Subject: Console test" in out
    assert "Hello from the console." in out
    assert "you@example.org" in out.split("-" * 72)[-1]  # the outcome table
    assert "delivered" in out.split("-" * 72)[-1]
    assert "MAILSTROM_TRANSPORT=console" in err


async def test_cli_send_wait_refuses_a_bad_transport(tmp_path: Path) -> None:
    env = child_env(
        MAILSTROM_TRANSPORT="stdout", MAILSTROM_STORE=str(tmp_path / "q.db")
    )
    result = await anyio.run_process(
        [
            *COMMAND,
            "send",
            "--wait",
            "5",
            "--from",
            "me@example.com",
            "--to",
            "you@example.org",
        ],
        env=env,
        check=False,
    )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"transport must be one of {ALLOWED}, not 'stdout'" in err
    assert "MAILSTROM_TRANSPORT" in err


async def test_cli_send_wait_json_ends_with_the_json_line(tmp_path: Path) -> None:
    """With --json the printed message comes first, and everything after its end
    line is the outcome as JSON (docs/configuration.md says so)."""
    env = child_env(
        MAILSTROM_TRANSPORT="console", MAILSTROM_STORE=str(tmp_path / "q.db")
    )
    result = await anyio.run_process(
        [
            *(*COMMAND, "send", "--wait", "30"),
            *("--json", "--from", "me@example.com", "--to", "you@example.org"),
        ],
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.startswith("-" * 72 + "\nMAIL FROM:<me@example.com>")
    outcome = json.loads(out.split("-" * 72 + "\n")[-1])
    assert outcome["recipients"][0]["state"] == "delivered"
    assert outcome["recipients"][0]["local"] is True
