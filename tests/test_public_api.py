"""The public namespace: __all__ is sorted and complete, and names look public."""

from __future__ import annotations

import inspect
import re

import mailstrom_async

# The names the issue promises importable from mailstrom_async.
ISSUE_NAMES = [
    "MailstromError",
    "InvalidMessageError",
    "InvalidAddressError",
    "ConfigError",
    "DelivererClosedError",
    "UnknownMessageError",
    "Email",
    "prepare",
    "PreparedMessage",
    "RecipientState",
    "RecipientStatus",
    "MessageStatus",
    "DeliveryEvent",
    "Config",
    "RelayConfig",
    "MXConfig",
    "RetryPolicy",
    "Timeouts",
    # issue 13
    "PostgresStore",
    "store_from_url",
    # issue 14
    "BatchRecordingStore",
    "JobRecord",
    # issue 13: message priorities
    "MIN_PRIORITY",
    "MAX_PRIORITY",
]


def _isort_key(name: str) -> tuple[int, list[str | int]]:
    """ruff RUF022's "isort-style" order: CONSTANTS, then Classes, then the rest.

    Within each group names compare case-sensitively, with runs of digits compared as
    numbers ("natural" order).
    """
    if name.isupper():  # SCREAMING_SNAKE_CASE (digits and underscores allowed)
        group = 0
    elif name[0].isupper():  # CamelCase
        group = 1
    else:
        group = 2
    parts: list[str | int] = [
        int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name) if p
    ]
    return group, parts


def test_isort_key_orders_like_ruff() -> None:
    """The sort rule orders names exactly as `ruff check --select RUF022 --fix` does."""
    names = [
        "__version__",
        "prepare",
        "Config",
        "DNSError",
        "Del",
        "DEFAULT_X",
        "V10",
        "V9",
        "Cls10",
        "Cls9",
        "_priv",
    ]
    # The expected order was produced by ruff 0.17's RUF022 fix on this list.
    assert sorted(names, key=_isort_key) == [
        "DEFAULT_X",
        "V9",
        "V10",
        "Cls9",
        "Cls10",
        "Config",
        "DNSError",
        "Del",
        "__version__",
        "_priv",
        "prepare",
    ]


def test_all_is_sorted() -> None:
    """__all__ is in ruff's isort-style order (RUF022) and has no duplicates."""
    names = list(mailstrom_async.__all__)
    assert names == sorted(names, key=_isort_key)
    assert len(set(names)) == len(names)


def test_all_names_exist() -> None:
    """Every name in __all__ is an attribute of the package."""
    missing = [n for n in mailstrom_async.__all__ if not hasattr(mailstrom_async, n)]
    assert missing == []


def test_all_is_complete() -> None:
    """Every public class or function the package defines is listed in __all__."""
    unlisted = []
    for name, obj in vars(mailstrom_async).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        ours = obj.__module__.split(".")[0] == "mailstrom_async"
        if ours and name not in mailstrom_async.__all__:
            unlisted.append(name)
    assert unlisted == []


def test_all_has_no_private_names() -> None:
    """__all__ holds no underscore names except __version__."""
    private = [
        n for n in mailstrom_async.__all__ if n.startswith("_") and n != "__version__"
    ]
    assert private == []


def test_classes_report_public_module() -> None:
    """Every class and function in __all__ says its module is mailstrom_async."""
    wrong = {
        name: obj.__module__
        for name in mailstrom_async.__all__
        if inspect.isclass(obj := getattr(mailstrom_async, name))
        or inspect.isfunction(obj)
        if obj.__module__ != "mailstrom_async"
    }
    assert wrong == {}


def test_repr_uses_public_path() -> None:
    """Class reprs show mailstrom_async.Name, not the private module."""
    assert repr(mailstrom_async.Config) == "<class 'mailstrom_async.Config'>"


def test_version_is_a_string() -> None:
    """__version__ is a non-empty dotted version string."""
    assert re.match(r"^\d+\.\d+", mailstrom_async.__version__)


def test_issue_names_importable() -> None:
    """Every name the issue's contract lists is importable from mailstrom_async."""
    missing = [n for n in ISSUE_NAMES if not hasattr(mailstrom_async, n)]
    assert missing == []
    unlisted = [n for n in ISSUE_NAMES if n not in mailstrom_async.__all__]
    assert unlisted == []


def test_attribute_access_examples() -> None:
    """The everyday spellings work: m.Config(), m.RecipientState.DEFERRED."""
    import mailstrom_async as m

    assert m.Config().relay is None
    assert m.RecipientState.DEFERRED.value == "deferred"
    assert m.RecipientState("deferred") is m.RecipientState.DEFERRED


def test_priority_parameters_and_fields() -> None:
    """Message priorities (issue 13): keyword-only ``priority`` of submit() and
    ``priorities`` of submit_many() (default 0 and None), ``priority`` fields of
    NewMessage and Job (default 0), and the range constants."""
    import attrs

    import mailstrom_async as m

    submit = inspect.signature(m.Deliverer.submit).parameters["priority"]
    assert (submit.kind, submit.default) == (inspect.Parameter.KEYWORD_ONLY, 0)
    many = inspect.signature(m.Deliverer.submit_many).parameters["priorities"]
    assert (many.kind, many.default) == (inspect.Parameter.KEYWORD_ONLY, None)
    assert attrs.fields_dict(m.NewMessage)["priority"].default == 0
    assert attrs.fields_dict(m.Job)["priority"].default == 0
    assert (m.MIN_PRIORITY, m.MAX_PRIORITY) == (-1000, 1000)
