"""MX resolution (RFC 5321 §5.1, RFC 7505) against a loopback DNS server."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from mailstrom_async import _dns
from mailstrom_async._config import MXConfig, Timeouts
from mailstrom_async._dns import MXHost, Resolver, Route
from mailstrom_async._exceptions import (
    ConfigError,
    DNSTemporaryError,
    NoMailServerError,
)

if TYPE_CHECKING:
    from tests.dns_server import DNSServer, Zone

# Addresses outside local space for the allow_local=False tests. Nothing ever
# connects to them: route() only looks them up in the test zone.
PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:4700::1111"

MakeResolver = Callable[..., Resolver]


@pytest.fixture
async def make_resolver(dns_server: DNSServer) -> AsyncIterator[MakeResolver]:
    """Make Resolvers that ask only the loopback test server; closed at teardown."""
    resolvers: list[Resolver] = []

    def make(
        *,
        timeouts: Timeouts | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        **mx: Any,
    ) -> Resolver:
        mx.setdefault("allow_local", True)
        config = MXConfig(nameservers=[dns_server.nameserver], **mx)
        resolver = Resolver(config, timeouts or Timeouts(dns=2.0), rng=rng, clock=clock)
        resolvers.append(resolver)
        return resolver

    yield make
    for resolver in resolvers:
        await resolver.aclose()


@pytest.fixture
def zone(dns_server: DNSServer) -> Zone:
    return dns_server.zone


def hosts(route: Route) -> list[str]:
    return [h.name for h in route.hosts]


async def walk(resolver: Resolver, domain: str) -> list[tuple[str, str]]:
    """Every ``(host, address)`` the resolver's walk over *domain* yields."""
    async with contextlib.aclosing(resolver.walk(domain)) as addresses:
        return [(host.name, ip) async for host, ip in addresses]


def address_queries(zone: Zone) -> int:
    return sum(n for (_, qtype), n in zone.queries.items() if qtype in ("A", "AAAA"))


