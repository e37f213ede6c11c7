"""Shared fixtures: asyncio in debug mode, blocking-call detection, TLS material."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator

import pytest
import trustme
from blockbuster import BlockBuster, blockbuster_ctx
from hypothesis import HealthCheck, settings

# Loopback SMTP servers (aiosmtpd, byte-level scripts, Postfix smtp-sink) as fixtures
# for every test module: smtpd, script_server, smtp_sink. Then the users' testing kit
# (outbox, deliverer, smtp_server), and pytester to run a user's suite with it.
pytest_plugins = [
    "mailstrom_async.testing",
    "pytester",
    "tests.dns_server",
    "tests.smtpd",
    "tests.postgres",
]

# How fast examples are generated says nothing about the code under test, and on
# a shared 2-core machine it is noise: no too_slow health check in any profile.
_SLOW_OK = [HealthCheck.too_slow]
settings.register_profile("dev", max_examples=100, suppress_health_check=_SLOW_OK)
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=_SLOW_OK
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"debug": True})


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test that makes a blocking call on the event loop thread."""
    with blockbuster_ctx("mailstrom_async") as bb:
        # asyncpg looks for ~/.pgpass (a stat, and a read if it exists) on the
        # loop when it opens a connection without a password: known, small, once
        # per pooled connection (docs/postgres.md says so).
        for name in ("os.stat", "io.open", "io.TextIOWrapper.read"):
            if name in bb.functions:
                bb.functions[name].can_block_in(
                    "asyncpg/connect_utils.py", "_read_password_file"
                )
        yield bb


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_server_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for localhost and 127.0.0.1."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def tls_ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test CA as a PEM file, for RelayConfig(ca_file=...)."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)
