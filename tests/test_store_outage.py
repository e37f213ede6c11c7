"""A worker whose store stops answering starts no transaction it could not record (#13).

The leases of a job are renewed every third of the lease; when the store fails
those renewals, the lease this process knows of runs down, and once less than a
third is left the job starts no more SMTP transactions: it writes what it knows
and gives the rest back unattempted (another worker, or this one once the store
answers, takes them). The PostgreSQL outages themselves are in
tests/test_postgres_scale.py.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime

import anyio
import attrs

from mailstrom_async import Email, Limits, MemoryStore, RecipientState, StoreError
from mailstrom_async._deliverer import Deliverer
from tests.pg_child import config_for
from tests.smtpd import FaultHandler, SMTPDServers
from tests.test_engine_resilience import LogEvent

DEADLINE = 20


class RenewFails(MemoryStore):
    """A MemoryStore whose ``renew_leases`` fails; ``failed_thrice`` is set at
    the third failure (a lease and more after the first claim)."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals = 0
        self.failed_thrice = anyio.Event()

    async def renew_leases(
        self,
        *,
        worker: str,
        lease_until: datetime,
        message_ids: Collection[str] | None = None,
    ) -> int:
        self.renewals += 1
        if self.renewals >= 3:
            self.failed_thrice.set()
        msg = "the database went away (injected)"
        raise StoreError(msg)


async def test_job_stops_starting_transactions_once_its_lease_runs_down(
    smtpd: SMTPDServers,
) -> None:
    """One recipient per transaction; the first transaction is held up until the
    renewals have failed for a lease: the job records it, then gives the other
    two back unattempted instead of sending them on a lease it may have lost;
    claimed again, they are delivered once each."""
    handler = FaultHandler(stall_at="RCPT")
    server = await smtpd.start(handler)
    config = attrs.evolve(
        config_for("outage", server.port),
        lease_duration=0.6,
        limits=Limits(max_recipients_per_transaction=1),
    )
    store = RenewFails()
    given_back = LogEvent("the lease of a job was not renewed in time")
    logger = logging.getLogger("mailstrom_async.deliverer")
    logger.addHandler(given_back)
    try:
        async with Deliverer(config, store=store) as d:
            to = ["r0@example.org", "r1@example.org", "r2@example.org"]
            handle = await d.submit(
                Email(sender="s@example.com", to=to, subject="x", text="Hi.\n")
            )
            with anyio.fail_after(DEADLINE):
                await handler.stalled.wait()
                await store.failed_thrice.wait()
            handler.stall_at = None
            handler.release.set()
            with anyio.fail_after(DEADLINE):
                status = await handle
    finally:
        logger.removeHandler(given_back)
    assert given_back.records
    [record] = given_back.records[:1]
    assert record.recipients == 2  # type: ignore[attr-defined]
    assert all(r.state is RecipientState.DELIVERED for r in status)
    assert [r.attempts for r in status] == [1, 1, 1]
    assert sorted(a for m in server.messages for a in m.rcpt_tos) == sorted(to)
