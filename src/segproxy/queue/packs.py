"""Packs (invariant 10 in ``queue/__init__.py``): in memory mode a group commit is one row
of ``packs``.

This module is the pure part: how a pack's body is laid out, which ids name packed events,
and :class:`PackBook`, the events each pack still holds in memory. What leaving events do
to their packs is planned from the book without changing it (:meth:`PackBook.plan`); the
queue writes that, and only once the write has committed tells the book
(:meth:`PackBook.remember`): write, then remember (invariant 11).
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterable
from typing import NamedTuple

from segproxy.queue.base import NewRow, Row, RowKind, stored_size

# A pack's events get ids PACK_BASE + pack id * PACK_SPAN + index, above any id SQLite gives
# ``events`` (max + 1).
PACK_BASE = 1 << 60
PACK_SPAN = 1 << 24  # events per pack at most (a bigger commit is written as rows)
_PACK_HEAD = struct.Struct("<dIIIB")  # received_at, len(key), len(body), len(sent_at), kind
# Row kinds by their number in a pack head (0 and 1 were a "metrics" flag before "replay").
_KINDS: tuple[RowKind, ...] = ("event", "metrics", "replay")
_NO_SENT_AT = 0xFFFFFFFF


def pack_of(row_id: int) -> int:
    """The pack holding a packed event (``row_id >= PACK_BASE``)."""
    return (row_id - PACK_BASE) // PACK_SPAN


def pack_rows(rows: Iterable[NewRow]) -> bytes:
    """Events as one pack body: per event a fixed head, the key, sentAt and the body."""
    head = _PACK_HEAD.pack
    parts: list[bytes] = []
    for key, kind, received_at, body, sent_at in rows:
        k = key.encode()
        sent = b"" if sent_at is None else sent_at.encode()
        size = _NO_SENT_AT if sent_at is None else len(sent)
        parts += (head(received_at, len(k), len(body), size, _KINDS.index(kind)), k, sent, body)
    return b"".join(parts)


def unpack_rows(blob: bytes) -> list[NewRow]:
    """The events of a pack body, in order."""
    rows: list[NewRow] = []
    at = 0
    head = _PACK_HEAD
    while at < len(blob):
        received_at, k, b, n, kind = head.unpack_from(blob, at)
        at += head.size
        key = blob[at : at + k].decode()
        at += k
        sent_at: str | None = None
        if n != _NO_SENT_AT:
            sent_at = blob[at : at + n].decode()
            at += n
        rows.append(NewRow(key, _KINDS[kind], received_at, blob[at : at + b], sent_at))
        at += b
    return rows


def _as_new(row: Row) -> NewRow:
    return NewRow(row.write_key, row.kind, row.received_at, row.body, row.sent_at)


# What leaving rows do to their packs: packs now empty (deleted) and packs rewritten with
# the events they still hold (id, rows, size, body).
PackChanges = tuple[list[int], list[tuple[int, int, int, bytes]]]
NO_PACK_CHANGES: PackChanges = ([], [])


class Leaving(NamedTuple):
    """Events leaving the queue, as planned by the job that writes it (write, then remember)."""

    rows: list[int]  # ids of rows of ``events``
    packed: list[Row]  # packed events
    changes: PackChanges  # what their leaving does to their packs in the file
    gone: dict[int, set[int]]  # pack id -> its events leaving, to forget once committed


def apply_packs(db: sqlite3.Connection, changes: PackChanges) -> None:
    """Inside a transaction: delete emptied packs, rewrite the others."""
    deleted, rewritten = changes
    if deleted:
        db.executemany("DELETE FROM packs WHERE id = ?", [(i,) for i in deleted])
    if rewritten:
        db.executemany("UPDATE packs SET rows = ?2, size = ?3, body = ?4 WHERE id = ?1", rewritten)


class PackBook:
    """The events each pack still holds (handed over or leased), by pack id and event id.

    A pack in the file always holds exactly these: the queue changes the book only after
    the write that changed the file committed. (Used on the event loop only: packs are made
    in loop mode; in FULL mode, on the writer thread, the book stays empty.)
    """

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: dict[int, dict[int, Row]] = {}

    def add(self, last_id: int, rows: list[Row]) -> None:
        """A committed pack and its events (``last_id``: its last event's id)."""
        self.held[pack_of(last_id)] = {r.id: r for r in rows}

    def plan(self, ids: list[int]) -> Leaving:
        """What ``ids`` leaving the queue (delivered, retried, dead or moved) do, changing
        nothing: the ids of rows of ``events`` among them, the packed events among them, and
        what that does to their packs (emptied ones deleted, the others rewritten with what
        they still hold)."""
        packs = self.held
        if not packs:
            return Leaving(ids, [], NO_PACK_CHANGES, {})
        rows: list[int] = []
        packed: list[Row] = []
        gone: dict[int, set[int]] = {}
        for i in ids:
            if i < PACK_BASE:
                rows.append(i)
                continue
            pack = pack_of(i)
            held = packs.get(pack)
            row = None if held is None else held.get(i)
            if row is not None and i not in gone.get(pack, ()):
                packed.append(row)
                gone.setdefault(pack, set()).add(i)
        if not gone:
            return Leaving(rows, packed, NO_PACK_CHANGES, gone)
        deleted: list[int] = []
        rewritten: list[tuple[int, int, int, bytes]] = []
        for pack in sorted(gone):
            held = packs[pack]
            leaving = gone[pack]
            if len(leaving) == len(held):
                deleted.append(pack)
            else:
                left = [_as_new(r) for i, r in held.items() if i not in leaving]
                size = sum(stored_size(r.write_key, r.body, r.sent_at) for r in left)
                rewritten.append((pack, len(left), size, pack_rows(left)))
        return Leaving(rows, packed, (deleted, rewritten), gone)

    def remember(self, leaving: Leaving) -> None:
        """After the write that mirrors it committed: the events left their packs."""
        for pack, ids in leaving.gone.items():
            held = self.held.get(pack)
            if held is None:
                continue
            for i in ids:
                held.pop(i, None)
            if not held:
                del self.held[pack]
