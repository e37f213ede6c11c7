"""Tests for mailstrom_async._exceptions: the exception hierarchy."""

from __future__ import annotations

import re

import pytest

import mailstrom_async
from mailstrom_async import _exceptions
from mailstrom_async._exceptions import (
    ConfigError,
    ConnectError,
    DelivererClosedError,
    DeliveryError,
    DeliveryExpiredError,
    DeliveryTimeoutError,
    DNSTemporaryError,
    InvalidAddressError,
    InvalidMessageError,
    MailstromError,
    NoMailServerError,
    PermanentDeliveryError,
    PermanentRejectionError,
    ProtocolError,
    StoreError,
    TemporaryRejectionError,
    TLSRequiredError,
    TransientDeliveryError,
    UnknownMessageError,
)
from mailstrom_async._models import SMTPReply

ALL_CLASSES: list[type[MailstromError]] = [
    getattr(_exceptions, name) for name in _exceptions.__all__
]

TRANSIENT = [
    ConnectError,
    DeliveryTimeoutError,
    ProtocolError,
    DNSTemporaryError,
    TemporaryRejectionError,
    TLSRequiredError,
]
PERMANENT = [PermanentRejectionError, NoMailServerError, DeliveryExpiredError]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_exception_is_a_mailstrom_error(cls: type[Exception]) -> None:
    """Every exception class in the module derives from MailstromError."""
    assert issubclass(cls, MailstromError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (InvalidMessageError, ValueError),
        (InvalidAddressError, ValueError),
        (ConfigError, ValueError),
        (DelivererClosedError, RuntimeError),
        (UnknownMessageError, LookupError),
        (ConnectError, ConnectionError),
        (DeliveryTimeoutError, TimeoutError),
    ],
    ids=lambda c: c.__name__,
)
def test_builtin_bases(cls: type[Exception], builtin: type[Exception]) -> None:
    """Exceptions that mirror a built-in error are also that built-in error."""
    assert issubclass(cls, builtin)


def test_builtin_bases_are_not_over_applied() -> None:
    """Classes without a built-in twin do not accidentally inherit one."""
    for cls in (StoreError, DeliveryError, ProtocolError, PermanentDeliveryError):
        assert not issubclass(cls, ValueError | RuntimeError | LookupError | OSError)
    assert not issubclass(ConfigError, InvalidMessageError)
    assert not issubclass(InvalidMessageError, ConfigError)


def test_invalid_address_error_carries_address() -> None:
    """InvalidAddressError is an InvalidMessageError and keeps the offending address."""
    exc = InvalidAddressError("bad address", "not an address")
    assert isinstance(exc, InvalidMessageError)
    assert exc.address == "not an address"
    assert str(exc) == "bad address"


@pytest.mark.parametrize("key", ["relay.host", None])
def test_config_error_carries_key(key: str | None) -> None:
    """ConfigError keeps the dotted key it is about (None when unknown)."""
    exc = ConfigError("wrong", key)
    assert exc.key == key
    assert str(exc) == "wrong"


def test_config_error_key_defaults_to_none() -> None:
    """ConfigError built from a message alone has key None."""
    assert ConfigError("wrong").key is None


def test_unknown_message_error_carries_id() -> None:
    """UnknownMessageError keeps the id asked for and names it in its message."""
    exc = UnknownMessageError("abc-123")
    assert exc.message_id == "abc-123"
    assert "'abc-123'" in str(exc)
    with pytest.raises(LookupError):
        raise exc


@pytest.mark.parametrize("cls", TRANSIENT, ids=lambda c: c.__name__)
def test_transient_subtree(cls: type[DeliveryError]) -> None:
    """Transient errors are TransientDeliveryError, never PermanentDeliveryError."""
    assert issubclass(cls, TransientDeliveryError)
    assert issubclass(cls, DeliveryError)
    assert not issubclass(cls, PermanentDeliveryError)


@pytest.mark.parametrize("cls", PERMANENT, ids=lambda c: c.__name__)
def test_permanent_subtree(cls: type[DeliveryError]) -> None:
    """Permanent errors are PermanentDeliveryError, never TransientDeliveryError."""
    assert issubclass(cls, PermanentDeliveryError)
    assert issubclass(cls, DeliveryError)
    assert not issubclass(cls, TransientDeliveryError)


def test_delivery_subtrees_cover_every_delivery_error() -> None:
    """Every DeliveryError class in the module is classified transient or permanent."""
    delivery = {
        c
        for c in ALL_CLASSES
        if issubclass(c, DeliveryError)
        and c not in (DeliveryError, TransientDeliveryError, PermanentDeliveryError)
    }
    assert delivery == set(TRANSIENT) | set(PERMANENT)


