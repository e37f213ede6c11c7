"""Per-attempt history through real deliveries: ``Deliverer.history``.

Every attempt of every recipient is kept (bounded per recipient by
``Limits.history_per_recipient``), written in the same store call as the
outcome, and read back from the store by any Deliverer, submit-only ones too.
"""

from __future__ import annotations

import json
import ssl
import sys
from datetime import UTC, datetime
from pathlib import Path

import aiosmtpd.smtp
import anyio
import pytest
from aiosmtpd.smtp import Envelope, Session

from mailstrom_async import (
    AttemptRecord,
    Config,
    ConfigError,
    Deliverer,
    DelivererClosedError,
    Limits,
    MemoryStore,
    NewMessage,
    RecipientState,
    RetryPolicy,
    SQLiteStore,
    UnknownMessageError,
)
from mailstrom_async._domain import recipient_key
from tests.cli_support import child_env
from tests.smtpd import (  # noqa: F401 - fixtures
    FaultHandler,
    SMTPDServers,
    free_port,
    smtpd_fixture,
)
from tests.test_relay_faults import DEADLINE, done, email, relay_config

DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED
RCPT = "rcpt@example.org"


class DeferFirst(FaultHandler):
    """Answers each address's first RCPT with *first_reply*, then as usual."""

    def __init__(self, first_reply: str = "451 4.7.1 greylisted, come back later"):
        super().__init__()
        self.first_reply = first_reply
        self.seen: set[tuple[str, str]] = set()

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: aiosmtpd.smtp.SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        key = recipient_key(address)
        if key not in self.seen:
            self.seen.add(key)
            return self.first_reply
        return await super().handle_RCPT(
            server, session, envelope, address, rcpt_options
        )


def _check_times(history: tuple[AttemptRecord, ...]) -> None:
    for record in history:
        assert record.started_at.utcoffset() is not None
        assert record.duration >= 0
        assert record.finished_at >= record.started_at
    starts = [r.started_at for r in history]
    assert starts == sorted(starts)


async def test_451_then_250_gives_two_records(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A recipient greylisted once and then delivered has two records: 451 and
    DEFERRED, then 250 and DELIVERED, with the host, IP and TLS of each; a
    submit-only Deliverer on the same store file reads the same history."""
    server = await smtpd.start(DeferFirst())
    config = relay_config(server.port)
    path = tmp_path / "q.db"
    async with Deliverer(config, store=SQLiteStore(path)) as d:
        handle = await d.submit(email(RCPT, "other@example.org"))
        status = await done(handle)
        history = await d.history(handle.message_id)
    assert status.is_delivered
    assert [(r.address, r.attempt, r.code, r.state) for r in history] == [
        (RCPT, 1, 451, DEFERRED),
        ("other@example.org", 1, 451, DEFERRED),
        (RCPT, 2, 250, DELIVERED),
        ("other@example.org", 2, 250, DELIVERED),
    ]
    first, _, last, _ = history
    assert (first.enhanced_code, first.message) == (
        "4.7.1",
        "greylisted, come back later",
    )
    assert last.enhanced_code == "2.0.0"
    assert not first.is_local
    for record in history:
        assert (record.host, record.ip) == ("127.0.0.1", "127.0.0.1")
        assert (record.tls, record.tls_verified) == (False, False)
    _check_times(history)
    assert status.recipient(RCPT).attempts == 2
    async with Deliverer(config, store=SQLiteStore(path), mode="submit") as reader:
        assert await reader.history(handle.message_id) == history


async def test_refused_connection_gives_a_local_record() -> None:
    """An attempt whose connection is refused is recorded with no code, 4.4.1
    and the local reason: is_local, as the recipient's status is."""
    port = free_port()
    config = relay_config(port, retry=RetryPolicy(initial_delay=600, jitter=0))
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email(RCPT))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.previous_state is not None:
                    break
        [record] = await d.history(handle.message_id)
        status = await handle.status()
    assert record.code is None
    assert record.is_local
    assert record.enhanced_code == "4.4.1"
    assert record.message == f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert record.state is DEFERRED
    assert record.attempt == 1
    [r] = status
    assert (r.code, r.enhanced_code, r.message) == (None, "4.4.1", record.message)
    assert (record.host, record.ip) == (r.host, r.ip)
    assert record.host == "127.0.0.1"


async def test_starttls_attempt_records_verified_tls(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext, tls_ca_file: str
) -> None:
    """An attempt over verified STARTTLS says so in its record."""
    server = await smtpd.start(starttls_context=tls_server_context)
    config = relay_config(server.port, tls="starttls", ca_file=tls_ca_file)
    async with Deliverer(config, store=MemoryStore()) as d:
        handle = await d.submit(email(RCPT))
        await done(handle)
        [record] = await d.history(handle.message_id)
    assert (record.code, record.state) == (250, DELIVERED)
    assert (record.tls, record.tls_verified) == (True, True)


async def test_expired_attempt_keeps_its_reply(smtpd: SMTPDServers) -> None:
    """When the last retry fails, the recipient's status is a local 5.4.7, but
    the attempt's record keeps the 451 it got, with the state FAILED."""
    server = await smtpd.start(FaultHandler(rcpt_replies={RCPT: "451 4.3.0 try later"}))
    retry = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=2)
    config = relay_config(server.port, retry=retry)
    async with Deliverer(config, store=MemoryStore()) as d:
        handle = await d.submit(email(RCPT))
        [r] = await done(handle)
        history = await d.history(handle.message_id)
    assert (r.state, r.code, r.enhanced_code) == (FAILED, None, "5.4.7")
    assert [(h.attempt, h.code, h.enhanced_code, h.state) for h in history] == [
        (1, 451, "4.3.0", DEFERRED),
        (2, 451, "4.3.0", FAILED),
    ]


