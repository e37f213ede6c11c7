"""A FastAPI service that queues email and reports on every recipient.

The Deliverer lives as long as the application: the lifespan opens it (and its
SQLite queue) at startup and closes it at shutdown, after letting transactions in
flight finish. Request handlers only submit and read status, so a request never
waits for SMTP.

Serve it with uvicorn, the configuration coming from a TOML file::

    MAILSTROM_CONFIG=mailstrom.toml uvicorn --factory fastapi_app:app_from_environment
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    InvalidMessageError,
    SQLiteStore,
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


class MessageOut(BaseModel):
    id: str
    done: bool
    recipients: list[RecipientOut]


def get_deliverer(request: Request) -> Deliverer:
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
    return MessageOut(
        id=current.message_id,
        done=current.is_done,
        recipients=[
            RecipientOut(
                address=r.address,
                state=r.state.value,
                code=r.code,
                enhanced_code=r.enhanced_code,
                message=r.message,
                attempts=r.attempts,
            )
            for r in current.recipients
        ],
    )


def create_app(config: Config, store_path: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
            app.state.deliverer = deliverer
            yield

    app = FastAPI(title="Mail service", lifespan=lifespan)
    app.include_router(router)
    return app


def app_from_environment() -> FastAPI:
    """For ``uvicorn --factory``: configuration from the file in $MAILSTROM_CONFIG."""
    config = Config.from_toml(os.environ["MAILSTROM_CONFIG"])
    return create_app(config, os.environ.get("MAILSTROM_QUEUE", "mail-queue.sqlite3"))
