"""One bench session, start to end: start the lineup, say what runs, check each target once,
run the benchmarks, then print the table and write the JSON results."""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common import (
    DURABLE,
    GOAL_DRAIN_S,
    GOAL_UPSTREAM_PER_1000,
    NOISY_SHARE,
    QUEUE_DRAIN_DEADLINE_S,
    QUEUE_POLL_S,
    REPO,
    SEGPROXY,
    SHAPES,
    venv_python,
    version,
)
from harness.fixtures import BROWSER_HEAD
from harness.machine import RssSampler, fs_type
from harness.processes import Processes
from harness.reporting import noisy_warning, rss_report, table
from harness.rounds import Runner
from harness.targets import Harness, Lineup, check_targets, start_lineup
from harness.workloads import benchmarks, wait_queue_empty


@dataclass
class Plan:
    """How long and where: from the command line (--quick, --rounds, --duration) and the CPUs."""

    rounds: int
    duration: float
    warmup: float
    drain_deadline: float
    target_core: int
    load_core: int


def run(
    args: argparse.Namespace, procs: Processes, tmp: Path, started: dt.datetime, plan: Plan
) -> int:
    """The whole session; every process it starts is in ``procs`` (the caller stops them)."""
    h = Harness(tmp, procs, load_core=plan.load_core, target_core=plan.target_core)
    h.prepare(started)
    event = h.event_file.read_bytes()
    lineup = start_lineup(
        h,
        target=args.target,
        only=args.only,
        queue=args.queue,
        startup_timeout=args.startup_timeout,
    )
    pins = lineup.pins()
    build, queue_fs = announce(lineup, plan, args.connections, event)
    checks = sanity_checks(lineup, event)
    shapes = shapes_of(args.shape)
    if args.only != "script":
        print(
            "request shapes: "
            + ", ".join(f"{shape} ({len(h.heads[shape])} header lines)" for shape in shapes)
        )
    benches = benchmarks(
        lineup, event, queue=args.queue, target_kind=args.target, only=args.only, shapes=shapes
    )
    # RSS of each segproxy process, sampled while it is under load (and while it drains).
    samplers = {
        t.label: RssSampler(t.proc.pid) for t in lineup.targets if t.label in (SEGPROXY, DURABLE)
    }
    rss_idle_kb = {name: s.sample() for name, s in samplers.items()}
    runner = Runner(
        lineup,
        samplers,
        load_core=plan.load_core,
        connections=args.connections,
        raw_dir=tmp / "logs",
        settle=args.settle,
        drain_deadline=plan.drain_deadline,
        retries=args.retries,
        noisy_cpu_s=NOISY_SHARE * plan.duration,
    )
    for bench in benches:
        runner.run_benchmark(bench, plan.rounds, plan.duration, plan.warmup)
    rss_by = rss_report(lineup.targets, samplers, {b.target.label for b in benches}, rss_idle_kb)
    lines, results = table(benches, runner.runs, rss_by, lineup.target.label)
    print()
    print(
        f"Medians of {plan.rounds} round(s) x {plan.duration:g}s each, same run; ratio = "
        f"target/nginx (durable ingest: {DURABLE}/nginx)."
    )
    print("\n".join(lines))
    out: dict[str, Any] = {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "target": lineup.target.label,
        "method": method_json(args, plan, lineup, queue_fs, runner.noisy_cpu_s, len(event))
        | {"request_shapes": shapes_json(lineup, shapes)},
        "machine": machine_json(build),
        "affinity": pins,
        "checks": checks,
        "benchmarks": results,
        "rss": rss_by.get(SEGPROXY, {}),
        "rss_durable": rss_by.get(DURABLE, {}),
        "runs": [r.as_json() for r in runner.runs],
        "table_markdown": "\n".join(lines),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    warning = noisy_warning(runner.runs, runner.noisy_cpu_s)
    if warning is not None:
        print(warning)
    print(f"\nresults: {args.output}")
    return 0


def announce(lineup: Lineup, plan: Plan, connections: int, event: bytes) -> tuple[str, str]:
    """Say what runs where, and how segproxy runs; returns (segproxy --version, the queue's
    filesystem type)."""
    h = lineup.harness
    durable = lineup.durable
    print(
        f"segproxy bench: target={lineup.target.label}"
        + (f" and {DURABLE} (durable ingest)" if durable else "")
        + f" on core {plan.target_core}, reference nginx on core "
        f"{plan.target_core}, wrk + upstream nginx on core {plan.load_core}; {plan.rounds} "
        f"round(s) x {plan.duration:g}s, -t1 -c{connections}; event {len(event)} B; bundle "
        f"{len(h.bundle):,} B ({len(gzip.compress(h.bundle, 9)):,} B gzip, {h.bundle_source})"
    )
    print(
        f"ports: upstream {lineup.upstream.port}, nginx {lineup.reference.port}, "
        + ", ".join(f"{t.label} {t.port}" for t in lineup.targets)
    )
    build = version([venv_python(), "-m", "segproxy", "--version"])
    print(f"build: {build}")
    if "compiled" not in build:
        print("warning: segproxy runs as plain Python here (scripts/setup.sh compiles it)")
    queue_fs = fs_type(h.tmp)
    if durable is not None:
        print(f"{DURABLE}: queue {h.tmp / DURABLE / 'queue.db'} on {queue_fs}")
        if queue_fs == "tmpfs":
            print(f"warning: the queue is on tmpfs: fsync is free, {DURABLE} is flattered")
    return build, queue_fs


def sanity_checks(lineup: Lineup, event: bytes) -> dict[str, Any]:
    """One request to each target before the load (and the durable queue drains it)."""
    durable = lineup.durable
    checks = check_targets(
        (lineup.target, lineup.reference),
        event,
        lineup.harness.bundle,
        lineup.harness.heads,
        ingest_only=[durable] if durable else [],
    )
    if durable is not None and durable.config is not None:
        # The check event must go through the queue and out: the drain path works.
        drained, _polls, stats, _first = wait_queue_empty(
            durable.config, time.monotonic(), QUEUE_DRAIN_DEADLINE_S
        )
        checks[DURABLE]["queue_drained_s"] = drained
        checks[DURABLE]["queue_stats"] = stats
    for name, entry in checks.items():
        line = f"check {name}: ingest {entry['ingest']}"
        if "ingest_browser" in entry:
            line += f" | browser-shaped ingest {entry['ingest_browser']}"
        if "script" in entry:
            line += f" | script {entry['script']}"
        if "queue_drained_s" in entry:
            line += f" | queue empty after {entry['queue_drained_s']} s"
        print(line)
    return checks


def shapes_of(choice: str) -> tuple[str, ...]:
    """--shape: one request shape, or both (4-header first, as the rows were before)."""
    return SHAPES if choice == "both" else (choice,)


def shapes_json(lineup: Lineup, shapes: Sequence[str]) -> dict[str, Any]:
    """The request shapes measured: each one's header names in the order sent."""
    h = lineup.harness
    return {
        shape: {
            "headers": [name for name, _ in h.heads[shape]],
            "source": str(BROWSER_HEAD.relative_to(REPO))
            if shape == "browser"
            else "bench/harness/fixtures.py (request_head)",
        }
        for shape in shapes
    }


def method_json(
    args: argparse.Namespace,
    plan: Plan,
    lineup: Lineup,
    queue_fs: str,
    noisy_cpu_s: float,
    event_bytes: int,
) -> dict[str, Any]:
    """How the numbers were taken, for the JSON results."""
    durable = None
    if lineup.durable is not None:
        durable = {
            "target": DURABLE,
            "queue_filesystem": queue_fs,
            "queue": "sqlite (defaults: synchronous=normal, forward.max_delay=0.2)",
            "upstream_per_1000": "upstream stub_status requests from wrk's start until "
            "`segproxy queue stats` reports 0 rows, / wrk's 2xx responses * 1000",
            "drain": "end of wrk -> first `segproxy queue stats --json` with rows == 0, "
            f"polled every {QUEUE_POLL_S:g}s (plus a CLI start each)",
            "drain_deadline_s": QUEUE_DRAIN_DEADLINE_S,
            "goal_upstream_per_1000": GOAL_UPSTREAM_PER_1000,
            "goal_drain_s": GOAL_DRAIN_S,
        }
    return {
        "rounds": plan.rounds,
        "duration_s": plan.duration,
        "warmup_s": plan.warmup,
        "wrk": f"-t1 -c{args.connections} --timeout 5s",
        "target_core": plan.target_core,
        "load_core": plan.load_core,
        "segproxy_queue": args.queue,
        "durable": durable,
        "order": "ABBA (odd rounds target first, even rounds reference first)",
        "settle_s": args.settle,
        "retries": args.retries,
        "noisy_cpu_s": noisy_cpu_s,
        "event_bytes": event_bytes,
        "bundle_bytes": len(lineup.harness.bundle),
        "bundle_source": lineup.harness.bundle_source,
    }


def machine_json(build: str) -> dict[str, Any]:
    """What ran the bench: the machine and each tool's version."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "segproxy": build,
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "--version"]),
        "git_head": version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }
