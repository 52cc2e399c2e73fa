"""The forwarder's side of the queue: leasing in database mode, when the next row is ready,
and what a delivery, a retry, a dead letter and the move out of the journal write.

:class:`Bookkeeper` holds the jobs (run by the queue's JobRunner, in order, on its one
connection): each plans its write from memory (the pack book) when it runs, writes it (rows
in one bookkeeping transaction, invariant 5; events of the journal as a RELEASE, after the
spill that stores them elsewhere is durable, invariant 12), and only then changes memory:
write, then remember (invariant 11 in ``queue/__init__.py``). The functions below it are
their SQL, each run inside the transaction; invariant 8 says why database mode reads
through the two indexes.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, cast

from segproxy.queue.base import Row, RowKind, stored_size
from segproxy.queue.journal import Journal
from segproxy.queue.ledger import evict_dead, record_faults, record_faults_of_rows
from segproxy.queue.packs import Leaving, PackBook, pack_of
from segproxy.queue.schema import (
    DROP_FRESH_INDEX,
    FRESH_INDEX,
    INSERT_ROW,
    Transaction,
    chunks,
    event_values,
)
from segproxy.queue.schema import marks as marks_for
from segproxy.queue.spill import forget_spills, purged_below, record_spills

log = logging.getLogger("segproxy.queue")

# Journal events that left the queue: how many, and the bytes they counted for (base.stored_size).
Freed = tuple[int, int]

ROW_COLUMNS = "id, write_key, kind, received_at, attempts, body, sent_at"
INSERT_DEAD = (
    "INSERT INTO dead (write_key, kind, received_at, died_at, attempts, status,"
    " reason, body, sent_at, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class Bookkeeper:
    """The bookkeeping jobs on the queue's connection (made when the file is open)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        synchronous: str,
        packs: PackBook,
        lease_seconds: float,
        max_dead_bytes: int,
        journal: Journal | None,
    ) -> None:
        self.db = db
        self.journal = journal  # None: it could not be opened, and nothing is in it
        self.synchronous = synchronous  # the connection's: see schema.Transaction
        self.packs = packs  # shared with the queue, which adds each pack it commits
        self.lease_seconds = lease_seconds
        self.max_dead_bytes = max_dead_bytes
        # Bytes of dead letters, read and set by the jobs only (stale after the CLI's replay
        # or purge until a recount; the file decides before anything is evicted).
        self.dead_bytes = 0
        self.spills = 0  # entries in journal_spills, forgotten as the journal frees segments

    def _transaction(self, leaving: Leaving | None = None) -> Transaction:
        """A bookkeeping transaction; a spill's (it stores events of the journal) is durable
        before their RELEASE is written (invariant 12)."""
        durable = leaving is not None and bool(leaving.packed)
        return Transaction(self.db, self.synchronous, durable)

    def _release(self, leaving: Leaving) -> None:
        """The RELEASE of the journal events in ``leaving`` (after what stored them elsewhere
        is durable), then the oldest segments freed if they may be (J7)."""
        journal = self.journal
        if not leaving.releases or journal is None:
            return
        journal.append([], leaving.releases)
        if journal.reclaim() and self.spills:
            self.spills = forget_spills(self.db, journal.floor)

    def lease(self, now: float, max_rows: int, exclude: frozenset[str]) -> tuple[list[Row], bool]:
        """Database mode (invariant 8): per key, the oldest ready rows, by index; and whether
        that caught up with the file."""
        with self._transaction() as db:
            return lease_rows(db, now, max_rows, exclude, now + self.lease_seconds)

    def next_ready(self, exclude: frozenset[str]) -> float | None:
        return next_ready_at(self.db, exclude)

    def ack(self, ids: list[int]) -> Freed:
        """Delivered: rows deleted (one transaction), journal events released; returns what
        left the journal."""
        leaving = self.packs.plan(ids)
        if leaving.rows:
            with self._transaction() as db:
                delete_rows(db, leaving.rows)
        self._release(leaving)
        self.packs.remember(leaving)
        return _freed(leaving.packed)

    def retry(self, ids: list[int], not_before: float, fault: str, now: float) -> None:
        """Released for a retry: journal events become rows (invariant 12)."""
        leaving = self.packs.plan(ids)
        with self._transaction(leaving) as db:
            retry_rows(db, leaving.rows, leaving.packed, not_before, fault, now)
            spills = record_spills(db, leaving.packed)
        self.spills += spills
        self._release(leaving)
        self.packs.remember(leaving)

    def bury(self, ids: list[int], status: int, reason: str, now: float) -> Freed:
        """Move rows (by id) and packed events (from memory) to ``dead``, in one transaction,
        evicting the oldest dead letters past their cap (logged); returns what left the
        journal. (The dead letters' byte counter is the jobs' own: each job reads it and,
        once its transaction committed, sets it.)"""
        leaving = self.packs.plan(ids)
        with self._transaction(leaving) as db:
            added = bury_rows(db, leaving.rows, leaving.packed, status, reason, now)
            spills = record_spills(db, leaving.packed)
            # The counter says when to look (no scan per dead letter); the file decides (the
            # CLI may have replayed or purged meanwhile).
            evicted, freed, total = 0, 0, self.dead_bytes + added
            if total > self.max_dead_bytes:
                evicted, freed, total = evict_dead(db, self.max_dead_bytes)
        self.spills += spills
        self._release(leaving)
        self.packs.remember(leaving)
        self.dead_bytes = total
        if evicted:
            log.warning(
                "dead letters over queue.max_dead_bytes (%d): evicted the %d oldest (%d bytes);"
                " see segproxy queue stats",
                self.max_dead_bytes,
                evicted,
                freed,
            )
        return _freed(leaving.packed)

    def move(self, ids: list[int]) -> None:
        """Leaving memory mode: journal events handed over become rows of ``events``, those
        committed since the last purge (if the write fails they stay in the journal, sent
        again after a restart)."""
        leaving = self.packs.plan(ids)
        with self._transaction(leaving) as db:
            purged = purged_below(db)
            kept = [r for r in leaving.packed if pack_of(r.id) >= purged]
            db.executemany(INSERT_ROW, event_values(kept, 0.0, 0))
            spills = record_spills(db, kept)
        self.spills += spills
        self._release(leaving)
        self.packs.remember(leaving)

    def mark_leased(self, ids: list[int]) -> None:
        """Leaving memory mode: rows leased from memory are marked leased in the file, so a
        database-mode lease does not hand them out again (invariant 7)."""
        with self._transaction() as db:
            mark_leased(db, ids)


