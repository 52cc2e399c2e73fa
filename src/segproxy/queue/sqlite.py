"""The durable queue: SQLite in WAL mode, written by one job runner, with group commit.

Its numbered invariants, and the map of the modules it is made of, are the package's
docstring (``queue/__init__.py``); the contract it keeps is base.py's. This module ties the
parts together: the group commit, opening and closing the file, memory and database mode,
and the forwarder's side (its jobs are bookkeeping.py's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from segproxy.queue.base import (
    ROW_OVERHEAD,
    DeadRow,
    NewRow,
    QueueError,
    QueueFull,
    QueueStats,
    Row,
    stored_size,
)
from segproxy.queue.bookkeeping import Bookkeeper, Freed
from segproxy.queue.checkpoint import Checkpointer
from segproxy.queue.files import DiskRoom, lock_exclusively, private_dir, private_file
from segproxy.queue.handover import Handover, Switch, handed_rows
from segproxy.queue.journal import MAX_SEGMENTS, SEGMENT_SIZE
from segproxy.queue.ledger import dead_bytes, fill_dead_sizes
from segproxy.queue.packs import PACK_BASE, PACK_SPAN, PackBook
from segproxy.queue.runner import JobRunner, Locked, is_busy
from segproxy.queue.schema import (
    DROP_FRESH_INDEX,
    FRESH_INDEX,
    Transaction,
    connect,
    counts,
    dead_of,
    insert_rows,
    oldest_of,
    stats_of,
    turn_packs_into_rows,
    use_page_size,
)
from segproxy.queue.spill import HotTier

log = logging.getLogger("segproxy.queue")

T = TypeVar("T")

# Memory mode's hand-over list is bounded; past this the queue reads from the file instead.
# (Read when a queue is made: tests lower it.)
HANDOVER_MAX_ROWS = 20_000
HANDOVER_MAX_BYTES = 12 * 1024 * 1024

CommitDone = Callable[[BaseException | None], None]
Pending = tuple[list[NewRow], int, CommitDone]  # a caller's rows, their bytes, its callback


def _nothing(*_: object) -> None:
    pass


def _log_failure(_: object, error: BaseException | None) -> None:
    if error is not None:
        log.error("queue bookkeeping failed: %s", error)


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
        journal_segment_bytes: int = SEGMENT_SIZE,
        journal_segments: int = MAX_SEGMENTS,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        """``on_commit(rows)``: called once per commit that stored rows, before its callers
        hear of it (the forwarder's wake-up)."""
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.min_free_disk = min_free_disk_bytes
        self.synchronous = synchronous
        self.lease_seconds = lease_seconds
        self.max_dead_bytes = max_dead_bytes
        self.journal_size = (journal_segment_bytes, journal_segments)
        self._on_commit = on_commit
        self.rows = 0  # queued (committed or being committed) rows and bytes
        self.bytes = 0
        self._sizes: dict[int, int] = {}  # leased id -> size, to keep the counters exact
        self._handover = Handover(HANDOVER_MAX_ROWS, HANDOVER_MAX_BYTES)  # invariant 7
        # Invariants 10, 12: the events of each journal commit still queued, by id.
        self._packs = PackBook()
        self._hot: HotTier | None = None  # the journal, once the file is open
        self._data_version = 0  # PRAGMA data_version: changes when another process writes
        self._pending: list[Pending] = []
        self._committing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._jobs = JobRunner()  # the one place the proxy's connection is used
        self._db: sqlite3.Connection | None = None
        self._book: Bookkeeper | None = None  # the forwarder's side, once the file is open
        self._lock_fd: int | None = None
        self._checkpointer: Checkpointer | None = None
        self._disk = DiskRoom(path, min_free_disk_bytes)
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> SqliteQueue:
        self._jobs.start(asyncio.get_running_loop())
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._jobs.stop()  # this queue never opened
            self._jobs.join(10)
            raise
        self._jobs.on_loop = self.synchronous == "NORMAL"  # invariant 9
        return self

    def _open_sync(self) -> None:
        private_dir(Path(self.path).parent)  # user data: see files.py
        self._lock_fd = lock_exclusively(self.path)  # invariant 3
        private_file(self.path)  # before SQLite makes it (and its -wal, -shm) 0644
        db = connect(self.path, self.synchronous)
        page = use_page_size(db, self.path)
        self._db = db
        self._checkpointer = Checkpointer(self.path, self.synchronous, page, self._jobs)
        self._checkpointer.start()
        self._hot = hot = HotTier.open(db, self.path, self.synchronous, *self.journal_size)
        self._book = Bookkeeper(
            db,
            self.synchronous,
            self._packs,
            self.lease_seconds,
            self.max_dead_bytes,
            None if hot is None else hot.journal,
        )
        cleared = db.execute("UPDATE events SET lease_until = 0 WHERE lease_until > 0").rowcount
        if cleared:
            log.info("re-queued %d events leased by a previous process", cleared)
        with Transaction(db):
            unpacked = turn_packs_into_rows(db)  # invariant 10: a new process reads rows
            fill_dead_sizes(db)  # dead letters from before their size was kept
        if unpacked:
            log.info("unpacked %d events a previous process committed in packs", unpacked)
        self._recount_sync()
        self._disk.check(force=True)
        self._data_version = self._data_version_sync()
        if self.rows:
            log.info("%d queued events left by a previous process will be sent", self.rows)
        self._handover.opened(self.rows)  # rows left are read from the file (invariant 7)
        db.execute(DROP_FRESH_INDEX if self._handover.memory else FRESH_INDEX)
        if self.synchronous == "NORMAL":
            # Loop mode (invariant 9): the loop neither checkpoints (that fsyncs: the
            # checkpointer thread does it) nor waits for a lock (it retries later).
            db.execute("PRAGMA wal_autocheckpoint = 0")
            db.execute("PRAGMA busy_timeout = 0")

    def _recount_sync(self) -> None:
        assert self._db is not None
        rows, size = counts(self._db)
        held, held_size = self._packs.size()  # the journal's, in this process's memory
        self.rows, self.bytes = rows + held, size + held_size
        self._bookkeeper().dead_bytes = dead_bytes(self._db)

    async def recount(self) -> None:
        """Re-read the counters if the CLI may have replayed or purged rows meanwhile (in
        loop mode only then: counting a big backlog takes a while)."""
        if await self._look_for_other_writers() or not self._jobs.on_loop:
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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        jobs = self._jobs
        if not jobs.running():  # never opened, or failed to open
            self._close_sync()
            return
        # Let the last group commit finish: its callers are waiting for their answer.
        await self._idle.wait()
        if jobs.on_loop:  # the last jobs run on the loop, then closing is the thread's
            await self._run(_nothing)
            jobs.on_loop = False
        await self._run(self._close_sync)
        jobs.stop()
        await asyncio.get_running_loop().run_in_executor(None, jobs.join, 10)

    def _close_sync(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._hot is not None:
            self._hot.close()
            self._hot = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()
            self._db = None
            self._book = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _run(
        self, fn: Callable[..., T], *args: Any, then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` as a job (runner.py): after every job before it, its result (and
        ``then``'s call with it) delivered on the loop before any later job's."""
        return await self._jobs.call(fn, args, then)

    # -- room -------------------------------------------------------------------------------

    def has_room(self) -> bool:
        return self.rows < self.max_rows and self.bytes < self.max_bytes and self._disk.check()

    # -- put: group commit (invariants 1, 4, 9, 10) -------------------------------------------

    async def put(self, rows: list[NewRow]) -> None:
        loop = self._jobs.loop or asyncio.get_running_loop()
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

    def submit_then(self, rows: list[NewRow], done: CommitDone) -> None:
        if self._closed:
            raise QueueError("the queue is closed")
        # Every byte stored counts (base.stored_size, inlined: once per event accepted).
        size = ROW_OVERHEAD * len(rows) + sum(
            len(r.write_key) + len(r.body) + (0 if r.sent_at is None else len(r.sent_at))
            for r in rows
        )
        if self.rows + len(rows) > self.max_rows or self.bytes + size > self.max_bytes:
            raise QueueFull(f"the queue is full ({self.rows} events, {self.bytes} bytes queued)")
        if not self._disk.check():
            raise QueueFull("the disk holding the queue is nearly full")
        self.rows += len(rows)
        self.bytes += size
        self._pending.append((rows, size, done))
        if not self._committing:
            self._start_commit()

    def _start_commit(self) -> None:
        self._committing = True
        self._idle.clear()
        if self._jobs.on_loop:
            # Loop mode: the job takes what is pending when it runs, so everything read in
            # this round of the loop shares one transaction.
            self._jobs.submit(self._commit_pending, (), self._commit_gave_up)
            return
        batch, self._pending = self._pending, []
        rows = [r for group, _, _ in batch for r in group]
        self._jobs.submit(
            self._commit_rows,
            (rows,),
            lambda last_id, error: self._commit_done(batch, rows, last_id, error),
        )

    def _commit_pending(self) -> None:
        """Loop mode: commit what is pending now. Locked: it stays pending (and grows).
        In memory mode the commit is one record of the journal (invariants 10, 12)."""
        batch = self._pending
        rows = [r for group, _, _ in batch for r in group]
        try:
            last_id = -1
            hot = self._hot
            if hot is not None and self._handover.memory and len(rows) < PACK_SPAN:
                last_id = -1 if hot.full else hot.append(rows)
            if last_id < 0:
                last_id = self._commit_rows(rows)
            error = None
        except BaseException as exc:
            if is_busy(exc):
                raise  # the runner runs this job again, with what joined meanwhile
            last_id, error = None, exc
        self._pending = []
        self._commit_done(batch, rows, last_id, error)

    def _commit_gave_up(self, _: None, error: BaseException | None) -> None:
        """Loop mode: the file stayed locked for BUSY_GIVE_UP: the pending rows fail (503)."""
        if error is not None:
            batch, self._pending = self._pending, []
            self._commit_done(batch, [r for group, _, _ in batch for r in group], None, error)

    def _commit_rows(self, rows: list[NewRow]) -> int:
        """Insert and commit ``rows``; returns the last id (the rows' ids run on)."""
        db = self._db
        if db is None:
            raise QueueError("the queue is closed")
        try:
            with Transaction(db):
                return insert_rows(db, rows)
        except sqlite3.Error as exc:
            raise self._not_stored(exc) from exc

    def _not_stored(self, exc: sqlite3.Error) -> QueueError:
        """A commit failed (rolled back): the error to raise (full, locked, or other)."""
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
            self._disk.found_full()
            return QueueFull(f"the disk holding the queue is full: {exc}")
        if is_busy(exc):
            return Locked(f"could not store events: {exc}")
        return QueueError(f"could not store events: {exc}")

    def _commit_done(
        self,
        batch: list[Pending],
        committed: list[NewRow],
        last_id: int | None,
        exc: BaseException | None,
    ) -> None:
        self._committing = False
        if exc is None and last_id is not None:
            if self._handover.memory:
                self._hand_over(committed, last_id)
            if self._hot is not None and self._hot.full:
                self._hot.full = False  # the move out of the journal makes room
                self._to_database_mode()
            if self._on_commit is not None:
                self._on_commit(len(committed))
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
        handed = handed_rows(rows, last_id)
        if last_id >= PACK_BASE:  # a journal commit (invariant 12): held until each leaves
            self._packs.add(last_id, handed)
        switch = self._handover.commit(handed)
        if switch is not None:
            log.debug("queue backlog over the in-memory hand-over bound: leasing from the file")
            self._write_switch(switch)

    # -- memory mode and database mode (invariants 7, 8, 10) ----------------------------------

    def _to_database_mode(self) -> None:
        switch = self._handover.to_database_mode()
        if switch is not None:
            self._write_switch(switch)

    def _write_switch(self, switch: Switch) -> None:
        """Leaving memory mode: packed events handed over become rows, rows leased from
        memory are marked leased in the file (jobs, in order after every earlier one)."""
        book = self._bookkeeper()
        if switch.moving:
            self._jobs.submit(book.move, (switch.moving,), _log_failure)
        if switch.leased:
            self._jobs.submit(book.mark_leased, (switch.leased,), _log_failure)

    def _connection(self) -> sqlite3.Connection:
        db = self._db
        assert db is not None
        return db

    def _bookkeeper(self) -> Bookkeeper:
        book = self._book
        assert book is not None
        return book

    # -- the forwarder's side -------------------------------------------------------------

    async def lease(
        self, now: float, max_rows: int, exclude_keys: frozenset[str] = frozenset()
    ) -> list[Row]:
        rows: list[Row] = []
        handover = self._handover
        if handover.memory:
            rows = handover.lease(max_rows, exclude_keys)
            if not handover.rows and not rows:
                # Nothing handed over: has another process (a replay) added rows?
                await self._look_for_other_writers()
        if not handover.memory:
            rows, _ = await self._run(
                self._bookkeeper().lease, now, max_rows, exclude_keys, then=self._caught_up
            )
        # (rows of the file only: journal events' bytes are told by the job that lets them go)
        self._sizes.update(
            (r.id, stored_size(r.write_key, r.body, r.sent_at)) for r in rows if r.id < PACK_BASE
        )
        return rows

    def _caught_up(self, leased: tuple[list[Row], bool]) -> None:
        if leased[1]:
            # Every unleased row in the file was just leased: commits whose results come
            # after this one are handed over (jobs run in order and so do their results;
            # set here, not after the await, which a commit's result may come before).
            self._handover.caught_up()

    def _forget(self, ids: list[int], journal: Freed) -> None:
        """Events left the queue: rows of the file by their sizes noted at lease, and the
        journal's events (how many, their bytes) as the job that let them go counted them."""
        sizes = self._sizes
        if sizes:
            for i in ids:
                size = sizes.pop(i, None)
                if size is not None:
                    self.rows -= 1
                    self.bytes -= size
        self.rows -= journal[0]
        self.bytes -= journal[1]

    async def ack(self, ids: list[int]) -> None:
        self._handover.settled(ids)
        await self._run(self._bookkeeper().ack, ids, then=lambda gone: self._forget(ids, gone))

    async def retry_later(self, ids: list[int], not_before: float, fault: str = "") -> None:
        # Taken out of the memory leases before the job is queued, so a switch to database
        # mode queued later cannot mark these rows leased again (invariant 7).
        self._handover.settled(ids)

        def released(_: None) -> None:
            for i in ids:
                self._sizes.pop(i, None)  # still queued: the counters keep it
            self._to_database_mode()  # these rows are in the file only

        retry = self._bookkeeper().retry
        await self._run(retry, ids, not_before, fault, time.time(), then=released)

    async def dead_letter(self, ids: list[int], status: int, reason: str, now: float) -> None:
        self._handover.settled(ids)
        bury = self._bookkeeper().bury
        await self._run(bury, ids, status, reason, now, then=lambda gone: self._forget(ids, gone))

    async def next_ready(self, exclude_keys: frozenset[str] = frozenset()) -> float | None:
        handover = self._handover
        if handover.memory:
            if handover.ready(exclude_keys):
                return 0.0
            # Idle: has another process (a replay) put rows in the file meanwhile?
            await self._look_for_other_writers()
            if handover.memory:
                return None
        return await self._run(self._bookkeeper().next_ready, exclude_keys)

    async def stats(self) -> QueueStats:
        return await self._run(lambda: stats_of(self._connection(), self._packs.rows()))

    def depth(self) -> tuple[int, int]:
        return self.rows, self.bytes

    async def oldest(self) -> float | None:
        in_file = await self._run(oldest_of, self._connection())
        held = self._packs.oldest()
        return min((t for t in (held, in_file) if t is not None), default=None)

    async def dead_rows(self, limit: int = 100) -> list[DeadRow]:
        return await self._run(dead_of, self._connection(), limit)
