"""The queue between ingest and the forwarder: one small interface, several backends.

Invariants every backend keeps (the SQLite one on disk: its own numbered invariants are in
``queue/__init__.py``):

1. ``put`` returns only once its rows are durable. The API answers 200 only after ``put``
   returned, so an acknowledged event is never only in memory.
2. A row is deleted only by ``ack`` (Segment accepted it, 2xx) or moved by ``dead_letter``
   (Segment refused it with a non-retryable 4xx, kept with the status and body).
3. ``lease`` hands a row to at most one sender at a time. A lease lives only as long as the
   process that took it: when a process dies, its leases die with it, and the next process on
   the same data re-sends those rows (at-least-once; Segment de-duplicates on ``messageId``).
4. ``retry_later`` returns leased rows to the queue, not to be leased before ``not_before``.
5. ``put`` raises :class:`QueueFull` instead of growing past its caps or the disk's free space;
   nothing is dropped: the client is told to retry (503 + Retry-After). Every byte stored
   counts against the caps (:func:`stored_size`: the write key and sentAt too, not only the
   body). Dead letters have a cap of their own: past it the oldest are evicted, counted and
   logged (never silently), so they never block the queue.
6. A row's ``id`` names it from ``lease`` to its ``ack``, ``retry_later`` or ``dead_letter``.
   An event released by ``retry_later``, or left by a process that stopped, may come back
   under another id: the event is its body (and Segment's key, its ``messageId``).
7. Write, then remember: what a backend holds in memory about stored rows changes only after
   the write that mirrors it committed; a write that fails raises and leaves memory as it
   was (nothing acknowledged is lost, nothing delivered comes back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

# "replay": an event put back from the dead letters by ``segproxy queue replay``; the forwarder
# sends it in a batch of its own, so Segment's answer is about it alone.
RowKind = Literal["event", "metrics", "replay"]


class QueueError(Exception):
    """The queue could not do what was asked."""


class QueueFull(QueueError):
    """Over a configured cap or out of disk: the caller must answer 503 + Retry-After."""


class NewRow(NamedTuple):  # a tuple: made once per event on the hot path
    write_key: str  # "" for metrics
    kind: RowKind
    received_at: float  # wall clock (unix seconds) when the proxy accepted it
    body: bytes  # one event (or one metrics request) as JSON
    # The event's sentAt, kept out of ``body`` so the forwarder can move it forward by the
    # time the event waited without re-parsing the event (see forward/batcher.py).
    sent_at: str | None = None


class Row(NamedTuple):
    id: int
    write_key: str
    kind: RowKind
    received_at: float
    attempts: int
    body: bytes
    sent_at: str | None = None


# Per stored row, beyond its key, body and sentAt: the pack head or the SQLite row (ids,
# times, counters, record header), rounded up.
ROW_OVERHEAD = 64


def stored_size(write_key: str, body: bytes, sent_at: str | None) -> int:
    """What one row costs in the queue's caps: every byte stored, not only the body (a
    100 KB write key on 200 events is 20 MB). (Characters for the strings, as SQLite's
    length() counts them in the file's ``size`` columns.)"""
    return ROW_OVERHEAD + len(write_key) + len(body) + (0 if sent_at is None else len(sent_at))


# A NamedTuple's own constructor is interpreted Python (its generated ``__new__``), also when
# the caller is compiled; the hot path makes its rows with tuple.__new__ instead, in C.
_tuple_new = tuple.__new__


def new_row(
    write_key: str, kind: RowKind, received_at: float, body: bytes, sent_at: str | None = None
) -> NewRow:
    """``NewRow(...)``, made without running Python code (once per event accepted)."""
    return _tuple_new(NewRow, (write_key, kind, received_at, body, sent_at))


def queued_row(
    id: int,
    write_key: str,
    kind: RowKind,
    received_at: float,
    attempts: int,
    body: bytes,
    sent_at: str | None,
) -> Row:
    """``Row(...)``, made without running Python code (once per event handed over)."""
    return _tuple_new(Row, (id, write_key, kind, received_at, attempts, body, sent_at))


@dataclass(frozen=True, slots=True)
class DeadRow:
    id: int
    write_key: str
    received_at: float
    died_at: float
    status: int
    reason: str
    body: bytes


@dataclass(slots=True)
class KeyStats:
    rows: int = 0
    bytes: int = 0
    oldest: float | None = None
    # The last reason a delivery of this key failed ("HTTP 503", "HTTP 301 redirect to ...")
    # and when (unix seconds); kept until the key's events are all out of the queue.
    last_fault: str = ""
    last_fault_at: float | None = None


@dataclass(slots=True)
class QueueStats:
    rows: int = 0
    bytes: int = 0
    oldest: float | None = None  # received_at of the oldest queued row
    dead: int = 0
    dead_bytes: int = 0
    dead_evicted: int = 0  # dead letters deleted, oldest first, to stay under their cap
    per_key: dict[str, KeyStats] = field(default_factory=dict)


class Queue(Protocol):
    async def put(self, rows: list[NewRow]) -> None:
        """Durably store ``rows`` (all or none); raise QueueFull when over a cap."""

    def submit_then(self, rows: list[NewRow], done: Callable[[BaseException | None], None]) -> None:
        """The hot path: raises QueueFull at once, or calls ``done(None)`` once the rows are
        durable (``done(error)`` if they could not be stored), from the commit's callback."""

    async def lease(
        self, now: float, max_rows: int, exclude_keys: frozenset[str] = frozenset()
    ) -> list[Row]:
        """Up to ``max_rows`` ready rows (oldest first) not leased by anyone. (Events a
        stopped process was still sending come back after those it had put back.)"""

    async def ack(self, ids: list[int]) -> None:
        """Delete delivered rows."""

    async def retry_later(self, ids: list[int], not_before: float, fault: str = "") -> None:
        """Release leased rows, not to be leased again before ``not_before``. ``fault`` says
        why the delivery failed (e.g. "HTTP 301 redirect"), for ``segproxy queue stats``."""

    async def dead_letter(self, ids: list[int], status: int, reason: str, now: float) -> None:
        """Move rows Segment refused for good to the dead-letter store."""

    async def next_ready(self, exclude_keys: frozenset[str] = frozenset()) -> float | None:
        """The earliest ``not_before`` of an unleased row (not of ``exclude_keys``), or None."""

    async def stats(self) -> QueueStats: ...

    def depth(self) -> tuple[int, int]:
        """Queued events and the bytes they count against the caps, from the counters the
        queue keeps in memory (no I/O: for /metrics)."""

    async def oldest(self) -> float | None:
        """``received_at`` of the oldest queued event (by arrival order), or None: a cheap
        read, whatever the backlog (for /metrics)."""

    def has_room(self) -> bool:
        """Cheap check for readiness and fast rejection; ``put`` still enforces caps."""

    async def recount(self) -> None:
        """Re-read counters from storage (another process may have changed it)."""

    async def close(self) -> None: ...


# How the forwarder sends an event row (forward/batcher.py): its stored ``body`` with
# ``,"sentAt":"..."`` put back as its last member, holding the row's ``sent_at`` as it came or
# moved forward by the time the event waited, written then in analytics.js's 24-character
# form. So a row is sent as ``len(body) + SENT_AT_MEMBER_BYTES + max(len(sent_at),
# SENT_AT_MOVED_CHARS)`` bytes at most (for a sent_at JSON writes without escapes, as ingest
# accepts); ingest checks Segment's 32 KB per event on that (ingest/prepare.py).
SENT_AT_MEMBER_BYTES = len(b',"sentAt":""')
SENT_AT_MOVED_CHARS = len("2026-01-01T00:00:00.000Z")
