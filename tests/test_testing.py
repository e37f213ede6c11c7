"""mailstrom_async.testing: the Outbox and the CaptureServer through a real Deliverer,
the pytest fixtures, and the kit's bad inputs.

The fixtures ``outbox``, ``deliverer``, ``deliverer_config`` and ``smtp_server``
come from the plugin, which tests/conftest.py loads as a user's conftest would.
A user's whole suite run under the plugin is in tests/test_docs_examples.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import anyio
import attrs
import pytest

from mailstrom_async import (
    Config,
    Connection,
    Deliverer,
    Email,
    MemoryStore,
    MessageStatus,
    MXConfig,
    ProtocolError,
    RecipientState,
    RelayConfig,
    Transport,
    prepare,
)
from mailstrom_async.testing import (
    FAST_RETRY,
    CaptureServer,
    Outbox,
    OutboxConnection,
)
from mailstrom_async.testing._plugin import check_backend

QUEUED = RecipientState.QUEUED
DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED


def email(*to: str, subject: str = "Your order") -> Email:
    return Email(
        sender="Shop <shop@example.com>",
        to=list(to) or ["ada@example.org"],
        subject=subject,
        text="It has shipped.\n",
    )


async def deliver(
    deliverer: Deliverer, message: Email
) -> tuple[MessageStatus, dict[str, list[RecipientState]]]:
    """Submit *message*, wait until it is done; return its status and the states
    each recipient went through, from its events."""
    seen: dict[str, list[RecipientState]] = {}
    async with deliverer.events() as events:
        handle = await deliverer.submit(message)
        with anyio.fail_after(10):
            status = await handle
            async for event in events:
                states = seen.setdefault(event.recipient.address, [])
                states.append(event.recipient.state)
                finished = [s for s in seen.values() if s[-1].is_final]
                if len(finished) == len(status.recipients):
                    break
    return status, seen


# -- Outbox through a Deliverer ----------------------------------------------------


async def test_outbox_captures_a_delivered_message(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """A message lands in the outbox, parsed, and its recipient is DELIVERED there."""
    status, seen = await deliver(deliverer, email("ada@example.org"))
    assert seen == {"ada@example.org": [QUEUED, DELIVERED]}
    [recipient] = status.recipients
    assert recipient.state is DELIVERED
    assert (recipient.code, recipient.enhanced_code) == (250, "2.0.0")
    assert (recipient.attempts, recipient.host, recipient.ip) == (1, "outbox", None)
    assert (recipient.tls, recipient.tls_verified) == (False, False)
    [message] = outbox.messages
    assert message.message_id == status.message_id
    assert message.mail_from == "shop@example.com"
    assert message.rcpt_to == ("ada@example.org",)
    assert message.subject == "Your order"
    assert message.to == ("ada@example.org",)
    assert message.cc == ()
    assert message.text == "It has shipped.\n"
    assert message.html is None
    assert message.message["From"] == "Shop <shop@example.com>"
    assert f"Message-ID: <{status.message_id}>".encode() in message.data
    assert outbox.connections == 1


async def test_outbox_defers_then_delivers(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """defer() once: the recipient is DEFERRED with the scripted reply, retried,
    then DELIVERED on the second attempt."""
    outbox.defer("ada@example.org", code=450, enhanced_code="4.7.1", text="greylisted")
    deferred = []
    async with deliverer.events() as events:
        handle = await deliverer.submit(email("ada@example.org"))
        with anyio.fail_after(10):
            async for event in events:
                if event.recipient.state is DEFERRED:
                    deferred.append(event.recipient)
                if event.recipient.is_final:
                    break
            status = await handle
    [first] = deferred
    assert (first.code, first.enhanced_code, first.message) == (
        450,
        "4.7.1",
        "greylisted",
    )
    assert first.attempts == 1
    [recipient] = status.recipients
    assert (recipient.state, recipient.attempts, recipient.code) == (DELIVERED, 2, 250)
    [message] = outbox.messages
    assert message.rcpt_to == ("ada@example.org",)


async def test_outbox_fails_a_recipient(deliverer: Deliverer, outbox: Outbox) -> None:
    """fail(): the recipient FAILS at once with the scripted 5xx reply; nothing is
    captured."""
    outbox.fail("nobody@example.org")
    status, seen = await deliver(deliverer, email("nobody@example.org"))
    assert seen == {"nobody@example.org": [QUEUED, FAILED]}
    [recipient] = status.recipients
    assert (recipient.code, recipient.enhanced_code) == (550, "5.1.1")
    assert (recipient.message, recipient.attempts) == ("no such user", 1)
    assert outbox.messages == []


async def test_outbox_mixed_outcomes_in_one_message(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """One message, three recipients: accepted, deferred once, refused. Each ends as
    a real server would leave it, and the outbox sees two transactions."""
    outbox.defer("later@example.org")
    outbox.fail("gone@example.net", code=553, enhanced_code="5.1.3", text="bad box")
    status, seen = await deliver(
        deliverer, email("now@example.com", "later@example.org", "gone@example.net")
    )
    assert seen == {
        "now@example.com": [QUEUED, DELIVERED],
        "later@example.org": [QUEUED, DEFERRED, DELIVERED],
        "gone@example.net": [QUEUED, FAILED],
    }
    by_address = {r.address: r for r in status.recipients}
    assert by_address["now@example.com"].attempts == 1
    assert by_address["later@example.org"].attempts == 2
    assert by_address["gone@example.net"].code == 553
    assert [m.rcpt_to for m in outbox.messages] == [
        ("now@example.com",),
        ("later@example.org",),
    ]
    assert [m.to for m in outbox.messages] == [
        ("now@example.com", "later@example.org", "gone@example.net")
    ] * 2


async def test_outbox_defer_forever_gives_up(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """defer(times=None) defers every attempt, until the retry policy gives up."""
    outbox.defer("@example.org", times=None)
    status, seen = await deliver(deliverer, email("ada@EXAMPLE.org"))
    assert FAST_RETRY.max_attempts is not None
    attempts = FAST_RETRY.max_attempts
    assert seen == {
        "ada@EXAMPLE.org": [QUEUED] + [DEFERRED] * (attempts - 1) + [FAILED]
    }
    [recipient] = status.recipients
    assert (recipient.attempts, recipient.enhanced_code) == (attempts, "5.4.7")
    assert recipient.message is not None
    assert "last reply: 451 4.3.0 try again later" in recipient.message


async def test_outbox_rules_apply_in_order(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """defer(times=2) then fail(): two deferrals, then the failure; another
    address is untouched."""
    outbox.defer("ada@example.org", times=2)
    outbox.fail("ada@example.org")
    status, seen = await deliver(deliverer, email("ada@example.org", "bob@example.org"))
    assert seen["ada@example.org"] == [QUEUED, DEFERRED, DEFERRED, FAILED]
    assert seen["bob@example.org"] == [QUEUED, DELIVERED]
    assert [r.attempts for r in status.recipients] == [3, 1]


async def test_outbox_disconnect_defers_the_whole_transaction(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """disconnect(): 421 at RCPT drops the connection; every recipient of that
    transaction is DEFERRED, then delivered over a new connection."""
    outbox.disconnect("bob@example.org")
    status, seen = await deliver(deliverer, email("ada@example.org", "bob@example.org"))
    assert seen == {
        "ada@example.org": [QUEUED, DEFERRED, DELIVERED],
        "bob@example.org": [QUEUED, DEFERRED, DELIVERED],
    }
    assert [r.attempts for r in status.recipients] == [2, 2]
    [message] = outbox.messages
    assert message.rcpt_to == ("ada@example.org", "bob@example.org")
    assert outbox.connections == 2


async def test_outbox_disconnect_any_address(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """disconnect() without an address drops the next transaction, whatever it is;
    the deferral carries the 421 reply."""
    outbox.disconnect(text="shutting down")
    async with deliverer.events() as events:
        handle = await deliverer.submit(email())
        with anyio.fail_after(10):
            async for event in events:
                if event.recipient.state is DEFERRED:
                    break
            status = await handle
    assert (event.recipient.code, event.recipient.enhanced_code) == (421, "4.4.2")
    assert event.recipient.message is not None
    assert "shutting down" in event.recipient.message
    assert status.is_delivered


async def test_outbox_clear_and_clear_script(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """clear() forgets the messages, not the rules; clear_script() the rules."""
    await deliver(deliverer, email("ada@example.org"))
    outbox.fail("bob@example.org")
    outbox.clear()
    assert outbox.messages == []
    status, _ = await deliver(deliverer, email("bob@example.org"))
    assert status.recipients[0].state is FAILED
    outbox.clear_script()
    status, _ = await deliver(deliverer, email("bob@example.org"))
    assert status.is_delivered
    assert [m.rcpt_to for m in outbox.messages] == [("bob@example.org",)]


async def test_outbox_wait_for(deliverer: Deliverer, outbox: Outbox) -> None:
    """wait_for(n) wakes when the n-th message arrives, and returns them all."""
    results = []

    async def waiter() -> None:
        results.append(await outbox.wait_for(2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert results == []
        with anyio.fail_after(10):
            await deliverer.submit(email(subject="one"))
            [first] = await outbox.wait_for()
            assert first.subject == "one"
            assert results == []
            await deliverer.submit(email(subject="two"))
    assert [[m.subject for m in r] for r in results] == [["one", "two"]] * 2
    assert await outbox.wait_for(1) == outbox.messages
    with pytest.raises(ValueError, match="count >= 1"):
        await outbox.wait_for(0)


async def test_outbox_replaces_relay_and_mx(outbox: Outbox) -> None:
    """With a transport, the relay or MX settings are not used at all: a relay that
    refuses connections, or MX with an unreachable name server, still delivers."""
    configs = [
        Config(relay=RelayConfig(host="127.0.0.1", port=9, tls="none")),
        Config(mx=MXConfig(nameservers=["127.0.0.1:9"], allow_local=True)),
    ]
    for config in configs:
        async with Deliverer(config, store=MemoryStore(), transport=outbox) as d:
            handle = await d.submit(email())
            with anyio.fail_after(10):
                assert (await handle).is_delivered
    assert len(outbox.messages) == 2
    assert "messages=2" in repr(outbox)


async def test_outbox_message_from_raw_bytes(
    deliverer: Deliverer, outbox: Outbox
) -> None:
    """A raw message keeps its headers: HTML and Cc parsed, a missing Subject is None."""
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\nCc: C <c@example.com>\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>caf\xc3\xa9</p>\r\n"
    )
    handle = await deliverer.submit(
        raw, mail_from="bounce@example.com", rcpt_to=["b@example.com"]
    )
    with anyio.fail_after(10):
        [message] = await outbox.wait_for(1)
        await handle
    assert message.message_id == handle.message_id
    assert message.subject is None
    assert message.cc == ("c@example.com",)
    assert message.html == "<p>café</p>\n"
    assert message.text is None
    assert message.mail_from == "bounce@example.com"


async def test_outbox_connection_protocol(outbox: Outbox) -> None:
    """The Outbox and its connections satisfy the public protocols, and a closed
    connection refuses to send."""
    transport: Transport = outbox
    connection: Connection = await transport.connect("outbox")
    assert isinstance(connection, OutboxConnection)
    assert transport.destination("x@example.org") == "outbox"
    assert transport.fails_over is False
    assert [connection.is_usable, connection.final_dot_unconfirmed] == [True, False]
    data = prepare(email()).data
    [outcome] = await connection.send("a@example.com", ["b@example.org"], data)
    assert outcome.state is DELIVERED
    await connection.aclose()
    assert not connection.is_usable
    with pytest.raises(ProtocolError, match="closed"):
        await connection.send("a@example.com", ["b@example.org"], data)
    other = await transport.connect("outbox")
    other.close_now()
    assert not other.is_usable
    await transport.aclose()
    assert len(outbox.messages) == 1


@pytest.mark.parametrize(
    ("call", "kwargs", "match"),
    [
        ("defer", {"address": "no-at-sign"}, "recipient address"),
        ("defer", {"address": ""}, "recipient address"),
        ("fail", {"address": None}, "recipient address"),
        ("defer", {"address": "a@x.example", "code": 550}, "from 400 to 499"),
        ("defer", {"address": "a@x.example", "code": 421}, "use disconnect"),
        ("fail", {"address": "a@x.example", "code": 451}, "from 500 to 599"),
        ("defer", {"address": "a@x.example", "enhanced_code": "5.1.1"}, "class 4"),
        ("fail", {"address": "a@x.example", "enhanced_code": "4.1.1"}, "class 5"),
        ("fail", {"address": "a@x.example", "enhanced_code": "5.1"}, "RFC 3463"),
        ("disconnect", {"enhanced_code": "5.0.0"}, "class 4"),
        ("defer", {"address": "a@x.example", "text": "two\r\nlines"}, "one line"),
        ("defer", {"address": "a@x.example", "times": 0}, "times >= 1"),
        ("fail", {"address": "a@x.example", "times": -1}, "times >= 1"),
        ("disconnect", {"times": 0}, "times >= 1"),
    ],
)
def test_scripting_bad_arguments(call: str, kwargs: dict[str, Any], match: str) -> None:
    """Every bad scripting argument raises ValueError naming what is wrong; no rule
    is added."""
    for target in (Outbox(), CaptureServer()):
        with pytest.raises(ValueError, match=match):
            getattr(target, call)(**kwargs)
        assert target._script.answer("a@x.example") is None


def test_check_backend() -> None:
    """The async fixtures accept asyncio and refuse other anyio backends clearly."""
    check_backend("asyncio")
    check_backend(("asyncio", {"debug": True}))
    backends: list[object] = ["trio", ("trio", {})]
    for backend in backends:
        with pytest.raises(pytest.UsageError, match=r"asyncio only.*'trio'"):
            check_backend(backend)


def test_deliverer_config_fixture(deliverer_config: Config) -> None:
    """The deliverer fixture's config retries fast and needs no FQDN lookup."""
    assert deliverer_config.retry == FAST_RETRY
    assert deliverer_config.helo_name == "localhost"


