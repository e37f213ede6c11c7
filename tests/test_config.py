"""Tests for mailstrom_async._config: defaults, validation, from_mapping, from_toml."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailstrom_async import (
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUTS,
    Config,
    ConfigError,
    Limits,
    MXConfig,
    MXTLSPolicy,
    RelayConfig,
    RelayTLS,
    RetryPolicy,
    Timeouts,
)

SECRET = "hunter2-very-secret"

# Defaults


def test_timeouts_defaults_follow_rfc_5321() -> None:
    """Default timeouts are RFC 5321 §4.5.3.2's: connect 30 s (our greeting bound), command 5 min, DATA 2 min, end of data 10 min."""
    t = Timeouts()
    assert t.connect == 30.0
    assert t.command == 300.0
    assert t.data_start == 120.0
    assert t.data_end == 600.0
    assert t.dns > 0
    assert t == DEFAULT_TIMEOUTS


def test_retry_policy_defaults_follow_postfix() -> None:
    """The default retry policy waits 5 min, doubling with 20 % jitter, up to 1 h, for 5 days."""
    p = RetryPolicy()
    assert p.initial_delay == 300.0
    assert p.factor == 2.0
    assert p.jitter == 0.2
    assert p.max_delay == 3600.0
    assert p.lifetime == 5 * 24 * 3600.0
    assert p.max_attempts is None
    assert p == DEFAULT_RETRY_POLICY


def test_retry_policy_mailstrom_compatible() -> None:
    """mailstrom_compatible() is three attempts, one minute apart then doubling, no jitter."""
    p = RetryPolicy.mailstrom_compatible()
    assert isinstance(p, RetryPolicy)
    assert p.max_attempts == 3
    assert p.initial_delay == 60.0
    assert p.factor == 2.0
    assert p.jitter == 0.0
    assert p.lifetime == RetryPolicy().lifetime


def test_config_defaults() -> None:
    """An empty Config delivers via MX with default sub-configurations."""
    c = Config()
    assert c.relay is None
    assert c.helo_name is None
    assert c.message_id_domain is None
    assert c.mx == MXConfig()
    assert c.retry == RetryPolicy()
    assert c.timeouts == Timeouts()
    assert c.limits == Limits()
    assert c.shutdown_grace >= 0
    assert c.lease_duration > 0
    assert c.poll_interval > 0


def test_mx_config_defaults() -> None:
    """MXConfig defaults to the system resolver, port 25, opportunistic TLS, no local MX hosts."""
    mx = MXConfig()
    assert mx.nameservers == ()
    assert mx.port == 25
    assert mx.allow_local is False
    assert mx.tls is MXTLSPolicy.OPPORTUNISTIC
    assert mx.max_addresses >= 1


def test_limits_defaults() -> None:
    """Limits allow at least the 100 recipients per transaction RFC 5321 §4.5.3.1.8 asks for."""
    lim = Limits()
    assert lim.max_recipients_per_transaction >= 100
    assert lim.connections_per_destination <= lim.max_connections


# RelayConfig


@pytest.mark.parametrize(
    ("tls", "port"),
    [
        (RelayTLS.IMPLICIT, 465),
        (RelayTLS.STARTTLS, 587),
        (RelayTLS.NONE, 25),
        ("implicit", 465),
        ("starttls", 587),
        ("none", 25),
    ],
)
def test_relay_default_port_by_tls(tls: Any, port: int) -> None:
    """The relay port defaults by TLS mode: 465 implicit, 587 STARTTLS, 25 none."""
    relay = RelayConfig(host="smtp.example.com", tls=tls)
    assert relay.port == port
    assert relay.tls is RelayTLS(tls)


def test_relay_defaults_to_starttls_587_verified() -> None:
    """A relay given only a host uses required STARTTLS on 587 and verifies certificates."""
    relay = RelayConfig(host="smtp.example.com")
    assert relay.tls is RelayTLS.STARTTLS
    assert relay.port == 587
    assert relay.verify is True
    assert relay.ca_file is None


def test_relay_explicit_port_wins() -> None:
    """An explicit port overrides the TLS-based default."""
    assert RelayConfig(host="h", tls="implicit", port=2465).port == 2465


