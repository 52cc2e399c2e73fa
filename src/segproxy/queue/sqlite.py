"""The durable queue: SQLite in WAL mode, written by one thread, with group commit.

Invariants, in the order things happen (see base.py for the contract):

1. **Write, commit, then acknowledge.** ``put`` hands its rows to the writer (invariant 9) and
   returns only after the transaction holding them has committed. Rows that arrive while a
   commit is pending wait and share the next transaction (group commit). What "committed"
   survives is ``[queue] synchronous``:
   - ``normal`` (default): the commit is written to the WAL file before the 200, so it survives
     the process being killed (SIGKILL, OOM, crash) and a clean reboot; the WAL is fsynced at
     each checkpoint (every 0.2 s or so when there are new commits, invariant 6), so a power
     cut or kernel crash can lose at most the last fraction of a second.
   - ``full``: every commit is fsynced before the 200, so it survives a power cut as well, at
     the price of one fsync per group commit (0.2 ms on the bench machine, more on many cloud
     disks), which bounds throughput.
2. **Delete only on delivery.** A row leaves ``events`` (or an event its pack, invariant 10)
   only through ``ack`` (Segment accepted it) or ``dead_letter`` (moved, in the same
   transaction, to ``dead`` with the status and body); an event leaves its pack also by
   becoming a row of ``events``, in the transaction that shrinks the pack.
3. **Leases die with their process.** A leased row carries ``lease_until > 0``. One process owns
   a queue file at a time (an exclusive ``flock`` on ``<path>.lock``), so at open, every lease
   left in the file belongs to a process that is gone: they are all cleared, and those rows are
   sent again (at-least-once; Segment de-duplicates on ``messageId``).
4. **Full means 503, never a drop.** ``put`` refuses (``QueueFull``) when the queued rows or bytes
   (every byte stored: key, body, sentAt and a per-row overhead, base.stored_size) would pass
   their caps, when the disk's free space is under its floor, or when SQLite itself
   reports the disk full; the failed transaction is rolled back, the file stays consistent.

5. **Only acknowledgements pay for fsync.** The forwarder's bookkeeping (lease, retry, ack,
   dead-letter) commits with ``synchronous=OFF``: losing it in a power cut only means rows are
   sent again, which invariant 3 already allows. The next client commit's fsync of the WAL
   makes it durable anyway.
6. **The WAL stays bounded and is synced regularly.** SQLite starts the WAL over only when a
   write begins with all of it copied into the file, which steady commits may never let a
   checkpoint from another connection see. With ``full``, the writer thread checkpoints
   itself every 32 MB (SQLite's autocheckpoint) and a checkpointer thread runs a PASSIVE
   checkpoint about once a second, which fsyncs the WAL when traffic is too light to reach
   it. With ``normal`` (loop mode, invariant 9), the loop never checkpoints: the checkpointer
   thread runs a PASSIVE checkpoint every 0.2 s and, once the WAL passes 32 MB, a RESTART
   one, so the next commit starts the WAL over (without it, the WAL grew by everything
   written: 2 GB in 12 s of the benchmark). The loop's jobs wait while it runs (a few ms: it
   copies what the PASSIVE one left); it waits at most 50 ms for other connections (a long
   ``segproxy queue stats``), then gives up for 2 s. Either way the WAL file is cut back to
   64 MB.

7. **Committed rows reach the forwarder in memory.** Leases live in this process only
   (invariant 3), so in the steady state the forwarder is handed each commit's rows as they
   are committed (*memory mode*) and the database is only written: INSERT, then DELETE on
   ack, no lease UPDATE and no SELECT. Memory mode holds while every unleased row in the file
   is in that hand-over list. Anything that breaks this switches to *database mode* (the list
   is dropped, rows leased from memory are marked leased in the file, and leases are SELECTed
   from the file as before): rows already in the file at open, a ``retry_later``, a
   hand-over list over its bound (a backlog: Segment slow or down), or another process
   writing the file (``segproxy queue replay``, seen through ``PRAGMA data_version``). A
   database-mode lease that finds no unleased row left switches back. The writer thread
   runs jobs in order and their results reach the loop in the same order, which is what
   makes each switch exact: a commit the switching lease did not see is handed over in
   memory, one it saw is not.

8. **Database mode costs the batch, not the backlog.** It leases per write key through two
   partial indexes (fresh rows by key and id, built only while in database mode; retried rows
   by key and ``not_before``, always there and empty in the steady state), so a lease or a
   ``next_ready`` costs about the rows it returns plus those in flight, whatever the backlog
   and whichever keys are excluded. (Scanning the table each time made draining a backlog
   quadratic: an hour of events took most of an hour to drain.)

9. **Loop mode: with ``normal``, the jobs run on the event loop.** A commit then never waits
   for the disk (the WAL write lands in the page cache; every fsync is the checkpointer's),
   and on one core a writer thread costs more in GIL and thread hand-offs than the work it
   takes off the loop (measured: durable ingest 27-28k -> 34-35k req/s). The jobs run in
   order, each result delivered before the next job runs, in one loop callback for all that
   are queued, so a group commit holds everything read in that round of the loop. The loop
   never waits for a lock (``busy_timeout = 0``): a job that finds the file locked (the CLI
   replaying, the checkpointer restarting the WAL) runs again 1 ms later, then 2, 4... up to
   50 ms apart, the jobs behind it waiting, and fails after 10 s (a commit: 503), as a thread
   waiting on SQLite's busy timeout would. Opening and closing (a VACUUM, a checkpoint) run on
   the writer thread, as every job does with ``full``, whose commits fsync.

10. **In memory mode a group commit is one pack.** With ``normal``, a commit in memory mode
    is one row of ``packs`` holding all its events (a fixed head per event, then its key,
    sentAt and body), not one row of ``events`` each: the per-row work of an INSERT and its
    DELETE is most of what SQLite costs per event, and the forwarder reads the events from
    the hand-over list anyway. A packed event's id is PACK_BASE + pack id * PACK_SPAN +
    index, above any id of ``events``. A pack always holds exactly its events that are still
    queued: when some leave (delivered, retried, dead) and others remain, it is rewritten
    with those (one per batch boundary, in the same job as the ack); when none remain, it
    is deleted. Leaving memory mode, the packed events in the hand-over list become rows of
    ``events`` (with new ids, if their pack is still in the file: ``segproxy queue purge``
    may have deleted it); those in flight stay packed until their outcome. A retry or a
    dead letter moves the event to ``events`` or ``dead`` from memory. Opening the file
    turns every pack left into rows first, so everything else (database mode, the CLI's
    replay) only knows rows; ``stats`` and the counters read both tables.

11. **Write, then remember.** What this object holds about stored rows (the packs' events,
    the counters, the dead letters' bytes) changes only after the write that mirrors it has
    committed. A bookkeeping job (ack, retry, dead letter, the move to the file) works out
    what to write from memory when it runs (jobs run in order, so it sees every earlier
    job's outcome), writes it, and only then changes memory; if the write fails, the call
    raises (the move to the file logs) and memory stays as the file is. Otherwise a failed
    retry, say, left the pack in memory without its events while the file still held them,
    and acknowledging a sibling later rewrote the pack without them: lost for good. A row
    whose bookkeeping failed stays where it was in the file and is sent again at the latest
    after a restart (at-least-once).

The SQLite calls of the proxy run serialised on one connection: on the loop (invariant 9) or
the writer thread; only the checkpointer has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import itertools
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar, cast

from segproxy.queue.base import (
    ROW_OVERHEAD,
    DeadRow,
    KeyStats,
    NewRow,
    QueueError,
    QueueFull,
    QueueStats,
    Row,
    RowKind,
    queued_row,
    stored_size,
)
from segproxy.queue.files import private_dir, private_file
from segproxy.queue.ledger import (
    LEDGER_SCHEMA,
    dead_bytes,
    dead_evicted,
    evict_dead,
    faults,
    fill_dead_sizes,
    record_faults,
    record_faults_of_rows,
)
from segproxy.queue.packs import (
    NO_PACK_CHANGES,
    PACK_BASE,
    PACK_SPAN,
    PackBook,
    PackChanges,
    apply_packs,
    pack_of,
    pack_rows,
    unpack_rows,
)

log = logging.getLogger("segproxy.queue")

T = TypeVar("T")

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

CHUNK = 500  # ids per statement
# Database mode's index of fresh rows per key: built on entering it, dropped on leaving, so
# memory mode's INSERTs never pay for it (invariant 8).
FRESH_INDEX = (
    "CREATE INDEX IF NOT EXISTS events_fresh ON events(write_key, id) WHERE not_before = 0"
)
DROP_FRESH_INDEX = "DROP INDEX IF EXISTS events_fresh"
ROW_COLUMNS = "id, write_key, kind, received_at, attempts, body, sent_at"
# Pages of a new queue file: at 1-2 KB per event, 32 KB pages cost about half the CPU per
# INSERT + DELETE of 4 KB ones. (A file made with other pages keeps them, see _open_sync.)
PAGE_SIZE = 32 * 1024
WAL_CHECKPOINT_BYTES = 32 * 1024 * 1024  # the WAL starts over once it is this big
WAL_KEEP_BYTES = 64 * 1024 * 1024  # a WAL file that grew bigger is cut back to this
CHECKPOINT_EVERY = 0.2  # seconds, in loop mode (invariant 9)
RESTART_WAIT = 0.05  # a RESTART checkpoint holds commits back at most this long,
RESTART_BACKOFF = 2.0  # and is not tried again for this long if it could not finish
BUSY_RETRY_FIRST = 0.001  # loop mode: a job that found the file locked runs again after this,
BUSY_RETRY_MAX = 0.05  # doubling up to this,
BUSY_GIVE_UP = 10.0  # and fails after this long (a thread would have waited the same)
# Memory mode's hand-over list is bounded; past this the queue reads from the file instead.
HANDOVER_MAX_ROWS = 20_000
HANDOVER_MAX_BYTES = 12 * 1024 * 1024


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; rolled back if the block or the COMMIT fails.

    A class, not a ``contextlib.contextmanager``: compiled, entering and leaving it are two
    native calls, where a generator-based one runs contextlib's interpreted frames on each
    delivery's transaction.
    """

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db = self.db
        if typ is None:
            try:
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        elif db.in_transaction:
            db.execute("ROLLBACK")


