"""``status ID --history``: every kept attempt of a message, per recipient."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from mailstrom_async._cli._common import plain_value, table, timestamp
from mailstrom_async._domain import recipient_key
from mailstrom_async._models import AttemptRecord

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from mailstrom_async._models import MessageStatus

__all__ = ["add_history_flag", "history_json", "print_history"]


def add_history_flag(parser: argparse.ArgumentParser) -> None:
    """``--history`` for the status command."""
    parser.add_argument(
        "--history",
        action="store_true",
        help="also show every kept attempt of each recipient (the first and the "
        "latest: Limits.history_per_recipient), with its time, duration, host, "
        "IP, TLS, state after it and reply; in --json, a 'history' list",
    )


def history_json(history: Sequence[AttemptRecord]) -> list[dict[str, Any]]:
    """The attempts as JSON objects, oldest first; ``local`` and ``finished_at``
    said outright."""
    fields = attrs.fields(AttemptRecord)
    result = []
    for record in history:
        entry = {f.name: plain_value(getattr(record, f.name)) for f in fields}
        entry["finished_at"] = plain_value(record.finished_at)
        entry["local"] = record.is_local
        result.append(entry)
    return result


_HEADER = ("#", "STARTED", "TOOK", "HOST", "IP", "TLS", "STATE", "CODE", "ENHANCED", "TEXT")  # fmt: skip


def print_history(status: MessageStatus, history: Sequence[AttemptRecord]) -> None:
    """One table per recipient, in envelope order, its attempts oldest first."""
    by_recipient: dict[tuple[str, str], list[AttemptRecord]] = {}
    for record in history:
        by_recipient.setdefault(recipient_key(record.address), []).append(record)
    for r in status:
        kept = by_recipient.get(recipient_key(r.address), [])
        print()
        if not kept:
            made = (
                f"{r.attempts} attempts, none kept" if r.attempts else "no attempt yet"
            )
            print(f"history of {r.address}: {made}")
            continue
        made = f"{r.attempts} attempt{'' if r.attempts == 1 else 's'}"
        if len(kept) < r.attempts:
            made += f", the first and the latest {len(kept) - 1} kept"
        print(f"history of {r.address}: {made}")
        print(
            table(
                _HEADER,
                [
                    (
                        a.attempt,
                        timestamp(a.started_at),
                        _took(a.duration),
                        a.host,
                        a.ip,
                        _tls(a),
                        a.state.value,
                        "local" if a.is_local else a.code,
                        a.enhanced_code,
                        a.message,
                    )
                    for a in kept
                ],
            )
        )


def _took(seconds: float) -> str:
    """``0.021s``, ``4.5s``, ``2m05s``."""
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _tls(a: AttemptRecord) -> str | None:
    if a.tls is None:
        return None
    if not a.tls:
        return "no"
    return "verified" if a.tls_verified else "unverified"
