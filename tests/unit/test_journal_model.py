"""The journal against a model (queue/journal.py, J5-J9): random rounds of commits and
releases, syncs, reclaims and crashes, seeded so a failure replays.

A crash is the journal closed without a sync, then either nothing more (kill -9: the page
cache survives) or a power cut: each file keeps what its last sync made durable and, of what
was written since, a prefix cut at a random byte or a random set of its 4 KiB pages; a header
rewritten since (a freed segment) is kept or lost independently in each file (separate files
reach the disk in any order). After each restart:

- every commit appended before the last sync and not fully released is pending (never lost);
- every pending commit was appended and is not one whose release was synced (a delivered
  commit comes back only if its release had not reached the disk), with the bytes appended;
- after kill -9, the pending commits and their released events are exactly the model's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from segproxy.queue.base import NewRow
from segproxy.queue.journal import RESERVE, Journal, JournalFull, PendingCommit, open_journal
from segproxy.queue.journal_format import HEADER_SIZE
from segproxy.queue.packs import pack_rows

SEGMENT = RESERVE + (48 << 10)
PAGE = 4096


class Model:
    """What the journal must hold, as the test drove it."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[int, set[int]]] = {}  # seq -> (events, released indexes)
        self.bodies: dict[int, bytes] = {}  # every commit appended since the last restart
        self.durable: set[int] = set()  # appended before the last sync
        self.released_synced: set[int] = set()  # fully released, the release synced
        self.released_unsynced: set[int] = set()


def payload(rng: random.Random, tag: str) -> tuple[int, bytes]:
    n = rng.randint(1, 3)
    rows = [
        NewRow(f"k{rng.randint(0, 2)}", "event", 1.0, f"{tag}.{i}".encode() * rng.randint(20, 600))
        for i in range(n)
    ]
    return n, pack_rows(rows)


def releases(rng: random.Random, m: Model) -> list[tuple[int, list[int] | None]]:
    out: list[tuple[int, list[int] | None]] = []
    for seq in rng.sample(sorted(m.live), k=min(len(m.live), rng.randint(0, 3))):
        events = m.live[seq][0]
        if rng.random() < 0.6:
            out.append((seq, None))
        else:
            out.append((seq, rng.sample(range(events), k=rng.randint(1, events))))
    return out


def remember_releases(m: Model, done: list[tuple[int, list[int] | None]]) -> None:
    for seq, indexes in done:
        if seq not in m.live:
            continue
        events, released = m.live[seq]
        released.update(range(events) if indexes is None else indexes)
        if len(released) == events:
            del m.live[seq]
            m.released_unsynced.add(seq)


def round_of(rng: random.Random, j: Journal, m: Model, step: int) -> None:
    commits = [payload(rng, f"{step}-{i}") for i in range(rng.randint(0, 2))]
    rel = releases(rng, m)
    try:
        seqs = j.append(commits, rel)
    except JournalFull:
        j.append([], rel)  # releases still fit (J4's reserve)
        remember_releases(m, rel)
        return
    for seq, (events, body) in zip(seqs, commits, strict=True):
        m.live[seq] = (events, set())
        m.bodies[seq] = body
    remember_releases(m, rel)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("seg-*"))}


def power_cut(rng: random.Random, directory: Path, synced: dict[str, bytes]) -> None:
    """Each file: the synced image plus what was written since, up to a random byte. A header
    rewritten since the sync (a freed segment, J7) may be lost whole; once records follow it,
    it was made durable before them (J7), so it stays."""
    for name, now in files(directory).items():
        before = synced.get(name, bytes(len(now)))
        before = before.ljust(len(now), b"\0")[: len(now)]
        if now == before:
            continue
        if now[HEADER_SIZE:] == before[HEADER_SIZE:]:  # only the header changed
            image = before if rng.random() < 0.5 else now
        else:
            before = now[:HEADER_SIZE] + before[HEADER_SIZE:]
            image = prefix(rng, now, before) if rng.random() < 0.5 else pages(rng, now, before)
        (directory / name).write_bytes(image)


def prefix(rng: random.Random, now: bytes, before: bytes) -> bytes:
    """What was written since the sync, up to a random byte."""
    cut = rng.randint(HEADER_SIZE, len(now))
    return now[:cut] + before[cut:]


def pages(rng: random.Random, now: bytes, before: bytes) -> bytes:
    """Each 4 KiB page written since the sync reached the disk, or not, in any order."""
    image = bytearray(before)
    for at in range(0, len(now), PAGE):
        if rng.random() < 0.5:
            image[at : at + PAGE] = now[at : at + PAGE]
    return bytes(image)


def check(m: Model, pending: list[PendingCommit], killed: bool) -> None:
    got = {p.seq for p in pending}
    must = {s for s in m.live if s in m.durable}
    assert must <= got, f"lost: {sorted(must - got)}"
    assert got <= set(m.bodies) - m.released_synced, "a synced release or garbage came back"
    for p in pending:
        assert p.body == m.bodies[p.seq]
        if p.seq in m.live:
            assert p.released <= m.live[p.seq][1]
    if killed:
        assert got == set(m.live)
        assert {p.seq: set(p.released) for p in pending} == {s: r for s, (_, r) in m.live.items()}


def restarted(pending: list[PendingCommit]) -> Model:
    m = Model()
    for p in pending:
        m.live[p.seq] = (p.events, set(p.released))
        m.bodies[p.seq] = p.body
        m.durable.add(p.seq)  # recovery synced what it read
    return m


@pytest.mark.parametrize("seed", range(8))
def test_random_rounds_and_crashes_never_lose_a_durable_commit_nor_revive_a_synced_release(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    directory = tmp_path / "q.db.journal"
    j, _, _ = open_journal(str(tmp_path / "q.db"), segment_size=SEGMENT, max_segments=4)
    m = Model()
    synced = files(directory)
    crashes = 0
    for step in range(250):
        op = rng.random()
        if op < 0.7:
            round_of(rng, j, m, step)
        elif op < 0.82:
            j.sync()
            m.durable |= set(m.live)
            m.released_synced |= m.released_unsynced
            m.released_unsynced.clear()
            synced = files(directory)
        elif op < 0.9:
            j.reclaim()
        else:
            crashes += 1
            j.close(sync=False)
            killed = rng.random() < 0.4
            if not killed:
                power_cut(rng, directory, synced)
            j, pending, _ = open_journal(
                str(tmp_path / "q.db"), segment_size=SEGMENT, max_segments=4
            )
            check(m, pending, killed)
            m = restarted(pending)
            synced = files(directory)
    j.close()
    assert crashes > 5
