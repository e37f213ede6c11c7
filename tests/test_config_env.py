"""Config.from_env: MAILSTROM_* environment variables over a base mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailstrom_async import (
    Config,
    ConfigError,
    Limits,
    MXTLSPolicy,
    RelayConfig,
    RelayTLS,
)
from mailstrom_async._config import read_toml


def test_empty_environment_is_the_default() -> None:
    """No MAILSTROM_* variable (others are ignored) gives the default Config."""
    assert Config.from_env({"HOME": "/root", "MAILSTROMX": "1"}) == Config()


def test_values_are_read_by_type() -> None:
    """Strings become ints, floats, booleans, enums, lists and None by field type."""
    config = Config.from_env(
        {
            "MAILSTROM_HELO_NAME": "mail.example.com",
            "MAILSTROM_RELAY__HOST": "smtp.example.com",
            "MAILSTROM_RELAY__PORT": " 2525 ",
            "MAILSTROM_RELAY__TLS": "implicit",
            "MAILSTROM_RELAY__VERIFY": "No",
            "MAILSTROM_LIMITS__MAX_CONNECTIONS": "7",
            "MAILSTROM_LIMITS__IDLE_TIMEOUT": "2.5",
            "MAILSTROM_MX__NAMESERVERS": "127.0.0.1:5353, 127.0.0.2,",
            "MAILSTROM_MX__ALLOW_LOCAL": "on",
            "MAILSTROM_MX__TLS": "required",
            "MAILSTROM_RETRY__MAX_ATTEMPTS": "3",
            "MAILSTROM_SHUTDOWN_GRACE": "0",
            "MAILSTROM_STORE": "ignored.sqlite3",
            "MAILSTROM_CONFIG": "ignored.toml",
        }
    )
    assert config.helo_name == "mail.example.com"
    assert config.relay == RelayConfig(
        host="smtp.example.com", port=2525, tls=RelayTLS.IMPLICIT, verify=False
    )
    assert config.limits == Limits(max_connections=7, idle_timeout=2.5)
    assert config.mx.nameservers == ("127.0.0.1:5353", "127.0.0.2")
    assert config.mx.allow_local is True
    assert config.mx.tls is MXTLSPolicy.REQUIRED
    assert config.retry.max_attempts == 3
    assert config.shutdown_grace == 0.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("off", False)],
)
def test_booleans(raw: str, expected: bool) -> None:
    """Booleans accept 1/0, true/false, yes/no, on/off in any case."""
    assert (
        Config.from_env({"MAILSTROM_MX__ALLOW_LOCAL": raw}).mx.allow_local is expected
    )


def test_merged_over_base() -> None:
    """Variables override single settings of the base mapping and keep the rest."""
    base = {
        "helo_name": "base.example.com",
        "relay": {"host": "relay.example.com", "port": 587},
        "limits": {"max_connections": 3},
    }
    config = Config.from_env(
        {"MAILSTROM_RELAY__PORT": "2525", "MAILSTROM_HELO_NAME": ""}, base=base
    )
    assert config.relay is not None
    assert (config.relay.host, config.relay.port) == ("relay.example.com", 2525)
    assert config.limits.max_connections == 3
    assert config.helo_name is None  # empty: None, where None is allowed
    assert base["relay"] == {"host": "relay.example.com", "port": 587}


def test_toml_file_as_base(tmp_path: Path) -> None:
    """read_toml() gives from_env the same mapping from_toml reads."""
    path = tmp_path / "mailstrom.toml"
    path.write_text(
        '[mailstrom]\nhelo_name = "a.example"\n[mailstrom.relay]\nhost = "r"\n'
    )
    config = Config.from_env({"MAILSTROM_RELAY__PORT": "26"}, base=read_toml(path))
    assert config == Config(helo_name="a.example", relay=RelayConfig(host="r", port=26))


@pytest.mark.parametrize(
    ("environ", "key", "text"),
    [
        (
            {"MAILSTROM_RELAY__PORT": "smtp"},
            "relay.port",
            "relay.port must be an integer, not 'smtp' (from MAILSTROM_RELAY__PORT)",
        ),
        (
            {"MAILSTROM_RELAY__HOST": "r", "MAILSTROM_RELAY__PORT": "70000"},
            "relay.port",
            "relay.port must be a port number from 1 to 65535, not 70000 "
            "(from MAILSTROM_RELAY__PORT)",
        ),
        (
            {"MAILSTROM_TIMEOUTS__CONNECT": "soon"},
            "timeouts.connect",
            "must be a number, not 'soon'",
        ),
        (
            {"MAILSTROM_TIMEOUTS__CONNECT": "-1"},
            "timeouts.connect",
            "(from MAILSTROM_TIMEOUTS__CONNECT)",
        ),
        (
            {"MAILSTROM_MX__ALLOW_LOCAL": "maybe"},
            "mx.allow_local",
            "mx.allow_local must be true or false, not 'maybe'",
        ),
        (
            {"MAILSTROM_MX__TLS": "sometimes"},
            "mx.tls",
            "mx.tls must be one of 'opportunistic', 'required'",
        ),
        (
            {"MAILSTROM_RELAY__PORT": "25"},
            "relay.host",
            "relay is incomplete: relay.host is required",
        ),
        (
            {"MAILSTROM_RELAY__HOSTNAME": "x"},
            "relay.hostname",
            "unknown environment variable MAILSTROM_RELAY__HOSTNAME: relay has no "
            "setting 'hostname'",
        ),
        (
            {"MAILSTROM_COLOUR": "blue"},
            "colour",
            "unknown environment variable MAILSTROM_COLOUR: the configuration has "
            "no setting 'colour'",
        ),
        (
            {"MAILSTROM_HELO_NAME__X": "blue"},
            "helo_name.x",
            "helo_name has no sections",
        ),
        (
            {"MAILSTROM_RELAY": "smtp.example.com"},
            "relay",
            "names the section 'relay'",
        ),
        (
            {"MAILSTROM_RELAY____HOST": "x"},
            "relay..host",
            "unknown environment variable MAILSTROM_RELAY____HOST",
        ),
    ],
)
def test_bad_variables(environ: dict[str, str], key: str, text: str) -> None:
    """A bad or unknown variable is a ConfigError with the dotted key and the
    variable's name."""
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ)
    assert info.value.key == key
    assert text in str(info.value)


def test_base_section_that_is_not_a_table() -> None:
    """A base whose section is not a mapping cannot take a variable's setting."""
    with pytest.raises(ConfigError) as info:
        Config.from_env({"MAILSTROM_RELAY__PORT": "25"}, base={"relay": "r"})
    assert info.value.key == "relay"


def test_bad_base_is_reported_without_variable() -> None:
    """An error in the base alone is from_mapping's error, unchanged."""
    with pytest.raises(ConfigError) as info:
        Config.from_env({}, base={"limits": {"max_connections": 0}})
    assert info.value.key == "limits.max_connections"
    assert "(from" not in str(info.value)
