"""The fast path of prepare() (mailstrom_async._fastrender): the same bytes as
the stdlib path, the same errors, and the stdlib path for everything else."""

from __future__ import annotations

import random
import re
from email.message import EmailMessage
from email.policy import SMTP, EmailPolicy

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from mailstrom_async._config import Config, Limits
from mailstrom_async._exceptions import InvalidMessageError
from mailstrom_async._fastrender import _boundary, message_id_line, render_email
from mailstrom_async._headers import RENDER_SMTP, RENDER_SMTPUTF8, one_line
from mailstrom_async._message import Attachment, Email, PreparedMessage, _prepare
from tests import strategies

_DATE = re.compile(rb"\r\nDate: ([^\r\n]*)\r\n")
_MESSAGE_ID = re.compile(rb"\r\nMessage-ID:(?: |\r\n )<[^>]*>\r\n")
_BOUNDARY = re.compile(rb'boundary="(={15}\d+==)"')


def both(email: Email, **kwargs: object) -> tuple[PreparedMessage, PreparedMessage]:
    """prepare() of *email* on the fast path (when it takes it) and off it."""
    args = (kwargs.get("mail_from"), kwargs.get("rcpt_to"), kwargs.get("config"))
    fast = _prepare(email, *args, fast=True)  # type: ignore[arg-type]
    slow = _prepare(email, *args, fast=False)  # type: ignore[arg-type]
    return fast, slow


def pinned(fast: PreparedMessage, slow: PreparedMessage) -> bytes:
    """*fast*'s bytes with the stdlib path's Message-ID, Date and boundary.

    The three are drawn afresh by each path (a random token, the clock); each is
    written in one fixed shape, so swapping the values in changes nothing else.
    """
    data = fast.data.replace(fast.message_id.encode(), slow.message_id.encode())
    # Two ids may differ in length, and so in folding (tested on its own below).
    ours, theirs = _MESSAGE_ID.search(data), _MESSAGE_ID.search(slow.data)
    assert ours is not None
    assert theirs is not None
    data = data.replace(ours.group(0), theirs.group(0), 1)
    ours, theirs = _DATE.search(data), _DATE.search(slow.data)
    assert ours is not None
    assert theirs is not None
    data = data.replace(ours.group(0), theirs.group(0), 1)
    ours, theirs = _BOUNDARY.search(data), _BOUNDARY.search(slow.data)
    assert (ours is None) == (theirs is None)
    if ours is not None and theirs is not None:
        data = data.replace(ours.group(1), theirs.group(1))
    return data


def _outcome(email: Email, args: tuple[object, ...], *, fast: bool) -> object:
    try:
        return _prepare(email, *args, fast=fast)  # type: ignore[arg-type]
    except InvalidMessageError as exc:
        return exc


def assert_same(email: Email, **kwargs: object) -> None:
    """Same bytes and envelope on both paths, or the same error."""
    args = (kwargs.get("mail_from"), kwargs.get("rcpt_to"), kwargs.get("config"))
    fast = _outcome(email, args, fast=True)
    slow = _outcome(email, args, fast=False)
    if not isinstance(slow, PreparedMessage):
        assert type(fast) is type(slow)
        assert str(fast) == str(slow)
        return
    assert isinstance(fast, PreparedMessage)
    assert pinned(fast, slow) == slow.data
    assert (fast.mail_from, fast.rcpt_to, fast.smtputf8) == (
        slow.mail_from,
        slow.rcpt_to,
        slow.smtputf8,
    )


# Header text: words of ASCII, Latin, CJK or emoji, with runs of spaces and tabs
# (leading, trailing, several), long enough to need folding, and long words.
_word_chars = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    st.characters(categories=["L", "N", "P", "S"], exclude_characters="\x7f"),
    st.sampled_from("éüßÆ中文😀"),
)
_words = st.one_of(
    st.text(_word_chars, min_size=1, max_size=12),
    st.text(st.sampled_from("abcxyz"), min_size=60, max_size=90),
)
_blanks = st.sampled_from([" ", " ", " ", "  ", "\t", " \t "])


@st.composite
def header_values(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.tuples(_blanks, _words), max_size=25))
    text = "".join(blank + word for blank, word in pieces)
    return text.removeprefix(" ") if draw(st.booleans()) else text


_display_names = strategies.display_names()
_ATOMS = re.compile(r'[^\s()<>@,:;."\[\]\\]+(?: [^\s()<>@,:;."\[\]\\]+)*')


@st.composite
def mailboxes(draw: st.DrawFn) -> str:
    """A mailbox as an application writes one: raw (not encoded) display names."""
    address = draw(
        st.one_of(
            strategies.addresses(),
            st.sampled_from(["x@exämple.de", "y@bücher.example", "z@例え.テスト"]),
        )
    )
    name = draw(st.one_of(st.just(""), _display_names))
    if not name:
        return address
    if draw(st.booleans()) and _ATOMS.fullmatch(name):
        return f"{name} <{address}>"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


