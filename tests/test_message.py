"""Tests for mailstrom_async._message: building, checking and rendering messages."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from email.utils import formataddr, parsedate_to_datetime

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstrom_async import _address
from mailstrom_async._config import Config, Limits
from mailstrom_async._exceptions import (
    ConfigError,
    InvalidAddressError,
    InvalidMessageError,
)
from mailstrom_async._message import (
    Attachment,
    Email,
    PreparedMessage,
    envelope_address,
    parse_address,
    prepare,
)
from tests import strategies

# Hypothesis runs every example inside one call of the autouse (stateless) fixture.
property_settings = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

SENDER = "Alice <alice@example.com>"


def simple(**overrides: object) -> Email:
    fields: dict[str, object] = {
        "sender": SENDER,
        "to": ["bob@example.org"],
        "subject": "Hello",
        "text": "Hi Bob\n",
    }
    fields.update(overrides)
    return Email(**fields)  # type: ignore[arg-type]


def message(headers: str, body: str = "hi\n") -> EmailMessage:
    """Parse header lines (LF-separated) and a body into an EmailMessage."""
    parsed = email.message_from_string(
        headers + "\n\n" + body, policy=email.policy.default
    )
    assert isinstance(parsed, EmailMessage)
    return parsed


def parse(prepared: PreparedMessage) -> EmailMessage:
    """Parse prepared bytes (as UTF-8 text, so raw UTF-8 headers decode)."""
    parsed = email.message_from_string(
        prepared.data.decode("utf-8"), policy=email.policy.SMTPUTF8
    )
    assert isinstance(parsed, EmailMessage)
    return parsed


def text_of(part: EmailMessage) -> str:
    """A parsed text part's content with LF line endings."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


def header_block(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: raw\r\n"
    b"Message-ID: <raw-1@example.com>\r\n"
    b"Date: Mon, 02 Jun 2025 12:00:00 +0000\r\n"
    b"\r\n"
    b"Body line\r\n"
)


def prepare_raw(data: bytes | bytearray, **kwargs: object) -> PreparedMessage:
    options: dict[str, object] = {
        "mail_from": "alice@example.com",
        "rcpt_to": ["bob@example.org"],
    }
    options.update(kwargs)
    return prepare(data, **options)  # type: ignore[arg-type]


# --- parse_address / envelope_address ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("<alice@example.com>", "alice@example.com"),
        ("Alice Liddell <alice@example.com>", "alice@example.com"),
        ('"Liddell, Alice" <alice@example.com>', "alice@example.com"),
        ("=?utf-8?q?J=C3=B6rg?= <j@example.com>", "j@example.com"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ("Alice@Example.COM", "Alice@Example.COM"),
        ("user@[127.0.0.1]", "user@[127.0.0.1]"),
        ("user@[IPv6:2001:db8::1]", "user@[IPv6:2001:db8::1]"),
        ("jörg@bücher.example", "jörg@bücher.example"),
    ],
)
def test_parse_address_returns_bare_address(value: str, expected: str) -> None:
    """parse_address returns local@domain, as given, without display name or brackets."""
    assert parse_address(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("alice.example.com", "no domain"),
        ("al ice@example.com", "local-part"),
        ('"al ice"@example.com', "local part"),
        ("<a<b>@example.com>", ""),
        ("a<b>@example.com", ""),
        ("a@-bad-.com", "not a host name"),
        ("a@bad-.com", "not a host name"),
        ("a@exa mple.com", ""),
        ("a@ex_ample.com", "not a host name"),
        ("a@example..com", ""),
        ("a@example.com.", ""),
        ("a@", ""),
        ("@example.com", ""),
        ("a..b@example.com", ""),
        (".a@example.com", ""),
        ("a@localhost", "two labels"),
        ("a@127.0.0.1", "literal"),
        ("a@[300.1.1.1]", "literal"),
        ("a@[IPv6:nope]", "literal"),
        ("a@[127.0.0.1", "cannot be parsed"),
        ("a@" + "x" * 64 + ".com", ""),
        ("a@" + ".".join(["abcdefghi"] * 26) + ".com", "not a host name"),
        ("x" * 65 + "@example.com", "64 octets"),
        ("x" * 64 + "@" + ".".join(["a" * 60] * 4) + ".com", "254 octets"),
        ('"a..b"@example.com', "dot-separated"),
        ('""@example.com', "dot-separated"),
        ('"a\\"b"@example.com', "must not contain '\"'"),
        ("a@b.com, c@d.com", "exactly one"),
        ("team: a@b.com;", "exactly one"),
        ("undisclosed-recipients:;", "exactly one"),
        ("", ""),
        ("a\u00a0b@example.com", "local part"),
    ],
)
def test_parse_address_rejects_invalid(value: str, reason: str) -> None:
    """An invalid mailbox raises InvalidAddressError whose .address names it."""
    with pytest.raises(InvalidAddressError, match=re.escape(reason) or None) as info:
        parse_address(value)
    assert info.value.address.replace('"', "") in value.replace('"', "")
    assert isinstance(info.value, InvalidMessageError)


def test_parse_address_rejects_unconvertible_idn() -> None:
    """A domain the IDNA codec cannot convert raises InvalidAddressError."""
    with pytest.raises(InvalidAddressError, match="IDNA") as info:
        parse_address("a@\u0080\u0080" + "é" * 70 + ".com")
    assert info.value.address.startswith("a@")


@pytest.mark.parametrize("char", ["\r", "\n", "\x00", "\u2028", "\x85"])
def test_parse_address_rejects_line_breaks_and_nul(char: str) -> None:
    """CR, LF, NUL and other line breaks in an address raise InvalidAddressError."""
    value = f"alice{char}@example.com"
    with pytest.raises(InvalidAddressError) as info:
        parse_address(value)
    assert info.value.address == value


def test_parse_address_error_names_the_address() -> None:
    """InvalidAddressError.address is the offending value."""
    with pytest.raises(InvalidAddressError) as info:
        parse_address("Bob <bob@-bad-.com>")
    assert info.value.address == "bob@-bad-.com"


def test_envelope_address_uses_a_label_domain() -> None:
    """envelope_address converts a Unicode domain to its xn-- A-label."""
    assert (
        envelope_address("Jörg <jorg@Bücher.example>") == "jorg@xn--bcher-kva.example"
    )
    assert envelope_address("jörg@example.com") == "jörg@example.com"


@property_settings
@given(address=strategies.addresses(), name=strategies.display_names())
def test_parse_address_round_trip(address: str, name: str) -> None:
    """A formatted mailbox (any display name) parses back to the same address."""
    assert parse_address(formataddr((name, address))) == address
    assert envelope_address(address) == address


@property_settings
@given(address=strategies.utf8_addresses())
def test_parse_address_round_trip_utf8(address: str) -> None:
    """An address with a non-ASCII local part parses back unchanged."""
    assert parse_address(address) == address


# --- Email -------------------------------------------------------------------------


