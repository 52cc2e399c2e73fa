"""The journal's bytes (``queue/journal.py`` holds the invariants): segment headers, records,
RELEASE payloads, and the scan that finds a segment's valid records. Pure: no I/O.

A segment file::

    header (HEADER_SIZE bytes, zero-padded):
        magic b"SPJ1" | version u16 | reserved u16 | segment number u32 | salt u32
        | generation u64 | floor u64 | crc32 of all that u32
    records, back to back, from HEADER_SIZE:
        magic u16 | kind u8 | flags u8 | length u32 | count u32 | generation u64 | seq u64
        | crc u32 | payload (length bytes)

A record's ``crc`` is the CRC-32C (Castagnoli, computed by the processor's own instruction
through google-crc32c: an eighth of zlib's CRC-32's time, which was half of an append) of its
head (less the crc) then its payload, started from the segment's ``salt`` instead of 0. The
salt is random, new at each (re)use of the segment and never leaves the file: a record that
an event body smuggles into the file (it is only bytes a client chose) cannot have a valid
CRC without it, so the scan, which looks for records byte by byte past a damaged one, cannot
be fooled into reading one (1 in 2**32).

``count`` is the number of events of a COMMIT (its payload is a pack body, packs.py) and the
number of entries of a RELEASE, so a COMMIT's payload is exactly the bytes the caller
encoded: nothing is copied to prefix it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import google_crc32c


def crc(data: bytes, start: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``start``."""
    return int(google_crc32c.extend(start, data))


SEGMENT_MAGIC = b"SPJ1"
FORMAT_VERSION = 1
_SEGMENT_HEAD = struct.Struct("<4sHHIIQQ")  # magic, version, reserved, number, salt, gen, floor
_CRC = struct.Struct("<I")
HEADER_SIZE = 64

# 0xFF never occurs in UTF-8 (event bodies are JSON), so the scan's search for a record's
# first two bytes rarely stops inside an event.
RECORD_MAGIC = 0xA5FF
_RECORD_MAGIC_BYTES = struct.pack("<H", RECORD_MAGIC)
_RECORD_HEAD = struct.Struct("<HBBIIQQ")  # magic, kind, flags, length, count, generation, seq
RECORD_HEAD_SIZE = _RECORD_HEAD.size + _CRC.size  # 32
COMMIT = 1
RELEASE = 2
_KINDS = (COMMIT, RELEASE)

_ENTRY = struct.Struct("<QI")  # a RELEASE entry: the commit's seq, how many indexes follow
WHOLE = 0xFFFFFFFF  # "every event of the commit": the common case costs 12 bytes, no index


class SegmentHeader(NamedTuple):
    number: int
    salt: int
    generation: int
    floor: int  # every commit with a lower seq had been released when this was written


def encode_header(h: SegmentHeader) -> bytes:
    head = _SEGMENT_HEAD.pack(
        SEGMENT_MAGIC, FORMAT_VERSION, 0, h.number, h.salt, h.generation, h.floor
    )
    body = head + _CRC.pack(crc(head))
    return body + bytes(HEADER_SIZE - len(body))


def decode_header(buf: bytes) -> SegmentHeader | None:
    """The header at the start of ``buf``; None if it is not a valid one of this version."""
    size = _SEGMENT_HEAD.size
    if len(buf) < size + _CRC.size:
        return None
    magic, version, _, number, salt, generation, floor = _SEGMENT_HEAD.unpack_from(buf, 0)
    if magic != SEGMENT_MAGIC or version != FORMAT_VERSION:
        return None
    if _CRC.unpack_from(buf, size)[0] != crc(buf[:size]):
        return None
    return SegmentHeader(number, salt, generation, floor)


def record_head(
    kind: int, payload: bytes, count: int, generation: int, seq: int, salt: int
) -> bytes:
    """A record's head (RECORD_HEAD_SIZE bytes); the payload follows it, uncopied."""
    head = _RECORD_HEAD.pack(RECORD_MAGIC, kind, 0, len(payload), count, generation, seq)
    return head + _CRC.pack(crc(payload, crc(head, salt)))


def encode_release(entries: list[tuple[int, list[int] | None]]) -> bytes:
    """A RELEASE payload: per entry the commit's seq, then WHOLE, or its released indexes."""
    parts: list[bytes] = []
    entry = _ENTRY.pack
    for seq, indexes in entries:
        if indexes is None:
            parts.append(entry(seq, WHOLE))
        else:
            parts.append(entry(seq, len(indexes)))
            parts.append(struct.pack(f"<{len(indexes)}I", *indexes))
    return b"".join(parts)


