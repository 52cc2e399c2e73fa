"""The Tracking API: parse/validate/enrich, then deliver (queue it, or relay it).

Delivery with a queue (``sqlite``, the default): the request's events are committed to the
queue and only then answered ``200 {"success": true}``; the forwarder sends them on. A full
queue or disk answers ``503`` with ``Retry-After`` (exposed to browsers) so clients keep the
events and retry: nothing is dropped.

Delivery with ``[queue] backend = "none"`` (passthrough): each request is relayed
synchronously to the one configured API upstream and Segment's answer (status, body,
``Retry-After``) is passed back, so clients keep their own retry behaviour. If the upstream
cannot be reached, the client gets a 502/503 with ``Retry-After`` and keeps the events. A
redirect (or any other answer below 400 that is not a 2xx) is not a delivery and is never
relayed (a browser would follow it with the event, or drop it; Segment's server libraries fail
on any 3xx): the client gets a 502 ``upstream_redirect`` with ``Retry-After`` and retries, and
the log names the status and ``Location`` as the proxy's configuration fault (the client is
told nothing about the upstream), like the forwarder does in durable mode (both read Segment's
answers by ``delivery.py``).
CORS headers are ``cors.py``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from segproxy.config import Config
from segproxy.cors import api_preflight, for_api
from segproxy.delivery import (
    MISDIRECTED,
    Throttle,
    api_headers,
    basic_authorization,
    fault,
    held_back,
    misdirected,
)
from segproxy.edge.http import (
    Deferred,
    Headers,
    Request,
    Response,
    error_response,
    rate_limited,
)
from segproxy.ingest import prepare
from segproxy.ingest.parse import (
    JSON_SEEN,
    IngestError,
    Payload,
    decode_body,
    enrich,
    parse,
    parse_single,
)
from segproxy.ingest.prepare import encode, single_body_checked, single_row
from segproxy.memo import Memo
from segproxy.queue.base import NewRow, Queue, QueueError, QueueFull
from segproxy.ratelimit import table
from segproxy.routes import API_ENDPOINTS, Route
from segproxy.upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("segproxy.ingest")

PASS_HEADERS = (b"retry-after", b"x-ratelimit-reset", b"content-type")
RETRY_AFTER_SECONDS = b"5"
SUCCESS = b'{"success":true}'
_ANSWERS_KEPT = 1024  # answers built once and reused, per kind (a bound: see memo.py)


def upstream_headers(authorization: bytes | None, write_key: str | None) -> Headers:
    """Passthrough: the client's own Basic header, else one made from the body's write key."""
    if authorization is None and write_key is not None:
        authorization = basic_authorization(write_key)
    return api_headers(authorization)


class IngestService:
    def __init__(
        self,
        config: Config,
        pool: UpstreamPool,
        queue: Queue | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.queue = queue
        self.limits = config.limits
        self.allowed = config.sources.write_keys
        self.retry_after = str(config.forward.retry_after).encode()
        rl = config.rate_limit
        # None when off (the default): then nothing per request.
        self.key_limit = table(rl.per_write_key, rl.per_write_key_burst, rl.max_tracked)
        self.exempt_keys = rl.exempt_write_keys
        # The 200 per allowed origin (which decides the CORS headers), built once: the edge
        # then reuses its header bytes too.
        self._ok: Memo[bytes, Response] = Memo(_ANSWERS_KEPT)
        # Passthrough: Segment's small answers (its 200, say) as relayed, per what they carry
        # and the allowed origin, built once too.
        self._relayed: Memo[tuple[object, ...], Response] = Memo(_ANSWERS_KEPT)
        self.reports = Throttle()  # redirect warnings: one per fault every 10 s
        # The dashboard's event recorder while one is open (dashboard/feed.py), else None:
        # one attribute check per committed request.
        self.watch: Callable[[list[NewRow]], None] | None = None
        # Read by /metrics: events stored in the queue (or, in passthrough, relayed and
        # accepted by Segment), counting a telemetry request (/v1/m) as one; and requests
        # refused by the per-write-key rate limit.
        self.events_accepted = 0
        self.rate_limited = 0

    def ok(self, cors: Headers) -> Response:
        allow = cors[0][1]  # for_api(): the allowed origin comes first
        resp = self._ok.get(allow)
        if resp is None:
            resp = Response(200, [(b"content-type", b"application/json"), *cors], SUCCESS)
            self._ok.put(allow, resp)
        return resp

    def accept(self, req: Request, route: Route, ip: str) -> Payload:
        """Everything up to delivery; raises IngestError for a request to refuse."""
        headers = req.headers
        data = decode_body(
            req.body,
            headers.get(b"content-type"),
            headers.get(b"content-encoding"),
            self.limits,
        )
        payload = parse(
            route.endpoint, data, headers.get(b"authorization"), self.limits, self.allowed
        )
        enrich(payload, ip)
        return payload

    def handle(self, req: Request, route: Route, ip: str) -> Response | Deferred:
        """Refusals are answered at once; accepted events later (commit or upstream)."""
        origin = req.headers.get(b"origin")
        if req.method == "OPTIONS":
            return Response(204, api_preflight(origin))
        cors = for_api(origin)
        try:
            implied = API_ENDPOINTS.get(route.endpoint)
            if implied is not None and self.key_limit is None:
                answer = self._try_fast_single_event(req, route, ip, implied, cors)
                if answer is not None:
                    return answer
            payload = self.accept(req, route, ip)
            key = payload.write_key
            if self.key_limit is not None and key is not None and key not in self.exempt_keys:
                wait = self.key_limit.allow(key, time.monotonic())
                if wait is not None:
                    self.rate_limited += 1
                    return rate_limited(wait, "for this write key", cors)
            if self.queue is not None:
                rows = prepare.rows(payload, time.time(), self.limits)
            else:
                body = prepare.forwarded_body(payload, self.limits)
        except IngestError as exc:
            return error_response(exc.status, exc.code, exc.message, cors)
        if self.queue is not None:
            return self.enqueue(rows, cors)
        headers = upstream_headers(payload.authorization, payload.write_key)
        return self.relay(route, body, headers, cors, max(len(payload.events), 1))

    def _try_fast_single_event(
        self, req: Request, route: Route, ip: str, implied: str, cors: Headers
    ) -> Response | Deferred | None:
        """The fast lane: the usual request (one event, plain JSON, a Basic header seen
        before) in a few calls, with the same result as the general path; None: take that
        path."""
        headers = req.headers
        if b"content-encoding" in headers or headers.get(b"content-type") not in JSON_SEEN:
            return None
        auth = headers.get(b"authorization")
        single = parse_single(req.body, auth, self.limits, self.allowed, ip)
        if single is None:
            return None
        doc, key = single
        if self.queue is None:
            body = single_body_checked(encode(doc), self.limits)
            return self.relay(route, body, upstream_headers(auth, key), cors, 1)
        return self.enqueue([single_row(key, doc, implied, time.time(), self.limits)], cors)

    def enqueue(self, rows: list[NewRow], cors: Headers) -> Response | Deferred:
        """200 once the rows are committed (the commit resolves the answer), else 503."""
        assert self.queue is not None
        answer = Deferred()

        def done(exc: BaseException | None) -> None:
            if exc is not None:
                err = exc if isinstance(exc, QueueError) else QueueError(str(exc))
                answer.resolve(self._not_stored(err, len(rows), cors))
                return
            self.events_accepted += len(rows)
            answer.resolve(self.ok(cors))
            watch = self.watch
            if watch is not None:
                watch(rows)

        try:
            self.queue.submit_then(rows, done)
        except QueueError as exc:
            return self._not_stored(exc, len(rows), cors)
        return answer

    def _not_stored(self, exc: QueueError, count: int, cors: Headers) -> Response:
        headers = [*cors, (b"retry-after", self.retry_after)]
        if isinstance(exc, QueueFull):
            return error_response(503, "queue_full", f"{exc}; retry later", headers)
        log.error("could not queue %d events: %s", count, exc)
        return error_response(
            503, "queue_error", "the events could not be stored; retry later", headers
        )

    def relay(
        self, route: Route, body: bytes, headers: Headers, cors: Headers, events: int
    ) -> Deferred:
        """Passthrough: send the request on as it is; Segment's answer is the client's."""
        answer = Deferred()

        def done(resp: UpstreamResponse | None, exc: UpstreamError | None) -> None:
            if resp is not None and 200 <= resp.status < 300:
                self.events_accepted += events
            answer.resolve(self._relayed_answer(resp, exc, route, cors))

        self.pool.send_then("POST", route.upstream_path, headers, body, done)
        return answer

    def _relayed_answer(
        self,
        resp: UpstreamResponse | None,
        exc: UpstreamError | None,
        route: Route,
        cors: Headers,
    ) -> Response:
        if resp is None:
            log.warning("API upstream failed for %s: %s", route.upstream_path, exc)
            return error_response(
                503 if exc is not None and exc.kind == "timeout" else 502,
                "upstream_unavailable",
                "Segment's API could not be reached; retry later",
                [*cors, (b"retry-after", RETRY_AFTER_SECONDS)],
            )
        if misdirected(resp.status):
            return self._not_delivered(resp, route, cors)
        passed = [(name, resp.headers.get(name)) for name in PASS_HEADERS]
        key = (resp.status, resp.body, cors[0][1], *passed)
        answer = self._relayed.get(key)
        if answer is None:
            out = list(cors)
            out += [(name, value) for name, value in passed if value is not None]
            answer = Response(resp.status, out, resp.body)
            if len(resp.body) <= 256:  # small answers repeat; big ones are not kept
                self._relayed.put(key, answer)
        return answer

    def _not_delivered(self, resp: UpstreamResponse, route: Route, cors: Headers) -> Response:
        """A redirect from the API upstream: 502 for the client (who keeps the events and
        retries), the status and Location in the log (not for the client: internal address)."""
        why = fault(resp.status, resp.header(b"location"))
        held = self.reports.due(why, time.time())
        if held is not None:
            log.warning(
                "Segment's API answered %s for %s: %s: the client is answered 502 and retries%s",
                why,
                route.upstream_path,
                MISDIRECTED,
                held_back(held),
            )
        return error_response(
            502,
            "upstream_redirect",
            f"the proxy's upstream answered {resp.status} instead of accepting the events:"
            " a proxy configuration fault; retry later",
            [*cors, (b"retry-after", RETRY_AFTER_SECONDS)],
        )
