"""Fake Segment upstreams for tests: a CDN and a Tracking API, real HTTP/1.1 servers on 127.0.0.1.

Both run in background threads of the test process, on port 0 (a free port chosen by the
kernel), speak HTTP/1.1 with keep-alive, and record every request they see. Like the real
upstreams they answer 403 when the ``Host`` header is not their own ``127.0.0.1:PORT``: that is
what Segment's CDN does when a proxy forwards the visitor's ``Host`` (the 403 README.md's
"Upstreams get their own Host" is about).

Invariants the tests rely on:
- every request is recorded (including the ones answered 403/404/5xx, hung or dropped), in
  arrival order, with the status it was answered with (``None`` while hung or when dropped);
- ``api_events()`` only counts requests the fake API *accepted* (2xx): an event the proxy sent
  twice because the first attempt got a 503 is one event at Segment, and counted once here;
- a hung request never blocks ``stop()``: stopping wakes every waiter and closes every open
  connection.

The CDN serves the real analytics-next build from ``node_modules`` (``npm ci`` installs it), so
the browser tests run Segment's own code, not a stand-in.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
ANALYTICS_NEXT_UMD = REPO_ROOT / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"

US_API_HOST = "api.segment.io/v1"
EU_API_HOST = "events.eu1.segmentapis.com/v1"

# Single-event endpoints (browser short forms and HTTP API long forms) and batch endpoints.
_SINGLE_EVENT_PATHS = frozenset(
    ["/v1/" + p for p in ("t", "p", "i", "g", "a", "s")]
    + ["/v1/" + p for p in ("track", "identify", "page", "screen", "group", "alias")]
)
_BATCH_PATHS = frozenset(["/v1/b", "/v1/batch", "/v1/import"])
# Segment's limits on what it accepts (an event as sent, a whole request body).
MAX_EVENT_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024

_SCRIPT_PATH = re.compile(
    r"^/analytics\.js/v1/([^/]+)/(analytics\.min\.js|analytics\.classic\.js)$"
)
_SETTINGS_PATH = re.compile(r"^(?:/v1)?/projects/([^/]+)/settings$")
_BUNDLE_PATH = re.compile(r"^/analytics-next/bundles/([A-Za-z0-9_.\-]+\.js(?:\.map)?)$")
_NEXT_INTEGRATIONS_PATH = re.compile(r"^/next-integrations/[A-Za-z0-9_.\-/@]+\.js\.gz$")

DEFAULT_WRITE_KEY = "wk_test_0123456789abcdef"


# --------------------------------------------------------------------------------------------
# Recorded requests


class Headers:
    """Request headers in arrival order, with case-insensitive lookup."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = list(items)

    def get(self, name: str, default: str | None = None) -> str | None:
        lower = name.lower()
        for k, v in self._items:
            if k.lower() == lower:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for k, v in self._items if k.lower() == lower]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self._items}

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass
class RecordedRequest:
    server: Literal["cdn", "api"]
    method: str
    target: str  # the request target as sent (path and query)
    path: str  # target without the query
    query: str
    headers: Headers
    body: bytes  # raw body as received
    decoded: bytes  # body after undoing Content-Encoding: gzip
    json: Any  # parsed ``decoded`` (None when empty or not JSON)
    peer: tuple[str, int]
    connection_id: int  # requests on the same TCP connection share this id
    received_at: float  # time.time()
    status: int | None = None  # what the fake answered; None while hung or when dropped
    answered_at: float | None = None  # time.time() when the answer went out (None: none did)
    step: int | None = None  # the index of the cycle step that answered it (``api_cycle``)

    @property
    def basic_auth_user(self) -> str | None:
        """The user part of ``Authorization: Basic``, i.e. the write key for Segment clients."""
        auth = self.headers.get("authorization")
        if not auth or not auth.lower().startswith("basic "):
            return None
        try:
            raw = base64.b64decode(auth[6:].strip(), validate=True).decode()
        except ValueError:
            return None
        return raw.split(":", 1)[0]


