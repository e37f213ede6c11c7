"""Where to deliver a domain's mail: MX lookup over aiodns (RFC 5321 §5.1, RFC 7505).

The only module that imports aiodns; it turns c-ares' answers into a :class:`Route`
and the addresses to try, and its errors into ours:

* MX records are sorted by preference, shuffled among equal preferences; a domain
  without MX records (NODATA) is its own implicit MX; if MX records exist the
  domain's own addresses are never used. An address literal (``[192.0.2.1]``,
  ``[IPv6:2001:db8::1]``) is its own single host, without any lookup (RFC 5321
  §4.1.3, §5.1).
* :meth:`Resolver.walk` looks up the hosts' addresses lazily, in that order: a
  host's A and AAAA only when the caller asks for more addresses than the hosts
  before it gave. One walk looks up at most ``MXConfig.max_hosts`` hosts, yields
  at most ``MXConfig.max_addresses`` addresses, and spends at most
  ``Timeouts.dns_attempt`` seconds in DNS (each lookup also at most
  ``Timeouts.dns``): a domain with a thousand dead MX hosts costs a few queries.
* NXDOMAIN for the domain, a null MX (``MX 0 .``) and a domain or MX set without a
  single address raise :class:`NoMailServerError` (permanent).
* SERVFAIL, REFUSED, a timeout or an unreachable server raise
  :class:`DNSTemporaryError` (the recipients are DEFERRED): a temporary error never
  falls back to the domain's A/AAAA records. So do MX hosts left unlooked-up by
  ``max_hosts`` that a later attempt may reach (equal preferences are shuffled).
* Addresses that are not globally routable (loopback, private, link-local,
  unspecified, reserved, shared) or multicast are dropped unless
  ``MXConfig.allow_local``, address literals included: a domain owner (or a
  sender) must not make us connect to our own network. When nothing else is left
  this is a :class:`DNSTemporaryError` (451 4.4.4), not a failure: the domain's
  DNS, or our configuration, may be fixed before the retry lifetime runs out, and
  mail is never delivered meanwhile.
* Positive answers are cached per (name, type) for their smallest TTL (TTL 0: not
  cached). Negative answers are not cached here: aiodns reports them as errors
  without the SOA whose MINIMUM says how long they may be kept (RFC 2308 §5).
  c-ares keeps its own per-channel cache of answers with a TTL (at most an hour),
  which includes NODATA answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Iterator
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

__all__ = [
    "MXHost",
    "Resolver",
    "ResolverStatistics",
    "Route",
    "literal_destination",
]

logger = logging.getLogger("mailstrom_async.dns")

#: c-ares sends each query up to this many times within ``Timeouts.dns``.
_TRIES: Final = 3
_MAX_CACHE_ENTRIES: Final = 1_000
_CLOSED: Final = "Resolver is closed; route() after aclose() is not allowed"

#: One answer: ``(preference, exchange)`` pairs for MX, address strings for A/AAAA.
_Answer = tuple[Any, ...]


@attrs.frozen
class MXHost:
    """One mail server of a route: a host name to look up, or an address literal."""

    name: str
    """The host name (A-labels, lower case), or the literal as ``[127.0.0.1]``."""
    preference: int
    literal: str | None = None
    """The IP address of an address literal, used without a lookup."""


@attrs.frozen
class Route:
    """The mail servers of a domain, in the order to try them.

    ``implicit`` is true when the domain has no MX records and its own address is
    used (RFC 5321 §5.1).
    """

    domain: str
    hosts: tuple[MXHost, ...]
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


def _literal_ip(domain: str) -> str | None:
    """The IP address of the address literal *domain* (``[...]``), or None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    tag, colon, rest = inner.partition(":")
    try:
        if colon and tag.lower() == "ipv6" and "%" not in rest:
            return ipaddress.IPv6Address(rest).compressed
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def literal_destination(domain: str) -> str | None:
    """The canonical form of the address literal *domain*, or None if it is not one.

    ``[127.0.0.1]`` and ``[ipv6:::1]`` (tag lower-cased, address compressed), so
    that every spelling of one address is one destination.
    """
    ip = _literal_ip(domain)
    if ip is None:
        return None
    return f"[ipv6:{ip}]" if ":" in ip else f"[{ip}]"


