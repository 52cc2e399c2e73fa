"""Pure: queued rows -> ``/v1/batch`` bodies (ingest/prepare.py prepares events at accept).

Clock correction (docs/configuration.md, ``[forward]``): Segment sets ``timestamp =
receivedAt - (sentAt - originalTimestamp)``. An event the proxy holds for D seconds reaches
Segment D seconds later than its ``sentAt`` says, which would move its timestamp D seconds into
the future. So when a row is sent, its ``sentAt`` is moved forward by the time it waited
(send time - accept time), measured on the proxy's clock. A batch-level ``sentAt`` is folded
into each event at accept time, and no batch-level ``sentAt`` is sent (it would carry the
proxy's clock, not the client's). Timestamps are read and written by ``timestamps.py``, in
analytics.js's form.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from segproxy.memo import Memo
from segproxy.queue.base import Row
from segproxy.timestamps import epoch, format_epoch, is_ms, js_form, known_second

MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
_ENVELOPE = len(b'{"batch":[]}')


def shifted(sent_at: str, waited: float) -> str:
    """``sent_at`` moved forward by ``waited`` seconds; unchanged if it does not parse."""
    if waited <= 0:
        return sent_at
    # analytics.js's form, from a second seen before (so known to parse), moved by a wait that
    # keeps it within that second, as most are under load: only the milliseconds change.
    # (The same milliseconds as below: the wait to the microsecond, truncated.)
    if js_form(sent_at):
        digits = sent_at[20:23]
        if is_ms(digits) and known_second(sent_at):
            ms = int(digits) + round(waited * 1_000_000) // 1000
            if ms < 1000:
                return f"{sent_at[:20]}{ms:03d}Z"
    sent = epoch(sent_at)
    if sent is None:
        return sent_at
    return format_epoch(sent + waited)


def shift_sent_at(event: dict[str, Any], waited: float) -> None:
    """Move an event's ``sentAt`` forward by ``waited`` seconds (only if it parses)."""
    value = event.get("sentAt")
    if isinstance(value, str):
        event["sentAt"] = shifted(value, waited)


def _closed_with(body: bytes, field: bytes) -> bytes:
    """``body`` (a JSON object) with ``field`` (``,"name":value}``) as its last member."""
    return body[:-1] + field if len(body) > 2 else b"{" + field[1:]


# The end of an event sent with its sentAt moved forward, in two cached halves (the forwarder
# writes one per event): b',"sentAt":"YYYY-MM-DDTHH:MM:SS.' per second seen (bounded), and
# b'mmmZ"}' per millisecond.
_FIELD_HEADS: Memo[str, bytes] = Memo(4096)
_FIELD_TAILS = [b'%03dZ"}' % ms for ms in range(1000)]


def sent_at_field(sent_at: str, waited: float) -> bytes:
    """``,"sentAt":"..."}``: the last member of an event kept without its sentAt, that
    sentAt moved forward by ``waited`` seconds (the same value as :func:`shifted`)."""
    if js_form(sent_at):
        head = _FIELD_HEADS.get(sent_at[:20])
        digits = sent_at[20:23]
        if head is not None and is_ms(digits):
            # Moved within its second, as most are under load: only the milliseconds change.
            ms = int(digits) + (round(waited * 1_000_000) // 1000 if waited > 0 else 0)
            if ms < 1000:
                return head + _FIELD_TAILS[ms]
    value = shifted(sent_at, waited)
    if js_form(value) and known_second(value):
        # analytics.js's form, its second known to parse: cache the head for the next ones.
        _FIELD_HEADS.put(value[:20], b',"sentAt":' + orjson.dumps(value[:20])[:-1])
    return b',"sentAt":' + orjson.dumps(value) + b"}"


_OPEN = b'{"batch":['
_CLOSE = b"]}"
_COMMA = b","


@dataclass(slots=True)
class Batch:
    write_key: str
    rows: list[Row] = field(default_factory=list)
    # The body's pieces in order: the envelope's opening, then each event (one piece, or its
    # stored JSON without the closing brace and the restored sentAt field) with commas between.
    # The stored JSON is not copied until body().
    parts: list[bytes | memoryview] = field(default_factory=lambda: [_OPEN])
    size: int = _ENVELOPE

    def body(self) -> bytes:
        """The request body, copied once (a batch is up to 500 KB)."""
        return b"".join([*self.parts, _CLOSE])


def build_batches(
    rows: Iterable[Row],
    now: float,
    max_bytes: int = MAX_BATCH_BYTES,
    max_events: int = MAX_BATCH_EVENTS,
) -> list[Batch]:
    """Group event rows per write key into batches within Segment's limits, oldest first.

    A row of kind "replay" (a dead letter put back by ``segproxy queue replay``) goes in a
    batch of its own, so that Segment's answer is about it alone: refused again, it does not
    take good events with it, nor need a split to be found.
    """
    open_batches: dict[str, Batch] = {}
    done: list[Batch] = []
    for row in rows:  # (per event, so written for speed: one unpacking, no helper calls)
        _, key, kind, received_at, _, part, sent_at = row
        tail: bytes | None = None
        if sent_at is not None:
            tail = sent_at_field(sent_at, now - received_at)
            if len(part) > 2:
                size = len(part) - 1 + len(tail)  # the stored JSON up to its last "}", then tail
            else:  # "{}"
                part, tail = _closed_with(part, tail), None
                size = len(part)
        else:
            if now - received_at > 0.001 and b'"sentAt"' in part:  # stored with sentAt inside
                event = orjson.loads(part)
                shift_sent_at(event, now - received_at)
                part = orjson.dumps(event)
            size = len(part)
        batch: Batch | None
        if kind == "replay":  # alone (see above); other rows go on as if it were not there
            batch = Batch(key, [row], [_OPEN], _ENVELOPE + size)
            done.append(batch)
            parts = batch.parts
        else:
            batch = open_batches.get(key)
            if batch is not None and (
                batch.size + size + 1 > max_bytes or len(batch.rows) >= max_events
            ):
                done.append(batch)
                batch = None
            if batch is None:
                batch = open_batches[key] = Batch(key, [row], [_OPEN], _ENVELOPE + size)
                parts = batch.parts
            else:
                batch.size += size + 1  # a comma between events
                batch.rows.append(row)
                parts = batch.parts
                parts.append(_COMMA)
        if tail is None:
            parts.append(part)
        else:
            parts.append(memoryview(part)[:-1])
            parts.append(tail)
    done.extend(open_batches.values())
    return done
