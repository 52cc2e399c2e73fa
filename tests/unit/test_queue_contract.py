"""The queue contract (queue/base.py), run against both backends, plus SQLite's own promises.

No pytest-asyncio: each test drives its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from segproxy.queue import admin, checkpoint, runner, schema
from segproxy.queue import sqlite as sqlite_queue
from segproxy.queue.base import (
    DeadRow,
    NewRow,
    Queue,
    QueueError,
    QueueFull,
    Row,
    RowKind,
    new_row,
    queued_row,
    stored_size,
)
from segproxy.queue.memory import MemoryQueue
from segproxy.queue.sqlite import SqliteQueue
from segproxy.redact import mask

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
BIG = 1 << 40


class Factory(Protocol):
    def __call__(
        self, *, max_rows: int = ..., max_bytes: int = ..., max_dead_bytes: int = ...
    ) -> Awaitable[Queue]: ...


def new(key: str = "wk_a", n: int = 0, *, kind: str = "event", size: int = 0) -> NewRow:
    body = f'{{"messageId":"{key}-{n}"'.encode()
    body += (',"pad":"' + "x" * size + '"}').encode() if size else b"}"
    return NewRow(key, "metrics" if kind == "metrics" else "event", T0 + n, body)


SYNCHRONOUS = ["NORMAL"]  # the mode open_sqlite uses, set per test by the fixture below


@pytest.fixture(autouse=True, params=["NORMAL", "FULL"])
def synchronous(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every SQLite test runs in both modes: jobs on the event loop (NORMAL, invariant 9)
    and on the writer thread (FULL)."""
    SYNCHRONOUS[0] = request.param
    yield request.param
    SYNCHRONOUS[0] = "NORMAL"


def open_sqlite(path: Path, **kw: Any) -> Awaitable[SqliteQueue]:
    return SqliteQueue(
        str(path),
        max_rows=kw.pop("max_rows", BIG),
        max_bytes=kw.pop("max_bytes", BIG),
        min_free_disk_bytes=kw.pop("min_free_disk_bytes", 0),
        synchronous=kw.pop("synchronous", SYNCHRONOUS[0]),
        **kw,
    ).open()


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    def factory(
        *, max_rows: int = BIG, max_bytes: int = BIG, max_dead_bytes: int = BIG
    ) -> Awaitable[Queue]:
        caps: dict[str, Any] = {"max_rows": max_rows, "max_bytes": max_bytes}
        if max_dead_bytes != BIG:  # (so that the rest runs on queues without this cap)
            caps["max_dead_bytes"] = max_dead_bytes
        if request.param == "memory":

            async def memory() -> Queue:
                return MemoryQueue(**caps)

            return memory()
        return open_sqlite(tmp_path / "q" / "queue.db", **caps)

    return factory


def run(make: Factory, scenario: Callable[[Queue], Awaitable[None]], **caps: int) -> None:
    async def main() -> None:
        q = await make(**caps)
        try:
            await scenario(q)
        finally:
            await q.close()

    asyncio.run(main())


async def dead_rows(q: Queue) -> list[DeadRow]:
    if isinstance(q, SqliteQueue):
        return await q.dead_rows()
    assert isinstance(q, MemoryQueue)
    return list(q.dead)


def bodies(rows: Any) -> list[bytes]:
    return [r.body for r in rows]


def cost(*rows: NewRow | Row) -> int:
    """What rows count against the caps: every byte stored (base.stored_size)."""
    return sum(stored_size(r.write_key, r.body, r.sent_at) for r in rows)


# ---------------------------------------------------------------------------------------------
# The contract, both backends


def test_rows_made_on_the_hot_path_are_the_named_tuples() -> None:
    # new_row / queued_row skip the NamedTuple's interpreted constructor, nothing else.
    made = new_row("k", "event", 1.5, b"{}", "2026-01-01T00:00:00.000Z")
    assert type(made) is NewRow
    assert made == NewRow("k", "event", 1.5, b"{}", "2026-01-01T00:00:00.000Z")
    assert (made.write_key, made.sent_at) == ("k", "2026-01-01T00:00:00.000Z")
    assert new_row("", "metrics", 2.0, b"{}") == NewRow("", "metrics", 2.0, b"{}")
    row = queued_row(7, "k", "event", 1.5, 0, b"{}", None)
    assert type(row) is Row
    assert row == Row(7, "k", "event", 1.5, 0, b"{}") and row.id == 7 and row.sent_at is None


def test_put_then_lease_returns_rows_oldest_first(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        first = [new("wk_a", 0), new("wk_b", 1)]
        second = [new("wk_a", 2), new("", 3, kind="metrics")]
        await q.put(first)
        await q.put(second)
        rows = await q.lease(T0 + 10, 100)
        assert bodies(rows) == bodies(first + second)
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert len({r.id for r in rows}) == 4
        r0 = rows[0]
        assert (r0.write_key, r0.kind, r0.received_at, r0.attempts) == ("wk_a", "event", T0, 0)
        assert (rows[3].write_key, rows[3].kind) == ("", "metrics")

    run(make, scenario)


def test_lease_honours_max_rows_and_exclude_keys(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", i) for i in range(3)] + [new("wk_b", i) for i in range(3)])
        only_b = await q.lease(T0, 2, frozenset({"wk_a"}))
        assert [r.write_key for r in only_b] == ["wk_b", "wk_b"]
        rest = await q.lease(T0, 100, frozenset({"wk_a", "wk_c"}))
        assert [r.write_key for r in rest] == ["wk_b"]
        assert await q.lease(T0, 100, frozenset({"wk_a"})) == []
        assert [r.write_key for r in await q.lease(T0, 100)] == ["wk_a"] * 3

    run(make, scenario)


def test_a_leased_row_is_not_leased_again_until_retry_later(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", i) for i in range(5)])
        a = await q.lease(T0, 2)
        b = await q.lease(T0, 10)
        assert len(a) == 2
        assert len(b) == 3
        assert not {r.id for r in a} & {r.id for r in b}
        assert await q.lease(T0 + 10_000, 10) == []
        await q.retry_later([a[0].id], T0)
        again = await q.lease(T0, 10)
        assert [r.body for r in again] == [a[0].body]  # the same event (ids may change)
        assert again[0].attempts == 1

    run(make, scenario)


def test_retry_later_respects_not_before(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0), new("wk_a", 1)])
        rows = await q.lease(T0, 10)
        await q.retry_later([rows[0].id], T0 + 30)
        await q.retry_later([rows[1].id], T0 + 60)
        assert await q.next_ready() == T0 + 30
        assert await q.lease(T0 + 29.999, 10) == []
        ready = await q.lease(T0 + 30, 10)
        assert [r.body for r in ready] == [rows[0].body]
        assert await q.next_ready() == T0 + 60
        assert await q.lease(T0 + 59, 10) == []
        later = await q.lease(T0 + 61, 10)
        assert [(r.body, r.attempts) for r in later] == [(rows[1].body, 1)]
        await q.retry_later([later[0].id], T0 + 100)
        assert [r.attempts for r in await q.lease(T0 + 100, 10)] == [2]

    run(make, scenario)


def test_ack_deletes(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0, size=10), new("wk_a", 1)])
        rows = await q.lease(T0, 10)
        await q.ack([rows[0].id])
        s = await q.stats()
        assert (s.rows, s.bytes, s.dead) == (1, cost(rows[1]), 0)
        await q.ack([rows[1].id])
        s = await q.stats()
        assert (s.rows, s.bytes, s.oldest, s.per_key) == (0, 0, None, {})
        assert await q.next_ready() is None
        await q.retry_later([rows[0].id], T0)  # gone for good: nothing comes back
        assert await q.lease(T0 + 1_000, 10) == []

    run(make, scenario)


