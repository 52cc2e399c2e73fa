"""Ratio benchmarks: segproxy against a reference nginx, measured in the same run.

Usage: .venv/bin/python bench/run.py [--quick] [--rounds N] [--duration S]  (more: --help)

What one run does (the method is explained in bench/README.md):

    core 1: wrk (-t1 -c50) + the shared fast upstream (nginx, 1 worker)
    core 0: the target under test, one at a time under load:
            segproxy ([queue] backend="none")  |  segproxy-sqlite (durable)  |  reference nginx

1. passthrough ingest: POST a ~1.5 KB analytics.js track event to /v1/t (Basic auth);
2. durable ingest: the same POST to segproxy-sqlite, which answers after the group commit;
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
import base64
import contextlib
import datetime as dt
import gzip
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import brotli

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results" / "latest.json"

WRITE_KEY = "segBenchWriteKey0x7f3a9c2e5d1b8a"
SCRIPT_PATH = f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js"
INGEST_PATH = "/v1/t"
BROWSER_ACCEPT_ENCODING = "gzip, br"
BUNDLE_MARKER = "segproxy-bench-bundle"
REAL_BUNDLE = (
    REPO / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd" / "standalone.js"
)

# Vocabulary of the generated stand-in bundle.
JS_WORDS = (
    "analytics track page identify group alias screen context integrations plugin "
    "segment destination settings event properties middleware queue dispatch flush "
    "retry storage cookie user anonymousId traits options callback promise emitter "
    "timeout deliver register deregister load ready reset debug timestamp messageId "
    "sentAt writeKey apiHost protocol metrics sampleRate bundle chunk loader script "
    "consent categories version library locale timezone campaign referrer search "
    "title"
)

TARGET_CORE = 0
LOAD_CORE = 1

# Goals, printed next to the ratios (informational).
GOAL_PASSTHROUGH_RATIO = 0.5
GOAL_DURABLE_RATIO = 0.6
GOAL_SCRIPT_RATIO = 0.8
GOAL_RSS_MB = 60.0
# Durable ingest: upstream requests per 1,000 acknowledged events, and seconds from the end of
# the load until the queue is empty (both must hold in every measured round).
GOAL_UPSTREAM_PER_1000 = 20.0
GOAL_DRAIN_S = 10.0

# Labels of the targets (also in file names and the JSON).
SEGPROXY = "segproxy"
DURABLE = "segproxy-sqlite"
DURABLE_TITLE = f"durable ingest POST {INGEST_PATH} (sqlite, ack after commit)"

# How long to wait for the durable proxy's queue to empty (after a run, and before the next).
QUEUE_DRAIN_DEADLINE_S = 60.0
QUEUE_POLL_S = 0.05

# A run during which other processes used more than this share of one core is "noisy".
NOISY_SHARE = 0.05

CLK_TCK = os.sysconf("SC_CLK_TCK")

# TIME_WAIT sockets on our ports tolerated before the next run starts.
TIME_WAIT_LOW = 200


class BenchError(RuntimeError):
    """The harness could not do what it was asked (a process did not start, wrk failed...)."""


# --------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every process this script starts, so that all of them stop on any exit path.

    Each child gets its own session (so a stray terminal signal reaches us, not it, and we
    stop it in order); it is stopped by its pid: SIGTERM, then SIGKILL after a deadline, and
    then any leftover member of the process group it leads (nginx workers, say) is killed.
    """

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path, log: Path, env: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._procs.append((name, proc))
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        # The group's id is the pid we started: only its own descendants can be left in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        while self._procs:
            _name, proc = self._procs.pop()
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_tree(pid: int) -> list[int]:
    """The pid and its descendants (through /proc/<pid>/task/<tid>/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{p}/task/{task}/children").read_text()
                    todo.extend(int(c) for c in text.split())
        except OSError:
            continue
    return out


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def affinity(pid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# HTTP helpers (sanity checks only; the load comes from wrk)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"port {port} did not open within {deadline_s:.0f}s:\n{tail(log)}")


def decode_body(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "br":
        out: bytes = brotli.decompress(body)
        return out
    return body


# --------------------------------------------------------------------------------------------
# Fixtures: the event, the bundle, the settings, the configs


def track_event_template(now: dt.datetime) -> bytes:
    """A realistic analytics.js (analytics-next) track event of about 1.5 KB."""
    ts = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    event: dict[str, Any] = {
        "timestamp": ts,
        "integrations": {},
        "event": "Product Added",
        "type": "track",
        "properties": {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "G-32",
            "category": "Games",
            "name": "Monopoly: 3rd Edition",
            "brand": "Hasbro",
            "variant": "200 pieces",
            "price": 18.99,
            "quantity": 1,
            "coupon": "MAYDEALS",
            "position": 3,
            "currency": "EUR",
            "cart_id": "skdjsidjsdkdj29j",
            "url": "https://shop.example.com/products/monopoly-3rd-edition",
            "image_url": "https://cdn.shop.example.com/images/products/monopoly-3rd-edition.jpg",
        },
        "context": {
            "page": {
                "path": "/products/monopoly-3rd-edition",
                "referrer": "https://www.google.com/",
                "search": "?utm_source=newsletter&utm_medium=email&utm_campaign=may_deals",
                "title": "Monopoly: 3rd Edition | Example Shop",
                "url": "https://shop.example.com/products/monopoly-3rd-edition"
                "?utm_source=newsletter&utm_medium=email&utm_campaign=may_deals",
            },
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/126.0.0.0 Safari/537.36",
            "userAgentData": {
                "brands": [
                    {"brand": "Not/A)Brand", "version": "8"},
                    {"brand": "Chromium", "version": "126"},
                    {"brand": "Google Chrome", "version": "126"},
                ],
                "mobile": False,
                "platform": "Linux",
            },
            "locale": "de-DE",
            "library": {"name": "analytics.js", "version": "next-1.72.0"},
            "timezone": "Europe/Berlin",
            "campaign": {"source": "newsletter", "medium": "email", "name": "may_deals"},
        },
        "messageId": "__MESSAGE_ID__",
        "anonymousId": "8f1c2b3a-5d4e-4f60-9a7b-1c2d3e4f5a6b",
        "writeKey": WRITE_KEY,
        "userId": None,
        "sentAt": ts,
        "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
    }
    return json.dumps(event, separators=(",", ":")).encode()


def make_bundle(size: int = 140_000) -> bytes:
    """A deterministic, minified-JS-like file that compresses about as well as the real one."""
    rng = random.Random(20240501)
    words = JS_WORDS.split()
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$"

    def ident() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.choice((1, 1, 2, 2, 3))))

    parts = [
        f"/*! {BUNDLE_MARKER}: stands in for @segment/analytics-next dist/umd/standalone.js */\n",
        f'!function(){{"use strict";var __wk="{WRITE_KEY}";',
    ]
    total = sum(len(p) for p in parts)
    while total < size:
        a, b, c = ident(), ident(), ident()
        w, w2 = rng.choice(words), rng.choice(words)
        n = rng.randint(0, 99999)
        piece = rng.choice(
            (
                f"function {ident()}({a},{b}){{return {a}&&{a}.{w}?{b}.{w2}({a}.{w}):void 0}}",
                f'var {ident()}="{w}",{ident()}={n},{ident()}="{w2}-{n:x}";',
                f"{ident()}.prototype.{w}=function({a}){{var {c}=this;return new Promise("
                f"function(t,e){{{c}.{w2}({a},t,e)}})}};",
                f'if("undefined"!=typeof window&&window.{w}){{{ident()}({n},"{w2}")}}',
                f"case {n % 97}:return {a}.{w}=({b}||{{}}).{w2},{c}.push({a}),[3,{n % 13}];",
                f"{a}=Object.assign({{}},{b},{{{w}:{c}.{w2}||null,{w2}:{n}}});",
            )
        )
        parts.append(piece)
        total += len(piece)
    parts.append("}();\n")
    return "".join(parts).encode()


def load_bundle() -> tuple[bytes, str]:
    """The bundle the fake CDN serves: the real analytics-next build if npm installed it
    (with the write key filled in, as the CDN does), else a generated stand-in."""
    if REAL_BUNDLE.is_file():
        data = REAL_BUNDLE.read_bytes().replace(b"__WRITE_KEY__", WRITE_KEY.encode())
        return data, str(REAL_BUNDLE.relative_to(REPO))
    return make_bundle(), "generated stand-in (node_modules not installed)"


def settings_json() -> str:
    settings = {
        "integrations": {
            "Segment.io": {
                "apiKey": WRITE_KEY,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
                "apiHost": "api.segment.io/v1",
            }
        },
        "plan": {"track": {"__default": {"enabled": True, "integrations": {}}}},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0.1, "host": "api.segment.io/v1"},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }
    text = json.dumps(settings, separators=(",", ":"))
    # It is pasted into an nginx `return 200 '...'` string.
    assert "'" not in text and "$" not in text and "\\" not in text
    return text


def render(template: Path, dest: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise BenchError(f"unrendered placeholder in {template}")
    dest.write_text(text)


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    # "segproxy", "segproxy-sqlite" (durable ingest), "nginx" (the reference) or "nginx-b"
    # (self-test target)
    label: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path | None = None  # segproxy's TOML (the queue CLI reads it)


def venv_python() -> str:
    python = REPO / ".venv" / "bin" / "python"
    return str(python) if python.exists() else sys.executable


class Harness:
    def __init__(self, tmp: Path, procs: Processes, *, load_core: int, target_core: int) -> None:
        self.tmp = tmp
        self.procs = procs
        self.load_core = load_core
        self.target_core = target_core
        self.user_line = "user root;" if os.geteuid() == 0 else ""
        self.upstream_port = 0
        self.event_file = tmp / "track-event.json"
        self.bundle, self.bundle_source = load_bundle()
        self.env = dict(os.environ)

    def pinned(self, core: int, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", str(core), *argv]

    def prepare(self, now: dt.datetime) -> None:
        for d in ("tmp", "cache", "cdn", "logs"):
            (self.tmp / d).mkdir()
        self.event_file.write_bytes(track_event_template(now))
        cdn = self.tmp / "cdn"
        (cdn / "analytics.min.js").write_bytes(self.bundle)
        # Pre-compressed once, as a CDN does (gzip_static serves it to gzip-accepting clients).
        (cdn / "analytics.min.js.gz").write_bytes(gzip.compress(self.bundle, 9, mtime=0))

    def start_nginx(self, name: str, template: str, core: int, values: dict[str, str]) -> Target:
        port = free_port()
        conf = self.tmp / f"{name}.conf"
        render(
            BENCH / "nginx" / template,
            conf,
            {"PREFIX": str(self.tmp), "NAME": name, "PORT": str(port), "USER": self.user_line}
            | values,
        )
        log = self.tmp / "logs" / f"{name}.out"
        argv = self.pinned(
            core,
            ["nginx", "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / f"{name}.err")],
        )
        proc = self.procs.start(name, argv, cwd=self.tmp, log=log, env=self.env)
        wait_port(port, proc, log, 10)
        return Target(name, port, proc, log)

    def start_upstream(self) -> Target:
        up = self.start_nginx(
            "upstream",
            "upstream.conf.in",
            self.load_core,
            {"WRITE_KEY": WRITE_KEY, "SETTINGS_JSON": settings_json()},
        )
        self.upstream_port = up.port
        return up

    def start_reference(self, name: str) -> Target:
        ref = self.start_nginx(
            name,
            "reference.conf.in",
            self.target_core,
            {"UPSTREAM_PORT": str(self.upstream_port)},
        )
        ref.label = "nginx" if name == "reference" else "nginx-b"
        return ref

    def start_segproxy(self, deadline_s: float, queue: str, label: str = SEGPROXY) -> Target:
        """One segproxy process with its own port and data dir (config, queue file)."""
        port = free_port()
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        data = self.tmp / label
        data.mkdir()
        config = data / "segproxy.toml"
        queue_path = f'path = "{data / "queue.db"}"\n' if queue == "sqlite" else ""
        config.write_text(
            f'listen = "127.0.0.1:{port}"\n\n'
            f'[upstream]\napi = "{upstream}"\ncdn = "{upstream}"\n\n'
            f'[queue]\nbackend = "{queue}"\n{queue_path}\n'
            f'[sources]\nwrite_keys = ["{WRITE_KEY}"]\n'
        )
        log = self.tmp / "logs" / f"{label}.out"
        env = self.env | {"PYTHONUNBUFFERED": "1"}
        argv = self.pinned(
            self.target_core, [venv_python(), "-m", "segproxy", "serve", "--config", str(config)]
        )
        proc = self.procs.start(label, argv, cwd=data, log=log, env=env)
        deadline = time.monotonic() + deadline_s
        announced = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"segproxy exited with {proc.returncode}:\n{tail(log)}")
            announced = announced or "segproxy listening on" in log.read_text(errors="replace")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_request(port, "GET", "/healthz", timeout=1).status == 200:
                    return Target(label, port, proc, log, config)
            time.sleep(0.1)
        raise BenchError(
            f"segproxy did not answer GET /healthz with 200 within {deadline_s:.0f}s "
            f"(announced: {announced}):\n{tail(log)}"
        )


# --------------------------------------------------------------------------------------------
# wrk


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
    name: str
    title: str
    path: str
    script: str
    goal_ratio: float
    target: Target  # what is measured against the reference nginx
    wrk_headers: list[str] = field(default_factory=list)
    script_args: list[str] = field(default_factory=list)


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


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-core (busy, total) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def cpu_busy(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """Busy % per core between two cpu_times() readings: tells which side was the bottleneck."""
    busy: dict[str, float] = {}
    for name, (b1, t1) in after.items():
        b0, t0 = before.get(name, (0, 0))
        if t1 > t0:
            busy[name] = round(100.0 * (b1 - b0) / (t1 - t0), 1)
    return busy


def foreign_cpu_ticks() -> dict[int, int]:
    """utime+stime of every user-space process that is not this script or its descendants.

    The machine may be shared (tests, another proxy...): CPU that others burn during a run
    makes that run's numbers suspect, so each run reports it.
    """
    ours = set(pid_tree(os.getpid()))
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        if int(entry) == 2 or ppid == 2:  # kernel threads
            continue
        out[int(entry)] = int(fields[11]) + int(fields[12])
    return out


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process tree, threads included."""
    user = system = 0
    for p in pid_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def disk_counters() -> tuple[int, int]:
    """(writes, flushes) completed by the machine's disks, from /proc/diskstats."""
    writes = flushes = 0
    with contextlib.suppress(OSError):
        disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "zram"))}
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) < 14 or f[2] not in disks:
                continue
            writes += int(f[7])
            if len(f) >= 20:  # kernel 5.5+: flush requests completed
                flushes += int(f[18])
    return writes, flushes


