"""mailstrom-async show, queue (the mailq-like listing) and queue --shape.

Stores are filled by real deliveries to aiosmtpd on loopback (a recipient
deferred by the server's reply) or by a submit-only Deliverer; ages come from
the Deliverer's injected clock, never from waiting. The command runs through
main(): in a worker thread when the test's own loop serves SMTP (main() runs its
own event loop), else directly.
"""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from mailstrom_async import (
    Attachment,
    Config,
    NewMessage,
    RecipientState,
    RelayConfig,
    RetryPolicy,
    SQLiteStore,
    Timeouts,
)
from mailstrom_async._deliverer import Deliverer
from mailstrom_async._message import Email
from tests.cli_support import StoreCLI, clean_env  # noqa: F401 - fixture
from tests.smtpd import FaultHandler, SMTPDServers

DEFERRED = RecipientState.DEFERRED
TIMEOUTS = Timeouts(connect=5, command=5, data_start=5, data_end=5)
# A deferred recipient is not tried again during the test.
SLOW_RETRY = RetryPolicy(initial_delay=3600, max_delay=3600, jitter=0)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> StoreCLI:
    return StoreCLI(capsys, tmp_path / "q.sqlite3")


def report() -> Email:
    return Email(
        sender="Me <me@example.com>",
        to=["ok@example.org", "busy@example.net"],
        subject="Café report \N{EURO SIGN}",
        text="Hello, café.\n",
        html="<p>Hello, café.</p>\n",
        attachments=[
            Attachment(filename="report.pdf", content=b"%PDF-1.4 " + bytes(range(256)))
        ],
        headers={"X-Campaign": "spring"},
    )


async def deliver_and_defer(smtpd: SMTPDServers, store: Path) -> str:
    """Deliver report() through aiosmtpd: ok@ is delivered, busy@ deferred with
    the server's 451 reply; return the message id."""
    handler = FaultHandler(rcpt_replies={"busy@example.net": "451 4.2.1 mailbox busy"})
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        timeouts=TIMEOUTS,
        retry=SLOW_RETRY,
    )
    async with Deliverer(config, store=SQLiteStore(store)) as d:
        stream = d.events()
        handle = await d.submit(report())
        outcomes: dict[str, RecipientState] = {}
        with anyio.fail_after(10):
            async for event in stream:
                r = event.recipient
                if event.message_id == handle.message_id and r.attempts:
                    outcomes[r.address] = r.state
                if len(outcomes) == 2:
                    break
    assert outcomes == {
        "ok@example.org": RecipientState.DELIVERED,
        "busy@example.net": DEFERRED,
    }
    return handle.message_id


async def submit_at(store: Path, when: datetime, *emails: Email) -> list[str]:
    """Store *emails* with a submit-only Deliverer whose clock says *when*."""
    async with Deliverer(
        Config(), store=SQLiteStore(store), mode="submit", clock=lambda: when
    ) as d:
        return [(await d.submit(e)).message_id for e in emails]


def to(*addresses: str, size: int = 0) -> Email:
    return Email(
        sender="app@example.com",
        to=list(addresses),
        subject="x",
        text="y" * size or "hi\n",
    )


# -- show ---------------------------------------------------------------------------


async def test_show_envelope_headers_and_body(
    smtpd: SMTPDServers, cli: StoreCLI
) -> None:
    """show ID prints the envelope (each recipient with its state and the
    server's last reply) and the header section, RFC 2047 words decoded; --body
    adds the text parts, decoded, and lists the attachment; the id may come with
    its <>."""
    message_id = await deliver_and_defer(smtpd, cli.store)
    out = await cli.in_thread("show", f"<{message_id}>")
    envelope, _, headers = out.partition("\n\n")
    lines = envelope.splitlines()
    assert lines[0] == f"message    {message_id}"
    assert lines[1] == "from       me@example.com"
    assert lines[2].startswith("submitted  20")
    assert lines[3].startswith("size       ")
    assert lines[4].split() == [
        "rcpt",
        "ok@example.org",
        "delivered",
        "250",
        "2.0.0",
        "OK",
    ]
    assert lines[5].split() == [
        "busy@example.net",
        "deferred",
        "451",
        "4.2.1",
        "mailbox",
        "busy",
    ]
    fields = headers.splitlines()
    assert "Subject: Café report €" in fields
    assert "From: Me <me@example.com>" in fields
    assert "X-Campaign: spring" in fields
    assert f"Message-ID: <{message_id}>" in fields
    assert "=?utf-8?" not in headers
    assert "Hello" not in out  # the body only with --body

    out = await cli.in_thread("show", "--body", message_id)
    assert out.startswith(envelope + "\n\n" + headers.rstrip("\n") + "\n\n")
    body = out[len(envelope + "\n\n" + headers.rstrip("\n") + "\n\n") :]
    assert body == (
        "[part 1: text/plain; utf-8]\n"
        "Hello, café.\n"
        "\n"
        "[part 2: text/html; utf-8]\n"
        "<p>Hello, café.</p>\n"
        "\n"
        "[attachment 3: report.pdf, application/pdf, 265 bytes]\n"
    )


