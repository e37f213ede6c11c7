"""mailstrom_async.testing: test your application's mail without sending any.

* :class:`Outbox`: a transport that captures every message in memory, with
  scripted deferrals and failures: ``Deliverer(config, transport=Outbox())``.
* :func:`sent_messages` and :func:`shared_outbox`: what every Deliverer of the
  process configured with ``transport="outbox"`` (or ``MAILSTROM_TRANSPORT=outbox``)
  delivered, with no plumbing, like Django's ``mail.outbox``. The pytest plugin
  empties it before each test, and its ``outbox`` fixture is this same outbox.
* :class:`CaptureServer`: a real SMTP server on a loopback port, with the same
  scripting, for tests that want the whole SMTP path.
* :data:`FAST_RETRY`: a retry policy of milliseconds, for a test's ``Config``.
* A pytest plugin with the fixtures ``outbox``, ``deliverer``,
  ``deliverer_config`` and ``smtp_server``: ``pytest -p mailstrom_async.testing``
  or ``pytest_plugins = ["mailstrom_async.testing"]`` in a ``conftest.py``. The
  async fixtures run on the loop of the test, under pytest-asyncio (strict or
  auto mode) or anyio's pytest plugin.
* :class:`StoreContract`: the test suite every store must pass, for authors of
  a custom store.

The first three need no pytest (``unittest.IsolatedAsyncioTestCase``,
``asyncio.run``); the fixtures and :class:`StoreContract` do:
``pip install "mailstrom-async[testing]"``. They are imported when first asked
for, so importing this module never imports pytest.

This module holds no asserts of its own (PYTEST_DONT_REWRITE): a conftest.py may
import from it and also name it in ``pytest_plugins`` without pytest warning that
it was imported too early to be rewritten.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from mailstrom_async._capture import FAST_RETRY, OutboxMessage
from mailstrom_async._outbox import Outbox, OutboxConnection, shared_outbox
from mailstrom_async.testing._server import CaptureServer

if TYPE_CHECKING:
    from mailstrom_async.testing._plugin import (
        deliverer,
        deliverer_config,
        outbox,
        smtp_server,
    )
    from mailstrom_async.testing._store_contract import StoreContract

__all__ = [
    "FAST_RETRY",
    "CaptureServer",
    "Outbox",
    "OutboxConnection",
    "OutboxMessage",
    "StoreContract",
    "deliverer",
    "deliverer_config",
    "outbox",
    "sent_messages",
    "shared_outbox",
    "smtp_server",
]


def sent_messages() -> list[OutboxMessage]:
    """Every message delivered to the process-wide outbox, in order: the mail of
    each Deliverer that runs with ``Config(transport="outbox")`` or
    ``MAILSTROM_TRANSPORT=outbox``, and of the ``deliverer`` fixture.

    A message lands here once its recipients are accepted, a moment before the
    Deliverer records their statuses: await the handle ``submit()`` returned,
    or ``await shared_outbox().wait_for(n)``, before reading it. The pytest
    plugin empties the outbox before each test; elsewhere call
    ``shared_outbox().clear()``.
    """
    return shared_outbox().messages


# When pytest loads this module as a plugin (-p, or pytest_plugins in a conftest.py),
# it loads the fixtures' module as a plugin too.
pytest_plugins = ["mailstrom_async.testing._plugin"]

# The names that need pytest -> the module that defines them.
_NEED_PYTEST = {
    "deliverer": "_plugin",
    "deliverer_config": "_plugin",
    "outbox": "_plugin",
    "smtp_server": "_plugin",
    "StoreContract": "_store_contract",
}


def _fixup_module_metadata(obj: object) -> None:
    # Reprs and docs say mailstrom_async.testing.Outbox, not ..._outbox.Outbox
    # (the outbox lives below the Deliverer, which uses it for transport="outbox").
    private = (f"{__name__}._", "mailstrom_async._")
    is_ours = isinstance(obj, type) or inspect.isfunction(obj)
    if is_ours and getattr(obj, "__module__", "").startswith(private):
        obj.__module__ = __name__


for _name in (
    "CaptureServer",
    "Outbox",
    "OutboxConnection",
    "OutboxMessage",
    "shared_outbox",
):
    _fixup_module_metadata(globals()[_name])
del _name


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """The fixtures and StoreContract, imported on first use (they need pytest)."""
        module = _NEED_PYTEST.get(name)
        if module is None:
            msg = f"module {__name__!r} has no attribute {name!r}"
            raise AttributeError(msg)
        try:
            # _plugin registers the contract modules for assertion rewriting.
            importlib.import_module(f"{__name__}._plugin")
        except ImportError as exc:
            if exc.name != "pytest":
                raise
            msg = (
                f"mailstrom_async.testing.{name} needs pytest, which is not "
                "installed: pip install 'mailstrom-async[testing]' (Outbox, "
                "CaptureServer and FAST_RETRY work without it)"
            )
            raise ImportError(msg, name="pytest") from exc
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        _fixup_module_metadata(value)
        globals()[name] = value
        return value