class TestOverriddenConfig:
    """A test class (or conftest) overrides deliverer_config to change settings."""

    @pytest.fixture
    def deliverer_config(self) -> Config:
        return Config(retry=attrs.evolve(FAST_RETRY, max_attempts=1))

    async def test_uses_the_override(
        self, deliverer: Deliverer, outbox: Outbox
    ) -> None:
        """With max_attempts=1 a deferral fails at once."""
        outbox.defer("ada@example.org")
        status, seen = await deliver(deliverer, email("ada@example.org"))
        assert deliverer.config.retry.max_attempts == 1
        assert seen == {"ada@example.org": [QUEUED, FAILED]}
        assert status.recipients[0].enhanced_code == "5.4.7"


# A Python that cannot import pytest, as in a project that does not have it.
WITHOUT_PYTEST = """
import sys

class RefusePytest:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"pytest", "_pytest", "pytest_asyncio"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, RefusePytest())
"""


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stderr == ""
    return result.stdout


def test_kit_works_without_pytest() -> None:
    """Without pytest, Outbox, CaptureServer and FAST_RETRY deliver under
    asyncio.run; asking for a fixture raises an ImportError naming the extra."""
    code = WITHOUT_PYTEST + textwrap.dedent(
        """
        import asyncio
        from mailstrom_async import Config, Deliverer, MemoryStore
        from mailstrom_async.testing import FAST_RETRY, CaptureServer, Outbox

        RAW = b"From: a@example.com\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n"

        async def send(deliverer):
            handle = await deliverer.submit(
                RAW, mail_from="a@example.com", rcpt_to=["b@example.org"]
            )
            return await handle

        async def main():
            async with asyncio.timeout(30):
                outbox = Outbox()
                outbox.defer("b@example.org")
                config = Config(helo_name="localhost", retry=FAST_RETRY)
                async with Deliverer(config, store=MemoryStore(), transport=outbox) as d:
                    status = await send(d)
                [recipient] = status.recipients
                print(recipient.state.name, recipient.attempts, outbox.messages[0].subject)
                async with CaptureServer() as server:
                    async with Deliverer(server.relay_config(), store=MemoryStore()) as d:
                        status = await send(d)
                print(status.recipients[0].state.name, server.messages[0].subject)

        asyncio.run(main())
        for name in ("deliverer", "StoreContract"):
            try:
                exec(f"from mailstrom_async.testing import {name}")
            except ImportError as exc:
                print(exc.name, "|", exc)
        print("pytest imported:", "pytest" in sys.modules)
        """
    )
    lines = run_python(code).splitlines()
    assert lines[:2] == ["DELIVERED 2 hi", "DELIVERED hi"]
    for line, name in zip(lines[2:4], ["deliverer", "StoreContract"], strict=True):
        assert line == (
            f"pytest | mailstrom_async.testing.{name} needs pytest, which is not "
            "installed: pip install 'mailstrom-async[testing]' (Outbox, "
            "CaptureServer and FAST_RETRY work without it)"
        )
    assert lines[4:] == ["pytest imported: False"]


