"""Mailbox parsing and validation (RFC 5321 §4.1.2, RFC 5322 §3.4, RFC 6531).

Header syntax (display names, quoting, groups, comments, encoded words) is left to
the stdlib ``email`` header parser; every address it finds is then checked here,
more strictly than the parser does:

- the local part is a dot-atom (RFC 5322 §3.2.3) of at most 64 octets; UTF-8 is
  allowed (RFC 6531) but then the message needs SMTPUTF8; quoted local parts that
  need their quotes (``"john doe"@example.com``) are refused;
- the domain is a host name of at least two labels whose A-label form (IDNA 2008
  with the UTS #46 non-transitional mapping, see :mod:`._domain`) has labels of
  letters, digits and inner hyphens, at most 63 octets each and 253 in all, and a
  top-level label that is not all digits; or an address literal, ``[192.0.2.1]``
  or ``[IPv6:2001:db8::1]``;
- the whole address is at most 254 octets (RFC 5321 §4.5.3.1.3, less the brackets).
"""

from __future__ import annotations

import ipaddress
import re
from email import errors as email_errors
from email.headerregistry import Address, Group
from email.policy import SMTP

from mailstrom_async._domain import DomainError, a_label, recipient_key
from mailstrom_async._exceptions import InvalidAddressError, InvalidMessageError

__all__ = [
    "ascii_domain",
    "check_text",
    "envelope_address",
    "header_address",
    "is_utf8_address",
    "parse_address",
    "parse_address_header",
    "parse_mailbox",
    "recipient_key",
]

#: NUL, and the characters that end a line somewhere: CR and LF for SMTP, the rest
#: for ``str.splitlines()``, which the email package uses when it writes headers.
_BAD_TEXT = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00]")
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
)
_DOT_ATOM = re.compile(r"[^.]+(?:\.[^.]+)*")
# A bare ASCII addr-spec with a dot-atom local part and a host name: the common
# case, which needs no header parser (the parser gives the same Group for it).
_PLAIN_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_ADDRESS = re.compile(
    rf"({_PLAIN_ATOM}(?:\.{_PLAIN_ATOM})*)@({_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})+)"
)
_PLAIN_LOCAL = re.compile(rf"{_PLAIN_ATOM}(?:\.{_PLAIN_ATOM})*")
# "Display Name <addr-spec>" with atoms and single spaces: also the parser's Group.
_NAMED_ADDRESS = re.compile(
    rf"({_PLAIN_ATOM}(?: {_PLAIN_ATOM})*) <({_PLAIN_ATOM}(?:\.{_PLAIN_ATOM})*)@"
    rf"({_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})+)>"
)
# '"Display, Name" <addr-spec>': printable ASCII quoted without escapes.
_QUOTED_ADDRESS = re.compile(
    rf'"([ !#-\[\]-~]*)" <({_PLAIN_ATOM}(?:\.{_PLAIN_ATOM})*)@'
    rf"({_PLAIN_LABEL}(?:\.{_PLAIN_LABEL})+)>"
)
# What cutting an address list at its commas must look at (see _split_list).
_LIST_SPECIAL = re.compile(r'[\\"()\[\]<>:;,]')
_MAX_ENCODED_WORD = 200  # longer spans are not worth the risk: parse the whole
# Parser defects that only note obsolete (but unambiguous) syntax, or UTF-8 that we
# check ourselves; any other defect means the parser had to guess.
_HARMLESS_DEFECTS = (
    email_errors.ObsoleteHeaderDefect,
    email_errors.NonASCIILocalPartDefect,
)


def check_text(value: str, what: str, *, address: bool = False) -> None:
    """Refuse NUL and line breaks in *value*, a header value or an address.

    Raises:
        InvalidMessageError: (``InvalidAddressError`` when *address*) the value
            contains CR, LF, NUL or another line-breaking character.
    """
    found = _BAD_TEXT.search(value)
    if found is not None:
        bad = found.group()
        msg = f"{what} must not contain {bad!r} (CR, LF or NUL), not {value!r}"
        if address:
            raise InvalidAddressError(msg, value)
        raise InvalidMessageError(msg)


