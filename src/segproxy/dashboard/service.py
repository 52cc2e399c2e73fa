"""The operator's live dashboard: its page and files, its data endpoints, its live stream.

Served on the operator listener (``admin.listen``), or on the main one when
``admin.dashboard = "on"`` and there is no operator listener (docs/dashboard.md). The page and
its script and style hold no data and are served without the token (a browser cannot put a
header on a page load); every data endpoint needs ``Authorization: Bearer <admin.token>`` when
a token is set, which the page's script sends on each ``fetch()``, the live stream included
(server-sent events read from a streamed ``fetch()`` body, not ``EventSource``, which cannot
send a header).

Paths (under ``/dashboard``): ``/`` the page, ``/app.js``, ``/app.css``; ``/api/state`` one
update as JSON; ``/api/stream`` the updates as server-sent events, one a second;
``/api/events/<seq>`` one event as it will be sent; ``/api/dead`` the dead letters;
``POST /api/dead/<id>/replay`` puts one back in the queue.

While a stream is open the ring of ``feed.py`` records; when the last one closes it stops and
forgets (``watch``). Queue statistics and dead letters are read from the queue file with a
connection of their own, in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from importlib import resources
from typing import Any

import orjson

from segproxy.config import Config
from segproxy.dashboard.feed import Feed
from segproxy.edge.http import (
    Headers,
    Request,
    Response,
    Stream,
    StreamWriter,
    error_response,
    json_response,
)
from segproxy.queue import admin
from segproxy.queue.base import QueueStats
from segproxy.redact import mask

log = logging.getLogger("segproxy.dashboard")

TICK = 1.0  # seconds between two updates of the live stream
DEAD_SHOWN = 100

# No external asset, no inline script or style: everything the page runs is served here.
_PAGE_HEADERS: Headers = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        b"form-action 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]
_NO_STORE: Headers = [(b"cache-control", b"no-store")]
_FILES = {
    "/dashboard/": ("page.html", b"text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("app.css", b"text/css; charset=utf-8"),
}
_EVENT = re.compile(r"/dashboard/api/events/(\d{1,18})")
_REPLAY = re.compile(r"/dashboard/api/dead/(\d{1,18})/replay")


def _file(name: str) -> bytes:
    return resources.files("segproxy.dashboard").joinpath(name).read_bytes()


# Read once: package data (pyproject.toml's package-data ships them in the wheel).
STATIC = {path: (_file(name), ctype) for path, (name, ctype) in _FILES.items()}

# What the app hands the dashboard: the proxy's numbers as plain values (App.snapshot, the
# same /metrics shows), a way to turn the event recording on and off, and the operator token's
# check and refusal (the same as /readyz's and /metrics').
Snapshot = Callable[[], Awaitable[dict[str, Any]]]
Watch = Callable[[Feed | None], None]
FILE_STATS_EVERY = 5.0  # seconds between two reads of the queue file's dead letters and faults


class Dashboard:
    def __init__(
        self,
        config: Config,
        snapshot: Snapshot,
        watch: Watch,
        authorized: Callable[[Request], bool],
        refused: Callable[[], Response],
    ) -> None:
        self.config = config
        self.snapshot = snapshot
        self.watch = watch
        self.authorized = authorized
        self.refused = refused
        self.feed = Feed()
        self.watchers = 0
        # The queue file, when the queue has one (dead letters and their replay need it).
        self.queue_path = config.queue.path if config.queue.backend == "sqlite" else ""
        self.queue_stats: Callable[[], Awaitable[QueueStats]] | None = None
        self.replayed: Callable[[int], Awaitable[None]] | None = None
        self._update: tuple[float, dict[str, Any]] | None = None
        self._file_stats: tuple[float, dict[str, Any] | None] | None = None
        self._building: asyncio.Lock | None = None

    def handle(self, req: Request, path: str) -> Response | Coroutine[Any, Any, Response | Stream]:
        """One request for ``/dashboard...`` (the route's own path, without a prefix)."""
        if path == "/dashboard":  # relative links in the page need the slash
            return Response(308, [(b"location", b"dashboard/"), *_NO_STORE])
        static = STATIC.get(path)
        if static is not None:
            if req.method == "POST":
                return _method_not_allowed("GET, HEAD")
            body, ctype = static
            return Response(200, [(b"content-type", ctype), *_PAGE_HEADERS], body)
        if not path.startswith("/dashboard/api/"):
            return error_response(404, "not_found", "no such dashboard path")
        if not self.authorized(req):
            return self.refused()
        return self._api(req, path)

    def _api(self, req: Request, path: str) -> Response | Coroutine[Any, Any, Response | Stream]:
        if (m := _REPLAY.fullmatch(path)) is not None:
            if req.method != "POST":
                return _method_not_allowed("POST")
            return self._replay(int(m.group(1)))
        if req.method == "POST":
            return _method_not_allowed("GET, HEAD")
        return self._get(req, path)

    def _get(self, req: Request, path: str) -> Response | Coroutine[Any, Any, Response | Stream]:
        if path == "/dashboard/api/stream" and req.method == "GET":
            return self._stream()
        if path in ("/dashboard/api/state", "/dashboard/api/stream"):  # (HEAD: one update)
            return self._state()
        if path == "/dashboard/api/dead":
            return self._dead()
        if (m := _EVENT.fullmatch(path)) is not None:
            return self._event(int(m.group(1)))
        return error_response(404, "not_found", "no such dashboard path")

    def _event(self, seq: int) -> Response:
        entry = self.feed.find(seq)
        if entry is None:
            return error_response(
                404, "no_such_event", "that event is no longer among the latest ones"
            )
        return json_response(
            200, {**entry.summary(), "event": entry.as_sent(time.time())}, _NO_STORE
        )

    # -- updates -------------------------------------------------------------------------

    async def update(self) -> dict[str, Any]:
        """One update: the proxy's numbers, the queue's, the latest events. Built at most
        once a second whatever the number of dashboards open (they share it)."""
        if self._building is None:
            self._building = asyncio.Lock()
        async with self._building:
            now = time.time()
            if self._update is not None and now - self._update[0] < TICK * 0.9:
                return self._update[1]
            data = {
                "time": now,
                "numbers": await self.snapshot(),
                "queue": await self._queue(now),
                "events": self.feed.latest(),
                "watching": self.watchers > 0,
            }
            self._update = (now, data)
            return data

    async def _queue(self, now: float) -> dict[str, Any] | None:
        """The queue's dead letters and each key's last fault (``segproxy queue stats``'s
        numbers), read every few seconds: its depth and age are in the snapshot, every second."""
        if self._file_stats is not None and now - self._file_stats[0] < FILE_STATS_EVERY:
            return self._file_stats[1]
        stats = await self._read_queue(now)
        self._file_stats = (now, stats)
        return stats

    async def _read_queue(self, now: float) -> dict[str, Any] | None:
        if self.queue_path:
            try:
                stats = await asyncio.to_thread(admin.stats, self.queue_path)
            except (OSError, sqlite3.Error) as exc:
                return {"error": f"the queue file could not be read: {exc}"}
        elif self.queue_stats is not None:
            stats = await self.queue_stats()
        else:
            return None
        return admin.stats_json(stats, now)

    async def _state(self) -> Response:
        return json_response(200, await self.update(), _NO_STORE)

    async def _stream(self) -> Stream:
        headers: Headers = [(b"content-type", b"text/event-stream"), *_NO_STORE]
        return Stream(200, headers, self._produce)

    async def _produce(self, write: StreamWriter) -> None:
        """One server-sent event a second until the client goes; recording meanwhile."""
        self.watchers += 1
        if self.watchers == 1:
            self.watch(self.feed)
        try:
            while True:
                if not write(b"data: " + orjson.dumps(await self.update()) + b"\n\n"):
                    return
                await asyncio.sleep(TICK)
        finally:
            self.watchers -= 1
            if self.watchers == 0:
                self.watch(None)
                self.feed.clear()

    # -- dead letters --------------------------------------------------------------------

    async def _dead(self) -> Response:
        if not self.queue_path:
            return json_response(200, {"available": False, "dead": []}, _NO_STORE)
        try:
            rows = await asyncio.to_thread(admin.dead, self.queue_path, DEAD_SHOWN)
        except admin.NoQueue:
            rows = []
        dead = [
            {
                "id": r.id,
                "key": mask(r.write_key),
                "status": r.status,
                "reason": r.reason[:500],
                "receivedAt": r.received_at,
                "diedAt": r.died_at,
                "event": admin.masked_event(r.body),
            }
            for r in rows
        ]
        return json_response(200, {"available": True, "dead": dead}, _NO_STORE)

    async def _replay(self, dead_id: int) -> Response:
        if not self.queue_path:
            return error_response(
                409, "no_dead_letters", "dead letters are kept only by the sqlite queue"
            )
        body = await asyncio.to_thread(admin.dead_body, self.queue_path, dead_id)
        moved = await asyncio.to_thread(admin.replay, self.queue_path, [dead_id])
        if moved == 0:
            return error_response(404, "no_such_dead_letter", "no dead letter with that id")
        if body is not None:
            self.feed.requeued([body])
        self._file_stats = None  # the next update reads the dead letters again
        if self.replayed is not None:
            await self.replayed(moved)
        log.info("dead letter %d replayed from the dashboard", dead_id)
        return json_response(200, {"success": True, "replayed": moved}, _NO_STORE)


def _method_not_allowed(allow: str) -> Response:
    return error_response(405, "method_not_allowed", f"use {allow}", [(b"allow", allow.encode())])