def test_importing_the_kit_does_not_import_pytest() -> None:
    """With pytest installed, the kit imports it only when a fixture or
    StoreContract is asked for; then the names are the package's."""
    code = textwrap.dedent(
        """
        import sys
        import mailstrom_async.testing as kit
        from mailstrom_async.testing import FAST_RETRY, CaptureServer, Outbox
        print("pytest" in sys.modules, Outbox.__module__)
        from mailstrom_async.testing import StoreContract, deliverer
        print("pytest" in sys.modules, StoreContract.__module__)
        print(deliverer is kit._plugin.deliverer, kit.deliverer is deliverer)
        try:
            kit.no_such_name
        except AttributeError as exc:
            print(exc)
        """
    )
    assert run_python(code).splitlines() == [
        "False mailstrom_async.testing",
        "True mailstrom_async.testing",
        "True True",
        "module 'mailstrom_async.testing' has no attribute 'no_such_name'",
    ]


# -- CaptureServer over loopback ---------------------------------------------------


async def test_smtp_server_receives_over_loopback(smtp_server: CaptureServer) -> None:
    """A Deliverer relaying to smtp_server delivers over a real SMTP session."""
    config = smtp_server.relay_config()
    assert config.relay is not None
    assert (config.relay.host, config.relay.port) == ("127.0.0.1", smtp_server.port)
    async with Deliverer(config, store=MemoryStore()) as deliverer:
        status, seen = await deliver(deliverer, email("ada@example.org"))
    assert seen == {"ada@example.org": [QUEUED, DELIVERED]}
    [recipient] = status.recipients
    assert (recipient.host, recipient.ip) == ("127.0.0.1", "127.0.0.1")
    [message] = smtp_server.messages
    assert message.message_id == status.message_id
    assert message.subject == "Your order"
    assert message.rcpt_to == ("ada@example.org",)
    assert smtp_server.sessions == 1
    assert f"{smtp_server.port} messages=1" in repr(smtp_server)


