"""The queue between ingest and the forwarder, and its backends.

``[queue] backend`` picks one (:func:`open_queue`, the one registry; each is imported only
when chosen): ``sqlite``, durable, or ``memory`` (tests and development). base.py holds the
contract every backend keeps; the numbered invariants below are the SQLite queue's, cited
across this package as "invariant N" (docs/architecture.md, "The durable path", tells the
same story in order). Where each is kept:

- sqlite.py: the queue itself: group commit, opening and closing, the forwarder's side.
- schema.py: the file's tables and migrations, the connection's settings, the one
  transaction helper (``Transaction``) and the SQL shared with admin.py (the CLI).
- bookkeeping.py: the forwarder's side in the file: leasing in database mode, deleting,
  retrying, dead letters, the move out of the journal.
- runner.py: where the jobs run, in order: the event loop (loop mode) or the writer thread.
- checkpoint.py: the checkpointer thread (the WAL bounded and synced).
- handover.py: memory mode's hand-over, a state machine without I/O.
- packs.py: a commit's events as one pack (the codec, the ids, the book of what each
  journal commit still holds).
- journal.py (with journal_format.py, journal_recovery.py): the append-only journal of memory
  mode's commits, with its own invariants J1-J10. spill.py: the journal and the file
  together (invariant 12).
- ledger.py: the last fault per key and the dead letters' cap. files.py: file modes, the lock.
- memory.py: the in-memory backend. admin.py: the CLI's ``segproxy queue`` commands.
- journal.py (+ journal_format.py, journal_recovery.py): the append-only journal meant to
  take the steady state's writes off SQLite (issue 13). Not used by the queue yet; its own
  invariants, J1-J10, are at its top.

Invariants of the SQLite queue, in the order things happen:

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
2. **Delete only on delivery.** A row leaves ``events`` (or an event the journal, invariant 12)
   only through ``ack`` (Segment accepted it) or ``dead_letter`` (moved, in the same
   transaction, to ``dead`` with the status and body); an event leaves the journal also by
   becoming a row of ``events`` (a spill, made durable before its release).
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

10. **In memory mode a group commit is one journal record.** With ``normal``, a commit in
    memory mode is one COMMIT record of the journal (invariant 12) holding all its events
    as a *pack* (a fixed head per event, then its key, sentAt and body), not one row of
    ``events`` each: the per-row work of an INSERT and its DELETE, and SQLite's page copies,
    are most of what the file costs per event, and the forwarder reads the events from the
    hand-over list anyway. A packed event's id is PACK_BASE + the record's seq * PACK_SPAN
    + index, above any id of ``events``. The pack book holds exactly the events of each
    record not yet released: a delivered event is released (a RELEASE record naming its
    index, or the whole commit with its last events); a retried or dead one, or one moved
    when memory mode ends, becomes a row of ``events`` or ``dead`` first (a spill). Files
    from before the journal may hold a table ``packs`` of such bodies: opening the file
    turns them into rows, so everything else (database mode, the CLI's replay) only knows
    rows and the journal; ``stats`` and the counters read all three.
11. **Write, then remember.** What this object holds about stored rows (the journal's events,
    the counters, the dead letters' bytes) changes only after the write that mirrors it has
    committed. A bookkeeping job (ack, retry, dead letter, the move to the file) works out
    what to write from memory when it runs (jobs run in order, so it sees every earlier
    job's outcome), writes it, and only then changes memory; if the write fails, the call
    raises (the move to the file logs) and memory stays as the file is. Otherwise a failed
    retry, say, left the pack in memory without its events while the file still held them,
    and acknowledging a sibling later rewrote the pack without them: lost for good. A row
    whose bookkeeping failed stays where it was in the file and is sent again at the latest
    after a restart (at-least-once).

12. **The journal is the write path of memory mode; the file holds everything else.** A
    journal event leaves the journal only by a RELEASE record (J6), appended only once what
    replaces it is written: Segment's 2xx (delivered), or a *spill*: the event as a row of
    ``events`` or ``dead`` together with its place in the journal in ``journal_spills``,
    one transaction fsynced before the RELEASE is written (a power cut cannot keep the
    release and lose the row). A crash between the two leaves the event in both; the next
    open releases it from the journal without storing it again, since ``journal_spills``
    names it: each event is queued once. Opening the queue recovers the journal (J9) and
    spills everything still pending in it, so a new process starts with rows only. A commit
    the journal cannot take (no segment left, a failed write) is written to the file as
    rows instead, and a full journal ends memory mode, whose move empties it. A journal
    that cannot be opened at all (no room for its first segment) leaves every commit to the
    file, logged as an error; what it holds waits in it for the next start. ``segproxy
    queue purge`` stamps the journal's next seq in the file: journal events committed
    before it are dropped wherever they would be spilled, and ``stats`` does not count
    them (a seq, not a time: a clock stepping back cannot make new events look old). With
    ``full``, commits go to the file (fsynced each) and the journal only holds what a
    previous ``normal`` process left. Why: a journal write is one ``pwritev`` of bytes
    already encoded, where a pack in SQLite cost its page copies, WAL frames and checksums,
    the B-tree and the delete (docs/architecture.md, "The durable path").

The SQLite calls of the proxy run serialised on one connection: on the loop (invariant 9) or
the writer thread; only the checkpointer has its own.
"""

from __future__ import annotations

from collections.abc import Callable

from segproxy.config import Config
from segproxy.queue.base import Queue


async def open_queue(
    config: Config, on_commit: Callable[[int], None] | None = None
) -> Queue | None:
    """The configured queue, opened; None for ``backend = "none"`` (synchronous forwarding).
    ``on_commit(rows)`` is called once per commit that stored rows, before its callers hear
    of it (the app wakes the forwarder with it)."""
    q = config.queue
    if q.backend == "none":
        return None
    if q.backend == "memory":
        from segproxy.queue.memory import MemoryQueue

        return MemoryQueue(
            max_rows=q.max_rows,
            max_bytes=q.max_bytes,
            max_dead_bytes=q.max_dead_bytes,
            on_commit=on_commit,
        )
    from segproxy.queue.sqlite import SqliteQueue

    return await SqliteQueue(
        q.path,
        max_rows=q.max_rows,
        max_bytes=q.max_bytes,
        min_free_disk_bytes=q.min_free_disk_bytes,
        max_dead_bytes=q.max_dead_bytes,
        synchronous=q.synchronous.upper(),
        lease_seconds=max(120.0, config.upstream.timeout * 4),
        journal_segment_bytes=q.journal_segment_bytes,
        on_commit=on_commit,
    ).open()
