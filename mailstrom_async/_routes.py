"""Where a recipient's mail goes: through the relay, or to its domain's MX hosts.

A route is a :class:`~mailstrom_async.Transport`: it names the *destination*
(lane) of each recipient and opens connections to it. For direct delivery it walks
the MX hosts in the order the resolver gives (RFC 5321 §5.1), which looks each one
up only when the walk reaches it, and tries their addresses in turn; an address
that refuses the connection, times out, greets with 4xx/5xx or fails TLS is
skipped for the next. An address literal (``user@[192.0.2.1]``) is its own
destination and its one address.
Only when every address failed does the attempt fail, with one error whose
``__cause__`` is the group of all the failures.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
from typing import TYPE_CHECKING

import anyio
import attrs

from mailstrom_async._dns import MXHost, Resolver, literal_destination
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
        # The envelope already carries A-labels (prepare() converted IDNs); an
        # address literal has one spelling per address, so one lane.
        domain = address.rpartition("@")[2]
        return literal_destination(domain) or domain.lower()

    async def connect(
        self, destination: str, *, skip: frozenset[str] = frozenset()
    ) -> SMTPConnection:
        failures: list[TransientDeliveryError] = []
        # Each MX host is looked up only when the hosts before it have failed.
        async with contextlib.aclosing(self._resolver.walk(destination)) as walk:
            async for host, ip in walk:
                if ip in skip:
                    continue
                try:
                    return await SMTPConnection.open(
                        self._settings(host), ip=ip, tls_memory=self._tls_memory
                    )
                except TransientDeliveryError as exc:
                    failures.append(exc)
                    logger.info(
                        "MX address failed, trying the next",
                        extra={
                            "destination": destination,
                            "host": host.name,
                            "ip": ip,
                            "error": str(exc),
                        },
                    )
        if not failures:  # the walk raises when it has no address at all
            msg = f"every MX address of {destination} was tried in this attempt"
            raise NoAddressLeftError(msg)
        raise _all_failed(destination, failures)

    def _settings(self, host: MXHost) -> ConnectionSettings:
        settings = mx_settings(
            self._config, host.name, self._helo_name, self._ssl_context
        )
        if host.literal is not None:
            # No host name to check a certificate against: only the IP address
            # itself (a certificate naming it verifies; otherwise unverified TLS).
            settings = attrs.evolve(settings, server_hostname=host.literal)
        return settings

    async def aclose(self) -> None:
        await self._resolver.aclose()


def _all_failed(
    destination: str, failures: list[TransientDeliveryError]
) -> TransientDeliveryError:
    """One error for an attempt in which every address failed; its ``__cause__``
    is the group of all the failures."""
    last = failures[-1]
    if len(failures) == 1:
        msg = str(last)  # the cause, said once
    else:
        tried = "; ".join(str(f) for f in failures)
        msg = f"all {len(failures)} MX addresses of {destination} failed: {tried}"
    error = type(last)(msg, reply=last.reply, host=last.host, ip=last.ip)
    error.__cause__ = ExceptionGroup(msg, failures)
    return error


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