def test_relay_bad_tls_value() -> None:
    """An unknown relay TLS mode is a ConfigError naming relay.tls."""
    with pytest.raises(ConfigError) as info:
        RelayConfig(host="h", tls="ssl")
    assert info.value.key == "relay.tls"
    assert "'ssl'" in str(info.value)


def test_password_not_in_repr() -> None:
    """The relay password appears in neither repr(RelayConfig) nor repr(Config)."""
    relay = RelayConfig(host="smtp.example.com", username="me", password=SECRET)
    assert SECRET not in repr(relay)
    assert SECRET not in repr(Config(relay=relay))
    assert "me" in repr(relay)  # the username is fine to show
    assert relay.password == SECRET


@pytest.mark.parametrize("host", ["smtp.example.com", "192.0.2.1", "2001:db8::1"])
def test_clear_text_credentials_refused_off_loopback(host: str) -> None:
    """tls='none' with credentials to a non-loopback host is a ConfigError naming relay.tls."""
    with pytest.raises(ConfigError) as info:
        RelayConfig(host=host, tls="none", username="u", password="p")
    assert info.value.key == "relay.tls"
    assert host in str(info.value)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "localhost", "LocalHost", "::1", "[::1]"]
)
def test_clear_text_credentials_allowed_on_loopback(host: str) -> None:
    """tls='none' with credentials is allowed when the relay is on loopback."""
    relay = RelayConfig(host=host, tls="none", username="u", password="p")
    assert relay.port == 25
    assert relay.username == "u"


def test_tls_none_without_credentials_allowed_anywhere() -> None:
    """tls='none' without credentials is allowed for any host."""
    assert RelayConfig(host="relay.internal", tls="none").tls is RelayTLS.NONE


@pytest.mark.parametrize(
    ("username", "password"), [("u", None), (None, "p")], ids=["user", "password"]
)
def test_username_and_password_go_together(
    username: str | None, password: str | None
) -> None:
    """A username without a password (or the reverse) is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        RelayConfig(host="h", username=username, password=password)
    assert info.value.key is not None
    assert info.value.key.startswith("relay.")


@pytest.mark.parametrize("host", ["", "   "])
def test_relay_host_must_not_be_blank(host: str) -> None:
    """A blank relay host is a ConfigError naming relay.host."""
    with pytest.raises(ConfigError) as info:
        RelayConfig(host=host)
    assert info.value.key == "relay.host"


@pytest.mark.parametrize("port", [0, -1, 65536, 25.0])
def test_relay_port_range(port: Any) -> None:
    """A relay port outside 1..65535 (or not an int) is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        RelayConfig(host="h", port=port)
    assert info.value.key == "relay.port"


# MXConfig


@pytest.mark.parametrize("value", ["mandatory", "", None, 1])
def test_mx_tls_converter_rejects_bad_values(value: Any) -> None:
    """An unknown MX TLS policy is a ConfigError naming mx.tls and the allowed values."""
    with pytest.raises(ConfigError) as info:
        MXConfig(tls=value)
    assert info.value.key == "mx.tls"
    assert "'opportunistic'" in str(info.value)
    assert "'required'" in str(info.value)


def test_mx_tls_converter_accepts_strings() -> None:
    """The MX TLS policy may be given by its string value."""
    assert MXConfig(tls="required").tls is MXTLSPolicy.REQUIRED


def test_mx_nameservers_become_a_tuple() -> None:
    """Nameservers given as a list are stored as a tuple."""
    mx = MXConfig(nameservers=["127.0.0.1:5353", "::1"])
    assert mx.nameservers == ("127.0.0.1:5353", "::1")


def test_mx_nameservers_bare_string_refused() -> None:
    """A single string for nameservers is a ConfigError, not split into characters."""
    with pytest.raises(ConfigError) as info:
        MXConfig(nameservers="127.0.0.1")
    assert info.value.key == "mx.nameservers"


