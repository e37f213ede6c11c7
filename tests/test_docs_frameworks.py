"""The framework examples in docs/examples, run against aiosmtpd on loopback.

FastAPI and Starlette apps are called through ``httpx.ASGITransport`` (which
buffers a response until it ends) and, where a response must stream, served by
uvicorn on 127.0.0.1; the aiohttp app runs on aiohttp's own test server on
127.0.0.1; the script and the worker run as child processes. The tests the three
web apps share are parametrized over ``FRAMEWORKS`` (ids ``[fastapi]``,
``[starlette]``, ``[aiohttp]``). Each example's tests are listed in
``EXAMPLE_TESTS`` in test_docs_examples.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import httpx
import pytest
import uvicorn
from aiohttp.test_utils import TestClient, TestServer
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from mailstrom_async import (
    Config,
    ConfigError,
    Deliverer,
    Email,
    MessageStatus,
    RelayConfig,
    SQLiteStore,
)
from tests.smtpd import FaultHandler
from tests.test_docs_examples import EXAMPLES, load_example

if TYPE_CHECKING:
    from tests.smtpd import SMTPDServer, SMTPDServers

LOCALHOST = "127.0.0.1"


def relay_config(server: SMTPDServer, *, poll_interval: float = 1.0) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        poll_interval=poll_interval,
    )


@contextlib.asynccontextmanager
async def asgi_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling *app* directly, inside the app's lifespan.

    ``ASGITransport`` sends no lifespan events: enter the lifespan as a server would.
    """
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield client


@contextlib.asynccontextmanager
async def uvicorn_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Serve *app* with uvicorn on 127.0.0.1 (lifespan included); a client for it.

    The socket listens before uvicorn starts, so requests made at once wait in
    its backlog until the lifespan has started; nothing polls for readiness.
    """
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        sock.listen()
        url = f"http://{LOCALHOST}:{sock.getsockname()[1]}"
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    yield client
            finally:
                server.should_exit = True


async def sse_events(
    response: httpx.Response,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Parse a ``text/event-stream`` body into (event name, JSON data) pairs."""
    assert response.headers["content-type"].startswith("text/event-stream")
    name, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


async def wait_until(
    deliverer: Deliverer, message_id: str, test: Callable[[MessageStatus], bool]
) -> None:
    """Wait, by *deliverer*'s events, until a message's status passes *test*."""
    async with deliverer.events() as events:  # subscribed before reading
        if test(await deliverer.status(message_id)):
            return
        async for event in events:
            if event.message_id == message_id and test(
                await deliverer.status(message_id)
            ):
                return
    raise AssertionError("the Deliverer closed first")


async def wait_until_done(deliverer: Deliverer, message_id: str) -> None:
    """Wait until every recipient of a message is final."""
    await wait_until(deliverer, message_id, lambda status: status.is_done)


@contextlib.asynccontextmanager
async def aiohttp_server_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """aiohttp's test server on 127.0.0.1 (real HTTP), and an httpx client for it."""
    async with (
        TestClient(TestServer(app, host=LOCALHOST)) as aiohttp,
        httpx.AsyncClient(base_url=str(aiohttp.make_url("")), timeout=30) as client,
    ):
        yield client


def delivered(address: str) -> dict[str, Any]:
    """How the examples show a recipient that aiosmtpd accepted at once."""
    return {
        "address": address,
        "state": "delivered",
        "code": 250,
        "enhanced_code": "2.0.0",
        "message": "OK",
        "attempts": 1,
    }


def queued(address: str) -> dict[str, Any]:
    """How the examples show a recipient not tried yet."""
    return {
        "address": address,
        "state": "queued",
        "code": None,
        "enhanced_code": None,
        "message": None,
        "attempts": 0,
    }


def status_of(message_id: str, *recipients: dict[str, Any]) -> dict[str, Any]:
    """How the examples show a message."""
    done = all(r["state"] in ("delivered", "failed") for r in recipients)
    return {"id": message_id, "done": done, "recipients": list(recipients)}


# -- the three web examples: fastapi_app.py, starlette_app.py, aiohttp_app.py -----


