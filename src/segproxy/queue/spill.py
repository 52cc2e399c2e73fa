"""The journal and the queue file (invariant 12 in ``queue/__init__.py``): what moves events
out of the journal into SQLite (a *spill*), how a crash between the two is told apart from
a second copy, what ``segproxy queue purge`` means for events in the journal, and how the CLI
reads the journal without owning it.

A spill writes the events as rows (of ``events`` or ``dead``) and, in the same transaction,
their places in the journal (seq, index) into ``journal_spills``; that transaction is fsynced
(a power cut cannot keep the RELEASE that follows and lose the rows, J6 in journal.py), and
only then is the RELEASE appended. A crash between the two leaves the events in both: at the
next open, the journal's pending events named in ``journal_spills`` are released without
being stored again, so each event is queued once. Entries are forgotten once the journal
has freed every segment that could still hold their commits (seqs under its floor, J8).

A purge stamps ``purged_below`` (``meta``): the journal's next seq as the purge read it.
Journal events of commits below it are dropped wherever they would be stored (the move to the
file, the spill at open) and are not counted by ``stats``; events handed over to the forwarder
already are still delivered. Seqs only grow (J3), so what the proxy acknowledges after the
purge is never taken for what was there before, whatever the clock does; the stamp is
forgotten once the next open has emptied the journal it was taken from.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
from collections.abc import Iterable

from segproxy.queue.base import NewRow, Row
from segproxy.queue.journal import (
    Journal,
    JournalError,
    JournalFull,
    JournalSyncer,
    PendingCommit,
    open_journal,
)
from segproxy.queue.journal_recovery import RecoveryReport, read_at, read_segments, replay
from segproxy.queue.packs import PACK_BASE, PACK_SPAN, pack_of, pack_rows, unpack_rows
from segproxy.queue.schema import INSERT_NEW, Transaction

log = logging.getLogger("segproxy.queue")

SPILLED = "INSERT OR IGNORE INTO journal_spills (seq, idx) VALUES (?, ?)"
PURGED_BELOW = "purged_below"
RELEASES_PER_RECORD = 4096  # 48 KiB of whole-commit entries: well within a segment's reserve

# An event of the journal: its commit's seq, its index in it, the event.
JournalEvent = tuple[int, int, NewRow]


def purged_below(db: sqlite3.Connection) -> int:
    """The journal's commits below this seq were purged (0: none)."""
    row = db.execute("SELECT value FROM meta WHERE name = ?", (PURGED_BELOW,)).fetchone()
    return 0 if row is None else int(row[0])


def mark_purge(db: sqlite3.Connection, next_seq: int) -> None:
    """Inside the purge's transaction: the journal's commits below ``next_seq`` go too."""
    db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (PURGED_BELOW, next_seq))


def spilled(db: sqlite3.Connection) -> set[tuple[int, int]]:
    return {(int(s), int(i)) for s, i in db.execute("SELECT seq, idx FROM journal_spills")}


def record_spills(db: sqlite3.Connection, packed: Iterable[Row]) -> int:
    """Inside a spill's transaction: where ``packed`` lie in the journal; how many."""
    places = [(pack_of(r.id), r.id - PACK_BASE - pack_of(r.id) * PACK_SPAN) for r in packed]
    db.executemany(SPILLED, places)
    return len(places)


def forget_spills(db: sqlite3.Connection, floor: int) -> int:
    """Entries of commits under the journal's floor go (their segments were freed, J8);
    returns how many are left."""
    with Transaction(db):
        db.execute("DELETE FROM journal_spills WHERE seq < ?", (floor,))
        return int(db.execute("SELECT count(*) FROM journal_spills").fetchone()[0])


def still_queued(
    pending: Iterable[PendingCommit], done: set[tuple[int, int]], purged: int
) -> list[JournalEvent]:
    """The pending events of the journal that are nowhere else: not spilled already, not
    committed before the last purge."""
    return [
        (p.seq, i, row)
        for p in pending
        if p.seq >= purged
        for i, row in p.rows()
        if (p.seq, i) not in done
    ]


