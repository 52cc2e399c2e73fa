"""A small keep-alive HTTP/1.1 client for exactly one configured upstream origin.

Why hand-written: DESIGN.md measured general clients at 3-6x the cost of a lean asyncio
Protocol on this path. Why safe: a pool is bound to one :class:`~segproxy.config.Upstream` at
construction; callers give only a path, and the ``Host`` header is always the upstream's own
(forwarding a visitor's Host is the classic 403 from Segment's CDN).

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
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, cast

import httptools

from segproxy.config import Upstream

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


class _Conn(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.status = 0
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
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.headers_done and b"content-length" not in self.headers and not self._chunked():
                # Body delimited by close (HTTP/1.0 style): what we have is the whole body.
                waiter.set_result(UpstreamResponse(self.status, self.headers, b"".join(self.body)))
            else:
                waiter.set_exception(
                    UpstreamError("protocol", "connection closed before the response completed")
                )

    def _chunked(self) -> bool:
        return b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"unparseable response: {exc}"))

    def _fail(self, exc: UpstreamError) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        old = self.headers.get(key)
        self.headers[key] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim response: wait for the real one
            self.headers = {}
            self.body = []
            self.headers_done = False
            return
        self.keep_alive = bool(self.parser.should_keep_alive())
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamResponse(self.status, self.headers, b"".join(self.body)))

    def start(self, payload: bytes, waiter: asyncio.Future[UpstreamResponse]) -> None:
        self.waiter = waiter
        self.headers = {}
        self.body = []
        self.status = 0
        self.got_bytes = False
        self.headers_done = False
        assert self.transport is not None
        self.transport.write(payload)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Connections to one upstream origin, reused LIFO, at most ``max_connections`` open."""

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
        self.active = 0  # requests holding a connection slot
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.busy: set[_Conn] = set()  # connections awaiting a response, checked by _sweep
        self._sweeper: asyncio.TimerHandle | None = None
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if upstream.scheme == "https" else None
        )
        self.host_header = b"host: " + upstream.authority.encode("idna") + b"\r\n"
        self.user_agent = user_agent
        self.closed = False

    def _forget(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

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

    async def _acquire(self) -> None:
        if self.active < self.max_connections:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut  # the slot is handed over by _release, still counted in self.active
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release()  # we were handed a slot but will not use it
            else:
                self.waiters.remove(fut)
            raise

    def _release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1

    def _sweep(self) -> None:
        """Time out requests past their deadline; runs while any request is in flight."""
        loop = asyncio.get_running_loop()
        now = loop.time()
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
    ) -> bytes:
        parts = [
            method.encode() + b" " + path.encode() + b" HTTP/1.1\r\n",
            self.host_header,
            b"user-agent: " + self.user_agent + b"\r\n",
        ]
        for k, v in headers:
            parts.append(k + b": " + v + b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            parts.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        return b"".join(parts)

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> UpstreamResponse:
        """Send one request; ``path`` must already be validated (it is not checked here)."""
        if self.closed:
            raise UpstreamError("connect", "the upstream pool is closed")
        payload = self.build(method, path, headers or [], body)
        loop = asyncio.get_running_loop()
        await self._acquire()
        try:
            for attempt in (0, 1):
                conn = self._take_idle(loop.time())
                if conn is None:
                    conn = await self._connect()
                waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
                conn.deadline = loop.time() + self.timeout
                self.busy.add(conn)
                if self._sweeper is None:
                    self._sweeper = loop.call_later(0.25, self._sweep)
                conn.start(payload, waiter)
                try:
                    resp = await waiter
                except UpstreamError as exc:
                    conn.close()
                    if (
                        attempt == 0
                        and conn.reused
                        and not conn.got_bytes
                        and exc.kind != "timeout"
                    ):
                        continue  # the upstream had closed this idle connection: retry once
                    raise
                except BaseException:
                    conn.close()
                    raise
                finally:
                    self.busy.discard(conn)
                if conn.keep_alive and not conn.closed and not self.closed:
                    conn.last_used = loop.time()
                    conn.waiter = None
                    self.idle.append(conn)
                else:
                    conn.close()
                return resp
            raise AssertionError("unreachable")
        finally:
            self._release()

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self.idle:
            self.idle.pop().close()
