"""Recovery of the journal (invariant J9 in ``queue/journal.py``): read every segment file,
keep the valid records, and work out what is still pending, without writing anything.

:func:`read_segments` reads and scans each file (journal_format.py says what a valid record
is); :func:`replay` orders what was found by seq and applies the RELEASE records to the
COMMIT records. The journal (journal.py) then builds its state from the result, reads back
the bodies of the commits still pending (only those: a journal pinned by one old commit may
hold hundreds of MB of released ones), rewrites the headers of the free segments, and syncs.
Whatever is damaged is reported in a :class:`RecoveryReport`, never delivered, and never
stops start-up.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from segproxy.queue.journal_format import (
    COMMIT,
    HEADER_SIZE,
    RECORD_HEAD_SIZE,
    Gap,
    Record,
    SegmentHeader,
    SegmentScan,
    decode_header,
    decode_release,
    record_generation,
    scan_segment,
)

log = logging.getLogger("segproxy.queue")

SEGMENT_NAME = re.compile(r"seg-(\d{4,})")
MIN_SEGMENT_SIZE = HEADER_SIZE + 4 * RECORD_HEAD_SIZE
MAX_NUMBER = 0xFFFFFFFF  # a segment header's number is a u32
MAX_MISSING = 64  # missing segment numbers reported (the first ones)


def segment_name(number: int) -> str:
    return f"seg-{number:04d}"


@dataclass
class RecoveryReport:
    """What opening the journal found besides the pending commits. Empty lists and zeros are
    the usual outcome; anything else is also logged as a warning."""

    segments: int = 0  # segment files read
    records: int = 0  # valid records at or above the floor
    gaps: list[Gap] = field(default_factory=list)  # damaged bytes with valid records after them
    torn_tails: list[tuple[int, int]] = field(default_factory=list)  # (segment, offset) cut
    missing_seqs: int = 0  # seqs absent between two valid records: records lost or never written
    unreadable: list[int] = field(default_factory=list)  # segments whose header is damaged
    unreadable_bytes: int = 0  # non-zero bytes behind those headers, discarded
    duplicate_seqs: int = 0  # a seq found twice (a copied file): the first one kept
    unknown_releases: int = 0  # RELEASE entries naming no commit at or above the floor (ignored)
    missing_segments: list[int] = field(default_factory=list)  # numbers absent below the highest
    open_modes: list[str] = field(default_factory=list)  # files others may read (left as they are)

    @property
    def damaged(self) -> bool:
        """True when something was cut or skipped beyond a plain torn tail."""
        return bool(self.gaps or self.missing_seqs or self.unreadable_bytes or self.duplicate_seqs)


class Found(NamedTuple):
    """One segment file as recovery read it (its descriptor stays open for the journal)."""

    number: int
    fd: int
    size: int
    header: SegmentHeader | None  # None: unreadable (torn, zero-filled or too small)
    scan: SegmentScan | None
    stray_generation: int  # an unreadable segment's first record's generation, else 0


def _check_mode(path: str, report: RecoveryReport) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        report.open_modes.append(path)
        log.warning(
            "%s is readable by others than its owner (mode %o): it holds events;"
            " chmod it (0700 for the directory, 0600 for segments) unless that is intended",
            path,
            mode,
        )


def read_at(fd: int, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of a file (fewer if it is shorter)."""
    parts: list[bytes] = []
    at = start
    while at < end:
        chunk = os.pread(fd, end - at, at)
        if not chunk:
            break
        parts.append(chunk)
        at += len(chunk)
    return b"".join(parts)


def read_segments(directory: str, report: RecoveryReport, writable: bool = True) -> list[Found]:
    """Open, check and scan every ``seg-NNNN`` file of ``directory`` (other files are left
    alone); ``writable=False``: opened read-only (the CLI, beside a running proxy)."""
    _check_mode(directory, report)
    found: list[Found] = []
    for name in sorted(os.listdir(directory)):
        match = SEGMENT_NAME.fullmatch(name)
        if match is None:
            continue
        if int(match.group(1)) > MAX_NUMBER:  # no header can say it: an operator's file
            log.warning("%s is not a journal segment (its number is too large): left alone", name)
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):  # a directory, a dangling link: not a segment
            log.warning("%s is not a journal segment (not a file): left alone", path)
            continue
        _check_mode(path, report)
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        size = os.fstat(fd).st_size
        buf = read_at(fd, 0, size)  # one segment at a time: only RELEASE payloads are kept
        number = int(match.group(1))
        header = decode_header(buf) if size >= MIN_SEGMENT_SIZE else None
        scan = None if header is None else scan_segment(buf, header)
        stray = 0
        if header is None:
            stray = record_generation(buf, HEADER_SIZE)
            nonzero = len(buf) - HEADER_SIZE - buf.count(0, HEADER_SIZE)
            if nonzero > 0:
                report.unreadable.append(number)
                report.unreadable_bytes += nonzero
        found.append(Found(number, fd, size, header, scan, stray))
    report.segments = len(found)
    numbers = {f.number for f in found}
    if numbers:
        # at most MAX_MISSING: an operator's copy named by a date (seg-20261207) would
        # otherwise list millions of numbers, and the proxy would not start. (A loop, not a
        # generator given to islice: compiled, mypyc builds that generator as a whole list.)
        missing = report.missing_segments
        top = max(numbers)
        n = 0
        while n < top and len(missing) < MAX_MISSING:
            if n not in numbers:
                missing.append(n)
            n += 1
    return found


