"""Client load for the durability drills: threads posting single events, recording the answers.

Each thread keeps one keep-alive connection to the proxy and posts ``/v1/t`` events with unique
``messageId``s. Only a 2xx answer counts as "acknowledged"; a connection error (the proxy was
killed, or is restarting) or any other status is recorded and the thread goes on with a new id.
So after a drill, ``acked`` is exactly the set of events the proxy promised to deliver, and
``attempted`` is every event that may have reached it (some committed without an answer).

Everything is bounded: a load stops after ``total`` events or ``max_seconds``, whichever first.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tests.support.rawhttp import Conn, RawResponse, request_bytes


def basic(write_key: str) -> str:
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


def iso_now(offset: float = 0.0) -> str:
    """Now (plus ``offset`` seconds) as analytics.js writes it: ISO 8601, ms, ``Z``."""
    now = datetime.fromtimestamp(time.time() + offset, UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def track(message_id: str, **extra: Any) -> dict[str, Any]:
    now = iso_now()
    return {
        "type": "track",
        "event": "Durability Drill",
        "messageId": message_id,
        "anonymousId": "anon-" + message_id,
        "properties": {"n": message_id},
        "context": {"library": {"name": "analytics.js", "version": "next-1.84.3"}},
        "timestamp": now,
        "sentAt": now,
        **extra,
    }


class Client:
    """One keep-alive connection to the proxy, reopened after any error."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.conn: Conn | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> RawResponse:
        """Raises OSError (refused, reset, timeout, closed) when there is no answer."""
        if self.conn is None:
            self.conn = Conn(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.send(request_bytes("POST", path, f"{self.host}:{self.port}", headers, body))
            resp = self.conn.read_response()
        except (OSError, ValueError):
            self.close()
            raise
        if (resp.header("connection") or "").lower() == "close":
            self.close()
        return resp

    def post_json(self, path: str, obj: Any, write_key: str) -> RawResponse:
        headers = {"Content-Type": "text/plain", "Authorization": basic(write_key)}
        return self.post(path, json.dumps(obj).encode(), headers)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


class Load:
    """``threads`` clients posting single events to ``host:port`` until stopped or bounded.

    ``write_keys`` are used round-robin per event. Thread-safe records: ``attempted``,
    ``acked`` (2xx), ``statuses`` (status code, or ``"error"`` for no answer), ``acked_by_key``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        write_keys: list[str],
        threads: int = 4,
        total: int = 2000,
        max_seconds: float = 30.0,
        path: str = "/v1/t",
        prefix: str = "m",
        error_pause: float = 0.02,
    ) -> None:
        self.host = host
        self.port = port
        self.write_keys = write_keys
        self.total = total
        self.max_seconds = max_seconds
        self.path = path
        self.prefix = prefix
        self.error_pause = error_pause
        self.lock = threading.Condition()
        self.attempted: set[str] = set()
        self.acked: set[str] = set()
        self.acked_by_key: dict[str, set[str]] = {k: set() for k in write_keys}
        self.statuses: Counter[int | str] = Counter()
        self.ack_times: list[float] = []  # time.monotonic() of each 2xx, in order
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{prefix}-{i}", daemon=True)
            for i in range(threads)
        ]
        self.started = 0.0
        self.finished = 0.0

    def start(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def _next(self) -> int | None:
        n = next(self._seq)
        return n if n < self.total else None

    def _run(self, index: int) -> None:
        client = Client(self.host, self.port, timeout=10.0)
        deadline = self.started + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                n = self._next()
                if n is None:
                    return
                key = self.write_keys[n % len(self.write_keys)]
                mid = f"{self.prefix}-{n:06d}"
                with self.lock:
                    self.attempted.add(mid)
                try:
                    resp = client.post_json(self.path, track(mid), key)
                except OSError:
                    with self.lock:
                        self.statuses["error"] += 1
                    # Pacing, not synchronisation: while the proxy is down (killed, restarting)
                    # don't spin on refused connections. Returns at once when the load stops.
                    self._stop.wait(self.error_pause)
                    continue
                with self.lock:
                    self.statuses[resp.status] += 1
                    if 200 <= resp.status < 300:
                        self.acked.add(mid)
                        self.acked_by_key[key].add(mid)
                        self.ack_times.append(time.monotonic())
                    self.lock.notify_all()
        finally:
            client.close()

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def wait_acked(self, n: int, timeout: float) -> bool:
        """Poll (with a deadline) until at least ``n`` events were acknowledged."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.acked) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    return len(self.acked) >= n
                self.lock.wait(min(left, 0.1))
            return True

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.1))
        if self.running():
            raise AssertionError("load threads did not finish in time")
        self.finished = time.monotonic()

    def summary(self) -> str:
        with self.lock:
            return (
                f"attempted {len(self.attempted)}, acked {len(self.acked)}, "
                f"statuses {dict(self.statuses)}"
            )


def free_port() -> int:
    """A port free right now on 127.0.0.1, to give a proxy a fixed address across restarts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate()`` until true, or fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)  # poll interval of a deadline-bounded wait
