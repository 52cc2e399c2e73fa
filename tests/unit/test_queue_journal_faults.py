"""The journal against a careless operator and a hostile world (issue 13's attack): files
changed behind the proxy's back, clocks that step, sizes changed across restarts. Real files,
real SQLite, real processes killed with SIGKILL (helpers of test_queue_journal.py)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segproxy.queue import admin
from segproxy.queue.journal import open_journal
from segproxy.queue.packs import pack_rows
from segproxy.queue.sqlite import SqliteQueue
from tests.unit.test_queue_journal import (
    MIB,
    T0,
    bodies,
    drain,
    journal_segments,
    killed_after,
    new,
    open_queue,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "queue.db"


def drained_in_child(path: Path, memory: int = 2 << 30) -> list[str]:
    """The bodies a new process (its address space capped at ``memory``) drains from the
    queue at ``path``: what a restarted proxy would deliver."""
    script = textwrap.dedent(
        """
        import asyncio, json, resource, sys
        sys.path[:0] = [{tests!r}]
        resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
        from pathlib import Path
        from unit.test_queue_journal import drain

        rows, _ = asyncio.run(drain(Path({path!r})))
        print(json.dumps(sorted(r.body.decode() for r in rows)))
        """
    ).format(tests=str(Path(__file__).parent.parent), path=str(path), memory=memory)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out: list[str] = json.loads(done.stdout)
    return out


@pytest.mark.parametrize("name", ["seg-2026120706", "seg-202612070636"])
def test_a_segment_copy_named_by_a_timestamp_neither_stops_the_proxy_nor_loses_events(
    path: Path, name: str
) -> None:
    # An operator keeps a copy of a segment beside it under a timestamped name that still
    # reads as a segment number. Opening the journal listed every "missing" number below it
    # (two billion: out of memory), or, past 2**32, failed to write the number into a
    # header (struct.error): either way the proxy did not start.
    killed_after(path, "await q.put([new(i) for i in range(10)])")
    (segment,) = journal_segments(path)
    shutil.copy(segment, segment.with_name(name))
    assert drained_in_child(path) == sorted(new(i).body.decode() for i in range(10))
    assert admin.stats(str(path)).rows == 0


def test_events_acknowledged_after_a_purge_survive_a_clock_step_backwards(path: Path) -> None:
    # The purge runs at wall-clock "now"; then the clock steps back (NTP correcting a clock
    # that ran ahead), so the events the proxy acknowledges next carry received_at times
    # before the purge's stamp (here: T0, years before it). The proxy is then killed.
    asyncio.run(drain(path))  # the queue file exists, as a proxy had run
    assert admin.purge(str(path)) == (0, 0)
    killed_after(path, "await q.put([new(i) for i in range(10)])")
    assert admin.stats(str(path)).rows == 10  # stats must not hide them either
    again, _ = asyncio.run(drain(path))
    assert bodies(again) == sorted(new(i).body for i in range(10))


def test_leaving_memory_mode_after_a_purge_keeps_events_taken_with_a_clock_behind_it(
    path: Path,
) -> None:
    async def main() -> list[bytes]:
        q = await open_queue(path).open()
        try:
            assert admin.purge(str(path)) == (0, 0)  # beside the running proxy
            await q.put([new(i) for i in range(10)])  # received at T0: the clock is behind
            (first,) = await q.lease(0.0, 1)
            await q.retry_later([first.id], 0.0, "HTTP 500")  # memory mode ends: the move
            out: list[bytes] = []
            while batch := await q.lease(T0 + 1e9, 100):
                out += [r.body for r in batch]
                await q.ack([r.id for r in batch])
            return sorted(out)
        finally:
            await q.close()

    assert asyncio.run(main()) == sorted(new(i).body for i in range(10))


def foreign_journal(directory: Path, rounds: int) -> list[Path]:
    """Segments of another proxy's journal that delivered ``rounds`` commits of 60 KB
    (1 MiB segments, so they were reused and their headers carry a high floor)."""
    journal, _, _ = open_journal(str(directory / "queue.db"), MIB)
    try:
        for n in range(rounds):
            (seq,) = journal.append([(1, pack_rows([new(n, "wk_other", 60_000)]))], [])
            journal.append([], [(seq, None)])
            journal.sync()
            journal.reclaim()
    finally:
        journal.close()
    return sorted((directory / "queue.db.journal").glob("seg-*"))


@pytest.mark.xfail(
    strict=True,
    reason="defect: segment headers do not name their journal; a segment copied from another"
    " proxy's journal brings its floor, and recovery ignores every commit below it: this"
    " journal's acknowledged events are lost",
)
def test_a_segment_copied_from_another_proxy_loses_none_of_this_proxy_s_events(
    path: Path, tmp_path: Path
) -> None:
    killed_after(path, "await q.put([new(i) for i in range(10)])")
    other = tmp_path / "other"
    other.mkdir()
    for n, segment in enumerate(foreign_journal(other, 40)):
        shutil.copy(segment, Path(str(path) + ".journal") / f"seg-{100 + n:04d}")
    again, _ = asyncio.run(drain(path))
    assert bodies(again) == sorted(new(i).body for i in range(10))


@pytest.mark.parametrize("before, after", [(MIB, 8 * MIB), (8 * MIB, MIB)])
def test_a_changed_segment_size_across_a_kill_keeps_every_event_once(
    path: Path, before: int, after: int
) -> None:
    killed_after(
        path,
        """
        for n in range(0, 60, 3):
            await q.put([new(i, size=20_000) for i in range(n, n + 3)])
        await q.ack([r.id for r in await q.lease(0.0, 15)])
        """,
        journal_segment_bytes=before,
    )
    again, _ = asyncio.run(drain(path, journal_segment_bytes=after))
    assert bodies(again) == sorted(new(i, size=20_000).body for i in range(15, 60))
    killed_after(
        path,
        """
        for n in range(100, 160, 3):
            await q.put([new(i, size=20_000) for i in range(n, n + 3)])
        """,
        journal_segment_bytes=after,
    )
    again, _ = asyncio.run(drain(path, journal_segment_bytes=before))
    assert bodies(again) == sorted(new(i, size=20_000).body for i in range(100, 160))
    assert all(os.path.getsize(s) >= min(before, after) for s in journal_segments(path))


async def drain_full(path: Path) -> list[bytes]:
    """What a process with ``synchronous = "full"`` drains (a restart after the operator
    switched it)."""
    q = await SqliteQueue(
        str(path), max_rows=1 << 30, max_bytes=1 << 40, min_free_disk_bytes=0, synchronous="FULL"
    ).open()
    try:
        out: list[bytes] = []
        while batch := await q.lease(T0 + 1e9, 1000):
            out += [r.body for r in batch]
            await q.ack([r.id for r in batch])
        return sorted(out)
    finally:
        await q.close()


def test_switching_to_full_after_a_kill_delivers_the_journal_s_events_once(path: Path) -> None:
    killed_after(
        path,
        """
        for n in range(0, 30, 5):
            await q.put([new(i) for i in range(n, n + 5)])
        rows = await q.lease(0.0, 12)
        await q.ack([r.id for r in rows[:7]])
        await q.retry_later([rows[8].id], 0.0, "HTTP 500")
        """,
    )
    assert asyncio.run(drain_full(path)) == sorted(new(i).body for i in range(7, 30))
    assert asyncio.run(drain_full(path)) == []
    again, _ = asyncio.run(drain(path))  # and back to normal: nothing comes back
    assert again == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs (a real file system that fills up); skipped where mounting is not
    allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> None:
    """Write a file in ``directory`` until its file system is full (ENOSPC)."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 << 10))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:
                f.write(bytes(512))
        except OSError:
            pass