def _freed(packed: list[Row]) -> Freed:
    return len(packed), sum(stored_size(r.write_key, r.body, r.sent_at) for r in packed)


def keys_with_rows(db: sqlite3.Connection, exclude: frozenset[str]) -> list[str]:
    """Write keys with fresh or retried rows, not in ``exclude``: one index seek per key."""
    db.execute(FRESH_INDEX)  # database mode has it (a no-op then); made here if it does not
    keys: set[str] = set()
    for index, where in (
        ("events_fresh", "not_before = 0"),
        ("events_retry_by_key", "not_before > 0"),
    ):
        sql = f"SELECT min(write_key) FROM events INDEXED BY {index} WHERE {where}"
        key = db.execute(sql).fetchone()[0]
        while key is not None:
            keys.add(key)
            key = db.execute(sql + " AND write_key > ?", (key,)).fetchone()[0]
    return sorted(k for k in keys if k not in exclude)


def ready_ids(
    db: sqlite3.Connection, now: float, max_rows: int, exclude: frozenset[str]
) -> list[int]:
    """Per key, the oldest fresh rows and the due retried ones, by index; the first
    ``max_rows`` of them by id."""
    ids: list[int] = []
    for key in keys_with_rows(db, exclude):
        ids += [
            r[0]
            for r in db.execute(
                "SELECT id FROM events INDEXED BY events_fresh WHERE write_key = ?"
                " AND not_before = 0 AND lease_until = 0 ORDER BY id LIMIT ?",
                (key, max_rows),
            )
        ]
        ids += [
            r[0]
            for r in db.execute(
                "SELECT id FROM events INDEXED BY events_retry_by_key"
                " WHERE write_key = ? AND not_before > 0 AND not_before <= ?"
                " AND lease_until = 0 ORDER BY not_before LIMIT ?",
                (key, now, max_rows),
            )
        ]
    return sorted(ids)[:max_rows]


def lease_rows(
    db: sqlite3.Connection, now: float, max_rows: int, exclude: frozenset[str], until: float
) -> tuple[list[Row], bool]:
    """Database mode (invariant 8): lease up to ``max_rows`` ready rows until ``until``;
    also whether that leased every unleased row of the file (then the fresh rows' index is
    dropped: back in memory mode, INSERTs skip it)."""
    found: list[Any] = []
    for chunk in chunks(ready_ids(db, now, max_rows, exclude)):
        marks = marks_for(chunk)
        found += db.execute(
            f"SELECT {ROW_COLUMNS} FROM events WHERE id IN ({marks}) ORDER BY id", chunk
        ).fetchall()
        db.execute(f"UPDATE events SET lease_until = ? WHERE id IN ({marks})", [until, *chunk])
    caught_up = (
        len(found) < max_rows
        and db.execute("SELECT 1 FROM events WHERE lease_until = 0 LIMIT 1").fetchone() is None
    )
    if caught_up:
        db.execute(DROP_FRESH_INDEX)
    rows = [
        Row(int(r[0]), str(r[1]), cast(RowKind, r[2]), float(r[3]), int(r[4]), bytes(r[5]), r[6])
        for r in found
    ]
    return rows, caught_up