@dataclass(frozen=True)
class ApiEvent:
    """One event as received by the fake API, with the request that carried it."""

    path: str  # the path it came in on: /v1/t, /v1/batch, ...
    data: dict[str, Any]
    request: RecordedRequest = field(repr=False)

    @property
    def message_id(self) -> str | None:
        mid = self.data.get("messageId")
        return mid if isinstance(mid, str) else None

    @property
    def type(self) -> str | None:
        t = self.data.get("type")
        return t if isinstance(t, str) else None

    @property
    def write_key(self) -> str | None:
        """The write key: from the event, the enclosing batch body, or Basic auth."""
        for source in (self.data, self.request.json):
            if isinstance(source, dict):
                wk = source.get("writeKey")
                if isinstance(wk, str):
                    return wk
        return self.request.basic_auth_user


# --------------------------------------------------------------------------------------------
# Failure modes


@dataclass(frozen=True)
class Mode:
    """How a fake answers. ``kind``:

    - ``ok``: normal answers;
    - ``status``: every request gets ``code`` with ``body`` (and ``Retry-After`` if given);
    - ``hang``: never answers until the mode changes or the server stops; with ``hold``, drops
      the connection unanswered after ``hold`` seconds at most (an upstream that hangs, then a
      load balancer that resets: never an answer that could count as accepted);
    - ``close``: read the request, then drop the connection without an answer.

    ``times`` limits a failure mode to the next N requests, after which the fake is ``ok`` again
    (or, in a cycle, the next step starts). ``min_bytes`` (``status`` only) answers ``code`` only
    to requests whose decoded body is at least that long, like a gateway with a smaller body
    limit; smaller ones are answered normally, and count against ``times`` too.
    """

    kind: Literal["ok", "status", "hang", "close"] = "ok"
    code: int = 200
    retry_after: str | None = None
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    times: int | None = None
    hold: float | None = None
    min_bytes: int = 0


OK = Mode()


