"""The journal: group commits appended to preallocated segment files, the cheap durable write
of the steady state (issue 13). SQLite stays for what is not the steady state: retries, dead
letters, a backlog. journal_format.py holds the bytes, journal_recovery.py the reading back.
Long because the invariants and the recovery argument stand here in full
(about 115 lines), and the code (about 515) is one class whose append, segment reuse and
sync share the counters J10 reasons about; split, those counters would cross a module
boundary that nothing else needs.

The queue (sqlite.py, bookkeeping.py, spill.py) uses it in memory mode with ``synchronous =
"normal"``: invariant 12 in ``queue/__init__.py``. The invariants, cited as "J<n>":

J1. **Files.** ``<queue path>.journal/`` (``0700`` when segproxy makes it) holds segment files
    ``seg-NNNN``, each created ``0600``, preallocated (``posix_fallocate``) to
    ``segment_size`` (8 MiB by default) and never truncated. A segment starts with a header:
    magic, format version, its number, a random *salt*, its *generation* and the *floor*
    (J8), with a CRC. Existing files and a directory others may read are the operator's: left
    as they are, warned about and reported. The caller holds the queue's lock
    (files.lock_exclusively): one process per journal.

J2. **Records.** From the header on, records lie back to back: ``magic | kind | flags |
    length | count | generation | seq | crc | payload``. A COMMIT's payload is one group
    commit's pack body (packs.py: per event its key, sentAt and body) and ``count`` its
    events; a RELEASE's payload lists (seq, event indexes) that left the journal, an entry
    for a whole commit being 12 bytes. A record is *valid* when its magic, kind and length
    (within the segment) hold, its generation is its segment header's, its CRC (CRC-32C
    started from the salt) holds, and its seq is above the previous valid record's of
    the segment. Nothing else is ever read as a record.

J3. **Seqs.** Each record gets the next seq: strictly increasing over the whole journal,
    never given to two valid records: a failed write's seqs are skipped, and recovery carries
    on above every valid seq it saw (a torn record's seq may be given again: it was never
    valid, and its bytes lie at the tail, where the next append overwrites them). So seq
    order is append order, a RELEASE always comes after the commits it names, and bytes left
    behind by an earlier write can never pass as valid after newer records (J2's "above").

J4. **One append per loop round, written then remembered.** :meth:`Journal.append` turns a
    round's commits (already encoded by the caller: no per-event work here) and releases
    into records (its commits, then at most one RELEASE) and writes them at the tail with one
    ``pwritev``; when they do not all fit, the rest starts the next segment (a record never
    spans two): two writes. Only when every write succeeded does memory change (the tail,
    the commits pending, the releases): a failed append raises and changes nothing but J3's
    seqs; whatever it left in the file is overwritten by the next append, or, if the process
    dies first, read back as what it is: an unacknowledged commit, sent at most once more
    (at-least-once). Rounds with commits leave the last ``RESERVE`` bytes of a segment free,
    so that releases (which are what frees space) can still be written when no segment is
    left to cross into.

J5. **Acknowledge after the write.** With ``synchronous = "normal"`` a commit may be
    acknowledged once ``append`` returned (the page cache survives the process; kill -9
    loses nothing); :class:`JournalSyncer` fdatasyncs every file written since its last
    round every 0.2 s, so a power cut loses at most that window. With ``"full"`` the caller
    calls :meth:`Journal.sync` after ``append`` and before acknowledging.

J6. **A commit leaves by RELEASE only.** An event leaves the journal when a RELEASE naming it
    is appended: it was delivered, dead-lettered, or spilled into SQLite. A spill must be
    durable in SQLite (committed, and synced as far as the journal's RELEASE will be) before
    its RELEASE is appended, or a power cut could keep the release and lose the row. A commit
    is *fully released* when all its events are; RELEASE entries naming unknown seqs or
    indexes are ignored.

J7. **Reuse oldest-first, once released and synced.** Segments in use form a ring ordered
    by seq. Only the oldest one is freed (:meth:`Journal.reclaim`), never the tail, and only
    when every commit in it is fully released *and* the write holding its last release has
    been synced (J5): after a power cut, a commit whose segment was reused cannot come back
    because its release was lost. Freeing rewrites the header: generation + 1 (over every
    generation the journal has seen), a new salt, the floor; every record of the previous
    generation is invalid from then on (J2), whatever remains of its bytes. A freed segment
    is written again only once that header is durable (synced by the syncer, or here if it
    has not run since): its new records never overwrite old ones under an old header that a
    power cut could bring back with them. A long-pending commit in the oldest segment
    (Segment down) holds the ring: the journal grows up to ``max_segments`` and then refuses
    commits (:class:`JournalFull`; releases still fit, J4); :meth:`Journal.stats` says what
    the queue needs to spill in time (oldest pending seq and age, segments in use).

J8. **The floor.** A header's floor is the first seq of the oldest segment still in use when
    it was written (or the next seq, if none): every commit below it was fully released.
    Recovery uses the highest floor of all headers and ignores records below it. This is what
    makes freeing safe although segments are separate files that a power cut may persist in
    any order: if the header of a freed segment A is lost but the later header of B (freed
    after A, holding A's releases) survives, B's floor still buries A's old commits.

J9. **Recovery** (:func:`open_journal`). Every segment is scanned (J2); past an invalid record
    the scan looks for the next valid one, so damaged bytes in the middle (a bad CRC) are a
    reported *gap* and the valid records around them are kept: they carry this generation's
    salted CRC and a seq above all before them, so they are records this journal wrote, and
    events acknowledged. In the newest segment the tail is the end of its last valid record:
    a torn record there is cut and overwritten by the next append. Records are applied in
    seq order from the floor: the pending commits are the COMMITs minus their released
    events, in seq order. Unreadable headers, gaps, missing seqs and duplicated seqs are
    reported, logged and never stop start-up. Segments holding no record at or above the
    floor are free: their headers are rewritten (J7) before anything is appended. Recovery
    then syncs every file, so what it read is durable before it is relied on.

J10. **Threads.** A journal belongs to one thread (the event loop, or the writer thread with
    ``full``); only :meth:`Journal.sync` may run on another (the syncer), and the two share
    no more than counters: the journal's writes (``_written``, raised after each append or
    header write) and, per segment, its last write's number (set before that count is
    raised) and the last one a sync covered. A sync reads the journal's count first, then
    fdatasyncs each segment written since its last sync, then declares that count synced:
    a write it counted was marked before, so it never claims a write it did not sync. Each
    step is one attribute read or write (atomic under the GIL). Syncs take a lock among
    themselves, which ``append`` never takes.

Why no commit is ever lost and a delivered one rarely comes back (the recovery argument):

- *Never lost.* A pending commit's record is never overwritten: the tail only moves forward
  over bytes past the last valid record (J4, J9), and a segment is rewritten only once
  every commit in it is fully released (J7). Its header's generation and salt change only
  then, and the floor only passes seqs of freed segments (J8). A commit that was
  acknowledged was written (J5) and, in ``full`` or after the syncer's round, synced; so the
  scan finds it valid (J2), unless the disk itself corrupted it (then it is a reported gap,
  not garbage).
- *Rarely back.* A delivered commit comes back only if the RELEASE naming it is not read back:
  lost in a power cut before the syncer synced it (then its segment was not reused, J7, and
  the commit is sent again: at-least-once), or in a gap. Its segment's reuse, once durable,
  buries it for good (generation and salt), and the floor buries it even if that header was
  lost (J8).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import NamedTuple

from segproxy.queue.base import NewRow, QueueError
from segproxy.queue.files import private_dir
from segproxy.queue.journal_format import (
    COMMIT,
    HEADER_SIZE,
    RECORD_HEAD_SIZE,
    RELEASE,
    SegmentHeader,
    encode_header,
    encode_release,
    record_head,
)
from segproxy.queue.journal_recovery import (
    MIN_SEGMENT_SIZE,
    Found,
    RecoveryReport,
    Replayed,
    log_report,
    read_at,
    read_segments,
    replay,
    segment_name,
)
from segproxy.queue.packs import unpack_rows
from segproxy.queue.runner import Worker

log = logging.getLogger("segproxy.queue")

SEGMENT_SIZE = 8 << 20
MAX_SEGMENTS = 64  # 512 MiB of 8 MiB segments before commits are refused (J7)
# Bytes of each segment only releases may use (J4): enough to release at once everything
# the queue's hand-over list may hold (20,000 commits at 12 bytes each), which is what
# leaving memory mode writes when the journal is full.
RESERVE = 512 << 10
SYNC_EVERY = 0.2  # seconds between the syncer's rounds (J5)
_IOV_MAX = 1024  # buffers per pwritev (Linux's limit)

# A round's commits: (events, pack body); its releases: (seq, indexes or None for all).
Commit = tuple[int, bytes]
Release = tuple[int, list[int] | None]


class JournalError(QueueError):
    """The journal could not write: nothing changed in memory (J4)."""


class JournalFull(JournalError):
    """No segment left for these commits (J7): the caller spills or refuses them."""


class _Segment:
    __slots__ = (
        "fd",
        "first_seq",
        "generation",
        "initialised_at",
        "number",
        "open_commits",
        "released_at",
        "salt",
        "size",
        "synced_at",
        "tail",
        "written_at",
    )

    def __init__(self, number: int, fd: int, size: int, header: SegmentHeader) -> None:
        self.number = number
        self.fd = fd
        self.size = size
        self.generation = header.generation
        self.salt = header.salt
        self.tail = HEADER_SIZE
        self.first_seq = 0  # 0: no record yet
        self.open_commits = 0  # commits in it not fully released
        self.released_at = 0  # the write (Journal._written) holding its last release
        self.initialised_at = 0  # the write of its header
        self.written_at = 0  # the last write to it (J10)
        self.synced_at = 0  # the last write to it that a sync covered


class _Live:
    """A commit not fully released."""

    __slots__ = ("at", "events", "released", "segment")

    def __init__(self, segment: _Segment, events: int, at: float) -> None:
        self.segment = segment
        self.events = events
        self.released: set[int] | None = None  # indexes released so far, if only some
        self.at = at  # monotonic time it was appended (recovered: when the journal opened)


class PendingCommit(NamedTuple):
    """A commit recovery found with events still to deliver."""

    seq: int
    events: int
    body: bytes
    released: frozenset[int]

    def rows(self) -> list[tuple[int, NewRow]]:
        """Its events still pending, with their index in the commit (for a RELEASE)."""
        return [(i, r) for i, r in enumerate(unpack_rows(self.body)) if i not in self.released]


class JournalStats(NamedTuple):
    segments: int  # files
    in_use: int
    free: int
    max_segments: int
    pending_commits: int
    oldest_pending_seq: int  # 0 if none
    oldest_pending_age: float  # seconds, 0.0 if none
    unsynced: bool


def _salt() -> int:
    return int.from_bytes(os.urandom(4), "little")


class Journal:
    """Use :func:`open_journal`. See the module's invariants."""

    def __init__(self, directory: str, segment_size: int, max_segments: int) -> None:
        if segment_size < RESERVE + MIN_SEGMENT_SIZE + RECORD_HEAD_SIZE:
            raise ValueError(f"segment_size must be at least {RESERVE + MIN_SEGMENT_SIZE} bytes")
        self.directory = directory
        self.segment_size = segment_size
        self.max_segments = max_segments
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self._segments: dict[int, _Segment] = {}
        self._in_use: deque[_Segment] = deque()  # oldest first; the last is the tail
        self._free: list[_Segment] = []
        self._live: dict[int, _Live] = {}  # seq -> commit, in seq order
        self._next_seq = 1
        self._max_generation = 0
        self._written = 0  # writes done (J10)
        self._synced = 0  # writes known durable
        self._dir_written_at = 0  # the last new file's name (the directory is synced too)
        self._dir_synced_at = 0
        self._sync_lock = threading.Lock()  # one sync at a time (never taken by append)

    def restore(self, found: list[Found], replayed: Replayed) -> list[PendingCommit]:
        """Build the state recovery found (J9): segments in use and free, the commits
        pending; rewrite the free segments' headers and sync everything. Called once, by
        :func:`open_journal`."""
        self._next_seq = replayed.next_seq
        self._max_generation = replayed.max_generation
        scans: dict[int, int] = {}
        in_use = {number for number, _, _ in replayed.in_use}
        for f in found:
            # a segment in use keeps its size; a free one grows to segment_size if smaller
            size = f.size if f.number in in_use else max(f.size, self.segment_size)
            header = f.header or SegmentHeader(f.number, 0, 0, 0)
            self._segments[f.number] = _Segment(f.number, f.fd, size, header)
            if f.scan is not None:
                scans[f.number] = f.scan.tail
        # what a crash left in the page cache is synced before it is relied on
        self._written = self._dir_written_at = 1
        for seg in self._segments.values():
            seg.written_at = 1
        for number, first, _ in replayed.in_use:
            seg = self._segments[number]
            seg.first_seq = first
            seg.tail = scans[number]
            self._in_use.append(seg)
        now = time.monotonic()
        out: list[PendingCommit] = []
        for p in replayed.pending.values():
            seg = self._segments[p.segment]
            c = _Live(seg, p.events, now)
            c.released = set(p.released) if p.released else None
            self._live[p.seq] = c
            seg.open_commits += 1
            body = read_at(seg.fd, p.start, p.end)  # checked by the scan; not changed since
            out.append(PendingCommit(p.seq, p.events, body, frozenset(p.released)))
        for number in sorted(self._segments):
            if number not in in_use:
                self._initialise(self._segments[number])
                self._free.append(self._segments[number])
        self._free.reverse()  # taken from the end: lowest numbers first
        if not self._in_use:
            self._in_use.append(self._take_segment())
        self.sync()
        return out

    @property
    def _tail(self) -> _Segment:
        return self._in_use[-1]

    @property
    def max_payload(self) -> int:
        """The largest commit payload a segment of this journal takes."""
        return self.segment_size - HEADER_SIZE - RESERVE - RECORD_HEAD_SIZE

    def append(self, commits: list[Commit], releases: list[Release]) -> list[int]:
        """Write one round (J4): its commits, then one RELEASE for ``releases``; the commits'
        seqs. JournalFull (nothing written) when the commits need a segment and none is left;
        JournalError if a write failed. (hot path: one call per loop round.)"""
        items: list[tuple[int, int, bytes]] = [(COMMIT, n, body) for n, body in commits]
        if releases:
            items.append((RELEASE, len(releases), encode_release(releases)))
        if not items:
            return []
        seg = self._tail
        limit = seg.size - (RESERVE if commits else 0)
        split, used, rest = _split(items, limit - seg.tail, self.max_payload + RECORD_HEAD_SIZE)
        nxt: _Segment | None = None
        if split < len(items):
            nxt = self._take_segment()
            if rest > nxt.size - HEADER_SIZE - (RESERVE if commits else 0):
                self._free.append(nxt)
                raise JournalError(f"a round of {rest} bytes does not fit in one segment")
        first = self._next_seq
        self._next_seq = first + len(items)  # J3: spent even if the write fails
        try:
            self._write(seg, seg.tail, _records(items[:split], seg, first))
            if nxt is not None:
                self._write(nxt, HEADER_SIZE, _records(items[split:], nxt, first + split))
        except OSError as exc:
            if nxt is not None:
                self._free.append(nxt)
            raise JournalError(f"could not write to the journal: {exc}") from exc
        self._written += 1
        seg.tail += used
        if split and not seg.first_seq:
            seg.first_seq = first
        if nxt is not None:
            nxt.tail = HEADER_SIZE + rest
            nxt.first_seq = first + split
            self._in_use.append(nxt)
        return self._remember(commits, releases, first, split, seg, nxt)

    def _remember(
        self,
        commits: list[Commit],
        releases: list[Release],
        first: int,
        split: int,
        seg: _Segment,
        nxt: _Segment | None,
    ) -> list[int]:
        now = time.monotonic()
        live = self._live
        seqs = list(range(first, first + len(commits)))
        for i, (events, _) in enumerate(commits):
            target = seg if i < split or nxt is None else nxt
            live[first + i] = _Live(target, events, now)
            target.open_commits += 1
        for seq, indexes in releases:
            self._release(seq, indexes)
        return seqs

    def _release(self, seq: int, indexes: list[int] | None) -> None:
        c = self._live.get(seq)
        if c is None:  # unknown, or released already (J6)
            return
        if indexes is not None:
            released = c.released
            if released is None:
                released = c.released = set()
            released.update(i for i in indexes if 0 <= i < c.events)
            if len(released) < c.events:
                return
        del self._live[seq]
        seg = c.segment
        seg.open_commits -= 1
        if seg.open_commits == 0:
            seg.released_at = self._written

    def _write(self, seg: _Segment, at: int, buffers: list[bytes]) -> None:
        for i in range(0, len(buffers), _IOV_MAX):
            chunk = buffers[i : i + _IOV_MAX]
            size = sum(len(b) for b in chunk)
            done = os.pwritev(seg.fd, chunk, at)
            if done < size:  # short write: rare on a regular file; finish it plainly
                rest = b"".join(chunk)[done:]
                while rest:
                    n = os.pwrite(seg.fd, rest, at + done)
                    done += n
                    rest = rest[n:]
            at += size
        seg.written_at = self._written + 1  # counted by the caller right after (J10)

    def _take_segment(self) -> _Segment:
        """A segment to cross into: a free one whose new header is durable (J7), else any
        free one once its header is synced here, else a new file."""
        free = self._free
        if not free:
            self.reclaim()
        for i in range(len(free) - 1, -1, -1):
            if free[i].initialised_at <= self._synced:
                return free.pop(i)
        if free:
            seg = free[-1]
            try:
                os.fdatasync(seg.fd)  # rare: the queue reclaims ahead of need (see the notes)
            except OSError as exc:
                raise JournalError(f"could not sync {segment_name(seg.number)}: {exc}") from exc
            return free.pop()
        if len(self._segments) < self.max_segments:
            return self._create()
        raise JournalFull(
            f"the journal's {self.max_segments} segments hold pending commits"
            f" (oldest seq {self.stats().oldest_pending_seq})"
        )

    @property
    def floor(self) -> int:
        """Every commit under this seq was fully released and its segment freed (J8)."""
        return self._floor()

    def _floor(self) -> int:
        for seg in self._in_use:
            if seg.first_seq:
                return seg.first_seq
        return self._next_seq

    def _new_header(self, number: int) -> SegmentHeader:
        return SegmentHeader(number, _salt(), self._max_generation + 1, self._floor())

    def _create(self) -> _Segment:
        """A new segment file, preallocated, its header written (free, not in use yet)."""
        number = 0
        while number in self._segments:
            number += 1
        path = os.path.join(self.directory, segment_name(number))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise JournalError(f"could not create {path}: {exc}") from exc
        seg = _Segment(number, fd, self.segment_size, SegmentHeader(number, 0, 0, 0))
        self._segments[number] = seg  # known to sync before its first write is counted
        self._dir_written_at = self._written + 1  # the new name, durable with the next sync
        try:
            self._initialise(seg)
        except JournalError:
            del self._segments[number]
            os.close(fd)
            os.unlink(path)
            raise
        return seg

    def _initialise(self, seg: _Segment) -> None:
        """(Re)write a segment's header (J7), extending the file to its size if needed."""
        header = self._new_header(seg.number)
        try:
            if os.fstat(seg.fd).st_size < seg.size:
                os.posix_fallocate(seg.fd, 0, seg.size)
            os.pwrite(seg.fd, encode_header(header), 0)
        except OSError as exc:
            raise JournalError(f"could not initialise {segment_name(seg.number)}: {exc}") from exc
        seg.written_at = self._written + 1
        self._written += 1
        self._max_generation = header.generation
        seg.generation = header.generation
        seg.salt = header.salt
        seg.tail = HEADER_SIZE
        seg.first_seq = 0
        seg.open_commits = 0
        seg.released_at = 0
        seg.initialised_at = self._written

    def reclaim(self) -> int:
        """Free the oldest segments that may be (J7): how many were."""
        freed = 0
        in_use = self._in_use
        while len(in_use) > 1:
            seg = in_use[0]
            if seg.open_commits or seg.released_at > self._synced:
                break
            in_use.popleft()
            try:
                self._initialise(seg)
            except JournalError:
                in_use.appendleft(seg)
                raise
            self._free.append(seg)
            freed += 1
        return freed

    @property
    def unsynced(self) -> bool:
        return self._written != self._synced

    def sync(self) -> None:
        """fdatasync every file written since the last sync (J5; may run on the syncer's
        thread, J10). OSError if one failed: those writes are not known durable."""
        with self._sync_lock:
            written = self._written  # read first: every write counted here is marked (J10)
            segments = tuple(self._segments.values())
            at = self._dir_written_at
            if at > self._dir_synced_at:
                os.fdatasync(self._dir_fd)
                self._dir_synced_at = at
            for seg in segments:
                at = seg.written_at
                if at > seg.synced_at:
                    os.fdatasync(seg.fd)
                    seg.synced_at = at
            self._synced = max(self._synced, written)

    def stats(self) -> JournalStats:
        oldest = next(iter(self._live.items()), None)
        return JournalStats(
            segments=len(self._segments),
            in_use=len(self._in_use),
            free=len(self._free),
            max_segments=self.max_segments,
            pending_commits=len(self._live),
            oldest_pending_seq=0 if oldest is None else oldest[0],
            oldest_pending_age=0.0 if oldest is None else time.monotonic() - oldest[1].at,
            unsynced=self.unsynced,
        )

    def close(self, sync: bool = True) -> None:
        """Sync (unless told not to: what a crash does) and close every file."""
        try:
            if sync:
                self.sync()
        finally:
            for seg in self._segments.values():
                os.close(seg.fd)
            os.close(self._dir_fd)
            self._segments.clear()


