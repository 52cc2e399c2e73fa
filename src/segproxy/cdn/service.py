"""Serving Segment's CDN: cache first, one upstream fetch per path at a time.

Freshness of an entry of age A with time-to-live T:
  A < T                      fresh: served as is
  T <= A < T + swr           stale: served at once, refreshed in the background
  otherwise                  fetched now; if the CDN fails (network, 5xx) and
                             A < T + stale_if_error, the last good copy is served
A 4xx from the CDN (an unknown write key, say) is passed on, not cached, and evicts the entry.
A broken answer (a body cut short, gzip that fails its CRC) is a CDN failure like a 5xx: never
stored, the last good copy is served instead.

What visitors are told about a failure names what failed, never how: the CDN's address and the
errno go to the log only (issue 11, item 8).

Settings name the host the visitor used, so they are ``Cache-Control: private`` with a ``Vary``
on everything they are rendered from: a shared cache in front must not hand one visitor's
settings to another (issue 11, item 4). Renderings per origin are bounded (``OriginBook``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from segproxy.cdn.cache import (
    BrokenBody,
    Entry,
    LruBytes,
    Representation,
    body_etag,
    choose,
    compressible,
    gunzip_whole,
    make_representation,
    not_modified,
    render_etag,
)
from segproxy.cdn.rewrite import (
    RewriteError,
    SettingsTemplate,
    rewrite_script,
    settings_template,
)
from segproxy.clients import PublicOrigin
from segproxy.config import REGION_PRESETS, Config
from segproxy.cors import CDN_PREFLIGHT, FOR_CDN
from segproxy.edge.http import Headers, Request, Response, error_response
from segproxy.redact import mask, redact_path
from segproxy.routes import CDN_KINDS, Kind, Route
from segproxy.upstream import UpstreamError, UpstreamPool

log = logging.getLogger("segproxy.cdn")

MAX_UPSTREAM_BODY = 16 * 1024 * 1024
# A settings rendering up to this size is compressed on the loop (well under a millisecond);
# a larger one in a worker thread, one at a time, served uncompressed meanwhile.
LOOP_COMPRESS_MAX = 16 * 1024
GZIP_CODINGS = (b"gzip", b"x-gzip")
SEGMENT_API_HOSTS = frozenset(urlsplit(api).hostname or "" for _, api in REGION_PRESETS.values())


@dataclass(slots=True)
class _Failure:
    status: int
    code: str
    message: str
    cacheable_failure: bool  # True: the CDN is down/erroring, stale copies may be served


# What visitors are told (no address, no errno: those are logged).
UNREACHABLE = "the Segment CDN could not be reached"
TOO_SLOW = "the Segment CDN did not answer in time"
INVALID = "the Segment CDN sent an incomplete or invalid answer"


@dataclass(frozen=True, slots=True)
class _Prepared:
    raw: bytes
    rep: Representation
    template: SettingsTemplate | None
    not_rewritable: str | None  # why settings are served as they came


def _prepare(kind: Kind, body: bytes, encoding: bytes | None, ctype: bytes) -> _Prepared:
    """Decode and check a 200 body, then build what is served from it (in a worker thread:
    decoding and precompressing a ~400 KB script takes tens of milliseconds).

    Raises :class:`BrokenBody` for a body that must not be stored."""
    fixed: bytes | None = None
    if encoding is not None:
        if kind is Kind.INTEGRATION:
            if encoding in GZIP_CODINGS:
                gunzip_whole(body, MAX_UPSTREAM_BODY)  # checked whole; served as it came
            fixed = encoding  # byte-exact pass-through, e.g. *.js.gz
        elif encoding in GZIP_CODINGS:
            body = gunzip_whole(body, MAX_UPSTREAM_BODY)
        else:
            raise BrokenBody(f"unexpected content-encoding {encoding!r}")
    if kind is Kind.SETTINGS:
        try:
            template = settings_template(body)
        except RewriteError as exc:
            return _Prepared(body, make_representation(body, ctype), None, str(exc))
        # Only renderings are served: the raw settings need no compressed copies.
        return _Prepared(body, Representation(body, ctype, body_etag(body)), template, None)
    served = rewrite_script(body) if kind is Kind.SCRIPT else body
    return _Prepared(body, make_representation(served, ctype, fixed_encoding=fixed), None, None)


class CdnService:
    def __init__(self, config: Config, pool: UpstreamPool) -> None:
        self.config = config
        self.pool = pool
        cache = config.cache
        self.entries: LruBytes[str, Entry] = LruBytes(cache.max_bytes, 10_000)
        self.renders: LruBytes[tuple[str, int, str], Representation] = LruBytes(
            max(cache.max_bytes // 8, 1024 * 1024), 512
        )
        self.inflight: dict[str, asyncio.Future[Entry | _Failure]] = {}
        self.tasks: set[asyncio.Task[Entry | _Failure]] = set()
        self.generation = 0
        self.warned_hosts: set[str] = set()
        self.loop = asyncio.get_running_loop()
        self.cache_controls = {kind: self.cache_control(kind) for kind in CDN_KINDS}
        self.settings_vary = self.vary_of_settings()
        # Renderings being compressed in a worker thread (one at a time: see OriginBook).
        self.compressing: set[asyncio.Future[Representation]] = set()
        # How cached files were served (read by /metrics): fresh from the cache, fetched
        # (or refused: the fetch failed and nothing stale could stand in), or stale.
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def ttl(self, kind: Kind) -> float:
        c = self.config.cache
        return {
            Kind.SCRIPT: c.script_ttl,
            Kind.SETTINGS: c.settings_ttl,
            Kind.BUNDLE: c.bundle_ttl,
            Kind.INTEGRATION: c.integration_ttl,
        }[kind]

    def cache_control(self, kind: Kind) -> bytes:
        ttl = int(self.ttl(kind))
        if kind is Kind.BUNDLE:
            return f"public, max-age={ttl}, immutable".encode()
        if kind is Kind.SETTINGS:
            # Settings name the visitor's host: only the visitor's own cache may keep them.
            # Many shared caches ignore Vary, so it is said twice (private and Vary).
            return f"private, max-age={ttl}".encode()
        return f"public, max-age={ttl}".encode()

    def vary_of_settings(self) -> bytes:
        """What a rendering of the settings depends on: the host the visitor used, the
        forwarding headers when a trusted proxy may set them, and the coding."""
        names = ["Host"]
        if self.config.trusted_proxies:
            names += ["X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded"]
        names.append("Accept-Encoding")
        return ", ".join(names).encode()

    # -- fetching ---------------------------------------------------------------------------

    async def _fetch(self, route: Route) -> Entry | _Failure:
        kind = route.kind
        path = redact_path(route.upstream_path)
        headers: Headers = [(b"accept", b"*/*")]
        if kind is not Kind.INTEGRATION:
            headers.append((b"accept-encoding", b"gzip"))
        try:
            resp = await self.pool.request("GET", route.upstream_path, headers)
        except UpstreamError as exc:
            log.warning("CDN fetch %s failed: %s", path, exc)
            if exc.kind == "timeout":
                return _Failure(504, "cdn_unavailable", TOO_SLOW, True)
            if exc.kind == "protocol":  # it answered, but cut short or unparseable
                return _Failure(502, "cdn_invalid_answer", INVALID, True)
            return _Failure(502, "cdn_unavailable", UNREACHABLE, True)
        if resp.status >= 500:
            log.warning("CDN fetch %s answered %d", path, resp.status)
            return _Failure(502, "cdn_error", f"the Segment CDN answered {resp.status}", True)
        if resp.status != 200:
            return _Failure(
                resp.status if 400 <= resp.status < 500 else 502,
                "cdn_status",
                f"the Segment CDN answered {resp.status} for this path",
                False,
            )
        ctype = resp.header(b"content-type") or (
            b"application/json" if kind is Kind.SETTINGS else b"application/javascript"
        )
        encoding = (resp.header(b"content-encoding") or b"").strip().lower() or None
        try:
            prepared = await self.loop.run_in_executor(
                None, _prepare, kind, resp.body, encoding, ctype
            )
        except BrokenBody as broken:  # not `exc`: mypyc gives a name one type per function
            log.warning("CDN fetch %s: invalid body, not stored: %s", path, broken)
            return _Failure(502, "cdn_invalid_answer", INVALID, True)
        if prepared.not_rewritable is not None:
            log.warning(
                "settings for %s not rewritten: %s",
                mask(route.write_key or ""),
                prepared.not_rewritable,
            )
        if prepared.template is not None:
            self._check_region(route, prepared.template.upstream_api_host)
        self.generation += 1
        return Entry(
            prepared.raw,
            prepared.rep,
            self.loop.time(),
            self.ttl(kind),
            self.generation,
            prepared.template,
        )

    async def _fill(self, route: Route) -> Entry | _Failure:
        """One fetch per path at a time; concurrent callers share its result."""
        key = route.upstream_path
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = self.loop.create_future()
        self.inflight[key] = fut
        try:
            result = await self._fetch(route)
        except Exception:  # never leave waiters hanging; the details are for the log only
            log.exception("CDN fill of %s failed", redact_path(key))
            result = _Failure(502, "cdn_error", "the Segment CDN's answer could not be used", True)
        except BaseException:
            fut.cancel()
            raise
        finally:
            self.inflight.pop(key, None)
        if isinstance(result, Entry):
            self.entries.put(key, result, result.size)
        elif not result.cacheable_failure:
            self.entries.pop(key)
        fut.set_result(result)
        return result

    def _refresh_later(self, route: Route) -> None:
        if route.upstream_path in self.inflight:
            return
        task = self.loop.create_task(self._fill(route))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def lookup(self, route: Route) -> tuple[Entry | _Failure, bytes]:
        """The entry to serve and its cache status (HIT, STALE, MISS)."""
        now = self.loop.time()
        entry = self.entries.get(route.upstream_path)
        cfg = self.config.cache
        if entry is not None:
            age = now - entry.fetched_at
            if age < entry.ttl:
                return entry, b"HIT"
            if age < entry.ttl + cfg.stale_while_revalidate:
                self._refresh_later(route)
                return entry, b"STALE"
        result = await self._fill(route)
        if (
            isinstance(result, _Failure)
            and result.cacheable_failure
            and entry is not None
            and now - entry.fetched_at < entry.ttl + cfg.stale_if_error
        ):
            log.warning("serving stale %s: %s", redact_path(route.upstream_path), result.message)
            return entry, b"STALE"
        return result, b"MISS"

    # -- serving ----------------------------------------------------------------------------

    def _settings_rep(self, route: Route, entry: Entry, origin: PublicOrigin) -> Representation:
        """The settings as rendered for ``origin``: memoised, at most RENDER_ORIGINS per entry,
        compressed within the entry's budget (``OriginBook``), large ones off the loop."""
        template = entry.template
        if template is None:  # not a JSON object: served as it came (logged at the fill)
            return entry.rep
        memo_key = (route.upstream_path, entry.generation, origin.origin)
        book = entry.book
        rep = self.renders.get(memo_key)
        if rep is not None:
            book.touch(origin.origin)
            return rep
        api_host = f"{origin.host}{self.config.prefix}/v1"
        body = template.render(api_host, origin.scheme)
        ctype = entry.rep.content_type
        etag = render_etag(entry.rep.etag, api_host, origin.scheme)
        if not (book.may_compress() and compressible(body, ctype)):
            rep = Representation(body, ctype, etag)
        elif len(body) <= LOOP_COMPRESS_MAX:
            book.charge_compression()
            rep = make_representation(body, ctype, brotli_quality=5, etag=etag)
        else:
            rep = Representation(body, ctype, etag)  # served as is until compressed
            if self.compressing:  # one at a time; this origin may try again next time
                return rep
            book.charge_compression()
            self._compress_later(memo_key, rep)
        dropped = book.touch(origin.origin)
        if dropped is not None:
            self.renders.pop((route.upstream_path, entry.generation, dropped))
        self.renders.put(memo_key, rep, rep.size)
        return rep

    def _compress_later(self, memo_key: tuple[str, int, str], rep: Representation) -> None:
        """Compress a large rendering in a worker thread; it replaces the uncompressed one if
        that is still memoised then."""
        fut = self.loop.run_in_executor(
            None,
            lambda: make_representation(
                rep.body, rep.content_type, brotli_quality=5, etag=rep.etag
            ),
        )
        self.compressing.add(fut)

        def done(f: asyncio.Future[Representation]) -> None:
            self.compressing.discard(f)
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                log.warning("compressing settings failed: %r", exc)
                return
            if memo_key in self.renders:
                compressed = f.result()
                self.renders.put(memo_key, compressed, compressed.size)

        fut.add_done_callback(done)

    def _check_region(self, route: Route, upstream_api_host: str | None) -> None:
        if upstream_api_host is None:
            return
        named = upstream_api_host.split("/", 1)[0].lower()
        configured = self.config.upstream.api.host
        # Only a mismatch between two real Segment regions matters (since 2025-04 the US
        # endpoint rejects EU workspaces); a custom or test upstream is the operator's choice.
        if (
            named in SEGMENT_API_HOSTS
            and configured in SEGMENT_API_HOSTS
            and named != configured
            and named not in self.warned_hosts
        ):
            self.warned_hosts.add(named)
            log.warning(
                "settings of write key %s name API host %s but [upstream] api is %s: "
                "events may be rejected (set [upstream] region or api to match)",
                mask(route.write_key or ""),
                named,
                configured,
            )

    def handle(
        self, req: Request, route: Route, origin: PublicOrigin | None
    ) -> Response | Coroutine[Any, Any, Response]:
        """Fresh cache hits and refusals are answered at once; the rest after a fetch."""
        if req.method == "OPTIONS":
            return Response(204, list(CDN_PREFLIGHT))
        if route.kind is Kind.SETTINGS and origin is None:
            return error_response(
                400, "bad_host", "a valid Host header is needed to serve settings", FOR_CDN
            )
        keys = self.config.sources.write_keys
        if route.write_key is not None and keys and route.write_key not in keys:
            return error_response(
                403, "write_key_not_allowed", "this write key is not served here", FOR_CDN
            )
        entry = self.entries.get(route.upstream_path)
        if entry is not None and self.loop.time() - entry.fetched_at < entry.ttl:
            self.hits += 1
            return self._serve(req, route, origin, entry, b"HIT")
        return self._fetch_and_serve(req, route, origin)

    async def _fetch_and_serve(
        self, req: Request, route: Route, origin: PublicOrigin | None
    ) -> Response:
        result, status = await self.lookup(route)
        if status == b"HIT":
            self.hits += 1
        elif status == b"STALE":
            self.stale += 1
        else:
            self.misses += 1
        if isinstance(result, _Failure):
            headers = [*FOR_CDN, (b"cache-control", b"no-store")]
            if result.cacheable_failure:
                headers.append((b"retry-after", b"5"))
            return error_response(result.status, result.code, result.message, headers)
        return self._serve(req, route, origin, result, status)

    def _serve(
        self,
        req: Request,
        route: Route,
        origin: PublicOrigin | None,
        entry: Entry,
        status: bytes,
    ) -> Response:
        rep = entry.rep
        if route.kind is Kind.SETTINGS:
            assert origin is not None
            rep = self._settings_rep(route, entry, origin)
        body, encoding, etag = choose(rep, req.header(b"accept-encoding"))
        not_mod = not_modified(req.header(b"if-none-match"), rep)
        # The same representation answers alike every time: built once, kept on it (the
        # edge then keeps its header bytes too).
        key = (route.kind, status, encoding, not_mod)
        known = rep.answers.get(key)
        if known is not None:
            return known
        headers = [
            (b"content-type", rep.content_type),
            (b"cache-control", self.cache_controls[route.kind]),
            *FOR_CDN,
            (b"x-segproxy-cache", status),
        ]
        if route.kind is Kind.SETTINGS:
            headers.append((b"vary", self.settings_vary))
        elif rep.gzip is not None:
            headers.append((b"vary", b"Accept-Encoding"))
        headers.append((b"etag", f'"{etag}"'.encode()))
        if not_mod:
            answer = Response(304, headers)
        else:
            if encoding is not None:
                headers.append((b"content-encoding", encoding))
            answer = Response(200, headers, body)
        rep.answers[key] = answer  # a few per representation: kinds x HIT/MISS/STALE x codings
        return answer

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
