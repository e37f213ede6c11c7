"""``python -m mailstrom_async``: the ``mailstrom-async`` command."""

from __future__ import annotations

from mailstrom_async._cli import main

raise SystemExit(main())
