"""The docs' examples, run: docs/examples against aiosmtpd on loopback, and the
``pycon`` sessions on the pages as doctests.

The pages pull docs/examples in with ``literalinclude``; running them here keeps
the pages honest. Every file there must be listed in ``EXAMPLE_TESTS`` and shown
on a page (both checked below), and every public name must have an entry in the
API reference.
"""

from __future__ import annotations

import doctest
import importlib.util
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import anyio
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import mailstrom_async
from mailstrom_async import (
    Config,
    Deliverer,
    MemoryStore,
    RelayConfig,
    prepare,
)

if TYPE_CHECKING:
    from tests.smtpd import SMTPDServer, SMTPDServers

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = DOCS / "examples"

# The tests of test_docs_frameworks.py that run starlette_app.py and aiohttp_app.py
# (fastapi_app.py shares most of them, with some of its own: its list below).
WEB_APP_TESTS = [
    "test_app_queues_and_reports_delivery",
    "test_app_refuses_a_bad_request",
    "test_app_from_environment_reads_the_toml_file",
    "test_events_stream_each_change_as_it_happens",
    "test_events_of_a_delivered_or_unknown_message",
    "test_server_stops_cleanly_with_an_open_event_stream",
]
# Each example file -> the tests that run it.
EXAMPLE_TESTS = {
    "quickstart.py": ["test_quickstart_delivers_and_prints_the_outcome"],
    "messages.py": [
        "test_messages_builds_the_documented_structure",
        "test_messages_are_all_delivered",
    ],
    "mailstrom.toml": ["test_configuration_loads_the_toml_file"],
    "configuration.py": ["test_configuration_loads_the_toml_file"],
    # The framework examples' tests are in test_docs_frameworks.py.
    "fastapi_app.py": [
        "test_app_queues_and_reports_delivery",
        "test_app_refuses_a_bad_request",
        "test_fastapi_app_from_environment_reads_the_toml_file",
        "test_events_of_a_delivered_or_unknown_message",
        "test_events_stream_each_change_as_it_happens",
        "test_fastapi_events_end_without_done_when_the_deliverer_closes",
        "test_fastapi_events_in_a_submit_only_app_follow_the_store",
        "test_server_stops_cleanly_with_an_open_event_stream",
    ],
    "observability.py": ["test_observability_logs_counts_and_traces"],
    "test_with_outbox.py": ["test_with_outbox_passes_under_the_plugin"],
    "test_transport_outbox.py": ["test_transport_outbox_passes_under_the_plugin"],
    "test_custom_store.py": ["test_custom_store_passes_the_contract"],
    "test_with_pytest_asyncio.py": [
        "test_with_pytest_asyncio_passes_in_strict_and_auto_mode"
    ],
    "pytest_asyncio.toml": ["test_with_pytest_asyncio_passes_in_strict_and_auto_mode"],
    "test_with_unittest.py": [
        "test_with_unittest_passes_without_pytest",
        "test_with_unittest_passes_under_pytest",
    ],
    "starlette_app.py": WEB_APP_TESTS,
    "aiohttp_app.py": WEB_APP_TESTS,
    "script.py": [
        "test_script_delivers_and_prints_each_outcome",
        "test_script_stops_waiting_after_wait_seconds",
        "test_script_reports_bad_input_in_one_line",
    ],
    "worker.py": ["test_worker_delivers_what_a_web_process_queued"],
}


def load_example(filename: str) -> ModuleType:
    """Import docs/examples/<filename> as a module of its own (not a package)."""
    name = f"docs_example_{Path(filename).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the models' annotations here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart() -> ModuleType:
    return load_example("quickstart.py")


@pytest.fixture(scope="module")
def messages_example() -> ModuleType:
    return load_example("messages.py")


@pytest.fixture(scope="module")
def configuration_example() -> ModuleType:
    return load_example("configuration.py")


def relay_config(server: SMTPDServer) -> Config:
    return Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
    )


# -- quickstart.py -----------------------------------------------------------------


