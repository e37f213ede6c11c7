"""mailstrom_async.testing: test your application's mail without sending any.

* :class:`Outbox`: a transport that captures every message in memory, with
  scripted deferrals and failures: ``Deliverer(config, transport=Outbox())``.
* :class:`CaptureServer`: a real SMTP server on a loopback port, with the same
  scripting, for tests that want the whole SMTP path.
* A pytest plugin with the fixtures ``outbox``, ``deliverer``,
  ``deliverer_config`` and ``smtp_server``: ``pytest -p mailstrom_async.testing``
  or ``pytest_plugins = ["mailstrom_async.testing"]`` in a ``conftest.py``. The
  async fixtures run under anyio's pytest plugin (installed with anyio).
* :class:`StoreContract`: the test suite every store must pass, for authors of
  a custom store.

Needs pytest: ``pip install "mailstrom-async[testing]"``.

This module holds no asserts of its own (PYTEST_DONT_REWRITE): a conftest.py may
import from it and also name it in ``pytest_plugins`` without pytest warning that
it was imported too early to be rewritten.
"""

from __future__ import annotations

try:
    import pytest
except ImportError as exc:  # pragma: no cover - tested in a subprocess
    msg = (
        "mailstrom_async.testing needs pytest, which is not installed: "
        "pip install 'mailstrom-async[testing]'"
    )
    raise ImportError(msg, name=exc.name) from exc

# Plain asserts in the contract suite report the values compared, as in a test file.
pytest.register_assert_rewrite(
    "mailstrom_async.testing._store_contract", "mailstrom_async.testing._hold_contract"
)

from mailstrom_async.testing._capture import FAST_RETRY, OutboxMessage  # noqa: E402
from mailstrom_async.testing._outbox import Outbox, OutboxConnection  # noqa: E402
from mailstrom_async.testing._plugin import (  # noqa: E402
    deliverer,
    deliverer_config,
    outbox,
    smtp_server,
)
from mailstrom_async.testing._server import CaptureServer  # noqa: E402
from mailstrom_async.testing._store_contract import StoreContract  # noqa: E402

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
    "smtp_server",
]


def _fixup_module_metadata() -> None:
    # Reprs and docs say mailstrom_async.testing.Outbox, not ..._outbox.Outbox.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and obj.__module__.startswith(f"{__name__}._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
