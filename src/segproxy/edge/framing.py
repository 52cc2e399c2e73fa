"""The edge's framing core, without I/O: a connection's bytes in, its requests out.

:class:`Framing` runs the httptools (llhttp) parser of one connection (it is the parser's
callback target) and holds everything about reading requests: the header, body and chunk limits,
the memory budget's reservations, the phase of the request being read (with its deadline), the
keep-alive and upgrade decisions, and whether the connection reads any more. It never touches a
socket, a clock's timer or the event loop: ``HttpProtocol`` (``edge/server.py``) feeds it each
read and keeps the I/O, the firing of timeouts, flow control and the answering of requests.

What the core tells its connection (callables given at construction, called synchronously):
  - ``deliver(request)``: a complete request, in arrival order, from inside the read that
    completed it. The connection may answer it at once, before the parser reads on: a pipelined
    request later in the same read then finds the connection idle, as without pipelining;
  - ``send_continue()``: the headers of a request with ``Expect: 100-continue`` and a body are
    complete (the connection writes the interim response if nothing is answered ahead of it);
  - ``stop_reading()``: a request asks to switch protocols: read nothing after it;
  - :meth:`Framing.feed` returns the error response that ends the connection (answer it after
    what is queued, then close; the framing can no longer be trusted), or None.
Why callbacks rather than a list of events per read: a list would be one more allocation per
request on the hot path, and a request must reach the connection in the read that completes it
(its answer may go out before a later request's 100 Continue).

Framing (request smuggling): llhttp in its default strict mode already refuses Content-Length
with Transfer-Encoding, repeated or malformed Content-Length, a Transfer-Encoding that does not
end in ``chunked``, obsolete line folding, bare CR or LF, control characters (NUL included) in
headers, bad chunk sizes and a space in the request target. The core adds what llhttp lets
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
    ``CONNECT``) is delivered with keep-alive off and nothing after it is read (the router
    answers a CONNECT 405); one that declares a body is refused (llhttp stops before the body).

Memory budget (``limits.max_buffered_bytes``): a :class:`Budget` shared by a server's
connections counts the request-body bytes they hold. A Content-Length body is reserved whole
when its headers end; a chunked body is counted as it arrives. A body that would take the total
over the budget is refused with 503. Invariant: ``Budget.held`` is the sum of every connection's
``Framing.reserved``; a request's bytes leave both when the connection hands it to its handler
(:meth:`Framing.release`: a pipelined request waiting its turn still holds them), and whatever a
connection still holds leaves when it closes.

The fast path (one Content-Length request per read) costs one Python call per parser callback,
none per header beyond llhttp's own, and the rare paths (chunked bodies, a closing connection,
headers across reads, repeated header names) are behind one flag or comparison each.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from time import monotonic  # deadlines: a vDSO clock, cheaper than loop.time() per request

import httptools

from segproxy.config import LimitsConfig
from segproxy.cors import FOR_EDGE
from segproxy.edge.http import (
    Request,
    Response,
    body_too_large,
    error_response,
    server_busy,
)

SERVER_BUSY = server_busy(FOR_EDGE)  # over the memory budget for request bodies

# Chunked bodies: bytes on the wire beyond the chunk data. Each chunk may take _CHUNK_FRAMING
# (up to 16 hex digits and two CRLFs); extensions and padding share _CHUNK_EXTRA per request.
_CHUNK_FRAMING = 32
_CHUNK_EXTRA = 1024
_CHUNK_SLICE = 256  # chunked bodies are fed in slices this size, so the count is this precise
# In the read that holds the headers (parsed whole, on the fast path): a chunk line with an
# extension over _CHUNK_EXTRA. A chunk line always follows a CRLF.
_LONG_CHUNK_EXTENSION = re.compile(rb"\n[0-9A-Fa-f]+[\t ]*;[^\n]{%d}" % _CHUNK_EXTRA)
_MAX_TARGET = 8192
_METHODS = {m.encode(): m for m in ("GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH")}


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with a response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _bad_framing(message: str) -> _Reject:
    return _Reject(error_response(400, "bad_framing", message))


def _long_chunk_extension() -> _Reject:
    return _bad_framing("chunk extensions are over 1 KB")


class Budget:
    """The memory budget for request bodies, shared by every connection of one server."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # the sum of every connection's Framing.reserved


