"""Benchmarks for mailstrom_async: ``python -m bench`` (or ``nox -s bench``).

Every scenario runs against loopback servers the harness starts itself (Postfix's
``smtp-sink``, and a small soft-rejecting sink of its own), several times round
robin, next to baselines measured in the same run: Postfix's ``smtp-source`` and
raw aiosmtplib. Each measurement runs in a fresh child process, so one cannot
warm up or bloat the next and peak RSS is its own. Results are printed as a table
of medians and ratios against the targets of the benchmark issue, and written as
JSON for plotting over time.
"""

from __future__ import annotations

#: Bumped when the layout of the JSON results changes.
RESULTS_SCHEMA = 1
