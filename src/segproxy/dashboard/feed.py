"""Pure: the live event debugger's memory, a bounded ring of the latest events and what became
of each (queued, delivered, retrying, dead).

Nothing records into it unless a dashboard client is connected: the app then hands
:meth:`Feed.record` to ingest (called once per committed request) and :meth:`Feed.mark` to the
forwarder (called once per batch outcome); otherwise both hold None and each pays one
attribute check. Recording keeps a reference to the row's stored bytes and nothing else: the
event is parsed (type, name, messageId) only when a dashboard asks for it.

An event is found again by its stored bytes (the row's ``body``): they are the same bytes from
ingest to delivery (a retry, the SQLite file and a replay of a dead letter included), and two
rows with the same bytes are the same event (same ``messageId``), so no id has to be carried
through the queue for this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import orjson

from segproxy.forward.batcher import shifted
from segproxy.queue.base import NewRow, Row
from segproxy.redact import mask

EVENTS_KEPT = 500  # the ring's bound: the latest events, oldest dropped first
SHOWN = 200  # events in each update sent to a dashboard

QUEUED = "queued"
DELIVERED = "delivered"
RETRYING = "retrying"
DEAD = "dead"


class Entry:
    """One event in the ring. ``detail`` says why it is retrying or dead."""

    __slots__ = (
        "body",
        "detail",
        "message_id",
        "name",
        "parsed",
        "received_at",
        "sent_at",
        "seq",
        "status",
        "type",
        "write_key",
    )

    def __init__(
        self, seq: int, write_key: str, received_at: float, body: bytes, sent_at: str | None
    ) -> None:
        self.seq = seq
        self.write_key = write_key
        self.received_at = received_at
        self.body = body
        self.sent_at = sent_at
        self.status = QUEUED
        self.detail = ""
        self.parsed = False
        self.type = ""
        self.name = ""
        self.message_id = ""

    def summary(self) -> dict[str, Any]:
        """What the debugger's list shows; the key masked (never whole)."""
        if not self.parsed:
            self._parse()
        return {
            "seq": self.seq,
            "type": self.type,
            "name": self.name,
            "messageId": self.message_id,
            "key": mask(self.write_key),
            "status": self.status,
            "detail": self.detail,
            "receivedAt": self.received_at,
        }

    def _parse(self) -> None:
        self.parsed = True
        event = _event(self.body)
        self.type = _text(event.get("type"))
        # track: its event name; page and screen: their name (identify, group, alias: none)
        self.name = _text(event.get("event") or event.get("name"))
        self.message_id = _text(event.get("messageId"))

    def as_sent(self, now: float) -> dict[str, Any]:
        """The event as the forwarder sends it if it were sent ``now``: its ``sentAt`` put
        back, moved forward by the time it waited; a ``writeKey`` in it masked."""
        event = _event(self.body)
        if self.sent_at is not None:
            event["sentAt"] = shifted(self.sent_at, now - self.received_at)
        if isinstance(event.get("writeKey"), str):
            event["writeKey"] = mask(event["writeKey"])
        return event


def _event(body: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def _text(value: object) -> str:
    return value[:200] if isinstance(value, str) else ""


class Feed:
    """The ring. Every method runs on the event loop: no locks."""

    def __init__(self, size: int = EVENTS_KEPT) -> None:
        self.size = size
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.seq = 0

    def record(self, rows: list[NewRow]) -> None:
        """Events just committed to the queue (Segment's own telemetry, ``/v1/m``, is not
        an event anyone debugs: left out)."""
        entries = self.entries
        for row in rows:
            if row.kind == "metrics":
                continue
            self.seq += 1
            entries.pop(row.body, None)  # the same event again (a client's retry): now newest
            entries[row.body] = Entry(
                self.seq, row.write_key, row.received_at, row.body, row.sent_at
            )
        while len(entries) > self.size:
            entries.popitem(last=False)

    def mark(self, rows: list[Row], status: str, detail: str) -> None:
        """The forwarder's outcome for ``rows``: delivered, retrying or dead (with why)."""
        entries = self.entries
        for row in rows:
            entry = entries.get(row.body)
            if entry is not None:
                entry.status = status
                entry.detail = detail

    def requeued(self, bodies: Iterable[bytes]) -> None:
        """Dead letters put back in the queue (replayed): queued again."""
        for body in bodies:
            entry = self.entries.get(body)
            if entry is not None:
                entry.status = QUEUED
                entry.detail = "replayed"

    def latest(self, limit: int = SHOWN) -> list[dict[str, Any]]:
        """The newest ``limit`` events, newest first."""
        out: list[dict[str, Any]] = []
        for entry in reversed(self.entries.values()):
            if len(out) >= limit:
                break
            out.append(entry.summary())
        return out

    def find(self, seq: int) -> Entry | None:
        for entry in reversed(self.entries.values()):
            if entry.seq == seq:
                return entry
        return None

    def clear(self) -> None:
        """Nobody watches any more: keep nothing (the events are not ours to hold)."""
        self.entries.clear()
