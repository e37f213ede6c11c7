"""The pytest fixtures: ``outbox``, ``deliverer_config``, ``deliverer``, ``smtp_server``.

``deliverer`` and ``smtp_server`` start a Deliverer or a CaptureServer, whose
background tasks must run on the event loop that runs the test: on another loop
nobody drives them and ``await handle`` waits forever. Which loop that is depends
on the plugin that runs the test, so both are plain fixtures that ask the plugin
running the test for an async fixture of its own kind (``request.getfixturevalue``):

* a pytest-asyncio test (``@pytest.mark.asyncio``, or any async test in its auto
  mode): a ``pytest_asyncio.fixture`` on the loop scope of that test, one per scope;
* an anyio test (``@pytest.mark.anyio``, ``anyio_mode = "auto"``, or a test that
  uses ``anyio_backend``): an async fixture on anyio's test runner.

pytest-asyncio wins when both could claim a test, as it does when running it.

PYTEST_DONT_REWRITE: no asserts here, and a conftest.py may import the fixtures
before pytest loads this module as the plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, TypeVar

import pytest

from mailstrom_async._capture import FAST_RETRY
from mailstrom_async._config import Config
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._outbox import Outbox, reset_shared_outbox, shared_outbox
from mailstrom_async._store import MemoryStore
from mailstrom_async.testing._server import CaptureServer

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is a test dependency here
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True

__all__ = ["deliverer", "deliverer_config", "outbox", "smtp_server"]

# Plain asserts in the contract suite report the values compared, as in a test file;
# registered here too, as pytest loads this plugin before it imports any test module.
pytest.register_assert_rewrite(
    "mailstrom_async.testing._store_contract", "mailstrom_async.testing._hold_contract"
)

T = TypeVar("T")

LoopScope = Literal["function", "class", "module", "package", "session"]
LOOP_SCOPES: tuple[LoopScope, ...] = (
    "function",
    "class",
    "module",
    "package",
    "session",
)

_PLUGINS_HINT = (
    "mark it @pytest.mark.asyncio (pytest-asyncio) or @pytest.mark.anyio (anyio), "
    'or set asyncio_mode = "auto" or anyio_mode = "auto" in your pytest configuration'
)


def check_backend(anyio_backend: object) -> None:
    """Refuse, with a clear message, an anyio backend other than asyncio.

    Raises:
        pytest.UsageError: the test runs on another backend (such as trio).
    """
    name = anyio_backend if isinstance(anyio_backend, str) else None
    if isinstance(anyio_backend, tuple) and anyio_backend:
        name = anyio_backend[0]
    if name != "asyncio":
        msg = (
            f"mailstrom_async runs on asyncio only, and this test runs on "
            f"{name!r}: define a fixture 'anyio_backend' that returns 'asyncio'"
        )
        raise pytest.UsageError(msg)


def asyncio_loop_scope(item: pytest.Item) -> str | None:
    """The loop scope pytest-asyncio runs *item* in, or None if it does not run it.

    The scope is the ``loop_scope`` of the closest ``asyncio`` marker, else the
    ``asyncio_default_test_loop_scope`` setting, as pytest-asyncio decides it.
    """
    if not HAVE_PYTEST_ASYNCIO or not item.config.pluginmanager.has_plugin("asyncio"):
        return None
    if not pytest_asyncio.is_async_test(item):
        return None
    marker = item.get_closest_marker("asyncio")
    kwargs = marker.kwargs if marker is not None else {}
    scope = kwargs.get("loop_scope") or kwargs.get("scope")
    default = item.config.getini("asyncio_default_test_loop_scope")
    return str(scope or default or "function")


def started_by_the_test_runner(request: pytest.FixtureRequest, name: str) -> Any:
    """The value of the async fixture behind *name* that runs on the test's loop.

    Raises:
        pytest.UsageError: neither pytest-asyncio nor anyio runs this test.
    """
    scope = asyncio_loop_scope(request.node)
    if scope is not None:
        return request.getfixturevalue(f"_mailstrom_{name}_asyncio_{scope}")
    if "anyio_backend" in request.fixturenames:
        return request.getfixturevalue(f"_mailstrom_{name}_anyio")
    msg = (
        f"the {name!r} fixture runs on the event loop of an async test, and "
        f"{request.node.name!r} is not run by pytest-asyncio or anyio: {_PLUGINS_HINT}"
    )
    raise pytest.UsageError(msg)


@pytest.fixture(autouse=True)
def _mailstrom_empty_shared_outbox() -> Iterator[None]:
    """Each test starts and ends with an empty process-wide outbox (no messages,
    no scripted replies), as Django empties ``mail.outbox``."""
    reset_shared_outbox()
    yield
    reset_shared_outbox()


@pytest.fixture
def outbox(_mailstrom_empty_shared_outbox: None) -> Outbox:
    """The process-wide :class:`~mailstrom_async.testing.Outbox`, empty at the
    start of each test: the one :func:`~mailstrom_async.testing.sent_messages`
    reads and ``transport="outbox"`` delivers into, so mail of the ``deliverer``
    fixture and of the application's own Deliverers lands in the same place."""
    return shared_outbox()