def test_email_stores_sequences_as_tuples() -> None:
    """Address fields and attachments are stored as tuples; a string is one entry."""
    e = Email(
        sender=SENDER,
        to="bob@example.org",
        cc=["c@example.org"],
        reply_to=None,
        attachments=[("a.pdf", b"%PDF"), ("b.bin", b"\x00", "image/png")],
        headers={"X-A": "1"},
    )
    assert e.to == ("bob@example.org",)
    assert e.cc == ("c@example.org",)
    assert e.reply_to == ()
    assert e.attachments == (
        Attachment(filename="a.pdf", content=b"%PDF", content_type="application/pdf"),
        Attachment(filename="b.bin", content=b"\x00", content_type="image/png"),
    )
    assert dict(e.headers) == {"X-A": "1"}
    other = attrs.evolve(e, headers={"X-B": "2"})
    assert dict(other.headers) == {"X-B": "2"}
    assert other != e
    assert hash(other) == hash(e)  # headers are left out of the hash


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("photo.JPG", "image/jpeg"),
        ("doc.pdf", "application/pdf"),
        ("notes.txt", "text/plain"),
        ("archive.unknownext", "application/octet-stream"),
        ("README", "application/octet-stream"),
    ],
)
def test_attachment_guesses_content_type(filename: str, expected: str) -> None:
    """Attachment.content_type defaults to a guess from the file name's extension."""
    assert Attachment(filename=filename, content=b"").content_type == expected


def test_email_repr_hides_bodies() -> None:
    """Email and Attachment reprs leave out the text, HTML and file contents."""
    e = simple(text="secret text", html="<b>secret html</b>")
    a = Attachment(filename="a.bin", content=b"secret bytes")
    assert "secret" not in repr(e)
    assert "secret" not in repr(a)


def test_build_text_only() -> None:
    """text alone builds a single text/plain message with From, To and Subject."""
    built = simple().build()
    assert built.get_content_type() == "text/plain"
    assert built.get_content() == "Hi Bob\n"
    assert str(built["From"]) == "Alice <alice@example.com>"
    assert str(built["To"]) == "bob@example.org"
    assert str(built["Subject"]) == "Hello"
    assert "Message-ID" not in built
    assert "Date" not in built
    assert built.policy is email.policy.SMTP


def test_build_text_and_html_is_alternative() -> None:
    """text and html build multipart/alternative with the text part first."""
    built = simple(html="<p>Hi</p>").build()
    assert built.get_content_type() == "multipart/alternative"
    parts = list(built.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[1].get_content() == "<p>Hi</p>\n"


def test_build_html_only() -> None:
    """html alone builds a single text/html message."""
    built = simple(text=None, html="<p>Hi</p>").build()
    assert built.get_content_type() == "text/html"


def test_build_empty_body_is_allowed() -> None:
    """An Email without text, html or attachments builds an empty body."""
    prepared = prepare(simple(text=None))
    assert prepared.data.endswith(b"\r\n\r\n")
    assert parse(prepared).get_payload() == ""


def test_build_inline_image_is_related_to_html() -> None:
    """An attachment with a content_id sits in multipart/related next to the HTML."""
    logo = Attachment(filename="logo.png", content=b"\x89PNG", content_id="logo")
    report = Attachment(filename="report.pdf", content=b"%PDF-1.4")
    prepared = prepare(simple(html='<img src="cid:logo">', attachments=[logo, report]))
    parsed = parse(prepared)
    tree = [
        (p.get_content_type(), p.get_content_disposition(), p.get("Content-ID"))
        for p in parsed.walk()
    ]
    assert tree == [
        ("multipart/mixed", None, None),
        ("multipart/alternative", None, None),
        ("text/plain", None, None),
        ("multipart/related", None, None),
        ("text/html", None, None),
        ("image/png", "inline", "<logo>"),
        ("application/pdf", "attachment", None),
    ]
    parts = list(parsed.walk())
    assert parts[5].get_content() == b"\x89PNG"
    assert parts[5].get_filename() == "logo.png"
    assert parts[6].get_content() == b"%PDF-1.4"


def test_build_inline_image_with_html_only() -> None:
    """With html and no text, inline images make the message multipart/related."""
    logo = Attachment(filename="logo.png", content=b"\x89PNG", content_id="<logo@x>")
    built = simple(text=None, html='<img src="cid:logo@x">', attachments=[logo]).build()
    assert built.get_content_type() == "multipart/related"
    assert [p.get("Content-ID") for p in built.iter_parts()] == [None, "<logo@x>"]


def test_build_content_id_without_html_is_a_plain_attachment() -> None:
    """Without html, an attachment with a content_id goes in multipart/mixed."""
    a = Attachment(filename="a.png", content=b"x", content_id="a", inline=True)
    built = simple(attachments=[a]).build()
    assert built.get_content_type() == "multipart/mixed"
    part = list(built.iter_parts())[1]
    assert part.get_content_disposition() == "inline"
    assert part["Content-ID"] == "<a>"


def test_build_attachments_only() -> None:
    """Attachments without text or html build multipart/mixed of the attachments."""
    built = simple(text=None, attachments=[("a.txt", b"hello", "text/plain")]).build()
    assert built.get_content_type() == "multipart/mixed"
    (part,) = built.iter_parts()
    assert part.get_content() == b"hello" or part.get_content() == "hello"
    assert part.get_filename() == "a.txt"


def test_build_non_ascii_attachment_filename_round_trips() -> None:
    """A non-ASCII attachment filename is encoded and parses back unchanged."""
    prepared = prepare(simple(attachments=[("résumé.pdf", b"%PDF")]))
    assert prepared.data.isascii()
    parts = list(parse(prepared).iter_attachments())
    assert [p.get_filename() for p in parts] == ["résumé.pdf"]


def test_build_sets_optional_headers() -> None:
    """cc, bcc, reply_to, list_unsubscribe, precedence and headers become headers."""
    built = simple(
        cc=["Carol <carol@example.org>"],
        bcc=["dave@example.org"],
        reply_to=["help@example.com", "Ops <ops@example.com>"],
        list_unsubscribe="mailto:unsub@example.com",
        precedence="bulk",
        headers={"X-Campaign": "spring", "Sender": "bulk@example.com"},
    ).build()
    assert str(built["Cc"]) == "Carol <carol@example.org>"
    assert str(built["Bcc"]) == "dave@example.org"
    assert str(built["Reply-To"]) == "help@example.com, Ops <ops@example.com>"
    assert str(built["List-Unsubscribe"]) == "<mailto:unsub@example.com>"
    assert str(built["Precedence"]) == "bulk"
    assert str(built["X-Campaign"]) == "spring"
    assert str(built["Sender"]) == "bulk@example.com"


def test_build_keeps_bracketed_list_unsubscribe() -> None:
    """A List-Unsubscribe value that already has angle brackets is kept as is."""
    value = "<mailto:u@example.com>, <https://example.com/u?id=1>"
    assert str(simple(list_unsubscribe=value).build()["List-Unsubscribe"]) == value


def test_build_requires_a_recipient() -> None:
    """An Email with no to, cc or bcc raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="at least one recipient"):
        simple(to=()).build()


def test_build_bcc_only_is_enough() -> None:
    """A Bcc recipient alone is a recipient."""
    prepared = prepare(simple(to=(), bcc=["hidden@example.org"]))
    assert prepared.rcpt_to == ("hidden@example.org",)


@pytest.mark.parametrize("char", ["\r", "\n", "\r\n", "\x00"])
def test_build_rejects_line_break_in_subject(char: str) -> None:
    """CR, LF or NUL in the subject raise InvalidMessageError (header injection)."""
    with pytest.raises(InvalidMessageError, match="Subject"):
        simple(subject=f"Hi{char}Bcc: victim@example.net").build()


@pytest.mark.parametrize("char", ["\r", "\n", "\x00", "\u2028"])
def test_build_rejects_line_break_in_custom_header(char: str) -> None:
    """CR, LF or NUL in a custom header value raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="X-Tag"):
        simple(headers={"X-Tag": f"a{char}b"}).build()


