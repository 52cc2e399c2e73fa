"""An in-memory queue with the same contract as the SQLite one, minus durability.

For unit tests of the forwarder and for ``[queue] backend = "memory"`` (a test/dev mode: an
acknowledged event is lost if the process dies; never use it where that matters). It counts
bytes, caps dead letters and keeps the last fault per key as the SQLite one does (ledger.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from segproxy.queue.base import (
    DeadRow,
    KeyStats,
    NewRow,
    QueueFull,
    QueueStats,
    Row,
    stored_size,
)

log = logging.getLogger("segproxy.queue")


@dataclass(slots=True)
class _Slot:
    row: NewRow
    size: int
    not_before: float = 0.0
    leased: bool = False
    attempts: int = 0


class MemoryQueue:
    def __init__(
        self,
        max_rows: int = 1_000_000,
        max_bytes: int = 1 << 30,
        max_dead_bytes: int = 64 * 1024**2,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        """``on_commit(rows)``: called once per commit that stored rows, before its caller
        hears of it, as the SQLite queue does (the forwarder's wake-up)."""
        self.on_commit = on_commit
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_dead_bytes = max_dead_bytes
        self.slots: dict[int, _Slot] = {}
        self.dead: list[DeadRow] = []
        self._dead_sizes: list[int] = []  # each dead letter's bytes, in the same order
        self.bytes = 0
        self.dead_bytes = 0
        self.dead_evicted = 0
        self.faults: dict[str, tuple[str, float]] = {}
        self._ids = itertools.count(1)

    def submit_then(self, rows: list[NewRow], done: Callable[[BaseException | None], None]) -> None:
        self._store(rows)
        done(None)

    async def put(self, rows: list[NewRow]) -> None:
        self._store(rows)

    def _store(self, rows: list[NewRow]) -> None:
        sizes = [stored_size(r.write_key, r.body, r.sent_at) for r in rows]
        size = sum(sizes)
        if len(self.slots) + len(rows) > self.max_rows or self.bytes + size > self.max_bytes:
            raise QueueFull("the queue is full")
        for r, n in zip(rows, sizes, strict=True):
            self.slots[next(self._ids)] = _Slot(r, n)
        self.bytes += size
        if self.on_commit is not None:
            self.on_commit(len(rows))

    async def lease(
        self, now: float, max_rows: int, exclude_keys: frozenset[str] = frozenset()
    ) -> list[Row]:
        out: list[Row] = []
        for i, s in self.slots.items():
            if len(out) >= max_rows:
                break
            if s.leased or s.not_before > now or s.row.write_key in exclude_keys:
                continue
            s.leased = True
            r = s.row
            out.append(Row(i, r.write_key, r.kind, r.received_at, s.attempts, r.body, r.sent_at))
        return out

    def _remove(self, ids: list[int]) -> list[_Slot]:
        gone = [self.slots.pop(i) for i in ids if i in self.slots]
        self.bytes -= sum(s.size for s in gone)
        return gone

    async def ack(self, ids: list[int]) -> None:
        self._remove(ids)

    async def retry_later(self, ids: list[int], not_before: float, fault: str = "") -> None:
        now = time.time()
        for i in ids:
            s = self.slots.get(i)
            if s is not None:
                s.leased = False
                s.not_before = not_before
                s.attempts += 1
                if fault:
                    self.faults[s.row.write_key] = (fault, now)

    async def dead_letter(self, ids: list[int], status: int, reason: str, now: float) -> None:
        for i in ids:
            s = self.slots.get(i)
            if s is None:
                continue
            self._remove([i])
            r = s.row
            self.dead.append(DeadRow(i, r.write_key, r.received_at, now, status, reason, r.body))
            self._dead_sizes.append(s.size + len(reason))
            self.dead_bytes += s.size + len(reason)
        self._evict_dead()

    def _evict_dead(self) -> None:
        """Past ``max_dead_bytes``: the oldest dead letters go, counted and logged."""
        evicted = 0
        while self.dead and self.dead_bytes > self.max_dead_bytes:
            del self.dead[0]
            self.dead_bytes -= self._dead_sizes.pop(0)
            evicted += 1
        if evicted:
            self.dead_evicted += evicted
            log.warning(
                "dead letters over queue.max_dead_bytes (%d): evicted the %d oldest",
                self.max_dead_bytes,
                evicted,
            )

    async def next_ready(self, exclude_keys: frozenset[str] = frozenset()) -> float | None:
        ready = [
            s.not_before
            for s in self.slots.values()
            if not s.leased and s.row.write_key not in exclude_keys
        ]
        return min(ready) if ready else None

    async def stats(self) -> QueueStats:
        out = QueueStats(
            rows=len(self.slots),
            bytes=self.bytes,
            dead=len(self.dead),
            dead_bytes=self.dead_bytes,
            dead_evicted=self.dead_evicted,
        )
        for s in self.slots.values():
            k = out.per_key.setdefault(s.row.write_key, KeyStats())
            k.rows += 1
            k.bytes += s.size
            k.oldest = s.row.received_at if k.oldest is None else min(k.oldest, s.row.received_at)
            out.oldest = k.oldest if out.oldest is None else min(out.oldest, k.oldest)
        for key, k in out.per_key.items():
            k.last_fault, k.last_fault_at = self.faults.get(key, ("", None))
        return out

    def depth(self) -> tuple[int, int]:
        return len(self.slots), self.bytes

    async def oldest(self) -> float | None:
        # (slots keep their insertion order: the first is the oldest still queued)
        for slot in self.slots.values():
            return slot.row.received_at
        return None

    def has_room(self) -> bool:
        return len(self.slots) < self.max_rows and self.bytes < self.max_bytes

    async def recount(self) -> None:
        return None

    async def close(self) -> None:
        return None