async def test_quickstart_delivers_and_prints_the_outcome(
    quickstart: ModuleType,
    smtpd: SMTPDServers,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The quickstart's main() delivers its email and prints "delivered"."""
    server = await smtpd.start()
    with anyio.fail_after(30):
        await quickstart.main("127.0.0.1", server.port, str(tmp_path / "q.db"))
    [received] = server.messages
    assert received.mail_from == "shop@example.com"
    assert received.rcpt_tos == ["ada@example.org"]
    assert b"Subject: Your order has shipped" in received.content
    out = capsys.readouterr().out
    assert "ada@example.org: delivered (250 " in out


# -- configuration.py and mailstrom.toml --------------------------------------------


def test_configuration_loads_the_toml_file(
    configuration_example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented TOML file loads, with the password from the environment."""
    path = str(EXAMPLES / "mailstrom.toml")
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret")
    config = configuration_example.config_or_exit(path)
    assert config.relay == RelayConfig(
        host="smtp.example.com", username="app@example.com", password="s3cret"
    )
    assert config.helo_name == "app.example.com"
    # Every value the file calls a default is one.
    defaults = Config(helo_name="app.example.com", relay=config.relay)
    assert config == defaults

    monkeypatch.delenv("SMTP_PASSWORD")
    with pytest.raises(SystemExit, match=r"bad setting relay\.password"):
        configuration_example.config_or_exit(path)


# -- messages.py -------------------------------------------------------------------


def test_messages_builds_the_documented_structure(messages_example: ModuleType) -> None:
    """The invoice has the MIME structure and envelope that messages.md describes."""
    email = messages_example.invoice_email(b"\x89PNG", b"%PDF-1.7")
    structure = [
        (part.get_content_type(), part.get_content_disposition())
        for part in email.build().walk()
    ]
    assert structure == [
        ("multipart/mixed", None),
        ("multipart/alternative", None),
        ("text/plain", None),
        ("multipart/related", None),
        ("text/html", None),
        ("image/png", "inline"),
        ("application/pdf", "attachment"),
    ]
    prepared = prepare(email)
    assert prepared.mail_from == "shop@example.com"
    assert prepared.rcpt_to == ("ada@example.org", "archive@example.com")
    head = prepared.data.partition(b"\r\n\r\n")[0]
    assert b"\r\nBcc:" not in head
    assert b"\r\nX-Invoice: 2024-0042\r\n" in head

    news = prepare(
        messages_example.newsletter_email("ada@example.org", "https://example.com/u/1")
    )
    head = news.data.partition(b"\r\n\r\n")[0]
    assert b"\r\nList-Unsubscribe: <https://example.com/u/1>\r\n" in head
    assert b"\r\nPrecedence: bulk\r\n" in head

    message = messages_example.standard_library_message()
    assert prepare(message).rcpt_to == ("ada@example.org",)
    assert "Message-ID" not in message  # copied, never changed


async def test_messages_are_all_delivered(
    messages_example: ModuleType, smtpd: SMTPDServers
) -> None:
    """Each of the three forms of message is accepted and delivered."""
    server = await smtpd.start()
    raw = b"From: legacy@example.com\nTo: someone@example.net\nSubject: raw\n\nHi\n"
    async with Deliverer(relay_config(server), store=MemoryStore()) as deliverer:
        handles = [
            await deliverer.submit(messages_example.invoice_email(b"png", b"pdf")),
            await deliverer.submit(
                messages_example.newsletter_email("ada@example.org", "https://x.test/u")
            ),
            await deliverer.submit(messages_example.standard_library_message()),
            await messages_example.forward_raw(deliverer, raw),
        ]
        with anyio.fail_after(30):
            statuses = [await handle for handle in handles]
    assert all(status.is_delivered for status in statuses)
    envelopes = sorted((m.mail_from, tuple(m.rcpt_tos)) for m in server.messages)
    assert envelopes == [
        ("bounces@example.com", ("ada@example.org",)),
        ("news@example.com", ("ada@example.org",)),
        ("shop@example.com", ("ada@example.org",)),
        ("shop@example.com", ("ada@example.org", "archive@example.com")),
    ]


# -- observability.py ----------------------------------------------------------------


@pytest.fixture(scope="module")
def observability_example() -> ModuleType:
    return load_example("observability.py")


async def test_observability_logs_counts_and_traces(
    observability_example: ModuleType,
    smtpd: SMTPDServers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The example logs JSON, prints the statistics and exports one span per attempt."""
    example = observability_example
    server = await smtpd.start()
    stream = io.StringIO()
    logger = logging.getLogger("mailstrom_async")
    level = logger.level
    handler = example.setup_logging(stream)
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    try:
        with anyio.fail_after(30):
            stats = await example.main(
                "127.0.0.1", server.port, example.make_telemetry(exporter, reader)
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (stats.delivered, stats.since_start.attempts) == (2, 2)
    out = capsys.readouterr().out
    assert "store: 0 queued, 0 deferred, 2 delivered, 0 failed" in out
    assert "this process: 2 attempts, 2 delivered, 0 deferred, 0 failed" in out
    assert "relay: 1 workers, 0 jobs waiting" in out
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    outcomes = [r for r in records if r.get("state") == "delivered"]
    assert sorted(r["recipient_domain"] for r in outcomes) == [
        "example.net",
        "example.org",
    ]
    assert all(r["code"] == 250 and r["destination"] == "relay" for r in outcomes)
    spans = exporter.get_finished_spans()
    assert [s.attributes["mailstrom.outcome"] for s in spans] == [  # type: ignore[index]
        "delivered",
        "delivered",
    ]


# -- test_with_outbox.py and test_custom_store.py: users' suites, run by pytest --------


def run_user_suite(pytester: pytest.Pytester, **modules: str) -> pytest.RunResult:
    """Run *modules* (name -> source) as a user's test suite, in a pytest process of
    its own, with the plugin on the command line as the docs say, and without
    pytest-asyncio (tests/test_testing.py runs the kit under it)."""
    pytester.makepyfile(**modules)
    return pytester.runpytest_subprocess(
        "-p",
        "mailstrom_async.testing",
        "-p",
        "no:asyncio",
        "-p",
        "no:cacheprovider",
        "-W",
        "error",
    )


def assert_passes_and_a_wrong_copy_fails(
    pytester: pytest.Pytester, example: str, *, passed: int, failing: str
) -> None:
    """Run docs/examples/<example>.py as a user's suite with a copy expecting the
    wrong subject: the example's *passed* tests pass, and the copy's test
    *failing* fails, showing the captured subject."""
    source = (EXAMPLES / f"{example}.py").read_text()
    wrong = source.replace(
        'message.subject == "Welcome to the shop"', 'message.subject == "Goodbye"', 1
    )
    assert wrong != source
    result = run_user_suite(pytester, **{example: source, "test_wrong": wrong})
    result.assert_outcomes(passed=passed, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: assert 'Welcome to the shop' == 'Goodbye'*",
            f"FAILED test_wrong.py::{failing} - *",
        ]
    )


def test_with_outbox_passes_under_the_plugin(pytester: pytest.Pytester) -> None:
    """The documented user's test module passes with ``-p mailstrom_async.testing``,
    and a copy with a wrong expectation fails, showing the captured subject."""
    assert_passes_and_a_wrong_copy_fails(
        pytester, "test_with_outbox", passed=7, failing="test_welcome_mail_is_sent"
    )


def test_transport_outbox_passes_under_the_plugin(pytester: pytest.Pytester) -> None:
    """The documented tests of an application's own Deliverer, switched to the
    outbox by MAILSTROM_TRANSPORT or by its Config, pass (the second one only
    because the plugin emptied the outbox the first filled); a copy with a wrong
    expectation fails."""
    assert_passes_and_a_wrong_copy_fails(
        pytester,
        "test_transport_outbox",
        passed=3,
        failing="test_sign_up_sends_the_welcome_mail",
    )


def test_with_pytest_asyncio_passes_in_strict_and_auto_mode(
    pytester: pytest.Pytester,
) -> None:
    """The documented pytest-asyncio module passes in strict mode with its marks,
    and in auto mode (the documented pyproject.toml) without them."""
    source = (EXAMPLES / "test_with_pytest_asyncio.py").read_text()
    toml = (EXAMPLES / "pytest_asyncio.toml").read_text()
    unmarked = source.replace("@pytest.mark.asyncio\n", "")
    assert re.search(r"^@pytest\.mark", unmarked, re.MULTILINE) is None
    assert 'asyncio_mode = "auto"\n' in toml
    strict = toml.replace('asyncio_mode = "auto"\n', "")
    runs = {"strict": (strict, source), "auto": (toml, unmarked)}
    for mode, (pyproject, module) in runs.items():
        project = pytester.mkdir(mode)
        (project / "pyproject.toml").write_text(pyproject)
        (project / "test_with_pytest_asyncio.py").write_text(module)
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "--timeout=20",
            "--rootdir",
            str(project),
            "-c",
            str(project / "pyproject.toml"),
            str(project),
            timeout=50,
        )
        result.assert_outcomes(passed=3)
        result.stdout.fnmatch_lines([f"asyncio: mode=Mode.{mode.upper()},*"])


def test_with_unittest_passes_without_pytest() -> None:
    """The documented unittest module passes under ``python -m unittest`` in a
    Python that cannot import pytest."""
    from tests.test_testing import WITHOUT_PYTEST

    code = WITHOUT_PYTEST + (
        "import unittest\n"
        f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
        "unittest.main(module=None, argv=['unittest', '-v', 'test_with_unittest'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Ran 3 tests" in result.stderr
    assert result.stderr.rstrip().endswith("OK")


def test_with_unittest_passes_under_pytest(pytester: pytest.Pytester) -> None:
    """pytest collects and passes the same unittest module."""
    source = (EXAMPLES / "test_with_unittest.py").read_text()
    result = run_user_suite(pytester, test_with_unittest=source)
    result.assert_outcomes(passed=3)


def test_custom_store_passes_the_contract(pytester: pytest.Pytester) -> None:
    """The documented custom store passes every contract test; a broken copy that
    forgets due times fails, with the values compared shown."""
    from mailstrom_async.testing import StoreContract

    contract = [name for name in dir(StoreContract) if name.startswith("test_")]
    source = (EXAMPLES / "test_custom_store.py").read_text()
    broken = source.replace(
        '''    """Your store here; this one only renames the in-memory store."""''',
        """    async def next_due_at(self) -> None:
        return None""",
    )
    assert broken != source
    result = run_user_suite(pytester, test_custom_store=source, test_broken=broken)
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 1
    assert outcomes["passed"] + outcomes["failed"] == 2 * len(contract)
    assert "FAILED test_custom_store.py" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*assert None == datetime.datetime(*",
            "FAILED test_broken.py::TestMyStore::test_next_due_at - *",
        ]
    )


# -- the docs themselves -----------------------------------------------------------


def test_every_example_is_run_by_a_test() -> None:
    """Each file in docs/examples is listed in EXAMPLE_TESTS, with tests that exist."""
    from tests import test_docs_frameworks

    found = sorted(p.name for p in EXAMPLES.iterdir() if p.is_file())
    assert found == sorted(EXAMPLE_TESTS)
    defined = {**globals(), **vars(test_docs_frameworks)}
    for tests in EXAMPLE_TESTS.values():
        for test in tests:
            assert callable(defined.get(test)), test


def test_every_example_is_shown_in_the_docs() -> None:
    """Each example is pulled into a page with literalinclude, and nothing else is."""
    included = set()
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"```\{literalinclude\}\s+(\S+)", page.read_text()):
            included.add((DOCS / target).resolve())
    assert included == {p.resolve() for p in EXAMPLES.iterdir() if p.is_file()}


