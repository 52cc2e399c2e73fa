"""The queue announces its commits through the hook it is made with (``on_commit``): once per
commit that stored rows, with their number, before its callers hear of it; never for rows it
did not store. (The app wakes the forwarder with it: app.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from segproxy.queue.base import NewRow, Queue, QueueFull
from segproxy.queue.memory import MemoryQueue
from segproxy.queue.sqlite import SqliteQueue


def new(n: int) -> NewRow:
    return NewRow("wk_a", "event", 1.0 + n, f'{{"messageId":"m-{n}"}}'.encode())


async def make(backend: str, path: Path, hook: Callable[[int], None], max_rows: int) -> Queue:
    if backend == "memory":
        return MemoryQueue(max_rows=max_rows, on_commit=hook)
    synchronous = backend.removeprefix("sqlite-")
    return await SqliteQueue(
        str(path),
        max_rows=max_rows,
        max_bytes=1 << 30,
        min_free_disk_bytes=0,
        synchronous=synchronous,
        on_commit=hook,
    ).open()


@pytest.mark.parametrize("backend", ["memory", "sqlite-NORMAL", "sqlite-FULL"])
def test_each_commit_is_announced_once_with_its_rows_before_its_callers_hear(
    backend: str, tmp_path: Path
) -> None:
    events: list[str] = []

    async def main() -> None:
        q = await make(backend, tmp_path / "q.db", lambda n: events.append(f"commit {n}"), 10)
        loop = asyncio.get_running_loop()
        try:
            for i, size in enumerate((1, 3)):
                answered: asyncio.Future[None] = loop.create_future()

                def done(
                    exc: BaseException | None, i: int = i, fut: asyncio.Future[None] = answered
                ) -> None:
                    events.append(f"done {i} {exc}")
                    fut.set_result(None)

                q.submit_then([new(i * 10 + j) for j in range(size)], done)
                await answered
            with pytest.raises(QueueFull):  # over max_rows: refused, nothing announced
                q.submit_then([new(100 + j) for j in range(7)], lambda _: None)
        finally:
            await q.close()

    asyncio.run(main())
    assert events == ["commit 1", "done 0 None", "commit 3", "done 1 None"]


def test_a_group_commit_is_announced_once_for_all_its_callers(tmp_path: Path) -> None:
    # Loop mode (NORMAL): everything submitted in one round of the loop shares a commit.
    announced: list[int] = []
    answered: list[int] = []

    async def main() -> None:
        q = await make("sqlite-NORMAL", tmp_path / "q.db", announced.append, 1000)
        try:
            await asyncio.gather(*(q.put([new(i), new(100 + i)]) for i in range(20)))
            q.submit_then([new(500)], lambda _: answered.append(len(announced)))
            await q.put([new(501)])
        finally:
            await q.close()

    asyncio.run(main())
    assert sum(announced) == 2 * 20 + 2
    assert len(announced) <= 3  # a few group commits, not one call per caller
    assert answered == [len(announced)]  # announced before its caller heard


def test_a_commit_that_fails_is_not_announced(tmp_path: Path) -> None:
    announced: list[int] = []

    async def main() -> None:
        q = await make("sqlite-NORMAL", tmp_path / "q.db", announced.append, 1000)
        assert isinstance(q, SqliteQueue)
        try:
            await q.put([new(0)])
            # (to the file: in memory mode a commit goes to the journal, which cannot fill)
            q._handover.memory = False
            db = q._db
            assert db is not None
            pages = (await q._run(lambda: db.execute("PRAGMA page_count").fetchone()))[0]
            await q._run(lambda: db.execute(f"PRAGMA max_page_count = {pages + 1}"))
            with pytest.raises(QueueFull, match="full"):
                await q.put([NewRow("wk_a", "event", 2.0, b'{"pad":"' + b"x" * 200_000 + b'"}')])
        finally:
            await q.close()

    asyncio.run(main())
    assert announced == [1]
