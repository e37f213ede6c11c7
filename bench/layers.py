"""Where the CPU time per delivered message goes, by layer (issue 14).

A measurement (the app-like run, scenario 1) runs once more in a child under
cProfile with the *thread's* CPU clock (``time.thread_time``), so that waiting
in ``select`` counts for nothing and the store's worker thread (aiosqlite) is
not charged to whatever the event loop thread was doing meanwhile. The child
also times garbage collection (``gc.callbacks``, same clock) and the process's
CPU as a whole; what the other threads used is the difference.

Each profiled function's own time goes to the layer its file belongs to
(:data:`LAYERS`). A function of no layer (a builtin such as ``socket.send``, or
generic stdlib code such as ``enum`` or ``contextlib``) is charged to its
callers, in proportion to the time it spent for each, and so on up. The
profiler slows every call by about the same amount, so the shares are what to
read; the table scales them to the CPU per message the same measurement used
without the profiler, in the same run.
"""

from __future__ import annotations

import math
import pstats
import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "LAYERS",
    "attribute",
    "breakdown",
    "layer_of",
    "per_message",
    "table",
    "top",
]

_PKG = r"mailstrom_async/"
#: Imports done during the run: start-up, left out of the per-message figures.
STARTUP = "imports (start-up)"
#: (layer, pattern on the function's file path); the first match wins.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        (
            "build (Email, headers, addresses)",
            _PKG + r"_(builder|headers|address|text|domain)\.py$|/idna/",
        ),
        ("stdlib email package (parse, render)", r"/email/"),
        (
            "prepare (render, checks)",
            _PKG + r"_(message|render|fastrender|downgrade|intake)\.py$",
        ),
        ("store", _PKG + r"(_store/|_recorder\.py$)|/aiosqlite/|/sqlite3/"),
        (
            "SMTP (client, TLS, routes)",
            _PKG + r"_(smtp|transport|transports|reuse|classify|routes|dns|sink)\.py$"
            r"|/aiosmtplib/|/ssl\.py$",
        ),
        ("handles", _PKG + r"_(watchers|follow)\.py$"),
        (
            "events, telemetry",
            _PKG + r"_(events|remote_events|telemetry|statistics)\.py$",
        ),
        (
            "scheduling (lanes, jobs, leases)",
            _PKG + r"_(scheduler|dispatch|lane|leases|job|worker|owner|deliverer"
            r"|outcomes|retry|models|config|operations)\.py$|/anyio/",
        ),
        ("event loop (asyncio, socket I/O)", r"/asyncio/|/selectors\.py$|/uvloop/"),
        ("logging", r"/logging/"),
        (STARTUP, r"^<frozen importlib|/importlib/"),
        ("the benchmark's own code", r"/bench/"),
    )
)
GC = "garbage collection"
OTHER_THREADS = "other threads (SQLite's)"
UNATTRIBUTED = "unattributed"

_Func = tuple[str, int, str]


def layer_of(filename: str) -> str | None:
    """The layer of code in *filename*; None for builtins and generic code."""
    path = filename.replace("\\", "/")
    for name, pattern in LAYERS:
        if pattern.search(path):
            return name
    return None


def attribute(stats: pstats.Stats) -> dict[str, dict[str, float]]:
    """The profiled thread's time by layer, then by function (seconds)."""
    raw: Mapping[_Func, Any] = stats.stats  # type: ignore[attr-defined]
    owners: dict[_Func, dict[str, float]] = {}

    def owner(func: _Func, seen: frozenset[_Func]) -> dict[str, float]:
        if func in owners:
            return owners[func]
        layer = layer_of(func[0])
        if layer is not None:
            found = {layer: 1.0}
        else:
            callers = raw[func][4] if func in raw else {}
            weights = {
                c: (v[2] or v[3] or v[1]) for c, v in callers.items() if c not in seen
            }
            total = sum(weights.values())
            found = {}
            if total <= 0:
                found = {UNATTRIBUTED: 1.0}
            else:
                for caller, weight in weights.items():
                    for name, part in owner(caller, seen | {func}).items():
                        found[name] = found.get(name, 0.0) + part * weight / total
        if not seen:  # memoize only answers not cut short by a cycle
            owners[func] = found
        return found

    contributions: dict[str, dict[str, float]] = {}
    for func, (_cc, _nc, tottime, _ct, _callers) in raw.items():
        if tottime <= 0:
            continue
        for name, part in owner(func, frozenset()).items():
            mine = contributions.setdefault(name, {})
            label = _label(func)
            mine[label] = mine.get(label, 0.0) + tottime * part
    return contributions


def _label(func: _Func) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    short = "/".join(filename.replace("\\", "/").split("/")[-2:])
    return f"{short}:{line}({name})"


def breakdown(stats: pstats.Stats) -> dict[str, float]:
    """Each layer's share of the profiled thread's time (shares add up to 1)."""
    sums = {name: sum(parts.values()) for name, parts in attribute(stats).items()}
    total = sum(sums.values())
    return {name: value / total for name, value in sums.items()} if total else {}


def top(stats: pstats.Stats, layer: str, count: int = 3) -> list[tuple[str, float]]:
    """The functions that cost *layer* the most, with their share of its time
    (a builtin's time counted for the layer that called it)."""
    parts = attribute(stats).get(layer, {})
    total = sum(parts.values())
    ranked = sorted(parts.items(), key=lambda item: -item[1])[:count]
    return [(label, value / total) for label, value in ranked] if total else []


def per_message(
    stats: pstats.Stats, result: Mapping[str, Any], cpu_ms_per_msg: float
) -> dict[str, float]:
    """Microseconds of CPU per delivered message by layer: the profiled run's
    shares of its loop thread, garbage collection and other threads, scaled to
    *cpu_ms_per_msg* (the same measurement without the profiler). Imports
    done during the run are start-up, not per-message work: left out."""
    main = result["main_thread_cpu_s"]
    gc_s = min(result["gc_cpu_s"], main)
    shares = breakdown(stats)
    startup = shares.pop(STARTUP, 0.0) * (main - gc_s)
    loop = main - gc_s - startup
    process = max(result["process_cpu_s"], main) - startup
    if process <= 0 or math.isnan(cpu_ms_per_msg):
        return {}
    scale = 1000.0 * cpu_ms_per_msg  # µs per message for the whole process
    total = sum(shares.values())
    layers = {
        name: share / total * loop / process * scale for name, share in shares.items()
    }
    layers[GC] = gc_s / process * scale
    layers[OTHER_THREADS] = (process + startup - main) / process * scale
    return layers


def table(layers: Mapping[str, float]) -> Iterator[str]:
    """Lines of a table of *layers*, largest first."""
    total = sum(layers.values())
    width = max((len(name) for name in layers), default=10)
    for name, us in sorted(layers.items(), key=lambda item: -item[1]):
        share = us / total if total else 0.0
        yield f"  {name:<{width}}  {us:8.0f} µs  {share:6.1%}"
    yield f"  {'total':<{width}}  {total:8.0f} µs"