@pytest.mark.parametrize("char", ["\r", "\n", "\x00"])
def test_build_rejects_line_break_in_address(char: str) -> None:
    """CR, LF or NUL in a recipient raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError):
        simple(to=[f"bob@example.org{char}Bcc: victim@example.net"]).build()


@pytest.mark.parametrize("name", ["X Tag", "X:Tag", "", "Ünï", "X-Tag\r\n"])
def test_build_rejects_bad_header_name(name: str) -> None:
    """A header name that is not printable ASCII without ':' raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="header name"):
        simple(headers={name: "x"}).build()


@pytest.mark.parametrize("name", ["From", "to", "BCC", "Subject", "Content-Type"])
def test_build_rejects_headers_that_fields_set(name: str) -> None:
    """headers= may not set a header that an Email field or build() sets."""
    with pytest.raises(InvalidMessageError, match="not headers="):
        simple(headers={name: "x@example.com"}).build()


def test_build_rejects_header_the_email_package_refuses() -> None:
    """A custom header value the email package refuses raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match=r"(?i)message-id"):
        simple(headers={"Message-ID": "<a@x>", "message-id": "<b@x>"}).build()


def test_build_rejects_invalid_sender() -> None:
    """An invalid sender raises InvalidAddressError naming it."""
    with pytest.raises(InvalidAddressError) as info:
        simple(sender="alice").build()
    assert info.value.address == "alice"


def test_build_rejects_two_mailboxes_in_one_entry() -> None:
    """Each address entry must be one mailbox."""
    with pytest.raises(InvalidAddressError, match="exactly one mailbox"):
        simple(to=["a@example.org, b@example.org"]).build()


@pytest.mark.parametrize(
    ("attachment", "match"),
    [
        (
            Attachment(filename="a", content=b"", content_type="nonsense"),
            "type/subtype",
        ),
        (Attachment(filename="a", content=b"", content_type="text/"), "type/subtype"),
        (
            Attachment(filename="a", content=b"", content_type="multipart/mixed"),
            "cannot be",
        ),
        (Attachment(filename="a\r\nX: y", content=b""), "filename"),
        (Attachment(filename="a", content=b"", content_id="a b"), "content_id"),
        (Attachment(filename="a", content=b"", content_id="a>b"), "content_id"),
    ],
)
def test_build_rejects_bad_attachment(attachment: Attachment, match: str) -> None:
    """A malformed attachment raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match=match):
        simple(html="<p>x</p>", attachments=[attachment]).build()


def test_build_rejects_unencodable_text() -> None:
    """A body with a lone surrogate cannot be encoded: InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="cannot be encoded") as info:
        simple(text="bad \ud800 text").build()
    assert isinstance(info.value.__cause__, UnicodeError)


def test_build_text_with_nul_is_quoted_printable() -> None:
    """A NUL in the text is carried quoted-printable and decodes back unchanged."""
    prepared = prepare(simple(text="a\x00b\n"))
    assert b"\x00" not in prepared.data
    assert b"a=00b" in prepared.data
    assert text_of(parse(prepared)) == "a\x00b\n"


def test_build_utf8_local_part_uses_smtputf8_policy() -> None:
    """An address with a non-ASCII local part makes build() use the SMTPUTF8 policy."""
    built = simple(to=["jörg@example.org"]).build()
    assert built.policy is email.policy.SMTPUTF8
    assert "jörg@example.org".encode() in built.as_bytes()


# --- prepare(): envelope --------------------------------------------------------------


def test_prepare_email_envelope_defaults() -> None:
    """The envelope defaults to From and To + Cc + Bcc, in that order."""
    prepared = prepare(
        simple(to=["b@example.org"], cc=["c@example.org"], bcc=["d@example.org"])
    )
    assert prepared.mail_from == "alice@example.com"
    assert prepared.rcpt_to == ("b@example.org", "c@example.org", "d@example.org")
    assert prepared.smtputf8 is False
    assert prepared.size == len(prepared.data)
    assert prepared.has_8bit_data is False


def test_prepare_explicit_envelope_overrides() -> None:
    """mail_from and rcpt_to override the addresses in the headers."""
    prepared = prepare(
        simple(), mail_from="bounces@example.com", rcpt_to="Other <x@example.net>"
    )
    assert prepared.mail_from == "bounces@example.com"
    assert prepared.rcpt_to == ("x@example.net",)


@pytest.mark.parametrize("null", ["", "<>", " "])
def test_prepare_null_reverse_path(null: str) -> None:
    """mail_from '' or '<>' is the null reverse-path, kept as ''."""
    assert prepare(simple(), mail_from=null).mail_from == ""


@pytest.mark.parametrize("char", ["\r", "\n", "\x00"])
def test_prepare_rejects_line_break_in_mail_from(char: str) -> None:
    """CR, LF or NUL in mail_from raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="mail_from"):
        prepare(simple(), mail_from=f"a@example.com{char}RCPT TO:<x@example.net>")


@pytest.mark.parametrize("char", ["\r", "\n", "\x00"])
def test_prepare_rejects_line_break_in_rcpt_to(char: str) -> None:
    """CR, LF or NUL in rcpt_to raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="rcpt_to"):
        prepare(simple(), rcpt_to=[f"b@example.org{char}DATA"])


def test_prepare_rejects_invalid_envelope_address() -> None:
    """An invalid explicit envelope address raises InvalidAddressError."""
    with pytest.raises(InvalidAddressError) as info:
        prepare(simple(), rcpt_to=["ok@example.org", "bad@-x-.org"])
    assert info.value.address == "bad@-x-.org"


def test_prepare_rejects_empty_rcpt_to() -> None:
    """An explicit empty rcpt_to means no recipients: InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="no recipients"):
        prepare(simple(), rcpt_to=[])


def test_prepare_dedupes_recipients_case_insensitive_domain() -> None:
    """Recipients are deduplicated on exact local part and case-insensitive domain."""
    prepared = prepare(
        simple(
            to=["b@example.org", "B@example.org"],
            cc=["b@EXAMPLE.ORG", "c@example.org"],
            bcc=["b@Example.Org", "c@example.org"],
        )
    )
    assert prepared.rcpt_to == ("b@example.org", "B@example.org", "c@example.org")


def test_prepare_idn_domain_becomes_a_label() -> None:
    """A Unicode domain goes out as an A-label, in the envelope and in the headers."""
    prepared = prepare(simple(sender="jorg@bücher.example", to=["anna@münchen.de"]))
    assert prepared.mail_from == "jorg@xn--bcher-kva.example"
    assert prepared.rcpt_to == ("anna@xn--mnchen-3ya.de",)
    assert b"To: anna@xn--mnchen-3ya.de\r\n" in prepared.data
    assert prepared.smtputf8 is False
    assert prepared.data.isascii()


