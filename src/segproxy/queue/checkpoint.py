"""The checkpointer: a thread with its own connection that keeps the WAL bounded and synced
(invariant 6 in ``queue/__init__.py``).

It copies the WAL into the file (and fsyncs both) regularly: every 0.2 s in loop mode, where
the loop never checkpoints, else about once a second. In loop mode it also makes sure the WAL
starts over from its beginning once it passes 32 MB (see :meth:`Checkpointer.restart_wal`):
without that, the WAL grew by everything written (2 GB in 12 s of the benchmark).
"""

from __future__ import annotations

import logging
import sqlite3
import time

from segproxy.queue import schema
from segproxy.queue.runner import JobRunner, Worker

log = logging.getLogger("segproxy.queue")

CHECKPOINT_EVERY = 0.2  # seconds, in loop mode (invariant 9)
RESTART_WAIT = 0.05  # a RESTART checkpoint holds commits back at most this long,
RESTART_BACKOFF = 2.0  # and is not tried again for this long if it could not finish


class Checkpointer(Worker):
    """Started once the queue's file is open, stopped (and joined) when it closes."""

    def __init__(self, path: str, synchronous: str, page_size: int, jobs: JobRunner) -> None:
        super().__init__("segproxy-checkpoint")
        self.path = path
        self.synchronous = synchronous
        self.page_size = page_size
        self.jobs = jobs  # told while a RESTART runs: its loop-mode jobs wait meanwhile

    def _serve(self) -> None:
        db = schema.connect(self.path, self.synchronous)
        loop_mode = self.synchronous == "NORMAL"
        restart_after = 0.0
        try:
            while not self._stop.wait(CHECKPOINT_EVERY if loop_mode else 1.0):
                try:
                    _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if (
                        loop_mode
                        and frames * self.page_size > schema.WAL_CHECKPOINT_BYTES
                        and time.monotonic() >= restart_after
                        and not self._restart(db)
                    ):
                        restart_after = time.monotonic() + RESTART_BACKOFF
                except sqlite3.Error as exc:  # busy or full: the next round tries again
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            db.close()

    def _restart(self, db: sqlite3.Connection) -> bool:
        self.jobs.restarting = True  # the loop's jobs wait meanwhile
        try:
            return self.restart_wal(db)
        finally:
            self.jobs.restarting = False

    @staticmethod
    def restart_wal(db: sqlite3.Connection) -> bool:
        """Loop mode: let the next commit start the WAL over; False if it could not now.

        SQLite starts the WAL over only when a write begins with all of it copied, which
        steady commits may never let a PASSIVE checkpoint see. A RESTART checkpoint copies
        what the PASSIVE one left while it holds new writes back, and waits for readers to
        leave the WAL. The loop's jobs wait for it meanwhile (``JobRunner.restarting``:
        without that, back-to-back commits keep the lock from it); it waits for others
        RESTART_WAIT at most, so a long reader (``segproxy queue stats`` on a big queue) never
        holds the proxy's commits back for long, and the next try is RESTART_BACKOFF later.
        """
        db.execute(f"PRAGMA busy_timeout = {int(RESTART_WAIT * 1000)}")
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.OperationalError:  # locked: the same as blocked
            return False
        finally:
            db.execute("PRAGMA busy_timeout = 10000")
        return not busy
