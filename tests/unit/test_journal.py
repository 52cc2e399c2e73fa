"""The journal (queue/journal.py, invariants J1-J10): what an append promises, when a segment
is reused, and what a restart finds after every kind of damage a crash or a disk can leave.

Real files in a temporary directory; a "crash" is the journal closed without a sync, then its
files changed the way a torn write, a bad sector or a lost header would change them.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from segproxy.queue.base import NewRow
from segproxy.queue.journal import (
    RESERVE,
    Journal,
    JournalError,
    JournalFull,
    JournalSyncer,
    PendingCommit,
    open_journal,
)
from segproxy.queue.journal_format import (
    HEADER_SIZE,
    RECORD_HEAD_SIZE,
    Gap,
    Record,
    decode_header,
    scan_segment,
)
from segproxy.queue.journal_recovery import RecoveryReport
from segproxy.queue.packs import pack_rows

SEGMENT = RESERVE + (64 << 10)  # small segments: a few commits each, so tests cross and reuse


def events(n: int, size: int = 100, tag: str = "e") -> bytes:
    """A commit's payload: ``n`` events of ``size`` bytes, each naming itself."""
    rows = [
        NewRow(
            f"key-{tag}",
            "event",
            1700000000.0 + i,
            f"{tag}{i}:".encode().ljust(size, b"."),
            "2026-12-07T03:00:00.000Z",
        )
        for i in range(n)
    ]
    return pack_rows(rows)


def reopen(tmp_path: Path, **kw: int) -> tuple[Journal, list[PendingCommit], RecoveryReport]:
    return open_journal(
        str(tmp_path / "q.db"),
        segment_size=kw.get("size", SEGMENT),
        max_segments=kw.get("max_segments", 8),
    )


def seg(tmp_path: Path, number: int) -> Path:
    return tmp_path / "q.db.journal" / f"seg-{number:04d}"


def records(path: Path) -> list[Record]:
    """The valid records of a segment file, to find where to damage it."""
    buf = path.read_bytes()
    header = decode_header(buf)
    assert header is not None
    return scan_segment(buf, header).records


def seqs(pending: list[PendingCommit]) -> list[int]:
    return [p.seq for p in pending]


# Appending, releasing, reopening


def test_a_commit_is_pending_after_a_restart_until_a_release_names_it(tmp_path: Path) -> None:
    j, pending, _ = reopen(tmp_path)
    assert pending == []
    [a] = j.append([(3, events(3, tag="a"))], [])
    [b] = j.append([(2, events(2, tag="b"))], [])
    j.close()
    j, pending, report = reopen(tmp_path)
    assert seqs(pending) == [a, b]
    assert [r.body[:3] for _, r in pending[0].rows()] == [b"a0:", b"a1:", b"a2:"]
    assert pending[0].rows()[1][1].sent_at == "2026-12-07T03:00:00.000Z"
    assert not report.damaged and report.torn_tails == []
    j.append([], [(a, None)])
    j.close()
    j, pending, _ = reopen(tmp_path)
    assert seqs(pending) == [b]
    j.close()


def test_a_partly_released_commit_comes_back_with_only_its_unreleased_events(
    tmp_path: Path,
) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(4, events(4, tag="a"))], [])
    j.append([], [(a, [0, 2])])
    j.append([], [(a, [2])])  # released twice: counted once
    j.close()
    j, pending, _ = reopen(tmp_path)
    assert [(i, r.body[:3]) for i, r in pending[0].rows()] == [(1, b"a1:"), (3, b"a3:")]
    j.append([], [(a, [1, 3])])
    assert j.stats().pending_commits == 0
    j.close()
    j, pending, _ = reopen(tmp_path)
    assert pending == []
    j.close()


