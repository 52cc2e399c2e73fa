"""A bounded fuzz of the live server: random and mutated requests over raw sockets.

One real proxy (``queue.backend = "none"``, so an accepted API request reaches the fake Segment
API before the proxy answers) in front of the fake upstreams, started once inside the test
(hypothesis and function-scoped fixtures do not mix). Hypothesis builds requests from the known
route prefixes with random suffixes, random methods, Host and framing variations
(``Content-Length`` missing, short, long, negative, doubled; ``Transfer-Encoding`` good and bad),
random headers and bodies from random bytes to near-valid events.

Invariants, per request and overall:
- the proxy never answers 5xx to any of it and never hangs (each connection is half-closed
  after the request, so the proxy must answer or close at once);
- it never crashes: alive and ``/healthz`` answers 200 at the end;
- nothing it refused reached Segment: the fake API saw exactly as many requests as the proxy
  answered 2xx to API ``POST``s.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fakes import FakeSegment
from tests.support.proxy import RunningProxy, running_proxy, start_proxy
from tests.support.rawhttp import Conn, exchange, request_bytes

WRITE_KEY = "wk_fuzz_0123456789"
MAX_EXAMPLES = 600
READ_TIMEOUT = 3.0
T = TypeVar("T")


def mostly(
    common: st.SearchStrategy[T], rare: st.SearchStrategy[T], percent: int
) -> st.SearchStrategy[T]:
    """``common`` about ``percent``% of the time, else ``rare`` (hypothesis does not weight
    ``sampled_from`` by repetition, and ``one_of`` favours its first branches when shrinking)."""
    return st.integers(min_value=0, max_value=99).flatmap(lambda n: common if n < percent else rare)


# Weighted towards what real clients send, so many requests get far enough to be accepted.
METHODS = mostly(
    st.just("POST"),
    st.one_of(
        st.sampled_from(
            ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "CONNECT", "TRACE"]
        ),
        st.sampled_from(["get", "P0ST", "POST ", "", "GET\x00", "PRI", "XPOST"]),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-_", min_size=1, max_size=12),
    ),
    60,
)

PREFIXES = [
    "/v1/t",
    "/v1/p",
    "/v1/i",
    "/v1/track",
    "/v1/identify",
    "/v1/batch",
    "/v1/b",
    "/v1/import",
    "/v1/m",
    "/v1/",
    f"/v1/projects/{WRITE_KEY}/settings",
    f"/projects/{WRITE_KEY}/settings",
    f"/analytics.js/v1/{WRITE_KEY}/analytics.min.js",
    "/analytics-next/bundles/",
    "/next-integrations/integrations/",
    "/healthz",
    "/readyz",
    "/",
    "*",
    "http://evil.example/v1/t",
    "//evil.example/v1/t",
    "",
]
SUFFIXES = mostly(
    st.sampled_from(["", "?x=1"]),
    st.one_of(
        st.sampled_from(
            ["/..", "/%2e%2e/", "//", "?q=1", "#frag", "/../../etc/passwd", "\\..\\", "%00"]
        ),
        st.text(alphabet="abz09./%?#&=-_~\\:@!$'()*+,;AZ", max_size=30),
        st.text(alphabet=" \t\x00\x7f\x80\xff\r\n", min_size=1, max_size=3),
    ),
    60,
)
HOSTS = mostly(
    st.just("correct"),
    st.sampled_from(["missing", "foreign", "junk", "double", "empty", "newline"]),
    75,
)
LENGTHS = mostly(
    st.just("exact"),
    st.sampled_from(["missing", "short", "long", "negative", "junk", "double", "huge"]),
    70,
)
ENCODINGS = mostly(
    st.just("none"),
    st.sampled_from(["chunked", "chunked-bad", "chunked+length", "gzip-chunked"]),
    80,
)

HEADER_NAMES = [
    "Content-Type",
    "Content-Encoding",
    "Authorization",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "Origin",
    "Expect",
    "Connection",
    "Upgrade",
    "Accept-Encoding",
    "Cookie",
    "X-Retry-Count",
    "If-None-Match",
]
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "text/plain",
            "application/json",
            "application/json; charset=utf-8",
            "gzip",
            "br",
            "100-continue",
            "close",
            "keep-alive, Upgrade",
            "websocket",
            "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(),
            "Basic " + base64.b64encode(b"wk_stranger:").decode(),
            "Basic !!!",
            "Bearer x",
            "1.2.3.4, 10.0.0.1",
            "evil.example",
            "https",
            "*",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40),
)
EXTRA_HEADERS = mostly(
    st.just([]),
    st.lists(st.tuples(st.sampled_from(HEADER_NAMES), HEADER_VALUES), min_size=1, max_size=4),
    50,
)
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
# What a real client sends first; random headers come after (and may contradict these).
BASE_HEADERS = mostly(
    st.sampled_from(
        [
            [("Content-Type", "text/plain"), ("Authorization", AUTH)],
            [("Content-Type", "application/json"), ("Authorization", AUTH)],
        ]
    ),
    st.sampled_from([[("Content-Type", "application/json")], []]),
    80,
)


def _event(message_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Fuzz",
        "messageId": message_id,
        "anonymousId": "anon",
        "properties": {"n": 1},
        "writeKey": WRITE_KEY,
    }


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(
        mostly(
            st.sampled_from(["event", "batch"]),
            st.sampled_from(["mutated", "empty", "random", "gzip", "deep"]),
            50,
        )
    )
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=300))
    mid = draw(st.text(alphabet="abcdef0123456789", min_size=1, max_size=12))
    event = _event(mid)
    if kind == "event":
        return json.dumps(event).encode()
    if kind == "batch":
        return json.dumps({"batch": [event, _event(mid + "-2")], "writeKey": WRITE_KEY}).encode()
    if kind == "gzip":
        return gzip.compress(json.dumps(event).encode(), mtime=0)
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=5000))
        return b'{"type":"track","properties":' + b"[" * depth + b"]" * depth + b"}"
    raw = bytearray(json.dumps(event).encode())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] = draw(st.integers(min_value=0, max_value=255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    target: str
    host: str
    length: str
    encoding: str
    headers: list[tuple[str, str]]
    body: bytes

    def path(self) -> str:
        return self.target.split("?", 1)[0].split("#", 1)[0]

    def sound_framing(self) -> bool:
        """The body is framed exactly: nothing left over, nothing missing."""
        if self.encoding in ("chunked", "gzip-chunked"):
            return True
        return self.encoding == "none" and self.length == "exact"

    def is_api_post(self) -> bool:
        # llhttp accepts "POST  /v1/t" (an extra space after the method) as a POST.
        return self.method.strip() == "POST" and self.path().startswith("/v1/")

    def wire(self, authority: str) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        host = {
            "correct": [authority],
            "missing": [],
            "foreign": ["evil.example"],
            "junk": ["a b<script>"],
            "double": [authority, "evil.example"],
            "empty": [""],
            "newline": [authority + "\n"],
        }[self.host]
        lines += [f"Host: {h}" for h in host]
        lines += [f"{k}: {v}" for k, v in self.headers]
        body = self.body
        if self.encoding in ("chunked", "chunked+length", "gzip-chunked"):
            te = "gzip, chunked" if self.encoding == "gzip-chunked" else "chunked"
            lines.append(f"Transfer-Encoding: {te}")
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
            if self.encoding == "chunked+length":
                lines.append(f"Content-Length: {len(self.body)}")
        elif self.encoding == "chunked-bad":
            lines.append("Transfer-Encoding: chunked")
            body = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
        else:
            n = len(body)
            lines += {
                "exact": [f"Content-Length: {n}"],
                "missing": [],
                "short": [f"Content-Length: {max(n - 5, 0)}"],
                "long": [f"Content-Length: {n + 100}"],
                "negative": ["Content-Length: -1"],
                "junk": ["Content-Length: 1e3"],
                "double": [f"Content-Length: {n}", f"Content-Length: {n + 1}"],
                "huge": ["Content-Length: 99999999999"],
            }[self.length]
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("latin-1") + body


requests = st.builds(
    FuzzRequest,
    method=METHODS,
    target=st.builds(lambda p, s: p + s, st.sampled_from(PREFIXES), SUFFIXES),
    host=HOSTS,
    length=LENGTHS,
    encoding=ENCODINGS,
    headers=st.builds(lambda a, b: a + b, BASE_HEADERS, EXTRA_HEADERS),
    body=bodies(),
)


@dataclass
class Tally:
    examples: int = 0
    statuses: Counter[int | str] = field(default_factory=Counter)
    api_2xx: int = 0
    extra_2xx: int = 0  # 2xx answers to pipelined leftovers (a short Content-Length)
    problems: list[str] = field(default_factory=list)


def _send(proxy: RunningProxy, req: FuzzRequest) -> tuple[list[int], str]:
    """Send ``req`` on a fresh connection and read every answer to it.

    A request with sound framing is read like a keep-alive client does: one final answer, then
    we are done (unless the proxy said ``Connection: close``, then we read to its close). Any
    other request is followed by a half-close, so a proxy waiting for the rest of a body or
    for more pipelined requests must answer or close at once, not at its timeout; we read to
    its close. Returns the statuses in order and how it ended: ``kept-alive``, ``closed``,
    ``hang`` (no answer and no close before the deadline) or ``unparsable``.
    """
    statuses: list[int] = []
    sound = req.sound_framing()
    with Conn(proxy.host, proxy.port, timeout=READ_TIMEOUT) as conn:
        try:
            conn.send(req.wire(proxy.authority))
            if not sound:
                conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed before we finished sending: read what it said
        deadline = time.monotonic() + READ_TIMEOUT
        while True:
            head_only = not statuses and req.method == "HEAD"
            try:
                resp = conn.read_response(head=head_only, timeout=deadline - time.monotonic())
            except TimeoutError:
                return statuses, "hang"
            except (ConnectionError, OSError):
                return statuses, "closed"
            except (ValueError, IndexError):
                return statuses, "unparsable"
            statuses.append(resp.status)
            closing = (resp.header("connection") or "").lower() == "close"
            if sound and resp.status >= 200 and not closing:
                return statuses, "kept-alive"


def test_fuzzed_requests_never_get_5xx_and_refusals_never_reach_segment(tmp_path: Path) -> None:
    with FakeSegment([WRITE_KEY]) as fake:
        config = {
            "upstream": {"cdn": fake.cdn_url, "api": fake.api_url},
            "sources": {"write_keys": [WRITE_KEY]},
            "queue": {"backend": "none"},
            "limits": {"header_timeout": 2.0, "body_timeout": 2.0},
        }
        proxy = start_proxy(config, tmp_path / "proxy")
        try:
            tally = _fuzz(proxy, fake)
            assert proxy.proc.poll() is None, "the proxy died"
            assert exchange(proxy.host, proxy.port, "GET", "/healthz").status == 200
        finally:
            if proxy.proc.poll() is None:
                proxy.stop()
            else:
                print(proxy.logs())

    print(
        f"fuzz: {tally.examples} requests, statuses {dict(tally.statuses)}, "
        f"{tally.api_2xx} API 2xx, {len(fake.api_requests)} requests at the fake API"
    )
    assert not tally.problems, "\n".join(tally.problems[:20])
    # Nothing refused reached Segment, overall (the per-request check is in _fuzz).
    seen = len(fake.api_requests)
    assert tally.api_2xx <= seen <= tally.api_2xx + tally.extra_2xx


def _fuzz(proxy: RunningProxy, fake: FakeSegment) -> Tally:
    tally = Tally()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(req=requests)
    def one(req: FuzzRequest) -> None:
        before = len(fake.api_requests)
        statuses, ending = _send(proxy, req)
        # backend "none": an accepted request was answered by the fake before the proxy
        # answered us, so the count is final here.
        delta = len(fake.api_requests) - before
        tally.examples += 1
        outcomes: list[int | str] = [*statuses] if statuses else [ending]
        tally.statuses.update(outcomes)
        api_2xx = 1 if statuses and req.is_api_post() and 200 <= statuses[0] < 300 else 0
        extra_2xx = sum(1 for s in statuses[1:] if 200 <= s < 300)
        tally.api_2xx += api_2xx
        tally.extra_2xx += extra_2xx
        problems = []
        if any(s >= 500 for s in statuses):
            problems.append(f"5xx {statuses}")
        if ending == "hang":
            problems.append(f"no answer and no close within {READ_TIMEOUT}s (got {statuses})")
        if ending == "unparsable":
            problems.append(f"unparsable answer after {statuses}")
        if not api_2xx <= delta <= api_2xx + extra_2xx:
            problems.append(f"{delta} requests reached the fake API; answers {statuses}")
        if proxy.proc.poll() is not None:
            problems.append(f"proxy exited with {proxy.proc.returncode}")
        if problems:
            tally.problems.append(f"{req!r}: {'; '.join(problems)}")
        assert not problems, f"{req!r}: {problems}"

    one()
    return tally


def test_half_closed_connection_is_closed_after_its_answer(tmp_path: Path) -> None:
    with FakeSegment([WRITE_KEY]) as fake:
        config = {
            "upstream": {"cdn": fake.cdn_url, "api": fake.api_url},
            "sources": {"write_keys": [WRITE_KEY]},
            "queue": {"backend": "none"},
        }
        with running_proxy(config, tmp_path / "proxy") as proxy:
            body = json.dumps(_event("half-close")).encode()
            with Conn(proxy.host, proxy.port, timeout=READ_TIMEOUT) as conn:
                conn.send(
                    request_bytes(
                        "POST",
                        "/v1/t",
                        proxy.authority,
                        {"Content-Type": "text/plain", "Authorization": AUTH},
                        body,
                    )
                )
                conn.sock.shutdown(socket.SHUT_WR)
                assert conn.read_response().status == 200
                # Nothing more can arrive on this connection: the proxy should close it now.
                assert conn.closed_by_peer(timeout=2.0), "still open after the answer"