async def test_show_raw_is_the_exact_bytes(smtpd: SMTPDServers, cli: StoreCLI) -> None:
    """show --raw --body prints the stored message byte for byte (what the server
    received), --raw alone its header section; nothing is decoded or added."""
    handler = FaultHandler()
    server = await smtpd.start(handler)
    config = Config(
        helo_name="client.test",
        relay=RelayConfig(host=server.host, port=server.port, tls="none"),
        timeouts=TIMEOUTS,
    )
    async with Deliverer(config, store=SQLiteStore(cli.store)) as d:
        status = await (await d.submit(report()))
    assert status.is_done
    [received] = handler.messages
    command = [sys.executable, "-m", "mailstrom_async"]
    whole = await anyio.run_process(
        [
            *command,
            "show",
            "--raw",
            "--body",
            status.message_id,
            "--store",
            str(cli.store),
        ]
    )
    assert whole.stdout == received.content
    assert b"=?utf-8?b?Q2Fmw6kgcmVwb3J0IOKCrA==?=" in whole.stdout
    head = await anyio.run_process(
        [*command, "show", "--raw", status.message_id, "--store", str(cli.store)]
    )
    assert head.stdout == received.content.partition(b"\r\n\r\n")[0] + b"\r\n"
    data = await anyio.to_thread.run_sync(
        lambda: cli.json("show", "--raw", "--body", status.message_id)
    )
    assert isinstance(data, dict)
    assert base64.b64decode(data["raw"]) == received.content
    assert "body" not in data
    assert ["Subject", "=?utf-8?b?Q2Fmw6kgcmVwb3J0IOKCrA==?="] in data["headers"]


async def test_show_json(smtpd: SMTPDServers, cli: StoreCLI) -> None:
    """show --json: the envelope as status --json has it, the size, the headers
    as [name, value] pairs in order, and the body parts only with --body."""
    message_id = await deliver_and_defer(smtpd, cli.store)
    data = await anyio.to_thread.run_sync(lambda: cli.json("show", message_id))
    assert isinstance(data, dict)
    assert data["message_id"] == message_id
    assert data["mail_from"] == "me@example.com"
    assert [(r["address"], r["state"], r["code"]) for r in data["recipients"]] == [
        ("ok@example.org", "delivered", 250),
        ("busy@example.net", "deferred", 451),
    ]
    assert data["recipients"][1]["enhanced_code"] == "4.2.1"
    assert [name for name, _ in data["headers"]][:4] == [
        "From",
        "To",
        "Subject",
        "X-Campaign",
    ]
    assert ["Subject", "Café report €"] in data["headers"]
    assert "body" not in data
    assert "raw" not in data
    data = await anyio.to_thread.run_sync(
        lambda: cli.json("show", "--body", message_id)
    )
    assert isinstance(data, dict)
    assert data["body"]["parts"] == [
        {
            "type": "text/plain",
            "filename": None,
            "size": len("Hello, café.\r\n".encode()),
            "charset": "utf-8",
            "text": "Hello, café.\n",
            "attachment": False,
        },
        {
            "type": "text/html",
            "filename": None,
            "size": len("<p>Hello, café.</p>\r\n".encode()),
            "charset": "utf-8",
            "text": "<p>Hello, café.</p>\n",
            "attachment": False,
        },
        {
            "type": "application/pdf",
            "filename": "report.pdf",
            "size": 265,
            "attachment": True,
        },
    ]


HOSTILE = (
    b"From: =?iso-8859-1?q?J=F6rg?= <j@example.org>\r\n"
    b"To: you@example.org\r\n"
    b"Subject: \x1b[31mred\x1b[0m and caf\xc3\xa9\r\n"
    b"X-Unknown-Charset: =?x-no-such?q?abc?=\r\n"
    b"X-Latin1: \xe4\r\n"
    b"X-Folded: one\r\n two\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=FC=DFe \x1b]0;title\x07\r\n"
)


