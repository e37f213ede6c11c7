"""One measurement in a fresh interpreter: ``python -m bench._child NAME PARAMS [PROF]``.

*PARAMS* is a JSON object; ``"loop": "uvloop"`` runs it on uvloop. With *PROF*, the
clocked part of the run (from its CpuClock's start to its stop) is profiled with
cProfile on the thread's CPU clock and the stats are written there; the result
then also says how much CPU that part took in the profiled thread, in garbage
collection (same clock) and in the whole process. The result is one
``BENCH-RESULT {...}`` line on stdout, read by :func:`bench._procs.run_child`.
"""

from __future__ import annotations

import cProfile
import gc
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import _common, baselines, looplag, mx, pg, scenarios
from bench._common import CpuClock, run_async, vm_status_kib
from bench._procs import child_result

Measurement = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

MEASUREMENTS: dict[str, Measurement] = {
    "raw_pool": baselines.raw_pool,
    "raw_single": baselines.raw_single,
    "raw_pool_building": baselines.raw_pool_building,
    "app_like": scenarios.app_like,
    "throughput": scenarios.throughput,
    "submit_latency": scenarios.submit_latency,
    "deliver_worker": scenarios.deliver_worker,
    "deep_fill": scenarios.deep_fill,
    "deep_start": scenarios.deep_start,
    "mx_lanes": mx.mx_lanes,
    "loop_lag": looplag.loop_lag,
    "store_ceiling": pg.store_ceiling,
    "notify_latency": pg.notify_latency,
    "pg_workers": pg.pg_workers,
}


class _Profiling:
    """cProfile on the thread's CPU clock, collections timed on the same clock
    and the process's CPU, over the measurement's clocked part (every
    :class:`~bench._common.CpuClock` start to its stop)."""

    def __init__(self) -> None:
        self.profiler = cProfile.Profile(time.thread_time)
        self.thread = threading.get_ident()
        self.main_cpu = self.gc_cpu = self.process_cpu = 0.0
        self._active = False
        self._thread_start = 0.0
        self._collecting: list[float] = []
        self._process_start = 0.0

    def on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if not self._active or threading.get_ident() != self.thread:
            return  # outside the window, or another thread's (its own CPU)
        if phase == "start":
            self._collecting.append(time.thread_time())
        elif self._collecting:
            self.gc_cpu += time.thread_time() - self._collecting.pop()

    def start(self) -> None:
        self._process_start = CpuClock.process_cpu()
        self._thread_start = time.thread_time()
        self._active = True
        self.profiler.enable()

    def stop(self) -> None:
        self.profiler.disable()
        self._active = False
        self.main_cpu += time.thread_time() - self._thread_start
        self.process_cpu += CpuClock.process_cpu() - self._process_start


def _profiled(
    measurement: Measurement, params: dict[str, Any], loop: str, path: str
) -> dict[str, Any]:
    """Run *measurement*, profiling its clocked part (see :class:`_Profiling`)."""
    profiling = _Profiling()
    gc.callbacks.append(profiling.on_gc)
    _common.WINDOW = profiling
    try:
        result = run_async(measurement, params, loop=loop)
    finally:
        _common.WINDOW = None
        gc.callbacks.remove(profiling.on_gc)
    profiling.profiler.dump_stats(path)
    result["main_thread_cpu_s"] = profiling.main_cpu
    result["process_cpu_s"] = profiling.process_cpu
    result["gc_cpu_s"] = profiling.gc_cpu
    return result


def main(argv: list[str]) -> int:
    name, params_json, *rest = argv
    params: dict[str, Any] = json.loads(params_json)
    measurement = MEASUREMENTS[name]
    loop = params.get("loop", "asyncio")
    if rest:
        result = _profiled(measurement, params, loop, rest[0])
    else:
        result = run_async(measurement, params, loop=loop)
    result["loop"] = loop
    result["vm_kib"] = vm_status_kib()
    child_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
