"""A small authoritative DNS server on a loopback UDP port, for tests.

It runs in the test's own event loop (an asyncio ``DatagramProtocol``: no thread,
nothing blocks) and answers from a :class:`Zone` the test fills in::

    async def test_something(dns_server: DNSServer) -> None:
        dns_server.zone.add_mx("example.test", 10, "mx1.example.test")
        dns_server.zone.add_a("mx1.example.test", "127.0.0.2")
        config = MXConfig(nameservers=[dns_server.nameserver], allow_local=True)

Answers follow RFC 1034/2308: records of the asked type (following a CNAME);
NODATA (NOERROR, empty answer, SOA in authority) when the name has records of
other types only; NXDOMAIN for names the zone does not know. ``servfail``,
``refuse`` and ``silent`` inject faults per name (and optionally per type), and
``heal`` takes them away again. Every record has TTL 0 unless the test says
otherwise, so c-ares' own cache never hides a query; ``zone.queries`` counts what
was asked, per ``(name, type)``.

The fixture is ``dns_server``; import it into a test module
(``from tests.dns_server import dns_server_fixture``) or list this module in
``pytest_plugins``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import ipaddress
import typing
from collections.abc import AsyncIterator

import pytest
from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord

__all__ = ["DNSServer", "Fault", "Zone", "dns_server_fixture", "running_dns_server"]

LOCALHOST = "127.0.0.1"


class Fault(enum.Enum):
    """What the server does instead of answering."""

    SERVFAIL = "servfail"
    REFUSED = "refused"
    SILENT = "silent"
    """Drop the query: the client times out."""


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class Zone:
    """The records the server answers from, its injected faults and a query count."""

    def __init__(self) -> None:
        self._records: dict[str, list[RR]] = collections.defaultdict(list)
        self._faults: dict[tuple[str, str | None], Fault] = {}
        self.negative_ttl = 0
        """TTL and MINIMUM of the SOA sent with NXDOMAIN and NODATA answers."""
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        """How many queries arrived, per (lower-case name, type such as ``"MX"``)."""

    def _add(self, name: str, rtype: str, rdata: object, ttl: int) -> None:
        self._records[_key(name)].append(
            RR(_key(name), getattr(QTYPE, rtype), rdata=rdata, ttl=ttl)
        )

    def add_mx(
        self, name: str, preference: int, exchange: str | DNSLabel, *, ttl: int = 0
    ) -> None:
        """Add ``name MX preference exchange`` (a DNSLabel for labels of any bytes)."""
        self._add(name, "MX", MX(exchange, preference), ttl)

    def null_mx(self, name: str, *, ttl: int = 0) -> None:
        """Add the null MX of RFC 7505 (``name MX 0 .``)."""
        self._add(name, "MX", MX(".", 0), ttl)

    def add_a(self, name: str, *addresses: str, ttl: int = 0) -> None:
        """Add one A record per IPv4 address."""
        for address in addresses:
            self._add(name, "A", A(address), ttl)

    def add_aaaa(self, name: str, *addresses: str, ttl: int = 0) -> None:
        """Add one AAAA record per IPv6 address."""
        for address in addresses:
            # dnslib cannot parse "::ffff:1.2.3.4"; ipaddress can.
            packed = ipaddress.IPv6Address(address).packed
            self._add(name, "AAAA", AAAA(tuple(packed)), ttl)

    def add_cname(self, name: str, target: str, *, ttl: int = 0) -> None:
        """Make *name* an alias of *target*."""
        self._add(name, "CNAME", CNAME(target), ttl)

    def add_txt(self, name: str, text: str, *, ttl: int = 0) -> None:
        """Add a TXT record (a name that exists but has no address nor MX)."""
        self._add(name, "TXT", TXT(text), ttl)

    def remove(self, name: str) -> None:
        """Forget every record of *name* (it becomes NXDOMAIN)."""
        self._records.pop(_key(name), None)

    def servfail(self, name: str, qtype: str | None = None) -> None:
        """Answer SERVFAIL to queries for *name* (of *qtype*, or of any type)."""
        self._faults[_key(name), qtype] = Fault.SERVFAIL

    def refuse(self, name: str, qtype: str | None = None) -> None:
        """Answer REFUSED to queries for *name* (of *qtype*, or of any type)."""
        self._faults[_key(name), qtype] = Fault.REFUSED

    def silent(self, name: str, qtype: str | None = None) -> None:
        """Never answer queries for *name* (of *qtype*, or of any type)."""
        self._faults[_key(name), qtype] = Fault.SILENT

    def heal(self, name: str) -> None:
        """Remove every fault injected for *name*: answer from the records again."""
        for key in [k for k in self._faults if k[0] == _key(name)]:
            del self._faults[key]

    def count(self, name: str, qtype: str | None = None) -> int:
        """Queries received for *name* of *qtype* (of any type when ``None``)."""
        return sum(
            n
            for (qname, t), n in self.queries.items()
            if qname == _key(name) and qtype in (None, t)
        )

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        """Build the reply to *request*, or ``None`` to stay silent."""
        qname, qtype = _key(str(request.q.qname)), QTYPE[request.q.qtype]
        self.queries[qname, qtype] += 1
        reply = request.reply()
        fault = self._faults.get((qname, qtype)) or self._faults.get((qname, None))
        if fault is Fault.SILENT:
            return None
        if fault is not None:
            reply.header.rcode = getattr(RCODE, fault.name)
            return reply
        name, records = qname, self._records.get(qname, [])
        for _ in range(8):  # follow a CNAME chain, as an authoritative server does
            cnames = [rr for rr in records if rr.rtype == QTYPE.CNAME]
            if not cnames or qtype == "CNAME":
                break
            reply.add_answer(cnames[0])
            name = _key(str(cnames[0].rdata.label))
            records = self._records.get(name, [])
        matches = [rr for rr in records if QTYPE[rr.rtype] == qtype]
        for rr in matches:
            reply.add_answer(rr)
        if not matches:
            if name not in self._records:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa(name))
        return reply

    def _soa(self, name: str) -> RR:
        apex = name.rpartition(".")[2] or name
        times = (1, 3600, 600, 86400, self.negative_ttl)
        rdata = SOA(f"ns.{apex}", f"hostmaster.{apex}", times)
        return RR(apex, QTYPE.SOA, rdata=rdata, ttl=self.negative_ttl)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport is not a DatagramTransport subclass.
        self.transport = typing.cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # garbage in: drop it, as servers do
            return
        reply = self.zone.answer(request)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply.pack(), addr)


class DNSServer:
    """A running server: ``.port``, ``.nameserver`` (``"127.0.0.1:PORT"``), ``.zone``."""

    def __init__(self, zone: Zone, transport: asyncio.DatagramTransport) -> None:
        self.zone = zone
        self._transport = transport
        self.port: int = transport.get_extra_info("sockname")[1]

    @property
    def nameserver(self) -> str:
        """The server as ``MXConfig.nameservers`` wants it."""
        return f"{LOCALHOST}:{self.port}"


@contextlib.asynccontextmanager
async def running_dns_server(zone: Zone | None = None) -> AsyncIterator[DNSServer]:
    """Serve *zone* (a new empty one by default) on 127.0.0.1, an ephemeral port."""
    zone = zone if zone is not None else Zone()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(zone), local_addr=(LOCALHOST, 0)
    )
    try:
        yield DNSServer(zone, transport)
    finally:
        transport.close()


@pytest.fixture(name="dns_server")
async def dns_server_fixture() -> AsyncIterator[DNSServer]:
    """A loopback DNS server with an empty zone, closed after the test."""
    async with running_dns_server() as server:
        yield server
