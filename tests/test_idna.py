"""Internationalised domain names go to DNS and the wire in IDNA 2008 form (issue 11).

IDNA 2008 with the UTS #46 non-transitional mapping: ``ß`` and the final sigma
(U+03C2) are kept (IDNA 2003, the stdlib ``idna`` codec, turned them into ``ss``
and U+03C3: another registrable domain), joiners are allowed only where their ContextJ
rule says, and labels IDNA 2008 refuses are an ``InvalidAddressError`` at
``prepare()``/``submit()`` naming the address. The expected A-labels are checked
against the stdlib's RFC 3492 Punycode of the U-label, not just written down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest

from mailstrom_async import (
    Config,
    Deliverer,
    Email,
    InvalidAddressError,
    MemoryStore,
    MXConfig,
    RecipientState,
    RetryPolicy,
    Timeouts,
    _address,
    _domain,
    prepare,
)
from tests.smtpd import free_port

if TYPE_CHECKING:
    from tests.dns_server import DNSServer
    from tests.smtpd import SMTPDServers

ZWJ, ZWNJ = "\u200d", "\u200c"
VIRAMA_KSSA = "\u0915\u094d\u200d\u0937"  # क्‍ष: ka, virama, ZWJ, ssa


def punycode(u_label: str) -> str:
    """The A-label of *u_label* by RFC 3492 alone (the stdlib's codec)."""
    return "xn--" + u_label.encode("punycode").decode("ascii")


@pytest.mark.parametrize(
    ("domain", "u_labels", "expected"),
    [
        # ß is a letter of its own in IDNA 2008 (IDNA 2003: fass.de)
        ("faß.de", ["faß", "de"], "xn--fa-hia.de"),
        # the final sigma is kept (IDNA 2003: σοφοσ, xn--0xaakcn)
        ("σοφος.gr", ["σοφος", "gr"], "xn--0xaajbq.gr"),
        # UTS #46 mapping: upper case folded, full-width forms and 。 narrowed
        ("Bücher.Example", ["bücher", "example"], "xn--bcher-kva.example"),
        ("ＢÜＣＨＥＲ．ｅｘａｍｐｌｅ", ["bücher", "example"], "xn--bcher-kva.example"),  # noqa: RUF001
        ("München。DE", ["münchen", "de"], "xn--mnchen-3ya.de"),
        # a ZWJ right after a virama is allowed (RFC 5892 Appendix A.2) and kept
        (f"{VIRAMA_KSSA}.test", [VIRAMA_KSSA, "test"], "xn--11b2ezcw70k.test"),
    ],
)
def test_unicode_domain_becomes_its_idna_2008_a_label(
    domain: str, u_labels: list[str], expected: str
) -> None:
    """A Unicode domain is mapped (UTS #46, non-transitional) and converted to the
    Punycode A-label of each mapped label."""
    assert expected == ".".join(punycode(u) if not u.isascii() else u for u in u_labels)
    assert _address.ascii_domain(domain) == expected
    prepared = prepare(
        Email(sender="me@sender.test", to=[f"ada@{domain}"], subject="x", text="y\n")
    )
    assert prepared.rcpt_to == (f"ada@{expected}",)
    assert f"To: ada@{expected}\r\n".encode() in prepared.data


@pytest.mark.parametrize(
    ("domain", "idna_2003"),
    [("faß.de", "fass.de"), ("σοφος.gr", "xn--0xaakcn.gr")],
)
def test_not_the_idna_2003_domain(domain: str, idna_2003: str) -> None:
    """The stdlib codec's IDNA 2003 answer, another registrable domain, is never
    what goes out."""
    assert domain.encode("idna").decode() == idna_2003
    assert _address.ascii_domain(domain) != idna_2003


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        # a ZWJ not after a virama (IDNA 2003 dropped it silently: ab.test)
        (f"a{ZWJ}b.test", "U+200D"),
        (f"a{ZWNJ}b.test", "U+200C"),
        # DISALLOWED in IDNA 2008 (IDNA 2003 allowed it)
        ("\U0001f4a9.test", "U+1F4A9"),
        # the same as an A-label: decoded and checked, not trusted
        ("xn--ls8h.test", "U+1F4A9"),
        # the bidi rule: a right-to-left label cannot start with a European digit
        ("1\u05d0.test", "directionality"),
        # malformed and non-canonical A-labels
        ("xn--zca-.test", "hyphen"),
        ("xn---bbk.test", "canonical"),
    ],
)
def test_label_idna_2008_refuses_is_an_invalid_address(
    domain: str, reason: str
) -> None:
    """prepare() refuses an address whose domain IDNA 2008 refuses, with an
    InvalidAddressError that names the address and says why."""
    address = f"ada@{domain}"
    with pytest.raises(InvalidAddressError) as info:
        prepare(Email(sender="me@sender.test", to=[address], subject="x", text="y"))
    assert info.value.address == address
    assert "IDNA 2008" in str(info.value)
    assert reason in str(info.value)
    assert repr(address) in str(info.value)


