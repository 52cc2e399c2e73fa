"""The forwarder: leases queued rows, sends them to Segment in batches, acks or retries.

One loop task owns the work; each batch send is its own task, tracked and cancelled on stop.

- **Batching**: when the queue goes from empty to non-empty, or after a small round, the
  forwarder waits up to ``max_delay`` (or until a round's worth, BUSY_ROUND rows, has
  arrived) to collect more, then leases everything ready and sends one ``/v1/batch`` per write
  key (<= 500 KB, <= 2,500 events). Under load rounds follow each other, each taking what
  arrived during the one before, so a thousand single events cost a handful of requests.
- **Independence**: leased batches wait per key and are started round-robin, never more than
  ``per_key_concurrency`` per key nor ``concurrency`` in all. A key with a full line of sends
  waiting (``per_key_concurrency`` of them) or told by Segment to wait (429/Retry-After) gets
  no new lease, and nothing is leased while MAX_WAITING_ROWS leased rows wait. So one slow or
  rate-limited key, even with a large backlog, never holds back the others, and a busy key's
  next batches are ready when a slot frees.
- **Retries** follow forward/retry.py; a key's rows wait at least as long as Segment's
  ``Retry-After`` asked, and are logged at WARNING, at most one line per key and fault every
  10 s (with how many were held back). Only a 2xx is a delivery: a redirect is retried like an
  outage, its WARNING naming it a configuration fault.
- **Splits**: a batch of several events refused for good because of what it holds (a 400 for
  one invalid event, a 413) is split in halves, each sent as a batch of its own, recursively,
  until the refused events are alone: only they become dead letters (Segment's status and
  body), the others are delivered. One bad event in n costs about 2 * log2(n) requests (24 in
  2,500); every event refused, at most 2n - 1. The halves wait in their key's line like any
  batch, so they share the key's send slots and take turns with the other keys.
- **Stop**: no new leases; in-flight sends get ``grace`` seconds; anything unfinished stays in
  the queue (its lease dies with the process) and is sent after the next start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from segproxy.config import ForwardConfig
from segproxy.delivery import (
    MISDIRECTED,
    Throttle,
    api_headers,
    basic_authorization,
    delivered,
    fault,
    held_back,
    misdirected,
)
from segproxy.forward.batcher import Batch, build_batches
from segproxy.forward.retry import Action, backoff, classify, parse_retry_after, splits
from segproxy.queue.base import Queue, Row
from segproxy.redact import mask
from segproxy.upstream import UpstreamError, UpstreamPool

log = logging.getLogger("segproxy.forward")

IDLE_RECHECK = 2.0
LEASE_ROWS = 5_000  # per round: two full batches' worth, without long pauses of the loop
BUSY_ROUND = 500  # a round with fewer rows waits (up to max_delay) before the next one
INLINE_BUILD_ROWS = 2_500  # a round up to this many rows is built on the loop (~2-3 ms)
MAX_WAITING_ROWS = LEASE_ROWS  # leased rows waiting for a send slot, all keys together


@dataclass(slots=True)
class ForwardCounters:
    requests: int = 0
    events_sent: int = 0
    events_retried: int = 0
    events_dead: int = 0
    failures: int = 0
    splits: int = 0  # refused batches split in halves to find the refused events


class Forwarder:
    def __init__(self, queue: Queue, pool: UpstreamPool, settings: ForwardConfig) -> None:
        self.queue = queue
        self.pool = pool
        self.settings = settings
        self.counters = ForwardCounters()
        self.inflight: Counter[str] = Counter()
        self.blocked_until: dict[str, float] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # Leased sends not started yet, per key; started round-robin by _dispatch within both
        # the global and the per-key limit, so no key can take every slot.
        self.waiting: dict[str, deque[tuple[int, Callable[[], Coroutine[Any, Any, None]]]]] = {}
        self.waiting_rows = 0
        self.wake = asyncio.Event()
        self.woken = False
        # Collecting a round: rows committed since, and the count that ends the wait early.
        self.arrived = 0
        self.want = 0
        self.enough = asyncio.Event()
        self.stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self.rng = random.Random()
        self.reports = Throttle()  # WARNINGs: one per fault every 10 s
        # The dashboard's status recorder while one is open (dashboard/feed.py), else None:
        # called with (rows, "delivered" | "retrying" | "dead", why) once per batch outcome.
        self.watch: Callable[[list[Row], str, str], None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def notify(self, rows: int = 1) -> None:
        """``rows`` new rows were committed: wake the loop (called once per request)."""
        if not self.woken:
            self._wake()
        if self.want:
            self.arrived += rows
            if self.arrived >= self.want:
                self.enough.set()

    def _wake(self) -> None:
        # ``woken`` mirrors ``wake`` (an asyncio.Event, whose methods run interpreted) so
        # that a busy notify() costs one attribute read; only _round clears both.
        self.woken = True
        self.wake.set()

    async def _collect(self) -> None:
        """Wait up to max_delay for a round's worth of rows to arrive (batching)."""
        self.arrived = 0
        self.want = BUSY_ROUND
        self.enough.clear()
        try:
            async with asyncio.timeout(self.settings.max_delay):
                await self.enough.wait()
        except TimeoutError:
            pass
        finally:
            self.want = 0

    def _excluded(self, now: float) -> frozenset[str]:
        limit = self.settings.per_key_concurrency
        # A key with a full line of leased sends waiting gets no new lease.
        keys = {k for k, sends in self.waiting.items() if len(sends) >= limit}
        for key, until in list(self.blocked_until.items()):
            if until > now:
                keys.add(key)
            else:
                del self.blocked_until[key]
        return frozenset(keys)

    async def _wait(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await self.wake.wait()
        except TimeoutError:
            pass

    async def _run(self) -> None:
        while not self.stopping:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("forwarder round failed; retrying in 1 s")
                await self._wait(1.0)

    async def _round(self) -> None:
        now = time.time()
        self.wake.clear()
        self.woken = False
        excluded = self._excluded(now)
        if self.waiting_rows >= MAX_WAITING_ROWS:
            rows: list[Row] = []  # enough leased already: wait for a send to finish
        else:
            rows = await self.queue.lease(now, LEASE_ROWS, excluded)
        if not rows:
            ready = await self.queue.next_ready(excluded)
            # Wake when the earliest row is due, a paused key resumes, a send finishes, or new
            # rows arrive (notify), whichever comes first.
            due = [t for t in (ready, *self.blocked_until.values()) if t is not None]
            # With nothing in flight, a wake means new rows after a lull: wait max_delay to
            # collect a batch's worth. A send finishing with a backlog waiting does not wait.
            idle = not self.tasks and not self.waiting
            # Idle: look again every 2 s for rows another process (queue replay) put back.
            await self._wait(min(max(min(due) - now, 0.05), 1.0) if due else IDLE_RECHECK)
            if idle and not self.stopping and self.wake.is_set():
                await self._collect()
            return
        events = [r for r in rows if r.kind != "metrics"]  # events, and replays (sent alone)
        metrics = [r for r in rows if r.kind == "metrics"]
        batches = await self._build(events)
        for batch in batches:
            send = functools.partial(self._send_batch, batch)
            self._enqueue(batch.write_key, len(batch.rows), send)
        for row in metrics:
            self._enqueue("", 1, functools.partial(self._send_metrics, row))
        self._dispatch()
        if len(rows) < BUSY_ROUND and not self.stopping:
            # A small round (light traffic): let the next round's worth collect (not woken by
            # each commit). Under load, rounds follow each other and each takes what arrived
            # during the one before.
            await self._collect()

    async def _build(self, events: list[Row]) -> list[Batch]:
        """The round's batches. A row that cannot be prepared for sending (not expected: a
        damaged queue file, say) becomes a dead letter naming why, with status 0, instead of
        failing the round, which would strand every row leased with it until a restart."""
        now = time.time()
        try:
            # Building batches is CPU work (~1 us per event). A round under load (up to
            # INLINE_BUILD_ROWS) is built on the loop: a thread would cost more in hand-offs
            # than it saves. A backlog's big rounds are built off it, so the loop keeps
            # answering clients meanwhile (it gets the GIL back every few ms).
            if len(events) <= INLINE_BUILD_ROWS:
                return build_batches(events, now)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, build_batches, events, now)
        except Exception:
            log.exception(
                "could not prepare a round of %d events; looking for the ones at fault", len(events)
            )
        good: list[Row] = []
        bad: dict[str, list[int]] = {}
        for row in events:
            try:
                build_batches([row], now)
            except Exception as exc:
                reason = (
                    f"segproxy could not prepare the event for sending: {type(exc).__name__}: {exc}"
                )
                bad.setdefault(reason[:1000], []).append(row.id)
            else:
                good.append(row)
        for reason, ids in bad.items():
            log.error("%d events kept as dead letters: %s", len(ids), reason)
            await self.queue.dead_letter(ids, 0, reason, time.time())
            self.counters.events_dead += len(ids)
        return build_batches(good, now)

    def _enqueue(self, key: str, rows: int, send: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.waiting_rows += rows
        self.waiting.setdefault(key, deque()).append((rows, send))

    def _dispatch(self) -> None:
        """Start waiting sends, one key at a time in turn, within both concurrency limits."""
        s = self.settings
        started = True
        while started and not self.stopping and len(self.tasks) < s.concurrency:
            started = False
            for key in list(self.waiting):
                if len(self.tasks) >= s.concurrency:
                    break
                if self.inflight[key] >= s.per_key_concurrency:
                    continue
                sends = self.waiting.pop(key)
                rows, send = sends.popleft()
                self.waiting_rows -= rows
                self._start(key, send)
                if sends:
                    self.waiting[key] = sends  # re-inserted last: the next key goes first
                started = True

    def _start(self, key: str, send: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``send()`` as a tracked task (the coroutine is created only now)."""
        self.inflight[key] += 1
        task = asyncio.get_running_loop().create_task(send())
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self.inflight[key] -= 1
            if self.inflight[key] <= 0:
                del self.inflight[key]
            self._dispatch()
            self._wake()

        task.add_done_callback(done)

    async def _send_batch(self, batch: Batch) -> None:
        await self._deliver(batch.write_key, "/v1/batch", batch.body(), batch.rows)

    async def _send_rows(self, key: str, rows: list[Row]) -> None:
        """A part of a refused batch (see _split), built again (each sentAt moved to now)."""
        for batch in build_batches(rows, time.time()):
            await self._send_batch(batch)

    async def _send_metrics(self, row: Row) -> None:
        await self._deliver("", "/v1/m", row.body, [row])

    async def _post(
        self, key: str, path: str, body: bytes
    ) -> tuple[int | None, str, float | None, str]:
        """Segment's status (None: no answer), its body (or the error), its Retry-After, and
        the fault a retry names (delivery.fault; "" for a 2xx)."""
        headers = api_headers(basic_authorization(key) if key else None)
        self.counters.requests += 1
        try:
            resp = await self.pool.request("POST", path, headers, body)
        except UpstreamError as exc:
            return None, str(exc), None, fault(None, None, exc.kind)
        status = resp.status
        if delivered(status):
            return status, "", None, ""
        detail = resp.body[:1000].decode("utf-8", "replace")
        retry_after = parse_retry_after(resp.header(b"retry-after"), time.time())
        return status, detail, retry_after, fault(status, resp.header(b"location"))

    async def _deliver(self, key: str, path: str, body: bytes, rows: list[Row]) -> None:
        status, detail, retry_after, why = await self._post(key, path, body)
        action = classify(status)
        ids = [r.id for r in rows]
        if action is Action.ACK:
            await self.queue.ack(ids)
            self.counters.events_sent += len(ids)
            self._watched(rows, "delivered", "")
            return
        self.counters.failures += 1
        now = time.time()
        if action is Action.RETRY:
            # (a network error's log line says more than its fault: the error itself)
            await self._retry(key, rows, status, why, retry_after, now, detail or why)
            self._watched(rows, "retrying", why or detail)
            return
        if len(rows) > 1 and splits(status):
            self._split(key, rows, status)
            return
        report = f"Segment refused events of key {mask(key)} with {status}"
        held = self.reports.due(report, now)
        if held is not None:  # one line per key and status every 10 s
            log.warning(
                "%s: %s; %d kept as dead letters%s", report, detail[:200], len(ids), held_back(held)
            )
        await self.queue.dead_letter(ids, status or 0, detail, now)
        self.counters.events_dead += len(ids)
        self._watched(rows, "dead", f"HTTP {status}: {detail[:200]}" if status else detail[:200])

    def _watched(self, rows: list[Row], status: str, why: str) -> None:
        watch = self.watch
        if watch is not None:
            watch(rows, status, why)

    def _split(self, key: str, rows: list[Row], status: int | None) -> None:
        """Send each half of a refused batch on its own, to find the events Segment refuses.

        The halves go first in their key's line (their rows are leased already, and the
        lines of other keys still take turns with it in _dispatch), started when this send's
        slot frees. They are not counted against MAX_WAITING_ROWS: already leased and in
        memory, counting them would only stop every other key's leases while this one splits.
        """
        self.counters.splits += 1
        log.debug(
            "Segment refused %d events of key %s with %s; splitting them",
            len(rows),
            mask(key),
            status,
        )
        mid = len(rows) // 2
        line = self.waiting.setdefault(key, deque())
        line.appendleft((0, functools.partial(self._send_rows, key, rows[mid:])))
        line.appendleft((0, functools.partial(self._send_rows, key, rows[:mid])))

    async def _retry(
        self,
        key: str,
        rows: list[Row],
        status: int | None,
        why: str,
        retry_after: float | None,
        now: float,
        detail: str,
    ) -> None:
        s = self.settings
        attempt = max(r.attempts for r in rows) + 1
        delay = backoff(
            attempt,
            base=s.backoff_base,
            cap=s.backoff_cap,
            retry_after=retry_after,
            max_retry_after=s.max_retry_after,
            rng=self.rng,
        )
        if retry_after is not None or status == 429:
            self.blocked_until[key] = max(self.blocked_until.get(key, 0.0), now + delay)
        # A WARNING (events are late), at most one line per key and fault every REPORT_EVERY
        # seconds with the count of those held back: an outage retries every batch of every
        # key, and one line per batch would bury the log. (delivery.Throttle, as for refusals.)
        held = self.reports.due(f"retry {mask(key)} {why}", now)
        if held is not None and status is not None and misdirected(status):
            # Not a delivery, and not Segment being down: the proxy is pointed at the wrong
            # address. Named as the configuration fault it is.
            log.warning(
                "Segment's API answered %s for %d events of key %s: %s: the events stay"
                " queued and are retried%s",
                why,
                len(rows),
                mask(key),
                MISDIRECTED,
                held_back(held),
            )
        elif held is not None:
            log.warning(
                "delivery of %d events of key %s failed (%s); retry %d in %.2f s%s",
                len(rows),
                mask(key),
                why if status is not None else detail,
                attempt,
                delay,
                held_back(held),
            )
        await self.queue.retry_later([r.id for r in rows], now + delay, why)
        self.counters.events_retried += len(rows)

    async def stop(self, grace: float) -> None:
        self.stopping = True
        self._wake()
        self.waiting.clear()  # leased but not started: the leases die with this process
        self.waiting_rows = 0
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
