"""The harness: arguments, the round-robin schedule, the table and the JSON."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import pstats
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import RESULTS_SCHEMA, baselines, layers, looplag, mx, pg
from bench._common import Row, Target, median, out, uvloop_available
from bench._procs import (
    ChildError,
    managed,
    run_child,
    start_smtp_sink,
    start_soft_sink,
)

__all__ = ["main"]

DEFAULT_JSON = Path(tempfile.gettempdir()) / "mailstrom-bench" / "latest.json"
_CHILD_TIMEOUT = 900.0

# Targets of the benchmark issue (#5).
TARGET_S1_RATIO = 1.0
TARGET_S3_RATE = 10_000.0
TARGET_S3_P99_MS = 5.0
TARGET_S4_RSS_MIB = 150.0
TARGET_S4_FIRST_S = 1.0
# The speed issue (#14): the app-like run against the raw pool that builds its
# messages.
TARGET_APP_RATIO = 1.5
APP_TASKS = 200


@dataclass
class Sizes:
    repetitions: int
    messages: int
    submits: int
    producers: int
    batch: int
    deep: int
    deep_small: int
    deep_fill: str
    deep_seconds: float
    mx_domains: int
    mx_few_domains: int


QUICK = Sizes(
    repetitions=1,
    messages=300,
    submits=400,
    producers=50,
    batch=100,
    deep=10_000,
    deep_small=1_000,
    deep_fill="sql",
    deep_seconds=0.3,
    mx_domains=200,
    mx_few_domains=10,
)
FULL = Sizes(
    repetitions=3,
    messages=5_000,
    submits=5_000,
    producers=50,
    batch=100,
    deep=1_000_000,
    deep_small=10_000,
    deep_fill="sql",
    deep_seconds=3.0,
    mx_domains=10_000,
    mx_few_domains=100,
)


@dataclass
class Measurement:
    """One thing measured once per repetition."""

    key: str
    label: str
    run: Callable[[int], dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, metric: str) -> float:
        values = [r[metric] for r in self.runs if r.get(metric) is not None]
        return median(values)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark mailstrom_async against smtp-source and raw aiosmtplib.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repetition, small counts (well under 30 s)",
    )
    p.add_argument("-r", "--repetitions", type=int, help="round-robin repetitions")
    p.add_argument("--messages", type=int, help="messages per throughput run")
    p.add_argument("--submits", type=int, help="submits in the latency scenario")
    p.add_argument(
        "--deep", type=int, help="queued messages in the deep-queue scenario"
    )
    p.add_argument(
        "--deep-fill",
        choices=("sql", "api"),
        help="fill the deep queue through SQLiteStore.add (api) or in bulk (sql)",
    )
    p.add_argument(
        "--only",
        help="comma-separated keys to run: "
        "source,pool,single,app,1,2,3,4,5,6,7,pg,layers (baselines A/B/C are needed for "
        "ratios; app runs its own baseline)",
    )
    p.add_argument(
        "--json",
        default=str(DEFAULT_JSON),
        metavar="PATH",
        help=f"where to write the JSON results ('-': stdout; default {DEFAULT_JSON})",
    )
    p.add_argument(
        "--tmpdir",
        help="directory for the SQLite files (default: a new one under the system "
        "temporary directory; it should be on a real disk, not tmpfs)",
    )
    p.add_argument(
        "--no-uvloop",
        action="store_true",
        help="skip the uvloop variants even when uvloop is installed",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the run, profile scenario 1 and the raw pool once each with "
        "cProfile, write the .prof files to DIR and print the top functions; the "
        "layer breakdown's profiles (layers-*.prof) are kept there too",
    )
    return p.parse_args(argv)


def _sizes(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    sizes = Sizes(**vars(base))
    for name in ("repetitions", "messages", "submits", "deep", "deep_fill"):
        value = getattr(args, name)
        if value is not None:
            setattr(sizes, name, value)
    sizes.deep_small = min(sizes.deep_small, sizes.deep)
    return sizes


def _machine(tmpdir: Path) -> dict[str, Any]:
    fs = "?"
    with contextlib.suppress(OSError):
        # The filesystem the SQLite files live on decides what an fsync costs.
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind, *_ = line.split()
            if str(tmpdir).startswith(mount) and len(mount) >= len(best):
                best, fs = mount, kind
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "aiosmtplib": version("aiosmtplib"),
        "mailstrom_async": version("mailstrom-async"),
        "uvloop": version("uvloop") if uvloop_available() else None,
        "tmp_filesystem": fs,
    }


def _fmt_rate(value: float, unit: str = "msg/s") -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f} {unit}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "skip"}[passed]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = _sizes(args)
        self.only = set(args.only.split(",")) if args.only else None
        self.uvloop = uvloop_available() and not args.no_uvloop
        self.run_id = secrets.token_hex(3)
        self.sink_port = 0
        self.soft_port = 0
        self.tmpdir = Path(".")
        self.measurements: dict[str, Measurement] = {}
        self.fills: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.child_timeout = 120.0 if args.quick else _CHILD_TIMEOUT
        self.pg_dsn = ""  # the throwaway cluster's, when scenario pg runs
        self.layer_results: dict[str, dict[str, Any]] = {}

    def wants(self, key: str) -> bool:
        return self.only is None or key in self.only

    def token(self, key: str, rep: int) -> str:
        return f"{self.run_id}{key}{rep}"

    # -- what to measure --------------------------------------------------------

    def _add(self, key: str, label: str, run: Callable[[int], dict[str, Any]]) -> None:
        self.measurements[key] = Measurement(key, label, run)

    def _child(
        self, name: str, key: str, **params: Any
    ) -> Callable[[int], dict[str, Any]]:
        def run(rep: int) -> dict[str, Any]:
            full = {"token": self.token(key, rep), "tmpdir": str(self.tmpdir)}
            full.update(params)
            return run_child(name, full, timeout=self.child_timeout)

        return run

    def plan(self) -> None:
        s, port = self.sizes, self.sink_port
        n = s.messages
        if self.wants("source"):
            self._add(
                "A",
                "Postfix smtp-source -d -s 10 (C, 10 connections)",
                lambda rep: baselines.smtp_source(port, n),
            )
        if self.wants("pool"):
            self._add(
                "B",
                "raw aiosmtplib, pool of 10, send_message",
                self._child("raw_pool", "B", port=port, messages=n),
            )
            if self.uvloop:
                self._add(
                    "Buv",
                    "raw aiosmtplib pool of 10, uvloop",
                    self._child(
                        "raw_pool", "Buv", port=port, messages=n, loop="uvloop"
                    ),
                )
        if self.wants("single"):
            self._add(
                "C",
                "raw aiosmtplib, 1 connection, sequential",
                self._child("raw_single", "C", port=port, messages=n),
            )
        if self.wants("app"):
            app = {"port": port, "messages": n}
            self._add(
                "Ba",
                "raw aiosmtplib pool of 10, an EmailMessage built per send",
                self._child("raw_pool_building", "Ba", **app),
            )
            self._add(
                "8",
                f"app-like: {APP_TASKS} tasks, submit(Email) then await handle, SQLite",
                self._child("app_like", "8", store="sqlite", tasks=APP_TASKS, **app),
            )
            if self.uvloop:
                self._add(
                    "Bauv",
                    "raw pool of 10 building EmailMessages, uvloop",
                    self._child("raw_pool_building", "Bauv", loop="uvloop", **app),
                )
                self._add(
                    "8uv",
                    "app-like, uvloop",
                    self._child(
                        "app_like",
                        "8uv",
                        store="sqlite",
                        tasks=APP_TASKS,
                        loop="uvloop",
                        **app,
                    ),
                )
        common = {"port": port, "messages": n, "producers": 1}
        if self.wants("1"):
            self._add(
                "1",
                "SQLite store, tracked, events on",
                self._child("throughput", "1", store="sqlite", **common),
            )
            if self.uvloop:
                self._add(
                    "1uv",
                    "SQLite store, tracked, events on, uvloop",
                    self._child(
                        "throughput", "1uv", store="sqlite", loop="uvloop", **common
                    ),
                )
        if self.wants("2"):
            self._add(
                "2",
                "memory store, tracked, events on",
                self._child("throughput", "2", store="memory", **common),
            )
        if self.wants("3"):
            many = f"submit_many({s.batch} "
            variants = (
                ("3", "submit(EmailMessage)", "email", s.producers, 0, False),
                ("3b", "submit(bytes + envelope)", "bytes", s.producers, 0, False),
                ("3p", "submit(PreparedMessage)", "prepared", s.producers, 0, False),
                ("3m", many + "EmailMessages)", "email", 5, s.batch, False),
                ("3mp", many + "PreparedMessages)", "prepared", 5, s.batch, False),
                ("3w", "submit(EmailMessage)", "email", s.producers, 0, True),
                ("3pw", "submit(PreparedMessage)", "prepared", s.producers, 0, True),
            )
            for key, what, kind, producers, batch, split in variants:
                where = "a worker process delivers" if split else "delivering"
                self._add(
                    key,
                    f"{producers} producers, {what}, {where}",
                    self._child(
                        "submit_latency",
                        key,
                        port=port,
                        messages=s.submits,
                        producers=producers,
                        store="sqlite",
                        input=kind,
                        batch=batch,
                        split=split,
                    ),
                )
        if self.wants("4"):
            for key, count in (("4", s.deep), ("4s", s.deep_small)):
                self._add(
                    key,
                    f"restart on {count:,} queued (SQLite)",
                    self._deep_start(key),
                )
        if self.wants("5"):
            reason = mx.mx_available()
            if reason is not None:
                self.skipped["5"] = reason
            else:
                for key, domains in (("5", s.mx_domains), ("5s", s.mx_few_domains)):
                    self._add(
                        key,
                        f"direct MX, {s.mx_domains:,} messages to {domains:,} domains",
                        self._child(
                            "mx_lanes",
                            key,
                            port=port,
                            messages=s.mx_domains,
                            domains=domains,
                        ),
                    )
        if self.wants("6"):
            soft = {
                "port": self.soft_port,
                "messages": n,
                "producers": 1,
                "store": "sqlite",
                "fast_retry": True,
            }
            self._add(
                "6c",
                "SQLite, soft-reject sink, 0% rejected",
                self._child("throughput", "6c", soft_every=0, **soft),
            )
            self._add(
                "6",
                "SQLite, soft-reject sink, 5% 450 once",
                self._child("throughput", "6", soft_every=20, **soft),
            )

        if self.wants("pg") and self.pg_dsn:
            quick = self.args.quick
            ceiling = {"messages": 2_000 if quick else 20_000, "tasks": 4, "claim": 10}
            ceilings = (
                ("P", "postgres", False),
                ("Pb", "postgres", True),
                ("Ps", "sqlite", False),
                ("Psb", "sqlite", True),
            )
            for key, store, batched in ceilings:
                how = (
                    "a claim's outcomes in one record_many"
                    if batched
                    else ("a record per message")
                )
                self._add(
                    key,
                    f"store ceiling, {store}: 4 claimers, claims of 10, {how}",
                    self._child(
                        "store_ceiling",
                        key,
                        store=store,
                        dsn=self.pg_dsn,
                        batched=batched,
                        **ceiling,
                    ),
                )
            fleet = {"port": port, "messages": 1_000 if quick else 5_000}
            for key, store, workers in (
                ("W1", "postgres", 1),
                ("W2", "postgres", 2),
                ("W4", "postgres", 4),
                ("Ws", "sqlite", 1),
            ):
                self._add(
                    key,
                    f"{workers} worker process(es) on {store}, a submit-only "
                    "process awaiting every handle",
                    self._child(
                        "pg_workers",
                        key,
                        store=store,
                        dsn=self.pg_dsn,
                        workers=workers,
                        **fleet,
                    ),
                )
            self._add(
                "Pn",
                "PostgreSQL: a worker's record to await handle elsewhere (NOTIFY)",
                self._child(
                    "notify_latency",
                    "Pn",
                    store="postgres",
                    dsn=self.pg_dsn,
                    samples=50 if quick else 500,
                ),
            )
        if self.wants("7"):
            quick = self.args.quick
            lag = {"port": port, "repetitions": 1 if quick else 3}
            self._add(
                "7",
                "loop stall during submit, SQLite store",
                self._child(
                    "loop_lag",
                    "7",
                    store="sqlite",
                    cases=looplag.cases(quick),
                    **lag,
                ),
            )
            self._add(
                "7m",
                "loop stall during submit, memory store",
                self._child(
                    "loop_lag",
                    "7m",
                    store="memory",
                    cases=["email-1k"]
                    if quick
                    else ["email-10k", "many-1000x1", "attach-25m"],
                    **lag,
                ),
            )

    def _deep_path(self, key: str) -> Path:
        return self.tmpdir / f"deep-{key}.sqlite3"

    def _deep_start(self, key: str) -> Callable[[int], dict[str, Any]]:
        def run(rep: int) -> dict[str, Any]:
            if key == "4s" and rep > 0:
                # A run delivers thousands in its few seconds, and what a stopped
                # run leased stays leased until the lease ends: refill the small
                # queue (well under a second) so each run starts on a full one.
                self._fill_deep_queue(key, self.sizes.deep_small, rep)
            params = {
                "path": str(self._deep_path(key)),
                "port": self.sink_port,
                "deliver_seconds": self.sizes.deep_seconds,
                "spawned_at": time.time(),
            }
            return run_child("deep_start", params, timeout=self.child_timeout)

        return run

    def fill_deep_queues(self) -> None:
        if not self.wants("4"):
            return
        s = self.sizes
        for key, count in (("4", s.deep), ("4s", s.deep_small)):
            out(f"filling a queue of {count:,} messages ({s.deep_fill}) ...")
            result = self._fill_deep_queue(key, count, 0)
            self.fills[key] = result
            out(
                f"  {result['seconds']:.1f} s ({result['msgs_per_s']:,.0f} msg/s), "
                f"{result['db_bytes'] / 2**20:,.0f} MiB"
            )

    def _fill_deep_queue(self, key: str, count: int, rep: int) -> dict[str, Any]:
        params = {
            "path": str(self._deep_path(key)),
            "count": count,
            "token": self.token(key, rep),
            "method": self.sizes.deep_fill,
        }
        return run_child("deep_fill", params, timeout=3600)

    # -- running ----------------------------------------------------------------

    def run(self) -> None:
        total = self.sizes.repetitions
        for rep in range(total):
            for m in self.measurements.values():
                start = time.perf_counter()
                try:
                    result = m.run(rep)
                except ChildError as exc:
                    m.errors.append(str(exc))
                    out(f"[{rep + 1}/{total}] {m.key:>3} {m.label}: ERROR {exc}")
                    continue
                m.runs.append(result)
                took = time.perf_counter() - start
                out(f"[{rep + 1}/{total}] {m.key:>3} {m.label}: {_brief(result)}")
                if took > 120:
                    out(f"      ({took:.0f} s)")

    # -- reporting --------------------------------------------------------------

    def rate(self, key: str, metric: str = "msgs_per_s") -> float:
        m = self.measurements.get(key)
        return m.median(metric) if m else math.nan

    def report(self) -> tuple[list[Row], list[Target]]:
        rows: list[Row] = []
        targets: list[Target] = []
        ms = self.measurements
        a, b, buv = self.rate("A"), self.rate("B"), self.rate("Buv")

        def rate_row(key: str, ref: str, ref_rate: float) -> float:
            value = self.rate(key)
            ratio = _ratio(value, ref_rate)
            rows.append(
                Row(
                    key,
                    ms[key].label,
                    _fmt_rate(value),
                    f"{ratio:.2f}x {ref}" if not math.isnan(ratio) else "",
                )
            )
            return ratio

        if "A" in ms:
            rows.append(Row("A", ms["A"].label, _fmt_rate(a)))
        if "B" in ms:
            rate_row("B", "A", a)
        if "Buv" in ms:
            rate_row("Buv", "B", b)
        if "C" in ms:
            rate_row("C", "B", b)
        for key, ref, ref_rate in (("1", "B", b), ("1uv", "Buv", buv)):
            if key in ms:
                ratio = rate_row(key, ref, ref_rate)
                ok = None if math.isnan(ratio) else ratio >= TARGET_S1_RATIO
                rows[-1].target = f">= {TARGET_S1_RATIO:.2f}x {ref}"
                rows[-1].result = _verdict(ok)
                targets.append(
                    Target(f"scenario {key} / raw pool", ratio, rows[-1].target, ok)
                )
        if "2" in ms:
            rate_row("2", "B", b)
        for key, ref in (("Ba", "B"), ("Bauv", "Buv")):
            if key in ms:
                rate_row(key, ref, self.rate(ref))
        for key, ref in (("8", "Ba"), ("8uv", "Bauv")):
            if key in ms:
                ratio = rate_row(key, ref, self.rate(ref))
                ok = None if math.isnan(ratio) else ratio >= TARGET_APP_RATIO
                rows[-1].target = f">= {TARGET_APP_RATIO:.2f}x {ref}"
                rows[-1].result = _verdict(ok)
                targets.append(
                    Target(
                        f"app-like {key} / raw pool building",
                        ratio,
                        rows[-1].target,
                        ok,
                    )
                )
        for key in ("3", "3b", "3p", "3m", "3mp", "3w", "3pw"):
            if key not in ms:
                continue
            rate = self.rate(key, "submits_per_s")
            p50, p99 = self.rate(key, "p50_ms"), self.rate(key, "p99_ms")
            ok_rate = None if math.isnan(rate) else rate >= TARGET_S3_RATE
            ok_p99 = None if math.isnan(p99) else p99 < TARGET_S3_P99_MS
            rows.append(
                Row(
                    key,
                    ms[key].label,
                    _fmt_rate(rate, "submits/s"),
                    f"{_ratio(rate, TARGET_S3_RATE):.2f}x target",
                    f">= {TARGET_S3_RATE:,.0f}/s",
                    _verdict(ok_rate),
                )
            )
            rows.append(
                Row(
                    key,
                    "  submit latency p50 / p99",
                    f"{p50:.1f} / {p99:.1f} ms",
                    "",
                    f"p99 < {TARGET_S3_P99_MS:g} ms",
                    _verdict(ok_p99),
                )
            )
            kind = ms[key].label.split(", ")[1]
            batched = key.startswith("3m")
            note = "p99 of a batch's latency" if batched else "concurrent submit()"
            if key.endswith("w"):
                note += ", a worker process delivers"
                kind += ", split"
            targets.append(
                Target(
                    f"scenario {key} submits/s ({kind})",
                    rate,
                    ">= 10000",
                    ok_rate,
                    note,
                )
            )
            targets.append(
                Target(f"scenario {key} p99 ms ({kind})", p99, "< 5", ok_p99, note)
            )
        if "4" in ms:
            rss = self.rate("4", "peak_rss_mib")
            first = self.rate("4", "first_delivery_s")
            small_rss = self.rate("4s", "peak_rss_mib")
            ok_rss = None if math.isnan(rss) else rss < TARGET_S4_RSS_MIB
            ok_first = None if math.isnan(first) else first < TARGET_S4_FIRST_S
            deep = f"{self.sizes.deep:,}"
            rows.append(
                Row(
                    "4",
                    f"peak RSS, {deep} queued",
                    f"{rss:.1f} MiB",
                    f"{rss - small_rss:+.1f} MiB vs {self.sizes.deep_small:,}",
                    f"< {TARGET_S4_RSS_MIB:g} MiB",
                    _verdict(ok_rss),
                )
            )
            rows.append(
                Row(
                    "4",
                    f"first delivery after start, {deep} queued",
                    f"{first * 1000:.0f} ms",
                    f"{self.rate('4s', 'first_delivery_s') * 1000:.0f} ms at "
                    f"{self.sizes.deep_small:,}",
                    f"< {TARGET_S4_FIRST_S:g} s",
                    _verdict(ok_first),
                )
            )
            note = f"M = {self.sizes.deep:,} ({self.sizes.deep_fill} fill)"
            targets.append(
                Target("scenario 4 peak RSS MiB", rss, "< 150", ok_rss, note)
            )
            targets.append(
                Target("scenario 4 first delivery s", first, "< 1", ok_first, note)
            )
        if "5" in self.skipped:
            rows.append(
                Row("5", "direct MX, lanes on demand", "skipped", "", "bounded", "skip")
            )
            targets.append(
                Target(
                    "scenario 5",
                    math.nan,
                    "memory bounded by active lanes",
                    None,
                    self.skipped["5"],
                )
            )
        elif "5" in ms:
            few = ms["5s"].runs if "5s" in ms else []
            rows.extend(mx.report_rows(ms["5"].runs, few, b))
            targets.extend(mx.report_targets(ms["5"].runs, few))
        if "6" in ms:
            control = self.rate("6c")
            if "6c" in ms:
                rate_row("6c", "B", b)
            rate_row("6", "6c", control)
            every = all(r.get("all_delivered") for r in ms["6"].runs) and bool(
                ms["6"].runs
            )
            retried = median([r["attempts"] - r["messages"] for r in ms["6"].runs])
            rows.append(
                Row(
                    "6",
                    "  every message DELIVERED; extra attempts",
                    f"{'yes' if every else 'NO'}; {retried:,.0f}",
                    "",
                    "all DELIVERED",
                    _verdict(every),
                )
            )
            targets.append(
                Target("scenario 6 all delivered", float(every), "all DELIVERED", every)
            )
        for key in ("7", "7m"):
            if key in ms:
                rows.extend(looplag.report_rows(key, ms[key].runs))
                targets.extend(looplag.report_targets(key, ms[key].runs))
        if "P" in ms:
            self._report_pg(rows, targets)
        return rows, targets

    def _report_pg(self, rows: list[Row], targets: list[Target]) -> None:
        ms = self.measurements

        def ceiling(key: str) -> float:
            return self.rate(key, "recipients_per_s")

        one, sqlite = ceiling("P"), ceiling("Ps")
        rows.append(
            Row(
                "P",
                ms["P"].label,
                _fmt_rate(one, "rcpt/s"),
                f"{_ratio(one, sqlite):.2f}x Ps",
            )
        )
        if "Pb" in ms:
            # The target is the store as the Deliverer uses it: outcomes batched.
            best = ceiling("Pb")
            ok = None if math.isnan(best) else best >= pg.TARGET_CEILING
            rows.append(
                Row(
                    "Pb",
                    ms["Pb"].label,
                    _fmt_rate(best, "rcpt/s"),
                    f"{_ratio(best, one):.2f}x P",
                    f">= {pg.TARGET_CEILING:,.0f} rcpt/s",
                    _verdict(ok),
                )
            )
            targets.append(
                Target("PostgreSQL store ceiling rcpt/s", best, ">= 5000", ok, "")
            )
        if "Ps" in ms:
            rows.append(Row("Ps", ms["Ps"].label, _fmt_rate(sqlite, "rcpt/s")))
        if "Psb" in ms:
            batched = ceiling("Psb")
            rows.append(
                Row(
                    "Psb",
                    ms["Psb"].label,
                    _fmt_rate(batched, "rcpt/s"),
                    f"{_ratio(batched, sqlite):.2f}x Ps",
                )
            )
        if "W1" in ms:
            one = self.rate("W1")
            rows.append(
                Row(
                    "W1",
                    ms["W1"].label,
                    _fmt_rate(one),
                    f"{_ratio(one, self.rate('Ws')):.2f}x Ws",
                )
            )
            for key in ("W2", "W4"):
                if key in ms:
                    ratio = _ratio(self.rate(key), one)
                    ok = None
                    if key == "W2" and not math.isnan(ratio):
                        ok = ratio >= pg.TARGET_TWO_WORKERS
                    rows.append(
                        Row(
                            key,
                            ms[key].label,
                            _fmt_rate(self.rate(key)),
                            f"{ratio:.2f}x W1",
                            f">= {pg.TARGET_TWO_WORKERS:g}x W1" if key == "W2" else "",
                            _verdict(ok) if key == "W2" else "",
                        )
                    )
                    if key == "W2":
                        targets.append(
                            Target("PostgreSQL 2 workers / 1", ratio, ">= 1.6", ok, "")
                        )
            if "Ws" in ms:
                rows.append(Row("Ws", ms["Ws"].label, _fmt_rate(self.rate("Ws"))))
        if "Pn" in ms:
            p50, p99 = self.rate("Pn", "p50_ms"), self.rate("Pn", "p99_ms")
            ok = None if math.isnan(p99) else p99 < pg.TARGET_NOTIFY_P99_MS
            rows.append(
                Row(
                    "Pn",
                    ms["Pn"].label,
                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                    "",
                    f"p99 < {pg.TARGET_NOTIFY_P99_MS:g} ms",
                    _verdict(ok),
                )
            )
            targets.append(
                Target("PostgreSQL status change p99 ms", p99, "< 100", ok, "")
            )

    def results(
        self, rows: list[Row], targets: list[Target], started: dt.datetime
    ) -> dict[str, Any]:
        return {
            "schema": RESULTS_SCHEMA,
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": "quick" if self.args.quick else "full",
            "sizes": vars(self.sizes),
            "machine": _machine(self.tmpdir),
            "measurements": {
                key: {
                    "label": m.label,
                    "runs": m.runs,
                    "errors": m.errors,
                    "median": _medians(m),
                }
                for key, m in self.measurements.items()
            },
            "deep_fill": self.fills,
            "layers": self.layer_results,
            "skipped": self.skipped,
            "rows": [vars(r) for r in rows],
            "targets": [vars(t) for t in targets],
        }

    def layers(self) -> None:
        """CPU per delivered message by layer, for the app-like run and
        scenario 1 (see :mod:`bench.layers`)."""
        n = self.sizes.messages
        port = self.sink_port
        runs = (
            ("8", "app-like run", "app_like", {"tasks": APP_TASKS}),
            ("1", "scenario 1", "throughput", {"producers": 1}),
        )
        for key, label, name, extra in runs:
            params = {
                "port": port,
                "messages": n,
                "store": "sqlite",
                **extra,
                "tmpdir": str(self.tmpdir),
            }
            measured = self.rate(key, "cpu_ms_per_msg")
            if math.isnan(measured):  # not measured in this run: once, unprofiled
                plain = {**params, "token": self.token(f"l{key}u", 0)}
                result = run_child(name, plain, timeout=self.child_timeout)
                measured = result["cpu_ms_per_msg"]
            path = (
                Path(os.environ.get("BENCH_LAYERS_DIR", self.tmpdir))
                / f"layers-{key}.prof"
            )
            profiled = {**params, "token": self.token(f"l{key}", 0)}
            result = run_child(name, profiled, timeout=self.child_timeout, profile=path)
            stats = pstats.Stats(str(path))
            per_layer = layers.per_message(stats, result, measured)
            total = sum(per_layer.values())
            heavy = [n for n, us in per_layer.items() if total and us / total >= 0.1]
            tops = {name: layers.top(stats, name) for name in heavy}
            self.layer_results[key] = {
                "label": label,
                "cpu_ms_per_msg": measured,
                "us_per_msg": per_layer,
                "top_functions": tops,
            }
            out(
                f"\nCPU per delivered message by layer, {label} ({measured:.3f} ms "
                "without the profiler; shares from one run under cProfile):"
            )
            for line in layers.table(per_layer):
                out(line)
            for name, functions in tops.items():
                listed = ", ".join(f"{f} {share:.0%}" for f, share in functions)
                out(f"  in {name}: {listed}")

    def profile(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        n = self.sizes.messages
        runs: dict[str, tuple[str, dict[str, Any]]] = {
            "raw_pool": ("raw_pool", {"port": self.sink_port, "messages": n}),
            "scenario1": (
                "throughput",
                {
                    "port": self.sink_port,
                    "messages": n,
                    "producers": 1,
                    "store": "sqlite",
                },
            ),
        }
        for label, (name, params) in runs.items():
            path = directory / f"{label}.prof"
            params = {
                **params,
                "token": self.token(f"p{label}", 0),
                "tmpdir": str(self.tmpdir),
            }
            result = run_child(name, params, timeout=_CHILD_TIMEOUT, profile=path)
            out(f"\n== profile of {label} ({_brief(result)}, under cProfile) -> {path}")
            stats = pstats.Stats(str(path), stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(25)


def _brief(result: dict[str, Any]) -> str:
    for metric, unit in (
        ("msgs_per_s", "msg/s"),
        ("submits_per_s", "submits/s"),
    ):
        if metric in result:
            text = f"{result[metric]:,.0f} {unit}"
            if "cpu_ms_per_msg" in result:
                text += f", {result['cpu_ms_per_msg']:.3f} ms CPU/msg"
            if "p99_ms" in result:
                text += (
                    f", p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
                )
            if "machine_cpu_busy" in result:
                text += f", every CPU {result['machine_cpu_busy']:.0%} busy"
            if "all_delivered" in result and not result["all_delivered"]:
                text += f", NOT ALL DELIVERED: {result['final_states']}"
            return text
    if "cases" in result:
        worst = max((c["stall_ms"] for c in result["cases"].values()), default=0.0)
        return f"largest loop stall {worst:.1f} ms over {len(result['cases'])} cases"
    if "peak_rss_mib" in result:
        return (
            f"first delivery {result['first_delivery_s'] * 1000:.0f} ms, "
            f"peak RSS {result['peak_rss_mib']:.1f} MiB, "
            f"{result['delivered']:,} delivered in {result['deliver_seconds']:g} s"
        )
    return json.dumps(result)[:120]


def _medians(m: Measurement) -> dict[str, float]:
    if not m.runs:
        return {}
    keys = [
        k
        for k, v in m.runs[0].items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return {k: m.median(k) for k in keys}


def _table(rows: list[Row]) -> Iterator[str]:
    headers = Row("#", "scenario", "median", "ratio", "target", "result")
    every = [headers, *rows]
    widths = [
        max(len(getattr(r, f)) for r in every)
        for f in ("key", "label", "value", "ratio", "target", "result")
    ]
    for i, r in enumerate(every):
        cells = (r.key, r.label, r.value, r.ratio, r.target, r.result)
        line = "  ".join(
            c.rjust(w) if j == 2 else c.ljust(w)
            for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        yield line.rstrip()
        if i == 0:
            yield "  ".join("-" * w for w in widths)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    bench = Bench(args)
    started = dt.datetime.now(dt.UTC)
    own_tmp = args.tmpdir is None
    tmpdir = Path(tempfile.mkdtemp(prefix="mailstrom-bench-")) if own_tmp else None
    bench.tmpdir = tmpdir or Path(args.tmpdir)
    bench.tmpdir.mkdir(parents=True, exist_ok=True)
    s = bench.sizes
    out(
        f"mailstrom_async benchmark: {'quick' if args.quick else 'full'} mode, "
        f"{s.repetitions} repetition(s), {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {started:%Y-%m-%d %H:%M} UTC"
    )
    out(
        f"{s.messages:,} messages per throughput run (~2 KB, one recipient); "
        f"files in {bench.tmpdir}"
    )
    try:
        with managed():
            bench.sink_port = start_smtp_sink()
            if bench.wants("6"):
                bench.soft_port = start_soft_sink()
            with contextlib.ExitStack() as stack:
                if bench.wants("pg"):
                    reason = pg.pg_available()
                    if reason is None:
                        bench.pg_dsn = stack.enter_context(pg.cluster())
                    else:
                        bench.skipped["pg"] = reason
                bench.plan()
                bench.fill_deep_queues()
                bench.run()
                if bench.wants("layers"):
                    bench.layers()
                if args.profile:
                    bench.profile(Path(args.profile))
    except KeyboardInterrupt:
        out("\ninterrupted; every child process was stopped")
        return 130
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    rows, targets = bench.report()
    out()
    for line in _table(rows):
        out(line)
    for key, reason in bench.skipped.items():
        out(f"scenario {key} skipped: {reason}")
    results = bench.results(rows, targets, started)
    text = json.dumps(results, indent=2)
    if args.json == "-":
        out(text)
    else:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        out(f"\nJSON results: {path}")
    failed = [m.key for m in bench.measurements.values() if m.errors]
    if failed:
        out(f"errors in: {', '.join(failed)}")
        return 1
    return 0
