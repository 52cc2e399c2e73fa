"""The journal as the queue's write path (invariant 12 in ``queue/__init__.py``): real files,
real SQLite, and real processes killed with SIGKILL at the moments that matter."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segproxy.queue import admin
from segproxy.queue.base import NewRow, Row, stored_size
from segproxy.queue.packs import pack_rows
from segproxy.queue.sqlite import SqliteQueue
from segproxy.redact import mask
from tests.support.proxy import run_cli

T0 = 1_700_000_000.0
WRITES = ("BEGIN", "INSERT", "UPDATE", "DELETE", "COMMIT")
MIB = 1 << 20


def new(n: int, key: str = "wk_a", size: int = 0) -> NewRow:
    body = json.dumps({"messageId": f"{key}-{n}", "pad": "x" * size}).encode()
    return NewRow(key, "event", T0 + n, body)


def open_queue(
    path: Path, journal_segment_bytes: int = 8 * MIB, journal_segments: int = 64
) -> SqliteQueue:
    return SqliteQueue(
        str(path),
        max_rows=1 << 30,
        max_bytes=1 << 40,
        min_free_disk_bytes=0,
        journal_segment_bytes=journal_segment_bytes,
        journal_segments=journal_segments,
    )


async def drain(path: Path, **sizes: int) -> tuple[list[Row], list[bytes]]:
    """A new process's view: every event queued (leased and acknowledged, retries due at
    once), and the dead letters' bodies."""
    q = await open_queue(path, **sizes).open()
    try:
        out: list[Row] = []
        while batch := await q.lease(T0 + 1e9, 1000):
            out += batch
            await q.ack([r.id for r in batch])
        dead = [d.body for d in await q.dead_rows(1000)]
        return out, dead
    finally:
        await q.close()


def bodies(rows: list[Row]) -> list[bytes]:
    return sorted(r.body for r in rows)


def journal_segments(path: Path) -> list[Path]:
    return sorted(Path(str(path) + ".journal").glob("seg-*"))