class _NoFsync:
    """``with queue._no_fsync() as db``: the connection, with ``synchronous = OFF`` inside
    the block unless it is NORMAL already (a WAL commit is not fsynced then anyway)."""

    __slots__ = ("db", "synchronous")

    def __init__(self, db: sqlite3.Connection, synchronous: str) -> None:
        self.db = db
        self.synchronous = synchronous

    def __enter__(self) -> sqlite3.Connection:
        if self.synchronous != "NORMAL":
            self.db.execute("PRAGMA synchronous = OFF")
        return self.db

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.synchronous != "NORMAL":
            self.db.execute(f"PRAGMA synchronous = {self.synchronous}")


_INSERT_NEW = (  # NewRow's own fields, in order: no tuple built per row
    "INSERT INTO events (write_key, kind, received_at, body, sent_at, size)"
    " VALUES (?1, ?2, ?3, ?4, ?5,"
    f" length(?4) + length(?1) + coalesce(length(?5), 0) + {ROW_OVERHEAD})"
)
_INSERT_ROW = (
    "INSERT INTO events (write_key, kind, received_at, not_before, attempts, size, body, sent_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _event_values(rows: Iterable[Row], not_before: float, more_attempts: int) -> list[Any]:
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


def _dead_values(row: Row, died_at: float, status: int, reason: str) -> tuple[Any, ...]:
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


def _explode(db: sqlite3.Connection) -> int:
    """At open: the events of packs a previous process left become rows (inside a
    transaction); returns how many."""
    count = 0
    for (body,) in db.execute("SELECT body FROM packs ORDER BY id").fetchall():
        rows = unpack_rows(body)
        db.executemany(_INSERT_NEW, rows)
        count += len(rows)
    db.execute("DELETE FROM packs")
    return count


_Deliver = Callable[[Any, Any], None]


class _Reply(NamedTuple):
    loop: asyncio.AbstractEventLoop
    deliver: _Deliver


# Columns added after the first release of the schema: (table, column, declaration).
MIGRATIONS = (
    ("events", "sent_at", "TEXT"),
    ("dead", "sent_at", "TEXT"),
    ("dead", "size", "INTEGER NOT NULL DEFAULT 0"),
)


def connect(path: str | os.PathLike[str], synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open (and create) a queue database; also used by the CLI on a live proxy's file."""
    db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only on a new file
    # Deleted events are cleared from the pages that stay in use, but a freed page (a pack's
    # overflow) is not rewritten with zeros: Debian builds SQLite with secure_delete on, which
    # wrote every delivered pack a second time (measured: about +4-8% durable req/s).
    db.execute("PRAGMA secure_delete = FAST")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.executescript(SCHEMA)
    for table, column, decl in MIGRATIONS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    return db


def _row_id(row: Row) -> int:
    return row.id


def _nothing(*_: object) -> None:
    pass


class _Locked(QueueError):
    """A commit found the file locked by another connection (SQLITE_BUSY)."""


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY (the file is locked by another connection), raised as is or wrapped.

    (Wrapped by type, not found through ``__cause__``: compiled, ``raise ... from`` does not
    record the cause.)"""
    if isinstance(exc, _Locked):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY
    return False


def _keys(db: sqlite3.Connection, exclude: frozenset[str]) -> list[str]:
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


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


class SqliteQueue:
    def __init__(
        self,
        path: str,
        *,
        max_rows: int,
        max_bytes: int,
        min_free_disk_bytes: int,
        synchronous: str = "NORMAL",
        lease_seconds: float = 120.0,
        max_dead_bytes: int = 64 * 1024**2,
    ) -> None:
        self.path = path
        self.max_dead_bytes = max_dead_bytes
        # Bytes of dead letters, read and set by the jobs only (stale after the CLI's replay
        # or purge until a recount; the file decides before anything is evicted).
        self.dead_bytes = 0
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.min_free_disk = min_free_disk_bytes
        self.synchronous = synchronous
        self.lease_seconds = lease_seconds
        self.rows = 0  # queued (committed or being committed) rows and bytes
        self.bytes = 0
        self._sizes: dict[int, int] = {}  # leased id -> size, to keep the counters exact
        # Memory mode (invariant 7): committed, unleased rows, and ids leased from them.
        self._memory = False
        self._handover: dict[str, deque[Row]] = {}  # per write key, oldest first
        self._handover_rows = 0
        self._handover_bytes = 0
        self._memory_leased: set[int] = set()
        # Invariant 10: the events of each pack still queued (handed over or leased), by id.
        self._packs = PackBook()
        self._data_version = 0  # PRAGMA data_version: changes when another process writes
        self._pending: list[tuple[list[NewRow], int, Callable[[BaseException | None], None]]] = []
        self._committing = False
        self._idle = asyncio.Event()
        self._idle.set()
        # The one thread that touches the database: a plain thread fed by a SimpleQueue (a
        # ThreadPoolExecutor costs several times more per group commit).
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], _Reply] | None]
        self._jobs = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._serve_jobs, name="segproxy-sqlite", daemon=True
        )
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._disk_checked = 0.0
        self._disk_ok = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        # Loop mode (invariant 9): with synchronous = NORMAL, once open, the jobs run on the
        # event loop, in order, one loop callback for all that are queued.
        self._on_loop = False
        self._inline_jobs: deque[tuple[Callable[..., Any], tuple[Any, ...], _Deliver]] = deque()
        self._inline_scheduled = False
        self._busy_since = 0.0
        self._busy_delay = BUSY_RETRY_FIRST
        self._page_size = PAGE_SIZE
        self._restarting = False  # set by the checkpointer: the loop leaves the file alone

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> SqliteQueue:
        self._loop = asyncio.get_running_loop()
        self._writer.start()
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._jobs.put(None)  # stop the writer: this queue never opened
            self._writer.join(timeout=10)
            raise
        self._on_loop = self.synchronous == "NORMAL"  # invariant 9
        return self

    def _open_sync(self) -> None:
        private_dir(Path(self.path).parent)  # user data: see files.py
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise QueueError(
                f"another segproxy process is using the queue {self.path}; "
                "give each process its own [queue] path"
            ) from exc
        self._lock_fd = fd
        private_file(self.path)  # before SQLite makes it (and its -wal, -shm) 0644
        db = connect(self.path, self.synchronous)
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        if page != PAGE_SIZE and os.path.getsize(self.path) <= 16 * 1024 * 1024:
            # A small file from a release with 4 KB pages: rebuilt with PAGE_SIZE (a page
            # size changes only outside WAL mode, by VACUUM). A big one keeps its pages.
            db.execute("PRAGMA journal_mode = DELETE")
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            db.execute("VACUUM")
            db.execute("PRAGMA journal_mode = WAL")
            page = int(db.execute("PRAGMA page_size").fetchone()[0])
        self._page_size = page
        db.execute(f"PRAGMA wal_autocheckpoint = {max(WAL_CHECKPOINT_BYTES // page, 16)}")
        db.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
        self._db = db
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="segproxy-checkpoint", daemon=True
        )
        self._checkpointer.start()
        cleared = db.execute("UPDATE events SET lease_until = 0 WHERE lease_until > 0").rowcount
        if cleared:
            log.info("re-queued %d events leased by a previous process", cleared)
        with _Transaction(db):
            unpacked = _explode(db)  # invariant 10: a new process reads rows, not packs
            fill_dead_sizes(db)  # dead letters from before their size was kept
        if unpacked:
            log.info("unpacked %d events a previous process committed in packs", unpacked)
        self._recount_sync()
        self._check_disk(force=True)
        self._data_version = self._data_version_sync()
        if self.rows:
            log.info("%d queued events left by a previous process will be sent", self.rows)
        # Rows left by a previous process are read from the file; none: memory mode.
        self._memory = self.rows == 0
        db.execute(DROP_FRESH_INDEX if self._memory else FRESH_INDEX)
        if self.synchronous == "NORMAL":
            # Loop mode (invariant 9): the loop neither checkpoints (that fsyncs: the
            # checkpointer thread does it) nor waits for a lock (it retries later).
            db.execute("PRAGMA wal_autocheckpoint = 0")
            db.execute("PRAGMA busy_timeout = 0")

    def _checkpoint_loop(self) -> None:
        """Invariant 6: copy the WAL into the file (and fsync both) regularly; in loop mode,
        also make sure the WAL starts over from its beginning (see _restart_wal)."""
        db = connect(self.path, self.synchronous)
        loop_mode = self.synchronous == "NORMAL"
        restart_after = 0.0
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_EVERY if loop_mode else 1.0):
                try:
                    _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if (
                        loop_mode
                        and frames * self._page_size > WAL_CHECKPOINT_BYTES
                        and time.monotonic() >= restart_after
                    ):
                        self._restarting = True  # the loop's jobs wait meanwhile
                        try:
                            restarted = self._restart_wal(db)
                        finally:
                            self._restarting = False
                        if not restarted:
                            restart_after = time.monotonic() + RESTART_BACKOFF
                except sqlite3.Error as exc:  # busy or full: the next round tries again
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            db.close()

    @staticmethod
    def _restart_wal(db: sqlite3.Connection) -> bool:
        """Loop mode: let the next commit start the WAL over; False if it could not now.

        SQLite starts the WAL over only when a write begins with all of it copied, which
        steady commits may never let a PASSIVE checkpoint see. A RESTART checkpoint copies
        what the PASSIVE one left while it holds new writes back, and waits for readers to
        leave the WAL. The loop's jobs wait for it meanwhile (``_restarting``: without that,
        back-to-back commits keep the lock from it); it waits for others RESTART_WAIT at
        most, so a long reader (``segproxy queue stats`` on a big queue) never holds the
        proxy's commits back for long, and the next try is RESTART_BACKOFF later.
        """
        db.execute(f"PRAGMA busy_timeout = {int(RESTART_WAIT * 1000)}")
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.OperationalError:  # locked: the same as blocked
            return False
        finally:
            db.execute("PRAGMA busy_timeout = 10000")
        return not busy

    def _recount_sync(self) -> None:
        assert self._db is not None
        rows, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM events"
        ).fetchone()
        packed, packed_size = self._db.execute(
            "SELECT coalesce(sum(rows), 0), coalesce(sum(size), 0) FROM packs"
        ).fetchone()
        self.rows, self.bytes = int(rows) + int(packed), int(size) + int(packed_size)
        self.dead_bytes = dead_bytes(self._db)

    async def recount(self) -> None:
        """Re-read the counters if the CLI may have replayed or purged rows meanwhile (in
        loop mode only then: counting a big backlog takes a while)."""
        if await self._look_for_other_writers() or not self._on_loop:
            await self._run(self._recount_sync)

    def _data_version_sync(self) -> int:
        assert self._db is not None
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    async def _look_for_other_writers(self) -> bool:
        """Another process wrote the file (a replay, say): its rows are not handed over."""
        version = await self._run(self._data_version_sync)
        if version == self._data_version:
            return False
        self._data_version = version
        self._to_database_mode()
        return True

    def _to_database_mode(self, committed: list[Row] | None = None) -> None:
        """Invariant 7: drop the hand-over list; rows leased from it are marked leased.
        Invariant 10: packed events in the list (and ``committed``, a commit not handed
        over) become rows, to be leased from the file; packed events in flight stay packed."""
        if not self._memory:
            return
        self._memory = False
        moving = [r for line in self._handover.values() for r in line if r.id >= PACK_BASE]
        if committed is not None:
            moving += [r for r in committed if r.id >= PACK_BASE]
        self._handover.clear()
        self._handover_rows = self._handover_bytes = 0
        if moving:
            moving.sort(key=_row_id)
            self._submit_job(self._move_job, ([r.id for r in moving],), self._log_failure)
        leased = sorted(i for i in self._memory_leased if i < PACK_BASE)
        self._memory_leased.clear()
        if leased:
            self._submit_job(
                self._by_ids,
                ("UPDATE events SET lease_until = ? WHERE id IN ({})", (1.0,), leased),
                self._log_failure,
            )

    def _move_job(self, ids: list[int]) -> None:
        """Leaving memory mode: packed events become rows of ``events`` (write, then
        remember: if the write fails they stay in their pack, sent again after a restart)."""
        leaving = self._packs.plan(ids)
        self._move_sync(leaving.packed, leaving.changes)
        self._packs.remember(leaving)

    def _move_sync(self, rows: list[Row], changes: PackChanges) -> None:
        """Packed events become rows of ``events`` (those whose pack is still in the file:
        ``segproxy queue purge`` may have deleted it meanwhile)."""
        with self._no_fsync() as db, _Transaction(db):
            there = {
                int(r[0])
                for chunk in _chunks(sorted({pack_of(r.id) for r in rows}))
                for r in db.execute(
                    f"SELECT id FROM packs WHERE id IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
            }
            keep = [r for r in rows if pack_of(r.id) in there]
            db.executemany(_INSERT_ROW, _event_values(keep, 0.0, 0))
            apply_packs(db, changes)

    @staticmethod
    def _log_failure(_: object, error: BaseException | None) -> None:
        if error is not None:
            log.error("queue bookkeeping failed: %s", error)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._writer.is_alive():  # never opened, or failed to open
            self._close_sync()
            return
        # Let the last group commit finish: its callers are waiting for their answer.
        await self._idle.wait()
        if self._on_loop:  # the last jobs run on the loop, then closing is the thread's
            await self._run(_nothing)
            self._on_loop = False
        await self._run(self._close_sync)
        self._jobs.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join, 10)

    def _close_sync(self) -> None:
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
            self._checkpointer = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _serve_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, reply = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller on the loop
                result, error = None, exc
            try:
                reply.loop.call_soon_threadsafe(reply.deliver, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _submit_job(self, fn: Callable[..., Any], args: tuple[Any, ...], deliver: _Deliver) -> None:
        loop = self._loop or asyncio.get_running_loop()
        if self._on_loop:
            self._inline_jobs.append((fn, args, deliver))
            if not self._inline_scheduled:
                self._inline_scheduled = True
                loop.call_soon(self._run_inline)
            return
        self._jobs.put((fn, args, _Reply(loop, deliver)))

    def _run_inline(self) -> None:
        """Loop mode: run the queued jobs in order, each result delivered before the next
        job runs. A job that finds the file locked (another process, or the checkpointer
        restarting the WAL) runs again a moment later, the jobs behind it still waiting."""
        self._inline_scheduled = False
        jobs = self._inline_jobs
        while jobs:
            if self._restarting:  # the checkpointer is restarting the WAL: a moment
                self._inline_scheduled = True
                assert self._loop is not None
                self._loop.call_later(BUSY_RETRY_FIRST, self._run_inline)
                return
            fn, args, deliver = jobs[0]
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                if _is_busy(exc) and self._retry_busy():
                    return
                result, error = None, exc
            self._busy_since = 0.0
            jobs.popleft()
            try:
                deliver(result, error)
            except Exception:  # one caller's failure must not stop the jobs behind it
                log.exception("queue job callback failed")

    def _retry_busy(self) -> bool:
        """Schedule the head job again (True), unless it has waited BUSY_GIVE_UP (False)."""
        assert self._loop is not None
        now = time.monotonic()
        if not self._busy_since:
            self._busy_since = now
            self._busy_delay = BUSY_RETRY_FIRST
        elif now - self._busy_since > BUSY_GIVE_UP:
            self._busy_since = 0.0
            return False
        else:
            self._busy_delay = min(self._busy_delay * 2, BUSY_RETRY_MAX)
        self._inline_scheduled = True
        self._loop.call_later(self._busy_delay, self._run_inline)
        return True

    async def _run(
        self, fn: Callable[..., T], *args: Any, then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` on the writer; ``then`` gets its result on the loop as it arrives, in
        job order (before any later job's result), which bookkeeping relies on (invariant 7).
        (Code after ``await`` runs later: another job's result may arrive in between.)"""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def deliver(result: Any, error: BaseException | None) -> None:
            if error is None and then is not None:
                then(result)
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._submit_job(fn, args, deliver)
        return await fut

    # -- room -------------------------------------------------------------------------------

    def _check_disk(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._disk_checked > 1.0:
            self._disk_checked = now
            try:
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
            except OSError:
                free = 0
            self._disk_ok = free >= self.min_free_disk
        return self._disk_ok

    def has_room(self) -> bool:
        return self.rows < self.max_rows and self.bytes < self.max_bytes and self._check_disk()

    # -- put: group commit ------------------------------------------------------------------

    async def put(self, rows: list[NewRow]) -> None:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        self.submit_then(rows, done)
        await fut

    def submit_then(self, rows: list[NewRow], done: Callable[[BaseException | None], None]) -> None:
        if self._closed:
            raise QueueError("the queue is closed")
        # Every byte stored counts (base.stored_size, inlined: once per event accepted).
        size = ROW_OVERHEAD * len(rows) + sum(
            len(r.write_key) + len(r.body) + (0 if r.sent_at is None else len(r.sent_at))
            for r in rows
        )
        if self.rows + len(rows) > self.max_rows or self.bytes + size > self.max_bytes:
            raise QueueFull(f"the queue is full ({self.rows} events, {self.bytes} bytes queued)")
        if not self._check_disk():
            raise QueueFull("the disk holding the queue is nearly full")
        self.rows += len(rows)
        self.bytes += size
        self._pending.append((rows, size, done))
        if not self._committing:
            self._start_commit()

    def _start_commit(self) -> None:
        self._committing = True
        self._idle.clear()
        if self._on_loop:
            # Loop mode: the job takes what is pending when it runs, so everything read in
            # this round of the loop shares one transaction.
            self._submit_job(self._commit_pending, (), self._commit_gave_up)
            return
        batch, self._pending = self._pending, []
        rows = [r for group, _, _ in batch for r in group]
        self._submit_job(
            self._commit_sync,
            (rows,),
            lambda last_id, error: self._commit_done(batch, rows, last_id, error),
        )

    def _commit_pending(self) -> None:
        """Loop mode: commit what is pending now. Locked: it stays pending (and grows).
        In memory mode the commit is one pack (invariant 10)."""
        batch = self._pending
        rows = [r for group, _, _ in batch for r in group]
        try:
            if self._memory and len(rows) < PACK_SPAN:
                last_id = self._commit_pack(rows, sum(size for _, size, _ in batch))
            else:
                last_id = self._commit_sync(rows)
            error = None
        except BaseException as exc:
            if _is_busy(exc):
                raise  # _run_inline runs this job again, with what joined meanwhile
            last_id, error = None, exc
        self._pending = []
        self._commit_done(batch, rows, last_id, error)

    def _commit_gave_up(self, _: None, error: BaseException | None) -> None:
        """Loop mode: the file stayed locked for BUSY_GIVE_UP: the pending rows fail (503)."""
        if error is not None:
            batch, self._pending = self._pending, []
            self._commit_done(batch, [r for group, _, _ in batch for r in group], None, error)

    def _commit_sync(self, rows: list[NewRow]) -> int:
        """Insert and commit; returns the last id (the rows got consecutive ids)."""
        db = self._db
        if db is None:
            raise QueueError("the queue is closed")
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(_INSERT_NEW, rows)
            # One writer holds the lock: each row got max(id) + 1, so the ids run on.
            last_id = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
            db.execute("COMMIT")
            return last_id
        except sqlite3.Error as exc:
            raise self._not_stored(db, exc) from exc

    def _commit_pack(self, rows: list[NewRow], size: int) -> int:
        """Memory mode (invariant 10): commit the rows as one pack; returns the last id."""
        db = self._db
        if db is None:
            raise QueueError("the queue is closed")
        try:
            db.execute("BEGIN IMMEDIATE")
            pack = db.execute(
                "INSERT INTO packs (rows, size, body) VALUES (?, ?, ?)",
                (len(rows), size, pack_rows(rows)),
            ).lastrowid
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._not_stored(db, exc) from exc
        assert pack is not None
        return PACK_BASE + pack * PACK_SPAN + len(rows) - 1

    def _not_stored(self, db: sqlite3.Connection, exc: sqlite3.Error) -> QueueError:
        """A commit failed: roll it back; the error to raise (full, locked, or other)."""
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
            self._disk_ok = False
            self._disk_checked = time.monotonic()
            return QueueFull(f"the disk holding the queue is full: {exc}")
        if _is_busy(exc):
            return _Locked(f"could not store events: {exc}")
        return QueueError(f"could not store events: {exc}")

    def _commit_done(
        self,
        batch: list[tuple[list[NewRow], int, Callable[[BaseException | None], None]]],
        committed: list[NewRow],
        last_id: int | None,
        exc: BaseException | None,
    ) -> None:
        self._committing = False
        if exc is None and last_id is not None and self._memory:
            self._hand_over(committed, last_id)
        for rows, size, done in batch:
            if exc is not None:
                self.rows -= len(rows)
                self.bytes -= size
            try:
                done(exc)
            except Exception:  # one caller's failure must not starve the others
                log.exception("commit callback failed")
        if self._pending:
            self._start_commit()
        else:
            self._idle.set()

    def _hand_over(self, rows: list[NewRow], last_id: int) -> None:
        """Memory mode: the committed rows go to the forwarder without a read (invariant 7)."""
        size = sum(len(r.body) for r in rows)
        row_id = last_id - len(rows)
        handed: list[Row] = []
        for key, kind, received_at, body, sent_at in rows:
            row_id += 1
            handed.append(queued_row(row_id, key, kind, received_at, 0, body, sent_at))
        if last_id >= PACK_BASE:  # a pack (invariant 10): its events, until each leaves it
            self._packs.add(last_id, handed)
        if (
            self._handover_rows + len(rows) > HANDOVER_MAX_ROWS
            or self._handover_bytes + size > HANDOVER_MAX_BYTES
        ):
            log.debug("queue backlog over the in-memory hand-over bound: leasing from the file")
            self._to_database_mode(handed)
            return
        handover = self._handover
        for row in handed:
            line = handover.get(row.write_key)
            if line is None:
                line = handover[row.write_key] = deque()
            line.append(row)
        self._handover_rows += len(rows)
        self._handover_bytes += size

    # -- the forwarder's side -------------------------------------------------------------

    async def lease(
        self, now: float, max_rows: int, exclude_keys: frozenset[str] = frozenset()
    ) -> list[Row]:
        rows: list[Row] = []
        if self._memory:
            rows = self._lease_handed_over(max_rows, exclude_keys)
            self._memory_leased.update(r.id for r in rows)
            if not self._handover_rows and not rows:
                # Nothing handed over: has another process (a replay) added rows?
                await self._look_for_other_writers()
        if not self._memory:
            rows, _ = await self._run(
                self._lease_sync, now, max_rows, exclude_keys, then=self._caught_up
            )
        self._sizes.update((r.id, stored_size(r.write_key, r.body, r.sent_at)) for r in rows)
        return rows

    def _caught_up(self, leased: tuple[list[Row], bool]) -> None:
        if leased[1]:
            # Every unleased row in the file was just leased: commits whose results come
            # after this one are handed over (jobs run in order and so do their results;
            # set here, not after the await, which a commit's result may come before).
            self._memory = True

    def _lease_handed_over(self, max_rows: int, exclude: frozenset[str]) -> list[Row]:
        """Up to ``max_rows`` handed-over rows, oldest first."""
        handover = self._handover
        keys = [key for key in handover if key not in exclude]
        if len(keys) == 1:  # the usual case: one write key
            line = handover[keys[0]]
            rows = list(itertools.islice(line, max_rows))
        else:
            lines = [handover[key] for key in keys]
            rows = list(itertools.islice(heapq.merge(*lines, key=_row_id), max_rows))
        taken = Counter(r.write_key for r in rows) if len(keys) > 1 else None
        for key in keys:
            line = handover[key]
            take = len(rows) if taken is None else taken[key]
            if take == len(line):
                del handover[key]
            else:
                for _ in range(take):
                    line.popleft()
        self._handover_rows -= len(rows)
        self._handover_bytes -= sum(len(r.body) for r in rows)
        return rows

    def _lease_sync(
        self, now: float, max_rows: int, exclude: frozenset[str]
    ) -> tuple[list[Row], bool]:
        """Database mode (invariant 8): per key, the oldest ready rows, by index."""
        with self._no_fsync() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                ids: list[int] = []
                for key in _keys(db, exclude):
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
                ids = sorted(ids)[:max_rows]
                found: list[Any] = []
                for chunk in _chunks(ids):
                    marks = ",".join("?" * len(chunk))
                    found += db.execute(
                        f"SELECT {ROW_COLUMNS} FROM events WHERE id IN ({marks}) ORDER BY id",
                        chunk,
                    ).fetchall()
                    db.execute(
                        f"UPDATE events SET lease_until = ? WHERE id IN ({marks})",
                        [now + self.lease_seconds, *chunk],
                    )
                caught_up = (
                    len(found) < max_rows
                    and db.execute("SELECT 1 FROM events WHERE lease_until = 0 LIMIT 1").fetchone()
                    is None
                )
                if caught_up:
                    db.execute(DROP_FRESH_INDEX)  # back to memory mode: INSERTs skip it
                db.execute("COMMIT")
            except sqlite3.Error:
                db.execute("ROLLBACK")
                raise
        rows = [
            Row(
                int(r[0]), str(r[1]), cast(RowKind, r[2]), float(r[3]), int(r[4]), bytes(r[5]), r[6]
            )
            for r in found
        ]
        return rows, caught_up

    def _forget(self, ids: list[int]) -> None:
        for i in ids:
            size = self._sizes.pop(i, None)
            if size is not None:
                self.rows -= 1
                self.bytes -= size

    async def ack(self, ids: list[int]) -> None:
        self._memory_leased.difference_update(ids)
        await self._run(self._ack_job, ids, then=lambda _: self._forget(ids))

    def _ack_job(self, ids: list[int]) -> None:
        leaving = self._packs.plan(ids)
        self._delete_sync(leaving.rows, leaving.changes)
        self._packs.remember(leaving)

    async def retry_later(self, ids: list[int], not_before: float, fault: str = "") -> None:
        # Taken out of the memory leases before the job is queued, so a switch to database
        # mode queued later cannot mark these rows leased again (invariant 7).
        self._memory_leased.difference_update(ids)

        def released(_: None) -> None:
            for i in ids:
                self._sizes.pop(i, None)  # still queued: the counters keep it
            self._to_database_mode()  # these rows are in the file only

        await self._run(self._retry_job, ids, not_before, fault, time.time(), then=released)

    def _retry_job(self, ids: list[int], not_before: float, fault: str, now: float) -> None:
        leaving = self._packs.plan(ids)  # packed events become rows (invariant 10)
        with self._no_fsync() as db, _Transaction(db):
            for chunk in _chunks(leaving.rows):
                marks = ",".join("?" * len(chunk))
                if fault:
                    record_faults_of_rows(db, chunk, fault, now)
                db.execute(
                    "UPDATE events SET lease_until = 0, not_before = ?, attempts = attempts + 1"
                    f" WHERE id IN ({marks})",
                    [not_before, *chunk],
                )
            if fault and leaving.packed:
                record_faults(db, (r.write_key for r in leaving.packed), fault, now)
            db.executemany(_INSERT_ROW, _event_values(leaving.packed, not_before, 1))
            apply_packs(db, leaving.changes)
        self._packs.remember(leaving)

    async def dead_letter(self, ids: list[int], status: int, reason: str, now: float) -> None:
        self._memory_leased.difference_update(ids)

        def moved(result: tuple[int, int]) -> None:
            evicted, freed = result
            self._forget(ids)
            if evicted:
                log.warning(
                    "dead letters over queue.max_dead_bytes (%d): evicted the %d oldest"
                    " (%d bytes); see segproxy queue stats",
                    self.max_dead_bytes,
                    evicted,
                    freed,
                )

        await self._run(self._dead_job, ids, status, reason, now, then=moved)

    def _dead_job(self, ids: list[int], status: int, reason: str, now: float) -> tuple[int, int]:
        """Move rows (by id) and packed events (from memory) to ``dead``, in one transaction,
        evicting the oldest dead letters past their cap; returns how many were evicted, and
        their bytes. (The dead letters' byte counter is the jobs' own: each job reads it
        and, once its transaction committed, sets it.)"""
        leaving = self._packs.plan(ids)
        with self._no_fsync() as db, _Transaction(db):
            before = int(db.execute("SELECT coalesce(max(id), 0) FROM dead").fetchone()[0])
            db.executemany(
                "INSERT INTO dead (write_key, kind, received_at, died_at, attempts, status,"
                " reason, body, sent_at, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_dead_values(r, now, status, reason) for r in leaving.packed],
            )
            apply_packs(db, leaving.changes)
            for chunk in _chunks(leaving.rows):
                marks = ",".join("?" * len(chunk))
                db.execute(
                    "INSERT INTO dead (write_key, kind, received_at, died_at, attempts, status,"
                    " reason, body, sent_at, size) SELECT write_key, kind, received_at, ?,"
                    " attempts + 1, ?, ?, body, sent_at, size + length(?)"
                    f" FROM events WHERE id IN ({marks})",
                    [now, status, reason, reason, *chunk],
                )
                db.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)
            added = int(
                db.execute(
                    "SELECT coalesce(sum(size), 0) FROM dead WHERE id > ?", (before,)
                ).fetchone()[0]
            )
            # The counter says when to look (no scan per dead letter); the file decides (the
            # CLI may have replayed or purged meanwhile).
            evicted, freed, total = 0, 0, self.dead_bytes + added
            if total > self.max_dead_bytes:
                evicted, freed, total = evict_dead(db, self.max_dead_bytes)
        self._packs.remember(leaving)
        self.dead_bytes = total
        return evicted, freed

    def _delete_sync(self, ids: list[int], changes: PackChanges = NO_PACK_CHANGES) -> None:
        """Delete delivered rows, by id ranges when they run on (the usual batch), else by id,
        and shrink the packs delivered events leave (invariant 10): one transaction."""
        ordered = sorted(ids)
        runs: list[tuple[int, int]] = []
        for i in ordered:
            if runs and i <= runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        with self._no_fsync() as db, _Transaction(db):
            apply_packs(db, changes)
            if len(runs) <= 16:
                db.executemany("DELETE FROM events WHERE id BETWEEN ? AND ?", runs)
                return
            for chunk in _chunks(ordered):
                db.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def _no_fsync(self) -> _NoFsync:
        """A bookkeeping transaction: atomic, but not fsynced (invariant 5)."""
        db = self._db
        assert db is not None
        return _NoFsync(db, self.synchronous)

    def _by_ids(self, template: str, leading: tuple[Any, ...], ids: list[int]) -> None:
        """One bookkeeping transaction running ``template`` over ``ids`` in chunks."""
        with self._no_fsync() as db, _Transaction(db):
            for chunk in _chunks(ids):
                db.execute(template.format(",".join("?" * len(chunk))), [*leading, *chunk])

    async def next_ready(self, exclude_keys: frozenset[str] = frozenset()) -> float | None:
        if self._memory:
            if any(key not in exclude_keys for key in self._handover):
                return 0.0
            # Idle: has another process (a replay) put rows in the file meanwhile?
            await self._look_for_other_writers()
            if self._memory:
                return None
        return await self._run(self._next_ready_sync, exclude_keys)

    def _next_ready_sync(self, exclude: frozenset[str]) -> float | None:
        """Database mode (invariant 8): 0.0 if a fresh row is ready, else the earliest retry."""
        db = self._db
        assert db is not None
        keys = _keys(db, exclude)
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

    async def stats(self) -> QueueStats:
        assert self._db is not None
        return await self._run(stats_of, self._db)

    async def dead_rows(self, limit: int = 100) -> list[DeadRow]:
        assert self._db is not None
        return await self._run(dead_of, self._db, limit)


def stats_of(db: sqlite3.Connection) -> QueueStats:
    out = QueueStats()
    for key, rows, size, oldest in db.execute(
        "SELECT write_key, count(*), sum(size), min(received_at) FROM events GROUP BY write_key"
    ):
        out.per_key[str(key)] = KeyStats(int(rows), int(size), float(oldest))
        out.rows += int(rows)
        out.bytes += int(size)
        out.oldest = float(oldest) if out.oldest is None else min(out.oldest, float(oldest))
    for (body,) in db.execute("SELECT body FROM packs").fetchall():  # invariant 10
        for row in unpack_rows(body):
            size = stored_size(row.write_key, row.body, row.sent_at)
            for counts in (out.per_key.setdefault(row.write_key, KeyStats()), out):
                counts.rows += 1
                counts.bytes += size
                if counts.oldest is None or row.received_at < counts.oldest:
                    counts.oldest = row.received_at
    for key, (fault, at) in faults(db).items():  # shown for the keys still queued
        if key in out.per_key:
            out.per_key[key].last_fault, out.per_key[key].last_fault_at = fault, at
    dead, dead_size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM dead").fetchone()
    out.dead, out.dead_bytes = int(dead), int(dead_size)
    out.dead_evicted = dead_evicted(db)
    return out


def dead_of(db: sqlite3.Connection, limit: int) -> list[DeadRow]:
    return [
        DeadRow(int(i), str(k), float(r), float(d), int(s), str(reason), bytes(b))
        for i, k, r, d, s, reason, b in db.execute(
            "SELECT id, write_key, received_at, died_at, status, reason, body FROM dead"
            " ORDER BY id LIMIT ?",
            (limit,),
        )
    ]
