"""Tests for mailstrom_async._address: address lists parsed in linear time."""

from __future__ import annotations

import re
from collections.abc import Callable
from email.headerregistry import Address, Group

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstrom_async import Email, _address, prepare
from mailstrom_async._exceptions import InvalidAddressError

# Elements that exercise every reason not to cut a list at a comma: quoted
# strings, comments, domain literals, obsolete routes, groups, escapes, encoded
# words (valid, and ones that would hide a quote or a comma), broken syntax.
_ELEMENTS = [
    "a@b.com",
    "A B <c@d.com>",
    '"x, y" <e@f.org>',
    "(c, m) g@h.net",
    "g: i@j.com, k@l.com;",
    "=?utf-8?q?J=C3=B6rg?= <j@x.com>",
    '"=?utf-8?q?a"b?=" <q@x.com>',
    "<@r,@s:t@u.com>",
    "v@[127.0.0.1]",
    "w\\,x@y.com",
    "undisclosed:;",
    "",
    " ",
    "=?utf-8?q?a,b?=@c.com",
    "x@y.com (a(b)c)",
    '"a\\"b" <c@d.com>',
    "m@n.com>",
    "<o@p.com",
    "p@q.com;",
    "r@s.com:",
    "Name  Two <t@u.com>",
    "n.m <o@p.com>",
    "=?x?=",
    "=?utf-8?q?=41?= <z@z.com>",
    '"  spaced  " <s@p.com>',
]
_elements = st.one_of(
    st.sampled_from(_ELEMENTS),
    st.sampled_from(_ELEMENTS).map(lambda e: f" {e} "),
    st.text(alphabet='ab@.,;:<>()[]"\\ =?', max_size=12),
    st.text(alphabet='a@.,=?q_"<>', max_size=20),
)


def outcome(parse: Callable[[str], object], value: str) -> object:
    try:
        return parse(value)
    except InvalidAddressError:
        return "invalid"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    elements=st.lists(_elements, min_size=1, max_size=6),
    separator=st.sampled_from([",", ", ", " ,", ",,"]),
)
def test_cut_list_parses_like_the_whole_value(
    elements: list[str], separator: str
) -> None:
    """Cutting a list at its commas gives exactly what parsing it whole gives:
    the same groups, or a refusal."""
    value = separator.join(elements)
    cut = outcome(lambda v: _address.parse_address_header("To", v), value)
    assert cut == outcome(_address._parse_whole, value)


def test_long_list_parses_every_form() -> None:
    """10,000 addresses in the common forms come back in order, with their names."""
    forms = [
        "r{i}@d{m}.example.com",
        "Recipient {i} <r{i}@d{m}.example.com>",
        '"Last, First {i}" <r{i}@d{m}.example.com>',
        "=?utf-8?q?J=C3=B6rg_{i}?= <r{i}@d{m}.example.com>",
        "(comment {i}) r{i}@d{m}.example.com",
    ]
    value = ", ".join(forms[i % 5].format(i=i, m=i % 7) for i in range(10_000))
    groups = _address.parse_address_header("To", value)
    assert len(groups) == 10_000
    assert all(g.display_name is None and len(g.addresses) == 1 for g in groups)
    assert [g.addresses[0].addr_spec for g in groups] == [
        f"r{i}@d{i % 7}.example.com" for i in range(10_000)
    ]
    names = [g.addresses[0].display_name for g in groups[:5]]
    assert names == ["", "Recipient 1", "Last, First 2", "Jörg 3", ""]


def test_group_in_a_long_list() -> None:
    """A group keeps its members, and what follows it is parsed as usual."""
    value = "a@x.com, team: b@x.com, c@x.com;, d@x.com"
    assert _address.parse_address_header("To", value) == (
        Group(None, (Address(username="a", domain="x.com"),)),
        Group(
            "team",
            (
                Address(username="b", domain="x.com"),
                Address(username="c", domain="x.com"),
            ),
        ),
        Group(None, (Address(username="d", domain="x.com"),)),
    )


