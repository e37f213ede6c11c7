"""A tiny authoritative DNS server for the direct-MX demo, on loopback UDP.

It answers MX and A questions from a fixed table (TTL 0), says NXDOMAIN for names
it does not know and NODATA for other types, and serves a null MX (RFC 7505). It
exists so ``mailstrom-async demo --mx`` shows real DNS lookups without a third-party
DNS library; it is no general-purpose server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import typing

import attrs

__all__ = ["DemoDNSServer", "DemoZone"]

_A, _MX, _AAAA = 1, 15, 28
_NOERROR, _NXDOMAIN, _FORMERR = 0, 3, 1


@attrs.define
class DemoZone:
    """Names and their MX (preference, exchange) and A records."""

    mx: dict[str, list[tuple[int, str]]] = attrs.field(factory=dict)
    a: dict[str, list[str]] = attrs.field(factory=dict)

    def names(self) -> set[str]:
        return set(self.mx) | set(self.a)


def _encode_name(name: str) -> bytes:
    labels = [label for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(x)]) + x.encode("ascii") for x in labels) + b"\0"


def _decode_question(packet: bytes) -> tuple[str, int, int]:
    """The first question's name, type and the offset just after it."""
    labels, offset = [], 12
    while (length := packet[offset]) != 0:
        if length > 63:
            msg = "compressed or invalid name in a question"
            raise ValueError(msg)
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    qtype = struct.unpack_from("!H", packet, offset + 1)[0]
    return ".".join(labels).lower(), qtype, offset + 5


def answer(zone: DemoZone, packet: bytes) -> bytes:
    """The response to one query *packet*."""
    (query_id,) = struct.unpack_from("!H", packet)
    try:
        name, qtype, end = _decode_question(packet)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        return struct.pack("!HHHHHH", query_id, 0x8000 | _FORMERR, 0, 0, 0, 0)
    records: list[bytes] = []
    if qtype == _MX:
        for preference, exchange in zone.mx.get(name, []):
            rdata = struct.pack("!H", preference) + _encode_name(exchange)
            records.append(struct.pack("!HHHIH", 0xC00C, _MX, 1, 0, len(rdata)) + rdata)
    elif qtype == _A:
        for address in zone.a.get(name, []):
            rdata = ipaddress.IPv4Address(address).packed
            records.append(struct.pack("!HHHIH", 0xC00C, _A, 1, 0, 4) + rdata)
    rcode = _NOERROR if name in zone.names() else _NXDOMAIN
    # QR, AA, RD copied from the query; RA off: we are authoritative only.
    flags = 0x8400 | (struct.unpack_from("!H", packet, 2)[0] & 0x0100) | rcode
    header = struct.pack("!HHHHHH", query_id, flags, 1, len(records), 0, 0)
    return header + packet[12:end] + b"".join(records)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: DemoZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is not a DatagramTransport
        # subclass at run time, whatever typeshed says.
        self.transport = typing.cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        if self.transport is not None and len(data) >= 12:
            self.transport.sendto(answer(self.zone, data), addr)


class DemoDNSServer:
    """``async with DemoDNSServer(zone) as dns``: serves *zone* on 127.0.0.1."""

    def __init__(self, zone: DemoZone) -> None:
        self.zone = zone
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> DemoDNSServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self.zone), local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._transport is not None:
            self._transport.close()
