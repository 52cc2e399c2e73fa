"""Pure: an accepted payload -> its events exactly as they will be sent, checked, as bytes.

Segment refuses a whole request for one event over 32 KB, so that limit is checked on the
event as it will reach Segment, after everything the proxy adds to it: ``context.ip`` and a
``messageId`` (parse.enrich), the batch's ``sentAt``, ``context`` and ``integrations`` folded
into each event, the type its endpoint implies, and the ``sentAt`` the forwarder puts back
when it sends the event (its longest form: ``queue.base.SENT_AT_*``). On the queue path each
event is encoded once, into the bytes that are stored, and measured on those.

What one batch may store is bounded by what it sent (docs/architecture.md, "What a request
may cost"): the events as they will be sent, each with its write key, total at most
``STORE_FACTOR`` times the decompressed body plus ``STORE_PER_EVENT`` bytes per event (a
single event is bounded by the 32 KB check). Real clients stay far below it (they send no
batch-level context, or a small one); a large batch-level context copied into thousands of
events does not. Encoding stops at the first event past the bound, so a refused request
costs about the bound's bytes of work.

Errors (all :class:`IngestError`, 400): ``event_too_large``, ``merged_too_large``,
``request_too_large`` (passthrough: the body as it will be forwarded), ``bad_event`` (an event
nested too deep to re-encode).
"""

from __future__ import annotations

from typing import Any

import orjson

from segproxy.config import LimitsConfig
from segproxy.ingest.parse import IngestError, Payload
from segproxy.queue.base import SENT_AT_MEMBER_BYTES, SENT_AT_MOVED_CHARS, NewRow, new_row
from segproxy.routes import API_ENDPOINTS

# The bound on what one batch stores: STORE_FACTOR x its decompressed body + STORE_PER_EVENT
# bytes per event. The per-event part covers what the proxy adds to a small event (context.ip,
# messageId, the sentAt of its batch, its write key: about 150 bytes); the factor, a
# batch-level context copied into each event.
STORE_FACTOR = 4
STORE_PER_EVENT = 256

_SHARED_KEYS = ("context", "integrations")


