"""Packs (invariant 10 in ``queue/__init__.py``): in memory mode a group commit is one
record of the journal (journal.py), its events laid out as one *pack*.

This module is the pure part: how a pack's body is laid out, which ids name the events of a
journal commit, and :class:`PackBook`, the events each commit still holds in memory. What
leaving events do to the journal (a RELEASE) is planned from the book without changing it
(:meth:`PackBook.plan`); the queue writes that, and only once the write has succeeded tells
the book (:meth:`PackBook.remember`): write, then remember (invariant 11). (Files from
before the journal may hold a table ``packs`` with the same bodies: read once at open.)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from segproxy.queue.base import NewRow, Row, RowKind, stored_size

# A journal commit's events get ids PACK_BASE + its seq * PACK_SPAN + index, above any id
# SQLite gives ``events`` (max + 1).
PACK_BASE = 1 << 60
PACK_SPAN = 1 << 24  # events per pack at most (a bigger commit is written as rows)
_PACK_HEAD = struct.Struct("<dIIIB")  # received_at, len(key), len(body), len(sent_at), kind
# Row kinds by their number in a pack head (0 and 1 were a "metrics" flag before "replay").
_KINDS: tuple[RowKind, ...] = ("event", "metrics", "replay")
_NO_SENT_AT = 0xFFFFFFFF


def pack_of(row_id: int) -> int:
    """The journal commit (its seq) holding a packed event (``row_id >= PACK_BASE``)."""
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


# What leaving events do to the journal: per commit (its seq), the indexes of its events that
# leave it, or None when every event it still held leaves (a RELEASE entry, journal.py J6).
Releases = list[tuple[int, list[int] | None]]


class Leaving(NamedTuple):
    """Events leaving the queue, as planned by the job that writes it (write, then remember)."""

    rows: list[int]  # ids of rows of ``events``
    packed: list[Row]  # events of journal commits
    releases: Releases  # the RELEASE that says they left the journal
    gone: dict[int, set[int]]  # commit seq -> its events leaving, to forget once written


class PackBook:
    """The events each journal commit still holds (handed over or leased), by its seq and
    event id.

    The journal holds exactly these as not released: the queue changes the book only after
    the write that changed the journal succeeded. (Used on the event loop only: journal
    commits are made in loop mode; in FULL mode, on the writer thread, the book stays empty.)
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
        the RELEASE entries that say so (a whole commit when its last events leave)."""
        packs = self.held
        if not packs:
            return Leaving(ids, [], [], {})
        rows: list[int] = []
        packed: list[Row] = []
        gone: dict[int, set[int]] = {}
        for i in ids:  # (per event: one division, two lookups, no helper call)
            if i < PACK_BASE:
                rows.append(i)
                continue
            pack = (i - PACK_BASE) // PACK_SPAN
            held = packs.get(pack)
            row = None if held is None else held.get(i)
            if row is None:
                continue
            leaving = gone.get(pack)
            if leaving is None:
                leaving = gone[pack] = set()
            elif i in leaving:
                continue
            leaving.add(i)
            packed.append(row)
        releases: Releases = []
        for pack in sorted(gone):
            leaving = gone[pack]
            if len(leaving) == len(packs[pack]):
                releases.append((pack, None))
            else:
                base = PACK_BASE + pack * PACK_SPAN
                releases.append((pack, sorted(i - base for i in leaving)))
        return Leaving(rows, packed, releases, gone)

    def remember(self, leaving: Leaving) -> None:
        """After the write that mirrors it succeeded: the events left their commits."""
        for pack, ids in leaving.gone.items():
            held = self.held.get(pack)
            if held is None:
                continue
            if len(ids) == len(held):  # the usual case: the whole commit left
                del self.held[pack]
                continue
            for i in ids:
                held.pop(i, None)
            if not held:
                del self.held[pack]

    def rows(self) -> list[Row]:
        """Every event held, oldest commit first (stats and counters; never per request)."""
        return [r for held in self.held.values() for r in held.values()]

    def size(self) -> tuple[int, int]:
        """The events held and the bytes they count for (base.stored_size)."""
        rows = self.rows()
        return len(rows), sum(stored_size(r.write_key, r.body, r.sent_at) for r in rows)

    def oldest(self) -> float | None:
        """When the oldest event held arrived (its commit is the oldest: seqs grow)."""
        held = next(iter(self.held.values()), None)
        return None if not held else min(r.received_at for r in held.values())
