"""A Starlette service that queues email and reports on every recipient.

The lifespan opens the Deliverer before the first request and closes it after the
last one; handlers find it on ``request.app.state``.

Serve it with uvicorn, the configuration coming from a TOML file::

    MAIL_CONFIG=mailstrom.toml MAIL_QUEUE=/var/lib/app/mail.sqlite3 \
        uvicorn --factory starlette_app:app_from_environment
"""

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    InvalidMessageError,
    MessageStatus,
    SQLiteStore,
    StatusStream,
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
    return JSONResponse(status_json(current))


async def message_events(request: Request) -> Response:
    """Server-sent events: the message's status now, then each change."""
    deliverer: Deliverer = request.app.state.deliverer
    try:
        statuses = await deliverer.follow(request.path_params["message_id"])
    except UnknownMessageError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
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
            yield f"{event}data: {json.dumps(status_json(status))}\n\n"


def status_json(status: MessageStatus) -> dict[str, object]:
    """What the endpoints tell of a message and of each of its recipients."""
    recipients = [
        {
            "address": r.address,
            "state": r.state.value,
            "code": r.code,
            "enhanced_code": r.enhanced_code,
            "message": r.message,
            "attempts": r.attempts,
        }
        for r in status.recipients
    ]
    return {"id": status.message_id, "done": status.is_done, "recipients": recipients}


def create_app(config: Config, store_path: str) -> Starlette:
    """The application, delivering through *config* from the queue at *store_path*."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
            app.state.deliverer = deliverer
            # The server waits for open responses to end before this block
            # closes the Deliverer: its stop signals end the event streams.
            with deliverer.stop_following_on(signal.SIGINT, signal.SIGTERM):
                yield

    routes = [
        Route("/messages", submit_message, methods=["POST"]),
        # Before the status route, whose path converter would match ".../events".
        Route("/messages/{message_id:path}/events", message_events, methods=["GET"]),
        Route("/messages/{message_id:path}", message_status, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def app_from_environment() -> Starlette:
    """For ``uvicorn --factory``: settings from the file in ``$MAIL_CONFIG``."""
    config = Config.from_toml(os.environ["MAIL_CONFIG"])
    return create_app(config, os.environ.get("MAIL_QUEUE", "mail-queue.sqlite3"))