def store_raw(path: Path, data: bytes, message_id: str = "hostile@example.org") -> str:
    """Store *data* exactly as given (as a store handed mail by another program
    might hold it): the command must show whatever a store holds."""

    async def add() -> None:
        async with SQLiteStore(path) as store:
            await store.add(
                NewMessage(
                    message_id=message_id,
                    mail_from="",
                    recipients=("you@example.org",),
                    data=data,
                    submitted_at=datetime.now(UTC),
                )
            )

    anyio.run(add)
    return message_id


def test_show_makes_hostile_text_safe_for_a_terminal(cli: StoreCLI) -> None:
    """Control characters (an escape sequence in a Subject or a body) are shown
    as \\xNN, not sent to the terminal; Latin-1 words and bodies are decoded;
    an unknown charset or an 8-bit byte that is not UTF-8 does not stop the
    command; folded headers are unfolded; a null sender shows as <>."""
    message_id = store_raw(cli.store, HOSTILE)
    out = cli.ok("show", "--body", message_id)
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "from       <>" in out.splitlines()
    fields = out.split("\n\n")[1].splitlines()
    assert fields == [
        "From: Jörg <j@example.org>",
        "To: you@example.org",
        "Subject: \\x1b[31mred\\x1b[0m and café",
        "X-Unknown-Charset: abc",
        "X-Latin1: \N{REPLACEMENT CHARACTER}",
        "X-Folded: one two",
        "Content-Type: text/plain; charset=iso-8859-1",
        "Content-Transfer-Encoding: quoted-printable",
    ]
    assert out.endswith("\n\nGrüße \\x1b]0;title\\x07\n")
    raw = cli.json("show", "--raw", message_id)
    assert isinstance(raw, dict)
    # JSON escapes control characters itself: the values are the text as stored.
    assert ["Subject", "\x1b[31mred\x1b[0m and café"] in raw["headers"]
    assert ["X-Latin1", "\\xe4"] in raw["headers"]
    assert ["X-Folded", "one\r\n two"] in raw["headers"]
    decoded = cli.json("show", "--body", message_id)
    assert isinstance(decoded, dict)
    assert ["Subject", "\x1b[31mred\x1b[0m and café"] in decoded["headers"]
    assert decoded["body"]["parts"][0]["text"] == "Grüße \x1b]0;title\x07\n"


def test_show_a_message_without_body_or_headers(cli: StoreCLI) -> None:
    """A header section without a body, and a body without headers, are shown
    as they are."""
    only_head = store_raw(cli.store, b"Subject: only\r\n", "head@example.org")
    out = cli.ok("show", "--body", only_head)
    assert out.endswith("\n\nSubject: only\n\n\n")
    only_body = store_raw(cli.store, b"\r\njust a body\r\n", "body@example.org")
    out = cli.ok("show", "--body", only_body)
    assert out.endswith("rcpt       you@example.org  queued\n\n\njust a body\n")
    assert cli.json("show", "--raw", "--body", only_body)["raw"] == (  # type: ignore[index]
        base64.b64encode(b"\r\njust a body\r\n").decode()
    )


def test_show_bad_input(cli: StoreCLI, tmp_path: Path) -> None:
    """An unknown id is an error (exit code 1), as text or as JSON; a missing
    id, a bad id or an unknown flag is a usage error (exit code 2); no store
    is no store."""
    store_raw(cli.store, b"Subject: x\r\n\r\ny\r\n")
    code, out, err = cli("show", "<nope@example.org>")
    assert (code, out) == (1, "")
    assert (
        err
        == "mailstrom-async: error: no message with id 'nope@example.org' in the store\n"
    )
    code, out, err = cli("show", "--json", "nope@example.org")
    assert (code, out) == (1, "")
    assert json.loads(err) == {
        "error": "no message with id 'nope@example.org' in the store",
        "exit_code": 1,
    }
    code, _, err = cli("show")
    assert code == 2
    assert "the following arguments are required: ID" in err
    code, _, err = cli("show", "a b@example.org")
    assert code == 2
    assert "argument ID: not a message id: 'a b@example.org'" in err
    code, _, err = cli("show", "--headers", "x@example.org")
    assert code == 2
    assert "unrecognized arguments: --headers" in err
    cli.store = tmp_path / "missing.sqlite3"
    code, _, err = cli("show", "x@example.org")
    assert code == 1
    assert "no store at" in err


# -- queue (the listing) --------------------------------------------------------------