async def test_smtp_server_scripted_replies(smtp_server: CaptureServer) -> None:
    """defer, fail and disconnect script the server's RCPT replies, with the same
    outcomes as the Outbox's."""
    smtp_server.defer("later@example.org", text="greylisted")
    smtp_server.fail("gone@example.net")
    async with Deliverer(smtp_server.relay_config(), store=MemoryStore()) as d:
        status, seen = await deliver(
            d, email("now@example.com", "later@example.org", "gone@example.net")
        )
        assert seen == {
            "now@example.com": [QUEUED, DELIVERED],
            "later@example.org": [QUEUED, DEFERRED, DELIVERED],
            "gone@example.net": [QUEUED, FAILED],
        }
        gone = status.recipients[2]
        assert (gone.code, gone.enhanced_code, gone.message) == (
            550,
            "5.1.1",
            "no such user",
        )
        smtp_server.clear()
        smtp_server.disconnect()
        status, seen = await deliver(d, email("ada@example.org", "bob@example.org"))
    assert seen == {
        "ada@example.org": [QUEUED, DEFERRED, DELIVERED],
        "bob@example.org": [QUEUED, DEFERRED, DELIVERED],
    }
    [message] = smtp_server.messages
    assert message.rcpt_to == ("ada@example.org", "bob@example.org")