def _split(items: list[tuple[int, int, bytes]], room: int, largest: int) -> tuple[int, int, int]:
    """How many records fit in ``room`` bytes (in order), their bytes, and the rest's."""
    split = used = rest = 0
    for _, _, payload in items:
        size = RECORD_HEAD_SIZE + len(payload)
        if size > largest:
            raise JournalError(f"a record of {size} bytes is larger than a segment takes")
        if rest == 0 and used + size <= room:
            used += size
            split += 1
        else:
            rest += size
    return split, used, rest


def _records(items: list[tuple[int, int, bytes]], seg: _Segment, seq: int) -> list[bytes]:
    """The buffers of ``items`` as records of ``seg`` from ``seq`` on (head, payload, ...)."""
    buffers: list[bytes] = []
    generation = seg.generation
    salt = seg.salt
    for kind, count, payload in items:
        buffers.append(record_head(kind, payload, count, generation, seq, salt))
        buffers.append(payload)
        seq += 1
    return buffers


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_journal(
    queue_path: str, segment_size: int = SEGMENT_SIZE, max_segments: int = MAX_SEGMENTS
) -> tuple[Journal, list[PendingCommit], RecoveryReport]:
    """Open (or create) the journal of the queue at ``queue_path`` and recover it (J9): the
    journal, its pending commits in seq order, and what recovery found."""
    directory = queue_path + ".journal"
    private_dir(directory)
    _sync_directory(os.path.dirname(os.path.abspath(directory)))  # its name, if just made
    report = RecoveryReport()
    found = read_segments(directory, report)
    try:
        journal = Journal(directory, segment_size, max(max_segments, len(found), 1))
        pending = journal.restore(found, replay(found, report))
    except BaseException:
        for f in found:
            os.close(f.fd)
        raise
    log_report(report, directory)
    return journal, pending, report


class JournalSyncer(Worker):
    """With ``synchronous = "normal"``: a thread that syncs the journal every SYNC_EVERY
    seconds when something was written (J5). Started once the journal is open, stopped
    (and joined) before it closes."""

    def __init__(self, journal: Journal, every: float = SYNC_EVERY) -> None:
        super().__init__("segproxy-journal")
        self.journal = journal
        self.every = every
        self.failures = 0  # syncs that failed (logged; retried next round)

    def _serve(self) -> None:
        while not self._stop.wait(self.every):
            if not self.journal.unsynced:
                continue
            try:
                self.journal.sync()
            except OSError as exc:
                self.failures += 1
                log.error("could not sync the journal (%s): recent commits are not durable", exc)
