"""The pytest fixtures: ``outbox``, ``deliverer_config``, ``deliverer``, ``smtp_server``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mailstrom_async._config import Config
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._store import MemoryStore
from mailstrom_async.testing._capture import FAST_RETRY
from mailstrom_async.testing._outbox import Outbox
from mailstrom_async.testing._server import CaptureServer

__all__ = ["deliverer", "deliverer_config", "outbox", "smtp_server"]


def check_backend(anyio_backend: object) -> None:
    """Refuse, with a clear message, an anyio backend other than asyncio.

    Raises:
        pytest.UsageError: the test runs on another backend (such as trio).
    """
    name = anyio_backend if isinstance(anyio_backend, str) else None
    if isinstance(anyio_backend, tuple) and anyio_backend:
        name = anyio_backend[0]
    if name != "asyncio":
        msg = (
            f"mailstrom_async runs on asyncio only, and this test runs on "
            f"{name!r}: define a fixture 'anyio_backend' that returns 'asyncio'"
        )
        raise pytest.UsageError(msg)


@pytest.fixture
def outbox() -> Outbox:
    """A fresh :class:`~mailstrom_async.testing.Outbox` for each test."""
    return Outbox()


@pytest.fixture
def deliverer_config() -> Config:
    """The Config of the ``deliverer`` fixture; override it to change settings.

    ``Config(helo_name="localhost", retry=FAST_RETRY)``: deferred recipients are
    retried within milliseconds.
    """
    return Config(helo_name="localhost", retry=FAST_RETRY)


@pytest.fixture
async def deliverer(
    outbox: Outbox, deliverer_config: Config, anyio_backend: object
) -> AsyncIterator[Deliverer]:
    """A running Deliverer that delivers into the ``outbox`` fixture.

    It keeps its queue in a :class:`~mailstrom_async.MemoryStore` and runs with
    ``deliverer_config``; it is closed after the test.
    """
    check_backend(anyio_backend)
    store = MemoryStore()
    async with Deliverer(deliverer_config, store=store, transport=outbox) as running:
        yield running


@pytest.fixture
async def smtp_server(anyio_backend: object) -> AsyncIterator[CaptureServer]:
    """A running :class:`~mailstrom_async.testing.CaptureServer` on 127.0.0.1."""
    check_backend(anyio_backend)
    async with CaptureServer() as server:
        yield server
