"""The demo's tiny DNS server, checked with dnslib as the client-side parser."""

from __future__ import annotations

import dnslib

from mailstrom_async._demo_dns import DemoZone, answer

ZONE = DemoZone(
    mx={"example.com": [(10, "mx1.example.com")], "null.example": [(0, ".")]},
    a={"mx1.example.com": ["127.0.0.2"]},
)


def ask(name: str, qtype: str) -> dnslib.DNSRecord:
    query = dnslib.DNSRecord.question(name, qtype)
    reply = dnslib.DNSRecord.parse(answer(ZONE, query.pack()))
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1
    return reply


def test_mx_and_a_answers() -> None:
    """MX and A questions get the zone's records with TTL 0."""
    mx = ask("Example.COM", "MX")
    assert [(r.rdata.preference, str(r.rdata.label)) for r in mx.rr] == [
        (10, "mx1.example.com.")
    ]
    a = ask("mx1.example.com", "A")
    assert [(str(r.rdata), r.ttl) for r in a.rr] == [("127.0.0.2", 0)]


def test_null_mx_nodata_and_nxdomain() -> None:
    """A null MX has the root as exchange; other types are NODATA; unknown names NXDOMAIN."""
    null = ask("null.example", "MX")
    assert str(null.rr[0].rdata.label) == "."
    nodata = ask("example.com", "AAAA")
    assert (nodata.header.rcode, nodata.rr) == (dnslib.RCODE.NOERROR, [])
    assert ask("nope.example", "MX").header.rcode == dnslib.RCODE.NXDOMAIN


def test_garbage_is_a_format_error() -> None:
    """A packet whose question cannot be read gets FORMERR."""
    reply = dnslib.DNSRecord.parse(answer(ZONE, b"\x12\x34" + b"\x00" * 10 + b"\xff"))
    assert reply.header.rcode == dnslib.RCODE.FORMERR
