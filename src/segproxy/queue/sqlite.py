"""The durable queue: SQLite in WAL mode, written by one thread, with group commit.

Invariants, in the order things happen (see base.py for the contract):

1. **Write, commit, then acknowledge.** ``put`` hands its rows to the writer thread and returns
   only after the transaction holding them has committed. Rows that arrive while a commit is
   running wait and share the next transaction (group commit). What "committed" survives is
   ``[queue] synchronous``:
   - ``normal`` (default): the commit is written to the WAL file before the 200, so it survives
     the process being killed (SIGKILL, OOM, crash) and a clean reboot; the WAL is fsynced at
     each checkpoint (about every second, invariant 6), so a power cut or kernel crash can
     lose at most the last second or so.
   - ``full``: every commit is fsynced before the 200, so it survives a power cut as well, at
     the price of one fsync per group commit (about 1 ms here, which bounds throughput).
2. **Delete only on delivery.** A row leaves ``events`` only through ``ack`` (Segment accepted it)
   or ``dead_letter`` (moved, in the same transaction, to ``dead`` with the status and body).
3. **Leases die with their process.** A leased row carries ``lease_until > 0``. One process owns
   a queue file at a time (an exclusive ``flock`` on ``<path>.lock``), so at open, every lease
   left in the file belongs to a process that is gone: they are all cleared, and those rows are
   sent again (at-least-once; Segment de-duplicates on ``messageId``).
4. **Full means 503, never a drop.** ``put`` refuses (``QueueFull``) when the queued rows or bytes
   would pass their caps, when the disk's free space is under its floor, or when SQLite itself
   reports the disk full; the failed transaction is rolled back, the file stays consistent.

5. **Only acknowledgements pay for fsync.** The forwarder's bookkeeping (lease, retry, ack,
   dead-letter) commits with ``synchronous=OFF``: losing it in a power cut only means rows are
   sent again, which invariant 3 already allows. The next client commit's fsync of the WAL
   makes it durable anyway.
6. **The WAL stays bounded and is synced regularly.** The writer checkpoints itself every
   1,000 pages (SQLite's autocheckpoint: under continuous writes only the writer can complete
   a checkpoint, so only it can let the WAL restart; a checkpoint from another connection
   alone lets it grow without bound) and the WAL file is truncated back to 64 MB. A
   checkpointer thread also runs a PASSIVE checkpoint about once a second, which fsyncs the
   WAL when traffic is too light to reach the autocheckpoint.

All other SQLite calls run on one thread (the writer), serialised; the event loop never blocks
on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

from segproxy.queue.base import (
    DeadRow,
    KeyStats,
    NewRow,
    QueueError,
    QueueFull,
    QueueStats,
    Row,
    RowKind,
)

log = logging.getLogger("segproxy.queue")

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
CREATE INDEX IF NOT EXISTS events_not_before ON events(not_before);
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

CHUNK = 500  # ids per statement


class _Reply(NamedTuple):
    loop: asyncio.AbstractEventLoop
    deliver: Callable[[Any, Any], None]


# Columns added after the first release of the schema: (table, column, declaration).
MIGRATIONS = (
    ("events", "sent_at", "TEXT"),
    ("dead", "sent_at", "TEXT"),
)


def connect(path: str | os.PathLike[str], synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open (and create) a queue database; also used by the CLI on a live proxy's file."""
    db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.executescript(SCHEMA)
    for table, column, decl in MIGRATIONS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    return db


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
    ) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.min_free_disk = min_free_disk_bytes
        self.synchronous = synchronous
        self.lease_seconds = lease_seconds
        self.rows = 0  # queued (committed or being committed) rows and bytes
        self.bytes = 0
        self._sizes: dict[int, int] = {}  # leased id -> size, to keep the counters exact
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
        return self

    def _open_sync(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
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
        db = connect(self.path, self.synchronous)
        db.execute("PRAGMA wal_autocheckpoint = 1000")
        db.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")
        self._db = db
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="segproxy-checkpoint", daemon=True
        )
        self._checkpointer.start()
        cleared = db.execute("UPDATE events SET lease_until = 0 WHERE lease_until > 0").rowcount
        if cleared:
            log.info("re-queued %d events leased by a previous process", cleared)
        self._recount_sync()
        self._check_disk(force=True)

    def _checkpoint_loop(self) -> None:
        db = connect(self.path, self.synchronous)
        try:
            while not self._stop_checkpoints.wait(1.0):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or full: the next round tries again
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            db.close()

    def _recount_sync(self) -> None:
        assert self._db is not None
        rows, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM events"
        ).fetchone()
        self.rows, self.bytes = int(rows), int(size)

    async def recount(self) -> None:
        """Re-read the counters (the CLI may have replayed or purged rows meanwhile)."""
        await self._run(self._recount_sync)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._writer.is_alive():  # never opened, or failed to open
            self._close_sync()
            return
        # Let the last group commit finish: its callers are waiting for their answer.
        await self._idle.wait()
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

    def _submit_job(
        self, fn: Callable[..., Any], args: tuple[Any, ...], deliver: Callable[[Any, Any], None]
    ) -> None:
        loop = self._loop or asyncio.get_running_loop()
        self._jobs.put((fn, args, _Reply(loop, deliver)))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def deliver(result: Any, error: BaseException | None) -> None:
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
        size = sum(len(r.body) for r in rows)
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
        batch, self._pending = self._pending, []
        self._committing = True
        self._idle.clear()
        rows = [r for group, _, _ in batch for r in group]
        self._submit_job(
            self._commit_sync, (rows,), lambda _, error: self._commit_done(batch, error)
        )

    def _commit_sync(self, rows: list[NewRow]) -> None:
        db = self._db
        if db is None:
            raise QueueError("the queue is closed")
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO events (write_key, kind, received_at, size, body, sent_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (r.write_key, r.kind, r.received_at, len(r.body), r.body, r.sent_at)
                    for r in rows
                ],
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                self._disk_ok = False
                self._disk_checked = time.monotonic()
                raise QueueFull(f"the disk holding the queue is full: {exc}") from exc
            raise QueueError(f"could not store events: {exc}") from exc

    def _commit_done(
        self,
        batch: list[tuple[list[NewRow], int, Callable[[BaseException | None], None]]],
        exc: BaseException | None,
    ) -> None:
        self._committing = False
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

    # -- the forwarder's side -------------------------------------------------------------

    async def lease(
        self, now: float, max_rows: int, exclude_keys: frozenset[str] = frozenset()
    ) -> list[Row]:
        rows = await self._run(self._lease_sync, now, max_rows, exclude_keys)
        for r in rows:
            self._sizes[r.id] = len(r.body)
        return rows

    def _lease_sync(self, now: float, max_rows: int, exclude: frozenset[str]) -> list[Row]:
        where = " WHERE lease_until = 0 AND not_before <= ?"
        params: list[Any] = [now]
        if exclude:
            where += " AND write_key NOT IN (" + ",".join("?" * len(exclude)) + ")"
            params.extend(sorted(exclude))
        with self._no_fsync() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                found = db.execute(
                    "SELECT id, write_key, kind, received_at, attempts, body, sent_at FROM events"
                    + where
                    + " ORDER BY id LIMIT ?",
                    [*params, max_rows],
                ).fetchall()
                if found:
                    # The same rows, set-wise: one statement, not one per row.
                    db.execute(
                        "UPDATE events SET lease_until = ?" + where + " AND id <= ?",
                        [now + self.lease_seconds, *params, found[-1][0]],
                    )
                db.execute("COMMIT")
            except sqlite3.Error:
                db.execute("ROLLBACK")
                raise
        return [
            Row(
                int(r[0]), str(r[1]), cast(RowKind, r[2]), float(r[3]), int(r[4]), bytes(r[5]), r[6]
            )
            for r in found
        ]

    def _forget(self, ids: list[int]) -> None:
        for i in ids:
            size = self._sizes.pop(i, None)
            if size is not None:
                self.rows -= 1
                self.bytes -= size

    async def ack(self, ids: list[int]) -> None:
        await self._run(self._by_ids, "DELETE FROM events WHERE id IN ({})", (), ids)
        self._forget(ids)

    async def retry_later(self, ids: list[int], not_before: float) -> None:
        await self._run(
            self._by_ids,
            "UPDATE events SET lease_until = 0, not_before = ?, attempts = attempts + 1"
            " WHERE id IN ({})",
            (not_before,),
            ids,
        )
        for i in ids:
            self._sizes.pop(i, None)  # still queued: the counters keep it

    async def dead_letter(self, ids: list[int], status: int, reason: str, now: float) -> None:
        await self._run(self._dead_sync, ids, status, reason, now)
        self._forget(ids)

    @contextlib.contextmanager
    def _no_fsync(self) -> Iterator[sqlite3.Connection]:
        """A bookkeeping transaction: atomic, but not fsynced (invariant 5)."""
        db = self._db
        assert db is not None
        db.execute("PRAGMA synchronous = OFF")
        try:
            yield db
        finally:
            db.execute(f"PRAGMA synchronous = {self.synchronous}")

    def _by_ids(self, template: str, leading: tuple[Any, ...], ids: list[int]) -> None:
        """One bookkeeping transaction running ``template`` over ``ids`` in chunks."""
        with self._no_fsync() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for chunk in _chunks(ids):
                    db.execute(template.format(",".join("?" * len(chunk))), [*leading, *chunk])
                db.execute("COMMIT")
            except sqlite3.Error:
                db.execute("ROLLBACK")
                raise

    def _dead_sync(self, ids: list[int], status: int, reason: str, now: float) -> None:
        with self._no_fsync() as db:
            self._dead_txn(db, ids, status, reason, now)

    def _dead_txn(
        self, db: sqlite3.Connection, ids: list[int], status: int, reason: str, now: float
    ) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                db.execute(
                    "INSERT INTO dead (write_key, kind, received_at, died_at, attempts, status,"
                    " reason, body, sent_at) SELECT write_key, kind, received_at, ?,"
                    f" attempts + 1, ?, ?, body, sent_at FROM events WHERE id IN ({marks})",
                    [now, status, reason, *chunk],
                )
                db.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise

    async def next_ready(self, exclude_keys: frozenset[str] = frozenset()) -> float | None:
        return await self._run(self._next_ready_sync, exclude_keys)

    def _next_ready_sync(self, exclude: frozenset[str]) -> float | None:
        assert self._db is not None
        sql = "SELECT not_before FROM events WHERE lease_until = 0"
        if exclude:
            sql += " AND write_key NOT IN (" + ",".join("?" * len(exclude)) + ")"
        row = self._db.execute(sql + " ORDER BY not_before LIMIT 1", sorted(exclude)).fetchone()
        return None if row is None else float(row[0])

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
    out.dead = int(db.execute("SELECT count(*) FROM dead").fetchone()[0])
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
