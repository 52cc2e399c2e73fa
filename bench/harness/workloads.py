"""The load: the benchmarks (what wrk sends where), one wrk run, and the durable queue's
drain (upstream requests per 1,000 acked events, seconds until the queue is empty)."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.common import (
    BENCH,
    BROWSER_ACCEPT_ENCODING,
    GOAL_DURABLE_P99_MS,
    GOAL_DURABLE_RATIO,
    GOAL_PASSTHROUGH_RATIO,
    GOAL_SCRIPT_RATIO,
    INGEST_PATH,
    QUEUE_POLL_S,
    SCRIPT_PATH,
    BenchError,
    venv_python,
)
from harness.processes import http_request
from harness.targets import Lineup, Target


@dataclass
class Drain:
    """What a durable-ingest run cost upstream, and how long its queue took to empty."""

    acked: int  # responses wrk counted as 2xx (every event the proxy acknowledged to wrk)
    rows_at_end: int  # rows queued when wrk stopped (first poll)
    drain_s: float | None  # end of wrk -> `queue stats` says 0 rows; None: deadline passed
    polls: int
    upstream_requests: int  # at the upstream, from wrk's start until the queue was empty
    dead_letters: int
    user_s: float  # the proxy's CPU between the end of wrk and the empty queue
    sys_s: float

    @property
    def per_1000(self) -> float | None:
        return 1000.0 * self.upstream_requests / self.acked if self.acked else None


@dataclass
class WrkRun:
    benchmark: str
    target: str
    round: int
    requests: int
    duration_us: int
    bytes: int
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_status: int
    errors_timeout: int
    latency_mean_us: float
    latency_max_us: int
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    time_wait_before: int = 0
    non_2xx_line: str = ""
    socket_errors_line: str = ""
    rss_kb_after: int | None = None
    cpu_busy_pct: dict[str, float] = field(default_factory=dict)
    foreign_cpu_s: float = 0.0
    foreign_top: list[str] = field(default_factory=list)  # who: "comm[pid] cpu-s"
    # CPU used meanwhile by the targets not under load on the target core (the idle nginx,
    # the other segproxy; e.g. a queue checkpoint): they share the core with the one measured.
    bystanders_cpu_s: dict[str, float] = field(default_factory=dict)
    # Block-device writes and cache flushes (fsync) completed during the run, machine-wide:
    # the durable queue's commits show here, and so does another process's disk I/O, which
    # the CPU-based noise check cannot see but which slows every fsync.
    disk_writes: int = 0
    disk_flushes: int = 0
    waited_for_quiet_s: float = 0.0
    attempts: int = 1
    target_user_s: float = 0.0
    target_sys_s: float = 0.0
    upstream_requests: int = 0
    upstream_connections: int = 0
    queue_rows_before: int = 0  # durable proxy's queue when the run started (should be 0)
    drain: Drain | None = None  # durable ingest runs only

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def errors(self) -> int:
        return (
            self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
        )

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rps"] = round(self.rps, 1)
        d["errors_total"] = self.errors
        if self.drain is not None:
            per = self.drain.per_1000
            d["drain"]["upstream_per_1000_acked"] = None if per is None else round(per, 2)
        return d


@dataclass
class Benchmark:
    name: str  # unique: also in file names and the JSON ("durable", "durable-browser"...)
    kind: str  # "ingest", "durable" or "script" (what --only picks)
    title: str
    path: str
    script: str
    goal_ratio: float
    target: Target  # what is measured against the reference nginx
    shape: str = ""  # ingest rows: the request shape (common.SHAPES)
    goal_p99_ms: float | None = None  # durable rows: the proxy's median p99 must stay under it
    wrk_headers: list[str] = field(default_factory=list)
    script_args: list[str] = field(default_factory=list)


def shape_note(shape: str, head_len: int) -> str:
    """How a row names its request shape ("browser" counts every header line it sends)."""
    return f"browser: {head_len} headers" if shape == "browser" else shape


def benchmarks(
    lineup: Lineup,
    event: bytes,
    *,
    queue: str,
    target_kind: str,
    only: str | None,
    shapes: Sequence[str],
) -> list[Benchmark]:
    """The benchmarks to run, in order: passthrough ingest and durable ingest (if measured),
    each once per request shape, then the cached script."""
    h = lineup.harness
    event_file = str(h.event_file)
    passthrough = (
        "passthrough ingest"
        if queue == "none" or target_kind != "segproxy"
        else f"ingest (queue={queue})"
    )
    benches: list[Benchmark] = []
    for kind in ("ingest", "durable"):
        target = lineup.target if kind == "ingest" else lineup.durable
        if target is None:
            continue
        for shape in shapes:
            note = shape_note(shape, len(h.heads[shape]))
            benches.append(
                Benchmark(
                    name=kind if shape == "4-header" else f"{kind}-{shape}",
                    kind=kind,
                    title=(
                        f"{passthrough} POST {INGEST_PATH} ({len(event) / 1024:.1f} KB, {note})"
                        if kind == "ingest"
                        else f"durable ingest POST {INGEST_PATH} (sqlite, ack after commit, {note})"
                    ),
                    path=INGEST_PATH,
                    script="post_track.lua",
                    goal_ratio=GOAL_PASSTHROUGH_RATIO if kind == "ingest" else GOAL_DURABLE_RATIO,
                    target=target,
                    shape=shape,
                    goal_p99_ms=None if kind == "ingest" else GOAL_DURABLE_P99_MS,
                    script_args=[event_file, str(h.head_files[shape])],
                )
            )
    benches.append(
        Benchmark(
            name="script",
            kind="script",
            title="cached script GET analytics.min.js (gzip, br)",
            path=SCRIPT_PATH,
            script="get_script.lua",
            goal_ratio=GOAL_SCRIPT_RATIO,
            target=lineup.target,
            wrk_headers=[f"Accept-Encoding: {BROWSER_ACCEPT_ENCODING}"],
        )
    )
    if only:
        benches = [b for b in benches if b.kind == only]
    return benches


def run_wrk(
    bench: Benchmark,
    target: Target,
    *,
    core: int,
    duration: float,
    connections: int,
    round_no: int,
    raw_dir: Path,
) -> WrkRun:
    argv = [
        "taskset",
        "-c",
        str(core),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(BENCH / "wrk" / bench.script),
    ]
    for h in bench.wrk_headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{target.port}{bench.path}")
    if bench.script_args:
        argv += ["--", *bench.script_args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    raw = raw_dir / f"wrk-{bench.name}-{target.label}-r{round_no}.txt"
    raw.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed (exit {done.returncode}) against {target.label}:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    data = json.loads(line.removeprefix("WRK_RESULT "))
    run = WrkRun(benchmark=bench.name, target=target.label, round=round_no, **data)
    for x in done.stdout.splitlines():
        if "Non-2xx or 3xx responses" in x:
            run.non_2xx_line = x.strip()
        if "Socket errors" in x:
            run.socket_errors_line = x.strip()
    return run


def upstream_counters(port: int) -> tuple[int, int]:
    """(accepted connections, requests) from the upstream nginx's stub_status."""
    try:
        text = http_request(port, "GET", "/__bench_status", timeout=5).body.decode()
        accepts, _handled, requests = (int(x) for x in text.splitlines()[2].split())
    except (OSError, http.client.HTTPException, ValueError, IndexError) as exc:
        raise BenchError(f"cannot read the upstream's stub_status: {exc!r}") from exc
    return accepts, requests


