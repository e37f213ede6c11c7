"""The submit path: prepare what ``submit`` and ``submit_many`` are given, off
the event loop when big, then store it and announce it (:class:`Intake`).

:func:`prepare` is linear in the number of addresses and in the size of the
message, but a message of thousands of recipients or megabytes still takes tens
or hundreds of milliseconds: work above :data:`THREAD_ADDRESSES` addresses or
:data:`THREAD_OCTETS` octets (a batch counted as a whole) runs in a worker thread
(``anyio.to_thread.run_sync``), so that the event loop keeps running. Below, the
thread hop would cost more than it saves, and the message is prepared in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from email.message import EmailMessage, Message
from typing import TYPE_CHECKING

import anyio.to_thread
import attrs

from mailstrom_async._exceptions import InvalidMessageError, StoreError
from mailstrom_async._headers import ADDRESS_HEADERS
from mailstrom_async._message import Email, PreparedMessage, check_size, prepare
from mailstrom_async._models import DeliveryEvent, RecipientStatus
from mailstrom_async._store import Job, NewMessage
from mailstrom_async._store._common import new_lease_token, takes_lease

if TYPE_CHECKING:
    from mailstrom_async._config import Config
    from mailstrom_async._dispatch import Dispatcher
    from mailstrom_async._events import EventBroker
    from mailstrom_async._leases import LeaseKeeper
    from mailstrom_async._store import Store

__all__ = [
    "THREAD_ADDRESSES",
    "THREAD_OCTETS",
    "Intake",
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

logger = logging.getLogger("mailstrom_async.deliverer")

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
    """:func:`prepare` *message* for ``submit``, in a thread if it is big.

    A :class:`PreparedMessage` was checked when it was made (by :func:`prepare`,
    or as it was constructed); only the size limit, which is this *config*'s, is
    checked again.
    """
    if isinstance(message, PreparedMessage):
        check_size(message.size, config)
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
            try:
                if isinstance(message, PreparedMessage):
                    check_size(message.size, config)
                    prepared.append(message)
                    continue
                prepared.append(prepare(message, config=config))
            except InvalidMessageError as exc:
                exc.add_note(f"message #{index} of the batch given to submit_many()")
                raise
        return prepared

    if not in_thread(messages):
        return work()
    return await anyio.to_thread.run_sync(work)


@attrs.define(kw_only=True)
class Intake:
    """Stores prepared messages durably, then announces and queues them.

    In mode ``"both"``, with room in memory, a batch is claimed as it is stored
    and goes to the lanes at once; else the scheduler finds it in the store
    (unless this process only submits).
    """

    _store: Store
    _mode: str
    _worker_id: str
    _clock: Callable[[], datetime]
    _broker: EventBroker
    _keeper: LeaseKeeper
    _dispatcher: Dispatcher
    # Whether the store takes lease tokens (looked up once, at the first claim).
    _fenced: bool | None = attrs.field(default=None, init=False)

    async def accept(
        self,
        prepared: Sequence[PreparedMessage],
        keys: Sequence[str | None],
        priorities: Sequence[int],
    ) -> list[tuple[str, bool]]:
        """Store prepared messages in one transaction, then queue and announce
        them; return each one's stored id and whether it was created."""
        now = self._clock()
        claim = self._mode == "both" and self._dispatcher.room() >= len(prepared)
        news = [
            NewMessage(
                message_id=p.message_id.strip("<>"),
                mail_from=p.mail_from,
                recipients=p.rcpt_to,
                data=p.data,
                smtputf8=p.smtputf8,
                submitted_at=now,
                idempotency_key=key,
                priority=priority,
            )
            for p, key, priority in zip(prepared, keys, priorities, strict=True)
        ]
        lease_until = self._keeper.lease_until()
        # The claim's lease token: ours to pick, so that this process's jobs
        # record under it (a store of the older contract takes none).
        if claim and self._fenced is None:
            self._fenced = takes_lease(self._store)
        lease = new_lease_token() if claim and self._fenced else None
        fence = {} if lease is None else {"lease": lease}
        try:
            results = await self._store.add_many(
                news,
                claim_for=self._worker_id if claim else None,
                lease_until=lease_until if claim else None,
                **fence,
            )
        except StoreError as exc:
            for new in news:
                if await self._stored_before(new):
                    msg = (
                        f"a message with Message-ID <{new.message_id}> is already "
                        "in the store; give each message its own Message-ID, or "
                        "pass an idempotency_key to make repeated submits safe"
                    )
                    raise InvalidMessageError(msg) from exc
            raise
        for new, (_, created) in zip(news, results, strict=True):
            if created:
                self._announce(new, claimed=claim, lease=lease)
        if not claim and self._mode != "submit":
            self._dispatcher.scheduler.wake()
        return results

    def _announce(self, new: NewMessage, *, claimed: bool, lease: str | None) -> None:
        """Publish a new message's "queued" events; hand it to the lanes if ours."""
        recipients = tuple(
            RecipientStatus(address=a, next_attempt_at=new.submitted_at)
            for a in new.recipients
        )
        for status in recipients:
            self._broker.publish(
                DeliveryEvent(
                    message_id=new.message_id,
                    recipient=status,
                    previous_state=None,
                    at=new.submitted_at,
                )
            )
        if claimed:
            self._dispatcher.feed(
                Job(
                    message_id=new.message_id,
                    mail_from=new.mail_from,
                    recipients=recipients,
                    data=new.data,
                    smtputf8=new.smtputf8,
                    submitted_at=new.submitted_at,
                    lease=lease,
                    priority=new.priority,
                )
            )
        logger.debug(
            "message accepted",
            extra={"message_id": new.message_id, "recipients": len(recipients)},
        )

    async def _stored_before(self, new: NewMessage) -> bool:
        """Whether another message with *new*'s id was in the store already (not
        *new* itself, written by a store that then failed to say so)."""
        try:
            stored = await self._store.status(new.message_id)
        except Exception:  # unknown, or the store fails: not known to be taken
            return False
        return stored.submitted_at != new.submitted_at
