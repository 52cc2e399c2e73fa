"""A small keep-alive HTTP/1.1 client for exactly one configured upstream origin.

Why hand-written: on the ingest path, general-purpose HTTP frameworks cost 3-6x a lean asyncio
Protocol (docs/architecture.md, "Why a hand-written edge"), and passthrough ingest sends every
request through this client. Why safe: a pool is bound to one
:class:`~segproxy.config.Upstream` at construction; callers give only a path, and the ``Host``
header is always the upstream's own (forwarding a visitor's Host is the classic 403 from
Segment's CDN).

Errors (all :class:`UpstreamError`, ``kind`` says which)::

    UpstreamError
      kind="connect"   could not open a connection (refused, DNS, TLS)
      kind="timeout"   no complete response within the timeout
      kind="protocol"  the upstream closed early or sent something unparseable

A request that fails on a *reused* keep-alive connection before any response byte arrived is
retried once on a fresh connection (the upstream closed an idle connection under us); every
Segment event carries a messageId, so a rare duplicate is de-duplicated by Segment.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

import httptools

from segproxy.config import Upstream
from segproxy.counters import UpstreamCounters
from segproxy.memo import Memo

log = logging.getLogger("segproxy.upstream")

IDLE_SECONDS = 20.0  # drop pooled connections idle longer than this (upstreams close at ~60 s)


class UpstreamError(Exception):
    def __init__(self, kind: Literal["connect", "timeout", "protocol"], detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


Done = Callable[[UpstreamResponse | None, UpstreamError | None], None]


_JOIN_MAX = 64 * 1024  # a request body up to this size is sent joined to its head

# The most of an answer held: its headers, then its body. Segment's largest file is under a
# megabyte and its API answers a few bytes; an origin that sends more (misconfigured, or a
# chunked body that never ends) is cut off and the exchange fails, rather than growing memory
# until the process dies (docs/threat-model.md, "Upstreams").
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_BODY = 32 * 1024 * 1024


class _CutOff(Exception):
    """Raised from a parser callback to stop reading an answer over its bound."""


class _Exchange:
    """One request in flight: what to send, whom to tell (once), and whether it was retried."""

    __slots__ = ("attempt", "done", "payload")

    def __init__(self, payload: tuple[bytes, bytes], done: Done) -> None:
        self.payload = payload
        self.done: Done | None = done
        self.attempt = 0

    def tell(self, resp: UpstreamResponse | None, exc: UpstreamError | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(resp, exc)


class _Conn(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.status = 0
        self.size = 0  # bytes of the answer's headers, then of its body, read so far
        self.cut: UpstreamError | None = None  # why the answer was cut off, if it was
        self.got_bytes = False
        self.headers_done = False
        self.keep_alive = True
        self.closed = False
        self.last_used = 0.0
        self.reused = False
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.pool._forget(self)
        if self.exchange is None:
            return
        if (
            exc is None
            and self.headers_done
            and b"content-length" not in self.headers
            and not self._chunked()
        ):
            # Body delimited by close (HTTP/1.0 style): an orderly close ends it. A reset (exc)
            # cut it short: a failure, never a body (a partial script would be cached).
            self._finish(UpstreamResponse(self.status, self.headers, b"".join(self.body)), None)
        else:
            self._finish(
                None, UpstreamError("protocol", "connection closed before the response completed")
            )

    def _chunked(self) -> bool:
        return b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(self.cut or UpstreamError("protocol", f"unparseable response: {exc}"))

    def _cut_off(self, what: str, limit: int) -> None:
        self.cut = UpstreamError(
            "protocol", f"the answer's {what} passed {limit} bytes: cut off, not used"
        )
        raise _CutOff(what)

    def _fail(self, exc: UpstreamError) -> None:
        self.close()
        self._finish(None, exc)

    def _finish(self, resp: UpstreamResponse | None, exc: UpstreamError | None) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            self.pool._complete(self, exchange, resp, exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value)
        if self.size > MAX_RESPONSE_HEAD:
            self._cut_off("headers", MAX_RESPONSE_HEAD)
        key = name.lower()
        old = self.headers.get(key)
        self.headers[key] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self.size = 0

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_RESPONSE_BODY:
            self._cut_off("body", MAX_RESPONSE_BODY)
        self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim response: wait for the real one
            self.headers = {}
            self.body = []
            self.headers_done = False
            self.size = 0
            return
        self.keep_alive = bool(self.parser.should_keep_alive())
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._finish(UpstreamResponse(self.status, self.headers, body), None)

    def start(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.headers = {}
        self.body = []
        self.status = 0
        self.size = 0
        self.cut = None
        self.got_bytes = False
        self.headers_done = False
        assert self.transport is not None
        head, body = exchange.payload
        if len(body) > _JOIN_MAX:  # one writev: a batch's body (500 KB) is not copied again
            self.transport.writelines(exchange.payload)
        else:  # a small one is cheaper copied once than written from two buffers
            self.transport.write(head + body if body else head)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Connections to one upstream origin, reused LIFO, at most ``max_connections`` open.

    ``send`` is callback-driven: with an idle connection at hand, a request costs no task and
    no coroutine (the hot path of passthrough ingest); only opening a connection runs a task.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 15.0,
        max_connections: int = 256,
        user_agent: bytes = b"segproxy",
    ) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.idle: deque[_Conn] = deque()
        self.max_connections = max_connections
        self.active = 0  # exchanges holding a connection slot
        self.backlog: deque[_Exchange] = deque()  # waiting for a slot
        self.busy: set[_Conn] = set()  # connections awaiting a response, checked by _sweep
        self.connecting: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if upstream.scheme == "https" else None
        )
        self.host_header = b"host: " + upstream.authority.encode("idna") + b"\r\n"
        self.user_agent = user_agent
        self._heads: Memo[tuple[object, ...], bytes] = Memo(1024)  # request line + headers
        self.closed = False
        self.counters = UpstreamCounters()  # read by /metrics

    def _forget(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def _sweep(self) -> None:
        """Time out requests past their deadline; runs while any request is in flight."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for conn in [c for c in self.busy if c.deadline <= now]:
            conn._fail(UpstreamError("timeout", f"no response from {self.upstream.origin} in time"))
        self._sweeper = loop.call_later(0.25, self._sweep) if self.busy else None

    def _take_idle(self, now: float) -> _Conn | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.last_used < IDLE_SECONDS:
                conn.reused = True
                return conn
            conn.close()
        return None

    def build(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[bytes, bytes]:
        """The request as (head, body), written together."""
        # The request line and headers repeat (one route, one write key's Authorization):
        # built once per combination, in a bounded table.
        key = (method, path, *headers)
        head = self._heads.get(key)
        if head is None:
            lines = [
                f"{method} {path} HTTP/1.1\r\n".encode(),
                self.host_header,
                b"user-agent: " + self.user_agent + b"\r\n",
            ]
            lines += [k + b": " + v + b"\r\n" for k, v in headers]
            head = self._heads.put(key, b"".join(lines))
        if body or method in ("POST", "PUT", "PATCH"):
            length = str(len(body)).encode()
            return b"".join((head, b"content-length: ", length, b"\r\n\r\n")), body
        return head + b"\r\n", b""

    def send_then(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        done: Done,
    ) -> None:
        """Send one request; ``done(response, None)`` or ``done(None, error)`` is called once,
        synchronously from the loop callback that completes it (no future, no extra hop).

        ``path`` must already be validated (it is not checked here).
        """
        if self.closed:
            done(None, UpstreamError("connect", "the upstream pool is closed"))
            return
        exchange = _Exchange(self.build(method, path, headers, body), done)
        if self.active >= self.max_connections:
            self.backlog.append(exchange)
        else:
            self.active += 1
            self._dispatch(exchange)

    def send(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> asyncio.Future[UpstreamResponse]:
        """``send_then`` as a future (for callers that await)."""
        future: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()

        def done(resp: UpstreamResponse | None, exc: UpstreamError | None) -> None:
            if future.done():
                return
            if resp is not None:
                future.set_result(resp)
            else:
                future.set_exception(exc or UpstreamError("protocol", "no response"))

        self.send_then(method, path, headers or [], body, done)
        return future

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> UpstreamResponse:
        return await self.send(method, path, headers, body)

    def _dispatch(self, exchange: _Exchange) -> None:
        """Run ``exchange`` on an idle connection, or open one (the slot is already held)."""
        conn = self._take_idle(time.monotonic())
        if conn is not None:
            self._start(conn, exchange)
            return
        task = asyncio.get_running_loop().create_task(self._connect_then_start(exchange))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect_then_start(self, exchange: _Exchange) -> None:
        try:
            conn = await self._connect()
        except UpstreamError as exc:
            self._release()
            self.counters.failed(exc.kind)
            exchange.tell(None, exc)
            return
        except BaseException:
            self._release()
            exchange.tell(None, UpstreamError("connect", "cancelled while connecting"))
            raise
        self._start(conn, exchange)

    def _start(self, conn: _Conn, exchange: _Exchange) -> None:
        conn.deadline = time.monotonic() + self.timeout
        self.busy.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(0.25, self._sweep)
        conn.start(exchange)

    def _complete(
        self,
        conn: _Conn,
        exchange: _Exchange,
        resp: UpstreamResponse | None,
        exc: UpstreamError | None,
    ) -> None:
        self.busy.discard(conn)
        if exc is not None or resp is None:
            conn.close()
            err = exc or UpstreamError("protocol", "no response")
            if (
                exchange.attempt == 0
                and conn.reused
                and not conn.got_bytes
                and err.kind != "timeout"
                and not self.closed
            ):
                exchange.attempt = 1  # the upstream had closed this idle connection: retry once
                self._dispatch(exchange)
                return
            self._release()
            self.counters.failed(err.kind)
            exchange.tell(None, err)
            return
        now = time.monotonic()
        # (the deadline _start set is the request's start plus the timeout: no second read)
        self.counters.answered(resp.status, now - (conn.deadline - self.timeout))
        if conn.keep_alive and not conn.closed and not self.closed:
            conn.last_used = now
            self.idle.append(conn)
        else:
            conn.close()
        self._release()
        exchange.tell(resp, None)

    def _release(self) -> None:
        """Hand the slot to the next waiting exchange, or free it."""
        if self.backlog:
            self._dispatch(self.backlog.popleft())
            return
        self.active -= 1

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        up = self.upstream
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Conn(self),
                    up.host,
                    up.port,
                    ssl=self.ssl,
                    server_hostname=up.host if self.ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamError("connect", f"connecting to {up.origin} timed out") from exc
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to {up.origin}: {exc}") from exc
        return proto

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self.connecting):
            task.cancel()
        if self.connecting:
            await asyncio.gather(*self.connecting, return_exceptions=True)
        while self.backlog:
            self.backlog.popleft().tell(None, UpstreamError("connect", "the pool is closed"))
        for conn in list(self.busy):  # in flight: their callers get an error, not a hang
            conn._fail(UpstreamError("connect", "the upstream pool is closed"))
        while self.idle:
            self.idle.pop().close()
