"""What the delivery engine needs from a transport and from its connections.

A :class:`Transport` names the *destination* (lane) of each recipient and opens
:class:`Connection` objects to it; a connection runs mail transactions and says
what happened to each recipient as a :class:`RecipientOutcome`. The relay and MX
routes with their SMTP connections are the transports the Deliverer builds from
its configuration; ``mailstrom_async.testing.Outbox`` is one that never touches
the network. Outcomes go through the same retry policy, store and events
whichever transport produced them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mailstrom_async._classify import RecipientOutcome

__all__ = ["Connection", "Transport"]


class Connection(Protocol):
    """One open connection of a :class:`Transport`, used by one task at a time.

    The Deliverer reuses a connection for several transactions while
    ``is_usable`` is true, and closes it when it is idle, broken or no longer
    needed.
    """

    @property
    def host(self) -> str:
        """The name of the host connected to (recorded with each attempt)."""
        ...

    @property
    def ip(self) -> str | None:
        """The address connected to, if there is one."""
        ...

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted."""
        ...

    @property
    def tls_verified(self) -> bool:
        """Whether the peer's TLS certificate was verified."""
        ...

    @property
    def is_usable(self) -> bool:
        """False once the connection is closed or broken."""
        ...

    @property
    def final_dot_unconfirmed(self) -> bool:
        """The last :meth:`send` was cancelled after the message was handed over,
        so the peer may have it (the recipients are flagged
        ``possible_duplicate``)."""
        ...

    async def send(
        self,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
    ) -> list[RecipientOutcome]:
        """Run one mail transaction: one outcome per *rcpt_to*, in order.

        Raises:
            DeliveryError: the whole transaction failed (transient: every
                recipient is DEFERRED; permanent: FAILED). The connection is
                then closed.
        """
        ...

    async def aclose(self) -> None:
        """Close politely (an SMTP ``QUIT``); never raises."""
        ...

    def close_now(self) -> None:
        """Close at once, without a goodbye; idempotent."""
        ...


class Transport(Protocol):
    """Where mail goes: names each recipient's destination and connects to it.

    Pass one as ``Deliverer(config, transport=...)`` to replace the relay or MX
    delivery that ``config`` describes.
    """

    @property
    def fails_over(self) -> bool:
        """Whether a transient failure on an open connection may move on to
        another address of the same destination within the same attempt (MX
        hosts: yes; a relay: no). With False, :meth:`connect` is always called
        with an empty *skip*."""
        ...

    def destination(self, address: str) -> str:
        """The destination of a recipient address.

        Recipients of a message with different destinations are delivered in
        separate transactions; each destination has its own connections and its
        own backoff after a failure.
        """
        ...

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> Connection:
        """Open a connection to *destination*, avoiding the addresses in *skip*.

        Raises:
            DeliveryError: no connection could be had (transient or permanent).
        """
        ...

    async def aclose(self) -> None:
        """Release what the transport holds; called when the Deliverer closes."""
        ...