def test_prepare_idn_domain_in_user_message_headers() -> None:
    """A Unicode domain in a user's EmailMessage header is rewritten to an A-label."""
    msg = message("From: Jörg <jorg@bücher.example>\nTo: a@münchen.de, b@example.org")
    prepared = prepare(msg)
    block = header_block(prepared.data)
    assert b"<jorg@xn--bcher-kva.example>" in block
    assert b"To: a@xn--mnchen-3ya.de, b@example.org" in block
    assert prepared.rcpt_to == ("a@xn--mnchen-3ya.de", "b@example.org")


def test_prepare_utf8_local_part_needs_smtputf8() -> None:
    """A non-ASCII local part sets smtputf8 and is written raw in UTF-8."""
    prepared = prepare(simple(to=["jörg@example.org"]))
    assert prepared.smtputf8 is True
    assert prepared.rcpt_to == ("jörg@example.org",)
    assert "To: jörg@example.org\r\n".encode() in prepared.data
    assert parse(prepared)["To"].addresses[0].username == "jörg"


def test_prepare_utf8_mail_from_alone_leaves_message_ascii() -> None:
    """A non-ASCII local part in mail_from alone: the message itself does not need
    SMTPUTF8 (smtputf8 is False); the sender does, which delivery checks."""
    prepared = prepare(simple(), mail_from="bünce@example.com")
    assert prepared.smtputf8 is False
    assert prepared.mail_from == "bünce@example.com"
    assert header_block(prepared.data).isascii()


def test_prepare_utf8_bcc_only_keeps_headers_ascii() -> None:
    """A non-ASCII Bcc needs SMTPUTF8 for its RCPT only: the Bcc is not in the
    bytes, so the message itself does not need it."""
    prepared = prepare(simple(bcc=["jörg@example.org"]))
    assert prepared.smtputf8 is False
    assert prepared.data.isascii()
    assert prepared.rcpt_to == ("bob@example.org", "jörg@example.org")


def test_prepare_sender_header_sets_mail_from() -> None:
    """With a Sender header, mail_from defaults to the Sender address."""
    msg = message(
        "From: a@example.com, b@example.com\nSender: s@example.com\nTo: c@x.org"
    )
    assert prepare(msg).mail_from == "s@example.com"


def test_prepare_rejects_several_authors_without_sender() -> None:
    """A From with several mailboxes and no Sender raises InvalidMessageError."""
    msg = message("From: a@example.com, b@example.com\nTo: c@example.org")
    with pytest.raises(InvalidMessageError, match="Sender"):
        prepare(msg)


def test_prepare_rejects_empty_sender_header() -> None:
    """A Sender header must hold exactly one mailbox."""
    msg = message("From: a@example.com\nSender: nobody:;\nTo: c@example.org")
    with pytest.raises(InvalidMessageError, match="exactly one mailbox"):
        prepare(msg)


# --- prepare(): headers ---------------------------------------------------------------


def test_prepare_rejects_missing_from() -> None:
    """A message without From raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="no From"):
        prepare(message("To: b@example.org\nSubject: x"))


def test_prepare_rejects_from_group_without_mailboxes() -> None:
    """A From header with no mailbox in it counts as missing."""
    with pytest.raises(InvalidMessageError, match="no From"):
        prepare(message("From: nobody:;\nTo: b@example.org"))


def test_prepare_rejects_no_recipients() -> None:
    """A message without To, Cc, Bcc or rcpt_to raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="no recipients"):
        prepare(message("From: a@example.com\nSubject: x"))


def test_prepare_rejects_invalid_header_address() -> None:
    """An invalid address in a To header raises InvalidAddressError."""
    with pytest.raises(InvalidAddressError) as info:
        prepare(message("From: a@example.com\nTo: ok@example.org, b@exa mple.org"))
    assert "exa" in info.value.address


def test_prepare_rejects_unparsable_header_address() -> None:
    """An address the stdlib parser trips over raises InvalidAddressError."""
    with pytest.raises(InvalidAddressError, match="cannot be parsed"):
        prepare(message("From: a@example.com\nTo: b@"))


def test_prepare_catches_injection_in_compat32_message() -> None:
    """CR/LF in a header of a compat32 message (which allows it) is refused."""
    msg = EmailMessage(policy=email.policy.compat32)
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg["Subject"] = "hi\r\nBcc: victim@example.net"
    with pytest.raises(InvalidMessageError, match="Subject"):
        prepare(msg)


def test_prepare_catches_injection_in_address_header() -> None:
    """A line break smuggled into a raw To value is refused."""
    msg = EmailMessage(policy=email.policy.compat32)
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org\nBcc: victim@example.net"
    with pytest.raises(InvalidMessageError, match="To"):
        prepare(msg)


def test_prepare_catches_unicode_line_separator_in_parsed_header() -> None:
    """A Unicode line break in a parsed header value (split by str.splitlines) is refused."""
    msg = message("From: a@example.com\nTo: b@example.org\nSubject: hi\x85Bcc: c@x.org")
    with pytest.raises(InvalidMessageError, match="Subject"):
        prepare(msg)


def test_prepare_rejects_nul_in_header() -> None:
    """A NUL in a header value (the default policy allows it) is refused."""
    msg = message("From: a@example.com\nTo: b@example.org")
    msg["X-Tag"] = "a\x00b"
    with pytest.raises(InvalidMessageError, match="X-Tag"):
        prepare(msg)


def test_prepare_rejects_bad_header_name_in_message() -> None:
    """A header name with a space in a user's EmailMessage is refused."""
    msg = message("From: a@example.com\nTo: b@example.org")
    msg["Bad Name"] = "x"
    with pytest.raises(InvalidMessageError, match="header name"):
        prepare(msg)


def test_prepare_rejects_injection_in_part_header() -> None:
    """Headers of MIME parts are checked too."""
    msg = EmailMessage(policy=email.policy.compat32)
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    part = EmailMessage(policy=email.policy.compat32)
    part["Content-Type"] = "text/plain\r\nX-Evil: 1"
    part.set_payload("hi")
    msg.set_payload([part])
    msg["Content-Type"] = 'multipart/mixed; boundary="b"'
    with pytest.raises(InvalidMessageError, match="Content-Type"):
        prepare(msg)


def test_prepare_keeps_folded_headers() -> None:
    """Folding (CRLF followed by a space) in a parsed header is not an injection."""
    msg = message(
        "From: a@example.com\nTo: b@example.org,\n c@example.org\nSubject: a\n b"
    )
    prepared = prepare(msg)
    assert prepared.rcpt_to == ("b@example.org", "c@example.org")
    assert parse(prepared)["Subject"] == "a b"


def test_prepare_rejects_whitespace_only_continuation() -> None:
    """A header continuation line of only whitespace is refused."""
    msg = EmailMessage(policy=email.policy.compat32)
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg["Subject"] = "a\r\n \r\n b"
    with pytest.raises(InvalidMessageError, match="Subject"):
        prepare(msg)