def _invalid(value: str, reason: str) -> InvalidAddressError:
    return InvalidAddressError(f"invalid email address {value!r}: {reason}", value)


def ascii_domain(domain: str, original: str | None = None) -> str:
    """Return *domain* validated, in A-label form (address literals unchanged).

    The conversion is IDNA 2008 with the UTS #46 non-transitional mapping
    (``faß.de`` is ``xn--fa-hia.de``); ASCII host names keep their case.

    Raises:
        InvalidAddressError: not a valid host name or address literal (IDNA 2008
            refuses a label, say); ``.address`` is *original* (or *domain*).
    """
    original = domain if original is None else original
    if domain.startswith("["):
        return _check_literal(domain, original)
    try:
        # RFC 5890: non-ASCII labels go on the wire as "xn--" A-labels; the
        # conversion is cached (thousands of recipients share a few domains).
        ascii_form = a_label(domain)
    except DomainError as exc:
        raise _invalid(original, str(exc)) from None
    if "." not in ascii_form:
        reason = f"the domain {domain!r} must have at least two labels (a dot)"
        raise _invalid(original, reason)
    return ascii_form


def _check_literal(domain: str, original: str) -> str:
    """Validate an address literal (RFC 5321 §4.1.3); return it as given.

    ``[IPv4]`` is a dotted quad of decimal octets without leading zeros (``010``
    reads as octal to some software); ``[IPv6:address]`` (the tag in any case) is
    an IPv6 address in one of RFC 5321's forms, without a zone (``%eth0``).
    General address literals (``[tag:content]``) name no address we can reach.
    """
    inner = domain[1:-1] if domain.endswith("]") else domain[1:]
    tag, colon, content = inner.partition(":")
    if colon and tag.lower() != "ipv6":
        reason = (
            f"the general address literal {domain!r} is not supported: only "
            "[IPv4] and [IPv6:address] literals can be delivered"
        )
        raise _invalid(original, reason)
    if not domain.endswith("]"):
        raise _invalid(original, f"the address literal {domain!r} lacks its ']'")
    if colon:
        problem = _ipv6_literal_problem(content)
        if problem is not None:
            reason = (
                f"the address literal {domain!r} is not a valid IPv6 address: {problem}"
            )
            raise _invalid(original, reason)
        return domain
    try:
        ipaddress.IPv4Address(inner)
    except ValueError as exc:
        reason = (
            f"the address literal {domain!r} is not a dotted-quad IPv4 address "
            f"(four decimal octets 0-255, no leading zeros): {exc}"
        )
        raise _invalid(original, reason) from None
    return domain


def _ipv6_literal_problem(text: str) -> str | None:
    """Why *text* is not an RFC 5321 IPv6 address literal, or None."""
    if "%" in text:
        return "a zone index ('%...') has no meaning in an address"
    try:
        ipaddress.IPv6Address(text)
    except ValueError as exc:
        return str(exc)
    if "::" in text:
        # RFC 5321 §4.1.3: "::" stands for at least two groups of zeros, so at
        # most 6 groups (4 with a trailing IPv4 address) may stand beside it.
        head, _, v4 = text.rpartition(":") if "." in text else (text, "", "")
        groups = [g for g in head.split(":") if g]
        most = 4 if v4 else 6
        if len(groups) > most:
            return f"'::' must stand for two or more groups ({most} others at most)"
    return None


def _check_mailbox(local: str, domain: str, original: str) -> str:
    """Validate one address's parts; return the domain's A-label form."""
    # RFC 5322 §3.2.3 dot-atom; RFC 6531 §3.3 adds UTF-8 (printable, no spaces).
    if not _DOT_ATOM.fullmatch(local):
        reason = "the local part must be dot-separated words (no empty ones)"
        raise _invalid(original, reason)
    if not _PLAIN_LOCAL.fullmatch(local):  # else every character is atext
        for c in local:
            if c not in _ATEXT and (c.isascii() or not c.isprintable() or c.isspace()):
                raise _invalid(original, f"the local part must not contain {c!r}")
    if len(local.encode()) > 64:
        raise _invalid(original, "the local part is longer than 64 octets")
    ascii_form = ascii_domain(domain, original)
    if len(local.encode()) + 1 + len(ascii_form) > 254:
        raise _invalid(original, "it is longer than 254 octets")
    return ascii_form


