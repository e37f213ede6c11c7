"""One measurement in a fresh interpreter: ``python -m bench._child NAME PARAMS [PROF]``.

*PARAMS* is a JSON object; ``"loop": "uvloop"`` runs it on uvloop. With *PROF*, the
run is profiled with cProfile and the stats are written there. The result is one
``BENCH-RESULT {...}`` line on stdout, read by :func:`bench._procs.run_child`.
"""

from __future__ import annotations

import cProfile
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from bench import baselines, looplag, mx, pg, scenarios
from bench._common import run_async, vm_status_kib
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


def main(argv: list[str]) -> int:
    name, params_json, *rest = argv
    params: dict[str, Any] = json.loads(params_json)
    measurement = MEASUREMENTS[name]
    loop = params.get("loop", "asyncio")
    if rest:
        profiler = cProfile.Profile()
        profiler.enable()
        result = run_async(measurement, params, loop=loop)
        profiler.disable()
        profiler.dump_stats(rest[0])
    else:
        result = run_async(measurement, params, loop=loop)
    result["loop"] = loop
    result["vm_kib"] = vm_status_kib()
    child_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
