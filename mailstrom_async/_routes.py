"""Where a recipient's mail goes: through the relay, or to its domain's MX hosts.

A route is a :class:`~mailstrom_async.Transport`: it names the *destination*
(lane) of each recipient and opens connections to it. For direct delivery it walks
the MX hosts in the order the resolver gives (RFC 5321 §5.1) and tries their
addresses in turn; an address that refuses the connection, times out, greets with
4xx/5xx or fails TLS is skipped for the next.
Only when every address failed does the attempt fail, with one error whose
``__cause__`` is the group of all the failures.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from typing import TYPE_CHECKING

import anyio

from mailstrom_async._dns import Resolver
from mailstrom_async._exceptions import ConnectError, TransientDeliveryError
from mailstrom_async._smtp import (
    ConnectionSettings,
    SMTPConnection,
    TLSMemory,
    make_ssl_context,
    mx_settings,
    relay_settings,
)

if TYPE_CHECKING:
    from mailstrom_async._config import Config

__all__ = ["MXRoute", "NoAddressLeftError", "RelayRoute", "network_route"]

logger = logging.getLogger("mailstrom_async.deliverer")

RELAY_DESTINATION = "relay"


class NoAddressLeftError(ConnectError):
    """Every address of the destination was already tried in this attempt."""


class RelayRoute:
    """Everything goes through one relay."""

    fails_over = False

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings

    def destination(self, address: str) -> str:
        return RELAY_DESTINATION

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> SMTPConnection:
        return await SMTPConnection.open(self.settings)

    async def aclose(self) -> None:
        return None


class MXRoute:
    """Each recipient domain is a destination, delivered to its MX hosts."""

    fails_over = True

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        *,
        helo_name: str,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._helo_name = helo_name
        self._ssl_context = ssl_context
        # Hosts whose certificate did not verify: one handshake next time.
        self._tls_memory = TLSMemory()

    def destination(self, address: str) -> str:
        # The envelope already carries A-labels (prepare() converted IDNs).
        return address.rpartition("@")[2].lower()

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> SMTPConnection:
        route = await self._resolver.route(destination)
        failures: list[TransientDeliveryError] = []
        for target in route.targets:
            settings = mx_settings(
                self._config, target.host, self._helo_name, self._ssl_context
            )
            for ip in target.addresses:
                if ip in skip:
                    continue
                try:
                    return await SMTPConnection.open(
                        settings, ip=ip, tls_memory=self._tls_memory
                    )
                except TransientDeliveryError as exc:
                    failures.append(exc)
                    logger.info(
                        "MX address failed, trying the next",
                        extra={
                            "destination": destination,
                            "host": target.host,
                            "ip": ip,
                            "error": str(exc),
                        },
                    )
        if not failures:  # the resolver never returns a route without addresses
            msg = f"every MX address of {destination} was tried in this attempt"
            raise NoAddressLeftError(msg)
        last = failures[-1]
        if len(failures) == 1:
            msg = str(last)  # the cause, said once
        else:
            tried = "; ".join(str(f) for f in failures)
            msg = f"all {len(failures)} MX addresses of {destination} failed: {tried}"
        error = type(last)(msg, reply=last.reply, host=last.host, ip=last.ip)
        raise error from ExceptionGroup(msg, failures)

    async def aclose(self) -> None:
        await self._resolver.aclose()


def _local_fqdn() -> str:
    # May query DNS: run in a worker thread, once per Deliverer.
    return socket.getfqdn()


async def network_route(config: Config, rng: random.Random) -> RelayRoute | MXRoute:
    """The relay or MX route that *config* describes, with its TLS context and
    HELO name made off the event loop (they may read files or query DNS)."""
    helo = config.helo_name
    if helo is None:
        helo = await anyio.to_thread.run_sync(_local_fqdn)
    relay = config.relay
    if relay is not None:
        context: ssl.SSLContext | None = None
        if relay.tls != "none":
            # Loading CA files is disk I/O: once, at start, off the event loop.
            context = await anyio.to_thread.run_sync(
                make_ssl_context, relay.verify, relay.ca_file
            )
        return RelayRoute(relay_settings(config, helo, context))
    # Opportunistic and required TLS try a verified session first and record
    # whether they had one (system CAs, loaded once off the loop).
    context = await anyio.to_thread.run_sync(make_ssl_context, True, None)
    resolver = Resolver(config.mx, config.timeouts, rng=rng)
    return MXRoute(config, resolver, helo_name=helo, ssl_context=context)
