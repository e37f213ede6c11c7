"""Prepare what ``submit`` and ``submit_many`` are given, off the event loop when big.

:func:`prepare` is linear in the number of addresses and in the size of the
message, but a message of thousands of recipients or megabytes still takes tens
or hundreds of milliseconds: work above :data:`THREAD_ADDRESSES` addresses or
:data:`THREAD_OCTETS` octets (a batch counted as a whole) runs in a worker thread
(``anyio.to_thread.run_sync``), so that the event loop keeps running. Below, the
thread hop would cost more than it saves, and the message is prepared in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.message import EmailMessage, Message
from typing import TYPE_CHECKING

import anyio.to_thread

from mailstrom_async._exceptions import InvalidMessageError
from mailstrom_async._headers import ADDRESS_HEADERS
from mailstrom_async._message import Email, PreparedMessage, prepare

if TYPE_CHECKING:
    from mailstrom_async._config import Config

__all__ = [
    "THREAD_ADDRESSES",
    "THREAD_OCTETS",
    "in_thread",
    "prepare_batch",
    "prepare_one",
]

#: More addresses than this (recipients, and addresses in headers) go to a thread:
#: about 2 to 5 ms of parsing, checking and rendering on the machine of the
#: benchmarks (docs/performance.md), 15 to 50 µs an address.
THREAD_ADDRESSES = 100
#: More octets than this (bodies, attachments, raw bytes) go to a thread: about
#: 2 to 4 ms of encoding, rendering and checking, 30 to 60 µs a KiB.
THREAD_OCTETS = 64 * 1024

_Input = Email | EmailMessage | bytes | PreparedMessage


def in_thread(
    messages: Sequence[_Input], rcpt_to: str | Sequence[str] | None = None
) -> bool:
    """Whether preparing *messages* (together) is worth a worker thread.

    A cheap estimate, linear in the number of parts and header fields: the
    addresses given and the octets of text, attachments and raw bytes.
    """
    addresses = (
        0 if rcpt_to is None else 1 if isinstance(rcpt_to, str) else len(rcpt_to)
    )
    octets = 0
    for message in messages:
        if isinstance(message, Email):
            addresses += 1 + len(message.to) + len(message.cc) + len(message.bcc)
            addresses += len(message.reply_to)
            octets += len(message.text or "") + len(message.html or "")
            octets += sum(len(a.content) for a in message.attachments)
        elif isinstance(message, Message):
            for part in message.walk():
                for name, value in part.raw_items():
                    text = str(value)
                    octets += len(text)
                    if name.lower() in ADDRESS_HEADERS:
                        addresses += 1 + text.count(",")
                # The raw payload: get_payload() would decode 8-bit text first.
                payload = vars(part).get("_payload")
                if isinstance(payload, str | bytes):
                    octets += len(payload)
        elif not isinstance(message, PreparedMessage):
            octets += len(message)
        if addresses > THREAD_ADDRESSES or octets > THREAD_OCTETS:
            return True
    return False


async def prepare_one(
    message: _Input,
    *,
    mail_from: str | None,
    rcpt_to: str | Sequence[str] | None,
    config: Config,
) -> PreparedMessage:
    """:func:`prepare` *message* for ``submit``, in a thread if it is big."""
    if isinstance(message, PreparedMessage):
        return message
    if not in_thread([message], rcpt_to):
        return prepare(message, mail_from=mail_from, rcpt_to=rcpt_to, config=config)

    def work() -> PreparedMessage:
        return prepare(message, mail_from=mail_from, rcpt_to=rcpt_to, config=config)

    return await anyio.to_thread.run_sync(work)


async def prepare_batch(
    messages: Sequence[Email | EmailMessage | PreparedMessage], *, config: Config
) -> list[PreparedMessage]:
    """:func:`prepare` a ``submit_many`` batch, in one thread if it is big.

    Raises:
        InvalidMessageError: a message is invalid; its position in the batch is
            in the exception's notes.
    """

    def work() -> list[PreparedMessage]:
        prepared = []
        for index, message in enumerate(messages):
            if isinstance(message, PreparedMessage):
                prepared.append(message)
                continue
            try:
                prepared.append(prepare(message, config=config))
            except InvalidMessageError as exc:
                exc.add_note(f"message #{index} of the batch given to submit_many()")
                raise
        return prepared

    if not in_thread(messages):
        return work()
    return await anyio.to_thread.run_sync(work)