def queue_stats(config: Path) -> dict[str, Any]:
    """The durable proxy's queue, as an operator sees it: `segproxy queue stats --json`."""
    argv = [venv_python(), "-m", "segproxy", "queue", "stats", "--json", "--config", str(config)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise BenchError(
                f"segproxy queue stats failed (exit {done.returncode}): {done.stderr[-2000:]}"
            )
        data: dict[str, Any] = json.loads(done.stdout)
        int(data["rows"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"segproxy queue stats: {exc!r}") from exc
    return data


def wait_queue_empty(
    config: Path, since: float, deadline_s: float
) -> tuple[float | None, int, dict[str, Any], int]:
    """Poll `queue stats` until it reports 0 rows or deadline_s after `since` (monotonic).

    Returns (seconds from `since` to the poll that saw 0 rows, or None if the deadline passed;
    polls made; the last stats; rows seen by the first poll). A poll is a CLI start (~0.1 s),
    so the time is an upper bound within about that much.
    """
    polls = 0
    first_rows = -1
    while True:
        stats = queue_stats(config)
        polls += 1
        now = time.monotonic()
        rows = int(stats["rows"])
        if first_rows < 0:
            first_rows = rows
        if rows == 0:
            return round(now - since, 2), polls, stats, first_rows
        if now - since >= deadline_s:
            return None, polls, stats, first_rows
        time.sleep(QUEUE_POLL_S)
