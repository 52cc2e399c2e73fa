"""Wiring: one handler that routes each request to the CDN or the Tracking API service.

The app owns the two upstream pools (one per configured origin: nothing else can be reached),
the queue, the forwarder and every background task: :meth:`App.start` opens them,
:meth:`App.close` stops them in order (forwarder, then queue, then pools).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Coroutine
from typing import Any

from segproxy import __version__, native
from segproxy.cdn.service import CdnService
from segproxy.certs import not_after
from segproxy.clients import client_ip, host_allowed, public_origin
from segproxy.config import Config, Upstream
from segproxy.cors import FOR_CDN, for_api
from segproxy.counters import RequestCounters
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
)
from segproxy.exposition import render
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

# What the operator endpoints answer without the [admin] token.
_UNAUTHORIZED = (
    401,
    "unauthorized",
    "operator endpoints need Authorization: Bearer <[admin] token>",
)


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
        # The counters /metrics shows (counters.py): the edge's (both listeners share them),
        # the per-address rate limit's refusals here; the services and pools keep theirs.
        self.requests = RequestCounters()
        self.rate_limited = 0
        self.started = time.time()
        self.cert_expires = _cert_expiry(config.tls.cert) if config.tls.enabled else None
        self.dashboard: Dashboard | None = None
        if config.admin.dashboard_served:
            self.dashboard = Dashboard(
                config, self.snapshot, self._watch, self.authorized, self.unauthorized
            )

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
        req.route_class = route.route_class
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
        if kind is Kind.PROMETHEUS:
            if self.config.admin.listen is not None:
                return error_response(404, "not_found", "operator endpoints are not served here")
            return self.prometheus(req)
        ip: str | None = None
        if self.ip_limit is not None and req.method != "OPTIONS":
            ip = client_ip(req.peer, req.headers, cfg.trusted_proxies)
            wait = self.ip_limit.allow(client_bucket(ip), time.monotonic())
            # Exemptions are looked up only once a client is over its limit (cheaper).
            if wait is not None and not exempt(ip, self.exempt_ips):
                self.rate_limited += 1
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

    def authorized(self, req: Request) -> bool:
        """An operator endpoint's request carries the [admin] token, if one is set."""
        token = self.config.admin.token
        return not token or hmac.compare_digest(  # constant time: no timing oracle on it
            req.header(b"authorization") or b"", b"Bearer " + token.encode()
        )

    def unauthorized(self) -> Response:
        return error_response(*_UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])

    def readiness(self, req: Request) -> Response:
        if not self.authorized(req):
            return self.unauthorized()
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
        kind = route.kind
        if kind is Kind.DASHBOARD and self.dashboard is not None:
            req.route_class = route.route_class
            return self.dashboard.handle(req, route.upstream_path)
        if kind is Kind.HEALTHZ or kind is Kind.READYZ or kind is Kind.PROMETHEUS:
            req.route_class = route.route_class  # (anything else here is "rejected")
        if kind is Kind.HEALTHZ:
            return json_response(200, {"status": "ok"})
        if kind is Kind.READYZ:
            return self.readiness(req)
        if kind is Kind.PROMETHEUS:
            return self.prometheus(req)
        return error_response(404, "not_found", "this listener serves operator endpoints only")

    def prometheus(self, req: Request) -> Response | Coroutine[Any, Any, Response]:
        """GET /metrics: every counter and gauge in Prometheus's text format (or OpenMetrics,
        if the scraper asks for it), rendered now."""
        if not self.authorized(req):
            return self.unauthorized()
        return self._scrape(req.header(b"accept"))

    async def _scrape(self, accept: bytes | None) -> Response:
        body, content_type = render(await self.snapshot(), (accept or b"").decode("latin-1"))
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
        return Response(200, headers, body)

    async def snapshot(self) -> dict[str, Any]:
        """Every number /metrics shows, as plain Python values (ints, floats, dicts keyed by
        label value), read now; the dashboard feeds on it too. The keys are stable."""
        now = time.time()
        f = self.forwarder.counters if self.forwarder is not None else None
        return {
            "time": now,
            "uptime_seconds": now - self.started,
            "version": __version__,
            "native": native.compiled(),
            "ready": self.ready,
            "requests": self.requests.read(),
            "request_duration_seconds": self.requests.read_latency(),
            "connections_refused": self.requests.connections_refused,
            "rate_limited": {"ip": self.rate_limited, "write_key": self.ingest.rate_limited},
            "events": {
                "accepted": self.ingest.events_accepted,
                "forwarded": f.events_sent if f is not None else 0,
                "retried": f.events_retried if f is not None else 0,
                "dead": f.events_dead if f is not None else 0,
            },
            "queue": await self._queue_gauges(now),
            "upstream": {
                "cdn": self.cdn_pool.counters.read(),
                "api": self.api_pool.counters.read(),
            },
            "cdn_cache": {"hit": self.cdn.hits, "miss": self.cdn.misses, "stale": self.cdn.stale},
            "tls_cert_expiry_seconds": (
                None if self.cert_expires is None else self.cert_expires - now
            ),
        }

    async def _queue_gauges(self, now: float) -> dict[str, Any] | None:
        """None without a queue (passthrough)."""
        queue = self.queue
        if queue is None:
            return None
        events, size = queue.depth()
        oldest = await queue.oldest()
        q = self.config.queue
        return {
            "events": events,
            "bytes": size,
            "oldest_age_seconds": 0.0 if oldest is None else max(0.0, now - oldest),
            "max_events": q.max_rows,
            "max_bytes": q.max_bytes,
        }

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


def _cert_expiry(path: str) -> float | None:
    """The configured certificate's notAfter (unix seconds), read once at start."""
    try:
        with open(path, "rb") as f:
            return not_after(f.read())
    except OSError:
        return None
