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
  ``Retry-After`` asked.
- **Stop**: no new leases; in-flight sends get ``grace`` seconds; anything unfinished stays in
  the queue (its lease dies with the process) and is sent after the next start.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from segproxy.config import ForwardConfig
from segproxy.forward.batcher import Batch, build_batches
from segproxy.forward.retry import Action, backoff, classify, parse_retry_after
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
        events = [r for r in rows if r.kind == "event"]
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

    def _auth(self, write_key: str) -> list[tuple[bytes, bytes]]:
        token = base64.b64encode(write_key.encode() + b":")
        return [(b"content-type", b"application/json"), (b"authorization", b"Basic " + token)]

    async def _send_batch(self, batch: Batch) -> None:
        await self._deliver(batch.write_key, "/v1/batch", batch.body(), batch.rows)

    async def _send_metrics(self, row: Row) -> None:
        await self._deliver("", "/v1/m", row.body, [row])

    async def _deliver(self, key: str, path: str, body: bytes, rows: list[Row]) -> None:
        ids = [r.id for r in rows]
        headers = self._auth(key) if key else [(b"content-type", b"application/json")]
        status: int | None = None
        detail = ""
        retry_after: float | None = None
        self.counters.requests += 1
        try:
            resp = await self.pool.request("POST", path, headers, body)
            status = resp.status
            detail = resp.body[:1000].decode("utf-8", "replace")
            retry_after = parse_retry_after(resp.header(b"retry-after"), time.time())
        except UpstreamError as exc:
            detail = str(exc)
        action = classify(status)
        now = time.time()
        if action is Action.ACK:
            await self.queue.ack(ids)
            self.counters.events_sent += len(ids)
            return
        self.counters.failures += 1
        if action is Action.DEAD:
            log.warning(
                "Segment refused %d events of key %s with %s: %s; kept as dead letters",
                len(ids),
                mask(key),
                status,
                detail[:200],
            )
            await self.queue.dead_letter(ids, status or 0, detail, now)
            self.counters.events_dead += len(ids)
            return
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
        log.info(
            "delivery of %d events failed (%s); retry %d in %.2f s",
            len(ids),
            status if status is not None else detail,
            attempt,
            delay,
        )
        await self.queue.retry_later(ids, now + delay)
        self.counters.events_retried += len(ids)

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
