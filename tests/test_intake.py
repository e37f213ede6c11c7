"""Tests for mailstrom_async._intake: big messages are prepared in a thread."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from mailstrom_async import _intake
from mailstrom_async._config import Config, RelayConfig
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._exceptions import InvalidAddressError
from mailstrom_async._message import Attachment, Email, prepare
from mailstrom_async._models import RecipientState
from mailstrom_async._store import MemoryStore, SQLiteStore, Store

CONFIG = Config(
    helo_name="client.test", relay=RelayConfig(host="127.0.0.1", port=9, tls="none")
)


def email(count: int = 1, **extra: object) -> Email:
    return Email(
        sender="a@example.com",
        to=[f"r{i}@example.org" for i in range(count)],
        text="hello\n",
        **extra,  # type: ignore[arg-type]
    )


def test_small_messages_stay_on_the_loop() -> None:
    """A message of a few recipients and kilobytes is prepared in place."""
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org, c@example.org"
    msg.set_content("hello\n" * 100)
    raw = b"From: a@example.com\r\nTo: b@example.org\r\n\r\nhi\r\n"
    assert not _intake.in_thread([email(10)])
    assert not _intake.in_thread([msg])
    assert not _intake.in_thread([raw], ["b@example.org"])
    assert not _intake.in_thread([prepare(email(500))])


@pytest.mark.parametrize(
    "item",
    [
        email(_intake.THREAD_ADDRESSES),
        email(1, attachments=[Attachment(filename="a", content=b"x" * 70_000)]),
        email(1, html="<p>" * 30_000),
    ],
    ids=["recipients", "attachment", "html"],
)
def test_big_emails_go_to_a_thread(item: Email) -> None:
    """Many recipients or many octets send an Email to a thread."""
    assert _intake.in_thread([item])


def test_big_email_messages_and_bytes_go_to_a_thread() -> None:
    """Address headers count their addresses; payloads and raw bytes their octets."""
    many = EmailMessage()
    many["From"] = "a@example.com"
    many["To"] = ", ".join(f"r{i}@example.org" for i in range(60))
    many["Cc"] = ", ".join(f"c{i}@example.org" for i in range(60))
    many.set_content("hi\n")
    big = EmailMessage()
    big["From"] = "a@example.com"
    big["To"] = "b@example.org"
    big.set_content("hello\n" * 12_000)
    assert _intake.in_thread([many])
    assert _intake.in_thread([big])
    assert _intake.in_thread([b"x" * 70_000], ["b@example.org"])
    rcpts = [f"r{i}@example.org" for i in range(_intake.THREAD_ADDRESSES + 1)]
    assert _intake.in_thread([b"From: a@example.com\r\n\r\n"], rcpts)


def test_a_batch_is_counted_as_a_whole() -> None:
    """A batch of small messages that adds up goes to one thread."""
    batch = [email(10) for _ in range(_intake.THREAD_ADDRESSES // 10)]
    assert not _intake.in_thread(batch[:5])
    assert _intake.in_thread(batch)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: object) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(f"{tmp_path}/queue.sqlite3")


async def test_submit_prepares_a_big_message_in_a_thread(store: Store) -> None:
    """A 10,000-recipient message and a 1 MB one are stored whole."""
    big = email(10_000, bcc=["hidden@example.net"])
    heavy = email(1, attachments=[Attachment(filename="a.bin", content=b"\0" * 2**20)])
    raw = b"From: a@example.com\r\nTo: b@example.org\r\n\r\n" + b"line\n" * 200_000
    async with Deliverer(CONFIG, store=store, mode="submit") as d:
        handles = [
            await d.submit(big),
            await d.submit(heavy),
            await d.submit(raw, mail_from="a@example.com", rcpt_to=["b@example.org"]),
        ]
        statuses = [await d.status(h.message_id) for h in handles]
    assert [r.address for r in statuses[0]] == [
        *(f"r{i}@example.org" for i in range(10_000)),
        "hidden@example.net",
    ]
    assert all(r.state is RecipientState.QUEUED for s in statuses for r in s)


async def test_submit_many_big_batch_names_the_bad_message(store: Store) -> None:
    """A batch prepared in a thread is still all or nothing, and the error says
    which message was bad."""
    bad = Email(sender="a@example.com", to=["not an address"], text="x")
    batch = [email(60), email(60), bad]
    assert _intake.in_thread(batch)
    async with Deliverer(CONFIG, store=store, mode="submit") as d:
        with pytest.raises(InvalidAddressError) as info:
            await d.submit_many(batch)
        summary = await store.summary()
        handles = await d.submit_many(batch[:2])
        status = await d.status(handles[1].message_id)
    assert "message #2 of the batch" in "".join(info.value.__notes__)
    assert sum(summary.by_state.values()) == 0
    assert len(status.recipients) == 60
