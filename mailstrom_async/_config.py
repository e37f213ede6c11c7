"""Configuration: immutable attrs records, validated on construction.

Durations are float seconds. Defaults follow RFC 5321 §4.5.3.2 (timeouts) and
Postfix (retries, within RFC 5321 §4.5.4.1). ``Config.from_mapping`` and
``Config.from_toml`` read the same structure from plain data, and every wrong key,
type or value raises :class:`ConfigError` naming the key.

Secrets (:data:`SECRET_KEYS`: the relay password) are never echoed: an error about
one names the key and the type of the value, never the value, and reprs leave
them out. Domain names that go on the wire (``helo_name``, ``message_id_domain``,
an internationalised ``relay.host``) are checked as host names and kept in their
IDNA 2008 A-label form (:mod:`._domain`).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

import attrs

from mailstrom_async._domain import DomainError, a_label
from mailstrom_async._exceptions import ConfigError

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUTS",
    "ENV_IGNORED",
    "ENV_PREFIX",
    "SECRET_KEYS",
    "TRANSPORTS",
    "Config",
    "Limits",
    "MXConfig",
    "MXTLSPolicy",
    "RelayConfig",
    "RelayTLS",
    "RetryPolicy",
    "Timeouts",
    "TransportName",
    "read_toml",
]

#: The settings whose values are secrets: an error names their key and the type
#: of the value, never the value itself.
SECRET_KEYS = frozenset({"relay.password"})


def _shown(key: str, value: object) -> str:
    """How an error message shows *value*, the value of *key*: its repr, or for a
    secret only its type."""
    return type(value).__name__ if key in SECRET_KEYS else repr(value)


class RelayTLS(enum.StrEnum):
    """How to secure the connection to a relay."""

    IMPLICIT = "implicit"
    """TLS from the first byte (SMTPS, usually port 465)."""
    STARTTLS = "starttls"
    """Plain connect, then STARTTLS, which is required (usually port 587)."""
    NONE = "none"
    """No TLS at all: only for a relay on loopback or a trusted local network."""


class MXTLSPolicy(enum.StrEnum):
    """How to use STARTTLS when delivering straight to MX hosts."""

    OPPORTUNISTIC = "opportunistic"
    """Encrypt whenever offered, even with an unverifiable certificate; else plain."""
    REQUIRED = "required"
    """Never send in plain text: defer when TLS cannot be had."""


_DEFAULT_RELAY_PORTS = {
    RelayTLS.IMPLICIT: 465,
    RelayTLS.STARTTLS: 587,
    RelayTLS.NONE: 25,
}


def _check(condition: bool, key: str, expected: str, value: object) -> None:
    if not condition:
        msg = f"{key} must be {expected}, not {_shown(key, value)}"
        raise ConfigError(msg, key)


_E = typing.TypeVar("_E", bound=enum.Enum)


def _to_enum(cls: type[_E], key: str, value: object) -> _E:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        msg = f"{key} must be one of {allowed}, not {_shown(key, value)}"
        raise ConfigError(msg, key) from None


# The dotted prefix of each section, so a ConfigError names "timeouts.connect"
# whether the section was built directly or read by Config.from_mapping.
_SECTIONS = {
    "Timeouts": "timeouts.",
    "RetryPolicy": "retry.",
    "RelayConfig": "relay.",
    "MXConfig": "mx.",
    "Limits": "limits.",
}


def _key(inst: object, attribute: attrs.Attribute[Any]) -> str:
    return _SECTIONS.get(type(inst).__name__, "") + attribute.name


def _optional_string(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check(
        value is None or isinstance(value, str),
        _key(inst, attribute),
        "a string",
        value,
    )


def _relay_host(value: str) -> str:
    """An internationalised relay host name in A-label form (what DNS and the TLS
    server name need); other values as given, checked after conversion."""
    if not str(value).isascii():
        return _domain_setting("relay.host", str(value), "a host name or address")
    return value


def _domain_setting(key: str, value: str, expected: str) -> str:
    """*value* as an A-label host name, or ConfigError naming *key* and the reason."""
    try:
        return a_label(value)
    except DomainError as exc:
        msg = f"{key} must be {expected}, not {value!r}: {exc}"
        raise ConfigError(msg, key) from None


def _relay_tls(value: RelayTLS | str) -> RelayTLS:
    return _to_enum(RelayTLS, "relay.tls", value)


def _mx_tls(value: MXTLSPolicy | str) -> MXTLSPolicy:
    return _to_enum(MXTLSPolicy, "mx.tls", value)


def _positive(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check(
        value is not None and math.isfinite(value) and value > 0,
        _key(inst, attribute),
        "a positive number of seconds",
        value,
    )


def _non_negative(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check(
        value is not None and math.isfinite(value) and value >= 0,
        _key(inst, attribute),
        "a number >= 0",
        value,
    )


# Far beyond any sane policy, and small enough that datetime arithmetic never
# overflows (datetime stops at year 9999).
_MAX_RETRY_SECONDS = 100 * 365 * 86400.0


def _retry_duration(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check(
        value is not None and 0 <= value <= _MAX_RETRY_SECONDS,
        _key(inst, attribute),
        "a number of seconds from 0 to 100 years",
        value,
    )


def _port(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check(
        isinstance(value, int) and 0 < value < 65536,
        _key(inst, attribute),
        "a port number from 1 to 65535",
        value,
    )


def _positive_int(inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _check(
        isinstance(value, int) and value >= 1,
        _key(inst, attribute),
        "an integer >= 1",
        value,
    )


def _non_negative_int(
    inst: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        _key(inst, attribute),
        "an integer >= 0",
        value,
    )


@attrs.frozen(kw_only=True)
class Timeouts:
    """Per-operation deadlines in seconds (RFC 5321 §4.5.3.2 defaults)."""

    connect: float = attrs.field(default=30.0, validator=_positive)
    """TCP connect, TLS handshake and greeting."""
    command: float = attrs.field(default=300.0, validator=_positive)
    """Each command's reply (EHLO, MAIL, RCPT, ...)."""
    data_start: float = attrs.field(default=120.0, validator=_positive)
    """The reply to DATA (the 354)."""
    data_end: float = attrs.field(default=600.0, validator=_positive)
    """The reply after the final dot."""
    dns: float = attrs.field(default=10.0, validator=_positive)
    """One DNS lookup (a host's A and AAAA lookups run side by side)."""
    dns_attempt: float = attrs.field(default=30.0, validator=_positive)
    """All the DNS lookups of one walk over a domain's MX hosts: the MX lookup
    and the address lookups of the hosts it reaches (direct MX delivery)."""


