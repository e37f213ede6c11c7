"""How long one pooled connection may carry transactions.

A connection is reused across transactions and messages (RSET between them when
needed), but not without end (Postfix: ``smtp_connection_reuse_time_limit``,
``smtp_connection_reuse_count_limit``): a server that reloaded its
configuration only shows it on new connections, so a connection is retired once
it is ``Limits.connection_reuse_time`` old or carried
``Limits.connection_reuse_count`` transactions. And a recipient of a message
that got a 4xx on a connection is not tried again for that message on that
connection: its retry (a greylisting server, a full mailbox) goes out on a fresh
one, while the rest of its batch went on as usual. (Other messages to the same
address may still use the connection: a mailbox that is full for every
newsletter must not cost a connection per message.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import attrs

from mailstrom_async._models import RecipientState

if TYPE_CHECKING:
    from mailstrom_async._classify import RecipientOutcome
    from mailstrom_async._config import Limits
    from mailstrom_async._transport import Connection

__all__ = ["PooledConnection"]


@attrs.define(eq=False)
class PooledConnection:
    """An open connection with what its reuse is limited by."""

    conn: Connection
    opened_at: datetime
    """The engine's clock when the connection was opened."""
    transactions: int = 0
    deferred: set[tuple[str, str]] = attrs.field(factory=set)
    """(message id, recipient) that a server's 4xx deferred on this connection."""

    def retire_reason(
        self, message_id: str, batch: Sequence[str], now: datetime, limits: Limits
    ) -> str | None:
        """Why the next transaction, for *batch* of *message_id*, needs a new
        connection; None when this one may carry it."""
        if self.transactions >= limits.connection_reuse_count:
            return f"carried {self.transactions} transactions"
        age = (now - self.opened_at).total_seconds()
        if age >= limits.connection_reuse_time:
            return f"open for {age:.0f} s"
        if self.deferred and any((message_id, a) in self.deferred for a in batch):
            return "a recipient of the batch was deferred on it"
        return None

    def note(self, message_id: str, outcomes: Iterable[RecipientOutcome]) -> None:
        """One transaction ran: count it, and remember the recipients a server
        deferred with a 4xx (not those to retry at once in a new transaction,
        RFC 5321 §4.5.3.1.10, which may go on this connection)."""
        self.transactions += 1
        for o in outcomes:
            reply = o.reply
            if (
                o.state is RecipientState.DEFERRED
                and not o.retry_now
                and reply is not None
                and not reply.local
                and reply.is_transient
            ):
                self.deferred.add((message_id, o.address))