def killed_after(path: Path, steps: str, **sizes: int) -> None:
    """Run ``steps`` (the body of an async function with ``q``, the queue on ``path`` opened
    with ``sizes``, and ``new``) in another process, which then dies by SIGKILL: nothing is
    closed or synced."""
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        sys.path[:0] = [{tests!r}]
        from unit.test_queue_journal import new, open_queue, break_journal
        from pathlib import Path

        async def main():
            q = await open_queue(Path({path!r}), **{sizes!r}).open()
        {steps}
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    ).format(
        tests=str(Path(__file__).parent.parent),
        path=str(path),
        sizes=sizes,
        steps=textwrap.indent(textwrap.dedent(steps), "    "),
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()


def break_journal(q: SqliteQueue) -> None:
    """Every later write to ``q``'s journal fails (EBADF): each segment's descriptor now
    names its file opened read-only. (The fault is the operating system's, not a patch.)"""
    assert q._hot is not None
    journal = q._hot.journal
    for number, seg in journal._segments.items():
        read_only = os.open(os.path.join(journal.directory, f"seg-{number:04d}"), os.O_RDONLY)
        os.dup2(read_only, seg.fd)
        os.close(read_only)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "queue.db"


def test_in_the_steady_state_commits_and_deliveries_never_write_the_queue_file(
    path: Path,
) -> None:
    async def main() -> None:
        q = await open_queue(path).open()
        try:
            assert q._db is not None
            writes: list[str] = []
            q._db.set_trace_callback(
                lambda sql: writes.append(sql) if sql.split()[0] in WRITES else None
            )
            for n in range(0, 300, 30):
                await q.put([new(i) for i in range(n, n + 30)])
                await q.ack([r.id for r in await q.lease(T0, 100)])
            assert writes == []
            assert (await q.stats()).rows == 0
        finally:
            await q.close()
        assert journal_segments(path)  # the journal is where they went

    asyncio.run(main())


def test_kill_9_loses_no_acknowledged_event_and_brings_back_no_delivered_one(
    path: Path,
) -> None:
    killed_after(
        path,
        """
        for n in range(0, 40, 10):
            await q.put([new(i) for i in range(n, n + 10)])
        rows = await q.lease(0.0, 25)
        await q.ack([r.id for r in rows[:12]])
        await q.retry_later([rows[12].id, rows[20].id], 0.0, "HTTP 500")
        await q.dead_letter([rows[13].id], 400, "bad event", 0.0)
        """,
    )
    assert journal_segments(path)
    stats = admin.stats(str(path))  # read beside no proxy: journal events counted
    assert (stats.rows, stats.dead) == (40 - 12 - 1, 1)
    again, dead = asyncio.run(drain(path))
    assert bodies(again) == sorted(new(i).body for i in range(12, 40) if i != 13)
    assert dead == [new(13).body]
    assert asyncio.run(drain(path)) == ([], dead)  # queued once: nothing the second time


@pytest.mark.parametrize("outcome", ["retry", "dead letter"])
def test_a_crash_between_a_spill_and_its_release_keeps_each_event_once(
    path: Path, outcome: str
) -> None:
    # The spill (rows in the file, fsynced) succeeds; the RELEASE in the journal fails; the
    # process dies. Both hold the events: the next open must queue them once.
    step = (
        "await q.retry_later(ids, 0.0, 'HTTP 500')"
        if outcome == "retry"
        else "await q.dead_letter(ids, 400, 'bad event', 0.0)"
    )
    killed_after(
        path,
        f"""
        await q.put([new(i) for i in range(6)])
        ids = [r.id for r in await q.lease(0.0, 6)][:3]
        break_journal(q)
        try:
            {step}
        except Exception as exc:
            assert "journal" in str(exc), exc
        else:
            raise AssertionError("the release did not fail")
        """,
    )
    again, dead = asyncio.run(drain(path))
    if outcome == "retry":
        assert bodies(again) == sorted(new(i).body for i in range(6))
        assert dead == []
    else:
        assert bodies(again) == sorted(new(i).body for i in range(3, 6))
        assert sorted(dead) == sorted(new(i).body for i in range(3))
    assert admin.stats(str(path)).rows == 0


def test_a_commit_the_journal_cannot_write_goes_to_the_file_and_is_delivered(
    path: Path,
) -> None:
    async def main() -> None:
        q = await open_queue(path).open()
        try:
            await q.put([new(0)])
            break_journal(q)
            await q.put([new(1), new(2)])  # the 200 still means written: to the file
            rows = await q.lease(T0, 10)
            assert bodies(rows) == sorted(new(i).body for i in range(3))
            await q.ack([r.id for r in rows if r.body != new(0).body])
        finally:
            await q.close()
        again, _ = await drain(path)
        assert bodies(again) == [new(0).body]  # its release could not be written: sent again

    asyncio.run(main())


def test_a_full_journal_hands_its_events_to_the_file_and_frees_its_segments(
    path: Path,
) -> None:
    # Segment is slow: nothing is delivered, commits pile up in the journal until its two
    # segments are full; the next commit goes to the file, and memory mode ends, moving the
    # journal's events to the file too. Nothing is refused, nothing lost. (The commit that
    # found no room is ahead of those moved after it: Segment orders events by timestamp.)
    async def main() -> None:
        q = await open_queue(path, journal_segment_bytes=MIB, journal_segments=2).open()
        try:
            events = [new(i, size=20_000) for i in range(120)]  # 2.4 MB
            for i in range(0, 120, 4):
                await q.put(events[i : i + 4])
            assert q._hot is not None
            assert q._hot.journal.stats().pending_commits == 0  # all moved to the file
            rows = await q.lease(T0, 1000)
            assert bodies(rows) == sorted(e.body for e in events)
            await q.ack([r.id for r in rows])
            await q.put([new(500)])  # back in memory mode: the journal takes commits again
            assert q._hot.journal.stats().pending_commits == 1
        finally:
            await q.close()
        again, _ = await drain(path)
        assert bodies(again) == [new(500).body]

    asyncio.run(main())


def test_segments_are_reused_once_everything_in_them_is_delivered(path: Path) -> None:
    async def main() -> None:
        q = await open_queue(path, journal_segment_bytes=MIB, journal_segments=3).open()
        try:
            for n in range(0, 400, 4):  # 8 MB through a journal of at most 3 MB
                await q.put([new(i, size=20_000) for i in range(n, n + 4)])
                await q.ack([r.id for r in await q.lease(T0, 100)])
                assert q._hot is not None
                q._hot.journal.sync()  # as the syncer does every 0.2 s
            assert len(journal_segments(path)) <= 3
            assert (await q.stats()).rows == 0
        finally:
            await q.close()
        assert await drain(path) == ([], [])

    asyncio.run(main())


def test_a_purge_drops_the_journal_s_events_also_those_of_a_killed_process(
    path: Path,
) -> None:
    killed_after(path, "await q.put([new(i) for i in range(5)])")
    assert admin.stats(str(path)).rows == 5
    assert admin.purge(str(path)) == (5, 0)
    assert admin.stats(str(path)).rows == 0
    assert asyncio.run(drain(path)) == ([], [])


def old_release_pack(path: Path, rows: list[NewRow]) -> None:
    """What a release before the journal left in its file: a commit as a row of ``packs``."""
    db = sqlite3.connect(path)
    try:
        db.execute(
            "INSERT INTO packs (rows, size, body) VALUES (?, ?, ?)",
            (
                len(rows),
                sum(stored_size(r.write_key, r.body, r.sent_at) for r in rows),
                pack_rows(rows),
            ),
        )
        db.commit()
    finally:
        db.close()


def test_the_queue_cli_sees_events_wherever_they_lie_and_each_once(
    path: Path, tmp_path: Path
) -> None:
    # A killed proxy leaves events in every place they can lie: in flight in the journal,
    # released from the journal by a spill whose RELEASE never came (so in both), retried
    # and fresh as rows of the file, refused as a dead letter; and a file from the release
    # before the journal holds a pack. The operator's commands count each event once.
    killed_after(
        path,
        """
        await q.put([new(i) for i in range(10)])
        await q.put([new(i, key="wk_b") for i in range(5)])
        rows = await q.lease(0.0, 100)
        await q.ack([r.id for r in rows[:3]])
        await q.dead_letter([rows[3].id], 400, "bad event", 0.0)
        await q.retry_later([rows[4].id, rows[5].id], 0.0, "HTTP 500")  # file: database mode
        await q.put([new(i, key="wk_b") for i in range(5, 7)])  # fresh rows of the file
        break_journal(q)
        try:
            await q.retry_later([rows[6].id], 0.0, "HTTP 500")  # spilled, never released
        except Exception:
            pass
        """,
    )
    old_release_pack(path, [new(i, key="wk_c") for i in range(2)])
    config = tmp_path / "segproxy.toml"
    config.write_text(f'[queue]\nbackend = "sqlite"\npath = "{path}"\n')

    shown = run_cli("queue", "stats", "--json", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    stats = json.loads(shown.stdout)
    per_key = {k: v["rows"] for k, v in stats["per_key"].items()}
    # wk_a: 10 - 3 delivered - 1 dead; wk_b: 5 in flight + 2 fresh; wk_c: the old pack
    assert per_key == {mask("wk_a"): 6, mask("wk_b"): 7, mask("wk_c"): 2}
    assert (stats["rows"], stats["dead"]) == (15, 1)
    dead = run_cli("queue", "dead", "--json", "--config", str(config))
    assert [d["event"]["messageId"] for d in json.loads(dead.stdout)] == ["wk_a-3"]

    replayed = run_cli("queue", "replay", "--config", str(config))
    assert replayed.returncode == 0, replayed.stderr
    again, dead_left = asyncio.run(drain(path))
    expected = [new(i).body for i in range(3, 10)]
    expected += [new(i, key="wk_b").body for i in range(7)]
    expected += [new(i, key="wk_c").body for i in range(2)]
    assert (bodies(again), dead_left) == (sorted(expected), [])


def test_purge_clears_events_wherever_they_lie(path: Path, tmp_path: Path) -> None:
    killed_after(
        path,
        """
        await q.put([new(i) for i in range(6)])
        rows = await q.lease(0.0, 100)
        await q.dead_letter([rows[0].id], 400, "bad event", 0.0)
        await q.retry_later([rows[1].id], 0.0, "HTTP 500")
        await q.put([new(9)])
        """,
    )
    old_release_pack(path, [new(i, key="wk_c") for i in range(2)])
    config = tmp_path / "segproxy.toml"
    config.write_text(f'[queue]\nbackend = "sqlite"\npath = "{path}"\n')
    purged = run_cli("queue", "purge", "--yes", "--config", str(config))
    assert purged.returncode == 0, purged.stderr
    # 4 in flight in the journal, 1 retried and 1 fresh row, 2 in the old pack
    assert "purged 8 queued events and 1 dead letters" in purged.stdout
    stats = json.loads(run_cli("queue", "stats", "--json", "--config", str(config)).stdout)
    assert (stats["rows"], stats["dead"]) == (0, 0)
    assert asyncio.run(drain(path)) == ([], [])


def test_a_journal_full_of_commits_in_flight_at_a_kill_is_emptied_at_the_next_start(
    path: Path,
) -> None:
    # Thousands of one-event commits, all in flight (leased) when the process dies, fill the
    # journal's two segments up to their reserve. The next start releases them all (in
    # synced pieces, freeing segments as it goes) and queues every event once.
    sizes = {"journal_segment_bytes": MIB, "journal_segments": 2}
    killed_after(
        path,
        """
        for i in range(10_500):
            await q.put([new(i)])
        stats = q._hot.journal.stats()
        assert (stats.in_use, stats.pending_commits) == (2, 10_500), stats
        assert len(await q.lease(0.0, 100_000)) == 10_500
        """,
        **sizes,
    )
    again, _ = asyncio.run(drain(path, **sizes))
    assert bodies(again) == sorted(new(i).body for i in range(10_500))


def test_leaving_memory_mode_on_a_full_journal_of_small_commits_empties_it(path: Path) -> None:
    # Segment is slow and the commits are small: the journal fills with thousands of them.
    # The commit that finds no room ends memory mode, whose move releases every one of them
    # in one round, into the room each segment keeps for releases.
    async def main() -> None:
        q = await open_queue(path, journal_segment_bytes=MIB, journal_segments=2).open()
        try:
            for i in range(19_900):
                await q.put([new(i)])
            assert q._hot is not None
            assert q._hot.journal.stats().pending_commits == 0  # all moved to the file
            assert (await q.stats()).rows == 19_900
        finally:
            await q.close()
        again, _ = await drain(path)
        assert bodies(again) == sorted(new(i).body for i in range(19_900))

    asyncio.run(main())