@pytest.mark.parametrize(
    "value",
    [
        "ok@example.org, b@exa mple.org",
        "ok@example.org, b@",
        "ok@example.org, bad@-x-.org, c@example.org",
        'ok@example.org, "unterminated <u@example.org>',
    ],
)
def test_an_invalid_element_is_refused_as_before(value: str) -> None:
    """An invalid element in a list is refused with the whole value's own error."""
    with pytest.raises(InvalidAddressError) as cut:
        _address.parse_address_header("To", value)
    with pytest.raises(InvalidAddressError) as whole:
        _address._parse_whole(value)
    assert str(cut.value) == str(whole.value)
    assert cut.value.address == whole.value.address


def test_domain_cache_keeps_only_valid_domains() -> None:
    """A domain is converted once, and an invalid one is refused every time."""
    for _ in range(2):
        assert _address.ascii_domain("Bücher.example") == "xn--bcher-kva.example"
        with pytest.raises(InvalidAddressError):
            _address.ascii_domain("bad_domain.example")


_ATOM = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
_QUOTABLE = st.text(
    alphabet=[chr(c) for c in range(32, 127) if chr(c) not in '"\\'], max_size=15
)


@given(
    words=st.lists(_ATOM, min_size=1, max_size=4),
    quoted=_QUOTABLE,
    use_quoted=st.booleans(),
)
def test_named_fast_paths_agree_with_the_header_parser(
    words: list[str], quoted: str, use_quoted: bool
) -> None:
    """'Name <addr>' and '"Quoted" <addr>' skip the stdlib header parser; the
    groups are those the parser gives (an encoded word goes to the parser)."""
    name = f'"{quoted}"' if use_quoted else " ".join(words)
    value = f"{name} <a.b@example.org>"
    fast = _address._parse_whole(value)
    slow = _address._parse_whole(value + " (x)")  # a comment defeats the fast path
    assert fast == slow


# -- address literals (RFC 5321 §4.1.3) ---------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "u@[127.0.0.1]",
        "u@[192.0.2.255]",
        "u@[IPv6:::1]",
        "u@[ipv6:2001:db8::1]",
        "u@[IPv6:2001:db8:0:0:0:0:0:1]",
        "u@[IPv6:1:2:3:4:5:6::]",
        "u@[IPv6:::ffff:192.0.2.1]",
        "u@[IPv6:1:2:3:4::192.0.2.1]",
    ],
)
def test_address_literal_accepted_at_prepare(address: str) -> None:
    """IPv4 dotted quads and IPv6 literals in RFC 5321's forms pass prepare() and
    go into the envelope as given."""
    prepared = prepare(Email(sender="s@example.test", to=[address], text="x\n"))
    assert prepared.rcpt_to == (address,)


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        ("[tag:content]", "general address literal '[tag:content]' is not supported"),
        ("[x-smtp:host]", "general address literal"),
        ("[01.2.3.4]", "leading zeros"),
        ("[127.000.0.1]", "leading zeros"),
        ("[256.1.1.1]", "is not a dotted-quad IPv4 address"),
        ("[1.2.3]", "is not a dotted-quad IPv4 address"),
        ("[1.2.3.4.5]", "is not a dotted-quad IPv4 address"),
        ("[0x7f.0.0.1]", "is not a dotted-quad IPv4 address"),
        ("[IPv6:fe80::1%eth0]", "zone index"),
        ("[IPv6:1:2:3:4:5:6:7::]", "'::' must stand for two or more groups"),
        ("[IPv6:1:2:3:4:5::192.0.2.1]", "'::' must stand for two or more groups"),
        ("[IPv6:1::2::3]", "is not a valid IPv6 address"),
        ("[IPv6:127.0.0.1]", "is not a valid IPv6 address"),
        ("[IPv6:]", "is not a valid IPv6 address"),
    ],
)
def test_bad_address_literal_refused_at_prepare(literal: str, reason: str) -> None:
    """A general address literal, or an IPv4/IPv6 literal that is not strictly
    valid, is an InvalidAddressError naming the address and the reason."""
    address = f"u@{literal}"
    with pytest.raises(InvalidAddressError, match=re.escape(reason)) as info:
        prepare(Email(sender="s@example.test", to=[address], text="x\n"))
    assert info.value.address == address
    assert repr(address) in str(info.value)
