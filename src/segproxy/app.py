"""Wiring: one handler that routes each request to the CDN or the Tracking API service.

The app owns the two upstream pools (one per configured origin: nothing else can be reached)
and every background task; :meth:`App.close` releases them.
"""

from __future__ import annotations

import logging

from segproxy import __version__
from segproxy.cdn.service import CdnService
from segproxy.config import Config
from segproxy.edge.forwarded import client_ip, host_allowed, public_origin
from segproxy.edge.http import Request, Response, error_response, json_response
from segproxy.ingest.service import IngestService
from segproxy.routes import CDN_KINDS, Kind, Reject, match
from segproxy.upstream import UpstreamPool

log = logging.getLogger("segproxy")


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        up = config.upstream
        agent = f"segproxy/{__version__}".encode()
        self.cdn_pool = UpstreamPool(
            up.cdn,
            connect_timeout=up.connect_timeout,
            timeout=up.timeout,
            max_connections=up.max_connections,
            user_agent=agent,
        )
        self.api_pool = UpstreamPool(
            up.api,
            connect_timeout=up.connect_timeout,
            timeout=up.timeout,
            max_connections=up.max_connections,
            user_agent=agent,
        )
        self.cdn = CdnService(config, self.cdn_pool)
        self.ingest = IngestService(config, self.api_pool)
        self.ready = False

    async def __call__(self, req: Request) -> Response:
        cfg = self.config
        route = match(req.method, req.target, cfg.prefix)
        if isinstance(route, Reject):
            extra = [(b"allow", route.allow.encode())] if route.allow else None
            return error_response(route.status, route.code, route.message, extra)
        kind = route.kind
        if kind is Kind.HEALTHZ:
            return json_response(200, {"status": "ok"})
        if kind is Kind.READYZ:
            if self.ready:
                return json_response(200, {"status": "ready"})
            return json_response(503, {"status": "not ready"})
        origin = None
        if kind is Kind.SETTINGS or cfg.public_hosts:
            origin = public_origin(
                req.peer,
                req.scheme,
                req.header(b"host"),
                req.header(b"x-forwarded-host"),
                req.header(b"x-forwarded-proto"),
                cfg.trusted_proxies,
            )
            if cfg.public_hosts and (origin is None or not host_allowed(origin, cfg.public_hosts)):
                return error_response(
                    421, "unknown_host", "this host name is not served here (see public_hosts)"
                )
        if kind in CDN_KINDS:
            return await self.cdn.handle(req, route, origin)
        ip = client_ip(req.peer, req.header(b"x-forwarded-for"), cfg.trusted_proxies)
        return await self.ingest.handle(req, route, ip)

    async def close(self) -> None:
        self.ready = False
        await self.cdn.close()
        await self.cdn_pool.close()
        await self.api_pool.close()