def test_interactive_examples_in_the_pages_run() -> None:
    """Every ```pycon block in the pages gives the output it shows (doctest)."""
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    blocks = 0
    for page in sorted(DOCS.glob("*.md")):
        for block in re.findall(
            r"^```pycon\n(.*?)^```$", page.read_text(), re.M | re.S
        ):
            blocks += 1
            globs = {
                name: getattr(mailstrom_async, name) for name in mailstrom_async.__all__
            }
            test = parser.get_doctest(block, globs, page.name, str(page), 0)
            runner.run(test)
    assert blocks > 0
    assert runner.summarize(verbose=False).failed == 0


def test_every_public_name_is_in_the_reference() -> None:
    """Every name in mailstrom_async.__all__ has an autodoc entry in api or exceptions."""
    text = (DOCS / "api.md").read_text() + (DOCS / "exceptions.md").read_text()
    directive = r"^\.\. auto(?:class|function|data|exception):: mailstrom_async\.(\w+)"
    documented = set(re.findall(directive + r"(?![.\w])", text, re.M))
    assert documented == set(mailstrom_async.__all__)


def test_testing_kit_is_documented() -> None:
    """Every name in mailstrom_async.testing.__all__ has an autodoc entry in the API
    reference, or (a fixture) a definition on the testing page."""
    import mailstrom_async.testing

    fixtures = {"outbox", "deliverer", "deliverer_config", "smtp_server"}
    text = (DOCS / "api.md").read_text()
    directive = r"^\.\. auto(?:class|data|function):: mailstrom_async\.testing\.(\w+)"
    documented = set(re.findall(directive, text, re.M))
    assert documented == set(mailstrom_async.testing.__all__) - fixtures
    page = (DOCS / "testing.md").read_text()
    defined = set(re.findall(r"^`(\w+)`(?: \(async\))?$", page, re.M))
    assert defined == fixtures
