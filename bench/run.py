"""Ratio benchmarks: segproxy against a reference nginx, measured in the same run.

Usage: .venv/bin/python bench/run.py [--quick] [--rounds N] [--duration S]  (more: --help)

What one run does (the method is explained in bench/README.md):

    core 1: wrk (-t1 -c50) + the shared fast upstream (nginx, 1 worker)
    core 0: the target under test, one at a time under load:
            segproxy (python -m segproxy serve)  |  reference nginx (1 worker)

1. passthrough ingest: POST a ~1.5 KB analytics.js track event to /v1/t (Basic auth);
2. cached script: GET /analytics.js/v1/<key>/analytics.min.js with Accept-Encoding: gzip, br;
3. RSS of the segproxy process after the load (VmHWM = peak, VmRSS = last).

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
GOAL_SCRIPT_RATIO = 0.8
GOAL_RSS_MB = 60.0

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
    label: str  # "segproxy", "nginx" (the reference) or "nginx-b" (self-test target)
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


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

    def start_segproxy(self, deadline_s: float, queue: str) -> Target:
        port = free_port()
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        config = self.tmp / "segproxy.toml"
        queue_path = f'path = "{self.tmp / "queue.db"}"\n' if queue == "sqlite" else ""
        config.write_text(
            f'listen = "127.0.0.1:{port}"\n\n'
            f'[upstream]\napi = "{upstream}"\ncdn = "{upstream}"\n\n'
            f'[queue]\nbackend = "{queue}"\n{queue_path}\n'
            f'[sources]\nwrite_keys = ["{WRITE_KEY}"]\n'
        )
        venv_python = REPO / ".venv" / "bin" / "python"
        python = str(venv_python) if venv_python.exists() else sys.executable
        log = self.tmp / "logs" / "segproxy.out"
        env = self.env | {"PYTHONUNBUFFERED": "1"}
        argv = self.pinned(
            self.target_core, [python, "-m", "segproxy", "serve", "--config", str(config)]
        )
        proc = self.procs.start("segproxy", argv, cwd=self.tmp, log=log, env=env)
        deadline = time.monotonic() + deadline_s
        announced = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"segproxy exited with {proc.returncode}:\n{tail(log)}")
            announced = announced or "segproxy listening on" in log.read_text(errors="replace")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_request(port, "GET", "/healthz", timeout=1).status == 200:
                    return Target("segproxy", port, proc, log)
            time.sleep(0.1)
        raise BenchError(
            f"segproxy did not answer GET /healthz with 200 within {deadline_s:.0f}s "
            f"(announced: {announced}):\n{tail(log)}"
        )


# --------------------------------------------------------------------------------------------
# wrk


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
    waited_for_quiet_s: float = 0.0
    attempts: int = 1
    target_user_s: float = 0.0
    target_sys_s: float = 0.0
    upstream_requests: int = 0
    upstream_connections: int = 0

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
        return d


@dataclass
class Benchmark:
    name: str
    title: str
    path: str
    script: str
    goal_ratio: float
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


def check_targets(targets: Sequence[Target], event: bytes, bundle: bytes) -> dict[str, Any]:
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    body = event.replace(b"__MESSAGE_ID__", b"ajs-next-1700000000000-sanity-check")
    report: dict[str, Any] = {}
    for t in targets:
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
        "--only", choices=("ingest", "script"), default=None, help="run one benchmark only"
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
        help="segproxy's [queue] backend (default none: pure pass-through, as the goal assumes; "
        "sqlite measures acking after a durable group commit)",
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
    ports = {upstream.port, reference.port, target.port}

    pins = {
        t.label: {str(p): affinity(p) for p in pid_tree(t.proc.pid)}
        for t in (upstream, reference, target)
    }
    print(
        f"segproxy bench: target={label} on core {target_core}, reference nginx on core "
        f"{target_core}, wrk + upstream nginx on core {load_core}; {rounds} round(s) x "
        f"{duration:g}s, -t1 -c{args.connections}; event {len(event)} B; bundle "
        f"{len(h.bundle):,} B ({len(gzip.compress(h.bundle, 9)):,} B gzip, {h.bundle_source})"
    )
    print(f"ports: upstream {upstream.port}, nginx {reference.port}, {label} {target.port}")

    checks = check_targets((target, reference), event, h.bundle)
    for name, entry in checks.items():
        print(f"check {name}: ingest {entry['ingest']} | script {entry['script']}")

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
            script_args=[str(h.event_file), basic],
        ),
        Benchmark(
            name="script",
            title="cached script GET analytics.min.js (gzip, br)",
            path=SCRIPT_PATH,
            script="get_script.lua",
            goal_ratio=GOAL_SCRIPT_RATIO,
            wrk_headers=[f"Accept-Encoding: {BROWSER_ACCEPT_ENCODING}"],
        ),
    ]
    if args.only:
        benches = [b for b in benches if b.name == args.only]

    sampler = RssSampler(target.proc.pid) if label == "segproxy" else None
    rss_idle_kb = sampler.sample() if sampler else None
    all_runs: list[WrkRun] = []

    noisy_cpu_s = NOISY_SHARE * duration

    def one(bench: Benchmark, t: Target, round_no: int, secs: float) -> WrkRun:
        tw = drain_time_wait(ports, drain_deadline)
        quiet = wait_for_quiet(args.settle) if args.settle > 0 else 0.0
        if t.proc.poll() is not None:
            raise BenchError(f"{t.label} died (exit {t.proc.returncode}):\n{tail(t.log)}")
        watching = sampler is not None and t is target
        cpu_before = cpu_times()
        foreign_before = foreign_cpu_ticks()
        up_conns0, up_reqs0 = upstream_counters(upstream.port)
        user0, sys0 = tree_cpu_ticks(t.proc.pid)
        with sampler.running() if sampler is not None and watching else contextlib.nullcontext():
            run = run_wrk(
                bench,
                t,
                core=load_core,
                duration=secs,
                connections=args.connections,
                round_no=round_no,
                raw_dir=raw_dir,
            )
        run.cpu_busy_pct = cpu_busy(cpu_before, cpu_times())
        run.foreign_cpu_s = foreign_cpu_seconds(foreign_before, foreign_cpu_ticks())
        user1, sys1 = tree_cpu_ticks(t.proc.pid)
        run.target_user_s = round((user1 - user0) / CLK_TCK, 2)
        run.target_sys_s = round((sys1 - sys0) / CLK_TCK, 2)
        up_conns1, up_reqs1 = upstream_counters(upstream.port)
        # Minus the stub_status request itself.
        run.upstream_requests = up_reqs1 - up_reqs0 - 1
        run.upstream_connections = up_conns1 - up_conns0 - 1
        if sampler is not None and watching:
            run.rss_kb_after = sampler.sample()
        run.time_wait_before = tw
        run.waited_for_quiet_s = quiet
        if t.proc.poll() is not None:
            raise BenchError(
                f"{t.label} died under load (exit {t.proc.returncode}):\n{tail(t.log)}"
            )
        return run

    for bench in benches:
        print(f"\n== {bench.title}")
        for t in (target, reference):
            w = one(bench, t, 0, warmup)
            print(f"  warm-up {t.label:<9} {fmt_rps(w.rps):>9} req/s  errors {w.errors}")
        for r in range(1, rounds + 1):
            # ABBA: odd rounds start with the target, even rounds with the reference.
            order = (target, reference) if r % 2 else (reference, target)
            for t in order:
                run = latest = one(bench, t, r, duration)
                # On a shared machine, redo a run that others disturbed; keep the quietest.
                tries = 0
                while latest.foreign_cpu_s > noisy_cpu_s and tries < args.retries:
                    tries += 1
                    print(
                        f"  round {r} {t.label:<9} {fmt_rps(latest.rps):>9} req/s  noisy: "
                        f"others {latest.foreign_cpu_s:.2f} cpu-s; retry {tries}/{args.retries}"
                    )
                    latest = one(bench, t, r, duration)
                    latest.attempts = tries + 1
                    if latest.foreign_cpu_s < run.foreign_cpu_s:
                        run = latest
                all_runs.append(run)
                extra = "".join(f"  [{x}]" for x in (run.non_2xx_line, run.socket_errors_line) if x)
                rss_note = f"  rss {run.rss_kb_after / 1024:.1f} MB" if run.rss_kb_after else ""
                print(
                    f"  round {r} {t.label:<9} {fmt_rps(run.rps):>9} req/s  "
                    f"p50 {fmt_ms(run.p50_us)}  p99 {fmt_ms(run.p99_us)}  "
                    f"errors {run.errors}  {run.bytes / max(1, run.requests):.0f} B/resp{extra}\n"
                    f"{'':19}cpu0/cpu1 {cpu_note(run.cpu_busy_pct)}  "
                    f"{t.label} user/sys {run.target_user_s:g}/{run.target_sys_s:g} s  "
                    f"upstream {run.upstream_requests} req {run.upstream_connections} new conns  "
                    f"others {run.foreign_cpu_s:.2f} cpu-s (waited {run.waited_for_quiet_s:g}s)  "
                    f"time-wait {run.time_wait_before}{rss_note}"
                    + (f"  (attempt {run.attempts})" if run.attempts > 1 else "")
                )

    # RSS after the load.
    rss: dict[str, Any] = {}
    if sampler is not None:
        pids = pid_tree(target.proc.pid)
        last_kb = sampler.sample()
        hwm_kb = sum(proc_status_kb(p, "VmHWM") or 0 for p in pids)
        peak_kb = max(sampler.peak_kb, hwm_kb)
        rss = {
            "pids": pids,
            "idle_before_load_mb": round((rss_idle_kb or 0) / 1024, 1),
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
        mine = summarize(runs_b, label)
        ref = summarize(runs_b, "nginx")
        ratio = mine["median_rps"] / ref["median_rps"] if ref.get("median_rps") else 0.0
        ok = ratio >= bench.goal_ratio
        results[bench.name] = {
            "title": bench.title,
            label: mine,
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
    if rss:
        lines.append(
            f"| {label} RSS after load (peak / last) | {rss['peak_mb']:.1f} MB / "
            f"{rss['last_mb']:.1f} MB | | | | | | | < {GOAL_RSS_MB:.0f} MB {mark(rss['pass'])} |"
        )
    print()
    print(f"Medians of {rounds} round(s) x {duration:g}s each, same run; ratio = {label}/nginx.")
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
            "nginx": _version(["nginx", "-v"]),
            "wrk": _version(["wrk", "--version"]),
            "git_head": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        },
        "affinity": pins,
        "checks": checks,
        "benchmarks": results,
        "rss": rss,
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
