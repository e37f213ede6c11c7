"""An aiohttp service that queues email and reports on every recipient.

A ``cleanup_ctx`` generator opens the Deliverer when the application starts and
closes it when the application shuts down; handlers find it under a typed
``web.AppKey``.

Run it, the configuration coming from a TOML file (``$PORT``, default 8080)::

    MAIL_CONFIG=mailstrom.toml MAIL_QUEUE=/var/lib/app/mail.sqlite3 \
        python aiohttp_app.py
"""

import json
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    InvalidMessageError,
    MessageStatus,
    SQLiteStore,
    UnknownMessageError,
)

SENDER = "Example App <app@example.com>"
DELIVERER = web.AppKey("deliverer", Deliverer)
routes = web.RouteTableDef()


def email_from(body: object) -> Email | None:
    """The email a request body describes, or None if it is not the expected JSON."""
    match body:
        case {"to": [*to], "subject": str(subject), "text": str(text)} if all(
            isinstance(address, str) for address in to
        ):
            return Email(sender=SENDER, to=to, subject=subject, text=text)
    return None


@routes.post("/messages")
async def submit_message(request: web.Request) -> web.Response:
    try:
        email = email_from(await request.json())
    except ValueError:  # not JSON at all
        email = None
    if email is None:
        error = 'expected JSON: {"to": [...], "subject": "...", "text": "..."}'
        return web.json_response({"detail": error}, status=400)
    try:
        # Returns once the message is stored; delivery happens in the background.
        handle = await request.app[DELIVERER].submit(email)
    except InvalidMessageError as exc:  # such as an invalid address; nothing stored
        return web.json_response({"detail": str(exc)}, status=422)
    return web.json_response({"id": handle.message_id}, status=202)


@routes.get("/messages/{message_id}")
async def message_status(request: web.Request) -> web.Response:
    try:
        current = await request.app[DELIVERER].status(request.match_info["message_id"])
    except UnknownMessageError as exc:
        return web.json_response({"detail": str(exc)}, status=404)
    return web.json_response(status_json(current))


@routes.get("/messages/{message_id}/events")
async def message_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the message's status now, then each change.

    The last, once every recipient is final, is named "done". The stream ends
    early, without "done", when the server shuts down: a browser's EventSource
    then reconnects.
    """
    deliverer = request.app[DELIVERER]
    try:
        statuses = await deliverer.follow(request.match_info["message_id"])
    except UnknownMessageError as exc:
        return web.json_response({"detail": str(exc)}, status=404)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    async with statuses:
        await response.prepare(request)
        async for status in statuses:
            event = "event: done\n" if status.is_done else ""
            await response.write(
                f"{event}data: {json.dumps(status_json(status))}\n\n".encode()
            )
    await response.write_eof()
    return response


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


def deliverer_context(
    config: Config, store_path: str
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the Deliverer is open from startup to cleanup."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with Deliverer(config, store=SQLiteStore(store_path)) as deliverer:
            app[DELIVERER] = deliverer
            yield

    return context


async def stop_following(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for open responses: end the streams."""
    app[DELIVERER].stop_following()


def create_app(config: Config, store_path: str) -> web.Application:
    """The application, delivering through *config* from the queue at *store_path*."""
    app = web.Application()
    app.cleanup_ctx.append(deliverer_context(config, store_path))
    app.on_shutdown.append(stop_following)
    app.add_routes(routes)
    return app


def app_from_environment() -> web.Application:
    """Settings from the file in ``$MAIL_CONFIG``, the queue in ``$MAIL_QUEUE``."""
    config = Config.from_toml(os.environ["MAIL_CONFIG"])
    return create_app(config, os.environ.get("MAIL_QUEUE", "mail-queue.sqlite3"))


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    web.run_app(app_from_environment(), host="127.0.0.1", port=port)