class Pending(NamedTuple):
    """A COMMIT record with events not yet released, as recovery found it."""

    seq: int
    segment: int
    events: int
    start: int  # where its payload (the pack body of all its events) lies in the segment
    end: int
    released: set[int]  # indexes of its events already released


class Replayed(NamedTuple):
    floor: int
    next_seq: int
    max_generation: int
    in_use: list[tuple[int, int, int]]  # (segment number, first seq, last seq), oldest first
    pending: dict[int, Pending]  # by seq, in seq order


def _ordered_records(
    found: list[Found], floor: int, report: RecoveryReport
) -> list[tuple[Record, int]]:
    """Every valid record at or above ``floor`` with its segment number, in seq order."""
    records: list[tuple[Record, int]] = []
    for f in found:
        if f.scan is None:
            continue
        report.gaps.extend(f.scan.gaps)
        records.extend((r, f.number) for r in f.scan.records if r.seq >= floor)
    records.sort(key=lambda pair: pair[0].seq)
    out: list[tuple[Record, int]] = []
    for rec, number in records:
        if out and out[-1][0].seq == rec.seq:
            report.duplicate_seqs += 1
            continue
        if out:
            report.missing_seqs += rec.seq - out[-1][0].seq - 1
        out.append((rec, number))
    report.records = len(out)
    return out


def replay(found: list[Found], report: RecoveryReport) -> Replayed:
    """Apply the valid records in seq order: what is pending, which segments are in use
    (those holding a record at or above the floor), and where seqs and generations go on."""
    readable = [f for f in found if f.header is not None]
    floor = max((f.header.floor for f in readable if f.header is not None), default=0)
    top = max((r.seq for f in readable if f.scan for r in f.scan.records), default=0)
    generation = max(
        [f.header.generation for f in readable if f.header is not None]
        + [f.stray_generation for f in found],
        default=0,
    )
    pending: dict[int, Pending] = {}
    ranges: dict[int, tuple[int, int]] = {}
    for rec, number in _ordered_records(found, floor, report):
        first, _ = ranges.get(number, (rec.seq, 0))
        ranges[number] = (first, rec.seq)
        if rec.kind == COMMIT:
            start = rec.offset + RECORD_HEAD_SIZE
            pending[rec.seq] = Pending(rec.seq, number, rec.items, start, rec.end, set())
            continue
        for seq, indexes in decode_release(rec.payload, rec.items):
            p = pending.get(seq)
            if p is None:
                # below the floor: a commit of a freed segment, released long ago (normal)
                report.unknown_releases += seq >= floor
            elif indexes is None:
                del pending[seq]
            else:
                p.released.update(i for i in indexes if 0 <= i < p.events)
                if len(p.released) == p.events:
                    del pending[seq]
    # A torn record is cut where the next append goes: the newest segment's tail, or the
    # start of a segment a crossing round had just begun (it holds no valid record).
    newest = max(ranges, key=lambda n: ranges[n][0], default=-1)
    for f in found:
        if f.scan is not None and f.scan.torn and (f.number == newest or f.number not in ranges):
            report.torn_tails.append((f.number, f.scan.tail))
    in_use = sorted(((n, a, b) for n, (a, b) in ranges.items()), key=lambda t: t[1])
    return Replayed(floor, max(top + 1, floor, 1), generation, in_use, pending)


def log_report(report: RecoveryReport, directory: str) -> None:
    """Warn about what recovery cut or skipped (a torn tail alone is the normal trace of a
    crash mid-write: info)."""
    for segment, offset in report.torn_tails:
        log.info("journal %s: cut a torn record at %s offset %d", directory, segment, offset)
    if not report.damaged and not report.unreadable:
        return
    log.warning(
        "journal %s: skipped damaged bytes: %d gaps (%s), %d seqs missing, %d unreadable"
        " segments (%d bytes), %d duplicate seqs; the valid records around them are kept",
        directory,
        len(report.gaps),
        ", ".join(f"{segment_name(g.segment)}@{g.offset}+{g.size}" for g in report.gaps[:5]),
        report.missing_seqs,
        len(report.unreadable),
        report.unreadable_bytes,
        report.duplicate_seqs,
    )
