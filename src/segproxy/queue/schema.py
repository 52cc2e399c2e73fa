"""The queue file: its tables and migrations, how a connection to it is set up, the one
transaction helper every write goes through, and the SQL the proxy and the CLI (admin.py)
share. Invariants: see the package's docstring (``queue/__init__.py``).
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from segproxy.queue.base import (
    ROW_OVERHEAD,
    DeadRow,
    KeyStats,
    NewRow,
    QueueStats,
    Row,
    stored_size,
)
from segproxy.queue.ledger import LEDGER_SCHEMA, dead_evicted, faults
from segproxy.queue.packs import unpack_rows

# events.id: max(id) + 1 (no AUTOINCREMENT: a sqlite_sequence write per commit costs more than
# it is worth). An id can come back after its row was deleted; nothing refers to a deleted row
# by then (the forwarder's bookkeeping for it ends before any later commit is handed over).
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    write_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    received_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    sent_at TEXT
);
DROP INDEX IF EXISTS events_not_before;
DROP INDEX IF EXISTS events_retry;
CREATE INDEX IF NOT EXISTS events_retry_by_key ON events(write_key, not_before)
    WHERE not_before > 0;
CREATE TABLE IF NOT EXISTS packs (
    id INTEGER PRIMARY KEY,
    rows INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_spills (
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (seq, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    write_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    received_at REAL NOT NULL,
    died_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    body BLOB NOT NULL,
    sent_at TEXT
);
"""
    + LEDGER_SCHEMA
)

# Columns added after the first release of the schema: (table, column, declaration).
MIGRATIONS = (
    ("events", "sent_at", "TEXT"),
    ("dead", "sent_at", "TEXT"),
    ("dead", "size", "INTEGER NOT NULL DEFAULT 0"),
)

CHUNK = 500  # ids per statement
# Database mode's index of fresh rows per key: built on entering it, dropped on leaving, so
# memory mode's INSERTs never pay for it (invariant 8).
FRESH_INDEX = (
    "CREATE INDEX IF NOT EXISTS events_fresh ON events(write_key, id) WHERE not_before = 0"
)
DROP_FRESH_INDEX = "DROP INDEX IF EXISTS events_fresh"
# Pages of a new queue file: at 1-2 KB per event, 32 KB pages cost about half the CPU per
# INSERT + DELETE of 4 KB ones. (A file made with other pages keeps them, see use_page_size.)
PAGE_SIZE = 32 * 1024
WAL_CHECKPOINT_BYTES = 32 * 1024 * 1024  # the WAL starts over once it is this big
WAL_KEEP_BYTES = 64 * 1024 * 1024  # a WAL file that grew bigger is cut back to this