def next_ready_at(db: sqlite3.Connection, exclude: frozenset[str]) -> float | None:
    """Database mode (invariant 8): 0.0 if a fresh row is ready, else the earliest retry."""
    keys = keys_with_rows(db, exclude)
    for key in keys:
        fresh = db.execute(
            "SELECT 1 FROM events INDEXED BY events_fresh WHERE write_key = ?"
            " AND not_before = 0 AND lease_until = 0 LIMIT 1",
            (key,),
        ).fetchone()
        if fresh is not None:
            return 0.0
    earliest: float | None = None
    for key in keys:
        row = db.execute(
            "SELECT not_before FROM events INDEXED BY events_retry_by_key WHERE write_key = ?"
            " AND not_before > 0 AND lease_until = 0 ORDER BY not_before LIMIT 1",
            (key,),
        ).fetchone()
        if row is not None and (earliest is None or row[0] < earliest):
            earliest = float(row[0])
    return earliest


def mark_leased(db: sqlite3.Connection, ids: list[int]) -> None:
    """Rows marked leased (by no one in the file: until the process ends, invariant 3)."""
    for chunk in chunks(ids):
        db.execute(
            f"UPDATE events SET lease_until = ? WHERE id IN ({marks_for(chunk)})", [1.0, *chunk]
        )


def delete_rows(db: sqlite3.Connection, ids: list[int]) -> None:
    """Delivered rows: deleted by id ranges when they run on (the usual batch), else by id."""
    ordered = sorted(ids)
    runs: list[tuple[int, int]] = []
    for i in ordered:
        if runs and i <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    if len(runs) <= 16:
        db.executemany("DELETE FROM events WHERE id BETWEEN ? AND ?", runs)
        return
    for chunk in chunks(ordered):
        db.execute(f"DELETE FROM events WHERE id IN ({marks_for(chunk)})", chunk)


def retry_rows(
    db: sqlite3.Connection,
    ids: list[int],
    packed: list[Row],
    not_before: float,
    fault: str,
    now: float,
) -> None:
    """Released for a retry after ``not_before``: rows of ``events`` (by id) are updated,
    packed events become rows (invariant 10); ``fault`` is recorded for their keys."""
    for chunk in chunks(ids):
        if fault:
            record_faults_of_rows(db, chunk, fault, now)
        db.execute(
            "UPDATE events SET lease_until = 0, not_before = ?, attempts = attempts + 1"
            f" WHERE id IN ({marks_for(chunk)})",
            [not_before, *chunk],
        )
    if fault and packed:
        record_faults(db, (r.write_key for r in packed), fault, now)
    db.executemany(INSERT_ROW, event_values(packed, not_before, 1))


def bury_rows(
    db: sqlite3.Connection, ids: list[int], packed: list[Row], status: int, reason: str, now: float
) -> int:
    """Refused for good: rows (by id) and packed events (from memory) move to ``dead`` with
    Segment's status and reason; returns the bytes the new dead letters take."""
    before = int(db.execute("SELECT coalesce(max(id), 0) FROM dead").fetchone()[0])
    db.executemany(INSERT_DEAD, [_dead_values(r, now, status, reason) for r in packed])
    for chunk in chunks(ids):
        marks = marks_for(chunk)
        db.execute(
            "INSERT INTO dead (write_key, kind, received_at, died_at, attempts, status,"
            " reason, body, sent_at, size) SELECT write_key, kind, received_at, ?,"
            " attempts + 1, ?, ?, body, sent_at, size + length(?)"
            f" FROM events WHERE id IN ({marks})",
            [now, status, reason, reason, *chunk],
        )
        db.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)
    added = db.execute("SELECT coalesce(sum(size), 0) FROM dead WHERE id > ?", (before,))
    return int(added.fetchone()[0])


def _dead_values(row: Row, died_at: float, status: int, reason: str) -> tuple[object, ...]:
    return (
        row.write_key,
        row.kind,
        row.received_at,
        died_at,
        row.attempts + 1,
        status,
        reason,
        row.body,
        row.sent_at,
        stored_size(row.write_key, row.body, row.sent_at) + len(reason),
    )
