"""``python -m bench``: run the benchmark suite (see ``--help``)."""

from __future__ import annotations

import sys

from bench._cli import main

sys.exit(main())
