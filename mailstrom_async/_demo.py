"""``mailstrom-async demo``: real deliveries on loopback, shown as they happen.

The relay demo runs an SMTP server on 127.0.0.1 that defers one recipient once
and refuses another; the MX demo runs a DNS server and two MX hosts on 127.0.0.2
and 127.0.0.3, the preferred one refusing every session. Both use the SQLite store.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Sequence
from pathlib import Path

from mailstrom_async._config import (
    Config,
    MXConfig,
    RelayConfig,
    RetryPolicy,
    Timeouts,
)
from mailstrom_async._deliverer import Deliverer, SubmitHandle
from mailstrom_async._demo_dns import DemoDNSServer, DemoZone
from mailstrom_async._message import Email
from mailstrom_async._models import MessageStatus, RecipientState
from mailstrom_async._sink import SinkServer
from mailstrom_async._store import SQLiteStore

__all__ = ["mx_demo", "relay_demo"]

# The relay demo's server defers this recipient once, and refuses that one.
_BUSY = "busy@example.org"
_UNKNOWN = "nobody@example.com"
# Fast retries, and a lifetime so that the demo always ends.
_RETRY = RetryPolicy(initial_delay=0.5, factor=2, jitter=0.1, max_delay=5, lifetime=60)
_TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5, dns=2)


class _DemoPolicy:
    def __init__(self) -> None:
        self.deferred: collections.Counter[str] = collections.Counter()

    def __call__(self, address: str) -> str | None:
        if address == _UNKNOWN:
            return "550 5.1.1 No such user here"
        if address == _BUSY and not self.deferred[address]:
            self.deferred[address] += 1
            return "451 4.2.1 Mailbox busy, try again later"
        return None


async def relay_demo(store_path: Path, count: int) -> int:
    """Deliver *count* messages through a loopback relay; 0 when all went as shown."""
    async with SinkServer(policy=_DemoPolicy()) as sink:
        config = Config(
            helo_name="demo.localhost",
            relay=RelayConfig(host="127.0.0.1", port=sink.port, tls="none"),
            retry=_RETRY,
            timeouts=_TIMEOUTS,
        )
        print(f"SMTP server listening on 127.0.0.1:{sink.port}; queue in {store_path}")
        emails = []
        for n in range(count):
            to = ["alice@example.com", "bob@example.net"]
            if n == 0:
                to += [_BUSY, _UNKNOWN]
            emails.append(_email(to, f"mailstrom-async demo message {n + 1}"))
        statuses = await _run(config, store_path, emails)
    delivered, failed = _print_summary(statuses, len(sink.messages))
    return (
        0
        if failed == 1 and delivered == sum(len(m.recipients) for m in statuses) - 1
        else 1
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def mx_demo(store_path: Path) -> int:
    """Deliver straight to MX hosts found in a loopback DNS server."""
    zone = DemoZone(
        mx={
            # The preferred MX refuses every session: the next one takes the mail.
            "example.com": [(10, "mx1.example.com"), (20, "mx2.example.com")],
            "example.net": [(10, "mx2.example.com")],
            "nomail.example.org": [(0, ".")],  # RFC 7505 null MX
        },
        a={"mx1.example.com": ["127.0.0.2"], "mx2.example.com": ["127.0.0.3"]},
    )
    port = _free_port("127.0.0.2")
    refusing = SinkServer(host="127.0.0.2", port=port, greeting="554 5.3.2 Not today")
    async with (
        DemoDNSServer(zone) as dns,
        refusing,
        SinkServer(host="127.0.0.3", port=port) as accepting,
    ):
        config = Config(
            helo_name="demo.localhost",
            relay=None,
            mx=MXConfig(nameservers=(dns.nameserver,), port=port, allow_local=True),
            retry=_RETRY,
            timeouts=_TIMEOUTS,
        )
        print(
            f"DNS server on {dns.nameserver}; MX hosts on 127.0.0.2:{port} "
            f"(refuses) and 127.0.0.3:{port}; queue in {store_path}"
        )
        to = [
            "alice@example.com",
            "bob@example.net",
            "carol@nomail.example.org",
            "dave@no-such-domain.example",
        ]
        statuses = await _run(config, store_path, [_email(to, "direct MX demo")])
    _print_summary(statuses, len(accepting.messages))
    print(
        f"mx1.example.com (127.0.0.2) refused {refusing.sessions} session(s); "
        "the mail went to the next MX host, mx2.example.com (127.0.0.3)"
    )
    by_address = {r.address: r for m in statuses for r in m}
    expected = {
        "alice@example.com": ("mx2.example.com", RecipientState.DELIVERED),
        "bob@example.net": ("mx2.example.com", RecipientState.DELIVERED),
        "carol@nomail.example.org": (None, RecipientState.FAILED),
        "dave@no-such-domain.example": (None, RecipientState.FAILED),
    }
    ok = all(
        (by_address[a].host, by_address[a].state) == want
        for a, want in expected.items()
    )
    return 0 if ok else 1


def _email(to: list[str], subject: str) -> Email:
    return Email(
        sender="Demo <demo@example.com>",
        to=to,
        subject=subject,
        text="Hello from mailstrom-async.\n",
    )


async def _run(
    config: Config, store_path: Path, emails: list[Email]
) -> list[MessageStatus]:
    async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
        events = deliverer.events()
        handles: list[SubmitHandle] = [await deliverer.submit(e) for e in emails]
        print(f"submitted {len(handles)} message(s); delivering...")
        total = 0
        for handle in handles:
            total += len((await handle.status()).recipients)
        done: set[tuple[str, str]] = set()
        async for event in events:
            r = event.recipient
            said = f"{'local' if r.is_local else r.code} {r.message}"
            if event.state is RecipientState.DEFERRED:
                print(f"  deferred  {r.address}  ({said}; retrying)")
            elif event.state is RecipientState.FAILED:
                print(f"  failed    {r.address}  ({said})")
            elif event.state is RecipientState.DELIVERED:
                print(f"  delivered {r.address}  (via {r.host} {r.ip or ''})".rstrip())
            if event.state.is_final:
                done.add((event.message_id, event.address))
                if len(done) == total:
                    break
        await events.aclose()
        return [await h for h in handles]


def _print_summary(
    statuses: Sequence[MessageStatus], transactions: int
) -> tuple[int, int]:
    print()
    _print_table(statuses)
    delivered = sum(s.state is RecipientState.DELIVERED for m in statuses for s in m)
    failed = sum(s.state is RecipientState.FAILED for m in statuses for s in m)
    print(
        f"\n{delivered} delivered, {failed} failed; "
        f"the server received {transactions} transactions"
    )
    return delivered, failed


def _print_table(statuses: Sequence[MessageStatus]) -> None:
    for n, message in enumerate(statuses, 1):
        print(f"#{n}  {message.message_id}")
    print()
    rows = [("#", "recipient", "state", "attempts", "reply", "host", "ip", "text")]
    for n, message in enumerate(statuses, 1):
        for r in message:
            reply = " ".join(str(p) for p in (r.code, r.enhanced_code) if p is not None)
            text = (r.message or "").splitlines()[0] if r.message else ""
            rows.append(
                (
                    f"#{n}",
                    r.address,
                    r.state.value.upper(),
                    str(r.attempts),
                    reply,
                    r.host or "",
                    r.ip or "",
                    text[:60],
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
