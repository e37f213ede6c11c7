"""Tests that read what the application sent, with no plumbing: the application
builds its own Deliverer from its settings, and the tests only switch the
transport to "outbox" (MAILSTROM_TRANSPORT=outbox, or transport="outbox").

Run it with the plugin, which empties the outbox before each test:
``pytest -p mailstrom_async.testing``.
"""

import os
from pathlib import Path

import anyio
import pytest

from mailstrom_async import Config, Deliverer, Email, RecipientState, SQLiteStore
from mailstrom_async.testing import sent_messages

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the application code (in real life, in your app's package) ---------------


def mail_settings() -> Config:
    """The application's mail settings: the MAILSTROM_* environment variables."""
    return Config.from_env(os.environ, base={"helo_name": "shop.example"})


async def sign_up(deliverer: Deliverer, address: str) -> RecipientState:
    """Create the account (not shown), send the welcome mail, return its outcome."""
    handle = await deliverer.submit(
        Email(
            sender="Shop <hello@shop.example>",
            to=[address],
            subject="Welcome to the shop",
            text="Thanks for signing up!\n",
        )
    )
    status = await handle
    return status.recipients[0].state


# -- the tests -------------------------------------------------------------------


async def test_sign_up_sends_the_welcome_mail(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MAILSTROM_TRANSPORT", "outbox")
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    async with Deliverer(mail_settings(), store=store) as deliverer:
        with anyio.fail_after(5):
            state = await sign_up(deliverer, "ada@example.org")

    assert state is RecipientState.DELIVERED
    [message] = sent_messages()
    assert message.to == ("ada@example.org",)
    assert message.subject == "Welcome to the shop"
    assert message.text == "Thanks for signing up!\n"


async def test_with_test_settings(tmp_path: Path) -> None:
    """The same with a Config of the test's own; the outbox starts empty again."""
    assert sent_messages() == []
    settings = Config(helo_name="shop.example", transport="outbox")
    store = SQLiteStore(tmp_path / "queue.sqlite3")
    async with Deliverer(settings, store=store) as deliverer:
        with anyio.fail_after(5):
            await sign_up(deliverer, "bob@example.org")

    assert [m.rcpt_to for m in sent_messages()] == [("bob@example.org",)]
