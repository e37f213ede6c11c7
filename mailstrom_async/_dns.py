"""Where to deliver a domain's mail: MX lookup over aiodns (RFC 5321 §5.1, RFC 7505).

The only module that imports aiodns; it turns c-ares' answers into a :class:`Route`
and its errors into ours:

* MX records are sorted by preference, shuffled among equal preferences; a domain
  without MX records (NODATA) is its own implicit MX; if MX records exist the
  domain's own addresses are never used.
* NXDOMAIN for the domain, a null MX (``MX 0 .``) and a domain or MX set without a
  single address raise :class:`NoMailServerError` (permanent).
* SERVFAIL, REFUSED, a timeout or an unreachable server raise
  :class:`DNSTemporaryError` (the recipients are DEFERRED): a temporary error never
  falls back to the domain's A/AAAA records.
* Addresses that are not globally routable (loopback, private, link-local,
  unspecified, reserved, shared) or multicast are dropped unless
  ``MXConfig.allow_local``: a domain owner must not make us connect to our own
  network. When nothing else is left this is a :class:`DNSTemporaryError` (451
  4.4.4), not a failure: the domain's DNS, or our configuration, may be fixed
  before the retry lifetime runs out, and mail is never delivered meanwhile.
* Positive answers are cached per (name, type) for their smallest TTL (TTL 0: not
  cached). Negative answers are not cached here: aiodns reports them as errors
  without the SOA whose MINIMUM says how long they may be kept (RFC 2308 §5).
  c-ares keeps its own per-channel cache of answers with a TTL (at most an hour),
  which includes NODATA answers.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import aiodns
import anyio
import anyio.to_thread
import attrs
import pycares

from mailstrom_async._exceptions import (
    ConfigError,
    DNSTemporaryError,
    NoMailServerError,
)
from mailstrom_async._models import SMTPReply

if TYPE_CHECKING:
    from mailstrom_async._config import MXConfig, Timeouts

__all__ = ["MXTarget", "Resolver", "ResolverStatistics", "Route"]

logger = logging.getLogger("mailstrom_async.dns")

#: c-ares sends each query up to this many times within ``Timeouts.dns``.
_TRIES: Final = 3
_MAX_CACHE_ENTRIES: Final = 1_000
_CLOSED: Final = "Resolver is closed; route() after aclose() is not allowed"

#: One answer: ``(preference, exchange)`` pairs for MX, address strings for A/AAAA.
_Answer = tuple[Any, ...]


@attrs.frozen
class MXTarget:
    """One mail server of a route, with the addresses to try, in order."""

    host: str
    preference: int
    addresses: tuple[str, ...]


@attrs.frozen
class Route:
    """The mail servers of a domain, in the order to try them.

    ``implicit`` is true when the domain has no MX records and its own address is
    used (RFC 5321 §5.1).
    """

    domain: str
    targets: tuple[MXTarget, ...]
    implicit: bool


@attrs.frozen(kw_only=True)
class ResolverStatistics:
    """What a :class:`Resolver` did: ``lookups`` handed to c-ares (which may answer
    from its own cache), ``cache_hits`` answered from ours, ``cached`` answers held.
    """

    lookups: int
    cache_hits: int
    cached: int


class _NoSuchNameError(Exception):
    """NXDOMAIN, or a name that cannot exist."""


class _NoDataError(Exception):
    """The name exists but has no record of the asked type."""


def _check_nameserver(value: str) -> None:
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else rest or "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
        ok = port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        msg = (
            "mx.nameservers entries must be an IP address with an optional port "
            f"('192.0.2.53', '192.0.2.53:5353', '[2001:db8::53]:53'), not {value!r}"
        )
        raise ConfigError(msg, "mx.nameservers")


def _is_local(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _no_mail(msg: str, code: int, enhanced: str) -> NoMailServerError:
    return NoMailServerError(msg, reply=SMTPReply(code, msg, enhanced, local=True))


class Resolver:
    """Finds the mail servers of a domain through one aiodns resolver.

    The aiodns resolver is made on first use, inside the running event loop; call
    :meth:`aclose` when done. ``rng`` shuffles equal-preference MX hosts and
    ``clock`` (monotonic seconds) ages the cache; both are for tests.

    Raises:
        ConfigError: a nameserver is not an IP address with an optional port.
    """

    def __init__(
        self,
        config: MXConfig,
        timeouts: Timeouts,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for nameserver in config.nameservers:
            _check_nameserver(nameserver)
        self._config = config
        self._timeouts = timeouts
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock if clock is not None else time.monotonic
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._dns: aiodns.DNSResolver | None = None
        self._lock = anyio.Lock()
        self._closed = False
        self._lookups = 0
        self._cache_hits = 0

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel pending lookups and release the resolver; idempotent."""
        self._closed = True
        dns, self._dns = self._dns, None
        if dns is not None:
            await dns.close()

    def statistics(self) -> ResolverStatistics:
        """Return counts of lookups and cache use."""
        return ResolverStatistics(
            lookups=self._lookups, cache_hits=self._cache_hits, cached=len(self._cache)
        )

    async def route(self, domain: str) -> Route:
        """Return the mail servers of *domain* (an A-label domain), best first.

        Raises:
            NoMailServerError: the domain does not exist, has a null MX, or neither
                it nor its MX hosts have an address.
            DNSTemporaryError: DNS failed or timed out, or every address found is
                local and ``MXConfig.allow_local`` is false.
        """
        domain = domain.rstrip(".").lower()
        try:
            records = await self._lookup(domain, "MX")
        except _NoSuchNameError as exc:
            msg = f"domain {domain!r} {exc}"
            raise _no_mail(msg, 550, "5.1.2") from None
        except _NoDataError:
            # RFC 5321 §5.1: no MX records, so the domain itself is the mail server.
            hosts, implicit = [(domain, 0)], True
        else:
            hosts, implicit = self._order(domain, records), False
        targets = await self._targets(domain, hosts, implicit=implicit)
        logger.debug(
            "route",
            extra={"domain": domain, "implicit": implicit, "targets": targets},
        )
        return Route(domain, targets, implicit)

    def _order(self, domain: str, records: _Answer) -> list[tuple[str, int]]:
        # RFC 7505: "MX 0 ." (exchange "") says the domain accepts no mail. A null
        # MX mixed with real ones is a misconfiguration; the real ones are used.
        real = [(pref, host) for pref, host in records if host]
        if not real:
            msg = f"domain {domain!r} accepts no mail (null MX, RFC 7505)"
            raise _no_mail(msg, 556, "5.1.10")
        # RFC 5321 §5.1: lowest preference first, random order among equals.
        real.sort(key=lambda r: (r[0], self._rng.random()))
        best: dict[str, int] = {}
        for pref, host in real:
            best.setdefault(host, pref)
        return list(best.items())

    async def _targets(
        self, domain: str, hosts: list[tuple[str, int]], *, implicit: bool
    ) -> tuple[MXTarget, ...]:
        budget = self._config.max_addresses
        targets: list[MXTarget] = []
        seen: set[str] = set()
        refused: list[str] = []
        errors: list[DNSTemporaryError] = []
        pending = hosts
        # Resolve as many hosts at once as addresses are still wanted, in order.
        while pending and budget > 0:
            batch, pending = pending[:budget], pending[budget:]
            results = await self._addresses([host for host, _ in batch])
            for (host, pref), (addresses, error) in zip(batch, results, strict=True):
                if error is not None:
                    errors.append(error)
                usable: list[str] = []
                for address in addresses:
                    if address in seen:
                        continue
                    seen.add(address)
                    if not self._config.allow_local and _is_local(address):
                        refused.append(address)
                    else:
                        usable.append(address)
                if usable := usable[:budget]:
                    targets.append(MXTarget(host, pref, tuple(usable)))
                    budget -= len(usable)
        if refused:
            logger.warning(
                "local addresses of mail servers refused",
                extra={"domain": domain, "addresses": refused},
            )
        if targets:
            return tuple(targets)
        if errors:
            msg = f"could not resolve the mail servers of {domain!r}: {errors[0]}"
            raise DNSTemporaryError(msg) from errors[0]
        if refused:
            what = (
                f"domain {domain!r} resolves"
                if implicit
                else f"MX hosts of {domain!r} resolve"
            )
            msg = (
                f"the {what} only to local addresses ({', '.join(refused)}); "
                "set MXConfig.allow_local to allow"
            )
            raise DNSTemporaryError(msg, reply=SMTPReply(451, msg, "4.4.4", local=True))
        if implicit:
            msg = f"domain {domain!r} has no MX records and no IPv4/IPv6 address"
            raise _no_mail(msg, 550, "5.1.2")
        names = ", ".join(host for host, _ in hosts)
        msg = f"the MX hosts of {domain!r} ({names}) have no IPv4/IPv6 address"
        raise _no_mail(msg, 550, "5.4.4")

    async def _addresses(
        self, hosts: Sequence[str]
    ) -> list[tuple[list[str], DNSTemporaryError | None]]:
        """Look up A and AAAA of every host at once: (IPv4 + IPv6, first error)."""
        found: dict[tuple[str, str], _Answer] = {}
        errors: dict[str, DNSTemporaryError] = {}

        async def lookup(host: str, qtype: str) -> None:
            try:
                found[host, qtype] = await self._lookup(host, qtype)
            except (_NoSuchNameError, _NoDataError):
                pass
            except DNSTemporaryError as exc:
                errors.setdefault(host, exc)

        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(lookup, host, "A")
                tg.start_soon(lookup, host, "AAAA")
        ipv4_first = ("A", "AAAA")
        return [
            ([a for t in ipv4_first for a in found.get((h, t), ())], errors.get(h))
            for h in hosts
        ]

    async def _lookup(self, name: str, qtype: str) -> _Answer:
        """Return the (cached) answer to *name* / *qtype*.

        Raises _NoSuchNameError, _NoDataError or DNSTemporaryError.
        """
        key = (name, qtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock():
            self._cache_hits += 1
            return hit[1]
        dns = await self._resolver()
        self._lookups += 1
        extra = {"dns_name": name, "dns_type": qtype}
        try:
            # c-ares shortens its per-try timeout after fast answers, and retries:
            # only this deadline bounds the whole lookup.
            with anyio.fail_after(self._timeouts.dns):
                result = await dns.query_dns(name, qtype)
        except TimeoutError:
            msg = f"DNS lookup of {name} {qtype} timed out after {self._timeouts.dns}s"
            logger.info("DNS lookup timed out", extra=extra)
            raise DNSTemporaryError(msg) from None
        except aiodns.error.DNSError as exc:
            code, text = (*exc.args, None, None)[:2]
            if code == aiodns.error.ARES_ENOTFOUND:
                msg = "does not exist (NXDOMAIN)"
                raise _NoSuchNameError(msg) from None
            if code == aiodns.error.ARES_EBADNAME:
                msg = "is not a valid domain name"
                raise _NoSuchNameError(msg) from None
            if code == aiodns.error.ARES_ENODATA:
                raise _NoDataError from None
            msg = f"DNS lookup of {name} {qtype} failed: {text or code}"
            logger.info("DNS lookup failed", extra={**extra, "error": text})
            raise DNSTemporaryError(msg) from exc
        data = [r.data for r in result.answer]
        answer: _Answer
        if qtype == "MX":
            answer = tuple(
                (d.priority, d.exchange.rstrip(".").lower())
                for d in data
                if isinstance(d, pycares.MXRecordData)
            )
        else:
            cls = pycares.ARecordData if qtype == "A" else pycares.AAAARecordData
            answer = tuple(d.addr for d in data if isinstance(d, cls))
        if not answer:  # only a CNAME: the name it points to has no such record
            raise _NoDataError
        ttl = min(r.ttl for r in result.answer)
        logger.debug("DNS answer", extra={**extra, "answer": answer, "ttl": ttl})
        if ttl > 0:
            self._store(key, ttl, answer)
        return answer

    def _store(self, key: tuple[str, str], ttl: int, answer: _Answer) -> None:
        now = self._clock()
        if len(self._cache) >= _MAX_CACHE_ENTRIES:
            for k in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
                del self._cache[k]
            while len(self._cache) >= _MAX_CACHE_ENTRIES:  # oldest first
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + ttl, answer)

    async def _resolver(self) -> aiodns.DNSResolver:
        if self._dns is None:
            async with self._lock:
                if self._closed:
                    raise RuntimeError(_CLOSED)
                if self._dns is None:
                    self._dns = await self._open()
        return self._dns

    async def _open(self) -> aiodns.DNSResolver:
        # c-ares reads /etc/resolv.conf as it starts: not on the event loop.
        dns = await anyio.to_thread.run_sync(
            functools.partial(
                aiodns.DNSResolver,
                nameservers=list(self._config.nameservers) or None,
                loop=asyncio.get_running_loop(),
                timeout=self._timeouts.dns / _TRIES,
                tries=_TRIES,
            )
        )
        if self._closed:  # aclose() ran meanwhile
            await dns.close()
            raise RuntimeError(_CLOSED)
        return dns
