"""Ratio benchmarks: segproxy against a reference nginx, measured in the same run.

Usage: .venv/bin/python bench/run.py [--quick] [--rounds N] [--duration S]  (more: --help)

What one run does (the method is explained in bench/README.md):

    core 1: wrk (-t1 -c50) + the shared fast upstream (nginx, 1 worker)
    core 0: the target under test, one at a time under load:
            segproxy ([queue] backend="none")  |  segproxy-sqlite (durable)  |  reference nginx

1. passthrough ingest: POST a ~1.5 KB analytics.js track event to /v1/t (Basic auth), once with
   4 headers and once with the head Chromium sends (bench/fixtures/chromium-post-track.txt);
2. durable ingest: the same POSTs to segproxy-sqlite, which answers after the group commit;
   plus upstream requests per 1,000 acknowledged events (from wrk's start until the queue is
   empty) and the drain time (wrk's end until `segproxy queue stats` shows 0 rows);
3. cached script: GET /analytics.js/v1/<key>/analytics.min.js with Accept-Encoding: gzip, br;
4. RSS of each segproxy process after the load (VmHWM = peak, VmRSS = last).

Rounds alternate target and reference (ABBA order) so slow drift of the machine hits both;
the table reports medians and the ratio segproxy/nginx from this same run. Results also go
to bench/results/latest.json. Goal marks are informational: the exit code is 0 unless the
harness itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.common import LOAD_CORE, RESULTS, TARGET_CORE, BenchError
from harness.processes import Processes, raise_on_signal
from harness.session import Plan, run


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per target (default 3)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per run (default 8)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument(
        "--target",
        choices=("segproxy", "nginx"),
        default="segproxy",
        help="what to measure against the reference; 'nginx' runs a second reference nginx "
        "as the target, to validate the harness (ratios should be ~1.0)",
    )
    ap.add_argument(
        "--only",
        choices=("ingest", "durable", "script"),
        default=None,
        help="run one benchmark only: passthrough ingest, durable ingest (sqlite, ack after "
        "commit) or the cached script",
    )
    ap.add_argument(
        "--shape",
        choices=("4-header", "browser", "both"),
        default="both",
        help="request shape of the ingest rows: the 4-header POST, the browser-shaped one "
        "(the 16 headers Chromium sends with analytics-next's POST, bench/fixtures/) or both "
        "(default), each against nginx with the same request",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=None,
        help="before each run, wait up to this many seconds for other processes on the machine "
        "to go quiet (default 10, --quick 3; 0 disables)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=None,
        help="redo a run disturbed by other processes up to this many times, keeping the "
        "quietest attempt (default 2, --quick 0)",
    )
    ap.add_argument(
        "--queue",
        choices=("none", "sqlite", "memory"),
        default="none",
        help="[queue] backend of the segproxy measured by the ingest and script rows (default "
        "none: pure pass-through, as their goals assume); durable ingest is always measured "
        "on a second segproxy process with backend sqlite (--only durable for just that)",
    )
    ap.add_argument("--startup-timeout", type=float, default=30.0)
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    return ap


def plan_of(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """Rounds, durations and cores from the options (--quick sets shorter defaults)."""
    rounds: int = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    duration: float = args.duration if args.duration is not None else (3.0 if args.quick else 8.0)
    warmup = 1.0 if args.quick else 2.0
    drain_deadline = 10.0 if args.quick else 30.0
    if args.settle is None:
        args.settle = 3.0 if args.quick else 10.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if rounds < 1 or duration <= 0:
        ap.error("--rounds must be >= 1 and --duration > 0")
    if args.target == "nginx" and args.only == "durable":
        ap.error("--only durable measures segproxy's durable queue: not with --target nginx")
    cpus = os.cpu_count() or 1
    target_core, load_core = (TARGET_CORE, LOAD_CORE) if cpus >= 2 else (0, 0)
    return Plan(rounds, duration, warmup, drain_deadline, target_core, load_core)


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    plan = plan_of(ap, args)
    for tool in ("nginx", "wrk", "taskset", "ss"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found on PATH", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs: everything shares core 0", file=sys.stderr)
    # This script itself stays off the target's core.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {plan.load_core})

    # Ctrl-C must reach us even when started with SIGINT ignored (e.g. as a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_on_signal)
    signal.signal(signal.SIGHUP, raise_on_signal)

    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-"))
    started = dt.datetime.now(dt.UTC)
    try:
        return run(args, procs, tmp, started, plan)
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything this run started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep_temp:
            print(f"temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