async def test_mx_hosts_sorted_by_preference(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """MX hosts come back lowest preference first, and are walked in that order."""
    zone.add_mx("example.test", 20, "mx2.example.test")
    zone.add_mx("example.test", 10, "mx1.example.test")
    zone.add_mx("example.test", 30, "mx3.example.test")
    for n in (1, 2, 3):
        zone.add_a(f"mx{n}.example.test", f"127.0.0.{n + 1}")

    resolver = make_resolver()
    route = await resolver.route("example.test")

    assert route == Route(
        "example.test",
        (
            MXHost("mx1.example.test", 10),
            MXHost("mx2.example.test", 20),
            MXHost("mx3.example.test", 30),
        ),
        implicit=False,
    )
    assert zone.count("example.test", "MX") == 1
    assert address_queries(zone) == 0  # route() looks up no address
    assert await walk(resolver, "example.test") == [
        ("mx1.example.test", "127.0.0.2"),
        ("mx2.example.test", "127.0.0.3"),
        ("mx3.example.test", "127.0.0.4"),
    ]


async def test_equal_preferences_are_shuffled(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """Hosts of equal preference come in random order, decided by the injected rng."""
    zone.add_mx("example.test", 5, "first.example.test")
    zone.add_mx("example.test", 10, "a.example.test")
    zone.add_mx("example.test", 10, "b.example.test")
    zone.add_mx("example.test", 20, "last.example.test")
    for n, host in enumerate(("first", "a", "b", "last")):
        zone.add_a(f"{host}.example.test", f"127.0.0.{n + 2}")

    orders = set()
    for seed in range(20):
        route = await make_resolver(rng=random.Random(seed)).route("example.test")
        order = hosts(route)
        assert order[0] == "first.example.test"
        assert order[3] == "last.example.test"
        orders.add(tuple(order[1:3]))
    assert orders == {
        ("a.example.test", "b.example.test"),
        ("b.example.test", "a.example.test"),
    }

    one, two = make_resolver(rng=random.Random(7)), make_resolver(rng=random.Random(7))
    assert [hosts(await one.route("example.test")) for _ in range(5)] == [
        hosts(await two.route("example.test")) for _ in range(5)
    ]


async def test_implicit_mx_on_nodata(zone: Zone, make_resolver: MakeResolver) -> None:
    """A domain without MX records is its own mail server, via its A and AAAA records."""
    zone.add_a("example.test", "127.0.0.2")
    zone.add_aaaa("example.test", "::1")

    resolver = make_resolver()
    route = await resolver.route("Example.TEST.")

    assert route == Route("example.test", (MXHost("example.test", 0),), implicit=True)
    assert await walk(resolver, "Example.TEST.") == [
        ("example.test", "127.0.0.2"),
        ("example.test", "::1"),
    ]


async def test_no_implicit_mx_when_mx_records_exist(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """With MX records the domain's own address is never looked up nor used."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")
    zone.add_a("example.test", "127.0.0.9")

    resolver = make_resolver()
    route = await resolver.route("example.test")

    assert hosts(route) == ["mx.example.test"]
    assert await walk(resolver, "example.test") == [("mx.example.test", "127.0.0.2")]
    assert not route.implicit
    assert zone.count("example.test", "A") == zone.count("example.test", "AAAA") == 0


async def test_null_mx_fails_with_5_1_10(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A null MX (RFC 7505) is a permanent 556 5.1.10 and nothing else is looked up."""
    zone.null_mx("example.test")
    zone.add_a("example.test", "127.0.0.2")

    with pytest.raises(NoMailServerError, match="accepts no mail") as info:
        await make_resolver().route("example.test")

    assert info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.enhanced_code) == (556, "5.1.10")
    assert "'example.test'" in str(info.value)
    assert address_queries(zone) == 0


async def test_null_mx_beside_real_mx_is_ignored(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A null MX mixed with real MX records (a misconfiguration) leaves the real ones."""
    zone.null_mx("example.test")
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")

    resolver = make_resolver()
    route = await resolver.route("example.test")

    assert hosts(route) == ["mx.example.test"]
    assert await walk(resolver, "example.test") == [("mx.example.test", "127.0.0.2")]


async def test_nxdomain_fails_with_5_1_2(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A domain that does not exist is a permanent 550 5.1.2."""
    with pytest.raises(NoMailServerError, match="does not exist") as info:
        await make_resolver().route("nowhere.test")

    assert info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.enhanced_code) == (550, "5.1.2")
    assert zone.count("nowhere.test", "MX") == 1
    assert address_queries(zone) == 0


async def test_invalid_domain_name_fails(make_resolver: MakeResolver) -> None:
    """A name DNS cannot even ask about is a permanent 5.1.2."""
    with pytest.raises(NoMailServerError, match="not a valid domain name") as info:
        await make_resolver().route("bad..example.test")

    assert info.value.reply is not None
    assert info.value.reply.enhanced_code == "5.1.2"


async def test_servfail_defers_without_address_fallback(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """SERVFAIL on the MX query is temporary and never falls back to A/AAAA."""
    zone.add_a("example.test", "127.0.0.2")
    zone.servfail("example.test", "MX")

    with pytest.raises(DNSTemporaryError, match=r"example\.test MX"):
        await make_resolver().route("example.test")

    assert zone.count("example.test", "MX") >= 1
    assert address_queries(zone) == 0


async def test_refused_defers(zone: Zone, make_resolver: MakeResolver) -> None:
    """REFUSED is temporary."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.refuse("example.test")

    with pytest.raises(DNSTemporaryError):
        await make_resolver().route("example.test")

    assert address_queries(zone) == 0


async def test_silent_server_times_out_then_recovers(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """No answer is a DNSTemporaryError within Timeouts.dns; a later lookup succeeds."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")
    zone.silent("example.test")
    resolver = make_resolver(timeouts=Timeouts(dns=0.3))

    started = time.monotonic()
    with pytest.raises(DNSTemporaryError):
        await resolver.route("example.test")
    assert time.monotonic() - started < 1.0
    assert address_queries(zone) == 0

    zone.heal("example.test")
    assert await walk(resolver, "example.test") == [("mx.example.test", "127.0.0.2")]


async def test_unreachable_nameserver_defers() -> None:
    """A nameserver port with nothing listening is a temporary error."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = MXConfig(nameservers=[f"127.0.0.1:{port}"], allow_local=True)

    async with Resolver(config, Timeouts(dns=1.0)) as resolver:
        with pytest.raises(DNSTemporaryError):
            await resolver.route("example.test")


async def test_target_with_ipv4_and_ipv6(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A host's IPv4 addresses come before its IPv6 addresses."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_aaaa("mx.example.test", "::1")
    zone.add_a("mx.example.test", "127.0.0.2", "127.0.0.3")

    found = await walk(make_resolver(), "example.test")

    assert [ip for _, ip in found] == ["127.0.0.2", "127.0.0.3", "::1"]


async def test_target_behind_cname(zone: Zone, make_resolver: MakeResolver) -> None:
    """An MX host that is an alias is resolved through its CNAME."""
    zone.add_mx("example.test", 10, "mail.example.test")
    zone.add_cname("mail.example.test", "real.example.test")
    zone.add_a("real.example.test", "127.0.0.2")

    found = await walk(make_resolver(), "example.test")

    assert found == [("mail.example.test", "127.0.0.2")]


async def test_nxdomain_target_is_skipped(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """An MX host that does not exist is left out; the others remain."""
    zone.add_mx("example.test", 10, "gone.example.test")
    zone.add_mx("example.test", 20, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")

    found = await walk(make_resolver(), "example.test")

    assert found == [("mx.example.test", "127.0.0.2")]
    assert zone.count("gone.example.test", "A") == 1


async def test_temporarily_failing_target_is_skipped(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """An MX host whose lookup fails temporarily is skipped when another resolves."""
    zone.add_mx("example.test", 10, "mx1.example.test")
    zone.add_mx("example.test", 20, "mx2.example.test")
    zone.add_a("mx1.example.test", "127.0.0.2")
    zone.add_a("mx2.example.test", "127.0.0.3")
    zone.servfail("mx1.example.test")

    found = await walk(make_resolver(), "example.test")

    assert found == [("mx2.example.test", "127.0.0.3")]


async def test_partial_target_failure_keeps_other_family(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A host whose AAAA lookup fails keeps its IPv4 addresses."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")
    zone.servfail("mx.example.test", "AAAA")

    found = await walk(make_resolver(), "example.test")

    assert found == [("mx.example.test", "127.0.0.2")]


async def test_all_targets_failing_temporarily_defers(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """When no MX host resolves and one failed temporarily, the route is deferred."""
    zone.add_mx("example.test", 10, "mx1.example.test")
    zone.add_mx("example.test", 20, "gone.example.test")
    zone.add_a("mx1.example.test", "127.0.0.2")
    zone.servfail("mx1.example.test")

    with pytest.raises(DNSTemporaryError, match=r"mx1\.example\.test"):
        await walk(make_resolver(), "example.test")


async def test_mx_hosts_without_addresses_fail(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """MX hosts that all lack addresses are a permanent 5.4.4 naming them."""
    zone.add_mx("example.test", 10, "gone.example.test")
    zone.add_mx("example.test", 20, "txt.example.test")
    zone.add_txt("txt.example.test", "no address here")

    with pytest.raises(NoMailServerError, match=r"gone\.example\.test") as info:
        await walk(make_resolver(), "example.test")

    assert info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.enhanced_code) == (550, "5.4.4")


async def test_implicit_mx_without_address_fails(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A domain with neither MX records nor addresses is a permanent 5.1.2."""
    zone.add_txt("example.test", "v=spf1 -all")

    with pytest.raises(NoMailServerError, match="no MX records") as info:
        await walk(make_resolver(), "example.test")

    assert info.value.reply is not None
    assert info.value.reply.enhanced_code == "5.1.2"


async def test_max_addresses_across_targets(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """At most MXConfig.max_addresses addresses are yielded, in order, once each."""
    for n in (1, 2, 3):
        zone.add_mx("example.test", n * 10, f"mx{n}.example.test")
    zone.add_a("mx1.example.test", "127.0.0.2", "127.0.0.3")
    zone.add_a("mx2.example.test", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    zone.add_a("mx3.example.test", "127.0.0.6")

    found = await walk(make_resolver(max_addresses=3), "example.test")

    assert found == [
        ("mx1.example.test", "127.0.0.2"),
        ("mx1.example.test", "127.0.0.3"),
        ("mx2.example.test", "127.0.0.4"),
    ]
    assert zone.count("mx3.example.test") == 0  # never reached, never looked up


async def test_later_targets_resolved_when_first_ones_fail(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """Hosts beyond the first max_addresses are looked up when the first lack addresses."""
    zone.add_mx("example.test", 10, "gone.example.test")
    zone.add_mx("example.test", 20, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")

    found = await walk(make_resolver(max_addresses=1), "example.test")

    assert found == [("mx.example.test", "127.0.0.2")]


@pytest.mark.parametrize(
    "local",
    ["127.0.0.2", "10.1.2.3", "192.168.1.1", "169.254.0.1", "0.0.0.0", "224.0.0.1"],  # noqa: S104
)
async def test_local_addresses_refused(
    zone: Zone, make_resolver: MakeResolver, local: str
) -> None:
    """Without allow_local, loopback, private, link-local and multicast are dropped."""
    zone.add_mx("example.test", 10, "inside.example.test")
    zone.add_mx("example.test", 20, "outside.example.test")
    zone.add_a("inside.example.test", local)
    zone.add_aaaa("inside.example.test", "::1", "fe80::1", "::ffff:127.0.0.1")
    zone.add_a("outside.example.test", PUBLIC_V4)
    zone.add_aaaa("outside.example.test", PUBLIC_V6)

    found = await walk(make_resolver(allow_local=False), "example.test")

    assert found == [
        ("outside.example.test", PUBLIC_V4),
        ("outside.example.test", PUBLIC_V6),
    ]


async def test_only_local_addresses_defer(
    zone: Zone, make_resolver: MakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    """MX hosts with only local addresses defer (451 4.4.4) naming allow_local."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.1")

    with (
        caplog.at_level(logging.WARNING, logger="mailstrom_async.dns"),
        pytest.raises(DNSTemporaryError, match=r"127\.0\.0\.1.*allow_local") as info,
    ):
        await walk(make_resolver(allow_local=False), "example.test")

    assert info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.enhanced_code) == (451, "4.4.4")
    (record,) = caplog.records
    assert record.__dict__["domain"] == "example.test"
    assert record.__dict__["addresses"] == ["127.0.0.1"]


async def test_implicit_mx_local_address_defers(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """The local-address rule applies to an implicit MX too."""
    zone.add_a("example.test", "192.168.0.1")

    with pytest.raises(
        DNSTemporaryError, match=r"the domain 'example\.test' resolves only"
    ):
        await walk(make_resolver(allow_local=False), "example.test")


async def test_local_addresses_allowed_when_configured(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """With allow_local, loopback addresses are used."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.1")

    found = await walk(make_resolver(allow_local=True), "example.test")

    assert found == [("mx.example.test", "127.0.0.1")]


async def test_answers_cached_for_their_ttl(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """With TTL 30, a second walk is answered from the cache without a query."""
    zone.add_mx("example.test", 10, "mx.example.test", ttl=30)
    zone.add_a("mx.example.test", "127.0.0.2", ttl=30)
    zone.add_aaaa("mx.example.test", "::1", ttl=60)
    resolver = make_resolver()

    first = await walk(resolver, "example.test")
    second = await walk(resolver, "example.test")

    assert first == second
    assert sum(zone.queries.values()) == 3
    stats = resolver.statistics()
    assert (stats.lookups, stats.cache_hits, stats.cached) == (3, 3, 3)


async def test_ttl_zero_not_cached(zone: Zone, make_resolver: MakeResolver) -> None:
    """With TTL 0, every walk asks the server again."""
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")
    resolver = make_resolver()

    await walk(resolver, "example.test")
    zone.remove("mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.3")

    assert await walk(resolver, "example.test") == [("mx.example.test", "127.0.0.3")]
    assert zone.count("example.test", "MX") == 2
    assert zone.count("mx.example.test", "A") == 2
    assert resolver.statistics().cache_hits == 0


async def test_cache_expires_by_injected_clock(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A cached answer is used until its TTL passes on the injected clock."""
    zone.add_mx("example.test", 10, "mx.example.test", ttl=30)
    zone.add_a("mx.example.test", "127.0.0.2", ttl=30)
    zone.add_aaaa("mx.example.test", "::1", ttl=30)
    now = 1000.0
    resolver = make_resolver(clock=lambda: now)

    await walk(resolver, "example.test")
    now += 29.9
    await walk(resolver, "example.test")
    assert resolver.statistics().lookups == 3

    now += 0.2
    await walk(resolver, "example.test")
    # Asked again (c-ares may still answer from its own, real-time cache).
    stats = resolver.statistics()
    assert (stats.lookups, stats.cache_hits) == (6, 3)


async def test_negative_answers_not_cached(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """NXDOMAIN is asked again each time: the domain may be created meanwhile."""
    resolver = make_resolver()

    with pytest.raises(NoMailServerError):
        await resolver.route("example.test")
    zone.add_mx("example.test", 10, "mx.example.test")
    zone.add_a("mx.example.test", "127.0.0.2")

    assert hosts(await resolver.route("example.test")) == ["mx.example.test"]


async def test_cache_size_is_bounded(
    zone: Zone, make_resolver: MakeResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache drops expired, then oldest, entries when it is full."""
    monkeypatch.setattr(_dns, "_MAX_CACHE_ENTRIES", 2)
    now = 0.0
    resolver = make_resolver(clock=lambda: now)
    for n in range(3):
        zone.add_a(f"d{n}.test", f"127.0.0.{n + 2}", ttl=10 * (n + 1))
        zone.add_aaaa(f"d{n}.test", "::1")

    await walk(resolver, "d0.test")  # caches d0 A (expires at 10)
    await walk(resolver, "d1.test")  # caches d1 A (20)
    now = 15.0
    await walk(resolver, "d2.test")  # d0 expired and dropped
    assert resolver.statistics().cached == 2
    await walk(resolver, "d0.test")  # full of live entries: d1 (oldest) dropped
    assert resolver.statistics().cached == 2
    hits = resolver.statistics().cache_hits
    await walk(resolver, "d2.test")
    assert resolver.statistics().cache_hits == hits + 1


@pytest.mark.parametrize(
    "nameserver", ["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:5353", "[::1]"]
)
def test_nameserver_forms_accepted(nameserver: str) -> None:
    """IPv4 and IPv6 nameservers, with or without a port, are accepted."""
    Resolver(MXConfig(nameservers=[nameserver]), Timeouts())


@pytest.mark.parametrize(
    "nameserver", ["dns.example", "127.0.0.1:0", "127.0.0.1:dns", "[::1]x", "[::1]:"]
)
def test_bad_nameserver_rejected(nameserver: str) -> None:
    """A nameserver that is not an IP address with an optional port is a ConfigError."""
    with pytest.raises(ConfigError, match=r"mx\.nameservers") as info:
        Resolver(MXConfig(nameservers=[nameserver]), Timeouts())
    assert info.value.key == "mx.nameservers"


async def test_closed_resolver_refuses_lookups(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """route() after aclose() raises; aclose() may be called twice."""
    zone.add_a("example.test", "127.0.0.2")
    resolver = make_resolver()
    await resolver.route("example.test")

    await resolver.aclose()
    await resolver.aclose()

    with pytest.raises(RuntimeError, match="closed"):
        await resolver.route("example.test")


async def test_concurrent_routes_share_one_resolver(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """Routes started together all succeed through the one lazily made resolver."""
    zone.add_a("example.test", "127.0.0.2")
    resolver = make_resolver()
    routes: list[Route] = []

    async def route() -> None:
        routes.append(await resolver.route("example.test"))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(route)

    expected = Route("example.test", (MXHost("example.test", 0),), implicit=True)
    assert routes == [expected] * 5


# -- bounded DNS work: lazy, at most max_hosts hosts, one deadline per walk -------------


def many_mx(zone: Zone, count: int, *, preference: int | None = None) -> list[str]:
    """Give example.test *count* MX hosts h0, h1, ... (preference i, or the one
    given) and return their names, best first; the zone knows none of them."""
    names = [f"h{i}.example.test" for i in range(count)]
    for i, name in enumerate(names):
        zone.add_mx("example.test", i if preference is None else preference, name)
    return names


def asked(zone: Zone) -> set[tuple[str, str]]:
    """Every distinct ``(name, type)`` the server was asked (c-ares may resend)."""
    return set(zone.queries)


def address_lookups(*names: str) -> set[tuple[str, str]]:
    return {(name, qtype) for name in names for qtype in ("A", "AAAA")}


async def test_walk_looks_up_a_host_only_when_it_is_reached(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """A caller that stops after the first host's address never makes the others
    be looked up."""
    for n in (1, 2, 3):
        zone.add_mx("example.test", n * 10, f"mx{n}.example.test")
        zone.add_a(f"mx{n}.example.test", f"127.0.0.{n + 1}")
    resolver = make_resolver()

    async with contextlib.aclosing(resolver.walk("example.test")) as addresses:
        host, ip = await anext(addresses)

    assert (host.name, ip) == ("mx1.example.test", "127.0.0.2")
    assert asked(zone) == {("example.test", "MX")} | address_lookups("mx1.example.test")
    assert resolver.statistics().lookups == 3


async def test_hosts_that_never_answer_cost_at_most_max_hosts_lookups(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """100 MX hosts whose lookups time out: 5 hosts are looked up (1 + 5 x 2
    lookups) and the walk defers, saying so."""
    names = many_mx(zone, 100)
    for name in names:
        zone.silent(name)
    resolver = make_resolver(timeouts=Timeouts(dns=0.05, dns_attempt=30))

    with pytest.raises(DNSTemporaryError, match="5 of 100 MX hosts") as info:
        await walk(resolver, "example.test")

    assert "timed out" in str(info.value)
    assert info.value.default_enhanced_code == "4.4.3"
    assert asked(zone) == {("example.test", "MX")} | address_lookups(*names[:5])
    assert resolver.statistics().lookups == 11


@pytest.mark.parametrize(
    ("preference", "error", "code"),
    [
        (10, DNSTemporaryError, (451, "4.4.4")),  # others as good may come next time
        (None, NoMailServerError, (550, "5.4.4")),  # the best five are always these
    ],
)
async def test_nxdomain_hosts_cost_at_most_max_hosts_lookups(
    zone: Zone,
    make_resolver: MakeResolver,
    preference: int | None,
    error: type[Exception],
    code: tuple[int, str],
) -> None:
    """1,000 MX hosts that do not exist: 11 lookups; deferred when equally
    preferred hosts were left out, failed when only less preferred ones were."""
    names = many_mx(zone, 1000, preference=preference)
    resolver = make_resolver()

    with pytest.raises(
        error, match=r"5 of 1000 MX hosts .*MXConfig\.max_hosts"
    ) as info:
        await walk(resolver, "example.test")

    reply = getattr(info.value, "reply", None)
    assert reply is not None
    assert (reply.code, reply.enhanced_code) == code

    assert resolver.statistics().lookups == 11
    queried = {name for name, qtype in asked(zone) if qtype != "MX"}
    assert len(queried) == 5
    if preference is None:
        assert queried == set(names[:5])


async def test_max_hosts_is_configurable(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """MXConfig.max_hosts sets how many hosts one walk looks up."""
    names = many_mx(zone, 10)

    with pytest.raises(NoMailServerError, match="2 of 10 MX hosts"):
        await walk(make_resolver(max_hosts=2), "example.test")

    assert asked(zone) == {("example.test", "MX")} | address_lookups(*names[:2])


async def test_third_host_reached_after_two_that_do_not_exist(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """Lazy lookups still move on: two NXDOMAIN hosts, then the third resolves;
    the hosts after it are not looked up."""
    names = many_mx(zone, 5)
    zone.add_a(names[2], "127.0.0.4")
    resolver = make_resolver()

    async with contextlib.aclosing(resolver.walk("example.test")) as addresses:
        host, ip = await anext(addresses)

    assert (host.name, ip) == (names[2], "127.0.0.4")
    assert asked(zone) == {("example.test", "MX")} | address_lookups(*names[:3])


async def test_dns_attempt_bounds_all_lookups_of_a_walk(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """When the walk's DNS time (Timeouts.dns_attempt) is used up, no further
    host is looked up: with 0.25 s and lookups that each wait 0.1 s, at most
    three hosts are."""
    names = many_mx(zone, 100)
    for name in names:
        zone.silent(name)
    resolver = make_resolver(timeouts=Timeouts(dns=0.1, dns_attempt=0.25))

    with pytest.raises(DNSTemporaryError, match=r"Timeouts\.dns_attempt") as info:
        await walk(resolver, "example.test")

    assert info.value.default_enhanced_code == "4.4.3"
    # Every host that was looked up waited its full 0.1 s (or what was left).
    looked_up = {name for name, qtype in asked(zone) if qtype != "MX"}
    assert 1 <= len(looked_up) <= 3
    assert looked_up == set(names[: len(looked_up)])
    assert resolver.statistics().lookups == 1 + 2 * len(looked_up)


# -- address literals: their own host and address, no DNS ------------------------------


@pytest.mark.parametrize(
    ("literal", "ip"),
    [("[127.0.0.1]", "127.0.0.1"), ("[ipv6:::1]", "::1"), ("[IPv6:0:0::1]", "::1")],
)
async def test_address_literal_walks_to_its_address_without_dns(
    zone: Zone, make_resolver: MakeResolver, literal: str, ip: str
) -> None:
    """An address literal is its own single host, used without any lookup."""
    resolver = make_resolver()

    route = await resolver.route(literal)

    assert route == Route(
        literal.lower(), (MXHost(literal.lower(), 0, literal=ip),), implicit=False
    )
    assert await walk(resolver, literal) == [(literal.lower(), ip)]
    assert zone.queries == {}
    assert resolver.statistics().lookups == 0


async def test_local_address_literal_refused(
    zone: Zone, make_resolver: MakeResolver
) -> None:
    """Without allow_local a loopback literal defers 451 4.4.4, as local MX hosts do;
    a public one is walked to."""
    resolver = make_resolver(allow_local=False)

    with pytest.raises(DNSTemporaryError, match=r"local address.*allow_local") as info:
        await walk(resolver, "[127.0.0.1]")

    assert info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.enhanced_code) == (451, "4.4.4")
    public = f"[{PUBLIC_V4}]"
    assert await walk(resolver, public) == [(public, PUBLIC_V4)]
    assert zone.queries == {}


@pytest.mark.parametrize("literal", ["[1.2.3]", "[tag:x]", "[ipv6:fe80::1%eth0]", "["])
async def test_invalid_address_literal_fails(
    zone: Zone, make_resolver: MakeResolver, literal: str
) -> None:
    """A literal that prepare() would refuse fails 5.1.3 if it reaches routing."""
    with pytest.raises(NoMailServerError, match="not a valid address literal") as info:
        await make_resolver().route(literal)

    assert info.value.reply is not None
    assert info.value.reply.enhanced_code == "5.1.3"
    assert zone.queries == {}


@pytest.mark.parametrize(
    ("domain", "key"),
    [
        ("[127.0.0.1]", "[127.0.0.1]"),
        ("[IPv6:::1]", "[ipv6:::1]"),
        ("[IPV6:0:0:0:0:0:0:0:1]", "[ipv6:::1]"),
        ("[ipv6:2001:DB8::A]", "[ipv6:2001:db8::a]"),
        ("[IPv6:::ffff:192.0.2.1]", "[ipv6:::ffff:c000:201]"),
        ("Example.TEST", None),
        ("[1.2.3]", None),
    ],
)
def test_literal_destination_is_canonical(domain: str, key: str | None) -> None:
    """Every spelling of one literal's address is one destination (lane)."""
    assert _dns.literal_destination(domain) == key
