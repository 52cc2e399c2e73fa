"""The HTTP/1.1 edge: an asyncio Protocol around the framing core, nothing more.

``HttpProtocol`` owns a connection's I/O: it feeds each read to its :class:`Framing`
(``edge/framing.py``: httptools, the limits, the memory budget's accounting, the phase of the
request being read and the keep-alive, upgrade and closing decisions), answers the requests the
core delivers with one async handler, and keeps the timers' firing and flow control. Responses
on a connection are written in request order (pipelining), one request handled at a time per
connection.

Timers, one per connection, whichever applies (the core sets the deadline of the phase it
enters; the server's sweeper fires it):
  idle    - from connection start or the last response until the first byte of a request
  header  - from the first byte of a request until its headers are complete (slowloris)
  body    - from the end of the headers until the body is complete (slow bodies)
A connection past its timer is answered 408 (if mid-request) and closed.

Errors: a request the parser rejects, or one over a limit, gets a JSON 4xx and the connection is
closed after the responses already queued on it, since the framing can no longer be trusted.

Connections: past ``limits.max_connections`` open ones, a new connection is answered 503 and
closed at once.

Memory budget (``limits.max_buffered_bytes``): ``EdgeServer.budget`` counts the request-body
bytes held across all connections (see ``edge/framing.py`` for its invariant). A request's bytes
leave it when it is handed to the handler (``_serve``: a pipelined request waiting its turn
still holds them), and whatever a connection still holds leaves when it closes
(``connection_lost``: every end of a connection goes through it, whether timeout, reset,
refusal or error).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from email.utils import formatdate
from time import monotonic
from typing import Any, cast

from segproxy.config import LimitsConfig
from segproxy.counters import RequestCounters
from segproxy.edge.framing import Budget, Framing
from segproxy.edge.http import (
    SECURITY_HEADERS,
    TOO_MANY_CONNECTIONS,
    Deferred,
    Request,
    Response,
    Stream,
    error_response,
    reason,
)
from segproxy.edge.stream import Pump
from segproxy.redact import redact_path

log = logging.getLogger("segproxy.edge")

# A handler answers at once (Response), later (a Deferred resolved by its producer), or
# returns a coroutine that is run as a task (whose result may be a Stream: the dashboard's).
Handler = Callable[[Request], Response | Deferred | Coroutine[Any, Any, Response | Stream]]
# Told of every answer to a request (the access log): the request, its answer, and the seconds
# from its first byte to the answer.
Answered = Callable[[Request, Response, float], None]

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


# Over limits.max_connections: written at accept, whole but for the Date line (built once).
_REFUSED_LINE = _status_line(TOO_MANY_CONNECTIONS.status)
_REFUSED_REST = _head(TOO_MANY_CONNECTIONS, keep_alive=False) + TOO_MANY_CONNECTIONS.body

# How _serve left a request: answered (go on / the connection closes) or answered later.
_NEXT = object()
_STOP = object()
_PENDING = object()


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.handler = server.handler
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        # The framing core: its callbacks bound once per connection, not per request.
        self.framing = Framing(
            server.limits, server.budget, self._received, self._send_continue, self._stop_reading
        )
        # queued complete requests (or a final rejection) in arrival order
        self.pipeline: deque[Request | Response] = deque()
        self.max_pipelined = server.limits.max_pipelined
        self.busy = False
        self.reading_paused = False
        self.eof = False
        self.current: asyncio.Task[Response | Stream] | None = None
        self.streaming: Pump | None = None  # a Stream's body, once one is answered
        self.waiting_on: Request | None = None
        self._on_resolved = self._resolved  # bound once, not per request
        self.idle_timeout = server.limits.idle_timeout
        self.counters = server.counters
        self.on_answer = server.on_answer
        # When the last answer was written (monotonic): the request's end for the counters,
        # and where the idle timer starts from (one clock read for both).
        self.answered_at = 0.0

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= self.limits.max_connections:
            self._refuse()
            return
        peer = transport.get_extra_info("peername")
        self.peer = self.framing.peer = peer[0] if isinstance(peer, tuple) else "unix"
        if transport.get_extra_info("sslcontext") is not None:
            self.framing.scheme = "https"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.server.connections.add(self)
        self.framing.arm("idle", self.idle_timeout)

    def _refuse(self) -> None:
        """Over ``limits.max_connections``: answer 503 and close, reading nothing."""
        self.framing.stop()
        transport = self.transport
        assert transport is not None
        transport.write(_REFUSED_LINE + _DATE.get() + _REFUSED_REST)
        transport.close()
        self.counters.connections_refused += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.streaming is not None:
            self.streaming.stop()
        framing = self.framing
        framing.release(framing.reserved)  # whatever it still held, however it ended
        framing.stop()
        framing.disarm()
        self.transport = None

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests until it does.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.reading_paused and not self.framing.closing:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what we have, then close (see _next).
        self.eof = True
        if not self.busy and not self.pipeline:
            self._close()
        return True

    # -- timers ---------------------------------------------------------------------------

    def _timeout(self) -> None:
        framing = self.framing
        phase = framing.timer_phase
        framing.disarm()
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

    # -- reading (the framing core parses; see edge/framing.py) ----------------------------

    def data_received(self, data: bytes) -> None:
        error = self.framing.feed(data)
        if error is not None:
            self._queue_final(error)

    def _received(self, req: Request) -> None:
        """A complete request from the framing core, in arrival order (inside its read)."""
        if self.busy or self.pipeline:  # answering an earlier request: wait in line
            self.pipeline.append(req)
            if len(self.pipeline) >= self.max_pipelined and self.transport is not None:
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

    def _send_continue(self) -> None:
        # 100 Continue is only safe to interleave when nothing is being answered ahead.
        if not self.pipeline and not self.busy and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _stop_reading(self) -> None:
        if self.transport is not None and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True

    # -- answering ------------------------------------------------------------------------

    def _queue_final(self, response: Response) -> None:
        """Answer ``response`` after what is queued, then close; read nothing more."""
        self.framing.stop()
        self.framing.disarm()
        self._stop_reading()
        self.pipeline.append(response)
        self._start_answering_queue()

    def _start_answering_queue(self) -> None:
        """Answer the queue now, unless an answer in progress will go on to it when done."""
        if not self.busy:
            self.busy = True
            self._next()

    def _next(self) -> None:
        """Answer queued requests in order; stop at the first one that is not ready yet."""
        while self.pipeline:
            if self.transport is None:
                break
            item = self.pipeline.popleft()
            if isinstance(item, Response):  # the edge's refusal: the connection ends with it
                self.counters.refused(item.status)
                self._write(item, "GET", keep_alive=False)
                break
            if self.reading_paused and not self.framing.closing:
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
        elif (
            self.transport is not None and not self.framing.closing and not self.framing.in_message
        ):
            # (only ever after an answer was written: answered_at is that answer's time)
            self.framing.arm_from(self.answered_at, "idle", self.idle_timeout)

    def _serve(self, item: Request) -> object:
        """Run the handler for one request: answered (_NEXT or _STOP) or _PENDING."""
        size = len(item.body)  # handed over: its bytes leave the budget
        self.framing.release(size)
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

    def _done(self, item: Request, pending: asyncio.Task[Response | Stream]) -> None:
        self.current = None
        response: Response | Stream
        try:
            response = pending.result()
        except asyncio.CancelledError:
            response = error_response(503, "shutting_down", "the server is stopping; retry")
        except Exception:
            log.exception("handler failed for %s %s", item.method, redact_path(item.target))
            response = error_response(500, "internal_error", "internal error")
        if isinstance(response, Stream):
            self._stream(item, response)
            return
        if self._answer(item, response):
            self._next()
        else:
            self.busy = False

    def _answer(self, item: Request, response: Response) -> bool:
        """Write the response; True if the connection stays open for the next request.
        Counted (and logged, with an access log) even if the client has gone meanwhile."""
        self._count(item, response)
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

    def _count(self, item: Request, response: Response) -> None:
        """One answer for the counters and the access log; now is the request's end."""
        self.answered_at = now = monotonic()
        seconds = now - item.start
        self.counters.answered(item.route_class, response.status, seconds)
        if self.on_answer is not None:
            self.on_answer(item, response, seconds)

    def _stream(self, item: Request, stream: Stream) -> None:
        """Write a Stream's head, then its body as its producer writes it (edge/stream.py);
        the body ends with the connection. Counted (and logged) as answered with its head: its
        duration is the time to its first byte, not how long an operator watched."""
        self._count(item, Response(stream.status, stream.headers))
        transport = self.transport
        if transport is None:
            return
        self.framing.stop()
        self.framing.disarm()
        self._stop_reading()
        self.pipeline.clear()
        parts = [_status_line(stream.status), _DATE.get(), _SECURITY]
        parts.extend(k + b": " + v + b"\r\n" for k, v in stream.headers)
        parts.append(b"connection: close\r\n\r\n")
        transport.write(b"".join(parts))
        self.streaming = Pump(transport, self.server, self._close)
        self.streaming.start(self.loop, stream)

    def _close(self) -> None:
        self.framing.stop()
        self.framing.disarm()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server is stopping: close now if idle, else after the current response (a stream
        ends now: it has no end of its own)."""
        if self.streaming is not None:
            self.streaming.stop()
        elif not self.busy and not self.pipeline:
            self._close()


class EdgeServer:
    """Owns the listening socket and every live connection."""

    def __init__(
        self,
        handler: Handler,
        limits: LimitsConfig,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None = None,
        counters: RequestCounters | None = None,
        on_answer: Answered | None = None,
    ) -> None:
        self.handler = handler
        # The app's counters (shared by its listeners), or this server's own.
        self.counters = counters if counters is not None else RequestCounters()
        self.on_answer = on_answer
        self.limits = limits
        self.loop = loop
        self.ssl_context = ssl_context
        self.connections: set[HttpProtocol] = set()
        # request-body bytes held by all connections (see edge/framing.py)
        self.budget = Budget(limits.max_buffered_bytes)
        self.shutting_down = False
        self._server: asyncio.base_events.Server | None = None
        shortest = min(limits.header_timeout, limits.body_timeout, limits.idle_timeout)
        self.sweep_interval = min(max(shortest / 4, 0.05), 0.5)
        self._sweeper: asyncio.TimerHandle | None = None

    def _sweep(self) -> None:
        """Fire the timeout of every connection past its deadline; runs every sweep_interval."""
        now = monotonic()
        for conn in [c for c in self.connections if 0.0 < c.framing.deadline <= now]:
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