@pytest.fixture
def deliverer_config() -> Config:
    """The Config of the ``deliverer`` fixture; override it to change settings.

    ``Config(helo_name="localhost", retry=FAST_RETRY)``: deferred recipients are
    retried within milliseconds.
    """
    return Config(helo_name="localhost", retry=FAST_RETRY)


@pytest.fixture
def deliverer(request: pytest.FixtureRequest) -> Deliverer:
    """A running Deliverer that delivers into the ``outbox`` fixture.

    It keeps its queue in a :class:`~mailstrom_async.MemoryStore`, runs with
    ``deliverer_config`` on the event loop of the test (pytest-asyncio's or
    anyio's), and is closed after the test.
    """
    running: Deliverer = started_by_the_test_runner(request, "deliverer")
    return running


@pytest.fixture
def smtp_server(request: pytest.FixtureRequest) -> CaptureServer:
    """A running :class:`~mailstrom_async.testing.CaptureServer` on 127.0.0.1, on
    the event loop of the test (pytest-asyncio's or anyio's)."""
    server: CaptureServer = started_by_the_test_runner(request, "smtp_server")
    return server


# -- the async fixtures behind them, one per plugin (and per loop scope) ------------


def new_deliverer(outbox: Outbox, config: Config) -> Deliverer:
    return Deliverer(config, store=MemoryStore(), transport=outbox)


@contextlib.asynccontextmanager
async def in_a_task_of_its_own(cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter *cm*, and exit it later, in one task that lives from setup to teardown.

    pytest-asyncio runs an async fixture's setup and its teardown as two tasks,
    and a task group (the Deliverer's) must be exited by the task that entered it:
    "Attempted to exit cancel scope in a different task". anyio's plugin runs its
    fixtures the same way, each in a task of its own. This task stays suspended on
    *leave* between pytest-asyncio's runs of the loop; it is the one task here
    outside a task group, since no task group can span those runs. An error of
    *cm*'s (a Deliverer that crashed during the test) is raised at teardown.
    """
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    leave = asyncio.Event()

    async def host() -> None:
        async with cm as value:
            entered.set_result(value)
            await leave.wait()

    task = asyncio.get_running_loop().create_task(host())
    try:
        await asyncio.wait((task, entered), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        task.result()  # it failed to enter, or failed at once: raise its error
    try:
        yield entered.result()
    finally:
        leave.set()
        await task


@pytest.fixture(name="_mailstrom_deliverer_anyio")
async def deliverer_on_anyio(
    outbox: Outbox, deliverer_config: Config, anyio_backend: object
) -> AsyncIterator[Deliverer]:
    check_backend(anyio_backend)
    async with new_deliverer(outbox, deliverer_config) as running:
        yield running


@pytest.fixture(name="_mailstrom_smtp_server_anyio")
async def smtp_server_on_anyio(anyio_backend: object) -> AsyncIterator[CaptureServer]:
    check_backend(anyio_backend)
    async with CaptureServer() as server:
        yield server


def asyncio_fixtures(scope: LoopScope) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The deliverer and smtp_server fixtures for pytest-asyncio tests on *scope*.

    Each is a new function, as pytest_asyncio.fixture marks the function itself.
    """

    async def deliverer_on_asyncio(
        outbox: Outbox, deliverer_config: Config
    ) -> AsyncIterator[Deliverer]:
        async with in_a_task_of_its_own(
            new_deliverer(outbox, deliverer_config)
        ) as running:
            yield running

    async def smtp_server_on_asyncio() -> AsyncIterator[CaptureServer]:
        async with in_a_task_of_its_own(CaptureServer()) as server:
            yield server

    return (
        pytest_asyncio.fixture(
            deliverer_on_asyncio,
            name=f"_mailstrom_deliverer_asyncio_{scope}",
            loop_scope=scope,
        ),
        pytest_asyncio.fixture(
            smtp_server_on_asyncio,
            name=f"_mailstrom_smtp_server_asyncio_{scope}",
            loop_scope=scope,
        ),
    )


if HAVE_PYTEST_ASYNCIO:
    # pytest finds fixtures among the plugin module's attributes.
    for _scope in LOOP_SCOPES:
        (
            globals()[f"_deliverer_asyncio_{_scope}"],
            globals()[f"_smtp_server_asyncio_{_scope}"],
        ) = asyncio_fixtures(_scope)
    del _scope
