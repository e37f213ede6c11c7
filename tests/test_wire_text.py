"""Bytes a server sends that are not UTF-8 never stop the engine, and are kept exactly.

A byte-level server on loopback answers with raw Latin-1 bytes (greeting, EHLO,
RCPT), with garbage and with an endless reply; the Deliverer runs on a real
SQLiteStore. Every recipient ends with a truthful status: the reply's display text
(invalid bytes as ``\\xNN``) in ``message``, its exact bytes in ``raw_message``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from mailstrom_async import RecipientState
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._store import SQLiteStore
from mailstrom_async._text import MAX_REPLY_BYTES
from tests.smtpd import (  # noqa: F401 - fixtures
    Conversation,
    Script,
    ScriptServers,
    mini_esmtp,
    script_server_fixture,
)
from tests.test_relay_faults import (
    DEADLINE,
    NO_RETRY_SOON,
    attempted,
    done,
    email,
    relay_config,
)

DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED

LATIN1_550 = b"550 5.1.1 Empf\xe4nger unbekannt"


def per_recipient(
    rcpt: Mapping[str, Sequence[bytes]],
    *,
    greeting: bytes = b"220 bytes.test ESMTP",
    ehlo: Sequence[bytes] = (b"bytes.test", b"PIPELINING", b"8BITMIME"),
) -> Script:
    """A script for an ESMTP server whose n-th RCPT for an address gets
    ``rcpt[address][n - 1]`` (250 once the list runs out), over all connections."""
    counts: dict[str, int] = {}

    async def script(conv: Conversation) -> None:
        await _serve(conv, rcpt, counts, greeting, ehlo)

    return script


async def _serve(
    conv: Conversation,
    rcpt: Mapping[str, Sequence[bytes]],
    counts: dict[str, int],
    greeting: bytes,
    ehlo: Sequence[bytes],
) -> None:
    await conv.send(greeting)
    while (line := await conv.readline()) is not None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            await conv.send(*[b"250-" + x for x in ehlo[:-1]], b"250 " + ehlo[-1])
        elif verb == "RCPT":
            address = line.partition("<")[2].partition(">")[0]
            n = counts[address] = counts.get(address, 0) + 1
            replies = rcpt.get(address, ())
            await conv.send(replies[n - 1] if n <= len(replies) else b"250 2.1.5 OK")
        elif verb == "DATA":
            await conv.send("354 go ahead")
            body = await conv.read_data()
            if body is None:
                return
            conv.server.messages.append(body)
            await conv.send("250 2.0.0 queued")
        elif verb == "QUIT":
            await conv.send("221 2.0.0 bye")
            return
        else:
            await conv.send("250 2.0.0 OK")


async def test_latin1_550_fails_recipient_and_delivery_goes_on(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A 550 with a raw Latin-1 byte FAILS that recipient with its exact bytes kept,
    the SQLite store writes it, and the next message is still delivered."""
    script = per_recipient({"bad@example.org": [LATIN1_550]})
    server = await script_server.start(script)
    path = tmp_path / "q.db"
    async with Deliverer(relay_config(server.port), store=SQLiteStore(path)) as d:
        first = await done(await d.submit(email("bad@example.org", "ok@example.org")))
        second = await done(await d.submit(email("next@example.org")))
    bad = first.recipient("bad@example.org")
    assert bad.state is FAILED
    assert (bad.code, bad.enhanced_code) == (550, "5.1.1")
    assert bad.raw_message == b"Empf\xe4nger unbekannt"
    assert bad.message == "Empf\\xe4nger unbekannt"
    assert bad.message_bytes == b"Empf\xe4nger unbekannt"
    assert first.recipient("ok@example.org").state is DELIVERED
    assert second.is_delivered
    assert len(server.messages) == 2
    async with SQLiteStore(path) as store:
        assert await store.status(first.message_id) == first


