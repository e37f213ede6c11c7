"""One rule for address case in every layer (issue 11, item 5).

RFC 5321 §2.4: a local part may be case-sensitive, a domain is not. ``prepare()``
keeps ``Bob@x.test`` and ``bob@x.test`` as two recipients, so every layer after
it (the stores, the job's outcomes, status lookups, the testing kit) must tell
them apart the same way: ``recipient_key``, the local part as given and the
domain case-insensitively. A server that rejects ``Bob@`` and accepts ``bob@``
must see ``Bob@`` end FAILED and ``bob@`` DELIVERED.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    MemoryStore,
    MessageStatus,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    SQLiteStore,
    Timeouts,
    prepare,
)
from mailstrom_async._address import recipient_key
from tests.smtpd import FaultHandler

if TYPE_CHECKING:
    from mailstrom_async._store import Store
    from mailstrom_async.testing import CaptureServer, Outbox
    from tests.smtpd import SMTPDServers

DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


def email(*to: str) -> Email:
    return Email(sender="me@sender.test", to=list(to), subject="x", text="y\n")


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "queue.sqlite3")


def test_recipient_key_is_local_part_as_given_and_domain_folded() -> None:
    """The one comparison rule: local part exactly, domain in any case, an IDN
    domain by its A-label."""
    assert (
        recipient_key("Bob@X.TEST") == recipient_key("Bob@x.test") == ("Bob", "x.test")
    )
    assert recipient_key("Bob@x.test") != recipient_key("bob@x.test")
    assert recipient_key("a@Faß.DE") == recipient_key("a@xn--fa-hia.de")
    assert recipient_key("a@[IPv6:ABCD::1]") == ("a", "[ipv6:abcd::1]")


def test_prepare_keeps_local_parts_apart_and_folds_domains() -> None:
    """``Bob@X.TEST`` and ``Bob@x.test`` are one recipient; ``bob@x.test`` another."""
    prepared = prepare(email("Bob@X.TEST", "Bob@x.test", "bob@x.test", "bob@X.test"))
    assert prepared.rcpt_to == ("Bob@X.TEST", "bob@x.test")


async def test_rejected_bob_fails_and_accepted_bob_is_delivered(
    smtpd: SMTPDServers, store: Store
) -> None:
    """A real server that refuses ``Bob@x.test`` (550) and accepts ``bob@x.test``:
    the statuses say Bob FAILED and bob DELIVERED, in both stores, and the
    duplicate spelling ``Bob@X.TEST`` is one recipient with ``Bob@x.test``."""
    handler = FaultHandler(rcpt_replies={"Bob@x.test": "550 5.1.1 no such user Bob"})
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        retry=RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=3),
        timeouts=Timeouts(connect=5, command=5, data_start=5, data_end=5),
    )
    async with Deliverer(config, store=store) as d:
        handle = await d.submit(email("Bob@x.test", "bob@x.test", "Bob@X.TEST"))
        with anyio.fail_after(10):
            status = await handle
        again = await d.status(handle.message_id)
    for s in (status, again):
        assert [(r.address, r.state, r.code) for r in s] == [
            ("Bob@x.test", FAILED, 550),
            ("bob@x.test", DELIVERED, 250),
        ]
        assert s.recipient("Bob@X.TEST").state is FAILED
        assert s.recipient("bob@X.test").state is DELIVERED
    [received] = server.messages
    assert received.rcpt_tos == ["bob@x.test"]


async def test_status_survives_a_reopened_sqlite_store(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """The two outcomes are written to the SQLite file as two rows, each its own."""
    handler = FaultHandler(rcpt_replies={"bob@x.test": "550 5.1.1 no such user bob"})
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
    )
    path = tmp_path / "q.db"
    async with Deliverer(config, store=SQLiteStore(path)) as d:
        handle = await d.submit(email("Bob@x.test", "bob@x.test"))
        with anyio.fail_after(10):
            await handle
    async with SQLiteStore(path) as reopened:
        status: MessageStatus = await reopened.status(handle.message_id)
    assert [(r.address, r.state) for r in status] == [
        ("Bob@x.test", DELIVERED),
        ("bob@x.test", FAILED),
    ]


async def test_outbox_rules_follow_the_same_rule(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """``outbox.fail("Bob@x.test")`` fails Bob (whatever the domain's case), not bob."""
    outbox.fail("Bob@X.TEST")
    with anyio.fail_after(10):
        status = await (await deliverer.submit(email("Bob@x.test", "bob@x.test")))
    assert [(r.address, r.state) for r in status] == [
        ("Bob@x.test", FAILED),
        ("bob@x.test", DELIVERED),
    ]
    [message] = outbox.messages
    assert message.rcpt_to == ("bob@x.test",)


async def test_outbox_domain_rule_ignores_case_and_takes_idn(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """A domain rule matches its domain in any case, and by its A-label."""
    outbox.fail("@Faß.TEST")
    outbox.fail("@X.test")
    with anyio.fail_after(10):
        status = await (
            await deliverer.submit(email("a@faß.test", "b@x.TEST", "c@y.test"))
        )
    assert [(r.address, r.state) for r in status] == [
        ("a@xn--fa-hia.test", FAILED),
        ("b@x.TEST", FAILED),
        ("c@y.test", DELIVERED),
    ]


async def test_capture_server_rules_follow_the_same_rule(
    smtp_server: CaptureServer,
) -> None:
    """The capture server tells ``Bob@`` from ``bob@`` as the outbox does."""
    smtp_server.fail("bob@x.test")
    async with Deliverer(smtp_server.relay_config(), store=MemoryStore()) as d:
        with anyio.fail_after(10):
            status = await (await d.submit(email("Bob@x.test", "bob@X.test")))
    assert [(r.address, r.state) for r in status] == [
        ("Bob@x.test", DELIVERED),
        ("bob@X.test", FAILED),
    ]
    [message] = smtp_server.messages
    assert message.rcpt_to == ("Bob@x.test",)
