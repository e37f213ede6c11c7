"""One measurement in a fresh interpreter: ``python -m bench._child NAME PARAMS [PROF]``.

*PARAMS* is a JSON object; ``"loop": "uvloop"`` runs it on uvloop. With *PROF*, the
run is profiled with cProfile on the thread's CPU clock and the stats are written
there; the result then also says how much CPU the run took in the profiled
thread, in garbage collection (same clock) and in the whole process. The result is one
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

from bench import baselines, looplag, mx, pg, scenarios
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


def _profiled(
    measurement: Measurement, params: dict[str, Any], loop: str, path: str
) -> dict[str, Any]:
    """Run *measurement* under cProfile (thread CPU clock), timing collections."""
    collecting: list[float] = []
    gc_cpu = 0.0
    profiled = threading.get_ident()

    def on_gc(phase: str, _info: dict[str, Any]) -> None:
        nonlocal gc_cpu
        if threading.get_ident() != profiled:
            return  # a collection in another thread: part of that thread's CPU
        if phase == "start":
            collecting.append(time.thread_time())
        elif collecting:
            gc_cpu += time.thread_time() - collecting.pop()

    profiler = cProfile.Profile(time.thread_time)
    process = CpuClock()
    gc.callbacks.append(on_gc)
    process.start()
    thread_start = time.thread_time()
    profiler.enable()
    try:
        result = run_async(measurement, params, loop=loop)
    finally:
        profiler.disable()
        main_cpu = time.thread_time() - thread_start
        process.stop()
        gc.callbacks.remove(on_gc)
    profiler.dump_stats(path)
    result["main_thread_cpu_s"] = main_cpu
    result["process_cpu_s"] = process.cpu
    result["gc_cpu_s"] = gc_cpu
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