def test_mx_max_addresses_positive() -> None:
    """max_addresses below 1 is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        MXConfig(max_addresses=0)
    assert info.value.key == "mx.max_addresses"


def test_mx_max_hosts_and_dns_attempt_positive() -> None:
    """max_hosts below 1 and a DNS time per attempt of 0 are ConfigErrors; both
    default to bounded values (#11)."""
    assert (MXConfig().max_hosts, Timeouts().dns_attempt) == (5, 30.0)
    with pytest.raises(ConfigError) as info:
        MXConfig(max_hosts=0)
    assert info.value.key == "mx.max_hosts"
    with pytest.raises(ConfigError) as info:
        Timeouts(dns_attempt=0)
    assert info.value.key == "timeouts.dns_attempt"


# Value validation on direct construction


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, None])
def test_timeouts_must_be_positive_and_finite(value: Any) -> None:
    """A timeout that is not a positive finite number is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        Timeouts(connect=value)
    assert info.value.key == "timeouts.connect"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_delay", -1.0),
        ("max_delay", math.inf),
        ("lifetime", math.nan),
        ("factor", 0.5),
        ("factor", math.inf),
        ("jitter", -0.1),
        ("jitter", 1.5),
        ("max_attempts", 0),
        ("max_attempts", 2.0),
    ],
)
def test_retry_policy_rejects_bad_values(field: str, value: Any) -> None:
    """Out-of-range retry settings are ConfigErrors naming the field."""
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**{field: value})
    assert info.value.key == f"retry.{field}"


def test_retry_policy_accepts_zero_wait() -> None:
    """A zero-wait policy (for tests) is valid."""
    p = RetryPolicy(initial_delay=0, max_delay=0, jitter=0, factor=1, max_attempts=1)
    assert p.initial_delay == 0
    assert p.max_attempts == 1


@pytest.mark.parametrize(
    "name",
    ["mail.example.com", "localhost", "[127.0.0.1]", "[IPv6:::1]", "a-b.c1", None],
)
def test_helo_name_valid(name: str | None) -> None:
    """Host names and address literals are accepted as helo_name (None: look it up)."""
    assert Config(helo_name=name).helo_name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "two words",
        "bad_name",
        "a\r\nb",
        5,
        # what the old character check let through
        "-",
        "a..b",
        "-a.example",
        "1.2.3.4",  # an IP address must be a literal
        "[300.1.1.1]",
        "[IPv6:nope]",
        "[[x]]",
        "client.test]",
        # refused by IDNA 2008
        "a\u200db.example",
        "\U0001f4a9.example",
        "xn--ls8h.example",
    ],
)
def test_helo_name_invalid(name: Any) -> None:
    """What is neither a host name (IDNA 2008 for non-ASCII labels) nor an
    address literal is a ConfigError naming helo_name."""
    with pytest.raises(ConfigError) as info:
        Config(helo_name=name)
    assert info.value.key == "helo_name"
    assert "helo_name" in str(info.value)


@pytest.mark.parametrize(
    ("name", "wire"),
    [("exämple.com", "xn--exmple-cua.com"), ("Faß.Example", "xn--fa-hia.example")],
)
def test_helo_name_idn_kept_as_a_label(name: str, wire: str) -> None:
    """An internationalised helo_name is kept in its IDNA 2008 A-label form, the
    only form EHLO may carry."""
    assert Config(helo_name=name).helo_name == wire
    assert Config.from_mapping({"helo_name": name}).helo_name == wire


def test_connection_reuse_limits() -> None:
    """Connection reuse is capped at Postfix's 300 s and at 100 transactions by
    default; zero is refused, and both are read from the environment."""
    assert (Limits().connection_reuse_time, Limits().connection_reuse_count) == (
        300.0,
        100,
    )
    for key in ("connection_reuse_time", "connection_reuse_count"):
        with pytest.raises(ConfigError) as info:
            Limits(**{key: 0})
        assert info.value.key == f"limits.{key}"
    config = Config.from_env(
        {
            "MAILSTROM_LIMITS__CONNECTION_REUSE_TIME": "60",
            "MAILSTROM_LIMITS__CONNECTION_REUSE_COUNT": "5",
        }
    )
    assert config.limits == Limits(connection_reuse_time=60.0, connection_reuse_count=5)


def test_limits_reject_zero() -> None:
    """A zero limit is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        Limits(max_connections=0)
    assert info.value.key == "limits.max_connections"


def test_config_shutdown_grace_may_be_zero() -> None:
    """shutdown_grace may be 0 (cancel at once) but not negative."""
    assert Config(shutdown_grace=0).shutdown_grace == 0
    with pytest.raises(ConfigError) as info:
        Config(shutdown_grace=-1)
    assert info.value.key == "shutdown_grace"