async def test_smtp_server_wait_for_and_clear(smtp_server: CaptureServer) -> None:
    """wait_for(n) returns once n messages arrived; clear() forgets them."""
    config = smtp_server.relay_config(helo_name="client.test")
    assert config.helo_name == "client.test"
    async with Deliverer(config, store=MemoryStore()) as deliverer:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def submit_two() -> None:
                    await anyio.wait_all_tasks_blocked()
                    await deliverer.submit(email(subject="one"))
                    await deliverer.submit(email(subject="two"))

                tg.start_soon(submit_two)
                received = await smtp_server.wait_for(2)
    assert sorted(m.subject or "" for m in received) == ["one", "two"]
    assert smtp_server.messages == received
    smtp_server.clear()
    assert smtp_server.messages == []
    with pytest.raises(ValueError, match="count >= 1"):
        await smtp_server.wait_for(0)


async def test_capture_server_lifecycle() -> None:
    """relay_config() needs a running server; an unknown Config field is a
    TypeError."""
    server = CaptureServer()
    with pytest.raises(RuntimeError, match="running"):
        server.relay_config()
    async with server:
        assert server.port != 0
        with pytest.raises(TypeError):
            server.relay_config(no_such_field=1)
    with pytest.raises(RuntimeError, match="running"):
        server.relay_config()


