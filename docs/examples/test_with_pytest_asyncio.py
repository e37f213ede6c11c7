"""The tests of test_with_outbox.py, for a project that runs pytest-asyncio.

In pytest-asyncio's strict mode (its default) each async test is marked
``@pytest.mark.asyncio``, as here; in auto mode the marks can go. The fixtures
start on the event loop of the test either way.
"""

import asyncio

import pytest

from mailstrom_async import Deliverer, Email, MemoryStore, RecipientState, SubmitHandle
from mailstrom_async.testing import CaptureServer, Outbox


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


@pytest.mark.asyncio
async def test_welcome_mail_is_sent(deliverer: Deliverer, outbox: Outbox) -> None:
    handle = await send_welcome(deliverer, "ada@example.org")

    async with asyncio.timeout(5):
        status = await handle
    assert status.recipients[0].state is RecipientState.DELIVERED
    [message] = outbox.messages
    assert message.to == ("ada@example.org",)
    assert message.subject == "Welcome to the shop"


@pytest.mark.asyncio
async def test_greylisted_address_is_retried(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    outbox.defer("ada@example.org", code=450, enhanced_code="4.7.1", text="greylisted")
    handle = await send_welcome(deliverer, "ada@example.org")

    async with asyncio.timeout(5):
        status = await handle
    [recipient] = status.recipients
    assert recipient.state is RecipientState.DELIVERED
    assert recipient.attempts == 2


@pytest.mark.asyncio
async def test_welcome_mail_over_smtp(smtp_server: CaptureServer) -> None:
    config = smtp_server.relay_config()
    async with Deliverer(config, store=MemoryStore()) as deliverer:
        handle = await send_welcome(deliverer, "ada@example.org")
        async with asyncio.timeout(5):
            await handle
    [message] = smtp_server.messages
    assert message.subject == "Welcome to the shop"