@pytest.mark.parametrize(
    "obj",
    [Timeouts(), RetryPolicy(), RelayConfig(host="h"), MXConfig(), Limits(), Config()],
    ids=lambda o: type(o).__name__,
)
def test_config_classes_are_frozen(obj: Any) -> None:
    """Configuration records are immutable."""
    name = attrs.fields(type(obj))[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(obj, name, getattr(obj, name))


# Config.from_mapping

FULL = {
    "helo_name": "mail.example.com",
    "message_id_domain": "example.com",
    "relay": {
        "host": "smtp.example.com",
        "tls": "implicit",
        "username": "me",
        "password": SECRET,
        "verify": False,
        "ca_file": "/etc/ssl/ca.pem",
    },
    "mx": {
        "nameservers": ["127.0.0.1:5353"],
        "port": 2525,
        "allow_local": True,
        "tls": "required",
        "max_addresses": 3,
    },
    "retry": {
        "initial_delay": 1.5,
        "factor": 3,
        "jitter": 0,
        "max_delay": 60,
        "lifetime": 3600,
        "max_attempts": 4,
    },
    "timeouts": {"connect": 5, "command": 6.5, "data_start": 7, "data_end": 8},
    "limits": {"max_connections": 7, "connections_per_destination": 2},
    "shutdown_grace": 0,
    "lease_duration": 60,
    "poll_interval": 0.25,
}


def test_from_mapping_full() -> None:
    """from_mapping builds every nested section from plain data."""
    c = Config.from_mapping(FULL)
    assert c.helo_name == "mail.example.com"
    assert c.message_id_domain == "example.com"
    assert c.relay == RelayConfig(
        host="smtp.example.com",
        tls=RelayTLS.IMPLICIT,
        port=465,
        username="me",
        password=SECRET,
        verify=False,
        ca_file="/etc/ssl/ca.pem",
    )
    assert c.mx == MXConfig(
        nameservers=("127.0.0.1:5353",),
        port=2525,
        allow_local=True,
        tls=MXTLSPolicy.REQUIRED,
        max_addresses=3,
    )
    assert c.retry == RetryPolicy(
        initial_delay=1.5,
        factor=3.0,
        jitter=0.0,
        max_delay=60.0,
        lifetime=3600.0,
        max_attempts=4,
    )
    assert c.timeouts == Timeouts(connect=5, command=6.5, data_start=7, data_end=8)
    assert c.limits.max_connections == 7
    assert c.limits.connections_per_destination == 2
    assert c.limits.idle_timeout == Limits().idle_timeout
    assert c.shutdown_grace == 0
    assert c.lease_duration == 60
    assert c.poll_interval == 0.25


def test_from_mapping_empty_is_default() -> None:
    """An empty mapping gives the default Config."""
    assert Config.from_mapping({}) == Config()


def test_from_mapping_ints_become_floats() -> None:
    """Integers are accepted where seconds (floats) are expected, and stored as floats."""
    c = Config.from_mapping({"timeouts": {"connect": 5}, "retry": {"jitter": 1}})
    assert type(c.timeouts.connect) is float
    assert c.timeouts.connect == 5.0
    assert type(c.retry.jitter) is float


def test_from_mapping_optional_none() -> None:
    """None is accepted for optional settings."""
    c = Config.from_mapping(
        {"relay": None, "helo_name": None, "retry": {"max_attempts": None}}
    )
    assert c.relay is None
    assert c.helo_name is None
    assert c.retry.max_attempts is None


def test_from_mapping_relay_default_port() -> None:
    """A relay section without a port gets the TLS-based default port."""
    c = Config.from_mapping({"relay": {"host": "h", "tls": "none"}})
    assert c.relay is not None
    assert c.relay.port == 25


def test_from_mapping_nameservers_tuple_accepted() -> None:
    """Nameservers may be given as a tuple as well as a list."""
    c = Config.from_mapping({"mx": {"nameservers": ("::1",)}})
    assert c.mx.nameservers == ("::1",)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        # unknown keys
        ({"relay_host": "h"}, "relay_host"),
        ({"relay": {"hots": "h"}}, "relay.hots"),
        ({"timeouts": {"greeting": 5}}, "timeouts.greeting"),
        # wrong types
        ({"timeouts": {"connect": "30"}}, "timeouts.connect"),
        ({"mx": {"port": True}}, "mx.port"),
        ({"mx": {"port": 25.0}}, "mx.port"),
        ({"retry": {"max_attempts": False}}, "retry.max_attempts"),
        ({"retry": {"initial_delay": True}}, "retry.initial_delay"),
        ({"mx": {"nameservers": [1, 2]}}, "mx.nameservers"),
        ({"mx": {"nameservers": "127.0.0.1"}}, "mx.nameservers"),
        ({"mx": {"allow_local": "yes"}}, "mx.allow_local"),
        ({"helo_name": 5}, "helo_name"),
        ({"relay": {"host": "h", "password": 5, "username": "u"}}, "relay.password"),
        ({"relay": "smtp.example.com"}, "relay"),
        ({"timeouts": [30, 300]}, "timeouts"),
        ({"relay": None, "mx": None}, "mx"),
        # bad enum values
        ({"relay": {"host": "h", "tls": "ssl"}}, "relay.tls"),
        ({"relay": {"host": "h", "tls": True}}, "relay.tls"),
        ({"mx": {"tls": "mandatory"}}, "mx.tls"),
        # bad values
        ({"timeouts": {"connect": -1}}, "timeouts.connect"),
        ({"timeouts": {"data_end": 0}}, "timeouts.data_end"),
        ({"relay": {"host": "h", "port": 0}}, "relay.port"),
        ({"mx": {"port": 70000}}, "mx.port"),
        ({"retry": {"jitter": 1.5}}, "retry.jitter"),
        ({"retry": {"factor": 0.5}}, "retry.factor"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"retry": {"lifetime": -5}}, "retry.lifetime"),
        ({"limits": {"max_connections": 0}}, "limits.max_connections"),
        ({"shutdown_grace": -1}, "shutdown_grace"),
        ({"helo_name": "bad name"}, "helo_name"),
        # cross-field checks
        ({"relay": {}}, "relay.host"),
        ({"relay": {"port": 25}}, "relay.host"),
        ({"relay": {"host": " "}}, "relay.host"),
        ({"relay": {"host": "h", "username": "u"}}, "relay.password"),
        (
            {"relay": {"host": "h", "tls": "none", "username": "u", "password": "p"}},
            "relay.tls",
        ),
    ],
)
def test_from_mapping_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    """Every wrong key, type or value in from_mapping raises ConfigError with its dotted key."""
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data)
    assert info.value.key == key
    assert key in str(info.value)