def test_refused_sender_and_envelope_addresses() -> None:
    """mail_from= and rcpt_to= go through the same IDNA 2008 check."""
    message = Email(sender="me@sender.test", to=["a@ok.test"], subject="x", text="y")
    with pytest.raises(InvalidAddressError) as info:
        prepare(message, mail_from=f"bounce@a{ZWJ}b.test")
    assert info.value.address == f"bounce@a{ZWJ}b.test"
    with pytest.raises(InvalidAddressError) as info:
        prepare(message, rcpt_to=["ok@ok.test", "x@xn--ls8h.test"])
    assert info.value.address == "x@xn--ls8h.test"


@pytest.mark.parametrize(
    "domain", ["r1---sn-abc.example", "Example.COM", "XN--fa-hia.de", "a-b.c1"]
)
def test_ascii_host_names_are_left_alone(domain: str) -> None:
    """ASCII labels that are not xn-- labels are plain host names (IDNA leaves
    them alone: hyphens in places 3 and 4 are fine, case is kept); a valid xn--
    label in any case passes as it is."""
    assert _address.ascii_domain(domain) == domain


def test_conversion_is_cached() -> None:
    """A domain is converted once, however many recipients share it."""
    _domain.a_label.cache_clear()
    for _ in range(3):
        assert _address.ascii_domain("faß.de") == "xn--fa-hia.de"
    info = _domain.a_label.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_idn_recipients_deduplicate_on_their_a_label() -> None:
    """Two spellings of one IDN domain are one recipient."""
    prepared = prepare(
        Email(
            sender="me@sender.test",
            to=["ada@faß.de", "ada@Faß.DE", "ada@xn--fa-hia.de"],
            subject="x",
            text="y",
        )
    )
    assert prepared.rcpt_to == ("ada@xn--fa-hia.de",)


# -- end to end: the MX query and RCPT TO carry the IDNA 2008 A-label ---------------

IP_RIGHT, IP_WRONG = "127.0.0.2", "127.0.0.3"


async def test_mx_delivery_to_idn_domain_queries_and_sends_the_a_label(
    dns_server: DNSServer, smtpd: SMTPDServers
) -> None:
    """Delivery to ``faß.test`` and ``σοφος.test`` in MX mode asks the DNS server
    for the MX of their IDNA 2008 A-labels (never of ``fass.test`` or of the
    IDNA 2003 ``σοφοσ``), and RCPT TO carries the A-label domain."""
    zone = dns_server.zone
    faß, sophos = "xn--fa-hia.test", "xn--0xaajbq.test"
    for name in (faß, sophos):
        zone.add_mx(name, 10, "mx.right.test")
    zone.add_a("mx.right.test", IP_RIGHT)
    # the IDNA 2003 names exist too, with another mail server: a trap
    for name in ("fass.test", "xn--0xaakcn.test"):
        zone.add_mx(name, 10, "mx.wrong.test")
    zone.add_a("mx.wrong.test", IP_WRONG)
    port = free_port(IP_RIGHT)
    right = await smtpd.start(host=IP_RIGHT, port=port)
    wrong = await smtpd.start(host=IP_WRONG, port=port)
    config = Config(
        helo_name="client.test",
        mx=MXConfig(nameservers=[dns_server.nameserver], port=port, allow_local=True),
        timeouts=Timeouts(connect=2, command=2, data_start=2, data_end=2, dns=0.5),
        retry=RetryPolicy(initial_delay=0.01, jitter=0, max_delay=0.05, max_attempts=5),
    )
    message = Email(
        sender="me@sender.test",
        to=["ada@faß.test", "bob@σοφος.test"],
        subject="x",
        text="y\n",
    )
    async with Deliverer(config, store=MemoryStore()) as d:
        with anyio.fail_after(10):
            status = await (await d.submit(message))
    assert [(r.address, r.state) for r in status] == [
        (f"ada@{faß}", RecipientState.DELIVERED),
        (f"bob@{sophos}", RecipientState.DELIVERED),
    ]
    assert zone.count(faß, "MX") > 0
    assert zone.count(sophos, "MX") > 0
    assert zone.count("fass.test") == 0
    assert zone.count("xn--0xaakcn.test") == 0
    assert sorted(r for m in right.messages for r in m.rcpt_tos) == [
        f"ada@{faß}",
        f"bob@{sophos}",
    ]
    assert wrong.messages == []
    assert wrong.connections.value == 0