async def test_invalid_utf8_4xx_defers_then_delivers(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A 451 that is not UTF-8 DEFERS with its bytes kept; the retry delivers, and
    the new reply replaces the old bytes."""
    reply = b"451 4.3.0 Warteschlange \xfcbervoll \xff"
    script = per_recipient({"slow@example.org": [reply]})
    server = await script_server.start(script)
    async with Deliverer(
        relay_config(server.port), store=SQLiteStore(tmp_path / "q.db")
    ) as d:
        stream = d.events()
        handle = await d.submit(email("slow@example.org"))
        [event] = await attempted(stream)
        status = await done(handle)
    deferred = event.recipient
    assert deferred.state is DEFERRED
    assert (deferred.code, deferred.enhanced_code) == (451, "4.3.0")
    assert deferred.raw_message == b"Warteschlange \xfcbervoll \xff"
    assert deferred.message == "Warteschlange \\xfcbervoll \\xff"
    [r] = status
    assert r.state is DELIVERED
    assert r.attempts == 2
    assert r.raw_message is None
    assert r.message_bytes == b"queued"


async def test_invalid_utf8_greeting_and_ehlo_deliver(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A greeting and an EHLO reply with bytes that are not UTF-8 are no obstacle."""
    script = per_recipient(
        {},
        greeting=b"220 m\xfcller.test ESMTP gr\xfc\xdf dich \xff\xfe",
        ehlo=(b"m\xfcller.test sch\xf6n", b"X-\xff\xfe", b"8BITMIME"),
    )
    server = await script_server.start(script)
    async with Deliverer(
        relay_config(server.port), store=SQLiteStore(tmp_path / "q.db")
    ) as d:
        status = await done(await d.submit(email("a@example.org")))
    assert status.is_delivered
    assert len(server.messages) == 1


async def test_invalid_utf8_5xx_greeting_defers(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A 554 greeting that is not UTF-8 DEFERS (next host, else later), bytes kept."""
    busy = functools.partial(
        mini_esmtp, greeting=b"554 5.3.2 Zu viele Verbindungen \xe4"
    )
    server = await script_server.start(busy)
    config = relay_config(server.port, retry=NO_RETRY_SOON)
    async with Deliverer(config, store=SQLiteStore(tmp_path / "q.db")) as d:
        stream = d.events()
        handle = await d.submit(email("a@example.org"))
        [event] = await attempted(stream)
        [r] = await handle.status()
    assert event.state is DEFERRED
    assert r.state is DEFERRED
    assert (r.code, r.enhanced_code) == (554, "5.3.2")
    assert r.raw_message == b"Zu viele Verbindungen \xe4"
    assert r.message == "Zu viele Verbindungen \\xe4"


async def test_garbled_reply_with_invalid_bytes_defers(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A reply line that is not SMTP at all (and not UTF-8) DEFERS with a readable
    reason."""
    script = per_recipient({"a@example.org": [b"\xff\xfe garbage \xe4"]})
    server = await script_server.start(script)
    config = relay_config(server.port, retry=NO_RETRY_SOON)
    async with Deliverer(config, store=SQLiteStore(tmp_path / "q.db")) as d:
        stream = d.events()
        handle = await d.submit(email("a@example.org"))
        await attempted(stream)
        [r] = await handle.status()
    assert r.state is DEFERRED
    assert r.message is not None
    assert "garbled reply" in r.message
    r.message.encode("utf-8")  # valid Unicode: no lone surrogate


async def test_endless_reply_is_cut(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A 550 with hundreds of continuation lines is kept up to 4 KiB, marked cut."""
    lines = [b"550-5.1.1 line %d \xe4" % n + b"x" * 80 for n in range(200)]
    reply = b"\r\n".join([*lines, b"550 5.1.1 the end"])
    script = per_recipient({"a@example.org": [reply]})
    server = await script_server.start(script)
    async with Deliverer(
        relay_config(server.port), store=SQLiteStore(tmp_path / "q.db")
    ) as d:
        [r] = await done(await d.submit(email("a@example.org")))
        with anyio.fail_after(DEADLINE):
            again = await done(await d.submit(email("b@example.org")))
    assert r.state is FAILED
    assert r.code == 550
    assert r.raw_message is not None
    assert MAX_REPLY_BYTES - 3 <= len(r.raw_message) <= MAX_REPLY_BYTES
    assert r.raw_message.startswith(b"line 0 \xe4xxx")
    assert r.message is not None
    assert r.message.startswith("line 0 \\xe4xxx")
    assert r.message.endswith(" more bytes]")
    assert again.is_delivered


async def test_valid_utf8_reply_keeps_no_raw_copy(
    script_server: ScriptServers, tmp_path: Path
) -> None:
    """A valid UTF-8 reply keeps no raw copy: raw_message is None."""
    reply = "550 5.1.1 Empfänger unbekannt".encode()
    script = per_recipient({"a@example.org": [reply]})
    server = await script_server.start(script)
    async with Deliverer(
        relay_config(server.port), store=SQLiteStore(tmp_path / "q.db")
    ) as d:
        [r] = await done(await d.submit(email("a@example.org")))
    assert r.message == "Empfänger unbekannt"
    assert r.raw_message is None
    assert r.message_bytes == "Empfänger unbekannt".encode()