@pytest.fixture(scope="module")
def fastapi_example() -> ModuleType:
    # Imported outside the event loop: importing FastAPI takes a moment.
    return load_example("fastapi_app.py")


@pytest.fixture(scope="module")
def starlette_example() -> ModuleType:
    return load_example("starlette_app.py")


@pytest.fixture(scope="module")
def aiohttp_example() -> ModuleType:
    return load_example("aiohttp_app.py")


ClientFactory = Callable[
    [Any], contextlib.AbstractAsyncContextManager[httpx.AsyncClient]
]
UVICORN_EXIT = {signal.SIGINT: 0, signal.SIGTERM: -signal.SIGTERM}


@attrs.frozen
class Framework:
    """How the tests shared by the three web examples run one of them."""

    example_fixture: str
    """The fixture that imports the example."""
    client: ClientFactory
    """A client for the app, inside its lifespan; its responses may be buffered."""
    http_client: ClientFactory
    """A client for the app served over real HTTP, to read a response as it streams."""
    deliverer_of: Callable[[ModuleType, Any], Deliverer]
    """The app's Deliverer (the example module, the app)."""
    command: list[str]
    """The command the guide runs the server with, in docs/examples."""
    env: dict[str, str]
    """The environment of that command, besides the settings and the queue."""
    port_variable: str
    """The environment variable that gives it the port to listen on."""
    ready_text: bytes
    """What the server prints once it listens."""
    exit_code: Callable[[signal.Signals], int]
    """The server's exit code once stopped by a signal."""
    shutdown_texts: tuple[str, ...]
    """What the server prints when it shuts down."""


def asgi_framework(name: str) -> Framework:
    """A FastAPI or Starlette example: an ASGI app, served by uvicorn."""
    return Framework(
        example_fixture=f"{name}_example",
        client=asgi_client,
        http_client=uvicorn_client,
        deliverer_of=lambda module, app: app.state.deliverer,
        command=[
            str(Path(sys.executable).with_name("uvicorn")),
            "--factory",
            f"{name}_app:app_from_environment",
        ],
        env={},
        port_variable="UVICORN_PORT",  # the documented command, on a free port
        ready_text=b"Uvicorn running on",
        exit_code=UVICORN_EXIT.__getitem__,
        shutdown_texts=("Shutting down", "Application shutdown complete"),
    )


FRAMEWORKS = {
    "fastapi": asgi_framework("fastapi"),
    "starlette": asgi_framework("starlette"),
    "aiohttp": Framework(
        example_fixture="aiohttp_example",
        client=aiohttp_server_client,
        http_client=aiohttp_server_client,
        deliverer_of=lambda module, app: app[module.DELIVERER],
        command=[sys.executable, "aiohttp_app.py"],
        env={"PYTHONUNBUFFERED": "1"},  # run_app prints where it listens
        port_variable="PORT",
        ready_text=b"Running on",
        exit_code=lambda sig: 0,
        shutdown_texts=(),
    ),
}


@attrs.frozen
class WebExample:
    """One of the three web examples, imported, as the shared tests use it."""

    framework: Framework
    module: ModuleType

    def create_app(self, config: Config, tmp_path: Path) -> Any:
        return self.module.create_app(config, str(tmp_path / "app.db"))

    def deliverer(self, app: Any) -> Deliverer:
        return self.framework.deliverer_of(self.module, app)

    def client(
        self, app: Any
    ) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        return self.framework.client(app)

    def http_client(
        self, app: Any
    ) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        return self.framework.http_client(app)


@pytest.fixture(params=list(FRAMEWORKS))
def web_example(request: pytest.FixtureRequest) -> WebExample:
    """Each web example in turn; test ids name the framework: ``[fastapi]``."""
    framework = FRAMEWORKS[request.param]
    return WebExample(framework, request.getfixturevalue(framework.example_fixture))