def test_from_mapping_unknown_key_lists_known_keys() -> None:
    """The error for an unknown key lists the keys that are known there."""
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"relay": {"hots": "h"}})
    assert "host" in str(info.value)
    assert "port" in str(info.value)


def test_from_mapping_error_hides_nothing_else() -> None:
    """A ConfigError from from_mapping is not chained to an internal TypeError."""
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"relay": {}})
    assert not isinstance(info.value.__cause__, TypeError)
    assert not isinstance(info.value.__context__, TypeError)


@pytest.mark.parametrize("data", ["relay = 1", ["relay"], None])
def test_from_mapping_top_level_must_be_a_mapping(data: Any) -> None:
    """from_mapping of something that is not a mapping is a ConfigError without a key."""
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data)
    assert info.value.key is None


# Config.from_toml

TOML = """
helo_name = "mail.example.com"

[relay]
host = "smtp.example.com"
tls = "starttls"
username = "me"
password = "hunter2-very-secret"

[timeouts]
connect = 10

[retry]
max_attempts = 5
"""


def _check_toml_config(c: Config) -> None:
    assert c.helo_name == "mail.example.com"
    assert c.relay is not None
    assert c.relay.host == "smtp.example.com"
    assert c.relay.port == 587
    assert c.relay.password == SECRET
    assert c.timeouts.connect == 10.0
    assert c.retry.max_attempts == 5


def test_from_toml_top_level(tmp_path: Path) -> None:
    """from_toml reads settings from the top level of a TOML file."""
    path = tmp_path / "mailstrom.toml"
    path.write_text(TOML, encoding="utf-8")
    _check_toml_config(Config.from_toml(path))
    _check_toml_config(Config.from_toml(str(path)))


def test_from_toml_mailstrom_table(tmp_path: Path) -> None:
    """from_toml reads settings from a [mailstrom] table, with sections nested under it."""
    nested = TOML.replace("[", "[mailstrom.").replace(
        'helo_name = "mail.example.com"',
        '[mailstrom]\nhelo_name = "mail.example.com"',
    )
    path = tmp_path / "app.toml"
    path.write_text(nested, encoding="utf-8")
    _check_toml_config(Config.from_toml(path))


