"""Scenario 5: direct-MX delivery across many recipient domains.

Every recipient domain ``dN.mx.bench.test`` has its own MX record, answered by a
tiny authoritative DNS responder on 127.0.0.1 (UDP, in the measuring process):
``MX 10 mxK.mx.bench.test`` with K = N mod 3, and each ``mxK`` has an A record
127.0.0.1, where ``smtp-sink`` listens. So each domain is its own destination
(lane) while all mail lands on one loopback sink. The scenario checks that lanes
are created on demand and reaped when idle, and compares the peak RSS of a run
over many domains with one over few domains carrying the same number of messages:
memory should follow the active lanes, not the domains ever seen.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from typing import Any, cast

import anyio

from bench._common import (
    HELO,
    MX_ZONE,
    SENDER,
    CpuClock,
    Row,
    Target,
    median,
    mx_domain,
    raw_message,
    recipient,
    vm_status_kib,
)
from bench.scenarios import BENCH_RETRY
from mailstrom_async import (
    Config,
    Deliverer,
    Limits,
    MXConfig,
    RecipientState,
    SQLiteStore,
    SubmitHandle,
)

__all__ = [
    "MX_RSS_GROWTH_MIB",
    "mx_available",
    "mx_lanes",
    "report_rows",
    "report_targets",
]

#: Scenario 5 passes when no lane outlives its idle timeout and the many-domain
#: run's peak RSS exceeds the few-domain run's by less than this.
MX_RSS_GROWTH_MIB = 10.0

_A, _MX, _IN = 1, 15, 1
_DOMAIN = re.compile(r"d(\d+)\." + re.escape(MX_ZONE))
_HOST = re.compile(r"mx(\d)\." + re.escape(MX_ZONE))
_TTL = 300


def mx_available() -> str | None:
    """None when direct-MX mode can be benchmarked, else the reason it cannot."""
    try:
        from mailstrom_async._routes import MXRoute  # noqa: F401
    except ImportError:
        return "this mailstrom_async has no direct-MX delivery yet"
    return None


def _name(labels: str) -> bytes:
    parts = [p for p in labels.rstrip(".").split(".") if p]
    return b"".join(bytes([len(p)]) + p.encode("ascii") for p in parts) + b"\0"


def _answer(query: bytes) -> bytes | None:
    """The reply to one DNS query, or None for garbage."""
    if len(query) < 17:
        return None
    qid, flags = struct.unpack("!HH", query[:4])
    labels, pos = [], 12
    while pos < len(query) and query[pos]:
        n = query[pos]
        labels.append(query[pos + 1 : pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    if pos + 5 > len(query):
        return None
    qtype, _ = struct.unpack("!HH", query[pos + 1 : pos + 5])
    question = query[12 : pos + 5]
    name = ".".join(labels).lower()
    records: list[tuple[int, bytes]] = []
    rcode = 0
    if m := _DOMAIN.fullmatch(name):
        if qtype == _MX:
            exchange = f"mx{int(m.group(1)) % 3}.{MX_ZONE}"
            records.append((_MX, struct.pack("!H", 10) + _name(exchange)))
    elif _HOST.fullmatch(name):
        if qtype == _A:
            records.append((_A, bytes([127, 0, 0, 1])))
    else:
        rcode = 3  # NXDOMAIN
    reply_flags = 0x8400 | (flags & 0x0100) | rcode  # QR, AA, RD copied
    header = struct.pack("!HHHHHH", qid, reply_flags, 1, len(records), 0, 0)
    answers = b"".join(
        struct.pack("!HHHIH", 0xC00C, rtype, _IN, _TTL, len(rdata)) + rdata
        for rtype, rdata in records
    )
    return header + question + answers


class _DNSProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queries += 1
        reply = _answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _lane_count(deliverer: Deliverer) -> int:
    """The destinations with an active lane, from the public statistics."""
    return len((await deliverer.statistics()).destinations)


async def mx_lanes(params: dict[str, Any]) -> dict[str, Any]:
    """Deliver N messages spread over D domains in direct-MX mode."""
    count: int = params["messages"]
    domains: int = params["domains"]
    idle: float = params.get("idle_timeout", 0.5)
    token: str = params["token"]
    loop = asyncio.get_running_loop()
    transport, dns = await loop.create_datagram_endpoint(
        _DNSProtocol, local_addr=("127.0.0.1", 0)
    )
    dns_port = transport.get_extra_info("sockname")[1]
    config = Config(
        helo_name=HELO,
        relay=None,
        mx=MXConfig(
            nameservers=(f"127.0.0.1:{dns_port}",),
            port=params["port"],
            allow_local=True,
        ),
        limits=Limits(connections_per_destination=10, idle_timeout=idle),
        retry=BENCH_RETRY,
    )
    path = f"{params['tmpdir']}/mx-{params['token']}.sqlite3"
    clock = CpuClock()
    lanes_max = 0
    rss_max_during = 0
    delivered = 0
    try:
        async with Deliverer(config, store=SQLiteStore(path)) as deliverer:

            async def sample() -> None:
                nonlocal lanes_max, rss_max_during
                while True:
                    lanes_max = max(lanes_max, await _lane_count(deliverer))
                    rss_max_during = max(rss_max_during, vm_status_kib()["VmRSS"])
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                clock.start()
                # Rendered on the fly and dropped once done: the process holds
                # the engine's memory, not a pile of test messages.
                handles: list[SubmitHandle] = []
                for i in range(count):
                    domain = mx_domain(i % domains)
                    handles.append(
                        await deliverer.submit(
                            raw_message(i, token, domain=domain),
                            mail_from=SENDER,
                            rcpt_to=[recipient(i, token, domain=domain)],
                        )
                    )
                for handle in handles:
                    status = await handle
                    delivered += sum(
                        r.state is RecipientState.DELIVERED for r in status.recipients
                    )
                handles.clear()
                clock.stop()
                # Every lane's workers end after idle_timeout; then it is reaped.
                await anyio.sleep(idle + 0.5)
                lanes_after_idle = await _lane_count(deliverer)
                tg.cancel_scope.cancel()
    finally:
        transport.close()
        for suffix in ("", "-wal", "-shm"):
            await anyio.Path(path + suffix).unlink(missing_ok=True)
    vm = vm_status_kib()
    return {
        "messages": count,
        "domains": domains,
        "seconds": clock.wall,
        "msgs_per_s": count / clock.wall,
        "cpu_ms_per_msg": 1000 * clock.cpu / count,
        "all_delivered": delivered == count,
        "delivered": delivered,
        "dns_queries": dns.queries,
        "lanes_max": lanes_max,
        "lanes_after_idle": lanes_after_idle,
        "peak_rss_mib": vm["VmHWM"] / 1024,
        "rss_end_mib": vm["VmRSS"] / 1024,
        "finished_at": time.time(),
    }


def _m(runs: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in runs if r.get(key) is not None])


def report_rows(
    runs: list[dict[str, Any]],
    few: list[dict[str, Any]],
    pool_rate: float,
) -> list[Row]:
    """Table rows for scenario 5 (*few*: the few-domain control runs)."""
    if not runs:
        return []
    domains, few_domains = runs[0]["domains"], few[0]["domains"] if few else 0
    rate = _m(runs, "msgs_per_s")
    rss, few_rss = _m(runs, "peak_rss_mib"), _m(few, "peak_rss_mib")
    ok = _passed(runs, few)
    delivered = all(r["all_delivered"] for r in runs)
    return [
        Row(
            "5",
            f"direct MX, {domains:,} domains, 1 sink",
            f"{rate:,.0f} msg/s",
            f"{rate / pool_rate:.2f}x B" if pool_rate else "",
            "all DELIVERED",
            "PASS" if delivered else "FAIL",
        ),
        Row(
            "5",
            f"  peak RSS, {domains:,} vs {few_domains:,} domains",
            f"{rss:.1f} MiB",
            f"{rss - few_rss:+.1f} MiB",
            f"< +{MX_RSS_GROWTH_MIB:g} MiB",
            "PASS" if ok else "FAIL",
        ),
        Row(
            "5",
            "  lanes: most at once / left after idle",
            f"{_m(runs, 'lanes_max'):.0f} / {_m(runs, 'lanes_after_idle'):.0f}",
            "",
            "0 left",
            "PASS" if _m(runs, "lanes_after_idle") == 0 else "FAIL",
        ),
    ]


def _passed(runs: list[dict[str, Any]], few: list[dict[str, Any]]) -> bool:
    growth = _m(runs, "peak_rss_mib") - _m(few, "peak_rss_mib")
    reaped = all(r.get("lanes_after_idle") == 0 for r in runs)
    return reaped and growth < MX_RSS_GROWTH_MIB


def report_targets(
    runs: list[dict[str, Any]],
    few: list[dict[str, Any]],
) -> list[Target]:
    if not runs:
        return []
    growth = _m(runs, "peak_rss_mib") - _m(few, "peak_rss_mib")
    return [
        Target(
            "scenario 5 memory bounded by active lanes",
            growth,
            f"peak RSS growth < {MX_RSS_GROWTH_MIB:g} MiB, no lane left after idle",
            _passed(runs, few),
            f"{runs[0]['domains']:,} vs {few[0]['domains'] if few else 0:,} domains",
        )
    ]
