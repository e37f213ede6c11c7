"""A test module of an application that sends mail with mailstrom_async.

Run it with the plugin: ``pytest -p mailstrom_async.testing``, or put
``pytest_plugins = ["mailstrom_async.testing"]`` in your top-level conftest.py.
"""

import anyio
import pytest

from mailstrom_async import Deliverer, Email, MemoryStore, RecipientState, SubmitHandle
from mailstrom_async.testing import CaptureServer, Outbox

# Run every async test here with anyio's pytest plugin (installed with anyio).
# Not needed with `anyio_mode = "auto"` in your pytest configuration.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """mailstrom_async runs on asyncio (usually defined once, in conftest.py)."""
    return "asyncio"


# -- the application code under test (in real life, imported from your app) ----


async def send_welcome(deliverer: Deliverer, address: str) -> SubmitHandle:
    """Queue the welcome mail for a new account."""
    return await deliverer.submit(
        Email(
            sender="Shop <hello@shop.example>",
            to=[address],
            subject="Welcome to the shop",
            text="Thanks for signing up!\n",
        )
    )


# -- the tests -------------------------------------------------------------------


async def test_welcome_mail_is_sent(deliverer: Deliverer, outbox: Outbox) -> None:
    handle = await send_welcome(deliverer, "ada@example.org")

    with anyio.fail_after(5):
        [message] = await outbox.wait_for(1)
    assert message.message_id == handle.message_id
    assert message.to == ("ada@example.org",)
    assert message.subject == "Welcome to the shop"
    assert message.text == "Thanks for signing up!\n"


async def test_greylisted_address_is_retried(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    outbox.defer("ada@example.org", code=450, enhanced_code="4.7.1", text="greylisted")
    handle = await send_welcome(deliverer, "ada@example.org")

    with anyio.fail_after(5):
        status = await handle  # waits until every recipient is done
    [recipient] = status.recipients
    assert recipient.state is RecipientState.DELIVERED
    assert recipient.attempts == 2


async def test_unknown_address_fails(deliverer: Deliverer, outbox: Outbox) -> None:
    outbox.fail("nobody@example.org")
    handle = await send_welcome(deliverer, "nobody@example.org")

    with anyio.fail_after(5):
        status = await handle
    [recipient] = status.recipients
    assert recipient.state is RecipientState.FAILED
    assert (recipient.code, recipient.enhanced_code) == (550, "5.1.1")
    assert outbox.messages == []


async def test_welcome_mail_over_smtp(smtp_server: CaptureServer) -> None:
    # The whole SMTP conversation, over TCP on 127.0.0.1, with a Deliverer of our own.
    smtp_server.defer("ada@example.org")
    config = smtp_server.relay_config()
    async with Deliverer(config, store=MemoryStore()) as deliverer:
        handle = await send_welcome(deliverer, "ada@example.org")
        with anyio.fail_after(5):
            status = await handle
    assert status.recipients[0].attempts == 2
    [message] = smtp_server.messages
    assert message.subject == "Welcome to the shop"