def test_from_toml_mailstrom_table_alongside_others_is_not_unwrapped(
    tmp_path: Path,
) -> None:
    """A [mailstrom] table next to other top-level keys is read as a bad key, not unwrapped."""
    path = tmp_path / "app.toml"
    path.write_text("helo_name = 'a'\n[mailstrom]\nhelo_name = 'b'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert info.value.key == "mailstrom"


def test_from_toml_bad_setting_names_key(tmp_path: Path) -> None:
    """A bad setting in a TOML file is reported with its dotted key."""
    path = tmp_path / "bad.toml"
    path.write_text("[mailstrom.relay]\nhots = 'x'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert info.value.key == "relay.hots"


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_from_toml_unreadable_file(tmp_path: Path, kind: str) -> None:
    """An unreadable config file is a ConfigError naming the path, caused by the OSError."""
    path = tmp_path / "nope.toml"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.key is None


def test_from_toml_invalid_toml(tmp_path: Path) -> None:
    """A file that is not valid TOML is a ConfigError naming the path."""
    path = tmp_path / "broken.toml"
    path.write_text("[relay\nhost = ", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)
    assert "TOML" in str(info.value)
    assert info.value.key is None


@pytest.mark.parametrize("field", ["initial_delay", "max_delay", "lifetime"])
def test_retry_durations_have_an_upper_bound(field: str) -> None:
    """Retry durations beyond 100 years are refused, so datetime maths cannot overflow."""
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**{field: 1e13})  # type: ignore[arg-type]
    assert info.value.key == f"retry.{field}"


# -- message_id_domain (issue 11) -------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "x.test> <evil@evil.test",
        "x.test>",
        "a b.test",
        "x.test\r\nBcc: y@z.test",
        "",
        "-x.test",
        "x..test",
        "bad_name.test",
        "1.2.3.4",
        "[127.0.0.1]",
        "a\u200db.test",
        "xn--zca-.test",
        5,
    ],
)
def test_message_id_domain_must_be_a_domain(value: Any) -> None:
    """message_id_domain is checked as a domain name when the Config is made: a
    value that could put anything but a domain after the '@' of a Message-ID is a
    ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        Config(message_id_domain=value)
    assert info.value.key == "message_id_domain"
    assert "message_id_domain" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"message_id_domain": value})
    assert info.value.key == "message_id_domain"


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("mail.example.net", "mail.example.net"),
        ("localhost", "localhost"),
        ("Mail.Example.NET", "Mail.Example.NET"),
        ("faß.test", "xn--fa-hia.test"),
        ("ＭＡＩＬ．example", "mail.example"),  # noqa: RUF001
    ],
)
def test_message_id_domain_valid_kept_in_a_label_form(value: str, wire: str) -> None:
    """A host name is accepted as message_id_domain; an internationalised one is
    kept in its IDNA 2008 A-label form (a Message-ID is ASCII)."""
    assert Config(message_id_domain=value).message_id_domain == wire


def test_message_id_domain_from_environment_names_the_variable() -> None:
    """A bad MAILSTROM_MESSAGE_ID_DOMAIN is a ConfigError naming the variable."""
    with pytest.raises(ConfigError) as info:
        Config.from_env({"MAILSTROM_MESSAGE_ID_DOMAIN": "x.test> <evil@evil.test"})
    assert info.value.key == "message_id_domain"
    assert "MAILSTROM_MESSAGE_ID_DOMAIN" in str(info.value)


def test_relay_host_idn_kept_as_a_label() -> None:
    """An internationalised relay host goes to DNS and TLS in IDNA 2008 form
    (never the IDNA 2003 ``fass``), and one IDNA 2008 refuses is a ConfigError."""
    assert RelayConfig(host="smtp.faß.test").host == "smtp.xn--fa-hia.test"
    assert RelayConfig(host="127.0.0.1").host == "127.0.0.1"
    with pytest.raises(ConfigError) as info:
        RelayConfig(host="smtp.a\u200db.test")
    assert info.value.key == "relay.host"


# -- secrets are never echoed (issue 11) --------------------------------------------

NUMERIC_SECRET = 91827364


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (NUMERIC_SECRET, "int"),
        (918273.64, "float"),
        (True, "bool"),
        ([SECRET], "list"),
        ({"value": SECRET}, "dict"),
    ],
)
def test_password_type_error_names_type_not_value(value: Any, type_name: str) -> None:
    """A relay password of the wrong type is a ConfigError that names the key and
    the type, never the value, from from_mapping, TOML and the constructor."""
    data = {"relay": {"host": "h", "username": "u", "password": value}}
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data)
    assert info.value.key == "relay.password"
    assert str(info.value) == f"relay.password must be a string, not {type_name}"
    with pytest.raises(ConfigError) as info:
        RelayConfig(host="h", username="u", password=value)
    assert str(info.value) == f"relay.password must be a string, not {type_name}"
    for shown in (str(NUMERIC_SECRET), "918273", SECRET):
        assert shown not in str(info.value)
        assert shown not in repr(info.value)


def test_password_type_error_from_toml_hides_value(tmp_path: Path) -> None:
    """A numeric password in a TOML file: the error names the type only."""
    path = tmp_path / "c.toml"
    path.write_text(
        f"[mailstrom.relay]\nhost = 'h'\nusername = 'u'\npassword = {NUMERIC_SECRET}\n"
    )
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert str(info.value) == "relay.password must be a string, not int"


def test_secret_in_a_section_of_the_wrong_type_is_not_echoed() -> None:
    """A relay given as a URL string (which may hold a password) is refused by
    its type, without the value."""
    for data in (
        {"relay": f"smtp://u:{SECRET}@h"},
        {"relay": [f"u:{SECRET}"]},
    ):
        with pytest.raises(ConfigError) as info:
            Config.from_mapping(data)
        assert info.value.key == "relay"
        assert SECRET not in str(info.value)
        assert "must be a table (mapping), not" in str(info.value)


def test_every_secret_setting_is_hidden_from_repr_and_errors() -> None:
    """Each setting in SECRET_KEYS is left out of reprs and named only by type in
    errors; the list holds every setting whose name says secret."""
    from mailstrom_async._config import SECRET_KEYS

    secretish = ("password", "secret", "token", "key")
    found = {
        f"{prefix}{f.name}"
        for cls, prefix in (
            (Config, ""),
            (RelayConfig, "relay."),
            (MXConfig, "mx."),
            (Limits, "limits."),
            (Timeouts, "timeouts."),
            (RetryPolicy, "retry."),
        )
        for f in attrs.fields(cls)
        if any(word in f.name for word in secretish)
    }
    assert found == SECRET_KEYS == {"relay.password"}
    relay = RelayConfig(host="h", username="u", password=SECRET)
    for shown in (repr(relay), str(relay), repr(Config(relay=relay))):
        assert SECRET not in shown


@pytest.mark.parametrize(
    "environ",
    [
        # a password without a username
        {"MAILSTROM_RELAY__HOST": "h", "MAILSTROM_RELAY__PASSWORD": SECRET},
        # credentials in clear text to a remote host
        {
            "MAILSTROM_RELAY__HOST": "smtp.example.com",
            "MAILSTROM_RELAY__TLS": "none",
            "MAILSTROM_RELAY__USERNAME": "u",
            "MAILSTROM_RELAY__PASSWORD": SECRET,
        },
        # another setting wrong next to a good password
        {
            "MAILSTROM_RELAY__HOST": "h",
            "MAILSTROM_RELAY__USERNAME": "u",
            "MAILSTROM_RELAY__PASSWORD": SECRET,
            "MAILSTROM_RELAY__PORT": "smtp",
        },
        # an unknown variable next to a password
        {"MAILSTROM_RELAY__PASSWORD": SECRET, "MAILSTROM_RELAY__PASSWROD": SECRET},
    ],
)
def test_environment_errors_never_echo_the_password(environ: dict[str, str]) -> None:
    """Errors reading MAILSTROM_* variables name variables and keys, never the
    password's value."""
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_environment_password_of_wrong_type_in_base_hides_value() -> None:
    """A numeric password in the base mapping (a TOML file) under environment
    overrides: the error names the key and type only."""
    base = {"relay": {"host": "h", "username": "u", "password": NUMERIC_SECRET}}
    with pytest.raises(ConfigError) as info:
        Config.from_env({"MAILSTROM_RELAY__PORT": "2525"}, base=base)
    assert str(info.value) == "relay.password must be a string, not int"
