"""Domain names on the wire: IDNA 2008 A-labels, host-name rules, comparison keys.

The one module that imports :mod:`idna` (IDNA 2008, RFC 5890-5893, with the
UTS #46 non-transitional mapping). Every domain that goes to DNS or into an SMTP
command passes through :func:`a_label`: a Unicode domain is mapped (case folded,
full-width forms narrowed, ``。`` read as a dot) and converted label by label, so
``faß.de`` is ``xn--fa-hia.de`` and never ``fass.de`` (IDNA 2003), and a label
IDNA 2008 refuses (a joiner out of context, a disallowed code point, a bidi
violation, a malformed ``xn--`` label) raises :class:`DomainError`. ASCII labels
that are not ``xn--`` labels are plain host-name labels (RFC 1123), which IDNA
leaves alone: they keep their case, and only the letters-digits-hyphens rule
applies to them.

:class:`DomainError` is a :class:`ValueError` whose text is the reason; the
callers turn it into their own errors (``InvalidAddressError`` for an address,
``ConfigError`` for a setting). Nothing here imports from the package.
"""

from __future__ import annotations

import contextlib
import functools
import re

import idna

__all__ = ["DomainError", "a_label", "domain_key", "recipient_key"]

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_MAX_LABEL = 63
_MAX_DOMAIN = 253
_CACHE = 4096  # recipients share few domains: each is converted once

# Load the UTS #46 mapping table at import, not on first use, which might be
# inside the event loop (idna imports it lazily). Non-transitional processing
# (``ß`` stays ``ß``, ``ς`` stays ``ς``) is idna's default, and since Unicode 15.1
# the only one; its ``transitional`` argument is deprecated, so it is not passed.
idna.uts46_remap("\u00df", std3_rules=True)


class DomainError(ValueError):
    """A domain is not a valid host name; the text says why."""


@functools.lru_cache(maxsize=_CACHE)
def a_label(domain: str) -> str:
    """Return the host name *domain* in A-label form, validated.

    ASCII domains come back as given (their case kept); a domain with non-ASCII
    characters comes back mapped and converted (lower case). Each label is
    letters, digits and inner hyphens, at most 63 octets, 253 in all, and the
    last label is not all digits (an IP address is not a host name).

    Raises:
        DomainError: IDNA 2008 refuses a label, or the result is not a host name.
    """
    ascii_form = domain if domain.isascii() else _convert(domain)
    labels = ascii_form.split(".")
    for label in labels:
        if label[:4].lower() == "xn--":
            _check_a_label(domain, label)
    if len(ascii_form) > _MAX_DOMAIN or not all(
        len(x) <= _MAX_LABEL and _LABEL.fullmatch(x) for x in labels
    ):
        msg = (
            f"the domain {domain!r} is not a host name (labels of letters, digits "
            "and inner hyphens, at most 63 octets each and 253 in all)"
        )
        raise DomainError(msg)
    if labels[-1].isdigit():
        msg = f"an IP address must be written as a literal, e.g. '[{domain}]'"
        raise DomainError(msg)
    return ascii_form


def _refused(domain: str, exc: UnicodeError) -> DomainError:
    reason = str(exc) or type(exc).__name__
    msg = f"the domain {domain!r} cannot be converted to an IDNA 2008 A-label: {reason}"
    return DomainError(msg)


def _convert(domain: str) -> str:
    """Map *domain* (UTS #46, non-transitional) and convert its non-ASCII labels."""
    try:
        mapped = idna.uts46_remap(domain, std3_rules=True)
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        )
    except UnicodeError as exc:  # idna.IDNAError is a UnicodeError
        raise _refused(domain, exc) from None


def _check_a_label(domain: str, label: str) -> None:
    """Refuse an ``xn--`` label that is not the A-label of a valid U-label."""
    try:
        idna.ulabel(label)
    except UnicodeError as exc:
        raise _refused(domain, exc) from None


def domain_key(domain: str) -> str:
    """The form in which *domain* is compared: its A-label, lower-cased.

    A domain that has no A-label (a literal, or an invalid one) is compared
    lower-cased as it is. Never raises.
    """
    if not domain.isascii():
        with contextlib.suppress(DomainError):
            domain = a_label(domain)
    return domain.lower()


def recipient_key(address: str) -> tuple[str, str]:
    """The identity of an envelope address: local part as is, domain by its key.

    RFC 5321 §2.4: the local part may be case-sensitive, the domain is not. Every
    layer (``prepare()``'s deduplication, the stores, the outcomes of a job, the
    status lookups, the testing kit) compares addresses by this key alone.
    """
    local, _, domain = address.rpartition("@")
    return local, domain_key(domain)