_mailboxes = st.lists(mailboxes(), max_size=4)
_bodies = st.one_of(
    st.none(),
    st.just(""),
    st.text(st.sampled_from("ab \n"), max_size=200),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=400),
    st.lists(st.text(st.sampled_from("xyz é"), max_size=120), max_size=30).map(
        "\r\n".join
    ),
)
_names = st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True)


@st.composite
def simple_emails(draw: st.DrawFn) -> Email:
    to = draw(_mailboxes)
    return Email(
        sender=draw(mailboxes()),
        to=to,
        cc=draw(_mailboxes),
        bcc=draw(_mailboxes if to else _mailboxes.filter(bool)),
        reply_to=draw(_mailboxes),
        subject=draw(header_values()),
        text=draw(_bodies),
        html=draw(_bodies),
        headers=draw(st.dictionaries(_names, header_values(), max_size=3)),
        list_unsubscribe=draw(
            st.one_of(st.none(), st.just("https://example.com/u?id=1"))
        ),
        precedence=draw(st.one_of(st.none(), st.just("bulk"))),
    )


# Renders each example twice through the stdlib: 200 examples (the CI profile)
# take 16 s on a busy 2-core machine, more than the suite's hang guard allows.
@pytest.mark.timeout(300)
@given(simple_emails())
def test_fast_path_writes_the_stdlib_bytes(email: Email) -> None:
    """Over generated messages, the fast path writes what the stdlib path writes."""
    event("fast path" if render_email(email) is not None else "stdlib path")
    assert_same(email)


@given(simple_emails(), st.sampled_from([None, "", "bounce@example.net"]))
def test_fast_path_envelope_overrides(email: Email, mail_from: str | None) -> None:
    """mail_from and rcpt_to overrides come out as on the stdlib path."""
    assert_same(email, mail_from=mail_from, rcpt_to=["r@example.org"])


TYPICAL = [
    Email(sender="a@example.com", to="b@example.org", subject="Hi", text="Hello\n"),
    Email(
        sender="Zoë Äpfel <zoe@example.com>",
        to=["Bob <bob@example.org>", "carol@bücher.example"],
        cc="dave@example.net",
        bcc="eve@example.net",
        reply_to="help@example.com",
        subject="Grüße aus Köln: your order " + "has shipped " * 6,
        text="Grüße,\n" + "a line that is long " * 10 + "\n",
        html="<p>Grüße</p>\n",
        headers={"X-Campaign": "spring", "X-Long": "word " * 30},
        list_unsubscribe="mailto:u@example.com",
        precedence="bulk",
    ),
    Email(sender="a@example.com", to="b@example.org", html="<b>only html</b>"),
    Email(sender="a@example.com", bcc="b@example.org"),
]


@pytest.mark.parametrize("email", TYPICAL)
def test_typical_messages_take_the_fast_path(email: Email) -> None:
    assert render_email(email) is not None
    assert_same(email)


@pytest.mark.parametrize(
    "email",
    [
        Email(
            sender="a@example.com",
            to="b@example.org",
            attachments=[("a.txt", b"x")],
        ),
        Email(sender="a@example.com", to="b@example.org", subject="=?utf-8?q?x?="),
        Email(sender="a@example.com", to="b@example.org", subject="a\x7fb"),
        Email(sender="a@example.com", to="b@example.org", subject="w" * 80),
        Email(sender="a@example.com", to="b@example.org", text="nul \x00"),
        Email(sender="a@example.com", to="üser@example.org"),
        Email(
            sender="a@example.com",
            to="b@example.org",
            headers={"Date": "Thu, 03 Dec 2026 10:00:00 +0000"},
        ),
        Email(
            sender="a@example.com", to="b@example.org", headers={"Sender": "c@d.org"}
        ),
        Email(
            sender="a@example.com",
            to="b@example.org",
            headers={"Content-Language": "en"},
        ),
        Email(sender="a@example.com", to="b@example.org", headers={"X" * 70: "long"}),
    ],
)
def test_what_the_fast_path_leaves_to_the_stdlib(email: Email) -> None:
    """Attachments, encoded-word look-alikes, controls, words too long to fold,
    NUL, SMTPUTF8, structured or MIME fields, long names: the stdlib path."""
    assert render_email(email) is None
    assert_same(email)


INVALID = [
    Email(sender="a@example.com"),  # no recipient
    Email(sender="not an address", to="b@example.org"),
    Email(sender="a@example.com", to="b@@example.org"),
    Email(sender="a@example.com", to="b@example.org", cc="c@localhost"),
    Email(sender="a@example.com", to="b@example.org", subject="x\r\nBcc: e@x.org"),
    Email(sender="a@example.com", to="b@example.org", subject="nul\x00"),
    Email(sender="a@example.com", to="b@example.org", headers={"X-A": "b\nc"}),
    Email(sender="a@example.com", to="b@example.org", headers={"Bad Name": "v"}),
    Email(sender="a@example.com", to="b@example.org", headers={"Subject": "again"}),
    Email(sender="a@example.com", to="b@example.org", headers={"Bcc": "c@d.org"}),
    Email(sender="a@example.com", to="b@example.org", text="\ud800"),
    Email(sender="a\r\n@example.com", to="b@example.org"),
    Email(sender="a@example.com", to="b@example.org", reply_to="x"),
]