def test_plugin_from_a_conftest_that_imports_the_kit(pytester: pytest.Pytester) -> None:
    """A conftest.py that imports from mailstrom_async.testing and names it in
    pytest_plugins works without a warning (run with -W error)."""
    pytester.makeconftest(
        """
        import pytest
        from mailstrom_async.testing import Outbox

        pytest_plugins = ["mailstrom_async.testing"]

        @pytest.fixture
        def anyio_backend():
            return "asyncio"
        """
    )
    pytester.makepyfile(
        """
        import anyio
        import pytest

        @pytest.mark.anyio
        async def test_sends(deliverer, outbox):
            await deliverer.submit(
                b"From: a@example.com\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n",
                mail_from="a@example.com",
                rcpt_to=["b@example.org"],
            )
            with anyio.fail_after(5):
                [message] = await outbox.wait_for(1)
            assert message.subject == "hi"

        def test_fixture_is_an_outbox(outbox):
            from mailstrom_async.testing import Outbox
            assert isinstance(outbox, Outbox)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "-p", "no:cacheprovider", "-W", "error"
    )
    result.assert_outcomes(passed=2)


# -- the kit under each test runner: user projects run by pytester -----------------

# A user's test module: a deferral retried through the deliverer fixture, and a
# delivery to the smtp_server fixture. Each awaits its handle, which hung when the
# fixture's Deliverer ran on another event loop than the test.
USER_TESTS = """
import pytest
from mailstrom_async import Deliverer, MemoryStore, RecipientState

pytestmark = MARK

RAW = b"From: shop@example.com\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n"


async def send(deliverer):
    handle = await deliverer.submit(
        RAW, mail_from="shop@example.com", rcpt_to=["ada@example.org"]
    )
    return await handle


async def test_deliverer_fixture(deliverer, outbox):
    outbox.defer("ada@example.org")
    status = await send(deliverer)
    [recipient] = status.recipients
    assert (recipient.state, recipient.attempts) == (RecipientState.DELIVERED, 2)
    [message] = outbox.messages
    assert message.subject == "hi"


async def test_smtp_server_fixture(smtp_server):
    async with Deliverer(smtp_server.relay_config(), store=MemoryStore()) as d:
        status = await send(d)
    assert status.recipients[0].state is RecipientState.DELIVERED
    [message] = smtp_server.messages
    assert message.subject == "hi"
"""

ANYIO_BACKEND = """

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

# pytest-asyncio's own warning at start-up unless this is set (-W error makes it fatal)
PYTEST_ASYNCIO_INI = "asyncio_default_fixture_loop_scope = function\n"


def run_user_project(
    pytester: pytest.Pytester, ini: str, module: str, *args: str
) -> pytest.RunResult:
    """Run *module* under the plugin in a pytest process of its own, with warnings
    as errors and a per-test timeout, so that a hang fails instead of blocking."""
    pytester.makeini("[pytest]\n" + ini)
    pytester.makeconftest('pytest_plugins = ["mailstrom_async.testing"]\n')
    pytester.makepyfile(test_user=module)
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "error", "--timeout=20", "-v", *args, timeout=50
    )


@pytest.mark.parametrize(
    ("ini", "mark", "args"),
    [
        pytest.param(
            "asyncio_mode = strict\n" + PYTEST_ASYNCIO_INI,
            "pytest.mark.asyncio",
            [],
            id="pytest-asyncio-strict",
        ),
        pytest.param(
            "asyncio_mode = auto\n" + PYTEST_ASYNCIO_INI,
            "[]",
            [],
            id="pytest-asyncio-auto",
        ),
        pytest.param(
            PYTEST_ASYNCIO_INI,
            'pytest.mark.asyncio(loop_scope="module")',
            [],
            id="pytest-asyncio-module-loop",
        ),
        pytest.param(
            "asyncio_mode = auto\nasyncio_default_test_loop_scope = session\n"
            + PYTEST_ASYNCIO_INI,
            "[]",
            [],
            id="pytest-asyncio-session-loop",
        ),
    ],
)
def test_fixtures_under_pytest_asyncio(
    pytester: pytest.Pytester, ini: str, mark: str, args: list[str]
) -> None:
    """Under pytest-asyncio (strict and auto mode, any loop scope) the async
    fixtures run on the test's loop: the handles resolve, teardown is clean, no
    warning, and the tests are not parametrized by anyio's backend."""
    result = run_user_project(pytester, ini, USER_TESTS.replace("MARK", mark), *args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "test_user.py::test_deliverer_fixture PASSED*",
            "test_user.py::test_smtp_server_fixture PASSED*",
        ]
    )


