"""Direct MX delivery end to end: a loopback DNS server and MX hosts on 127.0.0.x.

Each test fills the zone of the in-process DNS server (``dns_server``), starts SMTP
servers on distinct loopback addresses that share one port (``MXConfig.port``),
and drives the whole engine (resolver, routes, lanes, SMTP, store) through a
``Deliverer`` with ``relay=None``, then checks what every recipient ends up as and
what the servers saw (DESIGN §3, issue 4). The resolver is configured with the
test server as its only nameserver; tests check that it was asked.
"""

from __future__ import annotations

import functools
import random
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import attrs
import pytest
from dnslib import DNSLabel

from mailstrom_async import (
    Config,
    Deliverer,
    DeliveryEvent,
    Email,
    Limits,
    MemoryStore,
    MessageStatus,
    MXConfig,
    RecipientState,
    RecipientStatus,
    RetryPolicy,
    SQLiteStore,
    SubmitHandle,
    Timeouts,
)
from mailstrom_async._dns import Resolver
from mailstrom_async._routes import MXRoute
from mailstrom_async._smtp import make_ssl_context
from tests.smtpd import free_port, mini_esmtp

if TYPE_CHECKING:
    from pathlib import Path

    import trustme

    from mailstrom_async import EventStream
    from tests.dns_server import DNSServer, Zone
    from tests.smtpd import (
        Conversation,
        ScriptServer,
        ScriptServers,
        SMTPDServer,
        SMTPDServers,
    )

DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED

#: Upper bound for anything a test waits on; never reached when the engine works.
DEADLINE = 10
SENDER = "s@sender.test"
#: Retries come within milliseconds, and there are plenty of them.
FAST_RETRY = RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=20)
#: Retries come long after the test ends: a DEFERRED recipient stays DEFERRED.
NO_RETRY_SOON = RetryPolicy(initial_delay=600, jitter=0)
TIMEOUTS = Timeouts(connect=2, command=2, data_start=2, data_end=2, dns=0.5)

MX1, MX2, MX3 = "mx1.example.test", "mx2.example.test", "mx3.example.test"
IP1, IP2, IP3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@pytest.fixture
def port() -> int:
    """The SMTP port every MX host of the test listens on (at its own address)."""
    return free_port(IP1)


@pytest.fixture
def zone(dns_server: DNSServer) -> Zone:
    return dns_server.zone


def mx_config(
    dns_server: DNSServer,
    port: int,
    *,
    tls: str = "opportunistic",
    allow_local: bool = True,
    retry: RetryPolicy = FAST_RETRY,
    timeouts: Timeouts = TIMEOUTS,
) -> Config:
    """Direct delivery, asking only the loopback DNS server, to MX hosts on *port*."""
    mx = MXConfig(
        nameservers=[dns_server.nameserver],
        port=port,
        allow_local=allow_local,
        tls=tls,
    )
    return Config(
        helo_name="client.test", relay=None, mx=mx, timeouts=timeouts, retry=retry
    )


def email(*to: str) -> Email:
    return Email(sender=SENDER, to=list(to), subject="x", text="y\n")