class _State:
    """Shared mutable state of one fake server: mode, records, waiters. All under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.mode: Mode = OK
        self.mode_generation = 0
        self.remaining: int | None = None
        # A cycle (``set_cycle``): the steps still to come, and the index of the current one.
        self.steps: list[Mode] = []
        self.step: int | None = None
        self.requests: list[RecordedRequest] = []
        self.stopping = False
        self.connections: dict[int, socket.socket] = {}
        self.next_connection_id = 0

    def set_mode(self, mode: Mode) -> None:
        with self.lock:
            self.steps = []
            self.step = None
            self._enter(mode)

    def set_cycle(self, steps: Iterable[Mode]) -> None:
        """Answer by ``steps`` in order, each for its ``times`` requests (every step needs one);
        after the last, normally. ``step`` says which one answers now (``len(steps)``: done)."""
        todo = list(steps)
        if not todo or any(m.times is None or m.times < 1 for m in todo):
            raise ValueError("every step of a cycle needs times >= 1")
        with self.lock:
            self.steps = todo[1:]
            self.step = 0
            self._enter(todo[0])

    def _enter(self, mode: Mode) -> None:
        self.mode = mode
        self.remaining = mode.times
        self.mode_generation += 1
        self.lock.notify_all()

    def take_mode(self) -> tuple[Mode, int, int | None]:
        """The mode for one incoming request (consuming one of ``times``), its generation, and
        its cycle step (None outside a cycle).

        Only ``set_mode`` starts a new generation: a hung request waits for an explicit change,
        not for its own ``times`` running out. The next step of a cycle does not release it
        either (a cycle's hangs use ``hold``).
        """
        with self.lock:
            mode, step = self.mode, self.step
            counted = mode.kind != "ok" or step is not None
            if counted and self.remaining is not None:
                self.remaining -= 1
                if self.remaining <= 0:
                    self._next_step()
            return mode, self.mode_generation, step

    def _next_step(self) -> None:
        if self.step is None:
            self.mode, self.remaining = OK, None
            return
        self.step += 1
        if self.steps:
            nxt = self.steps.pop(0)
            self.mode, self.remaining = nxt, nxt.times
        else:
            self.mode, self.remaining = OK, None
        self.lock.notify_all()

    def record(self, req: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(req)
            self.lock.notify_all()

    def set_status(self, req: RecordedRequest, status: int | None) -> None:
        with self.lock:
            req.status = status
            req.answered_at = time.time() if status is not None else None
            self.lock.notify_all()

    def snapshot(self) -> list[RecordedRequest]:
        with self.lock:
            return list(self.requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, 0.1))
            return True


# --------------------------------------------------------------------------------------------
# The HTTP machinery shared by both fakes


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[RecordedRequest], Response]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Hold a reference to the fake so handler instances can reach it.
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing its keep-alive connection (or a test dropping one) is not an error.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        state = self.server.fake.state
        with state.lock:
            state.next_connection_id += 1
            self.connection_id = state.next_connection_id
            state.connections[self.connection_id] = self.connection

    def finish(self) -> None:
        state = self.server.fake.state
        with state.lock:
            state.connections.pop(self.connection_id, None)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recorded requests are the log

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers, up to the empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        fake = self.server.fake
        state = fake.state
        body = self._read_body()
        decoded = body
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip" and body:
            try:
                decoded = gzip.decompress(body)
            except (OSError, EOFError):
                decoded = b""
        parsed: Any = None
        if decoded:
            try:
                parsed = json.loads(decoded)
            except (ValueError, UnicodeDecodeError):
                parsed = None
        path, _, query = self.path.partition("?")
        req = RecordedRequest(
            server=fake.kind,
            method=self.command,
            target=self.path,
            path=path,
            query=query,
            headers=Headers(self.headers.items()),
            body=body,
            decoded=decoded,
            json=parsed,
            peer=(self.client_address[0], self.client_address[1]),
            connection_id=self.connection_id,
            received_at=time.time(),
        )
        state.record(req)

        if self.headers.get("Host") != fake.authority:
            self._send(
                req, Response(403, b"Forbidden: wrong Host\n", [("Content-Type", "text/plain")])
            )
            return

        mode, generation, req.step = state.take_mode()
        while mode.kind == "hang":
            until = None if mode.hold is None else time.monotonic() + mode.hold
            with state.lock:
                while not state.stopping and state.mode_generation == generation:
                    left = 1.0 if until is None else until - time.monotonic()
                    if left <= 0:
                        break
                    state.lock.wait(min(left, 1.0))
                if state.stopping or state.mode_generation == generation:  # stop, or held out
                    self.close_connection = True
                    return
            mode, generation, req.step = state.take_mode()
        if mode.kind == "close":
            self.close_connection = True
            return
        if mode.kind == "status" and len(req.decoded) >= mode.min_bytes:
            headers = [("Content-Type", "application/json"), *mode.headers]
            if mode.retry_after is not None:
                headers.append(("Retry-After", mode.retry_after))
            self._send(req, Response(mode.code, mode.body, headers))
            return
        try:
            response = fake.handler(req)
        except Exception as exc:  # a bug in a fake must show up as a 500, not a hang
            response = Response(500, f"fake error: {exc!r}\n".encode(), [])
        self._send(req, response)

    def _send(self, req: RecordedRequest, response: Response) -> None:
        head_only = self.command == "HEAD"
        # Recorded before the answer goes out, so a client that got it can rely on the record.
        self.server.fake.state.set_status(req, response.status)
        self.send_response(response.status)
        names = {k.lower() for k, _ in response.headers}
        for k, v in response.headers:
            self.send_header(k, v)
        if "content-length" not in names:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if not head_only and response.status not in (204, 304):
            self.wfile.write(response.body)
        self.wfile.flush()

    do_GET = _handle
    do_HEAD = _handle
    do_POST = _handle
    do_PUT = _handle
    do_DELETE = _handle
    do_OPTIONS = _handle
    do_PATCH = _handle


class FakeServer:
    """One fake HTTP server on 127.0.0.1 in a background thread."""

    def __init__(self, kind: Literal["cdn", "api"], handler: Handler) -> None:
        self.kind: Literal["cdn", "api"] = kind
        self.handler = handler
        self.state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    def start(self) -> None:
        """Listen (on port 0 the first time, on the same port after ``down()``)."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _RequestHandler)
        server.fake = self
        self.port = server.server_address[1]
        with self.state.lock:
            self.state.stopping = False
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-{self.kind}-{self.port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop listening, wake hung requests and close every open connection."""
        server, thread = self._server, self._thread
        if server is None:
            return
        with self.state.lock:
            self.state.stopping = True
            self.state.lock.notify_all()
            conns = list(self.state.connections.values())
        server.shutdown()
        server.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server, self._thread = None, None

    # modes
    def set_mode(self, mode: Mode) -> None:
        self.state.set_mode(mode)

    def set_cycle(self, steps: Iterable[Mode]) -> None:
        self.state.set_cycle(steps)

    @property
    def step(self) -> int | None:
        """The cycle step answering now (the number of steps once done; None: no cycle)."""
        with self.state.lock:
            return self.state.step

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.state.snapshot()

    def reset(self) -> None:
        with self.state.lock:
            self.state.requests.clear()
            self.state.lock.notify_all()
        self.set_mode(OK)


# --------------------------------------------------------------------------------------------
# Content


def default_settings(write_key: str, api_host: str = US_API_HOST) -> dict[str, Any]:
    """Settings shaped like what cdn.segment.com serves for a plain Segment.io-only source."""
    return {
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
                "apiHost": api_host,
            }
        },
        "plan": {
            "track": {"__default": {"enabled": True, "integrations": {}}},
            "identify": {"__default": {"enabled": True}},
            "group": {"__default": {"enabled": True}},
        },
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {
            "sampleRate": 0.1,
            "host": US_API_HOST,
            "flushTimer": 30000,
            "maxQueueSize": 20,
        },
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
        "autoInstrumentationSettings": {"disableTraffic": False, "sampleRate": 0},
        # Not in any published schema: proves unknown keys survive the proxy's rewrite.
        "someFutureKey": {"nested": [1, "two", {"three": 3}], "flag": True},
    }


def next_integration_bytes(path: str) -> bytes:
    """The exact (gzip) bytes the fake CDN serves for a ``/next-integrations/...js.gz`` path.

    Deterministic (mtime 0) and not trivially small, so a byte-exact comparison means something.
    """
    lines = [f"/* fake integration for {path} */"]
    lines += [f"window.__fakeIntegration_{i} = {i * 7919 % 10007};" for i in range(400)]
    return gzip.compress("\n".join(lines).encode(), compresslevel=6, mtime=0)


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha1(body, usedforsecurity=False).hexdigest() + '"'


def _json_response(status: int, obj: Any) -> Response:
    return Response(
        status, json.dumps(obj).encode(), [("Content-Type", "application/json; charset=utf-8")]
    )


# --------------------------------------------------------------------------------------------
# The fake Segment: CDN + API


class FakeSegment:
    """Fake ``cdn.segment.com`` and ``api.segment.io`` on 127.0.0.1, as a context manager.

    >>> with FakeSegment() as fake:  # doctest: +SKIP
    ...     fake.cdn_url, fake.api_url, fake.write_key
    """

    def __init__(self, write_keys: Iterable[str] = (DEFAULT_WRITE_KEY,)) -> None:
        keys = list(write_keys)
        self.write_key = keys[0] if keys else DEFAULT_WRITE_KEY
        # settings per write key; a key missing here is unknown to the CDN (404)
        self.settings: dict[str, dict[str, Any]] = {k: default_settings(k) for k in keys}
        # the JSON body the fake API answers accepted requests with
        self.api_response_body: Any = {"success": True}
        # Events the fake API refuses, like Segment refusing an invalid event: a request that
        # holds one is answered ``refuse_status`` whole (see ``api_refuse``).
        self.refuse: Callable[[dict[str, Any]], bool] | None = None
        self.refuse_status = 400
        self._standalone: bytes | None = None
        self.cdn = FakeServer("cdn", self._cdn_handler)
        self.api = FakeServer("api", self._api_handler)

    # lifecycle
    def start(self) -> Self:
        self.cdn.start()
        self.api.start()
        return self

    def stop(self) -> None:
        self.cdn.stop()
        self.api.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # addresses
    @property
    def cdn_url(self) -> str:
        return self.cdn.url

    @property
    def api_url(self) -> str:
        return self.api.url

    @property
    def cdn_authority(self) -> str:
        return self.cdn.authority

    @property
    def api_authority(self) -> str:
        return self.api.authority

    # settings helpers
    def add_key(self, write_key: str, settings: Mapping[str, Any] | None = None) -> None:
        self.settings[write_key] = (
            deepcopy(dict(settings)) if settings is not None else default_settings(write_key)
        )

    def segment_io(self, write_key: str | None = None) -> dict[str, Any]:
        """The mutable ``integrations["Segment.io"]`` of a key's settings."""
        result: dict[str, Any] = self.settings[write_key or self.write_key]["integrations"][
            "Segment.io"
        ]
        return result

    def use_batching(
        self, write_key: str | None = None, size: int = 10, timeout_ms: int = 500
    ) -> None:
        self.segment_io(write_key)["deliveryStrategy"] = {
            "strategy": "batching",
            "config": {"size": size, "timeout": timeout_ms},
        }

    def use_region(self, region: Literal["us", "eu"], write_key: str | None = None) -> None:
        self.segment_io(write_key)["apiHost"] = EU_API_HOST if region == "eu" else US_API_HOST

    def expected_script(self, write_key: str | None = None) -> bytes:
        """The script body the fake CDN serves for a key (before any proxy rewrite)."""
        return self._standalone_js().replace(
            b"__WRITE_KEY__", (write_key or self.write_key).encode()
        )

    # failure modes
    def api_mode(self, mode: Mode) -> None:
        self.api.set_mode(mode)

    def cdn_mode(self, mode: Mode) -> None:
        self.cdn.set_mode(mode)

    def api_ok(self) -> None:
        self.api.set_mode(OK)

    def cdn_ok(self) -> None:
        self.cdn.set_mode(OK)

    def api_status(
        self,
        code: int,
        retry_after: float | str | None = None,
        body: bytes | str | None = None,
        times: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer ``code`` (e.g. 503, or 429 with ``retry_after`` and ``X-RateLimit-Reset``)."""
        self.api.set_mode(_status_mode(code, retry_after, body, times, headers))

    def cdn_fail(
        self,
        code: int = 503,
        retry_after: float | str | None = None,
        body: bytes | str | None = None,
        times: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.cdn.set_mode(_status_mode(code, retry_after, body, times, headers))

    def api_refuse(
        self, predicate: Callable[[dict[str, Any]], bool] | None, status: int = 400
    ) -> None:
        """Refuse (``status``, a JSON body naming the first bad event's messageId) every event
        request holding an event for which ``predicate`` is true, as Segment refuses a whole
        batch for one invalid event. ``None`` stops refusing. Segment's 32 KB per-event and
        500 KB per-request limits are always enforced (400), whatever the predicate."""
        self.refuse = predicate
        self.refuse_status = status

    def api_cycle(self, steps: Iterable[Mode]) -> None:
        """Cycle the fake API through ``steps``: each answers its ``times`` requests, then the
        next starts; after the last, the API answers normally. ``api.step`` is the current
        step, and each recorded request says which step answered it (``step``). Refusals
        (``api_refuse``) and Segment's limits apply in ``ok`` steps, as always."""
        self.api.set_cycle(steps)

    def api_hang(self, times: int | None = None) -> None:
        self.api.set_mode(Mode(kind="hang", times=times))

    def cdn_hang(self, times: int | None = None) -> None:
        self.cdn.set_mode(Mode(kind="hang", times=times))

    def api_close(self, times: int | None = None) -> None:
        self.api.set_mode(Mode(kind="close", times=times))

    def cdn_close(self, times: int | None = None) -> None:
        self.cdn.set_mode(Mode(kind="close", times=times))

    def cdn_down(self) -> None:
        """Stop listening: connections to the CDN are refused until ``cdn_up()``."""
        self.cdn.stop()

    def cdn_up(self) -> None:
        self.cdn.start()

    def api_down(self) -> None:
        self.api.stop()

    def api_up(self) -> None:
        self.api.start()

    # records
    @property
    def cdn_requests(self) -> list[RecordedRequest]:
        return self.cdn.requests

    @property
    def api_requests(self) -> list[RecordedRequest]:
        return self.api.requests

    def reset(self) -> None:
        """Forget recorded requests and go back to answering normally (settings are kept)."""
        self.cdn.reset()
        self.api.reset()

    def api_events(self, accepted_only: bool = True) -> list[ApiEvent]:
        """Events received by the fake API, in arrival order, batches expanded.

        Only requests answered 2xx count unless ``accepted_only`` is false. ``/v1/m`` (metrics)
        and anything that is not an event path are not events.
        """
        events: list[ApiEvent] = []
        for req in self.api.requests:
            if req.method != "POST" or not isinstance(req.json, dict):
                continue
            if accepted_only and (req.status is None or not 200 <= req.status < 300):
                continue
            if req.path in _BATCH_PATHS:
                batch = req.json.get("batch")
                if isinstance(batch, list):
                    events.extend(
                        ApiEvent(req.path, item, req) for item in batch if isinstance(item, dict)
                    )
            elif req.path in _SINGLE_EVENT_PATHS:
                events.append(ApiEvent(req.path, req.json, req))
        return events

    def wait_for_events(
        self, n: int, timeout: float = 10.0, accepted_only: bool = True
    ) -> list[ApiEvent]:
        """Poll until at least ``n`` events arrived; return them all. Fails clearly on timeout."""
        found: list[ApiEvent] = []

        def enough() -> bool:
            nonlocal found
            found = self.api_events(accepted_only=accepted_only)
            return len(found) >= n

        if not self.api.state.wait_until(enough, timeout):
            found = self.api_events(accepted_only=accepted_only)
            reqs = self.api.requests
            summary = "\n".join(
                f"  {r.method} {r.target} -> {r.status} ({len(r.body)} bytes)" for r in reqs[-20:]
            )
            raise AssertionError(
                f"fake API: expected at least {n} events within {timeout}s, got {len(found)} "
                f"from {len(reqs)} requests; last requests:\n{summary or '  (none)'}"
            )
        return found

    def wait_for_request(
        self,
        server: Literal["cdn", "api"],
        predicate: Callable[[RecordedRequest], bool],
        timeout: float = 10.0,
    ) -> RecordedRequest:
        """Poll until a recorded request matches ``predicate``; return the first match."""
        target = self.cdn if server == "cdn" else self.api
        match: list[RecordedRequest] = []

        def found() -> bool:
            match[:] = [r for r in target.state.requests if predicate(r)][:1]
            return bool(match)

        if not target.state.wait_until(found, timeout):
            seen = "\n".join(
                f"  {r.method} {r.target} -> {r.status}" for r in target.requests[-20:]
            )
            raise AssertionError(
                f"fake {server}: no matching request within {timeout}s; seen:\n{seen or '  (none)'}"
            )
        return match[0]

    # handlers
    def _standalone_js(self) -> bytes:
        if self._standalone is None:
            path = ANALYTICS_NEXT_UMD / "standalone.js"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run `npm ci` (scripts/setup.sh)")
            self._standalone = path.read_bytes()
        return self._standalone

    def _cdn_handler(self, req: RecordedRequest) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"Method Not Allowed\n", [("Allow", "GET, HEAD")])
        path = req.path
        if m := _SCRIPT_PATH.match(path):
            key = m.group(1)
            if key not in self.settings:
                return Response(404, b"Not Found\n", [("Content-Type", "text/plain")])
            body = self.expected_script(key)
            return self._static(req, body, "application/javascript", "public, max-age=60")
        if m := _SETTINGS_PATH.match(path):
            key = m.group(1)
            if key not in self.settings:
                return Response(404, b"Not Found\n", [("Content-Type", "text/plain")])
            body = json.dumps(self.settings[key]).encode()
            return self._static(req, body, "application/json", "public, max-age=120")
        if m := _BUNDLE_PATH.match(path):
            file = ANALYTICS_NEXT_UMD / m.group(1)
            if ".bundle." not in file.name or not file.is_file():
                return Response(404, b"Not Found\n", [("Content-Type", "text/plain")])
            ctype = "application/json" if file.name.endswith(".map") else "application/javascript"
            return self._static(
                req, file.read_bytes(), ctype, "public, max-age=31536000, immutable"
            )
        if _NEXT_INTEGRATIONS_PATH.match(path) and ".." not in path:
            return self._static(
                req,
                next_integration_bytes(path),
                "application/javascript",
                "public, max-age=31536000",
                extra=[("Content-Encoding", "gzip")],
            )
        return Response(404, b"Not Found\n", [("Content-Type", "text/plain")])

    @staticmethod
    def _static(
        req: RecordedRequest,
        body: bytes,
        ctype: str,
        cache_control: str,
        extra: Iterable[tuple[str, str]] = (),
    ) -> Response:
        etag = _etag(body)
        headers = [
            ("Content-Type", ctype),
            ("Cache-Control", cache_control),
            ("ETag", etag),
            ("Access-Control-Allow-Origin", "*"),
            *extra,
        ]
        if req.headers.get("if-none-match") == etag:
            return Response(304, b"", headers)
        return Response(200, body, headers)

    def _api_handler(self, req: RecordedRequest) -> Response:
        # Like api.segment.io, the fake answers CORS itself, so a browser pointed straight at it
        # works; a proxy is expected to answer preflights locally (they should not arrive here).
        origin = req.headers.get("origin")
        cors = [("Access-Control-Allow-Origin", origin)] if origin else []
        if not req.path.startswith("/v1/"):
            return _json_response(404, {"success": False, "message": "Not Found"})
        if req.method == "OPTIONS":
            allow_headers = req.headers.get("access-control-request-headers") or "content-type"
            return Response(
                204,
                b"",
                [
                    *cors,
                    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                    ("Access-Control-Allow-Headers", allow_headers),
                    ("Access-Control-Max-Age", "600"),
                ],
            )
        if req.method != "POST":
            return _json_response(405, {"success": False, "message": "Method Not Allowed"})
        if req.body and req.json is None:
            response = _json_response(400, {"success": False, "message": "Invalid JSON"})
        elif refused := self._refused(req):
            response = refused
        else:
            response = _json_response(200, self.api_response_body)
        response.headers.extend(cors)
        return response

    def _refused(self, req: RecordedRequest) -> Response | None:
        """Segment's own refusals of what a request holds (None: accepted)."""
        if len(req.decoded) > MAX_REQUEST_BYTES:
            return _json_response(
                400, {"success": False, "message": f"request over {MAX_REQUEST_BYTES} bytes"}
            )
        if not isinstance(req.json, dict):
            return None
        if req.path in _BATCH_PATHS:
            batch = req.json.get("batch")
            items = [e for e in batch if isinstance(e, dict)] if isinstance(batch, list) else []
        elif req.path in _SINGLE_EVENT_PATHS:
            items = [req.json]
        else:
            return None
        for event in items:
            size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
            if size > MAX_EVENT_BYTES:
                message = f"event {event.get('messageId')} is {size} bytes, over {MAX_EVENT_BYTES}"
                return _json_response(400, {"success": False, "message": message})
            if self.refuse is not None and self.refuse(event):
                message = f"event {event.get('messageId')} is invalid"
                return _json_response(self.refuse_status, {"success": False, "message": message})
        return None


def _status_mode(
    code: int,
    retry_after: float | str | None,
    body: bytes | str | None,
    times: int | None,
    headers: Mapping[str, str] | None = None,
) -> Mode:
    if body is None:
        raw = json.dumps({"success": False, "code": str(code)}).encode()
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = body
    return Mode(
        kind="status",
        code=code,
        retry_after=None if retry_after is None else str(retry_after),
        body=raw,
        headers=tuple((headers or {}).items()),
        times=times,
    )


# --------------------------------------------------------------------------------------------
# Sink


@dataclass(frozen=True)
class SinkConnection:
    peer: tuple[str, int]
    at: float
    first_bytes: bytes


class Sink:
    """A TCP listener on 127.0.0.1:0 that records every connection attempt and closes it.

    Used to prove the proxy never contacts a host it was not configured for: point something
    attacker-controlled (a Host header, an absolute-form target, a settings field) at the sink's
    address and assert ``connections`` stays empty.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Condition()
        self._connections: list[SinkConnection] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.port}", daemon=True)
        self._thread.start()

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    @property
    def connections(self) -> list[SinkConnection]:
        with self._lock:
            return list(self._connections)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.2)
                try:
                    first = conn.recv(4096)
                except OSError:
                    first = b""
            with self._lock:
                self._connections.append(SinkConnection((peer[0], peer[1]), time.time(), first))
                self._lock.notify_all()

    def wait_for_connections(self, n: int = 1, timeout: float = 5.0) -> list[SinkConnection]:
        """Poll until ``n`` connections were seen; return them (fails clearly on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._connections) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"sink: expected {n} connections within {timeout}s, "
                        f"got {len(self._connections)}"
                    )
                self._lock.wait(min(left, 0.1))
            return list(self._connections)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def fake_segment(write_keys: Iterable[str] = (DEFAULT_WRITE_KEY,)) -> Iterator[FakeSegment]:
    with FakeSegment(write_keys) as fake:
        yield fake