_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@pytest.mark.parametrize(
    "cls", [TransientDeliveryError, *TRANSIENT], ids=lambda c: c.__name__
)
def test_transient_default_enhanced_code(cls: type[DeliveryError]) -> None:
    """Transient errors default to a well-formed 4.x.x enhanced code."""
    assert _ENHANCED.match(cls.default_enhanced_code)
    assert cls.default_enhanced_code.startswith("4.")


@pytest.mark.parametrize(
    "cls", [PermanentDeliveryError, *PERMANENT], ids=lambda c: c.__name__
)
def test_permanent_default_enhanced_code(cls: type[DeliveryError]) -> None:
    """Permanent errors default to a well-formed 5.x.x enhanced code."""
    assert _ENHANCED.match(cls.default_enhanced_code)
    assert cls.default_enhanced_code.startswith("5.")


def test_expired_default_enhanced_code_is_5_4_7() -> None:
    """Giving up after the retry lifetime reports RFC 3463's 5.4.7 (delivery time expired)."""
    assert DeliveryExpiredError.default_enhanced_code == "5.4.7"


def test_delivery_error_attributes() -> None:
    """DeliveryError keeps its reply and host, both None by default."""
    bare = TemporaryRejectionError("later")
    assert bare.reply is None
    assert bare.host is None
    assert str(bare) == "later"
    reply = SMTPReply(452, "mailbox full", "4.2.2")
    exc = TemporaryRejectionError("later", reply=reply, host="mx.example.com")
    assert exc.reply is reply
    assert exc.host == "mx.example.com"


def test_connect_error_is_catchable_as_connection_error() -> None:
    """except ConnectionError catches ConnectError, except TimeoutError catches DeliveryTimeoutError."""
    with pytest.raises(ConnectionError):
        raise ConnectError("refused", host="127.0.0.1")
    with pytest.raises(TimeoutError):
        raise DeliveryTimeoutError("slow", host="127.0.0.1")


# The tree in the module docstring


_TREE_LINE = re.compile(
    r"^(?P<lead>[ │├└─]*)(?P<name>[A-Z]\w*Error)(?:\((?P<builtin>\w+)\))?(?:\s|$)"
)


def _parse_tree(doc: str) -> dict[str, tuple[str | None, str | None]]:
    """Map each class named in the docstring tree to (tree parent, built-in base)."""
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name)
    for line in doc.splitlines():
        m = _TREE_LINE.match(line)
        if m is None or not m["lead"].startswith("    "):
            continue
        column = len(m["lead"])
        while stack and stack[-1][0] >= column:
            stack.pop()
        parent = stack[-1][1] if stack else None
        tree[m["name"]] = (parent, m["builtin"])
        stack.append((column, m["name"]))
    return tree


def test_parse_tree_reads_nesting() -> None:
    """The docstring-tree parser itself gets parents and built-in bases right."""
    doc = (
        "Intro line\n\n"
        "    AError(Exception)\n"
        "    ├── BError(ValueError)   text\n"
        "    │   └── CError             .attr\n"
        "    └── DError\n"
    )
    assert _parse_tree(doc) == {
        "AError": (None, "Exception"),
        "BError": ("AError", "ValueError"),
        "CError": ("BError", None),
        "DError": ("AError", None),
    }


def test_docstring_tree_names_every_class() -> None:
    """The module docstring's tree names exactly the classes in __all__."""
    assert _exceptions.__doc__ is not None
    tree = _parse_tree(_exceptions.__doc__)
    assert sorted(tree) == sorted(_exceptions.__all__)


def test_docstring_tree_matches_class_bases() -> None:
    """Each class's parent and built-in base in the docstring tree are its real bases."""
    assert _exceptions.__doc__ is not None
    tree = _parse_tree(_exceptions.__doc__)
    for name, (parent, builtin) in tree.items():
        cls = getattr(_exceptions, name)
        bases = {b.__name__ for b in cls.__bases__}
        expected = {n for n in (parent, builtin) if n is not None}
        assert bases == expected, name


def test_all_exceptions_are_exported_from_package() -> None:
    """Every exception class is importable from mailstrom_async itself."""
    for name in _exceptions.__all__:
        assert getattr(mailstrom_async, name) is getattr(_exceptions, name)
        assert name in mailstrom_async.__all__


def test_delivery_error_message_is_valid_unicode() -> None:
    """A message quoting a server's bytes that are not UTF-8 is valid Unicode."""
    error = ProtocolError("garbled reply: \udce4\udcff", host="mx\udce4.test")
    assert str(error) == "garbled reply: \\xe4\\xff"
    assert error.host == "mx\\xe4.test"