DEFAULT_TIMEOUTS = Timeouts()


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """When to retry a deferred recipient, and when to give up.

    The n-th retry waits ``min(max_delay, initial_delay * factor ** (n - 1))``,
    spread by ± ``jitter`` (a fraction). A recipient is given up (FAILED 5.4.7) once
    ``lifetime`` seconds have passed since it was queued or after ``max_attempts``
    attempts, whichever comes first. Defaults are Postfix's: 5 min doubling up to
    1 h, for 5 days.
    """

    initial_delay: float = attrs.field(default=300.0, validator=_retry_duration)
    factor: float = attrs.field(default=2.0)
    jitter: float = attrs.field(default=0.2)
    max_delay: float = attrs.field(default=3600.0, validator=_retry_duration)
    lifetime: float = attrs.field(default=5 * 86400.0, validator=_retry_duration)
    max_attempts: int | None = attrs.field(default=None)

    @factor.validator
    def _check_factor(self, attribute: attrs.Attribute[float], value: float) -> None:
        _check(
            math.isfinite(value) and value >= 1, "retry.factor", "a number >= 1", value
        )

    @jitter.validator
    def _check_jitter(self, attribute: attrs.Attribute[float], value: float) -> None:
        _check(0 <= value <= 1, "retry.jitter", "a fraction from 0 to 1", value)

    @max_attempts.validator
    def _check_attempts(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_int(self, attribute, value)

    @classmethod
    def mailstrom_compatible(cls) -> Self:
        """The Rust Mailstrom's behaviour: three passes, a few minutes apart."""
        return cls(initial_delay=60.0, factor=2.0, jitter=0.0, max_attempts=3)


DEFAULT_RETRY_POLICY = RetryPolicy()


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Send everything through one SMTP relay (smarthost).

    ``port`` defaults by ``tls``: 465 for implicit, 587 for STARTTLS, 25 for none.
    Credentials are sent only over TLS unless the relay is on loopback. The password
    never appears in reprs or logs.
    """

    host: str = attrs.field(converter=_relay_host)
    """A host name (an internationalised one is kept in A-label form), or an IP
    address."""
    tls: RelayTLS = attrs.field(
        default=RelayTLS.STARTTLS,
        converter=_relay_tls,
    )
    port: int = attrs.field(validator=_port)
    username: str | None = attrs.field(default=None, validator=_optional_string)
    password: str | None = attrs.field(
        default=None, repr=False, validator=_optional_string
    )
    """Never shown: not in reprs, logs or error messages (those name its type)."""
    verify: bool = True
    """Verify the relay's certificate (against the system CAs or ``ca_file``)."""
    ca_file: str | None = None
    """A PEM file of CA certificates to trust instead of the system's."""

    @port.default
    def _default_port(self) -> int:
        return _DEFAULT_RELAY_PORTS[self.tls]

    def __attrs_post_init__(self) -> None:
        _check(
            bool(str(self.host).strip()),
            "relay.host",
            "a host name or address",
            self.host,
        )
        if (self.username is None) != (self.password is None):
            msg = "relay.username and relay.password must be set together"
            raise ConfigError(msg, "relay.password")
        if (
            self.username is not None
            and self.tls is RelayTLS.NONE
            and not _is_loopback(self.host)
        ):
            msg = (
                f"relay.tls is 'none' but credentials are set for {self.host!r}, which "
                "is not a loopback address: they would travel in clear text; use "
                "tls='starttls' or 'implicit'"
            )
            raise ConfigError(msg, "relay.tls")


def _is_loopback(host: str) -> bool:
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _nameservers(value: Iterable[str]) -> tuple[str, ...]:
    # A bare string is iterable too: refuse it rather than split it into characters.
    if isinstance(value, str):
        msg = f"mx.nameservers must be a list of strings, not {value!r}"
        raise ConfigError(msg, "mx.nameservers")
    return tuple(value)


@attrs.frozen(kw_only=True)
class MXConfig:
    """Deliver straight to each recipient domain's MX hosts."""

    nameservers: tuple[str, ...] = attrs.field(default=(), converter=_nameservers)
    """``"host"`` or ``"host:port"`` of the DNS servers to ask; empty: the system's."""
    port: int = attrs.field(default=25, validator=_port)
    """SMTP port on MX hosts (25 in real life; tests use others)."""
    allow_local: bool = False
    """Allow MX hosts that resolve to loopback, private or link-local addresses."""
    tls: MXTLSPolicy = attrs.field(
        default=MXTLSPolicy.OPPORTUNISTIC,
        converter=_mx_tls,
    )
    max_addresses: int = attrs.field(default=5, validator=_positive_int)
    """How many addresses to try per attempt (RFC 5321 §5.1)."""
    max_hosts: int = attrs.field(default=5, validator=_positive_int)
    """How many MX hosts to look up per attempt, in preference order, each only
    when the attempt reaches it."""


@attrs.frozen(kw_only=True)
class Limits:
    """How much work runs at once, and how long idle things are kept."""

    connections_per_destination: int = attrs.field(default=10, validator=_positive_int)
    """Open SMTP connections per destination (the relay, or one MX domain)."""
    max_connections: int = attrs.field(default=100, validator=_positive_int)
    """Open SMTP connections in all."""
    idle_timeout: float = attrs.field(default=30.0, validator=_positive)
    """Close a connection that has been idle this long."""
    max_recipients_per_transaction: int = attrs.field(
        default=100, validator=_positive_int
    )
    """RCPT commands per SMTP transaction (RFC 5321 §4.5.3.1.8 says at least 100)."""
    max_jobs_in_memory: int = attrs.field(default=256, validator=_positive_int)
    """Claimed messages held in memory, waiting for a connection; the rest wait in
    the store, so memory does not grow with the depth of the queue."""
    max_message_size: int = attrs.field(
        default=50 * 1024 * 1024, validator=_positive_int
    )
    """Largest rendered message ``submit`` accepts, in bytes."""
    connection_reuse_time: float = attrs.field(default=300.0, validator=_positive)
    """Open a new connection for a transaction once the connection has been open
    this long, in seconds (Postfix's ``smtp_connection_reuse_time_limit``): a
    server that reloaded its configuration is seen by new connections only."""
    connection_reuse_count: int = attrs.field(default=100, validator=_positive_int)
    """Mail transactions per connection before a new one is opened (Postfix's
    ``smtp_connection_reuse_count_limit``; 1: never reuse)."""
    history_per_recipient: int = attrs.field(default=20, validator=_non_negative_int)
    """Attempts each recipient's history keeps (``Deliverer.history``): the
    first and the latest ones, this many in all (1: only the latest; 0: no
    history is written)."""


#: Where a Deliverer sends mail, by name (``Config.transport``, ``MAILSTROM_TRANSPORT``).
TransportName = Literal["smtp", "console", "outbox", "null"]
#: The values of :data:`TransportName`, in the order error messages list them.
TRANSPORTS: tuple[TransportName, ...] = typing.get_args(TransportName)


def _transport(inst: object, attribute: object, value: object) -> None:
    if value is not None and value not in TRANSPORTS:
        allowed = ", ".join(map(repr, TRANSPORTS))
        msg = f"transport must be one of {allowed} (or None), not {value!r}"
        raise ConfigError(msg, "transport")


_HELO_EXPECTED = "a host name (letters, digits, '.', '-') or an address literal"
_MESSAGE_ID_EXPECTED = "a domain name (letters, digits, '.', '-')"


def _helo_name(value: Any) -> str | None:
    """The EHLO name: a host name in A-label form, or an address literal
    (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``; RFC 5321 §4.1.3)."""
    if value is None:
        return None
    _check(isinstance(value, str) and bool(value), "helo_name", _HELO_EXPECTED, value)
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            msg = f"helo_name must be {_HELO_EXPECTED}, not {value!r}: the literal is not [IPv4] or [IPv6:address]"
            raise ConfigError(msg, "helo_name") from None
        return str(value)
    return _domain_setting("helo_name", value, _HELO_EXPECTED)


def _message_id_domain(value: Any) -> str | None:
    """The right side of generated Message-IDs: a domain name in A-label form, so
    that nothing but a domain can follow the ``@`` (no ``>``, no spaces)."""
    if value is None:
        return None
    _check(
        isinstance(value, str) and bool(value),
        "message_id_domain",
        _MESSAGE_ID_EXPECTED,
        value,
    )
    return _domain_setting("message_id_domain", value, _MESSAGE_ID_EXPECTED)


@attrs.frozen(kw_only=True)
class Config:
    """Everything a Deliverer needs to know.

    With ``relay`` set, all mail goes through it; with ``relay=None`` mail goes
    straight to each recipient domain's MX hosts, as ``mx`` says.
    """

    helo_name: str | None = attrs.field(default=None, converter=_helo_name)
    """The name to give in EHLO/HELO: a host name (an internationalised one is
    kept in A-label form) or an address literal; ``None``: this host's FQDN,
    looked up once."""
    message_id_domain: str | None = attrs.field(
        default=None, converter=_message_id_domain
    )
    """Domain of generated Message-IDs (a host name, kept in A-label form);
    ``None``: the sender's domain."""
    transport: TransportName | None = attrs.field(default=None, validator=_transport)
    """Where mail goes: ``"smtp"`` (through ``relay``, or to the MX hosts),
    ``"console"`` (written to standard output, not sent), ``"outbox"``
    (captured in memory for tests: ``mailstrom_async.testing.sent_messages()``)
    or ``"null"`` (discarded). ``None``: the ``MAILSTROM_TRANSPORT`` environment
    variable when the Deliverer starts, else ``"smtp"``. A value here wins over
    the variable; a ``transport=`` object given to the Deliverer wins over both."""
    relay: RelayConfig | None = None
    mx: MXConfig = attrs.field(factory=MXConfig)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    limits: Limits = attrs.field(factory=Limits)
    shutdown_grace: float = attrs.field(default=10.0, validator=_non_negative)
    """On close, how long in-flight transactions may run before they are cancelled."""
    lease_duration: float = attrs.field(default=60.0, validator=_positive)
    """How long a worker's claim on a recipient lasts unless renewed. A Deliverer
    renews the claims of the jobs it is working on every third of this; those of
    a process that died on this host are taken back as soon as a Deliverer
    starts, and those of a worker on another host run out this long after it
    stopped."""
    poll_interval: float = attrs.field(default=1.0, validator=_positive)
    """How often the store is polled for due work written by other processes,
    and, in one query for all of them, for what other processes did to the
    messages whose handles are awaited."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Build a Config from plain data, such as parsed TOML or JSON.

        Nested sections are mappings (``{"relay": {"host": ..., "port": ...}}``).

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or a bad value;
                ``.key`` is the dotted path of the offending setting.
        """
        config: Self = _structure(cls, data, "")
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        """Read a Config from a TOML file (a ``[mailstrom]`` table, or the top level).

        Raises:
            ConfigError: the file is unreadable, is not TOML, or holds a bad setting.
        """
        return cls.from_mapping(read_toml(path))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, base: Mapping[str, Any] | None = None
    ) -> Self:
        """Build a Config from ``MAILSTROM_*`` environment variables over *base*.

        A double underscore separates a section from its setting:
        ``MAILSTROM_HELO_NAME``, ``MAILSTROM_RELAY__HOST``,
        ``MAILSTROM_LIMITS__MAX_CONNECTIONS``. Values are read by the setting's
        type: integers, numbers, booleans (``true``/``false``, ``1``/``0``,
        ``yes``/``no``, ``on``/``off``), comma-separated lists, and an empty
        value is ``None`` where a setting may be ``None``. They are merged over
        *base* (such as the mapping of a TOML file), then
        checked exactly as :meth:`from_mapping` does. ``MAILSTROM_STORE`` and
        ``MAILSTROM_CONFIG`` belong to the ``mailstrom-async`` command and are
        ignored here, as is every variable without the ``MAILSTROM_`` prefix.

        Raises:
            ConfigError: an unknown ``MAILSTROM_*`` variable, or a bad value;
                ``.key`` is the dotted path of the setting, and the message names
                the variable.
        """
        data: dict[str, Any] = {
            k: dict(v) if isinstance(v, Mapping) else v for k, v in (base or {}).items()
        }
        sources: dict[str, str] = {}
        for name in sorted(environ):
            if not name.startswith(ENV_PREFIX) or name in ENV_IGNORED:
                continue
            path = name[len(ENV_PREFIX) :].lower().split("__")
            key = ".".join(path)
            hint = _env_hint(cls, path, name)
            value = _from_env_string(hint, environ[name], key, name)
            target = data
            for section in path[:-1]:
                inner = target.setdefault(section, {})
                if not isinstance(inner, dict):
                    # Only the type: the value may hold a secret (a URL with
                    # a password, say).
                    msg = f"{section} must be a table (mapping), not {type(inner).__name__}"
                    raise ConfigError(msg, section)
                target = inner
            target[path[-1]] = value
            sources[key] = name
        try:
            return cls.from_mapping(data)
        except ConfigError as exc:
            source = sources.get(exc.key or "")
            if source is None:
                raise
            msg = f"{exc} (from {source})"
            raise ConfigError(msg, exc.key) from None