class Framing:
    """One connection's request framing: :meth:`feed` it each read (see the module docstring)."""

    def __init__(
        self,
        limits: LimitsConfig,
        budget: Budget,
        deliver: Callable[[Request], None],
        send_continue: Callable[[], None],
        stop_reading: Callable[[], None],
    ) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.budget = budget
        self.deliver = deliver
        self.send_continue = send_continue
        self.stop_reading = stop_reading
        self.peer = ""  # the connection's, copied into each Request
        self.scheme = "http"
        self.max_header_bytes = limits.max_header_bytes
        self.max_header_count = limits.max_header_count
        self.max_body_bytes = limits.max_body_bytes
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        # the request being read
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        # Header fields as the parser reports them (then trailers, for a chunked body); the
        # dict and the limits are worked out once, at the end of the headers.
        self.fields: list[tuple[bytes, bytes]] = []
        self.begun_in = b""  # the read in which the request began
        self.head_fed = 0  # bytes of later reads fed while the headers were incomplete
        self.body: list[bytes] = []
        self.body_size = 0
        self.reserved = 0  # body bytes this connection holds against the memory budget
        self.expect_body = False
        self.in_message = False
        self.read = b""  # the read being parsed
        # ``rare_path`` routes feed() off the fast path: the connection is closing (read
        # nothing) or a chunked body is being read (``in_chunked_body``: count its framing).
        self.rare_path = False
        self.in_chunked_body = False
        self.closing = False  # reads nothing more: an error, an upgrade, or the end
        # Counted from the first read after the one with the headers (-1: not there yet).
        self.chunk_wire = 0  # bytes of the chunked body fed to the parser
        self.chunk_count = 0  # chunk lines parsed on this connection (only differences count)
        self.chunk_body_base = -1  # body_size and chunk_count at that read
        self.chunk_count_base = 0
        self.trailers_from = 0  # index in ``fields`` where the trailers start
        # The phase the connection is in ("idle", "header", "body" or "" for none) and when it
        # must be over (0.0: no deadline); the connection's sweeper fires it.
        self.deadline = 0.0
        self.timer_phase = ""
        self.begun_at = 0.0  # when the request being read began (its first byte), monotonic

    # -- what the connection calls --------------------------------------------------------

    def feed(self, data: bytes) -> Response | None:
        """Parse one read: None, or the error that ends the connection (now closing)."""
        if self.rare_path:
            return self._feed_rare(data)
        self.read = data  # the read being parsed (a chunked request's first chunks sit in it)
        try:
            self.parser.feed_data(data)
            if self.timer_phase == "header":  # the headers go on in a later read
                self._partial_head(data, self.begun_in is data)
        except (_Reject, httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            return self._failed(exc)
        return None

    def stop(self) -> None:
        """Read nothing more on this connection."""
        self.closing = self.rare_path = True

    def release(self, size: int) -> None:
        """``size`` body bytes leave the budget (a request handed over, or the connection gone)."""
        self.reserved -= size
        self.budget.held -= size

    def arm(self, phase: str, seconds: float) -> None:
        self.timer_phase = phase
        self.deadline = monotonic() + seconds

    def arm_from(self, now: float, phase: str, seconds: float) -> None:
        """``arm`` from a clock read the caller already took (monotonic)."""
        self.timer_phase = phase
        self.deadline = now + seconds

    def disarm(self) -> None:
        self.deadline = 0.0
        self.timer_phase = ""

    # -- off the fast path ----------------------------------------------------------------

    def _partial_head(self, data: bytes, began_here: bool) -> None:
        """Headers still incomplete after this read: hold the limits now, not at their end
        (llhttp would buffer a field of any length until it ends). A read after the one the
        request began in is all header bytes, so it counts whole."""
        if not began_here:
            self.head_fed += len(data)
        if self.head_fed > self.max_header_bytes:
            raise self._too_large()
        self._check_fields(self.fields)

    def _feed_rare(self, data: bytes) -> Response | None:
        """Closing (read nothing), or inside a chunked body (count its framing bytes)."""
        if self.closing:
            return None
        view = memoryview(data)
        if self.chunk_body_base < 0:
            self.chunk_body_base = self.body_size
            self.chunk_count_base = self.chunk_count
        try:
            while self.in_chunked_body and view:
                piece = view[:_CHUNK_SLICE]
                view = view[_CHUNK_SLICE:]
                self.chunk_wire += len(piece)
                self.parser.feed_data(piece)
                if self.in_chunked_body:
                    if len(self.fields) > self.trailers_from:  # trailers count against the limits
                        self._check_fields(self.fields)
                    if self._chunk_excess() > 0:
                        raise _long_chunk_extension()
            if view and not self.closing:
                self.read = rest = view.tobytes()
                self.parser.feed_data(rest)  # the chunked message ended: back to normal
                if self.timer_phase == "header":
                    # (rest holds only bytes after the chunked message: a request that began
                    # in its last slice counts whole, which is exact, since all of it is head)
                    self._partial_head(rest, self.begun_in is rest)
        except (_Reject, httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            return self._failed(exc)
        return None

    def _failed(self, exc: Exception) -> Response | None:
        """What stopped the parser: the answer that ends the connection, if one is due."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            # llhttp stops after a message that asks to switch protocols; on_message_complete
            # has already delivered it (``_refuse_upgrade``), and its answer closes the
            # connection. (llhttp never stops so otherwise; if it did: refuse.)
            if self.closing:
                return None
            self.stop()
            return error_response(400, "bad_request", "unexpected upgrade")
        self.stop()
        cause = exc if isinstance(exc, _Reject) else exc.__context__
        if isinstance(cause, _Reject):
            return cause.response
        return error_response(400, "bad_request", f"malformed HTTP request: {exc}")

    def _refuse_upgrade(self) -> None:
        """A request asking to switch protocols (``Upgrade``, ``CONNECT``): we never switch, so
        it is answered once as plain HTTP, with ``Connection: close``, after what is queued
        ahead of it. Nothing after it is read: those bytes belong to the other protocol, and an
        extra answer on this connection could reach the next client of a front proxy that
        reuses connections."""
        self.stop()
        self.stop_reading()

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

    def _reserve(self, size: int) -> None:
        """Hold ``size`` more body bytes against the budget, or refuse the request."""
        budget = self.budget
        if budget.held + size > budget.limit:
            raise _Reject(SERVER_BUSY)
        budget.held += size
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
            raise _long_chunk_extension()
        self.in_chunked_body = self.rare_path = True
        self.trailers_from = len(self.fields)  # trailer fields land after these: dropped
        self.chunk_wire = 0
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

    def _end_chunked(self) -> None:
        # The excess is not checked here (the slice being parsed may run past the end of this
        # message, and the excess cannot pass one slice: see on_chunk_header): the trailers are.
        self._check_fields(self.fields)
        self.in_chunked_body = False
        self.rare_path = self.closing

    def _check_version(self) -> None:
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _bad_framing(f"unsupported HTTP version {version}")

    # -- the parser's callbacks (once per request, or per chunk of its body) ---------------

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
        # (the request's start for the counters: the same clock read)
        self.begun_at = now = monotonic()
        self.deadline = now + self.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > _MAX_TARGET:
            raise _Reject(error_response(414, "uri_too_long", "the request target is over 8 KB"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
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
            if size > self.max_body_bytes:
                raise _Reject(body_too_large(self.max_body_bytes))
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
            if expect is not None and expect.lower() == b"100-continue":
                self.send_continue()
        else:
            self.disarm()

    def on_chunk_header(self) -> None:
        # (Only chunked bodies get here.) No check here: the excess can only grow by the bytes
        # of the slice being parsed, so after one ended at or under 0 it cannot pass
        # _CHUNK_SLICE before the next slice's check in _feed_rare.
        self.chunk_count += 1

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.max_body_bytes:
            raise _Reject(body_too_large(self.max_body_bytes))
        if self.in_chunked_body:  # a chunked body has no length to reserve: count it as it grows
            self._reserve(len(body))
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        method = _METHODS.get(parser.get_method())
        # llhttp keeps alive HTTP/1.1 unless "Connection: close"; any other version only with
        # a Connection header: the version needs a look only then. A chunked message comes
        # here too, and so does an upgrade (it needs "Connection: upgrade", or is a CONNECT).
        if (
            not keep_alive
            or self.in_chunked_body
            or method is None
            or b"connection" in self.headers
        ):
            if self.in_chunked_body:
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
        self.deliver(
            Request(
                method,
                self.url.decode("latin-1"),
                self.headers,
                body[0] if len(body) == 1 else b"".join(body),
                self.peer,
                self.scheme,
                keep_alive,
                self.begun_at,
            )
        )