def encode(obj: object) -> bytes:
    """Serialise what we store or forward; an object orjson cannot write (nested > 255 deep)
    is a 400."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        raise IngestError(400, "bad_event", f"the event cannot be re-encoded: {exc}") from exc


def fold_batch_fields(doc: dict[str, Any], event: dict[str, Any]) -> None:
    """Give a batch's event what the batch carried for all of them: its ``sentAt`` (unless
    the event has its own), its ``context`` and ``integrations`` (the event's keys win).

    Clock correction (forward/batcher.py) then works per event; no batch-level ``sentAt`` is
    sent (it would carry the proxy's clock, not the client's).
    """
    sent_at = doc.get("sentAt")
    if isinstance(sent_at, str) and "sentAt" not in event:
        event["sentAt"] = sent_at
    for key in _SHARED_KEYS:
        shared = doc.get(key)
        if isinstance(shared, dict):
            mine = event.get(key)
            if isinstance(mine, dict):
                event[key] = {**shared, **mine}
            elif mine is None:
                event[key] = dict(shared)


def sent_size(body: bytes, sent_at: str | None) -> int:
    """The bytes of an event row as the forwarder sends it, at most (queue.base.SENT_AT_*)."""
    if sent_at is None:
        return len(body)
    return len(body) + SENT_AT_MEMBER_BYTES + max(len(sent_at), SENT_AT_MOVED_CHARS)


def event_row(
    write_key: str, event: dict[str, Any], now: float, limits: LimitsConfig, where: str
) -> NewRow:
    """An event's queue row (its JSON without ``sentAt``, which the row keeps apart), refused
    with ``event_too_large`` if the forwarder would send more than Segment's 32 KB of it."""
    value = event.get("sentAt")
    sent_at: str | None = None
    if isinstance(value, str):
        sent_at = value
        del event["sentAt"]
    body = encode(event)
    size = sent_size(body, sent_at)
    if size > limits.max_event_bytes:
        raise _too_large(where, size, limits)
    return new_row(write_key, "event", now, body, sent_at)


def _too_large(where: str, size: int, limits: LimitsConfig) -> IngestError:
    return IngestError(
        400,
        "event_too_large",
        f"{where} is {size} bytes as it would be sent to Segment (with the context.ip, "
        "messageId and sentAt added to it, and its batch's context and integrations); "
        f"the limit is {limits.max_event_bytes} bytes per event",
    )


def rows(payload: Payload, now: float, limits: LimitsConfig) -> list[NewRow]:
    """One queue row per event (or one for a metrics request), as it will be sent.

    Mutates the payload's events (folds, implied type), which parse.enrich has enriched.
    """
    doc = payload.doc
    if payload.endpoint == "m":
        return [NewRow("", "metrics", now, encode(doc))]
    key = payload.write_key or ""
    implied = API_ENDPOINTS.get(payload.endpoint)
    if implied is not None:  # one event: Segment's 32 KB bounds it
        return [single_row(key, doc, implied, now, limits)]
    events = payload.events
    budget = STORE_FACTOR * payload.size + STORE_PER_EVENT * len(events)
    per_row = len(key.encode())
    stored = 0
    out: list[NewRow] = []
    for i, event in enumerate(events):
        fold_batch_fields(doc, event)
        row = event_row(key, event, now, limits, f"batch[{i}]")
        stored += sent_size(row.body, row.sent_at) + per_row
        if stored > budget:
            raise _merged_too_large(payload, budget)
        out.append(row)
    return out


def single_row(
    write_key: str, event: dict[str, Any], implied: str, now: float, limits: LimitsConfig
) -> NewRow:
    """The row of a single-event request (also the fast lane's): its type from the endpoint
    unless it names one."""
    if "type" not in event:
        event["type"] = implied
    return event_row(write_key, event, now, limits, "the event")


def _merged_too_large(payload: Payload, budget: int) -> IngestError:
    shared = [k for k in _SHARED_KEYS if isinstance(payload.doc.get(k), dict)]
    cause = f"once the batch's {' and '.join(shared)} is merged into each" if shared else ""
    return IngestError(
        400,
        "merged_too_large",
        f"the {len(payload.events)} events would store more than {budget} bytes {cause}: "
        f"a request may store at most {STORE_FACTOR} x its {payload.size}-byte body "
        f"+ {STORE_PER_EVENT} bytes per event; send a smaller batch-level context "
        "or put it on the events",
    )


def forwarded_body(payload: Payload, limits: LimitsConfig) -> bytes:
    """Passthrough: the request as it will be forwarded (enriched), within Segment's limits
    as forwarded: 500 KB for the request, 32 KB for each event in it."""
    body = encode(payload.doc)
    if payload.endpoint == "m":
        return body
    if len(body) > limits.max_request_bytes:
        raise IngestError(
            400,
            "request_too_large",
            f"the request is {len(body)} bytes as it would be sent to Segment (with context.ip "
            f"and messageId added); the limit is {limits.max_request_bytes}",
        )
    if API_ENDPOINTS.get(payload.endpoint) is not None:
        return single_body_checked(body, limits)
    if len(body) > limits.max_event_bytes:  # else every event in it is smaller
        for i, event in enumerate(payload.events):
            size = len(encode(event))
            if size > limits.max_event_bytes:
                raise _too_large(f"batch[{i}]", size, limits)
    return body


def single_body_checked(body: bytes, limits: LimitsConfig) -> bytes:
    """Passthrough of one event: its body is the event as Segment will measure it."""
    if len(body) > limits.max_event_bytes or len(body) > limits.max_request_bytes:
        raise _too_large("the event", len(body), limits)
    return body
