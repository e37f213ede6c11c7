"""Check a custom store against the store contract that every store must pass."""

from collections.abc import AsyncIterator

import pytest

from mailstrom_async import MemoryStore, Store
from mailstrom_async.testing import StoreContract


class MyStore(MemoryStore):
    """Your store here; this one only renames the in-memory store."""


class TestMyStore(StoreContract):
    """Runs every contract test against MyStore."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        """A new, open, empty store for each test; closed afterwards."""
        async with MyStore() as store:
            yield store


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