@pytest.mark.parametrize("name", ["From", "To", "Subject", "Date", "Message-ID"])
def test_prepare_rejects_duplicate_singleton_header(name: str) -> None:
    """A header RFC 5322 allows once raises InvalidMessageError when repeated."""
    values = {
        "From": "x@example.com",
        "To": "y@example.org",
        "Subject": "s",
        "Date": "Mon, 02 Jun 2025 12:00:00 +0000",
        "Message-ID": "<d@example.com>",
    }
    msg = message(f"From: a@example.com\nTo: b@example.org\n{name}: {values[name]}")
    if name not in ("From", "To"):
        msg = message(
            f"From: a@example.com\nTo: b@example.org\n{name}: {values[name]}\n"
            f"{name}: {values[name]}"
        )
    with pytest.raises(InvalidMessageError, match="only once"):
        prepare(msg)


def test_prepare_encodes_non_ascii_header() -> None:
    """Non-ASCII text in Subject and display names is RFC 2047-encoded, not raw."""
    prepared = prepare(simple(sender="Jörg <jorg@example.com>", subject="Grüße ☃"))
    assert prepared.data.isascii()
    assert prepared.smtputf8 is False
    assert b"Subject: =?utf-8?" in prepared.data
    parsed = parse(prepared)
    assert parsed["Subject"] == "Grüße ☃"
    assert parsed["From"].addresses[0].display_name == "Jörg"


def test_build_rejects_unencodable_subject() -> None:
    """A subject with a lone surrogate cannot be encoded: InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="Subject"):
        simple(subject="bad \ud800").build()


@pytest.mark.parametrize("value", ["bad \ud800", "Grüße"])
def test_prepare_rejects_unencodable_raw_header(value: str) -> None:
    """A raw (compat32) non-ASCII header value cannot be encoded: InvalidMessageError."""
    msg = EmailMessage(policy=email.policy.compat32)
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg["Subject"] = value
    with pytest.raises(InvalidMessageError, match="cannot be rendered"):
        prepare(msg)


def test_prepare_keeps_spaces_between_encoded_words() -> None:
    """Spaces survive RFC 2047 encoding and folding (CPython gh-144156 work-around)."""
    subject = "¡¡𐀀𐀀 00¡¡¡𐀀 00¡¡¡¡¡¡¡ ¡ ¡"
    msg = message("From: a@example.com\nTo: b@example.org\nX-Raw: kept")
    msg["Subject"] = subject
    msg["X-Other"] = "ß " * 60
    assert str(simple(subject=subject).build()["Subject"]) == subject
    built = prepare(simple(subject=subject))
    assert built.data.isascii()
    assert parse(built)["Subject"] == subject
    prepared = prepare(msg)
    assert prepared.data.isascii()
    parsed = parse(prepared)
    assert parsed["Subject"] == subject
    assert parsed["X-Other"] == "ß " * 60
    assert parsed["X-Raw"] == "kept"


def test_prepare_rejects_non_utf8_8bit_header() -> None:
    """Raw 8-bit header bytes that are not UTF-8 raise InvalidMessageError."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: caf\xe9\r\n\r\nhi\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    with pytest.raises(InvalidMessageError, match="not UTF-8"):
        prepare(msg)