#: The prefix of the environment variables :meth:`Config.from_env` reads.
ENV_PREFIX = "MAILSTROM_"
#: Variables with the prefix that belong to the command, not to Config.
ENV_IGNORED = frozenset({"MAILSTROM_STORE", "MAILSTROM_CONFIG"})


def read_toml(path: str | Path) -> dict[str, Any]:
    """The mapping in a TOML file: its ``[mailstrom]`` table, or the top level.

    Raises:
        ConfigError: the file is unreadable or is not TOML.
    """
    try:
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        msg = f"cannot read config file {str(path)!r}: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {str(path)!r} is not valid TOML: {exc}"
        raise ConfigError(msg) from exc
    if set(data) == {"mailstrom"} and isinstance(data["mailstrom"], dict):
        data = data["mailstrom"]
    return data


def _env_hint(cls: type[Any], path: list[str], name: str) -> Any:
    """The type of the setting a variable names; ConfigError if there is none."""
    hint: Any = cls
    for depth, part in enumerate(path):
        hint = _unwrap_optional(hint)
        where = ".".join(path[:depth]) or "the configuration"
        if not attrs.has(hint):
            msg = f"unknown environment variable {name}: {where} has no sections"
            raise ConfigError(msg, ".".join(path))
        fields = {f.name for f in attrs.fields(hint)}
        if part not in fields:
            known = ", ".join(sorted(fields))
            msg = (
                f"unknown environment variable {name}: {where} has no setting "
                f"{part!r} (known: {known})"
            )
            raise ConfigError(msg, ".".join(path))
        hint = typing.get_type_hints(hint)[part]
    if attrs.has(_unwrap_optional(hint)):
        msg = (
            f"environment variable {name} names the section {'.'.join(path)!r}: set "
            f"its settings instead, such as {name}__HOST"
        )
        raise ConfigError(msg, ".".join(path))
    return hint


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [o for o in typing.get_args(hint) if o is not type(None)]
        return inner
    return hint


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _from_env_string(hint: Any, raw: str, key: str, name: str) -> Any:
    """Read *raw* as the type *hint* says; from_mapping checks the rest."""
    inner = _unwrap_optional(hint)
    text = raw.strip()
    if inner is not hint and not text:
        return None
    try:
        if inner is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
    except ValueError:
        msg = (
            f"{key} must be {_TYPE_NAMES[inner]}, not {_shown(key, raw)} (from {name})"
        )
        raise ConfigError(msg, key) from None
    if typing.get_origin(inner) is tuple:
        return [item.strip() for item in text.split(",") if item.strip()]
    if typing.get_origin(inner) is Literal:
        return text
    return raw