INSERT_NEW = (  # NewRow's own fields, in order: no tuple built per row
    "INSERT INTO events (write_key, kind, received_at, body, sent_at, size)"
    " VALUES (?1, ?2, ?3, ?4, ?5,"
    f" length(?4) + length(?1) + coalesce(length(?5), 0) + {ROW_OVERHEAD})"
)
INSERT_ROW = (
    "INSERT INTO events (write_key, kind, received_at, not_before, attempts, size, body, sent_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


class Transaction:
    """``with Transaction(db):`` BEGIN IMMEDIATE ... COMMIT, rolled back if the block or the
    COMMIT fails. Every transaction on a queue file goes through it: the proxy's and the CLI's.

    ``Transaction(db, synchronous)`` is a bookkeeping transaction (invariant 5): atomic, not
    fsynced. The connection, set to ``synchronous`` (FULL), runs it with ``synchronous = OFF``
    and is set back after; NORMAL needs nothing (a WAL commit is not fsynced then anyway).
    ``Transaction(db, synchronous, durable=True)`` is a spill (invariant 12): its commit is
    fsynced whatever the connection's setting.

    A class, not a ``contextlib.contextmanager``: compiled, entering and leaving it are two
    native calls, where a generator-based one runs contextlib's interpreted frames on each
    commit and each delivery's transaction (docs/architecture.md, "Writing code that compiles
    the same").
    """

    __slots__ = ("db", "during", "restore")

    def __init__(
        self, db: sqlite3.Connection, synchronous: str = "NORMAL", durable: bool = False
    ) -> None:
        self.db = db
        if durable:
            self.during = "" if synchronous == "FULL" else "FULL"
        else:
            self.during = "" if synchronous == "NORMAL" else "OFF"
        self.restore = synchronous if self.during else ""  # "": left alone

    def __enter__(self) -> sqlite3.Connection:
        db = self.db
        if self.during:
            db.execute(f"PRAGMA synchronous = {self.during}")
        try:
            db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._set_back()
            raise
        return db

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db = self.db
        try:
            if typ is None:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            elif db.in_transaction:
                db.execute("ROLLBACK")
        finally:
            self._set_back()

    def _set_back(self) -> None:
        if self.restore:
            self.db.execute(f"PRAGMA synchronous = {self.restore}")


def connect(path: str | os.PathLike[str], synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open (and create) a queue database; also used by the CLI on a live proxy's file."""
    db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only on a new file
    # Deleted events are cleared from the pages that stay in use, but a freed page (a pack's
    # overflow) is not rewritten with zeros: Debian builds SQLite with secure_delete on, which
    # wrote every delivered pack a second time (measured: about +4-8% durable req/s). See
    # docs/threat-model.md, "Queue file in cleartext".
    db.execute("PRAGMA secure_delete = FAST")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.executescript(SCHEMA)
    for table, column, decl in MIGRATIONS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    return db


def use_page_size(db: sqlite3.Connection, path: str) -> int:
    """The proxy's connection at open: a small file from a release with 4 KB pages is rebuilt
    with PAGE_SIZE (a page size changes only outside WAL mode, by VACUUM; a big file keeps its
    pages), and the WAL's bounds are set for the page size the file has; returns it."""
    page = int(db.execute("PRAGMA page_size").fetchone()[0])
    if page != PAGE_SIZE and os.path.getsize(path) <= 16 * 1024 * 1024:
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute("VACUUM")
        db.execute("PRAGMA journal_mode = WAL")
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
    db.execute(f"PRAGMA wal_autocheckpoint = {max(WAL_CHECKPOINT_BYTES // page, 16)}")
    db.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
    return page


def chunks(ids: list[int]) -> list[list[int]]:
    """``ids`` in lists of CHUNK at most: one statement each (SQLite bounds its parameters)."""
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


def marks(ids: list[int]) -> str:
    """The ``?`` placeholders of ``IN (...)`` for ``ids``: the only SQL built from data here
    (the values are always bound)."""
    return ",".join("?" * len(ids))


def event_values(rows: Iterable[Row], not_before: float, more_attempts: int) -> list[Any]:
    """INSERT_ROW's parameters for ``rows`` (packed events becoming rows of ``events``)."""
    return [
        (
            r.write_key,
            r.kind,
            r.received_at,
            not_before,
            r.attempts + more_attempts,
            stored_size(r.write_key, r.body, r.sent_at),
            r.body,
            r.sent_at,
        )
        for r in rows
    ]


def insert_rows(db: sqlite3.Connection, rows: list[NewRow]) -> int:
    """Inside a transaction: a commit as rows of ``events``; returns the last one's id."""
    db.executemany(INSERT_NEW, rows)
    # One writer holds the lock: each row got max(id) + 1, so the ids run on.
    return int(db.execute("SELECT last_insert_rowid()").fetchone()[0])


def turn_packs_into_rows(db: sqlite3.Connection) -> int:
    """At open, inside a transaction: the events of the packs a previous process left become
    rows of ``events`` (invariant 10), and the packs are deleted; returns how many events."""
    count = 0
    for (body,) in db.execute("SELECT body FROM packs ORDER BY id").fetchall():
        rows = unpack_rows(body)
        db.executemany(INSERT_NEW, rows)
        count += len(rows)
    db.execute("DELETE FROM packs")
    return count


def counts(db: sqlite3.Connection) -> tuple[int, int]:
    """The queued events and their bytes, rows and packs together."""
    rows, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM events").fetchone()
    packed, packed_size = db.execute(
        "SELECT coalesce(sum(rows), 0), coalesce(sum(size), 0) FROM packs"
    ).fetchone()
    return int(rows) + int(packed), int(size) + int(packed_size)


def oldest_of(db: sqlite3.Connection) -> float | None:
    """When the first queued event still there arrived: the lowest id of the rows and of the
    packs (ids grow with arrival), two reads by primary key whatever the backlog."""
    found: list[float] = []
    row = db.execute("SELECT received_at FROM events ORDER BY id LIMIT 1").fetchone()
    if row is not None:
        found.append(float(row[0]))
    pack = db.execute("SELECT body FROM packs ORDER BY id LIMIT 1").fetchone()
    if pack is not None:
        found += [r.received_at for r in unpack_rows(pack[0])[:1]]
    return min(found) if found else None


def stats_of(db: sqlite3.Connection, journal: Iterable[NewRow | Row] = ()) -> QueueStats:
    """What ``segproxy queue stats`` shows: rows, packs (a file from before the journal) and
    ``journal``, the events the journal holds (invariant 12), together."""
    out = QueueStats()
    for key, rows, size, oldest in db.execute(
        "SELECT write_key, count(*), sum(size), min(received_at) FROM events GROUP BY write_key"
    ):
        out.per_key[str(key)] = KeyStats(int(rows), int(size), float(oldest))
        out.rows += int(rows)
        out.bytes += int(size)
        out.oldest = float(oldest) if out.oldest is None else min(out.oldest, float(oldest))
    packed = [r for (body,) in db.execute("SELECT body FROM packs") for r in unpack_rows(body)]
    for row in itertools.chain(packed, journal):
        size = stored_size(row.write_key, row.body, row.sent_at)
        for tally in (out.per_key.setdefault(row.write_key, KeyStats()), out):
            tally.rows += 1
            tally.bytes += size
            if tally.oldest is None or row.received_at < tally.oldest:
                tally.oldest = row.received_at
    for key, (fault, at) in faults(db).items():  # shown for the keys still queued
        if key in out.per_key:
            out.per_key[key].last_fault, out.per_key[key].last_fault_at = fault, at
    dead, dead_size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM dead").fetchone()
    out.dead, out.dead_bytes = int(dead), int(dead_size)
    out.dead_evicted = dead_evicted(db)
    return out


def dead_of(db: sqlite3.Connection, limit: int) -> list[DeadRow]:
    """The oldest ``limit`` dead letters."""
    return [
        DeadRow(int(i), str(k), float(r), float(d), int(s), str(reason), bytes(b))
        for i, k, r, d, s, reason, b in db.execute(
            "SELECT id, write_key, received_at, died_at, status, reason, body FROM dead"
            " ORDER BY id LIMIT ?",
            (limit,),
        )
    ]
