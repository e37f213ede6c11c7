"""Outcomes decided here look local: no reply code a server never sent, an
enhanced code, and a reason that says its cause once (issue 11, item 12).

Each test drives the whole engine through a ``Deliverer`` against a real loopback
server (or a port where nothing listens) and checks the recipient's status; the
contrast test shows that a server's own reply keeps its code.
"""

from __future__ import annotations

import errno
import functools
import ssl

import anyio
import pytest

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    MemoryStore,
    RecipientState,
    RecipientStatus,
    RelayConfig,
    RetryPolicy,
    SMTPReply,
    Timeouts,
)
from mailstrom_async._smtp import _os_reason, _tls_reason
from tests.smtpd import (
    Conversation,
    FaultHandler,
    ScriptServers,
    SMTPDServers,
    free_port,
    mini_esmtp,
)

DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED
DEADLINE = 10
RCPT = "rcpt@example.org"
#: The first attempt is the only one a test sees.
NO_RETRY_SOON = RetryPolicy(initial_delay=600, jitter=0)
TIMEOUTS = Timeouts(connect=2, command=2, data_start=2, data_end=2)


def relay_config(port: int, **relay: object) -> Config:
    relay.setdefault("tls", "none")
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host="127.0.0.1", port=port, **relay),  # type: ignore[arg-type]
        retry=NO_RETRY_SOON,
        timeouts=TIMEOUTS,
    )


async def first_attempt(config: Config) -> RecipientStatus:
    """The recipient's status after its first attempt."""
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        await d.submit(
            Email(sender="s@example.com", to=[RCPT], subject="x", text="y\n")
        )
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.previous_state is not None:
                    return event.recipient
    pytest.fail("the event stream ended early")  # pragma: no cover


def assert_local(r: RecipientStatus, state: RecipientState, enhanced: str) -> str:
    """*r* is a local outcome: no code, *enhanced*, a message; returns the message."""
    assert r.state is state, r
    assert r.code is None, r
    assert r.enhanced_code == enhanced, r
    assert r.is_local
    assert r.message is not None
    return r.message


async def test_refused_connection_is_local_and_said_once() -> None:
    """A refused connection: no code, 4.4.1, and "connection refused" said once,
    without aiosmtplib's and asyncio's repetitions of the address and errno."""
    port = free_port()
    r = await first_attempt(relay_config(port))
    message = assert_local(r, DEFERRED, "4.4.1")
    assert message == f"cannot connect to 127.0.0.1:{port}: connection refused"


async def test_greeting_timeout_is_local(script_server: ScriptServers) -> None:
    """A server that never greets: no code, 4.4.2, a reason naming the stage."""

    async def silent(conv: Conversation) -> None:
        await conv.wait_closed()

    server = await script_server.start(silent)
    config = relay_config(server.port)
    config = Config(
        helo_name="client.test",
        relay=config.relay,
        retry=NO_RETRY_SOON,
        timeouts=Timeouts(connect=0.2, command=2, data_start=2, data_end=2),
    )
    r = await first_attempt(config)
    message = assert_local(r, DEFERRED, "4.4.2")
    assert message == f"timed out during connect with 127.0.0.1:{server.port}"


async def test_tls_required_but_not_offered_is_local(
    script_server: ScriptServers, tls_ca_file: str
) -> None:
    """STARTTLS required by the relay and not offered: no code, 4.7.5."""
    plain = functools.partial(mini_esmtp, extensions=("PIPELINING",))
    server = await script_server.start(plain)
    r = await first_attempt(
        relay_config(server.port, tls="starttls", ca_file=tls_ca_file)
    )
    message = assert_local(r, DEFERRED, "4.7.5")
    assert message == "127.0.0.1 does not offer STARTTLS, and TLS is required"


async def test_a_server_reply_keeps_its_code(smtpd: SMTPDServers) -> None:
    """Contrast: a 4xx the server sent is recorded with its code, not as local."""
    handler = FaultHandler(rcpt_replies={RCPT: "451 4.7.1 greylisted, come back"})
    server = await smtpd.start(handler)
    r = await first_attempt(relay_config(server.port))
    assert (r.state, r.code, r.enhanced_code) == (DEFERRED, 451, "4.7.1")
    assert r.message == "greylisted, come back"
    assert not r.is_local


def test_local_reply_shows_no_code() -> None:
    """A local reply prints its enhanced code and text only."""
    reply = SMTPReply(451, "cannot connect", "4.4.1", local=True)
    assert str(reply) == "4.4.1 cannot connect"
    assert str(SMTPReply(451, "busy", "4.4.1")) == "451 4.4.1 busy"
    assert not RecipientStatus(address=RCPT).is_local  # never tried: no outcome


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            ConnectionRefusedError(
                errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 25)"
            ),
            "connection refused",
        ),
        (OSError(errno.EHOSTUNREACH, "whatever"), "no route to host"),
        (OSError("Multiple exceptions: a, b"), "Multiple exceptions: a, b"),
    ],
)
def test_os_reason_says_the_cause_once(error: OSError, text: str) -> None:
    """An OSError becomes the C library's words for its errno, lower-cased."""
    assert _os_reason(error) == text


def test_tls_reason_drops_openssl_decoration() -> None:
    """A certificate failure keeps OpenSSL's verify message, not its location."""
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] x")
    exc.verify_message = "self-signed certificate"
    assert _tls_reason(exc) == "certificate verify failed: self-signed certificate"
