"""Memory mode's hand-over, as a state machine without I/O (invariants 7 and 10 in
``queue/__init__.py``).

In memory mode the forwarder is handed each commit's rows as they are committed, and leases
them from here: the file is only written. :class:`Handover` holds what is handed over (per
write key, oldest first), which ids were leased from it, and which mode the queue is in. It
says when to leave memory mode and what the file must then be told (a :class:`Switch`); the
queue (sqlite.py) writes that, in job order, and tells it when a database-mode lease caught
up with the file. No SQLite and no event loop here: ``tests/unit/test_queue_handover.py``
drives it alone.

The hand-over is on the per-event path (one commit's rows join it, a lease takes them): it
does what the queue did inline, in the same loops, with no work added per event.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from typing import NamedTuple

from segproxy.queue.base import NewRow, Row, queued_row
from segproxy.queue.packs import PACK_BASE


class Switch(NamedTuple):
    """Leaving memory mode: what the file must be told, in this order."""

    moving: list[int]  # journal events handed over (not in flight), by id: they become rows
    leased: list[int]  # rows of ``events`` leased from memory: marked leased in the file


def _row_id(row: Row) -> int:
    return row.id


def handed_rows(rows: list[NewRow], last_id: int) -> list[Row]:
    """A commit's rows as the forwarder leases them: they got consecutive ids ending at
    ``last_id`` (one writer holds the lock: each row of ``events`` got max(id) + 1, and a
    journal commit's events are numbered in it, invariant 10)."""
    row_id = last_id - len(rows)
    handed: list[Row] = []
    for key, kind, received_at, body, sent_at in rows:
        row_id += 1
        handed.append(queued_row(row_id, key, kind, received_at, 0, body, sent_at))
    return handed


class Handover:
    """The hand-over list and the memory-mode leases (invariant 7).

    Memory mode holds while every unleased row in the file is in the list. A commit that
    would take the list past its bound (``max_rows`` rows or ``max_bytes`` bytes of bodies: a
    backlog), a retry, or another process writing the file switches to database mode
    (:meth:`to_database_mode`); a database-mode lease that leased every unleased row switches
    back (:meth:`caught_up`). The list is then empty, and so are the leases it remembers: in
    database mode the file says what is leased.
    """

    __slots__ = ("bytes", "leased", "lines", "max_bytes", "max_rows", "memory", "rows")

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.memory = False  # memory mode (the queue opens in it if the file holds no rows)
        self.lines: dict[str, deque[Row]] = {}  # per write key, oldest first
        self.rows = 0  # rows in the lines,
        self.bytes = 0  # and their bodies' bytes
        self.leased: set[int] = set()  # rows of the file leased from the lines, not settled

    def opened(self, rows_in_file: int) -> None:
        """At open: rows left by a previous process are read from the file; none: memory mode."""
        self.memory = rows_in_file == 0

    def commit(self, handed: list[Row]) -> Switch | None:
        """Memory mode: a committed commit's rows join the list, unless that would take it
        past its bound: then memory mode ends (the commit stays in the file only)."""
        size = sum(len(r.body) for r in handed)
        if self.rows + len(handed) > self.max_rows or self.bytes + size > self.max_bytes:
            return self.to_database_mode(handed)
        lines = self.lines
        for row in handed:
            line = lines.get(row.write_key)
            if line is None:
                line = lines[row.write_key] = deque()
            line.append(row)
        self.rows += len(handed)
        self.bytes += size
        return None

    def lease(self, max_rows: int, exclude: frozenset[str]) -> list[Row]:
        """Memory mode: up to ``max_rows`` handed-over rows not of ``exclude``, oldest first,
        taken out of the list and remembered as leased."""
        lines = self.lines
        keys = [key for key in lines if key not in exclude]
        if len(keys) == 1:  # the usual case: one write key
            rows = list(itertools.islice(lines[keys[0]], max_rows))
            self._take(keys[0], len(rows))
        else:
            merged = heapq.merge(*(lines[key] for key in keys), key=_row_id)
            rows = list(itertools.islice(merged, max_rows))
            taken = Counter(r.write_key for r in rows)
            for key in keys:
                self._take(key, taken[key])
        self.rows -= len(rows)
        self.bytes -= sum(len(r.body) for r in rows)
        # Only rows of the file: a switch marks them leased there (journal events need not be)
        self.leased.update(r.id for r in rows if r.id < PACK_BASE)
        return rows

    def _take(self, key: str, count: int) -> None:
        """The first ``count`` rows of ``key``'s line leave it (the line, once empty)."""
        line = self.lines[key]
        if count == len(line):
            del self.lines[key]
        else:
            for _ in range(count):
                line.popleft()

    def settled(self, ids: list[int]) -> None:
        """Rows delivered, released or dead: no longer leased from memory (done before their
        write is queued, so a switch queued later does not mark them leased again)."""
        if self.leased:
            self.leased.difference_update(ids)

    def ready(self, exclude: frozenset[str]) -> bool:
        """Memory mode: a handed-over row of a key not in ``exclude`` is waiting."""
        return any(key not in exclude for key in self.lines)

    def to_database_mode(self, committed: list[Row] | None = None) -> Switch | None:
        """Leave memory mode (None if not in it): the list is dropped. Its journal events,
        and those of ``committed`` (a commit not handed over), are to become rows (invariant
        12); journal events in flight stay in the journal until their outcome. Rows leased
        from memory are to be marked leased in the file."""
        if not self.memory:
            return None
        self.memory = False
        moving = [r.id for line in self.lines.values() for r in line if r.id >= PACK_BASE]
        if committed is not None:
            moving += [r.id for r in committed if r.id >= PACK_BASE]
        self.lines.clear()
        self.rows = self.bytes = 0
        leased = sorted(i for i in self.leased if i < PACK_BASE)
        self.leased.clear()
        return Switch(sorted(moving), leased)

    def caught_up(self) -> None:
        """A database-mode lease leased every unleased row in the file: commits whose results
        come after its own are handed over again (jobs run in order, and so do their results)."""
        self.memory = True