def test_dead_letter_moves_rows_with_status_and_reason(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0), new("wk_b", 1), new("wk_a", 2)])
        rows = await q.lease(T0, 10)
        reason = '{"success":false,"message":"invalid event"}'
        await q.dead_letter([rows[0].id, rows[2].id], 400, reason, T0 + 50)
        s = await q.stats()
        assert (s.rows, s.dead) == (1, 2)
        assert set(s.per_key) == {"wk_b"}
        dead = await dead_rows(q)
        assert [(d.write_key, d.status, d.reason, d.died_at) for d in dead] == [
            ("wk_a", 400, reason, T0 + 50),
            ("wk_a", 400, reason, T0 + 50),
        ]
        assert [d.body for d in dead] == [rows[0].body, rows[2].body]
        assert [d.received_at for d in dead] == [T0, T0 + 2]
        await q.retry_later([rows[0].id], T0)  # a dead row never comes back by itself
        assert await q.lease(T0 + 1_000, 10) == []

    run(make, scenario)


def test_next_ready(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        assert await q.next_ready() is None
        await q.put([new("wk_a", 0), new("wk_a", 1)])
        ready = await q.next_ready()
        assert ready is not None
        assert ready <= T0  # fresh rows are ready at once
        rows = await q.lease(T0, 10)
        assert await q.next_ready() is None  # all leased
        await q.retry_later([rows[1].id], T0 + 5)
        assert await q.next_ready() == T0 + 5
        await q.retry_later([rows[0].id], T0 + 3)
        assert await q.next_ready() == T0 + 3

    run(make, scenario)


def test_stats_per_key(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        rows = [new("wk_a", 5, size=3), new("wk_b", 1), new("wk_a", 2), new("", 9, kind="metrics")]
        await q.put(rows)
        s = await q.stats()
        assert s.rows == 4
        assert s.bytes == cost(*rows)
        assert s.oldest == T0 + 1
        assert s.dead == 0
        assert set(s.per_key) == {"wk_a", "wk_b", ""}
        a = s.per_key["wk_a"]
        assert (a.rows, a.bytes, a.oldest) == (2, cost(rows[0], rows[2]), T0 + 2)
        b = s.per_key["wk_b"]
        assert (b.rows, b.bytes, b.oldest) == (1, cost(rows[1]), T0 + 1)
        # leased rows are still queued rows
        await q.lease(T0, 10)
        assert (await q.stats()).rows == 4

    run(make, scenario)


def test_row_cap_raises_queue_full_and_stores_nothing(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0), new("wk_a", 1)])
        assert q.has_room()
        with pytest.raises(QueueFull):
            await q.put([new("wk_a", 2), new("wk_a", 3)])  # one would fit: all or none
        assert (await q.stats()).rows == 2
        await q.put([new("wk_a", 4)])
        assert not q.has_room()
        with pytest.raises(QueueFull):
            await q.put([new("wk_a", 5)])
        assert len(await q.lease(T0 + 100, 100)) == 3

    run(make, scenario, max_rows=3)


def test_byte_cap_raises_queue_full_and_stores_nothing(make: Factory) -> None:
    size = cost(new("wk_a", 0, size=40))

    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0, size=40)])
        with pytest.raises(QueueFull):
            await q.put([new("wk_a", 1, size=40), new("wk_a", 2, size=40)])
        s = await q.stats()
        assert (s.rows, s.bytes) == (1, size)
        assert q.has_room()
        await q.put([new("wk_a", 3, size=40)])
        assert not q.has_room()
        with pytest.raises(QueueFull):
            await q.put([new("wk_a", 4)])

    run(make, scenario, max_rows=100, max_bytes=2 * size)


def test_has_room_follows_the_counters_through_lease_retry_ack_dead(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0), new("wk_a", 1)])
        assert not q.has_room()
        rows = await q.lease(T0, 10)
        assert not q.has_room()  # leased rows still count
        await q.retry_later([r.id for r in rows], T0)
        assert not q.has_room()
        rows = await q.lease(T0, 10)
        await q.ack([rows[0].id])
        assert q.has_room()
        await q.put([new("wk_a", 2)])
        assert not q.has_room()
        await q.dead_letter([rows[1].id], 422, "nope", T0)
        assert q.has_room()
        await q.put([new("wk_a", 3)])
        with pytest.raises(QueueFull):
            await q.put([new("wk_a", 4)])

    run(make, scenario, max_rows=2)


def test_unknown_ids_are_ignored(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0)])
        await q.ack([999])
        await q.retry_later([998], T0 + 10)
        await q.dead_letter([997], 400, "x", T0)
        s = await q.stats()
        assert (s.rows, s.dead) == (1, 0)
        assert q.has_room()

    run(make, scenario, max_rows=2)


# ---------------------------------------------------------------------------------------------
# SQLite: durability, leases across processes, the lock, group commit, disk space, admin


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data" / "queue.db"