def parse_address_header(name: str, value: str) -> tuple[Group, ...]:
    """Parse an address-list header value into groups of validated addresses.

    A plain address comes back as a ``Group`` whose ``display_name`` is ``None``.
    Linear in the length of *value*: the list is cut at its top-level commas and
    each element parsed on its own (the stdlib parser copies the rest of the
    value at every token, which is quadratic on a list of thousands). The
    outcome is exactly that of parsing the whole value at once: where the cut
    could differ from the parser's own reading (an encoded word that spans a
    special character, an element the parser finds fault with), the whole value
    is parsed as before.

    Raises:
        InvalidAddressError: the value does not parse cleanly, or an address in it
            is invalid.
    """
    check_text(value, f"the {name} header", address=True)
    pieces = _split_list(value)
    if pieces is None or len(pieces) == 1:
        return _parse_whole(value)
    groups: list[Group] = []
    for piece in pieces:
        parsed = _parse_piece(piece)
        if parsed is None:
            return _parse_whole(value)  # let the whole value speak for itself
        groups.extend(parsed)
    for group in groups:
        for a in group.addresses:
            _check_mailbox(a.username, a.domain, a.addr_spec)
    return tuple(groups)


def _parse_whole(value: str) -> tuple[Group, ...]:
    """Parse *value* in one go (one element, or the fallback of the split)."""
    fast = _fast_groups(value.strip(" \t"))
    if fast is not None:
        [address] = fast[0].addresses
        _check_mailbox(address.username, address.domain, address.addr_spec)
        return fast
    try:
        header = SMTP.header_factory("to", value)
        groups: tuple[Group, ...] = header.groups
    except Exception:
        # The stdlib parser fails in assorted ways on some malformed values
        # (HeaderParseError, IndexError, AttributeError, ...).
        raise _invalid(value, "it cannot be parsed") from None
    bad = [d for d in header.defects if not isinstance(d, _HARMLESS_DEFECTS)]
    if bad:
        raise _invalid(value, str(bad[0]))
    for group in groups:
        for a in group.addresses:
            _check_mailbox(a.username, a.domain, a.addr_spec)
    return groups


def _fast_groups(stripped: str) -> tuple[Group, ...] | None:
    """The parser's Group for the common forms of one mailbox, found by a regex.

    ``addr@example.com``, ``Name Words <addr@example.com>`` and
    ``"Any, Name" <addr@example.com>`` (printable ASCII, single spaces between
    words): what the header parser gives for them, unchecked; None for anything
    else, or for text with an encoded word (``=?``) the parser would decode.
    """
    plain = _PLAIN_ADDRESS.fullmatch(stripped)
    if plain is not None:
        local, domain = plain.groups()
        return (Group(None, (Address(username=local, domain=domain),)),)
    if "=?" in stripped:
        return None
    named = _NAMED_ADDRESS.fullmatch(stripped) or _QUOTED_ADDRESS.fullmatch(stripped)
    if named is None:
        return None
    display, local, domain = named.groups()
    return (Group(None, (Address(display, local, domain),)),)


def _parse_piece(piece: str) -> tuple[Group, ...] | None:
    """Groups of one list element, unchecked; None if the parser finds a fault."""
    stripped = piece.strip(" \t")
    if not stripped:
        return ()  # an empty element: obsolete syntax the parser accepts
    fast = _fast_groups(stripped)
    if fast is not None:
        return fast
    try:
        header = SMTP.header_factory("to", piece)
        groups: tuple[Group, ...] = header.groups
    except Exception:
        return None
    if any(not isinstance(d, _HARMLESS_DEFECTS) for d in header.defects):
        return None
    return groups


