"""Operating a queue from the CLI, also while a proxy is running on it.

SQLite's WAL lets these read while the proxy writes; writes (replay, purge) take the database
lock for one short transaction per chunk, so the proxy is never blocked for long. The proxy
re-reads its counters every few seconds, so caps stay true after a purge or replay. The
journal (``<path>.journal``) is read without being owned, and never written here: a purge
stamps the journal's next seq in the file, which drops the journal's older events (spill.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segproxy.queue.base import ROW_OVERHEAD, DeadRow, QueueStats
from segproxy.queue.schema import Transaction, chunks, connect, dead_of, marks, stats_of
from segproxy.queue.spill import mark_purge, purged_below, read_journal
from segproxy.redact import mask


class NoQueue(FileNotFoundError):
    pass


def open_existing(path: str) -> sqlite3.Connection:
    if not Path(path).exists():
        raise NoQueue(f"no queue at {path} (is [queue] path right, and has the proxy run?)")
    return connect(path)


def stats(path: str) -> QueueStats:
    """Everything queued, in the file and in the journal."""
    db = open_existing(path)
    try:
        return stats_of(db, read_journal(path, db)[0])
    finally:
        db.close()


def stats_json(s: QueueStats, now: float) -> dict[str, Any]:
    return {
        "rows": s.rows,
        "bytes": s.bytes,
        "oldest_age_seconds": None if s.oldest is None else round(now - s.oldest, 3),
        "dead": s.dead,
        "dead_bytes": s.dead_bytes,
        "dead_evicted": s.dead_evicted,
        "per_key": {
            mask(k): {
                "rows": v.rows,
                "bytes": v.bytes,
                "oldest_age_seconds": None if v.oldest is None else round(now - v.oldest, 3),
                "last_fault": v.last_fault or None,
                "last_fault_age_seconds": (
                    None if v.last_fault_at is None else round(now - v.last_fault_at, 3)
                ),
            }
            for k, v in sorted(s.per_key.items())
        },
    }


def dead(path: str, limit: int) -> list[DeadRow]:
    db = open_existing(path)
    try:
        return dead_of(db, limit)
    finally:
        db.close()


def dead_body(path: str, dead_id: int) -> bytes | None:
    """One dead letter's stored event (None: no such dead letter)."""
    db = open_existing(path)
    try:
        row = db.execute("SELECT body FROM dead WHERE id = ?", (dead_id,)).fetchone()
        return None if row is None else bytes(row[0])
    finally:
        db.close()


def masked_event(body: bytes) -> Any:
    """A dead letter's event for the operator's screen: a ``writeKey`` in it (a client may
    send the key in the body) is masked like every other write key shown."""
    event = json.loads(body)
    if isinstance(event, dict) and isinstance(event.get("writeKey"), str):
        event["writeKey"] = mask(event["writeKey"])
    return event


def replay(
    path: str, ids: list[int] | None = None, progress: Callable[[int, int], None] | None = None
) -> int:
    """Move dead letters (all, or ``ids``) back into the queue; returns how many moved.

    They come back as rows of kind "replay" (metrics stay "metrics"): the forwarder sends
    each alone, so Segment's answer is about that event only; one that dies again is a dead
    letter again, still of kind "replay"."""
    db = open_existing(path)
    try:
        if ids is None:
            todo = [int(r[0]) for r in db.execute("SELECT id FROM dead ORDER BY id")]
        else:
            todo = [
                int(r[0])
                for r in db.execute(
                    f"SELECT id FROM dead WHERE id IN ({marks(ids)}) ORDER BY id",
                    ids,
                )
            ]
        done = 0
        for chunk in chunks(todo):
            in_chunk = marks(chunk)
            with Transaction(db):
                db.execute(
                    "INSERT INTO events (write_key, kind, received_at, size, body, sent_at)"
                    " SELECT write_key, CASE kind WHEN 'metrics' THEN 'metrics' ELSE 'replay' END,"
                    " received_at, length(write_key) + length(body)"
                    " + coalesce(length(sent_at), 0) + ?, body, sent_at FROM dead"
                    f" WHERE id IN ({in_chunk}) ORDER BY id",
                    [ROW_OVERHEAD, *chunk],
                )
                db.execute(f"DELETE FROM dead WHERE id IN ({in_chunk})", chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, len(todo))
        return done
    finally:
        db.close()


def purge(path: str, dead_only: bool = False) -> tuple[int, int]:
    """Delete queued events (unless ``dead_only``) and dead letters; returns both counts.
    Events in the journal are dropped by the purge's stamp (spill.py): those a running proxy
    handed to its forwarder already still go out."""
    db = open_existing(path)
    try:
        events = 0
        # Read before the transaction (reading a journal takes a while; the proxy's writes
        # to the file wait for the transaction): what is committed meanwhile gets a seq at
        # or above next_seq, and stays.
        journal, next_seq = ([], 0) if dead_only else read_journal(path, db)
        with Transaction(db):
            if not dead_only:
                packed = db.execute("SELECT coalesce(sum(rows), 0) FROM packs").fetchone()[0]
                events = db.execute("DELETE FROM events").rowcount + int(packed) + len(journal)
                db.execute("DELETE FROM packs")
                db.execute("DELETE FROM faults")  # about events no longer queued
                mark_purge(db, max(next_seq, purged_below(db)))
            dead_rows = db.execute("DELETE FROM dead").rowcount
        return events, dead_rows
    finally:
        db.close()


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total == 0 else int(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def now() -> float:
    return time.time()
