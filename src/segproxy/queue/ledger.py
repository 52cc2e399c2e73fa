"""What the queue file records beside the events: the last delivery fault per write key, and
the dead letters' own cap (SQLite; the memory backend keeps the same in memory).

- **The last fault per write key** (``faults``): each ``retry_later`` records why the delivery
  failed ("HTTP 503", "HTTP 301 redirect to https://...") with its time, in the transaction
  that releases the rows, so ``segproxy queue stats`` (another process) shows it per key. The
  last one is kept with its time (its age tells whether it is still happening); it is shown
  for the keys that still have events queued, and ``segproxy queue purge`` forgets it.
- **Dead letters have a cap of their own** (``queue.max_dead_bytes``), separate from the queue's,
  so dead letters never block the queue: past it the OLDEST dead letters are deleted in the
  transaction that adds the new ones, counted in ``meta`` (``dead_evicted``, shown by
  ``segproxy queue stats``) and logged at WARNING by the caller. Never silent.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from segproxy.queue.base import ROW_OVERHEAD

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS faults (
    write_key TEXT PRIMARY KEY,
    fault TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def fill_dead_sizes(db: sqlite3.Connection) -> None:
    """A dead letter's ``size`` is its event's stored size (base.stored_size: key, body,
    sentAt, per-row overhead) plus Segment's reason; dead letters from before the column
    existed get theirs here, at open."""
    db.execute(
        "UPDATE dead SET size = length(write_key) + length(body) + coalesce(length(sent_at), 0)"
        " + length(reason) + ? WHERE size = 0",
        (ROW_OVERHEAD,),
    )


def record_faults(db: sqlite3.Connection, keys: Iterable[str], fault: str, at: float) -> None:
    """Inside a transaction: ``fault`` is now the last one of each of ``keys``."""
    db.executemany(
        "INSERT OR REPLACE INTO faults (write_key, fault, at) VALUES (?, ?, ?)",
        [(k, fault, at) for k in sorted(set(keys))],
    )


def record_faults_of_rows(db: sqlite3.Connection, ids: list[int], fault: str, at: float) -> None:
    """Inside a transaction: the same, for the keys of rows of ``events`` (by id)."""
    marks = ",".join("?" * len(ids))  # placeholders only: the values are bound
    sql = f"INSERT OR REPLACE INTO faults (write_key, fault, at) SELECT DISTINCT write_key, ?, ? FROM events WHERE id IN ({marks})"  # noqa: S608, E501
    db.execute(sql, [fault, at, *ids])


def faults(db: sqlite3.Connection) -> dict[str, tuple[str, float]]:
    rows = db.execute("SELECT write_key, fault, at FROM faults").fetchall()
    return {str(k): (str(f), float(a)) for k, f, a in rows}


def dead_bytes(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT coalesce(sum(size), 0) FROM dead").fetchone()[0])


def dead_evicted(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'dead_evicted'").fetchone()
    return 0 if row is None else int(row[0])


def evict_dead(db: sqlite3.Connection, cap: int) -> tuple[int, int, int]:
    """Inside a transaction: if the dead letters are over ``cap`` bytes, delete the oldest
    until they fit, and count them; returns how many, their bytes, and the bytes left."""
    total = dead_bytes(db)
    excess = total - cap
    if excess <= 0:
        return 0, 0, total
    count = freed = 0
    last = 0
    for i, size in db.execute("SELECT id, size FROM dead ORDER BY id"):
        count += 1
        freed += int(size)
        last = int(i)
        if freed >= excess:
            break
    db.execute("DELETE FROM dead WHERE id <= ?", (last,))
    db.execute(
        "INSERT INTO meta (name, value) VALUES ('dead_evicted', ?)"
        " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        (count,),
    )
    return count, freed, total - freed