def server_context(tls_ca: trustme.CA, host: str) -> ssl.SSLContext:
    """A STARTTLS server context with a certificate for *host* from the test CA.

    The client does not trust the test CA: to it the certificate is self-signed.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert(host).configure_cert(ctx)
    return ctx


def mx_zone(zone: Zone, domain: str, *hosts: tuple[int, str, str]) -> None:
    """Give *domain* one MX record per ``(preference, host, ip)`` and A records."""
    for preference, host, ip in hosts:
        zone.add_mx(domain, preference, host)
        zone.add_a(host, ip)


async def done(handle: SubmitHandle) -> MessageStatus:
    """Await *handle*, bounded by the test deadline."""
    with anyio.fail_after(DEADLINE):
        return await handle


async def deliver(
    config: Config, *to: str, rng: random.Random | None = None
) -> MessageStatus:
    """Submit one message to *to* and wait until every recipient is done."""
    async with Deliverer(config, store=MemoryStore(), rng=rng) as d:
        return await done(await d.submit(email(*to)))


async def attempted(stream: EventStream, count: int = 1) -> list[DeliveryEvent]:
    """The next *count* events that report an attempt (not a queueing)."""
    events: list[DeliveryEvent] = []
    with anyio.fail_after(DEADLINE):
        async for event in stream:
            if event.previous_state is not None:
                events.append(event)
                if len(events) == count:
                    break
    assert len(events) == count, "the event stream ended early"
    return events


async def first_attempt(config: Config, *to: str) -> MessageStatus:
    """Submit one message, wait for the first attempt of every recipient, return
    the status (use ``NO_RETRY_SOON`` so that DEFERRED recipients stay so)."""
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email(*to))
        await attempted(stream, len(to))
        return await handle.status()


async def deferred_then_healed(
    config: Config, to: list[str], deferred: str, heal: Callable[[], None]
) -> tuple[RecipientStatus, MessageStatus]:
    """Submit to *to*; when *deferred* is first DEFERRED call *heal*; wait until done.

    Returns *deferred*'s status at that first deferral, and the final status.
    """
    async with Deliverer(config, store=MemoryStore()) as d:
        stream = d.events()
        handle = await d.submit(email(*to))
        with anyio.fail_after(DEADLINE):
            async for event in stream:
                if event.address == deferred and event.state is DEFERRED:
                    first = event.recipient
                    break
            else:  # pragma: no cover - the stream ends only when the Deliverer does
                pytest.fail("the event stream ended early")
        heal()
        return first, await done(handle)


def assert_asked(zone: Zone, *queries: tuple[str, str]) -> None:
    """The resolver asked the loopback test server each ``(name, type)``."""
    for name, qtype in queries:
        assert zone.count(name, qtype) > 0, (name, qtype, dict(zone.queries))


def assert_delivered(
    r: RecipientStatus, host: str, ip: str, *, attempts: int = 1
) -> None:
    assert r.state is DELIVERED, r
    assert r.code == 250
    assert (r.host, r.ip) == (host, ip)
    assert r.attempts == attempts


def rcpts(server: SMTPDServer) -> list[list[str]]:
    """The RCPT TO list of every message *server* received, in order."""
    return [m.rcpt_tos for m in server.messages]


def sent_commands(server: ScriptServer) -> list[str]:
    """The verbs a scripted server received (``EHLO``, ``MAIL``, ...)."""
    return [line.split(" ", 1)[0].upper() for line in server.lines]


# -- MX selection -------------------------------------------------------------------


async def test_lowest_preference_is_used(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """Mail goes to the MX host with the lowest preference, whatever the record order."""
    mx_zone(zone, "example.test", (20, MX2, IP2), (10, MX1, IP1))
    mx1 = await smtpd.start(host=IP1, port=port)
    mx2 = await smtpd.start(host=IP2, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    assert_delivered(status.recipient("a@example.test"), MX1, IP1)
    assert rcpts(mx1) == [["a@example.test"]]
    assert mx2.connections.value == 0
    assert_asked(zone, ("example.test", "MX"), (MX1, "A"))


async def test_equal_preferences_spread_and_are_seeded(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """Equal-preference MX hosts are picked in random order per seed, reproducibly."""
    mx_zone(zone, "example.test", (10, MX1, IP1), (10, MX2, IP2))
    await smtpd.start(host=IP1, port=port)
    await smtpd.start(host=IP2, port=port)
    config = mx_config(dns_server, port)

    async def host_for(seed: int) -> str | None:
        status = await deliver(config, "a@example.test", rng=random.Random(seed))
        r = status.recipient("a@example.test")
        assert r.state is DELIVERED, r
        assert (r.host, r.ip) in ((MX1, IP1), (MX2, IP2))
        return r.host

    hosts = {seed: await host_for(seed) for seed in range(12)}
    assert set(hosts.values()) == {MX1, MX2}, hosts
    # The same seed picks the same host again, for a seed of each outcome.
    for host in (MX1, MX2):
        seed = next(s for s, h in hosts.items() if h == host)
        assert await host_for(seed) == host
    assert_asked(zone, ("example.test", "MX"), (MX1, "A"), (MX2, "A"))


@pytest.mark.parametrize("greeting", ["554 5.3.2 go away", "421 4.3.2 busy"])
async def test_first_mx_bad_greeting_then_second_in_same_attempt(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    script_server: ScriptServers,
    port: int,
    greeting: str,
) -> None:
    """A preferred MX that greets with 5xx/421 is skipped for the next within one attempt."""
    mx_zone(zone, "example.test", (10, MX1, IP1), (20, MX2, IP2))
    refusing = await script_server.start(
        functools.partial(mini_esmtp, greeting=greeting), host=IP1, port=port
    )
    mx2 = await smtpd.start(host=IP2, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    assert_delivered(status.recipient("a@example.test"), MX2, IP2)
    assert refusing.connections.value == 1
    assert refusing.messages == []
    assert rcpts(mx2) == [["a@example.test"]]


async def test_first_mx_closed_port_then_second_in_same_attempt(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """A preferred MX that refuses the connection is skipped for the next one."""
    mx_zone(zone, "example.test", (10, MX1, IP1), (20, MX2, IP2))  # nothing on IP1
    mx2 = await smtpd.start(host=IP2, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    assert_delivered(status.recipient("a@example.test"), MX2, IP2)
    assert rcpts(mx2) == [["a@example.test"]]


async def test_next_address_of_the_same_mx_host(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """An MX host's second address is tried when its first refuses the connection."""
    zone.add_mx("example.test", 10, MX1)
    zone.add_a(MX1, IP1, IP2)  # nothing listens on IP1
    mx = await smtpd.start(host=IP2, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    assert_delivered(status.recipient("a@example.test"), MX1, IP2)
    assert rcpts(mx) == [["a@example.test"]]


async def test_implicit_mx_on_the_domains_address(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """A domain without MX records (NODATA) receives mail at its own A address."""
    zone.add_a("example.test", IP1)
    mx = await smtpd.start(host=IP1, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    assert_delivered(status.recipient("a@example.test"), "example.test", IP1)
    assert rcpts(mx) == [["a@example.test"]]
    assert_asked(zone, ("example.test", "MX"), ("example.test", "A"))


# -- DNS outcomes ---------------------------------------------------------------------


async def test_null_mx_fails_without_connecting(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """A null MX fails the recipient 556 5.1.10 and nothing is connected to."""
    zone.null_mx("example.test")
    zone.add_a("example.test", IP1)  # must not be used as an implicit MX
    server = await smtpd.start(host=IP1, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    r = status.recipient("a@example.test")
    assert r.state is FAILED
    assert (r.code, r.enhanced_code) == (None, "5.1.10")
    assert r.attempts == 1
    assert r.message is not None
    assert "null MX" in r.message
    assert r.ip is None
    assert server.connections.value == 0
    assert_asked(zone, ("example.test", "MX"))
    assert zone.count("example.test", "A") == 0


async def test_nxdomain_fails_the_recipient(
    dns_server: DNSServer, zone: Zone, port: int
) -> None:
    """A domain that does not exist (NXDOMAIN) fails its recipient 550 5.1.2."""
    status = await deliver(mx_config(dns_server, port), "a@nowhere.test")
    r = status.recipient("a@nowhere.test")
    assert r.state is FAILED
    assert (r.code, r.enhanced_code) == (None, "5.1.2")
    assert r.attempts == 1
    assert r.message is not None
    assert "NXDOMAIN" in r.message
    assert_asked(zone, ("nowhere.test", "MX"))


@pytest.mark.parametrize("fault", ["servfail", "refuse", "silent"])
async def test_temporary_dns_failure_defers_then_delivers(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    port: int,
    fault: str,
) -> None:
    """SERVFAIL, REFUSED or no answer defers (no A fallback); once DNS answers it is delivered."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    zone.add_a("example.test", IP2)  # a fallback to the domain's A would go here
    getattr(zone, fault)("example.test", "MX")
    mx = await smtpd.start(host=IP1, port=port)
    decoy = await smtpd.start(host=IP2, port=port)
    first, status = await deferred_then_healed(
        mx_config(dns_server, port),
        ["a@example.test"],
        "a@example.test",
        lambda: zone.heal("example.test"),
    )
    assert first.attempts == 1
    assert (first.code, first.enhanced_code) == (None, "4.4.3")
    assert first.host is None  # no MX host was reached
    assert first.message is not None
    expected = "timed out" if fault == "silent" else "DNS lookup of example.test MX"
    assert expected in first.message
    assert first.next_attempt_at is not None
    r = status.recipient("a@example.test")
    assert r.state is DELIVERED
    assert r.attempts >= 2
    assert (r.host, r.ip) == (MX1, IP1)
    assert r.first_attempt_at == first.first_attempt_at
    assert rcpts(mx) == [["a@example.test"]]
    assert decoy.connections.value == 0
    assert_asked(zone, ("example.test", "MX"))


def assert_refused_as_local(r: RecipientStatus, says: str) -> None:
    """*r* was refused by the library for a local address: DEFERRED 4.4.4 with no
    server reply code, a reason naming *says* and the setting, never connected."""
    assert r.state is DEFERRED
    assert (r.code, r.enhanced_code) == (None, "4.4.4")
    assert r.is_local
    assert r.message is not None
    assert says in r.message
    assert "allow_local" in r.message
    assert r.ip is None
    assert r.next_attempt_at is not None


async def test_local_mx_refused_unless_allowed(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """An MX on loopback with allow_local off is DEFERRED 4.4.4 (a local outcome),
    never connected."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    server = await smtpd.start(host=IP1, port=port)
    config = mx_config(dns_server, port, allow_local=False, retry=NO_RETRY_SOON)
    status = await first_attempt(config, "a@example.test")
    assert_refused_as_local(
        status.recipient("a@example.test"), "only to local addresses"
    )
    assert server.connections.value == 0
    assert_asked(zone, ("example.test", "MX"), (MX1, "A"))


# -- several domains in one message ------------------------------------------------------


async def test_mixed_domains_one_transaction_each(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """One message to four domains gets each domain's outcome, one transaction per domain."""
    mx_zone(zone, "ok.test", (10, "mx.ok.test", IP1))
    mx_zone(zone, "strict.test", (10, "mx.strict.test", IP2))
    mx_zone(zone, "flaky.test", (10, "mx.flaky.test", IP3))
    zone.null_mx("null.test")
    zone.servfail("flaky.test", "MX")
    ok = await smtpd.start(host=IP1, port=port)
    strict = await smtpd.start(host=IP2, port=port)
    strict.handler.rcpt_replies["bad@strict.test"] = "550 5.1.1 no such user"
    flaky = await smtpd.start(host=IP3, port=port)
    to = [
        "a@ok.test",
        "bad@strict.test",
        "b@ok.test",
        "n@null.test",
        "good@strict.test",
        "f@flaky.test",
    ]
    first, status = await deferred_then_healed(
        mx_config(dns_server, port), to, "f@flaky.test", lambda: zone.heal("flaky.test")
    )
    assert first.state is DEFERRED
    for address in ("a@ok.test", "b@ok.test"):
        assert_delivered(status.recipient(address), "mx.ok.test", IP1)
    assert_delivered(status.recipient("good@strict.test"), "mx.strict.test", IP2)
    bad = status.recipient("bad@strict.test")
    assert bad.state is FAILED
    assert (bad.code, bad.enhanced_code, bad.attempts) == (550, "5.1.1", 1)
    assert (bad.host, bad.ip) == ("mx.strict.test", IP2)
    null = status.recipient("n@null.test")
    assert null.state is FAILED
    assert (null.code, null.enhanced_code, null.attempts) == (None, "5.1.10", 1)
    f = status.recipient("f@flaky.test")
    assert f.state is DELIVERED
    assert f.attempts >= 2
    assert (f.host, f.ip) == ("mx.flaky.test", IP3)
    assert rcpts(ok) == [["a@ok.test", "b@ok.test"]]
    assert rcpts(strict) == [["good@strict.test"]]
    assert rcpts(flaky) == [["f@flaky.test"]]
    for server in (ok, strict, flaky):
        assert server.connections.value == 1
    assert_asked(
        zone,
        ("ok.test", "MX"),
        ("strict.test", "MX"),
        ("null.test", "MX"),
        ("flaky.test", "MX"),
    )


async def test_connection_reused_within_a_domain(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """Three messages to one domain, one after the other, share one connection."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(host=IP1, port=port)
    async with Deliverer(mx_config(dns_server, port), store=MemoryStore()) as d:
        statuses = [
            await done(await d.submit(email(f"u{i}@example.test"))) for i in range(3)
        ]
    for i, status in enumerate(statuses):
        assert_delivered(status.recipient(f"u{i}@example.test"), MX1, IP1)
    assert rcpts(mx) == [[f"u{i}@example.test"] for i in range(3)]
    assert mx.connections.value == 1
    assert mx.handler.rsets == 0  # each transaction completed: no RSET needed


# -- TLS ---------------------------------------------------------------------------


async def breaks_tls(conv: Conversation) -> None:
    """An ESMTP server that offers STARTTLS but fails every TLS handshake."""
    await conv.send("220 broken-tls.test ESMTP")
    while (line := await conv.readline()) is not None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            await conv.send("250-broken-tls.test", "250-8BITMIME", "250 STARTTLS")
        elif verb == "STARTTLS":
            await conv.send("220 2.0.0 go ahead")
            await conv.fail_tls_handshake()
            return
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


@pytest.mark.parametrize("tls", ["opportunistic", "required"])
async def test_self_signed_certificate_encrypts_unverified(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    tls_ca: trustme.CA,
    port: int,
    tls: str,
) -> None:
    """A certificate the client cannot verify still gets the mail, encrypted."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(
        host=IP1, port=port, starttls_context=server_context(tls_ca, MX1)
    )
    status = await deliver(mx_config(dns_server, port, tls=tls), "a@example.test")
    r = status.recipient("a@example.test")
    assert_delivered(r, MX1, IP1)
    assert r.tls is True
    assert r.tls_verified is False
    assert rcpts(mx) == [["a@example.test"]]


async def test_unverifiable_certificate_one_connection_per_later_session(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    tls_ca: trustme.CA,
    port: int,
) -> None:
    """An MX whose certificate does not verify costs two TCP connections for its
    first session only (the verified handshake that fails, then an unverified
    one); every later session is one connection and one handshake (item 9)."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(
        host=IP1, port=port, starttls_context=server_context(tls_ca, MX1)
    )
    config = attrs.evolve(
        mx_config(dns_server, port), limits=Limits(connection_reuse_count=1)
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        for i in range(3):
            status = await done(await d.submit(email(f"u{i}@example.test")))
            r = status.recipient(f"u{i}@example.test")
            assert_delivered(r, MX1, IP1)
            assert (r.tls, r.tls_verified) == (True, False)
            assert mx.connections.value == 2 + i  # one session: one more connection
    assert mx.connections.value == 4


async def test_trusted_certificate_is_recorded_verified(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    tls_ca: trustme.CA,
    tls_ca_file: str,
    port: int,
) -> None:
    """With a CA the route trusts, the one handshake of a session is verified and
    recorded so."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(
        host=IP1, port=port, starttls_context=server_context(tls_ca, MX1)
    )
    config = mx_config(dns_server, port)
    route = MXRoute(
        config,
        Resolver(config.mx, config.timeouts, rng=random.Random(1)),
        helo_name="client.test",
        ssl_context=make_ssl_context(True, tls_ca_file),
    )
    async with Deliverer(config, store=MemoryStore(), transport=route) as d:
        status = await done(await d.submit(email("a@example.test")))
    r = status.recipient("a@example.test")
    assert_delivered(r, MX1, IP1)
    assert (r.tls, r.tls_verified) == (True, True)
    assert mx.connections.value == 1


async def test_plain_server_records_no_tls(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """Opportunistic TLS delivers in plain text to a server without STARTTLS."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(host=IP1, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    r = status.recipient("a@example.test")
    assert_delivered(r, MX1, IP1)
    assert (r.tls, r.tls_verified) == (False, False)
    assert rcpts(mx) == [["a@example.test"]]


async def test_opportunistic_tls_handshake_failure_falls_back_to_plain(
    dns_server: DNSServer, zone: Zone, script_server: ScriptServers, port: int
) -> None:
    """Opportunistic TLS whose handshakes fail delivers in plain text on a new connection."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    server = await script_server.start(breaks_tls, host=IP1, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    r = status.recipient("a@example.test")
    assert_delivered(r, MX1, IP1)
    assert (r.tls, r.tls_verified) == (False, False)
    assert len(server.messages) == 1
    # The handshake failed, not the certificate: plain text at once, on a new
    # connection (an unverified handshake would fail the same way).
    assert server.connections.value == 2
    assert sent_commands(server).count("STARTTLS") == 1


async def test_required_tls_handshake_failure_tries_next_mx(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    script_server: ScriptServers,
    tls_ca: trustme.CA,
    port: int,
) -> None:
    """Required TLS moves on from an MX whose TLS handshakes fail, never sending in plain."""
    mx_zone(zone, "example.test", (10, MX1, IP1), (20, MX2, IP2))
    mx1 = await script_server.start(breaks_tls, host=IP1, port=port)
    mx2 = await smtpd.start(
        host=IP2, port=port, starttls_context=server_context(tls_ca, MX2)
    )
    config = mx_config(dns_server, port, tls="required")
    status = await deliver(config, "a@example.test")
    r = status.recipient("a@example.test")
    assert_delivered(r, MX2, IP2)
    assert (r.tls, r.tls_verified) == (True, False)
    # A handshake failure that is not the certificate's: no second try, no plain.
    assert mx1.connections.value == 1
    assert "MAIL" not in sent_commands(mx1)
    assert mx1.messages == []
    assert rcpts(mx2) == [["a@example.test"]]


async def test_required_tls_without_starttls_defers(
    dns_server: DNSServer, zone: Zone, script_server: ScriptServers, port: int
) -> None:
    """Required TLS and a server without STARTTLS: DEFERRED 4.7.x, no MAIL sent."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    plain = functools.partial(mini_esmtp, extensions=("PIPELINING", "8BITMIME"))
    server = await script_server.start(plain, host=IP1, port=port)
    config = mx_config(dns_server, port, tls="required", retry=NO_RETRY_SOON)
    status = await first_attempt(config, "a@example.test")
    r = status.recipient("a@example.test")
    assert r.state is DEFERRED
    assert r.code is None  # decided here: no server reply
    assert r.enhanced_code is not None
    assert r.enhanced_code.startswith("4.7.")
    assert r.message is not None
    assert "STARTTLS" in r.message
    assert r.host == MX1
    assert not r.tls
    assert server.connections.value >= 1
    assert "EHLO" in sent_commands(server)
    assert "MAIL" not in sent_commands(server)
    assert "RCPT" not in sent_commands(server)
    assert server.messages == []


async def test_required_tls_skips_plain_mx_for_one_with_starttls(
    dns_server: DNSServer,
    zone: Zone,
    smtpd: SMTPDServers,
    script_server: ScriptServers,
    tls_ca: trustme.CA,
    port: int,
) -> None:
    """Required TLS passes over a preferred MX without STARTTLS to one that has it."""
    mx_zone(zone, "example.test", (10, MX1, IP1), (20, MX2, IP2))
    plain = functools.partial(mini_esmtp, extensions=("PIPELINING", "8BITMIME"))
    mx1 = await script_server.start(plain, host=IP1, port=port)
    mx2 = await smtpd.start(
        host=IP2, port=port, starttls_context=server_context(tls_ca, MX2)
    )
    config = mx_config(dns_server, port, tls="required")
    status = await deliver(config, "a@example.test")
    r = status.recipient("a@example.test")
    assert_delivered(r, MX2, IP2)
    assert (r.tls, r.tls_verified) == (True, False)
    assert mx1.connections.value == 1
    assert "MAIL" not in sent_commands(mx1)
    assert mx1.messages == []
    assert rcpts(mx2) == [["a@example.test"]]


# -- internationalised addresses -------------------------------------------------------


@pytest.mark.parametrize("smtputf8", [True, False])
async def test_non_ascii_local_part_needs_smtputf8(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int, smtputf8: bool
) -> None:
    """A non-ASCII local part is delivered with SMTPUTF8, else FAILED 550 5.6.7."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(host=IP1, port=port, smtputf8=smtputf8)
    status = await deliver(mx_config(dns_server, port), "jörg@example.test")
    r = status.recipient("jörg@example.test")
    if smtputf8:
        assert_delivered(r, MX1, IP1)
        [received] = mx.messages
        assert received.rcpt_tos == ["jörg@example.test"]
        assert "SMTPUTF8" in received.mail_options
    else:
        assert r.state is FAILED
        assert (r.code, r.enhanced_code) == (None, "5.6.7")
        assert r.attempts == 1
        assert (r.host, r.ip) == (MX1, IP1)
        assert mx.messages == []


async def test_idn_domain_goes_out_as_a_label(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """An IDN domain is looked up and sent in its xn-- A-label form."""
    mx_zone(zone, "xn--bcher-kva.test", (10, MX1, IP1))
    mx = await smtpd.start(host=IP1, port=port)
    status = await deliver(mx_config(dns_server, port), "user@bücher.test")
    [r] = status.recipients
    assert r.address == "user@xn--bcher-kva.test"
    assert_delivered(r, MX1, IP1)
    assert rcpts(mx) == [["user@xn--bcher-kva.test"]]
    assert_asked(zone, ("xn--bcher-kva.test", "MX"))


async def test_mx_name_with_a_byte_that_is_not_ascii(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int, tmp_path: Path
) -> None:
    """An MX name holding a byte that is not ASCII reaches the status as printable
    text (c-ares shows the byte as ``\\228``), which the SQLite store writes; no
    address can be looked up for such a name, so the recipient FAILS 5.4.4."""
    odd = DNSLabel([b"mx\xe4", b"example", b"test"])
    zone.add_mx("example.test", 10, odd)
    zone.add_a(str(odd), IP1)
    mx = await smtpd.start(host=IP1, port=port)
    path = tmp_path / "q.db"
    async with Deliverer(mx_config(dns_server, port), store=SQLiteStore(path)) as d:
        status = await done(await d.submit(email("a@example.test")))
    [r] = status.recipients
    assert r.state is FAILED
    assert (r.code, r.enhanced_code) == (None, "5.4.4")
    assert r.message is not None
    assert "(mx\\228.example.test)" in r.message
    assert mx.connections.value == 0
    async with SQLiteStore(path) as store:
        assert await store.status(status.message_id) == status


# -- where each attempt went ---------------------------------------------------------


async def test_deferred_attempt_records_host_and_ip(
    dns_server: DNSServer, zone: Zone, script_server: ScriptServers, port: int
) -> None:
    """An attempt deferred by the only MX host's 421 greeting records host and ip."""
    mx_zone(zone, "example.test", (10, MX1, IP1))
    busy = functools.partial(mini_esmtp, greeting="421 4.3.2 busy")
    server = await script_server.start(busy, host=IP1, port=port)
    config = mx_config(dns_server, port, retry=NO_RETRY_SOON)
    status = await first_attempt(config, "a@example.test")
    r = status.recipient("a@example.test")
    assert r.state is DEFERRED
    assert (r.code, r.enhanced_code) == (421, "4.3.2")
    assert server.connections.value == 1
    assert r.host == MX1
    assert r.ip == IP1


async def test_at_most_max_addresses_per_attempt(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """An attempt tries at most five addresses: a sixth that would accept is not tried."""
    closed = [f"127.0.0.{i}" for i in range(2, 7)]
    zone.add_mx("example.test", 10, MX1)
    zone.add_a(MX1, *closed)
    zone.add_mx("example.test", 20, MX2)
    zone.add_a(MX2, "127.0.0.7")
    sixth = await smtpd.start(host="127.0.0.7", port=port)
    config = mx_config(dns_server, port, retry=NO_RETRY_SOON)
    status = await first_attempt(config, "a@example.test")
    r = status.recipient("a@example.test")
    assert r.state is DEFERRED
    assert r.attempts == 1
    assert r.code is None  # decided here: no server reply
    assert r.enhanced_code == "4.4.1"
    assert r.message is not None
    assert "all 5 MX addresses of example.test failed" in r.message
    assert r.host == MX1
    assert sixth.connections.value == 0


async def test_421_to_mail_tries_next_mx_in_same_attempt(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """A preferred MX that answers MAIL with 421 is passed over for the next one."""
    mx_zone(zone, "example.test", (10, MX1, IP1), (20, MX2, IP2))
    mx1 = await smtpd.start(host=IP1, port=port)
    mx1.handler.mail_reply = "421 4.3.2 shutting down"
    mx2 = await smtpd.start(host=IP2, port=port)
    config = mx_config(dns_server, port, retry=NO_RETRY_SOON)
    status = await first_attempt(config, "a@example.test")
    assert mx1.connections.value == 1
    assert mx1.messages == []
    assert_delivered(status.recipient("a@example.test"), MX2, IP2)
    assert rcpts(mx2) == [["a@example.test"]]


# -- bounded DNS work ---------------------------------------------------------------------


def address_lookups(*names: str) -> set[tuple[str, str]]:
    return {(name, qtype) for name in names for qtype in ("A", "AAAA")}


async def test_mx_hosts_that_never_answer_cost_five_lookups(
    dns_server: DNSServer, zone: Zone, port: int
) -> None:
    """100 MX hosts whose lookups never answer: one attempt looks up five of them
    (the MX query, then A and AAAA of five hosts) and defers 4.4.3."""
    names = [f"h{i}.example.test" for i in range(100)]
    for i, name in enumerate(names):
        zone.add_mx("example.test", i, name)
        zone.silent(name)
    timeouts = Timeouts(connect=2, command=2, data_start=2, data_end=2, dns=0.05)
    config = mx_config(dns_server, port, retry=NO_RETRY_SOON, timeouts=timeouts)
    status = await first_attempt(config, "a@example.test")
    r = status.recipient("a@example.test")
    assert r.state is DEFERRED
    assert (r.code, r.enhanced_code, r.attempts) == (None, "4.4.3", 1)
    assert r.is_local
    assert r.message is not None
    assert "5 of 100 MX hosts" in r.message
    assert r.host is None
    # c-ares may resend a query that gets no answer: count what was asked.
    assert set(zone.queries) == {("example.test", "MX")} | address_lookups(*names[:5])


async def test_third_mx_delivered_after_two_that_do_not_exist(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers, port: int
) -> None:
    """The first two MX hosts do not exist (NXDOMAIN), the third accepts; the hosts
    after it are never looked up."""
    names = [f"h{i}.example.test" for i in range(5)]
    for i, name in enumerate(names):
        zone.add_mx("example.test", i, name)
    zone.add_a(names[2], IP1)
    mx = await smtpd.start(host=IP1, port=port)
    status = await deliver(mx_config(dns_server, port), "a@example.test")
    assert_delivered(status.recipient("a@example.test"), names[2], IP1)
    assert rcpts(mx) == [["a@example.test"]]
    assert set(zone.queries) == {("example.test", "MX")} | address_lookups(*names[:3])


# -- address literals (RFC 5321 §4.1.3, §5.1) -----------------------------------------

LOOPBACK = "127.0.0.1"


def ipv6_loopback_port() -> int | None:
    """A free TCP port on ::1, or None when this machine has no IPv6 loopback."""
    try:
        return free_port("::1")
    except OSError:
        return None


async def test_ipv4_literal_delivered_to_its_address_without_dns(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers
) -> None:
    """user@[127.0.0.1] goes to 127.0.0.1 on MXConfig.port, one lane for the
    literal beside the MX domain's, and no DNS query is made for it."""
    port = free_port(LOOPBACK)
    server = await smtpd.start(host=LOOPBACK, port=port)
    status = await deliver(
        mx_config(dns_server, port), "a@[127.0.0.1]", "b@[127.0.0.1]"
    )
    for address in ("a@[127.0.0.1]", "b@[127.0.0.1]"):
        assert_delivered(status.recipient(address), "[127.0.0.1]", LOOPBACK)
    assert rcpts(server) == [["a@[127.0.0.1]", "b@[127.0.0.1]"]]
    assert zone.queries == {}


async def test_literal_is_its_own_destination(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers
) -> None:
    """A literal recipient and an MX-domain recipient of one message get one
    transaction each, each to its own server."""
    port = free_port(LOOPBACK)
    literal = await smtpd.start(host=LOOPBACK, port=port)
    mx_zone(zone, "example.test", (10, MX1, IP1))
    mx = await smtpd.start(host=IP1, port=port)
    status = await deliver(
        mx_config(dns_server, port), "a@[127.0.0.1]", "b@example.test"
    )
    assert_delivered(status.recipient("a@[127.0.0.1]"), "[127.0.0.1]", LOOPBACK)
    assert_delivered(status.recipient("b@example.test"), MX1, IP1)
    assert rcpts(literal) == [["a@[127.0.0.1]"]]
    assert rcpts(mx) == [["b@example.test"]]
    assert set(zone.queries) == {("example.test", "MX"), (MX1, "A"), (MX1, "AAAA")}


async def test_ipv6_literal_delivered_to_its_address(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers
) -> None:
    """user@[IPv6:::1] goes to ::1 (when this machine has an IPv6 loopback)."""
    port = ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    server = await smtpd.start(host="::1", port=port)
    status = await deliver(mx_config(dns_server, port), "a@[IPv6:0::1]")
    # The destination, and so the host recorded, is the literal's canonical form.
    assert_delivered(status.recipient("a@[IPv6:0::1]"), "[ipv6:::1]", "::1")
    assert rcpts(server) == [["a@[IPv6:0::1]"]]
    assert zone.queries == {}


async def test_local_literal_refused_unless_allowed(
    dns_server: DNSServer, zone: Zone, smtpd: SMTPDServers
) -> None:
    """Without allow_local a loopback literal is DEFERRED 4.4.4 (a local outcome),
    as a loopback MX host is, and nothing is connected to."""
    port = free_port(LOOPBACK)
    server = await smtpd.start(host=LOOPBACK, port=port)
    config = mx_config(dns_server, port, allow_local=False, retry=NO_RETRY_SOON)
    status = await first_attempt(config, "a@[127.0.0.1]")
    assert_refused_as_local(
        status.recipient("a@[127.0.0.1]"),
        "address literal [127.0.0.1] is a local address",
    )
    assert server.connections.value == 0
    assert zone.queries == {}


@pytest.mark.parametrize(
    ("certificate_for", "verified"), [(LOOPBACK, True), (MX1, False)]
)
async def test_literal_tls_verified_only_by_a_certificate_for_the_ip(
    dns_server: DNSServer,
    smtpd: SMTPDServers,
    tls_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    certificate_for: str,
    verified: bool,
) -> None:
    """With the CA trusted, a literal's TLS session is verified when the
    certificate names its IP address, and encrypted but unverified otherwise."""
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the "system" CAs
    port = free_port(LOOPBACK)
    context = server_context(tls_ca, certificate_for)
    await smtpd.start(host=LOOPBACK, port=port, starttls_context=context)
    status = await deliver(mx_config(dns_server, port), "a@[127.0.0.1]")
    r = status.recipient("a@[127.0.0.1]")
    assert_delivered(r, "[127.0.0.1]", LOOPBACK)
    assert (r.tls, r.tls_verified) == (True, verified)