def decode_release(payload: bytes, count: int) -> list[tuple[int, list[int] | None]]:
    """The entries of a RELEASE payload (its CRC held, so it is ours: no bound checks)."""
    out: list[tuple[int, list[int] | None]] = []
    at = 0
    for _ in range(count):
        seq, n = _ENTRY.unpack_from(payload, at)
        at += _ENTRY.size
        if n == WHOLE:
            out.append((seq, None))
        else:
            out.append((seq, list(struct.unpack_from(f"<{n}I", payload, at))))
            at += 4 * n
    return out


class Record(NamedTuple):
    kind: int
    seq: int
    items: int  # the head's count: a COMMIT's events, a RELEASE's entries
    payload: bytes  # a RELEASE's; b"" for a COMMIT (recovery reads back the pending ones only)
    offset: int  # in its segment
    end: int  # the offset just past it


class Gap(NamedTuple):
    """Bytes of a segment that hold no valid record, with valid records after them."""

    segment: int
    offset: int
    size: int


class SegmentScan(NamedTuple):
    records: list[Record]  # valid, in file order (seq strictly increasing)
    gaps: list[Gap]
    tail: int  # where the next record goes: the end of the last valid record
    torn: bool  # the bytes at the tail start like a record of this generation (a torn write)


def read_record(buf: bytes, at: int, h: SegmentHeader, after: int) -> Record | None:
    """The record at ``at`` if it is valid: its magic, kind, length (within the segment),
    generation (the header's), CRC (salted) and a seq above ``after`` all hold."""
    if at + RECORD_HEAD_SIZE > len(buf):
        return None
    magic, kind, _, length, count, generation, seq = _RECORD_HEAD.unpack_from(buf, at)
    if magic != RECORD_MAGIC or kind not in _KINDS or generation != h.generation:
        return None
    start = at + RECORD_HEAD_SIZE
    end = start + length
    if end > len(buf) or seq <= after:
        return None
    payload = buf[start:end]  # (a copy: the checksum takes bytes; recovery only)
    expected = crc(payload, crc(buf[at : start - _CRC.size], h.salt))
    if _CRC.unpack_from(buf, start - _CRC.size)[0] != expected:
        return None
    if kind != RELEASE:
        payload = b""
    return Record(kind, seq, count, payload, at, end)


def _next_record(buf: bytes, at: int, h: SegmentHeader, after: int) -> Record | None:
    """The first valid record starting after ``at`` (byte by byte: what a damaged record
    hides is unknown), or None."""
    find = buf.find
    at = find(_RECORD_MAGIC_BYTES, at + 1)
    while at >= 0:
        found = read_record(buf, at, h, after)
        if found is not None:
            return found
        at = find(_RECORD_MAGIC_BYTES, at + 1)
    return None


def scan_segment(buf: bytes, h: SegmentHeader) -> SegmentScan:
    """Every valid record of a segment whose header is ``h``, in order. Past an invalid
    record the scan looks for the next valid one (a gap, reported); the tail is the end of
    the last valid record, so what lies beyond is overwritten by the next append and never
    read as records."""
    records: list[Record] = []
    gaps: list[Gap] = []
    at = tail = HEADER_SIZE
    last = 0
    while True:
        rec = read_record(buf, at, h, last)
        if rec is None:
            rec = _next_record(buf, at, h, last)
            if rec is None:
                break
            gaps.append(Gap(h.number, at, rec.offset - at))
        records.append(rec)
        last = rec.seq
        at = tail = rec.end
    return SegmentScan(records, gaps, tail, _looks_torn(buf, tail, h))


def _looks_torn(buf: bytes, at: int, h: SegmentHeader) -> bool:
    if at + _RECORD_HEAD.size > len(buf):  # no record starts this close to the end
        return False
    magic, _, _, _, _, generation, _ = _RECORD_HEAD.unpack_from(buf, at)
    return bool(magic == RECORD_MAGIC and generation == h.generation)


def record_generation(buf: bytes, at: int) -> int:
    """The generation field of whatever record head lies at ``at`` (0 if none): a segment
    whose header is unreadable still says which generations it held."""
    if at + _RECORD_HEAD.size > len(buf):
        return 0
    magic, _, _, _, _, generation, _ = _RECORD_HEAD.unpack_from(buf, at)
    return int(generation) if magic == RECORD_MAGIC else 0