@pytest.mark.parametrize("email", INVALID)
def test_invalid_emails_raise_as_on_the_stdlib_path(email: Email) -> None:
    """The fast path raises what the stdlib path raises, with the same message."""
    with pytest.raises(InvalidMessageError) as slow:
        _prepare(email, None, None, None, fast=False)
    with pytest.raises(InvalidMessageError) as fast:
        _prepare(email, None, None, None, fast=True)
    assert type(fast.value) is type(slow.value)
    assert str(fast.value) == str(slow.value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mail_from": "bad address"}, "invalid email address"),
        ({"mail_from": "a@b.org\r\n"}, "CR, LF or NUL"),
        ({"rcpt_to": []}, "no recipients"),
        ({"rcpt_to": ["x@localhost"]}, "two labels"),
        ({"config": Config(limits=Limits(max_message_size=100))}, "limit"),
    ],
)
def test_envelope_and_size_errors_on_the_fast_path(
    kwargs: dict[str, object], pattern: str
) -> None:
    email = TYPICAL[0]
    assert render_email(email) is not None
    for fast in (True, False):
        with pytest.raises(InvalidMessageError, match=pattern):
            _prepare(
                email,
                kwargs.get("mail_from"),  # type: ignore[arg-type]
                kwargs.get("rcpt_to"),  # type: ignore[arg-type]
                kwargs.get("config"),  # type: ignore[arg-type]
                fast=fast,
            )


def test_a_body_holding_the_boundary_takes_the_stdlib_path() -> None:
    """The generator draws another boundary then: the fast path steps aside."""
    state = random.getstate()
    try:
        boundary = _boundary()
        random.setstate(state)
        email = Email(
            sender="a@example.com", to="b@example.org", text=f"--{boundary}\n", html="x"
        )
        assert render_email(email) is None
    finally:
        random.setstate(state)
    fast = _prepare(email, None, None, None, fast=True)
    assert fast.data.count(b"--" + boundary.encode()) == 1  # only the text's


@pytest.mark.parametrize("length", range(12, 120))
def test_message_id_line_folds_as_the_email_package(length: int) -> None:
    message_id = "<12.34@" + "a" * (length - 12) + ".com>"
    assert len(message_id) == length
    message = EmailMessage(policy=SMTP)
    message["Message-ID"] = message_id
    line = message_id_line(message_id)
    assert line is None or line == message.as_bytes()[:-2]
    assert (line is None) == (length > 66)


@pytest.mark.parametrize("message_id", ["<a b@c.org>", '<"a"@c.org>', "<a@[1.2.3.4]>"])
def test_message_id_line_leaves_odd_ids_to_the_email_package(message_id: str) -> None:
    assert message_id_line(message_id) is None


def test_attachment_type_is_importable() -> None:
    """Attachments keep working through prepare() (the stdlib path)."""
    email = Email(
        sender="a@example.com",
        to="b@example.org",
        attachments=[Attachment(filename="a.bin", content=b"\x00\x01")],
    )
    assert b"a.bin" in _prepare(email, None, None, None, fast=True).data


_HEADER_NAMES = st.sampled_from(
    [
        "Subject",
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Content-Type",
        "Content-Transfer-Encoding",
        "MIME-Version",
        "Content-Disposition",
        "List-Unsubscribe",
        "X-Custom",
    ]
)
_HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
    st.text(max_size=60),  # any Unicode, control characters included
    st.sampled_from(
        [
            "",
            "Sender Name <sender@example.org>",
            '"Doe, John" <john@example.org>, jane@example.org',
            "undisclosed-recipients:;",
            "<a.b@example.org> <c.d@example.org>",
            'text/plain; charset="utf-8"',
            'multipart/mixed; boundary="===============1234=="',
            'attachment; filename="r\u00e9sum\u00e9.pdf"',
            "Fri, 04 Dec 2026 21:00:00 +0000",
            "=?utf-8?q?hello?= world",
            "a" * 80,
        ]
    ),
)


@given(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), min_size=1, max_size=8))
def test_parsed_headers_render_as_the_email_package_renders_them(
    headers: list[tuple[str, str]],
) -> None:
    """RENDER_SMTP's shortcut for a parsed header that fits on one ASCII line
    writes exactly what the email package's folder writes, for every header a
    message accepted, under both policies, header by header and whole."""
    msg = EmailMessage()
    for name, value in headers:
        try:
            msg[name] = value
        except (ValueError, TypeError, IndexError, AttributeError):
            event("value refused by the email package")
    for policy in (RENDER_SMTP, RENDER_SMTPUTF8):
        for name, value in msg.raw_items():  # what the generator folds
            try:
                expected = EmailPolicy.fold_binary(policy, name, value)
            except Exception:
                with pytest.raises(Exception):  # noqa: B017, PT011
                    policy.fold_binary(name, value)
                continue
            assert policy.fold_binary(name, value) == expected
            event("one line" if one_line(value, 78) is not None else "folded")
    try:
        whole = msg.as_bytes(policy=SMTP)
    except Exception:
        return
    assert msg.as_bytes(policy=RENDER_SMTP) == whole
