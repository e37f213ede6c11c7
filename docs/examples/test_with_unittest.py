"""The tests of test_with_outbox.py with unittest: no pytest, no plugin.

Run them with ``python -m unittest``. Outbox, CaptureServer and FAST_RETRY need
only mailstrom_async itself.
"""

import asyncio
import unittest

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    MemoryStore,
    RecipientState,
    SubmitHandle,
)
from mailstrom_async.testing import FAST_RETRY, CaptureServer, Outbox


async def send_welcome(deliverer: Deliverer, address: str) -> SubmitHandle:
    """The application code under test: queue the welcome mail for a new account."""
    return await deliverer.submit(
        Email(
            sender="Shop <hello@shop.example>",
            to=[address],
            subject="Welcome to the shop",
            text="Thanks for signing up!\n",
        )
    )


class WelcomeMailTests(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        # Created here, started by each test with `async with`: asyncSetUp and
        # the test run as two tasks, and a Deliverer must stop in the task that
        # started it.
        self.outbox = Outbox()
        config = Config(helo_name="localhost", retry=FAST_RETRY)
        self.deliverer = Deliverer(config, store=MemoryStore(), transport=self.outbox)

    async def test_welcome_mail_is_sent(self) -> None:
        async with self.deliverer:
            handle = await send_welcome(self.deliverer, "ada@example.org")
            async with asyncio.timeout(5):
                status = await handle
        self.assertIs(status.recipients[0].state, RecipientState.DELIVERED)
        [message] = self.outbox.messages
        self.assertEqual(message.subject, "Welcome to the shop")

    async def test_greylisted_address_is_retried(self) -> None:
        self.outbox.defer("ada@example.org", code=450, enhanced_code="4.7.1")
        async with self.deliverer:
            handle = await send_welcome(self.deliverer, "ada@example.org")
            async with asyncio.timeout(5):
                status = await handle
        self.assertIs(status.recipients[0].state, RecipientState.DELIVERED)
        self.assertEqual(status.recipients[0].attempts, 2)

    async def test_welcome_mail_over_smtp(self) -> None:
        server = await self.enterAsyncContext(CaptureServer())
        async with Deliverer(server.relay_config(), store=MemoryStore()) as deliverer:
            handle = await send_welcome(deliverer, "ada@example.org")
            async with asyncio.timeout(5):
                await handle
        self.assertEqual([m.subject for m in server.messages], ["Welcome to the shop"])


if __name__ == "__main__":
    unittest.main()
