"""A Starlette service that queues email and reports on every recipient.

The lifespan opens the Deliverer before the first request and closes it after the
last one; handlers find it on ``request.app.state``.

Serve it with uvicorn, the configuration coming from a TOML file::

    MAIL_CONFIG=mailstrom.toml MAIL_QUEUE=/var/lib/app/mail.sqlite3 \
        uvicorn --factory starlette_app:app_from_environment
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    InvalidMessageError,
    SQLiteStore,
    UnknownMessageError,
)

SENDER = "Example App <app@example.com>"


def email_from(body: object) -> Email | None:
    """The email a request body describes, or None if it is not the expected JSON."""
    match body:
        case {"to": [*to], "subject": str(subject), "text": str(text)} if all(
            isinstance(address, str) for address in to
        ):
            return Email(sender=SENDER, to=to, subject=subject, text=text)
    return None


async def submit_message(request: Request) -> JSONResponse:
    deliverer: Deliverer = request.app.state.deliverer
    try:
        email = email_from(await request.json())
    except ValueError:  # not JSON at all
        email = None
    if email is None:
        error = 'expected JSON: {"to": [...], "subject": "...", "text": "..."}'
        return JSONResponse({"detail": error}, status_code=400)
    try:
        # Returns once the message is stored; delivery happens in the background.
        handle = await deliverer.submit(email)
    except InvalidMessageError as exc:  # such as an invalid address; nothing stored
        return JSONResponse({"detail": str(exc)}, status_code=422)
    return JSONResponse({"id": handle.message_id}, status_code=202)


async def message_status(request: Request) -> JSONResponse:
    deliverer: Deliverer = request.app.state.deliverer
    try:
        current = await deliverer.status(request.path_params["message_id"])
    except UnknownMessageError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    recipients = [
        {
            "address": r.address,
            "state": r.state.value,
            "code": r.code,
            "enhanced_code": r.enhanced_code,
            "message": r.message,
            "attempts": r.attempts,
        }
        for r in current.recipients
    ]
    return JSONResponse(
        {"id": current.message_id, "done": current.is_done, "recipients": recipients}
    )


def create_app(config: Config, store_path: str) -> Starlette:
    """The application, delivering through *config* from the queue at *store_path*."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
            app.state.deliverer = deliverer
            yield

    routes = [
        Route("/messages", submit_message, methods=["POST"]),
        Route("/messages/{message_id:path}", message_status, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def app_from_environment() -> Starlette:
    """For ``uvicorn --factory``: settings from the file in ``$MAIL_CONFIG``."""
    config = Config.from_toml(os.environ["MAIL_CONFIG"])
    return create_app(config, os.environ.get("MAIL_QUEUE", "mail-queue.sqlite3"))