@pytest.mark.parametrize(("limit", "kept"), [(3, [1, 5, 6]), (1, [6]), (0, [])])
async def test_history_is_bounded_per_recipient(
    smtpd: SMTPDServers, limit: int, kept: list[int]
) -> None:
    """Six attempts with history_per_recipient=3 keep the first and the latest
    two; with 1 the latest only; with 0 none, while attempts still count."""
    server = await smtpd.start(FaultHandler(rcpt_replies={RCPT: "451 4.3.0 later"}))
    retry = RetryPolicy(initial_delay=0.005, jitter=0, max_delay=0.01, max_attempts=6)
    config = relay_config(
        server.port, retry=retry, limits=Limits(history_per_recipient=limit)
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        handle = await d.submit(email(RCPT))
        [r] = await done(handle)
        history = await d.history(handle.message_id)
    assert r.attempts == 6
    assert [h.attempt for h in history] == kept


async def test_history_of_unknown_or_closed() -> None:
    """An unknown id raises UnknownMessageError; a closed Deliverer refuses."""
    deliverer = Deliverer(Config(), store=MemoryStore(), mode="submit")
    with pytest.raises(DelivererClosedError):
        await deliverer.history("x@example.com")
    async with deliverer:
        with pytest.raises(UnknownMessageError):
            await deliverer.history("nope@example.com")


def test_history_limit_setting_is_checked() -> None:
    """history_per_recipient takes an integer >= 0, from code or environment."""
    assert Limits().history_per_recipient == 20
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ConfigError, match=r"limits\.history_per_recipient"):
            Limits(history_per_recipient=bad)  # type: ignore[arg-type]
    config = Config.from_env({"MAILSTROM_LIMITS__HISTORY_PER_RECIPIENT": "5"})
    assert config.limits.history_per_recipient == 5


# -- mailstrom-async status ID --history ----------------------------------------------


async def _status_command(*args: str) -> str:
    """Run ``mailstrom-async status ARGS`` in a child process; return its stdout."""
    result = await anyio.run_process(
        [sys.executable, "-m", "mailstrom_async", "status", *args],
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_status_history_command(smtpd: SMTPDServers, tmp_path: Path) -> None:
    """``status ID --history`` prints each recipient's attempts after the status
    table, one table per recipient; with --json, a ``history`` list with every
    field, ``finished_at`` and ``local``; without --history, neither."""
    server = await smtpd.start(DeferFirst())
    path = tmp_path / "q.db"
    async with Deliverer(relay_config(server.port), store=SQLiteStore(path)) as d:
        handle = await d.submit(email(RCPT))
        await done(handle)
        history = await d.history(handle.message_id)
    mid = handle.message_id
    out = await _status_command("--store", str(path), "--history", f"<{mid}>")
    assert f"history of {RCPT}: 2 attempts" in out
    header, first, second = out.split(f"history of {RCPT}: 2 attempts\n")[
        1
    ].splitlines()
    assert header.split() == [
        "#", "STARTED", "TOOK", "HOST", "IP", "TLS", "STATE", "CODE", "ENHANCED", "TEXT",
    ]  # fmt: skip
    assert first.split()[0] == "1"
    assert first.split()[4:10] == [
        "127.0.0.1",
        "127.0.0.1",
        "no",
        "deferred",
        "451",
        "4.7.1",
    ]
    assert first.endswith("greylisted, come back later")
    assert second.split()[7:10] == ["delivered", "250", "2.0.0"]
    plain = await _status_command("--store", str(path), mid)
    assert "history of" not in plain
    as_json = json.loads(
        await _status_command("--store", str(path), "--json", "--history", mid)
    )
    assert [(h["attempt"], h["code"], h["state"]) for h in as_json["history"]] == [
        (1, 451, "deferred"),
        (2, 250, "delivered"),
    ]
    entry = as_json["history"][0]
    assert entry["address"] == RCPT
    assert entry["local"] is False
    assert entry["started_at"] == history[0].started_at.isoformat()
    assert entry["finished_at"] == history[0].finished_at.isoformat()
    assert entry["duration"] == history[0].duration
    assert entry["tls"] is False
    assert "history" not in json.loads(
        await _status_command("--store", str(path), "--json", mid)
    )


async def test_status_history_of_a_local_outcome(tmp_path: Path) -> None:
    """A refused connection shows 'local' as its code in the history table, and
    a recipient not tried yet says so."""
    path = tmp_path / "q.db"
    port = free_port()
    config = relay_config(port, retry=RetryPolicy(initial_delay=600, jitter=0))
    async with Deliverer(config, store=SQLiteStore(path)) as d:
        stream = d.events()
        handle = await d.submit(email(RCPT))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.previous_state is not None:
                    break
    async with SQLiteStore(path) as store:
        await store.add(
            NewMessage(
                message_id="new@example.com",
                mail_from="a@example.com",
                recipients=("b@example.org",),
                data=b"Subject: x\r\n\r\ny\r\n",
                submitted_at=datetime.now(UTC),
            )
        )
    out = await _status_command("--store", str(path), "--history", handle.message_id)
    [row] = [line for line in out.splitlines() if line.startswith("1 ")]
    assert row.split()[7:10] == ["deferred", "local", "4.4.1"]
    assert row.endswith("connection refused")
    out = await _status_command("--store", str(path), "--history", "new@example.com")
    assert "history of b@example.org: no attempt yet" in out
