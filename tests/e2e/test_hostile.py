"""Hostile-traffic drill: one bounded run of everything a public endpoint gets at once.

Against a real proxy (durable sqlite queue, fake Segment upstreams, 1 s header/body timeouts),
at the same time:

(a) slowloris clients trickling headers or bodies, in waves;
(b) a flood of garbage from a few threads: random bytes, malformed request lines, huge headers,
    gzip bombs, deeply nested JSON, invalid UTF-8, smuggling-shaped framing;
(c) thousands of idle connections that never send a byte;
(d) valid traffic: threads posting single events with unique ``messageId``s.

Then: every acknowledged event reached the fake API exactly once, no garbage reached it, no
garbage was answered 5xx, slowloris sockets were cut off within the timeout plus a margin, the
proxy is alive and healthy, and its memory stayed bounded.

Everything is bounded in time and in sockets; nothing waits by sleeping except where elapsed
time is the point (trickling, sampling), and those places say so.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import random
import resource
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import WRITE_KEY, proxy_config
from tests.support.fakes import FakeSegment
from tests.support.load import Load, basic
from tests.support.proxy import RunningProxy, running_proxy
from tests.support.rawhttp import Conn, exchange

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
# The proxy's sweeper runs every min(timeout/4, 0.5) s; a loaded loop and the 408 write add a
# little. A slowloris socket must be closed within the timeout plus this.
CLOSE_MARGIN = 2.0
DRILL_SECONDS = 6.0
IDLE_CONNECTIONS = 2000
SLOWLORIS_PER_WAVE = 50
GARBAGE_THREADS = 3
RSS_LIMIT = 150 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# garbage


def _garbage_payloads(authority: str) -> list[tuple[str, bytes]]:
    """(name, bytes to send) for each kind of garbage; sent on a fresh connection each."""
    auth = basic(WRITE_KEY)

    def post(path: str, body: bytes, extra: str = "") -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    bomb = gzip.compress(b"0" * (20 * 1024 * 1024), compresslevel=9)
    depth = 40_000
    nested_props = b'{"type":"track","event":"x","properties":' + b'{"a":' * depth + b"1"
    nested_props += b"}" * depth + b"}"
    nested_batch = b'{"batch":' + b"[" * depth + b"]" * depth + b"}"
    return [
        ("bad request line", b"GET\r\n\r\n"),
        ("bad version", f"GET /healthz HTTP/9.9\r\nHost: {authority}\r\n\r\n".encode()),
        ("nul in method", b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("binary request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\xff" * 64),
        ("absolute form", b"GET http://example.com/v1/t HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        ("traversal", f"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()),
        ("long target", f"GET /{'a' * 20000} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()),
        ("negative length", post("/v1/t", b"", "Content-Length: -1\r\n")),
        (
            "cl and te",
            f"POST /v1/t HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
        ),
        (
            "bad chunk size",
            f"POST /v1/t HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\n\r\n"
            "zz\r\nabc\r\n0\r\n\r\n".encode(),
        ),
        (
            "huge header",
            f"GET /healthz HTTP/1.1\r\nHost: {authority}\r\nX-Big: {'b' * 40000}\r\n\r\n".encode(),
        ),
        (
            "many headers",
            (
                f"GET /healthz HTTP/1.1\r\nHost: {authority}\r\n"
                + "".join(f"X-H{i}: {i}\r\n" for i in range(400))
                + "\r\n"
            ).encode(),
        ),
        ("two hosts", f"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: {authority}\r\n\r\n".encode()),
        ("gzip bomb", post("/v1/batch", bomb, "Content-Encoding: gzip\r\n")),
        ("not gzip", post("/v1/t", b"this is not gzip", "Content-Encoding: gzip\r\n")),
        ("nested properties", post("/v1/t", nested_props)),
        ("nested batch", post("/v1/batch", nested_batch)),
        ("invalid utf-8", post("/v1/t", b'{"type":"track","event":"\xff\xfe\xc3\x28"}')),
        ("invalid json", post("/v1/t", b'{"type":"track","event":')),
        ("json array", post("/v1/t", b"[1,2,3]")),
        ("batch not list", post("/v1/batch", b'{"batch":{"type":"track"}}')),
        (
            "oversize declared",
            post("/v1/t", b"", "X-Pad: 1\r\n").replace(
                b"Content-Length: 0", b"Content-Length: 99999999"
            ),
        ),
        (
            "oversize event",
            post(
                "/v1/t",
                json.dumps(
                    {"type": "track", "event": "e", "properties": {"p": "x" * 40000}}
                ).encode(),
            ),
        ),
        (
            "unknown key",
            f"POST /v1/t HTTP/1.1\r\nHost: {authority}\r\nAuthorization: {basic('wk_nobody')}\r\n"
            'Content-Length: 31\r\n\r\n{"type":"track","event":"evil"}'.encode(),
        ),
        (
            "no key",
            post("/v1/t", b'{"type":"track","event":"no key"}').replace(
                f"Authorization: {auth}\r\n".encode(), b""
            ),
        ),
        (
            "form body",
            post("/v1/t", b"a=1&b=2").replace(
                b"application/json", b"application/x-www-form-urlencoded"
            ),
        ),
        (
            "bad base64 auth",
            post("/v1/t", b'{"type":"track"}').replace(auth.encode(), b"Basic !!!not-base64!!!"),
        ),
    ]


def _random_garbage(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.randrange(3)
    if kind == 0:
        return "random bytes", rng.randbytes(rng.randrange(1, 4096))
    if kind == 1:
        line = rng.randbytes(rng.randrange(1, 200))
        return "random request line", line + b" / HTTP/1.1\r\nHost: x\r\n\r\n"
    body = rng.randbytes(rng.randrange(1, 2000))
    return "random body", (
        b"POST /v1/t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


@dataclass
class GarbageStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    statuses: Counter[int | str] = field(default_factory=Counter)
    server_errors: list[tuple[str, int]] = field(default_factory=list)


def _send_garbage(host: str, port: int, name: str, data: bytes, stats: GarbageStats) -> None:
    outcome: int | str
    try:
        with Conn(host, port, timeout=5.0) as conn:
            try:
                conn.send(data)
                # Half-close: the request is all there is. A proxy still waiting for more of a
                # request answers it (400/408) or closes, it never waits for its timeout.
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the proxy may refuse and close before we finished sending
            try:
                outcome = conn.read_response(timeout=5.0).status
            except TimeoutError:
                outcome = "no answer"  # neither answered nor closed after our half-close
            except (ConnectionError, OSError):
                outcome = "closed"
            except (ValueError, IndexError):
                outcome = "unparsable"
    except OSError:
        outcome = "connect error"
    with stats.lock:
        stats.sent += 1
        stats.statuses[outcome] += 1
        if isinstance(outcome, int) and outcome >= 500:
            stats.server_errors.append((name, outcome))


def _garbage_thread(
    host: str, port: int, seed: int, stop: threading.Event, stats: GarbageStats
) -> None:
    rng = random.Random(seed)
    fixed = _garbage_payloads(f"{host}:{port}")
    i = seed
    while not stop.is_set():
        if i % 2 == 0:
            name, data = fixed[(i // 2) % len(fixed)]
        else:
            name, data = _random_garbage(rng)
        _send_garbage(host, port, name, data, stats)
        i += 1


# --------------------------------------------------------------------------------------------
# slowloris


@dataclass
class Loris:
    sock: socket.socket
    kind: str  # "header" or "body"
    started: float  # monotonic time of the first byte sent
    timer_from: float  # when the proxy's clock for this phase started
    closed_at: float | None = None
    answer: bytes = b""
    sent: int = 0


def _slowloris_wave(host: str, port: int, n: int, give_up_after: float) -> list[Loris]:
    """Open ``n`` sockets, trickle bytes on each, and record when the proxy closes each one."""
    sel = selectors.DefaultSelector()
    lorises: list[Loris] = []
    head = f"POST /v1/t HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    open_header = b"X-Slow: "  # a header line that is never finished
    try:
        for i in range(n):
            sock = socket.create_connection((host, port), timeout=5.0)
            now = time.monotonic()
            if i % 2 == 0:
                sock.sendall(head + open_header)  # headers that never end
                loris = Loris(sock, "header", now, now)
            else:
                sock.sendall(head + b"Content-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
                loris = Loris(sock, "body", now, time.monotonic())
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, loris)
            lorises.append(loris)
        deadline = time.monotonic() + give_up_after
        open_ = set(range(n))
        while open_ and time.monotonic() < deadline:
            # Trickle one byte per socket every ~0.1 s: elapsed time is the attack itself.
            for event_key, _ in sel.select(timeout=0.1):
                loris = event_key.data
                try:
                    chunk = loris.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    loris.answer += chunk
                    continue
                loris.closed_at = time.monotonic()
                sel.unregister(loris.sock)
                open_.discard(lorises.index(loris))
            for idx in list(open_):
                loris = lorises[idx]
                byte = b"X" if loris.kind == "header" else b"{"
                if loris.kind == "header" and loris.sent % 20 == 19:
                    byte = b"\r\n" + open_header
                with contextlib.suppress(BlockingIOError, OSError):
                    loris.sock.send(byte)
                    loris.sent += 1
    finally:
        sel.close()
        for loris in lorises:
            loris.sock.close()
    return lorises


# --------------------------------------------------------------------------------------------
# the drill


def _rss_sampler(
    proxy: RunningProxy, stop: threading.Event, peaks: list[int], fds: list[int]
) -> None:
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            peaks.append(proxy.rss_bytes())
            fds.append(len(os.listdir(f"/proc/{proxy.pid}/fd")))
        # Sampling period: elapsed time between samples is what we want here.
        if stop.wait(0.05):
            return


def _run_threads(targets: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def test_hostile_traffic_drill(tmp_path: Path) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + 2 * SLOWLORIS_PER_WAVE + GARBAGE_THREADS + 100
    assert needed * 2 < soft, f"ulimit -n is {soft}: too low for {needed} sockets"

    with FakeSegment([WRITE_KEY]) as fake:
        config = proxy_config(
            fake,
            "sqlite",
            limits={"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT},
            forward={"max_delay": 0.05},
        )
        with running_proxy(config, tmp_path / "proxy") as proxy:
            try:
                _drill(proxy, fake)
            finally:
                # Timeouts are logged once per slowloris socket: show everything else.
                lines = proxy.logs().splitlines(keepends=True)
                other = [line for line in lines if "timeout" not in line]
                print(f"--- segproxy log (pid {proxy.pid}), without timeout lines ---")
                print("".join(other[-40:]))


def _drill(proxy: RunningProxy, fake: FakeSegment) -> None:
    host, port = proxy.host, proxy.port
    stop = threading.Event()
    peaks: list[int] = []
    fds: list[int] = []
    sampler = threading.Thread(target=_rss_sampler, args=(proxy, stop, peaks, fds), daemon=True)
    sampler.start()
    baseline_rss = proxy.rss_bytes()

    # (c) idle connections: opened first, never written to.
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection((host, port), timeout=5.0))

        # (d) valid traffic
        load = Load(
            host,
            port,
            write_keys=[WRITE_KEY],
            threads=4,
            total=20_000,
            max_seconds=DRILL_SECONDS,
            prefix="hostile",
        ).start()

        # (b) garbage
        garbage = GarbageStats()
        garbage_threads = _run_threads(
            [
                functools.partial(_garbage_thread, host, port, seed, stop, garbage)
                for seed in range(GARBAGE_THREADS)
            ]
        )

        # (a) slowloris, in waves until the drill ends
        waves: list[list[Loris]] = []

        def loris_waves() -> None:
            while not stop.is_set():
                waves.append(
                    _slowloris_wave(
                        host, port, SLOWLORIS_PER_WAVE, max(HEADER_TIMEOUT, BODY_TIMEOUT) + 4.0
                    )
                )

        loris_thread = _run_threads([loris_waves])[0]

        load.join(timeout=DRILL_SECONDS + 15)
        stop.set()
        for t in [*garbage_threads, loris_thread]:
            t.join(timeout=20)
            assert not t.is_alive(), "a drill thread did not finish"
        sampler.join(timeout=5)

        # The proxy is alive and still answers, with the idle connections still open.
        assert proxy.proc.poll() is None, "the proxy died during the drill"
        health = exchange(host, port, "GET", "/healthz")
        assert health.status == 200, health
    finally:
        for s in idle:
            s.close()

    # --- valid traffic: every acknowledged event reached Segment exactly once
    acked = set(load.acked)
    print(f"valid: {len(load.attempted)} sent, {len(acked)} acked, statuses {dict(load.statuses)}")
    assert acked, "no valid event was acknowledged during the drill"
    assert len(acked) >= 0.95 * len(load.attempted), load.statuses
    deadline = time.monotonic() + 20
    while True:
        seen = Counter(e.message_id for e in fake.api_events())
        if acked.issubset(seen) or time.monotonic() > deadline:
            break
        fake.api.state.wait_until(lambda: False, 0.2)  # poll interval, woken by new requests
    missing = acked - seen.keys()
    assert not missing, f"{len(missing)} acknowledged events never reached Segment"
    dupes = {m: c for m, c in seen.items() if c > 1}
    assert not dupes, f"events delivered more than once: {list(dupes)[:10]}"
    strangers = set(seen) - load.attempted
    assert not strangers, f"events that no valid client sent reached Segment: {strangers}"

    # --- garbage: never a 5xx
    print(f"garbage: {garbage.sent} requests, outcomes {dict(garbage.statuses)}")
    assert garbage.sent > 50
    assert not garbage.server_errors, f"garbage answered 5xx: {garbage.server_errors[:10]}"
    assert not garbage.statuses["no answer"], "garbage left hanging after a half-close"

    # --- slowloris: cut off within the timeout plus a margin
    lorises = [lo for wave in waves for lo in wave]
    late = []
    for lo in lorises:
        limit = HEADER_TIMEOUT if lo.kind == "header" else BODY_TIMEOUT
        if lo.closed_at is None or lo.closed_at - lo.timer_from > limit + CLOSE_MARGIN:
            late.append((lo.kind, None if lo.closed_at is None else lo.closed_at - lo.timer_from))
    held = [lo.closed_at - lo.timer_from for lo in lorises if lo.closed_at is not None]
    print(
        f"slowloris: {len(lorises)} sockets in {len(waves)} waves, "
        f"held {min(held, default=0):.2f}-{max(held, default=0):.2f} s; "
        f"answers {Counter(lo.answer[:12] for lo in lorises)}"
    )
    assert len(lorises) >= SLOWLORIS_PER_WAVE
    assert not late, f"{len(late)} slowloris sockets outlived their timeout: {late[:10]}"
    # A loris that got an answer before the close got the 408 the docs promise.
    answers = [lo.answer for lo in lorises if lo.answer]
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:5]

    # --- memory
    peak = max(peaks, default=baseline_rss)
    print(
        f"rss: baseline {baseline_rss / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB "
        f"over {len(peaks)} samples"
    )
    assert peak < RSS_LIMIT, f"proxy RSS peaked at {peak / 2**20:.1f} MB"
    # The idle sockets were really held open by the proxy, not left in its accept backlog.
    print(f"proxy open fds: peak {max(fds, default=0)}")
    assert max(fds, default=0) >= IDLE_CONNECTIONS
    assert proxy.proc.poll() is None
    assert os.path.exists(f"/proc/{proxy.pid}")
