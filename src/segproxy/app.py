"""Wiring: one handler that routes each request to the CDN or the Tracking API service.

The app owns the two upstream pools (one per configured origin: nothing else can be reached),
the queue, the forwarder and every background task: :meth:`App.start` opens them,
:meth:`App.close` stops them in order (forwarder, then queue, then pools).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from segproxy import __version__
from segproxy.cdn.service import CdnService
from segproxy.clients import client_ip, host_allowed, public_origin
from segproxy.config import Config, Upstream
from segproxy.cors import FOR_CDN, for_api
from segproxy.dashboard.feed import Feed
from segproxy.dashboard.service import Dashboard
from segproxy.edge.http import (
    Deferred,
    Request,
    Response,
    Stream,
    error_response,
    json_response,
    rate_limited,
    unauthorized,
)
from segproxy.forward.forwarder import Forwarder
from segproxy.ingest.service import IngestService
from segproxy.queue import open_queue
from segproxy.queue.base import Queue
from segproxy.ratelimit import client_bucket, exempt, table
from segproxy.routes import CDN_KINDS, Kind, Reject, match
from segproxy.upstream import UpstreamPool

log = logging.getLogger("segproxy")

_TRACK = Kind.TRACK  # (an Enum member looked up on its class costs a descriptor call)
_METRICS = Kind.METRICS


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cdn_pool = self._pool(config.upstream.cdn)
        self.api_pool = self._pool(config.upstream.api)
        self.cdn = CdnService(config, self.cdn_pool)
        self.ingest = IngestService(config, self.api_pool)
        self.queue: Queue | None = None
        self.forwarder: Forwarder | None = None
        self._recount: asyncio.Task[None] | None = None
        self.ready = False
        rl = config.rate_limit
        # None when off: the hot path then pays one check and nothing else.
        self.ip_limit = table(rl.per_ip, rl.per_ip_burst, rl.max_tracked)
        self.exempt_ips = rl.exempt_ips
        # The Tracking API needs no per-address work: no rate limit, no public_hosts check.
        self.plain_api = self.ip_limit is None and not config.public_hosts
        self.dashboard: Dashboard | None = None
        if config.admin.dashboard_served:
            self.dashboard = Dashboard(config, self.numbers, self._watch)

    def _pool(self, origin: Upstream) -> UpstreamPool:
        up = self.config.upstream
        return UpstreamPool(
            origin,
            connect_timeout=up.connect_timeout,
            timeout=up.timeout,
            max_connections=up.max_connections,
            user_agent=f"segproxy/{__version__}".encode(),
        )

    async def start(self) -> None:
        self.queue = await open_queue(self.config, on_commit=self._committed)
        if self.queue is not None:
            self.forwarder = Forwarder(self.queue, self.api_pool, self.config.forward)
            self.ingest.queue = self.queue
            self.forwarder.start()
            self._recount = asyncio.get_running_loop().create_task(self._recount_loop())
            if self.dashboard is not None:
                self.dashboard.queue_stats = self.queue.stats
                self.dashboard.replayed = self._replayed
        self.ready = True

    def numbers(self) -> dict[str, Any]:
        """The proxy's counters as plain values, for the dashboard."""
        out: dict[str, Any] = {"ready": self.ready, "queue_backend": self.config.queue.backend}
        if self.forwarder is not None:
            c = self.forwarder.counters
            out["forward"] = {
                "requests": c.requests,
                "events_sent": c.events_sent,
                "events_retried": c.events_retried,
                "events_dead": c.events_dead,
                "failures": c.failures,
                "splits": c.splits,
            }
        return out

    def _watch(self, feed: Feed | None) -> None:
        """A dashboard opened (record events into ``feed``) or the last one closed (None)."""
        self.ingest.watch = None if feed is None else feed.record
        if self.forwarder is not None:
            self.forwarder.watch = None if feed is None else feed.mark

    async def _replayed(self, rows: int) -> None:
        """Dead letters were put back in the queue file (the dashboard's replay): the queue
        re-reads it, the forwarder wakes."""
        if self.queue is not None:
            await self.queue.recount()
        self._committed(rows)

    def _committed(self, rows: int) -> None:
        """The queue's commit hook (given when it is made, before the forwarder that reads
        it can be): ``rows`` were committed, the forwarder wakes. Once per commit."""
        forwarder = self.forwarder
        if forwarder is not None:
            forwarder.notify(rows)

    async def _recount_loop(self) -> None:
        # The CLI may replay or purge rows in the file meanwhile; keep the caps' counters true.
        assert self.queue is not None
        while True:
            await asyncio.sleep(10)
            await self.queue.recount()

    def __call__(
        self, req: Request
    ) -> Response | Deferred | Coroutine[Any, Any, Response | Stream]:
        cfg = self.config
        route = match(req.method, req.target, cfg.prefix)
        if isinstance(route, Reject):
            extra = [(b"allow", route.allow.encode())] if route.allow else None
            return error_response(route.status, route.code, route.message, extra)
        kind = route.kind
        if (kind is _TRACK or kind is _METRICS) and self.plain_api:  # the hot path
            trusted = cfg.trusted_proxies
            if not trusted:
                return self.ingest.handle(req, route, req.peer)
            return self.ingest.handle(req, route, client_ip(req.peer, req.headers, trusted))
        if kind is Kind.HEALTHZ:
            return json_response(200, {"status": "ok"})
        if kind is Kind.READYZ:
            if self.config.admin.listen is not None:  # served on the admin listener only
                return error_response(404, "not_found", "operator endpoints are not served here")
            return self.readiness(req)
        if kind is Kind.DASHBOARD:
            if self.dashboard is None or not self.config.admin.dashboard_public:
                return error_response(404, "not_found", "the dashboard is not served here")
            return self.dashboard.handle(req, route.upstream_path)
        ip: str | None = None
        if self.ip_limit is not None and req.method != "OPTIONS":
            ip = client_ip(req.peer, req.headers, cfg.trusted_proxies)
            wait = self.ip_limit.allow(client_bucket(ip), time.monotonic())
            # Exemptions are looked up only once a client is over its limit (cheaper).
            if wait is not None and not exempt(ip, self.exempt_ips):
                if kind in CDN_KINDS:
                    return rate_limited(wait, "from this address", FOR_CDN)
                return rate_limited(wait, "from this address", for_api(req.header(b"origin")))
        origin = None
        if kind is Kind.SETTINGS or cfg.public_hosts:
            origin = public_origin(req.peer, req.scheme, req.headers, cfg.trusted_proxies)
            if cfg.public_hosts and (origin is None or not host_allowed(origin, cfg.public_hosts)):
                return error_response(
                    421, "unknown_host", "this host name is not served here (see public_hosts)"
                )
        if kind in CDN_KINDS:
            return self.cdn.handle(req, route, origin)
        if ip is None:
            ip = client_ip(req.peer, req.headers, cfg.trusted_proxies)
        return self.ingest.handle(req, route, ip)

    def readiness(self, req: Request) -> Response:
        refused = unauthorized(req, self.config.admin.token)
        if refused is not None:
            return refused
        if not self.ready:
            return json_response(503, {"status": "not ready"})
        if self.queue is not None and not self.queue.has_room():
            return json_response(503, {"status": "queue full"})
        return json_response(200, {"status": "ready"})

    def admin(self, req: Request) -> Response | Coroutine[Any, Any, Response | Stream]:
        """The handler of the separate operator listener (``[admin] listen``)."""
        route = match(req.method, req.target, "")
        if isinstance(route, Reject):
            return error_response(route.status, route.code, route.message)
        if route.kind is Kind.HEALTHZ:
            return json_response(200, {"status": "ok"})
        if route.kind is Kind.READYZ:
            return self.readiness(req)
        if route.kind is Kind.DASHBOARD and self.dashboard is not None:
            return self.dashboard.handle(req, route.upstream_path)
        return error_response(404, "not_found", "this listener serves operator endpoints only")

    async def close(self, grace: float = 10.0) -> None:
        """Call after the edge stopped answering: nothing new reaches the queue."""
        self.ready = False
        if self._recount is not None:
            self._recount.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recount
        if self.forwarder is not None:
            await self.forwarder.stop(grace)
        if self.queue is not None:
            await self.queue.close()
        await self.cdn.close()
        await self.cdn_pool.close()
        await self.api_pool.close()