class _DNSTime:
    """What one walk may still spend waiting for DNS (``Timeouts.dns_attempt``).

    Only time spent in lookups counts: SMTP sessions between them do not.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.left = seconds

    def timeout(self, per_lookup: float) -> float:
        """How long the next lookup may wait."""
        return min(per_lookup, self.left)

    @contextlib.contextmanager
    def spending(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.left -= time.monotonic() - start


@attrs.define
class _Walked:
    """What a walk found before it stopped (for the error when nothing came of it)."""

    looked_up: list[str] = attrs.Factory(list)
    refused: list[str] = attrs.Factory(list)
    errors: list[DNSTemporaryError] = attrs.Factory(list)
    yielded: int = 0
    stop: str | None = None
    """``"max_hosts"`` or ``"dns_attempt"`` when hosts were left unlooked-up."""


class _Lookups:
    """One aiodns channel and our cache of its answers: every query goes here."""

    def __init__(
        self, config: MXConfig, timeouts: Timeouts, clock: Callable[[], float]
    ) -> None:
        self._config = config
        self._timeouts = timeouts
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._dns: aiodns.DNSResolver | None = None
        self._lock = anyio.Lock()
        self._closed = False
        self._lookups = 0
        self._cache_hits = 0

    async def aclose(self) -> None:
        self._closed = True
        dns, self._dns = self._dns, None
        if dns is not None:
            await dns.close()

    def statistics(self) -> ResolverStatistics:
        return ResolverStatistics(
            lookups=self._lookups, cache_hits=self._cache_hits, cached=len(self._cache)
        )

    async def host_addresses(
        self, host: str, dns_time: _DNSTime
    ) -> tuple[list[str], DNSTemporaryError | None]:
        """Look up A and AAAA of *host* at once: (IPv4 + IPv6, first error)."""
        found: dict[str, _Answer] = {}
        errors: list[DNSTemporaryError] = []

        async def lookup(qtype: str) -> None:
            try:
                found[qtype] = await self.lookup(host, qtype, dns_time)
            except (_NoSuchNameError, _NoDataError):
                pass
            except DNSTemporaryError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lookup, "A")
            tg.start_soon(lookup, "AAAA")
        addresses = [*found.get("A", ()), *found.get("AAAA", ())]
        return addresses, errors[0] if errors else None

    async def lookup(self, name: str, qtype: str, dns_time: _DNSTime) -> _Answer:
        """Return the (cached) answer to *name* / *qtype*, waiting at most
        ``Timeouts.dns`` and what is left of *dns_time*.

        Raises _NoSuchNameError, _NoDataError or DNSTemporaryError.
        """
        key = (name, qtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock():
            self._cache_hits += 1
            return hit[1]
        dns = await self._resolver()
        self._lookups += 1
        timeout = dns_time.timeout(self._timeouts.dns)
        extra = {"dns_name": name, "dns_type": qtype}
        try:
            # c-ares shortens its per-try timeout after fast answers, and retries:
            # only this deadline bounds the whole lookup.
            with anyio.fail_after(timeout):
                result = await dns.query_dns(name, qtype)
        except TimeoutError:
            msg = f"DNS lookup of {name} {qtype} timed out after {timeout:.3g}s"
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
        self._dns = _Lookups(
            config, timeouts, clock if clock is not None else time.monotonic
        )

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel pending lookups and release the resolver; idempotent."""
        await self._dns.aclose()

    def statistics(self) -> ResolverStatistics:
        """Return counts of lookups and cache use."""
        return self._dns.statistics()

    async def route(self, domain: str, *, dns_time: _DNSTime | None = None) -> Route:
        """Return the mail servers of *domain* (an A-label domain), best first.

        Only the MX lookup: the hosts' addresses are looked up by :meth:`walk`.

        Raises:
            NoMailServerError: the domain does not exist, has a null MX, or is not
                a valid address literal.
            DNSTemporaryError: DNS failed or timed out.
        """
        domain = domain.rstrip(".").lower()
        if domain.startswith("["):
            return self._literal_route(domain)
        dns_time = dns_time or _DNSTime(self._timeouts.dns_attempt)
        hosts: tuple[MXHost, ...]
        try:
            with dns_time.spending():
                records = await self._dns.lookup(domain, "MX", dns_time)
        except _NoSuchNameError as exc:
            msg = f"domain {domain!r} {exc}"
            raise _no_mail(msg, 550, "5.1.2") from None
        except _NoDataError:
            # RFC 5321 §5.1: no MX records, so the domain itself is the mail server.
            hosts, implicit = (MXHost(domain, 0),), True
        else:
            hosts, implicit = self._order(domain, records), False
        logger.debug(
            "route",
            extra={"domain": domain, "implicit": implicit, "hosts": hosts},
        )
        return Route(domain, hosts, implicit)

    @staticmethod
    def _literal_route(domain: str) -> Route:
        # RFC 5321 §5.1: an address literal is the host itself, no lookup.
        ip = _literal_ip(domain)
        if ip is None:
            msg = f"{domain!r} is not a valid address literal"
            raise _no_mail(msg, 550, "5.1.3")
        return Route(domain, (MXHost(domain, 0, literal=ip),), implicit=False)

    def _order(self, domain: str, records: _Answer) -> tuple[MXHost, ...]:
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
        return tuple(MXHost(host, pref) for host, pref in best.items())

    async def walk(self, domain: str) -> AsyncGenerator[tuple[MXHost, str]]:
        """Yield ``(host, address)`` to try for *domain*, best first, looking up
        each MX host's addresses only when the caller asks beyond the hosts
        before it (IPv4 before IPv6, each address once).

        At most ``MXConfig.max_hosts`` hosts are looked up and
        ``MXConfig.max_addresses`` addresses yielded; all lookups together wait
        at most ``Timeouts.dns_attempt``. Close the iterator when done with it
        (``contextlib.aclosing``).

        Raises (before yielding anything, never after):
            NoMailServerError: the domain does not exist, has a null MX, or
                neither it nor the MX hosts looked up have an address.
            DNSTemporaryError: DNS failed or timed out; every address found is
                local and ``MXConfig.allow_local`` is false; or the hosts looked
                up had none and others, as good, were left for a later attempt.
        """
        dns_time = _DNSTime(self._timeouts.dns_attempt)
        route = await self.route(domain, dns_time=dns_time)
        walked = _Walked()
        seen: set[str] = set()
        addresses_left = self._config.max_addresses
        for index, host in enumerate(route.hosts):
            if host.literal is not None:
                addresses = [host.literal]
            else:
                if len(walked.looked_up) >= self._config.max_hosts:
                    walked.stop = "max_hosts"
                elif dns_time.left <= 0:
                    walked.stop = "dns_attempt"
                if walked.stop is not None:
                    self._log_stop(route, walked, index)
                    break
                walked.looked_up.append(host.name)
                with dns_time.spending():
                    addresses, error = await self._dns.host_addresses(
                        host.name, dns_time
                    )
                if error is not None:
                    walked.errors.append(error)
            usable = self._usable(route, host, addresses, seen, walked)
            for address in usable[:addresses_left]:
                walked.yielded += 1
                addresses_left -= 1
                yield host, address
            if addresses_left == 0:
                return
        if not walked.yielded:
            raise self._nothing_to_try(route, walked, dns_time)

    def _usable(
        self,
        route: Route,
        host: MXHost,
        addresses: list[str],
        seen: set[str],
        walked: _Walked,
    ) -> list[str]:
        """*addresses* not seen before, without local ones unless allowed."""
        usable: list[str] = []
        refused: list[str] = []
        for address in addresses:
            if address in seen:
                continue
            seen.add(address)
            if not self._config.allow_local and _is_local(address):
                refused.append(address)
            else:
                usable.append(address)
        if refused:
            walked.refused.extend(refused)
            logger.warning(
                "local addresses of mail servers refused",
                extra={"domain": route.domain, "host": host.name, "addresses": refused},
            )
        return usable

    @staticmethod
    def _log_stop(route: Route, walked: _Walked, index: int) -> None:
        logger.info(
            "MX hosts left for a later attempt",
            extra={
                "domain": route.domain,
                "looked_up": len(walked.looked_up),
                "left": len(route.hosts) - index,
                "limit": walked.stop,
            },
        )

    def _nothing_to_try(
        self, route: Route, walked: _Walked, dns_time: _DNSTime
    ) -> DNSTemporaryError | NoMailServerError:
        """The error for a walk that found no address to try."""
        domain, total = route.domain, len(route.hosts)
        names = ", ".join(walked.looked_up)
        if walked.stop == "dns_attempt":
            stopped = (
                f"; DNS time for this attempt (Timeouts.dns_attempt, "
                f"{dns_time.seconds:g}s) ran out after {len(walked.looked_up)} "
                f"of {total} MX hosts"
            )
        elif walked.stop == "max_hosts":
            stopped = (
                f"; {len(walked.looked_up)} of {total} MX hosts looked up "
                "(MXConfig.max_hosts)"
            )
        else:
            stopped = ""
        if walked.errors or walked.stop == "dns_attempt":
            first = walked.errors[0] if walked.errors else None
            cause = f": {first}" if first is not None else ""
            msg = f"could not resolve the mail servers of {domain!r}{cause}{stopped}"
            error = DNSTemporaryError(msg)
            error.__cause__ = first
            return error
        if walked.refused:
            if route.hosts[0].literal is not None:
                what = f"address literal {domain} is a local address"
            else:
                where = "domain" if route.implicit else "MX hosts of"
                verb = "resolves" if route.implicit else "resolve"
                what = (
                    f"{where} {domain!r} {verb} only to local addresses "
                    f"({', '.join(walked.refused)})"
                )
            msg = f"the {what}{stopped}; set MXConfig.allow_local to allow"
            return DNSTemporaryError(
                msg, reply=SMTPReply(451, msg, "4.4.4", local=True)
            )
        if route.implicit:
            msg = f"domain {domain!r} has no MX records and no IPv4/IPv6 address"
            return _no_mail(msg, 550, "5.1.2")
        msg = f"the MX hosts of {domain!r} ({names}) have no IPv4/IPv6 address"
        if walked.stop == "max_hosts" and self._tie_at_cut(route, walked):
            # Equal preferences are shuffled: a later attempt may look up others.
            msg += f"{stopped}; a later attempt may choose others as preferred"
            return DNSTemporaryError(
                msg, reply=SMTPReply(451, msg, "4.4.4", local=True)
            )
        if walked.stop == "max_hosts":
            msg += f"{stopped}; the less preferred ones are never tried"
        return _no_mail(msg, 550, "5.4.4")

    @staticmethod
    def _tie_at_cut(route: Route, walked: _Walked) -> bool:
        """Whether a host left out has the preference of one looked up."""
        n = len(walked.looked_up)
        return route.hosts[n - 1].preference == route.hosts[n].preference