def test_seqs_go_on_above_every_seq_written_before_a_restart(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    first = j.append([(1, events(1)), (1, events(1))], [])
    j.append([], [(first[0], None), (first[1], None)])  # the release is seq 3
    j.close()
    j, pending, _ = reopen(tmp_path)
    assert pending == []
    assert j.append([(1, events(1))], []) == [4]
    j.close()


def test_a_release_naming_unknown_seqs_is_ignored(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(1, events(1))], [])
    j.append([], [(999, None), (a, [7])])  # no such commit; no such event
    assert j.stats().pending_commits == 1
    j.close()
    j, pending, report = reopen(tmp_path)
    assert seqs(pending) == [a] and pending[0].released == frozenset()
    assert report.unknown_releases == 1
    j.close()


def test_segments_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        j, _, _ = reopen(tmp_path)
        j.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q.db.journal").stat().st_mode) == 0o700
    assert stat.S_IMODE(seg(tmp_path, 0).stat().st_mode) == 0o600
    assert seg(tmp_path, 0).stat().st_size == SEGMENT  # preallocated


def test_files_others_may_read_are_reported_and_left_as_they_are(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    j.close()
    os.chmod(seg(tmp_path, 0), 0o644)
    j, _, report = reopen(tmp_path)
    j.close()
    assert report.open_modes == [str(seg(tmp_path, 0))]
    assert stat.S_IMODE(seg(tmp_path, 0).stat().st_mode) == 0o644


# Segments: crossing, reuse, the bound


def fill(j: Journal, rounds: int, tag: str = "f") -> list[int]:
    """``rounds`` commits of about 20 KB (three fit in a test segment)."""
    return [j.append([(1, events(1, 20000, f"{tag}{i}"))], [])[0] for i in range(rounds)]


def test_a_round_that_does_not_fit_starts_the_next_segment(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    written = fill(j, 7)
    assert j.stats().in_use == 3
    j.close()
    j, pending, report = reopen(tmp_path)
    assert seqs(pending) == written
    assert not report.damaged
    assert [len(records(seg(tmp_path, n))) for n in range(3)] == [3, 3, 1]
    j.close()


def test_a_segment_is_reused_only_once_its_releases_are_synced(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    first = fill(j, 4)  # segment 0 holds three, segment 1 the fourth
    j.append([], [(s, None) for s in first[:3]])
    assert j.reclaim() == 0  # the release is not durable yet
    j.sync()
    assert j.reclaim() == 1
    generation = decode_header(seg(tmp_path, 0).read_bytes())
    assert generation is not None and generation.floor == first[3]
    fill(j, 5, "g")  # segment 1 fills, then the reused segment 0
    assert j.stats().segments == 2
    j.close()
    j, pending, _ = reopen(tmp_path)
    assert seqs(pending)[0] == first[3]
    assert len(pending) == 6
    j.close()


def test_a_long_pending_commit_grows_the_journal_up_to_its_bound_then_only_releases_fit(
    tmp_path: Path,
) -> None:
    j, _, _ = reopen(tmp_path, max_segments=2)
    stuck, *others = fill(j, 6)
    with pytest.raises(JournalFull):
        fill(j, 1, "late")
    stats = j.stats()
    assert (stats.segments, stats.oldest_pending_seq, stats.pending_commits) == (2, stuck, 6)
    # what frees space (releases: delivered, or spilled into SQLite) still goes in
    j.append([], [(s, None) for s in [stuck, *others[:2]]])
    j.sync()
    fill(j, 1, "late")
    assert j.stats().oldest_pending_seq == others[2]
    j.close()


def test_the_syncer_makes_releases_durable_so_segments_can_be_reused(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    first = fill(j, 4)
    j.append([], [(s, None) for s in first[:3]])
    syncer = JournalSyncer(j, every=0.01)
    syncer.start()
    pause = threading.Event()
    try:
        freed = 0
        deadline = time.monotonic() + 10
        while not freed and time.monotonic() < deadline:  # polled: it syncs every 10 ms
            pause.wait(0.002)
            freed = j.reclaim()
    finally:
        syncer.stop()
    assert freed == 1 and syncer.failures == 0
    j.close()


def descriptor_of(path: Path) -> int:
    """The descriptor this process holds on ``path`` (the journal's, found from outside)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                return int(name)
        except OSError:  # the listing's own descriptor, gone already
            continue
    raise AssertionError(f"{path} is not open")


def test_a_failed_write_changes_nothing_but_spends_its_seqs(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(1, events(1, 10, "a"))], [])
    fd = descriptor_of(seg(tmp_path, 0))
    writable = os.dup(fd)
    read_only = os.open(seg(tmp_path, 0), os.O_RDONLY)
    os.dup2(read_only, fd)  # the disk refuses the next write (EBADF here; EIO in life)
    try:
        with pytest.raises(JournalError):
            j.append([(1, events(1, 10, "x"))], [(a, None)])
        assert j.stats().pending_commits == 1  # the release was not remembered
    finally:
        os.dup2(writable, fd)
        os.close(writable)
        os.close(read_only)
    [b] = j.append([(1, events(1, 10, "b"))], [])
    assert b == a + 3  # the failed round's commit and release spent two seqs
    j.close()
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == [a, b] and report.missing_seqs == 2


def test_a_commit_larger_than_a_segment_takes_is_refused_and_nothing_changes(
    tmp_path: Path,
) -> None:
    j, _, _ = reopen(tmp_path)
    too_big = b"x" * (j.max_payload + 1)
    with pytest.raises(JournalError):
        j.append([(1, too_big)], [])
    [a] = j.append([(1, events(1))], [])
    assert a == 1 and j.stats().segments == 1
    j.close()


# Crash safety


def test_a_torn_last_record_is_cut_at_every_byte_and_what_came_before_survives(
    tmp_path: Path,
) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(1, events(1, 10, "a"))], [])
    j.close()
    before = seg(tmp_path, 0).read_bytes()
    j, _, _ = reopen(tmp_path)
    j.append([(1, events(1, 10, "b"))], [])
    j.close()
    after = seg(tmp_path, 0).read_bytes()
    last = records(seg(tmp_path, 0))[-1]
    end = last.end
    for cut in range(last.offset, end):
        seg(tmp_path, 0).write_bytes(after[:cut] + before[cut:])
        j, pending, report = reopen(tmp_path)
        assert seqs(pending) == [a], cut
        assert not report.damaged, cut
        if cut >= last.offset + RECORD_HEAD_SIZE:
            assert report.torn_tails == [(0, last.offset)]
        # the next append overwrites the torn bytes and a restart reads it back
        [c] = j.append([(1, events(1, 10, "c"))], [])
        j.close()
        j, pending, _ = reopen(tmp_path)
        assert seqs(pending) == [a, c], cut
        j.close()
        seg(tmp_path, 0).write_bytes(after)


def test_a_torn_release_leaves_its_commit_pending(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(1, events(1))], [])
    j.append([], [(a, None)])
    j.close()
    image = seg(tmp_path, 0).read_bytes()
    release = records(seg(tmp_path, 0))[-1]
    end = release.end
    for cut in (release.offset + 1, release.offset + RECORD_HEAD_SIZE, end - 1):
        seg(tmp_path, 0).write_bytes(image[:cut] + bytes(len(image) - cut))
        j, pending, report = reopen(tmp_path)
        j.close()
        assert seqs(pending) == [a] and not report.damaged


def test_a_bad_crc_in_the_middle_is_reported_and_the_records_after_it_are_kept(
    tmp_path: Path,
) -> None:
    j, _, _ = reopen(tmp_path)
    a, b, c = (j.append([(1, events(1, 50, t))], [])[0] for t in "abc")
    j.close()
    damaged = records(seg(tmp_path, 0))[1]
    image = bytearray(seg(tmp_path, 0).read_bytes())
    image[damaged.offset + RECORD_HEAD_SIZE + 5] ^= 0x01
    seg(tmp_path, 0).write_bytes(bytes(image))
    j, pending, report = reopen(tmp_path)
    size = damaged.end - damaged.offset
    assert seqs(pending) == [a, c]
    assert report.gaps == [Gap(0, damaged.offset, size)] and report.missing_seqs == 1
    assert report.damaged
    # the gap stays where it is; appends go after the last valid record
    [d] = j.append([(1, events(1, 50, "d"))], [])
    j.close()
    j, pending, _ = reopen(tmp_path)
    assert seqs(pending) == [a, c, d]
    j.close()
    assert b not in seqs(pending)


def test_a_record_smuggled_in_an_event_body_is_never_read_as_a_record(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(1, events(1, 50, "a"))], [])
    j.close()
    # a client's event whose body is a well-formed record (unsalted CRC: it cannot know the
    # salt) that releases ``a``; then the record holding it is damaged, so the scan searches
    # through its bytes
    from segproxy.queue.journal_format import RELEASE, encode_release, record_head

    header = decode_header(seg(tmp_path, 0).read_bytes())
    assert header is not None
    payload = encode_release([(a, None)])
    forged = record_head(RELEASE, payload, 1, header.generation, 10, 0) + payload
    j, _, _ = reopen(tmp_path)
    [b] = j.append([(1, pack_rows([NewRow("k", "event", 1.0, forged * 3, None)]))], [])
    [c] = j.append([(1, events(1, 50, "c"))], [])
    j.close()
    holder = records(seg(tmp_path, 0))[1]
    image = bytearray(seg(tmp_path, 0).read_bytes())
    image[holder.offset] ^= 0xFF  # its head damaged
    seg(tmp_path, 0).write_bytes(bytes(image))
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == [a, c] and b not in seqs(pending)
    assert report.unknown_releases == 0 and report.missing_seqs == 1


def reused(tmp_path: Path) -> tuple[list[int], list[int]]:
    """Segment 0 filled, released, synced and reused; segment 1 holds the rest."""
    j, _, _ = reopen(tmp_path)
    old = fill(j, 4)
    j.append([], [(s, None) for s in old[:3]])
    j.sync()
    assert j.reclaim() == 1
    new = fill(j, 3, "n")  # two more in segment 1, then one in the reused segment 0
    j.close()
    return old, new


def test_a_half_reused_segment_reads_its_new_generation_and_ignores_the_old_one(
    tmp_path: Path,
) -> None:
    old, new = reused(tmp_path)
    # the new record lies exactly over the first old one; the two others are still there
    assert len(records(seg(tmp_path, 0))) == 1
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == [old[3], *new]
    assert not report.damaged and report.torn_tails == []


def test_a_crash_right_after_a_segment_was_freed_brings_nothing_back(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    old = fill(j, 4)
    j.append([], [(s, None) for s in old[:3]])
    j.sync()
    j.reclaim()  # header rewritten, nothing after it
    j.close(sync=False)
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == [old[3]] and not report.damaged


def test_a_torn_header_frees_its_segment_and_is_reported_if_it_hid_records(
    tmp_path: Path,
) -> None:
    j, _, _ = reopen(tmp_path)
    old = fill(j, 4)
    j.close()
    image = bytearray(seg(tmp_path, 0).read_bytes())
    image[10] ^= 0xFF  # bit rot in the header of a segment with pending commits
    seg(tmp_path, 0).write_bytes(bytes(image))
    j, pending, report = reopen(tmp_path)
    assert seqs(pending) == [old[3]]  # what it held cannot be read safely: reported
    assert report.unreadable == [0] and report.unreadable_bytes > 0 and report.damaged
    [n] = fill(j, 1, "n")
    j.close()
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == [old[3], n] and report.unreadable == []


def test_a_header_torn_while_a_segment_was_freed_brings_nothing_back(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    old = fill(j, 4)
    j.append([], [(s, None) for s in old[:3]])
    j.sync()
    j.reclaim()
    j.close(sync=False)
    image = bytearray(seg(tmp_path, 0).read_bytes())
    image[20:HEADER_SIZE] = bytes(HEADER_SIZE - 20)  # the header write torn
    seg(tmp_path, 0).write_bytes(bytes(image))
    j, pending, report = reopen(tmp_path)
    [n] = fill(j, 1, "n")
    j.close()
    assert seqs(pending) == [old[3]]
    # the old records behind it cannot be told from pending ones: reported as unreadable
    assert report.unreadable == [0]
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == [old[3], n] and report.unreadable == []


def test_the_floor_buries_freed_commits_when_their_segment_header_was_lost(
    tmp_path: Path,
) -> None:
    """A power cut may keep a later header and lose an earlier one (separate files): segment
    0 freed, then segment 1 (which held segment 0's releases) freed; only segment 1's new
    header reached the disk."""
    j, _, _ = reopen(tmp_path)
    first = fill(j, 4)  # segment 0 holds three, segment 1 the fourth
    image0 = seg(tmp_path, 0).read_bytes()
    j.append([], [(s, None) for s in first[:3]])  # segment 0's releases, in segment 1
    more = fill(j, 2, "m")  # segment 1 full
    later = fill(j, 1, "l")  # in segment 2
    j.append([], [(s, None) for s in [first[3], *more]])
    j.sync()
    assert j.reclaim() == 2
    j.close()
    seg(tmp_path, 0).write_bytes(image0)  # segment 0 as before it was freed
    j, pending, report = reopen(tmp_path)
    j.close()
    assert seqs(pending) == later and not report.damaged


def test_a_missing_segment_is_reported_and_the_others_are_recovered(tmp_path: Path) -> None:
    j, _, _ = reopen(tmp_path)
    written = fill(j, 7)
    j.close()
    seg(tmp_path, 1).unlink()
    j, pending, report = reopen(tmp_path)
    assert seqs(pending) == written[:3] + written[6:]
    assert report.missing_segments == [1] and report.missing_seqs == 3
    fill(j, 4, "n")  # segment 1 is made again when needed
    assert seg(tmp_path, 1).exists()
    j.close()


@pytest.mark.parametrize("size", [0, 100, SEGMENT])
def test_an_empty_or_zero_filled_segment_is_free_and_quiet(tmp_path: Path, size: int) -> None:
    j, _, _ = reopen(tmp_path)
    [a] = j.append([(1, events(1))], [])
    j.close()
    seg(tmp_path, 5).write_bytes(bytes(size))
    j, pending, report = reopen(tmp_path)
    assert seqs(pending) == [a]
    assert not report.damaged and report.unreadable == []
    assert report.missing_segments == [1, 2, 3, 4]
    j.close()
    assert seg(tmp_path, 5).stat().st_size == SEGMENT  # made a whole segment again
    assert decode_header(seg(tmp_path, 5).read_bytes()) is not None


# The scan itself (journal_format.py): what J2 rejects besides damage


def segment_image(generation: int, records: list[tuple[int, int, bytes]]) -> bytes:
    """A segment of ``generation`` holding ``records`` (seq, record generation, payload)."""
    from segproxy.queue.journal_format import COMMIT, SegmentHeader, encode_header, record_head

    header = SegmentHeader(0, 77, generation, 0)
    parts = [encode_header(header)]
    for seq, gen, payload in records:
        parts += [record_head(COMMIT, payload, 1, gen, seq, header.salt), payload]
    return b"".join(parts).ljust(4096, b"\0")


def test_a_record_with_a_lower_seq_after_a_higher_one_is_left_over_and_never_read() -> None:
    """Bytes an earlier write left past the tail (an append that failed: its seqs are
    spent) can line up with a record boundary; their lower seq gives them away."""
    body = events(1, 10)
    image = segment_image(3, [(5, 3, body), (9, 3, body), (7, 3, body)])
    header = decode_header(image)
    assert header is not None
    scan = scan_segment(image, header)
    assert [r.seq for r in scan.records] == [5, 9]
    assert scan.tail == HEADER_SIZE + 2 * (RECORD_HEAD_SIZE + len(body))
    assert scan.gaps == []


def test_a_record_of_the_previous_generation_is_never_read() -> None:
    body = events(1, 10)
    image = segment_image(3, [(5, 3, body), (6, 2, body)])
    header = decode_header(image)
    assert header is not None
    scan = scan_segment(image, header)
    assert [r.seq for r in scan.records] == [5] and not scan.torn
