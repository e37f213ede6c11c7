"""PIPELINING (RFC 2920) in SMTPConnection against real servers on loopback.

aiosmtpd (told to advertise PIPELINING; without it the same server gives the
lock-step outcomes to compare with), Postfix's smtp-sink, and byte-level servers
that read the whole group before answering (a lock-step client would wait for a
reply that never comes), answer it in one piece or byte by byte, or close in the
middle. No Postfix smtpd fixture exists in the suite yet: not tested against one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiosmtplib
import anyio.lowlevel
import pytest
from aiosmtplib.protocol import SMTPProtocol

from mailstrom_async._config import Timeouts
from mailstrom_async._exceptions import ProtocolError, TemporaryRejectionError
from mailstrom_async._models import RecipientState
from mailstrom_async._smtp import (
    ConnectionSettings,
    SMTPConnection,
    _Replies,
    make_ssl_context,
)
from tests.smtpd import (  # noqa: F401 - fixtures
    Conversation,
    FaultHandler,
    ScriptServers,
    SinkServers,
    SMTPDServers,
    mini_esmtp,
    script_server_fixture,
    smtp_sink_fixture,
    smtpd_fixture,
)

if TYPE_CHECKING:
    from mailstrom_async._classify import RecipientOutcome

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED

#: Generous deadlines: a client that waited for a reply before sending the rest
#: of the group would run into them and fail the test, never hang it.
TIMEOUTS = Timeouts(connect=10, command=10, data_start=10, data_end=10)
FROM = "sender@example.test"
MESSAGE = b"From: sender@example.test\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n"


def settings(port: int) -> ConnectionSettings:
    return ConnectionSettings(
        host="127.0.0.1",
        port=port,
        tls="none",
        helo_name="client.example.test",
        timeouts=TIMEOUTS,
    )


def states(outcomes: list[RecipientOutcome]) -> list[tuple[str, RecipientState]]:
    return [(o.address, o.state) for o in outcomes]


# -- the aiosmtplib internals _Replies relies on -------------------------------------


async def test_aiosmtplib_internals_still_there(smtpd: SMTPDServers) -> None:
    """What _smtp._Replies relies on in aiosmtplib: fails loudly when it changes."""
    why = "aiosmtplib changed: mailstrom_async._smtp._Replies (PIPELINING) relies on"
    write = inspect.signature(SMTPProtocol.write)
    assert list(write.parameters) == ["self", "data"], f"{why} SMTPProtocol.write(data)"
    read = inspect.signature(SMTPProtocol.read_response)
    assert "timeout" in read.parameters, f"{why} SMTPProtocol.read_response(timeout)"
    for name in ("connection_lost", "pause_writing", "resume_writing"):
        assert callable(getattr(SMTPProtocol, name, None)), f"{why} SMTPProtocol.{name}"
    assert aiosmtplib.SMTPResponse._fields == ("code", "message"), (
        f"{why} SMTPResponse(code, message)"
    )
    assert issubclass(aiosmtplib.SMTPReadTimeoutError, TimeoutError), (
        f"{why} SMTPReadTimeoutError being a TimeoutError"
    )
    server = await smtpd.start(FaultHandler(pipelining=True))
    conn = await SMTPConnection.open(settings(server.port))
    try:
        protocol = conn._smtp.protocol
        assert isinstance(protocol, SMTPProtocol), f"{why} SMTP.protocol"
        transport = protocol.transport
        assert isinstance(transport, asyncio.BaseTransport), (
            f"{why} SMTPProtocol.transport"
        )
        assert transport.get_protocol() is protocol, (
            f"{why} SMTPProtocol being the transport's protocol"
        )
        assert isinstance(getattr(protocol, "_command_lock", None), asyncio.Lock), (
            f"{why} SMTPProtocol._command_lock (an asyncio.Lock while connected)"
        )
        replies = _Replies.attach(protocol)
        assert transport.get_protocol() is replies
        replies.detach()
        assert transport.get_protocol() is protocol
        assert conn.supports_pipelining
        assert states(await conn.send(FROM, ["a@x.test"], MESSAGE)) == [
            ("a@x.test", DELIVERED)
        ]
    finally:
        await conn.aclose()


# -- aiosmtpd: pipelined outcomes are the lock-step outcomes -------------------------

RCPTS = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
CASES: dict[str, dict[str, object]] = {
    "all accepted": {},
    "one 450 and one 550 among accepted": {
        "rcpt_replies": {"b@x.test": "450 4.2.0 busy", "d@x.test": "550 5.1.1 no"}
    },
    "all refused": {"rcpt_replies": dict.fromkeys(RCPTS, "550 5.1.1 no such user")},
    "all refused, mixed": {
        "rcpt_replies": {r: f"{450 + 100 * (i % 2)} no" for i, r in enumerate(RCPTS)}
    },
    "MAIL refused": {"mail_reply": "550 5.7.1 not you"},
    "MAIL deferred": {"mail_reply": "451 4.3.0 try later"},
    "final dot refused": {"data_reply": "554 5.6.0 no thanks"},
    "too many recipients": {
        "rcpt_replies": {"c@x.test": "452 4.5.3 too many", "d@x.test": "452 4.5.3 x"}
    },
}


async def _session(
    smtpd: SMTPDServers, *, pipelining: bool, faults: Mapping[str, object]
) -> tuple[list[object], list[tuple[str, list[str], bytes]]]:
    """Two sends on one connection, the first with *faults*, the second without;
    what each returned (or raised, as type and text) and what the server got."""
    handler = FaultHandler(pipelining=pipelining, **faults)  # type: ignore[arg-type]
    server = await smtpd.start(handler)
    conn = await SMTPConnection.open(settings(server.port))
    results: list[object] = []
    try:
        assert conn.supports_pipelining is pipelining
        try:
            results.append(await conn.send(FROM, RCPTS, MESSAGE))
        except (ProtocolError, TemporaryRejectionError) as exc:
            results.append((type(exc), str(exc)))
        handler.mail_reply, handler.rcpt_replies, handler.data_reply = None, {}, None
        if conn.is_usable:
            results.append(await conn.send(FROM, ["e@x.test"], MESSAGE))
    finally:
        await conn.aclose()
    got = [(m.mail_from, m.rcpt_tos, m.content) for m in server.messages]
    return results, got


@pytest.mark.parametrize("case", list(CASES))
async def test_same_outcomes_as_lock_step(smtpd: SMTPDServers, case: str) -> None:
    """Per recipient, pipelining gives exactly the lock-step outcomes, and the
    session stays in step (a second transaction on the connection delivers)."""
    faults = CASES[case]
    lock_step = await _session(smtpd, pipelining=False, faults=faults)
    pipelined = await _session(smtpd, pipelining=True, faults=faults)
    assert pipelined == lock_step
    results, got = pipelined
    assert len(results) == 2, "the connection stays usable"
    assert states(results[1]) == [("e@x.test", DELIVERED)]  # type: ignore[arg-type]
    assert got[-1] == (FROM, ["e@x.test"], MESSAGE)


async def test_all_accepted_delivers_once(smtpd: SMTPDServers) -> None:
    """The pipelined message reaches aiosmtpd once, for every recipient."""
    results, got = await _session(smtpd, pipelining=True, faults={})
    assert states(results[0]) == [(r, DELIVERED) for r in RCPTS]  # type: ignore[arg-type]
    assert got == [(FROM, RCPTS, MESSAGE), (FROM, ["e@x.test"], MESSAGE)]


async def test_all_refused_sends_no_data(smtpd: SMTPDServers) -> None:
    """All RCPTs refused: aiosmtpd refuses the pipelined DATA, no message goes, and
    every recipient keeps its RCPT refusal."""
    results, got = await _session(smtpd, pipelining=True, faults=CASES["all refused"])
    outcomes = results[0]
    assert isinstance(outcomes, list)
    assert [(o.state, o.reply.code if o.reply else None) for o in outcomes] == [
        (FAILED, 550)
    ] * 4
    assert got == [(FROM, ["e@x.test"], MESSAGE)]


@pytest.mark.parametrize("stage", ["MAIL", "RCPT"])
async def test_421_in_group_raises_as_lock_step(
    smtpd: SMTPDServers, stage: str
) -> None:
    """A 421 to MAIL or a RCPT raises, as lock-step does, and closes the connection."""
    faults: dict[str, object] = (
        {"mail_reply": "421 4.3.2 shutting down"}
        if stage == "MAIL"
        else {"rcpt_replies": {"b@x.test": "421 4.3.2 shutting down"}}
    )
    lock_step = await _session(smtpd, pipelining=False, faults=faults)
    pipelined = await _session(smtpd, pipelining=True, faults=faults)
    assert pipelined == lock_step
    (raised,) = pipelined[0]
    assert isinstance(raised, tuple)
    kind, text = raised
    assert kind is TemporaryRejectionError
    assert f"during {stage}" in text
    assert pipelined[1] == []


# -- Postfix smtp-sink ---------------------------------------------------------------


async def test_sink_many_pipelined_transactions(smtp_sink: SinkServers) -> None:
    """smtp-sink offers PIPELINING: transactions of several recipients each, one
    after another on one connection, all delivered."""
    sink = await smtp_sink.start()
    conn = await SMTPConnection.open(settings(sink.port))
    try:
        assert conn.supports_pipelining
        for n in range(5):
            rcpts = [f"r{n}-{i}@x.test" for i in range(3)]
            outcomes = await conn.send(FROM, rcpts, MESSAGE)
            assert states(outcomes) == [(r, DELIVERED) for r in rcpts]
        assert conn.transactions == 5
        assert conn.is_usable
    finally:
        await conn.aclose()


# -- byte-level servers: groups answered at once, in pieces, or not at all ----------


async def _send(conv: Conversation, data: bytes, *, piecewise: bool) -> None:
    if not piecewise:
        await conv.send_raw(data)
        return
    for i in range(len(data)):
        await conv.send_raw(data[i : i + 1])
        await anyio.lowlevel.checkpoint()


async def group_server(
    conv: Conversation,
    *,
    rcpt_replies: Mapping[str, str] | None = None,
    data_reply: str = "354 go ahead",
    close_after: int | None = None,
    piecewise: bool = False,
) -> None:
    """ESMTP with PIPELINING that reads a whole group (up to DATA) before it answers
    any of it: a client that waits for a reply before the next command times out.
    ``close_after`` replies, it hangs up instead of answering the rest."""
    rcpt_replies = rcpt_replies or {}
    await conv.send("220 pipe.test ESMTP")
    if await conv.readline() is None:
        return
    await conv.send("250-pipe.test", "250-PIPELINING", "250 8BITMIME")
    while True:
        replies: list[str] = []
        while True:
            line = await conv.readline()
            if line is None:
                return
            verb, _, arg = line.partition(" ")
            if verb == "QUIT":
                await conv.send("221 2.0.0 bye")
                return
            if verb == "MAIL":
                replies.append("250-sender\r\n250 2.1.0 ok")  # a multiline reply
            elif verb == "RCPT":
                replies.append(rcpt_replies.get(arg[4:-1], "250 2.1.5 ok"))
            elif verb == "DATA":
                replies.append(data_reply)
                break
            else:
                replies.append("250 2.0.0 ok")
        if close_after is not None:
            await _send(
                conv,
                "".join(r + "\r\n" for r in replies[:close_after]).encode(),
                piecewise=piecewise,
            )
            return
        await _send(
            conv, "".join(r + "\r\n" for r in replies).encode(), piecewise=piecewise
        )
        if data_reply.startswith("354"):
            body = await conv.read_data()
            if body is None:
                return
            conv.server.messages.append(body)
            await _send(conv, b"250 2.0.0 queued\r\n", piecewise=piecewise)


@pytest.mark.parametrize("piecewise", [False, True], ids=["one piece", "byte by byte"])
async def test_group_answered_after_the_whole_group(
    script_server: ScriptServers, piecewise: bool
) -> None:
    """The server answers only once it has the whole group, all replies at once or
    byte by byte: outcomes per recipient in order, the message sent once."""
    script = functools.partial(
        group_server,
        rcpt_replies={"b@x.test": "450 4.2.0 busy", "c@x.test": "550 5.1.1 no"},
        piecewise=piecewise,
    )
    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    try:
        outcomes = await conn.send(
            FROM, ["a@x.test", "b@x.test", "c@x.test", "d@x.test"], MESSAGE
        )
        again = await conn.send(FROM, ["e@x.test"], MESSAGE)
    finally:
        await conn.aclose()
    assert states(outcomes) == [
        ("a@x.test", DELIVERED),
        ("b@x.test", DEFERRED),
        ("c@x.test", FAILED),
        ("d@x.test", DELIVERED),
    ]
    assert [o.reply.code if o.reply else None for o in outcomes] == [250, 450, 550, 250]
    assert states(again) == [("e@x.test", DELIVERED)]
    assert len(server.messages) == 2
    assert server.messages[0] == MESSAGE  # read_data undoes the dot-stuffing
    assert server.lines[1:6] == [
        "MAIL FROM:<sender@example.test>",
        "RCPT TO:<a@x.test>",
        "RCPT TO:<b@x.test>",
        "RCPT TO:<c@x.test>",
        "RCPT TO:<d@x.test>",
    ]


async def test_354_with_no_recipient_gets_a_lone_dot(
    script_server: ScriptServers,
) -> None:
    """Every RCPT refused but DATA answered 354 (RFC 2920 §3.1): the client sends a
    lone dot, not the message; the outcomes stay the RCPT refusals."""
    rcpts = ["a@x.test", "b@x.test"]
    script = functools.partial(
        group_server, rcpt_replies=dict.fromkeys(rcpts, "550 5.1.1 no such user")
    )
    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    try:
        outcomes = await conn.send(FROM, rcpts, MESSAGE)
        assert conn.is_usable
    finally:
        await conn.aclose()
    assert states(outcomes) == [(r, FAILED) for r in rcpts]
    assert [o.reply.code if o.reply else None for o in outcomes] == [550, 550]
    assert server.messages == [b""]  # the lone dot: no message data


@pytest.mark.parametrize(
    ("close_after", "stage"), [(0, "MAIL"), (1, "RCPT"), (2, "RCPT")]
)
@pytest.mark.parametrize("piecewise", [False, True], ids=["one piece", "byte by byte"])
async def test_server_closes_mid_group(
    script_server: ScriptServers, close_after: int, stage: str, piecewise: bool
) -> None:
    """The server hangs up after *close_after* replies of the group: the send raises
    as lock-step does when the connection is lost during that command."""
    script = functools.partial(
        group_server, close_after=close_after, piecewise=piecewise
    )
    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    try:
        with pytest.raises(
            ProtocolError, match=f"closed the connection during {stage}"
        ):
            await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
        assert not conn.is_usable
    finally:
        await conn.aclose()
    assert server.messages == []


async def test_server_closes_before_data_reply(script_server: ScriptServers) -> None:
    """Lost before the reply to DATA, recipients accepted: they are DEFERRED, as
    lock-step does for a loss at DATA."""
    script = functools.partial(group_server, close_after=3)
    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    try:
        outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
        assert not conn.is_usable
    finally:
        await conn.aclose()
    assert states(outcomes) == [("a@x.test", DEFERRED), ("b@x.test", DEFERRED)]
    assert all(not o.possible_duplicate for o in outcomes)


async def test_garbled_reply_in_group(script_server: ScriptServers) -> None:
    """A reply line that is not a reply stops the group: ProtocolError, closed."""
    script = functools.partial(group_server, rcpt_replies={"a@x.test": "hello there"})
    server = await script_server.start(script)
    conn = await SMTPConnection.open(settings(server.port))
    try:
        with pytest.raises(ProtocolError, match="garbled reply during RCPT"):
            await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
        assert not conn.is_usable
    finally:
        await conn.aclose()


async def test_pipelining_over_starttls(
    smtpd: SMTPDServers, tls_server_context: ssl.SSLContext, tls_ca_file: str
) -> None:
    """After STARTTLS (a TLS transport under the same aiosmtplib protocol) the
    group is read the same way, transaction after transaction."""
    server = await smtpd.start(
        FaultHandler(pipelining=True, rcpt_replies={"b@x.test": "550 5.1.1 no"}),
        starttls_context=tls_server_context,
    )
    conn = await SMTPConnection.open(
        ConnectionSettings(
            host="127.0.0.1",
            port=server.port,
            tls="starttls",
            ssl_context=make_ssl_context(True, tls_ca_file),
            helo_name="client.example.test",
            timeouts=TIMEOUTS,
        )
    )
    try:
        assert (conn.tls, conn.supports_pipelining) == (True, True)
        first = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
        second = await conn.send(FROM, ["c@x.test"], MESSAGE)
    finally:
        await conn.aclose()
    assert states(first) == [("a@x.test", DELIVERED), ("b@x.test", FAILED)]
    assert states(second) == [("c@x.test", DELIVERED)]
    assert [m.rcpt_tos for m in server.messages] == [["a@x.test"], ["c@x.test"]]


@pytest.mark.parametrize("pipelining", [False, True], ids=["lock-step", "pipelined"])
async def test_data_reply_timeout_defers(
    script_server: ScriptServers, pipelining: bool
) -> None:
    """No reply to DATA within its deadline: the accepted recipients are DEFERRED
    (not a possible duplicate), pipelined as in lock-step."""
    extensions = ("PIPELINING", "8BITMIME") if pipelining else ("8BITMIME",)
    script = functools.partial(mini_esmtp, extensions=extensions, stall_at="DATA")
    server = await script_server.start(script)
    quick = Timeouts(connect=10, command=10, data_start=0.1, data_end=10)
    conn = await SMTPConnection.open(
        ConnectionSettings(
            host="127.0.0.1",
            port=server.port,
            tls="none",
            helo_name="client.example.test",
            timeouts=quick,
        )
    )
    try:
        assert conn.supports_pipelining is pipelining
        outcomes = await conn.send(FROM, ["a@x.test", "b@x.test"], MESSAGE)
        assert not conn.is_usable
    finally:
        await conn.aclose()
    assert states(outcomes) == [("a@x.test", DEFERRED), ("b@x.test", DEFERRED)]
    assert all(not o.possible_duplicate for o in outcomes)
    assert all(
        "timed out during DATA" in (o.reply.text if o.reply else "") for o in outcomes
    )
