"""A FastAPI service that queues email and reports on every recipient.

The Deliverer lives as long as the application: the lifespan opens it (and its
SQLite queue) at startup and closes it at shutdown, after letting transactions in
flight finish. Request handlers only submit and read status, so a request never
waits for SMTP.

Serve it with uvicorn, the configuration coming from a TOML file::

    MAIL_CONFIG=mailstrom.toml MAIL_QUEUE=/var/lib/app/mail.sqlite3 \
        uvicorn --factory fastapi_app:app_from_environment
"""

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mailstrom_async import (
    Config,
    Deliverer,
    DelivererMode,
    Email,
    InvalidMessageError,
    MessageStatus,
    RecipientStatus,
    SQLiteStore,
    StatusStream,
    UnknownMessageError,
)

SENDER = "Example App <app@example.com>"


class MessageIn(BaseModel):
    to: list[str]
    subject: str
    text: str


class Queued(BaseModel):
    id: str


class RecipientOut(BaseModel):
    address: str
    state: str
    code: int | None
    enhanced_code: str | None
    message: str | None
    attempts: int

    @classmethod
    def of(cls, r: RecipientStatus) -> "RecipientOut":
        return cls(
            address=r.address,
            state=r.state.value,
            code=r.code,
            enhanced_code=r.enhanced_code,
            message=r.message,
            attempts=r.attempts,
        )


class MessageOut(BaseModel):
    id: str
    done: bool
    recipients: list[RecipientOut]

    @classmethod
    def of(cls, status: MessageStatus) -> "MessageOut":
        recipients = [RecipientOut.of(r) for r in status.recipients]
        return cls(id=status.message_id, done=status.is_done, recipients=recipients)


async def get_deliverer(request: Request) -> Deliverer:
    """The application's Deliverer, opened by the lifespan."""
    deliverer: Deliverer = request.app.state.deliverer
    return deliverer


DelivererDep = Annotated[Deliverer, Depends(get_deliverer)]
router = APIRouter()


@router.post("/messages", status_code=202)
async def submit_message(body: MessageIn, deliverer: DelivererDep) -> Queued:
    email = Email(sender=SENDER, to=body.to, subject=body.subject, text=body.text)
    try:
        # Returns once the message is stored; delivery happens in the background.
        handle = await deliverer.submit(email)
    except InvalidMessageError as exc:  # such as an invalid address; nothing stored
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return Queued(id=handle.message_id)


@router.get("/messages/{message_id}")
async def message_status(message_id: str, deliverer: DelivererDep) -> MessageOut:
    try:
        current = await deliverer.status(message_id)
    except UnknownMessageError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    return MessageOut.of(current)


@router.get("/messages/{message_id}/events")
async def message_events(message_id: str, deliverer: DelivererDep) -> StreamingResponse:
    """Server-sent events: the message's status now, then each change."""
    try:
        statuses = await deliverer.follow(message_id)  # reads the status now
    except UnknownMessageError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    return StreamingResponse(
        status_events(statuses),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def status_events(statuses: StatusStream) -> AsyncIterator[str]:
    """One event per status; the last, once every recipient is final, is "done".

    Ends early, without "done", when the server shuts down: a browser's
    EventSource then reconnects.
    """
    async with statuses:
        async for status in statuses:
            event = "event: done\n" if status.is_done else ""
            yield f"{event}data: {MessageOut.of(status).model_dump_json()}\n\n"


def create_app(
    config: Config, store_path: str, *, mode: DelivererMode = "both"
) -> FastAPI:
    """The application, delivering through *config* from the queue at *store_path*.

    With ``mode="submit"`` it only queues mail, for a worker process to deliver.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = SQLiteStore(store_path)
        async with Deliverer(config, store=store, mode=mode) as deliverer:
            app.state.deliverer = deliverer
            # The server waits for open responses to end before this block
            # closes the Deliverer: its stop signals end the event streams.
            with deliverer.stop_following_on(signal.SIGINT, signal.SIGTERM):
                yield

    app = FastAPI(title="Mail service", lifespan=lifespan)
    app.include_router(router)
    return app


def app_from_environment() -> FastAPI:
    """For ``uvicorn --factory``: settings from the file in ``$MAIL_CONFIG``.

    ``$MAIL_QUEUE`` is the SQLite file; ``$MAIL_MODE=submit`` leaves delivery
    to a worker process.
    """
    config = Config.from_toml(os.environ["MAIL_CONFIG"])
    store_path = os.environ.get("MAIL_QUEUE", "mail-queue.sqlite3")
    match os.environ.get("MAIL_MODE", "both"):
        case "both":
            return create_app(config, store_path)
        case "submit":
            return create_app(config, store_path, mode="submit")
        case other:
            raise SystemExit(f"MAIL_MODE must be 'both' or 'submit', not {other!r}")