async def test_queue_lists_waiting_recipients_with_the_last_reply(
    smtpd: SMTPDServers, cli: StoreCLI
) -> None:
    """queue lists each message with waiting recipients (id, size, arrival,
    sender) and under it each waiting recipient with its state, attempts and
    the server's last reply; a delivered recipient is not listed; a totals line
    ends it. --json has the same, with the totals."""
    message_id = await deliver_and_defer(smtpd, cli.store)
    async with SQLiteStore(cli.store) as store:
        size = len(await store.message_data(message_id))
    out = await cli.in_thread("queue")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "SIZE", "ARRIVED", "SENDER"]
    fields = lines[1].split()
    assert fields[:2] == [message_id, str(size)]
    assert fields[-1] == "me@example.com"
    assert lines[2] == "    busy@example.net  deferred  1 try  451 4.2.1 mailbox busy"
    assert lines[3] == ""
    assert lines[4] == (
        f"-- {-(-size // 1024)} Kbytes in 1 message; 1 recipient: 0 queued, 1 deferred"
    )
    assert len(lines) == 5
    assert "ok@example.org" not in out

    data = await anyio.to_thread.run_sync(lambda: cli.json("queue"))
    assert isinstance(data, dict)
    [entry] = data["messages"]
    assert entry["message_id"] == message_id
    assert entry["size"] == size
    assert entry["mail_from"] == "me@example.com"
    [busy] = entry["recipients"]
    assert (busy["address"], busy["state"], busy["attempts"]) == (
        "busy@example.net",
        "deferred",
        1,
    )
    assert (busy["code"], busy["enhanced_code"], busy["message"]) == (
        451,
        "4.2.1",
        "mailbox busy",
    )
    assert data["totals"] == {
        "messages": 1,
        "bytes": size,
        "recipients": 1,
        "by_state": {"queued": 0, "deferred": 1},
        "held": 0,
    }


def test_queue_listing_filters_and_totals(cli: StoreCLI) -> None:
    """--domain, --state, --held and --limit choose what is listed, and the
    totals count what is listed; an empty queue and an empty choice say so."""
    now = datetime.now(UTC)
    first, second, third = anyio.run(
        submit_at,
        cli.store,
        now,
        to("a@example.org", "b@other.example", size=3000),
        to("c@example.org"),
        to("d@third.example"),
    )
    assert cli.ok("hold", "--domain", "other.example") == (
        "held 1 recipient(s) of domain other.example\n"
    )
    out = cli.ok("queue")
    assert [line.split()[0] for line in out.splitlines() if line[:1] not in " -"] == [
        "ID",
        first,
        second,
        third,
    ]
    assert "    b@other.example  queued (held)" in out.splitlines()
    assert out.splitlines()[-1].startswith("-- ")
    assert out.splitlines()[-1].endswith(
        " Kbytes in 3 messages; 4 recipients: 4 queued, 0 deferred (1 held)"
    )

    def listed(*args: str) -> list[tuple[str, list[str]]]:
        data = cli.json("queue", *args)
        assert isinstance(data, dict)
        return [
            (m["message_id"], [r["address"] for r in m["recipients"]])
            for m in data["messages"]
        ]

    assert listed("--domain", "EXAMPLE.org") == [
        (first, ["a@example.org"]),
        (second, ["c@example.org"]),
    ]
    assert listed("--held") == [(first, ["b@other.example"])]
    assert listed("--limit", "2") == [
        (first, ["a@example.org", "b@other.example"]),
        (second, ["c@example.org"]),
    ]
    assert cli.ok("cancel", third) == f"cancelled 1 recipient(s) of {third}\n"
    assert listed("--state", "failed") == [(third, ["d@third.example"])]
    data = cli.json("queue", "--state", "failed", "--state", "queued")
    assert isinstance(data, dict)
    assert data["totals"]["by_state"] == {"queued": 3, "failed": 1}
    assert cli.ok("queue", "--domain", "nowhere.example") == "no message matches\n"
    data = cli.json("queue", "--domain", "nowhere.example")
    assert data == {
        "messages": [],
        "totals": {
            "messages": 0,
            "bytes": 0,
            "recipients": 0,
            "by_state": {"queued": 0, "deferred": 0},
            "held": 0,
        },
    }
    for message_id in (first, second):
        cli.ok("cancel", message_id)
    assert cli.ok("queue") == "the queue is empty\n"


# -- queue --shape ----------------------------------------------------------------------