@pytest.mark.parametrize(
    ("ini", "mark", "args"),
    [
        pytest.param(
            PYTEST_ASYNCIO_INI,
            "pytest.mark.anyio",
            [],
            id="anyio-beside-pytest-asyncio",
        ),
        pytest.param(
            "anyio_mode = auto\n" + PYTEST_ASYNCIO_INI,
            "[]",
            [],
            id="anyio-auto-beside-pytest-asyncio",
        ),
        pytest.param("", "pytest.mark.anyio", ["-p", "no:asyncio"], id="anyio"),
        pytest.param(
            "anyio_mode = auto\n", "[]", ["-p", "no:asyncio"], id="anyio-auto"
        ),
    ],
)
def test_fixtures_under_anyio(
    pytester: pytest.Pytester, ini: str, mark: str, args: list[str]
) -> None:
    """Under anyio's plugin (marked or auto mode, with or without pytest-asyncio
    installed beside it) the async fixtures run on anyio's runner, as the test."""
    module = USER_TESTS.replace("MARK", mark) + ANYIO_BACKEND
    result = run_user_project(pytester, ini, module, *args)
    result.assert_outcomes(passed=2)


def test_fixture_outside_an_async_test_is_refused(pytester: pytest.Pytester) -> None:
    """A test that no async plugin runs (a plain def) cannot have a running
    Deliverer: the fixture says which marks or modes would run it."""
    module = """
        def test_sync(deliverer):
            pass

        async def test_unmarked(smtp_server):
            pass
    """
    result = run_user_project(pytester, PYTEST_ASYNCIO_INI, textwrap.dedent(module))
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*UsageError: the 'deliverer' fixture runs on the event loop of an async "
            "test, and 'test_sync' is not run by pytest-asyncio or anyio: mark it "
            "@pytest.mark.asyncio (pytest-asyncio) or @pytest.mark.anyio (anyio), or "
            'set asyncio_mode = "auto" or anyio_mode = "auto" in your pytest '
            "configuration",
            "*UsageError: the 'smtp_server' fixture * 'test_unmarked' is not run by*",
        ]
    )


def test_unittest_isolated_asyncio_test_case_under_pytest(
    pytester: pytest.Pytester,
) -> None:
    """An IsolatedAsyncioTestCase uses Outbox, CaptureServer and FAST_RETRY
    directly, on its own loop, with pytest-asyncio installed beside it."""
    module = """
        import unittest

        from mailstrom_async import Config, Deliverer, MemoryStore, RecipientState
        from mailstrom_async.testing import FAST_RETRY, CaptureServer, Outbox

        RAW = b"From: shop@example.com\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n"


        class TestMail(unittest.IsolatedAsyncioTestCase):
            async def send(self, deliverer):
                handle = await deliverer.submit(
                    RAW, mail_from="shop@example.com", rcpt_to=["ada@example.org"]
                )
                return await handle

            async def test_outbox(self):
                outbox = Outbox()
                outbox.defer("ada@example.org")
                config = Config(helo_name="localhost", retry=FAST_RETRY)
                deliverer = Deliverer(config, store=MemoryStore(), transport=outbox)
                async with deliverer:
                    status = await self.send(deliverer)
                self.assertIs(status.recipients[0].state, RecipientState.DELIVERED)
                self.assertEqual(status.recipients[0].attempts, 2)
                self.assertEqual([m.subject for m in outbox.messages], ["hi"])

            async def test_capture_server(self):
                server = await self.enterAsyncContext(CaptureServer())
                deliverer = Deliverer(server.relay_config(), store=MemoryStore())
                async with deliverer:
                    await self.send(deliverer)
                self.assertEqual([m.subject for m in server.messages], ["hi"])
    """
    result = run_user_project(pytester, PYTEST_ASYNCIO_INI, textwrap.dedent(module))
    result.assert_outcomes(passed=2)
