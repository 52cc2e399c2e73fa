"""The journal against a careless operator and a hostile world (issue 13's attack): files
changed behind the proxy's back, clocks that step, sizes changed across restarts. Real files,
real SQLite, real processes killed with SIGKILL (helpers of test_queue_journal.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segproxy.queue import admin
from tests.unit.test_queue_journal import journal_segments, killed_after, new


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