def test_queue_shape_counts_by_domain_and_age(cli: StoreCLI) -> None:
    """queue --shape counts waiting recipients by domain and by the age of their
    message in qshape's buckets (minutes), a TOTAL row first and the busiest
    domains next; --state, --held and --limit choose; --json for scripts. Ages
    come from the submitting Deliverer's clock, not from waiting."""
    now = datetime.now(UTC)
    ages = {  # minutes; none near a bucket's edge
        1: [to("a@example.org", "b@example.org"), to("c@other.example")],
        7: [to("d@example.org")],
        30: [to("e@other.example")],
        200: [to("f@example.org")],
        3000: [to("g@example.org", "h@third.example")],
    }
    for minutes, emails in ages.items():
        anyio.run(submit_at, cli.store, now - timedelta(minutes=minutes), *emails)
    out = cli.ok("queue", "--shape")
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"],
        ["TOTAL", "8", "3", "1", "0", "1", "0", "0", "1", "0", "0", "2"],
        ["example.org", "5", "2", "1", "0", "0", "0", "0", "1", "0", "0", "1"],
        ["other.example", "2", "1", "0", "0", "1", "0", "0", "0", "0", "0", "0"],
        ["third.example", "1", "0", "0", "0", "0", "0", "0", "0", "0", "0", "1"],
    ]
    # Numbers are right-aligned under their bucket, as qshape prints them.
    header, total = out.splitlines()[:2]
    assert len(header) == len(total)
    assert header.endswith("1280+")
    assert total.endswith("    2")

    assert cli.ok("hold", "--domain", "other.example").startswith("held 2")
    held = [
        line.split()[:2] for line in cli.ok("queue", "--shape", "--held").splitlines()
    ]
    assert held[1:] == [["TOTAL", "2"], ["other.example", "2"]]
    top = [
        line.split()[0]
        for line in cli.ok("queue", "--shape", "--limit", "1").splitlines()
    ]
    assert top == ["T", "TOTAL", "example.org"]
    deferred = cli.ok("queue", "--shape", "--state", "deferred").splitlines()
    assert deferred[1].split() == ["TOTAL", *["0"] * 11]
    assert len(deferred) == 2

    data = cli.json("queue", "--shape", "--domain", "THIRD.example")
    assert data == {
        "bucket_minutes": [5, 10, 20, 40, 80, 160, 320, 640, 1280],
        "total": {"total": 1, "buckets": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]},
        "domains": [
            {
                "domain": "third.example",
                "total": 1,
                "buckets": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            }
        ],
    }


def test_queue_shape_of_an_empty_queue(cli: StoreCLI) -> None:
    """The shape of a queue with nothing waiting is a TOTAL row of zeros."""
    store_raw(cli.store, b"Subject: x\r\n\r\ny\r\n")
    cli.ok("cancel", "hostile@example.org")
    assert [line.split() for line in cli.ok("queue", "--shape").splitlines()][1] == [
        "TOTAL",
        *["0"] * 11,
    ]


async def test_queue_shape_counts_the_deferred_recipient(
    smtpd: SMTPDServers, cli: StoreCLI
) -> None:
    """The recipient the server deferred is the one --shape --state deferred
    counts, in the youngest bucket."""
    await deliver_and_defer(smtpd, cli.store)
    data = await anyio.to_thread.run_sync(
        lambda: cli.json("queue", "--shape", "--state", "deferred")
    )
    assert isinstance(data, dict)
    assert data["domains"] == [
        {"domain": "example.net", "total": 1, "buckets": [1, *[0] * 9]}
    ]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (
            ["--shape", "--summary"],
            "argument --summary: not allowed with argument --shape",
        ),
        (["--summary", "--domain", "x.org"], "do not go with --summary"),
        (["--shape", "--state", "lost"], "invalid choice: 'lost'"),
        (["--shape", "--limit", "-3"], "at least 1, not '-3'"),
        (["--shape", "5"], "unrecognized arguments: 5"),
    ],
)
def test_queue_bad_flags(cli: StoreCLI, args: list[str], text: str) -> None:
    """Bad queue flags are one usage line, exit code 2, as text or as JSON."""
    store_raw(cli.store, b"Subject: x\r\n\r\ny\r\n")
    code, out, err = cli("queue", *args)
    assert (code, out) == (2, "")
    assert err.startswith("mailstrom-async: error: ")
    assert text in err
    code, out, err = cli("queue", *args, "--json")
    assert (code, out) == (2, "")
    assert text in json.loads(err)["error"]