@pytest.mark.xfail(
    strict=True,
    reason="defect: opening the queue writes the file before anything is delivered (the"
    " journal's events are spilled into it at open; the open's own transaction commits too):"
    " on a full disk the proxy does not start (SQLITE_FULL), so the backlog that would free"
    " the disk is never sent",
)
def test_a_full_disk_after_a_kill_does_not_stop_the_start_nor_lose_the_journal_s_events(
    small_disk: Path,
) -> None:
    path = small_disk / "queue.db"
    sizes = {"journal_segment_bytes": MIB}
    killed_after(
        path,
        """
        for n in range(0, 40, 4):
            await q.put([new(i, size=2_000) for i in range(n, n + 4)])
        """,
        **sizes,
    )
    fill(small_disk)
    again, _ = asyncio.run(drain(path, **sizes))
    assert bodies(again) == sorted(new(i, size=2_000).body for i in range(40))


def test_queue_stats_beside_a_proxy_reusing_segments_never_fails_nor_counts_delivered_events(
    path: Path, tmp_path: Path
) -> None:
    # A process commits 10 events of 60 KB at a time and delivers them at once, on 1 MiB
    # segments: a segment is reused every few commits. ``segproxy queue stats`` reads the
    # journal meanwhile (read-only, without the lock): it must never fail and never count
    # more than the one commit that can be in flight.
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.path[:0] = [{tests!r}]
        from pathlib import Path
        from unit.test_queue_journal import new, open_queue

        async def main():
            q = await open_queue(Path({path!r}), journal_segment_bytes=1 << 20).open()
            n = 0
            while not Path({stop!r}).exists():
                await q.put([new(i, size=60_000) for i in range(n, n + 10)])
                await q.ack([r.id for r in await q.lease(0.0, 10)])
                n += 10
                if n == 200:
                    Path({ready!r}).touch()
            await q.close()
            print(n)

        asyncio.run(main())
        """
    ).format(
        tests=str(Path(__file__).parent.parent), path=str(path), ready=str(ready), stop=str(stop)
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        counts = [admin.stats(str(path)).rows for _ in range(40)]
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert int(out) > 200
    assert max(counts) <= 10, counts
    assert admin.stats(str(path)).rows == 0


def test_a_disk_with_less_free_space_than_a_segment_still_starts_and_queues_in_the_file(
    small_disk: Path,
) -> None:
    # 16 MiB segments (an operator raised queue.journal_segment_bytes) on a disk with 12 MiB.
    path = small_disk / "queue.db"

    async def main() -> list[bytes]:
        q = await open_queue(path, journal_segment_bytes=16 * MIB).open()
        try:
            await q.put([new(i) for i in range(5)])
            rows = await q.lease(0.0, 10)
            await q.ack([r.id for r in rows])
            return bodies(rows)
        finally:
            await q.close()

    assert asyncio.run(main()) == sorted(new(i).body for i in range(5))


def test_a_directory_or_a_dangling_link_named_like_a_segment_is_left_alone(path: Path) -> None:
    # A careless operator's leftovers in the journal's directory stop neither the start
    # nor `segproxy queue stats`, and the real segments' events are all there.
    killed_after(path, "await q.put([new(i) for i in range(4)])")
    directory = Path(str(path) + ".journal")
    (directory / "seg-0007").mkdir()
    (directory / "seg-0008").symlink_to(directory / "no-such-file")
    assert admin.stats(str(path)).rows == 4
    again, _ = asyncio.run(drain(path))
    assert bodies(again) == sorted(new(i).body for i in range(4))


def test_a_commit_larger_than_a_segment_takes_goes_to_the_file_quietly(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> list[bytes]:
        q = await open_queue(path, journal_segment_bytes=MIB).open()
        try:
            await q.put([new(0, size=700_000)])  # over 1 MiB less the 512 KiB reserve
            await q.put([new(1)])  # the journal takes the next one
            assert q._hot is not None and q._hot.journal.stats().pending_commits == 1
            rows = await q.lease(0.0, 10)
            await q.ack([r.id for r in rows])
            return bodies(rows)
        finally:
            await q.close()

    with caplog.at_level("WARNING", logger="segproxy.queue"):
        assert asyncio.run(main()) == sorted([new(0, size=700_000).body, new(1).body])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