def test_prepare_utf8_8bit_header_needs_smtputf8() -> None:
    """Raw UTF-8 header bytes kept by the parser make the message need SMTPUTF8."""
    raw = "From: a@example.com\r\nTo: b@example.org\r\nSubject: café\r\n\r\nhi\r\n"
    msg = email.message_from_bytes(raw.encode(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    prepared = prepare(msg)
    assert prepared.smtputf8 is True
    assert "Subject: café\r\n".encode() in prepared.data


def test_prepare_rejects_unfoldable_long_header() -> None:
    """A header line over 998 octets that cannot be folded raises InvalidMessageError."""
    msg = message("From: a@example.com\nTo: b@example.org")
    msg["Message-ID"] = "<" + "x" * 1200 + "@example.com>"
    with pytest.raises(InvalidMessageError, match="998"):
        prepare(msg)


def test_prepare_folds_long_header() -> None:
    """A long Subject is folded so no line exceeds 998 octets, and parses back."""
    subject = "word " * 400
    prepared = prepare(simple(subject=subject.strip()))
    assert max(len(line) for line in lines(prepared.data)) <= 998
    assert parse(prepared)["Subject"] == subject.strip()


# --- prepare(): Message-ID, Date, Bcc ------------------------------------------------


def test_prepare_adds_message_id_with_sender_domain() -> None:
    """A missing Message-ID is generated with the sender's domain."""
    prepared = prepare(simple())
    assert re.fullmatch(r"<[^<>@\s]+@example\.com>", prepared.message_id)
    assert parse(prepared)["Message-ID"] == prepared.message_id


def test_prepare_message_id_uses_a_label_of_sender_domain() -> None:
    """The generated Message-ID uses the A-label of an internationalised domain."""
    prepared = prepare(simple(sender="jorg@bücher.example"))
    assert prepared.message_id.endswith("@xn--bcher-kva.example>")


def test_prepare_adds_message_id_with_configured_domain() -> None:
    """config.message_id_domain, when set, is the generated Message-ID's domain."""
    prepared = prepare(simple(), config=Config(message_id_domain="mail.example.net"))
    assert prepared.message_id.endswith("@mail.example.net>")


@pytest.mark.parametrize(
    "domain", ["x.com\r\nBcc: y@z.com", "x.test> <evil@evil.test", "x.test>"]
)
def test_bad_message_id_domain_is_refused_by_the_config(domain: str) -> None:
    """A Message-ID domain that is not a domain never reaches prepare(): the
    Config refuses it, so the queue id and the Message-ID header cannot differ."""
    with pytest.raises(ConfigError, match="message_id_domain"):
        Config(message_id_domain=domain)


def test_idn_message_id_domain_is_the_header_and_the_queue_id() -> None:
    """An internationalised message_id_domain goes into the Message-ID in IDNA
    2008 form, and the queue id is exactly the header's Message-ID."""
    prepared = prepare(simple(), config=Config(message_id_domain="faß.test"))
    assert prepared.message_id.endswith("@xn--fa-hia.test>")
    assert parse(prepared)["Message-ID"] == prepared.message_id


def test_prepare_keeps_existing_message_id() -> None:
    """An existing Message-ID is kept and reported."""
    prepared = prepare(simple(headers={"Message-ID": "<mine@example.com>"}))
    assert prepared.message_id == "<mine@example.com>"
    assert prepared.data.count(b"Message-ID:") == 1


@pytest.mark.parametrize("value", ["not-a-msgid", "<a b@example.com>", "<<a@b>>"])
def test_prepare_rejects_malformed_message_id(value: str) -> None:
    """A Message-ID that is not '<id@domain>' raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="Message-ID"):
        prepare(simple(headers={"Message-ID": value}))
    with pytest.raises(InvalidMessageError, match="Message-ID must be"):
        prepare_raw(RAW.replace(b"<raw-1@example.com>", value.encode()))


def test_prepare_replaces_empty_message_id() -> None:
    """An empty Message-ID header is replaced by a generated one."""
    prepared = prepare(message("From: a@example.com\nTo: b@example.org\nMessage-ID:"))
    assert prepared.message_id.endswith("@example.com>")
    assert parse(prepared)["Message-ID"] == prepared.message_id


def test_prepare_adds_date() -> None:
    """A missing Date is added, in RFC 5322 format, UTC."""
    prepared = prepare(simple())
    date = parsedate_to_datetime(str(parse(prepared)["Date"]))
    assert date.utcoffset() is not None
    assert date.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert re.search(
        rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} [\d:]{8} \+0000\r\n", prepared.data
    )


def test_prepare_keeps_existing_date() -> None:
    """An existing Date is kept unchanged."""
    date = "Mon, 02 Jun 2025 12:00:00 +0200"
    prepared = prepare(simple(headers={"Date": date}))
    assert parse(prepared)["Date"] == date
    assert prepared.data.count(b"Date:") == 1


def test_prepare_strips_bcc_but_keeps_recipient() -> None:
    """Bcc is removed from the bytes but its addresses stay in rcpt_to."""
    prepared = prepare(simple(bcc=["hidden@example.net"]))
    assert b"hidden" not in prepared.data
    assert b"bcc" not in prepared.data.lower()
    assert "hidden@example.net" in prepared.rcpt_to


def test_prepare_does_not_change_the_callers_message() -> None:
    """prepare() works on a copy: the caller's EmailMessage is unchanged."""
    msg = message("From: a@example.com\nTo: b@münchen.de\nBcc: c@example.org")
    before = msg.as_string()
    prepare(msg)
    assert msg.as_string() == before
    assert "Message-ID" not in msg


def test_prepare_does_not_change_the_callers_multipart_message() -> None:
    """The copy is deep enough: re-encoding a part, dropping Bcc and adding headers
    leave every part of the caller's multipart message (and its policy) as it was."""
    msg = message("From: a@example.com\nTo: b@example.org\nBcc: c@example.org")
    msg["Subject"] = "Grüße"
    msg.set_content("x" * 1500 + "\nshort\n", cte="8bit")
    msg.add_attachment(
        b"\x00\x01" * 700, maintype="application", subtype="octet-stream"
    )
    before = msg.as_bytes()
    policies = [part.policy for part in msg.walk()]
    prepared = prepare(msg)
    assert max(len(line) for line in lines(prepared.data)) <= 998
    assert msg.as_bytes() == before
    assert [part.policy for part in msg.walk()] == policies
    assert "Message-ID" not in msg
    assert "Bcc" in msg


# --- prepare(): long lines, size ------------------------------------------------------


def test_prepare_reencodes_long_text_line() -> None:
    """A text part with a line over 998 octets is re-encoded quoted-printable."""
    msg = message("From: a@example.com\nTo: b@example.org")
    text = "x" * 1500 + "\n" + "short line \n"
    msg.set_payload(text)
    msg["Content-Type"] = "text/plain; charset=us-ascii"
    msg["Content-Transfer-Encoding"] = "7bit"
    prepared = prepare(msg)
    assert max(len(line) for line in lines(prepared.data)) <= 998
    parsed = parse(prepared)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(parsed) == text


def test_prepare_reencodes_long_binary_line() -> None:
    """A non-text part with a line over 998 octets is re-encoded base64."""
    msg = message("From: a@example.com\nTo: b@example.org")
    msg.set_payload("y" * 2000)
    msg["Content-Type"] = "application/x-thing"
    prepared = prepare(msg)
    assert max(len(line) for line in lines(prepared.data)) <= 998
    parsed = parse(prepared)
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert parsed.get_content() == b"y" * 2000


def test_prepare_reencodes_nul_in_body() -> None:
    """A raw NUL in a 7bit part is re-encoded rather than sent."""
    msg = message("From: a@example.com\nTo: b@example.org", body="a\x00b\n")
    prepared = prepare(msg)
    assert b"\x00" not in prepared.data
    assert text_of(parse(prepared)) == "a\x00b\n"


def test_prepare_built_long_line_is_encoded() -> None:
    """An Email with a very long text line renders with no line over 998 octets."""
    text = "é" * 3000
    prepared = prepare(simple(text=text))
    assert max(len(line) for line in lines(prepared.data)) <= 998
    assert text_of(parse(prepared)) == text + "\n"


def test_prepare_rejects_too_big_message() -> None:
    """A message larger than limits.max_message_size raises InvalidMessageError."""
    config = Config(limits=Limits(max_message_size=2000))
    prepare(simple(text="x" * 100), config=config)
    with pytest.raises(InvalidMessageError, match="max_message_size"):
        prepare(simple(text="x" * 3000), config=config)


def test_prepare_rejects_other_types() -> None:
    """prepare() of something that is not a message raises TypeError."""
    with pytest.raises(TypeError, match="str"):
        prepare("From: a@example.com\r\n\r\n")  # type: ignore[arg-type]


def test_prepare_8bit_body_is_reported() -> None:
    """A user message with an 8bit body says it has 8-bit data."""
    raw = "From: a@example.com\r\nTo: b@example.org\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncafé\r\n"
    msg = email.message_from_bytes(raw.encode(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    prepared = prepare(msg)
    assert prepared.has_8bit_data is True
    assert prepared.smtputf8 is False
    assert "café\r\n".encode() in prepared.data


# --- prepare(): raw bytes -------------------------------------------------------------


def test_prepare_bytes_requires_envelope() -> None:
    """Raw bytes without mail_from or rcpt_to raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="explicit envelope"):
        prepare(RAW)
    with pytest.raises(InvalidMessageError, match="explicit envelope"):
        prepare(RAW, mail_from="a@example.com")
    with pytest.raises(InvalidMessageError, match="explicit envelope"):
        prepare(RAW, rcpt_to=["b@example.org"])


def test_prepare_bytes_kept_byte_for_byte() -> None:
    """Complete CRLF bytes are passed through unchanged."""
    prepared = prepare_raw(RAW)
    assert prepared.data == RAW
    assert prepared.message_id == "<raw-1@example.com>"
    assert prepared.mail_from == "alice@example.com"
    assert prepared.rcpt_to == ("bob@example.org",)


def test_prepare_bytes_accepts_bytearray() -> None:
    """A bytearray is accepted like bytes."""
    assert prepare_raw(bytearray(RAW)).data == RAW


def test_prepare_bytes_normalises_bare_lf_and_cr() -> None:
    """Bare LF and bare CR line endings become CRLF."""
    lf = RAW.replace(b"\r\n", b"\n").replace(b"Body line\n", b"a\rb\nc")
    data = prepare_raw(lf).data
    assert data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r")
    assert data.endswith(b"\r\n\r\na\r\nb\r\nc\r\n")


def test_prepare_bytes_adds_message_id_and_date() -> None:
    """Missing Message-ID and Date are prepended; the rest is unchanged."""
    raw = b"From: a@example.com\r\nTo: b@example.org\r\n\r\nhello\r\n"
    prepared = prepare_raw(raw)
    assert re.fullmatch(r"<[^<>@\s]+@example\.com>", prepared.message_id)
    first, second, rest = prepared.data.split(b"\r\n", 2)
    assert first == b"Message-ID: " + prepared.message_id.encode()
    assert second.startswith(b"Date: ")
    assert rest == raw


def test_prepare_bytes_replaces_empty_message_id() -> None:
    """An empty Message-ID line in raw bytes is replaced."""
    raw = b"From: a@example.com\r\nMessage-ID: \r\nDate: x\r\n\r\nhello\r\n"
    prepared = prepare_raw(raw)
    assert prepared.data.count(b"Message-ID:") == 1
    assert prepared.data.startswith(b"Message-ID: <")


def test_prepare_bytes_strips_bcc() -> None:
    """Bcc lines, folded continuations included, are removed from raw bytes."""
    raw = RAW.replace(
        b"Subject: raw\r\n",
        b"BCC: x@example.net,\r\n y@example.net\r\nSubject: raw\r\n",
    )
    assert prepare_raw(raw).data == RAW


def test_prepare_bytes_without_body() -> None:
    """A header section without a blank line or body is completed with one."""
    prepared = prepare_raw(b"From: a@example.com\r\nMessage-ID: <x@y.z>\r\nDate: x")
    assert (
        prepared.data
        == b"From: a@example.com\r\nMessage-ID: <x@y.z>\r\nDate: x\r\n\r\n"
    )


def test_prepare_bytes_rejects_long_line() -> None:
    """A raw body line of 1500 octets cannot be re-encoded: InvalidMessageError."""
    raw = RAW + b"z" * 1500 + b"\r\n"
    with pytest.raises(InvalidMessageError, match="998"):
        prepare_raw(raw)


def test_prepare_bytes_accepts_998_octet_line() -> None:
    """A line of exactly 998 octets is allowed."""
    raw = RAW + b"z" * 998 + b"\r\n"
    assert prepare_raw(raw).data == raw


def test_prepare_bytes_rejects_long_header_line() -> None:
    """A raw header line over 998 octets raises InvalidMessageError."""
    raw = b"X-Long: " + b"q" * 1200 + b"\r\n" + RAW
    with pytest.raises(InvalidMessageError, match="b'X-Long: qqq"):
        prepare_raw(raw)


def test_prepare_bytes_rejects_missing_from() -> None:
    """Raw bytes without a From header raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="no From"):
        prepare_raw(b"To: b@example.org\r\n\r\nhi\r\n")


def test_prepare_bytes_rejects_empty_header_section() -> None:
    """Raw bytes that start with a blank line have no From."""
    with pytest.raises(InvalidMessageError, match="no From"):
        prepare_raw(b"\r\nFrom: a@example.com\r\n")


@pytest.mark.parametrize(
    ("line", "number"),
    [
        (b"not a header", 3),
        (b"Bad Name: x", 3),
        (b"From a@b Mon Jun  2 12:00:00 2025", 3),
        (b" leading continuation", 1),
    ],
)
def test_prepare_bytes_rejects_malformed_header_line(line: bytes, number: int) -> None:
    """A header line that is neither a field nor a continuation is refused."""
    if number == 1:
        raw = line + b"\r\n" + RAW
    else:
        raw = RAW.replace(b"Subject", line + b"\r\nSubject")
    with pytest.raises(InvalidMessageError, match=f"header line {number} is not"):
        prepare_raw(raw)


def test_prepare_bytes_rejects_nul() -> None:
    """A NUL octet anywhere in raw bytes raises InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="NUL"):
        prepare_raw(RAW + b"a\x00b\r\n")


def test_prepare_bytes_rejects_non_utf8_header() -> None:
    """8-bit header bytes that are not UTF-8 raise InvalidMessageError."""
    with pytest.raises(InvalidMessageError, match="not UTF-8"):
        prepare_raw(RAW.replace(b"Subject: raw", b"Subject: caf\xe9"))


def test_prepare_bytes_utf8_header_needs_smtputf8() -> None:
    """UTF-8 header bytes (RFC 6532) are kept and make the message need SMTPUTF8."""
    raw = RAW.replace(b"To: bob@example.org", "To: jörg@example.org".encode())
    prepared = prepare_raw(raw, rcpt_to=["jörg@example.org"])
    assert prepared.data == raw
    assert prepared.smtputf8 is True


def test_prepare_bytes_validates_header_addresses() -> None:
    """An invalid address in a raw To header raises InvalidAddressError."""
    with pytest.raises(InvalidAddressError):
        prepare_raw(RAW.replace(b"To: bob@example.org", b"To: bob@@example.org"))


def test_prepare_bytes_envelope_dedup_and_idn() -> None:
    """Explicit raw envelopes are deduplicated and use A-label domains."""
    prepared = prepare_raw(
        RAW, mail_from="a@bücher.example", rcpt_to=["x@münchen.de", "x@MÜNCHEN.de"]
    )
    assert prepared.mail_from == "a@xn--bcher-kva.example"
    assert prepared.rcpt_to == ("x@xn--mnchen-3ya.de",)


def test_prepare_bytes_rejects_too_big() -> None:
    """Raw bytes over limits.max_message_size raise InvalidMessageError."""
    config = Config(limits=Limits(max_message_size=len(RAW) - 1))
    with pytest.raises(InvalidMessageError, match="max_message_size"):
        prepare_raw(RAW, config=config)


# --- properties -----------------------------------------------------------------------


@property_settings
@given(e=strategies.emails())
def test_render_parse_round_trip(e: Email) -> None:
    """A prepared Email parses back to the same subject, From, To and text."""
    prepared = prepare(e)
    parsed = parse(prepared)
    assert str(parsed["Subject"]) == e.subject
    assert parsed["From"].addresses[0].addr_spec == parse_address(e.sender)
    assert [a.addr_spec for a in parsed["To"].addresses] == [
        parse_address(t) for t in e.to
    ]
    assert e.text is not None
    expected = re.sub(r"\r\n?", "\n", e.text)
    expected += "" if expected.endswith("\n") else "\n"
    assert text_of(parsed) == expected
    assert max(len(line) for line in lines(prepared.data)) <= 998
    assert prepared.data.count(b"\r\n") == prepared.data.count(b"\n")


_chunks = st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b""))


@property_settings
@given(
    chunks=st.lists(_chunks, max_size=20),
    ends=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r"]), min_size=20, max_size=20),
)
def test_raw_bytes_have_only_crlf(chunks: list[bytes], ends: list[bytes]) -> None:
    """Whatever the body's line endings, raw bytes come out with CRLF only."""
    body = b"".join(c + e for c, e in zip(chunks, ends, strict=False))
    data = prepare_raw(RAW + body).data
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    assert data.startswith(RAW)
    assert data.replace(b"\r\n", b"") == (RAW + body).replace(b"\r", b"").replace(
        b"\n", b""
    )


def test_message_ids_are_unique() -> None:
    """Message-IDs generated by 1000 prepare() calls are all different."""
    e = simple()
    ids = {prepare(e).message_id for _ in range(1000)}
    assert len(ids) == 1000


_ATOM_CHARS = "abcXYZ019!#$%&'*+/=?^_`{|}~-."


@given(
    local=st.text(alphabet=_ATOM_CHARS, min_size=1, max_size=20),
    domain=st.one_of(
        strategies.domains(), st.text(alphabet="ab-.9", min_size=1, max_size=12)
    ),
    padding=st.sampled_from(["", " ", "\t "]),
)
def test_plain_address_fast_path_agrees_with_the_header_parser(
    local: str, domain: str, padding: str
) -> None:
    """A bare addr-spec skips the stdlib header parser; for any such input, valid
    or not, the outcome is exactly what the parser path gives."""
    value = f"{padding}{local}@{domain}{padding}"

    def outcome(parse: bool) -> object:
        try:
            if parse:  # force the parser path: a harmless comment defeats the fast path
                return _address.parse_address_header("To", value + " (x)")
            return _address.parse_address_header("To", value)
        except InvalidAddressError as exc:
            return "invalid" if parse else ("invalid", exc)

    fast, slow = outcome(False), outcome(True)
    if slow == "invalid":
        assert isinstance(fast, tuple)
        assert fast[0] == "invalid"
    else:
        assert fast == slow


# --- many recipients and big messages -----------------------------------------------


def _header_value(data: bytes, name: bytes) -> str:
    """The unfolded value of header *name* in *data*."""
    head = header_block(data).decode("utf-8")
    found = re.search(
        rf"^{name.decode()}: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
        head,
        re.MULTILINE | re.IGNORECASE,
    )
    assert found is not None
    return re.sub(r"\r\n(?=[ \t])", "", found.group(1))


def test_prepare_ten_thousand_recipients() -> None:
    """An Email of 10,000 recipients: envelope in order and deduplicated, Bcc
    stripped, To and Cc folded at 78 and naming exactly the given mailboxes."""
    to = [
        f"Name {i} <r{i}@d{i % 9}.example>" if i % 3 else f"r{i}@d{i % 9}.example"
        for i in range(5000)
    ]
    cc = [f'"Last, {i}" <c{i}@d{i % 9}.example>' for i in range(2500)]
    bcc = [f"b{i}@d{i % 9}.example" for i in range(2500)] + ["r3@D3.EXAMPLE"]
    prepared = prepare(simple(to=to, cc=cc, bcc=bcc))
    expected = (
        [f"r{i}@d{i % 9}.example" for i in range(5000)]
        + [f"c{i}@d{i % 9}.example" for i in range(2500)]
        + [f"b{i}@d{i % 9}.example" for i in range(2500)]
    )
    assert list(prepared.rcpt_to) == expected
    assert b"\r\nbcc:" not in header_block(prepared.data).lower()
    assert b"b17@" not in prepared.data
    for name, mailboxes in ((b"To", to), (b"Cc", cc)):
        shown = _address.parse_address_header("x", _header_value(prepared.data, name))
        assert [str(g.addresses[0]) for g in shown] == mailboxes
    address_lines = [
        line
        for line in lines(header_block(prepared.data) + b"\r\n")
        if not line.startswith((b"Subject", b"Message-ID", b"Date"))
    ]
    assert max(map(len, address_lines)) <= 78


def test_prepare_many_recipients_email_message_and_bytes() -> None:
    """The same 1,000 recipients from an EmailMessage (IDN domains rewritten in
    place) and from raw bytes give the same envelope."""
    to = [f"Name {i} <r{i}@münchen.de>" for i in range(1000)]
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = ", ".join(to)
    msg["Subject"] = "many"
    prepared = prepare(msg)
    wanted = tuple(f"r{i}@xn--mnchen-3ya.de" for i in range(1000))
    assert prepared.rcpt_to == wanted
    block = header_block(prepared.data)
    assert block.isascii()
    assert block.index(b"\r\nTo: ") < block.index(b"\r\nSubject: many")
    shown = _address.parse_address_header("x", _header_value(prepared.data, b"To"))
    assert [g.addresses[0].addr_spec for g in shown] == list(wanted)
    raw = prepared.data.replace(b"Subject: many", b"Bcc: x@example.net\r\nSubject: m")
    again = prepare(raw, mail_from="a@example.com", rcpt_to=list(wanted) * 2)
    assert again.rcpt_to == wanted
    assert b"Bcc" not in again.data


def test_prepare_folds_long_and_non_ascii_display_names() -> None:
    """Display names too long for a line are folded; non-ASCII ones are encoded
    (or kept raw with SMTPUTF8); all parse back to the same mailboxes."""
    long_name = " ".join(["Wordy"] * 30)
    to = [
        f"{long_name} <long@example.org>",
        "Jörg Müller <j@example.org>",
        '"Back\\\\slash \\"quoted\\"" <q@example.org>',
        "=?utf-8?q?not_really?= <ew@example.org>",
        f"x{'y' * 60}@example.org",
    ]
    prepared = prepare(simple(to=to))
    assert prepared.data.isascii()
    assert max(map(len, lines(header_block(prepared.data) + b"\r\n"))) <= 78
    parsed = parse(prepared)["To"].addresses
    assert [a.display_name for a in parsed] == [
        long_name,
        "Jörg Müller",
        'Back\\slash "quoted"',
        "not really",
        "",
    ]
    utf8 = prepare(simple(to=["Jörg <jörg@example.org>"]))
    assert "To: Jörg <jörg@example.org>\r\n".encode() in utf8.data


def test_prepare_big_message_renders_like_the_email_package() -> None:
    """Bodies over 64 KiB are written by prepare itself: the bytes are those
    the email package's generator writes, line ends made CRLF."""
    body = "".join(
        ("line\n", "x" * 70 + "\r\n", "bare\r", "z" * 40)[i % 4] for i in range(20_000)
    )
    content = bytes(range(256)) * 1000
    e = simple(text=body, html="<p>hi</p>\n" * 10_000, attachments=[("a.bin", content)])
    prepared = prepare(e)
    parsed = parse(prepared)
    parts = list(parsed.walk())
    assert text_of(parts[2]) == re.sub(r"\r\n|\r", "\n", body) + "\n"
    assert parts[-1].get_content() == content
    msg = message("From: a@example.com\nTo: b@example.org")
    msg.set_content(body.encode("latin-1").decode("ascii", "surrogateescape") + "\n")
    reference = msg.as_bytes(policy=email.policy.SMTP)
    prepared = prepare(msg)
    rest = prepared.data.partition(b"\r\n\r\n")[2]
    assert rest == reference.partition(b"\r\n\r\n")[2]


def test_prepare_big_message_with_a_non_ascii_payload_is_refused() -> None:
    """A big raw payload of non-ASCII text cannot be rendered, as with a small one."""
    for count in (1, 2000):
        msg = EmailMessage(policy=email.policy.compat32)
        msg["From"] = "a@example.com"
        msg["To"] = "b@example.org"
        msg.set_payload(("é" * 50 + "\n") * count)
        with pytest.raises(InvalidMessageError, match="cannot be rendered"):
            prepare(msg)


def test_prepare_rewrites_idn_domains_inside_a_group() -> None:
    """A group keeps its name and members when its domains become A-labels."""
    msg = message("From: a@example.com\nTo: Team Ä: x@münchen.de, y@example.org;")
    prepared = prepare(msg)
    assert prepared.rcpt_to == ("x@xn--mnchen-3ya.de", "y@example.org")
    [group] = parse(prepared)["To"].groups
    assert group.display_name == "Team Ä"
    assert [a.addr_spec for a in group.addresses] == list(prepared.rcpt_to)


def test_prepare_utf8_bcc_with_non_ascii_display_name_in_to() -> None:
    """A Bcc that needs SMTPUTF8 leaves the shown headers ASCII, names encoded."""
    prepared = prepare(simple(to=["Jörg <j@example.org>"], bcc=["jörg@example.org"]))
    assert prepared.smtputf8 is False
    assert prepared.data.isascii()
    assert parse(prepared)["To"].addresses[0].display_name == "Jörg"