def test_rows_survive_close_and_reopen(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([new("wk_a", i) for i in range(3)])
        rows = await q.lease(T0, 1)
        await q.ack([rows[0].id])
        await q.close()

        q = await open_sqlite(db_path)
        try:
            s = await q.stats()
            assert (s.rows, s.bytes) == (2, cost(new("wk_a", 1)) * 2)
            assert bodies(await q.lease(T0, 10)) == [new("wk_a", 1).body, new("wk_a", 2).body]
        finally:
            await q.close()

    asyncio.run(main())


def test_leases_of_a_dead_process_are_cleared_on_reopen(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([new("wk_a", i) for i in range(4)])
        first = await q.lease(T0, 2)
        await q.retry_later([first[1].id], T0 + 3600)  # waiting, not leased
        taken = await q.lease(T0, 10)
        assert len(taken) == 2
        await q.close()  # the "process" dies holding leases on 3 rows (no ack)

        q = await open_sqlite(db_path)
        try:
            again = await q.lease(T0, 10)
            # (the one a pack still held, in flight, comes back after those put back before)
            assert sorted(r.body for r in again) == [first[0].body, taken[0].body, taken[1].body]
            assert [r.attempts for r in again] == [0, 0, 0]
            assert await q.next_ready() == T0 + 3600  # the retry time survives too
            late = await q.lease(T0 + 3600, 10)
            assert [(r.body, r.attempts) for r in late] == [(first[1].body, 1)]
        finally:
            await q.close()

    asyncio.run(main())


def test_a_second_queue_on_the_same_file_is_refused(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        other = SqliteQueue(str(db_path), max_rows=BIG, max_bytes=BIG, min_free_disk_bytes=0)
        try:
            with pytest.raises(QueueError, match="another segproxy process"):
                await other.open()
        finally:
            await other.close()
            await q.close()
        # once the owner closed, the file can be opened again
        q = await open_sqlite(db_path)
        await q.close()

    asyncio.run(main())


def test_the_lock_file_is_flocked_while_open(db_path: Path) -> None:
    import fcntl

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            fd = os.open(str(db_path) + ".lock", os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        finally:
            await q.close()

    asyncio.run(main())


def test_group_commit_shares_transactions(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        commits: list[str] = []  # the thread of each transaction the queue's connection ran

        def trace(statement: str) -> None:  # what the queue's own connection runs, and where
            if statement == "COMMIT":
                commits.append(threading.current_thread().name)

        assert q._db is not None and q._hot is not None
        q._db.set_trace_callback(trace)
        records = q._hot.journal.stats().pending_commits
        try:
            await asyncio.gather(*(q.put([new(f"wk_{i % 3}", i)]) for i in range(200)))
            assert (await q.stats()).rows == 200
            if SYNCHRONOUS[0] == "NORMAL":
                # Invariants 9 and 12: with NORMAL, a group commit is one journal record,
                # written on the loop (never fsynced there); the file is not written at all.
                journal_commits = q._hot.journal.stats().pending_commits - records
                assert 0 < journal_commits <= 10
                assert commits == []
            else:
                # With FULL, each commit fsyncs, on the writer thread.
                assert 0 < len(commits) <= 10, commits
                assert set(commits) == {"segproxy-sqlite"}
        finally:
            await q.close()
        q = await open_sqlite(db_path)
        try:
            assert (await q.stats()).rows == 200
        finally:
            await q.close()

    asyncio.run(main())


def test_put_returns_only_after_commit(db_path: Path) -> None:
    # Another connection holds the write lock (the CLI replaying, say): a put to the file
    # waits for it, the event loop goes on meanwhile, and the 200's promise holds once it
    # returns. (In memory mode with NORMAL, puts go to the journal: see the next test.)
    async def main() -> None:
        q = await open_sqlite(db_path)
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            await to_database_mode(q)
            other.execute("BEGIN IMMEDIATE")
            put = asyncio.ensure_future(q.put([new("wk_a", 0)]))
            for _ in range(10):
                await asyncio.sleep(0.005)  # the loop runs: nothing waits on the lock in it
            assert not put.done()
            other.execute("COMMIT")
            await asyncio.wait_for(put, 5)
            assert admin.stats(str(db_path)).rows == 2  # visible to another connection
        finally:
            other.close()
            await q.close()

    asyncio.run(main())


def test_in_memory_mode_a_put_never_waits_for_the_file_s_lock(
    db_path: Path, synchronous: str
) -> None:
    # Invariant 12: with NORMAL, memory mode's commits go to the journal; a long replay or
    # purge holding the file's lock does not hold up a single 200.
    if synchronous != "NORMAL":
        pytest.skip("FULL commits every event to the file")

    async def main() -> None:
        q = await open_sqlite(db_path)
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            await asyncio.wait_for(q.put([new("wk_a", 0)]), 5)
            other.execute("COMMIT")
            assert admin.stats(str(db_path)).rows == 1  # the CLI sees it, in the journal
        finally:
            other.close()
            await q.close()

    asyncio.run(main())


def test_a_file_locked_for_too_long_fails_the_put_and_keeps_nothing(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    if synchronous != "NORMAL":
        pytest.skip("FULL waits on the writer thread for SQLite's busy_timeout (10 s)")
    monkeypatch.setattr(runner, "BUSY_GIVE_UP", 0.2)

    async def main() -> None:
        q = await open_sqlite(db_path)
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            await to_database_mode(q)  # commits go to the file
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(QueueError, match="locked"):
                await asyncio.wait_for(q.put([new("wk_a", 0)]), 5)
            other.execute("COMMIT")
            assert q.rows == 1  # refused: not counted, so not held against the caps
            await q.put([new("wk_a", 1)])  # the lock is gone: back to normal
            assert admin.stats(str(db_path)).rows == 2
        finally:
            other.close()
            await q.close()

    asyncio.run(main())


def test_the_wal_stays_bounded_under_steady_commits(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    # Invariant 6 in loop mode: commits back to back never leave a PASSIVE checkpoint the
    # moment SQLite needs to start the WAL over (without the RESTART, it grew to the size of
    # everything ever written: 2 GB in 12 s of the benchmark).
    if synchronous != "NORMAL":
        pytest.skip("with FULL the writer thread checkpoints itself (SQLite's autocheckpoint)")
    monkeypatch.setattr(schema, "WAL_CHECKPOINT_BYTES", 1 << 20)
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 0.01)
    rows, writers = 36_000, 24

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:

            async def writer(w: int) -> None:
                for i in range(w, rows, writers):
                    await q.put([new("wk_a", i, size=2000)])
                    if i % 50 == 0:  # delivered rows leave, as under real load
                        await q.ack([r.id for r in await q.lease(T0, 1000)])

            await asyncio.gather(*(writer(w) for w in range(writers)))
            wal.append(wal_size())  # its high-water mark (it goes when the queue closes)
        finally:
            await q.close()

    def wal_size() -> int:
        return (db_path.parent / f"{db_path.name}-wal").stat().st_size

    wal: list[int] = []
    asyncio.run(main())
    written = rows * 2000  # the WAL takes several times that: whole pages per commit
    assert wal[0] < written / 2, f"the WAL grew to {wal[0]} bytes for {written} written"


def test_a_long_reader_never_stalls_commits_while_the_wal_restarts(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    # A reader holding a snapshot for long (``segproxy queue stats`` on a big queue) holds
    # commits back for RESTART_WAIT at most at a time, never until they fail.
    if synchronous != "NORMAL":
        pytest.skip("with FULL the writer thread checkpoints itself (SQLite's autocheckpoint)")
    monkeypatch.setattr(schema, "WAL_CHECKPOINT_BYTES", 1)  # restart at every round
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 0.01)
    monkeypatch.setattr(runner, "BUSY_GIVE_UP", 1.0)

    async def main() -> None:
        q = await open_sqlite(db_path)
        reader = sqlite3.connect(db_path, isolation_level=None)
        try:
            n = 0
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot
            held_until = time.monotonic() + 2 * runner.BUSY_GIVE_UP
            while time.monotonic() < held_until and n < 5_000:
                await q.put([new("wk_a", n, size=2000)])  # each one must succeed
                n += 1
            reader.execute("COMMIT")
            assert admin.stats(str(db_path)).rows == n
        finally:
            reader.close()
            await q.close()

    asyncio.run(main())


def test_low_disk_space_means_queue_full(db_path: Path) -> None:
    async def main() -> None:
        db_path.parent.mkdir(parents=True)
        free = shutil.disk_usage(db_path.parent).free
        q = await open_sqlite(db_path, min_free_disk_bytes=free + (1 << 50))
        try:
            assert not q.has_room()
            with pytest.raises(QueueFull, match="disk"):
                await q.put([new("wk_a", 0)])
            assert (await q.stats()).rows == 0
            assert q.rows == 0
        finally:
            await q.close()

    asyncio.run(main())


def test_sqlite_disk_full_is_queue_full_and_rolled_back(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await to_database_mode(q)  # commits go to the file (its wk_z row stays queued)
            await q.put([new("wk_a", 0)])
            db = q._db
            assert db is not None
            pages = (await q._run(lambda: db.execute("PRAGMA page_count").fetchone()))[0]
            await q._run(lambda: db.execute(f"PRAGMA max_page_count = {pages + 1}"))
            with pytest.raises(QueueFull, match="full"):
                await q.put([new("wk_a", 1, size=200_000)])
            s = await q.stats()
            assert (s.rows, q.rows, q.bytes) == (2, 2, s.bytes)
            assert not q.has_room()  # remembered for a moment: fast 503s meanwhile
        finally:
            await q.close()

    asyncio.run(main())


def test_put_on_a_closed_queue_fails_cleanly(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.close()
        try:
            with pytest.raises(QueueError):
                await q.put([new("wk_a", 0)])
        finally:
            assert (q.rows, q.bytes) == (0, 0)

    asyncio.run(main())


# The schema of bd8d190 (the first durable queue): no sent_at column.
OLD_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, write_key TEXT NOT NULL, kind TEXT NOT NULL,
    received_at REAL NOT NULL, not_before REAL NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE INDEX events_not_before ON events(not_before);
CREATE TABLE dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT, write_key TEXT NOT NULL, kind TEXT NOT NULL,
    received_at REAL NOT NULL, died_at REAL NOT NULL, attempts INTEGER NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL, body BLOB NOT NULL
);
INSERT INTO events (write_key, kind, received_at, size, body)
    VALUES ('wk_a', 'event', 1767225600.0, 22, X'7B226D6573736167654964223A22776B5F612D30227D');
"""


def test_a_queue_file_from_the_previous_schema_still_works(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.executescript(OLD_SCHEMA)
    old.close()

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            rows = await q.lease(T0, 10)
            assert bodies(rows) == [b'{"messageId":"wk_a-0"}']
            await q.put([new("wk_a", 1)])
        finally:
            await q.close()

    try:
        asyncio.run(main())
    except sqlite3.OperationalError as exc:  # lease reads the missing column directly
        raise QueueError(str(exc)) from exc


def test_sent_at_is_kept_beside_the_body(make: Factory) -> None:
    async def scenario(q: Queue) -> None:
        await q.put(
            [
                NewRow("wk_a", "event", T0, b'{"messageId":"a"}', "2026-01-01T00:00:00.000Z"),
                NewRow("wk_a", "event", T0, b'{"messageId":"b"}'),
            ]
        )
        rows = await q.lease(T0, 10)
        assert [r.sent_at for r in rows] == ["2026-01-01T00:00:00.000Z", None]
        await q.retry_later([rows[0].id], T0)
        assert [r.sent_at for r in await q.lease(T0, 10)] == ["2026-01-01T00:00:00.000Z"]

    run(make, scenario)


def test_replayed_dead_letters_keep_their_sent_at(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([NewRow("wk_a", "event", T0, b"{}", "2026-01-01T00:00:00.000Z")])
            rows = await q.lease(T0, 10)
            await q.dead_letter([rows[0].id], 400, "bad", T0)
            assert admin.replay(str(db_path)) == 1
            again = await q.lease(T0, 10)
            assert [(r.body, r.sent_at) for r in again] == [(b"{}", "2026-01-01T00:00:00.000Z")]
        finally:
            await q.close()

    asyncio.run(main())


def test_counters_are_recounted_at_open(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([new("wk_a", 0), new("wk_a", 1)])
        await q.close()
        q = await open_sqlite(db_path, max_rows=2)
        try:
            assert not q.has_room()
            with pytest.raises(QueueFull):
                await q.put([new("wk_a", 2)])
        finally:
            await q.close()

    asyncio.run(main())


def test_admin_stats_dead_replay_purge(db_path: Path) -> None:
    path = str(db_path)

    async def fill() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_alpha_key", i) for i in range(4)] + [new("wk_b", 9)])
            rows = await q.lease(T0, 100)
            await q.dead_letter([rows[0].id, rows[1].id, rows[2].id], 400, "bad event", T0 + 1)
        finally:
            await q.close()

    asyncio.run(fill())

    s = admin.stats(path)
    assert (s.rows, s.dead) == (2, 3)
    assert set(s.per_key) == {"wk_alpha_key", "wk_b"}
    shown = admin.stats_json(s, T0 + 100)
    masked = set(shown["per_key"])
    assert masked == {mask("wk_alpha_key"), mask("wk_b")}
    assert all("wk_alpha_key" not in m and "wk_b" not in m for m in masked)  # never shown whole
    assert shown["rows"] == 2
    assert "wk_alpha_key" not in str(shown)

    dead = admin.dead(path, 10)
    assert [(d.status, d.reason, d.write_key) for d in dead] == [
        (400, "bad event", "wk_alpha_key")
    ] * 3
    assert [d.body for d in dead] == [new("wk_alpha_key", i).body for i in range(3)]
    assert len(admin.dead(path, 2)) == 2

    progress: list[tuple[int, int]] = []
    assert (
        admin.replay(path, ids=[dead[1].id, 12345], progress=lambda d, t: progress.append((d, t)))
        == 1
    )
    assert progress == [(1, 1)]
    assert (admin.stats(path).rows, admin.stats(path).dead) == (3, 2)
    assert admin.replay(path) == 2
    assert (admin.stats(path).rows, admin.stats(path).dead) == (5, 0)

    async def resend() -> list[bytes]:
        q = await open_sqlite(db_path)
        try:
            rows = await q.lease(T0, 100)
            assert all(r.attempts == 0 for r in rows)
            await q.dead_letter([rows[0].id], 400, "again", T0)
            return bodies(rows)
        finally:
            await q.close()

    replayed = asyncio.run(resend())
    assert sorted(replayed) == sorted(
        [new("wk_alpha_key", i).body for i in range(4)] + [new("wk_b", 9).body]
    )

    assert admin.purge(path, dead_only=True) == (0, 1)
    assert (admin.stats(path).rows, admin.stats(path).dead) == (4, 0)
    assert admin.purge(path) == (4, 0)
    assert admin.stats(path).rows == 0


def test_admin_works_on_a_live_queue_and_recount_keeps_caps_true(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path, max_rows=2)
        try:
            await q.put([new("wk_a", 0), new("wk_a", 1)])
            rows = await q.lease(T0, 10)
            await q.dead_letter([rows[0].id], 400, "bad", T0)
            await q.put([new("wk_a", 2)])
            assert not q.has_room()
            assert admin.stats(str(db_path)).rows == 2  # read while the queue is open
            assert admin.purge(str(db_path), dead_only=False) == (2, 1)
            assert not q.has_room()  # stale until recount
            await q.recount()
            assert q.has_room()
            await q.put([new("wk_a", 3)])
        finally:
            await q.close()

    asyncio.run(main())


def test_admin_on_a_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.db")
    with pytest.raises(admin.NoQueue):
        admin.stats(missing)
    with pytest.raises(admin.NoQueue):
        admin.replay(missing)
    assert not Path(missing).exists()


# ---------------------------------------------------------------------------------------------
# SQLite invariant 7: committed rows reach the forwarder in memory, and every way out of that
# (retry, backlog, another process writing) leases from the file without losing or doubling


def test_a_row_leased_from_memory_is_not_leased_again_when_a_retry_switches_to_the_file(
    db_path: Path,
) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(3)])
            a, b, c = await q.lease(T0, 10)
            await q.retry_later([b.id], T0)  # b is back in the file, ready again
            await q.put([new("wk_a", 3)])
            again = await q.lease(T0, 10)
            # b and the new row; a and c are still leased (from memory) and stay so
            assert bodies(again) == [b.body, new("wk_a", 3).body]
            assert await q.lease(T0, 10) == []
            await q.ack([a.id, c.id] + [r.id for r in again])
            assert (await q.stats()).rows == 0
        finally:
            await q.close()

    asyncio.run(main())


def test_once_caught_up_new_commits_are_leased_in_order_again(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", 0)])
            (first,) = await q.lease(T0, 10)
            await q.retry_later([first.id], T0 + 60)  # the file holds a waiting row
            await q.put([new("wk_a", 1)])
            assert bodies(await q.lease(T0, 10)) == [new("wk_a", 1).body]
            await q.put([new("wk_b", 2), new("wk_a", 3)])
            assert bodies(await q.lease(T0, 10)) == [new("wk_b", 2).body, new("wk_a", 3).body]
            late = await q.lease(T0 + 60, 10)
            assert [(r.body, r.attempts) for r in late] == [(first.body, 1)]
        finally:
            await q.close()

    asyncio.run(main())


def test_a_commit_right_behind_the_catching_up_lease_is_handed_over(db_path: Path) -> None:
    # The lease that catches up with the file and a commit queued just behind it: the commit's
    # result comes before the code after the lease's await runs, and must already find memory
    # mode on, or its row is in neither place the forwarder looks (lost until a restart).
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", 0)])
            (first,) = await q.lease(T0, 10)
            await q.retry_later([first.id], T0)  # database mode, one row ready
            # The lease's job is queued, then the commit's right behind it.
            lease = asyncio.ensure_future(q.lease(T0, 10))
            put = asyncio.ensure_future(q.put([new("wk_a", 1)]))
            assert [r.body for r in await lease] == [first.body]
            await put
            assert bodies(await q.lease(T0, 10)) == [new("wk_a", 1).body]
        finally:
            await q.close()

    asyncio.run(main())


def test_a_backlog_past_the_memory_bound_is_leased_from_the_file_oldest_first_once(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("segproxy.queue.sqlite.HANDOVER_MAX_ROWS", 5)

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(3)])
            head = await q.lease(T0, 2)  # leased from memory
            for i in range(3, 12):
                await q.put([new("wk_a" if i % 2 else "wk_b", i)])  # over the bound: the file
            rest: list[Any] = []
            while batch := await q.lease(T0, 4):
                rest.extend(batch)
            assert bodies(head + rest) == [
                new("wk_a" if i % 2 or i < 3 else "wk_b", i).body for i in range(12)
            ]
            await q.ack([r.id for r in head + rest])
            await q.put([new("wk_a", 12)])
            assert bodies(await q.lease(T0, 10)) == [new("wk_a", 12).body]
        finally:
            await q.close()

    asyncio.run(main())


def test_rows_leased_from_memory_are_sent_again_after_the_process_dies(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([new("wk_a", i) for i in range(3)])
        taken = await q.lease(T0, 10)
        await q.ack([taken[0].id])
        await q.close()  # dies holding two leases taken from memory

        q = await open_sqlite(db_path)
        try:
            assert bodies(await q.lease(T0, 10)) == bodies(taken[1:])
        finally:
            await q.close()

    asyncio.run(main())


def test_rows_another_process_adds_are_seen_while_idle(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", 0)])
            (row,) = await q.lease(T0, 10)
            await q.dead_letter([row.id], 400, "bad", T0)
            await q.put([new("wk_a", 1)])
            (kept,) = await q.lease(T0, 10)  # leased from memory, in flight
            await asyncio.to_thread(admin.replay, str(db_path))  # another process
            assert await q.next_ready() == 0.0
            assert bodies(await q.lease(T0, 10)) == [new("wk_a", 0).body]
            assert await q.lease(T0, 10) == []  # the in-flight row is not leased twice
            await q.ack([kept.id])
        finally:
            await q.close()

    asyncio.run(main())


def test_a_small_queue_file_with_4_kb_pages_is_rebuilt_with_bigger_pages(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.execute("PRAGMA page_size = 4096")
    old.executescript(OLD_SCHEMA)
    old.close()

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            assert bodies(await q.lease(T0, 10)) == [b'{"messageId":"wk_a-0"}']
        finally:
            await q.close()

    asyncio.run(main())
    check = sqlite3.connect(db_path)
    try:
        assert check.execute("PRAGMA page_size").fetchone()[0] == 32 * 1024
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        check.close()


def test_database_mode_reads_through_indexes_whatever_the_backlog(db_path: Path) -> None:
    # Invariant 8: every statement of a lease or next_ready in database mode searches an
    # index; none scans the table (which made draining a large backlog quadratic). The one
    # scan allowed stops at the first unleased row (the caught-up check).
    statements: list[str] = []

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_big", i) for i in range(300)] + [new("wk_small", 300)])
            first = await q.lease(T0, 2)
            await q.retry_later([first[0].id], T0 + 60)  # now in database mode
            assert q._db is not None
            q._db.set_trace_callback(statements.append)
            got = await q.lease(T0, 1, frozenset({"wk_big"}))
            assert bodies(got) == [new("wk_small", 300).body]
            assert await q.next_ready(frozenset({"wk_big"})) is None
            assert await q.next_ready() == 0.0
            assert len(await q.lease(T0, 500)) == 298
            assert await q.next_ready() == T0 + 60
            q._db.set_trace_callback(None)
            plans = {
                sql: " | ".join(str(row[-1]) for row in q._db.execute("EXPLAIN QUERY PLAN " + sql))
                for sql in statements
                if sql.lstrip().upper().startswith("SELECT")
            }
        finally:
            await q.close()
        scans = {
            sql: plan
            for sql, plan in plans.items()
            if "SCAN events" in plan and "lease_until = 0 LIMIT 1" not in sql
        }
        assert plans and not scans, scans

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(16))
def test_random_operations_never_lose_or_double_lease_a_row(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Invariants 2, 3 and 7 under a random mix of everything that switches between memory
    # and database mode: puts of several keys, leases with exclusions, acks, retries, dead
    # letters, replays by "another process", a hand-over bound small enough to overflow, and
    # crashes (close with leases held, then reopen). A model says which messages are live.
    # Odd seeds overflow the hand-over list often; even ones mostly stay in memory mode.
    monkeypatch.setattr("segproxy.queue.sqlite.HANDOVER_MAX_ROWS", 7 if seed % 2 else 60)
    rng = random.Random(seed)
    keys = ["wk_a", "wk_b", "wk_c"]

    async def main() -> None:
        q = await open_sqlite(db_path)
        live: set[bytes] = set()  # put, not acked: must be delivered some day
        dead: set[bytes] = set()
        leased: dict[int, bytes] = {}  # id -> body, held by "the forwarder" now
        clock = T0
        n = 0
        try:
            for _ in range(600):
                op = rng.random()
                if op < 0.3:
                    rows = [new(rng.choice(keys), n + i) for i in range(rng.randint(1, 4))]
                    n += len(rows)
                    await q.put(rows)
                    live.update(r.body for r in rows)
                elif op < 0.55:
                    exclude = frozenset(rng.sample(keys, rng.randint(0, 2)))
                    got = await q.lease(clock, rng.randint(1, 6), exclude)
                    for r in got:
                        assert r.id not in leased, "a row leased twice at once"
                        assert r.body in live, "a row leased that was acked or dead"
                        assert r.write_key not in exclude
                        leased[r.id] = r.body
                elif op < 0.75 and leased:
                    ids = rng.sample(sorted(leased), rng.randint(1, len(leased)))
                    await q.ack(ids)
                    for i in ids:
                        live.discard(leased.pop(i))
                elif op < 0.85 and leased:
                    ids = rng.sample(sorted(leased), rng.randint(1, len(leased)))
                    await q.retry_later(ids, clock + rng.choice([0.0, 5.0]))
                    for i in ids:
                        leased.pop(i)
                elif op < 0.9 and leased:
                    ids = rng.sample(sorted(leased), 1)
                    await q.dead_letter(ids, 400, "bad", clock)
                    body = leased.pop(ids[0])
                    live.discard(body)
                    dead.add(body)
                elif op < 0.94 and dead:
                    assert await asyncio.to_thread(admin.replay, str(db_path)) == len(dead)
                    live |= dead
                    dead.clear()
                elif op < 0.945:
                    await q.close()  # a crash: the leases die with the process
                    leased.clear()
                    q = await open_sqlite(db_path)
                else:
                    clock += 6.0  # retries come due
                # The file marks a row leased only while the forwarder holds it (stats runs
                # on the writer after every job queued so far).
                await q.stats()
                assert q._db is not None
                marked = {
                    r[0] for r in q._db.execute("SELECT id FROM events WHERE lease_until > 0")
                }
                assert marked <= set(leased), (
                    f"rows stuck as leased: {sorted(marked - set(leased))}"
                )
            # Drain: everything live arrives, nothing else does.
            await q.ack(sorted(leased))
            live -= set(leased.values())
            clock += 10.0
            while batch := await q.lease(clock, 50):
                for r in batch:
                    assert r.body in live, "an acked or dead row came back"
                    live.discard(r.body)
                await q.ack([r.id for r in batch])
            assert live == set(), f"{len(live)} rows never leased again"
            assert (await q.stats()).rows == 0
        finally:
            await q.close()

    asyncio.run(main())


# Invariant 10: in memory mode a group commit is one pack; events leave it one by one.


def test_a_partly_delivered_commit_keeps_exactly_what_is_still_queued(db_path: Path) -> None:
    # Both modes: a stopped process leaves neither a delivered event nor a lost one behind.
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([new("wk_a", i, size=50) for i in range(3)] + [new("wk_b", 9)])
        sent = await q.lease(T0, 2, exclude_keys=frozenset({"wk_b"}))
        await q.ack([r.id for r in sent])
        stats = admin.stats(str(db_path))  # another connection sees the file as it is
        assert (stats.rows, sorted(stats.per_key)) == (2, ["wk_a", "wk_b"])
        assert stats.per_key["wk_a"].bytes == cost(new("wk_a", 2, size=50))
        in_flight = await q.lease(T0, 10)  # the process stops while sending these
        left = [new("wk_a", 2, size=50).body, new("wk_b", 9).body]
        assert sorted(r.body for r in in_flight) == left
        await q.close()

        q = await open_sqlite(db_path)
        try:
            again = await q.lease(T0, 10)
            assert sorted(r.body for r in again) == sorted(r.body for r in in_flight)
            assert (await q.stats()).rows == 2
            await q.ack([r.id for r in again])
            assert (await q.stats()).rows == 0
        finally:
            await q.close()
        assert admin.stats(str(db_path)).rows == 0

    asyncio.run(main())


def test_a_purge_on_a_live_queue_is_not_undone_by_its_hand_over_list(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(5)])
            assert admin.purge(str(db_path)) == (5, 0)
            await q.recount()  # notices another writer: reads the file again, finds nothing
            assert await q.lease(T0, 10) == []
            assert (await q.stats()).rows == 0
            await q.put([new("wk_a", 7)])
            assert [r.body for r in await q.lease(T0, 10)] == [new("wk_a", 7).body]
        finally:
            await q.close()

    asyncio.run(main())


def test_retried_and_dead_events_leave_their_commit_and_survive_a_restart(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([new("wk_a", i) for i in range(4)])
        rows = await q.lease(T0, 10)
        await q.retry_later([rows[0].id], T0 + 60)
        await q.dead_letter([rows[1].id], 400, "bad event", T0)
        await q.ack([rows[2].id])
        await q.close()  # rows[3] was in flight

        q = await open_sqlite(db_path)
        try:
            assert [r.body for r in await q.lease(T0, 10)] == [rows[3].body]
            retried = await q.lease(T0 + 60, 10)
            assert [(r.body, r.attempts) for r in retried] == [(rows[0].body, 1)]
            dead = await q.dead_rows()
            assert [(d.body, d.status, d.reason) for d in dead] == [
                (rows[1].body, 400, "bad event")
            ]
        finally:
            await q.close()

    asyncio.run(main())


def test_deleted_events_are_cleared_only_where_that_costs_no_extra_write(db_path: Path) -> None:
    # secure_delete = FAST (2) on every connection to a queue file: ON (Debian's default)
    # rewrote each delivered pack's freed pages with zeros; OFF would leave deleted events in
    # pages still in use (docs/threat-model.md, "Queue file in cleartext").
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = schema.connect(db_path)
    try:
        assert db.execute("PRAGMA secure_delete").fetchone()[0] == 2
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# Write, then remember: a failed write leaves memory as it was (issue 11, item 5). The faults
# are real SQLite errors: a trigger in the queue file makes the next write of one kind to one
# table fail (RAISE(ABORT)), for whichever connection writes it (the proxy's or the CLI's).


def fail_writes(db: sqlite3.Connection, op: str, table: str) -> None:
    """From now on, every ``op`` (INSERT, UPDATE or DELETE) on ``table`` fails."""
    db.execute(
        f"CREATE TRIGGER IF NOT EXISTS fault_{op}_{table} BEFORE {op} ON {table}"
        " BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )


def heal(db: sqlite3.Connection) -> None:
    for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'fault_%'"
    ).fetchall():
        db.execute(f"DROP TRIGGER {name}")


async def inject(q: SqliteQueue, op: str, table: str) -> None:
    """The fault, set on the queue's own connection, in job order (not seen as another
    process writing the file)."""
    db = q._db
    assert db is not None
    await q._run(fail_writes, db, op, table)


async def healed(q: SqliteQueue) -> None:
    db = q._db
    assert db is not None
    await q._run(heal, db)


async def queued_after_restart(path: Path) -> list[bytes]:
    """Every event the file holds for sending, after a restart (a new process)."""
    q = await open_sqlite(path)
    try:
        out: list[bytes] = []
        clock = T0 + 1e9  # every retry is due
        while batch := await q.lease(clock, 1000):
            out += bodies(batch)
            await q.ack([r.id for r in batch])
        return sorted(out)
    finally:
        await q.close()


def test_a_failed_retry_write_never_loses_the_events_of_its_commit(db_path: Path) -> None:
    # The reproduction: one commit (one pack in memory mode) of 4 events; releasing 3 of them
    # for a retry fails to write; the 4th is then delivered. Rewriting the commit from a
    # memory copy already changed by the failed retry dropped the 3 for good.
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(4)])
            rows = await q.lease(T0, 10)
            await inject(q, "INSERT", "events")
            await inject(q, "UPDATE", "events")
            await inject(q, "UPDATE", "packs")
            with pytest.raises(sqlite3.Error, match="injected"):
                await q.retry_later([r.id for r in rows[:3]], T0 + 5, "HTTP 503")
            await healed(q)
            await q.ack([rows[3].id])
        finally:
            await q.close()
        assert await queued_after_restart(db_path) == sorted(bodies(rows[:3]))

    asyncio.run(main())


def break_journal(q: SqliteQueue) -> list[tuple[int, int]]:
    """From now on every write to the queue's journal fails (EBADF): each segment's descriptor
    now names the file opened read-only. Returns what mend_journal puts back."""
    assert q._hot is not None
    journal = q._hot.journal
    saved: list[tuple[int, int]] = []
    for number, seg in journal._segments.items():
        read_only = os.open(os.path.join(journal.directory, f"seg-{number:04d}"), os.O_RDONLY)
        saved.append((seg.fd, os.dup(seg.fd)))
        os.dup2(read_only, seg.fd)
        os.close(read_only)
    return saved


def mend_journal(saved: list[tuple[int, int]]) -> None:
    for fd, original in saved:
        os.dup2(original, fd)
        os.close(original)


async def to_database_mode(q: SqliteQueue) -> None:
    """A retried row puts the queue in database mode (invariant 7)."""
    await q.put([new("wk_z", 999)])
    (row,) = await q.lease(T0, 1, frozenset({"wk_a"}))
    await q.retry_later([row.id], T0)  # due at once: leased again with the others


def test_a_failed_put_stores_nothing_and_keeps_the_counters_and_what_was_stored(
    db_path: Path,
) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", 0)])
            # Memory mode writes to the journal, and to the file when the journal fails;
            # FULL writes rows.
            broken = break_journal(q)
            await inject(q, "INSERT", "events")
            with pytest.raises(QueueError, match="injected"):
                await q.put([new("wk_a", 1), new("wk_a", 2)])
            assert (q.rows, q.bytes) == (1, cost(new("wk_a", 0)))
            mend_journal(broken)
            await healed(q)
            await q.put([new("wk_a", 3)])
            assert bodies(await q.lease(T0, 10)) == [new("wk_a", 0).body, new("wk_a", 3).body]
        finally:
            await q.close()
        assert await queued_after_restart(db_path) == sorted(
            [new("wk_a", 0).body, new("wk_a", 3).body]
        )

    asyncio.run(main())


def test_a_failed_lease_write_leases_nothing_and_loses_nothing(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(3)])
            await to_database_mode(q)
            await inject(q, "UPDATE", "events")  # a database-mode lease marks rows leased
            with pytest.raises(sqlite3.Error, match="injected"):
                await q.lease(T0, 10)
            await healed(q)
            got = await q.lease(T0, 10)
            assert sorted(bodies(got)) == sorted(
                [new("wk_a", i).body for i in range(3)] + [new("wk_z", 999).body]
            )
            await q.ack([got[0].id])
        finally:
            await q.close()
        assert await queued_after_restart(db_path) == sorted(bodies(got[1:]))

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["memory", "database"])
def test_a_failed_ack_write_keeps_the_events_and_never_resurrects_the_others(
    db_path: Path, mode: str
) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(5)])
            if mode == "database":
                await to_database_mode(q)
            rows = [r for r in await q.lease(T0, 10) if r.write_key == "wk_a"]
            await q.ack([rows[0].id])
            await inject(q, "DELETE", "events")  # database mode: rows deleted
            broken = break_journal(q)  # memory mode: a RELEASE in the journal
            with pytest.raises((sqlite3.Error, QueueError), match=r"injected|the journal"):
                await q.ack([rows[1].id, rows[2].id])
            mend_journal(broken)
            await healed(q)
            await q.ack([rows[3].id])  # the same commit, delivered after the failure
        finally:
            await q.close()
        # Not acked (the ack failed): sent again. Acked: never back.
        expected = [rows[1].body, rows[2].body, rows[4].body]
        if mode == "database":
            expected.append(new("wk_z", 999).body)
        assert await queued_after_restart(db_path) == sorted(expected)

    asyncio.run(main())


def test_a_failed_retry_write_in_database_mode_keeps_every_event_once(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(4)])
            await to_database_mode(q)
            rows = [r for r in await q.lease(T0, 10) if r.write_key == "wk_a"]
            await inject(q, "UPDATE", "events")
            with pytest.raises(sqlite3.Error, match="injected"):
                await q.retry_later([r.id for r in rows[:3]], T0 + 5, "HTTP 503")
            await healed(q)
            await q.ack([rows[3].id])
            await q.retry_later([rows[0].id], T0 + 5, "HTTP 503")  # works again
        finally:
            await q.close()
        expected = [*bodies(rows[:3]), new("wk_z", 999).body]
        assert await queued_after_restart(db_path) == sorted(expected)

    asyncio.run(main())


def test_a_failed_dead_letter_write_keeps_the_events_queued_and_stores_no_dead_letter(
    db_path: Path,
) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(4)])
            rows = await q.lease(T0, 10)
            await inject(q, "INSERT", "dead")
            with pytest.raises(sqlite3.Error, match="injected"):
                await q.dead_letter([rows[0].id, rows[1].id], 400, "bad", T0)
            await healed(q)
            await q.ack([rows[2].id])
            assert await q.dead_rows() == []
            await q.dead_letter([rows[3].id], 400, "bad", T0)  # works again
        finally:
            await q.close()
        assert await queued_after_restart(db_path) == sorted(bodies(rows[:2]))
        assert [d.body for d in admin.dead(str(db_path), 10)] == [rows[3].body]

    asyncio.run(main())


def test_a_failed_move_to_the_file_loses_no_event_of_the_commits_it_moves(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    # A backlog over the hand-over bound: the packed events waiting become rows (invariant
    # 10). That write fails (logged); delivering their in-flight siblings afterwards must not
    # rewrite the packs without them.
    if synchronous != "NORMAL":
        pytest.skip("packs are loop mode's (NORMAL) only")
    monkeypatch.setattr(sqlite_queue, "HANDOVER_MAX_ROWS", 4)

    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(3)])
            in_flight = await q.lease(T0, 1)
            await inject(q, "INSERT", "events")
            await q.put([new("wk_a", i) for i in range(3, 6)])  # over the bound
            await healed(q)
            await q.ack([r.id for r in in_flight])
        finally:
            await q.close()
        assert await queued_after_restart(db_path) == sorted(
            new("wk_a", i).body for i in range(1, 6)
        )

    asyncio.run(main())


def test_a_failed_replay_or_purge_changes_nothing(db_path: Path) -> None:
    path = str(db_path)

    async def fill() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", i) for i in range(4)])
            rows = await q.lease(T0, 10)
            await q.dead_letter([rows[0].id, rows[1].id], 400, "bad", T0)
        finally:
            await q.close()

    asyncio.run(fill())
    other = sqlite3.connect(path, isolation_level=None)  # the fault, in the file itself
    try:
        fail_writes(other, "INSERT", "events")
        with pytest.raises(sqlite3.Error, match="injected"):
            admin.replay(path)
        heal(other)
        fail_writes(other, "DELETE", "dead")
        for dead_only in (True, False):
            with pytest.raises(sqlite3.Error, match="injected"):
                admin.purge(path, dead_only=dead_only)
        heal(other)
    finally:
        other.close()
    stats = admin.stats(path)
    assert (stats.rows, stats.dead) == (2, 2)
    assert sorted(d.body for d in admin.dead(path, 10)) == [new("wk_a", i).body for i in (0, 1)]
    assert asyncio.run(queued_after_restart(db_path)) == [new("wk_a", i).body for i in (2, 3)]


# ---------------------------------------------------------------------------------------------
# What one request may cost (issue 11, item 3), the last fault per key and replays (item 1)


def test_every_stored_byte_counts_against_max_bytes_not_only_the_body(make: Factory) -> None:
    # 200 tiny events under a 100 KB write key store 20 MB: the cap must see 20 MB.
    key = "k" * 100_000

    async def scenario(q: Queue) -> None:
        rows = [NewRow(key, "event", T0, b"{}", "2026-01-01T00:00:00.000Z") for _ in range(200)]
        with pytest.raises(QueueFull):
            await q.put(rows)
        await q.put(rows[:50])
        s = await q.stats()
        assert s.bytes >= 50 * 100_000
        assert s.bytes == s.per_key[key].bytes == cost(*rows[:50])
        with pytest.raises(QueueFull):
            await q.put(rows[:50])

    run(make, scenario, max_bytes=10_000_000)  # 200 bodies are 400 bytes


def test_dead_letters_past_their_cap_evict_the_oldest_loudly_and_never_block_the_queue(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    one = cost(new("wk_a", 0, size=1000)) + len("bad")

    async def scenario(q: Queue) -> None:
        for i in range(5):
            await q.put([new("wk_a", i, size=1000)])
            (row,) = await q.lease(T0, 10)
            await q.dead_letter([row.id], 400, "bad", T0 + i)
        dead = await dead_rows(q)
        assert [d.body for d in dead] == [new("wk_a", i, size=1000).body for i in (2, 3, 4)]
        s = await q.stats()
        assert (s.dead, s.dead_bytes, s.dead_evicted) == (3, 3 * one, 2)
        assert "evicted the 1 oldest" in caplog.text
        # The queue's own cap is apart: dead letters never fill it.
        for i in range(5, 8):
            await q.put([new("wk_a", i, size=1000)])
        assert (await q.stats()).rows == 3

    run(make, scenario, max_dead_bytes=3 * one + 10, max_bytes=3 * cost(new("wk_a", 0, size=1000)))


def test_the_dead_letter_cap_and_its_evictions_survive_a_restart(db_path: Path) -> None:
    one = cost(new("wk_a", 0)) + len("bad")

    async def kill(n: int) -> None:
        q = await open_sqlite(db_path, max_dead_bytes=2 * one)
        try:
            await q.put([new("wk_a", n)])
            (row,) = await q.lease(T0, 10)
            await q.dead_letter([row.id], 400, "bad", T0)
        finally:
            await q.close()

    for n in range(4):
        asyncio.run(kill(n))
    s = admin.stats(str(db_path))  # another process reads what the proxy counted
    assert (s.dead, s.dead_bytes, s.dead_evicted) == (2, 2 * one, 2)
    assert admin.stats_json(s, T0)["dead_evicted"] == 2


def test_the_last_fault_of_each_key_is_kept_with_its_time_for_the_keys_still_queued(
    make: Factory,
) -> None:
    async def scenario(q: Queue) -> None:
        await q.put([new("wk_a", 0), new("wk_b", 1), new("wk_c", 2)])
        a, b, c = await q.lease(T0, 10)
        before = time.time()
        await q.retry_later([a.id], T0, "HTTP 503")
        await q.retry_later([b.id], T0, "HTTP 301 redirect to https://api.example")
        await q.ack([c.id])
        s = await q.stats()
        assert (s.per_key["wk_a"].last_fault, s.per_key["wk_b"].last_fault) == (
            "HTTP 503",
            "HTTP 301 redirect to https://api.example",
        )
        at = s.per_key["wk_a"].last_fault_at
        assert at is not None and before <= at <= time.time()
        (again,) = await q.lease(T0, 10, frozenset({"wk_b"}))
        await q.retry_later([again.id], T0, "network: ConnectionResetError")
        assert (await q.stats()).per_key["wk_a"].last_fault == "network: ConnectionResetError"
        (again,) = await q.lease(T0, 10, frozenset({"wk_b"}))
        await q.ack([again.id])  # delivered: nothing of wk_a queued, nothing shown for it
        assert set((await q.stats()).per_key) == {"wk_b"}

    run(make, scenario)


def test_the_last_fault_is_read_by_another_process_from_the_file(db_path: Path) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", 0), new("wk_a", 1)])
            rows = await q.lease(T0, 10)
            await q.retry_later([r.id for r in rows], T0 + 60, "HTTP 307 redirect to http://x")
        finally:
            await q.close()

    asyncio.run(main())
    s = admin.stats(str(db_path))
    assert s.per_key["wk_a"].last_fault == "HTTP 307 redirect to http://x"
    shown = admin.stats_json(s, time.time() + 5)["per_key"][mask("wk_a")]
    assert shown["last_fault"] == "HTTP 307 redirect to http://x"
    assert shown["last_fault_age_seconds"] >= 5
    admin.purge(str(db_path))
    assert admin.stats(str(db_path)).per_key == {}


def test_every_row_kind_comes_back_as_it_was_put_also_after_a_restart(db_path: Path) -> None:
    kinds: list[RowKind] = ["event", "metrics", "replay"]

    async def main() -> None:
        q = await open_sqlite(db_path)
        await q.put([NewRow("wk_a", kind, T0, b"{}") for kind in kinds])
        assert [r.kind for r in await q.lease(T0, 10)] == kinds
        await q.close()  # in flight: a commit (a pack in memory mode) read again at open
        q = await open_sqlite(db_path)
        try:
            assert [r.kind for r in await q.lease(T0, 10)] == kinds
        finally:
            await q.close()

    asyncio.run(main())


def test_replayed_dead_letters_come_back_as_replay_rows_and_die_as_replay_rows(
    db_path: Path,
) -> None:
    async def main() -> None:
        q = await open_sqlite(db_path)
        try:
            await q.put([new("wk_a", 0), new("", 1, kind="metrics")])
            rows = await q.lease(T0, 10)
            await q.dead_letter([r.id for r in rows], 400, "bad", T0)
            assert await asyncio.to_thread(admin.replay, str(db_path)) == 2
            again = await q.lease(T0, 10)
            assert sorted((r.body, r.kind) for r in again) == sorted(
                [(rows[0].body, "replay"), (rows[1].body, "metrics")]
            )
            replayed = next(r for r in again if r.kind == "replay")
            await q.dead_letter([replayed.id], 400, "still bad", T0)
            await q.ack([r.id for r in again if r.kind == "metrics"])
            assert await asyncio.to_thread(admin.replay, str(db_path)) == 1
            assert [r.kind for r in await q.lease(T0, 10)] == ["replay"]
        finally:
            await q.close()

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_with_failing_writes_never_lose_or_resurrect_an_event(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Invariant 11 under a random mix: any operation may meet a file that refuses every write
    # for a moment. A failed put stores nothing; a failed ack, retry or dead letter leaves its
    # events queued (they come back at the latest after a restart); nothing acked or dead
    # comes back. At the end, after a restart, the file holds each live event exactly once.
    monkeypatch.setattr("segproxy.queue.sqlite.HANDOVER_MAX_ROWS", 7 if seed % 2 else 60)
    rng = random.Random(1000 + seed)
    keys = ["wk_a", "wk_b"]

    async def main() -> None:
        q = await open_sqlite(db_path)
        live: set[bytes] = set()
        dead: set[bytes] = set()
        leased: dict[int, bytes] = {}
        clock, n, failures = T0, 0, 0
        try:
            for _ in range(400):
                op = rng.random()
                faulty = op < 0.95 and rng.random() < 0.2  # (a restart needs a writable file)
                if faulty:
                    for verb in ("INSERT", "UPDATE", "DELETE"):
                        for table in ("events", "packs", "dead"):
                            await inject(q, verb, table)
                try:
                    if op < 0.3:
                        rows = [new(rng.choice(keys), n + i) for i in range(rng.randint(1, 4))]
                        n += len(rows)
                        await q.put(rows)
                        live.update(r.body for r in rows)
                    elif op < 0.55:
                        for r in await q.lease(clock, rng.randint(1, 6)):
                            assert r.id not in leased, "a row leased twice at once"
                            assert r.body in live, "a row leased that was acked or dead"
                            leased[r.id] = r.body
                    elif op < 0.75 and leased:
                        ids = rng.sample(sorted(leased), rng.randint(1, len(leased)))
                        bodies_out = [leased.pop(i) for i in ids]  # given up, whatever happens
                        await q.ack(ids)
                        live.difference_update(bodies_out)
                    elif op < 0.9 and leased:
                        ids = rng.sample(sorted(leased), rng.randint(1, len(leased)))
                        for i in ids:
                            leased.pop(i)
                        await q.retry_later(ids, clock + rng.choice([0.0, 5.0]), "HTTP 503")
                    elif op < 0.95 and leased:
                        (i,) = rng.sample(sorted(leased), 1)
                        body = leased.pop(i)
                        await q.dead_letter([i], 400, "bad", clock)
                        live.discard(body)
                        dead.add(body)
                    elif 0.95 <= op < 0.96:
                        await q.close()  # a crash: leases die, stranded events come back
                        leased.clear()
                        q = await open_sqlite(db_path)
                    else:
                        clock += 6.0
                except (sqlite3.Error, QueueError) as exc:
                    assert faulty and "injected" in str(exc), exc
                    failures += 1
                if faulty:
                    await healed(q)
            assert failures > 0
        finally:
            await q.close()
        assert await queued_after_restart(db_path) == sorted(live)
        assert sorted(d.body for d in admin.dead(str(db_path), 10_000)) == sorted(dead)

    asyncio.run(main())