def spill_at_open(
    db: sqlite3.Connection, journal: Journal, pending: list[PendingCommit], synchronous: str
) -> int:
    """At open: what a previous process left pending in the journal becomes rows of
    ``events`` (as packs did, invariant 10), then is released; returns how many events."""
    if not pending:
        with Transaction(db):
            db.execute("DELETE FROM journal_spills")
            db.execute("DELETE FROM meta WHERE name = ?", (PURGED_BELOW,))
        return 0
    with Transaction(db, synchronous, durable=True):
        todo = still_queued(pending, spilled(db), purged_below(db))
        db.executemany(INSERT_NEW, [row for _, _, row in todo])
        db.executemany(SPILLED, [(seq, i) for seq, i, _ in todo])
    releases: list[tuple[int, list[int] | None]] = [(p.seq, None) for p in pending]
    for at in range(0, len(releases), RELEASES_PER_RECORD):
        # In pieces, each synced and followed by the freeing of the segments it emptied: a
        # journal full of pending commits has only its reserve (J4) for the first piece.
        journal.append([], releases[at : at + RELEASES_PER_RECORD])
        journal.sync()
        journal.reclaim()
    with Transaction(db):  # every commit they name is released, durably
        db.execute("DELETE FROM journal_spills")
        db.execute("DELETE FROM meta WHERE name = ?", (PURGED_BELOW,))
    return len(todo)


def journal_of(path: str) -> str:
    return path + ".journal"


def read_journal(path: str, db: sqlite3.Connection) -> tuple[list[NewRow], int]:
    """For the CLI, without owning the journal (a proxy may be writing it): the events it
    holds that are queued nowhere else, and the seq its next record will get (as far as
    this read saw). Reads every segment; writes nothing."""
    directory = journal_of(path)
    if not os.path.isdir(directory):
        return [], 0
    report = RecoveryReport()
    found = read_segments(directory, report, writable=False)
    try:
        fds = {f.number: f.fd for f in found}
        pending: list[PendingCommit] = []
        replayed = replay(found, report)
        for p in replayed.pending.values():
            body = read_at(fds[p.segment], p.start, p.end)
            try:
                unpack_rows(body)
            except (ValueError, IndexError, struct.error):
                # The proxy reused the segment between the scan and this read: that happens
                # only once every commit in it was released (J7): nothing of it is queued.
                continue
            pending.append(PendingCommit(p.seq, p.events, body, frozenset(p.released)))
    finally:
        for f in found:
            os.close(f.fd)
    rows = [row for _, _, row in still_queued(pending, spilled(db), purged_below(db))]
    return rows, replayed.next_seq


class HotTier:
    """The journal as the queue's write path in memory mode (invariant 12): recovered and
    emptied into the file when the queue opens, synced every 0.2 s by its syncer with
    ``normal``, closed (and synced) with the queue. Used by the queue's jobs only (J10)."""

    __slots__ = ("full", "journal", "syncer")

    def __init__(self, journal: Journal, syncer: JournalSyncer | None) -> None:
        self.journal = journal
        self.syncer = syncer
        self.full = False  # a commit found no room: the queue leaves memory mode

    @classmethod
    def open(
        cls, db: sqlite3.Connection, path: str, synchronous: str, segment_bytes: int, segments: int
    ) -> HotTier | None:
        """None when the journal cannot be opened (no room for its first segment, say): the
        queue then commits to the file, and whatever the journal holds waits there, intact,
        for a start that can open it."""
        try:
            journal, pending, _ = open_journal(path, segment_bytes, segments)
        except (JournalError, OSError) as exc:
            log.error(
                "could not open the journal %s (%s): events are committed to the queue file"
                " instead (more CPU per event); any it holds stay there for the next start",
                journal_of(path),
                exc,
            )
            return None
        moved = spill_at_open(db, journal, pending, synchronous)
        if moved:
            log.info("moved %d events a previous process left in the journal to the file", moved)
        syncer = JournalSyncer(journal) if synchronous == "NORMAL" else None
        if syncer is not None:
            syncer.start()
        return cls(journal, syncer)

    def append(self, rows: list[NewRow]) -> int:
        """``rows`` as one commit; returns its last event's id, or -1 when the journal could
        not take it (logged; the caller writes it to the file instead; ``full`` if no room
        was left)."""
        body = pack_rows(rows)
        if len(body) > self.journal.max_payload:
            return -1  # larger than a segment takes: the file takes it (configuration.md)
        try:
            (seq,) = self.journal.append([(len(rows), body)], [])
        except JournalError as exc:
            log.warning("the journal could not take a commit (%s): writing it to the file", exc)
            self.full = isinstance(exc, JournalFull)
            return -1
        return PACK_BASE + seq * PACK_SPAN + len(rows) - 1

    def close(self) -> None:
        if self.syncer is not None:
            self.syncer.stop()
        try:
            self.journal.close()
        except OSError as exc:
            log.error("could not sync the journal at close: %s", exc)