_TYPE_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
}


def _structure(cls: type[Any], data: Any, prefix: str) -> Any:
    """Build the attrs class *cls* from *data*, naming the dotted key on any error."""
    where = prefix.rstrip(".") or "the configuration"
    if not isinstance(data, Mapping):
        # Only the type: the value may hold a secret (a URL with a password, say).
        msg = f"{where} must be a table (mapping), not {type(data).__name__}"
        raise ConfigError(msg, prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            msg = f"unknown configuration key {prefix + str(key)!r} (known: {known})"
            raise ConfigError(msg, prefix + str(key))
        kwargs[key] = _convert(hints[key], value, prefix + key)
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in kwargs:
            msg = f"{where} is incomplete: {prefix + name} is required"
            raise ConfigError(msg, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key and prefix and not exc.key.startswith(prefix):
            msg = f"{prefix}{exc!s}"
            raise ConfigError(msg, prefix + exc.key) from None
        raise


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, key)
    if attrs.has(hint):
        return _structure(hint, value, key + ".")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            msg = f"{key} must be one of {', '.join(map(repr, allowed))}, not {_shown(key, value)}"
            raise ConfigError(msg, key)
        return hint(value)
    if origin is Literal:
        allowed = list(typing.get_args(hint))
        if value not in allowed:
            msg = f"{key} must be one of {', '.join(map(repr, allowed))}, not {_shown(key, value)}"
            raise ConfigError(msg, key)
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) for v in value
        ):
            msg = f"{key} must be a list of strings, not {_shown(key, value)}"
            raise ConfigError(msg, key)
        return tuple(value)
    ok = (
        isinstance(value, hint)
        and not (hint in (int, float) and isinstance(value, bool))
    ) or (hint is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        msg = f"{key} must be {_TYPE_NAMES.get(hint, hint)}, not {_shown(key, value)}"
        raise ConfigError(msg, key)
    return float(value) if hint is float else value