def fs_type(path: Path) -> str:
    """The filesystem type holding path (from /proc/mounts): tmpfs would make fsync free."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            f = line.split()
            inside = str(path) == f[1] or str(path).startswith(f[1].rstrip("/") + "/")
            if len(f) >= 3 and inside and len(f[1]) > len(best):
                best, kind = f[1], f[2]
    return kind


def foreign_top(before: dict[int, int], after: dict[int, int], n: int = 3) -> list[str]:
    """The processes that used the most of the foreign CPU, as "comm[pid] cpu-s"."""
    deltas = sorted(((t - before.get(pid, 0), pid) for pid, t in after.items()), reverse=True)
    out: list[str] = []
    for ticks, pid in deltas[:n]:
        if ticks / CLK_TCK < 0.01:
            break
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = "?"
        out.append(f"{comm}[{pid}] {ticks / CLK_TCK:.2f}")
    return out


def foreign_cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return round(max(0, ticks) / CLK_TCK, 2)


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


def wait_for_quiet(deadline_s: float, window_s: float = 0.5, max_share: float = 0.05) -> float:
    """Wait (bounded) until other processes use < max_share of a core; return seconds waited."""
    start = time.monotonic()
    while True:
        before = foreign_cpu_ticks()
        time.sleep(window_s)
        if foreign_cpu_seconds(before, foreign_cpu_ticks()) < max_share * window_s:
            break
        if time.monotonic() - start >= deadline_s:
            break
    return round(time.monotonic() - start - window_s, 1)


def time_wait_count(ports: set[int]) -> int:
    try:
        out = subprocess.run(
            ["ss", "-Htan", "state", "time-wait"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = 0
    for line in out.splitlines():
        for col in line.split():
            if ":" in col:
                port = col.rsplit(":", 1)[1]
                if port.isdigit() and int(port) in ports:
                    n += 1
                    break
    return n


def drain_time_wait(ports: set[int], deadline_s: float) -> int:
    """Wait (bounded) until few TIME_WAIT sockets on our ports are left; return the count seen
    first, a measure of how many connections the previous run opened and closed."""
    first = time_wait_count(ports)
    count = first
    deadline = time.monotonic() + deadline_s
    while count > TIME_WAIT_LOW and time.monotonic() < deadline:
        time.sleep(1)
        count = time_wait_count(ports)
    time.sleep(0.5)
    return first


# --------------------------------------------------------------------------------------------
# RSS


class RssSampler:
    """Samples VmRSS of a process tree while the load runs (peak is also in VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        total = 0
        for p in pid_tree(self.pid):
            total += proc_status_kb(p, "VmRSS") or 0
        self.peak_kb = max(self.peak_kb, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()
            self.sample()


# --------------------------------------------------------------------------------------------
# Sanity checks (one request each, before the load)


def check_targets(
    targets: Sequence[Target], event: bytes, bundle: bytes, *, ingest_only: Sequence[Target] = ()
) -> dict[str, Any]:
    """One ingest POST per target, and a look at a script cache hit (except ingest_only ones:
    the durable proxy is only measured on ingest, so its cache and RSS stay as they are)."""
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    body = event.replace(b"__MESSAGE_ID__", b"ajs-next-1700000000000-sanity-check")
    report: dict[str, Any] = {}
    for t in [*targets, *ingest_only]:
        entry: dict[str, Any] = {}
        try:
            r = http_request(
                t.port,
                "POST",
                INGEST_PATH,
                body=body,
                headers={"Content-Type": "text/plain", "Authorization": f"Basic {basic}"},
            )
            entry["ingest"] = {"status": r.status, "body": r.body[:200].decode(errors="replace")}
        except (OSError, http.client.HTTPException) as exc:
            entry["ingest"] = {"error": repr(exc)}
        if t in ingest_only:
            report[t.label] = entry
            continue
        # Warm the cache (the first request fetches from the upstream), then look at a hit.
        script: dict[str, Any] = {}
        try:
            for _ in range(3):
                r = http_request(
                    t.port, "GET", SCRIPT_PATH, headers={"Accept-Encoding": BROWSER_ACCEPT_ENCODING}
                )
                time.sleep(0.1)
            enc = r.headers.get("content-encoding", "identity")
            script = {
                "status": r.status,
                "content_encoding": enc,
                "content_type": r.headers.get("content-type", ""),
                "wire_bytes": len(r.body),
                "cache_status": r.headers.get("x-cache-status", ""),
            }
            try:
                plain = decode_body(r.body, enc)
                script["decoded_bytes"] = len(plain)
                script["identical_to_upstream"] = plain == bundle
                # A proxy may prepend/patch a little (e.g. the CDN base): look for the tail.
                script["contains_bundle"] = bundle[-256:] in plain
            except Exception as exc:
                script["decode_error"] = repr(exc)
        except (OSError, http.client.HTTPException) as exc:
            script = {"error": repr(exc)}
        entry["script"] = script
        report[t.label] = entry
    return report


# --------------------------------------------------------------------------------------------
# Report


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def cpu_note(busy: dict[str, float]) -> str:
    return "/".join(f"{v:.0f}%" for _k, v in sorted(busy.items()))


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summarize(runs: list[WrkRun], label: str) -> dict[str, Any]:
    mine = [r for r in runs if r.target == label]
    if not mine:
        return {}
    return {
        "median_rps": round(statistics.median(r.rps for r in mine), 1),
        "median_p99_us": statistics.median(r.p99_us for r in mine),
        "median_p50_us": statistics.median(r.p50_us for r in mine),
        "rps_per_round": [round(r.rps, 1) for r in mine],
        "p99_us_per_round": [r.p99_us for r in mine],
        "errors_total": sum(r.errors for r in mine),
        "requests_total": sum(r.requests for r in mine),
        "upstream_requests_total": sum(r.upstream_requests for r in mine),
        "upstream_new_connections_total": sum(r.upstream_connections for r in mine),
        "bytes_per_response": round(
            sum(r.bytes for r in mine) / max(1, sum(r.requests for r in mine)), 1
        ),
    }


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """Median where None (no ack, or no drain before the deadline) counts as worst."""
    med = statistics.median(float("inf") if v is None else v for v in values)
    return None if med == float("inf") else round(med, 2)


def summarize_drains(drains: Sequence[Drain]) -> dict[str, Any]:
    """Durable ingest, over the measured rounds: upstream requests per 1,000 acknowledged
    events and drain times. A goal holds only if it holds in every round."""
    per = [d.per_1000 for d in drains]
    took = [d.drain_s for d in drains]
    acked = sum(d.acked for d in drains)
    upstream = sum(d.upstream_requests for d in drains)
    return {
        "upstream_per_1000": {
            "per_round": [None if v is None else round(v, 2) for v in per],
            "median": _median_or_none(per),
            "pooled": round(1000.0 * upstream / acked, 2) if acked else None,
            "upstream_requests_total": upstream,
            "acked_total": acked,
            "goal_max": GOAL_UPSTREAM_PER_1000,
            "pass": all(v is not None and v <= GOAL_UPSTREAM_PER_1000 for v in per),
        },
        "drain_s": {
            "per_round": took,
            "median": _median_or_none(took),
            "rows_at_end_per_round": [d.rows_at_end for d in drains],
            "deadline_s": QUEUE_DRAIN_DEADLINE_S,
            "goal_max": GOAL_DRAIN_S,
            "pass": all(v is not None and v <= GOAL_DRAIN_S for v in took),
        },
        "dead_letters": max((d.dead_letters for d in drains), default=0),
    }


def drain_rows(summary: dict[str, Any]) -> list[str]:
    """The two extra table lines of the durable ingest benchmark."""

    def num(v: float | None, unit: str = "") -> str:
        return f"> {QUEUE_DRAIN_DEADLINE_S:g}{unit}" if v is None else f"{v:g}{unit}"

    per = summary["upstream_per_1000"]
    took = summary["drain_s"]
    per_rounds = " / ".join("n/a" if v is None else f"{v:.2f}" for v in per["per_round"])
    took_rounds = " / ".join(num(v) for v in took["per_round"])
    per_median = "n/a" if per["median"] is None else f"{per['median']:.2f}"
    return [
        f"| durable ingest: upstream requests per 1,000 acked events (wrk start to queue "
        f"empty) | {per_median} (rounds {per_rounds}) | | | | | | "
        f"| <= {GOAL_UPSTREAM_PER_1000:g} every round {mark(per['pass'])} |",
        f"| durable ingest: drain time, end of load to empty queue | {num(took['median'], ' s')} "
        f"(rounds {took_rounds}) | | | | | | "
        f"| <= {GOAL_DRAIN_S:g} s every round {mark(took['pass'])} |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
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
    args = ap.parse_args(argv)

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
    for tool in ("nginx", "wrk", "taskset", "ss"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found on PATH", file=sys.stderr)
            return 2
    cpus = os.cpu_count() or 1
    target_core, load_core = (TARGET_CORE, LOAD_CORE) if cpus >= 2 else (0, 0)
    if cpus < 2:
        print("warning: fewer than 2 CPUs: everything shares core 0", file=sys.stderr)
    # This script itself stays off the target's core.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {load_core})

    # Ctrl-C must reach us even when started with SIGINT ignored (e.g. as a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)

    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-"))
    started = dt.datetime.now(dt.UTC)
    try:
        return _run(
            args,
            procs,
            tmp,
            started,
            rounds=rounds,
            duration=duration,
            warmup=warmup,
            drain_deadline=drain_deadline,
            target_core=target_core,
            load_core=load_core,
        )
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


def _run(
    args: argparse.Namespace,
    procs: Processes,
    tmp: Path,
    started: dt.datetime,
    *,
    rounds: int,
    duration: float,
    warmup: float,
    drain_deadline: float,
    target_core: int,
    load_core: int,
) -> int:
    h = Harness(tmp, procs, load_core=load_core, target_core=target_core)
    h.prepare(started)
    event = h.event_file.read_bytes()
    raw_dir = tmp / "logs"

    upstream = h.start_upstream()
    reference = h.start_reference("reference")
    if args.target == "segproxy":
        target = h.start_segproxy(args.startup_timeout, args.queue)
    else:
        target = h.start_reference("target")
    label = target.label
    # Durable ingest: a second segproxy (own port, own data dir, [queue] backend = "sqlite",
    # same upstream, same core), idle except during its own runs and their drains.
    durable: Target | None = None
    if args.target == "segproxy" and args.only in (None, "durable"):
        durable = h.start_segproxy(args.startup_timeout, "sqlite", label=DURABLE)
    targets = [t for t in (target, durable) if t is not None]
    ports = {upstream.port, reference.port, *(t.port for t in targets)}

    pins = {
        t.label: {str(p): affinity(p) for p in pid_tree(t.proc.pid)}
        for t in (upstream, reference, *targets)
    }
    print(
        f"segproxy bench: target={label}"
        + (f" and {DURABLE} (durable ingest)" if durable else "")
        + f" on core {target_core}, reference nginx on core "
        f"{target_core}, wrk + upstream nginx on core {load_core}; {rounds} round(s) x "
        f"{duration:g}s, -t1 -c{args.connections}; event {len(event)} B; bundle "
        f"{len(h.bundle):,} B ({len(gzip.compress(h.bundle, 9)):,} B gzip, {h.bundle_source})"
    )
    print(
        f"ports: upstream {upstream.port}, nginx {reference.port}, "
        + ", ".join(f"{t.label} {t.port}" for t in targets)
    )
    build = _version([venv_python(), "-m", "segproxy", "--version"])
    print(f"build: {build}")
    if "compiled" not in build:
        print("warning: segproxy runs as plain Python here (scripts/setup.sh compiles it)")
    queue_fs = fs_type(tmp)
    if durable is not None:
        print(f"{DURABLE}: queue {tmp / DURABLE / 'queue.db'} on {queue_fs}")
        if queue_fs == "tmpfs":
            print(f"warning: the queue is on tmpfs: fsync is free, {DURABLE} is flattered")

    checks = check_targets(
        (target, reference), event, h.bundle, ingest_only=[durable] if durable else []
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
        if "script" in entry:
            line += f" | script {entry['script']}"
        if "queue_drained_s" in entry:
            line += f" | queue empty after {entry['queue_drained_s']} s"
        print(line)

    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    benches = [
        Benchmark(
            name="ingest",
            title=(
                "passthrough ingest"
                if args.queue == "none" or args.target != "segproxy"
                else f"ingest (queue={args.queue})"
            )
            + f" POST {INGEST_PATH} ({len(event) / 1024:.1f} KB)",
            path=INGEST_PATH,
            script="post_track.lua",
            goal_ratio=GOAL_PASSTHROUGH_RATIO,
            target=target,
            script_args=[str(h.event_file), basic],
        ),
    ]
    if durable is not None:
        benches.append(
            Benchmark(
                name="durable",
                title=DURABLE_TITLE,
                path=INGEST_PATH,
                script="post_track.lua",
                goal_ratio=GOAL_DURABLE_RATIO,
                target=durable,
                script_args=[str(h.event_file), basic],
            )
        )
    benches.append(
        Benchmark(
            name="script",
            title="cached script GET analytics.min.js (gzip, br)",
            path=SCRIPT_PATH,
            script="get_script.lua",
            goal_ratio=GOAL_SCRIPT_RATIO,
            target=target,
            wrk_headers=[f"Accept-Encoding: {BROWSER_ACCEPT_ENCODING}"],
        )
    )
    if args.only:
        benches = [b for b in benches if b.name == args.only]

    # RSS of each segproxy process, sampled while it is under load (and while it drains).
    samplers = {t.label: RssSampler(t.proc.pid) for t in targets if t.label in (SEGPROXY, DURABLE)}
    rss_idle_kb = {name: s.sample() for name, s in samplers.items()}
    all_runs: list[WrkRun] = []

    noisy_cpu_s = NOISY_SHARE * duration
    width = max(len(t.label) for t in (reference, *targets))
    indent = " " * (len("  round 1 ") + width + 1)

    def durable_idle() -> int:
        """Rows left in the durable proxy's queue once it is empty (or the deadline passed):
        no run may overlap the drain of a previous one (its forwarder shares the core)."""
        if durable is None or durable.config is None:
            return 0
        drained, _polls, stats, _first = wait_queue_empty(
            durable.config, time.monotonic(), QUEUE_DRAIN_DEADLINE_S
        )
        if drained is None:
            print(
                f"  warning: {DURABLE}'s queue still holds {stats['rows']} rows after "
                f"{QUEUE_DRAIN_DEADLINE_S:g}s; the next run overlaps its drain"
            )
        return int(stats["rows"])

    def one(bench: Benchmark, t: Target, round_no: int, secs: float) -> WrkRun:
        tw = drain_time_wait(ports, drain_deadline)
        rows_before = durable_idle()
        quiet = wait_for_quiet(args.settle) if args.settle > 0 else 0.0
        if t.proc.poll() is not None:
            raise BenchError(f"{t.label} died (exit {t.proc.returncode}):\n{tail(t.log)}")
        sampler = samplers.get(t.label)
        cpu_before = cpu_times()
        disk_before = disk_counters()
        foreign_before = foreign_cpu_ticks()
        others = [x for x in (reference, *targets) if x is not t]
        others_before = {x.label: sum(tree_cpu_ticks(x.proc.pid)) for x in others}
        up_conns0, up_reqs0 = upstream_counters(upstream.port)
        user0, sys0 = tree_cpu_ticks(t.proc.pid)
        with sampler.running() if sampler is not None else contextlib.nullcontext():
            run = run_wrk(
                bench,
                t,
                core=load_core,
                duration=secs,
                connections=args.connections,
                round_no=round_no,
                raw_dir=raw_dir,
            )
            ended = time.monotonic()
            run.cpu_busy_pct = cpu_busy(cpu_before, cpu_times())
            disk_after = disk_counters()
            run.disk_writes = disk_after[0] - disk_before[0]
            run.disk_flushes = disk_after[1] - disk_before[1]
            foreign_after = foreign_cpu_ticks()
            run.foreign_cpu_s = foreign_cpu_seconds(foreign_before, foreign_after)
            run.foreign_top = foreign_top(foreign_before, foreign_after)
            run.bystanders_cpu_s = {
                x.label: round(
                    (sum(tree_cpu_ticks(x.proc.pid)) - others_before[x.label]) / CLK_TCK, 2
                )
                for x in others
            }
            user1, sys1 = tree_cpu_ticks(t.proc.pid)
            up_conns1, up_reqs1 = upstream_counters(upstream.port)
            if t is durable and t.config is not None:
                drain_s, polls, stats, rows_at_end = wait_queue_empty(
                    t.config, ended, QUEUE_DRAIN_DEADLINE_S
                )
                _conns2, up_reqs2 = upstream_counters(upstream.port)
                user2, sys2 = tree_cpu_ticks(t.proc.pid)
                run.drain = Drain(
                    # wrk's status errors are answers >= 400: all else it counted was a 2xx.
                    acked=run.requests - run.errors_status,
                    rows_at_end=rows_at_end,
                    drain_s=drain_s,
                    polls=polls,
                    # Minus the two stub_status requests read after the first.
                    upstream_requests=up_reqs2 - up_reqs0 - 2,
                    dead_letters=int(stats.get("dead", 0)),
                    user_s=round((user2 - user1) / CLK_TCK, 2),
                    sys_s=round((sys2 - sys1) / CLK_TCK, 2),
                )
        run.target_user_s = round((user1 - user0) / CLK_TCK, 2)
        run.target_sys_s = round((sys1 - sys0) / CLK_TCK, 2)
        # Minus the stub_status request itself.
        run.upstream_requests = up_reqs1 - up_reqs0 - 1
        run.upstream_connections = up_conns1 - up_conns0 - 1
        if sampler is not None:
            run.rss_kb_after = sampler.sample()
        run.time_wait_before = tw
        run.queue_rows_before = rows_before
        run.waited_for_quiet_s = quiet
        if t.proc.poll() is not None:
            raise BenchError(
                f"{t.label} died under load (exit {t.proc.returncode}):\n{tail(t.log)}"
            )
        return run

    def drain_note(run: WrkRun) -> str:
        d = run.drain
        if d is None:
            return ""
        per = "n/a" if d.per_1000 is None else f"{d.per_1000:.2f}"
        took = f"{d.drain_s:g} s" if d.drain_s is not None else f"> {QUEUE_DRAIN_DEADLINE_S:g} s"
        return (
            f"\n{indent}acked {d.acked:,}  upstream {d.upstream_requests} req until drained "
            f"= {per} per 1,000 acked  drain {took} ({d.rows_at_end:,} rows at end, "
            f"{d.polls} polls)  drain cpu user/sys {d.user_s:g}/{d.sys_s:g} s"
            + (f"  dead letters {d.dead_letters}" if d.dead_letters else "")
            + (f"  queue rows before {run.queue_rows_before}" if run.queue_rows_before else "")
        )

    for bench in benches:
        print(f"\n== {bench.title}")
        mine_t = bench.target
        for t in (mine_t, reference):
            w = one(bench, t, 0, warmup)
            print(
                f"  warm-up {t.label:<{width}} {fmt_rps(w.rps):>9} req/s  errors {w.errors}"
                + drain_note(w)
            )
        for r in range(1, rounds + 1):
            # ABBA: odd rounds start with the target, even rounds with the reference.
            order = (mine_t, reference) if r % 2 else (reference, mine_t)
            for t in order:
                run = latest = one(bench, t, r, duration)
                # On a shared machine, redo a run that others disturbed; keep the quietest.
                tries = 0
                while latest.foreign_cpu_s > noisy_cpu_s and tries < args.retries:
                    tries += 1
                    print(
                        f"  round {r} {t.label:<{width}} {fmt_rps(latest.rps):>9} req/s  noisy: "
                        f"others {latest.foreign_cpu_s:.2f} cpu-s "
                        f"({', '.join(latest.foreign_top)}); retry {tries}/{args.retries}"
                    )
                    latest = one(bench, t, r, duration)
                    latest.attempts = tries + 1
                    if latest.foreign_cpu_s < run.foreign_cpu_s:
                        run = latest
                all_runs.append(run)
                extra = "".join(f"  [{x}]" for x in (run.non_2xx_line, run.socket_errors_line) if x)
                rss_note = f"  rss {run.rss_kb_after / 1024:.1f} MB" if run.rss_kb_after else ""
                busy = {k: v for k, v in run.bystanders_cpu_s.items() if v >= 0.05}
                if busy:
                    rss_note += "  idle targets used " + ", ".join(
                        f"{k} {v:g}" for k, v in busy.items()
                    )
                    rss_note += " cpu-s"
                if run.foreign_cpu_s > noisy_cpu_s and run.foreign_top:
                    rss_note += f"  others: {', '.join(run.foreign_top)}"
                print(
                    f"  round {r} {t.label:<{width}} {fmt_rps(run.rps):>9} req/s  "
                    f"p50 {fmt_ms(run.p50_us)}  p99 {fmt_ms(run.p99_us)}  "
                    f"errors {run.errors}  {run.bytes / max(1, run.requests):.0f} B/resp{extra}\n"
                    f"{indent}cpu0/cpu1 {cpu_note(run.cpu_busy_pct)}  "
                    f"{t.label} user/sys {run.target_user_s:g}/{run.target_sys_s:g} s  "
                    f"upstream {run.upstream_requests} req {run.upstream_connections} new conns  "
                    f"others {run.foreign_cpu_s:.2f} cpu-s (waited {run.waited_for_quiet_s:g}s)  "
                    f"time-wait {run.time_wait_before}  "
                    f"disk writes/flushes {run.disk_writes}/{run.disk_flushes}{rss_note}"
                    + (f"  (attempt {run.attempts})" if run.attempts > 1 else "")
                    + drain_note(run)
                )

    # RSS after the load, per segproxy process that was measured.
    used = {b.target.label for b in benches}
    rss_by: dict[str, dict[str, Any]] = {}
    for t in targets:
        sampler = samplers.get(t.label)
        if sampler is None or t.label not in used:
            continue
        pids = pid_tree(t.proc.pid)
        last_kb = sampler.sample()
        hwm_kb = sum(proc_status_kb(p, "VmHWM") or 0 for p in pids)
        peak_kb = max(sampler.peak_kb, hwm_kb)
        rss_by[t.label] = {
            "pids": pids,
            "idle_before_load_mb": round(rss_idle_kb[t.label] / 1024, 1),
            "peak_mb": round(peak_kb / 1024, 1),
            "last_mb": round(last_kb / 1024, 1),
            "goal_mb": GOAL_RSS_MB,
            "pass": peak_kb / 1024 < GOAL_RSS_MB,
        }

    # Table.
    results: dict[str, Any] = {}
    lines = [
        f"| benchmark | {label} req/s | nginx req/s | ratio | {label} p99 | nginx p99 "
        f"| {label} errors | nginx errors | goal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for bench in benches:
        runs_b = [r for r in all_runs if r.benchmark == bench.name]
        mine = summarize(runs_b, bench.target.label)
        ref = summarize(runs_b, "nginx")
        ratio = mine["median_rps"] / ref["median_rps"] if ref.get("median_rps") else 0.0
        ok = ratio >= bench.goal_ratio
        results[bench.name] = {
            "title": bench.title,
            "target": bench.target.label,
            bench.target.label: mine,
            "nginx": ref,
            "ratio": round(ratio, 3),
            "goal_ratio": bench.goal_ratio,
            "pass": ok,
        }
        lines.append(
            f"| {bench.title} | {fmt_rps(mine['median_rps'])} | {fmt_rps(ref['median_rps'])} "
            f"| {ratio:.2f} | {fmt_ms(mine['median_p99_us'])} | {fmt_ms(ref['median_p99_us'])} "
            f"| {mine['errors_total']} | {ref['errors_total']} "
            f"| >= {bench.goal_ratio:.2f}x {mark(ok)} |"
        )
        drains = [r.drain for r in runs_b if r.drain is not None]
        if drains:
            summary = summarize_drains(drains)
            results[bench.name]["drain"] = summary
            lines.extend(drain_rows(summary))
    for name, rss in rss_by.items():
        lines.append(
            f"| {name} RSS after load (peak / last) | {rss['peak_mb']:.1f} MB / "
            f"{rss['last_mb']:.1f} MB | | | | | | | < {GOAL_RSS_MB:.0f} MB {mark(rss['pass'])} |"
        )
    print()
    print(
        f"Medians of {rounds} round(s) x {duration:g}s each, same run; ratio = target/nginx "
        f"(durable ingest: {DURABLE}/nginx)."
    )
    print("\n".join(lines))

    out: dict[str, Any] = {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "target": label,
        "method": {
            "rounds": rounds,
            "duration_s": duration,
            "warmup_s": warmup,
            "wrk": f"-t1 -c{args.connections} --timeout 5s",
            "target_core": target_core,
            "load_core": load_core,
            "segproxy_queue": args.queue,
            "durable": (
                {
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
                if durable is not None
                else None
            ),
            "order": "ABBA (odd rounds target first, even rounds reference first)",
            "settle_s": args.settle,
            "retries": args.retries,
            "noisy_cpu_s": noisy_cpu_s,
            "event_bytes": len(event),
            "bundle_bytes": len(h.bundle),
            "bundle_source": h.bundle_source,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "segproxy": build,
            "nginx": _version(["nginx", "-v"]),
            "wrk": _version(["wrk", "--version"]),
            "git_head": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        },
        "affinity": pins,
        "checks": checks,
        "benchmarks": results,
        "rss": rss_by.get(SEGPROXY, {}),
        "rss_durable": rss_by.get(DURABLE, {}),
        "runs": [r.as_json() for r in all_runs],
        "table_markdown": "\n".join(lines),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    noisy = [r for r in all_runs if r.foreign_cpu_s > noisy_cpu_s]
    if noisy:
        print(
            f"\nwarning: during {len(noisy)} of {len(all_runs)} runs other processes on this "
            f"machine used > {noisy_cpu_s:.2f} cpu-s ({NOISY_SHARE:.0%} of a core): "
            + ", ".join(f"{r.benchmark}/{r.target}/r{r.round} {r.foreign_cpu_s:.2f}" for r in noisy)
            + "; rerun on a quiet machine if the ratios matter."
        )
    print(f"\nresults: {args.output}")
    return 0


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text and done.returncode in (0, 1) else ""


if __name__ == "__main__":
    sys.exit(main())