async def test_app_queues_and_reports_delivery(
    web_example: WebExample, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """POST /messages answers 202 with an id; GET reports it delivered; 404 if unknown;
    the Deliverer is open while the app runs and closed after."""
    server = await smtpd.start()
    app = web_example.create_app(relay_config(server), tmp_path)
    async with web_example.client(app) as client:
        deliverer = web_example.deliverer(app)
        message = {"to": ["ada@example.org"], "subject": "Hi", "text": "Hello!"}
        response = await client.post("/messages", json=message)
        assert response.status_code == 202
        message_id = response.json()["id"]
        with anyio.fail_after(30):
            await wait_until_done(deliverer, message_id)
        response = await client.get(f"/messages/{message_id}")
        assert response.status_code == 200
        assert response.json() == {
            "id": message_id,
            "done": True,
            "recipients": [delivered("ada@example.org")],
        }
        response = await client.get("/messages/no-such-id@example.com")
        assert response.status_code == 404
        assert "no-such-id@example.com" in response.json()["detail"]
    assert deliverer.is_closed
    [received] = server.messages
    assert received.rcpt_tos == ["ada@example.org"]
    assert f"Message-ID: <{message_id}>".encode() in received.content


@pytest.mark.parametrize(
    ("web_example", "body", "status", "detail"),
    [
        pytest.param(
            "fastapi",
            b'{"to": ["not-an-address"], "subject": "Hi", "text": "!"}',
            422,
            "not-an-address",
            id="fastapi-invalid-address",
        ),
        *(
            pytest.param(name, body, status, detail, id=f"{name}-{case}")
            for name in ("starlette", "aiohttp")
            for case, body, status, detail in [
                ("not-json", b"not json", 400, "expected JSON"),
                (
                    "to-not-a-list",
                    b'{"to": "ada@example.org", "subject": "s", "text": "t"}',
                    400,
                    "expected",
                ),
                (
                    "invalid-address",
                    b'{"to": ["not-an-address"], "subject": "s", "text": "t"}',
                    422,
                    "not-an-",
                ),
            ]
        ),
        pytest.param(
            "starlette",
            b'{"to": [1], "subject": "s", "text": "t"}',
            400,
            "expected JSON",
            id="starlette-to-not-strings",
        ),
        pytest.param(
            "starlette",
            b'{"to": ["ada@example.org"], "text": "t"}',
            400,
            "expected JSON",
            id="starlette-no-subject",
        ),
        pytest.param(
            "aiohttp",
            b'{"to": ["ada@example.org"], "subject": 1, "text": "t"}',
            400,
            "expected",
            id="aiohttp-subject-not-a-string",
        ),
    ],
    indirect=["web_example"],
)
async def test_app_refuses_a_bad_request(
    web_example: WebExample,
    smtpd: SMTPDServers,
    tmp_path: Path,
    body: bytes,
    status: int,
    detail: str,
) -> None:
    """A body that is not the expected JSON gets 400, an invalid address 422 with
    the reason; nothing is queued."""
    server = await smtpd.start()
    app = web_example.create_app(relay_config(server), tmp_path)
    async with web_example.client(app) as client:
        response = await client.post(
            "/messages", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status
        assert detail in response.json()["detail"]
        summary = await web_example.deliverer(app).store.summary()
    assert sum(summary.by_state.values()) == 0
    assert server.messages == []


async def test_events_of_a_delivered_or_unknown_message(
    web_example: WebExample, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A message already done when the stream opens: "done", and the end;
    an unknown one: 404."""
    server = await smtpd.start()
    app = web_example.create_app(relay_config(server), tmp_path)
    async with web_example.client(app) as client:
        deliverer = web_example.deliverer(app)
        email = Email(sender="a@example.com", to=["ada@example.org"], subject="s")
        with anyio.fail_after(30):
            handle = await deliverer.submit(email)
            await handle
            # The client returns a response only once it has ended (not streamed),
            # so this also checks that the stream ends by itself.
            response = await client.get(f"/messages/{handle.message_id}/events")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-cache"
        assert [event async for event in sse_events(response)] == [
            ("done", status_of(handle.message_id, delivered("ada@example.org")))
        ]

        response = await client.get("/messages/no-such-id@example.com/events")
        assert response.status_code == 404
        assert "no-such-id@example.com" in response.json()["detail"]
        assert deliverer._watchers._follows == {}  # nothing left following


async def test_events_stream_each_change_as_it_happens(
    web_example: WebExample, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Over real HTTP: the message queued first, delivered only once the server
    accepts, then the end of the stream; other messages are left out."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    app = web_example.create_app(relay_config(server), tmp_path)
    message = {
        "to": ["ada@example.org", "bob@example.net"],
        "subject": "s",
        "text": "t",
    }
    async with web_example.http_client(app) as client:
        with anyio.fail_after(30):
            response = await client.post("/messages", json=message)
            assert response.status_code == 202
            message_id = response.json()["id"]
            path = f"/messages/{message_id}/events"
            async with client.stream("GET", path) as response:
                assert response.status_code == 200
                assert response.headers["cache-control"] == "no-cache"
                events = sse_events(response)
                assert await anext(events) == (
                    "message",
                    status_of(
                        message_id, queued("ada@example.org"), queued("bob@example.net")
                    ),
                )
                # The stream is open and the server is holding the message after
                # its final dot: another message, then let both through.
                await handler.stalled.wait()
                other = {**message, "to": ["cy@example.com"]}
                assert (await client.post("/messages", json=other)).status_code == 202
                await handler.received.wait_for(2)  # both held after the dot
                handler.release.set()
                rest = [event async for event in events]
    assert rest == [
        (
            "done",
            status_of(
                message_id, delivered("ada@example.org"), delivered("bob@example.net")
            ),
        ),
    ]
    assert len(server.messages) == 2


# -- shutting down with an open stream, as the guides run the servers ----------


def free_port() -> int:
    """A loopback port nobody listens on now, for a server run as a child process."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


@attrs.define
class ServerProcess:
    """A server run as a child process, its output (stdout and stderr) kept."""

    process: Process
    output: bytearray = attrs.field(factory=bytearray)
    ready: anyio.Event = attrs.field(factory=anyio.Event)

    async def read_output(self, ready_text: bytes) -> None:
        assert self.process.stdout is not None
        async for chunk in self.process.stdout:
            self.output += chunk
            if ready_text in self.output:
                self.ready.set()

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


@contextlib.asynccontextmanager
async def server_process(
    command: list[str], *, env: dict[str, str], ready_text: bytes
) -> AsyncIterator[ServerProcess]:
    """Run *command* in docs/examples; yield once it prints *ready_text*.

    Leaving the block waits for the process to exit; it is killed if the block
    raised, so that a failing test does not wait for it forever.
    """
    async with await anyio.open_process(
        command, cwd=EXAMPLES, env=env, stderr=subprocess.STDOUT
    ) as process:
        server = ServerProcess(process)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.read_output, ready_text)
                with anyio.fail_after(30):
                    await server.ready.wait()
                yield server
                with anyio.fail_after(30):
                    await process.wait()
        except BaseException:
            process.kill()
            print(server.text)  # shown by pytest when the test fails
            raise


async def stream_then_stop(
    server: ServerProcess, url: str, sig: signal.Signals
) -> list[tuple[str, dict[str, Any]]]:
    """Queue a message that waits for a retry, open its event stream, send *sig*
    to the server while the stream is open; return the events after the first."""
    message = {"to": ["ada@example.org"], "subject": "s", "text": "t"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.post("/messages", json=message)
        assert response.status_code == 202
        path = f"/messages/{response.json()['id']}/events"
        async with client.stream("GET", path) as response:
            assert response.status_code == 200
            events = sse_events(response)
            name, first = await anext(events)
            assert name == "message"
            assert not first["done"]
            server.process.send_signal(sig)
            # The stream ends (no "done": the message still waits), then the
            # server exits.
            return [event async for event in events]


def assert_clean_output(output: str) -> None:
    for text in ("Traceback", "CancelledError", "Exception in ASGI application"):
        assert text not in output, output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("name", list(FRAMEWORKS))
async def test_server_stops_cleanly_with_an_open_event_stream(
    smtpd: SMTPDServers, tmp_path: Path, name: str, sig: signal.Signals
) -> None:
    """The guide's command, as written: a stream waiting for a retry ends when
    the server is told to stop; the server exits, with no traceback."""
    framework = FRAMEWORKS[name]
    handler = FaultHandler(rcpt_replies={"ada@example.org": "451 4.3.0 try later"})
    smtp = await smtpd.start(handler)
    port = free_port()
    env = {
        **os.environ,
        "MAIL_CONFIG": str(write_config(tmp_path / "mailstrom.toml", smtp)),
        "MAIL_QUEUE": str(tmp_path / "queue.sqlite3"),
        framework.port_variable: str(port),
        **framework.env,
    }
    async with server_process(
        framework.command, env=env, ready_text=framework.ready_text
    ) as server:
        rest = await stream_then_stop(server, f"http://{LOCALHOST}:{port}", sig)
    assert "done" not in [name for name, _ in rest]
    assert server.process.returncode == framework.exit_code(sig), server.text
    assert_clean_output(server.text)
    for text in framework.shutdown_texts:
        assert text in server.text


# -- fastapi_app.py only -------------------------------------------------------------


async def test_fastapi_app_from_environment_reads_the_toml_file(
    fastapi_example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """app_from_environment() reads $MAIL_CONFIG, $MAIL_QUEUE and $MAIL_MODE."""
    # uvicorn calls the factory before its event loop runs: here, in a thread.
    app_from_environment = partial(
        anyio.to_thread.run_sync, fastapi_example.app_from_environment
    )
    config_file = tmp_path / "mailstrom.toml"
    monkeypatch.setenv("MAIL_CONFIG", str(config_file))
    monkeypatch.setenv("MAIL_QUEUE", str(tmp_path / "queue.sqlite3"))
    config_file.write_text('[mailstrom.relay]\nhost = "smtp.example.com"\nport = 0\n')
    with pytest.raises(ConfigError) as info:
        await app_from_environment()
    assert info.value.key == "relay.port"
    config_file.write_text('[mailstrom.relay]\nhost = "smtp.example.com"\n')
    app = await app_from_environment()
    assert set(app.openapi()["paths"]) == {
        "/messages",
        "/messages/{message_id}",
        "/messages/{message_id}/events",
    }

    monkeypatch.setenv("MAIL_MODE", "submit")
    app = await app_from_environment()
    async with asgi_client(app) as client:  # submit-only: nothing connects
        message = {"to": ["ada@example.org"], "subject": "s", "text": "t"}
        response = await client.post("/messages", json=message)
        assert response.status_code == 202
        assert app.state.deliverer._mode == "submit"
    async with SQLiteStore(str(tmp_path / "queue.sqlite3")) as store:
        assert (await store.status(response.json()["id"])).recipients[0].attempts == 0

    monkeypatch.setenv("MAIL_MODE", "deliver")
    with pytest.raises(SystemExit, match="MAIL_MODE must be 'both' or 'submit'"):
        await app_from_environment()


async def test_fastapi_events_end_without_done_when_the_deliverer_closes(
    fastapi_example: ModuleType, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A message still waiting when the Deliverer closes: its stream just ends,
    without "done", so that a browser reconnects."""
    handler = FaultHandler(rcpt_replies={"ada@example.org": "451 4.3.0 try later"})
    server = await smtpd.start(handler)
    app = fastapi_example.create_app(relay_config(server), str(tmp_path / "app.db"))
    message = {"to": ["ada@example.org"], "subject": "s", "text": "t"}
    transport = httpx.ASGITransport(app=app)
    responses: list[httpx.Response] = []
    with anyio.fail_after(30):
        # The lifespan (the Deliverer) ends while the stream is still open.
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
            anyio.create_task_group() as tg,
            app.router.lifespan_context(app),
        ):
            response = await client.post("/messages", json=message)
            message_id = response.json()["id"]
            await wait_until(
                app.state.deliverer,
                message_id,
                lambda status: status.recipients[0].attempts == 1,
            )

            async def follow() -> None:
                path = f"/messages/{message_id}/events"
                responses.append(await client.get(path))

            tg.start_soon(follow)
            # The endpoint has read the status, and waits for a change.
            await anyio.wait_all_tasks_blocked()
    [response] = responses
    assert response.status_code == 200
    [(name, data)] = [event async for event in sse_events(response)]
    [recipient] = data["recipients"]
    assert (name, data["done"]) == ("message", False)
    assert (recipient["state"], recipient["code"]) == ("deferred", 451)
    assert server.messages == []


async def test_fastapi_events_in_a_submit_only_app_follow_the_store(
    fastapi_example: ModuleType, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """With mode="submit" a worker process delivers: the stream learns it from the
    store, since nothing in this process reports it."""
    handler = FaultHandler(stall_at="DATA")
    server = await smtpd.start(handler)
    config = relay_config(server, poll_interval=0.05)
    store_path = str(tmp_path / "app.db")
    app = fastapi_example.create_app(config, store_path, mode="submit")
    message = {"to": ["ada@example.org"], "subject": "s", "text": "t"}
    async with (
        uvicorn_client(app) as client,
        Deliverer(config, store=SQLiteStore(store_path), mode="deliver"),
    ):
        with anyio.fail_after(30):
            response = await client.post("/messages", json=message)
            message_id = response.json()["id"]
            path = f"/messages/{message_id}/events"
            async with client.stream("GET", path) as response:
                events = sse_events(response)
                assert await anext(events) == (
                    "message",
                    status_of(message_id, queued("ada@example.org")),
                )
                await handler.stalled.wait()  # the worker has it, still in flight
                handler.release.set()
                rest = [event async for event in events]
    assert rest == [("done", status_of(message_id, delivered("ada@example.org")))]


# -- starlette_app.py and aiohttp_app.py: the factory --------------------------------


def starlette_routes(app: Any) -> object:
    return [route.path for route in app.routes]


def aiohttp_routes(app: Any) -> object:
    return {(r.method, r.resource.canonical) for r in app.router.routes()}


@pytest.mark.parametrize(
    ("web_example", "routes_of", "routes"),
    [
        pytest.param(
            "starlette",
            starlette_routes,
            [
                "/messages",
                "/messages/{message_id:path}/events",
                "/messages/{message_id:path}",
            ],
            id="starlette",
        ),
        pytest.param(
            "aiohttp",
            aiohttp_routes,
            {
                ("POST", "/messages"),
                ("GET", "/messages/{message_id}"),
                ("HEAD", "/messages/{message_id}"),
                ("GET", "/messages/{message_id}/events"),
                ("HEAD", "/messages/{message_id}/events"),
            },
            id="aiohttp",
        ),
    ],
    indirect=["web_example"],
)
def test_app_from_environment_reads_the_toml_file(
    web_example: WebExample,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    routes_of: Callable[[Any], object],
    routes: object,
) -> None:
    """app_from_environment() builds the app from the file in $MAIL_CONFIG."""
    app_from_environment = web_example.module.app_from_environment
    config_file = tmp_path / "mailstrom.toml"
    monkeypatch.setenv("MAIL_CONFIG", str(config_file))
    config_file.write_text('[mailstrom.relay]\nhost = "smtp.example.com"\nport = 0\n')
    with pytest.raises(ConfigError) as info:
        app_from_environment()
    assert info.value.key == "relay.port"
    config_file.write_text('[mailstrom.relay]\nhost = "smtp.example.com"\n')
    assert routes_of(app_from_environment()) == routes


# -- script.py ---------------------------------------------------------------------


def write_config(
    path: Path, server: SMTPDServer, *, poll_interval: float = 1.0
) -> Path:
    """A settings file for child processes: relay on loopback, without TLS."""
    path.write_text(
        f"[mailstrom]\n"
        f'helo_name = "client.test"\n'
        f"poll_interval = {poll_interval}\n"
        f"[mailstrom.relay]\n"
        f'host = "{server.host}"\n'
        f"port = {server.port}\n"
        f'tls = "none"\n'
    )
    return path


async def run_script(*args: str) -> tuple[int, str, str]:
    """Run docs/examples/script.py in a child process: exit code, stdout, stderr."""
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, str(EXAMPLES / "script.py"), *args], check=False
        )
    assert done.returncode is not None
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_script_delivers_and_prints_each_outcome(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """Every recipient gets its own message; one line each; exit 1 as one failed."""
    handler = FaultHandler(rcpt_replies={"bob@example.net": "550 5.1.1 no such user"})
    server = await smtpd.start(handler)
    config = write_config(tmp_path / "mailstrom.toml", server)
    store = str(tmp_path / "queue.sqlite3")
    code, out, err = await run_script(
        "--config", str(config), "--store", store, "ada@example.org", "bob@example.net"
    )
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        "ada@example.org: delivered (250 OK)",
        "bob@example.net: failed (550 no such user)",
    ]
    [received] = server.messages
    assert received.rcpt_tos == ["ada@example.org"]
    assert b"Subject: Your weekly report" in received.content

    code, out, err = await run_script(
        "--config", str(config), "--store", store, "cy@example.com"
    )
    assert (code, out, err) == (0, "cy@example.com: delivered (250 OK)\n", "")


async def test_script_stops_waiting_after_wait_seconds(
    smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """A deferred recipient is reported as it stands when --wait runs out: exit 3."""
    handler = FaultHandler(rcpt_replies={"bob@example.net": "451 4.3.0 try later"})
    server = await smtpd.start(handler)
    config = write_config(tmp_path / "mailstrom.toml", server)
    code, out, err = await run_script(
        "--config",
        str(config),
        "--store",
        str(tmp_path / "queue.sqlite3"),
        "--wait",
        "3",
        "ada@example.org",
        "bob@example.net",
    )
    assert (code, err) == (3, "")
    assert out.splitlines() == [
        "ada@example.org: delivered (250 OK)",
        "bob@example.net: deferred (451 try later)",
    ]


@pytest.mark.parametrize(
    ("config_text", "recipient", "error"),
    [
        ("[mailstrom.relay]\nport = 25\n", "ada@example.org", "relay.host"),
        ("not toml", "ada@example.org", "is not valid TOML"),
        (None, "ada@example.org", "cannot read config file"),
        ('[mailstrom.relay]\nhost = "127.0.0.1"\n', "not-an-address", "not-an-address"),
    ],
)
async def test_script_reports_bad_input_in_one_line(
    tmp_path: Path, config_text: str | None, recipient: str, error: str
) -> None:
    """A bad settings file or address: one line on stderr, exit 2, nothing queued."""
    config = tmp_path / "mailstrom.toml"
    if config_text is not None:
        config.write_text(config_text)
    store = tmp_path / "queue.sqlite3"
    code, out, err = await run_script(
        "--config", str(config), "--store", str(store), recipient
    )
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("script.py: ")
    assert error in err
    if store.exists():
        async with SQLiteStore(str(store)) as queue:
            assert sum((await queue.summary()).by_state.values()) == 0


# -- worker.py ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_example() -> ModuleType:
    return load_example("worker.py")


async def test_worker_delivers_what_a_web_process_queued(
    worker_example: ModuleType, smtpd: SMTPDServers, tmp_path: Path
) -> None:
    """The worker process delivers what a submit-only Deliverer stored, and stops
    cleanly on SIGTERM."""
    server = await smtpd.start()
    config_file = write_config(tmp_path / "mailstrom.toml", server, poll_interval=0.05)
    store_path = str(tmp_path / "queue.sqlite3")
    env = {**os.environ, "MAIL_CONFIG": str(config_file), "MAIL_QUEUE": store_path}
    command = [sys.executable, str(EXAMPLES / "worker.py")]
    with anyio.fail_after(30):
        async with await anyio.open_process(command, env=env) as worker:
            try:
                assert worker.stdout is not None
                output = BufferedByteReceiveStream(worker.stdout)
                line = await output.receive_until(b"\n", 1000)
                assert line == b"worker: delivering"

                config = relay_config(server, poll_interval=0.05)
                async with worker_example.web_deliverer(config, store_path) as web:
                    handles = [
                        await web.submit(
                            Email(sender="app@example.com", to=[to], subject="Hi")
                        )
                        for to in ("ada@example.org", "bob@example.net")
                    ]
                    statuses = [await handle for handle in handles]
                assert all(status.is_delivered for status in statuses)

                worker.send_signal(signal.SIGTERM)
                rest = b"".join([chunk async for chunk in output])
                assert await worker.wait() == 0
            except BaseException:
                worker.kill()  # or leaving the block would wait for it forever
                raise
    assert rest.decode().splitlines() == [
        "worker: SIGTERM, stopping",
        "worker: stopped",
    ]
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "ada@example.org",
        "bob@example.net",
    ]