def _split_list(value: str) -> list[str] | None:
    """Cut an address list at its top-level commas; None when unsure where.

    Commas inside quoted strings, comments, domain literals, angle brackets
    (obsolete routes) and groups (``name: a, b;``) do not cut; a backslash
    escapes the next character everywhere. An encoded word is opaque to the
    stdlib parser (it may hide a quote or a comma), so a value in which one
    could cover one of those characters is not cut at all.
    """
    if "=?" in value and not _encoded_words_are_plain(value):
        return None
    pieces: list[str] = []
    start = skip = 0
    comment = 0
    quoted = literal = angle = group = False
    for match in _LIST_SPECIAL.finditer(value):
        i = match.start()
        if i < skip:
            continue  # escaped by a backslash
        c = value[i]
        if c == "\\":
            skip = i + 2
        elif quoted:
            quoted = c != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(c, 0)
        elif literal:
            literal = c != "]"
        elif c == '"':
            quoted = True
        elif c == "(":
            comment = 1
        elif c == "[":
            literal = True
        elif angle:
            angle = c != ">"
        elif c == "<":
            angle = True
        elif c == ":":
            group = True
        elif c == ";":
            group = False
        elif c == "," and not group:
            pieces.append(value[start:i])
            start = i + 1
    pieces.append(value[start:])
    return pieces


def _encoded_words_are_plain(value: str) -> bool:
    """True if no text the parser may read as one encoded word holds a special.

    The parser takes ``=?`` up to the next ``?=`` as an encoded word, or up to
    the one after it when fewer than two ``?`` came between (CPython's
    ``get_encoded_word``); whether it then decodes or not, a span free of the
    characters the list is cut on reads the same either way.
    """
    start = value.find("=?")
    while start != -1:
        first = value.find("?=", start + 2)
        if first == -1:
            return True  # no encoded word can start here or later
        end = first + 2
        if value.count("?", start + 2, first) < 2:
            second = value.find("?=", end)
            end = len(value) if second == -1 else second + 2
        if end - start > _MAX_ENCODED_WORD or _LIST_SPECIAL.search(value, start, end):
            return False
        start = value.find("=?", start + 2)
    return True


def parse_mailbox(value: str) -> Address:
    """Parse one mailbox, ``addr@example.com`` or ``Name <addr@example.com>``.

    Raises:
        InvalidAddressError: not exactly one valid mailbox.
    """
    groups = parse_address_header("address", value)
    if len(groups) != 1 or groups[0].display_name is not None:
        raise _invalid(value, "expected exactly one mailbox, not a list or a group")
    (address,) = groups[0].addresses
    return address


def parse_address(value: str) -> str:
    """Return the bare address of the mailbox *value*, validated.

    Accepts ``addr@example.com``, ``<addr@example.com>`` and
    ``Display Name <addr@example.com>``; returns ``local@domain`` with both parts
    as given (an internationalised domain stays in Unicode).

    Raises:
        InvalidAddressError: *value* is not exactly one valid mailbox.
    """
    address = parse_mailbox(value)
    return f"{address.username}@{address.domain}"


def envelope_address(value: str) -> str:
    """Return the form of the mailbox *value* used in SMTP ``MAIL``/``RCPT``.

    Like :func:`parse_address`, but an internationalised domain is converted to its
    A-label (``xn--``) form; the local part is kept as given (non-ASCII local parts
    need a server that offers SMTPUTF8).

    Raises:
        InvalidAddressError: *value* is not exactly one valid mailbox.
    """
    address = parse_mailbox(value)
    return f"{address.username}@{ascii_domain(address.domain)}"


def is_utf8_address(address: str) -> bool:
    """True when the address's local part is not ASCII (it needs SMTPUTF8)."""
    return not address.rpartition("@")[0].isascii()


def header_address(address: Address) -> Address:
    """Return *address* with an A-label domain if that makes it all ASCII.

    The email package would write a non-ASCII domain as an RFC 2047 encoded word,
    which is not allowed in an address; an address whose local part is not ASCII
    stays as it is and makes the message need SMTPUTF8 (RFC 6532).
    """
    if address.domain.isascii() or not address.username.isascii():
        return address
    return Address(address.display_name, address.username, ascii_domain(address.domain))
