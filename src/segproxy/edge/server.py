"""The HTTP/1.1 edge: an asyncio Protocol around httptools (llhttp), nothing more.

It owns framing, keep-alive, pipelining, ``Expect: 100-continue``, limits and timeouts, and
hands each complete request to one async handler. Responses on a connection are written in
request order (pipelining), one request handled at a time per connection.

Timers, one per connection, whichever applies:
  idle    - from connection start or the last response until the first byte of a request
  header  - from the first byte of a request until its headers are complete (slowloris)
  body    - from the end of the headers until the body is complete (slow bodies)
A connection past its timer is answered 408 (if mid-request) and closed.

Errors: a request the parser rejects, or one over a limit, gets a JSON 4xx and the connection is
closed after the responses already queued on it, since the framing can no longer be trusted.

Framing (request smuggling): llhttp in its default strict mode already refuses Content-Length
with Transfer-Encoding, repeated or malformed Content-Length, a Transfer-Encoding that does not
end in ``chunked``, obsolete line folding, bare CR or LF, control characters (NUL included) in
headers, bad chunk sizes and a space in the request target. The edge adds what llhttp lets
through, on paths a plain Content-Length request never takes:
  - a Transfer-Encoding other than exactly ``chunked`` (``gzip, chunked``), or on HTTP/1.0;
  - an HTTP version other than 1.0 or 1.1 (llhttp accepts 0.9 and 2.0);
  - chunk extensions (and other chunk-line padding) over 1 KB in a request (give or take one
    256-byte slice); llhttp reads them without limit, and httptools neither reports them nor
    where in a read a callback happened. So the read that holds the headers is searched for a
    chunk line with an extension over 1 KB, and later reads of the body are fed in slices and
    the bytes beyond the chunk data counted;
  - trailer fields are read (within the header limits) and dropped, never merged into headers;
  - a request asking to switch protocols (``Upgrade`` with ``Connection: upgrade``, or
    ``CONNECT``) is answered once as plain HTTP and the connection closed, reading nothing after
    it; one that declares a body is refused (llhttp stops before the body).

Connections: past ``limits.max_connections`` open ones, a new connection is answered 503 and
closed at once (counted in ``EdgeServer.refused``).

Memory budget (``limits.max_buffered_bytes``): ``EdgeServer.buffered`` counts the request-body
bytes held across all connections. A Content-Length body is reserved whole when its headers
end; a chunked body is counted as it arrives. A body that would take the total over the budget
is answered 503 (``Retry-After``) and its connection closed. Invariant: ``buffered`` is the sum
of every connection's ``reserved``; a request's bytes leave both when it is handed to the
handler (``_serve``: a pipelined request waiting its turn still holds them), and whatever a
connection still holds leaves when it closes (``connection_lost``: every end of a connection
goes through it, whether timeout, reset, refusal or error).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from email.utils import formatdate
from time import monotonic  # deadlines: a vDSO clock, cheaper than loop.time() per request
from typing import Any, cast

import httptools

from segproxy.config import LimitsConfig
from segproxy.cors import FOR_EDGE
from segproxy.edge.http import (
    SECURITY_HEADERS,
    Deferred,
    Request,
    Response,
    error_response,
    reason,
)
from segproxy.redact import redact_path

log = logging.getLogger("segproxy.edge")

# A handler answers at once (Response), later (a Deferred resolved by its producer), or
# returns a coroutine that is run as a task.
Handler = Callable[[Request], Response | Deferred | Coroutine[Any, Any, Response]]

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {reason(status)}\r\n".encode("latin-1")
        _STATUS_LINES[status] = line
    return line


class _DateCache:
    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._value


_DATE = _DateCache()
_SECURITY = b"".join(k + b": " + v + b"\r\n" for k, v in SECURITY_HEADERS)

# Chunked bodies: bytes on the wire beyond the chunk data. Each chunk may take _CHUNK_FRAMING
# (up to 16 hex digits and two CRLFs); extensions and padding share _CHUNK_EXTRA per request.
_CHUNK_FRAMING = 32
_CHUNK_EXTRA = 1024
_CHUNK_SLICE = 256  # chunked bodies are fed in slices this size, so the count is this precise
# In the read that holds the headers (parsed whole, on the fast path): a chunk line with an
# extension over _CHUNK_EXTRA. A chunk line always follows a CRLF.
_LONG_CHUNK_EXTENSION = re.compile(rb"\n[0-9A-Fa-f]+[\t ]*;[^\n]{%d}" % _CHUNK_EXTRA)

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\n" + _SECURITY
)
_REFUSED_BODY = (
    b'{"success":false,"code":"too_many_connections",'
    b'"message":"the server has too many open connections; retry"}'
)
# Over the memory budget. CORS headers so that a browser's script can read the Retry-After.
_OVER_BUDGET = error_response(
    503,
    "server_busy",
    "the server is receiving too many request bodies at once; retry",
    [(b"retry-after", b"1"), *FOR_EDGE],
)


def _head(response: Response, keep_alive: bool) -> bytes:
    """A response's header lines after its status and Date lines, through the blank line."""
    status = response.status
    parts = [_SECURITY]
    for k, v in response.headers:
        parts.append(k + b": " + v + b"\r\n")
    if status >= 200 and status not in (204, 304):
        parts.append(b"content-length: " + str(len(response.body)).encode() + b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# How _serve left a request: answered (go on / the connection closes) or answered later.
_NEXT = object()
_STOP = object()
_PENDING = object()
_METHODS = {m.encode(): m for m in ("GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH")}


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with a response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _bad_framing(message: str) -> _Reject:
    return _Reject(error_response(400, "bad_framing", message))


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.handler = server.handler
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.scheme = "http"
        # the request being read
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        # Header fields as the parser reports them (then trailers, for a chunked body); the
        # dict and the limits are worked out once, at the end of the headers.
        self.fields: list[tuple[bytes, bytes]] = []
        self.begun_in = b""  # the read in which the request began
        self.head_fed = 0  # bytes of later reads fed while the headers were incomplete
        self.max_header_bytes = server.limits.max_header_bytes
        self.max_header_count = server.limits.max_header_count
        self.body: list[bytes] = []
        self.body_size = 0
        self.reserved = 0  # body bytes this connection holds against the memory budget
        self.max_buffered = server.limits.max_buffered_bytes
        self.expect_body = False
        self.in_message = False
        self.eof = False
        self.read = b""  # the read being parsed
        # Rare paths: ``slow`` routes data_received off the fast path (closing, refused, or
        # reading a chunked body); ``odd``: a chunked message is being read.
        self.slow = False
        self.odd = False
        # Counted from the first read after the one with the headers (-1: not there yet).
        self.chunk_wire = 0  # bytes of the chunked body fed to the parser
        self.chunk_count = 0  # chunk lines parsed
        self.chunk_body_base = -1  # body_size and chunk_count at that read
        self.chunk_count_base = 0
        self.trailers_from = 0  # index in ``fields`` where the trailers start
        # queued complete requests (or a final rejection) in arrival order
        self.pipeline: deque[Request | Response] = deque()
        self.busy = False
        self.reading_paused = False
        self.closing = False
        self.current: asyncio.Task[Response] | None = None
        self.waiting_on: Request | None = None
        self._on_resolved = self._resolved  # bound once, not per request
        # One deadline per connection, checked by the server's sweeper (cheaper than a
        # TimerHandle per phase per request on the hot path).
        self.deadline = 0.0
        self.timer_phase = ""
        self.header_timeout = server.limits.header_timeout
        self.body_timeout = server.limits.body_timeout
        self.idle_timeout = server.limits.idle_timeout

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= self.limits.max_connections:
            self._refuse()
            return
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.server.connections.add(self)
        self._arm("idle", self.limits.idle_timeout)

    def _refuse(self) -> None:
        """Over ``limits.max_connections``: answer 503 and close, reading nothing."""
        self.server.refused += 1
        self.closing = self.slow = True
        transport = self.transport
        assert transport is not None
        transport.write(
            _REFUSED
            + _DATE.get()
            + b"content-length: "
            + str(len(_REFUSED_BODY)).encode()
            + b"\r\n\r\n"
            + _REFUSED_BODY
        )
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.buffered -= self.reserved  # whatever it still held, however it ended
        self.reserved = 0
        self.closing = self.slow = True
        self._disarm()
        self.transport = None

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests until it does.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.reading_paused and not self.closing:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what we have, then close (see _next).
        self.eof = True
        if not self.busy and not self.pipeline:
            self._close()
        return True

    # -- timers ---------------------------------------------------------------------------

    def _arm(self, phase: str, seconds: float) -> None:
        self.timer_phase = phase
        self.deadline = monotonic() + seconds

    def _disarm(self) -> None:
        self.deadline = 0.0
        self.timer_phase = ""

    def _timeout(self) -> None:
        phase = self.timer_phase
        self._disarm()
        if self.transport is None:
            return
        if phase in ("header", "body"):
            log.info("closing connection from %s: %s timeout", self.peer, phase)
            resp = error_response(
                408, "request_timeout", f"the request {phase} did not arrive in time"
            )
            self._queue_final(resp)
        else:
            self._close()

    # -- parsing --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.slow:
            self._data_received_slow(data)
            return
        self.read = data  # the read being parsed (a chunked request's first chunks sit in it)
        try:
            self.parser.feed_data(data)
            if self.timer_phase == "header":  # the headers go on in a later read
                self._partial_head(data, self.begun_in is data)
        except (_Reject, httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            self._parse_failed(exc)

    def _partial_head(self, data: bytes, began_here: bool) -> None:
        """Headers still incomplete after this read: hold the limits now, not at their end
        (llhttp would buffer a field of any length until it ends). A read after the one the
        request began in is all header bytes, so it counts whole."""
        if not began_here:
            self.head_fed += len(data)
        if self.head_fed > self.max_header_bytes:
            raise self._too_large()
        self._check_fields(self.fields)

    def _data_received_slow(self, data: bytes) -> None:
        """Closing (read nothing), or inside a chunked body (count its framing bytes)."""
        if self.closing:
            return
        view = memoryview(data)
        if self.chunk_body_base < 0:
            self.chunk_body_base = self.body_size
            self.chunk_count_base = self.chunk_count
        try:
            while self.odd and view:
                piece = view[:_CHUNK_SLICE]
                view = view[_CHUNK_SLICE:]
                self.chunk_wire += len(piece)
                self.parser.feed_data(piece)
                if self.odd:
                    if len(self.fields) > self.trailers_from:  # trailers count against the limits
                        self._check_fields(self.fields)
                    if self._chunk_excess() > 0:
                        raise _bad_framing("chunk extensions are over 1 KB")
            if view and not self.closing:
                self.read = rest = view.tobytes()
                self.parser.feed_data(rest)  # the chunked message ended: back to normal
                if self.timer_phase == "header":
                    # (rest holds only bytes after the chunked message: a request that began
                    # in its last slice counts whole, which is exact, since all of it is head)
                    self._partial_head(rest, self.begun_in is rest)
        except (_Reject, httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            self._parse_failed(exc)

    def _parse_failed(self, exc: Exception) -> None:
        """Answer what stopped the parser (then close: the framing is no longer trusted)."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            # llhttp stops after a message that asks to switch protocols; on_message_complete
            # has already seen it (``_refuse_upgrade``), and its answer closes the connection.
            if not self.closing:  # (llhttp never stops so otherwise; if it did: refuse)
                self._queue_final(error_response(400, "bad_request", "unexpected upgrade"))
            return
        cause = exc if isinstance(exc, _Reject) else exc.__context__
        if isinstance(cause, _Reject):
            self._queue_final(cause.response)
        else:
            self._queue_final(error_response(400, "bad_request", f"malformed HTTP request: {exc}"))

    def _refuse_upgrade(self) -> None:
        """A request asking to switch protocols (``Upgrade``, ``CONNECT``): we never switch, so
        it is answered once as plain HTTP (a CONNECT gets the router's 405), with
        ``Connection: close``, after what is queued ahead of it. Nothing after it is read:
        those bytes belong to the other protocol, and an extra answer on this connection could
        reach the next client of a front proxy that reuses connections."""
        self.closing = self.slow = True
        if self.transport is not None and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.fields = []
        self.begun_in = self.read
        self.head_fed = 0
        self.body = []
        self.body_size = 0
        # (the timers inline, here and below: these run once per request)
        self.timer_phase = "header"
        self.deadline = monotonic() + self.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 8192:
            raise _Reject(error_response(414, "uri_too_long", "the request target is over 8 KB"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def _too_large(self) -> _Reject:
        return _Reject(
            error_response(
                431,
                "headers_too_large",
                f"request headers are over {self.max_header_bytes} bytes",
            )
        )

    def _check_fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The header limits, counted exactly (trailers included)."""
        if len(fields) > self.max_header_count:
            raise _Reject(
                error_response(
                    431, "too_many_headers", f"more than {self.max_header_count} request headers"
                )
            )
        if sum(len(n) + len(v) + 4 for n, v in fields) > self.max_header_bytes:
            raise self._too_large()

    def _merged(self, fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        """Repeated fields joined with ", " (RFC 9110 5.3); a second Host is refused."""
        headers: dict[bytes, bytes] = {}
        for name, value in fields:
            key = name.lower()
            old = headers.get(key)
            if old is None:
                headers[key] = value
            elif key == b"host":
                raise _Reject(error_response(400, "bad_host", "more than one Host header"))
            else:
                headers[key] = old + b", " + value
        return headers

    def on_headers_complete(self) -> None:
        limits = self.limits
        fields = self.fields
        # Whole within one read no larger than the byte limit: within it (no need to count).
        if (
            len(fields) > self.max_header_count
            or self.begun_in is not self.read
            or len(self.read) > self.max_header_bytes
        ):
            self._check_fields(fields)
        headers = {name.lower(): value for name, value in fields}
        if len(headers) != len(fields):
            headers = self._merged(fields)
        self.headers = headers
        clen = headers.get(b"content-length")
        if clen is not None:
            # llhttp has refused it with Transfer-Encoding, repeated, or not all digits. The
            # declared length is reserved against the memory budget before a byte is read.
            size = int(clen)
            if size > limits.max_body_bytes:
                raise _Reject(
                    error_response(
                        413,
                        "body_too_large",
                        f"request body is over {limits.max_body_bytes} bytes",
                    )
                )
            self.expect_body = size != 0
            if self.expect_body:
                self._reserve(size)
        elif b"transfer-encoding" in headers:
            self._start_chunked()
            self.expect_body = True
        else:
            self.expect_body = False
        if self.expect_body:
            self.timer_phase = "body"
            self.deadline = monotonic() + self.body_timeout
            expect = headers.get(b"expect")
            # 100 Continue is only safe to interleave when nothing is being answered ahead.
            if (
                expect is not None
                and expect.lower() == b"100-continue"
                and not self.pipeline
                and not self.busy
                and self.transport is not None
            ):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self._disarm()

    def _reserve(self, size: int) -> None:
        """Hold ``size`` more body bytes against the budget, or refuse the request."""
        server = self.server
        if server.buffered + size > self.max_buffered:
            raise _Reject(_OVER_BUDGET)
        server.buffered += size
        self.reserved += size

    def _start_chunked(self) -> None:
        """A Transfer-Encoding header (llhttp let it through, so it ends in chunked)."""
        te = self.headers[b"transfer-encoding"]
        if te.strip(b" \t").lower() != b"chunked":
            raise _bad_framing(f"unsupported Transfer-Encoding: {te.decode('latin-1')!r}")
        if self.parser.get_http_version() != "1.1":
            raise _bad_framing("Transfer-Encoding on an HTTP/1.0 request")
        # The rest of this read is parsed as it is, on the fast path: look at its chunk lines.
        if _LONG_CHUNK_EXTENSION.search(self.read) is not None:
            raise _bad_framing("chunk extensions are over 1 KB")
        self.odd = self.slow = True
        self.trailers_from = len(self.fields)  # trailer fields land after these: dropped
        self.chunk_wire = 0
        self.chunk_count = 0
        self.chunk_body_base = -1

    def _chunk_excess(self) -> int:
        """Bytes fed beyond chunk data, allowed framing and trailers (> 0: too many)."""
        if self.chunk_body_base < 0:
            return -1  # still in the read that held the headers
        trailers = sum(len(n) + len(v) + 4 for n, v in self.fields[self.trailers_from :])
        return (
            self.chunk_wire
            - (self.body_size - self.chunk_body_base)
            - _CHUNK_EXTRA
            - _CHUNK_FRAMING * (self.chunk_count - self.chunk_count_base)
            - trailers
        )

    def on_chunk_header(self) -> None:
        # Only chunked bodies get here; the parser is at most one slice behind chunk_wire.
        self.chunk_count += 1
        if self._chunk_excess() > _CHUNK_SLICE:
            raise _bad_framing("chunk extensions are over 1 KB")

    def _end_chunked(self) -> None:
        # The slice being parsed may run past the end of this message: allow it.
        if self._chunk_excess() > _CHUNK_SLICE:
            raise _bad_framing("chunk extensions are over 1 KB")
        self._check_fields(self.fields)
        self.odd = False
        self.slow = self.closing

    def _check_version(self) -> None:
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _bad_framing(f"unsupported HTTP version {version}")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.limits.max_body_bytes:
            raise _Reject(
                error_response(
                    413,
                    "body_too_large",
                    f"request body is over {self.limits.max_body_bytes} bytes",
                )
            )
        if self.odd:  # a chunked body has no length to reserve: count it as it grows
            self._reserve(len(body))
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        method = _METHODS.get(parser.get_method())
        # llhttp keeps alive HTTP/1.1 unless "Connection: close"; any other version only with
        # a Connection header: the version needs a look only then. A chunked message comes
        # here too, and so does an upgrade (it needs "Connection: upgrade", or is a CONNECT).
        if not keep_alive or self.odd or method is None or b"connection" in self.headers:
            if self.odd:
                self._end_chunked()
            self._check_version()
            if parser.should_upgrade():
                if self.expect_body:  # llhttp leaves the body unread: it is not this request
                    raise _bad_framing("a request that asks to switch protocols cannot have a body")
                keep_alive = False
                self._refuse_upgrade()
            if method is None:
                method = parser.get_method().decode("latin-1")
        self.in_message = False
        self.deadline = 0.0
        self.timer_phase = ""
        body = self.body
        self.body = []  # an idle connection keeps no body
        req = Request(
            method,
            self.url.decode("latin-1"),
            self.headers,
            body[0] if len(body) == 1 else b"".join(body),
            self.peer,
            self.scheme,
            keep_alive and not self.server.shutting_down,
        )
        if self.busy or self.pipeline:  # answering an earlier request: wait in line
            self.pipeline.append(req)
            if len(self.pipeline) >= self.limits.max_pipelined and self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        # Nothing ahead of it (the usual case): answer it now, without the queue.
        self.busy = True
        step = self._serve(req)
        if step is _PENDING:
            return
        if step is _NEXT and self.pipeline:
            self._next()
        else:
            self._idle()

    # -- answering ------------------------------------------------------------------------

    def _queue_final(self, response: Response) -> None:
        """Answer ``response`` after what is queued, then close; read nothing more."""
        self.closing = self.slow = True
        self._disarm()
        if self.transport is not None and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        self.pipeline.append(response)
        self._kick()

    def _kick(self) -> None:
        if not self.busy:
            self.busy = True
            self._next()

    def _next(self) -> None:
        """Answer queued requests in order; stop at the first one that is not ready yet."""
        while self.pipeline:
            if self.transport is None:
                break
            item = self.pipeline.popleft()
            if isinstance(item, Response):
                self._write(item, "GET", keep_alive=False)
                break
            if self.reading_paused and not self.closing:
                self.transport.resume_reading()
                self.reading_paused = False
            step = self._serve(item)
            if step is _PENDING:
                return
            if step is _STOP:
                break
        self._idle()

    def _idle(self) -> None:
        """Everything read so far is answered."""
        self.busy = False
        if self.eof:  # half-closed by the client and everything answered
            self._close()
        elif self.transport is not None and not self.closing and not self.in_message:
            self.timer_phase = "idle"
            self.deadline = monotonic() + self.idle_timeout

    def _serve(self, item: Request) -> object:
        """Run the handler for one request: answered (_NEXT or _STOP) or _PENDING."""
        size = len(item.body)  # handed over: its bytes leave the budget
        self.reserved -= size
        self.server.buffered -= size
        try:
            result = self.handler(item)
        except Exception:
            log.exception("handler failed for %s %s", item.method, redact_path(item.target))
            result = error_response(500, "internal_error", "internal error")
        if isinstance(result, Deferred):
            if result.response is None:
                self.waiting_on = item  # one request in progress per connection
                result.then(self._on_resolved)
                return _PENDING  # busy until the producer resolves it
            result = result.response
        if isinstance(result, Response):
            return _NEXT if self._answer(item, result) else _STOP
        # A coroutine (a CDN fetch, say): the only case that pays for a task; cache hits,
        # refusals and Deferreds (queue commits, upstream replies) are handled above.
        pending = self.loop.create_task(result)
        self.current = pending  # keep a reference: the loop holds tasks only weakly
        pending.add_done_callback(functools.partial(self._done, item))
        return _PENDING

    def _resolved(self, response: Response) -> None:
        item = self.waiting_on
        self.waiting_on = None
        assert item is not None
        if self._answer(item, response):
            self._next()
        else:
            self.busy = False

    def _done(self, item: Request, pending: asyncio.Task[Response]) -> None:
        self.current = None
        try:
            response = pending.result()
        except asyncio.CancelledError:
            response = error_response(503, "shutting_down", "the server is stopping; retry")
        except Exception:
            log.exception("handler failed for %s %s", item.method, redact_path(item.target))
            response = error_response(500, "internal_error", "internal error")
        if self._answer(item, response):
            self._next()
        else:
            self.busy = False

    def _answer(self, item: Request, response: Response) -> bool:
        """Write the response; True if the connection stays open for the next request."""
        if self.transport is None:
            return False
        keep = item.keep_alive and not self.server.shutting_down
        self._write(response, item.method, keep_alive=keep)
        return keep

    def _write(self, response: Response, method: str, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        status = response.status
        if keep_alive:
            # The usual answer: its header lines are built once per Response (a shared one,
            # like the ingest 200, is reused across requests); the body is copied once.
            head = response.head
            if head is None:
                head = response.head = _head(response, keep_alive=True)
        else:
            head = _head(response, keep_alive=False)
        line = _status_line(status)
        if method == "HEAD" or status in (204, 304):
            transport.write(line + _DATE.get() + head)
        else:
            transport.write(b"".join((line, _DATE.get(), head, response.body)))
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        self.closing = self.slow = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server is stopping: close now if idle, else after the current response."""
        if not self.busy and not self.pipeline:
            self._close()


class EdgeServer:
    """Owns the listening socket and every live connection."""

    def __init__(
        self,
        handler: Handler,
        limits: LimitsConfig,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = loop
        self.ssl_context = ssl_context
        self.connections: set[HttpProtocol] = set()
        self.refused = 0  # connections closed at once: over limits.max_connections
        self.buffered = 0  # request-body bytes held by all connections (see the docstring)
        self.shutting_down = False
        self._server: asyncio.base_events.Server | None = None
        shortest = min(limits.header_timeout, limits.body_timeout, limits.idle_timeout)
        self.sweep_interval = min(max(shortest / 4, 0.05), 0.5)
        self._sweeper: asyncio.TimerHandle | None = None

    def _sweep(self) -> None:
        """Fire the timeout of every connection past its deadline; runs every sweep_interval."""
        now = monotonic()
        for conn in [c for c in self.connections if 0.0 < c.deadline <= now]:
            conn._timeout()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> Any:
        kwargs: dict[str, Any] = {"backlog": 2048, "ssl": self.ssl_context}
        if sock is not None:
            self._server = await self.loop.create_server(
                lambda: HttpProtocol(self), sock=sock, **kwargs
            )
        else:
            self._server = await self.loop.create_server(
                lambda: HttpProtocol(self), host=host, port=port, reuse_address=True, **kwargs
            )
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        # (uvloop's Server.sockets is a list, not the tuple asyncio's is typed as: compiled,
        # the typed attribute would be checked)
        server: Any = self._server
        return server.sockets[0].getsockname()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace`` s), close the rest."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.shutdown()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()
